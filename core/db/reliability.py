"""Labellers' measured reliability from the database: the one-coin Dawid-Skene fit (core/reliability.py)
over every a/b vote and every gold answer, and the stored copy on `labellers` that the app reads
(the trainer refreshes it; pausing a labeller reads only the stored columns, so the next-pair request
never fits anything)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db.models import Judgement, Labeller, Pair
from core.reliability import ReliabilityFit, Vote, fit_abilities


def fit_labellers(*, session: Session) -> ReliabilityFit:
    """The fit over all a/b votes (training and evaluation pairs) and all gold answers."""
    votes = session.execute(
        select(Judgement.pair_id, Judgement.labeller_id, Judgement.choice).where(
            Judgement.choice.in_(("a", "b"))
        )
    ).all()
    gold = {p: str(g) for p, g in session.execute(select(Pair.id, Pair.gold).where(Pair.gold.is_not(None)))}
    return fit_abilities([Vote(p, j, c) for p, j, c in votes], gold)


def store_abilities(*, session: Session, fit: ReliabilityFit) -> int:
    """Write each measured labeller's ability and interval to `labellers`; returns how many."""
    stored = 0
    measured = {a.labeller_id: a for a in fit.abilities.values() if a.votes > 0}
    # ORM updates, so a commit in the app's process also drops the rows from its labeller cache
    for labeller in session.scalars(select(Labeller).where(Labeller.id.in_(list(measured)))):
        ability = measured[labeller.id]
        labeller.ability, labeller.ability_low = ability.accuracy, ability.low
        labeller.ability_high, labeller.ability_votes = ability.high, ability.votes
        stored += 1
    session.flush()
    return stored


def is_paused(labeller: Labeller, *, pause_below: float | None, min_votes: int) -> bool:
    """Whether `labeller` is kept from new pairs: measured on at least `min_votes` votes, and even the
    upper end of their ability's 95% interval is below `pause_below` (None: nobody is paused)."""
    return (
        pause_below is not None
        and labeller.ability_high is not None
        and labeller.ability_votes >= min_votes
        and labeller.ability_high < pause_below
    )
