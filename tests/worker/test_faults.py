"""What the loop survives: failed and killed jobs, a killed trainer, a Redis wipe, rollback, bad settings."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from rq import Queue, SimpleWorker
from sqlalchemy import func, select

from app.main import create_app
from core.db import make_engine, make_session_factory
from core.db.models import Judgement, Pair, TrainingRound, TrainingRoundPair, Trajectory
from core.db.policies import set_current_policy
from core.diffusion.sampler import sample_trajectories
from core.queue import QUEUE_NAME, RqSamplingQueue
from core.settings import Settings
from tests.worker.test_loop import label_everything, refill_and_work, seed_database
from trainer.main import build_trainer
from trainer.main import main as trainer_main
from worker import sampling
from worker.main import build_sampler
from worker.main import main as worker_main

pytestmark = pytest.mark.slow


def count(settings: Settings, model: Any) -> int:
    with make_session_factory(make_engine(settings.database_url))() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def blob_files(settings: Settings) -> list[Path]:
    root = Path(settings.blob_dir)
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_failed_job_leaves_no_rows_or_blobs_and_is_retried(loop_settings, redis, monkeypatch):
    seed_database(loop_settings)
    sampler = build_sampler(loop_settings)
    sampling.install(sampler)
    real = sampling.create_pair
    calls = {"n": 0}

    def flaky(**kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("database went away mid-insert")
        return real(**kwargs)

    monkeypatch.setattr(sampling, "create_pair", flaky)
    queue = RqSamplingQueue(redis, retries=1, retry_intervals=(0,))
    job_id = queue.enqueue_sample_pairs([1])
    worker = SimpleWorker([Queue(QUEUE_NAME, connection=redis)], connection=redis)
    worker.work(burst=True, max_jobs=1)
    # the failed attempt left nothing: its trajectories were rolled back and its blobs deleted
    assert calls["n"] == 1
    assert count(loop_settings, Trajectory) == 0 and count(loop_settings, Pair) == 0
    assert blob_files(loop_settings) == []
    assert queue.is_active(job_id), "the job must be queued again for its retry"
    worker.work(burst=True)
    assert count(loop_settings, Pair) == 1 and count(loop_settings, Trajectory) == 2
    assert len(blob_files(loop_settings)) == 4  # 2 trajectories + 2 PNGs


KILLABLE_JOB = """
import sys, time
from pathlib import Path
from core.settings import load_settings
from worker.main import build_sampler

sampler = build_sampler(load_settings())
real_put = sampler.blobs.put

def slow_put(key, data):
    digest = real_put(key, data)
    Path(sys.argv[1]).write_text("blob written")  # now the test kills us before the pair is inserted
    time.sleep(120)
    return digest

