"""Benchmark the diffusion core: trajectory capture overhead, a training step, hot-swap.

Prints the figures and writes them to bench/results/core.json (or --out). Measures:
1. sampling time of `sample_trajectories` (every latent and log-prob recorded) vs the stock
   `pipeline.__call__` on the same model, prompts, seeds and steps (median of --repeats runs,
   alternating the two so drift hits both), and their ratio;
2. one `train_step` (B pairs, M = 1 and M = 3 sampled steps): time and peak memory (CUDA: peak
   allocated; CPU: peak growth of the process RSS, polled every 2 ms);
3. `Policy.hot_swap` of a saved adapter (median time).

Usage: python bench/core.py [--model tiny:sd | tiny:sdxl | sd15-random | PATH | HUB_ID] [--device cuda]
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
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402
import torch  # noqa: E402

from core.diffusion.ddim import ddim_schedule  # noqa: E402
from core.diffusion.models import clip_tokenizer, load_pipeline, sd_scheduler  # noqa: E402
from core.diffusion.policy import LoraSettings, Policy  # noqa: E402
from core.diffusion.sampler import SamplerSettings, sample_trajectories  # noqa: E402
from core.diffusion.training import DpoHyperparameters, PairBatch, make_optimizer, train_step  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


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


class PeakMemory:
    """Peak memory over a block: CUDA peak allocated, or on CPU the peak RSS growth (polled)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._proc = psutil.Process()
            self._base = self._proc.memory_info().rss
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss - self._base)
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._thread.join()


def timed(fn: Any, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="tiny:sd", help="tiny:sd, tiny:sdxl, sd15-random, a folder or hub id"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps per trajectory")
    parser.add_argument(
        "--batch", type=int, default=2, help="trajectories per sampling call / pairs per train step"
    )
    parser.add_argument(
        "--height", type=int, default=None, help="image size in pixels (default: model native)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (median reported)")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    parser.add_argument("--out", default=str(RESULTS / "core.json"))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.model == "sd15-random":
        pipe = sd15_random_pipeline().to(device=device, dtype=dtype)
        pipe.scheduler = sd_scheduler()
        pipe.set_progress_bar_config(disable=True)
    else:
        pipe = load_pipeline(args.model, device=device, dtype=dtype)
    settings = SamplerSettings(num_steps=args.steps, height=args.height, width=args.height)
    prompts = [f"a red circle above a blue square, variant {i}" for i in range(args.batch)]
    seeds = list(range(args.batch))
    log = lambda msg: print(msg, flush=True)  # noqa: E731

    # 1. capture overhead vs the stock call (warm up both first)
    def ours() -> None:
        sample_trajectories(pipe, prompts, seeds, settings)

    def stock() -> None:
        gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        pipe(
            prompts,
            num_inference_steps=args.steps,
            guidance_scale=settings.guidance_scale,
            eta=settings.eta,
            generator=gens,
            height=args.height,
            width=args.height,
            output_type="np",
        )

    ours(), stock()
    t_ours, t_stock = [], []
    for r in range(args.repeats):
        t_ours.append(timed(ours, device))
        t_stock.append(timed(stock, device))
        log(f"[sampling {r + 1}/{args.repeats}] capture {t_ours[-1]:.3f}s  stock {t_stock[-1]:.3f}s")
    sampling = {
        "capture_s": statistics.median(t_ours),
        "stock_s": statistics.median(t_stock),
        "overhead_ratio": statistics.median(t_ours) / statistics.median(t_stock),
        "images_per_s_capture": args.batch / statistics.median(t_ours),
        "images_per_s_stock": args.batch / statistics.median(t_stock),
    }

    # 2. training steps, M = 1 and M = 3
    policy = Policy(pipe, LoraSettings(rank=args.rank))
    traj = sample_trajectories(pipe, prompts * 2, seeds + [s + 1000 for s in seeds], settings)
    pairs = PairBatch(prompts, traj.latents[: args.batch].half(), traj.latents[args.batch :].half(), settings)
    schedule = ddim_schedule(pipe.scheduler, args.steps, device)
    optimizer = make_optimizer(policy)
    training: dict[str, Any] = {}
    for m in (1, 3):
        hp = DpoHyperparameters(num_sampled_steps=m)
        gen = torch.Generator().manual_seed(0)
        train_step(policy, optimizer, pairs, hp, schedule, gen)  # warm-up
        times, peaks = [], []
        for _ in range(max(1, args.repeats // 2)):
            with PeakMemory(device) as peak:
                times.append(
                    timed(
                        lambda hp=hp, gen=gen: train_step(policy, optimizer, pairs, hp, schedule, gen), device
                    )
                )
            peaks.append(peak.peak_bytes)
        training[f"M{m}"] = {"step_s": statistics.median(times), "peak_memory_mb": max(peaks) / 2**20}
        log(
            f"[train M={m}] {training[f'M{m}']['step_s']:.3f}s/step, peak {training[f'M{m}']['peak_memory_mb']:.0f} MB"
        )

    # 3. hot-swap
    with tempfile.TemporaryDirectory() as tmp:
        path, sha = policy.save_adapter(tmp)
        swaps = [
            timed(lambda: policy.hot_swap(path, expected_sha256=sha), device) for _ in range(args.repeats)
        ]
        swaps_nocheck = [timed(lambda: policy.hot_swap(path), device) for _ in range(args.repeats)]
        adapter_mb = path.stat().st_size / 2**20

    result = {
        "benchmark": "core",
        "model": args.model,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "dtype": args.dtype,
        "torch": torch.__version__,
        "settings": {
            "steps": args.steps,
            "batch": args.batch,
            "image_px": pipe.unet.config.sample_size * pipe.vae_scale_factor
            if args.height is None
            else args.height,
            "lora_rank": args.rank,
            "repeats": args.repeats,
        },
        "sampling": sampling,
        "train_step": training,
        "hot_swap": {
            "s_with_sha256_check": statistics.median(swaps),
            "s": statistics.median(swaps_nocheck),
            "adapter_mb": adapter_mb,
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(json.dumps(result, indent=2))
    log(f"capture overhead: {100 * (sampling['overhead_ratio'] - 1):+.1f}% (target < 5%); written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
