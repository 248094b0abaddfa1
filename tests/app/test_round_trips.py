"""Database round trips of the annotators' two hot requests, counted from outside the app.

The app runs on an ordinary pooled engine over a scratch Postgres database, and libpq traces every
protocol message of its connections. A round trip is a message the client then waits on: a simple
`Query` (BEGIN, COMMIT, ROLLBACK, a pre-ping's ";") or the `Sync` that ends a statement. SQLAlchemy's
own events (statements, commits, rollbacks) are counted beside it as a cross-check.

With a warm labeller cache, GET /api/v1/pairs/next is BEGIN, the lease-or-claim statement, COMMIT;
POST /api/v1/judgements is BEGIN, the judge statement, COMMIT. A labeller's first request (and the
first after the cache's TOKEN_CACHE_SECONDS) adds the token lookup, in a short transaction of its
own; nothing pings the connection before use.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event

from app.main import create_app
from core.db.engine import make_engine, make_session_factory
from core.db.labellers import create_labeller
from core.db.pairs import create_pair, create_trajectory
from core.db.policies import publish_policy_version
from core.db.prompts import add_prompt
from core.settings import Settings
from tests.conftest import migrate, scratch_postgres_database


@dataclass
class Wire:
    """Round trips on the wire (libpq's trace) and SQLAlchemy's count of the same traffic."""

    trace: Any = field(default_factory=tempfile.TemporaryFile)
    statements: int = 0
    commits: int = 0
    rollbacks: int = 0

    def attach(self, engine: Engine) -> None:
        event.listen(engine, "connect", lambda dbapi, _record: dbapi.pgconn.trace(self.trace.fileno()))
        event.listen(engine, "before_cursor_execute", self._statement)
        event.listen(engine, "commit", lambda _conn: self._bump("commits"))
        event.listen(engine, "rollback", lambda _conn: self._bump("rollbacks"))

    def _statement(self, *_args: object) -> None:
        self.statements += 1

    def _bump(self, name: str) -> None:
        setattr(self, name, getattr(self, name) + 1)

    def reset(self) -> None:
        self.trace.seek(0, 2)
        self.mark = self.trace.tell()
        self.statements = self.commits = self.rollbacks = 0

    def round_trips(self) -> list[str]:
        """Each round trip since `reset`: a simple query's text, or the first line of a statement."""
        self.trace.seek(self.mark)
        trips, statement = [], ""
        for line in self.trace.read().decode(errors="replace").splitlines():
            parts = line.split("\t")
            if len(parts) < 4 or parts[1] != "F":
                continue
            quoted = "\t".join(parts[4:]).split('"')
            if parts[3] == "Query":
                trips.append(quoted[1] or ";")
            elif parts[3] == "Parse" and len(quoted) > 3:
                statement = quoted[3]
            elif parts[3] == "Sync":
                trips.append(
                    statement.split(" ")[0] + " " + statement.split(" ")[1] if " " in statement else statement
                )
        return trips


@pytest.fixture
def served() -> Iterator[tuple[TestClient, Wire]]:
    """The app on its own engine and scratch database: a labeller's client, and the wire counter."""
    with scratch_postgres_database() as url, tempfile.TemporaryDirectory() as blobs:
        migrate(url)
        engine = make_engine(url)
        with make_session_factory(engine)() as session:
            publish_policy_version(session=session, version=0)
            prompt = add_prompt(session=session, text="an owl at dusk")
            for i in range(3):
                a, b = (
                    create_trajectory(
                        session=session,
                        prompt_id=prompt.id,
                        policy_version=0,
                        seed=2 * i + j,
                        image_key=f"i/{i}{j}",
                    )
                    for j in range(2)
                )
                create_pair(session=session, trajectory_a_id=a.id, trajectory_b_id=b.id)
            token = create_labeller(session=session, name="counted").token
            session.commit()
        engine.dispose()  # so that every connection the app uses is opened, and traced, from here on
        wire = Wire()
        wire.attach(engine)
        settings = Settings(
            database_url=url,
            secret_key="round-trip-test-key",  # type: ignore[arg-type]
            cookie_secure=False,
            blob_dir=str(Path(blobs)),
        )
        app = create_app(settings, session_factory=make_session_factory(engine))
        try:
            yield TestClient(app, headers={"Authorization": f"Bearer {token}"}), wire
        finally:
            engine.dispose()


def cycle(
    client: TestClient, wire: Wire
) -> tuple[list[str], tuple[int, int, int], list[str], tuple[int, int, int]]:
    wire.reset()
    got = client.get("/api/v1/pairs/next")
    assert got.status_code == 200 and got.json()["pair"] is not None, got.text
    next_trips, next_events = wire.round_trips(), (wire.statements, wire.commits, wire.rollbacks)
    wire.reset()
    body = {"pair_id": got.json()["pair"]["pair_id"], "choice": "a", "client_key": uuid.uuid4().hex}
    judged = client.post("/api/v1/judgements", json=body)
    assert judged.status_code == 201, judged.text
    return next_trips, next_events, wire.round_trips(), (wire.statements, wire.commits, wire.rollbacks)


def test_next_pair_and_judgement_take_three_round_trips_each(served: tuple[TestClient, Wire]) -> None:
    client, wire = served
    first_next, _, first_judgement, _ = cycle(client, wire)
    # The labeller's first request looks the token up in a transaction of its own (then the row is
    # cached for TOKEN_CACHE_SECONDS); no pre-ping, ever.
    assert first_next == ["BEGIN", "SELECT labellers.id,", "COMMIT", "BEGIN", "WITH held", "COMMIT"]
    assert first_judgement == ["BEGIN", "WITH lease", "COMMIT"]
    next_trips, next_events, judgement_trips, judgement_events = cycle(client, wire)
    assert next_trips == ["BEGIN", "WITH held", "COMMIT"]
    assert judgement_trips == ["BEGIN", "WITH lease", "COMMIT"]
    # SQLAlchemy's view: one statement and one commit each, nothing rolled back.
    assert next_events == judgement_events == (1, 1, 0)
