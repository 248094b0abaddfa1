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

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.db.base import utcnow
from core.db.errors import InvalidInput, NotFound
from core.db.models import Judgement, Pair, Prompt, TrainingRound, TrainingRoundPair, Trajectory
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


def used_pair_ids(*, session: Session) -> set[int]:
    """Pairs that a finished or running round has trained on (never used again)."""
    rows = session.scalars(
        select(TrainingRoundPair.pair_id).join(TrainingRound).where(TrainingRound.status != "failed")
    )
    return set(rows)


def fresh_preference_pairs(*, session: Session, min_version: int) -> list[PreferencePair]:
    """Complete, decisive pairs from versions >= `min_version` that no round has used yet."""
    latest = session.scalar(select(func.max(Pair.policy_version))) or 0
    used = used_pair_ids(session=session)
    pairs = preference_pairs(session=session, versions=range(min_version, latest + 1))
    return [p for p in pairs if p.pair_id not in used]


def running_round(*, session: Session) -> TrainingRound | None:
    """The round a killed trainer left running, if any (the trainer resumes it first)."""
    return session.scalar(
        select(TrainingRound).where(TrainingRound.status == "running").order_by(TrainingRound.id)
    )


def record_round_pairs(*, session: Session, round_id: int, pairs: Collection[PreferencePair]) -> None:
    """Remember which pairs (and which winner) a round trains on, before it trains."""
    by_id = {p.pair_id: p for p in pairs}
    rows = session.execute(select(Pair.id, Pair.trajectory_a_id).where(Pair.id.in_(list(by_id))))
    for pair_id, traj_a in rows:
        p = by_id[pair_id]
        winner = "a" if p.winner_trajectory_id == traj_a else "b"
        session.add(TrainingRoundPair(round_id=round_id, pair_id=pair_id, winner=winner, judgements=p.votes))
    session.flush()


def round_preference_pairs(*, session: Session, round_id: int) -> list[PreferencePair]:
    """The pairs recorded for a round, in a fixed order, as they were decided when it started."""
    rows = session.execute(
        select(Pair, Prompt.text, TrainingRoundPair.winner, TrainingRoundPair.judgements)
        .join(TrainingRoundPair, TrainingRoundPair.pair_id == Pair.id)
        .join(Prompt, Prompt.id == Pair.prompt_id)
        .where(TrainingRoundPair.round_id == round_id)
        .order_by(Pair.id)
    )
    out = []
    for pair, text, winner, votes in rows:
        a, b = pair.trajectory_a_id, pair.trajectory_b_id
        w, lo = (a, b) if winner == "a" else (b, a)
        out.append(PreferencePair(pair.id, text, pair.policy_version, w, lo, votes))
    return out
