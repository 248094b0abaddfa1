"""One optimizer step of discounted dense-reward DPO on a batch of labelled pairs.

Per pair (preferred trajectory w, rejected l, same prompt): draw M step indices from the discount
weights, the same for both trajectories; recompute each chosen step's log-ratio
log pi_theta(z_{i+1} | z_i) - log pi_ref(z_{i+1} | z_i) from the stored latents (METHOD.md: both use
the same guidance and share sigma_i, so it is a difference of squared distances to the two means);
then `dense_dpo_loss`. With `exact=True` every step is evaluated and weighted (`dense_dpo_loss_exact`).

Winners and losers of all pairs go through the UNet in one batch (2 * B * M rows, twice that with
guidance); the reference pass runs without gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from core.diffusion.ddim import DdimSchedule, ddim_step_mean, gaussian_log_ratio
from core.diffusion.loss import (
    check_dpo_hyperparameters,
    dense_dpo_loss,
    dense_dpo_loss_exact,
    discount_weights,
    implicit_scores,
    sample_step_indices,
)
from core.diffusion.policy import Policy
from core.diffusion.sampler import Conditioning, SamplerSettings, encode_prompts, guided_noise


@dataclass(frozen=True)
class DpoHyperparameters:
    """The loss and optimizer settings of one step; defaults are the paper's single-prompt column."""

    # Inverse temperature beta multiplying the clipped, weighted log-ratios; paper 10 (many prompts 12.5).
    beta: float = 10.0
    # Discount gamma in (0, 1]: weight gamma^i on step i (i = 0 noisiest); 1.0 = trajectory-level DPO.
    gamma: float = 0.9
    # Clip eps on each step's log-ratio, in the units of the sampler's reduction (mean: paper 1e-4).
    clip: float = 1e-4
    # Steps M drawn per trajectory from Categorical(weights); paper 3 (many prompts 1).
    num_sampled_steps: int = 3
    # Evaluate all N steps with the exact weighted loss instead of sampling M.
    exact: bool = False
    # Gradient-norm clip over the LoRA parameters; paper 1.0 (many prompts 0.05).
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        check_dpo_hyperparameters(gamma=self.gamma, beta=self.beta, clip=self.clip)
        if self.num_sampled_steps < 1:
            raise ValueError(
                f"num_sampled_steps (M) must be >= 1 (paper: 1 or 3), got {self.num_sampled_steps}"
            )
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 (paper: 1.0 or 0.05), got {self.max_grad_norm}")


@dataclass
class PairBatch:
    """B labelled pairs; latents as stored (float16 is fine), all sampled with `settings`."""

    prompts: list[str]
    latents_w: Tensor  # (B, num_steps + 1, C, H, W), the preferred trajectories
    latents_l: Tensor  # (B, num_steps + 1, C, H, W), the rejected trajectories
    settings: SamplerSettings

    def __post_init__(self) -> None:
        b = len(self.prompts)
        expected = (b, self.settings.num_steps + 1)
        for name in ("latents_w", "latents_l"):
            shape = tuple(getattr(self, name).shape)
            if shape[:2] != expected or len(shape) != 5:
                raise ValueError(
                    f"{name} must be (pairs={b}, num_steps+1={expected[1]}, C, H, W), got {shape}"
                )


@dataclass
class StepMetrics:
    """What one step measured. The loss stays near log 2 by design; watch accuracy and clipping."""

    loss: float
    implicit_accuracy: float  # share of pairs with s_w > s_l
    mean_abs_logratio: float
    clipped_share: float  # share of evaluated log-ratios outside [-clip, clip]
    grad_norm: float  # before clipping
    step_indices: Tensor  # (B, M) which steps were evaluated
    logratio_w: Tensor  # (B, M), detached
    logratio_l: Tensor  # (B, M), detached


def step_log_ratios(
    policy: Policy,
    latents: Tensor,
    next_latents: Tensor,
    step_idx: Tensor,
    cond: Conditioning,
    schedule: DdimSchedule,
    settings: SamplerSettings,
) -> Tensor:
    """log pi_theta - log pi_ref of z_{i+1} given z_i for rows (z_i, z_{i+1}, i). Returns (rows,)."""
    device = policy.unet.device
    latents = latents.to(device, torch.float32)
    next_latents = next_latents.to(device, torch.float32)
    step_idx = step_idx.to("cpu")
    t = schedule.timesteps[step_idx].to(device)
    alpha_t = schedule.alpha_prod_t[step_idx].view(-1, 1, 1, 1).to(device)
    alpha_prev = schedule.alpha_prod_t_prev[step_idx].view(-1, 1, 1, 1).to(device)
    eta, kind = settings.eta, schedule.prediction_type
    # The UNet runs in the pipeline's dtype; the step means and the log-ratio are formed in float32.
    unet_in = latents.to(policy.unet.dtype)
    eps_policy = guided_noise(policy.unet, unet_in, t, cond, settings.guidance_scale).float()
    mean_policy, std = ddim_step_mean(eps_policy, latents, alpha_t, alpha_prev, eta=eta, prediction_type=kind)
    with torch.no_grad(), policy.reference():
        eps_ref = guided_noise(policy.unet, unet_in, t, cond, settings.guidance_scale).float()
        mean_ref, _ = ddim_step_mean(eps_ref, latents, alpha_t, alpha_prev, eta=eta, prediction_type=kind)
    return gaussian_log_ratio(next_latents, mean_policy, mean_ref, std, reduction=settings.reduction)


