"""Security basics: rate limits on logins and judgements, CSRF on every form post, cookie flags,
secrets that come only from the environment, the security headers on every response, and
X-Forwarded-For believed only from DENSEALIGN_TRUSTED_PROXIES."""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy.orm import Session, sessionmaker

from app.charts import bar_chart, line_chart
from app.main import create_app
from app.middleware import CONTENT_SECURITY_POLICY
from app.ratelimit import TokenBucket, forwarded_client
from app.routes.docs import DOCS_POLICY, SWAGGER_UI
from app.serve import proxy_options
from core.db.labellers import create_invite
from core.db.models import Judgement, Labeller, Pair
from core.settings import Settings
from core.storage import LocalBlobStore
from tests.app import test_authz_matrix as authz
from tests.app.conftest import count
from tests.app.test_authz_matrix import ADMIN, BUILDERS, EXPECTED, World, _csrf, snapshot
from tests.live_server import serving

ROOT = Path(__file__).resolve().parents[2]

world = authz.world  # the matrix's callers: one logged-in cookie session per kind


def test_token_bucket_refuses_after_the_burst_and_refills() -> None:
    now = [0.0]
    bucket = TokenBucket(per_minute=6, burst=2, clock=lambda: now[0])  # one token every 10 s
    assert (bucket.take("x"), bucket.take("x")) == (0.0, 0.0)
    assert bucket.take("x") == pytest.approx(10.0)
    assert bucket.take("y") == 0.0  # other keys have their own bucket
    now[0] = 4.0
    assert bucket.take("x") == pytest.approx(6.0)
    now[0] = 10.0
    assert bucket.take("x") == 0.0 and bucket.take("x") > 0


@pytest.fixture
def limited_app(settings: Settings, app: FastAPI, blob_store: LocalBlobStore) -> FastAPI:
    tight = settings.model_copy(
        update={
            "login_burst": 2,
            "login_rate_per_minute": 1.0,
            "judgement_burst": 2,
            "judgement_rate_per_minute": 1.0,
        }
    )
    return create_app(tight, session_factory=app.state.session_factory, blob_store=blob_store)


def test_login_is_rate_limited_per_address(
    limited_app: FastAPI, make_labeller: Callable[..., tuple[Labeller, str]]
) -> None:
    _, token = make_labeller("judy")
    browser = TestClient(limited_app)
    csrf = _csrf(browser.get("/login").text)
    for _ in range(2):
        assert browser.post("/login", data={"csrf": csrf, "token": "guess"}).status_code == 401
    refused = browser.post("/login", data={"csrf": csrf, "token": token}, follow_redirects=False)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["detail"].startswith("too many login attempts from your address; wait ")
    assert "DENSEALIGN_LOGIN_RATE_PER_MINUTE" in refused.json()["detail"]
    assert browser.get("/api/v1/me").status_code == 401  # the right token did not get in either


def test_judgements_are_rate_limited_per_labeller(
    limited_app: FastAPI,
    session: Session,
    make_labeller: Callable[..., tuple[Labeller, str]],
    make_pair: Callable[..., Pair],
) -> None:
    for _ in range(4):
        make_pair()

    def judge(token: str) -> int:
        api = TestClient(limited_app, headers={"Authorization": f"Bearer {token}"})
        pair_id = api.get("/api/v1/pairs/next").json()["pair"]["pair_id"]
        body = {"pair_id": pair_id, "choice": "a", "client_key": f"k-{pair_id}-{token[:8]}"}
        response = api.post("/api/v1/judgements", json=body)
        if response.status_code == 429:
            assert (
                int(response.headers["retry-after"]) >= 1
                and "too many judgements" in response.json()["detail"]
            )
        return response.status_code

    _, fast = make_labeller("fast")
    _, other = make_labeller("other")
    assert [judge(fast) for _ in range(3)] == [201, 201, 429]
    assert count(session, Judgement) == 2
    assert judge(other) == 201  # one labeller's limit is not another's


PAGE_POSTS = sorted(key for key in EXPECTED if key[0] == "POST" and not key[1].startswith("/api/"))


def test_every_form_post_is_listed() -> None:
    assert len(PAGE_POSTS) == 11  # invite, login, logout and eight admin forms


@pytest.mark.parametrize("route", PAGE_POSTS, ids=lambda r: r[1])
@pytest.mark.parametrize("sent", [None, "forged-token"], ids=["missing", "forged"])
def test_every_form_post_needs_csrf(world: World, route: tuple[str, str], sent: str | None) -> None:
    caller = world.callers[ADMIN]
    method, url, kwargs = BUILDERS[route](world, caller)
    kwargs["data"] = {k: v for k, v in kwargs["data"].items() if k != "csrf"}
    if sent is not None:
        kwargs["data"]["csrf"] = sent
    world.session.commit()
    before = snapshot(world.session)
    response = caller.client.request(method, url, follow_redirects=False, **kwargs)
    assert response.status_code == 403 and "CSRF token missing or wrong" in response.text
    assert snapshot(world.session) == before


