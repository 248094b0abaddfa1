"""Keep the pool of unlabelled pairs topped up, per active prompt, so annotators never wait.

For each active training prompt the target is `target_per_prompt` pairs that still need judgements
(from policy versions at most `max_version_lag` behind the current one) plus sampling jobs already
queued or running for it. Each prompt has that many job slots (slot -> job id), kept by the queue
(`core.queue`: Redis hashes for RQ, memory for the embedded queue); a slot is free when its job is
gone, finished or failed for good. The queue hands its slots to one refill at a time (a Redis lock
across the app and the workers' ticks), so no work is enqueued twice beyond the target. Missing pairs are grouped into jobs of up to `pairs_per_job` pairs (slot 0 of
every prompt first, so one job spreads over prompts): a worker samples a job's pairs in one batched
pass of the model, which is several times faster than one pair at a time. So a single judgement
does not send a 1-pair job, a partly filled job waits until the missing pairs fill it, unless less
than half the pool is open or queued. Postgres stays the truth: after a Redis restart the slots are empty and the
refill simply tops the pool up again.
"""

from __future__ import annotations

import logging

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
from core.queue import JobSlots, SamplingQueue

logger = logging.getLogger(__name__)


def open_pairs_by_prompt(*, session: Session, min_version: int) -> dict[int, int]:
    """Pairs still needing judgements, per prompt, among versions >= `min_version`."""
    rows = session.execute(
        select(Pair.prompt_id, func.count(Pair.id))
        .where(Pair.kind == "train", Pair.policy_version >= min_version)
        .where(Pair.judgement_count < Pair.required_judgements)
        .group_by(Pair.prompt_id)
    )
    return {prompt_id: count for prompt_id, count in rows}


def refill_pool(
    *,
    session: Session,
    queue: SamplingQueue,
    target_per_prompt: int,
    max_version_lag: int,
    pairs_per_job: int = 1,
    eval_pool_pairs: int = 8,
) -> int:
    """Enqueue sampling jobs for prompts below target, and for running evaluation campaigns below
    `eval_pool_pairs` open pairs; returns how many pairs they will sample.

    The queue's job slots are held for the whole refill (a Redis lock for RQ, so the app and every
    worker's tick never enqueue the same work twice); when another process holds them, nothing is done.
    """
    with queue.claim_slots() as slots:
        if slots is None:
            return 0
        return _refill(
            session, queue, slots, target_per_prompt, max_version_lag, pairs_per_job
        ) + _refill_eval(session, queue, slots, eval_pool_pairs, pairs_per_job)


def _refill(
    session: Session,
    queue: SamplingQueue,
    slots: JobSlots,
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
    slots: JobSlots,
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
