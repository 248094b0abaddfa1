"""Authorisation matrix: every route of the app x {anonymous, deactivated annotator, annotator, admin}.

The table below names the status each kind of caller gets from each route; the route list is walked
from `create_app(...)`, so a new route without a row fails `test_every_route_has_a_row`. Each
refused request must leave the database exactly as it was (every row of every table compared).

API routes are called with the caller's bearer token; pages with the caller's session cookie (logged
in through /login) and a valid CSRF field, so a refusal here is about who is asking, never about CSRF.
"""

from __future__ import annotations

import datetime as dt
import random
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.routing import Mount

from core.db.assignment import next_pair
from core.db.base import Base
from core.db.campaigns import list_campaigns, start_campaign
from core.db.judgements import record_judgement
from core.db.labellers import create_invite, create_labeller, update_labeller
from core.db.models import Labeller, Pair, Prompt
from core.db.policies import publish_policy_version
from core.db.prompts import add_prompt
from core.storage import LocalBlobStore

ANON, DEACTIVATED, ANNOTATOR, ADMIN = "anonymous", "deactivated", "annotator", "admin"
# The deactivated caller goes first among labellers so the active ones' writes cannot mask its refusal.
PRINCIPALS = (ANON, DEACTIVATED, ANNOTATOR, ADMIN)
LOGIN = (303, "/login")

# Expected outcome per caller: a status code, or (303, location) for a redirect.
Outcome = int | tuple[int, str]


def _row(anon: Outcome, deactivated: Outcome, annotator: Outcome, admin: Outcome) -> dict[str, Outcome]:
    return {ANON: anon, DEACTIVATED: deactivated, ANNOTATOR: annotator, ADMIN: admin}


def everyone(status: Outcome) -> dict[str, Outcome]:
    return _row(status, status, status, status)


def labellers(status: Outcome) -> dict[str, Outcome]:
    return _row(401, 401, status, status)


def admins(status: Outcome) -> dict[str, Outcome]:
    return _row(401, 401, 403, status)


def admin_pages(status: Outcome) -> dict[str, Outcome]:
    return _row(LOGIN, LOGIN, 403, status)


