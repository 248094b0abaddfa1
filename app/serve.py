"""`densealign serve`: run the web app with uvicorn, settings from DENSEALIGN_* variables."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from app.main import MissingSecretKey, create_app
from app.refill import rq_refiller
from core.db import make_engine, make_session_factory
from core.settings import get_settings

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="densealign serve", description=__doc__)
    parser.add_argument("--host", default=settings.host, help=f"interface to bind (default {settings.host})")
    parser.add_argument("--port", type=int, default=settings.port, help=f"TCP port (default {settings.port})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sessions = make_session_factory(make_engine(settings.database_url))
        app = create_app(settings, session_factory=sessions, refiller=rq_refiller(settings, sessions))
    except MissingSecretKey as exc:
        log.error("%s", exc)
        return 2
    uvicorn.run(app, host=args.host, port=args.port, proxy_headers=True)
    return 0
