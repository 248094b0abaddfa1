from __future__ import annotations

import hashlib
import io
import json

from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy.orm import Session

from core.db.models import Judgement, Labeller, Pair, PolicyVersion, Prompt, Trajectory
from core.db.pairs import create_pair, create_trajectory
from core.db.policies import publish_policy_version
from core.storage import LocalBlobStore
from tests.app.conftest import count


def test_health_needs_no_token(client: TestClient) -> None:
    assert client.get("/api/v1/health").json() == {"status": "ok", "database": "ok"}


def test_openapi_lists_the_api(client: TestClient) -> None:
    paths = client.get("/api/v1/openapi.json").json()["paths"]
    for path in ("/api/v1/pairs/next", "/api/v1/judgements", "/api/v1/policies/current", "/api/v1/export"):
        assert path in paths


def test_next_pair_then_judge_then_pool_empty(
    annotator: tuple[TestClient, Labeller], pair_with_images: Pair, session: Session
) -> None:
    api, labeller = annotator
    got = api.get("/api/v1/pairs/next").json()["pair"]
    assert got["pair_id"] == pair_with_images.id and got["prompt"] == "a red cube on a blue table"
    assert {got["left"]["side"], got["right"]["side"]} == {"a", "b"}
    image = api.get(got["left"]["url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    red_or_blue = Image.open(io.BytesIO(image.content)).getpixel((0, 0))
    assert red_or_blue == ((255, 0, 0) if got["left"]["side"] == "a" else (0, 0, 255))
    posted = api.post(
        "/api/v1/judgements",
        json={
            "pair_id": got["pair_id"],
            "choice": got["right"]["side"],
            "client_key": "key-00000001",
            "decide_ms": 900,
        },
    )
    assert posted.status_code == 201, posted.text
    body = posted.json()
    assert (body["choice"], body["shown_left"], body["labeller_id"]) == (
        got["right"]["side"],
        got["left"]["side"],
        labeller.id,
    )
    empty = api.get("/api/v1/pairs/next").json()
    assert empty["pair"] is None and "No pairs are waiting" in empty["message"]
    assert api.get("/api/v1/me").json()["total"] == 1


def test_judgement_post_is_idempotent(
    annotator: tuple[TestClient, Labeller], pair: Pair, session: Session
) -> None:
    api, _ = annotator
    api.get("/api/v1/pairs/next")
    body = {"pair_id": pair.id, "choice": "tie", "client_key": "same-key-123"}
    first, second = api.post("/api/v1/judgements", json=body), api.post("/api/v1/judgements", json=body)
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["id"] == second.json()["id"] and count(session, Judgement) == 1


def test_undo_within_window(annotator: tuple[TestClient, Labeller], pair: Pair, session: Session) -> None:
    api, _ = annotator
    left = api.get("/api/v1/pairs/next").json()["pair"]["left"]["side"]
    made = api.post(
        "/api/v1/judgements", json={"pair_id": pair.id, "choice": "a", "client_key": "undo-me-1"}
    ).json()
    back = api.delete(f"/api/v1/judgements/{made['id']}")
    assert (
        back.status_code == 200 and back.json()["pair_id"] == pair.id and back.json()["left"]["side"] == left
    )
    assert count(session, Judgement) == 0


def test_prompts_crud(
    admin_client: TestClient, annotator: tuple[TestClient, Labeller], session: Session
) -> None:
    created = admin_client.post("/api/v1/prompts", json={"text": "  a  lighthouse at dusk ", "split": "eval"})
    assert created.status_code == 201
    prompt_id = created.json()["id"]
    assert created.json()["text"] == "a lighthouse at dusk"
    api, _ = annotator
    assert api.get(f"/api/v1/prompts/{prompt_id}").json()["split"] == "eval"
    patched = admin_client.patch(f"/api/v1/prompts/{prompt_id}", json={"text": "a lighthouse at dawn"})
    assert patched.json()["text"] == "a lighthouse at dawn"
    assert admin_client.delete(f"/api/v1/prompts/{prompt_id}").json()["active"] is False
    listed = api.get("/api/v1/prompts", params={"active": "false"}).json()
    assert [p["id"] for p in listed] == [prompt_id]


def test_policies_current_rollback_and_lora_download(
    admin_client: TestClient, policy_version: object, session: Session, blob_store: LocalBlobStore
) -> None:
    data = b"safetensors-bytes"
    digest = blob_store.put("policies/1/lora.safetensors", data)
    publish_policy_version(
        session=session,
        version=1,
        parent_version=0,
        lora_key="policies/1/lora.safetensors",
        lora_sha256=digest,
        metrics={"win_rate": 0.61},
    )
    assert admin_client.get("/api/v1/policies/current").json()["version"] == 1
    listed = admin_client.get("/api/v1/policies").json()
    assert isinstance(listed, list), listed
    assert [(p["version"], p["current"]) for p in listed] == [(0, False), (1, True)]
    lora = admin_client.get("/api/v1/policies/1/lora.safetensors")
    assert lora.status_code == 200 and lora.content == data
    assert lora.headers["x-content-sha256"] == hashlib.sha256(data).hexdigest()
    base = admin_client.get("/api/v1/policies/0/lora.safetensors")
    assert base.status_code == 404 and "base model" in base.json()["detail"]
    assert admin_client.put("/api/v1/policies/current", json={"version": 0}).json()["version"] == 0
    assert admin_client.get("/api/v1/policies/current").json()["version"] == 0


def test_stats_and_export(
    admin_client: TestClient, annotator: tuple[TestClient, Labeller], pair: Pair, session: Session
) -> None:
    api, labeller = annotator
    assert admin_client.get("/api/v1/stats").json()["queue_depth"] == 1
    api.get("/api/v1/pairs/next")
    api.post("/api/v1/judgements", json={"pair_id": pair.id, "choice": "b", "client_key": "export-key-1"})
    stats = admin_client.get("/api/v1/stats").json()
    assert (stats["queue_depth"], stats["judgements_total"], stats["labels_per_hour"][-1]) == (0, 1, 1)
    mine = next(row for row in stats["labellers"] if row["labeller_id"] == labeller.id)
    assert mine["judgements"] == 1
    exported = admin_client.get("/api/v1/export")
    assert exported.headers["content-type"].startswith("application/x-ndjson")
    rows = [json.loads(line) for line in exported.text.splitlines()]
    assert len(rows) == 1
    row = rows[0]
    assert (row["choice"], row["labeller_id"], row["policy_version"], row["prompt"]) == (
        "b",
        labeller.id,
        0,
        session.get_one(Prompt, pair.prompt_id).text,
    )
    assert row["image_a_url"] == f"http://testserver/api/v1/pairs/{pair.id}/images/a"
    a, b = (
        session.get_one(Trajectory, pair.trajectory_a_id),
        session.get_one(Trajectory, pair.trajectory_b_id),
    )
    assert (row["trajectory_a_id"], row["seed_a"], row["sampler_a"]) == (a.id, a.seed, {"steps": 2})
    assert (row["trajectory_b_id"], row["seed_b"], row["sampler_b"]) == (b.id, b.seed, {"steps": 2})


# What worker/sampling.py records for a trajectory drawn with the shipped model on CPU.
SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "thresholding": False,
    "timestep_spacing": "leading",
}
WORKER_RECORD = {
    "num_steps": 20,
    "guidance_scale": 7.5,
    "eta": 1.0,
    "height": 64,
    "width": 64,
    "negative_prompt": None,
    "reduction": "mean",
    "base_model": "models/densealign-shapes",
    "pipeline": "StableDiffusionPipeline",
    "dtype": "float32",
    "generator_device": "cpu",
    "scheduler": {"class_name": "DDIMScheduler", "config": SCHEDULER_CONFIG},
    "adapter_fused": True,
}


def test_pair_sampling_record(
    admin_client: TestClient,
    annotator: tuple[TestClient, Labeller],
    policy_version: PolicyVersion,
    prompt: Prompt,
    session: Session,
) -> None:
    seeds = (2**63 - 1, 7)  # seeds are 63-bit: the largest must come back exactly
    a, b = (
        create_trajectory(
            session=session,
            prompt_id=prompt.id,
            policy_version=0,
            seed=seed,
            image_key=f"images/{seed}.png",
            sampler=WORKER_RECORD,
        )
        for seed in seeds
    )
    pair = create_pair(session=session, trajectory_a_id=a.id, trajectory_b_id=b.id, required=3)
    session.commit()
    api, _ = annotator
    api.get("/api/v1/pairs/next")
    api.post("/api/v1/judgements", json={"pair_id": pair.id, "choice": "a", "client_key": "record-key-1"})

    body = admin_client.get(f"/api/v1/pairs/{pair.id}").json()
    assert body["id"] == pair.id and body["prompt"] == {"id": prompt.id, "text": "a red cube on a blue table"}
    assert (body["policy_version"], body["required_judgements"], body["judgement_count"]) == (0, 3, 1)
    for side, trajectory, seed in (("a", a, seeds[0]), ("b", b, seeds[1])):
        got = body[side]
        assert (got["trajectory_id"], got["seed"], got["policy_version"]) == (trajectory.id, seed, 0)
        assert got["image_url"] == f"/api/v1/pairs/{pair.id}/images/{side}"
        assert got["sampler"] == {k: v for k, v in WORKER_RECORD.items() if k != "reduction"}


def test_pair_sampling_record_of_an_old_row_and_a_missing_pair(admin_client: TestClient, pair: Pair) -> None:
    # rows written before the record existed: what they lack is null, what they hold is not guessed at
    sampler = admin_client.get(f"/api/v1/pairs/{pair.id}").json()["a"]["sampler"]
    assert sampler == dict.fromkeys(
        (
            "num_steps",
            "guidance_scale",
            "eta",
            "height",
            "width",
            "negative_prompt",
            "base_model",
            "pipeline",
            "dtype",
            "generator_device",
            "scheduler",
            "adapter_fused",
        )
    )
    missing = admin_client.get("/api/v1/pairs/999999")
    assert missing.status_code == 404
    assert missing.json() == {
        "detail": "pair 999999 does not exist; ask GET /api/v1/pairs/next for a pair to judge"
    }
    assert admin_client.get("/api/v1/pairs/0").status_code == 422


def test_invite_api_returns_one_time_link(admin_client: TestClient, client: TestClient) -> None:
    made = admin_client.post("/api/v1/invites", json={"name": "bob"})
    assert made.status_code == 201
    url = made.json()["url"]
    assert url.startswith("http://testserver/invite/")
    assert client.get(url.removeprefix("http://testserver")).status_code == 200
