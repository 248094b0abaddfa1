"""The sampling job queue: RQ on Redis in production, run-in-process for the embedded mode and tests.

Jobs are enqueued by dotted name with ids only (`core.jobs`), so the app never imports the worker
or torch. Redis holds only the queue; losing it loses queued work, never a label (the pool refill
re-creates whatever is missing from Postgres).
"""

from __future__ import annotations

import logging
import queue as stdlib_queue
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol

from rq import Queue, Retry
from rq.exceptions import NoSuchJobError
from rq.job import Job

from core.jobs import SAMPLE_EVAL_PAIRS, SAMPLE_PAIRS, SampleEvalPairs, SamplePairs

logger = logging.getLogger(__name__)

QUEUE_NAME = "sampling"
ACTIVE_STATUSES = {"queued", "started", "deferred", "scheduled"}
LOCK_KEY = "densealign:pool:lock"
# A sampling job running longer than this is stopped by RQ (and retried).
JOB_TIMEOUT_SECONDS = 1800


def slots_key(owner: int | str) -> str:
    """Redis hash of job slots of a prompt (its id) or of an evaluation campaign ("eval:<id>")."""
    return f"densealign:pool:slots:{owner}"


class JobSlots(Protocol):
    """Which job fills each slot of an owner's share of the pool (slot -> job id)."""

    def get(self, owner: int | str) -> dict[str, str]: ...

    def set(self, owner: int | str, slot: str, job_id: str) -> None: ...


class MemorySlots:
    """Job slots kept in this process (the embedded mode, where there is no Redis)."""

    def __init__(self) -> None:
        self._slots: dict[int | str, dict[str, str]] = {}

    def get(self, owner: int | str) -> dict[str, str]:
        return dict(self._slots.get(owner, {}))

    def set(self, owner: int | str, slot: str, job_id: str) -> None:
        self._slots.setdefault(owner, {})[slot] = job_id


