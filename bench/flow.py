"""Benchmark the flow-matching families (SD3, FLUX): capture overhead, a training step, hot-swap.

Prints the figures and writes them to bench/results/flow-<model>.json (or --out). Measures, on one
model, in one process, sides alternating run by run so drift hits all of them:
1. sampling: the stock `pipeline.__call__` (Euler ODE) against `sample_trajectories` (the SDE chain,
   every latent and per-step log-prob recorded) on the base model and on a Policy with a non-zero
   adapter sampling fused, as the worker runs it; median wall and CPU time and ratios to stock;
2. one optimizer step of discounted dense DPO (`train_step`, the trainer's step) on --pairs-per-step
   pairs with M = --sampled-steps: median wall and CPU time, then one more step under the torch
   profiler for its tensor memory (peak of live tensors, all bytes allocated);
3. `Policy.hot_swap` of a saved adapter (median time).

Torch runs on one thread (--threads) so CPU time is the step's work, not other cores'.

Usage: python bench/flow.py [--model tiny:sd3 | tiny:flux | sd35m-random | flux-dev-random | PATH | HUB_ID]
                            [--device cuda] [--dtype bfloat16] [--size 1024]
`sd35m-random` and `flux-dev-random` build the SD3.5-medium transformer (24 layers, 2.24B parameters
as built from the configuration of stabilityai/stable-diffusion-3.5-medium) and the FLUX.1-dev one
(19 + 38 blocks, 11.90B) with random weights, directly on the device in the asked dtype, with their 16-channel VAE and
CLIP-L/G text encoders of the real sizes, for timing where the weights are not at hand. The T5-XXL
encoder is left out of SD3.5 (its documented option: the T5 tokens are zeros) and replaced by a
one-layer T5 of the same width (4096) for FLUX: it runs once per prompt, not per step. No GPU was lent
when this was written, so these have not run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.core import describe, log, nonzero_adapter, tensor_memory, timed  # noqa: E402
from core.diffusion.models import load_pipeline  # noqa: E402
from core.diffusion.policy import LoraSettings, Policy  # noqa: E402
from core.diffusion.sampler import SamplerSettings, sample_trajectories, step_schedule  # noqa: E402
from core.diffusion.training import PairBatch, make_optimizer, train_step  # noqa: E402
from core.settings import DpoConfig  # noqa: E402

RESULTS = ROOT / "bench" / "results"
# The transformer configurations of SD3.5-medium and FLUX.1-dev (their model repositories' config.json).
SD35_MEDIUM = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm",
}  # fmt: skip
FLUX_DEV = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
    "guidance_embeds": True, "axes_dims_rope": (16, 56, 56),
}  # fmt: skip


def random_pipeline(name: str, device: torch.device, dtype: torch.dtype) -> Any:
    """The SD3.5-medium or FLUX.1-dev architecture with random weights, built on `device` in `dtype`."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    from core.diffusion.models import clip_tokenizer, tiny_t5_tokenizer

    tok = clip_tokenizer()

    def clip(hidden: int, layers: int, heads: int, projection: bool) -> Any:
        config = CLIPTextConfig(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=77, projection_dim=hidden, hidden_act="gelu",
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )  # fmt: skip
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)

    default = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            vae = AutoencoderKL(
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, layers_per_block=2,
                use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305,
            )  # fmt: skip
            if name == "sd35m-random":
                pipe = StableDiffusion3Pipeline(
                    transformer=SD3Transformer2DModel(**SD35_MEDIUM),
                    scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                    vae=vae,
                    text_encoder=clip(768, 12, 12, True),
                    tokenizer=tok,
                    text_encoder_2=clip(1280, 32, 20, True),
                    tokenizer_2=tok,
                    text_encoder_3=None,
                    tokenizer_3=None,
                )
            else:
                t5_tok = tiny_t5_tokenizer()
                t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=4096, d_kv=64, d_ff=10240,
                                             num_layers=1, num_heads=64))  # fmt: skip
                scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                            max_shift=1.15)  # fmt: skip
                pipe = FluxPipeline(
                    scheduler=scheduler, vae=vae, text_encoder=clip(768, 12, 12, False), tokenizer=tok,
                    text_encoder_2=t5, tokenizer_2=t5_tok, transformer=FluxTransformer2DModel(**FLUX_DEV),
                )  # fmt: skip
    finally:
        torch.set_default_dtype(default)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load(model: str, device: torch.device, dtype: torch.dtype) -> Any:
    if model in ("sd35m-random", "flux-dev-random"):
        return random_pipeline(model, device, dtype)
    return load_pipeline(model, device=device, dtype=dtype)


