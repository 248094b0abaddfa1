"""Labellers, invites and bearer tokens.

Tokens are 256-bit random strings; only their sha256 is stored. A fast hash is enough for
high-entropy tokens (nothing to brute-force) and keeps lookup by hash a single indexed query;
argon2 would be needed only for human-chosen passwords, which DenseAlign does not use.

Browser sessions are signed cookies that carry the labeller's `session_epoch` from the moment of
login; the app accepts a cookie only while the row still has that epoch. Logging out and being
deactivated bump it, which ends every session of the account at once (`end_sessions`).

Every function here that changes a labeller's row notes the id in `session.info[CHANGED_LABELLERS]`,
so a process that caches labeller rows (app/deps.py) can drop them once the change is committed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.db.base import utcnow
from core.db.errors import (
    CannotChangeOwnAdmin,
    InvalidInput,
    InviteInvalid,
    LabellerNameTaken,
    LabellerNotFound,
    LastActiveAdmin,
    NotAnActiveAdmin,
)
from core.db.models import ROLES, Invite, Labeller

# session.info key: ids of labellers whose row this session changed (status, role, session epoch).
CHANGED_LABELLERS = "changed_labeller_ids"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class IssuedToken:
    labeller: Labeller
    token: str  # shown once; only its hash is stored


def _note_change(session: Session, labeller_id: int) -> None:
    session.info.setdefault(CHANGED_LABELLERS, set()).add(labeller_id)


def _check_name(name: str) -> None:
    if not name.strip() or len(name) > 100 or not name.isprintable():
        raise InvalidInput(f"labeller name {name!r} must be 1 to 100 printable characters")


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise InvalidInput(f"role {role!r} is not one of {', '.join(ROLES)}")


def create_labeller(*, session: Session, name: str, role: str = "annotator") -> IssuedToken:
    """Create a labeller directly (CLI bootstrap, tests) and return its one-time-visible token."""
    _check_role(role)
    _check_name(name)
    if session.scalar(select(Labeller.id).where(Labeller.name == name)) is not None:
        raise LabellerNameTaken(name)
    token = new_token()
    labeller = Labeller(name=name, role=role, active=True, token_hash=hash_token(token))
    session.add(labeller)
    session.flush()
    return IssuedToken(labeller=labeller, token=token)


def create_invite(
    *, session: Session, name: str, role: str, ttl: dt.timedelta, created_by_id: int | None = None
) -> tuple[Invite, str]:
    """Create a one-time invite; returns the row and the secret to put in the link."""
    _check_role(role)
    _check_name(name)
    if session.scalar(select(Labeller.id).where(Labeller.name == name)) is not None:
        raise LabellerNameTaken(name)
    secret = new_token()
    invite = Invite(
        token_hash=hash_token(secret),
        name=name,
        role=role,
        created_by_id=created_by_id,
        expires_at=utcnow() + ttl,
    )
    session.add(invite)
    session.flush()
    return invite, secret


def find_invite(*, session: Session, secret: str) -> Invite:
    """The unused, unexpired invite with this secret, or InviteInvalid."""
    invite = session.scalar(select(Invite).where(Invite.token_hash == hash_token(secret)))
    if invite is None or invite.used_at is not None or invite.expires_at <= utcnow():
        raise InviteInvalid()
    return invite


def accept_invite(*, session: Session, secret: str) -> IssuedToken:
    """Turn an invite into a labeller exactly once (the row lock stops a double accept on Postgres)."""
    invite = session.scalar(select(Invite).where(Invite.token_hash == hash_token(secret)).with_for_update())
    if invite is None or invite.used_at is not None or invite.expires_at <= utcnow():
        raise InviteInvalid()
    issued = create_labeller(session=session, name=invite.name, role=invite.role)
    invite.used_at = utcnow()
    invite.labeller_id = issued.labeller.id
    session.flush()
    return issued


def labeller_by_token(*, session: Session, token: str) -> Labeller | None:
    """The active labeller holding this bearer token, or None."""
    return session.scalar(
        select(Labeller).where(Labeller.token_hash == hash_token(token), Labeller.active.is_(True))
    )


def get_labeller(*, session: Session, labeller_id: int) -> Labeller:
    labeller = session.get(Labeller, labeller_id)
    if labeller is None:
        raise LabellerNotFound(labeller_id)
    return labeller


def update_labeller(
    *,
    session: Session,
    labeller_id: int,
    active: bool | None = None,
    role: str | None = None,
    acting_id: int | None = None,
) -> Labeller:
    """Activate, deactivate, promote or demote a labeller (None leaves a field as it is).

    `acting_id` is the admin making the change (None for the CLI and tests). Refused with a Conflict:
    an admin removing their own admin rights (deactivating or demoting themselves), and any change
    that would leave no active admin. Every active admin's row is locked (SELECT ... FOR UPDATE, in id
    order so that concurrent callers cannot deadlock) before they are counted: when two admins
    deactivate each other at the same moment, the second waits for the first to commit, then sees
    that it is no longer an active admin and is refused. Deactivation bumps `session_epoch`, so the
    cookies of the account stay dead after a later reactivation. Does not commit.
    """
    if role is not None:
        _check_role(role)
    # populate_existing: the caller's session may hold these rows as they were before the lock wait.
    admins = {
        row.id: row
        for row in session.scalars(
            select(Labeller)
            .where(Labeller.role == "admin", Labeller.active.is_(True))
            .order_by(Labeller.id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    }
    labeller = session.get(Labeller, labeller_id, with_for_update=True, populate_existing=True)
    if labeller is None:
        raise LabellerNotFound(labeller_id)
    if acting_id is not None and acting_id not in admins:
        actor = session.get(Labeller, acting_id)
        raise NotAnActiveAdmin(actor.name if actor is not None else str(acting_id))
    loses_admin = labeller.id in admins and (active is False or role not in (None, "admin"))
    if loses_admin and labeller.id == acting_id:
        raise CannotChangeOwnAdmin(labeller.name)
    if loses_admin and len(admins) == 1:
        raise LastActiveAdmin(labeller.name)
    if active is False and labeller.active:
        labeller.session_epoch += 1
    if active is not None:
        labeller.active = active
    if role is not None:
        labeller.role = role
    session.flush()
    _note_change(session, labeller.id)
    return labeller


def end_sessions(*, session: Session, labeller_id: int) -> None:
    """End every browser session of a labeller (logout): bump the epoch their cookies must match.

    An UPDATE of the column's own value, so two logouts at once both count. Does not commit.
    """
    session.execute(
        update(Labeller)
        .where(Labeller.id == labeller_id)
        .values(session_epoch=Labeller.session_epoch + 1)
        .execution_options(synchronize_session="fetch")
    )
    _note_change(session, labeller_id)


def list_labellers(*, session: Session) -> list[Labeller]:
    return list(session.scalars(select(Labeller).order_by(Labeller.id)))
