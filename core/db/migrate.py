"""`densealign migrate`: bring the database named by DENSEALIGN_DATABASE_URL to the newest schema."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from alembic import command
from alembic.config import Config

from core.settings import get_settings

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]


def alembic_config(database_url: str) -> Config:
    """An Alembic config for this checkout's migrations/ pointing at `database_url`."""
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["database_url"] = database_url
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="densealign migrate", description=__doc__)
    parser.add_argument("revision", nargs="?", default="head", help="target revision (default: head)")
    parser.add_argument("--down", action="store_true", help="downgrade to REVISION instead of upgrading")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = get_settings()
    if settings.database_url.startswith("sqlite:///"):
        Path(settings.database_url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    config = alembic_config(settings.database_url)
    if args.down:
        command.downgrade(config, args.revision)
    else:
        command.upgrade(config, args.revision)
    log.info("database is at revision %s", args.revision)
    return 0
