"""Load a text-to-image pipeline (hub id or local folder, offline-safe), or build a tiny one in code.

Two families of models are supported (`family_of`):
- UNet diffusion models, SD 1.x/2.x ("sd") and SDXL ("sdxl"): every pipeline leaves here with a
  `DDIMScheduler` built from its own scheduler config (same betas), with x0 clipping off so that each
  step is an exact Gaussian (METHOD.md).
- Flow-matching transformers, SD3/SD3.5 ("sd3") and FLUX.1 ("flux"): they keep their
  `FlowMatchEulerDiscreteScheduler` (its shift and dynamic shifting), with stochastic sampling off;
  the sampler replaces its Euler step by the SDE step of `flow.py`.
Anything else is refused with a message that says what is supported.

The tiny models use the sizes of diffusers' own fast pipeline tests (UNet block_out_channels
(32, 64), a 2-block VAE, a 5-layer 32-wide CLIP text encoder) with the real CLIP BPE tokenizer that
ships in `assets/clip_tokenizer`, so prompts tokenize exactly as they do for SD 1.5. Tiny SD3 has a
one-layer MM-DiT, a 16-channel VAE and two CLIP encoders, without the optional T5 encoder (SD3's own
option: its tokens are zeros). Tiny FLUX needs its T5 encoder: a 2-layer one with a word-level
tokenizer built in code (`tiny_t5_tokenizer`), since no T5 vocabulary ships with us.
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
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

logger = logging.getLogger(__name__)

TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "clip_tokenizer"
Family: TypeAlias = Literal["sd", "sdxl", "sd3", "flux"]
TINY_IDS: dict[str, Family] = {"tiny:sd": "sd", "tiny:sdxl": "sdxl", "tiny:sd3": "sd3", "tiny:flux": "flux"}
# Pipeline class -> family, checked with isinstance (a subclass of one of them counts as it).
FAMILIES: dict[type, Family] = {
    StableDiffusionXLPipeline: "sdxl",
    StableDiffusionPipeline: "sd",
    StableDiffusion3Pipeline: "sd3",
    FluxPipeline: "flux",
}
FLOW_FAMILIES: tuple[Family, ...] = ("sd3", "flux")
# A pipeline of one of the FAMILIES. Typed as Any because diffusers registers a pipeline's components
# (unet, transformer, vae, ...) at run time, so static attribute checks cannot see them.
Pipeline: TypeAlias = Any


def family_of(pipe: Pipeline) -> Family:
    """ "sd", "sdxl", "sd3" or "flux", from the pipeline's class."""
    for cls, family in FAMILIES.items():
        if isinstance(pipe, cls):
            return family
    raise ValueError(_unsupported(pipe))


def denoiser(pipe: Pipeline) -> Any:
    """The network the adapter goes on: the UNet of SD/SDXL, the transformer of SD3/FLUX."""
    return pipe.transformer if family_of(pipe) in FLOW_FAMILIES else pipe.unet


class ModelNotFoundError(LookupError):
    """The base model cannot be found where it was asked for (or offline, in the local cache)."""


