"""Sample whole trajectories z_0 .. z_N with a SD 1.x/2.x, SDXL, SD3 or FLUX pipeline.

Adapted from the denoising loops of diffusers' `StableDiffusionPipeline.__call__` and
`StableDiffusionXLPipeline.__call__` (diffusers 0.42.1), with these changes: the DDIM step is our
own (`ddim.py`, the same arithmetic) so that every latent, the step means and the per-step
log-probabilities are recorded; each sample has its own seed (one `torch.Generator` per sample,
which is also how the stock pipeline treats a list of generators); no safety checker, IP adapter,
guidance rescale or callbacks. With the same prompts, seeds and settings the final images are
bit-identical on CPU to the stock call with a `DDIMScheduler` (tested).

A `TrajectoryLatents` round-trips through safetensors: latents as float16 (the storage format workers
write to the blob store), log-probs float32, timesteps as the scheduler's (int64 DDIM, float32 flow
matching), everything else as JSON metadata. The
metadata also carries a sha256 of the rest of the header and of the tensor bytes, so a flipped byte
in a stored trajectory is refused when it is read back (`TrajectoryCorrupt`) instead of being trained
on; files written before the checksum existed are read unchecked.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from core.diffusion.conditioning import Conditioning, encode, native_size, predict
from core.diffusion.ddim import (
    DdimSchedule,
    Reduction,
    ddim_schedule,
    gaussian_log_prob,
)
from core.diffusion.flow import FlowSchedule, flow_schedule
from core.diffusion.models import FLOW_FAMILIES, Pipeline, denoiser, family_of

# The schedule of either family: DDIM (SD, SDXL) or flow matching (SD3, FLUX).
StepSchedule = DdimSchedule | FlowSchedule

FORMAT_VERSION = "1"
# Metadata key of a trajectory file's own checksum (see `_checksum`).
CHECKSUM_KEY = "sha256"


class TrajectoryCorrupt(ValueError):
    """A stored trajectory that does not parse, or whose bytes differ from the checksum written into it."""


@dataclass(frozen=True)
class SamplerSettings:
    """How trajectories are drawn. Recorded with every trajectory; training must reuse them."""

    # Number of DDIM steps N; the paper samples 50.
    num_steps: int = 50
    # Classifier-free guidance scale w, also used when training computes log-probs; paper 7.5.
    guidance_scale: float = 7.5
    # DDIM eta: 1.0 is the DDPM posterior variance (the paper); must be > 0 for a log-density.
    eta: float = 1.0
    # Image height and width in pixels; None = the model's native size.
    height: int | None = None
    width: int | None = None
    # Negative prompt for the unconditional branch; None = the pipeline's default ("" or zeros for SDXL).
    negative_prompt: str | None = None
    # How log-probs are reduced over the C*H*W latent elements: "mean" (paper code) or "sum".
    reduction: Reduction = "mean"

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if not self.eta > 0:
            raise ValueError(f"eta must be > 0 so each step has a log-density (paper: 1.0), got {self.eta}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {self.reduction!r}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise ValueError(f"{name} must be a positive multiple of 8, got {value}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def encode_prompts(pipe: Pipeline, prompts: list[str], settings: SamplerSettings) -> Conditioning:
    """Encode prompts the way the family's stock pipeline does (no gradient: the encoders are frozen)."""
    height, width = image_size(pipe, settings)
    return encode(pipe, prompts, negative_prompt=settings.negative_prompt, height=height, width=width)


def image_size(pipe: Pipeline, settings: SamplerSettings) -> tuple[int, int]:
    native = native_size(pipe)
    return settings.height or native, settings.width or native


