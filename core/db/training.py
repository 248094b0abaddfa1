"""What the trainer reads and writes: aggregated preferences over labelled pairs, and its rounds.

Aggregation happens here, at training time, so the rule can change without relabelling
(METHOD.md, "Human labels"): a pair's preference is the strict majority of its a/b/tie votes;
a tie majority, an a/b draw, or only skips carry no gradient and the pair is left out.
`weigh_by_reliability` is the other rule (DENSEALIGN_DPO__LABEL_WEIGHTING=reliability): each decided
pair's winner and loss weight come from its votes weighed by every voter's measured reliability.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import case, select
from sqlalchemy.orm import Session, aliased

from core.db.base import utcnow
from core.db.errors import InvalidInput, LatentsPruned, NotFound
from core.db.models import Judgement, Pair, Prompt, TrainingRound, TrainingRoundPair, Trajectory
from core.db.policies import get_policy_version
from core.db.reliability import fit_labellers
from core.db.sampler_groups import PairGroups, SamplerGroup, pair_group, split_by_sampler
from core.reliability import pair_weight


@dataclass(frozen=True)
class PreferencePair:
    pair_id: int
    prompt: str
    policy_version: int
    winner_trajectory_id: int
    loser_trajectory_id: int
    votes: int  # a/b/tie votes behind the decision
    # The sampler settings both trajectories were drawn with; None when they disagree (never trained on).
    sampler: SamplerGroup | None = None
    # Blob keys of the two trajectories' latents; filled by `round_preference_pairs` (what the trainer
    # loads), None elsewhere.
    winner_latents_key: str | None = None
    loser_latents_key: str | None = None
    weight: float = 1.0  # the pair's loss weight (see `weigh_by_reliability`)


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
    min_version: int | None = None,
    complete_only: bool = True,
    after_pair_id: int = 0,
    unused_only: bool = False,
) -> list[PreferencePair]:
    """Decisive labelled pairs (winner and loser trajectory, their sampler group), oldest first.

    `versions` / `min_version` restrict to pairs sampled by those policy versions (the trainer's
    freshness rule); `complete_only` keeps pairs that got all their required judgements;
    `after_pair_id` lets a round read only pairs newer than the last one it used; `unused_only` leaves
    out pairs a running or finished round has taken. One query: a row per judgement, with the pair's
    prompt and both trajectories' sampler records.
    """
    traj_a, traj_b = aliased(Trajectory), aliased(Trajectory)
    query = (
        select(
            Pair.id, Pair.policy_version, Pair.required_judgements, Pair.trajectory_a_id, Pair.trajectory_b_id
        )
        .add_columns(Prompt.text, traj_a.sampler, traj_b.sampler, Judgement.choice)
        .join(Prompt, Prompt.id == Pair.prompt_id)
        .join(traj_a, traj_a.id == Pair.trajectory_a_id)
        .join(traj_b, traj_b.id == Pair.trajectory_b_id)
        .join(Judgement, Judgement.pair_id == Pair.id)
        # Evaluation pairs (core.db.campaigns) measure the policy and are never trained on.
        .where(Pair.kind == "train", Pair.id > after_pair_id)
        .order_by(Pair.id)
    )
    if versions is not None:
        query = query.where(Pair.policy_version.in_(list(versions)))
    if min_version is not None:
        query = query.where(Pair.policy_version >= min_version)
    if unused_only:
        taken = (
            select(TrainingRoundPair.pair_id)
            .join(TrainingRound, TrainingRound.id == TrainingRoundPair.round_id)
            .where(TrainingRoundPair.pair_id == Pair.id, TrainingRound.status != "failed")
            .exists()
        )
        query = query.where(~taken)
    votes: dict[int, list[str]] = defaultdict(list)
    info: dict[int, tuple[int, int, int, int, str, SamplerGroup | None]] = {}
    for pair_id, version, required, a, b, text, sampler_a, sampler_b, choice in session.execute(query):
        votes[pair_id].append(choice)
        if pair_id not in info:
            info[pair_id] = (version, required, a, b, text, pair_group(sampler_a or {}, sampler_b or {}))
    return _decided(votes, info, complete_only=complete_only)


def _decided(
    votes: Mapping[int, list[str]],
    info: Mapping[int, tuple[int, int, int, int, str, SamplerGroup | None]],
    *,
    complete_only: bool,
) -> list[PreferencePair]:
    """The pairs whose votes decide for a or b (and, with `complete_only`, got all their judgements)."""
    result = []
    for pair_id, choices in votes.items():
        version, required, a, b, text, group = info[pair_id]
        if complete_only and len(choices) < required:
            continue
        decision = majority(choices)
        if decision not in ("a", "b"):
            continue
        winner, loser = (a, b) if decision == "a" else (b, a)
        result.append(
            PreferencePair(
                pair_id=pair_id,
                prompt=text,
                policy_version=version,
                winner_trajectory_id=winner,
                loser_trajectory_id=loser,
                votes=sum(c != "skip" for c in choices),
                sampler=group,
            )
        )
    return result


def start_training_round(
    *, session: Session, base_version: int, metrics: dict[str, Any] | None = None
) -> TrainingRound:
    """Open a round; `metrics` are what is known at its start (finishing adds to them)."""
    get_policy_version(session=session, version=base_version)
    row = TrainingRound(
        base_version=base_version, status="running", metrics=dict(metrics or {}), started_at=utcnow()
    )
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
    votes_used: int = 0,
    metrics: dict[str, Any] | None = None,
) -> TrainingRound:
    """Close a round as 'done' (with the version it published) or 'failed'; `metrics` are added to
    those recorded at its start."""
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
    row.pairs_used, row.votes_used = pairs_used, votes_used
    row.metrics, row.finished_at = {**(row.metrics or {}), **(metrics or {})}, utcnow()
    session.flush()
    return row


def fresh_preference_pairs(
    *, session: Session, min_version: int, sampler: Mapping[str, Any] | None = None
) -> list[PreferencePair]:
    """Complete, decisive pairs from versions >= `min_version` that no round has used yet.

    With `sampler` (a sampler record, e.g. `configured_sampler(...)`), only the pairs drawn with
    settings it accepts (core/db/sampler_groups.py): the ones that can train together with it.
    """
    pairs = preference_pairs(session=session, min_version=min_version, unused_only=True)
    if sampler is None:
        return pairs
    return split_by_sampler(pairs, sampler).usable


def fresh_pair_groups(
    *, session: Session, min_version: int, sampler: Mapping[str, Any] | None
) -> PairGroups[PreferencePair]:
    """The fresh pairs (as `fresh_preference_pairs`) split by sampler settings: those `sampler`
    accepts (None: the newest pair's group) and a count for every group, from one query."""
    pairs = preference_pairs(session=session, min_version=min_version, unused_only=True)
    return split_by_sampler(pairs, sampler)


def running_round(*, session: Session) -> TrainingRound | None:
    """The round a killed trainer left running, if any (the trainer resumes it first)."""
    return session.scalar(
        select(TrainingRound).where(TrainingRound.status == "running").order_by(TrainingRound.id)
    )


def weigh_by_reliability(*, session: Session, pairs: list[PreferencePair]) -> list[PreferencePair]:
    """The same pairs with winner and loss weight from the labellers' measured reliability: a one-coin
    Dawid-Skene fit (core/db/reliability.py) over every a/b vote and the gold answers
    gives P(side a is better) per pair; the likelier side wins (it can overturn a majority of
    unreliable voters) and the weight is |2P - 1|. A gold pair keeps its known answer at weight 1."""
    if not pairs:
        return []
    fit = fit_labellers(session=session)
    ids = [p.pair_id for p in pairs]
    sides = {i: a for i, a in session.execute(select(Pair.id, Pair.trajectory_a_id).where(Pair.id.in_(ids)))}
    out = []
    for p in pairs:
        side, weight = pair_weight(fit.posterior.get(p.pair_id, 0.5))
        a_won = p.winner_trajectory_id == sides[p.pair_id]
        if (side == "a") != a_won:
            p = replace(
                p,
                winner_trajectory_id=p.loser_trajectory_id,
                loser_trajectory_id=p.winner_trajectory_id,
                winner_latents_key=p.loser_latents_key,
                loser_latents_key=p.winner_latents_key,
            )
        out.append(replace(p, weight=weight))
    return out


def record_round_pairs(*, session: Session, round_id: int, pairs: Collection[PreferencePair]) -> None:
    """Remember which pairs (and which winner, with what loss weight) a round trains on, before it trains."""
    by_id = {p.pair_id: p for p in pairs}
    rows = session.execute(select(Pair.id, Pair.trajectory_a_id, Pair.kind).where(Pair.id.in_(list(by_id))))
    for pair_id, traj_a, kind in rows:
        if kind != "train":
            raise InvalidInput(f"pair {pair_id} is an evaluation pair; rounds train on training pairs only")
        p = by_id[pair_id]
        winner = "a" if p.winner_trajectory_id == traj_a else "b"
        session.add(
            TrainingRoundPair(
                round_id=round_id, pair_id=pair_id, winner=winner, votes=p.votes, weight=p.weight
            )
        )
    session.flush()


def round_preference_pairs(*, session: Session, round_id: int) -> list[PreferencePair]:
    """The pairs recorded for a round, in a fixed order, as they were decided when it started: prompt,
    winner and loser trajectory ids with their latents keys, votes and sampler group, in one query.

    The recorded side ('a' or 'b') is turned into winner and loser here, in SQL, once. A trajectory whose
    latents retention pruned raises `LatentsPruned` (never the case for a running round's pairs)."""
    win, lose = aliased(Trajectory), aliased(Trajectory)
    a_won = TrainingRoundPair.winner == "a"
    winner_id = case((a_won, Pair.trajectory_a_id), else_=Pair.trajectory_b_id)
    loser_id = case((a_won, Pair.trajectory_b_id), else_=Pair.trajectory_a_id)
    rows = session.execute(
        select(Pair.id, Pair.policy_version, Prompt.text, TrainingRoundPair.winner, TrainingRoundPair.votes)
        .add_columns(win.id, lose.id, win.latents_key, lose.latents_key, win.sampler, lose.sampler)
        .add_columns(TrainingRoundPair.weight, win.latents_pruned_at, lose.latents_pruned_at)
        .join(TrainingRoundPair, TrainingRoundPair.pair_id == Pair.id)
        .join(Prompt, Prompt.id == Pair.prompt_id)
        .join(win, win.id == winner_id)
        .join(lose, lose.id == loser_id)
        .where(TrainingRoundPair.round_id == round_id)
        .order_by(Pair.id)
    )
    out = []
    for *columns, w_pruned, l_pruned in rows:
        pair_id, version, text, side, votes, w, lo, w_key, l_key, w_sampler, l_sampler, weight = columns
        for tid, key, pruned_at in ((w, w_key, w_pruned), (lo, l_key, l_pruned)):
            if pruned_at is not None:  # retention deleted the blob: say so, not "file not found"
                raise LatentsPruned(tid, key, pruned_at)
        # the group is read in (a, b) order, as `preference_pairs` reads it
        sampler_a, sampler_b = (w_sampler, l_sampler) if side == "a" else (l_sampler, w_sampler)
        group = pair_group(sampler_a or {}, sampler_b or {})
        out.append(PreferencePair(pair_id, text, version, w, lo, votes, group, w_key, l_key, weight))
    return out