def load_pipeline(
    model: str, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> Pipeline:
    """Load a pipeline of a supported family from a local folder, a hub id, or a tiny id ("tiny:sd",
    "tiny:sdxl", "tiny:sd3", "tiny:flux").

    With HF_HUB_OFFLINE=1 a hub id must already be in the Hugging Face cache. `seed` only seeds the
    random initialisation of the tiny models.
    """
    if model in TINY_IDS:
        pipe: Any = tiny_pipeline(TINY_IDS[model], seed=seed)
    else:
        pipe = _from_pretrained(model, dtype)
    try:
        family = family_of(pipe)
    except ValueError as exc:
        raise ValueError(f"{model!r}: {exc}") from None
    if family in FLOW_FAMILIES:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            pipe.scheduler.config, stochastic_sampling=False
        )
    else:
        pipe.scheduler = ddim_scheduler_from(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if denoiser(pipe).dtype != dtype:
        pipe = pipe.to(dtype=dtype)
    return pipe.to(device)


def _unsupported(pipe: Any) -> str:
    return (
        f"a {type(pipe).__name__} is not supported; DenseAlign supports StableDiffusionPipeline (SD 1.x/2.x), "
        "StableDiffusionXLPipeline, StableDiffusion3Pipeline (SD3, SD3.5) and FluxPipeline (FLUX.1)"
    )


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


def tiny_vae(latent_channels: int = 4, **flow: Any) -> AutoencoderKL:
    """The 2-block VAE of the tiny models; `flow` adds SD3/FLUX's options (shift, no quant convs)."""
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        **flow,
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


def tiny_pipeline(kind: Family = "sd", *, seed: int = 0) -> Pipeline:
    """A randomly initialised pipeline of `kind` small enough for CPU tests (64 px images; 32x32 latents,
    4 channels for SD/SDXL, 16 for SD3/FLUX)."""
    torch.manual_seed(seed)
    pipe = _tiny_pipeline(kind)
    # Built modules start in training mode (T5's dropout would make every encoding random); loaded
    # ones are in eval mode, and so are these.
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def _tiny_pipeline(kind: Family) -> Pipeline:
    if kind == "sd3":
        return tiny_sd3_pipeline()
    if kind == "flux":
        return tiny_flux_pipeline()
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
    raise ValueError(f"tiny pipeline kind must be one of {sorted(set(TINY_IDS.values()))}, got {kind!r}")


def tiny_flow_vae() -> AutoencoderKL:
    """The tiny VAE with SD3/FLUX's 16 latent channels, shift and scale, and no quant convs."""
    return tiny_vae(
        16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035
    )


def tiny_sd3_pipeline() -> Pipeline:
    """SD3 in miniature: a 1-layer MM-DiT (patch 2, 4 heads of 8), two 32-wide CLIP encoders, no T5."""
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,  # the two CLIP encoders' 32 + 32 features, as T5's width would be
        caption_projection_dim=32,
        pooled_projection_dim=64,
        pos_embed_max_size=32,
    )
    config = tiny_text_encoder_config(hidden_act="gelu", projection_dim=32)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_flow_vae(),
        text_encoder=CLIPTextModelWithProjection(config),
        tokenizer=clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(config),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )


def tiny_t5_tokenizer() -> T5TokenizerFast:
    """A word-level T5 tokenizer built in code (lower-cased words and punctuation of the shapes grammar
    and common English, unknown words -> <unk>, "</s>" appended), so tiny FLUX needs no download."""
    words = [
        "a",
        "an",
        "the",
        "of",
        "and",
        "on",
        "in",
        "with",
        "to",
        "at",
        "by",
        "red",
        "green",
        "blue",
        "yellow",
        "purple",
        "orange",
        "white",
        "black",
        "circle",
        "square",
        "triangle",
        "star",
        "small",
        "large",
        "big",
        "left",
        "right",
        "top",
        "bottom",
        "above",
        "below",
        "next",
        "photo",
        "picture",
        "painting",
        "cat",
        "dog",
    ]
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(
        tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0
    )


def tiny_flux_pipeline() -> Pipeline:
    """FLUX.1-dev in miniature: one double and one single stream block, guidance embedding, a 32-wide
    CLIP and a 2-layer 32-wide T5 encoder, dynamic shifting as FLUX.1's scheduler config."""
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed 2x2
        out_channels=None,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    tokenizer_2 = tiny_t5_tokenizer()
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=4096,
        max_shift=1.15,
        shift=3.0,
        use_dynamic_shifting=True,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=tiny_flow_vae(),
        text_encoder=CLIPTextModel(tiny_text_encoder_config(hidden_act="gelu", projection_dim=32)),
        tokenizer=clip_tokenizer(),
        text_encoder_2=t5,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.default_sample_size = 32  # 64 px images, as the other tiny models (the stock call reads it too)
    return pipe
