"""Dependencies shared by routes: settings, database session, blob store, the current labeller.

They are `async def` so that FastAPI runs them on the event loop: a plain `def` dependency costs a
hop to the thread pool and back (with a sync generator, two), which was most of a request's CPU.
Only work that may wait on the database goes to the thread pool: closing a session that still holds
a connection, and looking up a labeller the cache does not have (in its own short transaction, so no
connection is held while the request waits for a thread for its route). Routes stay plain `def`.

The current labeller's row comes from a small in-process cache (`LabellerCache`, one per app, by
token hash and by id) for TOKEN_CACHE_SECONDS, so an annotator's requests do not each spend a
database round trip on authentication. A change to a labeller's row made in this process
(deactivation, role change, logout's session-epoch bump: core.db.labellers notes them on the
session) drops the cached row as soon as it is committed; a change made by another process (another
uvicorn worker, the CLI) is seen within TOKEN_CACHE_SECONDS. Unknown tokens are never cached.
"""

from __future__ import annotations

import secrets
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from sqlalchemy import event
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from core.db.labellers import CHANGED_LABELLERS, hash_token, labeller_by_token
from core.db.models import Labeller
from core.settings import Settings
from core.storage import BlobStore

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSRF_HEADER = "X-CSRF-Token"
# Seconds a labeller row is served from the cache: the longest another process's deactivation, role
# change or logout can go unseen here (README, Security). A module constant, not a setting, on purpose.
TOKEN_CACHE_SECONDS = 5.0
# Beyond this many cached rows the expired ones are dropped, so memory stays bounded.
MAX_CACHED = 10_000
_COLUMNS = tuple(column.key for column in Labeller.__table__.columns)


