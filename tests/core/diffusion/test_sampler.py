import numpy as np
import pytest
import torch

from core.diffusion.conditioning import guided_noise
from core.diffusion.ddim import ddim_schedule, ddim_step_mean, gaussian_log_prob
from core.diffusion.sampler import (
    SamplerSettings,
    TrajectoryLatents,
    encode_prompts,
    sample_trajectories,
)
from tests.core.diffusion.conftest import PROMPTS, SEEDS


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_sampler_is_bit_exact_against_the_stock_pipeline(make_pipe, settings, kind):
    pipe = make_pipe(kind)
    ours = sample_trajectories(pipe, PROMPTS, SEEDS, settings)
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    stock = pipe(
        PROMPTS,
        num_inference_steps=settings.num_steps,
        guidance_scale=settings.guidance_scale,
        eta=settings.eta,
        generator=generators,
        output_type="np",
    ).images
    assert ours.images.shape == stock.shape == (2, 64, 64, 3)
    assert np.array_equal(ours.images, stock)
    assert ours.latents.shape == (2, settings.num_steps + 1, 4, 32, 32)
    assert ours.log_probs.shape == (2, settings.num_steps)
    assert ours.timesteps.tolist() == pipe.scheduler.timesteps.tolist()
    # different seeds give different images, the same seed the same one
    assert not np.array_equal(ours.images[0], ours.images[1])


def test_recorded_log_probs_match_a_recomputation_from_the_latents(make_pipe, settings):
    pipe = make_pipe()
    batch = sample_trajectories(pipe, PROMPTS, SEEDS, settings)
    schedule = ddim_schedule(pipe.scheduler, settings.num_steps)
    cond = encode_prompts(pipe, PROMPTS, settings)
    i = 1
    with torch.no_grad():
        eps = guided_noise(
            pipe.unet, batch.latents[:, i], schedule.timesteps[i], cond, settings.guidance_scale
        )
        mean, std = ddim_step_mean(
            eps, batch.latents[:, i], schedule.alpha_prod_t[i], schedule.alpha_prod_t_prev[i]
        )
    recomputed = gaussian_log_prob(batch.latents[:, i + 1], mean, std)
    torch.testing.assert_close(recomputed, batch.log_probs[:, i], rtol=1e-4, atol=1e-4)
    # mean reduction of a standard-normal draw: about -0.5 - log(std) - log sqrt(2 pi)
    expected = -0.5 - torch.log(std) - 0.5 * np.log(2 * np.pi)
    assert torch.allclose(batch.log_probs[:, i], expected.expand(2), atol=0.1)


def test_trajectory_round_trips_through_safetensors(make_pipe, settings, tmp_path):
    pipe = make_pipe()
    batch = sample_trajectories(pipe, ["un chat très mignon 🐱"], [5], settings)
    original = batch.trajectory(0)
    original.save(tmp_path / "t.safetensors")
    loaded = TrajectoryLatents.load(tmp_path / "t.safetensors")
    assert loaded.prompt == "un chat très mignon 🐱" and loaded.seed == 5
    assert loaded.settings == settings
    assert loaded.latents.dtype == torch.float16
    assert torch.equal(loaded.latents, original.latents.to(torch.float16))
    assert torch.equal(loaded.log_probs, original.log_probs)
    assert torch.equal(loaded.timesteps, original.timesteps)
    # fp16 storage rounds each latent to 11 significant bits: relative error at most 2^-11
    error = (loaded.latents.float() - original.latents).abs()
    assert bool((error <= original.latents.abs() * 2**-11 + 1e-7).all())


def test_bad_sampler_input_is_refused(make_pipe):
    with pytest.raises(ValueError, match="eta must be > 0"):
        SamplerSettings(eta=0.0)
    with pytest.raises(ValueError, match="multiple of 8"):
        SamplerSettings(height=30)
    with pytest.raises(ValueError, match="one seed per prompt"):
        sample_trajectories(make_pipe(), ["a", "b"], [1], SamplerSettings(num_steps=2))
    with pytest.raises(ValueError, match="not a DenseAlign trajectory"):
        from safetensors.torch import save

        TrajectoryLatents.from_bytes(save({"x": torch.zeros(1)}))


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_an_aligned_pair_shares_z0_and_the_stock_pipeline_redraws_it(make_pipe, settings, kind):
    """Two samples with one z0 seed and two step seeds: the same initial noise, then diverging paths;
    the stock call redraws each from `latents=` (the z0 seed's draw) and `generator=` (the step seed)."""
    pipe = make_pipe(kind)
    prompt, z0_seed, step_seeds = PROMPTS[0], 1234, [7, 8]
    ours = sample_trajectories(pipe, [prompt, prompt], step_seeds, settings, z0_seeds=[z0_seed, z0_seed])
    assert torch.equal(ours.latents[0, 0], ours.latents[1, 0])
    assert not torch.equal(ours.latents[0, 1], ours.latents[1, 1])
    assert not np.array_equal(ours.images[0], ours.images[1])
    assert [ours.trajectory(i).extra for i in (0, 1)] == [{"z0_seed": z0_seed}] * 2
    # z_0 is the z0 seed's standard-normal draw, not the step seed's
    shape = ours.latents.shape[2:]
    z0 = torch.randn((1, *shape), generator=torch.Generator().manual_seed(z0_seed))
    assert torch.equal(ours.latents[0, 0], z0[0])
    # an unaligned sample of the same step seed starts elsewhere: the alignment is real
    plain = sample_trajectories(pipe, [prompt], [step_seeds[0]], settings)
    assert not torch.equal(plain.latents[0, 0], ours.latents[0, 0])
    assert plain.trajectory(0).extra == {}
    # one stock call for the batch (CPU kernels round differently by batch size)
    stock = pipe(
        [prompt, prompt],
        num_inference_steps=settings.num_steps,
        guidance_scale=settings.guidance_scale,
        eta=settings.eta,
        latents=torch.cat([z0, z0]),
        generator=[torch.Generator().manual_seed(seed) for seed in step_seeds],
        output_type="np",
    ).images
    assert np.array_equal(ours.images, stock)


def test_mixed_batches_keep_the_unaligned_samples_unchanged(make_pipe, settings):
    """A z0 seed on one sample leaves the other samples of the batch exactly as without any."""
    pipe = make_pipe()
    alone = sample_trajectories(pipe, PROMPTS, SEEDS, settings)
    mixed = sample_trajectories(pipe, PROMPTS, SEEDS, settings, z0_seeds=[None, 99])
    assert np.array_equal(alone.images[0], mixed.images[0])
    assert not np.array_equal(alone.images[1], mixed.images[1])
    with pytest.raises(ValueError, match="one z0 seed"):
        sample_trajectories(pipe, PROMPTS, SEEDS, settings, z0_seeds=[1])
