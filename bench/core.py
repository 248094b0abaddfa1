"""Benchmark the diffusion core: trajectory capture overhead, the trainer's round path, hot-swap.

Prints the figures and writes them to bench/results/core.json (or --out). Measures:
1. sampling time of `sample_trajectories` (every latent and log-prob recorded) vs the stock
   `pipeline.__call__` on the same model, prompts, seeds and steps, and of `sample_trajectories` on a
   Policy with a (non-zero) LoRA adapter as the worker runs it (fused, `Policy.fuse`) and unfused
   (median of --repeats runs, alternating the sides so drift hits all), wall and CPU time, and their
   ratios to stock;
2. consecutive optimizer steps of one round through the trainer's path (`trainer.rounds`: the round's
   draws, `RoundExamples`, `train_step` with a `ReferenceCache`) next to the path before it (each step
   read its pairs' blobs, encoded its prompts and ran the reference UNet on every row), alternating,
   from the same adapter and optimizer state: per step CPU time (time.process_time) and wall time,
   UNet forward calls and rows (policy and reference apart, counted by a forward hook; guidance
   doubles the rows), text-encoder calls and blob reads, the difference of their losses and
   log-ratios, the cache's hit rate; then one more step of each under the torch profiler for its
   tensor memory (peak of live tensors allocated during the step, and all bytes allocated);
3. `Policy.hot_swap` of a saved adapter (median time).

Torch runs on one thread (--threads) so CPU time is the step's work, not other cores'.

Usage: python bench/core.py [--model tiny:sd | tiny:sdxl | sd15-random | PATH | HUB_ID] [--device cuda]
The default model is the shipped one (models/densealign-shapes, what the product loads by default).
`sd15-random` builds the SD 1.5 architecture (UNet, CLIP ViT-L/14 text encoder, VAE) with random
weights, for timing at 512 px and 50 steps where the real weights are not at hand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from core.db.training import PreferencePair  # noqa: E402
from core.diffusion.ddim import ddim_schedule  # noqa: E402
from core.diffusion.models import clip_tokenizer, load_pipeline, sd_scheduler  # noqa: E402
from core.diffusion.policy import LoraSettings, Policy  # noqa: E402
from core.diffusion.sampler import SamplerSettings, TrajectoryLatents, sample_trajectories  # noqa: E402
from core.diffusion.training import (  # noqa: E402
    PairBatch,
    ReferenceCache,
    make_optimizer,
    train_step,
)
from core.settings import DpoConfig  # noqa: E402
from core.storage import LocalBlobStore  # noqa: E402
from trainer.rounds import RoundExamples, Trainer  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SHIPPED = ROOT / "models" / "densealign-shapes"


def sd15_random_pipeline() -> Any:
    """SD 1.5's architecture (configs of runwayml/stable-diffusion-v1-5) with random weights."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )
    tok = clip_tokenizer()
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        unet=unet,
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


