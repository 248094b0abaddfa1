"""Evaluation campaigns through the REST API: blind pairs, the programmatic labeller, results and scores."""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy.orm import Session

from core.db.campaigns import create_eval_pair, start_campaign
from core.db.models import EvalCampaign, Labeller, Pair, PolicyVersion, Prompt
from core.db.pairs import create_trajectory
from core.db.policies import publish_policy_version
from core.db.prompts import add_prompt
from core.storage import LocalBlobStore
from densealign.labeller import label_loop
from tests.app.conftest import png_bytes


def noisy_png(seed: int, size: int = 32) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def eval_prompts(session: Session, policy_version: PolicyVersion) -> list[Prompt]:
    publish_policy_version(session=session, version=1, parent_version=0, lora_key="l/1", lora_sha256="0" * 64)
    return [add_prompt(session=session, text=f"a red circle number {i}", split="eval") for i in range(4)]


@pytest.fixture
def make_campaign(
    session: Session, eval_prompts: list[Prompt], blob_store: LocalBlobStore
) -> Callable[[int], EvalCampaign]:
    """A campaign of version 1 vs 0 with `n` pairs: version 1's images are flat (a compressibility judge
    prefers them), version 0's are noise."""

    def make(n: int) -> EvalCampaign:
        campaign = start_campaign(session=session, version=1, baseline_version=0, target_votes=n)
        rng = random.Random(5)
        for i in range(n):
            seed = rng.getrandbits(40)
            rows = []
            for version in (1, 0):
                key = f"images/eval/{i}-{version}.png"
                blob_store.put(key, png_bytes((200, 30, 30), 32) if version == 1 else noisy_png(seed))
                rows.append(
                    create_trajectory(
                        session=session,
                        prompt_id=eval_prompts[i % len(eval_prompts)].id,
                        policy_version=version,
                        seed=seed,
                        image_key=key,
                    )
                )
            create_eval_pair(
                session=session,
                campaign_id=campaign.id,
                version_trajectory_id=rows[0].id,
                baseline_trajectory_id=rows[1].id,
                rng=rng,
            )
        return campaign

    return make


def run_labeller(client: TestClient, noise: float, seed: int) -> int:
    token = client.headers["Authorization"].removeprefix("Bearer ")
    return label_loop(
        base_url="http://testserver",
        token=token,
        client=client,
        preference="compressibility",
        noise=noise,
        seed=seed,
        idle_wait=0,
        name="judge",
    )


def test_a_labeller_that_prefers_the_version_shows_it_wins(
    make_campaign: Callable[[int], EvalCampaign], as_labeller: Callable[..., tuple[TestClient, Labeller]]
) -> None:
    campaign = make_campaign(40)
    client, _ = as_labeller()
    assert run_labeller(client, noise=0.0, seed=0) == 40
    body = client.get(f"/api/v1/evaluations/{campaign.id}").json()
    assert (body["votes"], body["wins"], body["status"]) == (40, 40, "done")
    assert body["low"] > 0.5 and body["verdict"] == "better"
    assert body["summary"].startswith("version 1 is preferred to version 0: 100% of 40 votes")
    admin, _ = as_labeller("admin")
    rows = [json.loads(line) for line in admin.get("/api/v1/export").text.splitlines()]
    assert [(r["kind"], r["campaign_id"]) for r in rows] == [("eval", campaign.id)] * 40
    assert all(
        {r["policy_version_a"], r["policy_version_b"]} == {0, 1} and r["seed_a"] == r["seed_b"] for r in rows
    )
    scores = {s["version"]: s for s in client.get("/api/v1/evaluations/scores").json()}
    assert scores[0]["score"] == 0.0 and scores[1]["low"] > 0 and scores[1]["win_rate_vs_base"] > 0.9


def test_a_labeller_answering_at_random_leaves_it_undecided(
    make_campaign: Callable[[int], EvalCampaign], as_labeller: Callable[..., tuple[TestClient, Labeller]]
) -> None:
    campaign = make_campaign(40)
    client, _ = as_labeller()
    assert run_labeller(client, noise=0.5, seed=1) == 40
    body = client.get("/api/v1/policies/1/evaluation").json()
    (result,) = body["campaigns"]
    assert result["id"] == campaign.id and result["votes"] == 40
    assert result["low"] < 0.5 < result["high"] and result["verdict"] == "undecided"
    assert "the interval includes 50%" in result["summary"]


