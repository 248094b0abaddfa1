"""Benchmark a warm worker job against the stock pipeline: images/s with the adapter fused, unfused,
and diffusers' own `pipeline.__call__` (no adapter), plus the hot-swap time.

Prints the figures and writes them to bench/results/worker.json (or --out). In one process, on one
CPU thread (`torch.set_num_threads(1)`, so the figures do not depend on what else the machine runs):
1. three warm sides on the same model, prompts, seeds and steps, each a whole job of
   --pairs-per-job pairs (2x as many images in one batch):
   - `fused`: the worker's real path, `PairSampler.sample_pairs` of a worker built as `build_sampler`
     builds it (`DENSEALIGN_SAMPLER__FUSE_ADAPTER` on), at policy version 1, whose adapter it
     swapped in from the blob store as it does for any new version: read the current version from
     Postgres, sample, write latents and PNGs, insert the rows;
   - `unfused`: the same with the setting off (the peft LoRA layers run in every forward);
   - `fused_sampling`, `unfused_sampling`: the sampling part of those jobs alone,
     `sample_trajectories(worker.policy.pipe, ...)` then its PIL images: what the adapter costs,
     without the job's storage and database work;
   - `stock`: `pipeline(prompts, generator=[...seeded...], output_type="pil")` on a plain pipeline;
   the sides alternate, in a rotating order, for --repeats rounds after one warm-up round each;
   each job's CPU time (`time.process_time`: this process only, so Postgres' share is left out)
   and wall time are kept, and images/s is images / median seconds;
2. the swap a worker makes when the current version changes (`PairSampler.load_version`: read the
   adapter blob, check its sha256, hot-swap, and for `fused` write W0 + scale * B @ A), version
   0 -> 1 and 1 -> 0, median of --swaps each, fused and unfused.

Usage: python bench/worker.py [--model models/densealign-shapes | tiny:sd | PATH] [--steps 50]
       [--pairs-per-job 8] [--repeats 5] [--postgres URL] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# after the repo root: bench/core.py must not shadow core/
sys.path.append(str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import drop_database, scratch_database  # noqa: E402

from core.db import make_engine, make_session_factory  # noqa: E402
from core.db.models import PolicyVersion  # noqa: E402
from core.db.policies import get_policy_version, publish_policy_version  # noqa: E402
from core.db.prompts import add_prompt  # noqa: E402
from core.diffusion.models import load_pipeline  # noqa: E402
from core.diffusion.sampler import sample_trajectories  # noqa: E402
from core.settings import Settings  # noqa: E402
from worker.main import build_sampler  # noqa: E402
from worker.sampling import PairSampler  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SHIPPED = ROOT / "models" / "densealign-shapes"
PROMPTS = ["a red circle above a blue square", "a yellow triangle", "two green squares", "a purple star"]


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def publish_version_1(sampler: PairSampler, blob_dir: Path) -> None:
    """A version-1 adapter the size a few DPO steps leave (B ~ N(0, 0.05)), made current."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in sampler.policy.lora_parameters():
            p.normal_(0.0, 0.05)
    path, sha = sampler.policy.save_adapter(blob_dir / "v1-source")
    sampler.policy.reset_adapter()
    key = "policies/v1/pytorch_lora_weights.safetensors"
    sampler.blobs.put(key, path.read_bytes())
    with sampler.sessions() as session, session.begin():
        publish_policy_version(
            session=session, version=1, parent_version=0, lora_key=key, lora_sha256=sha, make_current=True
        )


