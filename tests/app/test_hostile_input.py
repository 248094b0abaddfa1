"""Hostile input beyond tests/app/test_bad_input.py: path traversal, oversized and non-text uploads,
unicode and very long prompts, SQL-ish strings, replayed invites, expired and forged session cookies.

Each gets a clear 4xx (or, for harmless text, is stored verbatim) and writes nothing it should not.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import time
from collections.abc import Callable

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from itsdangerous import TimestampSigner
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db.labellers import create_invite
from core.db.models import Invite, Judgement, Labeller, Lease, Pair, Prompt, Trajectory
from core.settings import Settings
from tests.app.conftest import count

SQLISH = ["'; DROP TABLE prompts; --", "1 OR 1=1", '" OR ""="', "x'); DELETE FROM labellers; --"]


def _csrf(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "page has no CSRF field"
    return match.group(1)


# -- path traversal -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "/api/v1/pairs/{pair}/images/..%2F..%2F..%2Fetc%2Fpasswd",
        "/api/v1/pairs/{pair}/images/%2e%2e",
        "/api/v1/pairs/..%2F{pair}/images/a",
        "/api/v1/policies/..%2F..%2Fetc%2Fpasswd/lora.safetensors",
        "/api/v1/policies/-1/lora.safetensors",
        "/static/..%2F..%2Fcore%2Fsettings.py",
        "/static/../main.py",
        "/static/%2e%2e/main.py",
    ],
)
def test_traversal_urls_are_4xx(
    annotator: tuple[TestClient, Labeller], pair_with_images: Pair, url: str
) -> None:
    api, _ = annotator
    response = api.get(url.format(pair=pair_with_images.id))
    assert 400 <= response.status_code < 500, response.text[:200]
    assert b"root:" not in response.content and b"DENSEALIGN_" not in response.content


def test_poisoned_blob_key_in_the_database_is_refused(
    annotator: tuple[TestClient, Labeller], pair_with_images: Pair, session: Session
) -> None:
    # Keys come from workers, but a corrupted row must still never turn the image route into a file server.
    trajectory = session.get_one(Trajectory, pair_with_images.trajectory_a_id)
    trajectory.image_key = "../../../../etc/passwd"
    session.commit()
    api, _ = annotator
    response = api.get(f"/api/v1/pairs/{pair_with_images.id}/images/a")
    assert (
        response.status_code == 422
        and "blob key '../../../../etc/passwd' is invalid" in response.json()["detail"]
    )


# -- uploads and long or odd text -----------------------------------------------------------------


@pytest.fixture
def admin_browser(client: TestClient, session: Session) -> tuple[TestClient, str]:
    """A cookie-session admin (invite accepted in the browser) and the session's CSRF token."""
    _, secret = create_invite(session=session, name="root", role="admin", ttl=dt.timedelta(hours=1))
    page = client.get(f"/invite/{secret}")
    assert client.post(f"/invite/{secret}", data={"csrf": _csrf(page.text)}).status_code == 200
    return client, _csrf(client.get("/admin/prompts").text)


def test_oversized_and_binary_prompt_imports_write_nothing(
    admin_browser: tuple[TestClient, str], session: Session
) -> None:
    browser, csrf = admin_browser
    before = count(session, Prompt)
    huge = browser.post(
        "/admin/prompts/import",
        data={"csrf": csrf},
        files={"file": ("p.txt", b"a prompt\n" * 2_000, "text/plain")},
    )
    assert huge.status_code == 413 and "exceeds the limit of 10000 bytes" in huge.json()["detail"]
    png = browser.post(
        "/admin/prompts/import",
        data={"csrf": csrf},
        files={"file": ("cat.png", b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary", "image/png")},
    )
    assert png.status_code == 422 and "not UTF-8 text" in png.text
    long_line = browser.post(
        "/admin/prompts/import",
        data={"csrf": csrf},
        files={"file": ("p.txt", b"fine\n" + b"y" * 2001 + b"\n", "text/plain")},
    )
    assert long_line.status_code == 422 and "line 2: prompt text has 2001 characters" in long_line.text
    assert count(session, Prompt) == before


@pytest.mark.parametrize(
    "text",
    [
        "ein rotes Fahrrad vor einer Mühle",
        "一只在月光下的猫 🐈‍⬛",
        "مكعب أحمر على طاولة زرقاء",  # right-to-left
        "e\u0301 combining accents and zero\u200bwidth space",
        "x" * 2000,
        *SQLISH,
    ],
)
def test_odd_but_valid_prompts_are_stored_verbatim(
    admin_client: TestClient, session: Session, text: str
) -> None:
    created = admin_client.post("/api/v1/prompts", json={"text": text})
    assert created.status_code == 201 and created.json()["text"] == text
    assert admin_client.get(f"/api/v1/prompts/{created.json()['id']}").json()["text"] == text
    assert count(session, Labeller) >= 1  # the SQL-ish ones did not touch other tables


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"text": "x" * 2001}, "text: String should have at most 2000 characters"),
        ({"text": "x" * 100_000}, "exceeds the limit of 10000 bytes"),
        ({"text": "\ud800 lone surrogate"}, "text"),
        ({"text": ""}, "text: String should have at least 1 character"),
    ],
)
def test_unstorable_prompts_are_4xx(
    admin_client: TestClient, session: Session, body: dict[str, str], detail: str
) -> None:
    before = count(session, Prompt)
    response = admin_client.post(
        "/api/v1/prompts",
        content=json.dumps(body).encode(),  # json.dumps escapes the surrogate as \ud800: valid JSON
        headers={"Content-Type": "application/json"},
    )
    assert 400 <= response.status_code < 500 and detail in response.json()["detail"], response.text[:300]
    assert count(session, Prompt) == before


