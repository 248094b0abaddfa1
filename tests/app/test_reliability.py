"""Gold pairs and labeller abilities through the API and the labellers page: an admin marks known
answers, labellers vote through /pairs/next and /judgements, and the ability each gets says who
votes against the answers; bad marks are refused with the value named."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from core.db.models import Labeller, Pair
from core.db.reliability import fit_labellers, store_abilities
from core.settings import Settings
from tests.app.test_pages import _accept_invite


def vote_all(api: TestClient, choose: Callable[[int], str], key: str) -> int:
    """Judge every pair the labeller is served; `choose(pair_id)` gives the side. Returns the count."""
    done = 0
    while (served := api.get("/api/v1/pairs/next").json()["pair"]) is not None:
        body = {
            "pair_id": served["pair_id"],
            "choice": choose(served["pair_id"]),
            "client_key": f"{key}-key-{done:04d}",
        }
        assert api.post("/api/v1/judgements", json=body).status_code == 201
        done += 1
    return done


def test_gold_pairs_measure_each_labellers_ability(
    client: TestClient,
    session: Session,
    as_labeller: Callable[..., tuple[TestClient, Labeller]],
    make_pair: Callable[..., Pair],
) -> None:
    admin, _ = as_labeller("admin", name="root")
    pairs = [make_pair(required=1) for _ in range(8)]
    # the first six get a known answer (a for even ids, b for odd) and are shown to three labellers
    answers = {p.id: "a" if p.id % 2 == 0 else "b" for p in pairs[:6]}
    for pair_id, answer in answers.items():
        marked = admin.put(f"/api/v1/pairs/{pair_id}/gold", json={"answer": answer, "judgements": 3})
        assert marked.status_code == 200, marked.text
        assert (marked.json()["gold"], marked.json()["required_judgements"]) == (answer, 3)

    def flip(side: str) -> str:
        return "b" if side == "a" else "a"

    good1, l1 = as_labeller(name="good1")
    good2, l2 = as_labeller(name="good2")
    bad, l3 = as_labeller(name="contrarian")
    assert vote_all(good1, lambda p: answers.get(p, "a"), "g1-") == 8
    assert vote_all(good2, lambda p: answers.get(p, "a"), "g2-") == 6  # the two ordinary pairs are done
    assert vote_all(bad, lambda p: flip(answers.get(p, "a")), "b-") == 6

    stats = {row["name"]: row for row in admin.get("/api/v1/stats").json()["labellers"]}
    for name in ("good1", "good2"):
        assert stats[name]["ability"] > 0.8 and stats[name]["gold_votes"] == 6
        assert stats[name]["ability_low"] < stats[name]["ability"] < stats[name]["ability_high"]
    assert stats["contrarian"]["ability"] < 0.2 and stats["contrarian"]["ability_votes"] == 6
    # good1's votes on the two ordinary pairs nobody else decided inform nothing
    assert stats["good1"]["ability_votes"] == 6
    assert stats["root"]["ability"] is None and stats["root"]["ability_votes"] == 0

    # the labellers page shows it
    _accept_invite(client, session, name="pagereader", role="admin")
    page = client.get("/admin/labellers")
    assert page.status_code == 200 and "ability (95%)" in page.text
    assert "6 votes, 6 gold" in page.text

    # unmarking keeps the votes but no longer scores against the answer
    assert admin.put(f"/api/v1/pairs/{pairs[0].id}/gold", json={"answer": None}).json()["gold"] is None
    assert {r["name"]: r for r in admin.get("/api/v1/stats").json()["labellers"]}["good1"]["gold_votes"] == 5
    del l1, l2, l3


def test_bad_gold_marks_are_refused(
    as_labeller: Callable[..., tuple[TestClient, Labeller]], pair: Pair, session: Session
) -> None:
    admin, _ = as_labeller("admin")
    annotator, _ = as_labeller()
    wrong = admin.put(f"/api/v1/pairs/{pair.id}/gold", json={"answer": "c"})
    assert wrong.status_code == 422 and "answer" in wrong.text
    low = admin.put(f"/api/v1/pairs/{pair.id}/gold", json={"answer": "a", "judgements": 0})
    assert low.status_code == 422 and "judgements" in low.text
    assert admin.put("/api/v1/pairs/999999/gold", json={"answer": "a"}).status_code == 404
    assert annotator.put(f"/api/v1/pairs/{pair.id}/gold", json={"answer": "a"}).status_code == 403
    session.expire_all()
    row = session.get_one(Pair, pair.id)
    assert row.gold is None and row.required_judgements == 1


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The app's test settings (tests/app/conftest.py) with pausing on: below 60% (upper end), after 5
    measured votes."""
    return settings.model_copy(
        update={
            "reliability": settings.reliability.model_copy(update={"pause_below": 0.6, "pause_min_votes": 5})
        }
    )


def test_a_labeller_below_the_threshold_is_paused_and_loses_nothing(
    app: FastAPI,
    client: TestClient,
    session: Session,
    as_labeller: Callable[..., tuple[TestClient, Labeller]],
    make_pair: Callable[..., Pair],
) -> None:
    admin, _ = as_labeller("admin", name="root")
    for _ in range(8):
        pair = make_pair(required=2)
        assert admin.put(f"/api/v1/pairs/{pair.id}/gold", json={"answer": "a"}).status_code == 200
    good, _ = as_labeller(name="good")
    bad, bad_row = as_labeller(name="contrarian")
    assert vote_all(good, lambda p: "a", "good") == 8
    assert vote_all(bad, lambda p: "b", "bad") == 8
    extra = make_pair(required=2)
    held = bad.get("/api/v1/pairs/next").json()["pair"]  # a lease taken before the pause
    assert held["pair_id"] == extra.id

    # nothing measured yet: still served. The trainer's refresh stores the fit (every 60 s by default).
    assert store_abilities(session=session, fit=fit_labellers(session=session)) == 2
    session.commit()
    row = session.get_one(Labeller, bad_row.id)
    assert row.ability is not None and row.ability_high is not None and row.ability_high < 0.6
    assert row.ability_votes == 8
    # the trainer commits in its own process: the app sees it once its labeller cache (5 s) expires
    app.state.labeller_cache.forget([bad_row.id])

    paused = bad.get("/api/v1/pairs/next").json()
    assert paused["pair"] is None and paused["paused"] is True and "paused" in paused["message"]
    # the judgement of the pair leased before the pause is still taken, and nothing is lost
    body = {"pair_id": held["pair_id"], "choice": "a", "client_key": "held-before-pause-1"}
    assert bad.post("/api/v1/judgements", json=body).status_code == 201
    stats = {r["name"]: r for r in admin.get("/api/v1/stats").json()["labellers"]}
    assert stats["contrarian"]["judgements"] == 9
    # the reliable labeller goes on as before
    served = good.get("/api/v1/pairs/next").json()
    assert served["paused"] is False and served["pair"]["pair_id"] == extra.id
    # and the labellers page says who is paused
    _accept_invite(client, session, name="pagereader", role="admin")
    page = client.get("/admin/labellers").text
    assert page.count("(paused: low reliability)") == 1
    row_html = page[page.index("<td>contrarian</td>") :]
    assert row_html.index("(paused: low reliability)") < row_html.index("</tr>")
