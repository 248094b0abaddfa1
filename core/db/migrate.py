"""`densealign migrate`: bring the database named by DENSEALIGN_DATABASE_URL to the newest schema.

Upgrading to head also records policy version 0, the base model named by
DENSEALIGN_MODEL__BASE_MODEL, if the database has no version yet. Every deployment runs this
command before anything else (compose's one-shot `migrate` service, the README's first step), in
one process, so after it the workers and the trainer always find a current version, and nobody
has to run a special command for the loop to start.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from alembic import command
from alembic.config import Config

from core.db.engine import make_engine, make_session_factory
from core.db.policies import ensure_base_version, get_policy_version
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
    # Alembic's env.py applies alembic.ini's logging (root at WARNING) during the upgrade; without its
    # own level this module's lines (the revision reached, version 0 recorded) would never show.
    log.setLevel(logging.INFO)
    settings = get_settings()
    if settings.database_url.startswith("sqlite:///"):
        Path(settings.database_url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    config = alembic_config(settings.database_url)
    if args.down:
        command.downgrade(config, args.revision)
    else:
        command.upgrade(config, args.revision)
    log.info("database is at revision %s", args.revision)
    if not args.down and args.revision == "head":
        record_base_version(settings.database_url, settings.model.base_model)
    return 0


def record_base_version(database_url: str, base_model: str) -> None:
    """Make sure version 0 exists; warn when it was recorded for another base model than `base_model`."""
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as session, session.begin():
            if ensure_base_version(session=session, base_model=base_model) is not None:
                log.info("recorded policy version 0: the base model %s", base_model)
                return
            recorded = get_policy_version(session=session, version=0).metrics.get("base_model")
    finally:
        engine.dispose()
    if recorded is not None and recorded != base_model:
        log.warning(
            "policy version 0 was recorded for base model %s, but DENSEALIGN_MODEL__BASE_MODEL is %s: "
            "adapters of this database were trained on the former; set it back, or use a new database",
            recorded,
            base_model,
        )
