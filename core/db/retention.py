"""Which trajectories' latents no round will read again, and the marker that says they were deleted.

Latents are read by training rounds only (trainer/rounds.py); the judgement export (core/db/dataset.py)
and the web pages read images, and evaluation pairs keep no latents at all. A round trains on decided
pairs no running or finished round has taken (`core.db.training.preference_pairs(unused_only=True)`),
so once a round that took a pair is 'done' nothing takes that pair again. A trajectory's latents are
therefore prunable when every pair it is in was trained by a done round, other than the newest
`keep_rounds` done rounds. Whatever the settings, these keep their latents:

- open pairs, undecided pairs (a draw, a tie majority, only skips: a later vote can decide them) and
  decided pairs no round took yet, among them those of another sampler group (they wait for a round at
  their settings) and those beyond the version lag (a rollback brings them back within it);
- pairs of a running round (it may resume, reading them again) and of failed rounds (their pairs go
  back to the pool);
- evaluation pairs (they have no latents; their trajectories are never prunable).

If rounds ever replay pairs (train a pair again in a later round), `_prunable_ids` must learn which
pairs replay can still pick, or replay must skip pruned ones.

Rows keep their keys after pruning: `latents_pruned_at` says the blob is gone, so nothing points at a
missing blob without saying so. These functions never commit; core/retention.py deletes the blobs.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import ColumnElement, Select, case, func, select, union_all, update
from sqlalchemy.orm import Session

from core.db.base import utcnow
from core.db.models import Pair, TrainingRound, TrainingRoundPair, Trajectory


@dataclass(frozen=True)
class LatentsCounts:
    """Trajectory rows by what became of their latents."""

    trajectories: int
    kept: int  # latents stored and not pruned
    pruned: int  # `latents_pruned_at` set
    without: int  # never had latents (evaluation images)


def _prunable_ids(keep_rounds: int) -> Select[tuple[int]]:
    """Ids of trajectories all of whose pairs were trained by a done round older than the newest
    `keep_rounds` done rounds (see the module docstring for what that leaves out)."""
    rounds = select(TrainingRound.id).where(TrainingRound.status == "done")
    if keep_rounds > 0:
        newest = rounds.order_by(TrainingRound.id.desc()).limit(keep_rounds)
        rounds = rounds.where(TrainingRound.id.not_in(newest.scalar_subquery()))
    trained = select(TrainingRoundPair.pair_id).where(
        TrainingRoundPair.round_id.in_(rounds.scalar_subquery())
    )
    # every (trajectory, pair) reference, from either side
    refs = union_all(
        select(Pair.trajectory_a_id.label("tid"), Pair.id.label("pid")),
        select(Pair.trajectory_b_id.label("tid"), Pair.id.label("pid")),
    ).subquery()
    return (
        select(refs.c.tid)
        .group_by(refs.c.tid)
        .having(func.min(case((refs.c.pid.in_(trained.scalar_subquery()), 1), else_=0)) == 1)
    )


def _unpruned() -> tuple[ColumnElement[bool], ...]:
    return (Trajectory.latents_key.is_not(None), Trajectory.latents_pruned_at.is_(None))


def prunable_latents(*, session: Session, keep_rounds: int = 0) -> list[tuple[int, str]]:
    """(trajectory id, latents key) of every trajectory whose latents can go, by id."""
    query = (
        select(Trajectory.id, Trajectory.latents_key)
        .where(Trajectory.id.in_(_prunable_ids(keep_rounds).scalar_subquery()), *_unpruned())
        .order_by(Trajectory.id)
    )
    return [(tid, key) for tid, key in session.execute(query) if key is not None]


def mark_latents_pruned(*, session: Session, keep_rounds: int = 0, at: dt.datetime | None = None) -> int:
    """Stamp `latents_pruned_at` on every prunable trajectory (one UPDATE, so what is marked is exactly
    what is prunable at that moment); returns how many. Commit before deleting their blobs."""
    result = session.execute(
        update(Trajectory)
        .where(Trajectory.id.in_(_prunable_ids(keep_rounds).scalar_subquery()), *_unpruned())
        .values(latents_pruned_at=at or utcnow())
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def pruned_latents_keys(*, session: Session) -> set[str]:
    """The latents keys of every trajectory marked pruned (their blobs should be gone)."""
    query = select(Trajectory.latents_key).where(
        Trajectory.latents_pruned_at.is_not(None), Trajectory.latents_key.is_not(None)
    )
    return {key for key in session.scalars(query) if key is not None}


def latents_counts(*, session: Session) -> LatentsCounts:
    total, pruned, without = session.execute(
        select(
            func.count(Trajectory.id),
            func.count(Trajectory.latents_pruned_at),
            func.count(Trajectory.id) - func.count(Trajectory.latents_key),
        )
    ).one()
    return LatentsCounts(total, total - pruned - without, pruned, without)