EXPECTED: dict[tuple[str, str], dict[str, Outcome]] = {
    # framework routes: the schema and docs are public, static files too
    ("GET", "/api/v1/openapi.json"): everyone(200),
    ("GET", "/api/v1/docs"): everyone(200),
    ("GET", "/static"): everyone(200),
    # API
    ("GET", "/api/v1/health"): everyone(200),
    ("GET", "/api/v1/prompts"): labellers(200),
    ("POST", "/api/v1/prompts"): admins(201),
    ("GET", "/api/v1/prompts/{prompt_id}"): labellers(200),
    ("PATCH", "/api/v1/prompts/{prompt_id}"): admins(200),
    ("DELETE", "/api/v1/prompts/{prompt_id}"): admins(200),
    ("GET", "/api/v1/pairs/next"): labellers(200),
    ("GET", "/api/v1/pairs/{pair_id}"): admins(200),  # seeds and sampler record: for admins only
    ("PUT", "/api/v1/pairs/{pair_id}/gold"): admins(200),  # known answers score labellers: admins only
    ("GET", "/api/v1/pairs/{pair_id}/images/{side}"): labellers(200),
    ("POST", "/api/v1/judgements"): labellers(201),
    ("DELETE", "/api/v1/judgements/{judgement_id}"): labellers(200),
    ("GET", "/api/v1/me"): labellers(200),
    ("GET", "/api/v1/policies"): labellers(200),
    ("GET", "/api/v1/policies/current"): labellers(200),
    ("PUT", "/api/v1/policies/current"): admins(200),
    ("GET", "/api/v1/policies/{version}/lora.safetensors"): labellers(200),
    ("GET", "/api/v1/policies/{version}/evaluation"): labellers(200),
    ("GET", "/api/v1/evaluations"): labellers(200),
    ("POST", "/api/v1/evaluations"): admins(201),
    ("GET", "/api/v1/evaluations/scores"): labellers(200),
    ("GET", "/api/v1/evaluations/{campaign_id}"): labellers(200),
    ("POST", "/api/v1/evaluations/{campaign_id}/stop"): admins(200),
    ("GET", "/api/v1/stats"): admins(200),
    ("GET", "/api/v1/export"): admins(200),
    ("POST", "/api/v1/invites"): admins(201),
    ("GET", "/api/v1/labellers"): admins(200),
    ("PATCH", "/api/v1/labellers/{labeller_id}"): admins(200),
    # pages
    ("GET", "/"): _row(LOGIN, LOGIN, (303, "/label"), (303, "/label")),
    ("GET", "/invite/{secret}"): everyone(200),  # the link itself is the credential
    ("POST", "/invite/{secret}"): everyone(200),
    ("GET", "/login"): everyone(200),
    ("POST", "/login"): _row(401, 401, (303, "/label"), (303, "/label")),
    ("POST", "/logout"): everyone(LOGIN),
    ("GET", "/label"): _row(LOGIN, LOGIN, 200, 200),
    ("GET", "/guidelines"): everyone(200),
    ("GET", "/admin"): admin_pages(200),
    ("POST", "/admin/policies/current"): admin_pages((303, "/admin")),
    ("POST", "/admin/evaluations"): admin_pages((303, "/admin#evaluation")),
    ("POST", "/admin/evaluations/{campaign_id}/stop"): admin_pages((303, "/admin#evaluation")),
    ("GET", "/admin/prompts"): admin_pages(200),
    ("POST", "/admin/prompts"): admin_pages((303, "/admin/prompts")),
    ("POST", "/admin/prompts/import"): admin_pages((303, "/admin/prompts")),
    ("POST", "/admin/prompts/{prompt_id}/active"): admin_pages((303, "/admin/prompts")),
    ("GET", "/admin/labellers"): admin_pages(200),
    ("POST", "/admin/labellers/invite"): admin_pages(200),
    ("POST", "/admin/labellers/{labeller_id}/active"): admin_pages((303, "/admin/labellers")),
}


def app_routes(app: FastAPI) -> set[tuple[str, str]]:
    """(method, path) of every route the app serves; HEAD rides along with GET."""
    keys = set()
    for route in iter_route_contexts(app.routes):
        if isinstance(route.original_route, Mount):
            keys.add(("GET", str(route.path)))
            continue
        for method in route.methods or ():
            if method != "HEAD":
                keys.add((method, str(route.path)))
    return keys


def test_every_route_has_a_row(app: FastAPI) -> None:
    served = app_routes(app)
    assert served - EXPECTED.keys() == set(), "new route: add its row to EXPECTED"
    assert EXPECTED.keys() - served == set(), "route gone: drop its row from EXPECTED"


# -- the world each request runs in -------------------------------------------------------------


@dataclass
class Caller:
    kind: str
    client: TestClient
    csrf: str
    labeller: Labeller | None = None
    token: str | None = None

    def api_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


