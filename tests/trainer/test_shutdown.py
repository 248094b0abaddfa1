"""A trainer stopped as compose stops it (SIGTERM) exits within seconds and keeps its place in the round."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.main import create_app
from core.db import make_engine, make_session_factory
from core.db.models import PolicyVersion, ProcessHeartbeat, TrainingRound
from tests.worker.test_faults import settings_env
from tests.worker.test_loop import label_everything, refill_and_work, seed_database
from worker import sampling
from worker.main import build_sampler

pytestmark = pytest.mark.slow


def test_trainer_sigterm_checkpoints_mid_round_and_the_next_start_resumes_there(
    loop_settings, redis, tmp_path
):
    token = seed_database(loop_settings)
    sampling.install(build_sampler(loop_settings))
    refill_and_work(loop_settings, redis)
    label_everything(TestClient(create_app(loop_settings)), token)
    sessions = make_session_factory(make_engine(loop_settings.database_url))
    env = settings_env(loop_settings) | {
        "DENSEALIGN_REDIS_URL": loop_settings.redis_url,
        "DENSEALIGN_HEARTBEAT_SECONDS": "0.5",
        "DENSEALIGN_DPO__MIN_NEW_PAIRS": str(loop_settings.dpo.min_new_pairs),
        "DENSEALIGN_DPO__PAIRS_PER_STEP": str(loop_settings.dpo.pairs_per_step),
        "DENSEALIGN_DPO__SAMPLED_STEPS": str(loop_settings.dpo.sampled_steps),
        "DENSEALIGN_DPO__STEPS_PER_ROUND": "100000",  # a round far longer than the test
        "DENSEALIGN_DPO__CHECKPOINT_EVERY": "100000",  # so only the SIGTERM can write a checkpoint
    }
    log = tmp_path / "trainer.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "densealign"), "trainer"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            # wait until it is a few optimizer steps into the round
            deadline = time.monotonic() + 120
            while True:
                with sessions() as session:
                    beat = session.scalar(select(ProcessHeartbeat).where(ProcessHeartbeat.role == "trainer"))
                if (
                    beat is not None
                    and beat.state == "training"
                    and int(beat.detail.split()[-1].split("/")[0]) >= 3
                ):
                    break
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, f"the trainer never got 3 steps in:\n{log.read_text()}"
                time.sleep(0.2)
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=30)
            seconds = time.monotonic() - start
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert code == 0, text
    assert seconds < 10, f"the trainer took {seconds:.1f}s to stop"
    assert "Traceback" not in text

    with sessions() as session:
        (round_,) = session.scalars(select(TrainingRound)).all()
        assert round_.status == "running" and round_.produced_version is None
        assert session.scalar(select(PolicyVersion.version).order_by(PolicyVersion.version.desc())) == 0
        beat = session.scalar(select(ProcessHeartbeat).where(ProcessHeartbeat.role == "trainer"))
        assert beat is not None and beat.state == "stopped" and beat.stopped_at is not None
    ckpt_path = Path(loop_settings.blob_dir) / "rounds" / str(round_.id) / "checkpoint.pt"
    ckpt = torch.load(io.BytesIO(ckpt_path.read_bytes()), weights_only=False)
    stopped_at = ckpt["step"]
    assert stopped_at >= 3 and ckpt["metrics"].steps == stopped_at
    assert f"stopped at step {stopped_at}/100000" in text

    # The next start resumes at that step: two more steps end the round (steps_per_round = stopped + 2)
    env["DENSEALIGN_DPO__STEPS_PER_ROUND"] = str(stopped_at + 2)
    done = subprocess.run(
        [str(Path(sys.executable).parent / "densealign"), "trainer", "--once"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    assert "published version 1" in done.stdout
    assert f"resumed at step {stopped_at}" in done.stderr
    with sessions() as session:
        v1 = session.scalar(select(PolicyVersion).where(PolicyVersion.version == 1))
        assert v1 is not None and v1.metrics["optimizer_steps"] == stopped_at + 2
    assert not ckpt_path.exists()