class RedisSlots:
    """Job slots in Redis hashes, shared by every process that refills (app, workers' ticks)."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis

    def get(self, owner: int | str) -> dict[str, str]:
        return {_s(k): _s(v) for k, v in self.redis.hgetall(slots_key(owner)).items()}

    def set(self, owner: int | str, slot: str, job_id: str) -> None:
        self.redis.hset(slots_key(owner), slot, job_id)


class SamplingQueue(Protocol):
    def claim_slots(self) -> AbstractContextManager[JobSlots | None]:
        """This queue's job slots, held by the caller alone until the block ends (one refill at a
        time); None when another process holds them (skip this refill)."""
        ...

    def enqueue_sample_pairs(self, prompt_ids: list[int]) -> str:
        """Queue one job that samples a pair for each of `prompt_ids` in one batch; returns its id."""
        ...

    def enqueue_eval_pairs(self, campaign_id: int, prompt_ids: list[int]) -> str:
        """Queue one job that samples an evaluation pair of campaign `campaign_id` per prompt id."""
        ...

    def is_active(self, job_id: str) -> bool:
        """Whether the job is still waiting, scheduled for a retry, or running."""
        ...

    def depth(self) -> int:
        """Jobs waiting to run."""
        ...

    def requeue_abandoned(self) -> int:
        """Put jobs whose worker died mid-job back in the queue; returns how many."""
        ...


class RqSamplingQueue:
    """Sampling jobs on an RQ queue; failed jobs are retried with back-off (all of a job's pairs)."""

    def __init__(
        self,
        redis: Any,
        *,
        retries: int = 3,
        retry_intervals: tuple[int, ...] = (2, 10, 30),
        job_timeout: int = JOB_TIMEOUT_SECONDS,
        name: str = QUEUE_NAME,
    ) -> None:
        self.redis = redis
        self.retries = retries
        self.retry_intervals = list(retry_intervals)
        self.job_timeout = job_timeout
        self.queue = Queue(name, connection=redis)

    @contextmanager
    def claim_slots(self) -> Iterator[JobSlots | None]:
        lock = self.redis.lock(LOCK_KEY, timeout=60, blocking_timeout=10)
        if not lock.acquire():
            logger.info("another process is refilling the pool; skipping this tick")
            yield None
            return
        try:
            yield RedisSlots(self.redis)
        finally:
            try:
                lock.release()
            except Exception:  # the lock expired: harmless, the next refill re-counts
                logger.warning("pool lock expired before release")

    def enqueue_sample_pairs(self, prompt_ids: list[int]) -> str:
        payload = SamplePairs(prompt_ids=tuple(prompt_ids))
        return self._enqueue(SAMPLE_PAIRS, payload.kwargs())

    def enqueue_eval_pairs(self, campaign_id: int, prompt_ids: list[int]) -> str:
        payload = SampleEvalPairs(campaign_id=campaign_id, prompt_ids=tuple(prompt_ids))
        return self._enqueue(SAMPLE_EVAL_PAIRS, payload.kwargs())

    def _enqueue(self, function: str, kwargs: dict[str, Any]) -> str:
        retry = Retry(max=self.retries, interval=self.retry_intervals) if self.retries else None
        arguments = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        job = self.queue.enqueue(
            function,
            kwargs=kwargs,
            retry=retry,
            job_timeout=self.job_timeout,
            result_ttl=3600,
            failure_ttl=7 * 24 * 3600,
            description=f"{function.rsplit('.', 1)[-1]}({arguments})",
        )
        return str(job.id)

    def is_active(self, job_id: str) -> bool:
        try:
            status = Job.fetch(job_id, connection=self.redis).get_status(refresh=True)
        except NoSuchJobError:
            return False
        return status is not None and str(getattr(status, "value", status)) in ACTIVE_STATUSES

    def depth(self) -> int:
        return int(self.queue.count)

    def requeue_abandoned(self) -> int:
        """Retry (or fail for good) started jobs whose worker stopped refreshing them; returns how many.

        RQ does this itself only every 10 minutes; the refill tick calls it every few seconds, so the
        job of a worker killed mid-job goes back to the queue within about a minute (worker.runner).
        """
        registry = self.queue.started_job_registry
        expired = registry.get_expired_job_ids()
        if expired:
            registry.cleanup()
            logger.warning("requeued %d abandoned sampling job(s): %s", len(expired), expired)
        return len(expired)


class ThreadQueue:
    """Jobs run by worker threads of this process (the embedded mode: no Redis, no RQ).

    `run_worker(handler, stop)` serves jobs until `stop` is set, calling `handler(prompt_ids)` once per
    job; a failed job is retried (all its pairs) up to `retries` times. Its job slots live in memory.
    """

    def __init__(self, *, retries: int = 3) -> None:
        self.retries = retries
        self.slots = MemorySlots()
        self._slots_lock = threading.Lock()
        # (job id, campaign id for an evaluation job or None, prompt ids, attempt)
        self._jobs: stdlib_queue.Queue[tuple[str, int | None, tuple[int, ...], int]] = stdlib_queue.Queue()
        self._status: dict[str, str] = {}
        self._lock = threading.Lock()
        self._counter = 0

    @contextmanager
    def claim_slots(self) -> Iterator[JobSlots | None]:
        with self._slots_lock:
            yield self.slots

    def enqueue_sample_pairs(self, prompt_ids: list[int]) -> str:
        return self._put(None, SamplePairs(prompt_ids=tuple(prompt_ids)).prompt_ids)

    def enqueue_eval_pairs(self, campaign_id: int, prompt_ids: list[int]) -> str:
        return self._put(campaign_id, SampleEvalPairs(campaign_id, tuple(prompt_ids)).prompt_ids)

    def _put(self, campaign_id: int | None, prompt_ids: tuple[int, ...]) -> str:
        with self._lock:
            self._counter += 1
            job_id = f"local-{self._counter}"
            self._status[job_id] = "queued"
        self._jobs.put((job_id, campaign_id, prompt_ids, 0))
        return job_id

    def is_active(self, job_id: str) -> bool:
        with self._lock:
            return self._status.get(job_id) in ACTIVE_STATUSES

    def depth(self) -> int:
        return self._jobs.qsize()

    def requeue_abandoned(self) -> int:
        return 0  # the worker threads die only with this process, and with them the queue

    def run_worker(
        self,
        handler: Callable[[list[int]], Any],
        stop: Any,
        poll: float = 0.5,
        eval_handler: Callable[[int, list[int]], Any] | None = None,
    ) -> None:
        """Serve jobs until `stop` is set: `handler(prompt_ids)` for training pairs and
        `eval_handler(campaign_id, prompt_ids)` for evaluation pairs."""
        while not stop.is_set():
            try:
                job_id, campaign_id, prompt_ids, attempt = self._jobs.get(timeout=poll)
            except stdlib_queue.Empty:
                continue
            with self._lock:
                self._status[job_id] = "started"
            try:
                if campaign_id is None:
                    handler(list(prompt_ids))
                elif eval_handler is not None:
                    eval_handler(campaign_id, list(prompt_ids))
                else:
                    raise RuntimeError(
                        f"job {job_id} samples evaluation pairs, and this worker has no handler"
                    )
            except Exception:
                logger.exception(
                    "job %s (prompts %s) failed on attempt %d", job_id, list(prompt_ids), attempt + 1
                )
                if attempt < self.retries:
                    with self._lock:
                        self._status[job_id] = "queued"
                    self._jobs.put((job_id, campaign_id, prompt_ids, attempt + 1))
                    continue
                with self._lock:
                    self._status[job_id] = "failed"
                continue
            with self._lock:
                self._status[job_id] = "finished"


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
