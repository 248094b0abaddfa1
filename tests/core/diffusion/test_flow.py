"""Flow-matching families (SD3, FLUX): the SDE step, the sampler against the stock pipelines, the
trainer's recomputation, the LoRA on the transformer and its files, on tiny pipelines built in code."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.diffusion.export import export_adapter
from core.diffusion.flow import flow_step_mean, pack_latents, unpack_latents
from core.diffusion.models import load_pipeline
from core.diffusion.policy import AdapterMismatchError, LoraSettings, Policy
from core.diffusion.sampler import (
    SamplerSettings,
    TrajectoryLatents,
    encode_prompts,
    sample_trajectories,
    step_schedule,
)
from core.diffusion.training import (
    PairBatch,
    make_optimizer,
    pair_log_ratios,
    step_log_probs,
    train_step,
)
from core.settings import DpoConfig
from tests.core.diffusion.conftest import PROMPTS, SEEDS

FAMILIES = ["sd3", "flux"]
# SD3 uses classifier-free guidance (w > 1 runs both branches); FLUX embeds w (its default 3.5).
GUIDANCE = {"sd3": 4.0, "flux": 3.5}


def flow_settings(kind: str, *, eta: float = 0.7) -> SamplerSettings:
    return SamplerSettings(num_steps=4, guidance_scale=GUIDANCE[kind], eta=eta)


def stock_images(pipe, kind: str, prompts=PROMPTS, seeds=SEEDS) -> np.ndarray:
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(
        prompts,
        num_inference_steps=4,
        guidance_scale=GUIDANCE[kind],
        generator=generators,
        output_type="np",
    ).images


def randomise_lora(policy: Policy, seed: int = 0) -> None:
    """Make the adapter non-trivial (B = 0 at init would leave the policy equal to the base)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in policy.lora_parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


# ---- the step itself -------------------------------------------------------------------------


def test_sde_step_matches_its_closed_form_and_the_gaussian_log_density():
    gen = torch.Generator().manual_seed(0)
    z, v = torch.randn(2, 16, 4, 4, generator=gen), torch.randn(2, 16, 4, 4, generator=gen)
    sigma, sigma_next, a = 0.8, 0.6, 0.7
    mean, std = flow_step_mean(
        v, z, torch.tensor(sigma), torch.tensor(sigma_next), sigma_max=torch.tensor(0.9), noise_level=a
    )
    # by hand, in float64: std_t = a sqrt(s / (1 - s)); dt = s' - s
    std_t = a * math.sqrt(sigma / (1 - sigma))
    dt = sigma_next - sigma
    z64, v64 = z.double(), v.double()
    expected = z64 * (1 + std_t**2 / (2 * sigma) * dt) + v64 * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    assert torch.allclose(mean.double(), expected, atol=1e-6)
    assert float(std) == pytest.approx(std_t * math.sqrt(-dt), rel=1e-6)
    # the first step (sigma = 1) reads sigma_max in the denominator, as Flow-GRPO does
    _, std_first = flow_step_mean(
        v, z, torch.tensor(1.0), torch.tensor(0.9), sigma_max=torch.tensor(0.9), noise_level=a
    )
    assert float(std_first) == pytest.approx(a * math.sqrt(1.0 / 0.1) * math.sqrt(0.1), rel=1e-5)
    # with a = 0 it is the stock Euler step, bit for bit
    euler, zero = flow_step_mean(
        v, z, torch.tensor(sigma), torch.tensor(sigma_next), sigma_max=torch.tensor(0.9), noise_level=0.0
    )
    assert torch.equal(euler, z + (torch.tensor(sigma_next) - torch.tensor(sigma)) * v) and float(zero) == 0.0


def test_pack_and_unpack_are_inverse_permutations():
    x = torch.randn(2, 16, 8, 6)
    packed = pack_latents(x)
    assert packed.shape == (2, 4 * 3, 64)
    assert torch.equal(unpack_latents(packed, 8, 6), x)
    assert torch.equal(packed.sort(dim=-1).values.flatten().sort().values, x.flatten().sort().values)


