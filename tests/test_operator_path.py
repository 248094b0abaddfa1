"""The operator's path of the README, from a fresh database, with nothing but its commands.

`densealign migrate`, `densealign invite`, `densealign serve`, `densealign worker` and
`densealign trainer` run as separate processes against real Postgres and Redis, configured only by
DENSEALIGN_* variables, on the model that ships in models/. Nothing is seeded behind their backs:
no version 0, no queue, no in-process worker. A programmatic labeller (`densealign label`) decides
pairs through the REST API until version 1 is published and the worker samples with it. Then the
processes are stopped as compose stops them (SIGTERM), and `densealign health` is checked to tell
the truth about each.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from core.db import make_engine, make_session_factory
from core.db.models import Judgement, Pair, PolicyVersion, ProcessHeartbeat, TrainingRound
from tests.conftest import scratch_postgres_database, skip_or_fail

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ROOT / "models" / "densealign-shapes"
REDIS_URL = os.environ.get("DENSEALIGN_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
PROMPTS = ["a red circle", "a blue square", "a green triangle above a yellow circle"]
ROUND_LABELS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], Any], what: str, timeout: float, procs: Sequence[Proc] = ()) -> Any:
    """`condition()` once it is truthy; fails with the processes' logs when one exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        for proc in procs:
            assert proc.popen.poll() is None, f"{proc.name} exited ({proc.popen.returncode}):\n{proc.log()}"
        logs = "\n".join(f"--- {proc.name}:\n{proc.log()}" for proc in procs)
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}\n{logs}"
        time.sleep(0.3)


class Proc:
    """A `densealign ...` process whose output goes to a file the assertions can quote."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], tmp: Path) -> None:
        self.name = name
        self.path = tmp / f"{name}.log"
        self.file = self.path.open("wb")
        self.popen = subprocess.Popen(
            [str(Path(sys.executable).parent / "densealign"), *args],
            env=env,
            cwd=tmp,
            stdout=self.file,
            stderr=subprocess.STDOUT,
            # its own process group, so kill() also ends what it forked (RQ's scheduler process)
            start_new_session=True,
        )

    def log(self) -> str:
        return self.path.read_text(errors="replace")[-4000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> tuple[int, float]:
        """Send `sig`; returns (exit code, seconds it took to exit)."""
        start = time.monotonic()
        self.popen.send_signal(sig)
        try:
            code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            raise AssertionError(
                f"{self.name} did not exit within {timeout}s of {sig}:\n{self.log()}"
            ) from None
        return code, time.monotonic() - start

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()
        self.file.close()


def densealign(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "densealign"), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def operator_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Only what an operator sets: the services, a secret, the base model and the CPU-sized loop."""
    from redis import Redis

    redis = Redis.from_url(REDIS_URL)
    try:
        redis.ping()
    except Exception as exc:
        skip_or_fail(f"Redis at {REDIS_URL} is not reachable ({type(exc).__name__}); .ci/run starts it")
    redis.flushdb()
    port = free_port()
    with scratch_postgres_database() as url:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DENSEALIGN_")}
        env.update(
            HF_HUB_OFFLINE="1",
            DENSEALIGN_DATABASE_URL=url,
            DENSEALIGN_REDIS_URL=REDIS_URL,
            DENSEALIGN_BLOB_DIR=str(tmp_path / "blobs"),
            DENSEALIGN_SECRET_KEY="operator-path-test-secret-key-0123456789",
            DENSEALIGN_COOKIE_SECURE="false",
            DENSEALIGN_PORT=str(port),
            DENSEALIGN_PUBLIC_BASE_URL=f"http://127.0.0.1:{port}",
            DENSEALIGN_OVERLAP_SHARE="0",
            DENSEALIGN_HEARTBEAT_SECONDS="1",
            DENSEALIGN_MODEL__BASE_MODEL=str(SHAPES),
            DENSEALIGN_MODEL__DEVICE="cpu",
            DENSEALIGN_SAMPLER__NUM_STEPS="4",
            DENSEALIGN_DPO__MIN_NEW_PAIRS=str(ROUND_LABELS),
            DENSEALIGN_DPO__STEPS_PER_ROUND="4",
            DENSEALIGN_DPO__PAIRS_PER_STEP="2",
            DENSEALIGN_DPO__CHECKPOINT_EVERY="2",
            DENSEALIGN_DPO__POLL_SECONDS="1",
            DENSEALIGN_POOL__TARGET_PER_PROMPT="2",
            DENSEALIGN_POOL__TICK_SECONDS="1",
            DENSEALIGN_POOL__PAIRS_PER_JOB="2",
        )
        yield env
    redis.flushdb()


def accept_invite(link: str) -> str:
    """What a person does with the printed link: open it, press the button; returns the shown token."""
    with httpx.Client(timeout=30) as client:
        page = client.get(link)
        assert page.status_code == 200, page.text
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf, page.text
        welcome = client.post(link, data={"csrf": csrf.group(1)})
        assert welcome.status_code == 200, welcome.text
        token = re.search(r'<pre id="token">([^<]+)</pre>', welcome.text)
        assert token, welcome.text
        return token.group(1).strip()


