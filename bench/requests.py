"""Database round trips of one next-pair and one judgement request, counted on the wire.

Seeds a scratch Postgres database (bench/common.py, the seed of bench/load.py), serves the real app
in this process on an ordinary pooled engine (make_engine) and has libpq trace every protocol
message of every pooled connection (psycopg's `PGconn.trace`). A round trip is a message the client
sends and then waits on the server for: a simple `Query` (BEGIN, COMMIT, ROLLBACK, the pool's
pre-ping ";") or the `Sync` closing an extended-protocol statement. It counts them for --calls
next-pair + judgement cycles after one warm-up cycle (so the statement caches and the app's token
cache are warm, as they are for an annotator who is working), lists what each round trip was, and
with --profile prints a cProfile breakdown of the server side of those requests (the test client
runs in the same thread, so its share shows up there too; bench/load.py measures server CPU apart).

Figures go to --out (default bench/results/requests.json) under --label, beside earlier labels.

Usage: python bench/requests.py [--label after] [--calls 20] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
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
from load import seed  # noqa: E402
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="after", help="the key the figures are recorded under")
    parser.add_argument("--calls", type=int, default=20, help="next-pair + judgement cycles counted")
    parser.add_argument("--profile", action="store_true", help="print a cProfile breakdown of the cycles")
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
            token = seed(url, blob_dir, users=1, pairs=args.calls + 10)[0]
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
            app = create_app(settings, session_factory=make_session_factory(engine))
            client = TestClient(app, headers={"Authorization": f"Bearer {token}"})

            def cycle() -> tuple[list[str], list[str]]:
                mark = wire.mark()
                got = client.get("/api/v1/pairs/next")
                assert got.status_code == 200 and got.json()["pair"] is not None, got.text
                next_trips = wire.round_trips(mark)
                mark = wire.mark()
                body = {
                    "pair_id": got.json()["pair"]["pair_id"],
                    "choice": "a",
                    "client_key": uuid.uuid4().hex,
                }
                judged = client.post("/api/v1/judgements", json=body)
                assert judged.status_code == 201, judged.text
                return next_trips, wire.round_trips(mark)

            cycle()  # warm-up: statement caches, the pool's connection, the token cache
            profiler = cProfile.Profile() if args.profile else None
            next_counts: list[int] = []
            judge_counts: list[int] = []
            kinds: dict[str, Counter[str]] = {"next_pair": Counter(), "judgement": Counter()}
            started = time.process_time()
            if profiler is not None:
                profiler.enable()
            for _ in range(args.calls):
                next_trips, judge_trips = cycle()
                next_counts.append(len(next_trips))
                judge_counts.append(len(judge_trips))
                kinds["next_pair"].update(label_of(t) for t in next_trips)
                kinds["judgement"].update(label_of(t) for t in judge_trips)
            if profiler is not None:
                profiler.disable()
            in_process_cpu = time.process_time() - started
            engine.dispose()
    finally:
        drop_database(args.postgres, url)
    figures = {
        "next_pair_round_trips": {"max": max(next_counts), "mean": sum(next_counts) / len(next_counts)},
        "judgement_round_trips": {"max": max(judge_counts), "mean": sum(judge_counts) / len(judge_counts)},
        "next_pair_round_trip_kinds_per_call": {k: v / args.calls for k, v in kinds["next_pair"].items()},
        "judgement_round_trip_kinds_per_call": {k: v / args.calls for k, v in kinds["judgement"].items()},
        "in_process_cpu_ms_per_request_incl_test_client": round(1000 * in_process_cpu / (2 * args.calls), 3),
        "calls": args.calls,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out)
    recorded = json.loads(out.read_text()) if out.exists() else {}
    recorded[args.label] = figures
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(recorded, indent=2) + "\n")
    print(json.dumps({args.label: figures}, indent=2))
    if profiler is not None:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(45)
        print(text.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
