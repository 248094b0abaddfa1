"""Every bad input gets a 4xx whose detail names the problem, and writes nothing."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from core.db.models import Judgement, Labeller, Lease, Pair, Prompt
from tests.app.conftest import count


@pytest.fixture
def leased(annotator: tuple[TestClient, Labeller], pair: Pair) -> tuple[TestClient, Pair]:
    api, _ = annotator
    assert api.get("/api/v1/pairs/next").json()["pair"]["pair_id"] == pair.id
    return api, pair


def _post(api: TestClient, **body: object) -> tuple[int, str]:
    response = api.post("/api/v1/judgements", json=body)
    return response.status_code, response.json()["detail"]


def test_unknown_pair(leased: tuple[TestClient, Pair], session: Session) -> None:
    api, _ = leased
    assert _post(api, pair_id=987654, choice="a", client_key="unknown-pair") == (
        404,
        "pair 987654 does not exist; ask GET /api/v1/pairs/next for a pair to judge",
    )
    assert count(session, Judgement) == 0


def test_pair_not_leased_to_you(
    leased: tuple[TestClient, Pair], as_labeller: Callable[..., tuple[TestClient, Labeller]], session: Session
) -> None:
    _, pair = leased
    other, who = as_labeller()
    status, detail = _post(other, pair_id=pair.id, choice="a", client_key="not-leased")
    assert status == 403 and f"pair {pair.id} is not leased to labeller {who.id}" in detail
    assert count(session, Judgement) == 0 and count(session, Lease) == 1


def test_choice_outside_a_b_tie_skip(leased: tuple[TestClient, Pair], session: Session) -> None:
    api, pair = leased
    status, detail = _post(api, pair_id=pair.id, choice="left", client_key="bad-choice")
    assert status == 422 and detail.startswith("choice: Input should be 'a', 'b', 'tie' or 'skip'")
    assert count(session, Judgement) == 0


def test_malformed_json(leased: tuple[TestClient, Pair], session: Session) -> None:
    api, _ = leased
    response = api.post(
        "/api/v1/judgements",
        content=b'{"pair_id": 1, "choice": ',
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 422 and response.json()["detail"].startswith("malformed JSON body")
    assert count(session, Judgement) == 0


def test_oversized_body(leased: tuple[TestClient, Pair], session: Session) -> None:
    api, pair = leased
    huge = {"pair_id": pair.id, "choice": "a", "client_key": "big-body-1", "pad": "x" * 20_000}
    response = api.post("/api/v1/judgements", json=huge)
    assert response.status_code == 413 and "exceeds the limit of 10000 bytes" in response.json()["detail"]

    def chunks():  # no Content-Length: the limit must hold for streamed bodies too
        yield b'{"pad": "'
        yield b"x" * 20_000
        yield b'"}'

    streamed = api.post("/api/v1/judgements", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413
    assert count(session, Judgement) == 0


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ({}, "not authenticated"),
        ({"Authorization": "Bearer not-a-real-token"}, "bearer token is unknown"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "Authorization header must be 'Bearer <token>'"),
    ],
)
def test_missing_or_wrong_token(
    app: object, pair: Pair, session: Session, headers: dict[str, str], detail: str
) -> None:
    client = TestClient(app, headers=headers)  # type: ignore[arg-type]
    for response in (
        client.get("/api/v1/pairs/next"),
        client.post(
            "/api/v1/judgements", json={"pair_id": pair.id, "choice": "a", "client_key": "no-token-1"}
        ),
    ):
        assert response.status_code == 401 and detail in response.json()["detail"]
        assert response.headers["www-authenticate"] == "Bearer"
    assert count(session, Judgement) == 0 and count(session, Lease) == 0


def test_deactivated_labeller_token_stops_working(
    annotator: tuple[TestClient, Labeller], admin_client: TestClient
) -> None:
    api, labeller = annotator
    assert admin_client.patch(f"/api/v1/labellers/{labeller.id}", json={"active": False}).status_code == 200
    assert api.get("/api/v1/me").status_code == 401


def test_annotator_on_admin_endpoints(annotator: tuple[TestClient, Labeller], session: Session) -> None:
    api, labeller = annotator
    before = count(session, Prompt)
    for response in (
        api.post("/api/v1/prompts", json={"text": "sneaky"}),
        api.get("/api/v1/stats"),
        api.get("/api/v1/export"),
        api.post("/api/v1/invites", json={"name": "mallory"}),
        api.put("/api/v1/policies/current", json={"version": 0}),
    ):
        assert response.status_code == 403
        assert (
            response.json()["detail"]
            == f"labeller {labeller.name!r} is not an admin; this needs admin rights"
        )
    assert count(session, Prompt) == before


def test_bad_prompt_input(admin_client: TestClient, session: Session) -> None:
    before = count(session, Prompt)
    blank = admin_client.post("/api/v1/prompts", json={"text": "   "})
    assert blank.status_code == 422 and "prompt text is empty" in blank.json()["detail"]
    split = admin_client.post("/api/v1/prompts", json={"text": "ok", "split": "test"})
    assert split.status_code == 422 and split.json()["detail"].startswith(
        "split: Input should be 'train' or 'eval'"
    )
    missing = admin_client.patch("/api/v1/prompts/424242", json={"active": False})
    assert missing.status_code == 404 and "prompt 424242 does not exist" in missing.json()["detail"]
    assert count(session, Prompt) == before


def test_client_key_reused_for_other_judgement_is_409(
    leased: tuple[TestClient, Pair], session: Session
) -> None:
    api, pair = leased
    first = api.post(
        "/api/v1/judgements", json={"pair_id": pair.id, "choice": "a", "client_key": "reused-key"}
    )
    assert first.status_code == 201
    status, detail = _post(api, pair_id=pair.id, choice="b", client_key="reused-key")
    assert status == 409 and "'reused-key' was already used" in detail
    assert count(session, Judgement) == 1


def test_bad_exclude_and_unknown_version(annotator: tuple[TestClient, Labeller]) -> None:
    api, _ = annotator
    response = api.get("/api/v1/pairs/next", params={"exclude": "1,x"})
    assert response.status_code == 422 and "comma-separated pair ids" in response.json()["detail"]
    missing = api.get("/api/v1/policies/99/lora.safetensors")
    assert missing.status_code == 404 and "policy version 99 does not exist" in missing.json()["detail"]


def test_out_of_range_ids_and_nul_text_are_4xx(
    annotator: tuple[TestClient, Labeller], admin_client: TestClient, session: Session
) -> None:
    api, _ = annotator
    big = 2**40
    status, detail = _post(api, pair_id=big, choice="a", client_key="huge-id-1")
    assert status == 422 and detail.startswith("pair_id: Input should be less than or equal to 2147483647")
    assert api.get(f"/api/v1/prompts/{big}").status_code == 422
    assert api.get(f"/api/v1/pairs/{big}/images/a").status_code == 422
    assert api.get(f"/api/v1/pairs/next?exclude={big}").status_code == 422
    assert admin_client.patch(f"/api/v1/labellers/{big}", json={"active": False}).status_code == 422
    nul = admin_client.post("/api/v1/prompts", json={"text": "a\x00b"})
    assert nul.status_code == 422 and "NUL" in nul.json()["detail"]
    assert count(session, Judgement) == 0