def test_readme_operator_path_from_a_fresh_database(operator_env: dict[str, str], tmp_path: Path) -> None:
    env, base = operator_env, operator_env["DENSEALIGN_PUBLIC_BASE_URL"]
    sessions = make_session_factory(make_engine(env["DENSEALIGN_DATABASE_URL"]))

    def scalar(query: Any) -> Any:
        with sessions() as session:
            return session.scalar(query)

    # 1. migrate: the schema and version 0 (the configured base model), twice without harm
    for _ in range(2):
        done = densealign(["migrate"], env, tmp_path)
        assert done.returncode == 0, done.stderr
    assert scalar(select(func.count(PolicyVersion.id))) == 1
    with sessions() as session:
        v0 = session.scalar(select(PolicyVersion).where(PolicyVersion.version == 0))
        assert v0 is not None and v0.metrics == {"base_model": str(SHAPES)}

    # 2. the first admin's link is on the public base URL
    invite = densealign(["invite", "admin", "--role", "admin"], env, tmp_path)
    assert invite.returncode == 0, invite.stderr
    link = invite.stdout.strip()
    assert link.startswith(f"{base}/invite/"), link

    procs: list[Proc] = []
    try:
        serve = Proc("serve", ["serve"], env, tmp_path)
        procs.append(serve)
        wait_for(lambda: _get(f"{base}/api/v1/health") == 200, "the app to answer", 60, procs)
        admin = accept_invite(link)
        auth = {"Authorization": f"Bearer {admin}"}
        for text in PROMPTS:
            made = httpx.post(f"{base}/api/v1/prompts", json={"text": text}, headers=auth, timeout=30)
            assert made.status_code == 201, made.text

        # 3. worker and trainer, each its own process; both report in through their heartbeat
        worker = Proc("worker", ["worker"], env, tmp_path)
        trainer = Proc("trainer", ["trainer"], env, tmp_path)
        procs += [worker, trainer]
        wait_for(lambda: scalar(select(func.count(Pair.id))) >= ROUND_LABELS, "the pool to fill", 240, procs)
        for role in ("worker", "trainer"):
            wait_for(
                lambda r=role: densealign(["health", "--role", r], env, tmp_path).returncode == 0,
                f"{role} health",
                60,
                procs,
            )  # type: ignore[misc]

        # 4. a labeller decides pairs through the REST API (ties train nothing, so it goes on until the
        #    trainer has enough decided ones); the trainer publishes version 1
        label = Proc(
            "label", ["label", "--url", base, "--token", admin, "--preference", "faithfulness"], env, tmp_path
        )
        procs.append(label)
        wait_for(lambda: scalar(select(func.max(PolicyVersion.version))) == 1, "version 1", 300, procs)
        label.kill()
        procs.remove(label)
        assert scalar(select(func.count(Judgement.id))) >= ROUND_LABELS
        current = httpx.get(f"{base}/api/v1/policies/current", headers=auth, timeout=30).json()
        assert current["version"] == 1
        rounds = scalar(select(func.count(TrainingRound.id)).where(TrainingRound.status == "done"))
        assert rounds == 1

        # 5. the worker swaps version 1 in and samples with it. New pairs are sampled only as judgements
        #    free slots: judge one full job's worth (2), as annotators would. The labeller may have drained
        #    the pool just before it was stopped, so wait for a pair as the page does (it polls).
        for _ in range(2):
            served = wait_for(
                lambda: httpx.get(f"{base}/api/v1/pairs/next", headers=auth, timeout=30).json()["pair"],
                "a pair to judge",
                240,
                procs,
            )
            body = {"pair_id": served["pair_id"], "choice": "tie", "client_key": uuid.uuid4().hex}
            assert (
                httpx.post(f"{base}/api/v1/judgements", json=body, headers=auth, timeout=30).status_code
                == 201
            )
        wait_for(
            lambda: scalar(select(func.count(Pair.id)).where(Pair.policy_version == 1)) > 0,
            "a pair sampled by version 1",
            240,
            procs,
        )
        assert "hot-swapped policy version 0 -> 1" in worker.log()
        with sessions() as session:
            beats = {row.role: row for row in session.scalars(select(ProcessHeartbeat))}
        assert set(beats) == {"worker", "trainer"}
        assert beats["worker"].state in ("idle", "sampling") and beats["worker"].stopped_at is None

        # 6. compose's stop: SIGTERM; both exit cleanly and promptly, and health says so
        for proc in (trainer, worker):
            code, seconds = proc.stop()
            assert code == 0, proc.log()
            assert seconds < 30, f"{proc.name} took {seconds:.1f}s to stop"
        for role in ("worker", "trainer"):
            gone = densealign(["health", "--role", role], env, tmp_path)
            assert gone.returncode == 1 and "exited" in gone.stderr, gone.stderr
        assert "Traceback" not in trainer.log() and "Traceback" not in worker.log()
    finally:
        for proc in procs:
            proc.kill()


def test_health_turns_non_zero_when_a_killed_worker_goes_silent(
    operator_env: dict[str, str], tmp_path: Path
) -> None:
    env = operator_env
    assert densealign(["migrate"], env, tmp_path).returncode == 0
    never = densealign(["health", "--role", "worker"], env, tmp_path)
    assert never.returncode == 1 and "no worker has ever recorded a heartbeat" in never.stderr
    worker = Proc("worker", ["worker", "--no-tick"], env, tmp_path)
    try:
        wait_for(
            lambda: (
                densealign(["health", "--role", "worker", "--max-age", "3"], env, tmp_path).returncode == 0
            ),
            "the worker's heartbeat",
            120,
            [worker],
        )
        worker.stop(signal.SIGKILL)  # no goodbye: only the silence tells
        wait_for(
            lambda: (
                densealign(["health", "--role", "worker", "--max-age", "3"], env, tmp_path).returncode == 1
            ),
            "health to notice the silence",
            30,
        )
        stale = densealign(["health", "--role", "worker", "--max-age", "3"], env, tmp_path)
        assert "silent for" in stale.stderr, stale.stderr
        bad = densealign(["health", "--role", "painter"], env, tmp_path)
        assert bad.returncode == 2 and "painter" in bad.stderr
    finally:
        worker.kill()


def _get(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return 0
