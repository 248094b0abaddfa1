"""Heartbeats of the long-running processes (workers, trainer): written by them, read by health checks.

A process is alive when its row was beaten within a few beat periods and it has not said it stopped.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from core.db.base import utcnow
from core.db.errors import InvalidInput
from core.db.models import PROCESS_ROLES, ProcessHeartbeat

# Rows of processes that stopped (or vanished) this long ago are pruned by the next beat.
KEEP_STOPPED = dt.timedelta(days=1)


@dataclass(frozen=True)
class ProcessStatus:
    """A process as the dashboard and `densealign health` see it."""

    role: str
    host: str
    pid: int
    state: str
    detail: str
    policy_version: int | None
    started_at: dt.datetime
    beat_at: dt.datetime
    stopped_at: dt.datetime | None
    age_seconds: float
    alive: bool


def _check_role(role: str) -> None:
    if role not in PROCESS_ROLES:
        raise InvalidInput(f"role {role!r} is not one of {', '.join(PROCESS_ROLES)}")


def beat(
    *,
    session: Session,
    role: str,
    host: str,
    pid: int,
    state: str,
    detail: str = "",
    started_at: dt.datetime,
    policy_version: int | None = None,
    stopped: bool = False,
) -> None:
    """Record that (role, host, pid), running since `started_at`, is doing `state` now.

    With `stopped`, that it exited cleanly. A container's pid is reused on every restart (often 1),
    so a new process on the same host and pid takes over the old row with its own start time.
    """
    _check_role(role)
    now = utcnow()
    row = session.scalar(
        select(ProcessHeartbeat).where(
            ProcessHeartbeat.role == role, ProcessHeartbeat.host == host, ProcessHeartbeat.pid == pid
        )
    )
    if row is None:
        session.execute(
            delete(ProcessHeartbeat).where(
                ProcessHeartbeat.role == role, ProcessHeartbeat.beat_at < now - KEEP_STOPPED
            )
        )
        row = ProcessHeartbeat(role=role, host=host, pid=pid)
        session.add(row)
    row.started_at = started_at
    row.state = state[:32]
    row.detail = detail[:500]
    row.policy_version = policy_version
    row.beat_at = now
    row.stopped_at = now if stopped else None
    session.flush()


def process_statuses(
    *, session: Session, max_age: dt.timedelta, role: str | None = None, host: str | None = None
) -> list[ProcessStatus]:
    """Every recorded process (newest beat first); `alive` = beaten within `max_age` and not stopped."""
    if role is not None:
        _check_role(role)
    query = select(ProcessHeartbeat).order_by(ProcessHeartbeat.beat_at.desc())
    if role is not None:
        query = query.where(ProcessHeartbeat.role == role)
    if host is not None:
        query = query.where(ProcessHeartbeat.host == host)
    now = utcnow()
    out = []
    for row in session.scalars(query):
        age = (now - row.beat_at).total_seconds()
        out.append(
            ProcessStatus(
                role=row.role,
                host=row.host,
                pid=row.pid,
                state=row.state,
                detail=row.detail,
                policy_version=row.policy_version,
                started_at=row.started_at,
                beat_at=row.beat_at,
                stopped_at=row.stopped_at,
                age_seconds=age,
                alive=row.stopped_at is None and age <= max_age.total_seconds(),
            )
        )
    return out