@dataclass
class World:
    session: Session
    app: FastAPI
    pair: Pair
    prompt: Prompt
    make_pair: Callable[..., Pair]
    callers: dict[str, Caller] = field(default_factory=dict)

    def labeller_of(self, caller: Caller) -> Labeller:
        """The caller's labeller, or the annotator's for callers who have none (their ids are a target)."""
        return caller.labeller or self.callers[ANNOTATOR].labeller  # type: ignore[return-value]

    def leased_pair(self, caller: Caller) -> int:
        fresh = self.make_pair()
        if caller.labeller is None or not caller.labeller.active:
            return fresh.id
        assignment = next_pair(
            session=self.session, labeller_id=caller.labeller.id, lease_seconds=120, rng=random.Random(0)
        )
        assert assignment is not None
        return assignment.pair.id

    def judgement(self, caller: Caller) -> int:
        owner = self.labeller_of(caller)
        self.make_pair()
        assignment = next_pair(session=self.session, labeller_id=owner.id, lease_seconds=120)
        assert assignment is not None
        recorded = record_judgement(
            session=self.session,
            labeller_id=owner.id,
            pair_id=assignment.pair.id,
            choice="a",
            client_key=uuid.uuid4().hex,
        )
        return recorded.judgement.id

    def invite_secret(self) -> str:
        return create_invite(
            session=self.session,
            name=f"inv-{uuid.uuid4().hex[:8]}",
            role="annotator",
            ttl=dt.timedelta(hours=1),
        )[1]

    def eval_prompt(self) -> int:
        """Version 1's evaluation campaigns need a held-out prompt; returns version 1."""
        add_prompt(session=self.session, text=f"held out {uuid.uuid4().hex[:6]}", split="eval")
        return 1

    def campaign(self) -> int:
        """A running campaign of version 1 vs 0 (the same one until someone stops it)."""
        self.eval_prompt()
        running = [c for c in list_campaigns(session=self.session, version=1) if c.status == "running"]
        if running:
            return running[0].id
        return start_campaign(session=self.session, version=1, baseline_version=0, target_votes=10).id

    def victim(self) -> int:
        return create_labeller(session=self.session, name=f"v-{uuid.uuid4().hex[:8]}").labeller.id


