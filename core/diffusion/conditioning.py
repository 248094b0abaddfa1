"""Text conditioning and the guided prediction of each model family, written as the stock pipelines do.

- SD 1.x/2.x, SDXL (UNet): eps_hat = eps_u + w (eps_c - eps_u) (`guided_noise`); SDXL adds the pooled
  text embedding and six size/crop time ids.
- SD3/SD3.5 (MM-DiT): the same classifier-free guidance on the velocity; the pooled embedding goes in
  as `pooled_projections` (`StableDiffusion3Pipeline.__call__`).
- FLUX.1 (guidance-distilled): one pass, w enters as the guidance embedding; latents are packed into
  2x2 patches around the call and unpacked after (`FluxPipeline.__call__`), so everything outside
  this module sees (batch, C, H, W) latents for every family.

No gradient flows through the encoders (they are frozen); `predict` is called with gradients by the
trainer (the adapter's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline
from torch import Tensor

from core.diffusion.ddim import guide
from core.diffusion.flow import pack_latents, unpack_latents
from core.diffusion.models import Pipeline, denoiser, family_of

# The stock pipelines' default text lengths (T5 tokens): SD3 256, FLUX 512.
SD3_MAX_SEQUENCE_LENGTH = 256
FLUX_MAX_SEQUENCE_LENGTH = 512


@dataclass
class Conditioning:
    """Text conditioning for a batch, kept as separate unconditional / conditional halves.

    FLUX has no unconditional branch: `uncond` is `cond` and the added entries are shared."""

    cond: Tensor  # (batch, tokens, dim)
    uncond: Tensor  # (batch, tokens, dim)
    # SDXL: text_embeds (batch, P), time_ids (batch, 6); SD3 and FLUX: pooled_projections (batch, P)
    cond_added: dict[str, Tensor] | None = None
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


def native_size(pipe: Pipeline) -> int:
    """The image side the stock pipeline draws when no size is given."""
    family = family_of(pipe)
    if family == "flux":
        return int(pipe.default_sample_size * pipe.vae_scale_factor)
    return int(denoiser(pipe).config.sample_size * pipe.vae_scale_factor)


@torch.no_grad()
def encode(
    pipe: Pipeline, prompts: list[str], *, negative_prompt: str | None, height: int, width: int
) -> Conditioning:
    """Encode prompts as the family's stock pipeline does (negative prompt None = its default)."""
    device = denoiser(pipe).device
    negative = None if negative_prompt is None else [negative_prompt] * len(prompts)
    family = family_of(pipe)
    if family == "flux":
        cond, pooled, _text_ids = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=device, max_sequence_length=FLUX_MAX_SEQUENCE_LENGTH
        )
        added = {"pooled_projections": pooled}
        return Conditioning(cond, cond, added, added)
    if family == "sd3":
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=True,
            negative_prompt=negative,
            max_sequence_length=SD3_MAX_SEQUENCE_LENGTH,
        )
        return Conditioning(
            cond, uncond, {"pooled_projections": pooled}, {"pooled_projections": uncond_pooled}
        )
    if isinstance(pipe, StableDiffusionXLPipeline):
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            prompt=prompts,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=negative,
        )
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
        prompts, device, num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=negative
    )
    return Conditioning(cond, uncond)


def predict(
    pipe: Pipeline,
    latents: Tensor,
    timestep: Tensor,
    cond: Conditioning,
    guidance_scale: float,
    *,
    timestep_scale: float = 1.0,
) -> Tensor:
    """The guided prediction for (batch, C, H, W) latents in the denoiser's dtype: noise for a UNet,
    velocity for SD3/FLUX. `timestep` is 0-dim or (batch,); FLUX's transformer gets it divided by
    `timestep_scale` (1000), as its pipeline does."""
    family = family_of(pipe)
    if family == "flux":
        return _flux_velocity(pipe.transformer, latents, timestep, cond, guidance_scale, timestep_scale)
    if family == "sd3":
        return _sd3_velocity(pipe.transformer, latents, timestep, cond, guidance_scale)
    return guided_noise(pipe.unet, latents, timestep, cond, guidance_scale)


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


def _sd3_velocity(
    transformer: Any, latents: Tensor, timestep: Tensor, cond: Conditioning, guidance_scale: float
) -> Tensor:
    assert cond.cond_added is not None and cond.uncond_added is not None
    guided = guidance_scale > 1.0
    rows = latents.shape[0] * (2 if guided else 1)
    t = (
        timestep.expand(rows)
        if timestep.ndim == 0
        else (torch.cat([timestep, timestep]) if guided else timestep)
    )
    out = transformer(
        hidden_states=torch.cat([latents] * 2) if guided else latents,
        timestep=t,
        encoder_hidden_states=torch.cat([cond.uncond, cond.cond]) if guided else cond.cond,
        pooled_projections=(
            torch.cat([cond.uncond_added["pooled_projections"], cond.cond_added["pooled_projections"]])
            if guided
            else cond.cond_added["pooled_projections"]
        ),
        return_dict=False,
    )[0]
    if not guided:
        return out
    v_uncond, v_cond = out.chunk(2)
    return guide(v_uncond, v_cond, guidance_scale)


def _flux_velocity(
    transformer: Any,
    latents: Tensor,
    timestep: Tensor,
    cond: Conditioning,
    guidance_scale: float,
    timestep_scale: float,
) -> Tensor:
    assert cond.cond_added is not None
    b, _, h, w = latents.shape
    t = (timestep.expand(b) if timestep.ndim == 0 else timestep).to(latents.dtype)
    guidance = None
    if transformer.config.guidance_embeds:
        guidance = torch.full([1], guidance_scale, device=latents.device, dtype=torch.float32).expand(b)
    img_ids = torch.zeros(h // 2, w // 2, 3)
    img_ids[..., 1] = img_ids[..., 1] + torch.arange(h // 2)[:, None]
    img_ids[..., 2] = img_ids[..., 2] + torch.arange(w // 2)[None, :]
    out = transformer(
        hidden_states=pack_latents(latents),
        timestep=t / timestep_scale,
        guidance=guidance,
        pooled_projections=cond.cond_added["pooled_projections"],
        encoder_hidden_states=cond.cond,
        txt_ids=torch.zeros(cond.cond.shape[1], 3, device=latents.device, dtype=cond.cond.dtype),
        img_ids=img_ids.reshape(-1, 3).to(latents.device, latents.dtype),
        return_dict=False,
    )[0]
    return unpack_latents(out, h, w)
