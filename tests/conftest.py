"""Shared fixtures: a real Postgres database migrated with Alembic, one rolled-back transaction per
test, and factories named after the models (`labeller`, `prompt`, `policy_version`, `pair`...).

Postgres comes from DENSEALIGN_TEST_POSTGRES_URL (default: the `test` database on 127.0.0.1:5432 as
user postgres); each test session works in its own scratch database created from there and dropped
at the end, so a stale schema can never leak in. Tests needing it are skipped when it is unreachable.
"""

from __future__ import annotations

import logging
import os
import random
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.orm import Session

from core.db.models import Labeller, Pair, PolicyVersion, Prompt
from core.storage import LocalBlobStore

DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def skip_or_fail(reason: str) -> None:
    """Skip a test whose service is missing, or fail it where services are required (CI)."""
    if os.environ.get("DENSEALIGN_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (DENSEALIGN_REQUIRE_SERVICES=1: services must be up)")
    pytest.skip(reason)


def postgres_admin_url() -> str:
    return os.environ.get("DENSEALIGN_TEST_POSTGRES_URL", DEFAULT_PG)


def _postgres_problem() -> str | None:
    try:
        engine = create_engine(postgres_admin_url(), connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as exc:  # any failure to connect means: skip, and say why
        return (
            f"Postgres at {postgres_admin_url()} is not reachable ({type(exc).__name__}); .ci/run starts it"
        )
    return None


@contextmanager
def scratch_postgres_database() -> Iterator[str]:
    """Create an empty database, yield its URL, drop it afterwards."""
    problem = _postgres_problem()
    if problem:
        skip_or_fail(problem)
    name = f"densealign_t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_admin_url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(postgres_admin_url()).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def migrate(url: str, revision: str = "head", *, down: bool = False) -> None:
    from alembic import command

    from core.db.migrate import alembic_config

    config = alembic_config(url)
    config.attributes["skip_logging"] = True
    if down:
        command.downgrade(config, revision)
    else:
        command.upgrade(config, revision)


@pytest.fixture(autouse=True)
def _restore_log_handlers() -> Iterator[None]:
    """Undo the log handlers a test's in-process command or RQ worker attached.

    `logging.basicConfig` (every CLI main) and RQ's worker attach stream handlers bound to the
    sys.stdout/sys.stderr of the moment: under capsys those streams close when the test ends, and a
    later test's log lines would then print "--- Logging error ---" tracebacks into its own output.
    """
    names = ("", "rq.worker", "rq.scheduler")
    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).level) for name in names}
    yield
    for name, (handlers, level) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.setLevel(level)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """URL of a session-wide scratch Postgres database at the newest migration."""
    with scratch_postgres_database() as url:
        migrate(url)
        yield url


@pytest.fixture(scope="session")
def engine(pg_url: str) -> Iterator[Engine]:
    from core.db.engine import make_engine

    engine = make_engine(pg_url)
    yield engine
    engine.dispose()


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    """A session inside a transaction that is rolled back after the test; commits become savepoints."""
    connection = engine.connect()
    transaction = connection.begin()
    session = Session(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)
    try:
        yield session
    finally:
        session.close()
        transaction.rollback()
        connection.close()


# -- factories ---------------------------------------------------------------------------------


@pytest.fixture
def make_labeller(session: Session) -> Callable[..., tuple[Labeller, str]]:
    from core.db.labellers import create_labeller

    def make(name: str | None = None, role: str = "annotator") -> tuple[Labeller, str]:
        issued = create_labeller(session=session, name=name or f"l-{uuid.uuid4().hex[:8]}", role=role)
        return issued.labeller, issued.token

    return make


@pytest.fixture
def labeller(make_labeller: Callable[..., tuple[Labeller, str]]) -> Labeller:
    return make_labeller("alice")[0]


@pytest.fixture
def admin(make_labeller: Callable[..., tuple[Labeller, str]]) -> Labeller:
    return make_labeller("root", role="admin")[0]


@pytest.fixture
def policy_version(session: Session) -> PolicyVersion:
    from core.db.policies import publish_policy_version

    return publish_policy_version(session=session, version=0)


@pytest.fixture
def prompt(session: Session) -> Prompt:
    from core.db.prompts import add_prompt

    return add_prompt(session=session, text="a red cube on a blue table")


@pytest.fixture
def make_pair(session: Session, policy_version: PolicyVersion, prompt: Prompt) -> Callable[..., Pair]:
    """Build a pair of two trajectories; `version` must exist (version 0 always does)."""
    from core.db.pairs import create_pair, create_trajectory

    def make(*, version: int = 0, required: int = 1, prompt_id: int | None = None) -> Pair:
        pid = prompt_id if prompt_id is not None else prompt.id
        seeds = random.Random().sample(range(1 << 30), 2)
        a, b = (
            create_trajectory(
                session=session,
                prompt_id=pid,
                policy_version=version,
                seed=seed,
                image_key=f"images/{seed}.png",
                sampler={"steps": 2},
            )
            for seed in seeds
        )
        return create_pair(session=session, trajectory_a_id=a.id, trajectory_b_id=b.id, required=required)

    return make


@pytest.fixture
def pair(make_pair: Callable[..., Pair]) -> Pair:
    return make_pair()


@pytest.fixture
def blob_store(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")
