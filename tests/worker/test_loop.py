"""End to end on the tiny model: worker fills the pool, a programmatic labeller judges through the
REST API, the trainer publishes version 1, the worker swaps it in, and the downloaded adapter
reproduces the worker's images in a stock diffusers pipeline. Run twice: blobs in the local
directory, and in an S3 bucket (DENSEALIGN_BLOB_URL, a moto server in its own process)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from rq import Queue, SimpleWorker
from sqlalchemy import func, select

from app.main import create_app
from core.db import make_engine, make_session_factory
from core.db.labellers import create_labeller
from core.db.models import Pair, Trajectory
from core.db.policies import publish_policy_version
from core.db.prompts import add_prompt, get_prompt
from core.diffusion.models import load_pipeline
from core.pool import refill_pool
from core.queue import QUEUE_NAME, RqSamplingQueue
from core.settings import Settings
from tests.s3 import shared_server, use_server
from trainer.export import main as export_main
from trainer.main import build_trainer
from worker.main import build_sampler
from worker.sampling import PairSampler, install

PROMPTS = ["a red circle above a blue square", "a green triangle"]


def seed_database(settings: Settings) -> str:
    sessions = make_session_factory(make_engine(settings.database_url))
    with sessions() as session, session.begin():
        publish_policy_version(session=session, version=0)
        for text in PROMPTS:
            add_prompt(session=session, text=text)
        token = create_labeller(session=session, name="oracle").token
    return token


def refill_and_work(settings: Settings, redis: Any) -> int:
    sessions = make_session_factory(make_engine(settings.database_url))
    queue = RqSamplingQueue(redis, retries=settings.pool.job_retries)
    with sessions() as session:
        n = refill_pool(
            session=session,
            queue=queue,
            target_per_prompt=settings.pool.target_per_prompt,
            max_version_lag=settings.dpo.max_version_lag,
            pairs_per_job=settings.pool.pairs_per_job,
        )
    SimpleWorker([Queue(QUEUE_NAME, connection=redis)], connection=redis).work(burst=True)
    return n


def brightness(png: bytes) -> float:
    return float(np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32).mean())


def label_everything(client: TestClient, token: str) -> int:
    """A programmatic labeller over the REST API: prefers the brighter image."""
    headers = {"Authorization": f"Bearer {token}"}
    judged = 0
    while True:
        body = client.get("/api/v1/pairs/next", headers=headers).json()
        pair = body["pair"]
        if pair is None:
            return judged
        left = client.get(pair["left"]["url"], headers=headers)
        right = client.get(pair["right"]["url"], headers=headers)
        assert left.status_code == right.status_code == 200
        better = pair["left"] if brightness(left.content) >= brightness(right.content) else pair["right"]
        response = client.post(
            "/api/v1/judgements",
            headers=headers,
            json={
                "pair_id": pair["pair_id"],
                "choice": better["side"],
                "client_key": f"oracle-pair-{pair['pair_id']}",
            },
        )
        assert response.status_code in (200, 201), response.text
        judged += 1


@pytest.fixture(params=["local", "s3"])
def blob_settings(
    request: pytest.FixtureRequest, loop_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """The loop's settings with blobs in the local directory, or in a fresh bucket of a moto server."""
    if request.param == "local":
        return loop_settings
    server = shared_server()
    use_server(monkeypatch, server)
    return loop_settings.model_copy(update={"blob_url": f"s3://{server.new_bucket()}/loop"})


def bucket_keys(settings: Settings) -> list[str]:
    bucket, prefix = settings.blob_url.removeprefix("s3://").split("/", 1)  # type: ignore[union-attr]
    listed = shared_server().client().list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/")
    return sorted(item["Key"].removeprefix(f"{prefix}/") for item in listed.get("Contents", []))


