"""One stochastic flow-matching step (SD3 / FLUX) with a Gaussian transition, and its schedule.

Flow-matching models predict a velocity v(z, sigma) along the straight path z_sigma = (1 - sigma) x0 +
sigma * noise; the stock sampler (diffusers' `FlowMatchEulerDiscreteScheduler.step`) takes the Euler
step z_next = z + (sigma_next - sigma) * v, which is deterministic and so has no log-density. Following
Flow-GRPO (Liu et al. 2025, arXiv 2505.05470, section 4.1) the step is replaced by the Euler-Maruyama
step of the reverse-time SDE with the same marginals, whose transition is Gaussian:

    std_t     = a * sqrt(sigma / (1 - sigma))        (sigma = 1 at the first step is read as sigma_max,
                                                      the first sigma below 1, as Flow-GRPO does)
    mean      = z * (1 + std_t^2 / (2 sigma) * dt) + v * (1 + std_t^2 (1 - sigma) / (2 sigma)) * dt
    step std  = std_t * sqrt(-dt),                   dt = sigma_next - sigma < 0

`a` is the sampler's noise level (`SamplerSettings.eta` for these models; Flow-GRPO trains SD3.5 with
0.7). With a = 0 the mean is the Euler step itself, operation for operation (z * 1 is z), so the chain
equals the stock pipeline's. The log-density is `ddim.gaussian_log_prob` with the same conventions as
for DDIM: float32, averaged over latent elements, i = 0 the noisiest step.

Notation (variable -> symbol):
- `sample` -> z_i (entering step i), `model_output` -> v_hat (classifier-free guided for SD3)
- `sigma` -> sigma_i, `sigma_next` -> sigma_{i+1}, `sigma_max` -> the largest sigma below 1
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class FlowSchedule:
    """The per-step sigmas of an N-step flow-matching schedule, index 0 = the noisiest step."""

    timesteps: Tensor  # (num_steps,) float32, what the transformer is given (sigma * 1000, as diffusers)
    sigmas: Tensor  # (num_steps + 1,) float32, descending, ending at 0
    # FLUX's transformer takes timestep / 1000 (the pipeline divides); SD3's takes it as is.
    timestep_scale: float = 1.0

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def sigma_max(self) -> Tensor:
        """The first sigma below 1: what std_t uses in place of sigma = 1 (where it is infinite)."""
        below = self.sigmas[self.sigmas < 1]
        return below[0] if below.numel() else self.sigmas[0]

    def step_constants(self, i: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
        """(sigma_i, sigma_{i+1}) of step i, 0-dim, on `device`."""
        return self.sigmas[i].to(device), self.sigmas[i + 1].to(device)

    def row_constants(self, step_idx: Tensor) -> tuple[Tensor, Tensor]:
        """(sigma_i, sigma_{i+1}) for each row's step index, shaped (rows, 1, 1, 1)."""
        step_idx = step_idx.to("cpu")
        return self.sigmas[step_idx].view(-1, 1, 1, 1), self.sigmas[step_idx + 1].view(-1, 1, 1, 1)

    def step(
        self, model_output: Tensor, sample: Tensor, sigma: Tensor, sigma_next: Tensor, *, eta: float
    ) -> tuple[Tensor, Tensor]:
        """(mean, std) of the SDE step from `sample` given the rows' sigmas (`row_constants`)."""
        return flow_step_mean(
            model_output, sample, sigma, sigma_next, sigma_max=self.sigma_max, noise_level=eta
        )


def calculate_shift(image_seq_len: int, config: object) -> float:
    """The resolution-dependent shift mu of SD3.5 / FLUX schedulers (`use_dynamic_shifting`): linear in
    the number of image tokens between (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift),
    the rule diffusers' SD3 and FLUX pipelines apply before `set_timesteps`."""
    get = config.get  # type: ignore[attr-defined]
    base_len, max_len = get("base_image_seq_len", 256), get("max_image_seq_len", 4096)
    base_shift, max_shift = get("base_shift", 0.5), get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return float(image_seq_len * m + (base_shift - m * base_len))


def flow_schedule(
    scheduler: object,
    num_steps: int,
    *,
    image_seq_len: int,
    flux: bool = False,
    device: torch.device | str = "cpu",
) -> FlowSchedule:
    """Read the sigmas a `FlowMatchEulerDiscreteScheduler` uses for `num_steps` steps, setting its
    timesteps as the stock SD3 (`flux=False`) or FLUX (`flux=True`: sigmas linspace(1, 1/N, N), timestep
    / 1000) pipeline does for an image of `image_seq_len` transformer tokens."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    config = scheduler.config  # type: ignore[attr-defined]
    if config.get("stochastic_sampling"):
        raise ValueError(
            "the scheduler samples stochastically (stochastic_sampling=True); DenseAlign draws the "
            "step noise itself: load it with stochastic_sampling=False"
        )
    kwargs: dict[str, object] = {}
    if config.get("use_dynamic_shifting"):
        kwargs["mu"] = calculate_shift(image_seq_len, config)
    if flux:
        kwargs["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps)
    scheduler.set_timesteps(num_steps, device=device, **kwargs)  # type: ignore[attr-defined]
    sigmas = scheduler.sigmas.to("cpu", torch.float32)  # type: ignore[attr-defined]
    timesteps = scheduler.timesteps.to("cpu", torch.float32)  # type: ignore[attr-defined]
    if sigmas.shape[0] != num_steps + 1:
        raise ValueError(f"the scheduler made {sigmas.shape[0]} sigmas for {num_steps} steps")
    return FlowSchedule(timesteps=timesteps, sigmas=sigmas, timestep_scale=1000.0 if flux else 1.0)


def flow_step_mean(
    model_output: Tensor,
    sample: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    *,
    sigma_max: Tensor,
    noise_level: float,
) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation of p(z_{i+1} | z_i) for one SDE flow-matching step.

    `model_output` (the guided velocity) and `sample` are (batch, C, H, W); the sigmas are 0-dim or
    broadcastable to (batch, 1, 1, 1). The arithmetic runs in float32 (the stock scheduler also upcasts
    the sample). With `noise_level` 0 the mean is the Euler step and the std is 0.
    """
    if noise_level < 0:
        raise ValueError(f"the flow noise level a must be >= 0, got {noise_level}")
    sample = sample.to(torch.float32)
    model_output = model_output.to(torch.float32)
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=sample.device)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=sample.device)
    dt = sigma_next - sigma
    if noise_level == 0:
        # the stock scheduler's `sample + dt * model_output`, bit for bit
        return sample + dt * model_output, torch.zeros_like(sigma)
    sigma_max = torch.as_tensor(sigma_max, dtype=torch.float32, device=sample.device)
    std_t = noise_level * torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma)))
    mean = (
        sample * (1 + std_t**2 / (2 * sigma) * dt)
        + model_output * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    )
    return mean, std_t * torch.sqrt(-dt)


def pack_latents(latents: Tensor) -> Tensor:
    """FLUX's 2x2 patch packing: (B, C, H, W) -> (B, H/2 * W/2, C * 4), as `FluxPipeline._pack_latents`."""
    b, c, h, w = latents.shape
    packed = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return packed.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: Tensor, height: int, width: int) -> Tensor:
    """The inverse of `pack_latents` for latents of `height` x `width` (in latent pixels)."""
    b, _, channels = packed.shape
    c = channels // 4
    latents = packed.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, c, height, width)
