"""Workers and trainers that outlive faults, against servers of the test's own on private ports.

Redis runs as a private `redis-server` that the test kills with SIGKILL and starts again on the same
port (nothing kept on disk, as in production), never FLUSHDB on a shared one. Worker and trainer
run as `densealign` processes configured by environment variables only, on the shipped model.
"""

from __future__ import annotations

import random
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.main import create_app
from core.db import make_engine, make_session_factory
from core.db.assignment import next_pair
from core.db.judgements import record_judgement
from core.db.labellers import create_labeller
from core.db.models import Pair, PolicyVersion, ProcessHeartbeat, TrainingRound
from core.db.prompts import add_prompt
from core.settings import Settings
from tests.app.test_pg_restart import PrivateCluster, private_postgres  # noqa: F401 (a fixture)
from tests.conftest import scratch_postgres_database, skip_or_fail
from tests.test_operator_path import SHAPES, Proc, densealign, free_port, wait_for
from tests.worker.test_loop import label_everything, refill_and_work, seed_database
from worker import sampling
from worker.main import build_sampler

pytestmark = pytest.mark.slow

TARGET = 2  # open pairs kept per prompt
PROMPTS = ["a red circle", "a blue square"]


@dataclass
class PrivateRedis:
    """A redis-server of the test's own; `kill()` is SIGKILL, `start()` brings it back on the same port."""

    binary: str
    port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        from redis import Redis

        client = Redis.from_url(self.url, socket_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                return
            except Exception:
                assert time.monotonic() < deadline, "the private redis-server did not start"
                time.sleep(0.1)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    binary = shutil.which("redis-server")
    if binary is None:
        skip_or_fail("redis-server is not installed (apt install redis-server); .ci/run installs it")
    assert binary is not None
    server = PrivateRedis(
        binary=binary, port=free_port(), dir=Path(tempfile.mkdtemp(prefix="densealign-redis-"))
    )
    server.start()
    try:
        yield server
    finally:
        server.kill()
        shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture
def fault_env(private_redis: PrivateRedis, tmp_path: Path) -> Iterator[dict[str, str]]:
    with scratch_postgres_database() as url:
        yield {
            "HF_HUB_OFFLINE": "1",
            "PATH": "/usr/bin:/bin",
            "DENSEALIGN_DATABASE_URL": url,
            "DENSEALIGN_REDIS_URL": private_redis.url,
            "DENSEALIGN_BLOB_DIR": str(tmp_path / "blobs"),
            "DENSEALIGN_OVERLAP_SHARE": "0",
            "DENSEALIGN_HEARTBEAT_SECONDS": "0.5",
            "DENSEALIGN_MODEL__BASE_MODEL": str(SHAPES),
            "DENSEALIGN_MODEL__DEVICE": "cpu",
            "DENSEALIGN_SAMPLER__NUM_STEPS": "40",  # a job of 2 pairs takes a few seconds: long enough to hit
            "DENSEALIGN_POOL__TARGET_PER_PROMPT": str(TARGET),
            "DENSEALIGN_POOL__TICK_SECONDS": "0.5",
            "DENSEALIGN_POOL__PAIRS_PER_JOB": "2",
        }


class Db:
    def __init__(self, url: str) -> None:
        self.sessions = make_session_factory(make_engine(url))

    def scalar(self, query: Any) -> Any:
        with self.sessions() as session:
            return session.scalar(query)

    def open_pairs_by_prompt(self) -> dict[int, int]:
        with self.sessions() as session:
            rows = session.execute(
                select(Pair.prompt_id, func.count(Pair.id))
                .where(Pair.judgement_count < Pair.required_judgements)
                .group_by(Pair.prompt_id)
            )
            return dict(rows.tuples().all())

    def heartbeat_of(self, pid: int) -> ProcessHeartbeat | None:
        with self.sessions() as session:
            return session.scalar(select(ProcessHeartbeat).where(ProcessHeartbeat.pid == pid))

    def heartbeat(self, role: str) -> ProcessHeartbeat | None:
        with self.sessions() as session:
            return session.scalar(
                select(ProcessHeartbeat)
                .where(ProcessHeartbeat.role == role)
                .order_by(ProcessHeartbeat.beat_at.desc())
            )

    def judge_one(self, labeller_id: int) -> None:
        with self.sessions() as session:
            assignment = next_pair(
                session=session, labeller_id=labeller_id, lease_seconds=60, rng=random.Random(0)
            )
            assert assignment is not None, "no pair to judge"
            record_judgement(
                session=session,
                labeller_id=labeller_id,
                pair_id=assignment.pair.id,
                choice="a",
                client_key=uuid.uuid4().hex,
            )
            session.commit()


def trainer_env(settings: Settings, **dpo: str) -> dict[str, str]:
    """The environment a `densealign trainer` process needs for `settings`, with DENSEALIGN_DPO__* overrides."""
    return {
        "HF_HUB_OFFLINE": "1",
        "DENSEALIGN_DATABASE_URL": settings.database_url,
        "DENSEALIGN_REDIS_URL": settings.redis_url,
        "DENSEALIGN_BLOB_DIR": settings.blob_dir,
        "DENSEALIGN_HEARTBEAT_SECONDS": "0.5",
        "DENSEALIGN_MODEL__BASE_MODEL": settings.model.base_model,
        "DENSEALIGN_MODEL__DEVICE": "cpu",
        "DENSEALIGN_MODEL__LORA_RANK": str(settings.model.lora_rank),
        "DENSEALIGN_SAMPLER__NUM_STEPS": str(settings.sampler.num_steps),
        "DENSEALIGN_DPO__MIN_NEW_PAIRS": str(settings.dpo.min_new_pairs),
    } | {f"DENSEALIGN_DPO__{name}": value for name, value in dpo.items()}


def prepare(env: dict[str, str], tmp_path: Path) -> tuple[Db, int]:
    assert densealign(["migrate"], env, tmp_path).returncode == 0
    db = Db(env["DENSEALIGN_DATABASE_URL"])
    with db.sessions() as session:
        for text in PROMPTS:
            add_prompt(session=session, text=text)
        labeller_id = create_labeller(session=session, name="judge").labeller.id
        session.commit()
    return db, labeller_id


def test_worker_outlives_idling_and_redis_killed_while_idle_mid_job_and_at_job_end(
    fault_env: dict[str, str], private_redis: PrivateRedis, tmp_path: Path
) -> None:
    db, judge = prepare(fault_env, tmp_path)
    full = dict.fromkeys(range(1, len(PROMPTS) + 1), TARGET)
    worker = Proc("worker", ["worker"], fault_env, tmp_path)
    try:
        wait_for(lambda: db.open_pairs_by_prompt() == full, "the pool to fill", 180, (worker,))

        # 1. idle for over a minute (redis-py's 5 s socket timeout used to end the worker here)
        time.sleep(65)
        assert worker.popen.poll() is None, worker.log()
        # two judgements free a full job's worth (2 pairs per job; a lone free slot waits to batch)
        db.judge_one(judge)
        db.judge_one(judge)
        wait_for(lambda: db.open_pairs_by_prompt() == full, "a job after a minute idle", 120, (worker,))

        # 2. Redis killed while the worker waits for a job, and started again
        private_redis.kill()
        time.sleep(3)
        private_redis.start()
        db.judge_one(judge)
        db.judge_one(judge)
        wait_for(
            lambda: db.open_pairs_by_prompt() == full, "the pool after an idle Redis restart", 90, (worker,)
        )

        # 3. Redis killed mid-job and kept down until the job has ended (its result cannot be stored)
        pairs_before = db.scalar(select(func.count(Pair.id)))
        db.judge_one(judge)
        db.judge_one(judge)
        wait_for(
            lambda: (b := db.heartbeat("worker")) and b.state == "sampling", "a job to start", 60, (worker,)
        )
        private_redis.kill()
        wait_for(
            lambda: db.scalar(select(func.count(Pair.id))) > pairs_before,
            "the job's pairs in Postgres",
            60,
            (worker,),
        )
        wait_for(
            lambda: (b := db.heartbeat("worker")) and b.state == "waiting",
            "the worker to wait",
            30,
            (worker,),
        )
        time.sleep(2)
        private_redis.start()
        wait_for(
            lambda: db.open_pairs_by_prompt() == full, "the pool after a mid-job Redis restart", 90, (worker,)
        )
        time.sleep(3)  # a refill that over-fills would show now
        assert db.open_pairs_by_prompt() == full, "no pair lost, none sampled twice"
        assert worker.popen.poll() is None
        assert "Redis is back; starting a new RQ worker" in worker.log()
        code, _ = worker.stop()
        assert code == 0, worker.log()
    finally:
        worker.kill()


def test_a_killed_workers_job_is_run_again_within_a_minute(
    fault_env: dict[str, str], private_redis: PrivateRedis, tmp_path: Path
) -> None:
    env = fault_env | {"DENSEALIGN_SAMPLER__NUM_STEPS": "400"}  # a job long enough to be killed in
    db, _ = prepare(env, tmp_path)
    first = Proc("worker-1", ["worker"], env, tmp_path)
    second: Proc | None = None
    try:
        beat = wait_for(
            lambda: (b := db.heartbeat("worker")) and b.state == "sampling" and b,
            "a job to start",
            120,
            (first,),
        )
        job_id = beat.detail.split("job ")[-1]
        first.stop(signal.SIGKILL)
        killed_at = time.monotonic()
        second = Proc("worker-2", ["worker"], env, tmp_path)
        # The claim is about a running worker: its model load (over 90 s on a loaded host) is not part of
        # it. A worker beats once its model is loaded.
        pid = second.popen.pid
        wait_for(lambda: db.heartbeat_of(pid), "the second worker to be up", 180, (second,))
        up_at = time.monotonic()
        requeued = f"requeued 1 abandoned sampling job(s): ['{job_id}']"
        wait_for(lambda: requeued in second.log(), f"job {job_id} to be requeued", 120, (second,))
        # The job is requeued once its 45 s heartbeat TTL has passed and a running worker's refill tick
        # sees it: at max(kill + 45 s, the second worker up). Counted from max(kill, up - 45 s), that is
        # 45 s plus a tick, whatever the second worker's load time was.
        requeued_after = time.monotonic() - max(killed_at, up_at - 45)
        assert requeued_after < 75, (
            f"the abandoned job was requeued {requeued_after:.0f}s after it could be "
            f"({time.monotonic() - killed_at:.0f}s after the kill)"
        )
        # ... and it runs again: next, or after the job the second worker took first at its start
        started_again = re.compile(rf"sampling: sample_pairs\(.*\) \({re.escape(job_id)}\)")
        wait_for(lambda: started_again.search(second.log()), f"job {job_id} to run again", 300, (second,))
    finally:
        first.kill()
        if second is not None:
            second.kill()


def test_two_trainers_publish_one_version_per_round(
    loop_settings: Settings, redis: Any, tmp_path: Path
) -> None:
    token = seed_database(loop_settings)
    sampling.install(build_sampler(loop_settings))
    refill_and_work(loop_settings, redis)
    label_everything(TestClient(create_app(loop_settings)), token)
    env = trainer_env(loop_settings, STEPS_PER_ROUND="6", PAIRS_PER_STEP="2", POLL_SECONDS="0.5")
    trainers = [Proc(f"trainer-{i}", ["trainer"], env, tmp_path) for i in range(2)]
    db = Db(loop_settings.database_url)
    try:
        wait_for(
            lambda: db.scalar(select(func.max(PolicyVersion.version))) == 1, "version 1", 180, tuple(trainers)
        )
        time.sleep(3)  # a second version from the same round would appear now
        with db.sessions() as session:
            assert session.scalars(select(PolicyVersion.version).order_by(PolicyVersion.version)).all() == [
                0,
                1,
            ]
            rounds = session.scalars(select(TrainingRound)).all()
            assert [(r.status, r.produced_version) for r in rounds] == [("done", 1)]
            states = sorted(
                session.scalars(select(ProcessHeartbeat.state).where(ProcessHeartbeat.role == "trainer"))
            )
        assert "standby" in states, states
        assert sum("standing by" in t.log() for t in trainers) == 1
        for t in trainers:
            code, seconds = t.stop()
            assert code == 0 and seconds < 10, t.log()
    finally:
        for t in trainers:
            t.kill()


def test_postgres_restarted_during_a_round_the_round_publishes_once(
    private_postgres: PrivateCluster,  # noqa: F811 (the fixture imported above)
    loop_settings: Settings,
    redis: Any,
    tmp_path: Path,
) -> None:
    settings = loop_settings.model_copy(update={"database_url": private_postgres.url("densealign")})
    token = seed_database(settings)
    sampling.install(build_sampler(settings))
    refill_and_work(settings, redis)
    label_everything(TestClient(create_app(settings)), token)
    env = trainer_env(
        settings, STEPS_PER_ROUND="8", CHECKPOINT_EVERY="3", PAIRS_PER_STEP="2", POLL_SECONDS="0.5"
    )
    db = Db(settings.database_url)
    trainer = Proc("trainer", ["trainer"], env, tmp_path)
    try:
        wait_for(
            lambda: (b := db.heartbeat("trainer")) and b.state == "training",
            "the round to start",
            120,
            (trainer,),
        )
        db.sessions.kw["bind"].dispose()  # type: ignore[union-attr]
        private_postgres.stop("fast")  # ends every connection, the trainer's lock included
        # the round's remaining steps need no database; it is still down when the trainer publishes
        wait_for(
            lambda: "round progress: step 8/8" in trainer.log(), "the round's last step", 600, (trainer,)
        )
        time.sleep(3)
        private_postgres.start()
        wait_for(
            lambda: db.scalar(select(func.max(PolicyVersion.version))) == 1, "version 1", 120, (trainer,)
        )
        time.sleep(3)
        with db.sessions() as session:
            assert session.scalars(select(PolicyVersion.version).order_by(PolicyVersion.version)).all() == [
                0,
                1,
            ]
            rounds = session.scalars(select(TrainingRound)).all()
            assert [(r.status, r.produced_version) for r in rounds] == [("done", 1)]
        log = trainer.log()
        assert "database unavailable" in log and "lost the densealign:trainer lock" in log
        assert trainer.popen.poll() is None, "the trainer must outlive the outage"
        code, _ = trainer.stop()
        assert code == 0, trainer.log()
    finally:
        trainer.kill()
