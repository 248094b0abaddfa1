"""Profile the next-pair lease (`core.db.assignment.next_pair`) at a large pool.

Seeds a scratch Postgres database (bench/common.py) with --pairs pairs (two trajectories each) over
--versions policy versions and --prompts prompts, oldest version first; --judgements judgements on
the oldest pairs, spread over --labellers labellers (every 10th pair wants 3 judgements, so some
judged pairs stay open, as agreement pairs do); live leases held by half the labellers and as many
expired ones. Then VACUUM ANALYZE, as autovacuum would have done on a running deployment.

It captures the SQL that one next_pair call sends (every statement, with its parameters), prints
EXPLAIN (ANALYZE, BUFFERS) of the slowest one and a one-line summary of each, and times --calls
calls of next_pair for labellers without a lease in turn, each call in its own transaction that is
rolled back, so every call sees the same pool. Figures go to --out under --label (a run with another
label, e.g. another pool size or after a schema change, is recorded beside the earlier ones).

Then, on the same data, it times the app's candidate statement (which reads the pairs' stored
`judgement_count` through the partial index `ix_pairs_open`) against the statement the app sent
before that column existed (commit 832bd65: a judgement count per pair in a correlated subquery),
each over --sql-calls executions of the bare statement, and records both plans.

Usage: python bench/next_pair_query.py [--pairs 100000] [--judgements 20000] [--calls 200]
    [--label pool-100000-pairs] [--out bench/results/next_pair_query.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))  # after the repo root: bench/core.py must not shadow core/

from common import drop_database, scratch_database  # noqa: E402
from sqlalchemy import Engine, event, text  # noqa: E402

from core.db import make_engine, make_session_factory  # noqa: E402
from core.db.assignment import next_pair  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def seed(engine: Engine, *, pairs: int, judgements: int, versions: int, prompts: int, labellers: int) -> None:
    """Bulk rows with generate_series: pair k (1..pairs) has trajectories 2k-1 and 2k."""
    p = {
        "pairs": pairs,
        "judgements": judgements,
        "versions": versions,
        "prompts": prompts,
        "labellers": labellers,
    }
    statements = [
        """INSERT INTO policy_versions (version, parent_version, lora_key, lora_sha256, metrics, created_at)
           SELECT v, NULLIF(v - 1, -1), CASE WHEN v > 0 THEN 'policies/v' || v || '/a.safetensors' END,
                  CASE WHEN v > 0 THEN repeat('a', 64) END, '{}', now()
           FROM generate_series(0, :versions - 1) v""",
        "INSERT INTO current_policy (id, version, updated_at) VALUES (1, :versions - 1, now())",
        """INSERT INTO prompts (text, split, active, created_at)
           SELECT 'prompt ' || i, 'train', true, now() FROM generate_series(1, :prompts) i""",
        """INSERT INTO labellers (name, role, active, created_at)
           SELECT 'bench-' || i, 'annotator', true, now() FROM generate_series(1, :labellers) i""",
        # trajectory t belongs to pair (t + 1) / 2, whose version grows with its id
        """INSERT INTO trajectories (prompt_id, policy_version, seed, sampler, image_key, created_at)
           SELECT ((t + 1) / 2) % :prompts + 1, ((t + 1) / 2 - 1) * :versions / :pairs, t, '{}',
                  'images/' || t || '.png', now()
           FROM generate_series(1, 2 * :pairs) t""",
        """INSERT INTO pairs (prompt_id, policy_version, trajectory_a_id, trajectory_b_id, required_judgements,
                              created_at)
           SELECT k % :prompts + 1, (k - 1) * :versions / :pairs, 2 * k - 1, 2 * k,
                  CASE WHEN k % 10 = 0 THEN 3 ELSE 1 END, now()
           FROM generate_series(1, :pairs) k""",
        """INSERT INTO judgements (pair_id, labeller_id, choice, shown_left, decide_ms, client_key, created_at)
           SELECT j, j % :labellers + 1, 'a', 'a', 1000, md5(j::text), now() FROM generate_series(1, :judgements) j""",
        # what core.db.judgements keeps as it records judgements
        """UPDATE pairs SET judgement_count = c.n
           FROM (SELECT pair_id, count(*) AS n FROM judgements GROUP BY pair_id) AS c WHERE c.pair_id = pairs.id""",
        # the second half of the labellers each hold a live lease on one of the newest pairs ...
        """INSERT INTO leases (pair_id, labeller_id, shown_left, expires_at)
           SELECT :pairs - i, i, 'a', now() + interval '2 minutes'
           FROM generate_series(:labellers / 2 + 1, :labellers) i""",
        # ... and as many leases have expired
        """INSERT INTO leases (pair_id, labeller_id, shown_left, expires_at)
           SELECT :pairs - :labellers - i, i, 'b', now() - interval '1 minute'
           FROM generate_series(:labellers / 2 + 1, :labellers) i""",
    ]
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement), p)
        count = conn.execute(text("SELECT count(*), min(id), max(id) FROM trajectories")).one()
        assert tuple(count) == (2 * pairs, 1, 2 * pairs), f"trajectory ids are not 1..{2 * pairs}: {count}"
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))


def capture_statements(engine: Engine, labeller_id: int) -> list[tuple[str, Any]]:
    """The SQL (and parameters) one next_pair call sends, its transaction rolled back."""
    seen: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        with make_session_factory(engine)() as session:
            next_pair(session=session, labeller_id=labeller_id, lease_seconds=120, rng=random.Random(0))
            session.rollback()
    finally:
        event.remove(engine, "before_cursor_execute", record)
    return seen


def walk(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [node] + [n for child in node.get("Plans", []) for n in walk(child)]


def explain(engine: Engine, statement: str, parameters: Any) -> dict[str, Any]:
    """EXPLAIN (ANALYZE, BUFFERS) of one statement in a transaction that is rolled back."""
    with engine.connect() as conn:
        trans = conn.begin()
        try:
            [[plan]] = conn.exec_driver_sql(
                "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement, parameters
            ).all()
            lines = [
                row[0]
                for row in conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters).all()
            ]
        finally:
            trans.rollback()
    top = plan[0]
    nodes = walk(top["Plan"])
    return {
        "sql": " ".join(statement.split())[:300],
        "execution_ms": top["Execution Time"],
        "planning_ms": top["Planning Time"],
        "seq_scans": sorted({n["Relation Name"] for n in nodes if n["Node Type"] == "Seq Scan"}),
        "index_scans": sorted(
            {
                f"{n['Relation Name']} ({n['Index Name']})"
                for n in nodes
                if "Index Name" in n and "Relation Name" in n
            }
        ),
        "shared_buffers_hit": top["Plan"].get("Shared Hit Blocks", 0),
        "shared_buffers_read": top["Plan"].get("Shared Read Blocks", 0),
        "plan": lines,
    }


# The candidate statement as the app sent it before pairs carried judgement_count (commit 832bd65).
BEFORE_QUERY = """
SELECT pairs.id FROM pairs JOIN prompts ON prompts.id = pairs.prompt_id
WHERE prompts.active IS true
  AND (SELECT count(judgements.id) FROM judgements WHERE judgements.pair_id = pairs.id) < pairs.required_judgements
  AND NOT EXISTS (SELECT 1 FROM leases WHERE leases.pair_id = pairs.id AND leases.expires_at > now())
  AND NOT EXISTS (SELECT 1 FROM judgements
                  WHERE judgements.pair_id = pairs.id AND judgements.labeller_id = %(labeller_id)s)
