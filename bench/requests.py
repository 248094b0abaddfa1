"""Database round trips and server CPU of one next-pair and one judgement request.

Seeds a scratch Postgres database (bench/common.py, the seed of bench/load.py). Then:

1. Round trips, counted on the wire: the real app is served in this process on an ordinary pooled
   engine (make_engine) and libpq traces every protocol message of its connections (psycopg's
   `PGconn.trace`). A round trip is a message the client then waits on: a simple `Query` (BEGIN,
   COMMIT, ROLLBACK, a pre-ping's ";") or the `Sync` that ends a statement. Counted over --calls
   next-pair + judgement cycles after a warm-up cycle (statement caches and the app's labeller
   cache warm, as for an annotator at work), with what each round trip was.
2. Server CPU per request: one uvicorn process (as `densealign serve` runs it: log level warning, no
   access log) serves --cycles sequential cycles from a small keep-alive client in this process;
   the server's CPU time (user + system, /proc) over those requests, divided by their number, and
   this client's apart. With --py-spy, py-spy samples the server meanwhile (GIL held) and the share
   of samples under a few telling functions is recorded.

Figures go to --out (default bench/results/requests.json) under --label, beside earlier labels.

Usage: python bench/requests.py [--label after] [--calls 20] [--cycles 500] [--py-spy PATH]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))  # after the repo root: bench/core.py must not shadow core/

from common import drop_database, scratch_database  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from load import free_port, quantiles, seed, tree_cpu_seconds, wait_until_up  # noqa: E402
from sqlalchemy import event  # noqa: E402

from app.main import create_app  # noqa: E402
from core.db import make_engine, make_session_factory  # noqa: E402
from core.settings import Settings  # noqa: E402

RESULTS = ROOT / "bench" / "results"


class WireTrace:
    """Every frontend message of the engine's connections, from libpq's protocol trace."""

    def __init__(self, engine: Any) -> None:
        self.file = tempfile.TemporaryFile()  # noqa: SIM115 - open for the life of the engine
        self.prepared: dict[str, str] = {}  # psycopg prepares a statement after a few uses
        event.listen(engine, "connect", self._trace)

    def _trace(self, dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.pgconn.trace(self.file.fileno())

    def mark(self) -> int:
        self.file.seek(0, os.SEEK_END)
        return self.file.tell()

    def round_trips(self, since: int) -> list[str]:
        """What each round trip since `since` was: the simple query's text or the statement's start."""
        self.file.seek(since)
        trips: list[str] = []
        prepared = self.prepared
        statement = ""
        for line in self.file.read().decode(errors="replace").splitlines():
            parts = line.split("\t")
            if len(parts) < 4 or parts[1] != "F":
                continue
            kind, quoted = parts[3], "\t".join(parts[4:]).split('"')
            if kind == "Query":
                trips.append(quoted[1] if len(quoted) > 1 and quoted[1] else ";")
            elif kind == "Parse" and len(quoted) > 3:  # "name" "query" ...
                statement = prepared[quoted[1]] = quoted[3]
            elif kind == "Bind" and len(quoted) > 3:  # "portal" "statement name" ...
                statement = prepared.get(quoted[3], statement)
            elif kind == "Sync":
                trips.append(" ".join(statement.split())[:90])
        return trips


def label_of(trip: str) -> str:
    head = trip.split()[0].upper() if trip.split() else trip
    return {"BEGIN": "BEGIN", "COMMIT": "COMMIT", "ROLLBACK": "ROLLBACK", ";": "pre-ping"}.get(head, trip)


def count_round_trips(url: str, blob_dir: str, token: str, calls: int) -> dict[str, Any]:
    """Round trips per next-pair and judgement, the app served in this process on a traced engine."""
    engine = make_engine(url)
    wire = WireTrace(engine)
    settings = Settings(
        database_url=url,
        secret_key=uuid.uuid4().hex,  # type: ignore[arg-type]
        blob_dir=blob_dir,
        cookie_secure=False,
        judgement_rate_per_minute=100_000,
        judgement_burst=1_000,
    )
    client = TestClient(
        create_app(settings, session_factory=make_session_factory(engine)),
        headers={"Authorization": f"Bearer {token}"},
    )

    def cycle() -> tuple[list[str], list[str]]:
        mark = wire.mark()
        got = client.get("/api/v1/pairs/next")
        assert got.status_code == 200 and got.json()["pair"] is not None, got.text
        next_trips = wire.round_trips(mark)
        mark = wire.mark()
        body = {"pair_id": got.json()["pair"]["pair_id"], "choice": "a", "client_key": uuid.uuid4().hex}
        judged = client.post("/api/v1/judgements", json=body)
        assert judged.status_code == 201, judged.text
        return next_trips, wire.round_trips(mark)

    cycle()  # warm-up: statement caches, the pool's connection, the token cache
    counts: dict[str, list[int]] = {"next_pair": [], "judgement": []}
    kinds: dict[str, Counter[str]] = {"next_pair": Counter(), "judgement": Counter()}
    for _ in range(calls):
        for name, trips in zip(("next_pair", "judgement"), cycle(), strict=True):
            counts[name].append(len(trips))
            kinds[name].update(label_of(t) for t in trips)
    engine.dispose()
    figures: dict[str, Any] = {}
    for name in ("next_pair", "judgement"):
        figures[f"{name}_round_trips"] = {
            "max": max(counts[name]),
            "mean": round(sum(counts[name]) / calls, 3),
            "per_call": {k: round(v / calls, 3) for k, v in kinds[name].items()},
        }
    return figures


def server_cpu(url: str, blob_dir: str, token: str, cycles: int, py_spy: str | None) -> dict[str, Any]:
    """Server CPU per request: one uvicorn process serving sequential requests from this process.

    Served as `densealign serve --workers N` serves (uvicorn, log level warning, no access log);
    the client is the standard library's keep-alive HTTP client, so it stays small and apart.
    """
    port = free_port()
    env = dict(os.environ, DENSEALIGN_DATABASE_URL=url, DENSEALIGN_BLOB_DIR=blob_dir,
               DENSEALIGN_SECRET_KEY=uuid.uuid4().hex, DENSEALIGN_REDIS_URL="redis://127.0.0.1:6379/13",
               DENSEALIGN_JUDGEMENT_RATE_PER_MINUTE="100000", DENSEALIGN_JUDGEMENT_BURST="1000")  # fmt: skip
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.serve:factory", "--factory", "--port", str(port),
         "--log-level", "warning", "--no-access-log"],
        env=env, cwd=ROOT,
    )  # fmt: skip
    spy: subprocess.Popen[bytes] | None = None
    try:
        wait_until_up(f"http://127.0.0.1:{port}", server)
        connection = http.client.HTTPConnection("127.0.0.1", port)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

        def request(method: str, path: str, body: str | None = None) -> dict[str, Any]:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            payload = json.loads(response.read())
            assert response.status in (200, 201), payload
            return payload

        def cycle(latencies: list[float] | None = None) -> None:
            t0 = time.perf_counter()
            pair = request("GET", "/api/v1/pairs/next")["pair"]
            t1 = time.perf_counter()
            body = json.dumps({"pair_id": pair["pair_id"], "choice": "a", "client_key": uuid.uuid4().hex})
            request("POST", "/api/v1/judgements", body)
            if latencies is not None:
                latencies += [t1 - t0, time.perf_counter() - t1]

        for _ in range(50):  # warm-up: imports on first use, statement caches, the token cache
            cycle()
        if py_spy:
            spy_out = tempfile.NamedTemporaryFile(suffix=".txt", delete=False).name  # noqa: SIM115
            spy = subprocess.Popen(
                [py_spy, "record", "--pid", str(server.pid), "--gil", "--rate", "500", "--format", "raw",
                 "--output", spy_out, "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(1.0)
        latencies: list[float] = []
        cpu0, client0, wall0 = tree_cpu_seconds(server.pid), time.process_time(), time.perf_counter()
        for _ in range(cycles):
            cycle(latencies)
        cpu, client = tree_cpu_seconds(server.pid) - cpu0, time.process_time() - client0
        wall = time.perf_counter() - wall0
        profile: dict[str, float] = {}
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
            profile = top_frames(Path(spy_out))
            Path(spy_out).unlink()
        connection.close()
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
        server.terminate()
        server.wait(30)
    requests = 2 * cycles
    figures: dict[str, Any] = {
        "requests": requests,
        "server_cpu_ms_per_request": round(1000 * cpu / requests, 3),
        "client_cpu_ms_per_request": round(1000 * client / requests, 3),
        "requests_per_s_sequential": round(requests / wall, 1),
        "next_pair_ms_sequential": quantiles([1000 * t for t in latencies[0::2]]),
        "judgement_ms_sequential": quantiles([1000 * t for t in latencies[1::2]]),
    }
    if profile:
        figures["server_profile_share_of_gil_samples"] = profile
    return figures


PROFILED = (
    "run_sync_in_worker_thread", "solve_dependencies", "serialize_response", "get_next_pair",
    "create_judgement", "next_pair", "record_judgement", "Session.execute", "Session.commit",
    "orm_execute_statement", "Cursor.execute", "get_current_labeller", "limit_judgements",
    "assignment_public", "H11Protocol.data_received", "RequestResponseCycle.send", "SessionMiddleware.__call__",
)  # fmt: skip


def top_frames(raw: Path) -> dict[str, float]:
    """Share of py-spy's samples (GIL held) under each of a few functions that tell where time goes."""
    total, under = 0, Counter[str]()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        total += int(n)
        names = {frame.split(" (")[0] for frame in stack.split(";")}
        for name in PROFILED:  # py-spy qualifies methods with their class: match either way
            if any(found == name or found.endswith("." + name) for found in names):
                under[name] += int(n)
    return {name: round(under[name] / max(total, 1), 3) for name in PROFILED}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="after", help="the key the figures are recorded under")
    parser.add_argument("--calls", type=int, default=20, help="next-pair + judgement cycles counted")
    parser.add_argument("--cycles", type=int, default=500, help="sequential cycles timed for server CPU")
    parser.add_argument("--py-spy", help="path of a py-spy binary: also record where the server's CPU goes")
    parser.add_argument(
        "--postgres",
        default=os.environ.get(
            "DENSEALIGN_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument("--out", default=str(RESULTS / "requests.json"), help="where the JSON figures go")
    args = parser.parse_args(argv)
    url = scratch_database(args.postgres, "densealign_requests")
    try:
        with tempfile.TemporaryDirectory() as blob_dir:
            tokens = seed(url, blob_dir, users=2, pairs=args.calls + args.cycles + 100)
            figures = count_round_trips(url, blob_dir, tokens[0], args.calls)
            figures |= server_cpu(url, blob_dir, tokens[1], args.cycles, args.py_spy)
    finally:
        drop_database(args.postgres, url)
    figures |= {
        "machine": f"{os.cpu_count()} cores shared with other work (load average {os.getloadavg()[0]:.1f})",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out)
    recorded = json.loads(out.read_text()) if out.exists() else {}
    recorded[args.label] = figures
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(recorded, indent=2) + "\n")
    print(json.dumps({args.label: figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
