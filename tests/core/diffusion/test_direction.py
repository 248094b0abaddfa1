"""Training learns towards the preferred trajectory: on the tiny pipeline, a few `train_step`s on fixed
pairs raise the winner's log-ratio over the loser's at every step, whatever steps were drawn.

The log-ratios are measured with `step_log_ratios` one trajectory at a time, not through
`pair_log_ratios` (which the step uses), so a winner/loser swap anywhere in the training path shows as
a margin of the wrong sign. At initialisation the adapter is zero, so policy == reference and every
log-ratio is exactly 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from core.diffusion.ddim import DdimSchedule, ddim_schedule
from core.diffusion.loss import implicit_scores
from core.diffusion.models import Pipeline
from core.diffusion.policy import LoraSettings, Policy
from core.diffusion.sampler import SamplerSettings, encode_prompts, sample_trajectories
from core.diffusion.training import PairBatch, make_optimizer, step_log_ratios, train_step
from core.settings import DpoConfig

PROMPTS = ["a red circle above a blue square", "a photo of a cat"]
# 16 px images (8x8 latents) keep each test to a few seconds of CPU; 4 DDIM steps.
SETTINGS = SamplerSettings(num_steps=4, guidance_scale=7.5, eta=1.0, height=16, width=16)


def trajectory_log_ratios(
    policy: Policy,
    latents: torch.Tensor,
    prompts: list[str],
    settings: SamplerSettings,
    schedule: DdimSchedule,
) -> torch.Tensor:
    """log pi_theta - log pi_ref of every step of each trajectory, one row per trajectory. (rows, N)"""
    rows, n = latents.shape[0], settings.num_steps
    which = torch.arange(rows).repeat_interleave(n)
    cond = encode_prompts(policy.pipe, prompts, settings).index(which)
    z, z_next = latents[which, torch.arange(n).repeat(rows)], latents[which, torch.arange(n).repeat(rows) + 1]
    with torch.no_grad():
        ratios = step_log_ratios(policy, z, z_next, torch.arange(n).repeat(rows), cond, schedule, settings)
    return ratios.view(rows, n)


def train_and_measure(
    make_pipe: Callable[..., Pipeline], hp: DpoConfig, steps: int
) -> tuple[list[float], torch.Tensor, torch.Tensor]:
    """Each step's implicit accuracy, and the winners' and losers' log-ratios at every step after them."""
    settings = SETTINGS
    policy = Policy(make_pipe(), LoraSettings(rank=2))
    # Two pairs: trajectory 0 beats 1 for the first prompt, 3 beats 2 for the second.
    sampled = sample_trajectories(policy.pipe, [p for p in PROMPTS for _ in "ab"], [11, 12, 13, 14], settings)
    latents = sampled.latents.half()
    winners, losers = latents[[0, 3]], latents[[1, 2]]
    batch = PairBatch(PROMPTS, winners, losers, settings)
    schedule = ddim_schedule(policy.pipe.scheduler, settings.num_steps)
    before_w = trajectory_log_ratios(policy, winners, PROMPTS, settings, schedule)
    before_l = trajectory_log_ratios(policy, losers, PROMPTS, settings, schedule)
    assert torch.equal(before_w, torch.zeros(2, settings.num_steps))
    assert torch.equal(before_l, torch.zeros(2, settings.num_steps))
    optimizer = make_optimizer(policy, lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    accuracy = [
        train_step(policy, optimizer, batch, hp, schedule, generator).implicit_accuracy for _ in range(steps)
    ]
    after_w = trajectory_log_ratios(policy, winners, PROMPTS, settings, schedule)
    after_l = trajectory_log_ratios(policy, losers, PROMPTS, settings, schedule)
    return accuracy, after_w, after_l


def test_sampled_steps_raise_the_winners_score_over_the_losers(make_pipe):
    hp = DpoConfig(beta=10.0, clip=1.0, sampled_steps=2, max_grad_norm=1.0)
    accuracy, lw, ll = train_and_measure(make_pipe, hp, steps=3)
    # Step 1 sees log-ratios of exactly 0 (no pair is ahead); from step 2 on every pair is.
    assert accuracy[0] == 0.0 and accuracy[1:] == [1.0, 1.0]
    # The implicit score at fixed step indices (the two noisiest, and all four) rose for the winner
    # over the loser, in both pairs, by a clear margin.
    for fixed in ([0, 1], [0, 1, 2, 3]):
        s_w = implicit_scores(lw[:, fixed], beta=hp.beta, clip=hp.clip)
        s_l = implicit_scores(ll[:, fixed], beta=hp.beta, clip=hp.clip)
        assert bool((s_w - s_l > 0.01).all()), f"steps {fixed}: s_w - s_l = {(s_w - s_l).tolist()}"


def test_exact_steps_raise_the_winners_weighted_score_over_the_losers(make_pipe):
    hp = DpoConfig(beta=10.0, gamma=0.9, clip=1.0, exact=True, max_grad_norm=1.0)
    accuracy, lw, ll = train_and_measure(make_pipe, hp, steps=2)
    assert accuracy == [0.0, 1.0]
    weights = torch.tensor([0.9**i for i in range(SETTINGS.num_steps)])
    weights = weights / weights.sum()
    weighted = ((lw - ll) * weights).sum(dim=1)  # (pairs,)
    assert bool((weighted > 1e-3).all()), weighted.tolist()