# The stock pipelines' guidance defaults: SD3 7.0 (classifier-free), FLUX.1-dev 3.5 (embedded).
GUIDANCE = {"sd3": 7.0, "flux": 3.5}


def median_times(sides: dict[str, Callable[[], Any]], repeats: int, device: torch.device) -> dict[str, Any]:
    """Median wall and CPU seconds of each side, alternating, after one warm-up run each."""
    wall: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    for fn in sides.values():
        fn()
    for r in range(repeats):
        for name, fn in sides.items():
            w, c, _ = timed(fn, device)
            wall[name].append(w)
            cpu[name].append(c)
        log(f"[{r + 1}/{repeats}] " + "  ".join(f"{k} {v[-1]:.3f}s" for k, v in wall.items()))
    out: dict[str, Any] = {}
    for name in sides:
        out[f"{name}_s"] = statistics.median(wall[name])
        out[f"{name}_cpu_s"] = statistics.median(cpu[name])
    return out


def bench_sampling(args: argparse.Namespace, stock: Any, worker: Policy, settings: SamplerSettings,
                   device: torch.device) -> dict[str, Any]:  # fmt: skip
    prompts = [f"a red circle above a blue square, variant {i}" for i in range(args.batch)]
    seeds = list(range(args.batch))

    def stock_call() -> None:
        gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        stock(prompts, num_inference_steps=args.steps, guidance_scale=settings.guidance_scale,
              generator=gens, height=settings.height, width=settings.width, output_type="np")  # fmt: skip

    sides = {
        "stock": stock_call,
        "capture": lambda: sample_trajectories(stock, prompts, seeds, settings),
        "capture_lora_fused": lambda: sample_trajectories(worker.pipe, prompts, seeds, settings),
    }
    out = median_times(sides, args.repeats, device)
    for name in ("capture", "capture_lora_fused"):
        out[f"{name}_ratio_to_stock"] = out[f"{name}_s"] / out["stock_s"]
        out[f"{name}_cpu_ratio_to_stock"] = out[f"{name}_cpu_s"] / out["stock_cpu_s"]
    out["images_per_s_stock"] = args.batch / out["stock_s"]
    out["images_per_s_capture_lora_fused"] = args.batch / out["capture_lora_fused_s"]
    return out


def bench_training(args: argparse.Namespace, policy: Policy, settings: SamplerSettings,
                   device: torch.device) -> dict[str, Any]:  # fmt: skip
    b = args.pairs_per_step
    prompts = [f"a green triangle, variant {i}" for i in range(b)]
    winners = sample_trajectories(policy.pipe, prompts, list(range(b)), settings)
    losers = sample_trajectories(policy.pipe, prompts, list(range(b, 2 * b)), settings)
    batch = PairBatch(prompts, winners.latents, losers.latents, settings)
    schedule = step_schedule(policy.pipe, settings)
    hp = DpoConfig(gamma=0.9, sampled_steps=args.sampled_steps, lr=1e-3)
    optimizer = make_optimizer(policy, lr=hp.lr)
    gen = torch.Generator().manual_seed(0)
    losses: list[float] = []

    def step() -> None:
        losses.append(train_step(policy, optimizer, batch, hp, schedule, generator=gen).loss)

    out = median_times({"train_step": step}, args.repeats, device)
    out |= {f"train_step_{k}": v for k, v in tensor_memory(step, device).items()}
    out["denoiser_rows_per_step"] = 2 * b * args.sampled_steps * (2 if _guided(policy, settings) else 1) * 2
    out["losses_finite"] = all(torch.isfinite(torch.tensor(losses)).tolist())
    return out


