"""Recording and undoing judgements.

Idempotency: the client picks a `client_key` per judgement. A repeat with the same key (a retry after
a lost response) returns the judgement already stored; the unique constraint on the key settles a race
between two identical requests, and the loser reads the winner's row.

On Postgres the usual case, a first judgement of a pair the labeller holds, is one statement
(`JUDGE`, one database round trip): data-modifying CTEs insert the judgement (ON CONFLICT DO NOTHING
covers a repeated key and a second judgement of the pair), move the pair's count under its guard and
release the lease, each step only if the one before it happened. Whenever it does not record (a
repeat, a refusal, a lost race), the step-by-step path below runs in the same transaction and
answers exactly as it always has; SQLite, which has no data-modifying CTEs, always takes that path.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import Boolean, Integer, bindparam, column, delete, select, update
from sqlalchemy import text as sql_text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.db.assignment import Assignment, lease_for
from core.db.base import UTCDateTime, utcnow
from core.db.campaigns import finish_if_reached
from core.db.errors import (
    AlreadyJudged,
    ClientKeyReused,
    DomainError,
    InvalidInput,
    JudgementNotFound,
    PairComplete,
    PairNotLeased,
    UndoBlocked,
    UndoWindowPassed,
)
from core.db.models import CHOICES, Judgement, Lease, Pair, Prompt
from core.db.pairs import get_pair

_JUDGEMENT_COLUMNS = ", ".join(f"judgements.{c.name}" for c in Judgement.__table__.columns)
# The pair-open check in the insert reads the statement's snapshot; the count's guard is re-checked
# under the pair's row lock, so a judgement that lost the race for the last place comes back with
# counted = false, and is taken back by the caller.
JUDGE = f"""\
WITH lease AS (
    SELECT leases.id, leases.shown_left FROM leases
    WHERE leases.pair_id = :pair_id AND leases.labeller_id = :labeller_id
), judged AS (
    INSERT INTO judgements (pair_id, labeller_id, choice, shown_left, decide_ms, client_key, created_at)
    SELECT :pair_id, :labeller_id, :choice, lease.shown_left, :decide_ms, :client_key, :created_at
    FROM lease JOIN pairs ON pairs.id = :pair_id AND pairs.judgement_count < pairs.required_judgements
    ON CONFLICT DO NOTHING
    RETURNING {_JUDGEMENT_COLUMNS}
), counted AS (
    UPDATE pairs SET judgement_count = pairs.judgement_count + 1
    WHERE pairs.id = :pair_id AND pairs.judgement_count < pairs.required_judgements
      AND EXISTS (SELECT 1 FROM judged)
    RETURNING pairs.campaign_id
), released AS (
    DELETE FROM leases USING lease
    WHERE leases.id = lease.id AND leases.labeller_id = :labeller_id AND EXISTS (SELECT 1 FROM counted)
)
SELECT judged.*, EXISTS (SELECT 1 FROM counted) AS counted, (SELECT campaign_id FROM counted) AS campaign_id
FROM judged
"""
_JUDGE = (
    sql_text(JUDGE)
    .bindparams(bindparam("created_at", type_=UTCDateTime()), bindparam("decide_ms", type_=Integer()))
    .columns(*Judgement.__table__.columns, column("counted", Boolean), column("campaign_id", Integer))
)
_JUDGEMENT_KEYS = tuple(c.key for c in Judgement.__table__.columns)


@dataclass(frozen=True)
class Recorded:
    judgement: Judgement
    created: bool  # False when this was a repeat of an earlier request with the same client key


def record_judgement(
    *,
    session: Session,
    labeller_id: int,
    pair_id: int,
    choice: str,
    client_key: str,
    decide_ms: int | None = None,
) -> Recorded:
    """Store one labeller's judgement of a pair they hold the lease on, and release the lease."""
    if choice not in CHOICES:
        raise InvalidInput(f"choice {choice!r} is not one of {', '.join(CHOICES)}")
    if decide_ms is not None and decide_ms < 0:
        raise InvalidInput(f"decide_ms {decide_ms} is negative; send the milliseconds taken to decide")
    if session.get_bind().dialect.name == "postgresql":
        recorded = _record_in_one_statement(session, labeller_id, pair_id, choice, client_key, decide_ms)
        if recorded is not None:
            return recorded
    return _record_stepwise(session, labeller_id, pair_id, choice, client_key, decide_ms)


def _record_in_one_statement(
    session: Session, labeller_id: int, pair_id: int, choice: str, client_key: str, decide_ms: int | None
) -> Recorded | None:
    """The usual case in one round trip; None (and nothing changed) when it does not apply."""
    params = {"pair_id": pair_id, "labeller_id": labeller_id, "choice": choice, "client_key": client_key}
    params |= {"decide_ms": decide_ms, "created_at": utcnow()}
    # A Core row, not an ORM load (cheaper); the Judgement handed back is a transient copy of the row.
    row = session.connection().execute(_JUDGE, params).first()
    if row is None:
        return None
    if not row.counted:  # lost the pair's last place to a concurrent judgement: take the row back
        session.execute(delete(Judgement).where(Judgement.id == row.id))
        return None
    _expire_count(session, pair_id)
    if row.campaign_id is not None:  # an evaluation vote: its campaign may have all it needs now
        finish_if_reached(session=session, campaign_id=row.campaign_id)
    return Recorded(Judgement(**{key: getattr(row, key) for key in _JUDGEMENT_KEYS}), created=True)


