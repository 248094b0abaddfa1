"""Load: N concurrent simulated annotators against the app served by uvicorn on real Postgres.

Seeds a scratch Postgres database with one prompt and enough pairs (each image a real PNG in a
temporary blob store), creates N labellers, starts `densealign serve --workers W` in a subprocess,
and runs N asyncio annotators for --duration seconds: GET /api/v1/pairs/next, a think time, then
POST /api/v1/judgements. Each annotator behaves as a client that keeps its idempotency key: a 503
is sent again, same body and client_key, after its Retry-After seconds, and a transport failure
(timeout, reset) after 0.5 s x the attempt, at most --retries times per call. It reports p50/p95/p99
latency of both calls (each HTTP attempt, and end to end including retries and their waits),
retries (by cause) apart from errors (calls that failed for good: a non-2xx other than a retried
503, or retries used up), judgements acknowledged (201, or 200 for a repeat the server already had)
vs stored in Postgres (must be equal), and whether any pair was ever handed to two annotators at
overlapping times or judged twice. It also reports the CPU time the server spent per request
(user + system time of the `densealign serve` process and its workers over the load, divided by the
HTTP requests answered) and, apart, the CPU time of this client process. Figures go to --out
(default bench/results/load.json).

Usage: python bench/load.py [--users 200] [--duration 300] [--workers 4] [--think 1.0] [--retries 5]
    [--out bench/results/load-200users-300s.json]
The client runs on the same machine as the server, so on a small machine it competes for CPU; it
speaks HTTP/1.1 itself over one keep-alive connection per annotator (`Http1`) because httpx's
AsyncClient spent about 7 ms of CPU per request, more than the server, and so set the latencies.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))  # after the repo root: bench/core.py must not shadow core/

import httpx  # noqa: E402
from common import drop_database, scratch_database  # noqa: E402
from PIL import Image  # noqa: E402
from sqlalchemy import func, insert, select  # noqa: E402

from core.db import make_engine, make_session_factory  # noqa: E402
from core.db.labellers import create_labeller  # noqa: E402
from core.db.models import Judgement, Pair, Trajectory  # noqa: E402
from core.db.policies import publish_policy_version  # noqa: E402
from core.db.prompts import add_prompt  # noqa: E402
from core.storage import LocalBlobStore  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def seed(url: str, blob_dir: str, users: int, pairs: int) -> list[str]:
    blobs = LocalBlobStore(blob_dir)
    for side, colour in (("a", (200, 40, 40)), ("b", (40, 40, 200))):
        png = io.BytesIO()
        Image.new("RGB", (64, 64), colour).save(png, format="PNG")
        blobs.put(f"images/load-{side}.png", png.getvalue())
    engine = make_engine(url)
    with make_session_factory(engine)() as session, session.begin():
        publish_policy_version(session=session, version=0)
        prompt_id = add_prompt(session=session, text="a red circle above a blue square").id
        tokens = [create_labeller(session=session, name=f"load-{i}").token for i in range(users)]
        traj = [
            {
                "prompt_id": prompt_id,
                "policy_version": 0,
                "seed": i,
                "sampler": {},
                "image_key": f"images/load-{'ab'[i % 2]}.png",
            }
            for i in range(2 * pairs)
        ]
        session.execute(insert(Trajectory), traj)
        ids = list(session.scalars(select(Trajectory.id).order_by(Trajectory.id)))
        session.execute(
            insert(Pair),
            [
                {"prompt_id": prompt_id, "policy_version": 0, "trajectory_a_id": ids[2 * i],
                 "trajectory_b_id": ids[2 * i + 1], "required_judgements": 1}
                for i in range(pairs)
            ],
        )  # fmt: skip
    engine.dispose()
    return tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TransportError(Exception):
    """The connection failed, closed or timed out before a whole response arrived."""


class Answer:
    def __init__(self, status_code: int, headers: dict[str, str], body: bytes) -> None:
        self.status_code, self.headers, self.body = status_code, headers, body

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


class Http1:
    """One annotator's keep-alive HTTP/1.1 connection: just what the app's JSON answers need."""

    def __init__(self, host: str, port: int, timeout: float = 60.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def request(
        self, method: str, path: str, headers: dict[str, str], json_body: Any = None, **_: Any
    ) -> Answer:
        try:
            return await asyncio.wait_for(self._exchange(method, path, headers, json_body), self.timeout)
        except (
            TimeoutError,
            OSError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ValueError,
            IndexError,
        ) as exc:
            await self.close()
            raise TransportError(f"{method} {path}: {type(exc).__name__}") from exc

    async def _exchange(self, method: str, path: str, headers: dict[str, str], json_body: Any) -> Answer:
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.streams
        body = b"" if json_body is None else json.dumps(json_body).encode()
        lines = [
            f"{method} {path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            f"Content-Length: {len(body)}",
        ]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if json_body is not None:
            lines.append("Content-Type: application/json")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        status = int((await reader.readuntil(b"\r\n")).split()[1])
        got: dict[str, str] = {}
        while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.decode("latin-1").partition(":")
            got[name.strip().lower()] = value.strip()
        if got.get("transfer-encoding") == "chunked":
            content = b""
            while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
                content += (await reader.readexactly(size + 2))[:-2]
            await reader.readuntil(b"\r\n")
        else:
            content = await reader.readexactly(int(got.get("content-length", "0")))
        if got.get("connection", "").lower() == "close":
            await self.close()
        return Answer(status, got, content)

    async def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def quantiles(values: list[float]) -> dict[str, float | None]:
    return {q: percentile(values, v) for q, v in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))}


async def call(
    client: Http1,
    method: str,
    path: str,
    stats: dict[str, Any],
    kind: str,
    retries: int,
    **kwargs: Any,
) -> Answer | None:
    """One call as a retrying client makes it; None when a transport failure outlasts the retries.

    A 503 is retried after its Retry-After and a transport failure after 0.5 s x the attempt, with
    the same request (so a judgement keeps its client_key); the answer that ends it is returned.
    """
    started = time.perf_counter()
    for attempt in range(retries + 1):
        t0 = time.perf_counter()
        try:
            response = await client.request(method, path, **kwargs)
        except TransportError:
            if attempt == retries:
                return None
            stats["retries"]["transport"] += 1
            await asyncio.sleep(0.5 * (attempt + 1))
            continue
        stats[f"{kind}_ms"].append(1000 * (time.perf_counter() - t0))
        if response.status_code != 503 or attempt == retries:
            stats[f"{kind}_total_ms"].append(1000 * (time.perf_counter() - started))
            return response
        stats["retries"]["503"] += 1
        await asyncio.sleep(float(response.headers.get("retry-after", "1")))
    raise AssertionError("unreachable: the last attempt returns")


async def annotator(
    client: Http1, token: str, deadline: float, think: float, retries: int, stats: dict[str, Any]
) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    rng = random.Random(token)
    while time.monotonic() < deadline:
        response = await call(client, "GET", "/api/v1/pairs/next", stats, "next", retries, headers=headers)
        if response is None or response.status_code != 200:
            stats["errors"] += 1
            stats["error_codes"][response.status_code if response is not None else "transport"] += 1
            continue
        pair = response.json()["pair"]
        if pair is None:
            stats["empty"] += 1
            await asyncio.sleep(think)
            continue
        got = time.monotonic()
        await asyncio.sleep(rng.uniform(0.5 * think, 1.5 * think))
        body = {"pair_id": pair["pair_id"], "choice": rng.choice("ab"), "client_key": uuid.uuid4().hex}
        response = await call(
            client, "POST", "/api/v1/judgements", stats, "judge", retries, headers=headers, json_body=body
        )
        if response is not None and response.status_code in (200, 201):
            stats["acknowledged"] += 1
            stats["acknowledged_as_repeat"] += response.status_code == 200
            stats["holds"][pair["pair_id"]].append((got, time.monotonic(), token))
        else:
            stats["errors"] += 1
            stats["error_codes"][response.status_code if response is not None else "transport"] += 1


async def run_load(
    base_url: str, tokens: list[str], duration: float, think: float, retries: int
) -> dict[str, Any]:
    stats: dict[str, Any] = {"next_ms": [], "judge_ms": [], "next_total_ms": [], "judge_total_ms": [],
                             "errors": 0, "acknowledged": 0, "acknowledged_as_repeat": 0, "empty": 0,
                             "retries": defaultdict(int), "error_codes": defaultdict(int),
                             "holds": defaultdict(list)}  # fmt: skip
    host, _, port = base_url.removeprefix("http://").partition(":")
    clients = [Http1(host, int(port)) for _ in tokens]
    deadline = time.monotonic() + duration
    await asyncio.gather(
        *(
            annotator(client, t, deadline, think, retries, stats)
            for client, t in zip(clients, tokens, strict=True)
        )
    )
    for client in clients:
        await client.close()
    return stats


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` and every live process under it (uvicorn's
    workers), read from /proc (Linux)."""
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            # Fields after the parenthesised command name; utime and stime are the 12th and 13th.
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:  # exited meanwhile
            continue
    return total


