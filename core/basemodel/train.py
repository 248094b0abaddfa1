"""`densealign train-base`: train the shipped base model from scratch on the shapes data set, on a CPU.

Reads top to bottom in three stages, each with its own progress bar:
1. VAE: an AutoencoderKL learns to reconstruct rendered shapes (L1 + L2 on pixels + a tiny KL term;
   no perceptual or adversarial loss: flat colours need neither).
2. Latents: a fixed pool of examples is encoded once (posterior mean and std kept, a fresh latent is
   drawn from them at every use), and the VAE's `scaling_factor` is set to 1 / std of the latents so
   the diffusion model sees unit-variance inputs, as SD 1.5's 0.18215 does for its VAE.
3. Diffusion: the UNet and the text encoder are trained together with epsilon prediction under the
   SD 1.x noise schedule, the prompt replaced by "" 10% of the time (classifier-free guidance uses the
   empty prompt's encoding, as the stock pipeline does). Departures from SD's recipe, for the short
   CPU budget: min-SNR-5 loss weighting (Hang et al. 2023) and an EMA of the weights, which is what
   ships.

The text encoder is trained rather than frozen at random: a random 3-layer CLIP barely separates
"a red circle above a blue square" from "a blue circle above a red square" (same tokens, different
order), and the UNet then has to undo that mixing on its own. The DPO trainer keeps it frozen, as
for SD 1.5.

The result is a diffusers folder (`StableDiffusionPipeline.save_pretrained`, float16 weights) that
`core.diffusion.models.load_pipeline` loads like any SD 1.x model, plus `train_info.json` with the
settings and the time each stage took.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch import Tensor, nn
from tqdm import tqdm

from core.basemodel import shapes
from core.basemodel.architecture import Sizes, assemble, build_text_encoder, build_unet, build_vae
from core.diffusion.models import clip_tokenizer, sd_scheduler

logger = logging.getLogger(__name__)
DEFAULT_OUT = "models/densealign-shapes"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights (with the code); saved next to them."""

    # Seed for the data set, the initialisations and every random draw of training.
    seed: int = 0
    # VAE optimizer steps and images per step.
    vae_steps: int = 800
    vae_batch: int = 24
    # VAE learning rate (AdamW), constant after a 20-step warm-up.
    vae_lr: float = 2e-3
    # Weight of the KL(posterior || N(0, I)) term, per latent element, against the per-pixel losses.
    kl_weight: float = 1e-6
    # Number of distinct examples encoded for the diffusion stage (cycled through, new noise each time).
    num_examples: int = 32768
    # Diffusion optimizer steps and examples per step.
    unet_steps: int = 3000
    unet_batch: int = 64
    # Peak learning rate of the UNet and text encoder (AdamW), with warm-up then cosine decay to 10%.
    unet_lr: float = 1e-3
    # Warm-up steps of the diffusion stage.
    warmup_steps: int = 50
    # Probability of replacing a prompt by "" (classifier-free guidance dropout).
    cfg_dropout: float = 0.1
    # Cap gamma of the min-SNR loss weight min(SNR(t), gamma) / SNR(t) for epsilon prediction.
    min_snr_gamma: float = 5.0
    # Decay of the exponential moving average of the weights that ships (warmed up from 0).
    ema_decay: float = 0.995
    # Gradient-norm clip of both stages.
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        for name in ("vae_steps", "vae_batch", "num_examples", "unet_steps", "unet_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {self.cfg_dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


def to_tensor(images: Tensor | object) -> Tensor:
    """uint8 (batch, H, W, 3) -> float (batch, 3, H, W) in [-1, 1], the VAE's input range."""
    x = torch.as_tensor(images)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(config: TrainConfig, sizes: Sizes, device: torch.device) -> AutoencoderKL:
    torch.manual_seed(config.seed)
    vae = build_vae(sizes).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    bar = tqdm(range(config.vae_steps), desc="1/3 VAE", unit="step")
    for step in bar:
        # Data-set indices from 10^7 on: the VAE never sees the diffusion stage's pool.
        start = 10_000_000 + step * config.vae_batch
        images, _ = shapes.render_batch(range(start, start + config.vae_batch), seed=config.seed)
        x = to_tensor(images).to(device)  # (batch, 3, 64, 64)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec = (recon - x).abs().mean() + ((recon - x) ** 2).mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = rec + config.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(vae.parameters(), config.max_grad_norm)
        opt.step()
        sched.step()
        bar.set_postfix(rec=f"{rec.item():.4f}")
    return vae.eval()


@torch.no_grad()
def encode_pool(
    vae: AutoencoderKL, config: TrainConfig, device: torch.device
) -> tuple[Tensor, Tensor, list[str], float]:
    """Posterior means and stds (num_examples, 4, h, w) of the pool, its prompts and the scaling factor."""
    means, stds, prompts = [], [], []
    chunk = 256
    for start in tqdm(range(0, config.num_examples, chunk), desc="2/3 latents", unit="chunk"):
        stop = min(start + chunk, config.num_examples)
        images, batch_prompts = shapes.render_batch(range(start, stop), seed=config.seed)
        posterior = vae.encode(to_tensor(images).to(device)).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
        prompts.extend(batch_prompts)
    mean, std = torch.cat(means), torch.cat(stds)
    scaling = 1.0 / float(torch.sqrt(mean.var() + (std**2).mean()))
    return mean, std, prompts, scaling


class Ema:
    """Exponential moving average of a module's parameters, with the usual (1 + n) / (10 + n) warm-up."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for s, p in zip(self.shadow.parameters(), module.parameters(), strict=True):
            s.lerp_(p.detach(), 1.0 - d)


def tokenize_prompts(prompts: list[str], device: torch.device) -> tuple[Tensor, Tensor, int]:
    """Token ids of each distinct prompt and of "" (num_distinct, 77), each example's row in them, and
    the row of ""."""
    tokenizer = clip_tokenizer()
    vocab = sorted(set(prompts) | {""})
    ids = tokenizer(
        vocab,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)  # (num_prompts, 77)
    prompt_row = torch.tensor([vocab.index(p) for p in prompts], device=device)  # (num_examples,)
    return ids, prompt_row, vocab.index("")


def lr_factor(config: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the learning rate."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.unet_steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_diffusion(
    config: TrainConfig,
    sizes: Sizes,
    mean: Tensor,
    std: Tensor,
    prompts: list[str],
    scaling: float,
    device: torch.device,
) -> tuple[nn.Module, nn.Module]:
    """Train UNet + text encoder; return their EMA copies."""
    torch.manual_seed(config.seed + 1)
    rng = random.Random(config.seed + 1)
    unet, text_encoder = build_unet(sizes).to(device), build_text_encoder(sizes).to(device)
    ids, prompt_row, empty_row = tokenize_prompts(prompts, device)
    alphas_cumprod = sd_scheduler().alphas_cumprod.to(device)  # (1000,)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    loss_weight = torch.clamp(snr, max=config.min_snr_gamma) / snr  # (1000,)

    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=0.01)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(config, step))
    ema_unet, ema_text = Ema(unet, config.ema_decay), Ema(text_encoder, config.ema_decay)
    order: list[int] = []
    bar = tqdm(range(config.unet_steps), desc="3/3 diffusion", unit="step")
    for _ in bar:
        if len(order) < config.unet_batch:  # a fresh shuffle of the pool each epoch
            order += rng.sample(range(len(prompts)), len(prompts))
        batch = torch.tensor(order[: config.unet_batch], device=device)
        order = order[config.unet_batch :]
        # 1. x_0 = a draw from each example's posterior, scaled to unit variance
        latents = (mean[batch] + std[batch] * torch.randn_like(mean[batch])) * scaling  # (batch, 4, h, w)
        # 2. x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t uniform over the 1000 training steps
        t = torch.randint(0, len(alphas_cumprod), (len(batch),), device=device)
        noise = torch.randn_like(latents)
        abar = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
        # 3. the prompt, or "" with probability cfg_dropout
        rows = prompt_row[batch].clone()
        rows[torch.rand(len(batch), device=device) < config.cfg_dropout] = empty_row
        hidden = text_encoder(ids[rows])[0]  # (batch, 77, width), as StableDiffusionPipeline.encode_prompt
        # 4. min-SNR-weighted epsilon MSE
        pred = unet(noisy, t, encoder_hidden_states=hidden).sample
        per_example = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (loss_weight[t] * per_example).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        opt.step()
        sched.step()
        ema_unet.update(unet)
        ema_text.update(text_encoder)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return ema_unet.shadow, ema_text.shadow


def train_base(
    config: TrainConfig,
    out: Path,
    sizes: Sizes | None = None,
    device: str = "cpu",
    argv_used: Sequence[str] = (),
) -> dict[str, object]:
    """Run the three stages and save the pipeline to `out`; return what went into train_info.json."""
    sizes = sizes or Sizes()
    dev = torch.device(device)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    vae = train_vae(config, sizes, dev)
    timings["vae_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    mean, std, prompts, scaling = encode_pool(vae, config, dev)
    vae.register_to_config(scaling_factor=scaling)
    timings["latents_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    unet, text_encoder = train_diffusion(config, sizes, mean, std, prompts, scaling, dev)
    timings["diffusion_s"] = time.perf_counter() - t2
    timings["total_s"] = time.perf_counter() - t0
    pipe = assemble(vae, unet, text_encoder).to("cpu", dtype=torch.float16)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    info: dict[str, object] = {
        "config": asdict(config),
        "sizes": asdict(sizes),
        "scaling_factor": scaling,
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "device": torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"cpu, {torch.get_num_threads()} threads",
        "command": "densealign train-base " + " ".join(argv_used),
        "parameters": {
            name: sum(p.numel() for p in module.parameters())
            for name, module in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder))
        },
    }
    (out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(
        prog="densealign train-base",
        description="Train the small shapes Stable Diffusion that ships with DenseAlign (defaults = the shipped model).",
    )
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument(
        "--device", default="cpu", help="torch device (default cpu; 'cuda' trains in about a minute)"
    )
    for field, value in asdict(defaults).items():
        p.add_argument(
            f"--{field.replace('_', '-')}", type=type(value), default=value, help=f"default {value}"
        )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ns = vars(parse_args(argv))
    out, device = Path(ns.pop("out")), ns.pop("device")
    config = TrainConfig(**ns)
    info = train_base(config, out, device=device, argv_used=list(argv or []))
    logger.info("saved %s in %.0f s: %s", out, info["timings"]["total_s"], info["timings"])  # type: ignore[index]
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
