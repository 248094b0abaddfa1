"""Helpers the benchmark scripts share: a scratch Postgres database migrated to head."""

from __future__ import annotations

import uuid

from sqlalchemy import create_engine, make_url, text


def scratch_database(admin_url: str, prefix: str = "densealign_bench") -> str:
    """Create an empty database next to `admin_url`'s, migrate it with Alembic, return its URL."""
    from alembic import command

    from core.db.migrate import alembic_config

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    config = alembic_config(url)
    config.attributes["skip_logging"] = True
    command.upgrade(config, "head")
    return url


def drop_database(admin_url: str, url: str) -> None:
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))
    engine.dispose()