# ---- the sampler -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", FAMILIES)
def test_noise_free_chain_equals_the_stock_pipeline_bit_for_bit(kind):
    pipe = load_pipeline(f"tiny:{kind}")
    ours = sample_trajectories(pipe, PROMPTS, SEEDS, flow_settings(kind), deterministic=True)
    stock = stock_images(pipe, kind)
    assert ours.images.shape == stock.shape == (2, 64, 64, 3)
    assert np.array_equal(ours.images, stock)
    # ... and the SDE chain is a different draw
    noisy = sample_trajectories(pipe, PROMPTS, SEEDS, flow_settings(kind))
    assert np.abs(noisy.images - stock).max() > 1e-3


@pytest.mark.parametrize("kind", FAMILIES)
def test_recorded_log_probs_equal_the_trainers_recomputation_and_the_ratio_is_one_on_policy(kind):
    policy = Policy(load_pipeline(f"tiny:{kind}"), LoraSettings(rank=2))
    randomise_lora(policy)  # on-policy with a non-trivial adapter, not just the base
    settings = flow_settings(kind)
    batch = sample_trajectories(policy.pipe, PROMPTS, SEEDS, settings)
    n = settings.num_steps
    assert batch.log_probs.shape == (2, n) and torch.isfinite(batch.log_probs).all()
    rows = torch.arange(2).repeat_interleave(n)
    steps = torch.arange(n).repeat(2)
    cond = encode_prompts(policy.pipe, PROMPTS, settings).index(rows)
    schedule = step_schedule(policy.pipe, settings)
    recomputed = step_log_probs(
        policy, batch.latents[rows, steps], batch.latents[rows, steps + 1], steps, cond, schedule, settings
    )
    ratio = torch.exp(recomputed - batch.log_probs.reshape(-1))
    assert (ratio - 1).abs().max() < 1e-5
    # the log-ratio against the reference is 0 when the adapter is off (version = reference)
    policy.reset_adapter()
    pairs = PairBatch(PROMPTS[:1], batch.latents[:1], batch.latents[1:], settings)
    lw, ll = pair_log_ratios(policy, pairs, torch.tensor([[0, n - 1]]), schedule)
    assert torch.equal(lw, torch.zeros(1, 2)) and torch.equal(ll, torch.zeros(1, 2))


def test_flow_trajectory_round_trips_with_float_timesteps():
    pipe = load_pipeline("tiny:sd3")
    batch = sample_trajectories(pipe, PROMPTS[:1], SEEDS[:1], flow_settings("sd3"))
    traj = batch.trajectory(0)
    back = TrajectoryLatents.from_bytes(traj.to_bytes())
    assert back.timesteps.dtype == torch.float32
    assert torch.equal(back.timesteps, batch.timesteps) and back.timesteps[0] == 1000.0
    assert torch.equal(back.log_probs, batch.log_probs[0])


# ---- the policy ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", FAMILIES)
def test_one_training_step_moves_every_lora_parameter_and_no_base_parameter(kind):
    policy = Policy(load_pipeline(f"tiny:{kind}"), LoraSettings(rank=2))
    settings = flow_settings(kind)
    batch = sample_trajectories(policy.pipe, PROMPTS, SEEDS, settings)
    pairs = PairBatch(PROMPTS[:1], batch.latents[:1], batch.latents[1:], settings)
    schedule = step_schedule(policy.pipe, settings)
    hp = DpoConfig(gamma=0.9, sampled_steps=2, lr=1e-2)
    optimizer = make_optimizer(policy, lr=hp.lr)
    lora_before = {n: p.detach().clone() for n, p in policy.denoiser.named_parameters() if ".lora_" in n}
    base_before = {n: p.detach().clone() for n, p in policy.denoiser.named_parameters() if ".lora_" not in n}
    gen = torch.Generator().manual_seed(0)
    metrics = [train_step(policy, optimizer, pairs, hp, schedule, generator=gen) for _ in range(2)]
    assert metrics[0].loss == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at the start
    after = dict(policy.denoiser.named_parameters())
    assert len(lora_before) > 0
    unmoved = [n for n, p in lora_before.items() if torch.equal(p, after[n])]
    assert not unmoved, f"LoRA parameters that did not move: {unmoved[:3]}"
    assert all(torch.equal(p, after[n]) for n, p in base_before.items())


