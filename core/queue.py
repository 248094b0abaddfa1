"""The sampling job queue: RQ on Redis in production, run-in-process for the embedded mode and tests.

Jobs are enqueued by dotted name with ids only (`core.jobs`), so the app never imports the worker
or torch. Redis holds only the queue; losing it loses queued work, never a label (the pool refill
re-creates whatever is missing from Postgres).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from core.jobs import SAMPLE_PAIR, SamplePair

logger = logging.getLogger(__name__)

QUEUE_NAME = "sampling"
ACTIVE_STATUSES = {"queued", "started", "deferred", "scheduled"}


class SamplingQueue(Protocol):
    def enqueue_sample_pair(self, prompt_id: int) -> str:
        """Queue one `sample_pair` job; returns its id."""
        ...

    def is_active(self, job_id: str) -> bool:
        """Whether the job is still waiting, scheduled for a retry, or running."""
        ...

    def depth(self) -> int:
        """Jobs waiting to run."""
        ...


class RqSamplingQueue:
    """`sample_pair` jobs on an RQ queue; failed jobs are retried with back-off."""

    def __init__(
        self,
        redis: Any,
        *,
        retries: int = 3,
        retry_intervals: tuple[int, ...] = (2, 10, 30),
        job_timeout: int = 1800,
        name: str = QUEUE_NAME,
    ) -> None:
        from rq import Queue

        self.redis = redis
        self.retries = retries
        self.retry_intervals = list(retry_intervals)
        self.job_timeout = job_timeout
        self.queue = Queue(name, connection=redis)

    def enqueue_sample_pair(self, prompt_id: int) -> str:
        from rq import Retry

        retry = Retry(max=self.retries, interval=self.retry_intervals) if self.retries else None
        job = self.queue.enqueue(
            SAMPLE_PAIR,
            kwargs=SamplePair(prompt_id=prompt_id).kwargs(),
            retry=retry,
            job_timeout=self.job_timeout,
            result_ttl=3600,
            failure_ttl=7 * 24 * 3600,
            description=f"sample_pair(prompt_id={prompt_id})",
        )
        return str(job.id)

    def is_active(self, job_id: str) -> bool:
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        try:
            status = Job.fetch(job_id, connection=self.redis).get_status(refresh=True)
        except NoSuchJobError:
            return False
        return status is not None and str(getattr(status, "value", status)) in ACTIVE_STATUSES

    def depth(self) -> int:
        return int(self.queue.count)


class InProcessQueue:
    """Runs each job synchronously when enqueued (tests) or hands it to a callback (embedded mode)."""

    def __init__(self, run: Callable[[int], Any]) -> None:
        self._run = run
        self._counter = 0

    def enqueue_sample_pair(self, prompt_id: int) -> str:
        self._counter += 1
        self._run(prompt_id)
        return f"inproc-{self._counter}"

    def is_active(self, job_id: str) -> bool:
        return False

    def depth(self) -> int:
        return 0
