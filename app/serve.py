"""`densealign serve`: run the web app with uvicorn, settings from DENSEALIGN_* variables.

`--workers N` runs N uvicorn worker processes, each building its app through `factory()`.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import uvicorn
from fastapi import FastAPI

from app.main import MissingSecretKey, create_app
from app.refill import rq_refiller
from core.db import make_engine, make_session_factory
from core.settings import Settings, get_settings

log = logging.getLogger(__name__)


def factory() -> FastAPI:
    """The production app from the environment (what each uvicorn worker process builds)."""
    settings = get_settings()
    sessions = make_session_factory(make_engine(settings.database_url))
    return create_app(settings, session_factory=sessions, refiller=rq_refiller(settings, sessions))


def proxy_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's reading of X-Forwarded-For/-Proto, limited to DENSEALIGN_TRUSTED_PROXIES.

    By default uvicorn believes those headers from 127.0.0.1 and ::1 (FORWARDED_ALLOW_IPS) and
    rewrites the client address to what they say, which would give anyone on this host a new login
    rate-limit bucket per request; with no proxy configured it must not read them at all.
    """
    if not settings.trusted_proxies:
        return {"proxy_headers": False}
    return {"proxy_headers": True, "forwarded_allow_ips": [str(net) for net in settings.trusted_proxies]}


def main(argv: list[str] | None = None) -> int:
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="densealign serve", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=settings.host, help=f"interface to bind (default {settings.host})")
    parser.add_argument("--port", type=int, default=settings.port, help=f"TCP port (default {settings.port})")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = factory()  # built here too, so a bad configuration stops the command at once
    except MissingSecretKey as exc:
        log.error("%s", exc)
        return 2
    if args.workers > 1:
        uvicorn.run(
            "app.serve:factory",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_level="warning",
            **proxy_options(settings),
        )
    else:
        uvicorn.run(app, host=args.host, port=args.port, **proxy_options(settings))
    return 0