@pytest.mark.parametrize("kind", FAMILIES)
def test_saved_adapter_reproduces_the_policy_in_a_stock_pipeline(kind, tmp_path):
    policy = Policy(load_pipeline(f"tiny:{kind}"), LoraSettings(rank=2))
    randomise_lora(policy)
    ours = sample_trajectories(policy.pipe, PROMPTS, SEEDS, flow_settings(kind), deterministic=True)
    path, sha = policy.save_adapter(tmp_path)
    assert len(sha) == 64
    stock = load_pipeline(f"tiny:{kind}")
    base = stock_images(stock, kind)
    stock.load_lora_weights(tmp_path)
    with_lora = stock_images(stock, kind)
    assert np.abs(with_lora - base).max() > 1e-3  # the adapter was loaded, not silently dropped
    assert np.array_equal(with_lora, ours.images)


@pytest.mark.parametrize("fused", [False, True])
def test_hot_swap_and_swap_back_restore_outputs_exactly(tmp_path, fused):
    policy = Policy(load_pipeline("tiny:sd3"), LoraSettings(rank=2))
    if fused:
        policy.fuse()
    settings = flow_settings("sd3")
    base = sample_trajectories(policy.pipe, PROMPTS, SEEDS, settings).images
    trained = Policy(load_pipeline("tiny:sd3"), LoraSettings(rank=2))
    randomise_lora(trained)
    trained.save_adapter(tmp_path)
    expected = sample_trajectories(trained.pipe, PROMPTS, SEEDS, settings).images
    policy.hot_swap(tmp_path)
    swapped = sample_trajectories(policy.pipe, PROMPTS, SEEDS, settings).images
    if fused:  # fused weights differ from the unfused LoRA path by float rounding only
        assert np.abs(swapped - expected).max() < 1e-4
    else:
        assert np.array_equal(swapped, expected)
    policy.reset_adapter()
    assert np.array_equal(sample_trajectories(policy.pipe, PROMPTS, SEEDS, settings).images, base)


def test_an_adapter_of_another_family_is_refused_with_a_clear_message(tmp_path):
    sd = Policy(load_pipeline("tiny:sd"), LoraSettings(rank=2))
    sd.save_adapter(tmp_path)
    sd3 = Policy(load_pipeline("tiny:sd3"), LoraSettings(rank=2))
    with pytest.raises(AdapterMismatchError, match="trained on a unet .*runs a sd3 model"):
        sd3.hot_swap(tmp_path)
    with pytest.raises(AdapterMismatchError, match="version 3 was trained on a flux model.*runs a sd3 model"):
        sd3.load_published(None, "policies/v3/x", "0" * 64, family="flux", version=3)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", FAMILIES)
def test_bf16_sampling_and_a_training_step_stay_finite(kind):
    policy = Policy(load_pipeline(f"tiny:{kind}", dtype=torch.bfloat16), LoraSettings(rank=2))
    settings = flow_settings(kind)
    batch = sample_trajectories(policy.pipe, PROMPTS, SEEDS, settings)
    assert torch.isfinite(batch.latents).all() and torch.isfinite(batch.log_probs).all()
    assert np.isfinite(batch.images).all()
    pairs = PairBatch(PROMPTS[:1], batch.latents[:1], batch.latents[1:], settings)
    hp = DpoConfig(gamma=0.9, sampled_steps=2, lr=1e-2)
    optimizer = make_optimizer(policy, lr=hp.lr)
    schedule = step_schedule(policy.pipe, settings)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        metrics = train_step(policy, optimizer, pairs, hp, schedule, generator=gen)
        assert math.isfinite(metrics.loss) and math.isfinite(metrics.grad_norm)
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in policy.lora_parameters())


def test_kohya_export_of_a_transformer_adapter_says_to_use_the_diffusers_format(tmp_path):
    policy = Policy(load_pipeline("tiny:sd3"), LoraSettings(rank=2))
    path, _ = policy.save_adapter(tmp_path / "adapter")
    with pytest.raises(ValueError, match="SD3/FLUX transformer.*--format diffusers"):
        export_adapter(path, tmp_path / "out", "kohya")
    copied = export_adapter(path, tmp_path / "out", "diffusers")
    assert copied.read_bytes() == path.read_bytes()
