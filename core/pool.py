"""Keep the pool of unlabelled pairs topped up, per active prompt, so annotators never wait.

For each active training prompt the target is `target_per_prompt` pairs that still need judgements
(from policy versions at most `max_version_lag` behind the current one) plus sampling jobs already
queued or running for it. Each prompt has that many job slots, kept in a Redis hash
(slot -> job id); a slot is free when its job is gone, finished or failed for good. A Redis lock
serialises refills from the app, the workers' ticks and the trainer, so no work is enqueued twice
beyond the target. Postgres stays the truth: after a Redis restart the slots are empty and the
refill simply tops the pool up again.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.db.models import Judgement, Pair, Prompt
from core.db.policies import get_current_policy
from core.queue import SamplingQueue

logger = logging.getLogger(__name__)

LOCK_KEY = "densealign:pool:lock"


def slots_key(prompt_id: int) -> str:
    return f"densealign:pool:slots:{prompt_id}"


def open_pairs_by_prompt(*, session: Session, min_version: int) -> dict[int, int]:
    """Pairs still needing judgements, per prompt, among versions >= `min_version`."""
    judged = (
        select(Judgement.pair_id, func.count(Judgement.id).label("n")).group_by(Judgement.pair_id).subquery()
    )
    rows = session.execute(
        select(Pair.prompt_id, func.count(Pair.id))
        .outerjoin(judged, judged.c.pair_id == Pair.id)
        .where(Pair.policy_version >= min_version)
        .where(func.coalesce(judged.c.n, 0) < Pair.required_judgements)
        .group_by(Pair.prompt_id)
    )
    return {prompt_id: count for prompt_id, count in rows}


def refill_pool(
    *,
    session: Session,
    queue: SamplingQueue,
    redis: Any | None,
    target_per_prompt: int,
    max_version_lag: int,
) -> int:
    """Enqueue sampling jobs for prompts below target; returns how many were enqueued."""
    if redis is None:
        return _refill(session, queue, None, target_per_prompt, max_version_lag)
    lock = redis.lock(LOCK_KEY, timeout=60, blocking_timeout=10)
    if not lock.acquire():
        logger.info("another process is refilling the pool; skipping this tick")
        return 0
    try:
        return _refill(session, queue, redis, target_per_prompt, max_version_lag)
    finally:
        try:
            lock.release()
        except Exception:  # the lock expired: harmless, the next refill re-counts
            logger.warning("pool lock expired before release")


def _refill(session: Session, queue: SamplingQueue, redis: Any | None, target: int, lag: int) -> int:
    current = get_current_policy(session=session).version
    open_pairs = open_pairs_by_prompt(session=session, min_version=max(0, current - lag))
    prompts = session.scalars(
        select(Prompt.id).where(Prompt.active.is_(True), Prompt.split == "train").order_by(Prompt.id)
    ).all()
    enqueued = 0
    for prompt_id in prompts:
        slots: dict[str, str] = {}
        if redis is not None:
            raw = redis.hgetall(slots_key(prompt_id))
            slots = {_s(k): _s(v) for k, v in raw.items()}
        busy = {slot for slot, job_id in slots.items() if queue.is_active(job_id)}
        deficit = target - open_pairs.get(prompt_id, 0) - len(busy)
        free = [str(s) for s in range(target) if str(s) not in busy]
        for slot in free[: max(0, deficit)]:
            job_id = queue.enqueue_sample_pair(prompt_id)
            if redis is not None:
                redis.hset(slots_key(prompt_id), slot, job_id)
            enqueued += 1
    if enqueued:
        logger.info("pool refill: enqueued %d sampling jobs for %d prompts", enqueued, len(prompts))
    return enqueued


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
