"""Top the sampling pool up when judgements arrive, without ever slowing or failing a request.

A judgement can free a slot in the pool (its pair no longer needs labels), so the app pokes the
refiller after each one. The refill itself (`core.pool.refill_pool`) runs in a background thread,
at most once every `min_interval` seconds per process; if Redis is down it logs and the labelling
goes on from Postgres (the workers' periodic tick catches up when Redis is back).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from redis import Redis
from sqlalchemy.orm import Session, sessionmaker

from core.pool import refill_pool
from core.queue import RqSamplingQueue, SamplingQueue
from core.settings import Settings

log = logging.getLogger(__name__)


class PoolRefiller:
    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        queue: SamplingQueue,
        target_per_prompt: int,
        max_version_lag: int,
        pairs_per_job: int = 1,
        eval_pool_pairs: int = 8,
        min_interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessions = sessions
        self._queue = queue
        self._target = target_per_prompt
        self._lag = max_version_lag
        self._pairs_per_job = pairs_per_job
        self._eval_pool_pairs = eval_pool_pairs
        self._min_interval = min_interval
        self._clock = clock
        self._last = float("-inf")
        self._lock = threading.Lock()
        self._pending = False
        self._thread: threading.Thread | None = None

    def poke(self) -> bool:
        """Ask for a refill; returns whether a background thread was started for it.

        A poke while a refill runs (or within `min_interval` of the last) is not lost: the running
        thread refills once more afterwards, so the last judgement of a burst is always counted.
        """
        with self._lock:
            self._pending = True
            if self._thread is not None:
                return False
            self._thread = threading.Thread(target=self._run, name="pool-refill", daemon=True)
            self._thread.start()
            return True

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    self._thread = None
                    return
                self._pending = False
                wait = self._last + self._min_interval - self._clock()
            if wait > 0:
                time.sleep(wait)
            self._last = self._clock()
            self.refill_now()

    def refill_now(self) -> int:
        try:
            with self._sessions() as session:
                return refill_pool(
                    session=session,
                    queue=self._queue,
                    target_per_prompt=self._target,
                    max_version_lag=self._lag,
                    pairs_per_job=self._pairs_per_job,
                    eval_pool_pairs=self._eval_pool_pairs,
                )
        except Exception as exc:  # Redis or the database away: labelling must go on regardless
            log.warning(
                "pool refill after a judgement failed (%s: %s); the workers' tick will retry",
                type(exc).__name__,
                exc,
            )
            return 0

    def join(self, timeout: float | None = None) -> None:
        """Wait for the background refill (and any pokes it absorbed) to finish."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)


def rq_refiller(settings: Settings, sessions: sessionmaker[Session]) -> PoolRefiller:
    """The production refiller: RQ jobs on the settings' Redis."""
    redis = Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=5)
    return PoolRefiller(
        sessions=sessions,
        queue=RqSamplingQueue(redis, retries=settings.pool.job_retries),
        target_per_prompt=settings.pool.target_per_prompt,
        max_version_lag=settings.dpo.max_version_lag,
        pairs_per_job=settings.pool.pairs_per_job,
        eval_pool_pairs=settings.eval.pool_pairs,
    )
