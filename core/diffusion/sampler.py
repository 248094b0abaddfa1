"""Sample whole trajectories z_0 .. z_N with a Stable Diffusion (SD 1.x/2.x or SDXL) pipeline.

Adapted from the denoising loops of diffusers' `StableDiffusionPipeline.__call__` and
`StableDiffusionXLPipeline.__call__` (diffusers 0.42.1), with these changes: the DDIM step is our
own (`ddim.py`, the same arithmetic) so that every latent, the step means and the per-step
log-probabilities are recorded; each sample has its own seed (one `torch.Generator` per sample,
which is also how the stock pipeline treats a list of generators); no safety checker, IP adapter,
guidance rescale or callbacks. With the same prompts, seeds and settings the final images are
bit-identical on CPU to the stock call with a `DDIMScheduler` (tested).

A `TrajectoryLatents` round-trips through safetensors: latents as float16 (the storage format workers
write to the blob store), log-probs float32, timesteps int64, everything else as JSON metadata. The
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
from diffusers import StableDiffusionXLPipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from core.diffusion.ddim import (
    DdimSchedule,
    Reduction,
    ddim_schedule,
    ddim_step_mean,
    gaussian_log_prob,
    guide,
)
from core.diffusion.models import Pipeline

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


@dataclass
class Conditioning:
    """Text conditioning for a batch, kept as separate unconditional / conditional halves."""

    cond: Tensor  # (batch, tokens, dim)
    uncond: Tensor  # (batch, tokens, dim)
    cond_added: dict[str, Tensor] | None = None  # SDXL: text_embeds (batch, P), time_ids (batch, 6)
    uncond_added: dict[str, Tensor] | None = None

    def index(self, idx: Tensor) -> Conditioning:
        """Select (and repeat) rows, e.g. one row per sampled step of each pair."""

        def pick(d: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
            return None if d is None else {k: v[idx] for k, v in d.items()}

        return Conditioning(self.cond[idx], self.uncond[idx], pick(self.cond_added), pick(self.uncond_added))

    @staticmethod
    def concat(parts: list[Conditioning]) -> Conditioning:
        """The rows of `parts`, in order, as one batch (e.g. prompts encoded in chunks)."""

        def cat(ds: list[dict[str, Tensor] | None]) -> dict[str, Tensor] | None:
            first = ds[0]
            return (
                None if first is None else {k: torch.cat([d[k] for d in ds if d is not None]) for k in first}
            )

        return Conditioning(
            torch.cat([p.cond for p in parts]),
            torch.cat([p.uncond for p in parts]),
            cat([p.cond_added for p in parts]),
            cat([p.uncond_added for p in parts]),
        )


def encode_prompts(pipe: Pipeline, prompts: list[str], settings: SamplerSettings) -> Conditioning:
    """Encode prompts the way the stock pipeline does (no gradient: the text encoders are frozen)."""
    device = pipe.unet.device
    negative = None if settings.negative_prompt is None else [settings.negative_prompt] * len(prompts)
    with torch.no_grad():
        if isinstance(pipe, StableDiffusionXLPipeline):
            cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
                prompt=prompts,
                device=device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=True,
                negative_prompt=negative,
            )
            height, width = image_size(pipe, settings)
            time_ids = pipe._get_add_time_ids(
                (height, width),
                (0, 0),
                (height, width),
                dtype=cond.dtype,
                text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
            ).to(device)
            time_ids = time_ids.repeat(len(prompts), 1)  # (batch, 6)
            return Conditioning(
                cond,
                uncond,
                {"text_embeds": pooled, "time_ids": time_ids},
                {"text_embeds": uncond_pooled, "time_ids": time_ids},
            )
        cond, uncond = pipe.encode_prompt(
            prompts,
            device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=negative,
        )
    return Conditioning(cond, uncond)


def guided_noise(
    unet: Any, latents: Tensor, timestep: Tensor, cond: Conditioning, guidance_scale: float
) -> Tensor:
    """eps_hat = eps_u + w (eps_c - eps_u) for (batch, C, H, W) latents; `timestep` 0-dim or (batch,)."""
    if guidance_scale <= 1.0:  # the stock pipelines skip the unconditional branch here too
        return unet(
            latents,
            timestep,
            encoder_hidden_states=cond.cond,
            added_cond_kwargs=cond.cond_added,
            return_dict=False,
        )[0]
    t = timestep if timestep.ndim == 0 else torch.cat([timestep, timestep])
    added = None
    if cond.cond_added is not None and cond.uncond_added is not None:
        added = {k: torch.cat([cond.uncond_added[k], cond.cond_added[k]]) for k in cond.cond_added}
    out = unet(
        torch.cat([latents] * 2),
        t,
        encoder_hidden_states=torch.cat([cond.uncond, cond.cond]),
        added_cond_kwargs=added,
        return_dict=False,
    )[0]
    eps_uncond, eps_cond = out.chunk(2)
    return guide(eps_uncond, eps_cond, guidance_scale)


def image_size(pipe: Pipeline, settings: SamplerSettings) -> tuple[int, int]:
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return settings.height or native, settings.width or native


@dataclass
class TrajectoryLatents:
    """One sampled trajectory: every latent, its timesteps, per-step log-probs and how it was drawn."""

    prompt: str
    seed: int
    latents: Tensor  # (num_steps + 1, C, H, W); z_0 is the initial noise, z_N the final latent
    timesteps: Tensor  # (num_steps,) int64, timesteps[i] is the one step i starts from
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
            "timesteps": self.timesteps.detach().to("cpu", torch.int64).contiguous(),
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
    timesteps: Tensor  # (num_steps,) int64
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


@torch.no_grad()
def sample_trajectories(
    pipe: Pipeline,
    prompts: list[str],
    seeds: list[int],
    settings: SamplerSettings,
    schedule: DdimSchedule | None = None,
    z0_seeds: Sequence[int | None] | None = None,
) -> TrajectoryBatch:
    """Sample one trajectory per (prompt, seed) with the pipeline's current weights (adapter included).

    By default one generator seeded with `seed` draws the initial noise z_0 and then every step's
    noise, as the stock pipeline does with `generator=`. Where `z0_seeds[i]` is given, z_0 comes from a
    generator seeded with it and the step noise from a fresh one seeded with `seeds[i]`: two samples
    with one z0 seed and different seeds start alike and differ only in the per-step noise (an aligned
    pair). The stock pipeline redraws such a sample with `latents=randn(shape, Generator().manual_seed
    (z0_seed))` and `generator=Generator().manual_seed(seed)` (the DDIM scheduler's initial sigma is 1).
    """
    if settings.num_steps != (schedule.num_steps if schedule else settings.num_steps):
        raise ValueError(
            f"schedule has {schedule.num_steps if schedule else 0} steps, settings ask for {settings.num_steps}"
        )
    if len(prompts) != len(seeds) or not prompts:
        raise ValueError(f"need one seed per prompt, got {len(prompts)} prompts and {len(seeds)} seeds")
    if z0_seeds is not None and len(z0_seeds) != len(seeds):
        raise ValueError(
            f"need one z0 seed (or None) per sample, got {len(z0_seeds)} for {len(seeds)} samples"
        )
    device = pipe.unet.device
    # 1. conditioning, schedule, initial noise z_0 (one generator per sample)
    cond = encode_prompts(pipe, prompts, settings)
    schedule = schedule or ddim_schedule(pipe.scheduler, settings.num_steps, device)
    height, width = image_size(pipe, settings)
    generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    z0_generators = [
        g if z0 is None else torch.Generator(device=device).manual_seed(int(z0))
        for g, z0 in zip(generators, z0_seeds or [None] * len(seeds), strict=True)
    ]
    latents = pipe.prepare_latents(
        len(prompts), pipe.unet.config.in_channels, height, width, cond.cond.dtype, device, z0_generators
    )
    trajectory = [latents]
    log_probs = []
    alpha_t = schedule.alpha_prod_t.to(device)
    alpha_prev = schedule.alpha_prod_t_prev.to(device)
    # 2. the reverse chain: step i takes z_i to z_{i+1}
    for i, t in enumerate(schedule.timesteps.to(device)):
        eps = guided_noise(pipe.unet, latents, t, cond, settings.guidance_scale)
        mean, std = ddim_step_mean(
            eps,
            latents,
            alpha_t[i],
            alpha_prev[i],
            eta=settings.eta,
            prediction_type=schedule.prediction_type,
        )
        noise = randn_tensor(eps.shape, generator=generators, device=device, dtype=eps.dtype)
        latents = mean + std * noise
        log_probs.append(gaussian_log_prob(latents, mean, std, reduction=settings.reduction))
        trajectory.append(latents)
    # 3. decode z_N
    images = decode_latents(pipe, latents)
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


@torch.no_grad()
def decode_latents(pipe: Pipeline, latents: Tensor) -> np.ndarray:
    """Decode final latents to (batch, H, W, 3) float images in [0, 1], as the stock pipelines do."""
    vae = pipe.vae
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
