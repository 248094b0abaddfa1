"""The RQ side of `densealign worker`: serve sampling jobs until told to stop, whatever Redis does.

RQ's `SimpleWorker.work()` returns (or raises) when Redis goes away, at any point: while it waits
for a job, in the middle of one, or while it stores a job's result. `serve_until_stopped` then waits
for Redis with back-off and starts a fresh RQ worker (and scheduler), so only a signal ends the
process. Nothing is lost meanwhile: a job's pairs are in Postgres before RQ hears the job finished,
and the pool refill re-counts from Postgres.

Abandoned jobs: RQ marks a started job abandoned when its heartbeat lapses, but by default that is
the job timeout plus a minute (31 minutes here), and a `SimpleWorker` refreshes nothing while the
job runs. `SamplingWorker` keeps a short job heartbeat (`JOB_HEARTBEAT_TTL`) and refreshes it from
a thread while the job runs; the refill tick asks RQ to clean the started-job registry, so the job
of a worker killed mid-job is retried within about a minute.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import Queue, SimpleWorker

from core.heartbeat import Heartbeat

logger = logging.getLogger(__name__)

# Seconds after its last refresh that a running job counts as abandoned; refreshed every third of it.
JOB_HEARTBEAT_TTL = 45
BACKOFF_SECONDS = (1.0, 2.0, 5.0, 10.0, 30.0)


class SamplingWorker(SimpleWorker):
    """A SimpleWorker whose running job keeps a short heartbeat and whose state reaches `heartbeat`."""

    heartbeat_: Heartbeat | None = None
    loaded_version: Callable[[], int | None] = staticmethod(lambda: None)
    # what the idle state says it waits with, e.g. "sd3 model" (the dashboard shows it)
    idle_detail: str = "waiting for sampling jobs"
    stop_requested_by_signal = False

    def get_heartbeat_ttl(self, job: Any) -> int:
        return JOB_HEARTBEAT_TTL

    def request_stop(self, signum: Any, frame: Any) -> None:
        self.stop_requested_by_signal = True
        super().request_stop(signum, frame)

    def execute_job(self, job: Any, queue: Any) -> Any:
        prompts = (job.kwargs or {}).get("prompt_ids") or job.args
        self._say("sampling", f"{len(prompts or [])} pair(s), job {job.id}")
        done = threading.Event()
        refresher = threading.Thread(
            target=self._refresh, args=(job, done), name="job-heartbeat", daemon=True
        )
        refresher.start()
        try:
            return super().execute_job(job, queue)
        finally:
            done.set()
            refresher.join()
            self._say("idle", self.idle_detail)

    def _refresh(self, job: Any, done: threading.Event) -> None:
        while not done.wait(JOB_HEARTBEAT_TTL / 3):
            try:
                self.maintain_heartbeats(job)
            except Exception as exc:  # Redis away: the job goes on; its result handling will tell
                logger.warning("could not refresh the heartbeat of job %s: %s", job.id, exc)

    def _say(self, state: str, detail: str) -> None:
        if self.heartbeat_ is not None:
            self.heartbeat_.set(state, detail, version=self.loaded_version())


def serve_until_stopped(
    *,
    redis: Any,
    queue_names: list[str],
    heartbeat: Heartbeat | None = None,
    loaded_version: Callable[[], int | None] = lambda: None,
    burst: bool = False,
    model_family: str | None = None,
) -> int:
    """Run RQ workers one after another until a signal (or, with `burst`, an empty queue); returns 0.
    `model_family` (e.g. "sd3") goes into the idle state the dashboard shows."""
    idle = "waiting for sampling jobs" + (f" ({model_family} model)" if model_family else "")
    stop = threading.Event()
    failures = 0
    while True:
        worker: SamplingWorker | None = None
        try:
            worker = SamplingWorker([Queue(name, connection=redis) for name in queue_names], connection=redis)
            worker.heartbeat_ = heartbeat
            worker.loaded_version = loaded_version  # type: ignore[method-assign]
            worker.idle_detail = idle
            if heartbeat is not None:
                heartbeat.set("idle", idle, version=loaded_version())
            # SIGTERM: RQ finishes the job in hand (a warm shutdown), then returns; a second SIGTERM
            # stops at once. Compose's stop grace is sized to one job at the settings each file ships.
            worker.work(burst=burst, with_scheduler=True, logging_level="INFO")
        except (RedisConnectionError, RedisTimeoutError) as exc:
            logger.warning("Redis is unreachable: %s", exc)
        if burst or (worker is not None and worker.stop_requested_by_signal):
            return 0
        # RQ gave up on Redis (or its loop ended for another reason). RQ's signal handlers belong to the
        # worker that just ended: from here until the next one starts, a signal simply ends the process.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        while not stop.is_set():
            delay = BACKOFF_SECONDS[min(failures, len(BACKOFF_SECONDS) - 1)]
            failures += 1
            if heartbeat is not None:
                heartbeat.set(
                    "waiting", f"Redis unreachable; retrying in {delay:.0f}s", version=loaded_version()
                )
            logger.info("reconnecting to Redis in %.0fs", delay)
            if stop.wait(delay):
                break
            try:
                redis.ping()
            except (RedisConnectionError, RedisTimeoutError):
                continue
            logger.info("Redis is back; starting a new RQ worker")
            failures = 0
            break
        if stop.is_set():
            return 0