def _csrf(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "page has no CSRF field"
    return match.group(1)


def _caller(app: FastAPI, session: Session, kind: str) -> Caller:
    client = TestClient(app)
    csrf = _csrf(client.get("/login").text)
    if kind == ANON:
        return Caller(kind, client, csrf)
    issued = create_labeller(
        session=session, name=f"{kind}-{uuid.uuid4().hex[:6]}", role="admin" if kind == ADMIN else "annotator"
    )
    logged_in = client.post("/login", data={"csrf": csrf, "token": issued.token}, follow_redirects=False)
    assert logged_in.status_code == 303
    csrf = _csrf(client.get("/label").text)
    if kind == DEACTIVATED:
        update_labeller(session=session, labeller_id=issued.labeller.id, active=False)
        session.commit()
    return Caller(kind, client, csrf, issued.labeller, issued.token)


@pytest.fixture
def world(
    app: FastAPI,
    session: Session,
    pair_with_images: Pair,
    prompt: Prompt,
    make_pair: Callable[..., Pair],
    blob_store: LocalBlobStore,
) -> World:
    lora_sha256 = blob_store.put("loras/1.safetensors", b"not really a safetensors file")
    publish_policy_version(
        session=session, version=1, parent_version=0, lora_key="loras/1.safetensors", lora_sha256=lora_sha256
    )
    w = World(session, app, pair_with_images, prompt, make_pair)
    for kind in PRINCIPALS:
        w.callers[kind] = _caller(app, session, kind)
    session.commit()
    return w


# Each builder returns (method, url, keyword arguments for TestClient.request).
Request = tuple[str, str, dict[str, Any]]


def _api(method: str, url: str, caller: Caller, **kwargs: Any) -> Request:
    return method, url, {"headers": caller.api_headers(), **kwargs}


def _form(url: str, caller: Caller, **data: Any) -> Request:
    return "POST", url, {"data": {"csrf": caller.csrf, **data}}


BUILDERS: dict[tuple[str, str], Callable[[World, Caller], Request]] = {
    ("GET", "/api/v1/openapi.json"): lambda w, c: ("GET", "/api/v1/openapi.json", {}),
    ("GET", "/api/v1/docs"): lambda w, c: ("GET", "/api/v1/docs", {}),
    ("GET", "/static"): lambda w, c: ("GET", "/static/style.css", {}),
    ("GET", "/api/v1/health"): lambda w, c: _api("GET", "/api/v1/health", c),
    ("GET", "/api/v1/prompts"): lambda w, c: _api("GET", "/api/v1/prompts", c),
    ("POST", "/api/v1/prompts"): lambda w, c: _api(
        "POST", "/api/v1/prompts", c, json={"text": f"by {c.kind}"}
    ),
    ("GET", "/api/v1/prompts/{prompt_id}"): lambda w, c: _api("GET", f"/api/v1/prompts/{w.prompt.id}", c),
    ("PATCH", "/api/v1/prompts/{prompt_id}"): lambda w, c: _api(
        "PATCH", f"/api/v1/prompts/{w.prompt.id}", c, json={"text": f"edited by {c.kind}"}
    ),
    ("DELETE", "/api/v1/prompts/{prompt_id}"): lambda w, c: _api(
        "DELETE", f"/api/v1/prompts/{w.prompt.id}", c
    ),
    ("GET", "/api/v1/pairs/next"): lambda w, c: _api("GET", "/api/v1/pairs/next", c),
    ("GET", "/api/v1/pairs/{pair_id}"): lambda w, c: _api("GET", f"/api/v1/pairs/{w.pair.id}", c),
    ("PUT", "/api/v1/pairs/{pair_id}/gold"): lambda w, c: _api(
        "PUT", f"/api/v1/pairs/{w.pair.id}/gold", c, json={"answer": "a"}
    ),
    ("GET", "/api/v1/pairs/{pair_id}/images/{side}"): lambda w, c: _api(
        "GET", f"/api/v1/pairs/{w.pair.id}/images/a", c
    ),
    ("POST", "/api/v1/judgements"): lambda w, c: _api(
        "POST",
        "/api/v1/judgements",
        c,
        json={"pair_id": w.leased_pair(c), "choice": "b", "client_key": uuid.uuid4().hex},
    ),
    ("DELETE", "/api/v1/judgements/{judgement_id}"): lambda w, c: _api(
        "DELETE", f"/api/v1/judgements/{w.judgement(c)}", c
    ),
    ("GET", "/api/v1/me"): lambda w, c: _api("GET", "/api/v1/me", c),
    ("GET", "/api/v1/policies"): lambda w, c: _api("GET", "/api/v1/policies", c),
    ("GET", "/api/v1/policies/current"): lambda w, c: _api("GET", "/api/v1/policies/current", c),
    ("PUT", "/api/v1/policies/current"): lambda w, c: _api(
        "PUT", "/api/v1/policies/current", c, json={"version": 0}
    ),
    ("GET", "/api/v1/policies/{version}/lora.safetensors"): lambda w, c: _api(
        "GET", "/api/v1/policies/1/lora.safetensors", c
    ),
    ("GET", "/api/v1/policies/{version}/evaluation"): lambda w, c: _api(
        "GET", "/api/v1/policies/1/evaluation", c
    ),
    ("GET", "/api/v1/evaluations"): lambda w, c: _api("GET", "/api/v1/evaluations", c),
    ("POST", "/api/v1/evaluations"): lambda w, c: _api(
        "POST", "/api/v1/evaluations", c, json={"version": w.eval_prompt(), "target_votes": 10}
    ),
    ("GET", "/api/v1/evaluations/scores"): lambda w, c: _api("GET", "/api/v1/evaluations/scores", c),
    ("GET", "/api/v1/evaluations/{campaign_id}"): lambda w, c: _api(
        "GET", f"/api/v1/evaluations/{w.campaign()}", c
    ),
    ("POST", "/api/v1/evaluations/{campaign_id}/stop"): lambda w, c: _api(
        "POST", f"/api/v1/evaluations/{w.campaign()}/stop", c
    ),
    ("GET", "/api/v1/stats"): lambda w, c: _api("GET", "/api/v1/stats", c),
    ("GET", "/api/v1/export"): lambda w, c: _api("GET", "/api/v1/export", c),
    ("POST", "/api/v1/invites"): lambda w, c: _api(
        "POST", "/api/v1/invites", c, json={"name": f"invited by {c.kind}"}
    ),
    ("GET", "/api/v1/labellers"): lambda w, c: _api("GET", "/api/v1/labellers", c),
    ("PATCH", "/api/v1/labellers/{labeller_id}"): lambda w, c: _api(
        "PATCH", f"/api/v1/labellers/{w.victim()}", c, json={"active": False}
    ),
    ("GET", "/"): lambda w, c: ("GET", "/", {}),
    ("GET", "/invite/{secret}"): lambda w, c: ("GET", f"/invite/{w.invite_secret()}", {}),
    ("POST", "/invite/{secret}"): lambda w, c: _form(f"/invite/{w.invite_secret()}", c),
    ("GET", "/login"): lambda w, c: ("GET", "/login", {}),
    ("POST", "/login"): lambda w, c: _form("/login", c, token=c.token or ""),
    ("POST", "/logout"): lambda w, c: _form("/logout", c),
    ("GET", "/label"): lambda w, c: ("GET", "/label", {}),
    ("GET", "/guidelines"): lambda w, c: ("GET", "/guidelines", {}),
    ("GET", "/admin"): lambda w, c: ("GET", "/admin", {}),
    ("POST", "/admin/policies/current"): lambda w, c: _form("/admin/policies/current", c, version="0"),
    ("POST", "/admin/evaluations"): lambda w, c: _form(
        "/admin/evaluations", c, version=str(w.eval_prompt()), baseline_version="0", target_votes="10"
    ),
    ("POST", "/admin/evaluations/{campaign_id}/stop"): lambda w, c: _form(
        f"/admin/evaluations/{w.campaign()}/stop", c
    ),
    ("GET", "/admin/prompts"): lambda w, c: ("GET", "/admin/prompts", {}),
    ("POST", "/admin/prompts"): lambda w, c: _form("/admin/prompts", c, text=f"form by {c.kind}"),
    ("POST", "/admin/prompts/import"): lambda w, c: (
        "POST",
        "/admin/prompts/import",
        {"data": {"csrf": c.csrf}, "files": {"file": ("p.txt", f"imported by {c.kind}\n".encode())}},
    ),
    ("POST", "/admin/prompts/{prompt_id}/active"): lambda w, c: _form(
        f"/admin/prompts/{w.prompt.id}/active", c, active="false"
    ),
    ("GET", "/admin/labellers"): lambda w, c: ("GET", "/admin/labellers", {}),
    ("POST", "/admin/labellers/invite"): lambda w, c: _form("/admin/labellers/invite", c, name=f"f-{c.kind}"),
    ("POST", "/admin/labellers/{labeller_id}/active"): lambda w, c: _form(
        f"/admin/labellers/{w.victim()}/active", c, active="false"
    ),
}


def snapshot(session: Session) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, in primary-key order."""
    session.expire_all()
    return {
        table.name: [tuple(row) for row in session.execute(select(table).order_by(*table.primary_key))]
        for table in Base.metadata.sorted_tables
    }


def test_every_route_has_a_builder() -> None:
    assert BUILDERS.keys() == EXPECTED.keys()


@pytest.mark.parametrize("route", sorted(EXPECTED), ids=lambda r: f"{r[0]} {r[1]}")
def test_matrix(world: World, route: tuple[str, str]) -> None:
    for kind in PRINCIPALS:
        caller = world.callers[kind]
        method, url, kwargs = BUILDERS[route](world, caller)
        world.session.commit()
        before = snapshot(world.session)
        response = caller.client.request(method, url, follow_redirects=False, **kwargs)
        expected = EXPECTED[route][kind]
        status, location = expected if isinstance(expected, tuple) else (expected, None)
        got = (response.status_code, response.headers.get("location"))
        assert got == (status, location), f"{kind} {method} {url}: {got} {response.text[:300]}"
        # A redirect to /login refuses, except a logged-in caller's logout: that succeeds, and writes
        # (it ends the account's sessions; tests/app/test_sessions.py).
        logged_out = route == ("POST", "/logout") and kind in (ANNOTATOR, ADMIN)
        if status >= 400 or (location == "/login" and not logged_out):
            assert snapshot(world.session) == before, f"{kind} {method} {url} was refused but wrote"
