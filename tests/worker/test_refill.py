"""Judgements top the pool up through the app's refiller; Redis being down never fails a judgement."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from app.main import create_app
from app.refill import PoolRefiller
from core.db import make_engine, make_session_factory
from core.queue import RqSamplingQueue
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
        sessions=sessions, queue=queue, redis=redis, target_per_prompt=2, max_version_lag=2, min_interval=0.0
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
        sessions=sessions, queue=RqSamplingQueue(dead), redis=dead, target_per_prompt=2, max_version_lag=2
    )
    client = TestClient(create_app(loop_settings, session_factory=sessions, refiller=refiller))
    assert label_everything(client, token) == 4
    refiller.join(30)
    assert refiller.refill_now() == 0