@pytest.mark.parametrize(
    ("method", "url"),
    [("POST", "/api/v1/prompts"), ("PUT", "/api/v1/policies/current"), ("DELETE", "/api/v1/prompts/1")],
)
def test_cookie_sessions_need_the_csrf_header_on_api_writes(world: World, method: str, url: str) -> None:
    browser = world.callers[ADMIN].client  # logged in by cookie, no bearer token
    before = snapshot(world.session)
    body = {"text": "x"} if method == "POST" else {"version": 0} if method == "PUT" else None
    response = browser.request(method, url, json=body)
    assert response.status_code == 403 and "CSRF" in response.json()["detail"]
    assert snapshot(world.session) == before


@pytest.mark.parametrize("secure", [False, True])
def test_session_cookie_flags(app: FastAPI, settings: Settings, session: Session, secure: bool) -> None:
    configured = create_app(
        settings.model_copy(update={"cookie_secure": secure}),
        session_factory=app.state.session_factory,
        blob_store=app.state.blob_store,
    )
    browser = TestClient(configured, base_url="https://testserver")
    _, secret = create_invite(session=session, name="kim", role="annotator", ttl=dt.timedelta(hours=1))
    page = browser.get(f"/invite/{secret}")
    accepted = browser.post(f"/invite/{secret}", data={"csrf": _csrf(page.text)})
    for response in (page, accepted):
        cookie = response.headers["set-cookie"].lower()
        assert cookie.startswith("densealign_session=")
        assert "httponly" in cookie and "samesite=lax" in cookie and "path=/" in cookie
        assert ("; secure" in cookie) is secure


def test_secrets_have_no_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DENSEALIGN_SECRET_KEY", "DENSEALIGN_DEMO"):
        monkeypatch.delenv(name, raising=False)
    secrets = [name for name, f in Settings.model_fields.items() if f.annotation == SecretStr | None]
    assert secrets == ["secret_key"]
    assert Settings().secret_key is None  # so create_app refuses to start (tests/app/test_pages.py)
    monkeypatch.setenv("DENSEALIGN_SECRET_KEY", "from-the-environment")
    assert Settings().secret_key.get_secret_value() == "from-the-environment"  # type: ignore[union-attr]


# -- security headers ------------------------------------------------------------------------------

HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}
# An inline <script> (one without src), an inline event handler, or a style attribute or element.
INLINE = re.compile(r"<script(?![^>]*\bsrc=)[^>]*>|\son[a-z]+\s*=|\sstyle\s*=|<style", re.IGNORECASE)


def directives(policy: str) -> dict[str, list[str]]:
    return {name: rest for name, *rest in (part.split() for part in policy.split(";") if part.strip())}


def test_the_policy_allows_no_inline_script_and_no_framing() -> None:
    policy = directives(CONTENT_SECURITY_POLICY)
    assert policy["default-src"] == ["'none'"]
    assert policy["script-src"] == policy["style-src"] == policy["img-src"] == ["'self'"]
    assert policy["frame-ancestors"] == ["'none'"] and policy["base-uri"] == ["'none'"]
    assert policy["form-action"] == policy["connect-src"] == ["'self'"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/login", 200),  # an HTML page
        ("GET", "/api/v1/health", 200),  # an API answer
        ("GET", "/api/v1/me", 401),  # an API refusal
        ("GET", "/static/style.css", 200),  # a static file
        ("GET", "/no-such-page", 404),
        ("POST", "/api/v1/prompts", 413),  # refused by the body size limit, before any route
    ],
)
def test_every_response_carries_the_security_headers(
    client: TestClient, method: str, path: str, status: int
) -> None:
    response = client.request(method, path, content=b"x" * 20_000 if method == "POST" else None)
    assert response.status_code == status, response.text
    got = {name: response.headers.get(name) for name in HEADERS}
    assert got == HEADERS, f"{method} {path} answered other security headers than app/middleware.py's"
    assert "camera=()" in response.headers["permissions-policy"]