def pair_log_ratios(
    policy: Policy, batch: PairBatch, step_idx: Tensor, schedule: DdimSchedule
) -> tuple[Tensor, Tensor]:
    """Log-ratios of both trajectories of every pair at the (B, M) steps `step_idx`. Returns two (B, M)."""
    b, m = step_idx.shape
    pair_rows = torch.arange(b).repeat_interleave(m)  # (B * M,)
    steps = step_idx.reshape(-1)  # (B * M,)
    both = torch.cat([batch.latents_w, batch.latents_l])  # (2B, N + 1, C, H, W)
    rows = torch.cat([pair_rows, pair_rows + b])  # (2BM,)
    z = both[rows, torch.cat([steps, steps])]  # (2BM, C, H, W)
    z_next = both[rows, torch.cat([steps, steps]) + 1]
    cond = encode_prompts(policy.pipe, batch.prompts, batch.settings).index(torch.cat([pair_rows, pair_rows]))
    ratios = step_log_ratios(policy, z, z_next, torch.cat([steps, steps]), cond, schedule, batch.settings)
    return ratios[: b * m].view(b, m), ratios[b * m :].view(b, m)


def train_step(
    policy: Policy,
    optimizer: torch.optim.Optimizer,
    batch: PairBatch,
    hp: DpoHyperparameters,
    schedule: DdimSchedule,
    generator: torch.Generator | None = None,
) -> StepMetrics:
    """One optimizer step on `batch`: sample steps, compute the loss, clip gradients, step."""
    if schedule.num_steps != batch.settings.num_steps:
        raise ValueError(
            f"schedule has {schedule.num_steps} steps but the pairs were sampled with {batch.settings.num_steps}"
        )
    b, n = len(batch.prompts), schedule.num_steps
    weights = discount_weights(n, hp.gamma)
    if hp.exact:
        step_idx = torch.arange(n).expand(b, n)
    else:
        step_idx = sample_step_indices(weights, b, hp.num_sampled_steps, generator=generator)
    optimizer.zero_grad(set_to_none=True)
    logratio_w, logratio_l = pair_log_ratios(policy, batch, step_idx, schedule)
    if hp.exact:
        loss = dense_dpo_loss_exact(
            logratio_w, logratio_l, weights.to(logratio_w.device), beta=hp.beta, clip=hp.clip
        )
    else:
        loss = dense_dpo_loss(logratio_w, logratio_l, beta=hp.beta, clip=hp.clip)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.lora_parameters(), hp.max_grad_norm)
    optimizer.step()
    with torch.no_grad():
        both = torch.cat([logratio_w, logratio_l])
        if hp.exact:
            w = weights.to(logratio_w.device)
            margin = ((logratio_w.clamp(-hp.clip, hp.clip) - logratio_l.clamp(-hp.clip, hp.clip)) * w).sum(
                dim=1
            )
        else:
            margin = implicit_scores(logratio_w, beta=hp.beta, clip=hp.clip) - implicit_scores(
                logratio_l, beta=hp.beta, clip=hp.clip
            )
        accuracy = (margin > 0).float().mean()
    return StepMetrics(
        loss=float(loss.detach()),
        implicit_accuracy=float(accuracy),
        mean_abs_logratio=float(both.abs().mean()),
        clipped_share=float((both.abs() > hp.clip).float().mean()),
        grad_norm=float(grad_norm),
        step_indices=step_idx.clone(),
        logratio_w=logratio_w.detach().cpu(),
        logratio_l=logratio_l.detach().cpu(),
    )


def make_optimizer(policy: Policy, *, lr: float = 3e-5, weight_decay: float = 2e-3) -> torch.optim.AdamW:
    """AdamW over the LoRA parameters only (paper single prompt: lr 3e-5, weight decay 2e-3)."""
    if not lr > 0:
        raise ValueError(f"learning rate must be > 0 (paper: 3e-5), got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0 (paper: 2e-3), got {weight_decay}")
    return torch.optim.AdamW(policy.lora_parameters(), lr=lr, weight_decay=weight_decay)
