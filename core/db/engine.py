"""Engines and session factories from a database URL (Postgres via psycopg 3, or SQLite).

No pre-ping. SQLAlchemy's `pool_pre_ping` costs a round trip (`;`) on every checkout, one in four
of a next-pair request's. Instead a Postgres connection is checked without talking to the server
when it leaves the pool: a healthy idle connection has nothing to read, while one whose server
went away (restart, `pg_terminate_backend`, idle timeout) has the server's goodbye or EOF waiting on
its socket. Such a connection is discarded and the pool hands out a fresh one, so a restart while
the app is idle stays invisible (tests/app/test_pg_restart.py). What this cannot see, a peer that
vanished without closing the socket (a cut network), fails the first statement instead: SQLAlchemy
then invalidates the whole pool (every connection older than the error is replaced on checkout),
and the app answers that one request 503 with Retry-After, which clients retry (judgements are
idempotent by client_key). Retrying the request inside the app was the alternative; it would need
every route to be safe to run twice, which a 503 to the client gets for free.
"""

from __future__ import annotations

import select
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc, make_url
from sqlalchemy.orm import Session, sessionmaker

CONNECT_TIMEOUT_SECONDS = 5


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine; SQLite gets foreign keys enforced and cross-thread use allowed."""
    if url.startswith("sqlite"):
        kwargs.setdefault("connect_args", {"check_same_thread": False, "timeout": 30})
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if "connect_timeout" not in make_url(url).query:
        # A server that accepts TCP but never answers (hung at start-up, a half-dead proxy) would
        # otherwise hold the request forever: give up connecting after a few seconds (-> 503).
        kwargs.setdefault("connect_args", {"connect_timeout": CONNECT_TIMEOUT_SECONDS})
    # Under overload fail within 10 s (the app answers 503 + Retry-After) rather than hold the
    # request for SQLAlchemy's default 30 s.
    kwargs.setdefault("pool_timeout", 10)
    engine = create_engine(url, **kwargs)
    if not kwargs.get("pool_pre_ping"):
        event.listen(engine, "checkout", _closed_by_server)
    return engine


def _closed_by_server(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """Refuse a pooled connection the server has closed (the pool then opens a new one)."""
    pgconn = getattr(dbapi_connection, "pgconn", None)
    if pgconn is None:  # not psycopg 3: nothing cheap to look at
        return
    try:
        if dbapi_connection.closed or dbapi_connection.broken:
            raise exc.DisconnectionError("the connection was closed")
        fd = pgconn.socket
    except Exception as error:  # psycopg refuses the socket of a connection it knows is bad
        raise exc.DisconnectionError(str(error)) from error
    # An idle connection with something to read has been told goodbye (or hit EOF): nothing else
    # arrives unasked on a connection that never LISTENs.
    if _readable(fd):
        raise exc.DisconnectionError("the server closed the connection while it was idle in the pool")


def _readable(fd: int) -> bool:
    if hasattr(select, "poll"):  # unlike select(), fine with descriptors above 1023
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([fd], [], [], 0)[0])


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)
