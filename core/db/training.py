"""What the trainer reads and writes: aggregated preferences over labelled pairs, and its rounds.

Aggregation happens here, at training time, so the rule can change without relabelling
(METHOD.md, "Human labels"): a pair's preference is the strict majority of its a/b/tie votes;
a tie majority, an a/b draw, or only skips carry no gradient and the pair is left out.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db.base import utcnow
from core.db.errors import InvalidInput, NotFound
from core.db.models import Judgement, Pair, Prompt, TrainingRound, Trajectory
from core.db.policies import get_policy_version


@dataclass(frozen=True)
class PreferencePair:
    pair_id: int
    prompt: str
    policy_version: int
    winner_trajectory_id: int
    loser_trajectory_id: int
    votes: int  # a/b/tie votes behind the decision


def majority(choices: Collection[str]) -> str | None:
    """'a', 'b' or 'tie' when one of them has strictly more votes than each other; skips don't vote."""
    counts = Counter(c for c in choices if c != "skip")
    ranked = counts.most_common(2)
    if not ranked or (len(ranked) == 2 and ranked[0][1] == ranked[1][1]):
        return None
    return ranked[0][0]


def preference_pairs(
    *,
    session: Session,
    versions: Collection[int] | None = None,
    complete_only: bool = True,
    after_pair_id: int = 0,
) -> list[PreferencePair]:
    """Decisive labelled pairs (winner and loser trajectory), oldest first.

    `versions` restricts to pairs sampled by those policy versions (the trainer's freshness rule);
    `complete_only` keeps pairs that got all their required judgements; `after_pair_id` lets a
    round read only pairs newer than the last one it used.
    """
    query = (
        select(
            Pair.id, Pair.policy_version, Pair.required_judgements, Pair.trajectory_a_id, Pair.trajectory_b_id
        )
        .add_columns(Prompt.text, Judgement.choice)
        .join(Prompt, Prompt.id == Pair.prompt_id)
        .join(Judgement, Judgement.pair_id == Pair.id)
        .where(Pair.id > after_pair_id)
        .order_by(Pair.id)
    )
    if versions is not None:
        query = query.where(Pair.policy_version.in_(list(versions)))
    votes: dict[int, list[str]] = defaultdict(list)
    info: dict[int, tuple[int, int, int, int, str]] = {}
    for pair_id, version, required, traj_a, traj_b, text, choice in session.execute(query):
        votes[pair_id].append(choice)
        info[pair_id] = (version, required, traj_a, traj_b, text)
    result = []
    for pair_id, choices in votes.items():
        version, required, traj_a, traj_b, text = info[pair_id]
        if complete_only and len(choices) < required:
            continue
        decision = majority(choices)
        if decision not in ("a", "b"):
            continue
        winner, loser = (traj_a, traj_b) if decision == "a" else (traj_b, traj_a)
        result.append(
            PreferencePair(
                pair_id=pair_id,
                prompt=text,
                policy_version=version,
                winner_trajectory_id=winner,
                loser_trajectory_id=loser,
                votes=sum(c != "skip" for c in choices),
            )
        )
    return result


def trajectory_keys(*, session: Session, trajectory_ids: Collection[int]) -> dict[int, Trajectory]:
    """Trajectory rows (blob keys, seed, sampler settings) by id, for loading latents and log-probs."""
    rows = session.scalars(select(Trajectory).where(Trajectory.id.in_(list(trajectory_ids))))
    return {row.id: row for row in rows}


def start_training_round(*, session: Session, base_version: int) -> TrainingRound:
    get_policy_version(session=session, version=base_version)
    row = TrainingRound(base_version=base_version, status="running", metrics={}, started_at=utcnow())
    session.add(row)
    session.flush()
    return row


def finish_training_round(
    *,
    session: Session,
    round_id: int,
    status: str,
    produced_version: int | None = None,
    pairs_used: int = 0,
    judgements_used: int = 0,
    metrics: dict[str, Any] | None = None,
) -> TrainingRound:
    """Close a round as 'done' (with the version it published) or 'failed'."""
    row = session.get(TrainingRound, round_id)
    if row is None:
        raise NotFound(f"training round {round_id} does not exist")
    if status not in ("done", "failed"):
        raise InvalidInput(f"status {status!r} must be 'done' or 'failed' to finish a round")
    if status == "done" and produced_version is None:
        raise InvalidInput(
            f"round {round_id} is done but names no produced_version; publish the version first"
        )
    if produced_version is not None:
        get_policy_version(session=session, version=produced_version)
    row.status, row.produced_version = status, produced_version
    row.pairs_used, row.judgements_used = pairs_used, judgements_used
    row.metrics, row.finished_at = metrics or {}, utcnow()
    session.flush()
    return row