def _guided(policy: Policy, settings: SamplerSettings) -> bool:
    """Whether each row runs twice (classifier-free guidance: SD3 with w > 1; FLUX embeds w instead)."""
    return policy.family == "sd3" and settings.guidance_scale > 1


def bench_hot_swap(policy: Policy, repeats: int, device: torch.device) -> dict[str, float]:
    state = nonzero_adapter(policy)
    with tempfile.TemporaryDirectory() as tmp:
        policy.hot_swap(state)
        policy.save_adapter(tmp)
        policy.reset_adapter()
        times = []
        for _ in range(repeats):
            wall, _, _ = timed(lambda: policy.hot_swap(tmp), device)
            times.append(wall)
            policy.reset_adapter()
    return {"hot_swap_s": statistics.median(times)}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default="tiny:sd3",
        help="tiny:sd3, tiny:flux, sd35m-random, flux-dev-random, a folder or a hub id",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--steps", type=int, default=20, help="sampling steps per trajectory")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: native)")
    parser.add_argument("--eta", type=float, default=0.7, help="SDE noise level a (Flow-GRPO: 0.7)")
    parser.add_argument("--guidance", type=float, default=None, help="default: the family's stock default")
    parser.add_argument("--batch", type=int, default=2, help="trajectories per timed sampling call")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (median reported)")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    parser.add_argument("--pairs-per-step", type=int, default=4, help="pairs per optimizer step (product: 4)")
    parser.add_argument("--sampled-steps", type=int, default=3, help="steps M per trajectory (product: 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="default: bench/results/flow-<model>.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    stock = load(args.model, device, dtype)
    worker = Policy(load(args.model, device, dtype), LoraSettings(rank=args.rank))
    trainer = Policy(load(args.model, device, dtype), LoraSettings(rank=args.rank))
    if worker.family not in GUIDANCE:
        print(f"error: {args.model!r} is a {worker.family} model; this bench is for sd3 and flux (bench/core.py "
              "covers SD and SDXL)", file=sys.stderr)  # fmt: skip
        return 2
    worker.hot_swap(nonzero_adapter(worker))
    worker.fuse()
    guidance = args.guidance if args.guidance is not None else GUIDANCE[worker.family]
    settings = SamplerSettings(num_steps=args.steps, guidance_scale=guidance, eta=args.eta,
                               height=args.size, width=args.size)  # fmt: skip
    log(
        f"{args.model} ({worker.family}) on {describe(device)}, {args.steps} steps, eta {args.eta}, w {guidance}"
    )
    result: dict[str, Any] = {
        "model": args.model,
        "family": worker.family,
        "device": describe(device),
        "dtype": args.dtype,
        "threads": args.threads,
        "steps": args.steps,
        "eta": args.eta,
        "guidance_scale": guidance,
        "batch": args.batch,
        "pairs_per_step": args.pairs_per_step,
        "sampled_steps": args.sampled_steps,
        "lora_rank": args.rank,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    result["sampling"] = bench_sampling(args, stock, worker, settings, device)
    result["training"] = bench_training(args, trainer, settings, device)
    result |= bench_hot_swap(trainer, args.repeats, device)
    s, t = result["sampling"], result["training"]
    print(f"sampling: stock {s['stock_cpu_s']:.3f} s CPU, capture x{s['capture_cpu_ratio_to_stock']:.3f}, "
          f"worker (fused LoRA) x{s['capture_lora_fused_cpu_ratio_to_stock']:.3f} (wall "
          f"x{s['capture_ratio_to_stock']:.3f} / x{s['capture_lora_fused_ratio_to_stock']:.3f})")  # fmt: skip
    print(f"training step: {t['train_step_cpu_s']:.3f} s CPU ({t['train_step_s']:.3f} s wall), tensor peak "
          f"{t['train_step_peak_live_mb']:.1f} MB, allocated {t['train_step_allocated_mb']:.1f} MB")  # fmt: skip
    print(f"hot swap: {result['hot_swap_s'] * 1000:.1f} ms")
    name = args.model.replace("tiny:", "tiny-").replace("/", "_")
    out = Path(args.out or RESULTS / f"flow-{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