@dataclass
class TrajectoryLatents:
    """One sampled trajectory: every latent, its timesteps, per-step log-probs and how it was drawn."""

    prompt: str
    seed: int
    latents: Tensor  # (num_steps + 1, C, H, W); z_0 is the initial noise, z_N the final latent
    timesteps: (
        Tensor  # (num_steps,) int64 (DDIM) or float32 (flow), timesteps[i] is the one step i starts from
    )
    log_probs: Tensor  # (num_steps,) float32, log pi(z_{i+1} | z_i, c) at sampling time
    settings: SamplerSettings
    extra: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """Serialise to safetensors bytes: latents float16, log-probs float32, metadata as JSON."""
        metadata = {
            "format": "densealign.trajectory",
            "format_version": FORMAT_VERSION,
            "prompt": self.prompt,
            "seed": str(self.seed),
            "settings": json.dumps(self.settings.to_dict()),
            "extra": json.dumps(self.extra),
        }
        tensors = {
            "latents": self.latents.detach().to("cpu", torch.float16).contiguous(),
            # int64 DDIM timesteps; flow-matching ones are float32 (sigma * 1000)
            "timesteps": self.timesteps.detach().to("cpu").contiguous(),
            "log_probs": self.log_probs.detach().to("cpu", torch.float32).contiguous(),
        }
        # Adding the checksum to the metadata changes neither the tensors' header entries nor their bytes.
        metadata[CHECKSUM_KEY] = _checksum(st_save(tensors, metadata=metadata))
        return st_save(tensors, metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes, *, name: str = "trajectory file") -> TrajectoryLatents:
        """Read `to_bytes` output back; `name` (e.g. the blob key) goes into the errors."""
        try:
            tensors = st_load(data)
            # safetensors' bytes loader drops metadata, so read the header directly.
            header_len = int.from_bytes(data[:8], "little")
            metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
        except (SafetensorError, ValueError) as exc:
            raise TrajectoryCorrupt(f"{name} is corrupt: it does not parse as safetensors ({exc})") from exc
        if metadata.get("format") != "densealign.trajectory":
            raise ValueError("not a DenseAlign trajectory file (missing format metadata)")
        expected = metadata.get(CHECKSUM_KEY)
        if expected is not None and _checksum(data) != expected:
            raise TrajectoryCorrupt(
                f"{name} is corrupt: its bytes do not match the sha256 {expected} written into it; "
                "restore the file from a backup: no round can train on its pair until then"
            )
        return cls(
            prompt=metadata["prompt"],
            seed=int(metadata["seed"]),
            latents=tensors["latents"],
            timesteps=tensors["timesteps"],
            log_probs=tensors["log_probs"],
            settings=SamplerSettings(**json.loads(metadata["settings"])),
            extra=json.loads(metadata.get("extra", "{}")),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> TrajectoryLatents:
        return cls.from_bytes(Path(path).read_bytes())


def _checksum(data: bytes) -> str:
    """sha256 of a safetensors file's header (sorted JSON, its own checksum left out) and tensor bytes."""
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    header.get("__metadata__", {}).pop(CHECKSUM_KEY, None)
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    digest.update(data[8 + header_len :])
    return digest.hexdigest()


@dataclass
class TrajectoryBatch:
    """A batch of trajectories sampled together, with their decoded images."""

    prompts: list[str]
    seeds: list[int]
    latents: Tensor  # (batch, num_steps + 1, C, H, W) float32
    timesteps: Tensor  # (num_steps,) int64 (DDIM) or float32 (flow)
    log_probs: Tensor  # (batch, num_steps) float32
    images: np.ndarray  # (batch, height, width, 3) float32 in [0, 1], as the stock output_type="np"
    settings: SamplerSettings
    z0_seeds: list[int | None] | None = None  # see sample_trajectories

    def __len__(self) -> int:
        return len(self.prompts)

    def trajectory(self, i: int) -> TrajectoryLatents:
        z0 = self.z0_seeds[i] if self.z0_seeds else None
        return TrajectoryLatents(
            self.prompts[i],
            self.seeds[i],
            self.latents[i],
            self.timesteps,
            self.log_probs[i],
            self.settings,
            extra={} if z0 is None else {"z0_seed": z0},
        )

    def pil_images(self) -> list[Image.Image]:
        return [Image.fromarray((img * 255).round().astype("uint8")) for img in self.images]


def step_schedule(pipe: Pipeline, settings: SamplerSettings) -> StepSchedule:
    """The per-step constants the pipeline's scheduler uses for `settings` (sets its timesteps as the
    stock call does): a DDIM schedule for SD/SDXL, a flow-matching one for SD3/FLUX."""
    device = denoiser(pipe).device
    family = family_of(pipe)
    if family not in FLOW_FAMILIES:
        return ddim_schedule(pipe.scheduler, settings.num_steps, device)
    height, width = image_size(pipe, settings)
    latent_h, latent_w = height // pipe.vae_scale_factor, width // pipe.vae_scale_factor
    patch = 2 if family == "flux" else pipe.transformer.config.patch_size
    return flow_schedule(
        pipe.scheduler,
        settings.num_steps,
        image_seq_len=(latent_h // patch) * (latent_w // patch),
        flux=family == "flux",
        device=device,
    )


@torch.no_grad()
def sample_trajectories(
    pipe: Pipeline,
    prompts: list[str],
    seeds: list[int],
    settings: SamplerSettings,
    schedule: StepSchedule | None = None,
    z0_seeds: Sequence[int | None] | None = None,
    *,
    deterministic: bool = False,
) -> TrajectoryBatch:
    """Sample one trajectory per (prompt, seed) with the pipeline's current weights (adapter included).

    By default one generator seeded with `seed` draws the initial noise z_0 and then every step's
    noise, as the stock pipeline does with `generator=`. Where `z0_seeds[i]` is given, z_0 comes from a
    generator seeded with it and the step noise from a fresh one seeded with `seeds[i]`: two samples
    with one z0 seed and different seeds start alike and differ only in the per-step noise (an aligned
    pair). The stock pipeline redraws such a sample with `latents=randn(shape, Generator().manual_seed
    (z0_seed))` and `generator=Generator().manual_seed(seed)` (the DDIM scheduler's initial sigma is 1).

    SD3/FLUX take the SDE step of `flow.py` with noise level `settings.eta`. `deterministic=True` runs
    the noise-free chain instead (DDIM eta 0 / the stock Euler ODE step): no step noise, log-probs 0;
    it exists to check the chain against the stock pipeline, never to train on.
    """
    if schedule is not None and settings.num_steps != schedule.num_steps:
        raise ValueError(f"schedule has {schedule.num_steps} steps, settings ask for {settings.num_steps}")
    if len(prompts) != len(seeds) or not prompts:
        raise ValueError(f"need one seed per prompt, got {len(prompts)} prompts and {len(seeds)} seeds")
    if z0_seeds is not None and len(z0_seeds) != len(seeds):
        raise ValueError(
            f"need one z0 seed (or None) per sample, got {len(z0_seeds)} for {len(seeds)} samples"
        )
    net = denoiser(pipe)
    device = net.device
    # 1. conditioning, schedule, initial noise z_0 (one generator per sample)
    cond = encode_prompts(pipe, prompts, settings)
    schedule = schedule or step_schedule(pipe, settings)
    height, width = image_size(pipe, settings)
    generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    z0_generators = [
        g if z0 is None else torch.Generator(device=device).manual_seed(int(z0))
        for g, z0 in zip(generators, z0_seeds or [None] * len(seeds), strict=True)
    ]
    shape = (
        len(prompts),
        latent_channels(pipe),
        height // pipe.vae_scale_factor,
        width // pipe.vae_scale_factor,
    )
    latents = randn_tensor(shape, generator=z0_generators, device=device, dtype=cond.cond.dtype)
    # 2. the reverse chain: step i takes z_i to z_{i+1}
    trajectory, log_probs = _chain(pipe, latents, schedule, cond, settings, generators, deterministic)
    # 3. decode z_N
    images = decode_latents(pipe, trajectory[-1])
    return TrajectoryBatch(
        prompts=list(prompts),
        seeds=[int(s) for s in seeds],
        latents=torch.stack(trajectory, dim=1),  # (batch, num_steps + 1, C, H, W)
        timesteps=schedule.timesteps.clone(),
        log_probs=torch.stack(log_probs, dim=1).float(),  # (batch, num_steps)
        images=images,
        settings=settings,
        z0_seeds=None if z0_seeds is None else [None if z is None else int(z) for z in z0_seeds],
    )


def latent_channels(pipe: Pipeline) -> int:
    """Channels of the (unpacked) latents: FLUX's transformer sees them packed 2x2, four times as many."""
    if family_of(pipe) == "flux":
        return int(pipe.transformer.config.in_channels) // 4
    return int(denoiser(pipe).config.in_channels)


def _chain(
    pipe: Pipeline,
    latents: Tensor,
    schedule: StepSchedule,
    cond: Conditioning,
    settings: SamplerSettings,
    generators: list[torch.Generator],
    deterministic: bool,
) -> tuple[list[Tensor], list[Tensor]]:
    """z_0 .. z_N and each step's log-prob. The step's arithmetic is the schedule's: DDIM in the
    latents' dtype, as the stock scheduler; flow matching in float32, the latents cast to the
    denoiser's dtype only for its call."""
    device, dtype = latents.device, latents.dtype
    trajectory, log_probs = [latents], []
    eta = 0.0 if deterministic else settings.eta
    for i, t in enumerate(schedule.timesteps.to(device)):
        pred = predict(
            pipe, latents.to(dtype), t, cond, settings.guidance_scale, timestep_scale=schedule.timestep_scale
        )
        a, b = schedule.step_constants(i, device)
        mean, std = schedule.step(pred, latents, a, b, eta=eta)
        if deterministic:
            latents = mean.to(pred.dtype)  # the stock schedulers return the model output's dtype
            log_probs.append(torch.zeros(latents.shape[0], device=device))
        else:
            noise = randn_tensor(mean.shape, generator=generators, device=device, dtype=mean.dtype)
            latents = mean + std * noise
            log_probs.append(gaussian_log_prob(latents, mean, std, reduction=settings.reduction))
        trajectory.append(latents)
    return trajectory, log_probs


@torch.no_grad()
def decode_latents(pipe: Pipeline, latents: Tensor) -> np.ndarray:
    """Decode final latents to (batch, H, W, 3) float images in [0, 1], as the stock pipelines do."""
    vae = pipe.vae
    if family_of(pipe) in FLOW_FAMILIES:  # SD3 and FLUX: scale, then shift
        shifted = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(shifted.to(vae.dtype), return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="np")
    mean = getattr(vae.config, "latents_mean", None)
    std = getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean_t = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        std_t = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        scaled = latents * std_t / vae.config.scaling_factor + mean_t
    else:
        scaled = latents / vae.config.scaling_factor
    image = vae.decode(scaled.to(vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="np")
