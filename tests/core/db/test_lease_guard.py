"""The database, not the candidate scan, keeps a live lease its holder's: a second labeller whose scan
still saw the pair as free (as a concurrent request does) cannot take it over. Deterministic: the
stale scan is played by handing `next_pair` the leased pair as its only candidate, no threads."""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db import assignment
from core.db.assignment import lease_for, next_pair
from core.db.base import utcnow
from core.db.models import Labeller, Lease, Pair


def lease_row(session: Session, pair_id: int) -> tuple[int, str, dt.datetime]:
    lease = session.scalars(select(Lease).where(Lease.pair_id == pair_id)).one()
    session.refresh(lease)
    return lease.labeller_id, lease.left_side, lease.expires_at


def test_a_live_lease_cannot_be_claimed_by_another_labeller(
    session: Session, make_labeller: Callable[..., tuple[Labeller, str]], make_pair: Callable[..., Pair]
) -> None:
    pair = make_pair(required=3)
    first, second = make_labeller()[0], make_labeller()[0]
    now = utcnow()
    got = next_pair(session=session, labeller_id=first.id, lease_seconds=60, rng=random.Random(0), now=now)
    assert got is not None and got.pair.id == pair.id
    held = lease_row(session, pair.id)
    assert held[0] == first.id
    # The claim itself refuses, a second later and a second before expiry...
    for at in (now + dt.timedelta(seconds=1), now + dt.timedelta(seconds=59)):
        expires = at + dt.timedelta(seconds=60)
        assert not assignment._claim(session, pair.id, second.id, "b", expires, at)
        assert lease_row(session, pair.id) == held
    # ...and once the lease has expired, the same claim succeeds.
    later = now + dt.timedelta(seconds=61)
    assert assignment._claim(session, pair.id, second.id, "a", later + dt.timedelta(seconds=60), later)
    assert lease_row(session, pair.id)[:2] == (second.id, "a")
    assert lease_for(session=session, pair_id=pair.id, labeller_id=first.id) is None


def test_next_pair_with_a_stale_scan_gives_nothing_rather_than_a_leased_pair(
    session: Session,
    make_labeller: Callable[..., tuple[Labeller, str]],
    make_pair: Callable[..., Pair],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pair = make_pair(required=3)
    first, second = make_labeller()[0], make_labeller()[0]
    got = next_pair(session=session, labeller_id=first.id, lease_seconds=60)
    assert got is not None and got.pair.id == pair.id
    held = lease_row(session, pair.id)

    def stale_scan(
        session: Session, labeller_id: int, now: dt.datetime, tried: set[int], kind: str = "train"
    ) -> list[int]:
        return [] if pair.id in tried else [pair.id]  # the scan ran before the first lease was written

    monkeypatch.setattr(assignment, "_candidates", stale_scan)
    assert next_pair(session=session, labeller_id=second.id, lease_seconds=60) is None
    assert lease_row(session, pair.id) == held
    # The holder asking again gets the same pair back on the same side (its own lease).
    again = next_pair(session=session, labeller_id=first.id, lease_seconds=60)
    assert again is not None and (again.pair.id, again.left_side) == (pair.id, held[1])
