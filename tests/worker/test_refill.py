"""Judgements top the pool up through the app's refiller; Redis being down never fails a judgement."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue, SimpleWorker
from rq.job import Job
from sqlalchemy import select

from app.main import create_app
from app.refill import PoolRefiller
from core.db import make_engine, make_session_factory
from core.db.models import Pair
from core.pool import refill_pool
from core.queue import QUEUE_NAME, RedisSlots, RqSamplingQueue
from tests.worker.test_loop import label_everything, refill_and_work, seed_database
from worker import sampling
from worker.main import build_sampler

pytestmark = pytest.mark.slow


def test_judgements_refill_the_pool(loop_settings, redis):
    token = seed_database(loop_settings)
    sampling.install(build_sampler(loop_settings))
    assert refill_and_work(loop_settings, redis) == 4
    sessions = make_session_factory(make_engine(loop_settings.database_url))
    queue = RqSamplingQueue(redis)
    refiller = PoolRefiller(
        sessions=sessions, queue=queue, target_per_prompt=2, max_version_lag=2, min_interval=0.0
    )
    client = TestClient(create_app(loop_settings, session_factory=sessions, refiller=refiller))
    assert queue.depth() == 0
    assert label_everything(client, token) == 4
    refiller.join(30)
    assert queue.depth() == 4, "each judged pair frees one slot of its prompt's pool"
    refiller.poke()
    refiller.join(30)
    assert queue.depth() == 4, "a second refill must not enqueue beyond the target"


def test_a_redis_outage_does_not_fail_judgements(loop_settings, redis):
    token = seed_database(loop_settings)
    sampling.install(build_sampler(loop_settings))
    refill_and_work(loop_settings, redis)
    sessions = make_session_factory(make_engine(loop_settings.database_url))
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    refiller = PoolRefiller(
        sessions=sessions, queue=RqSamplingQueue(dead), target_per_prompt=2, max_version_lag=2
    )
    client = TestClient(create_app(loop_settings, session_factory=sessions, refiller=refiller))
    assert label_everything(client, token) == 4
    refiller.join(30)
    assert refiller.refill_now() == 0


def test_refill_batches_pairs_into_jobs_round_robin_and_workers_sample_them_together(loop_settings, redis):
    """2 prompts x target 3 with 3 pairs per job: two jobs of 3 pairs, each covering both prompts;
    every slot points at its job; a second refill adds nothing; the worker turns the two jobs into
    exactly 6 pairs, 3 per prompt."""
    seed_database(loop_settings)
    sampling.install(build_sampler(loop_settings))
    sessions = make_session_factory(make_engine(loop_settings.database_url))
    queue = RqSamplingQueue(redis)

    def refill() -> int:
        with sessions() as session:
            return refill_pool(
                session=session,
                queue=queue,
                target_per_prompt=3,
                max_version_lag=2,
                pairs_per_job=3,
            )

    assert refill() == 6
    assert queue.depth() == 2
    jobs = [Job.fetch(job_id, connection=redis) for job_id in queue.queue.job_ids]
    assert [job.kwargs["prompt_ids"] for job in jobs] == [[1, 2, 1], [2, 1, 2]]
    slots = RedisSlots(redis)
    assert slots.get(1) == {"0": jobs[0].id, "1": jobs[0].id, "2": jobs[1].id}
    assert slots.get(2) == {"0": jobs[0].id, "1": jobs[1].id, "2": jobs[1].id}
    assert refill() == 0
    SimpleWorker([Queue(QUEUE_NAME, connection=redis)], connection=redis).work(burst=True)
    assert [len(Job.fetch(job.id, connection=redis).return_value() or []) for job in jobs] == [3, 3]
    with sessions() as session:
        prompts = sorted(session.scalars(select(Pair.prompt_id)).all())
    assert prompts == [1, 1, 1, 2, 2, 2]


def test_a_batched_job_draws_the_same_images_as_one_pair_jobs(loop_settings):
    """Batching changes throughput, not results: with the same seeds, a 2-pair job's latents equal
    those of two 1-pair jobs, up to float32 batch-size rounding seen through fp16 storage (one fp16
    step at |x| in [2, 4) is 0.0039)."""
    import random

    import torch

    seed_database(loop_settings)
    one, batched = build_sampler(loop_settings), build_sampler(loop_settings)
    one.seed_source, batched.seed_source = random.Random(7), random.Random(7)
    singles = [one.sample_pair(1), one.sample_pair(2)]
    together = batched.sample_pairs([1, 2])
    assert len(set(singles + together)) == 4
    from core.db.models import Trajectory
    from core.diffusion.sampler import TrajectoryLatents
    from core.storage import LocalBlobStore

    blobs = LocalBlobStore(loop_settings.blob_dir)
    with make_session_factory(make_engine(loop_settings.database_url))() as session:

        def latents(pair_id: int) -> list[torch.Tensor]:
            pair = session.get(Pair, pair_id)
            assert pair is not None
            rows = [
                session.get(Trajectory, pair.trajectory_a_id),
                session.get(Trajectory, pair.trajectory_b_id),
            ]
            return [
                TrajectoryLatents.from_bytes(blobs.get(row.latents_key)).latents.float()
                for row in rows
                if row
            ]

        for single, batch in zip(singles, together, strict=True):
            a, b = latents(single), latents(batch)
            assert len(a) == len(b) == 2
            for x, y in zip(a, b, strict=True):
                assert x.abs().max() > 0.1
                torch.testing.assert_close(x, y, atol=8e-3, rtol=0)


def test_single_judgements_do_not_send_one_pair_jobs_until_the_pool_runs_low(session, make_pair, redis):
    """2 prompts x target 4, 4 pairs per job, a full pool: freeing 1-3 pairs enqueues nothing (a job
    would be part empty), freeing the 4th enqueues one full job; when less than half the pool is open
    or on its way (full jobs sent now included), a short job goes out at once so annotators never wait."""
    from core.db.prompts import add_prompt

    second = add_prompt(session=session, text="a green triangle")
    pairs = [make_pair() for _ in range(4)] + [make_pair(prompt_id=second.id) for _ in range(4)]
    queue = RqSamplingQueue(redis)

    def refill() -> list[list[int]]:
        before = set(queue.queue.job_ids)
        refill_pool(session=session, queue=queue, target_per_prompt=4, max_version_lag=2, pairs_per_job=4)
        return [
            Job.fetch(j, connection=redis).kwargs["prompt_ids"]
            for j in queue.queue.job_ids
            if j not in before
        ]

    def close(pair):  # as a judgement does
        pair.judgement_count = pair.required_judgements
        session.flush()

    assert refill() == []
    first_prompt = pairs[0].prompt_id
    for n, pair in enumerate(pairs[:3], start=1):
        close(pair)
        assert refill() == [], f"{n} free slot(s) must wait for a full job"
    close(pairs[3])
    assert refill() == [[first_prompt] * 4]
    # the other prompt: 5 of 8 pairs gone leaves 3 open + 4 queued = 7 on hand: wait for the 4th
    for pair in pairs[4:7]:
        close(pair)
    assert refill() == []
    # the queue is lost (Redis restart): 1 open + a full job of 4 = 5 on hand, half or more: the
    # remaining 3 wait for a 4th
    redis.flushdb()
    assert sorted(map(sorted, refill())) == [[first_prompt, first_prompt, second.id, second.id]]
    # with jobs larger than half the pool none is full, and 1 of 8 on hand is too few: the short
    # job goes out now
    redis.flushdb()
    before = set(queue.queue.job_ids)
    refill_pool(session=session, queue=queue, target_per_prompt=4, max_version_lag=2, pairs_per_job=8)
    (short,) = [
        Job.fetch(j, connection=redis).kwargs["prompt_ids"] for j in queue.queue.job_ids if j not in before
    ]
    assert sorted(short) == sorted([first_prompt] * 4 + [second.id] * 3)
