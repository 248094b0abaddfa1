from __future__ import annotations

import datetime as dt
import random
import threading
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db.assignment import next_pair
from core.db.base import utcnow
from core.db.judgements import record_judgement
from core.db.models import Labeller, Lease, Pair
from core.db.policies import publish_policy_version
from tests.core.db.conftest import Committed


def test_gives_unjudged_pair_and_records_the_side_shown_left(
    session: Session, labeller: Labeller, pair: Pair
) -> None:
    got = next_pair(session=session, labeller_id=labeller.id, lease_seconds=60, rng=random.Random(0))
    assert got is not None and got.pair.id == pair.id
    lease = session.scalar(select(Lease).where(Lease.pair_id == pair.id))
    assert lease is not None and lease.labeller_id == labeller.id and lease.shown_left == got.shown_left


def test_the_side_shown_left_is_randomised_per_showing(
    session: Session, labeller: Labeller, make_pair: Callable[..., Pair]
) -> None:
    for _ in range(24):
        make_pair()
    rng = random.Random(1)
    sides = []
    while (got := next_pair(session=session, labeller_id=labeller.id, lease_seconds=60, rng=rng)) is not None:
        sides.append(got.shown_left)
        record_judgement(
            session=session,
            labeller_id=labeller.id,
            pair_id=got.pair.id,
            choice="a",
            client_key=f"k{got.pair.id}",
        )
    assert len(sides) == 24 and 4 < sides.count("a") < 20


def test_never_the_same_pair_twice(
    session: Session, make_labeller: Callable[..., tuple[Labeller, str]], make_pair: Callable[..., Pair]
) -> None:
    pairs = [make_pair(required=3) for _ in range(4)]
    who = make_labeller()[0]
    seen = []
    while (got := next_pair(session=session, labeller_id=who.id, lease_seconds=60)) is not None:
        seen.append(got.pair.id)
        record_judgement(
            session=session, labeller_id=who.id, pair_id=got.pair.id, choice="b", client_key=f"x{len(seen)}"
        )
    assert sorted(seen) == sorted(p.id for p in pairs)
    # Even after every lease expired, nothing judged comes back.
    later = utcnow() + dt.timedelta(hours=1)
    assert next_pair(session=session, labeller_id=who.id, lease_seconds=60, now=later) is None


def test_live_lease_blocks_others_until_it_expires(
    session: Session, make_labeller: Callable[..., tuple[Labeller, str]], make_pair: Callable[..., Pair]
) -> None:
    pair = make_pair(required=3)
    first, second = make_labeller()[0], make_labeller()[0]
    assert next_pair(session=session, labeller_id=first.id, lease_seconds=60) is not None
    assert next_pair(session=session, labeller_id=second.id, lease_seconds=60) is None
    later = utcnow() + dt.timedelta(seconds=61)
    got = next_pair(session=session, labeller_id=second.id, lease_seconds=60, now=later)
    assert got is not None and got.pair.id == pair.id


def test_reload_returns_held_lease_unless_excluded(
    session: Session, labeller: Labeller, make_pair: Callable[..., Pair]
) -> None:
    make_pair(), make_pair()
    first = next_pair(session=session, labeller_id=labeller.id, lease_seconds=60)
    again = next_pair(session=session, labeller_id=labeller.id, lease_seconds=60)
    assert first is not None and again is not None
    assert again.pair.id == first.pair.id and again.shown_left == first.shown_left
    other = next_pair(session=session, labeller_id=labeller.id, lease_seconds=60, exclude=[first.pair.id])
    assert other is not None and other.pair.id != first.pair.id


def test_prefers_newest_version_then_pairs_with_overlap_under_way(
    session: Session, make_labeller: Callable[..., tuple[Labeller, str]], make_pair: Callable[..., Pair]
) -> None:
    old = make_pair(version=0)
    publish_policy_version(session=session, version=1, parent_version=0, lora_key="l/1", lora_sha256="0" * 64)
    new_fresh = make_pair(version=1, required=3)
    new_started = make_pair(version=1, required=3)
    helper, who = make_labeller()[0], make_labeller()[0]
    got = next_pair(session=session, labeller_id=helper.id, lease_seconds=60, exclude=[new_fresh.id])
    assert got is not None and got.pair.id == new_started.id
    record_judgement(
        session=session, labeller_id=helper.id, pair_id=new_started.id, choice="a", client_key="h1"
    )
    order = []
    while (got := next_pair(session=session, labeller_id=who.id, lease_seconds=60)) is not None:
        order.append(got.pair.id)
        record_judgement(
            session=session, labeller_id=who.id, pair_id=got.pair.id, choice="a", client_key=f"w{got.pair.id}"
        )
    assert order == [new_started.id, new_fresh.id, old.id]