@pytest.mark.slow
def test_online_loop_end_to_end(
    blob_settings: Settings, redis: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    settings = blob_settings
    token = seed_database(settings)
    sampler = build_sampler(settings)
    assert isinstance(sampler, PairSampler)
    install(sampler)
    sessions = make_session_factory(make_engine(settings.database_url))

    # 1. the pool fills: 2 prompts x target 2, and a second refill adds nothing
    assert refill_and_work(settings, redis) == 4
    assert refill_and_work(settings, redis) == 0
    with sessions() as session:
        assert session.scalar(select(func.count(Pair.id)).where(Pair.policy_version == 0)) == 4

    # 2. a programmatic labeller judges every pair through the REST API
    client = TestClient(create_app(settings))
    assert label_everything(client, token) == 4

    # 3. one training round publishes version 1 with its metrics
    trainer = build_trainer(settings)
    assert trainer.run_once() == 1
    assert trainer.run_once() is None  # every label is used: no second round on the same pairs
    current = client.get("/api/v1/policies/current", headers={"Authorization": f"Bearer {token}"}).json()
    assert current["version"] == 1
    metrics = current["metrics"]
    assert metrics["pairs_used"] == 4 and metrics["labels_used"] == 4 and metrics["optimizer_steps"] == 3
    assert len(metrics["abs_logratio_by_step"]) == 3 and 0.0 <= metrics["implicit_accuracy"] <= 1.0

    # 4. the worker swaps version 1 in before its next job: new pairs carry version 1
    assert refill_and_work(settings, redis) == 4
    assert sampler.loaded_version == 1 and sampler.last_swap_seconds is not None
    with sessions() as session:
        new = session.scalars(select(Trajectory).where(Trajectory.policy_version == 1)).all()
        assert len(new) == 8
        pair = session.scalars(select(Pair).where(Pair.policy_version == 1).order_by(Pair.id)).first()
        assert pair is not None
        sides = [session.get(Trajectory, pair.trajectory_a_id), session.get(Trajectory, pair.trajectory_b_id)]
        prompt = get_prompt(session=session, prompt_id=pair.prompt_id).text

    # 5. the downloaded adapter reproduces the worker's image in a stock pipeline
    download = client.get("/api/v1/policies/1/lora.safetensors", headers={"Authorization": f"Bearer {token}"})
    assert download.status_code == 200
    folder = tmp_path / "download"
    folder.mkdir()
    (folder / "pytorch_lora_weights.safetensors").write_bytes(download.content)
    stock = load_pipeline("tiny:sd")
    stock.load_lora_weights(str(folder))
    # the worker samples with the adapter fused (its record says so); fuse_lora makes the same weights
    assert all(t is not None and t.sampler["adapter_fused"] for t in sides)
    stock.fuse_lora()
    # the worker samples a pair as one batch of two; so does the stock call (CPU kernels vary by batch)
    images = stock(
        [prompt, prompt],
        num_inference_steps=3,
        guidance_scale=7.5,
        eta=1.0,
        generator=[torch.Generator().manual_seed(t.seed) for t in sides if t is not None],
        output_type="pil",
    ).images
    for image, trajectory in zip(images, sides, strict=True):
        assert trajectory is not None
        stored = Image.open(io.BytesIO(sampler.blobs.get(trajectory.image_key)))
        assert np.array_equal(np.asarray(image), np.asarray(stored))

    # 6. the CLI exports the same adapter for diffusers and for kohya-style tools
    monkeypatch.setenv("DENSEALIGN_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("DENSEALIGN_BLOB_DIR", settings.blob_dir)
    if settings.blob_url:
        monkeypatch.setenv("DENSEALIGN_BLOB_URL", settings.blob_url)
    for fmt, name in (
        ("diffusers", "pytorch_lora_weights.safetensors"),
        ("kohya", "densealign_lora_kohya.safetensors"),
    ):
        assert export_main(["--version", "1", "--format", fmt, "--out", str(tmp_path / fmt)]) == 0
        assert (tmp_path / fmt / name).stat().st_size > 0
    assert (tmp_path / "diffusers" / "pytorch_lora_weights.safetensors").read_bytes() == download.content
    assert export_main(["--version", "0", "--out", str(tmp_path / "v0")]) == 2
    assert "base model" in capsys.readouterr().err

    # 7. with a bucket, every blob went there and none to the local directory
    if settings.blob_url:
        assert not Path(settings.blob_dir).exists()
        keys = bucket_keys(settings)
        assert [k for k in keys if k.startswith("policies/")] == [
            "policies/v1/optimizer.pt",
            "policies/v1/pytorch_lora_weights.safetensors",
        ]
        assert (
            sum(k.startswith("trajectories/") for k in keys)
            == sum(k.startswith("images/v") for k in keys)
            == 16
        )
