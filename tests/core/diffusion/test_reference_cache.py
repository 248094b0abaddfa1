"""The reference cache: a train step that reads the reference's step means from it equals one that runs
the reference UNet (loss, log-ratios, updated LoRA parameters), a row seen before costs no reference
forward, and the cache keeps to its byte cap (least recently used rows go first). Tiny SD on CPU."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from core.diffusion.ddim import ddim_schedule
from core.diffusion.models import Pipeline
from core.diffusion.policy import LoraSettings, Policy
from core.diffusion.sampler import SamplerSettings, sample_trajectories
from core.diffusion.training import PairBatch, ReferenceCache, make_optimizer, train_step
from core.settings import DpoConfig

SETTINGS = SamplerSettings(num_steps=4, guidance_scale=7.5, eta=1.0, height=16, width=16)
PROMPTS = ["a red circle above a blue square", "a photo of a cat"]
# Float32 on CPU: a reference row a cached step reads was computed in a batch of another composition,
# which moves its UNet output by a few units in the last place (~1e-6 relative). The log-ratio is a
# difference of two nearly equal squared distances, so it moves by up to ~1e-6 in absolute terms
# (measured: 8e-7 on log-ratios of 2e-2 on one host, 2.2e-6 on an AMD EPYC host whose kernels block
# the sums differently); Adam (lr 1e-2) turns that into LoRA differences of ~2e-5.
TOL = {"rtol": 0.0, "atol": 5e-6}


class UnetForwards:
    """Counts UNet calls and the rows they were given, policy (adapter on) and reference (off) apart."""

    def __init__(self, policy: Policy) -> None:
        self.layer = next(m for m in policy.denoiser.modules() if isinstance(m, BaseTunerLayer))
        self.calls = {"policy": 0, "reference": 0}
        self.rows = {"policy": 0, "reference": 0}
        policy.denoiser.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        side = "reference" if self.layer.disable_adapters else "policy"
        sample = args[0] if args else kwargs["sample"]
        self.calls[side] += 1
        self.rows[side] += int(sample.shape[0])

    def take(self) -> tuple[dict[str, int], dict[str, int]]:
        out = (dict(self.calls), dict(self.rows))
        self.calls, self.rows = dict.fromkeys(self.calls, 0), dict.fromkeys(self.rows, 0)
        return out


def pairs_and_policy(make_pipe: Callable[..., Pipeline], lora: dict[str, torch.Tensor] | None = None) -> Any:
    torch.manual_seed(0)
    policy = Policy(make_pipe(), LoraSettings(rank=2))
    if lora is not None:
        policy.hot_swap(lora)
    sampled = sample_trajectories(policy.pipe, [p for p in PROMPTS for _ in "ab"], [11, 12, 13, 14], SETTINGS)
    latents = sampled.latents.half()
    batch = PairBatch(PROMPTS, latents[[0, 3]], latents[[1, 2]], SETTINGS, ids_w=[100, 103], ids_l=[101, 102])
    return policy, batch


def test_a_cached_step_equals_an_uncached_one(make_pipe: Callable[..., Pipeline]) -> None:
    plain, batch = pairs_and_policy(make_pipe)
    cached, _ = pairs_and_policy(make_pipe, plain.lora_state())
    schedule = ddim_schedule(plain.pipe.scheduler, SETTINGS.num_steps)
    hp = DpoConfig(sampled_steps=3, clip=1.0)
    opts = make_optimizer(plain, lr=1e-2), make_optimizer(cached, lr=1e-2)
    cache = ReferenceCache(max_bytes=2**20)
    for step in range(3):
        gens = [torch.Generator().manual_seed(step) for _ in "ab"]
        a = train_step(plain, opts[0], batch, hp, schedule, gens[0])
        b = train_step(cached, opts[1], batch, hp, schedule, gens[1], reference_cache=cache)
        assert torch.equal(a.step_indices, b.step_indices)
        assert a.loss == pytest.approx(b.loss, abs=1e-5)
        torch.testing.assert_close(a.logratio_w, b.logratio_w, **TOL)
        torch.testing.assert_close(a.logratio_l, b.logratio_l, **TOL)
    assert cache.hits > 0, "the same two pairs for three steps: some rows must repeat"
    before = pairs_and_policy(make_pipe)[0].lora_state()
    after_plain, after_cached = plain.lora_state(), cached.lora_state()
    assert all(not torch.equal(after_plain[k], before[k]) for k in before), "every LoRA parameter moved"
    for k in before:
        torch.testing.assert_close(after_cached[k], after_plain[k], rtol=0.0, atol=1e-4)


def test_rows_seen_before_run_no_reference_forward(make_pipe: Callable[..., Pipeline]) -> None:
    policy, batch = pairs_and_policy(make_pipe)
    schedule = ddim_schedule(policy.pipe.scheduler, SETTINGS.num_steps)
    hp = DpoConfig(exact=True, clip=1.0)  # every step of every trajectory: 2 x 2 x 4 = 16 rows
    optimizer, cache = make_optimizer(policy, lr=1e-2), ReferenceCache(max_bytes=2**20)
    forwards = UnetForwards(policy)
    train_step(policy, optimizer, batch, hp, schedule, reference_cache=cache)
    # guidance doubles the rows the UNet sees (unconditional and conditional halves)
    assert forwards.take() == ({"policy": 1, "reference": 1}, {"policy": 32, "reference": 32})
    assert len(cache) == 16 and (cache.hits, cache.misses) == (0, 16)
    train_step(policy, optimizer, batch, hp, schedule, reference_cache=cache)
    assert forwards.take() == ({"policy": 1, "reference": 0}, {"policy": 32, "reference": 0})
    assert (cache.hits, cache.misses) == (16, 16)
    # without a cache every step runs the reference on all its rows
    train_step(policy, optimizer, batch, hp, schedule)
    assert forwards.take() == ({"policy": 1, "reference": 1}, {"policy": 32, "reference": 32})


def test_the_cache_keeps_to_its_byte_cap(make_pipe: Callable[..., Pipeline]) -> None:
    policy, batch = pairs_and_policy(make_pipe)
    schedule = ddim_schedule(policy.pipe.scheduler, SETTINGS.num_steps)
    row_bytes = 4 * 8 * 8 * 4  # tiny SD's latents at 16 px: (4, 8, 8) float32
    cache = ReferenceCache(max_bytes=5 * row_bytes)
    train_step(policy, make_optimizer(policy), batch, DpoConfig(exact=True), schedule, reference_cache=cache)
    assert len(cache) == 5 and cache.nbytes == 5 * row_bytes and cache.evictions == 11
    # the rows kept are the last five the step computed (winners' rows come first, then the losers')
    kept = [(t, s) for t in (100, 101, 102, 103) for s in range(4) if (t, s) in cache]
    assert kept == [(101, 3), (102, 0), (102, 1), (102, 2), (102, 3)]
    assert (cache.hits, cache.misses) == (0, 16)


def test_least_recently_used_rows_are_dropped_first() -> None:
    cache = ReferenceCache(max_bytes=3 * 4)  # three float32 scalars
    for i in range(3):
        cache.put((i, 0), torch.tensor([float(i)]))
    assert cache.get((0, 0)) is not None  # (0, 0) is now the most recently used
    cache.put((3, 0), torch.tensor([3.0]))
    assert [(i, 0) in cache for i in range(4)] == [True, False, True, True]
    assert (cache.nbytes, cache.evictions) == (12, 1)
    assert cache.get((1, 0)) is None
    cache.put((9, 0), torch.zeros(4))  # larger than the whole cap: not kept, nothing evicted
    assert (9, 0) not in cache and len(cache) == 3
    with pytest.raises(ValueError, match="max_bytes"):
        ReferenceCache(max_bytes=-1)
