"""One DDIM step (eta > 0: a Gaussian policy) and the log-density of a given next latent under it.

The arithmetic follows diffusers' `DDIMScheduler.step` operation for operation (same order, same
float32 scalars), so a trajectory sampled here is bit-identical on CPU to the stock pipeline's.
What is added: the step's mean and standard deviation are returned, so that the log-probability of
the next latent (METHOD.md, "Notation") can be evaluated for the sampler and for training.

Notation (variable -> symbol in METHOD.md / the DDIM paper, Song et al. 2021, eq. 12 and 16):
- `sample`             -> z_i, the latent entering step i (i = 0 is the noisiest)
- `next_sample`        -> z_{i+1}
- `eps`                -> eps_hat, the classifier-free-guided noise prediction
- `alpha_prod_t`       -> abar_t at the step's timestep
- `alpha_prod_t_prev`  -> abar_prev (the scheduler's final alpha for the last step)
- `pred_original`      -> x0_hat
- `std_dev_t`          -> sigma_i = eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
- `mean`               -> mu(z_i, t_i, c)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Reduction = Literal["mean", "sum"]
PredictionType = Literal["epsilon", "v_prediction", "sample"]
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass(frozen=True)
class DdimSchedule:
    """The per-step constants of an N-step DDIM schedule, index 0 = the noisiest step."""

    timesteps: Tensor  # (num_steps,) int64, descending, as the scheduler runs them
    alpha_prod_t: Tensor  # (num_steps,) float32, abar at each step's timestep
    alpha_prod_t_prev: Tensor  # (num_steps,) float32, abar at the step it lands on
    prediction_type: PredictionType

    # what the denoiser is given is the timestep itself (FlowSchedule's FLUX divides it by 1000)
    timestep_scale = 1.0

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def step_constants(self, i: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
        """(abar_t, abar_prev) of step i, 0-dim, on `device`."""
        return self.alpha_prod_t[i].to(device), self.alpha_prod_t_prev[i].to(device)

    def row_constants(self, step_idx: Tensor) -> tuple[Tensor, Tensor]:
        """(abar_t, abar_prev) for each row's step index, shaped (rows, 1, 1, 1)."""
        step_idx = step_idx.to("cpu")
        return self.alpha_prod_t[step_idx].view(-1, 1, 1, 1), self.alpha_prod_t_prev[step_idx].view(
            -1, 1, 1, 1
        )

    def step(
        self, model_output: Tensor, sample: Tensor, alpha_t: Tensor, alpha_prev: Tensor, *, eta: float
    ) -> tuple[Tensor, Tensor]:
        """(mean, std) of the step from `sample` given the rows' constants (`row_constants`)."""
        return ddim_step_mean(
            model_output, sample, alpha_t, alpha_prev, eta=eta, prediction_type=self.prediction_type
        )