class Counters:
    """UNet calls and rows (policy: adapter on; reference: off) and text-encoder calls of one policy."""

    def __init__(self, policy: Policy) -> None:
        self.layer = next(m for m in policy.denoiser.modules() if isinstance(m, BaseTunerLayer))
        self.reset()
        policy.denoiser.register_forward_pre_hook(self._unet, with_kwargs=True)
        policy.pipe.text_encoder.register_forward_pre_hook(self._text)

    def reset(self) -> None:
        self.figures = {"unet_calls_policy": 0, "unet_calls_reference": 0, "unet_rows_policy": 0}
        self.figures |= {"unet_rows_reference": 0, "text_encoder_calls": 0}

    def _unet(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        side = "reference" if self.layer.disable_adapters else "policy"
        sample = args[0] if args else kwargs["sample"]
        self.figures[f"unet_calls_{side}"] += 1
        self.figures[f"unet_rows_{side}"] += int(sample.shape[0])

    def _text(self, module: Any, args: tuple[Any, ...]) -> None:
        self.figures["text_encoder_calls"] += 1

    def take(self) -> dict[str, int]:
        out = self.figures
        self.reset()
        return out


class CountingBlobs(LocalBlobStore):
    reads = 0

    def get(self, key: str) -> bytes:
        self.reads += 1
        return super().get(key)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds of this process, fn's result)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def tensor_memory(fn: Callable[[], Any], device: torch.device) -> dict[str, float]:
    """Tensor memory of `fn` from the torch profiler (CPU tensors, or the device's on CUDA): the peak of
    the bytes allocated and not yet freed during the call (op by op), and all bytes it allocated."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, profile_memory=True) as prof:
        fn()
    attr = "self_device_memory_usage" if device.type == "cuda" else "self_cpu_memory_usage"
    live = peak = allocated = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        delta = int(getattr(event, attr, 0) or 0)
        live += delta
        peak, allocated = max(peak, live), allocated + max(delta, 0)
    return {"peak_live_mb": peak / 2**20, "allocated_mb": allocated / 2**20}


def load(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Any:
    if args.model == "sd15-random":
        pipe = sd15_random_pipeline().to(device=device, dtype=dtype)
        pipe.scheduler = sd_scheduler()
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return load_pipeline(args.model, device=device, dtype=dtype)


def nonzero_adapter(policy: Policy, scale: float = 1e-2) -> dict[str, torch.Tensor]:
    """The policy's adapter with B drawn too, as after a round (B = 0 at init makes the adapter a no-op)."""
    gen = torch.Generator().manual_seed(1)
    state = policy.lora_state()
    return {k: torch.randn(v.shape, generator=gen) * scale if "lora_B" in k else v for k, v in state.items()}


def bench_sampling(
    args: argparse.Namespace, pipes: dict[str, Any], settings: SamplerSettings, device: torch.device
) -> dict[str, Any]:
    """Median sampling time of each side, alternating the sides run by run, and each side's ratio to stock."""
    prompts = [f"a red circle above a blue square, variant {i}" for i in range(args.batch)]
    seeds = list(range(args.batch))

    def capture(pipe: Any) -> Callable[[], Any]:
        return lambda: sample_trajectories(pipe, prompts, seeds, settings)

    def stock() -> None:
        pipe = pipes["stock"]
        gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        size = settings.height
        pipe(prompts, num_inference_steps=args.steps, guidance_scale=settings.guidance_scale, eta=settings.eta,
             generator=gens, height=size, width=size, output_type="np")  # fmt: skip

    sides = {"stock": stock, "capture": capture(pipes["stock"])}
    sides |= {name: capture(pipes[name]) for name in ("capture_lora_fused", "capture_lora_unfused")}
    times: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    for fn in sides.values():
        fn()  # warm-up
    for r in range(args.repeats):
        for name, fn in sides.items():
            wall, used, _ = timed(fn, device)
            times[name].append(wall)
            cpu[name].append(used)
        log(f"[sampling {r + 1}/{args.repeats}] " + "  ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()))
    med = {name: statistics.median(v) for name, v in times.items()}
    med_cpu = {name: statistics.median(v) for name, v in cpu.items()}
    out: dict[str, Any] = {f"{name}_s": value for name, value in med.items()}
    out |= {f"{name}_cpu_s": value for name, value in med_cpu.items()}
    out |= {f"{name}_ratio_to_stock": med[name] / med["stock"] for name in med if name != "stock"}
    out |= {f"{name}_cpu_ratio_to_stock": med_cpu[name] / med_cpu["stock"] for name in med if name != "stock"}
    out["overhead_ratio"] = med["capture"] / med["stock"]
    out["overhead_ratio_cpu"] = med_cpu["capture"] / med_cpu["stock"]
    out |= {
        "images_per_s_capture": args.batch / med["capture"],
        "images_per_s_stock": args.batch / med["stock"],
    }
    return out


def round_pairs(
    pipe: Any, blobs: LocalBlobStore, settings: SamplerSettings, num_pairs: int
) -> list[PreferencePair]:
    """`num_pairs` pairs over 4 prompts, their trajectories sampled and stored as the worker stores them."""
    prompts = [f"a red circle above a blue square, variant {i % 4}" for i in range(num_pairs) for _ in "wl"]
    sampled = sample_trajectories(pipe, prompts, list(range(len(prompts))), settings)
    for i, prompt in enumerate(prompts):
        traj = TrajectoryLatents(
            prompt, i, sampled.latents[i], sampled.timesteps, sampled.log_probs[i], settings
        )
        blobs.put(f"trajectories/{i}.safetensors", traj.to_bytes())
    key = "trajectories/{}.safetensors".format
    return [
        PreferencePair(k, prompts[2 * k], 0, 2 * k, 2 * k + 1, 1, None, key(2 * k), key(2 * k + 1))
        for k in range(num_pairs)
    ]


def batch_before(examples: RoundExamples, idx: list[int]) -> PairBatch:
    """The batch as the trainer built it before `RoundExamples`: every step read and decoded its pairs'
    trajectories from the blob store, and left the prompts for `train_step` to encode."""
    prompts, ws, ls = [], [], []
    for i in idx:
        p = examples.pairs[i]
        tw, tl = (
            TrajectoryLatents.from_bytes(examples.blobs.get(k), name=f"trajectory blob {k!r}")
            for k in (p.winner_latents_key, p.loser_latents_key)
            if k is not None
        )
        if tw.settings != examples.settings or tl.settings != examples.settings:
            raise ValueError("the blobs disagree with the round's settings")
        prompts.append(p.prompt)
        ws.append(tw.latents)
        ls.append(tl.latents)
    return PairBatch(prompts, torch.stack(ws), torch.stack(ls), examples.settings)


def bench_round(
    args: argparse.Namespace, policies: dict[str, Policy], settings: SamplerSettings, device: torch.device
) -> dict[str, Any]:
    """Consecutive steps of one round, before (no caches) and after (the trainer's path), alternating."""
    config = hp = DpoConfig(
        sampled_steps=args.sampled_steps, pairs_per_step=args.pairs_per_step, steps_per_round=args.round_steps
    )
    with tempfile.TemporaryDirectory() as tmp:
        blobs = CountingBlobs(tmp)
        pairs = round_pairs(policies["before"].pipe, blobs, settings, args.round_pairs)
        counters = {side: Counters(policy) for side, policy in policies.items()}
        trainer = Trainer(policy=policies["after"], sessions=None, blobs=blobs, config=config)  # type: ignore[arg-type]
        limit = int(config.max_round_trajectories_mb * 2**20)
        setup_wall, setup_cpu, examples = timed(
            lambda: RoundExamples.load(pairs, blobs, policies["after"], limit), device
        )
        counters["after"].take()
        schedule = ddim_schedule(policies["after"].pipe.scheduler, settings.num_steps, device)
        opts = {side: make_optimizer(policy, lr=args.lr) for side, policy in policies.items()}
        cache = ReferenceCache(int(config.reference_cache_mb * 2**20))

        def step(side: str, k: int) -> Callable[[], Any]:
            gen, idx = trainer._draw(1, k, len(examples))
            if side == "before":
                return lambda: train_step(
                    policies[side], opts[side], batch_before(examples, idx), hp, schedule, gen
                )
            batch = lambda: trainer._batch(examples, idx)  # noqa: E731
            return lambda: train_step(policies[side], opts[side], batch(), hp, schedule, gen, cache)

        steps = []
        for k in range(args.round_steps):
            row: dict[str, Any] = {"step": k}
            for side in ("before", "after"):
                reads = blobs.reads
                wall, cpu, metrics = timed(step(side, k), device)
                row[side] = {"wall_s": wall, "cpu_s": cpu, "loss": metrics.loss} | counters[side].take()
                row[side]["blob_reads"] = blobs.reads - reads
                row[side]["_ratios"] = torch.cat([metrics.logratio_w, metrics.logratio_l])
            diff = (row["before"].pop("_ratios") - row["after"].pop("_ratios")).abs()
            row["logratio_max_abs_diff"], row["loss_abs_diff"] = (
                float(diff.max()),
                abs(row["before"]["loss"] - row["after"]["loss"]),
            )
            steps.append(row)
            log(f"[round step {k + 1}/{args.round_steps}] " + summary_line(row))
        memory = {side: tensor_memory(step(side, args.round_steps), device) for side in ("before", "after")}
        log(f"[round memory] {memory}")
    return round_summary(steps, memory, cache, config, setup_wall, setup_cpu, len(pairs))


def summary_line(row: dict[str, Any]) -> str:
    return (
        "  ".join(
            f"{side}: cpu {row[side]['cpu_s']:.3f}s wall {row[side]['wall_s']:.3f}s UNet rows policy "
            f"{row[side]['unet_rows_policy']} reference {row[side]['unet_rows_reference']}"
            for side in ("before", "after")
        )
        + f"  |d logratio| {row['logratio_max_abs_diff']:.2e}"
    )


def round_summary(
    steps: list[dict[str, Any]],
    memory: dict[str, dict[str, float]],
    cache: ReferenceCache,
    config: DpoConfig,
    setup_wall: float,
    setup_cpu: float,
    num_pairs: int,
) -> dict[str, Any]:
    figures = [k for k in steps[0]["before"] if k != "loss"]
    per_step = {
        side: {f"mean_{k}": statistics.fmean(s[side][k] for s in steps) for k in figures}
        | {"median_cpu_s": statistics.median(s[side]["cpu_s"] for s in steps)}
        | {"median_wall_s": statistics.median(s[side]["wall_s"] for s in steps)}
        | {"tensor_memory_one_step": memory[side]}
        for side in ("before", "after")
    }
    return {
        "round_pairs": num_pairs,
        "pairs_per_step": config.pairs_per_step,
        "sampled_steps": config.sampled_steps,
        "steps": len(steps),
        "per_step": per_step,
        "cpu_speedup": per_step["before"]["median_cpu_s"] / per_step["after"]["median_cpu_s"],
        "after_round_setup": {"wall_s": setup_wall, "cpu_s": setup_cpu},
        "reference_cache": {
            "hit_rate": cache.hit_rate(),
            "hits": cache.hits,
            "misses": cache.misses,
            "rows_kept": len(cache),
            "mb": cache.nbytes / 2**20,
        },
        "logratio_max_abs_diff": max(s["logratio_max_abs_diff"] for s in steps),
        "loss_max_abs_diff": max(s["loss_abs_diff"] for s in steps),
        "by_step": steps,
    }


def bench_hot_swap(policy: Policy, repeats: int, device: torch.device) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        path, sha = policy.save_adapter(tmp)
        checked = [
            timed(lambda: policy.hot_swap(path, expected_sha256=sha), device)[0] for _ in range(repeats)
        ]
        plain = [timed(lambda: policy.hot_swap(path), device)[0] for _ in range(repeats)]
        return {
            "s_with_sha256_check": statistics.median(checked),
            "s": statistics.median(plain),
            "adapter_mb": path.stat().st_size / 2**20,
        }


def log(msg: str) -> None:
    print(msg, flush=True)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--model", default=str(SHIPPED), help="tiny:sd, tiny:sdxl, sd15-random, a folder or hub id"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps per trajectory")
    parser.add_argument("--batch", type=int, default=2, help="trajectories per timed sampling call")
    parser.add_argument(
        "--height", type=int, default=None, help="image size in pixels (default: model native)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed sampling repetitions (median reported)")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    parser.add_argument(
        "--round-pairs", type=int, default=64, help="labelled pairs in the round (experiments: 64)"
    )
    parser.add_argument(
        "--round-steps", type=int, default=60, help="consecutive optimizer steps timed (experiments: 60)"
    )
    parser.add_argument("--pairs-per-step", type=int, default=4, help="pairs per optimizer step (product: 4)")
    parser.add_argument(
        "--sampled-steps", type=int, default=3, help="M, steps drawn per trajectory (paper: 3)"
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (experiments: 1e-3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default=str(RESULTS / "core.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    settings = SamplerSettings(num_steps=args.steps, height=args.height, width=args.height)
    pipes = {"stock": load(args, device, dtype)}
    policies: dict[str, Policy] = {}
    for name in ("capture_lora_unfused", "capture_lora_fused"):
        pipes[name] = load(args, device, dtype)
        torch.manual_seed(0)
        policies[name] = Policy(pipes[name], LoraSettings(rank=args.rank))
        policies[name].hot_swap(nonzero_adapter(policies[name]))
    policies["capture_lora_fused"].fuse()  # as the worker samples (worker/main.py)
    sampling = bench_sampling(args, pipes, settings, device)
    torch.manual_seed(0)
    before = Policy(pipes["stock"], LoraSettings(rank=args.rank))  # the stock side is done with
    before.hot_swap(policies["capture_lora_unfused"].lora_state())
    training = bench_round(
        args, {"before": before, "after": policies["capture_lora_unfused"]}, settings, device
    )
    result = {
        "benchmark": "core",
        "model": args.model if args.model != str(SHIPPED) else "models/densealign-shapes (shipped)",
        "device": describe(device),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "settings": {"steps": args.steps, "batch": args.batch, "lora_rank": args.rank, "repeats": args.repeats,
                     "image_px": args.height or pipes["stock"].unet.config.sample_size * pipes["stock"].vae_scale_factor},
        "sampling": sampling,
        "round_path": training,
        "hot_swap": bench_hot_swap(before, args.repeats, device),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(
        json.dumps(
            {k: v for k, v in result.items() if k != "round_path"}
            | {"round_path": {k: v for k, v in training.items() if k != "by_step"}},
            indent=2,
        )
    )
    log(
        f"capture overhead: {100 * (sampling['overhead_ratio'] - 1):+.1f}% wall, "
        f"{100 * (sampling['overhead_ratio_cpu'] - 1):+.1f}% CPU (target < 3%); written to {out}"
    )
    return 0


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


if __name__ == "__main__":
    sys.exit(main())
