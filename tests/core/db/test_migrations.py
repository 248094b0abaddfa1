"""Alembic is the only way the schema is made: upgrade an empty database, compare with the models,
downgrade to nothing, on Postgres and on SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from core.db import models  # noqa: F401  (registers the tables)
from core.db.base import Base
from core.db.engine import make_engine
from tests.conftest import migrate, scratch_postgres_database

TABLES = {
    "alembic_version",
    "current_policy",
    "eval_campaigns",
    "invites",
    "judgements",
    "labellers",
    "leases",
    "pairs",
    "policy_versions",
    "process_heartbeats",
    "prompts",
    "training_round_pairs",
    "training_rounds",
    "trajectories",
}


def _roundtrip(url: str) -> None:
    migrate(url)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) == TABLES
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
        migrate(url, "base", down=True)
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) == {"alembic_version"}
        migrate(url)
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) == TABLES
    finally:
        engine.dispose()


@pytest.mark.slow
def test_postgres_upgrade_compare_downgrade() -> None:
    with scratch_postgres_database() as url:
        _roundtrip(url)


def test_sqlite_upgrade_compare_downgrade(tmp_path: Path) -> None:
    _roundtrip(f"sqlite:///{tmp_path / 'x.db'}")


BEFORE_COUNTS = "a87d62537ce1"  # the revision before pairs carried judgement_count

SEED_OLD_SCHEMA = [
    "INSERT INTO policy_versions (version, metrics, created_at) VALUES (0, '{}', '2026-01-01')",
    "INSERT INTO prompts (text, split, active, created_at) VALUES ('a cat', 'train', true, '2026-01-01')",
    """INSERT INTO labellers (name, role, active, created_at)
       VALUES ('x', 'annotator', true, '2026-01-01'), ('y', 'annotator', true, '2026-01-01')""",
    """INSERT INTO trajectories (prompt_id, policy_version, seed, sampler, image_key, created_at)
       VALUES (1, 0, 1, '{}', 'i/1', '2026-01-01'), (1, 0, 2, '{}', 'i/2', '2026-01-01'),
              (1, 0, 3, '{}', 'i/3', '2026-01-01'), (1, 0, 4, '{}', 'i/4', '2026-01-01')""",
    """INSERT INTO pairs (prompt_id, policy_version, trajectory_a_id, trajectory_b_id, required_judgements,
                          created_at)
       VALUES (1, 0, 1, 2, 3, '2026-01-01'), (1, 0, 3, 4, 1, '2026-01-01')""",
    """INSERT INTO judgements (pair_id, labeller_id, choice, shown_left, client_key, created_at)
       VALUES (1, 1, 'a', 'a', 'k1', '2026-01-01'), (1, 2, 'b', 'a', 'k2', '2026-01-01')""",
]


def _backfill(url: str) -> None:
    """Pairs judged before the count column existed get their count from the judgements table."""
    migrate(url, BEFORE_COUNTS)
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            for statement in SEED_OLD_SCHEMA:
                conn.exec_driver_sql(statement)
        migrate(url)
        with engine.connect() as conn:
            rows = conn.exec_driver_sql("SELECT id, judgement_count FROM pairs ORDER BY id").all()
            assert [tuple(r) for r in rows] == [(1, 2), (2, 0)]
        migrate(url, BEFORE_COUNTS, down=True)
        with engine.connect() as conn:
            assert "judgement_count" not in {c["name"] for c in inspect(conn).get_columns("pairs")}
            assert conn.exec_driver_sql("SELECT count(*) FROM judgements").scalar_one() == 2
    finally:
        engine.dispose()


@pytest.mark.slow
def test_postgres_judgement_count_backfill() -> None:
    with scratch_postgres_database() as url:
        _backfill(url)


def test_sqlite_judgement_count_backfill(tmp_path: Path) -> None:
    _backfill(f"sqlite:///{tmp_path / 'x.db'}")
