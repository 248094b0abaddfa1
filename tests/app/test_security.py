"""Security basics: rate limits on logins and judgements, CSRF on every form post, cookie flags,
and secrets that come only from the environment."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy.orm import Session

from app.main import create_app
from app.ratelimit import TokenBucket
from core.db.labellers import create_invite
from core.db.models import Judgement, Labeller, Pair
from core.settings import Settings
from core.storage import LocalBlobStore
from tests.app import test_authz_matrix as authz
from tests.app.conftest import count
from tests.app.test_authz_matrix import ADMIN, BUILDERS, EXPECTED, World, _csrf, snapshot

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
    assert len(PAGE_POSTS) == 9  # invite, login, logout and six admin forms


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
