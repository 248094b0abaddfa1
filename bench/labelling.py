"""Labelling for the loop benchmark: a programmatic labeller on the REST API, and a worker that counts.

`label_all` labels a pool sampled beforehand. `label_while_sampling` is the deployed loop: the app's
own PoolRefiller pokes the pool after each judgement, the worker (the product's `SamplingWorker`)
takes jobs as they come, and the labeller waits whenever the pool is empty; it reports the size of
every job the worker ran, so refill batching shows as pairs per job.
"""

from __future__ import annotations

import io
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from worker.runner import SamplingWorker

# How often the labeller asks again while the pool is empty, and the worker looks for a job.
POLL_SECONDS = 0.05


def brightness(png: bytes) -> float:
    return float(np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32).mean())


def judge_one(client: TestClient, headers: dict[str, str], pair: dict[str, Any]) -> float:
    """The brighter image wins. Returns the seconds the judgement rate limit made it wait: like any
    client it retries a 429 after `Retry-After` (DENSEALIGN_JUDGEMENT_RATE_PER_MINUTE caps it)."""
    left = brightness(client.get(pair["left"]["url"], headers=headers).content)
    right = brightness(client.get(pair["right"]["url"], headers=headers).content)
    side = pair["left"]["side"] if left >= right else pair["right"]["side"]
    body = {"pair_id": pair["pair_id"], "choice": side, "client_key": f"bench-{uuid.uuid4().hex}"}
    throttled = 0.0
    while (response := client.post("/api/v1/judgements", headers=headers, json=body)).status_code == 429:
        wait = float(response.headers["Retry-After"])
        time.sleep(wait)
        throttled += wait
    response.raise_for_status()
    return throttled


def label_all(client: TestClient, token: str) -> int:
    headers = {"Authorization": f"Bearer {token}"}
    n = 0
    while (pair := client.get("/api/v1/pairs/next", headers=headers).json()["pair"]) is not None:
        judge_one(client, headers, pair)
        n += 1
    return n


class CountingWorker(SamplingWorker):
    """The product's worker, noting each job's pairs and seconds."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.jobs: list[tuple[int, float]] = []  # (pairs, seconds) per job

    def execute_job(self, job: Any, queue: Any) -> Any:
        started = time.perf_counter()
        try:
            return super().execute_job(job, queue)
        finally:
            self.jobs.append((len((job.kwargs or {}).get("prompt_ids") or []), time.perf_counter() - started))


@dataclass
class LabellingRun:
    judgements: int
    wall_seconds: float
    cpu_seconds: float  # this process: app, refiller, labeller and worker (not Postgres or Redis)
    labeller_wait_seconds: float  # time the labeller found the pool empty
    rate_limited_seconds: float  # time it waited out 429s
    jobs: list[tuple[int, float]] = field(default_factory=list)

    def figures(self, pairs_per_job: int) -> dict[str, Any]:
        sizes = [pairs for pairs, _ in self.jobs]
        busy = sum(seconds for _, seconds in self.jobs)
        return {
            "judgements": self.judgements,
            "wall_seconds": self.wall_seconds,
            "cpu_seconds": self.cpu_seconds,
            "labeller_wait_seconds": self.labeller_wait_seconds,
            "rate_limited_seconds": self.rate_limited_seconds,
            "configured_pairs_per_job": pairs_per_job,
            "jobs": len(sizes),
            "pairs_sampled": sum(sizes),
            "pairs_per_job_mean": sum(sizes) / len(sizes) if sizes else None,
            "job_size_histogram": {str(size): n for size, n in sorted(Counter(sizes).items())},
            "worker_busy_seconds": busy,
            "pairs_per_second_while_sampling": sum(sizes) / busy if busy else None,
            "pairs_per_second_wall": sum(sizes) / self.wall_seconds,
            "judgements_per_second_wall": self.judgements / self.wall_seconds,
        }


def label_while_sampling(
    client: TestClient, token: str, worker: CountingWorker, judgements: int, think_seconds: float
) -> LabellingRun:
    """Label `judgements` pairs through the API while `worker` samples in this (the main) thread.

    RQ installs signal handlers, which only the main thread may do, so the labeller is the thread.
    """
    headers = {"Authorization": f"Bearer {token}"}
    waited = throttled = 0.0
    done = 0
    failure: list[BaseException] = []

    def labeller() -> None:
        nonlocal waited, throttled, done
        try:
            while done < judgements:
                pair = client.get("/api/v1/pairs/next", headers=headers).json()["pair"]
                if pair is None:
                    started = time.perf_counter()
                    time.sleep(POLL_SECONDS)
                    waited += time.perf_counter() - started
                    continue
                time.sleep(think_seconds)
                throttled += judge_one(client, headers, pair)
                done += 1
        except BaseException as exc:  # re-raised in the main thread
            failure.append(exc)

    jobs_before = len(worker.jobs)
    wall, cpu = time.perf_counter(), time.process_time()
    thread = threading.Thread(target=labeller, name="bench-labeller", daemon=True)
    thread.start()
    while thread.is_alive():
        if not worker.work(burst=True, max_jobs=1, logging_level="WARNING"):
            time.sleep(POLL_SECONDS)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if failure:
        raise failure[0]
    return LabellingRun(done, wall, cpu, waited, throttled, worker.jobs[jobs_before:])
