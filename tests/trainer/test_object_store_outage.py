"""The object store away during sampling and during a round, on real Postgres, Redis and an S3 server:
a clear error after the store's retries, nothing half-written, and recovery once it is back. moto runs
in-process here (its threaded server), so its buckets outlive the stop, as a real store's data outlive
a restart."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from moto.server import ThreadedMotoServer
from sqlalchemy import func, select

from app.main import create_app
from core.db import make_engine, make_session_factory
from core.db.models import Pair, PolicyVersion, TrainingRound, Trajectory
from core.settings import Settings
from core.storage import BlobStoreUnavailable, get_verified
from tests.s3 import MotoServer, free_port, use_server
from tests.worker.test_loop import label_everything, refill_and_work, seed_database
from trainer.main import build_trainer, serve_rounds
from worker.main import build_sampler
from worker.sampling import install


class RecordingHeartbeat:
    def __init__(self) -> None:
        self.states: list[tuple[str, str]] = []

    def set(self, state: str, detail: str = "", *, version: int | None = None) -> None:
        self.states.append((state, detail))


@pytest.fixture
def s3(loop_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Settings, Any]]:
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    try:
        server = MotoServer(auth=False, port=port)
        use_server(monkeypatch, server)
        server.client().create_bucket(Bucket="densealign-outage")
        yield loop_settings.model_copy(update={"blob_url": "s3://densealign-outage/run"}), moto
    finally:
        moto.stop()


def counts(settings: Settings) -> tuple[int, int]:
    sessions = make_session_factory(make_engine(settings.database_url))
    with sessions() as session:
        return (
            int(session.scalar(select(func.count(Pair.id))) or 0),
            int(session.scalar(select(func.count(Trajectory.id))) or 0),
        )


@pytest.mark.slow
def test_sampling_during_an_outage_fails_clearly_writes_nothing_and_recovers(s3: Any) -> None:
    settings, moto = s3
    seed_database(settings)
    sampler = build_sampler(settings)

    moto.stop()
    started = time.monotonic()
    with pytest.raises(
        BlobStoreUnavailable, match=r"could not write s3://densealign-outage/run/trajectories/v0/"
    ):
        sampler.sample_pairs([1, 2])
    assert time.monotonic() - started < 60  # the store's bounded retries, then the error
    assert counts(settings) == (0, 0)  # no row points at a blob that was never written

    moto.start()
    pair_ids = sampler.sample_pairs([1, 2])
    assert len(pair_ids) == 2 and counts(settings) == (2, 4)
    sessions = make_session_factory(make_engine(settings.database_url))
    with sessions() as session:
        for trajectory in session.scalars(select(Trajectory)):
            assert sampler.blobs.exists(trajectory.latents_key) and sampler.blobs.exists(trajectory.image_key)


@pytest.mark.slow
def test_a_round_waits_out_an_object_store_outage_and_publishes_once(
    s3: Any, redis: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    settings, moto = s3
    token = seed_database(settings)
    install(build_sampler(settings))
    assert refill_and_work(settings, redis) == 4
    assert label_everything(TestClient(create_app(settings)), token) == 4
    trainer = build_trainer(settings)

    # The store goes away as the round writes its second checkpoint, for longer than its retries last
    # (about 7 s), and comes back 12 s later.
    checkpoints: list[str] = []
    restart = threading.Timer(12.0, moto.start)
    real_put = trainer.blobs.put

    def put(key: str, data: bytes) -> str:
        if key.startswith("rounds/"):
            checkpoints.append(key)
            if len(checkpoints) == 2:
                moto.stop()
                restart.start()
        return real_put(key, data)

    monkeypatch.setattr(trainer.blobs, "put", put)
    beat = RecordingHeartbeat()
    try:
        serve_rounds(
            trainer,
            engine=make_engine(settings.database_url),
            heartbeat=beat,  # type: ignore[arg-type]
            stop=threading.Event(),
            poll_seconds=1.0,
            once=True,
        )
    finally:
        restart.join()
    assert "published version 1" in capsys.readouterr().out
    assert ("waiting", "object store unavailable") in beat.states
    sessions = make_session_factory(make_engine(settings.database_url))
    with sessions() as session:
        versions = session.scalars(select(PolicyVersion).order_by(PolicyVersion.version)).all()
        assert [v.version for v in versions] == [0, 1]
        rounds = session.scalars(select(TrainingRound)).all()
        assert [(r.status, r.produced_version) for r in rounds] == [("done", 1)]
        v1 = versions[1]
        assert v1.lora_key is not None and v1.lora_sha256 is not None
        assert len(get_verified(trainer.blobs, v1.lora_key, v1.lora_sha256)) > 0
        assert v1.metrics["optimizer_steps"] == 3
