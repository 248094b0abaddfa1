"""The interactive API docs (Swagger UI) at /api/v1/docs, under a Content-Security-Policy of its own.

FastAPI's built-in docs page starts Swagger UI with an inline <script>, which the app-wide policy
(app/middleware.py) blocks. This page loads the same Swagger UI files from the CDN FastAPI uses and
starts them from /static/swagger-init.js, so on this page too no inline script runs. Swagger UI sets
inline styles and draws its icons as data: images, so this one page allows those (it shows no user
content); everything else keeps the app-wide policy.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from app.routes.pages import templates

# FastAPI's default Swagger UI (major version 5) on jsDelivr; only this path of the CDN is allowed.
SWAGGER_UI = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/"
DOCS_POLICY = (
    f"default-src 'none'; script-src 'self' {SWAGGER_UI}; style-src 'self' 'unsafe-inline' {SWAGGER_UI}; "
    "img-src 'self' data:; connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)

router = APIRouter(include_in_schema=False)


@router.get("/docs")
def api_docs(request: Request) -> HTMLResponse:
    return templates.TemplateResponse(
        request,
        "api_docs.html",
        {"swagger_ui": SWAGGER_UI, "openapi_url": request.app.openapi_url},
        headers={"Content-Security-Policy": DOCS_POLICY},
    )
