"""The database, not the candidate scan, keeps a live lease its holder's: a second labeller whose scan
still saw the pair as free (as a concurrent request does) cannot take it over.

Played with two real connections: the pair's expired lease row is taken over by the holder but not
yet committed, so the second labeller's next-pair statement still sees the pair as free, picks it and
blocks in its upsert on that row; the holder then commits. The upsert's guard must refuse a live
lease and take over an expired one. (Taking over a row, rather than inserting one, leaves the pair's
row unlocked, as a committed claim does; an insert would key-share lock it and the scan would skip it.)
"""

from __future__ import annotations

import datetime as dt
import threading
import time

import pytest
from sqlalchemy import select, text, update

from core.db.assignment import Assignment, next_pair
from core.db.base import utcnow
from core.db.models import Lease
from tests.core.db.conftest import Committed


def _wait_for_a_lock_wait(factory: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    with factory() as watcher:  # type: ignore[operator]
        while True:
            waiting = watcher.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
                )
            )
            watcher.rollback()
            if waiting:
                return
            assert time.monotonic() < deadline, "the second claim never waited on the holder's lease row"
            time.sleep(0.02)


@pytest.mark.parametrize("holder_lease_live", [True, False])
def test_a_claim_racing_an_uncommitted_lease_respects_it_only_while_it_is_live(
    engine_committed: Committed, holder_lease_live: bool
) -> None:
    factory, labellers, pairs = engine_committed
    target, others = pairs[0], pairs[1:]
    holder, second = labellers[:2]
    expires = utcnow() + dt.timedelta(seconds=60 if holder_lease_live else -1)
    got: list[Assignment | None] = []

    def claim() -> None:
        with factory() as session:
            got.append(next_pair(session=session, labeller_id=second, lease_seconds=60, exclude=others))
            session.commit()

    with factory() as setup:
        setup.add(
            Lease(
                pair_id=target,
                labeller_id=labellers[2],
                shown_left="b",
                expires_at=utcnow() - dt.timedelta(seconds=5),
            )
        )
        setup.commit()
    with factory() as holding:
        holding.execute(
            update(Lease)
            .where(Lease.pair_id == target)
            .values(labeller_id=holder, shown_left="a", expires_at=expires)
        )  # uncommitted: the other statement's snapshot still sees the expired lease
        claimer = threading.Thread(target=claim)
        claimer.start()
        _wait_for_a_lock_wait(factory)
        holding.commit()
    claimer.join(timeout=30)
    assert len(got) == 1
    with factory() as session:
        lease = session.scalars(select(Lease).where(Lease.pair_id == target)).one()
    if holder_lease_live:
        assert got[0] is None  # the only candidate was taken: nothing, rather than a leased pair
        assert (lease.labeller_id, lease.shown_left, lease.expires_at) == (holder, "a", expires)
    else:
        assert got[0] is not None and got[0].pair.id == target
        assert lease.labeller_id == second


def test_the_holder_asking_again_gets_the_same_pair_on_the_same_side(engine_committed: Committed) -> None:
    factory, labellers, _ = engine_committed
    with factory() as session:
        first = next_pair(session=session, labeller_id=labellers[0], lease_seconds=60)
        session.commit()
        again = next_pair(session=session, labeller_id=labellers[0], lease_seconds=60)
        session.commit()
        other = next_pair(session=session, labeller_id=labellers[1], lease_seconds=60)
    assert first is not None and again is not None and other is not None
    assert (again.pair.id, again.shown_left) == (first.pair.id, first.shown_left)
    assert again.expires_at >= first.expires_at
    assert other.pair.id != first.pair.id
