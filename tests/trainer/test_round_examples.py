"""A round's examples are prepared once: each trajectory is read from the blob store once (or, beyond
the memory limit, per batch), each distinct prompt goes through the text encoder once, and batches
index that conditioning. Tiny SD on CPU, a real blob store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from core.db.training import PreferencePair
from core.diffusion.ddim import ddim_schedule
from core.diffusion.models import load_pipeline
from core.diffusion.policy import LoraSettings, Policy
from core.diffusion.sampler import SamplerSettings, TrajectoryLatents, encode_prompts, sample_trajectories
from core.diffusion.training import ReferenceCache, make_optimizer, train_step
from core.settings import DpoConfig
from core.storage import LocalBlobStore
from trainer.rounds import RoundExamples

SETTINGS = SamplerSettings(num_steps=3, guidance_scale=7.5, eta=1.0, height=16, width=16)
PROMPTS = ["a red circle above a blue square", "a photo of a cat", "a red circle above a blue square"]


class CountingBlobs(LocalBlobStore):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gets: list[str] = []

    def get(self, key: str) -> bytes:
        self.gets.append(key)
        return super().get(key)


@pytest.fixture
def round_pairs(tmp_path: Path) -> tuple[Policy, CountingBlobs, list[PreferencePair]]:
    """Three pairs (two prompts, one of them twice) whose six trajectories are in the blob store."""
    policy = Policy(load_pipeline("tiny:sd"), LoraSettings(rank=2))
    blobs = CountingBlobs(tmp_path / "blobs")
    prompts = [p for p in PROMPTS for _ in "ab"]
    sampled = sample_trajectories(policy.pipe, prompts, list(range(6)), SETTINGS)
    for i, prompt in enumerate(prompts):
        trajectory = TrajectoryLatents(
            prompt, i, sampled.latents[i], sampled.timesteps, sampled.log_probs[i], SETTINGS
        )
        blobs.put(f"latents/{i}", trajectory.to_bytes())
    # pair k: trajectory 2k + 1 won over 2k for even k, 2k over 2k + 1 for odd k
    pairs = [
        PreferencePair(k, PROMPTS[k], 0, w, lo, 1, None, f"latents/{w}", f"latents/{lo}")
        for k, (w, lo) in enumerate([(1, 0), (2, 3), (5, 4)])
    ]
    blobs.gets.clear()
    return policy, blobs, pairs


def text_encoder_calls(policy: Policy) -> list[int]:
    calls: list[int] = []
    policy.pipe.text_encoder.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


def test_a_round_reads_each_trajectory_once_and_encodes_each_prompt_once(round_pairs: Any) -> None:
    policy, blobs, pairs = round_pairs
    encoded = text_encoder_calls(policy)
    examples = RoundExamples.load(pairs, blobs, policy, max_trajectory_bytes=2**20)
    # the first winner is read to learn the settings, then the other five; the two prompts in one call
    # (the pipeline encodes the prompts and the empty negative prompt: two text-encoder passes)
    assert sorted(blobs.gets) == sorted(f"latents/{i}" for i in range(6))
    assert len(encoded) == 2 and examples.prompt_row == {PROMPTS[1]: 0, PROMPTS[0]: 1}
    blobs.gets.clear()
    schedule = ddim_schedule(policy.pipe.scheduler, SETTINGS.num_steps)
    optimizer, cache = make_optimizer(policy), ReferenceCache(max_bytes=2**20)
    for step in range(3):
        batch = examples.batch([2, 0, 2])
        train_step(
            policy,
            optimizer,
            batch,
            DpoConfig(),
            schedule,
            torch.Generator().manual_seed(step),
            cache,
        )
    assert blobs.gets == [] and len(encoded) == 2, "no blob read and no text encoding after loading"
    assert (batch.ids_w, batch.ids_l) == ([5, 1, 5], [4, 0, 4])
    assert torch.equal(batch.latents_w[1], blobs_latents(blobs, 1))
    assert torch.equal(batch.latents_l[0], blobs_latents(blobs, 4))
    # the indexed rows are what encoding the batch's prompts gives; the CPU text encoder gives the empty
    # negative prompt's rows a last-place difference (2.4e-7) that depends on the row's place in the batch
    direct = encode_prompts(policy.pipe, batch.prompts, SETTINGS)
    assert batch.cond is not None
    assert torch.equal(batch.cond.cond, direct.cond)
    torch.testing.assert_close(batch.cond.uncond, direct.uncond, rtol=0.0, atol=1e-6)


def test_beyond_the_memory_limit_a_round_reads_its_pairs_per_batch(round_pairs: Any) -> None:
    policy, blobs, pairs = round_pairs
    examples = RoundExamples.load(pairs, blobs, policy, max_trajectory_bytes=0)
    assert examples.trajectories == {} and blobs.gets == ["latents/1"]
    blobs.gets.clear()
    batch = examples.batch([1, 1])
    assert blobs.gets == ["latents/2", "latents/2", "latents/3", "latents/3"]
    assert (batch.ids_w, batch.ids_l) == ([2, 2], [3, 3])
    assert torch.equal(batch.latents_w[0], blobs_latents(blobs, 2))


def blobs_latents(blobs: LocalBlobStore, i: int) -> torch.Tensor:
    return TrajectoryLatents.from_bytes(LocalBlobStore.get(blobs, f"latents/{i}")).latents


def test_a_rounds_pair_weights_reach_the_loss(round_pairs: Any) -> None:
    """Weighted pairs give their batch a weight per pair, and a step's loss is the weighted mean of the
    per-pair terms: weight 0 on a pair removes it, as if the batch held only the other pairs."""
    from dataclasses import replace

    policy, blobs, pairs = round_pairs
    assert RoundExamples.load(pairs, blobs, policy, max_trajectory_bytes=2**20).batch([0, 1]).weights is None
    weighted = [replace(p, weight=w) for p, w in zip(pairs, [1.0, 0.0, 0.5], strict=True)]
    examples = RoundExamples.load(weighted, blobs, policy, max_trajectory_bytes=2**20)
    batch = examples.batch([2, 0, 1])
    assert batch.weights is not None and batch.weights.tolist() == [0.5, 1.0, 0.0]
    schedule = ddim_schedule(policy.pipe.scheduler, SETTINGS.num_steps)
    hp = DpoConfig(exact=True, beta=10.0, clip=1.0)
    with torch.no_grad():  # a nonzero adapter, so the pairs' terms differ from log 2
        for p in policy.lora_parameters():
            p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(3))
    losses = []
    for idx in ([2, 0, 1], [2], [0]):
        b = examples.batch(idx)
        # a vanishing learning rate: the three steps see the same adapter to float precision
        m = train_step(policy, make_optimizer(policy, lr=1e-12, weight_decay=0.0), b, hp, schedule)
        losses.append(m.loss)
    full, only_2, only_0 = losses
    assert only_2 != pytest.approx(only_0)
    # alone, pair 2's loss is already 0.5 x its term; pair 1 (weight 0) adds nothing
    assert full == pytest.approx((only_2 + only_0) / 3, rel=1e-5)
