"""Read-only figures for the dashboard, the progress counter and the labeller table."""

from __future__ import annotations

import datetime as dt
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.db.base import utcnow
from core.db.errors import NoCurrentPolicy
from core.db.models import Judgement, Labeller, Lease, Pair, Prompt
from core.db.policies import get_current_policy
from core.db.reliability import fit_labellers
from core.db.sampler_groups import GroupCount
from core.db.training import fresh_pair_groups


def queue_depth(*, session: Session, now: dt.datetime | None = None) -> int:
    """Pairs of active prompts that still need judgements and are not leased right now."""
    now = now or utcnow()
    leased = select(Lease.id).where(Lease.pair_id == Pair.id, Lease.expires_at > now).exists()
    query = (
        select(func.count(Pair.id))
        .join(Prompt, Prompt.id == Pair.prompt_id)
        .where(Prompt.active.is_(True), Pair.judgement_count < Pair.required_judgements, ~leased)
    )
    return int(session.scalar(query) or 0)


def labels_per_hour(*, session: Session, hours: int = 24, now: dt.datetime | None = None) -> list[int]:
    """Judgement counts for each of the last `hours` whole hours, oldest first (last = current hour)."""
    now = now or utcnow()
    top = now.replace(minute=0, second=0, microsecond=0)
    start = top - dt.timedelta(hours=hours - 1)
    counts = [0] * hours
    for created in session.scalars(select(Judgement.created_at).where(Judgement.created_at >= start)):
        index = int((created - start).total_seconds() // 3600)
        if 0 <= index < hours:
            counts[index] += 1
    return counts


@dataclass(frozen=True)
class Progress:
    today: int
    total: int


def labeller_progress(*, session: Session, labeller_id: int, now: dt.datetime | None = None) -> Progress:
    """Judgements by one labeller since 00:00 UTC today, and ever."""
    now = now or utcnow()
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    mine = select(func.count(Judgement.id)).where(Judgement.labeller_id == labeller_id)
    total = int(session.scalar(mine) or 0)
    today = int(session.scalar(mine.where(Judgement.created_at >= midnight)) or 0)
    return Progress(today=today, total=total)


@dataclass(frozen=True)
class LabellerStats:
    labeller_id: int
    name: str
    role: str
    active: bool
    judgements: int
    # Share of this labeller's a/b/tie votes on overlapped pairs that match the pair's majority
    # (None when they judged no pair that has a strict majority among >= 2 votes).
    agreement: float | None
    overlapped: int
    # Share of a/b choices that picked the image shown on the left (0.5 = no side bias).
    left_share: float | None
    # core/reliability.py: P(their a/b vote names the better side) with a 95% interval, from their votes
    # on pairs others also decided and on gold pairs; None without such votes.
    ability: float | None = None
    ability_low: float | None = None
    ability_high: float | None = None
    ability_votes: int = 0
    gold_votes: int = 0


def labeller_stats(*, session: Session) -> list[LabellerStats]:
    """Counts, agreement with the majority and side bias for every labeller.

    Computed in Python over all judgements: fine for hundreds of thousands of rows; move the majority
    into SQL if the table grows past that.
    """
    rows = session.execute(
        select(Judgement.pair_id, Judgement.labeller_id, Judgement.choice, Judgement.shown_left)
    ).all()
    votes: dict[int, Counter[str]] = defaultdict(Counter)
    for pair_id, _, choice, _ in rows:
        if choice != "skip":
            votes[pair_id][choice] += 1
    majority: dict[int, str] = {}
    for pair_id, counter in votes.items():
        ranked = counter.most_common(2)
        if sum(counter.values()) >= 2 and (len(ranked) == 1 or ranked[0][1] > ranked[1][1]):
            majority[pair_id] = ranked[0][0]
    per: dict[int, dict[str, int]] = defaultdict(Counter)
    for pair_id, labeller_id, choice, shown_left in rows:
        tally = per[labeller_id]
        tally["total"] += 1
        if choice in ("a", "b"):
            tally["sided"] += 1
            tally["left"] += int(choice == shown_left)
        if pair_id in majority and choice != "skip":
            tally["overlapped"] += 1
            tally["agree"] += int(choice == majority[pair_id])
    fit = fit_labellers(session=session)
    result = []
    for labeller in session.scalars(select(Labeller).order_by(Labeller.id)):
        tally = per.get(labeller.id, {})
        overlapped, sided = tally.get("overlapped", 0), tally.get("sided", 0)
        ability = fit.abilities.get(labeller.id)
        informed = ability if ability is not None and ability.votes > 0 else None
        result.append(
            LabellerStats(
                labeller_id=labeller.id,
                name=labeller.name,
                role=labeller.role,
                active=labeller.active,
                judgements=tally.get("total", 0),
                agreement=tally.get("agree", 0) / overlapped if overlapped else None,
                overlapped=overlapped,
                left_share=tally.get("left", 0) / sided if sided else None,
                ability=informed.accuracy if informed else None,
                ability_low=informed.low if informed else None,
                ability_high=informed.high if informed else None,
                ability_votes=ability.votes if ability else 0,
                gold_votes=ability.gold_votes if ability else 0,
            )
        )
    return result


@dataclass(frozen=True)
class SamplerBacklog:
    """Decided pairs no round has used yet, by the sampler settings they were drawn with."""

    groups: list[GroupCount]  # the current settings' group(s) first
    summary: str  # what the next round would train on, and what waits unused


def sampler_backlog(
    *, session: Session, sampler: Mapping[str, Any], max_version_lag: int, min_new_pairs: int
) -> SamplerBacklog:
    """The trainer's view of the waiting pairs (the same freshness rule and grouping as
    `Trainer.run_once`), for `sampler` = the settings workers sample with now."""
    try:
        current = get_current_policy(session=session).version
    except NoCurrentPolicy:
        return SamplerBacklog([], "no policy version is current yet")
    groups = fresh_pair_groups(
        session=session, min_version=max(0, current - max_version_lag), sampler=sampler
    )
    return SamplerBacklog(groups.counts, groups.explain(min_new_pairs))
