"""The whole loop on a tiny SD3 pipeline (flow matching), on real Postgres and Redis: the worker samples
SDE trajectories, a labeller judges through the REST API, the trainer publishes version 1 (recording
the model family), the worker hot-swaps it, and the downloaded adapter loads in a stock SD3 pipeline
that then draws what the worker's policy draws."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.main import create_app
from core.db import make_engine, make_session_factory
from core.db.models import Pair, Trajectory
from core.db.policies import get_policy_version
from core.diffusion.models import load_pipeline
from core.diffusion.policy import AdapterMismatchError, Policy
from core.diffusion.sampler import SamplerSettings, sample_trajectories
from core.settings import Settings
from tests.worker.test_loop import label_everything, refill_and_work, seed_database
from trainer.main import build_trainer
from worker.main import build_sampler
from worker.sampling import PairSampler, install


@pytest.mark.slow
def test_online_loop_on_a_tiny_sd3_pipeline(loop_settings: Settings, redis: Any, tmp_path: Path) -> None:
    settings = loop_settings.model_copy(
        update={
            "model": loop_settings.model.model_copy(update={"base_model": "tiny:sd3"}),
            "sampler": loop_settings.sampler.model_copy(update={"eta": 0.7, "guidance_scale": 4.0}),
        }
    )
    token = seed_database(settings)
    sampler = build_sampler(settings)
    assert isinstance(sampler, PairSampler) and sampler.policy.family == "sd3"
    install(sampler)
    sessions = make_session_factory(make_engine(settings.database_url))

    # 1. the pool fills with SDE trajectories: finite per-step log-probs, the family in the record
    assert refill_and_work(settings, redis) == 4
    with sessions() as session:
        first = session.scalars(select(Trajectory).order_by(Trajectory.id)).first()
        assert first is not None and first.sampler["family"] == "sd3"
        assert first.sampler["scheduler"]["class_name"] == "FlowMatchEulerDiscreteScheduler"
        assert first.sampler["eta"] == 0.7

    # 2. judged through the REST API; 3. a round publishes version 1 and records the family
    client = TestClient(create_app(settings))
    assert label_everything(client, token) == 4
    trainer = build_trainer(settings)
    assert trainer.run_once() == 1
    headers = {"Authorization": f"Bearer {token}"}
    current = client.get("/api/v1/policies/current", headers=headers).json()
    assert current["version"] == 1 and current["metrics"]["model_family"] == "sd3"
    assert current["metrics"]["optimizer_steps"] == 3

    # 4. the worker swaps version 1 in before its next job
    assert refill_and_work(settings, redis) == 4
    assert sampler.loaded_version == 1
    with sessions() as session:
        assert session.scalar(select(func.count(Pair.id)).where(Pair.policy_version == 1)) == 4

    # 5. the REST download loads in a stock SD3 pipeline and draws what the worker's policy draws
    download = client.get("/api/v1/policies/1/lora.safetensors", headers=headers)
    assert download.status_code == 200
    folder = tmp_path / "download"
    folder.mkdir()
    (folder / "pytorch_lora_weights.safetensors").write_bytes(download.content)
    stock = load_pipeline("tiny:sd3")
    base_images = _stock_images(stock)
    stock.load_lora_weights(str(folder))
    stock.fuse_lora()  # the worker samples fused, as its record says
    worker_images = sample_trajectories(
        sampler.policy.pipe,
        ["a green triangle"] * 2,
        [5, 6],
        SamplerSettings(num_steps=3, guidance_scale=4.0, eta=0.7),
        deterministic=True,
    ).images
    stock_images = _stock_images(stock)
    assert np.abs(stock_images - base_images).max() > 0  # version 1 is not the base model
    assert np.array_equal(stock_images, worker_images)

    # 6. a worker of another family refuses version 1 with a message that says what to do
    sd_policy = Policy(load_pipeline("tiny:sd"))
    with (
        sessions() as session,
        pytest.raises(AdapterMismatchError, match="version 1 was trained on a sd3 model.*BASE_MODEL"),
    ):
        row = get_policy_version(session=session, version=1)
        sd_policy.load_published(
            sampler.blobs, row.lora_key, row.lora_sha256, family=row.metrics["model_family"], version=1
        )


def _stock_images(pipe: Any) -> np.ndarray:
    generators = [torch.Generator().manual_seed(s) for s in (5, 6)]
    return pipe(
        ["a green triangle"] * 2,
        num_inference_steps=3,
        guidance_scale=4.0,
        generator=generators,
        output_type="np",
    ).images
