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


def test_gives_unjudged_pair_and_records_left_side(session: Session, labeller: Labeller, pair: Pair) -> None:
    got = next_pair(session=session, labeller_id=labeller.id, lease_seconds=60, rng=random.Random(0))
    assert got is not None and got.pair.id == pair.id
    lease = session.scalar(select(Lease).where(Lease.pair_id == pair.id))
    assert lease is not None and lease.labeller_id == labeller.id and lease.left_side == got.left_side


def test_left_side_is_randomised_per_showing(
    session: Session, labeller: Labeller, make_pair: Callable[..., Pair]
) -> None:
    for _ in range(24):
        make_pair()
    rng = random.Random(1)
    sides = []
    while (got := next_pair(session=session, labeller_id=labeller.id, lease_seconds=60, rng=rng)) is not None:
        sides.append(got.left_side)
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
    assert again.pair.id == first.pair.id and again.left_side == first.left_side
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