def test_fully_judged_pairs_and_inactive_prompts_leave_the_pool(
    session: Session, make_labeller: Callable[..., tuple[Labeller, str]], make_pair: Callable[..., Pair]
) -> None:
    pair = make_pair(required=1)
    first, second = make_labeller()[0], make_labeller()[0]
    got = next_pair(session=session, labeller_id=first.id, lease_seconds=60)
    assert got is not None
    record_judgement(session=session, labeller_id=first.id, pair_id=pair.id, choice="tie", client_key="t")
    assert next_pair(session=session, labeller_id=second.id, lease_seconds=60) is None
    other = make_pair(required=1)
    session.get_one(type(other), other.id)  # exists
    from core.db.prompts import update_prompt

    update_prompt(session=session, prompt_id=other.prompt_id, active=False)
    assert next_pair(session=session, labeller_id=second.id, lease_seconds=60) is None


def test_concurrent_requests_never_share_a_pair(engine_committed: Committed) -> None:
    """Eight labellers ask at once, each on its own connection: every pair is leased at most once."""
    factory, labeller_ids, pair_ids = engine_committed
    results: dict[int, list[int]] = {}
    barrier = threading.Barrier(len(labeller_ids))
    errors: list[BaseException] = []

    def work(labeller_id: int) -> None:
        try:
            got_ids: list[int] = []
            barrier.wait()
            for _ in range(3):
                with factory() as session:
                    got = next_pair(
                        session=session, labeller_id=labeller_id, lease_seconds=60, exclude=got_ids
                    )
                    session.commit()
                if got is not None:
                    got_ids.append(got.pair.id)
            results[labeller_id] = got_ids
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(lid,)) for lid in labeller_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    handed = [pid for ids in results.values() for pid in ids]
    assert len(handed) == len(set(handed)), "a pair was leased to two labellers at once"
    # 8 labellers x 3 requests = 24 asks for 20 pairs (required k = 3 each): all 20 get handed out.
    assert sorted(handed) == sorted(pair_ids)


SEED_POOL = [
    """INSERT INTO policy_versions (version, parent_version, lora_key, lora_sha256, metrics, created_at)
       SELECT v, NULLIF(v - 1, -1), CASE WHEN v > 0 THEN 'policies/v' || v END,
              CASE WHEN v > 0 THEN repeat('a', 64) END, '{}', now() FROM generate_series(0, 2) v""",
    "INSERT INTO prompts (text, split, active, created_at) VALUES ('a cat', 'train', true, now())",
    "INSERT INTO labellers (name, role, active, created_at) VALUES ('x', 'annotator', true, now())",
    """INSERT INTO trajectories (prompt_id, policy_version, seed, sampler, image_key, created_at)
       SELECT 1, ((t + 1) / 2 - 1) * 3 / :pairs, t, '{}', 'i/' || t, now() FROM generate_series(1, 2 * :pairs) t""",
    """INSERT INTO pairs (prompt_id, policy_version, trajectory_a_id, trajectory_b_id, required_judgements,
                          judgement_count, created_at)
       SELECT 1, (k - 1) * 3 / :pairs, 2 * k - 1, 2 * k, 1, CASE WHEN k % 3 = 0 THEN 1 ELSE 0 END, now()
       FROM generate_series(1, :pairs) k""",
]


def test_postgres_lease_reads_the_open_pairs_index() -> None:
    """On a pool of 30,000 pairs the candidate statement must walk `ix_pairs_open`, visiting a handful
    of rows, not every pair of the newest version (which cost 161 ms per lease at 100,000 pairs)."""
    from sqlalchemy import event, text

    from core.db.engine import make_engine, make_session_factory
    from tests.conftest import migrate, scratch_postgres_database

    with scratch_postgres_database() as url:
        migrate(url)
        engine = make_engine(url)
        try:
            with engine.begin() as conn:
                for statement in SEED_POOL:
                    conn.execute(text(statement), {"pairs": 30_000})
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("ANALYZE")
            seen: list[tuple[str, object]] = []
            event.listen(engine, "before_cursor_execute", lambda *a: seen.append((a[2], a[3])))
            with make_session_factory(engine)() as session:
                got = next_pair(session=session, labeller_id=1, lease_seconds=60)
                assert got is not None
                # newest version, and the newest open pair of it (every third pair is judged)
                assert (got.pair.policy_version, got.pair.id) == (2, 30_000 - 1)
                session.rollback()
            [(sql, params)] = [(s, p) for s, p in seen if "FROM pairs JOIN prompts" in s]
            with engine.connect() as conn:
                [[plan]] = conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params).all()  # type: ignore[arg-type]
        finally:
            engine.dispose()

    def walk(node: dict[str, object]) -> list[dict[str, object]]:
        return [node] + [n for child in node.get("Plans", []) for n in walk(child)]  # type: ignore[attr-defined]

    # The candidate walks ix_pairs_open; the chosen pair's row is then read once more by primary key.
    # (The evaluation-pair candidate is in the plan too, never executed: no campaign runs.)
    scans = [n for n in walk(plan[0]["Plan"]) if n.get("Relation Name") == "pairs" and n["Actual Loops"]]
    assert [n.get("Index Name") for n in scans] == ["ix_pairs_open", "pk_pairs"]
    assert scans[0]["Actual Rows"] <= 5  # type: ignore[operator]
    assert scans[1]["Actual Rows"] <= 1  # type: ignore[operator]