def wait_until_up(base_url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited with {proc.returncode} before answering")
        try:
            if httpx.get(f"{base_url}/api/v1/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the app did not answer /api/v1/health in time")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    parser.add_argument("--workers", type=int, default=4, help="uvicorn worker processes")
    parser.add_argument("--think", type=float, default=1.0, help="mean seconds an annotator looks at a pair")
    parser.add_argument(
        "--postgres",
        default=os.environ.get(
            "DENSEALIGN_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument(
        "--retries", type=int, default=5, help="retries per call after a 503 or transport failure"
    )
    parser.add_argument("--out", default=str(RESULTS / "load.json"), help="where the JSON figures go")
    args = parser.parse_args(argv)
    pairs = int(args.users * args.duration / max(args.think, 0.1) * 1.5) + 100
    url = scratch_database(args.postgres, "densealign_load")
    proc: subprocess.Popen[bytes] | None = None
    try:
        with tempfile.TemporaryDirectory() as blob_dir:
            print(f"seeding {pairs} pairs and {args.users} labellers", flush=True)
            tokens = seed(url, blob_dir, args.users, pairs)
            port = free_port()
            env = dict(os.environ, DENSEALIGN_DATABASE_URL=url, DENSEALIGN_BLOB_DIR=blob_dir,
                       DENSEALIGN_SECRET_KEY=uuid.uuid4().hex, DENSEALIGN_REDIS_URL="redis://127.0.0.1:6379/13")  # fmt: skip
            proc = subprocess.Popen(
                [sys.executable, "-m", "densealign.cli", "serve", "--port", str(port), "--workers", str(args.workers)],
                env=env, cwd=ROOT,
            )  # fmt: skip
            base_url = f"http://127.0.0.1:{port}"
            wait_until_up(base_url, proc)
            print(
                f"{args.users} annotators for {args.duration:.0f}s against {args.workers} workers", flush=True
            )
            server_cpu, client_cpu = tree_cpu_seconds(proc.pid), time.process_time()
            started = time.perf_counter()
            stats = asyncio.run(run_load(base_url, tokens, args.duration, args.think, args.retries))
            wall = time.perf_counter() - started
            server_cpu = tree_cpu_seconds(proc.pid) - server_cpu
            client_cpu = time.process_time() - client_cpu
            engine = make_engine(url)
            with make_session_factory(engine)() as session:
                stored = int(session.scalar(select(func.count(Judgement.id))) or 0)
                judged_twice = int(session.scalar(
                    select(func.count()).select_from(
                        select(Judgement.pair_id).group_by(Judgement.pair_id).having(func.count() > 1).subquery())
                ) or 0)  # fmt: skip
            engine.dispose()
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(30)
        drop_database(args.postgres, url)
    overlapping = 0
    for holds in stats["holds"].values():
        holds.sort()
        overlapping += sum(1 for a, b in zip(holds, holds[1:], strict=False) if b[0] < a[1] and a[2] != b[2])
    requests = len(stats["next_ms"]) + len(stats["judge_ms"])
    result = {
        "benchmark": "load",
        "users": args.users, "duration_s": round(wall, 1), "uvicorn_workers": args.workers, "think_s": args.think,
        "machine": f"{os.cpu_count()} cores, client and server on the same machine",
        "errors": stats["errors"], "error_codes": {str(k): v for k, v in stats["error_codes"].items()},
        "retries": dict(stats["retries"]), "max_retries_per_call": args.retries,
        "acknowledged": stats["acknowledged"], "acknowledged_as_repeat": stats["acknowledged_as_repeat"],
        "stored": stored,
        "pairs_judged_twice": judged_twice, "pairs_held_by_two_at_once": overlapping,
        "empty_pool_answers": stats["empty"],
        "next_pair_ms": quantiles(stats["next_ms"]),
        "judgement_ms": quantiles(stats["judge_ms"]),
        "next_pair_with_retries_ms": quantiles(stats["next_total_ms"]),
        "judgement_with_retries_ms": quantiles(stats["judge_total_ms"]),
        "requests": requests,
        "server_cpu_s": round(server_cpu, 2),
        "server_cpu_ms_per_request": round(1000 * server_cpu / max(requests, 1), 3),
        "client_cpu_s": round(client_cpu, 2),
        "client_cpu_ms_per_request": round(1000 * client_cpu / max(requests, 1), 3),
        "judgements_per_s": stats["acknowledged"] / wall,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    ok = (
        result["errors"] == 0
        and result["acknowledged"] == result["stored"]
        and not judged_twice
        and not overlapping
    )
    print(
        "OK: no errors, acknowledged == stored, no pair shared" if ok else "PROBLEMS: see the figures above"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