class LabellerCache:
    """Labeller rows by token hash and by id, each kept `ttl` seconds; handed out as fresh copies.

    `generation` guards a lookup that raced a change: a row read before a `forget` is not stored.
    """

    def __init__(self, ttl: float = TOKEN_CACHE_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self.generation = 0
        self._rows: dict[int, tuple[float, dict[str, Any]]] = {}  # id -> (expires, column values)
        self._ids: dict[str, tuple[float, int]] = {}  # token hash -> (expires, id)
        self._lock = threading.Lock()
        _live_caches.add(self)
        _forget_on_commit()

    def by_token(self, token_hash: str) -> Labeller | None:
        entry = self._ids.get(token_hash)
        labeller = self.by_id(entry[1]) if entry is not None and entry[0] > self.clock() else None
        return labeller if labeller is not None and labeller.active else None

    def by_id(self, labeller_id: int) -> Labeller | None:
        entry = self._rows.get(labeller_id)
        if entry is None or entry[0] <= self.clock():
            return None
        return Labeller(**entry[1])  # a transient copy: nothing a request does to it reaches the cache

    def put(self, labeller: Labeller, generation: int, token_hash: str | None = None) -> None:
        """Remember `labeller` as read when the cache was at `generation` (skipped if it moved on)."""
        values = {key: getattr(labeller, key) for key in _COLUMNS}
        with self._lock:
            if generation != self.generation:
                return
            expires = self.clock() + self.ttl
            if len(self._rows) >= MAX_CACHED:
                self._drop_expired()
            self._rows[labeller.id] = (expires, values)
            if token_hash is not None:
                self._ids[token_hash] = (expires, labeller.id)

    def forget(self, labeller_ids: Iterable[int]) -> None:
        ids = set(labeller_ids)
        with self._lock:
            self.generation += 1
            for labeller_id in ids:
                self._rows.pop(labeller_id, None)
            self._ids = {h: entry for h, entry in self._ids.items() if entry[1] not in ids}

    def _drop_expired(self) -> None:
        now = self.clock()
        self._rows = {k: v for k, v in self._rows.items() if v[0] > now}
        self._ids = {k: v for k, v in self._ids.items() if v[0] > now}


_live_caches: weakref.WeakSet[LabellerCache] = weakref.WeakSet()
_hook_lock = threading.Lock()
_create_lock = threading.Lock()


def _forget_committed(session: Session) -> None:
    changed = session.info.pop(CHANGED_LABELLERS, None)
    if changed:
        for cache in list(_live_caches):
            cache.forget(changed)


def _forget_on_commit() -> None:
    """Once per process: every commit that changed labeller rows drops them from every cache here."""
    with _hook_lock:
        if not event.contains(Session, "after_commit", _forget_committed):
            event.listen(Session, "after_commit", _forget_committed)


def labeller_cache(request: Request) -> LabellerCache:
    """The app's labeller cache, made on first use."""
    cache: LabellerCache | None = getattr(request.app.state, "labeller_cache", None)
    if cache is None:
        with _create_lock:
            cache = getattr(request.app.state, "labeller_cache", None)
            if cache is None:
                cache = LabellerCache()
                request.app.state.labeller_cache = cache
    return cache


async def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session per request; whatever a route did not commit is rolled back.

    Making the session sends nothing to the database; closing it does only while it still holds a
    connection (a transaction the route did not commit), and then runs in the thread pool.
    """
    session: Session = request.app.state.session_factory()
    try:
        yield session
    finally:
        if _holds_connection(session):
            await run_in_threadpool(session.close)
        else:
            session.close()


def _holds_connection(session: Session) -> bool:
    try:
        return bool(session.in_transaction())
    except Exception:  # a stand-in session (tests) or one already broken: close it off the loop
        return True


async def get_blob_store(request: Request) -> BlobStore:
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
    loaded anyway to check `active` (from the labeller cache: a logout or deactivation in this
    process drops it at commit), so the epoch costs no extra query.
    """
    labeller_id = request.session.get("labeller_id")
    if labeller_id is None:
        return None
    cache = labeller_cache(request)
    labeller = cache.by_id(int(labeller_id)) or _load_labeller(cache, session, int(labeller_id))
    return _session_holder(request, labeller)


def _load_labeller(cache: LabellerCache, session: Session, labeller_id: int) -> Labeller | None:
    generation = cache.generation
    labeller = session.get(Labeller, labeller_id)
    if labeller is not None:
        cache.put(labeller, generation)
    return labeller


def _session_holder(request: Request, labeller: Labeller | None) -> Labeller | None:
    """`labeller` if the cookie may act for them (active, same session epoch); else drop the cookie's data."""
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


def _load_by_token(cache: LabellerCache, session: Session, token: str, token_hash: str) -> Labeller | None:
    generation = cache.generation
    labeller = labeller_by_token(session=session, token=token)
    if labeller is not None:
        cache.put(labeller, generation, token_hash)
    return labeller


def _released(session: Session, load: Callable[[], Labeller | None]) -> Labeller | None:
    """Run a cache-miss lookup, then end its read-only transaction (nothing is written; loaded rows
    stay loaded): the request now waits for a worker thread for its route, and must not hold a pooled
    connection meanwhile. Under load, connections held that way starved the pool into 10 s waits."""
    labeller = load()
    session.commit()
    return labeller


async def get_current_labeller(request: Request, session: SessionDep) -> Labeller:
    """The labeller behind a bearer token, or behind the session cookie (with CSRF on writes)."""
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("Authorization header must be 'Bearer <token>'")
        cache, token_hash = labeller_cache(request), hash_token(token.strip())
        labeller = cache.by_token(token_hash) or await run_in_threadpool(
            _released, session, lambda: _load_by_token(cache, session, token.strip(), token_hash)
        )
        if labeller is None:
            raise _unauthorized(
                "bearer token is unknown or its labeller is deactivated; ask an admin for a new one"
            )
        return labeller
    labeller_id = request.session.get("labeller_id")
    if labeller_id is None:
        raise _unauthorized("not authenticated: send 'Authorization: Bearer <token>' or log in")
    cache = labeller_cache(request)
    cached = cache.by_id(int(labeller_id))
    labeller = _session_holder(
        request,
        cached
        or await run_in_threadpool(
            _released, session, lambda: _load_labeller(cache, session, int(labeller_id))
        ),
    )
    if labeller is None:
        raise _unauthorized(
            "this session has ended (logged out, or the account was deactivated); log in again at /login"
        )
    if request.method not in SAFE_METHODS:
        check_csrf(request, request.headers.get(CSRF_HEADER))
    return labeller


CurrentLabeller = Annotated[Labeller, Depends(get_current_labeller)]


async def get_admin(labeller: CurrentLabeller) -> Labeller:
    if labeller.role != "admin":
        raise HTTPException(
            status_code=403, detail=f"labeller {labeller.name!r} is not an admin; this needs admin rights"
        )
    return labeller


CurrentAdmin = Annotated[Labeller, Depends(get_admin)]
