"""Discounted dense-reward DPO (Yang, Chen and Zhou, ICML 2024, arXiv:2402.08265), as pure tensor functions.

The paper (Sec. 3) gives each denoising step its own latent reward and discounts it by gamma^i
along the reverse chain, so the first, noisiest steps (i = 0, which fix layout and high-level
attributes) weigh most. With the step log-ratio l_i = log pi_theta - log pi_ref of step i, the
clipped term c_i = clamp(l_i, -clip, clip) and normalised weights w_i = gamma^i / sum_j gamma^j, a
trajectory's score is s = beta * sum_i w_i c_i and a pair's loss is -log sigmoid(s_w - s_l).

Training estimates the sum with M step indices drawn i.i.d. from Categorical(w), the same indices
for both trajectories of a pair (`sample_step_indices` + `dense_dpo_loss`). `dense_dpo_loss_exact`
evaluates all N steps and is what the estimator is unbiased for; use it for tests and small N.

gamma = 1 gives uniform weights: trajectory-level ("bandit") DPO, the paper's main baseline. It is a
first-class setting, not a special case.

Shapes: B pairs, M sampled steps, N steps in a trajectory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def check_dpo_hyperparameters(
    *, gamma: float | None = None, beta: float | None = None, clip: float | None = None
) -> None:
    """Raise a ValueError naming the value when a hyper-parameter is outside its domain."""
    if gamma is not None and not 0.0 < gamma <= 1.0:
        raise ValueError(
            f"gamma must be in (0, 1] (1.0 = trajectory-level DPO, paper default 0.9), got {gamma}"
        )
    if beta is not None and not beta > 0.0:
        raise ValueError(f"beta must be > 0 (paper default 10), got {beta}")
    if clip is not None and not clip > 0.0:
        raise ValueError(f"clip must be > 0 (paper default 1e-4 for mean-reduced log-probs), got {clip}")


def discount_weights(num_steps: int, gamma: float) -> Tensor:
    """w_i = gamma^i / sum_j gamma^j for i = 0 .. num_steps - 1, i = 0 the noisiest step. (num_steps,)"""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    check_dpo_hyperparameters(gamma=gamma)
    powers = torch.arange(num_steps, dtype=torch.float64)
    weights = torch.pow(torch.tensor(gamma, dtype=torch.float64), powers)
    return (weights / weights.sum()).to(torch.float32)


def sample_step_indices(
    weights: Tensor, batch_size: int, num_samples: int, generator: torch.Generator | None = None
) -> Tensor:
    """Draw (batch_size, num_samples) step indices i.i.d. from Categorical(weights).

    One row per pair: both trajectories of a pair are evaluated at the same indices.
    """
    if weights.ndim != 1 or weights.numel() == 0:
        raise ValueError(f"weights must be a non-empty 1-D tensor, got shape {tuple(weights.shape)}")
    if bool((weights < 0).any()) or not float(weights.sum()) > 0:
        raise ValueError("weights must be non-negative with a positive sum")
    if batch_size < 1 or num_samples < 1:
        raise ValueError(f"batch_size and num_samples must be >= 1, got {batch_size} and {num_samples}")
    flat = torch.multinomial(
        weights.to(torch.float64).expand(batch_size, -1), num_samples, replacement=True, generator=generator
    )
    return flat.to(torch.long)  # (batch_size, num_samples)


def dense_dpo_loss(
    logratio_w: Tensor,
    logratio_l: Tensor,
    *,
    beta: float,
    clip: float,
    pair_weights: Tensor | None = None,
) -> Tensor:
    """Sampled-step loss: s = beta * mean_m clamp(l_m, -clip, clip); mean over pairs of -log sigmoid(s_w - s_l).

    `logratio_w`, `logratio_l`: (B, M) policy-minus-reference log-ratios of the preferred and the
    rejected trajectory at the same M sampled steps. `pair_weights` (B,): each pair's term is scaled by
    its weight before the mean (how sure its labels are; core/reliability.py), None = all 1.
    """
    _check_pair_shapes(logratio_w, logratio_l)
    check_dpo_hyperparameters(beta=beta, clip=clip)
    score_w = beta * logratio_w.clamp(-clip, clip).mean(dim=1)  # (B,)
    score_l = beta * logratio_l.clamp(-clip, clip).mean(dim=1)  # (B,)
    return _weighted_mean(-F.logsigmoid(score_w - score_l), pair_weights)


def dense_dpo_loss_exact(
    logratio_w: Tensor,
    logratio_l: Tensor,
    weights: Tensor,
    *,
    beta: float,
    clip: float,
    pair_weights: Tensor | None = None,
) -> Tensor:
    """All-steps loss: s = beta * sum_i weights_i * clamp(l_i, -clip, clip). Inputs (B, N), weights (N,);
    `pair_weights` as in `dense_dpo_loss`."""
    _check_pair_shapes(logratio_w, logratio_l)
    if weights.shape != (logratio_w.shape[1],):
        raise ValueError(
            f"weights must have shape ({logratio_w.shape[1]},) to match the log-ratios' N, got {tuple(weights.shape)}"
        )
    check_dpo_hyperparameters(beta=beta, clip=clip)
    w = weights.to(logratio_w.dtype)
    score_w = beta * (logratio_w.clamp(-clip, clip) * w).sum(dim=1)  # (B,)
    score_l = beta * (logratio_l.clamp(-clip, clip) * w).sum(dim=1)  # (B,)
    return _weighted_mean(-F.logsigmoid(score_w - score_l), pair_weights)


def _weighted_mean(losses: Tensor, pair_weights: Tensor | None) -> Tensor:
    """mean_b(w_b * loss_b); the plain mean without weights."""
    if pair_weights is None:
        return losses.mean()
    if pair_weights.shape != losses.shape:
        raise ValueError(
            f"pair_weights must have one weight per pair, shape {tuple(losses.shape)}, got {tuple(pair_weights.shape)}"
        )
    if bool((pair_weights < 0).any()):
        raise ValueError("pair_weights must be non-negative")
    return (losses * pair_weights.to(losses)).mean()


def implicit_scores(logratio: Tensor, *, beta: float, clip: float) -> Tensor:
    """The sampled-step score s of each row of a (B, M) log-ratio tensor, for monitoring. (B,)"""
    return beta * logratio.clamp(-clip, clip).mean(dim=1)


def _check_pair_shapes(logratio_w: Tensor, logratio_l: Tensor) -> None:
    if logratio_w.ndim != 2 or logratio_w.shape != logratio_l.shape:
        raise ValueError(
            "logratio_w and logratio_l must both be (pairs, steps) with the same shape, got "
            f"{tuple(logratio_w.shape)} and {tuple(logratio_l.shape)}"
        )
