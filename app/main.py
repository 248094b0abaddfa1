"""App factory: `create_app(settings)` wires the database, blob store, sessions, routes and pages."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from sqlalchemy.orm import Session, sessionmaker
from starlette.middleware.sessions import SessionMiddleware

from app.errors import install_error_handlers
from app.middleware import BodySizeLimit, SecurityHeaders
from app.ratelimit import TokenBucket
from app.refill import PoolRefiller
from app.responses import DB_DOWN, INVALID, Responses
from app.routes import (
    admin,
    admin_evaluations,
    dataset,
    docs,
    evaluations,
    health,
    judgements,
    labellers,
    pages,
    pairs,
    policies,
    prompts,
    stats,
)
from core.blob_stores import open_blob_store
from core.db.engine import make_engine, make_session_factory
from core.settings import Settings
from core.storage import BlobStore

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
API_PREFIX = "/api/v1"
# What any API route may answer: 422 in the shape app.errors sends it (FastAPI's default documents a
# list under `detail`), and 503 while the database is away. Routes add their own (app.responses).
API_RESPONSES: Responses = INVALID | DB_DOWN


class MissingSecretKey(RuntimeError):
    def __init__(self) -> None:
        super().__init__(
            "DENSEALIGN_SECRET_KEY is not set: set it to a long random string (python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))'), or set DENSEALIGN_DEMO=1 for a throwaway local demo"
        )


def create_app(
    settings: Settings,
    *,
    session_factory: sessionmaker[Session] | None = None,
    blob_store: BlobStore | None = None,
    refiller: PoolRefiller | None = None,
) -> FastAPI:
    """Build the app. The schema must already exist (`densealign migrate`); nothing is created here."""
    if settings.secret_key is not None:
        secret = settings.secret_key.get_secret_value()
    elif settings.demo:
        log.warning("demo mode: using a random session key; sessions end when the process stops")
        secret = secrets.token_urlsafe(32)
    else:
        raise MissingSecretKey()
    app = FastAPI(
        title="DenseAlign",
        version="1",
        summary="Online preference labelling for text-to-image diffusion models.",
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=None,  # served by app/routes/docs.py under its own Content-Security-Policy
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.session_factory = session_factory or make_session_factory(make_engine(settings.database_url))
    app.state.blob_store = blob_store or open_blob_store(settings.blob_url, settings.blob_dir)
    # Pokes the sampling pool after judgements; None (tests, tools) leaves it to the workers' tick.
    app.state.refiller = refiller
    app.state.login_limiter = TokenBucket(settings.login_rate_per_minute, settings.login_burst)
    app.state.judgement_limiter = TokenBucket(settings.judgement_rate_per_minute, settings.judgement_burst)
    app.state.trusted_proxies = settings.trusted_proxies
    install_error_handlers(app)
    app.add_middleware(
        SessionMiddleware,
        secret_key=secret,
        session_cookie="densealign_session",
        max_age=settings.session_max_age_seconds,
        same_site="lax",
        https_only=settings.cookie_secure,
    )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(SecurityHeaders)  # added last, so it wraps the others: their 413s get headers too
    for module in (health, prompts, pairs, judgements, policies, evaluations, stats, dataset, labellers):
        app.include_router(module.router, prefix=API_PREFIX, responses=API_RESPONSES)
    app.include_router(docs.router, prefix=API_PREFIX)
    app.include_router(pages.router)
    app.include_router(admin.router)
    app.include_router(admin_evaluations.router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    return app
