"""The data-parallel trainer (trainer/data_parallel.py) as people run it: `densealign trainer` under
torchrun, two CPU processes on gloo, real Postgres and blob store, the tiny SD model at 16 px.

1. Two ranks train the same round to the adapter one process trains (same pairs, seeds, global batch).
2. A rank killed or hung mid-round: the other exits non-zero with one line, nothing is published, and the next
   start resumes the round from its last checkpoint and publishes it.
3. SIGTERM to torchrun: every rank stops after the same step, rank 0 checkpoints it, all exit cleanly.
"""

from __future__ import annotations

import io
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load as load_safetensors
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url

from app.main import create_app
from core.db import make_engine, make_session_factory
from core.db.models import PolicyVersion, ProcessHeartbeat, TrainingRound
from core.settings import Settings
from tests.conftest import postgres_admin_url
from tests.trainer.test_round_direction import small
from tests.worker.test_faults import settings_env
from tests.worker.test_loop import label_everything, refill_and_work, seed_database
from trainer.data_parallel import DataParallel, DataParallelError, data_parallel_from_env
from worker import sampling
from worker.main import build_sampler

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def labelled(loop_settings: Settings, redis: Any) -> Settings:
    """Four labelled pairs (16 px, 3 DDIM steps) waiting for a round."""
    settings = small(loop_settings)
    token = seed_database(settings)
    sampling.install(build_sampler(settings))
    assert refill_and_work(settings, redis) == 4
    assert label_everything(TestClient(create_app(settings)), token) == 4
    return settings


def trainer_env(settings: Settings, **dpo: Any) -> dict[str, str]:
    env = settings_env(settings) | {
        "DENSEALIGN_SAMPLER__IMAGE_SIZE": str(settings.sampler.image_size),
        "DENSEALIGN_SAMPLER__GUIDANCE_SCALE": str(settings.sampler.guidance_scale),
        "DENSEALIGN_HEARTBEAT_SECONDS": "0.5",
        "OMP_NUM_THREADS": "1",
    }
    # three pairs a step: the ranks' shares are 1 and 2 pairs, so the weighting by share is exercised
    values = {"min_new_pairs": 3, "pairs_per_step": 3, "sampled_steps": 2, "steps_per_round": 3, "lr": 1e-2}
    values |= {"clip": 1.0} | dpo
    env |= {f"DENSEALIGN_DPO__{k.upper()}": str(v) for k, v in values.items()}
    return env


