"""Load a Stable Diffusion pipeline (hub id or local folder, offline-safe), or build a tiny one in code.

Every pipeline leaves here with a `DDIMScheduler` built from its own scheduler config (same betas),
with x0 clipping off so that each step is an exact Gaussian (METHOD.md). SD 1.x/2.x and SDXL are
supported; anything else is refused with a message that says what is supported.

The tiny models use the sizes of diffusers' own fast pipeline tests (UNet block_out_channels
(32, 64), a 2-block VAE, a 5-layer 32-wide CLIP text encoder) with the real CLIP BPE tokenizer that
ships in `assets/clip_tokenizer`, so prompts tokenize exactly as they do for SD 1.5.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal, TypeAlias

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

logger = logging.getLogger(__name__)

TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "clip_tokenizer"
TINY_IDS: dict[str, Literal["sd", "sdxl"]] = {"tiny:sd": "sd", "tiny:sdxl": "sdxl"}
SUPPORTED = (StableDiffusionPipeline, StableDiffusionXLPipeline)
# A StableDiffusionPipeline or StableDiffusionXLPipeline. Typed as Any because diffusers registers a
# pipeline's components (unet, vae, ...) at run time, so static attribute checks cannot see them.
Pipeline: TypeAlias = Any


class ModelNotFoundError(LookupError):
    """The base model cannot be found where it was asked for (or offline, in the local cache)."""


def load_pipeline(
    model: str, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> Pipeline:
    """Load a SD 1.x/2.x or SDXL pipeline from a local folder, a hub id, or a tiny id ("tiny:sd", "tiny:sdxl").

    With HF_HUB_OFFLINE=1 a hub id must already be in the Hugging Face cache. `seed` only seeds the
    random initialisation of the tiny models.
    """
    if model in TINY_IDS:
        pipe: Any = tiny_pipeline(TINY_IDS[model], seed=seed)
    else:
        pipe = _from_pretrained(model, dtype)
    if not isinstance(pipe, SUPPORTED):
        raise ValueError(
            f"{model!r} is a {type(pipe).__name__}; DenseAlign supports StableDiffusionPipeline (SD 1.x/2.x) "
            "and StableDiffusionXLPipeline"
        )
    pipe.scheduler = ddim_scheduler_from(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if pipe.unet.dtype != dtype:
        pipe = pipe.to(dtype=dtype)
    return pipe.to(device)


def ddim_scheduler_from(config: Any) -> DDIMScheduler:
    """A DDIM scheduler with the pipeline's noise schedule and x0 clipping/thresholding turned off."""
    return DDIMScheduler.from_config(config, clip_sample=False, thresholding=False)


def _from_pretrained(model: str, dtype: torch.dtype) -> Any:
    path = Path(model).expanduser()
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"{str(path)!r} has no model_index.json: point at a diffusers-format folder "
                "(one written by `pipeline.save_pretrained(folder)`)"
            )
        source: str = str(path)
    elif model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelNotFoundError(
            f"base model {model!r} is neither an existing folder nor a hub id of the form 'org/name'"
        )
    else:
        source = model
    kwargs: dict[str, Any] = {"torch_dtype": dtype, "local_files_only": offline}
    try:
        return DiffusionPipeline.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:  # huggingface_hub's errors derive from these
        hint = (
            "HF_HUB_OFFLINE=1 is set, so it must already be in the Hugging Face cache: run "
            f"`hf download {model}` once on a machine with network, or "
            if offline
            else ""
        )
        raise ModelNotFoundError(
            f"cannot load base model {model!r}: {exc.__class__.__name__}. {hint}"
            "set DENSEALIGN_MODEL__BASE_MODEL to a local folder that holds model_index.json"
        ) from exc


def clip_tokenizer() -> CLIPTokenizer:
    """The real CLIP BPE tokenizer (49408 tokens), read from the files in the package."""
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))


def sd_scheduler() -> DDIMScheduler:
    """DDIM with the SD 1.x noise schedule (scaled-linear betas 0.00085 .. 0.012, 1000 steps)."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def tiny_text_encoder_config(**overrides: Any) -> CLIPTextConfig:
    tok = clip_tokenizer()
    config = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "vocab_size": len(tok),
        "hidden_size": 32,
        "intermediate_size": 37,
        "layer_norm_eps": 1e-05,
        "num_attention_heads": 4,
        "num_hidden_layers": 5,
        "max_position_embeddings": tok.model_max_length,
    }
    config.update(overrides)
    return CLIPTextConfig(**config)


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
    )


# The tiny UNet's shape, shared by the SD and SDXL variants (which differ in conditioning).
TINY_UNET: dict[str, Any] = {
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
}


def sd_pipeline(vae: AutoencoderKL, text_encoder: CLIPTextModel, unet: UNet2DConditionModel) -> Pipeline:
    """A StableDiffusionPipeline around three networks, with the tokenizer we ship, the SD 1.x
    schedule and no safety checker."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_pipeline(kind: Literal["sd", "sdxl"] = "sd", *, seed: int = 0) -> Pipeline:
    """A randomly initialised SD or SDXL pipeline small enough for CPU tests (64 px images, 32x32 latents)."""
    torch.manual_seed(seed)
    if kind == "sd":
        unet = UNet2DConditionModel(**TINY_UNET, cross_attention_dim=32)
        vae = tiny_vae()
        return sd_pipeline(vae, CLIPTextModel(tiny_text_encoder_config()), unet)
    if kind == "sdxl":
        # SDXL conditions the UNet on two text encoders (hidden 32 + 32 = cross-attention 64) and on
        # "added" embeddings: the pooled text embedding (32) and six size/crop time ids (6 * 8).
        unet = UNet2DConditionModel(
            **TINY_UNET,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=6 * 8 + 32,
            cross_attention_dim=64,
        )
        vae = tiny_vae()
        config = tiny_text_encoder_config(hidden_act="gelu", projection_dim=32)
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=CLIPTextModel(config),
            text_encoder_2=CLIPTextModelWithProjection(config),
            tokenizer=clip_tokenizer(),
            tokenizer_2=clip_tokenizer(),
            unet=unet,
            scheduler=sd_scheduler(),
        )
    raise ValueError(f"tiny pipeline kind must be 'sd' or 'sdxl', got {kind!r}")
