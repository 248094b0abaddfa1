"""Browser-facing routes: invites, cookie sessions with CSRF, admin pages."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.main import MissingSecretKey, create_app
from core.db.heartbeats import beat
from core.db.labellers import create_invite
from core.db.models import Judgement, Labeller, Pair, ProcessHeartbeat, Prompt
from core.db.policies import publish_policy_version
from core.db.sampler_groups import configured_sampler
from core.settings import Settings
from tests.app.conftest import count
from tests.core.db.test_training import decided_pair

INVITE_TTL = __import__("datetime").timedelta(hours=1)


def _csrf(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "page has no CSRF field"
    return match.group(1)


def _accept_invite(
    client: TestClient, session: Session, name: str = "carol", role: str = "annotator"
) -> tuple[str, str]:
    """Accept a fresh invite in `client`; returns the invite secret and the Set-Cookie header."""
    _, secret = create_invite(session=session, name=name, role=role, ttl=INVITE_TTL)
    page = client.get(f"/invite/{secret}")
    assert page.status_code == 200 and f"Welcome, {name}" in page.text
    accepted = client.post(f"/invite/{secret}", data={"csrf": _csrf(page.text)})
    assert accepted.status_code == 200 and 'id="token"' in accepted.text
    return secret, accepted.headers.get("set-cookie", "")


def test_secret_key_required_outside_demo(tmp_path: object) -> None:
    with pytest.raises(MissingSecretKey, match="DENSEALIGN_SECRET_KEY is not set"):
        create_app(Settings(database_url="sqlite://", secret_key=None, demo=False))
    assert create_app(Settings(database_url="sqlite://", secret_key=None, demo=True)) is not None


def test_invite_logs_in_once_and_sets_a_safe_cookie(
    client: TestClient, session: Session, settings: Settings
) -> None:
    secret, cookie = _accept_invite(client, session)
    assert client.get("/label").status_code == 200
    assert client.get("/api/v1/me").json()["name"] == "carol"
    again = client.get(f"/invite/{secret}")
    assert again.status_code == 404 and "already used or expired" in again.text
    assert "secure" not in cookie.lower()
    assert "httponly" in cookie.lower() and "samesite=lax" in cookie.lower()


def test_secure_cookie_flag_follows_settings(app: object, session: Session, settings: Settings) -> None:
    secure_app = create_app(
        settings.model_copy(update={"cookie_secure": True}),
        session_factory=app.state.session_factory,  # type: ignore[attr-defined]
        blob_store=app.state.blob_store,  # type: ignore[attr-defined]
    )
    cookie = TestClient(secure_app).get("/login").headers["set-cookie"].lower()
    assert "secure" in cookie and "httponly" in cookie


def test_cookie_session_needs_csrf_header_for_writes(
    client: TestClient, session: Session, pair: Pair
) -> None:
    _accept_invite(client, session)
    got = client.get("/api/v1/pairs/next").json()["pair"]
    body = {"pair_id": got["pair_id"], "choice": "a", "client_key": "cookie-key-1"}
    refused = client.post("/api/v1/judgements", json=body)
    assert refused.status_code == 403 and "CSRF token missing or wrong" in refused.json()["detail"]
    assert count(session, Judgement) == 0
    token = _csrf(client.get("/label").text)
    accepted = client.post("/api/v1/judgements", json=body, headers={"X-CSRF-Token": token})
    assert accepted.status_code == 201


def test_form_posts_without_csrf_are_refused(client: TestClient, session: Session) -> None:
    _, secret = create_invite(session=session, name="dave", role="annotator", ttl=INVITE_TTL)
    client.get(f"/invite/{secret}")
    refused = client.post(f"/invite/{secret}", data={"csrf": "forged"})
    assert refused.status_code == 403
    assert session.scalar(select(Labeller).where(Labeller.name == "dave")) is None


def test_login_with_token(client: TestClient, make_labeller: Callable[..., tuple[Labeller, str]]) -> None:
    _, token = make_labeller("erin")
    csrf = _csrf(client.get("/login").text)
    wrong = client.post("/login", data={"csrf": csrf, "token": "nope"})
    assert wrong.status_code == 401 and "unknown" in wrong.text
    ok = client.post("/login", data={"csrf": csrf, "token": token}, follow_redirects=False)
    assert ok.status_code == 303 and ok.headers["location"] == "/label"
    assert client.get("/api/v1/me").json()["name"] == "erin"


def test_label_page_redirects_when_logged_out(client: TestClient) -> None:
    response = client.get("/label", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/login"


def test_admin_pages(client: TestClient, session: Session, pair: Pair) -> None:
    _accept_invite(client, session, name="root", role="admin")
    publish_policy_version(
        session=session,
        version=1,
        parent_version=0,
        lora_key="x/1",
        lora_sha256="1" * 64,
        metrics={"win_rate": 0.6, "judge_gain_train": 0.0123456, "judge_scores": [0.41111, 0.92222]},
    )
    dashboard = client.get("/admin")
    assert dashboard.status_code == 200
    assert '<div class="big" id="queue-depth">1</div>' in dashboard.text and "<svg" in dashboard.text
    assert "win_rate=0.6" in dashboard.text and "judge_gain_train=0.0123 " in dashboard.text
    assert "<figcaption>judge_gain_train</figcaption>" in dashboard.text
    # per-case score lists are for analysis, not for the table
    assert "0.41111" not in dashboard.text
    csrf = _csrf(dashboard.text)
    client.post("/admin/prompts", data={"csrf": csrf, "text": "a green kite", "split": "train"})
    client.post(
        "/admin/prompts/import",
        data={"csrf": csrf, "split": "eval"},
        files={"file": ("p.txt", b"one prompt\n\ntwo prompt\na green kite\n", "text/plain")},
    )
    texts = {p.text: p.split for p in session.scalars(select(Prompt))}
    assert (
        texts["a green kite"] == "train" and texts["one prompt"] == "eval" and texts["two prompt"] == "eval"
    )
    invited = client.post(
        "/admin/labellers/invite", data={"csrf": csrf, "name": "frank", "role": "annotator"}
    )
    assert re.search(r'id="invite-url">http://testserver/invite/[\w-]+<', invited.text)
    rolled = client.post(
        "/admin/policies/current", data={"csrf": csrf, "version": "0"}, follow_redirects=False
    )
    assert rolled.status_code == 303
    assert client.get("/api/v1/policies/current").json()["version"] == 0


def test_annotator_cannot_open_admin_pages(client: TestClient, session: Session) -> None:
    _accept_invite(client, session)
    assert client.get("/admin").status_code == 403
    assert client.get("/admin/prompts").status_code == 403


def test_dashboard_shows_each_process_state_and_silence(client: TestClient, session: Session) -> None:
    _accept_invite(client, session, name="root", role="admin")
    assert "No worker or trainer has reported yet" in client.get("/admin").text
    now = dt.datetime.now(dt.UTC)
    beat(
        session=session,
        role="worker",
        host="gpu-a",
        pid=7,
        state="sampling",
        detail="8 pair(s), job j1",
        policy_version=3,
        started_at=now,
    )
    beat(
        session=session,
        role="trainer",
        host="gpu-b",
        pid=1,
        state="training",
        detail="round step 40/60",
        policy_version=3,
        started_at=now,
    )
    beat(session=session, role="worker", host="gpu-c", pid=9, state="idle", started_at=now, stopped=True)
    # a worker that went quiet five minutes ago (killed without a goodbye)
    beat(session=session, role="worker", host="gpu-d", pid=4, state="sampling", started_at=now)
    session.execute(
        update(ProcessHeartbeat)
        .where(ProcessHeartbeat.host == "gpu-d")
        .values(beat_at=now - dt.timedelta(minutes=5))
    )
    session.commit()
    page = client.get("/admin").text
    table = page[
        page.index('<table id="processes">') : page.index("</table>", page.index('<table id="processes">'))
    ]
    rows = {
        m.group(1): m.group(0)
        for m in re.finditer(r"<tr class=\"\w+\">\s*<td>\w+</td><td>([\w-]+)</td>.*?</tr>", table, re.S)
    }
    assert set(rows) == {"gpu-a", "gpu-b", "gpu-c", "gpu-d"}
    assert "<b>sampling</b>: 8 pair(s), job j1" in rows["gpu-a"] and "<td>3</td>" in rows["gpu-a"]
    assert "<b>training</b>: round step 40/60" in rows["gpu-b"]
    assert 'class="gone"' in rows["gpu-c"] and "stopped" in rows["gpu-c"]
    assert 'class="gone"' in rows["gpu-d"] and "silent</b> (was sampling)" in rows["gpu-d"]
    assert "300 s ago" in rows["gpu-d"] or "301 s ago" in rows["gpu-d"]


def test_dashboard_counts_the_decided_pairs_waiting_by_sampler_settings(
    client: TestClient,
    session: Session,
    settings: Settings,
    policy_version: object,
    prompt: Prompt,
    labeller: Labeller,
) -> None:
    _accept_invite(client, session, name="root", role="admin")
    at_50 = "steps 50, guidance 7.5, eta 1.0, native size"  # the app's settings (the defaults)
    page = client.get("/admin").text
    assert (
        f'<p id="sampler-backlog-summary">0 decided pairs at the current settings ({at_50}), need 32</p>'
        in page
    )
    assert 'id="sampler-backlog"' not in page
    current = configured_sampler(settings.sampler)
    named = current | {"base_model": "sd-model"}  # workers that record their base model
    at_20 = current | {"num_steps": 20}  # what a worker at DENSEALIGN_SAMPLER__NUM_STEPS=20 wrote
    for record in (current, named, at_20, at_20, at_20):
        decided_pair(session, labeller, prompt, record)
    session.commit()
    page = client.get("/admin").text
    assert (
        f'<p id="sampler-backlog-summary">2 decided pairs at the current settings ({at_50}, sd-model), '
        "need 32; 3 more at other settings are not used (steps 20, guidance 7.5, eta 1.0, native size: 3)</p>"
    ) in page
    start = page.index('<table id="sampler-backlog">')
    table = page[start : page.index("</table>", start)]
    rows = re.findall(r'<tr class="(\w+)">\s*<td>([^<]*)</td><td>(\d+)</td>', table)
    assert rows == [
        ("current", at_50, "1"),  # names no base model: trains with either
        ("current", f"{at_50}, sd-model", "1"),
        ("other", "steps 20, guidance 7.5, eta 1.0, native size", "3"),
    ]
    assert table.count("<b>current</b>") == 2
