"""The judgement dataset: judged pairs as flat rows for preference-data tools (one JSON object per
judgement), served by `GET /api/v1/export`. (Not the adapter export: that is `densealign export`.)

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


def _export_columns() -> tuple[dict[str, Any], Any, Any]:
    """Output field -> column of one exported judgement, and the two trajectory aliases it reads."""
    traj_a, traj_b = aliased(Trajectory), aliased(Trajectory)
    columns = {
        "judgement_id": Judgement.id,
        "pair_id": Judgement.pair_id,
        "labeller_id": Judgement.labeller_id,
        "choice": Judgement.choice,
        "shown_left": Judgement.shown_left,
        "decide_ms": Judgement.decide_ms,
        "created_at": Judgement.created_at,
        "policy_version": Pair.policy_version,
        "prompt_id": Prompt.id,
        "prompt": Prompt.text,
        "image_a_key": traj_a.image_key,
        "image_b_key": traj_b.image_key,
        "trajectory_a_id": traj_a.id,
        "trajectory_b_id": traj_b.id,
        "seed_a": traj_a.seed,
        "seed_b": traj_b.seed,
        # aligned pairs: both sides' initial noise came from this seed (NULL: from seed_a / seed_b)
        "z0_seed_a": traj_a.z0_seed,
        "z0_seed_b": traj_b.z0_seed,
        "pairing": Pair.pairing,
        "sampler_a": traj_a.sampler,
        "sampler_b": traj_b.sampler,
        # 'eval': a vote of a human evaluation campaign (side a and b are two versions, from one seed)
        "kind": Pair.kind,
        "campaign_id": Pair.campaign_id,
        "policy_version_a": traj_a.policy_version,
        "policy_version_b": traj_b.policy_version,
    }
    return columns, traj_a, traj_b


def iter_judged_pairs(*, session: Session, batch: int = 1000) -> Iterator[dict[str, Any]]:
    """Yield one dict per judgement, ordered by judgement id, with blob keys, seeds and sampler records
    of both images."""
    columns, traj_a, traj_b = _export_columns()
    query = (
        select(*(column.label(name) for name, column in columns.items()))
        .join(Pair, Pair.id == Judgement.pair_id)
        .join(Prompt, Prompt.id == Pair.prompt_id)
        .join(traj_a, traj_a.id == Pair.trajectory_a_id)
        .join(traj_b, traj_b.id == Pair.trajectory_b_id)
        .order_by(Judgement.id)
    )
    for row in session.execute(query.execution_options(yield_per=batch)):
        record = dict(row._mapping)
        record["created_at"] = record["created_at"].isoformat()
        record["sampler_a"] = record["sampler_a"] or {}
        record["sampler_b"] = record["sampler_b"] or {}
        yield record
