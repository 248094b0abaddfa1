"""Benchmark the data-parallel trainer: one round by 1 process vs N processes under torchrun.

Prints the figures and writes them to bench/results/data-parallel.json (or --out). On a scratch
Postgres database and Redis db 12 (--redis) it samples `--pairs` pairs with the product's worker and
labels them through the REST API (brighter image wins), then copies the database (a Postgres template
copy) and the blob dir once per run, so every run trains the same round from the same state:
- `densealign trainer --once` (1 process), and
- `torchrun --standalone --nproc-per-node N densealign trainer --once` (gloo on CPU),
alternating, `--repeats` times each. Every process runs torch on one thread (OMP_NUM_THREADS=1), so N
processes use N cores. Per run: the round's own seconds (`round_seconds` in the published metrics: the
round's pairs loaded, its steps, not the model load nor the publishing), pairs trained per second
(steps x pairs per step / round seconds), the whole command's wall time, and the CPU time of all its
processes (the children's rusage: model loading included).

Usage: python bench/data_parallel.py [--model models/densealign-shapes | tiny:sd] [--procs 2] [--steps 20]
    [--round-steps 60] [--pairs-per-step 8] [--pairs 16] [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# after the repo root: bench/core.py must not shadow core/
sys.path.append(str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import drop_database, scratch_database  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from labelling import label_all  # noqa: E402
from redis import Redis  # noqa: E402
from rq import Queue, SimpleWorker  # noqa: E402
from sqlalchemy import create_engine, make_url, select, text  # noqa: E402

from app.main import create_app  # noqa: E402
from core.db import make_engine, make_session_factory  # noqa: E402
from core.db.labellers import create_labeller  # noqa: E402
from core.db.models import PolicyVersion  # noqa: E402
from core.db.policies import publish_policy_version  # noqa: E402
from core.db.prompts import add_prompt  # noqa: E402
from core.pool import refill_pool  # noqa: E402
from core.queue import QUEUE_NAME, RqSamplingQueue  # noqa: E402
from core.settings import Settings  # noqa: E402
from worker.main import build_sampler  # noqa: E402
from worker.sampling import install  # noqa: E402

RESULTS = ROOT / "bench" / "results"
BIN = Path(sys.executable).parent
PROMPTS = [
    "a red circle above a blue square",
    "a green triangle left of a yellow circle",
    "two blue squares",
    "a yellow square below a red triangle",
]


def labelled_round(settings: Settings, redis: Redis, prompts: int) -> int:
    """Sample the pool with the product's worker and label all of it; returns the pairs labelled."""
    sessions = make_session_factory(make_engine(settings.database_url))
    with sessions() as session, session.begin():
        publish_policy_version(session=session, version=0)
        for prompt in PROMPTS[:prompts]:
            add_prompt(session=session, text=prompt)
        token = create_labeller(session=session, name="bench-oracle").token
    install(build_sampler(settings))
    with sessions() as session:
        refill_pool(
            session=session,
            queue=RqSamplingQueue(redis),
            target_per_prompt=settings.pool.target_per_prompt,
            max_version_lag=settings.dpo.max_version_lag,
            pairs_per_job=settings.pool.pairs_per_job,
        )
    SimpleWorker([Queue(QUEUE_NAME, connection=redis)], connection=redis).work(
        burst=True, logging_level="WARNING"
    )
    return label_all(TestClient(create_app(settings)), token)


def copy_database(admin_url: str, url: str) -> str:
    """A template copy of `url`'s database (nobody may be connected to it); returns the copy's URL."""
    source = make_url(url).database
    name = f"{source}_{time.monotonic_ns() % 10**9}"
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(
            text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :db"), {"db": source}
        )
        conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{source}"'))
    engine.dispose()
    return make_url(url).set(database=name).render_as_string(hide_password=False)


