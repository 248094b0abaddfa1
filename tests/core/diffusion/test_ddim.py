import math

import pytest
import torch
from diffusers import DDIMScheduler

from core.diffusion.ddim import ddim_schedule, ddim_step_mean, gaussian_log_prob, gaussian_log_ratio
from core.diffusion.models import sd_scheduler


def test_log_prob_equals_closed_form_gaussian_for_both_reductions():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, 5, 5, generator=g)
    x = mean + 0.3 * torch.randn(3, 4, 5, 5, generator=g)
    std = torch.tensor([0.2, 0.5, 1.5]).view(3, 1, 1, 1)
    closed = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    reference = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x)
    torch.testing.assert_close(closed, reference)
    torch.testing.assert_close(
        gaussian_log_prob(x, mean, std, reduction="mean"), reference.mean(dim=(1, 2, 3))
    )
    torch.testing.assert_close(gaussian_log_prob(x, mean, std, reduction="sum"), reference.sum(dim=(1, 2, 3)))


def test_log_prob_of_hand_made_values():
    # one element: x = 1, mean = 0, std = 1 -> -0.5 - log sqrt(2 pi)
    x, mean = torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)
    value = gaussian_log_prob(x, mean, torch.tensor(1.0), reduction="sum")
    assert value.item() == pytest.approx(-0.5 - 0.5 * math.log(2 * math.pi), abs=1e-6)


def test_log_ratio_is_difference_of_log_probs_and_zero_for_equal_means():
    g = torch.Generator().manual_seed(1)
    x, m1, m2 = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    std = torch.tensor(0.7)
    for reduction in ("mean", "sum"):
        diff = gaussian_log_prob(x, m1, std, reduction=reduction) - gaussian_log_prob(
            x, m2, std, reduction=reduction
        )
        torch.testing.assert_close(
            gaussian_log_ratio(x, m1, m2, std, reduction=reduction), diff, atol=1e-5, rtol=1e-5
        )
    assert torch.equal(gaussian_log_ratio(x, m1, m1, std), torch.zeros(2))


def test_step_mean_and_std_match_diffusers_ddim_step():
    scheduler = sd_scheduler()
    schedule = ddim_schedule(scheduler, 10)
    g = torch.Generator().manual_seed(2)
    sample, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for i, t in enumerate(scheduler.timesteps):
        mean, std = ddim_step_mean(
            eps, sample, schedule.alpha_prod_t[i], schedule.alpha_prod_t_prev[i], eta=1.0
        )
        stock = scheduler.step(eps, t, sample, eta=1.0, variance_noise=torch.zeros_like(sample)).prev_sample
        assert torch.equal(mean, stock), f"step {i} mean differs from DDIMScheduler.step"
        prev = int(t) - 1000 // 10
        variance = scheduler._get_variance(int(t), prev)
        assert std.item() == pytest.approx(variance.sqrt().item(), rel=1e-6)
        noise = torch.randn(2, 4, 8, 8, generator=g)
        stock_noisy = scheduler.step(eps, t, sample, eta=1.0, variance_noise=noise).prev_sample
        assert torch.equal(mean + std * noise, stock_noisy)


def test_schedule_index_zero_is_the_noisiest_step():
    schedule = ddim_schedule(sd_scheduler(), 50)
    assert schedule.timesteps[0].item() == 981 and schedule.timesteps[-1].item() == 1
    assert bool((schedule.alpha_prod_t[1:] > schedule.alpha_prod_t[:-1]).all())
    # the last step lands on the scheduler's final alpha (alphas_cumprod[0] when set_alpha_to_one=False)
    assert schedule.alpha_prod_t_prev[-1].item() == pytest.approx(
        DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        .alphas_cumprod[0]
        .item()
    )


def test_zero_std_and_bad_arguments_raise():
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="std is 0"):
        gaussian_log_prob(x, x, torch.tensor(0.0))
    with pytest.raises(ValueError, match="reduction"):
        gaussian_log_prob(x, x, torch.tensor(1.0), reduction="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_steps"):
        ddim_schedule(sd_scheduler(), 0)
    with pytest.raises(ValueError, match="clip_sample"):
        ddim_schedule(DDIMScheduler(clip_sample=True), 4)
