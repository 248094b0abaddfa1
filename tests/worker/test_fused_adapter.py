"""Workers sample with the adapter fused by default (`DENSEALIGN_SAMPLER__FUSE_ADAPTER`): through their
real path (`build_sampler`, `PairSampler`) on the tiny model, against Postgres.

- an evaluation job swaps to each side's version and back: run twice from the same seeds, it gives
  the same PNGs both times, and version 0's side is the unfused worker's bit for bit (W0 itself);
- version 1's fused images are the unfused worker's up to float rounding (at most 1 grey level of
  255 after PNG rounding; the float gap is ~1e-6, tests/core/diffusion/test_policy_fused.py);
- each trajectory's record says whether the adapter was fused, and a stock pipeline that loads the
  version's LoRA and calls `fuse_lora()` redraws the fused worker's image bit for bit.
"""

from __future__ import annotations

import io
import random
from typing import Any

import numpy as np
import torch
from PIL import Image

from core.db import make_engine, make_session_factory
from core.db.campaigns import start_campaign
from core.db.models import Pair, Trajectory
from core.db.policies import publish_policy_version
from core.db.prompts import add_prompt
from core.diffusion.models import load_pipeline
from core.settings import Settings
from tests.worker.test_eval_sampling import publish_random_adapter
from worker.main import build_sampler
from worker.sampling import PairSampler

PROMPTS = ("a red circle", "a blue square")


def eval_sides(sampler: PairSampler, pair_ids: list[int]) -> list[dict[int, Trajectory]]:
    """Per pair: version -> its side's trajectory row."""
    with sampler.sessions() as session:
        out = []
        for pair_id in pair_ids:
            pair = session.get_one(Pair, pair_id)
            sides = [session.get_one(Trajectory, t) for t in (pair.trajectory_a_id, pair.trajectory_b_id)]
            out.append({t.policy_version: t for t in sides})
        session.expunge_all()
    return out


def png(sampler: PairSampler, trajectory: Trajectory) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(sampler.blobs.get(trajectory.image_key))).convert("RGB"))


def test_fused_workers_swap_both_ways_exactly_and_stock_fuse_lora_redraws_them(
    loop_settings: Settings, tmp_path: Any
) -> None:
    sessions = make_session_factory(make_engine(loop_settings.database_url))
    with sessions() as session, session.begin():
        publish_policy_version(session=session, version=0)
        prompts = [add_prompt(session=session, text=t, split="eval").id for t in PROMPTS]
    fused = build_sampler(loop_settings)
    unfused_settings = loop_settings.model_copy(
        update={"sampler": loop_settings.sampler.model_copy(update={"fuse_adapter": False})}
    )
    unfused = build_sampler(unfused_settings)
    assert isinstance(fused, PairSampler) and isinstance(unfused, PairSampler)
    assert fused.policy.fused and not unfused.policy.fused
    publish_random_adapter(fused, tmp_path, std=0.05)  # the size a few DPO steps leave
    with sessions() as session, session.begin():
        campaign = start_campaign(session=session, version=1, baseline_version=0, target_votes=8).id

    runs = []
    for sampler in (fused, fused, unfused):  # the fused worker twice: v1 -> v0, then v0 -> v1 -> v0
        sampler.seed_source = random.Random(7)
        runs.append(eval_sides(sampler, sampler.sample_eval_pairs(campaign, prompts)))
    first, again, plain = ([{v: png(fused, t) for v, t in pair.items()} for pair in run] for run in runs)
    for a, b, c in zip(first, again, plain, strict=True):
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])  # swaps restore exactly
        assert np.array_equal(a[0], c[0])  # version 0 fused is the base model itself
        assert not np.array_equal(a[1], a[0]), "version 1's adapter should change the image"
        assert np.abs(a[1].astype(int) - c[1]).max() <= 1  # fused = unfused up to float rounding
    assert all(t.sampler["adapter_fused"] for pair in runs[0] for t in pair.values())
    assert not any(t.sampler["adapter_fused"] for pair in runs[2] for t in pair.values())

    # a stock pipeline with the version's LoRA, fused, redraws the job (one batch, as the worker drew it)
    side = runs[0][0][1]
    stock = load_pipeline("tiny:sd")
    stock.load_lora_weights(str(tmp_path / "adapter"))
    stock.fuse_lora()
    rec = side.sampler
    redrawn = stock(
        list(PROMPTS),
        num_inference_steps=rec["num_steps"],
        guidance_scale=rec["guidance_scale"],
        eta=rec["eta"],
        generator=[torch.Generator().manual_seed(pair[1].seed) for pair in runs[0]],
        output_type="pil",
    ).images
    assert all(np.array_equal(np.asarray(r), a[1]) for r, a in zip(redrawn, first, strict=True))
