"""Map domain errors and validation failures to 4xx responses whose `detail` says what was wrong."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.routing import iter_route_contexts
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from core.db.errors import Conflict, DomainError, InvalidInput, NotAllowed, NotFound
from core.storage import BlobCorrupt, BlobNotFound, BlobStoreUnavailable, InvalidBlobKey

log = logging.getLogger(__name__)


def status_for(exc: DomainError) -> int:
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, Conflict):
        return 409
    if isinstance(exc, NotAllowed):
        return 403
    return 422  # InvalidInput and anything else that is the caller's data


def describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            reason = error.get("ctx", {}).get("error", "")
            parts.append(f"malformed JSON body ({reason})" if reason else "malformed JSON body")
            continue
        loc = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at the request's path.

    Starlette answers 405 from the first route whose path matches and names only that route's
    methods in `Allow`; FastAPI makes one route per method, so GET /prompts/1 would hide PATCH and
    DELETE. RFC 9110 wants all of them.
    """
    methods: set[str] = set()
    for route in iter_route_contexts(request.app.router.routes):  # included routers' routes too
        if route.methods and route.matches(request.scope)[0] is not Match.NONE:
            methods |= route.methods
    return sorted(methods)


class LoginRequired(Exception):
    """An admin page was asked for without a session: the browser is sent to the login page."""


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, exc: LoginRequired) -> Response:
        return RedirectResponse("/login", status_code=303)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 405:
            exc.headers = {**(exc.headers or {}), "Allow": ", ".join(allowed_methods(request))}
        return await http_exception_handler(request, exc)

    @app.exception_handler(DomainError)
    async def domain_error(_: Request, exc: DomainError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status_for(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            {"detail": describe_validation(exc), "errors": jsonable_errors(exc)}, status_code=422
        )

    @app.exception_handler(SQLAlchemyTimeout)
    @app.exception_handler(OperationalError)
    async def database_unavailable(_: Request, exc: Exception) -> JSONResponse:
        # Pool exhausted or Postgres restarting: nothing was committed, so the client may retry
        # (judgements are idempotent by client_key).
        log.warning("database unavailable: %s", type(exc).__name__)
        return JSONResponse(
            status_code=503,
            content={"detail": "the database is busy or restarting; nothing was recorded, retry shortly"},
            headers={"Retry-After": "2"},
        )

    @app.exception_handler(BlobNotFound)
    async def blob_missing(_: Request, exc: BlobNotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(BlobCorrupt)
    async def blob_corrupt(_: Request, exc: BlobCorrupt) -> JSONResponse:
        # The server's copy is damaged (not the caller's fault): say which blob, and log it for the operator.
        log.error("%s", exc)
        return JSONResponse({"detail": str(exc)}, status_code=500)

    @app.exception_handler(BlobStoreUnavailable)
    async def blob_store_down(_: Request, exc: BlobStoreUnavailable) -> JSONResponse:
        # The object store is down or unreachable (after the client's retries): not the caller's fault,
        # and likely brief, so 503 with a hint to retry; the message names the object and the fix.
        log.error("%s", exc)
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(InvalidBlobKey)
    async def blob_key(_: Request, exc: InvalidBlobKey) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)


def jsonable_errors(exc: RequestValidationError) -> list[dict[str, object]]:
    return [
        {
            "loc": [str(p) for p in e.get("loc", ())],
            "msg": str(e.get("msg", "")),
            "type": str(e.get("type", "")),
        }
        for e in exc.errors()
    ]


__all__ = ["InvalidInput", "install_error_handlers", "status_for"]
