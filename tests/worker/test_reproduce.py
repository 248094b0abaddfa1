"""The sampling record `GET /api/v1/pairs/{id}` serves redraws a worker's images in a stock diffusers
pipeline, on CPU, with the model that ships (models/densealign-shapes).

The worker runs its real path (refill, RQ job, `PairSampler.sample_pairs`) against Postgres and Redis,
once with one pair per job (a batch of 2) and once with the default 8 pairs per job (a batch of
16). The stock side uses only diffusers, torch and the JSON the API returned:
- each job's (prompt, seed)s in one stock call, in the job's order, must give the served PNGs
  bit for bit: the worker's loop is the stock one step for step (core/diffusion/sampler.py), and
  the same batch runs the same CPU kernels;
- one image per stock call (how the README redraws a single image, and its snippet is run here)
  cannot be bit-exact: CPU float32 kernels block their sums by batch size, so the results differ by
  float rounding. Measured on this shipped model (10 and 20 steps, batches of 2 and 16): the
  batch-of-1 float image is within 0.02 of a grey level (of 255) of the batched one, so after
  rounding to 8 bits at most 1 level differs, in under 0.05% of the values. The test allows 0.6 of
  a level between the stock float image and the served PNG (0.5 for the PNG's rounding, 0.1 for
  float noise, 5x the worst measured), which a wrong seed misses by tens of levels (checked below).
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from fastapi.testclient import TestClient
from PIL import Image
from rq import Queue, SimpleWorker
from sqlalchemy import select

from app.main import create_app
from core.db import make_engine, make_session_factory
from core.db.labellers import create_labeller
from core.db.models import Pair
from core.db.policies import publish_policy_version
from core.db.prompts import add_prompt
from core.pool import refill_pool
from core.queue import QUEUE_NAME, RqSamplingQueue
from core.settings import Settings
from worker.main import build_sampler
from worker.sampling import PairSampler, install

ROOT = Path(__file__).resolve().parents[2]
SHAPES = ROOT / "models" / "densealign-shapes"
PROMPTS = ["a red circle above a blue square", "a yellow triangle"]
STEPS = 10
# Grey levels (of 255) allowed between a batch-of-1 stock float image and the served PNG: 0.5 of PNG
# rounding plus 0.1 of float32 noise (the worst measured is 0.02; see the module docstring).
BATCH_OF_ONE_TOLERANCE = 0.6


def sample_with_the_worker(settings: Settings, redis: Any) -> list[int]:
    """Version 0, the prompts, one refill and one burst of the RQ worker; returns the new pair ids.

    Jobs take `pairs_per_job` pairs each, run one after another in this one worker, and insert their
    pairs in batch order, so consecutive runs of `pairs_per_job` pair ids are the worker's batches.
    """
    sessions = make_session_factory(make_engine(settings.database_url))
    with sessions() as session, session.begin():
        publish_policy_version(session=session, version=0)
        for text in PROMPTS:
            add_prompt(session=session, text=text)
    sampler = build_sampler(settings)
    assert isinstance(sampler, PairSampler)
    install(sampler)
    with sessions() as session:
        queued = refill_pool(
            session=session,
            queue=RqSamplingQueue(redis, retries=settings.pool.job_retries),
            target_per_prompt=settings.pool.target_per_prompt,
            max_version_lag=settings.dpo.max_version_lag,
            pairs_per_job=settings.pool.pairs_per_job,
        )
    assert queued == settings.pool.target_per_prompt * len(PROMPTS)
    SimpleWorker([Queue(QUEUE_NAME, connection=redis)], connection=redis).work(burst=True)
    with sessions() as session:
        return list(session.scalars(select(Pair.id).order_by(Pair.id)))


def admin_client(settings: Settings) -> TestClient:
    sessions = make_session_factory(make_engine(settings.database_url))
    with sessions() as session, session.begin():
        token = create_labeller(session=session, name="auditor", role="admin").token
    return TestClient(create_app(settings), headers={"Authorization": f"Bearer {token}"})


def stock_pipeline(record: dict[str, Any]) -> Any:
    """A stock diffusers pipeline built from nothing but a trajectory's sampler record."""
    pipeline_class = getattr(diffusers, record["pipeline"])
    pipe = pipeline_class.from_pretrained(record["base_model"], torch_dtype=getattr(torch, record["dtype"]))
    scheduler = record["scheduler"]
    pipe.scheduler = getattr(diffusers, scheduler["class_name"]).from_config(scheduler["config"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_images(pipe: Any, record: dict[str, Any], prompts: list[str], seeds: list[int]) -> np.ndarray:
    """Float images (batch, H, W, 3) in [0, 1] from one stock call, one seeded generator per image."""
    return pipe(
        prompts,
        num_inference_steps=record["num_steps"],
        guidance_scale=record["guidance_scale"],
        eta=record["eta"],
        height=record["height"],
        width=record["width"],
        negative_prompt=record["negative_prompt"],
        generator=[torch.Generator(record["generator_device"]).manual_seed(seed) for seed in seeds],
        output_type="np",
    ).images


def to_uint8(images: np.ndarray) -> np.ndarray:
    """As the stock pipeline's PIL output (and the worker's PNG) rounds them."""
    return (images * 255).round().astype(np.uint8)


def readme_snippet() -> str:
    """The README's Python block that redraws a served image from pair.json."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.DOTALL) if "pair.json" in b]
    assert len(blocks) == 1, "README.md should have one Python block that reads pair.json"
    return blocks[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("pairs_per_job", "target_per_prompt"),
    [(1, 1), (8, 4)],  # two jobs of one pair; one job of 8 pairs (the default size), 16 images
    ids=["batch-of-2", "batch-of-16"],
)
def test_the_rest_sampling_record_redraws_the_workers_images(
    loop_settings: Settings,
    redis: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    pairs_per_job: int,
    target_per_prompt: int,
) -> None:
    settings = loop_settings.model_copy(
        update={
            "model": loop_settings.model.model_copy(update={"base_model": str(SHAPES)}),
            "sampler": loop_settings.sampler.model_copy(update={"num_steps": STEPS}),
            "pool": loop_settings.pool.model_copy(
                update={"target_per_prompt": target_per_prompt, "pairs_per_job": pairs_per_job}
            ),
        }
    )
    pair_ids = sample_with_the_worker(settings, redis)
    assert len(pair_ids) == target_per_prompt * len(PROMPTS)
    client = admin_client(settings)

    # 1. the record, over REST: pairs in id order are the jobs' batch order, side a before b
    pairs = [client.get(f"/api/v1/pairs/{pair_id}").json() for pair_id in pair_ids]
    sides = [pair[side] for pair in pairs for side in ("a", "b")]
    prompts = [pair["prompt"]["text"] for pair in pairs for _ in ("a", "b")]
    seeds = [side["seed"] for side in sides]
    assert sorted(set(prompts)) == sorted(PROMPTS) and len(set(seeds)) == len(seeds)
    assert {
        (pair["policy_version"], pair["required_judgements"], pair["judgement_count"]) for pair in pairs
    } == {(0, 1, 0)}
    record = sides[0]["sampler"]
    assert all(side["sampler"] == record and side["policy_version"] == 0 for side in sides)
    assert {k: record[k] for k in ("num_steps", "guidance_scale", "eta", "height", "width")} == {
        "num_steps": STEPS,
        "guidance_scale": 7.5,
        "eta": 1.0,
        "height": None,  # the model's native size
        "width": None,
    }
    assert (record["base_model"], record["pipeline"], record["dtype"], record["generator_device"]) == (
        str(SHAPES),
        "StableDiffusionPipeline",
        "float32",
        "cpu",
    )
    config = record["scheduler"]["config"]
    assert record["scheduler"]["class_name"] == "DDIMScheduler"
    assert (config["beta_schedule"], config["timestep_spacing"], config["steps_offset"]) == (
        "scaled_linear",
        "leading",
        1,
    )
    assert (config["clip_sample"], config["thresholding"], config["prediction_type"]) == (
        False,
        False,
        "epsilon",
    )
    served = []
    for side in sides:
        png = client.get(side["image_url"])
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        served.append(np.asarray(Image.open(io.BytesIO(png.content)).convert("RGB")))

    # 2. each job's batch in one stock call: bit for bit
    pipe = stock_pipeline(record)
    assert isinstance(pipe, StableDiffusionPipeline)
    size = 2 * pairs_per_job
    for start in range(0, len(served), size):
        batch = slice(start, start + size)
        batched = to_uint8(stock_images(pipe, record, prompts[batch], seeds[batch]))
        assert batched.shape == (size, 64, 64, 3)
        for i, image in enumerate(served[batch], start):
            assert np.array_equal(batched[i - start], image), f"image {i} (seed {seeds[i]}) differs"

    # 3. one image per stock call: equal up to float rounding (see the module docstring); the first
    # two pairs cover both prompts and both sides (all 16 were measured for the docstring)
    for i, image in enumerate(served[:4]):
        alone = stock_images(pipe, record, [prompts[i]], [seeds[i]])[0]
        gap = float(np.abs(alone * 255 - image.astype(np.float64)).max())
        assert gap <= BATCH_OF_ONE_TOLERANCE, f"image {i}: {gap:.3f} grey levels from the served PNG"

    # 4. the comparison can fail: the next seed gives another image, tens of levels away
    wrong = to_uint8(stock_images(pipe, record, [prompts[0]], [seeds[0] + 1]))[0]
    assert np.abs(wrong.astype(int) - served[0]).max() > 50

    # 5. the README's snippet, as written, on the first pair's JSON, redraws its side a
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pair.json").write_text(client.get(f"/api/v1/pairs/{pair_ids[0]}").text)
    exec(compile(readme_snippet(), "README.md", "exec"), {})
    redrawn = np.asarray(Image.open(tmp_path / "redrawn.png").convert("RGB"))
    assert np.abs(redrawn.astype(int) - served[0]).max() <= 1
