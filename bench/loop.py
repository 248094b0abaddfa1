"""Benchmark the online loop on real Postgres and Redis: sampling rate, round time, hot-swap, latency.

Prints the figures and writes them to bench/results/loop.json (or --out). On a scratch Postgres
database and Redis db 14 it:
1. fills the pool with an RQ SimpleWorker in this process -> pairs sampled per second per worker;
2. labels every pair through the REST API with a programmatic labeller (brighter image wins);
3. trains one round -> seconds per round, per optimizer step, and per pass over 100 pairs;
4. has the worker take its next job -> hot-swap time, and the label-to-new-version latency: from
   the last label of the round to the first pair sampled by the new version. A deployed trainer
   polls every `dpo.poll_seconds`; that wait (on average half the interval) is reported apart.

Usage: python bench/loop.py [--model tiny:sd|PATH] [--prompts 4] [--pool 4] [--steps 20] [--round-steps 10]
    [--pairs-per-job N] [--out bench/results/loop.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# after the repo root: bench/core.py must not shadow core/
sys.path.append(str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import drop_database, scratch_database  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from redis import Redis  # noqa: E402
from rq import Queue, SimpleWorker  # noqa: E402
from sqlalchemy import select  # noqa: E402

from app.main import create_app  # noqa: E402
from core.db import make_engine, make_session_factory  # noqa: E402
from core.db.labellers import create_labeller  # noqa: E402
from core.db.models import Pair  # noqa: E402
from core.db.policies import publish_policy_version  # noqa: E402
from core.db.prompts import add_prompt  # noqa: E402
from core.pool import refill_pool  # noqa: E402
from core.queue import QUEUE_NAME, RqSamplingQueue  # noqa: E402
from core.settings import Settings  # noqa: E402
from trainer.main import build_trainer  # noqa: E402
from worker.main import build_sampler  # noqa: E402
from worker.sampling import Sampler, install  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = [
    "a red circle above a blue square",
    "a green triangle",
    "a yellow square left of a red circle",
    "a blue circle",
    "a red triangle below a green square",
    "a yellow circle",
]


def brightness(png: bytes) -> float:
    return float(np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32).mean())


def label_all(client: TestClient, token: str) -> int:
    headers = {"Authorization": f"Bearer {token}"}
    n = 0
    while (pair := client.get("/api/v1/pairs/next", headers=headers).json()["pair"]) is not None:
        left = brightness(client.get(pair["left"]["url"], headers=headers).content)
        right = brightness(client.get(pair["right"]["url"], headers=headers).content)
        side = pair["left"]["side"] if left >= right else pair["right"]["side"]
        body = {"pair_id": pair["pair_id"], "choice": side, "client_key": f"bench-{uuid.uuid4().hex}"}
        client.post("/api/v1/judgements", headers=headers, json=body).raise_for_status()
        n += 1
    return n


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
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--out", default=str(RESULTS / "loop.json"))
    args = parser.parse_args(argv)
    log = lambda msg: print(msg, flush=True)  # noqa: E731

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
            assert isinstance(sampler, Sampler)
            install(sampler)
            queue = RqSamplingQueue(redis)
            worker = SimpleWorker([Queue(QUEUE_NAME, connection=redis)], connection=redis)

            def refill() -> int:
                with sessions() as session:
                    return refill_pool(
                        session=session,
                        queue=queue,
                        redis=redis,
                        target_per_prompt=args.pool,
                        max_version_lag=2,
                        pairs_per_job=settings.pool.pairs_per_job,
                    )

            # 1. sampling throughput
            jobs = refill()
            t0 = time.perf_counter()
            worker.work(burst=True)
            sample_s = time.perf_counter() - t0
            log(f"[sampling] {jobs} pairs in {sample_s:.1f}s ({settings.pool.pairs_per_job} per job)")

            # 2. label everything through the API
            client = TestClient(create_app(settings))
            t0 = time.perf_counter()
            labelled = label_all(client, token)
            label_s = time.perf_counter() - t0
            last_label = time.perf_counter()
            log(f"[labelling] {labelled} judgements in {label_s:.1f}s")

            # 3. one training round
            steps_seen: list[int] = []
            trainer = build_trainer(settings, progress=lambda s, t: steps_seen.append(s))
            t0 = time.perf_counter()
            version = trainer.run_once()
            round_s = time.perf_counter() - t0
            assert version == 1, version
            log(f"[training] round of {args.round_steps} steps on {labelled} pairs in {round_s:.1f}s")

            # 4. the worker's next job swaps version 1 in
            refill()
            worker.work(burst=True, max_jobs=1)
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
                "settings": {
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
                "labels_per_second_api": labelled / label_s,
                "round_seconds": round_s,
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
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(json.dumps(result, indent=2))
    log(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