def run_round(procs: int, env: dict[str, str], url: str) -> dict[str, Any]:
    """Train the labelled round with `procs` processes; its figures."""
    entry = [str(BIN / "densealign"), "trainer", "--once"]
    command = (
        entry if procs == 1 else [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={procs}", *entry]
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0 or "published version 1" not in done.stdout:
        raise SystemExit(f"{procs} process(es): exit {done.returncode}\n{done.stderr[-3000:]}")
    with make_session_factory(make_engine(url))() as session:
        metrics = session.scalar(select(PolicyVersion.metrics).where(PolicyVersion.version == 1))
    assert metrics is not None
    pairs = metrics["optimizer_steps"] * int(env["DENSEALIGN_DPO__PAIRS_PER_STEP"])
    return {
        "processes": procs,
        "round_seconds": metrics["round_seconds"],
        "pairs_per_second": pairs / metrics["round_seconds"],
        "seconds_per_step": metrics["round_seconds"] / metrics["optimizer_steps"],
        "command_wall_seconds": wall,
        "command_cpu_seconds": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        "loss": metrics["loss"],
        "implicit_accuracy": metrics["implicit_accuracy"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "densealign-shapes"))
    parser.add_argument("--procs", type=int, default=2, help="processes of the data-parallel run")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps per trajectory")
    parser.add_argument("--round-steps", type=int, default=60, help="optimizer steps per round")
    parser.add_argument("--pairs-per-step", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=16, help="labelled pairs (over 4 prompts)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each configuration, alternating")
    parser.add_argument(
        "--postgres",
        default=os.environ.get(
            "DENSEALIGN_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/12", help="its db is flushed")
    parser.add_argument("--out", default=str(RESULTS / "data-parallel.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    log = lambda msg: print(msg, flush=True)  # noqa: E731

    redis = Redis.from_url(args.redis)
    redis.flushdb()
    url = scratch_database(args.postgres)
    copies: list[str] = []
    runs: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            blobs = Path(tmp) / "blobs"
            settings = Settings(
                database_url=url,
                redis_url=args.redis,
                blob_dir=str(blobs),
                secret_key="bench-only-secret-key",  # type: ignore[arg-type]
                overlap_share=0.0,
                model={"base_model": args.model, "device": "cpu", "lora_rank": 4},  # type: ignore[arg-type]
                sampler={"num_steps": args.steps},  # type: ignore[arg-type]
                pool={"target_per_prompt": max(1, args.pairs // len(PROMPTS)), "pairs_per_job": 2},  # type: ignore[arg-type]
            )
            log(f"sampling and labelling {args.pairs} pairs ({args.model}, {args.steps} DDIM steps)")
            labelled = labelled_round(settings, redis, prompts=len(PROMPTS))
            env = dict(os.environ) | {
                "OMP_NUM_THREADS": "1",
                "HF_HUB_OFFLINE": "1",
                "DENSEALIGN_MODEL__BASE_MODEL": args.model,
                "DENSEALIGN_MODEL__DEVICE": "cpu",
                "DENSEALIGN_MODEL__LORA_RANK": "4",
                "DENSEALIGN_SAMPLER__NUM_STEPS": str(args.steps),
                "DENSEALIGN_DPO__MIN_NEW_PAIRS": str(labelled),
                "DENSEALIGN_DPO__PAIRS_PER_STEP": str(args.pairs_per_step),
                "DENSEALIGN_DPO__STEPS_PER_ROUND": str(args.round_steps),
                "DENSEALIGN_DPO__CHECKPOINT_EVERY": str(args.round_steps),
            }
            for repeat in range(args.repeats):
                order = (1, args.procs) if repeat % 2 == 0 else (args.procs, 1)
                for procs in order:
                    copy = copy_database(args.postgres, url)
                    copies.append(copy)
                    run_blobs = Path(tmp) / f"blobs-{len(copies)}"
                    shutil.copytree(blobs, run_blobs)
                    run_env = env | {"DENSEALIGN_DATABASE_URL": copy, "DENSEALIGN_BLOB_DIR": str(run_blobs)}
                    run = run_round(procs, run_env, copy) | {"repeat": repeat}
                    runs.append(run)
                    log(
                        f"{procs} process(es): round {run['round_seconds']:.1f} s, "
                        f"{run['pairs_per_second']:.2f} pairs/s; command {run['command_wall_seconds']:.1f} s "
                        f"wall, {run['command_cpu_seconds']:.1f} s CPU"
                    )
                    shutil.rmtree(run_blobs)
    finally:
        for copy in copies:
            drop_database(args.postgres, copy)
        drop_database(args.postgres, url)

    def median(procs: int, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["processes"] == procs)

    speedup = median(args.procs, "pairs_per_second") / median(1, "pairs_per_second")
    result = {
        "benchmark": "data_parallel",
        "model": os.path.relpath(args.model, ROOT) if Path(args.model).exists() else args.model,
        "ddim_steps": args.steps,
        "round_steps": args.round_steps,
        "pairs_per_step": args.pairs_per_step,
        "pairs": labelled,
        "processes": args.procs,
        "torch_threads_per_process": 1,
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "machine": platform.platform(),
        "torch": torch.__version__,
        "runs": runs,
        "median_pairs_per_second": {
            "1": median(1, "pairs_per_second"),
            str(args.procs): median(args.procs, "pairs_per_second"),
        },
        "median_round_seconds": {
            "1": median(1, "round_seconds"),
            str(args.procs): median(args.procs, "round_seconds"),
        },
        "speedup": speedup,
    }
    log(f"{args.procs} processes vs 1: {speedup:.2f}x pairs per second (medians of {args.repeats})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