def ddim_schedule(scheduler: object, num_steps: int, device: torch.device | str = "cpu") -> DdimSchedule:
    """Read the step constants a diffusers `DDIMScheduler` would use for `num_steps` steps.

    `set_timesteps` is called on the scheduler (as the pipeline does), so its state matches a stock
    call. The previous-timestep rule is the scheduler's own: t - num_train_timesteps // num_steps.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    config = scheduler.config  # type: ignore[attr-defined]
    if config.get("thresholding") or config.get("clip_sample"):
        raise ValueError(
            "the scheduler clips or thresholds x0 (clip_sample/thresholding), which makes the step "
            "non-Gaussian; load it with clip_sample=False, thresholding=False"
        )
    scheduler.set_timesteps(num_steps, device=device)  # type: ignore[attr-defined]
    timesteps = scheduler.timesteps.to("cpu")  # type: ignore[attr-defined]
    alphas_cumprod = scheduler.alphas_cumprod  # type: ignore[attr-defined]
    final = scheduler.final_alpha_cumprod  # type: ignore[attr-defined]
    stride = config.num_train_timesteps // num_steps
    prod_t, prod_prev = [], []
    for t in timesteps.tolist():
        prev = t - stride
        prod_t.append(alphas_cumprod[t])
        prod_prev.append(alphas_cumprod[prev] if prev >= 0 else final)
    return DdimSchedule(
        timesteps=timesteps,
        alpha_prod_t=torch.stack(prod_t).to(torch.float32),
        alpha_prod_t_prev=torch.stack(prod_prev).to(torch.float32),
        prediction_type=config.prediction_type,
    )


def guide(eps_uncond: Tensor, eps_cond: Tensor, guidance_scale: float) -> Tensor:
    """Classifier-free guidance, written exactly as the stock pipelines write it."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def ddim_step_mean(
    model_output: Tensor,
    sample: Tensor,
    alpha_prod_t: Tensor,
    alpha_prod_t_prev: Tensor,
    *,
    eta: float = 1.0,
    prediction_type: PredictionType = "epsilon",
) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation of p(z_{i+1} | z_i) for one DDIM step.

    `model_output` and `sample` are (batch, C, H, W); the alphas are 0-dim (one timestep for the
    whole batch) or broadcastable to (batch, 1, 1, 1) (a timestep per sample, as in training).
    Returns `(mean, std)` with std broadcastable against `mean`.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    # 1. alphas, betas
    beta_prod_t = 1 - alpha_prod_t
    # 2. predicted x_0 and predicted noise
    if prediction_type == "epsilon":
        pred_original = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
        pred_epsilon = model_output
    elif prediction_type == "v_prediction":
        pred_original = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
        pred_epsilon = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
    elif prediction_type == "sample":
        pred_original = model_output
        pred_epsilon = (sample - alpha_prod_t ** (0.5) * pred_original) / beta_prod_t ** (0.5)
    else:
        raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {prediction_type!r}")
    # 3. sigma_t(eta), DDIM eq. 16
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance ** (0.5)
    # 4. direction pointing to x_t, then the mean of x_{t-1}, DDIM eq. 12
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * pred_epsilon
    mean = alpha_prod_t_prev ** (0.5) * pred_original + pred_sample_direction
    return mean, std_dev_t


def gaussian_log_prob(
    next_sample: Tensor, mean: Tensor, std: Tensor, *, reduction: Reduction = "mean"
) -> Tensor:
    """log N(next_sample; mean, std^2 I), reduced over all but the batch dimension.

    "mean" averages over the C*H*W latent elements (the paper's code; beta and the clip are in these
    units), "sum" gives the true log-density. Returns (batch,).
    """
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    if bool((std <= 0).any()):
        raise ValueError(
            "the step's std is 0 (eta = 0 or a last step landing on alpha 1): no log-density exists"
        )
    elementwise = -((next_sample - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return _reduce(elementwise, reduction)


def gaussian_log_ratio(
    next_sample: Tensor, mean_policy: Tensor, mean_ref: Tensor, std: Tensor, *, reduction: Reduction = "mean"
) -> Tensor:
    """log pi_theta(z_{i+1}) - log pi_ref(z_{i+1}) for two Gaussians that share `std`.

    Computed as ((z - mu_ref)^2 - (z - mu_theta)^2) / (2 sigma^2) element-wise before reducing, which
    keeps the tiny differences the clip works with (1e-4) out of float32 cancellation. (batch,).
    """
    std = torch.as_tensor(std, dtype=mean_policy.dtype, device=mean_policy.device)
    elementwise = ((next_sample - mean_ref) ** 2 - (next_sample - mean_policy) ** 2) / (2 * std**2)
    return _reduce(elementwise, reduction)


def _reduce(elementwise: Tensor, reduction: Reduction) -> Tensor:
    dims = tuple(range(1, elementwise.ndim))
    if reduction == "mean":
        return elementwise.mean(dim=dims)
    if reduction == "sum":
        return elementwise.sum(dim=dims)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
