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
    "invites",
    "judgements",
    "labellers",
    "leases",
    "pairs",
    "policy_versions",
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
