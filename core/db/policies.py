"""Policy versions (immutable once published) and the pointer to the current one."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.db.base import utcnow
from core.db.errors import InvalidInput, NoCurrentPolicy, PolicyVersionExists, PolicyVersionNotFound
from core.db.models import CurrentPolicy, PolicyVersion


def publish_policy_version(
    *,
    session: Session,
    version: int,
    parent_version: int | None = None,
    lora_key: str | None = None,
    lora_sha256: str | None = None,
    metrics: dict[str, Any] | None = None,
    make_current: bool = True,
) -> PolicyVersion:
    """Record a new version (0 = base model, no LoRA) and by default make it current."""
    if session.scalar(select(PolicyVersion.id).where(PolicyVersion.version == version)) is not None:
        raise PolicyVersionExists(version)
    if version > 0 and (lora_key is None or lora_sha256 is None):
        raise InvalidInput(
            f"policy version {version} needs lora_key and lora_sha256; only version 0 has none"
        )
    if parent_version is not None:
        get_policy_version(session=session, version=parent_version)
    row = PolicyVersion(
        version=version,
        parent_version=parent_version,
        lora_key=lora_key,
        lora_sha256=lora_sha256,
        metrics=metrics or {},
    )
    session.add(row)
    session.flush()
    if make_current:
        set_current_policy(session=session, version=version)
    return row


def ensure_base_version(*, session: Session, base_model: str) -> PolicyVersion | None:
    """Record version 0 (the base model, no adapter) and make it current, unless it exists already.

    Idempotent and safe to run from several processes at once (the version number is unique);
    returns the new row, or None when version 0 was already there.
    """
    if session.scalar(select(PolicyVersion.id).where(PolicyVersion.version == 0)) is not None:
        return None
    try:
        with session.begin_nested():
            row = publish_policy_version(
                session=session,
                version=0,
                metrics={"base_model": base_model},
                make_current=session.get(CurrentPolicy, 1) is None,
            )
    except IntegrityError:  # another process recorded it between the check and the insert
        return None
    return row


def get_policy_version(*, session: Session, version: int) -> PolicyVersion:
    row = session.scalar(select(PolicyVersion).where(PolicyVersion.version == version))
    if row is None:
        raise PolicyVersionNotFound(version)
    return row


def list_policy_versions(*, session: Session) -> list[PolicyVersion]:
    return list(session.scalars(select(PolicyVersion).order_by(PolicyVersion.version)))


def latest_version_number(*, session: Session) -> int | None:
    return session.scalar(select(PolicyVersion.version).order_by(PolicyVersion.version.desc()).limit(1))


def get_current_policy(*, session: Session) -> PolicyVersion:
    version = session.scalar(select(CurrentPolicy.version).where(CurrentPolicy.id == 1))
    if version is None:
        raise NoCurrentPolicy()
    return get_policy_version(session=session, version=version)


def set_current_policy(*, session: Session, version: int) -> PolicyVersion:
    """Point workers at `version` (a rollback when it is older than the current one)."""
    row = get_policy_version(session=session, version=version)
    pointer = session.get(CurrentPolicy, 1, with_for_update=True)
    if pointer is None:
        session.add(CurrentPolicy(id=1, version=version, updated_at=utcnow()))
    else:
        pointer.version = version
        pointer.updated_at = utcnow()
    session.flush()
    return row
