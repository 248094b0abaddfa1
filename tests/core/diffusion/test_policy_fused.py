"""Fused sampling (`Policy.fuse`, what workers run): the adapter written into the base weights.

Measured on the tiny models (an adapter after 3 DPO steps at lr 1e-2, 4 DDIM steps, 3 seed pairs):
fused and unfused images differ by at most 1.8e-6 (of 1.0) on tiny SD and 1.6e-6 on tiny SDXL;
the tests allow 1e-5. Swaps restore W0 from an untouched copy, so they are bit-exact, and a stock
pipeline with `load_lora_weights` + `fuse_lora()` computes the same float32 sum, so it is too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from core.diffusion.ddim import ddim_schedule
from core.diffusion.policy import ADAPTER, LoraSettings, Policy
from core.diffusion.sampler import encode_prompts, sample_trajectories
from core.diffusion.training import PairBatch, make_optimizer, train_step
from core.settings import DpoConfig

# Fused vs unfused images, in [0, 1]: 5x the worst measured (see the module docstring).
FUSED_TOLERANCE = 1e-5


def _train(policy, settings, steps=3):
    batch = sample_trajectories(policy.pipe, ["a cat", "a cat"], [1, 2], settings)
    pairs = PairBatch(["a cat"], batch.latents[:1].half(), batch.latents[1:].half(), settings)
    schedule = ddim_schedule(policy.pipe.scheduler, settings.num_steps)
    opt = make_optimizer(policy, lr=1e-2)
    hp = DpoConfig(sampled_steps=2, clip=1.0)
    for _ in range(steps):
        train_step(policy, opt, pairs, hp, schedule, torch.Generator().manual_seed(0))
    return pairs, opt, hp, schedule


def _images(pipe, settings):
    return sample_trajectories(pipe, ["a dog", "a red circle"], [7, 8], settings).images


def _base_weights(policy):
    return [layer.get_base_layer().weight for layer in policy._layers]


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_fused_images_match_unfused_and_stock_fuse_lora_bit_for_bit(make_pipe, settings, kind, tmp_path):
    policy = Policy(make_pipe(kind), LoraSettings(rank=4, alpha=8))
    _train(policy, settings)
    unfused = _images(policy.pipe, settings)
    policy.save_adapter(tmp_path)
    policy.fuse()
    fused = _images(policy.pipe, settings)
    assert np.abs(fused - unfused).max() <= FUSED_TOLERANCE
    assert not np.array_equal(fused, _images(make_pipe(kind), settings)), "the adapter changed nothing"

    stock = make_pipe(kind)
    stock.load_lora_weights(str(tmp_path))
    call = {"num_inference_steps": settings.num_steps, "guidance_scale": settings.guidance_scale, "eta": 1.0}
    prompts, seeds = ["a dog", "a red circle"], [7, 8]

    def draw():
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return stock(prompts, generator=gens, output_type="np", **call).images

    assert np.array_equal(draw(), unfused)  # unfused stock = unfused worker
    stock.fuse_lora()
    assert np.array_equal(draw(), fused)  # fused stock = fused worker


def test_fused_swaps_restore_each_version_and_the_base_weights_exactly(make_pipe, settings, tmp_path):
    policy = Policy(make_pipe(), LoraSettings(rank=2))
    policy.fuse()
    w0 = [w.detach().clone() for w in _base_weights(policy)]
    base_images = _images(policy.pipe, settings)
    assert np.array_equal(base_images, _images(make_pipe(), settings))  # version 0 fused = the base model
    policy.unfuse()
    _train(policy, settings, steps=2)
    policy.save_adapter(tmp_path / "v1")
    _train(policy, settings, steps=1)
    policy.save_adapter(tmp_path / "v2")
    policy.fuse()
    v2 = _images(policy.pipe, settings)
    policy.hot_swap(tmp_path / "v1")
    v1 = _images(policy.pipe, settings)
    assert not np.array_equal(v1, v2)
    policy.hot_swap(tmp_path / "v2")
    assert np.array_equal(_images(policy.pipe, settings), v2)
    policy.hot_swap(tmp_path / "v1")
    assert np.array_equal(_images(policy.pipe, settings), v1)
    policy.reset_adapter()
    assert all(torch.equal(w, w_0) for w, w_0 in zip(_base_weights(policy), w0, strict=True))
    assert np.array_equal(_images(policy.pipe, settings), base_images)
    # version 0 is W0 itself, not a copy of it; unfusing leaves W0 too
    assert all(
        w.data_ptr() == b.data_ptr() for w, b in zip(_base_weights(policy), policy._fused.base, strict=True)
    )
    policy.hot_swap(tmp_path / "v2")
    policy.unfuse()
    assert all(torch.equal(w, w_0) for w, w_0 in zip(_base_weights(policy), w0, strict=True))
    assert not policy.fused


def test_fused_sampling_runs_no_lora_layer(make_pipe, settings):
    policy = Policy(make_pipe(), LoraSettings(rank=2))
    _train(policy, settings, steps=1)
    calls = []
    lora_modules = [m for layer in policy._layers for m in (layer.lora_A[ADAPTER], layer.lora_B[ADAPTER])]
    for module in lora_modules:
        module.register_forward_hook(lambda *_: calls.append(1))
    _images(policy.pipe, settings)
    assert len(calls) > 0  # unfused: every adapted layer runs its two LoRA matmuls
    calls.clear()
    policy.fuse()
    _images(policy.pipe, settings)
    policy.reset_adapter()
    _images(policy.pipe, settings)
    assert calls == []
    assert all(layer.merged for layer in policy._layers)


def test_a_fused_policy_refuses_training_and_its_reference_is_the_base_model(make_pipe, settings):
    policy = Policy(make_pipe(), LoraSettings(rank=2))
    pairs, opt, hp, schedule = _train(policy, settings, steps=2)
    lora_before = policy.lora_state()
    policy.fuse()
    with pytest.raises(RuntimeError, match="fused"):
        train_step(policy, opt, pairs, hp, schedule, torch.Generator().manual_seed(0))
    assert all(torch.equal(v, policy.lora_state()[k]) for k, v in lora_before.items())

    base = make_pipe()
    cond = encode_prompts(base, ["a dog"], settings)
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(501)
    with torch.no_grad():
        expected = base.unet(z, t, encoder_hidden_states=cond.cond).sample
        fused = policy.denoiser(z, t, encoder_hidden_states=cond.cond).sample
        with policy.reference():
            ref = policy.denoiser(z, t, encoder_hidden_states=cond.cond).sample
        after = policy.denoiser(z, t, encoder_hidden_states=cond.cond).sample
    assert torch.equal(ref, expected)
    assert torch.equal(after, fused) and not torch.equal(fused, expected)


def test_a_fused_policy_saves_the_adapter_not_the_merged_weights(make_pipe, settings, tmp_path):
    policy = Policy(make_pipe(), LoraSettings(rank=2))
    _train(policy, settings, steps=2)
    unfused_path, _ = policy.save_adapter(tmp_path / "unfused")
    state, diffusers_state = policy.lora_state(), policy.adapter_state_dict()
    policy.fuse()
    fused_path, _ = policy.save_adapter(tmp_path / "fused")
    # the files' headers may order their metadata differently, so compare what they hold
    unfused, fused = load_file(unfused_path), load_file(fused_path)
    assert unfused.keys() == fused.keys() and all(torch.equal(unfused[k], fused[k]) for k in unfused)
    assert all(torch.equal(v, policy.lora_state()[k]) for k, v in state.items())
    assert all(torch.equal(v, policy.adapter_state_dict()[k]) for k, v in diffusers_state.items())