def swap_times(sampler: PairSampler, rows: dict[int, PolicyVersion], n: int) -> dict[str, float]:
    """Median ms of `load_version` 0 -> 1 and 1 -> 0 (the worker's swap, blob read and sha256 check
    included), and of `Policy.hot_swap` alone from a state dict in memory (the part fusing adds to)."""
    out: dict[str, list[float]] = {"0->1": [], "1->0": [], "hot_swap_only": []}
    state = sampler.policy.lora_state() if sampler.loaded_version == 1 else None
    for _ in range(n):
        for to in (1, 0):
            start = time.perf_counter()
            sampler.load_version(rows[to])
            out[f"{1 - to}->{to}"].append(time.perf_counter() - start)
    assert state is not None
    for _ in range(n):
        start = time.perf_counter()
        sampler.policy.hot_swap(state)
        out["hot_swap_only"].append(time.perf_counter() - start)
    return {k: round(1000 * statistics.median(v), 3) for k, v in out.items()}


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"{names[0]} ({len(names)} logical CPUs)" if names else platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(SHIPPED), help="default: the shipped model")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default: the product's 50)")
    parser.add_argument("--pairs-per-job", type=int, default=8, help="default: the product's 8 (16 images)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (each side once per round)")
    parser.add_argument("--swaps", type=int, default=20, help="swaps timed each way")
    parser.add_argument(
        "--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres", help="admin URL"
    )
    parser.add_argument("--out", default=None, help="default: bench/results/worker.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    url = scratch_database(args.postgres, prefix="densealign_bench_worker")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = run(args, url, Path(tmp))
    finally:
        drop_database(args.postgres, url)
    # wall times are only as good as the machine is quiet: CPU times leave other processes out
    result["load_average_1min"] = {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)}
    out = Path(args.out) if args.out else RESULTS / "worker.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def run(args: argparse.Namespace, url: str, tmp: Path) -> dict[str, Any]:
    base = Settings(
        database_url=url,
        blob_dir=str(tmp / "blobs"),
        model={"base_model": args.model, "device": "cpu"},  # type: ignore[arg-type]
        sampler={"num_steps": args.steps},  # type: ignore[arg-type]
    )
    sessions = make_session_factory(make_engine(url))
    with sessions() as session, session.begin():
        publish_policy_version(session=session, version=0)
        prompt_ids = [add_prompt(session=session, text=t).id for t in PROMPTS]
    workers: dict[str, PairSampler] = {}
    for name, fuse in (("fused", True), ("unfused", False)):
        sampler_config = base.sampler.model_copy(update={"fuse_adapter": fuse})
        workers[name] = build_sampler(base.model_copy(update={"sampler": sampler_config}))
    publish_version_1(workers["fused"], tmp)
    with sessions() as session:
        rows = {v: get_policy_version(session=session, version=v) for v in (0, 1)}
        session.expunge_all()
    stock = load_pipeline(args.model)
    job = [prompt_ids[k % len(prompt_ids)] for k in range(args.pairs_per_job)]
    images = 2 * len(job)
    texts = [PROMPTS[prompt_ids.index(pid)] for pid in job for _ in "ab"]
    settings = workers["fused"].settings

    def worker_job(sampler: PairSampler, seed: int) -> Callable[[], Any]:
        def go() -> Any:
            sampler.seed_source = random.Random(seed)
            return sampler.sample_pairs(job)

        return go

    def seeds_of(seed: int) -> list[int]:
        source = random.Random(seed)  # the seeds the worker draws from the same source, in its order
        return [source.getrandbits(63) for _ in range(images)]

    def sampling_only(sampler: PairSampler, seed: int) -> Callable[[], Any]:
        return lambda: sample_trajectories(sampler.policy.pipe, texts, seeds_of(seed), settings).pil_images()

    def stock_job(seed: int) -> Callable[[], Any]:
        seeds = seeds_of(seed)

        def go() -> Any:
            return stock(
                texts,
                num_inference_steps=settings.num_steps,
                guidance_scale=settings.guidance_scale,
                eta=settings.eta,
                generator=[torch.Generator().manual_seed(s) for s in seeds],
                output_type="pil",
            ).images

        return go

    jobs_of: dict[str, Callable[[int], Callable[[], Any]]] = {
        "fused": lambda r: worker_job(workers["fused"], r),
        "unfused": lambda r: worker_job(workers["unfused"], r),
        "fused_sampling": lambda r: sampling_only(workers["fused"], r),
        "unfused_sampling": lambda r: sampling_only(workers["unfused"], r),
        "stock": stock_job,
    }
    sides = list(jobs_of)
    times: dict[str, list[tuple[float, float]]] = {s: [] for s in sides}
    for r in range(args.repeats + 1):  # round 0 warms every side up (the first job swaps to version 1)
        order = sides[r % len(sides) :] + sides[: r % len(sides)]
        for side in order:
            t = timed(jobs_of[side](r))
            if r > 0:
                times[side].append(t)
        if r > 0:
            print(f"round {r}: " + ", ".join(f"{s} {times[s][-1][0]:.2f}s cpu" for s in sides))
    assert all(w.loaded_version == 1 for w in workers.values())

    def figures(side: str) -> dict[str, Any]:
        cpu = statistics.median(c for c, _ in times[side])
        wall = statistics.median(w for _, w in times[side])
        return {
            "images_per_cpu_second": round(images / cpu, 3),
            "images_per_wall_second": round(images / wall, 3),
            # contention on a shared machine only adds CPU time, so the best job is the least noisy figure
            "images_per_best_cpu_second": round(images / min(c for c, _ in times[side]), 3),
            "median_cpu_seconds": round(cpu, 4),
            "median_wall_seconds": round(wall, 4),
            "cpu_seconds": [round(c, 4) for c, _ in times[side]],
            "wall_seconds": [round(w, 4) for _, w in times[side]],
        }

    jobs = {side: figures(side) for side in sides}
    for side in sides[:-1]:
        for unit in ("cpu", "best_cpu", "wall"):
            key = f"images_per_{unit}_second"
            jobs[side][f"vs_stock_{unit}"] = round(jobs[side][key] / jobs["stock"][key], 4)
    swaps = {name: swap_times(workers[name], rows, args.swaps) for name in ("fused", "unfused")}
    model = Path(args.model)
    result = {
        "model": str(model.resolve().relative_to(ROOT))
        if model.exists() and model.resolve().is_relative_to(ROOT)
        else args.model,
        "steps": args.steps,
        "pairs_per_job": args.pairs_per_job,
        "images_per_job": images,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "jobs": jobs,
        "swap_ms_median": swaps,
    }
    for side in sides:
        j = jobs[side]
        ratio = (
            ""
            if side == "stock"
            else f"  ({j['vs_stock_cpu']:.3f}x stock cpu, {j['vs_stock_best_cpu']:.3f}x best cpu, "
            f"{j['vs_stock_wall']:.3f}x wall)"
        )
        print(
            f"{side:16s} {j['images_per_cpu_second']:8.2f} images/cpu-s {j['images_per_wall_second']:8.2f} "
            f"images/wall-s{ratio}"
        )
    for name, s in swaps.items():
        print(
            f"swap {name:8s} 0->1 {s['0->1']:.2f} ms, 1->0 {s['1->0']:.2f} ms, "
            f"hot_swap alone {s['hot_swap_only']:.2f} ms (medians)"
        )
    return result


if __name__ == "__main__":
    main()