# -- SQL-ish strings where ids and tokens go ------------------------------------------------------


@pytest.mark.parametrize("evil", SQLISH)
def test_sqlish_credentials_and_ids_are_refused(
    app: FastAPI, client: TestClient, annotator: tuple[TestClient, Labeller], session: Session, evil: str
) -> None:
    api, _ = annotator
    before = {model: count(session, model) for model in (Labeller, Invite, Judgement, Lease, Prompt)}
    assert TestClient(app, headers={"Authorization": f"Bearer {evil}"}).get("/api/v1/me").status_code == 401
    csrf = _csrf(client.get("/login").text)
    login = client.post("/login", data={"csrf": csrf, "token": evil})
    assert login.status_code == 401 and "unknown" in login.text
    assert client.get(f"/invite/{evil}").status_code == 404
    assert api.get("/api/v1/pairs/next", params={"exclude": evil}).status_code == 422
    assert api.get(f"/api/v1/prompts/{evil}").status_code in (404, 422)
    judged = api.post("/api/v1/judgements", json={"pair_id": 1, "choice": "a", "client_key": evil})
    assert judged.status_code == 422 and "client_key" in judged.json()["detail"]
    listed = api.get("/api/v1/prompts", params={"split": evil})
    assert listed.status_code == 422 and "split" in listed.json()["detail"]
    assert {model: count(session, model) for model in before} == before


def test_non_utf8_login_token_is_401(client: TestClient, session: Session) -> None:
    csrf = _csrf(client.get("/login").text)
    response = client.post(
        "/login",
        content=f"csrf={csrf}&token=%ED%A0%80%FF".encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert 400 <= response.status_code < 500
    assert count(session, Labeller) == 0


# -- invites and sessions -------------------------------------------------------------------------


def test_replayed_invite_link_creates_no_second_labeller(
    client: TestClient, app: FastAPI, session: Session
) -> None:
    _, secret = create_invite(session=session, name="grace", role="annotator", ttl=dt.timedelta(hours=1))
    page = client.get(f"/invite/{secret}")
    assert client.post(f"/invite/{secret}", data={"csrf": _csrf(page.text)}).status_code == 200
    assert count(session, Labeller) == 1
    # Replayed from the same browser and from another one (a forwarded link).
    replay = client.post(f"/invite/{secret}", data={"csrf": _csrf(client.get("/login").text)})
    assert replay.status_code == 404 and "already used or expired" in replay.text
    other = TestClient(app)
    again = other.post(f"/invite/{secret}", data={"csrf": _csrf(other.get("/login").text)})
    assert again.status_code == 404
    assert other.get("/api/v1/me").status_code == 401
    assert count(session, Labeller) == 1


def test_expired_invite_is_refused(client: TestClient, session: Session) -> None:
    invite, secret = create_invite(session=session, name="heidi", role="annotator", ttl=dt.timedelta(hours=1))
    invite.expires_at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    session.commit()
    assert client.get(f"/invite/{secret}").status_code == 404
    response = client.post(f"/invite/{secret}", data={"csrf": _csrf(client.get("/login").text)})
    assert response.status_code == 404 and "already used or expired" in response.text
    assert count(session, Labeller) == 0


def _session_cookie(secret: str, data: dict[str, object], *, age_seconds: int = 0) -> str:
    """A session cookie as Starlette's SessionMiddleware signs it, `age_seconds` old."""

    class Backdated(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) - age_seconds

    payload = base64.b64encode(json.dumps(data).encode())
    return Backdated(secret).sign(payload).decode()


@pytest.mark.parametrize(
    ("key", "age"),
    [("test-secret-key", 10**9), ("not-the-server-key", 0)],
    ids=["expired", "forged"],
)
def test_expired_or_forged_session_cookie_is_anonymous(
    app: FastAPI,
    settings: Settings,
    session: Session,
    make_labeller: Callable[..., tuple[Labeller, str]],
    pair: Pair,
    key: str,
    age: int,
) -> None:
    admin, _ = make_labeller("root", role="admin")
    cookie = _session_cookie(key, {"labeller_id": admin.id, "csrf": "known-csrf"}, age_seconds=age)
    browser = TestClient(app, cookies={"densealign_session": cookie})
    assert browser.get("/api/v1/me").status_code == 401
    assert browser.get("/label", follow_redirects=False).headers["location"] == "/login"
    assert browser.get("/admin", follow_redirects=False).headers["location"] == "/login"
    judged = browser.post(
        "/api/v1/judgements",
        json={"pair_id": pair.id, "choice": "a", "client_key": "cookie-replay"},
        headers={"X-CSRF-Token": "known-csrf"},
    )
    assert judged.status_code == 401
    form = browser.post("/admin/prompts", data={"csrf": "known-csrf", "text": "planted"})
    assert form.status_code == 403
    assert count(session, Judgement) == 0 and count(session, Lease) == 0
    assert session.scalar(select(Prompt).where(Prompt.text == "planted")) is None


def test_fresh_cookie_signed_with_the_key_works(
    app: FastAPI, settings: Settings, make_labeller: Callable[..., tuple[Labeller, str]]
) -> None:
    # The control for the test above: the same cookie, fresh and properly signed, is a logged-in session.
    labeller, _ = make_labeller("ivan")
    cookie = _session_cookie("test-secret-key", {"labeller_id": labeller.id, "epoch": 0, "csrf": "c"})
    assert TestClient(app, cookies={"densealign_session": cookie}).get("/api/v1/me").json()["name"] == "ivan"