def test_the_api_docs_page_has_a_narrow_policy_of_its_own(client: TestClient) -> None:
    page = client.get("/api/v1/docs")
    assert page.status_code == 200 and page.headers["content-security-policy"] == DOCS_POLICY
    policy = directives(DOCS_POLICY)
    assert policy["script-src"] == ["'self'", SWAGGER_UI]  # no inline script on this page either
    assert policy["frame-ancestors"] == ["'none'"] and page.headers["x-frame-options"] == "DENY"
    assert not re.search(r"<script(?![^>]*\bsrc=)", page.text), "the docs page has an inline script"
    assert '<script src="/static/swagger-init.js" data-openapi-url="/api/v1/openapi.json">' in page.text
    assert f'<script src="{SWAGGER_UI}swagger-ui-bundle.js">' in page.text
    # Every other page keeps the strict policy.
    assert client.get("/api/v1/openapi.json").headers["content-security-policy"] == CONTENT_SECURITY_POLICY


@pytest.mark.parametrize(
    "template", sorted((ROOT / "app" / "templates").rglob("*.html")), ids=lambda p: p.name
)
def test_templates_have_nothing_inline_the_policy_would_block(template: Path) -> None:
    found = INLINE.findall(template.read_text(encoding="utf-8"))
    assert not found, f"{template.name} has {found}: move scripts and styles to app/static/"


def test_charts_have_nothing_inline_the_policy_would_block() -> None:
    for chart in (line_chart([(0, 0.1), (1, 0.5)]), bar_chart([0, 3, 5])):
        assert "<svg" in chart and not INLINE.findall(str(chart)), chart


# -- trusted proxies -------------------------------------------------------------------------------

PROXIES = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "client"),
    [
        ("203.0.113.9", ["1.2.3.4"], "203.0.113.9"),  # not a proxy: the header is ignored
        ("10.0.0.2", [], "10.0.0.2"),  # a proxy that sent no header
        ("10.0.0.2", ["1.2.3.4"], "1.2.3.4"),
        ("10.0.0.2", ["6.6.6.6, 1.2.3.4"], "1.2.3.4"),  # the client's own (forged) entry is ignored
        ("10.0.0.2", ["1.2.3.4, 10.0.0.3"], "1.2.3.4"),  # two proxies in a row
        ("10.0.0.2", ["6.6.6.6", "1.2.3.4"], "1.2.3.4"),  # the header sent twice
        ("10.0.0.2", ["10.0.0.4, 10.0.0.3"], "10.0.0.4"),  # every hop a proxy: the first one
        ("10.0.0.2", ["not-an-address"], "not-an-address"),
        ("::1", ["2001:db8::7"], "2001:db8::7"),
    ],
)
def test_forwarded_client_believes_only_trusted_proxies(
    peer: str, forwarded_for: list[str], client: str
) -> None:
    assert forwarded_client(peer, forwarded_for, PROXIES) == client


# Three CSRF-less login posts claiming these X-Forwarded-For addresses: each answers 403 while its
# sender's bucket (burst 1) has a token (the CSRF check refuses it), 429 once the rate limit does.
CLAIMED = ["1.2.3.4", "5.6.7.8", "5.6.7.8"]


def proxied_app(settings: Settings, proxies: list[str]) -> FastAPI:
    tight = settings.model_copy(update={"login_burst": 1, "login_rate_per_minute": 1.0})
    tight = Settings.model_validate({**tight.model_dump(), "trusted_proxies": proxies})
    return create_app(tight, session_factory=sessionmaker())  # the limit refuses before any query


@pytest.mark.parametrize(
    ("proxies", "statuses"),
    [([], [403, 429, 429]), (["10.0.0.0/8"], [403, 403, 429])],
    ids=["no-proxy", "trusted-proxy"],
)
def test_login_limit_keys_on_the_forwarded_client_only_behind_a_trusted_proxy(
    settings: Settings, proxies: list[str], statuses: list[int]
) -> None:
    browser = TestClient(proxied_app(settings, proxies), client=("10.0.0.2", 40000))

    def post(address: str) -> int:
        return browser.post("/login", headers={"X-Forwarded-For": address}).status_code

    assert [post(address) for address in CLAIMED] == statuses


@pytest.mark.parametrize(
    ("proxies", "statuses"),
    [([], [403, 429, 429]), (["127.0.0.1"], [403, 403, 429])],
    ids=["no-proxy", "loopback-proxy"],
)
def test_uvicorn_as_densealign_serve_runs_it_does_not_undo_the_setting(
    settings: Settings, proxies: list[str], statuses: list[int]
) -> None:
    # uvicorn alone believes X-Forwarded-For from 127.0.0.1 and rewrites the client address; served
    # with proxy_options (as `densealign serve` does), a loopback client that forges the header gets no
    # bucket of its own unless loopback is a configured proxy.
    app = proxied_app(settings, proxies)
    with serving(app, **proxy_options(app.state.settings)) as base, httpx.Client(base_url=base) as http:

        def post(address: str) -> int:
            return http.post("/login", headers={"X-Forwarded-For": address}).status_code

        assert [post(address) for address in CLAIMED] == statuses
