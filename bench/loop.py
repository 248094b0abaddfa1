"""Benchmark the online loop on real Postgres and Redis: sampling rate, round time, hot-swap, latency.

Prints the figures and writes them to bench/results/loop-refill.json (--refill off: loop.json; or
--out). On a scratch Postgres database and Redis db 13 (--redis), with torch on one thread, it:
1. fills the pool with the product's worker (`SamplingWorker`) in this process -> pairs sampled per
   second per worker;
2. labels through the REST API with a programmatic labeller (brighter image wins). With refill on
   (the default, as deployed) the app's own PoolRefiller pokes the pool after each judgement and the
   worker's refill tick runs, the worker takes jobs as they come while `--judgements` pairs are
   labelled, and the figures are pairs per job (mean and histogram, next to the configured
   `pool.pairs_per_job`) and pairs per second. With refill off it labels the pool sampled in 1;
3. trains one round -> seconds per round, per optimizer step, and per pass over 100 pairs;
4. has the worker take its next job -> hot-swap time, and the label-to-new-version latency: from
   the last label of the round to the first pair sampled by the new version. A deployed trainer
   polls every `dpo.poll_seconds`; that wait (on average half the interval) is reported apart.
Each phase reports wall time and this process's CPU time (Postgres and Redis not included).

Usage: python bench/loop.py [--model tiny:sd|PATH] [--prompts 4] [--pool 4] [--steps 20] [--round-steps 10]
    [--pairs-per-job N] [--refill on|off] [--judgements 48] [--think-seconds 0] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# after the repo root: bench/core.py must not shadow core/
sys.path.append(str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import drop_database, scratch_database  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from labelling import CountingWorker, label_all, label_while_sampling  # noqa: E402
from redis import Redis  # noqa: E402
from rq import Queue  # noqa: E402
from sqlalchemy import select  # noqa: E402

from app.main import create_app  # noqa: E402
from app.refill import rq_refiller  # noqa: E402
from core.db import make_engine, make_session_factory  # noqa: E402
from core.db.labellers import create_labeller  # noqa: E402
from core.db.models import Pair  # noqa: E402
from core.db.policies import publish_policy_version  # noqa: E402
from core.db.prompts import add_prompt  # noqa: E402
from core.pool import refill_pool  # noqa: E402
from core.queue import QUEUE_NAME, RqSamplingQueue  # noqa: E402
from core.settings import Settings  # noqa: E402
from trainer.main import build_trainer  # noqa: E402
from worker.main import build_sampler, start_refill_tick  # noqa: E402
from worker.sampling import PairSampler, install  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = [
    "a red circle above a blue square",
    "a green triangle",
    "a yellow square left of a red circle",
    "a blue circle",
    "a red triangle below a green square",
    "a yellow circle",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny:sd")
    parser.add_argument("--prompts", type=int, default=4, help="active prompts")
    parser.add_argument("--pool", type=int, default=4, help="unlabelled pairs kept per prompt")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps per trajectory")
    parser.add_argument("--round-steps", type=int, default=10, help="optimizer steps per round")
    parser.add_argument("--pairs-per-step", type=int, default=4)
    parser.add_argument(
        "--pairs-per-job",
        type=int,
        default=None,
        help="pairs one sampling job draws as a batch (default: settings)",
    )
    parser.add_argument(
        "--postgres",
        default=os.environ.get(
            "DENSEALIGN_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/13", help="its db is flushed")
    parser.add_argument(
        "--refill",
        choices=("on", "off"),
        default="on",
        help="on (as deployed): label while the app's refiller and the worker keep the pool up",
    )
    parser.add_argument("--judgements", type=int, default=48, help="pairs to label with refill on")
    parser.add_argument("--think-seconds", type=float, default=0.0, help="labeller pause per pair")
    parser.add_argument("--out", default=None, help="default: results/loop-refill.json (off: loop.json)")
    args = parser.parse_args(argv)
    out = Path(args.out or RESULTS / ("loop-refill.json" if args.refill == "on" else "loop.json"))
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    torch.set_num_threads(1)  # as `make test` and the 2-core compose run it; figures comparable

    redis = Redis.from_url(args.redis)
    redis.flushdb()
    url = scratch_database(args.postgres)
    try:
        with tempfile.TemporaryDirectory() as blobs:
            settings = Settings(
                database_url=url,
                redis_url=args.redis,
                blob_dir=blobs,
                secret_key="bench-only-secret-key",  # type: ignore[arg-type]
                overlap_share=0.0,
                model={"base_model": args.model, "device": "auto", "lora_rank": 4},  # type: ignore[arg-type]
                sampler={"num_steps": args.steps},  # type: ignore[arg-type]
                dpo={
                    "min_new_pairs": 1,
                    "steps_per_round": args.round_steps,
                    "pairs_per_step": args.pairs_per_step,
                    "checkpoint_every": max(1, args.round_steps // 2),
                },  # type: ignore[arg-type]
                pool={"target_per_prompt": args.pool}  # type: ignore[arg-type]
                | ({"pairs_per_job": args.pairs_per_job} if args.pairs_per_job else {}),
            )
            sessions = make_session_factory(make_engine(url))
            with sessions() as session, session.begin():
                publish_policy_version(session=session, version=0)
                for prompt in PROMPTS[: args.prompts]:
                    add_prompt(session=session, text=prompt)
                token = create_labeller(session=session, name="bench-oracle").token
            sampler = build_sampler(settings)
            assert isinstance(sampler, PairSampler)
            install(sampler)
            queue = RqSamplingQueue(redis)
            worker = CountingWorker([Queue(QUEUE_NAME, connection=redis)], connection=redis)

            def refill() -> int:
                with sessions() as session:
                    return refill_pool(
                        session=session,
                        queue=queue,
                        target_per_prompt=args.pool,
                        max_version_lag=2,
                        pairs_per_job=settings.pool.pairs_per_job,
                    )

            # 1. sampling throughput
            jobs = refill()
            t0, c0 = time.perf_counter(), time.process_time()
            worker.work(burst=True, logging_level="WARNING")
            sample_s, sample_cpu = time.perf_counter() - t0, time.process_time() - c0
            log(f"[sampling] {jobs} pairs in {sample_s:.1f}s ({settings.pool.pairs_per_job} per job)")

            # 2. label through the API
            figures: dict[str, Any] = {}
            client = TestClient(create_app(settings))
            if args.refill == "on":
                figures["refill"] = label_with_refill(settings, sessions, token, worker, args)
                print_refill(figures["refill"], log)
                # Then as with refill off: sample what the last judgements asked for and label the
                # pool, so the new version's pairs have room in it (step 4) and latency is comparable.
                worker.work(burst=True, logging_level="WARNING")
                labelled = figures["refill"]["judgements"] + label_all(client, token)
            else:
                t0 = time.perf_counter()
                labelled = label_all(client, token)
                figures["labels_per_second_api"] = labelled / (time.perf_counter() - t0)
                log(f"[labelling] {labelled} judgements at {figures['labels_per_second_api']:.1f}/s")
            last_label = time.perf_counter()

            # 3. one training round
            steps_seen: list[int] = []
            trainer = build_trainer(settings, progress=lambda s, t: steps_seen.append(s))
            t0, c0 = time.perf_counter(), time.process_time()
            version = trainer.run_once()
            round_s, round_cpu = time.perf_counter() - t0, time.process_time() - c0
            assert version == 1, version
            log(f"[training] round of {args.round_steps} steps on {labelled} pairs in {round_s:.1f}s")

            # 4. the worker's next job swaps version 1 in
            refill()
            worker.work(burst=True, max_jobs=1, logging_level="WARNING")
            first_new_pair = time.perf_counter()
            with sessions() as session:
                assert session.scalar(select(Pair.id).where(Pair.policy_version == 1)) is not None
            step_s = round_s / args.round_steps
            result = {
                "benchmark": "loop",
                "model": args.model,
                "device": torch.cuda.get_device_name()
                if torch.cuda.is_available()
                else f"cpu ({os.cpu_count()} cores)",
                "torch_threads": torch.get_num_threads(),
                "settings": {
                    "refill": args.refill,
                    "prompts": args.prompts,
                    "pool_per_prompt": args.pool,
                    "ddim_steps": args.steps,
                    "round_steps": args.round_steps,
                    "pairs_per_step": args.pairs_per_step,
                    "sampled_steps_M": settings.dpo.sampled_steps,
                    "pairs_per_job": settings.pool.pairs_per_job,
                },
                "pairs_per_second_per_worker": jobs / sample_s,
                "seconds_per_pair": sample_s / jobs,
                "sampling_cpu_seconds": sample_cpu,
                "sampling_wall_seconds": sample_s,
                **figures,
                "round_seconds": round_s,
                "round_cpu_seconds": round_cpu,
                "seconds_per_optimizer_step": step_s,
                "seconds_per_100_pairs_one_pass": step_s * 100 / args.pairs_per_step,
                "hot_swap_seconds": sampler.last_swap_seconds,
                "label_to_new_version_seconds": first_new_pair - last_label,
                "plus_trainer_poll_wait_mean_seconds": settings.dpo.poll_seconds / 2,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
    finally:
        drop_database(args.postgres, url)
        redis.flushdb()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(json.dumps(result, indent=2))
    log(f"written to {out}")
    return 0


def label_with_refill(
    settings: Settings, sessions: Any, token: str, worker: CountingWorker, args: argparse.Namespace
) -> dict[str, Any]:
    """Label `args.judgements` pairs with the deployed refill: the app's PoolRefiller and the
    worker's refill tick, both as `densealign serve` and `densealign worker` build them."""
    refiller = rq_refiller(settings, sessions)
    client = TestClient(create_app(settings, session_factory=sessions, refiller=refiller))
    stop = threading.Event()
    tick = start_refill_tick(
        settings, RqSamplingQueue(worker.connection, retries=settings.pool.job_retries), stop
    )
    try:
        run = label_while_sampling(client, token, worker, args.judgements, args.think_seconds)
    finally:
        stop.set()
        tick.join()
        refiller.join()
    return run.figures(settings.pool.pairs_per_job)


def print_refill(figures: dict[str, Any], log: Any) -> None:
    log(
        f"[refill on] {figures['judgements']} judgements in {figures['wall_seconds']:.1f}s wall, "
        f"{figures['cpu_seconds']:.1f}s CPU; labeller waited {figures['labeller_wait_seconds']:.1f}s for "
        f"pairs, {figures['rate_limited_seconds']:.0f}s for the rate limit"
    )
    log(
        f"[refill on] {figures['jobs']} jobs, {figures['pairs_sampled']} pairs: "
        f"{figures['pairs_per_job_mean']:.2f} pairs per job (configured {figures['configured_pairs_per_job']}), "
        f"sizes {figures['job_size_histogram']}"
    )
    log(
        f"[refill on] {figures['pairs_per_second_while_sampling']:.2f} pairs/s while sampling, "
        f"{figures['pairs_per_second_wall']:.2f} pairs/s over the run"
    )


if __name__ == "__main__":
    sys.exit(main())
