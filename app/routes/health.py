from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from app.deps import SessionDep
from app.schemas import HealthPublic

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthPublic)
def health(session: SessionDep) -> HealthPublic:
    """Liveness and database reachability; no authentication."""
    session.execute(text("SELECT 1"))
    return HealthPublic(status="ok", database="ok")