def _record_stepwise(
    session: Session, labeller_id: int, pair_id: int, choice: str, client_key: str, decide_ms: int | None
) -> Recorded:
    # A retry of this very judgement may commit between any two of the checks below, so every
    # refusal first looks for the key again: a repeat must never be answered with an error.
    def repeat_or(refusal: DomainError) -> Recorded:
        existing = _by_client_key(session, client_key, labeller_id, pair_id, choice)
        if existing is not None:
            return Recorded(existing, created=False)
        raise refusal

    existing = _by_client_key(session, client_key, labeller_id, pair_id, choice)
    if existing is not None:
        return Recorded(existing, created=False)
    pair = get_pair(session=session, pair_id=pair_id)
    if session.scalar(
        select(Judgement.id).where(Judgement.pair_id == pair_id, Judgement.labeller_id == labeller_id)
    ):
        return repeat_or(AlreadyJudged(pair_id, labeller_id))
    lease = lease_for(session=session, pair_id=pair_id, labeller_id=labeller_id)
    if lease is None:
        return repeat_or(PairNotLeased(pair_id, labeller_id))
    judgement = Judgement(
        pair_id=pair_id,
        labeller_id=labeller_id,
        choice=choice,
        shown_left=lease.shown_left,
        decide_ms=decide_ms,
        client_key=client_key,
        created_at=utcnow(),
    )
    try:
        with session.begin_nested():
            session.add(judgement)
            session.flush()
            if not _count(session, pair_id, +1):
                raise PairComplete(pair_id)  # rolls the savepoint back: the judgement is not stored
            session.execute(delete(Lease).where(Lease.id == lease.id))
    except PairComplete as refusal:
        return repeat_or(refusal)
    except IntegrityError:
        # Lost a race with an identical request (same key) or a second tab (same pair).
        return repeat_or(AlreadyJudged(pair_id, labeller_id))
    if pair.campaign_id is not None:  # an evaluation vote: its campaign may have all it needs now
        finish_if_reached(session=session, campaign_id=pair.campaign_id)
    return Recorded(judgement, created=True)


def _count(session: Session, pair_id: int, delta: int) -> bool:
    """Move the pair's stored judgement count with the row just added or removed; False (nothing
    changed) when adding would take the pair past its required judgements.

    One guarded UPDATE with the arithmetic in the database: Postgres takes the row lock and
    re-checks the guard after waiting on it, so two judgements racing for a pair's last place (a
    lease that ran out and was handed on) cannot both land, and concurrent ones on an agreement
    pair both count.
    """
    guard = Pair.judgement_count < Pair.required_judgements if delta > 0 else Pair.judgement_count > 0
    changed = session.execute(
        update(Pair)
        .where(Pair.id == pair_id, guard)
        .values(judgement_count=Pair.judgement_count + delta)
        .returning(Pair.id)
        .execution_options(synchronize_session=False)
    ).first()
    _expire_count(session, pair_id)
    return changed is not None


def _expire_count(session: Session, pair_id: int) -> None:
    pair = session.identity_map.get(session.identity_key(Pair, pair_id))
    if pair is not None:  # loaded earlier in this session: read the new count on next access
        session.expire(pair, ["judgement_count"])


def _by_client_key(
    session: Session, client_key: str, labeller_id: int, pair_id: int, choice: str
) -> Judgement | None:
    existing = session.scalar(select(Judgement).where(Judgement.client_key == client_key))
    if existing is None:
        return None
    if (existing.labeller_id, existing.pair_id, existing.choice) != (labeller_id, pair_id, choice):
        raise ClientKeyReused(client_key)
    return existing


def undo_judgement(
    *,
    session: Session,
    labeller_id: int,
    judgement_id: int,
    window_seconds: int,
    lease_seconds: int,
    now: dt.datetime | None = None,
) -> Assignment:
    """Delete a labeller's own recent judgement and lease the pair back to them, same side on the left."""
    now = now or utcnow()
    judgement = session.scalar(
        select(Judgement).where(Judgement.id == judgement_id, Judgement.labeller_id == labeller_id)
    )
    if judgement is None:
        raise JudgementNotFound(judgement_id)
    if now - judgement.created_at > dt.timedelta(seconds=window_seconds):
        raise UndoWindowPassed(judgement_id, window_seconds)
    pair = get_pair(session=session, pair_id=judgement.pair_id)
    expires = now + dt.timedelta(seconds=lease_seconds)
    shown_left = judgement.shown_left
    lease = session.scalar(select(Lease).where(Lease.pair_id == pair.id).with_for_update())
    if lease is not None and lease.labeller_id != labeller_id and lease.expires_at > now:
        # A pair wanting several judgements may already be in front of someone else.
        raise UndoBlocked(judgement_id)
    session.delete(judgement)
    session.flush()
    _count(session, pair.id, -1)
    if lease is None:
        session.add(
            Lease(pair_id=pair.id, labeller_id=labeller_id, shown_left=shown_left, expires_at=expires)
        )
    else:
        lease.labeller_id, lease.shown_left, lease.expires_at = labeller_id, shown_left, expires
    session.flush()
    prompt = session.get_one(Prompt, pair.prompt_id)
    return Assignment(pair=pair, prompt_text=prompt.text, shown_left=shown_left, expires_at=expires)


def last_judgement(*, session: Session, labeller_id: int) -> Judgement | None:
    return session.scalar(
        select(Judgement).where(Judgement.labeller_id == labeller_id).order_by(Judgement.id.desc()).limit(1)
    )