ORDER BY pairs.policy_version DESC,
         (SELECT count(judgements.id) FROM judgements WHERE judgements.pair_id = pairs.id) DESC, pairs.id
LIMIT 1 FOR UPDATE OF pairs SKIP LOCKED
"""


def time_sql(
    engine: Engine, statement: str, parameters: Any, calls: int, setup: str | None = None
) -> list[float]:
    """Milliseconds per execution of one statement, each in a transaction that is rolled back."""
    timings = []
    with engine.connect() as conn:
        for _ in range(calls):
            trans = conn.begin()
            if setup:
                conn.exec_driver_sql(setup)
            started = time.perf_counter()
            conn.exec_driver_sql(statement, parameters).all()
            timings.append(1000 * (time.perf_counter() - started))
            trans.rollback()
    return timings


def before_and_after(
    engine: Engine, candidates: tuple[str, Any], labeller_id: int, calls: int
) -> dict[str, Any]:
    """The app's candidate statement now, and the one it sent before the count column, same data."""
    statement, parameters = candidates
    now = time_sql(engine, statement, parameters, calls)
    params = {"labeller_id": labeller_id}
    before = time_sql(engine, BEFORE_QUERY, params, calls)
    return {
        "sql_calls": calls,
        "candidates_ms": {"p50": percentile(now, 0.5), "p95": percentile(now, 0.95)},
        "before_count_column_ms": {"p50": percentile(before, 0.5), "p95": percentile(before, 0.95)},
        "before_plan": explain(engine, BEFORE_QUERY, params)["plan"],
    }


