"""The shipped base model's architecture: a small Stable Diffusion 1.x layout sized for a 2-core CPU.

Same component classes and wiring as SD 1.5 (AutoencoderKL, UNet2DConditionModel with
cross-attention, CLIPTextModel with the real CLIP BPE tokenizer, DDIM with the SD 1.x betas), only
smaller: 64 px images, a 16..32-channel VAE that downsamples 8x as SD's does (so 8x8x4 latents), a
three-level UNet (64, 96, 96 channels at 8, 4, 2 px, cross-attention on the two lower levels) and a
64-wide, 3-layer text encoder. Sized so that a 20-step guided pair samples in about a second on a
2-core CPU, and a training step of 64 examples takes about a second.
The text encoder's token table keeps all 49408 CLIP tokens so any prompt tokenizes as for SD 1.5; it
dominates the file size (3.2M of the parameters).
"""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from core.diffusion.models import Pipeline, sd_pipeline, tiny_text_encoder_config


@dataclass(frozen=True)
class Sizes:
    """Widths and depths of the three networks (defaults are what ships in models/densealign-shapes)."""

    # Image side in pixels.
    image_size: int = 64
    # VAE channels per resolution level; len - 1 = number of 2x down-samplings (4 -> 8x, 8 px latents).
    vae_channels: tuple[int, ...] = (16, 32, 32, 32)
    # UNet channels per level (each level but the last halves the latent side); the first level has no
    # attention, the others self- and cross-attention.
    unet_channels: tuple[int, ...] = (64, 96, 96)
    # ResNet blocks per UNet level.
    unet_layers: int = 1
    # Attention head width in the UNet's transformer blocks.
    unet_head_dim: int = 32
    # Text encoder width (also the UNet's cross-attention width), layers and heads.
    text_width: int = 64
    text_layers: int = 3
    text_heads: int = 4

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)


def build_vae(sizes: Sizes) -> AutoencoderKL:
    n = len(sizes.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=sizes.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=sizes.image_size,
        # Flat shapes need no global context; attention at the VAE bottleneck only costs time.
        mid_block_add_attention=False,
    )


def build_unet(sizes: Sizes) -> UNet2DConditionModel:
    n = len(sizes.unet_channels)
    return UNet2DConditionModel(
        sample_size=sizes.latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=sizes.unet_channels,
        layers_per_block=sizes.unet_layers,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=sizes.text_width,
        attention_head_dim=sizes.unet_head_dim,
        norm_num_groups=32,
    )


def build_text_encoder(sizes: Sizes) -> CLIPTextModel:
    config = tiny_text_encoder_config(
        hidden_size=sizes.text_width,
        intermediate_size=4 * sizes.text_width,
        num_attention_heads=sizes.text_heads,
        num_hidden_layers=sizes.text_layers,
    )
    return CLIPTextModel(config)


def assemble(vae: AutoencoderKL, unet: UNet2DConditionModel, text_encoder: CLIPTextModel) -> Pipeline:
    """A StableDiffusionPipeline around the three networks, the real tokenizer and the SD 1.x schedule."""
    return sd_pipeline(vae, text_encoder, unet)
