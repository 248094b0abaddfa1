"""Judged pairs as flat rows for preference-data tools (one JSON object per judgement).

Each row carries, per side a/b, the trajectory id, its seed and its sampler record (the settings, the
scheduler with its config and the base model, as the worker recorded them: see worker/sampling.py),
so an exported image can be redrawn with stock diffusers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from core.db.models import Judgement, Pair, Prompt, Trajectory


def iter_judged_pairs(*, session: Session, batch: int = 1000) -> Iterator[dict[str, Any]]:
    """Yield one dict per judgement, ordered by judgement id, with blob keys, seeds and sampler records
    of both images."""
    traj_a, traj_b = aliased(Trajectory), aliased(Trajectory)
    query = (
        select(
            Judgement.id,
            Judgement.pair_id,
            Judgement.labeller_id,
            Judgement.choice,
            Judgement.shown_left,
            Judgement.decide_ms,
            Judgement.created_at,
            Pair.policy_version,
            Prompt.id,
            Prompt.text,
            traj_a.image_key,
            traj_b.image_key,
            traj_a.id,
            traj_b.id,
            traj_a.seed,
            traj_b.seed,
            traj_a.sampler,
            traj_b.sampler,
            Pair.kind,
            Pair.campaign_id,
            traj_a.policy_version,
            traj_b.policy_version,
        )
        .join(Pair, Pair.id == Judgement.pair_id)
        .join(Prompt, Prompt.id == Pair.prompt_id)
        .join(traj_a, traj_a.id == Pair.trajectory_a_id)
        .join(traj_b, traj_b.id == Pair.trajectory_b_id)
        .order_by(Judgement.id)
    )
    for row in session.execute(query.execution_options(yield_per=batch)):
        yield {
            "judgement_id": row[0],
            "pair_id": row[1],
            "labeller_id": row[2],
            "choice": row[3],
            "shown_left": row[4],
            "decide_ms": row[5],
            "created_at": row[6].isoformat(),
            "policy_version": row[7],
            "prompt_id": row[8],
            "prompt": row[9],
            "image_a_key": row[10],
            "image_b_key": row[11],
            "trajectory_a_id": row[12],
            "trajectory_b_id": row[13],
            "seed_a": row[14],
            "seed_b": row[15],
            "sampler_a": row[16] or {},
            "sampler_b": row[17] or {},
            # 'eval': a vote of a human evaluation campaign (side a and b are two versions, from one seed)
            "kind": row[18],
            "campaign_id": row[19],
            "policy_version_a": row[20],
            "policy_version_b": row[21],
        }