def time_calls(engine: Engine, labeller_ids: list[int], calls: int) -> list[float]:
    sessions = make_session_factory(engine)
    timings = []
    for i in range(calls):
        with sessions() as session:
            started = time.perf_counter()
            assignment = next_pair(
                session=session, labeller_id=labeller_ids[i % len(labeller_ids)], lease_seconds=120,
                rng=random.Random(i),
            )  # fmt: skip
            timings.append(1000 * (time.perf_counter() - started))
            assert assignment is not None, "the pool ran dry: seed more pairs than judgements"
            session.rollback()
    return timings


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--judgements", type=int, default=20_000)
    parser.add_argument("--versions", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--labellers", type=int, default=50)
    parser.add_argument("--calls", type=int, default=200, help="timed next_pair calls")
    parser.add_argument("--sql-calls", type=int, default=50, help="timed executions of each bare statement")
    parser.add_argument("--label", help="name of this run in the results file (default: pool-<N>-pairs)")
    parser.add_argument(
        "--postgres",
        default=os.environ.get(
            "DENSEALIGN_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument(
        "--out", default=str(RESULTS / "next_pair_query.json"), help="where the JSON figures go"
    )
    args = parser.parse_args(argv)
    args.label = args.label or f"pool-{args.pairs}-pairs"
    url = scratch_database(args.postgres, "densealign_nextpair")
    engine = make_engine(url)
    try:
        started = time.perf_counter()
        seed(engine, pairs=args.pairs, judgements=args.judgements, versions=args.versions,
             prompts=args.prompts, labellers=args.labellers)  # fmt: skip
        print(
            f"seeded {args.pairs} pairs, {args.judgements} judgements in {time.perf_counter() - started:.1f}s"
        )
        free_labellers = list(range(1, args.labellers // 2 + 1))  # the first half hold no lease
        captured = capture_statements(engine, free_labellers[0])
        statements = [explain(engine, sql, params) for sql, params in captured]
        slowest = max(statements, key=lambda s: s["execution_ms"])
        for s in statements:
            print(f"{s['execution_ms']:9.2f} ms  seq scans {s['seq_scans'] or '-'}  {s['sql'][:90]}")
        print("\nslowest statement's plan:\n" + "\n".join(slowest["plan"]))
        time_calls(engine, free_labellers, 5)  # warm the pool and caches
        timings = time_calls(engine, free_labellers, args.calls)
        candidates = next(c for c in captured if "FROM pairs JOIN prompts" in c[0])
        compared = before_and_after(engine, candidates, free_labellers[0], args.sql_calls)
        print("\nthe candidate statement before the count column:\n" + "\n".join(compared["before_plan"]))
    finally:
        engine.dispose()
        drop_database(args.postgres, url)
    run = {
        "pairs": args.pairs, "judgements": args.judgements, "versions": args.versions, "prompts": args.prompts,
        "labellers": args.labellers, "calls": args.calls,
        "next_pair_ms": {"p50": percentile(timings, 0.5), "p95": percentile(timings, 0.95),
                         "max": max(timings)},
        "statements": [{k: v for k, v in s.items() if k != "plan"} for s in statements],
        "slowest_plan": slowest["plan"],
        "candidates_before_and_after": compared,
        "machine": f"{os.cpu_count()} cores, Postgres on the same machine",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {"benchmark": "next_pair_query", "runs": {}}
    results["runs"][args.label] = run
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nnext_pair over {args.calls} calls: p50 {run['next_pair_ms']['p50']:.1f} ms, "
          f"p95 {run['next_pair_ms']['p95']:.1f} ms  -> {out} [{args.label}]")  # fmt: skip
    for name in ("candidates_ms", "before_count_column_ms"):
        print(f"{name}: p50 {compared[name]['p50']:.2f} ms, p95 {compared[name]['p95']:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