sampler.blobs.put = slow_put
sampler.sample_pair(1)
"""


def settings_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DENSEALIGN_DATABASE_URL=settings.database_url,
        DENSEALIGN_BLOB_DIR=settings.blob_dir,
        DENSEALIGN_MODEL__BASE_MODEL=settings.model.base_model,
        DENSEALIGN_MODEL__DEVICE="cpu",
        DENSEALIGN_MODEL__LORA_RANK=str(settings.model.lora_rank),
        DENSEALIGN_SAMPLER__NUM_STEPS=str(settings.sampler.num_steps),
        HF_HUB_OFFLINE="1",
    )
    return env


def test_worker_killed_mid_job_leaves_no_rows_and_the_job_is_done_again(loop_settings, redis, tmp_path):
    seed_database(loop_settings)
    marker = tmp_path / "marker"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLABLE_JOB, str(marker)], env=settings_env(loop_settings), cwd=Path.cwd()
    )
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert proc.poll() is None, "the job process died before its first blob write"
            assert time.monotonic() < deadline, "the job never reached its first blob write"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(blob_files(loop_settings)) == 1  # the one blob it wrote: unreferenced, harmless
    assert count(loop_settings, Trajectory) == 0 and count(loop_settings, Pair) == 0
    # the pool sees no pair for the prompt and samples it again
    sampling.install(build_sampler(loop_settings))
    assert refill_and_work(loop_settings, redis) == 4
    assert count(loop_settings, Pair) == 4


def test_trainer_killed_mid_round_resumes_without_double_counting(loop_settings, redis):
    token = seed_database(loop_settings)
    sampling.install(build_sampler(loop_settings))
    refill_and_work(loop_settings, redis)
    label_everything(TestClient(create_app(loop_settings)), token)

    class Killed(Exception):
        pass

    def die_after_two(step: int, total: int) -> None:
        if step == 2:
            raise Killed

    with pytest.raises(Killed):
        build_trainer(loop_settings, progress=die_after_two).run_once()
    with make_session_factory(make_engine(loop_settings.database_url))() as session:
        rounds = session.scalars(select(TrainingRound)).all()
        assert [r.status for r in rounds] == ["running"]
        assert session.scalar(select(func.count()).select_from(TrainingRoundPair)) == 4
    assert any("checkpoint" in str(p) for p in blob_files(loop_settings))

    seen: list[int] = []
    trainer = build_trainer(loop_settings, progress=lambda step, total: seen.append(step))
    assert trainer.run_once() == 1
    # killed while reporting step 2, before that step's checkpoint: it resumes after step 1
    assert seen == [2, 3], "the resumed round must continue from its last checkpoint, not restart"
    with make_session_factory(make_engine(loop_settings.database_url))() as session:
        rounds = session.scalars(select(TrainingRound)).all()
        assert [(r.status, r.produced_version, r.pairs_used) for r in rounds] == [("done", 1, 4)]
        assert rounds[0].metrics["optimizer_steps"] == 3
    assert not any("checkpoint" in str(p) for p in blob_files(loop_settings))
    assert trainer.run_once() is None


def test_redis_wiped_loses_no_judgement_and_the_pool_refills(loop_settings, redis):
    token = seed_database(loop_settings)
    sampling.install(build_sampler(loop_settings))
    refill_and_work(loop_settings, redis)
    client = TestClient(create_app(loop_settings))
    assert label_everything(client, token) == 4
    redis.flushdb()  # a Redis restart without persistence loses everything
    assert count(loop_settings, Judgement) == 4
    assert refill_and_work(loop_settings, redis) == 4  # judged pairs no longer count: refill to target
    assert label_everything(client, token) == 4
    assert count(loop_settings, Judgement) == 8


def test_rollback_makes_workers_sample_the_earlier_version(loop_settings, redis):
    token = seed_database(loop_settings)
    sampler = build_sampler(loop_settings)
    sampling.install(sampler)
    refill_and_work(loop_settings, redis)
    label_everything(TestClient(create_app(loop_settings)), token)
    assert build_trainer(loop_settings).run_once() == 1
    sessions = make_session_factory(make_engine(loop_settings.database_url))
    with sessions() as session:
        assert sampler.sync_policy(session) == 1
    trained = sample_trajectories(sampler.policy.pipe, ["a green triangle"], [3], sampler.settings).images
    with sessions() as session, session.begin():
        set_current_policy(session=session, version=0)
    pair_id = sampler.sample_pair(1)
    assert sampler.loaded_version == 0
    with sessions() as session:
        assert session.get(Pair, pair_id).policy_version == 0  # type: ignore[union-attr]
    base = build_sampler(loop_settings)  # a fresh worker at version 0
    rolled_back = sample_trajectories(sampler.policy.pipe, ["a green triangle"], [3], sampler.settings).images
    fresh = sample_trajectories(base.policy.pipe, ["a green triangle"], [3], base.settings).images
    assert np.array_equal(rolled_back, fresh) and not np.array_equal(trained, fresh)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"DENSEALIGN_DPO__GAMMA": "0"}, "DENSEALIGN_DPO__GAMMA='0': Input should be greater than 0"),
        ({"DENSEALIGN_DPO__BETA": "-1"}, "DENSEALIGN_DPO__BETA='-1': Input should be greater than 0"),
        (
            {"DENSEALIGN_MODEL__BASE_MODEL": "nobody/no-such-model"},
            "local folder that holds model_index.json",
        ),
    ],
)
def test_bad_settings_stop_worker_and_trainer_with_one_line(env, expected, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DENSEALIGN_DATABASE_URL", f"sqlite:///{tmp_path}/x.db")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for main in (worker_main, trainer_main):
        assert main([]) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and "\n" not in err, err


def test_lora_rank_that_does_not_fit_the_published_adapter_stops_the_worker(
    loop_settings, redis, monkeypatch, capsys
):
    token = seed_database(loop_settings)
    sampling.install(build_sampler(loop_settings))
    refill_and_work(loop_settings, redis)
    label_everything(TestClient(create_app(loop_settings)), token)
    assert build_trainer(loop_settings).run_once() == 1  # published with rank 2
    monkeypatch.setenv("DENSEALIGN_DATABASE_URL", loop_settings.database_url)
    monkeypatch.setenv("DENSEALIGN_BLOB_DIR", loop_settings.blob_dir)
    monkeypatch.setenv("DENSEALIGN_MODEL__BASE_MODEL", "tiny:sd")
    monkeypatch.setenv("DENSEALIGN_MODEL__DEVICE", "cpu")
    monkeypatch.setenv("DENSEALIGN_MODEL__LORA_RANK", "4")
    assert worker_main([]) == 2
    err = capsys.readouterr().err.strip()
    assert "another LoRA rank than 4" in err and "\n" not in err, err