def test_eval_and_training_pairs_look_the_same(
    session: Session,
    make_campaign: Callable[[int], EvalCampaign],
    pair_with_images: Pair,
    as_labeller: Callable[..., tuple[TestClient, Labeller]],
) -> None:
    make_campaign(1)
    client, _ = as_labeller()
    served = []
    for _ in range(2):
        pair = client.get(
            "/api/v1/pairs/next", params={"exclude": ",".join(str(p["pair_id"]) for p in served)}
        )
        served.append(pair.json()["pair"])
    kinds = {session.get_one(Pair, p["pair_id"]).kind for p in served}
    assert kinds == {"train", "eval"}
    train, evaluation = sorted(served, key=lambda p: session.get_one(Pair, p["pair_id"]).kind != "train")
    assert set(train) == set(evaluation)
    assert {k: type(v) for k, v in train.items()} == {k: type(v) for k, v in evaluation.items()}
    for side in ("left", "right"):
        assert set(train[side]) == set(evaluation[side])
        assert (
            evaluation[side]["url"]
            == f"/api/v1/pairs/{evaluation['pair_id']}/images/{evaluation[side]['side']}"
        )


def test_admin_starts_and_stops_campaigns(
    eval_prompts: list[Prompt],
    admin_client: TestClient,
    as_labeller: Callable[..., tuple[TestClient, Labeller]],
) -> None:
    annotator, _ = as_labeller()
    body = {"version": 1, "baseline_version": 0, "target_votes": 30}
    assert annotator.post("/api/v1/evaluations", json=body).status_code == 403
    created = admin_client.post("/api/v1/evaluations", json=body)
    assert created.status_code == 201, created.text
    campaign = created.json()
    assert (campaign["status"], campaign["origin"], campaign["votes"], campaign["verdict"]) == (
        "running",
        "admin",
        0,
        "no votes",
    )
    again = admin_client.post("/api/v1/evaluations", json=body)
    assert again.status_code == 409 and f"campaign {campaign['id']} " in again.json()["detail"]
    missing = admin_client.post("/api/v1/evaluations", json={**body, "version": 7})
    assert missing.status_code == 404 and "policy version 7" in missing.json()["detail"]
    no_prompts = admin_client.post("/api/v1/evaluations", json={**body, "prompt_split": "train"})
    assert (
        no_prompts.status_code == 409 and "no active prompts of split 'train'" in no_prompts.json()["detail"]
    )
    stopped = admin_client.post(f"/api/v1/evaluations/{campaign['id']}/stop")
    assert stopped.status_code == 200 and stopped.json()["status"] == "stopped"
    assert admin_client.post(f"/api/v1/evaluations/{campaign['id']}/stop").status_code == 409
    assert [c["status"] for c in admin_client.get("/api/v1/evaluations").json()] == ["stopped"]
    assert admin_client.get("/api/v1/evaluations/999999").status_code == 404


def test_dashboard_charts_campaigns_and_the_forms_work(
    client: TestClient,
    session: Session,
    make_campaign: Callable[[int], EvalCampaign],
    as_labeller: Callable[..., tuple[TestClient, Labeller]],
) -> None:
    from tests.app.test_pages import _accept_invite, _csrf

    _accept_invite(client, session, name="root", role="admin")
    empty = client.get("/admin")
    assert "no evaluation votes yet" in empty.text and 'id="eval-no-prompts"' not in empty.text
    campaign = make_campaign(8)
    labeller_client, _ = as_labeller()
    assert run_labeller(labeller_client, noise=0.0, seed=0) == 8
    page = client.get("/admin").text
    assert f"<title>v1 vs v0 (#{campaign.id}): 100% [" in page
    assert "version 1 is preferred to version 0: 100% of 8 votes" in page
    assert '<table id="eval-scores">' in page
    # start a campaign of version 1 against itself from the form, then stop it
    csrf = _csrf(page)
    form = {
        "csrf": csrf,
        "version": "1",
        "baseline_version": "1",
        "target_votes": "20",
        "prompt_split": "eval",
    }
    started = client.post("/admin/evaluations", data=form, follow_redirects=False)
    assert started.status_code == 303 and started.headers["location"] == "/admin#evaluation"
    (running,) = [c for c in client.get("/api/v1/evaluations").json() if c["status"] == "running"]
    assert (running["version"], running["baseline_version"], running["target_votes"]) == (1, 1, 20)
    refused = client.post("/admin/evaluations", data={**form, "prompt_split": "train"})
    assert refused.status_code == 409 and "no active prompts of split &#39;train&#39;" in refused.text
    stopped = client.post(
        f"/admin/evaluations/{running['id']}/stop", data={"csrf": csrf}, follow_redirects=False
    )
    assert stopped.status_code == 303
    assert client.get(f"/api/v1/evaluations/{running['id']}").json()["status"] == "stopped"
    assert client.post(f"/admin/evaluations/{running['id']}/stop", data={"csrf": "wrong"}).status_code == 403
