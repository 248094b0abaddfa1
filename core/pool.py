"""Keep the pool of unlabelled pairs topped up, per active prompt, so annotators never wait.

For each active training prompt the target is `target_per_prompt` pairs that still need judgements
(from policy versions at most `max_version_lag` behind the current one) plus sampling jobs already
queued or running for it. Each prompt has that many job slots, kept in a Redis hash
(slot -> job id); a slot is free when its job is gone, finished or failed for good. A Redis lock
serialises refills from the app, the workers' ticks and the trainer, so no work is enqueued twice
beyond the target. Missing pairs are grouped into jobs of up to `pairs_per_job` pairs (slot 0 of
every prompt first, so one job spreads over prompts): a worker samples a job's pairs in one batched
pass of the model, which is several times faster than one pair at a time. So a single judgement
does not send a 1-pair job, a partly filled job waits until the missing pairs fill it, unless less
than half the pool is open or queued. Postgres stays the truth: after a Redis restart the slots are empty and the
refill simply tops the pool up again.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.db.campaigns import (
    eval_pairs_per_prompt,
    eval_prompt_ids,
    pairs_wanted,
    running_campaigns,
)
from core.db.models import Pair, Prompt
from core.db.policies import get_current_policy
from core.jobs import in_full_jobs
from core.queue import SamplingQueue

logger = logging.getLogger(__name__)

LOCK_KEY = "densealign:pool:lock"


def slots_key(owner: int | str) -> str:
    """Redis hash of job slots of a prompt (its id) or of an evaluation campaign ("eval:<id>")."""
    return f"densealign:pool:slots:{owner}"


def open_pairs_by_prompt(*, session: Session, min_version: int) -> dict[int, int]:
    """Pairs still needing judgements, per prompt, among versions >= `min_version`."""
    rows = session.execute(
        select(Pair.prompt_id, func.count(Pair.id))
        .where(Pair.kind == "train", Pair.policy_version >= min_version)
        .where(Pair.judgement_count < Pair.required_judgements)
        .group_by(Pair.prompt_id)
    )
    return {prompt_id: count for prompt_id, count in rows}


class MemorySlots:
    """Job slots kept in this process (the embedded mode, where there is no Redis)."""

    def __init__(self) -> None:
        self._slots: dict[int | str, dict[str, str]] = {}
        self.lock = threading.Lock()

    def get(self, owner: int | str) -> dict[str, str]:
        return dict(self._slots.get(owner, {}))

    def set(self, owner: int | str, slot: str, job_id: str) -> None:
        self._slots.setdefault(owner, {})[slot] = job_id


class RedisSlots:
    def __init__(self, redis: Any) -> None:
        self.redis = redis

    def get(self, owner: int | str) -> dict[str, str]:
        return {_s(k): _s(v) for k, v in self.redis.hgetall(slots_key(owner)).items()}

    def set(self, owner: int | str, slot: str, job_id: str) -> None:
        self.redis.hset(slots_key(owner), slot, job_id)


def refill_pool(
    *,
    session: Session,
    queue: SamplingQueue,
    redis: Any | None,
    target_per_prompt: int,
    max_version_lag: int,
    pairs_per_job: int = 1,
    eval_pool_pairs: int = 8,
) -> int:
    """Enqueue sampling jobs for prompts below target, and for running evaluation campaigns below
    `eval_pool_pairs` open pairs; returns how many pairs they will sample.

    With `redis`, slots and the lock live in Redis (many processes); without, the queue must carry
    its own `slots` (a `MemorySlots`, as the embedded `ThreadQueue` does).
    """
    if redis is None:
        slots = getattr(queue, "slots", None)
        if not isinstance(slots, MemorySlots):
            raise ValueError(
                "without Redis, the queue must keep its own job slots (use core.queue.ThreadQueue)"
            )
        with slots.lock:
            return _refill(
                session, queue, slots, target_per_prompt, max_version_lag, pairs_per_job
            ) + _refill_eval(session, queue, slots, eval_pool_pairs, pairs_per_job)
    lock = redis.lock(LOCK_KEY, timeout=60, blocking_timeout=10)
    if not lock.acquire():
        logger.info("another process is refilling the pool; skipping this tick")
        return 0
    try:
        slots = RedisSlots(redis)
        return _refill(
            session, queue, slots, target_per_prompt, max_version_lag, pairs_per_job
        ) + _refill_eval(session, queue, slots, eval_pool_pairs, pairs_per_job)
    finally:
        try:
            lock.release()
        except Exception:  # the lock expired: harmless, the next refill re-counts
            logger.warning("pool lock expired before release")


def _refill(
    session: Session,
    queue: SamplingQueue,
    slots: MemorySlots | RedisSlots,
    target: int,
    lag: int,
    pairs_per_job: int,
) -> int:
    if pairs_per_job < 1:
        raise ValueError(f"pairs_per_job must be >= 1, got {pairs_per_job}")
    current = get_current_policy(session=session).version
    open_pairs = open_pairs_by_prompt(session=session, min_version=max(0, current - lag))
    prompts = session.scalars(
        select(Prompt.id).where(Prompt.active.is_(True), Prompt.split == "train").order_by(Prompt.id)
    ).all()
    wanted: list[list[tuple[int, str]]] = []  # per prompt, the free slots to fill
    for prompt_id in prompts:
        busy = {slot for slot, job_id in slots.get(prompt_id).items() if queue.is_active(job_id)}
        deficit = target - open_pairs.get(prompt_id, 0) - len(busy)
        free = [str(s) for s in range(target) if str(s) not in busy]
        wanted.append([(prompt_id, slot) for slot in free[: max(0, deficit)]])
    # Round-robin over prompts, so the first job to finish serves as many prompts as possible.
    order = [item for rank in range(target) for per_prompt in wanted for item in per_prompt[rank : rank + 1]]
    pool = target * len(prompts)
    on_hand = pool - len(order)  # open pairs plus pairs already queued
    order = order[: in_full_jobs(len(order), on_hand=on_hand, pool=pool, pairs_per_job=pairs_per_job)]
    jobs = 0
    for start in range(0, len(order), pairs_per_job):
        chunk = order[start : start + pairs_per_job]
        job_id = queue.enqueue_sample_pairs([prompt_id for prompt_id, _ in chunk])
        for prompt_id, slot in chunk:
            slots.set(prompt_id, slot, job_id)
        jobs += 1
    if order:
        logger.info(
            "pool refill: enqueued %d pairs in %d sampling jobs for %d prompts",
            len(order),
            jobs,
            len(prompts),
        )
    return len(order)


def _refill_eval(
    session: Session,
    queue: SamplingQueue,
    slots: MemorySlots | RedisSlots,
    pool_pairs: int,
    pairs_per_job: int,
) -> int:
    """Top up each running campaign's open evaluation pairs, spread evenly over its prompts."""
    total = 0
    for campaign in running_campaigns(session=session):
        owner = f"eval:{campaign.id}"
        busy = {slot for slot, job_id in slots.get(owner).items() if queue.is_active(job_id)}
        wanted = pairs_wanted(
            session=session,
            campaign=campaign,
            pool_pairs=pool_pairs,
            queued=len(busy),
            pairs_per_job=pairs_per_job,
        )
        prompts = eval_prompt_ids(session=session, split=campaign.prompt_split)
        if not wanted or not prompts:
            continue
        sampled = eval_pairs_per_prompt(session=session, campaign_id=campaign.id)
        free = [str(s) for s in range(pool_pairs) if str(s) not in busy][:wanted]
        chosen = []
        for _ in free:  # the prompt with the fewest pairs so far, lowest id first
            prompt_id = min(prompts, key=lambda p: (sampled.get(p, 0), p))
            sampled[prompt_id] = sampled.get(prompt_id, 0) + 1
            chosen.append(prompt_id)
        for start in range(0, len(free), pairs_per_job):
            job_id = queue.enqueue_eval_pairs(campaign.id, chosen[start : start + pairs_per_job])
            for slot in free[start : start + pairs_per_job]:
                slots.set(owner, slot, job_id)
        total += len(free)
        logger.info("evaluation campaign %d: enqueued %d pairs", campaign.id, len(free))
    return total


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
