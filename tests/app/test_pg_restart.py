"""Postgres restarted while annotators are judging: requests fail cleanly and no acknowledged label is lost.

The shared server on 127.0.0.1:5432 is never touched: the test runs a throwaway cluster of its own on a
private port (initdb and pg_ctl from /usr/lib/postgresql/*/bin, as the `postgres` OS user when the tests
run as root), migrates it, and serves the real app with uvicorn in a thread on an ordinary pooled engine.
Annotator threads lease pairs and post judgements the way the browser client does: on a 503 they wait
the `Retry-After` seconds and send the same request again, with the same client_key. Mid-run the
cluster is stopped with `pg_ctl stop -m fast` (which ends every open connection, the pooled ones
included), kept down for a few seconds, and started again.

Asserted: no answer but 2xx or 503 (never a 500), every 503 says Retry-After, no request takes longer
than HANG_LIMIT seconds, the outage was really met (503s while down), labelling resumes afterwards, and
the stored judgements are exactly the acknowledged ones: each acknowledged client_key once, nothing
else.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import random
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, insert, select, text

from app.main import create_app
from core.db import make_engine, make_session_factory
from core.db.engine import CONNECT_TIMEOUT_SECONDS
from core.db.labellers import create_labeller
from core.db.models import Judgement, Pair, Trajectory
from core.db.policies import publish_policy_version
from core.db.prompts import add_prompt
from core.settings import Settings
from tests.conftest import migrate, skip_or_fail

pytestmark = pytest.mark.slow

ANNOTATORS = 6
PAIRS = 600
HANG_LIMIT = 5.0  # seconds: the longest any single request may take, outage or not
OUTAGE = 3.0  # seconds the cluster stays down
ACKS_PER_PHASE = 20  # judgements acknowledged before the restart, and again after it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _postgres_bin() -> Path | None:
    found = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin") if Path(p, "pg_ctl").exists()]
    return max(found, key=lambda p: int(p.parent.name)) if found else None


@dataclass
class PrivateCluster:
    """A PostgreSQL cluster of the test's own, data in a temporary directory, trust auth on 127.0.0.1."""

    bin: Path
    base: Path
    port: int
    as_postgres: list[str]

    @property
    def data(self) -> Path:
        return self.base / "data"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def pg_ctl(self, *args: str) -> None:
        command = [*self.as_postgres, str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60", *args]
        subprocess.run(command, check=True, capture_output=True, timeout=90)

    def start(self) -> None:
        self.pg_ctl("-l", str(self.base / "server.log"), "start")

    def stop(self, mode: str = "fast") -> None:
        self.pg_ctl("-m", mode, "stop")


@pytest.fixture
def private_postgres() -> Iterator[PrivateCluster]:
    bin_dir = _postgres_bin()
    if bin_dir is None:
        skip_or_fail("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin (apt install postgresql)")
    assert bin_dir is not None
    as_postgres: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="densealign-pg-"))
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(base)
            skip_or_fail("running as root and there is no `postgres` OS user to run a private cluster as")
        runuser = shutil.which("runuser")
        if runuser is None:
            shutil.rmtree(base)
            skip_or_fail("running as root and `runuser` is missing, so a private cluster cannot be started")
        assert runuser is not None
        os.chown(base, owner.pw_uid, owner.pw_gid)
        as_postgres = [runuser, "-u", "postgres", "--"]
    cluster = PrivateCluster(bin=bin_dir, base=base, port=_free_port(), as_postgres=as_postgres)
    started = False
    try:
        subprocess.run(
            [*as_postgres, str(bin_dir / "initdb"), "-D", str(cluster.data), "-U", "postgres", "-A", "trust",
             "-E", "UTF8", "--locale=C", "--no-sync"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        with (cluster.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"port = {cluster.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{base}'\nfsync = off\nfull_page_writes = off\n"
            )
        cluster.start()
        started = True
        admin = create_engine(cluster.url("postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text("CREATE DATABASE densealign"))
        admin.dispose()
        migrate(cluster.url("densealign"))
        yield cluster
    finally:
        if started:
            with contextlib.suppress(subprocess.CalledProcessError):  # a failed restart leaves it down
                cluster.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)


def seed(url: str) -> list[str]:
    """Version 0, one prompt, PAIRS single-judgement pairs and ANNOTATORS labellers; their tokens."""
    engine = make_engine(url)
    with make_session_factory(engine)() as session, session.begin():
        publish_policy_version(session=session, version=0)
        prompt_id = add_prompt(session=session, text="a red circle above a blue square").id
        tokens = [create_labeller(session=session, name=f"pg-{i}").token for i in range(ANNOTATORS)]
        session.execute(
            insert(Trajectory),
            [{"prompt_id": prompt_id, "policy_version": 0, "seed": i, "sampler": {}, "image_key": f"images/{i}.png"}
             for i in range(2 * PAIRS)],
        )  # fmt: skip
        ids = list(session.scalars(select(Trajectory.id).order_by(Trajectory.id)))
        session.execute(
            insert(Pair),
            [{"prompt_id": prompt_id, "policy_version": 0, "trajectory_a_id": ids[2 * i],
              "trajectory_b_id": ids[2 * i + 1], "required_judgements": 1} for i in range(PAIRS)],
        )  # fmt: skip
    engine.dispose()
    return tokens


@dataclass
class Tally:
    """What the annotators saw, shared between their threads."""

    acknowledged: dict[str, int] = field(default_factory=dict)  # client_key -> pair id
    unavailable: int = 0  # 503 answers
    problems: list[str] = field(default_factory=list)
    slowest: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def problem(self, what: str) -> None:
        with self.lock:
            self.problems.append(what)


def send(
    client: httpx.Client, tally: Tally, method: str, path: str, **kwargs: object
) -> httpx.Response | None:
    """Send until the answer is not a 503, waiting Retry-After between tries; None after a problem."""
    give_up = time.monotonic() + 60
    while True:
        started = time.monotonic()
        try:
            response = client.request(method, path, **kwargs)  # type: ignore[arg-type]
        except httpx.HTTPError as exc:
            tally.problem(f"{method} {path}: {type(exc).__name__} after {time.monotonic() - started:.1f}s")
            return None
        with tally.lock:
            tally.slowest = max(tally.slowest, time.monotonic() - started)
        if response.status_code != 503:
            return response
        retry_after = response.headers.get("retry-after")
        with tally.lock:
            tally.unavailable += 1
        if retry_after is None or time.monotonic() > give_up:
            tally.problem(f"{method} {path}: 503 with Retry-After {retry_after!r}")
            return None
        time.sleep(float(retry_after))


def annotate(base_url: str, token: str, tally: Tally, stop: threading.Event) -> None:
    rng = random.Random(token)
    headers = {"Authorization": f"Bearer {token}"}
    # The client waits longer than HANG_LIMIT, so a slow answer is measured rather than cut off.
    with httpx.Client(base_url=base_url, headers=headers, timeout=HANG_LIMIT + 25) as client:
        while not stop.is_set():
            response = send(client, tally, "GET", "/api/v1/pairs/next")
            if response is None:
                return
            if response.status_code != 200 or response.json()["pair"] is None:
                tally.problem(f"GET /api/v1/pairs/next -> {response.status_code} {response.text[:200]}")
                return
            pair_id = response.json()["pair"]["pair_id"]
            time.sleep(rng.uniform(0.0, 0.1))
            body = {"pair_id": pair_id, "choice": rng.choice("ab"), "client_key": uuid.uuid4().hex}
            # Finished even when told to stop: a judgement in flight is retried until answered.
            response = send(client, tally, "POST", "/api/v1/judgements", json=body)
            if response is None:
                return
            if response.status_code not in (200, 201):
                tally.problem(f"POST /api/v1/judgements -> {response.status_code} {response.text[:200]}")
                return
            with tally.lock:
                tally.acknowledged[str(body["client_key"])] = pair_id


def app_settings(url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=url,
        secret_key="pg-restart-test-key",  # type: ignore[arg-type]
        cookie_secure=False,
        blob_dir=str(tmp_path / "blobs"),
        judgement_rate_per_minute=100_000,  # the rate limit is not under test here
        judgement_burst=1_000,
    )


def wait_for(condition: Callable[[], object], what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_postgres_restart_mid_labelling_answers_503_and_loses_no_acknowledged_judgement(
    private_postgres: PrivateCluster, tmp_path: Path
) -> None:
    url = private_postgres.url("densealign")
    tokens = seed(url)
    engine = make_engine(url)
    app = create_app(app_settings(url, tmp_path), session_factory=make_session_factory(engine))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    server_thread = threading.Thread(target=server.run, daemon=True)
    server_thread.start()
    wait_for(lambda: server.started, "uvicorn to start", timeout=20)
    tally, stop = Tally(), threading.Event()
    threads = [
        threading.Thread(target=annotate, args=(f"http://127.0.0.1:{port}", t, tally, stop)) for t in tokens
    ]
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: len(tally.acknowledged) >= ACKS_PER_PHASE or tally.problems, "judgements before")
        before = len(tally.acknowledged)
        private_postgres.stop("fast")
        time.sleep(OUTAGE)
        unavailable_while_down = tally.unavailable
        private_postgres.start()
        wait_for(
            lambda: len(tally.acknowledged) >= before + ACKS_PER_PHASE or tally.problems, "judgements after"
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
        server.should_exit = True
        server_thread.join(timeout=10)
    assert tally.problems == []
    assert unavailable_while_down > 0, "no request met the outage: the test did not test anything"
    assert tally.slowest < HANG_LIMIT, f"a request took {tally.slowest:.1f}s"
    with make_session_factory(engine)() as session:
        stored = dict(session.execute(select(Judgement.client_key, Judgement.pair_id)).tuples().all())
    engine.dispose()
    assert len(tally.acknowledged) >= before + ACKS_PER_PHASE
    assert stored == tally.acknowledged


def test_restart_while_idle_is_invisible_to_the_next_request(
    private_postgres: PrivateCluster, tmp_path: Path
) -> None:
    """The pool's connections die with the restart; the engine's checkout check (no pre-ping: it
    reads the server's goodbye off the idle socket) replaces them before use, so the first request
    afterwards succeeds instead of meeting a dead connection (a 503)."""
    url = private_postgres.url("densealign")
    token = seed(url)[0]
    engine = make_engine(url)
    app = create_app(app_settings(url, tmp_path), session_factory=make_session_factory(engine))
    client = TestClient(app, raise_server_exceptions=False, headers={"Authorization": f"Bearer {token}"})
    first = client.get("/api/v1/pairs/next")
    assert first.status_code == 200 and engine.pool.checkedin() == 1  # type: ignore[attr-defined]
    private_postgres.stop("fast")
    private_postgres.start()
    again = client.get("/api/v1/pairs/next")
    engine.dispose()
    assert again.status_code == 200, again.text
    assert again.json()["pair"]["pair_id"] == first.json()["pair"]["pair_id"]  # the lease survived


def test_server_that_accepts_but_never_answers_is_a_503_within_seconds(tmp_path: Path) -> None:
    """A Postgres that takes the TCP connection but never speaks (hung at start-up, a half-dead proxy)
    used to hold the request forever; the engine's connect_timeout turns it into a 503."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"postgresql+psycopg://postgres@127.0.0.1:{silent.getsockname()[1]}/densealign"
        engine = make_engine(url)
        app = create_app(app_settings(url, tmp_path), session_factory=make_session_factory(engine))
        client = TestClient(app, raise_server_exceptions=False)
        answers: list[tuple[httpx.Response, float]] = []

        def ask() -> None:
            started = time.monotonic()
            response = client.get("/api/v1/pairs/next", headers={"Authorization": "Bearer some-token-value"})
            answers.append((response, time.monotonic() - started))

        asking = threading.Thread(target=ask, daemon=True)
        asking.start()
        asking.join(timeout=CONNECT_TIMEOUT_SECONDS + 10)
        # closing `silent` ends a connect that is still waiting, so the thread does not outlive the test
    asking.join(timeout=10)
    engine.dispose()
    assert answers, f"no answer within {CONNECT_TIMEOUT_SECONDS + 10}s: the request hangs"
    response, elapsed = answers[0]
    assert response.status_code == 503 and response.headers["retry-after"] == "2"
    assert elapsed < CONNECT_TIMEOUT_SECONDS + 3, f"answered after {elapsed:.1f}s"
