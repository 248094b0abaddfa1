"""Dependencies shared by routes: settings, database session, blob store, the current labeller."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session

from core.db.labellers import labeller_by_token
from core.db.models import Labeller
from core.settings import Settings
from core.storage import BlobStore

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSRF_HEADER = "X-CSRF-Token"


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    """A session per request; whatever a route did not commit is rolled back."""
    session: Session = request.app.state.session_factory()
    try:
        yield session
    finally:
        session.close()


def get_blob_store(request: Request) -> BlobStore:
    store: BlobStore = request.app.state.blob_store
    return store


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_session)]
BlobStoreDep = Annotated[BlobStore, Depends(get_blob_store)]


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": "Bearer"})


def csrf_token(request: Request) -> str:
    """The session's CSRF token, created on first use."""
    token = request.session.get("csrf")
    if not token:
        token = secrets.token_urlsafe(24)
        request.session["csrf"] = token
    return str(token)


def check_csrf(request: Request, sent: str | None) -> None:
    expected = request.session.get("csrf")
    if not expected or not sent or not secrets.compare_digest(str(expected), sent):
        raise HTTPException(
            status_code=403, detail="CSRF token missing or wrong; reload the page and submit the form again"
        )


def cookie_labeller(request: Request, session: Session) -> Labeller | None:
    """The active labeller the session cookie names, or None (and the cookie's data is dropped).

    The cookie must carry the labeller's current `session_epoch`: logout and deactivation bump it, so
    a cookie copied before either is refused here although its signature is still valid. The row is
    loaded anyway to check `active`, so the epoch costs no extra query.
    """
    labeller_id = request.session.get("labeller_id")
    if labeller_id is None:
        return None
    labeller = session.get(Labeller, int(labeller_id))
    if labeller is None or not labeller.active or request.session.get("epoch") != labeller.session_epoch:
        request.session.clear()
        return None
    return labeller


def log_in(request: Request, labeller: Labeller) -> None:
    """Start a fresh session (and CSRF token) for `labeller`, bound to their current session epoch."""
    request.session.clear()
    request.session["labeller_id"] = labeller.id
    request.session["epoch"] = labeller.session_epoch
    csrf_token(request)


def get_current_labeller(request: Request, session: SessionDep) -> Labeller:
    """The labeller behind a bearer token, or behind the session cookie (with CSRF on writes)."""
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("Authorization header must be 'Bearer <token>'")
        labeller = labeller_by_token(session=session, token=token.strip())
        if labeller is None:
            raise _unauthorized(
                "bearer token is unknown or its labeller is deactivated; ask an admin for a new one"
            )
        return labeller
    if request.session.get("labeller_id") is None:
        raise _unauthorized("not authenticated: send 'Authorization: Bearer <token>' or log in")
    labeller = cookie_labeller(request, session)
    if labeller is None:
        raise _unauthorized(
            "this session has ended (logged out, or the account was deactivated); log in again at /login"
        )
    if request.method not in SAFE_METHODS:
        check_csrf(request, request.headers.get(CSRF_HEADER))
    return labeller


CurrentLabeller = Annotated[Labeller, Depends(get_current_labeller)]


def get_admin(labeller: CurrentLabeller) -> Labeller:
    if labeller.role != "admin":
        raise HTTPException(
            status_code=403, detail=f"labeller {labeller.name!r} is not an admin; this needs admin rights"
        )
    return labeller


CurrentAdmin = Annotated[Labeller, Depends(get_admin)]
