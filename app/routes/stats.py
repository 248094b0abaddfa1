from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import func, select

from app.deps import CurrentAdmin, SessionDep
from app.responses import ADMIN, BEARER
from app.schemas import LabellerStatsPublic, StatsPublic
from core.db.models import Judgement, Pair
from core.db.stats import labeller_stats, labels_per_hour, queue_depth

router = APIRouter(tags=["stats"], dependencies=[BEARER])


def collect_stats(session: SessionDep) -> StatsPublic:
    return StatsPublic(
        queue_depth=queue_depth(session=session),
        labels_per_hour=labels_per_hour(session=session),
        judgements_total=int(session.scalar(select(func.count(Judgement.id))) or 0),
        pairs_total=int(session.scalar(select(func.count(Pair.id))) or 0),
        labellers=[LabellerStatsPublic(**vars(row)) for row in labeller_stats(session=session)],
    )


@router.get("/stats", response_model=StatsPublic, responses=ADMIN)
def stats(session: SessionDep, _: CurrentAdmin) -> StatsPublic:
    """Queue depth, labels per hour, totals, and per-labeller counts, agreement and side bias."""
    return collect_stats(session)
