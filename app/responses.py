"""The error answers of the REST API, as OpenAPI `responses` entries that routes compose.

Each dict documents one way a request can fail, with the body it is sent with (`ErrorPublic`, or
`ValidationErrorPublic` for 422) and the headers that come with it. Routes add the ones that apply,
e.g. `responses=ADMIN | NOT_FOUND | WRITE`; every API router gets `INVALID` and `DB_DOWN`
(app.main.API_RESPONSES). tests/app/test_schemathesis.py checks the app against them.

Where each status comes from:
- 400, 413: `app.middleware.BodySizeLimit` (a Content-Length that is not a number; a body over
  DENSEALIGN_MAX_BODY_BYTES) and FastAPI (a body that is not UTF-8), on every method that may carry
  a body, whether or not the route reads one.
- 401: `app.deps.get_current_labeller`, always with `WWW-Authenticate: Bearer`.
- 403: `app.deps` (a session cookie's write without its CSRF token; a non-admin on an admin route)
  and `core.db.errors.NotAllowed` (app.errors.status_for).
- 404, 409, 422: the other domain errors (app.errors.status_for) and request validation.
- 429: `app.ratelimit`, with `Retry-After`.
- 503: app.errors' handler for a database that is down or out of connections, with `Retry-After`.
- 405 is not listed: it is the answer to a method no operation has, with an `Allow` header naming the
  methods the path does have (app.errors.allowed_methods).
"""

from __future__ import annotations

from typing import Any

from fastapi import Security
from fastapi.security import HTTPBearer

from app.schemas import ErrorPublic, ValidationErrorPublic

Responses = dict[int | str, dict[str, Any]]


def _retry_after(meaning: str) -> dict[str, Any]:
    return {"Retry-After": {"description": meaning, "schema": {"type": "integer", "minimum": 1}}}


def error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"model": ErrorPublic, "description": description} | ({"headers": headers} if headers else {})


AUTH: Responses = {
    401: error(
        "No credentials, or a token or session that is unknown, expired or deactivated.",
        {"WWW-Authenticate": {"description": "Always `Bearer`.", "schema": {"type": "string"}}},
    )
}
ADMIN: Responses = AUTH | {
    403: error("The labeller is not an admin (or, with a session cookie, the CSRF token is wrong).")
}
NOT_FOUND: Responses = {404: error("No such resource; `detail` names the id and where to find valid ones.")}
CONFLICT: Responses = {409: error("The request conflicts with the current state; `detail` says how.")}
# Every method that may carry a body passes through BodySizeLimit, even where the route reads none.
WRITE: Responses = {
    400: error("The body is not UTF-8 or the Content-Length header is not a number."),
    413: error("The body is larger than DENSEALIGN_MAX_BODY_BYTES."),
}
RATE_LIMITED: Responses = {
    429: error("Too many requests; retry after `Retry-After` seconds.", _retry_after("Seconds to wait."))
}
BLOB_CORRUPT: Responses = {
    500: error("The server's copy of the file fails its checksum; the operator must restore it.")
}
INVALID: Responses = {
    422: {"model": ValidationErrorPublic, "description": "The request's data is invalid; `detail` says why."}
}
DB_DOWN: Responses = {
    503: error(
        "The database is restarting or out of connections; nothing was recorded, retry shortly.",
        _retry_after("Seconds to wait before retrying."),
    )
}

# Documentation only (auto_error=False, so it never refuses a request): it puts the bearer scheme in
# the schema. app.deps.get_current_labeller does the checking, also of the browser's session cookie.
BEARER = Security(
    HTTPBearer(
        auto_error=False,
        scheme_name="bearer",
        description="A labeller's token from their invite (`densealign invite`, or the admin page).",
    )
)