def copy_of(settings: Settings, tmp_path: Path) -> tuple[Settings, str]:
    """The same database (Postgres template copy) and blobs under a new name; returns it and its name."""
    url = make_url(settings.database_url)
    name = f"{url.database}_copy"
    admin = create_engine(postgres_admin_url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(
            text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :db"),
            {"db": url.database},
        )
        conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{url.database}"'))
    admin.dispose()
    blobs = tmp_path / "blobs-copy"
    shutil.copytree(settings.blob_dir, blobs)
    copied = url.set(database=name).render_as_string(hide_password=False)
    return settings.model_copy(update={"database_url": copied, "blob_dir": str(blobs)}), name


def drop(name: str) -> None:
    admin = create_engine(postgres_admin_url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def published(settings: Settings, version: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A published version's adapter tensors and metrics."""
    with make_session_factory(make_engine(settings.database_url))() as session:
        row = session.scalar(select(PolicyVersion).where(PolicyVersion.version == version))
        assert row is not None and row.lora_key is not None
        key, metrics = row.lora_key, row.metrics
    return load_safetensors((Path(settings.blob_dir) / key).read_bytes()), metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_ranks(
    env: dict[str, str], tmp_path: Path, *, once: bool = True
) -> tuple[list[subprocess.Popen[bytes]], list[Path]]:
    """Two ranks of `densealign trainer --once` with what torchrun sets for each, started by hand so that
    a signal to one reaches only that one (torchrun would also stop the others itself)."""
    group = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs, logs = [], [tmp_path / f"rank{rank}.log" for rank in range(2)]
    for rank, log in enumerate(logs):
        with log.open("wb") as out:
            procs.append(
                subprocess.Popen(
                    [str(BIN / "densealign"), "trainer", *(["--once"] if once else [])],
                    env=env | group | {"RANK": str(rank), "LOCAL_RANK": str(rank)},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    return procs, logs


def wait_for_step(sessions: Any, procs: list[Any], logs: list[Path], step: int) -> None:
    """Until rank 0's heartbeat says the round is `step` optimizer steps in."""
    deadline = time.monotonic() + 240
    while True:
        with sessions() as session:
            beat = session.scalar(select(ProcessHeartbeat).where(ProcessHeartbeat.role == "trainer"))
        if (
            beat is not None
            and beat.state == "training"
            and int(beat.detail.split()[-1].split("/")[0]) >= step
        ):
            return
        assert all(p.poll() is None for p in procs), [log.read_text() for log in logs]
        assert time.monotonic() < deadline, f"not {step} steps in:\n{logs[0].read_text()}"
        time.sleep(0.2)


def test_two_ranks_train_the_round_one_process_trains(
    loop_settings: Settings, redis: Any, tmp_path: Path
) -> None:
    single = labelled(loop_settings, redis)
    parallel, copy_name = copy_of(single, tmp_path)
    try:
        one = subprocess.run(
            [str(BIN / "densealign"), "trainer", "--once"],
            env=trainer_env(single),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert one.returncode == 0, one.stderr
        assert "published version 1" in one.stdout
        two = subprocess.run(
            [
                str(BIN / "torchrun"),
                "--standalone",
                "--nproc-per-node",
                "2",
                str(BIN / "densealign"),
                "trainer",
                "--once",
            ],
            env=trainer_env(parallel),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert two.returncode == 0, two.stderr
        assert two.stdout.count("published version 1") == 1, two.stdout  # rank 0 alone publishes
        assert "rank 1 of 2 (gloo" in two.stderr and "rank 0 of 2 (gloo" in two.stderr
        adapter_1, metrics_1 = published(single, 1)
        adapter_2, metrics_2 = published(parallel, 1)
    finally:
        drop(copy_name)
    assert adapter_1.keys() == adapter_2.keys()
    moved = max(float(t.abs().max()) for k, t in adapter_1.items() if "lora_B" in k or "lora.up" in k)
    assert moved > 1e-3, "the round did not move the adapter: the comparison would prove nothing"
    # Not bit for bit: the ranks' gradients reach AdamW as a sum of two partial means instead of one mean,
    # and each rank runs the reference on a smaller batch, so float32 sums come out in another order
    # (the loss and gradient norm below agree to ~1e-6 relative). AdamW's update g / (sqrt(v) + 1e-8)
    # magnifies that for the odd gradient element near 1e-8, which can move a whole step (lr 1e-2) the
    # other way. So the check is on the bulk: in 7 runs (3 steps) at most 2 of the 11,520 weights differed
    # by more than 1e-4 and the difference's norm was 6e-5 to 1.5e-3 of the adapter's. Giving both ranks'
    # gradients weight 1/2 instead of their shares of the pairs (1/3, 2/3): 92% of the weights differed by
    # more than 1e-4, and the norm was 0.15 of the adapter's.
    a1 = torch.cat([adapter_1[k].flatten() for k in sorted(adapter_1)])
    a2 = torch.cat([adapter_2[k].flatten() for k in sorted(adapter_1)])
    diff = (a2 - a1).abs()
    assert float((diff > 1e-4).float().mean()) < 1e-3, "more than 0.1% of the weights differ by 1e-4"
    assert float(diff.norm() / a1.norm()) < 2e-2
    assert metrics_2["optimizer_steps"] == metrics_1["optimizer_steps"] == 3
    # Not the implicit accuracy: at the first step the adapter is zero and a pair's margin is a few units
    # in the last place (policy and reference rows run in batches of different sizes), so its sign, and
    # the share of margins above zero, is a coin toss in either run.
    assert metrics_2["loss"] == pytest.approx(metrics_1["loss"], rel=1e-5)
    assert metrics_2["grad_norm"] == pytest.approx(metrics_1["grad_norm"], rel=1e-4)
    # the last DDIM step's log-ratios are ~3e-4, moved 7e-8 by the weight differences above
    assert metrics_2["abs_logratio_by_step"] == pytest.approx(
        metrics_1["abs_logratio_by_step"], rel=1e-4, abs=1e-6
    )


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_a_lost_rank_fails_the_round_cleanly_and_the_next_start_resumes_it(
    loop_settings: Settings, redis: Any, tmp_path: Path, sig: signal.Signals
) -> None:
    """A killed rank closes its connections: the survivor fails at once. A hung one (SIGSTOP) keeps them
    open: the survivor fails when the collective timeout runs out."""
    settings = labelled(loop_settings, redis)
    sessions = make_session_factory(make_engine(settings.database_url))
    timeout = 15
    env = trainer_env(
        settings, steps_per_round=100_000, checkpoint_every=1, collective_timeout_seconds=timeout
    )
    procs, logs = start_ranks(env, tmp_path)
    try:
        wait_for_step(sessions, procs, logs, 2)
        procs[1].send_signal(sig)
        killed = time.monotonic()
        code = procs[0].wait(timeout=timeout + 30)
        seconds = time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    text_0 = logs[0].read_text()
    assert code == 1, text_0
    assert seconds < timeout + 15, f"rank 0 took {seconds:.0f}s to give up"
    if sig == signal.SIGSTOP:
        assert seconds > timeout - 2, f"rank 0 gave up after {seconds:.0f}s, before the {timeout}s timeout"
    assert "Traceback" not in text_0
    (line,) = [s for s in text_0.splitlines() if s.startswith("densealign trainer: ")]
    assert (
        "rank 0 of 2" in line
        and "Nothing was published" in line
        and "resumes from its last checkpoint" in line
    )
    with sessions() as session:
        (round_,) = session.scalars(select(TrainingRound)).all()
        assert round_.status == "running" and round_.produced_version is None
        assert session.scalar(select(PolicyVersion.version).order_by(PolicyVersion.version.desc())) == 0
    ckpt_path = Path(settings.blob_dir) / "rounds" / str(round_.id) / "checkpoint.pt"
    stopped_at = torch.load(io.BytesIO(ckpt_path.read_bytes()), weights_only=False)["step"]
    assert stopped_at >= 2

    # A single process resumes there: two more steps end the round.
    done = subprocess.run(
        [str(BIN / "densealign"), "trainer", "--once"],
        env=trainer_env(settings, steps_per_round=stopped_at + 2),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "published version 1" in done.stdout
    assert f"resumed at step {stopped_at}" in done.stderr
    with sessions() as session:
        v1 = session.scalar(select(PolicyVersion).where(PolicyVersion.version == 1))
        assert v1 is not None and v1.metrics["optimizer_steps"] == stopped_at + 2
    assert not ckpt_path.exists()


def test_stopping_torchrun_checkpoints_every_rank_at_the_same_step(
    loop_settings: Settings, redis: Any, tmp_path: Path
) -> None:
    """As compose stops it: SIGTERM to torchrun, which passes it to every rank. The ranks agree on the
    step to stop after, rank 0 checkpoints there, and every rank exits cleanly."""
    settings = labelled(loop_settings, redis)
    sessions = make_session_factory(make_engine(settings.database_url))
    env = trainer_env(settings, steps_per_round=100_000, checkpoint_every=100_000)
    log = tmp_path / "torchrun.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(BIN / "torchrun"),
                "--standalone",
                "--nproc-per-node",
                "2",
                str(BIN / "densealign"),
                "trainer",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 240
            while True:
                with sessions() as session:
                    beat = session.scalar(select(ProcessHeartbeat).where(ProcessHeartbeat.role == "trainer"))
                if (
                    beat is not None
                    and beat.state == "training"
                    and int(beat.detail.split()[-1].split("/")[0]) >= 2
                ):
                    break
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, f"no 2 steps in:\n{log.read_text()}"
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert "densealign trainer: " not in text, text  # no rank failed
    for rank in range(2):
        assert f"trainer rank {rank}/2 INFO stopped" in text, text
    stops = {
        line.split(" INFO ")[0][-len("rank 0/2") :]: int(line.split("stopped at step ")[1].split("/")[0])
        for line in text.splitlines()
        if "stopped at step" in line
    }
    assert stops.keys() == {"rank 0/2", "rank 1/2"} and len(set(stops.values())) == 1, stops
    stopped_at = stops["rank 0/2"]
    with sessions() as session:
        (round_,) = session.scalars(select(TrainingRound)).all()
        assert round_.status == "running"
        assert session.scalar(select(PolicyVersion.version).order_by(PolicyVersion.version.desc())) == 0
    ckpt_path = Path(settings.blob_dir) / "rounds" / str(round_.id) / "checkpoint.pt"
    ckpt = torch.load(io.BytesIO(ckpt_path.read_bytes()), weights_only=False)
    assert ckpt["step"] == stopped_at >= 2 and ckpt["metrics"].steps == stopped_at


def test_each_rank_takes_a_contiguous_share_in_rank_order() -> None:
    shares = [DataParallel(rank, 2, 60.0).share(3) for rank in range(2)]
    assert shares == [slice(0, 1), slice(1, 3)]  # concatenated in rank order: the step's own order
    assert [list(range(10))[DataParallel(r, 4, 60.0).share(10)] for r in range(4)] == [
        [0, 1],
        [2, 3, 4],
        [5, 6],
        [7, 8, 9],
    ]
    with pytest.raises(DataParallelError, match="a step of 1 pairs cannot be shared by 2 ranks"):
        DataParallel(0, 2, 60.0).share(1)


def test_one_process_is_no_group_and_a_group_needs_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert data_parallel_from_env(timeout_seconds=5.0, device="auto") == (None, "auto")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert data_parallel_from_env(timeout_seconds=5.0, device="cpu") == (None, "cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(
        DataParallelError, match="MASTER_ADDR, MASTER_PORT unset: start the trainer with torchrun"
    ):
        data_parallel_from_env(timeout_seconds=5.0, device="cpu")


def test_a_rank_asked_to_stop_stops_every_rank_at_the_same_step(
    loop_settings: Settings, redis: Any, tmp_path: Path
) -> None:
    """SIGTERM to one rank only (one host's torchrun stopped): the ranks agree to stop after the step in
    hand, rank 0 checkpoints it, and every rank exits cleanly (rank 0's loop too, instead of resuming
    the round with the others)."""
    settings = labelled(loop_settings, redis)
    sessions = make_session_factory(make_engine(settings.database_url))
    env = trainer_env(settings, steps_per_round=100_000, checkpoint_every=100_000)
    procs, logs = start_ranks(env, tmp_path, once=False)
    try:
        wait_for_step(sessions, procs, logs, 2)
        procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], texts
    assert "another rank asked to stop: every rank stops" in texts[0]
    assert texts[0].count("stopped at step") == 1, "rank 0 went on with the round"
    steps = [int(text.split("stopped at step ")[1].split("/")[0]) for text in texts]
    assert steps[0] == steps[1] >= 2, steps
    with sessions() as session:
        (round_,) = session.scalars(select(TrainingRound)).all()
        assert round_.status == "running"
    ckpt_path = Path(settings.blob_dir) / "rounds" / str(round_.id) / "checkpoint.pt"
    assert torch.load(io.BytesIO(ckpt_path.read_bytes()), weights_only=False)["step"] == steps[0]
