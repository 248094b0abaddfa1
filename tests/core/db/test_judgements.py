from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from core.db.assignment import next_pair
from core.db.base import utcnow
from core.db.errors import (
    AlreadyJudged,
    ClientKeyReused,
    PairComplete,
    PairNotFound,
    PairNotLeased,
    UndoBlocked,
    UndoWindowPassed,
)
from core.db.judgements import record_judgement, undo_judgement
from core.db.models import Judgement, Labeller, Lease, Pair
from tests.core.db.conftest import Committed


def _count(session: Session) -> int:
    return int(session.scalar(select(func.count(Judgement.id))) or 0)


def _stored_counts(session: Session) -> dict[int, int]:
    """pair id -> judgement_count as stored; asserted equal to the judgements actually there."""
    stored = dict(session.execute(select(Pair.id, Pair.judgement_count)).tuples().all())
    actual = dict(
        session.execute(select(Judgement.pair_id, func.count()).group_by(Judgement.pair_id)).tuples().all()
    )
    assert stored == {pair_id: actual.get(pair_id, 0) for pair_id in stored}
    return stored


def test_pair_judgement_count_follows_record_repeat_refusal_and_undo(
    session: Session, make_labeller: Callable[..., tuple[Labeller, str]], make_pair: Callable[..., Pair]
) -> None:
    """The stored count is what the next-pair lease filters on: it must move with every row."""
    pair = make_pair(required=2)
    first, second = make_labeller()[0], make_labeller()[0]
    assert next_pair(session=session, labeller_id=first.id, lease_seconds=60) is not None
    done = record_judgement(
        session=session, labeller_id=first.id, pair_id=pair.id, choice="a", client_key="f"
    )
    assert pair.judgement_count == 1 and _stored_counts(session)[pair.id] == 1
    record_judgement(session=session, labeller_id=first.id, pair_id=pair.id, choice="a", client_key="f")
    with pytest.raises(AlreadyJudged):
        record_judgement(session=session, labeller_id=first.id, pair_id=pair.id, choice="b", client_key="g")
    assert _stored_counts(session)[pair.id] == 1
    undo_judgement(
        session=session,
        labeller_id=first.id,
        judgement_id=done.judgement.id,
        window_seconds=15,
        lease_seconds=60,
    )
    assert pair.judgement_count == 0 and _stored_counts(session)[pair.id] == 0
    record_judgement(session=session, labeller_id=first.id, pair_id=pair.id, choice="b", client_key="f2")
    assert next_pair(session=session, labeller_id=second.id, lease_seconds=60) is not None
    record_judgement(session=session, labeller_id=second.id, pair_id=pair.id, choice="a", client_key="s")
    assert _stored_counts(session)[pair.id] == 2
    # complete: the pair leaves the pool for a third labeller
    assert next_pair(session=session, labeller_id=make_labeller()[0].id, lease_seconds=60) is None


def test_records_choice_and_shown_side_and_releases_lease(
    session: Session, labeller: Labeller, pair: Pair
) -> None:
    got = next_pair(session=session, labeller_id=labeller.id, lease_seconds=60)
    assert got is not None
    done = record_judgement(
        session=session, labeller_id=labeller.id, pair_id=pair.id, choice="b", client_key="k1", decide_ms=812
    )
    assert done.created
    row = session.get_one(Judgement, done.judgement.id)
    assert (row.choice, row.shown_left, row.decide_ms) == ("b", got.shown_left, 812)
    assert session.scalar(select(Lease).where(Lease.pair_id == pair.id)) is None


def test_repeat_with_same_client_key_records_once(session: Session, labeller: Labeller, pair: Pair) -> None:
    next_pair(session=session, labeller_id=labeller.id, lease_seconds=60)
    first = record_judgement(
        session=session, labeller_id=labeller.id, pair_id=pair.id, choice="a", client_key="same"
    )
    again = record_judgement(
        session=session, labeller_id=labeller.id, pair_id=pair.id, choice="a", client_key="same"
    )
    assert first.created and not again.created
    assert again.judgement.id == first.judgement.id and _count(session) == 1


def test_client_key_reused_for_another_choice_is_refused(
    session: Session, labeller: Labeller, pair: Pair
) -> None:
    next_pair(session=session, labeller_id=labeller.id, lease_seconds=60)
    record_judgement(session=session, labeller_id=labeller.id, pair_id=pair.id, choice="a", client_key="k")
    with pytest.raises(ClientKeyReused, match="'k'"):
        record_judgement(
            session=session, labeller_id=labeller.id, pair_id=pair.id, choice="b", client_key="k"
        )
    with pytest.raises(AlreadyJudged, match=f"pair {pair.id}"):
        record_judgement(
            session=session, labeller_id=labeller.id, pair_id=pair.id, choice="b", client_key="k2"
        )
    assert _count(session) == 1


def test_bad_inputs_write_nothing(
    session: Session, make_labeller: Callable[..., tuple[Labeller, str]], pair: Pair
) -> None:
    holder, other = make_labeller()[0], make_labeller()[0]
    next_pair(session=session, labeller_id=holder.id, lease_seconds=60)
    with pytest.raises(PairNotFound, match="pair 999999"):
        record_judgement(session=session, labeller_id=holder.id, pair_id=999999, choice="a", client_key="x1")
    with pytest.raises(PairNotLeased, match=f"pair {pair.id} is not leased to labeller {other.id}"):
        record_judgement(session=session, labeller_id=other.id, pair_id=pair.id, choice="a", client_key="x2")
    with pytest.raises(ValueError, match="'left' is not one of a, b, tie, skip"):
        record_judgement(
            session=session, labeller_id=holder.id, pair_id=pair.id, choice="left", client_key="x3"
        )
    assert _count(session) == 0


def test_undo_within_window_gives_pair_back_with_same_side(
    session: Session, labeller: Labeller, pair: Pair
) -> None:
    got = next_pair(session=session, labeller_id=labeller.id, lease_seconds=60)
    assert got is not None
    done = record_judgement(
        session=session, labeller_id=labeller.id, pair_id=pair.id, choice="a", client_key="u"
    )
    back = undo_judgement(
        session=session,
        labeller_id=labeller.id,
        judgement_id=done.judgement.id,
        window_seconds=15,
        lease_seconds=60,
    )
    assert back.pair.id == pair.id and back.shown_left == got.shown_left and _count(session) == 0
    redo = record_judgement(
        session=session, labeller_id=labeller.id, pair_id=pair.id, choice="b", client_key="u2"
    )
    assert redo.created and redo.judgement.choice == "b"


def test_undo_after_window_is_refused(session: Session, labeller: Labeller, pair: Pair) -> None:
    next_pair(session=session, labeller_id=labeller.id, lease_seconds=60)
    done = record_judgement(
        session=session, labeller_id=labeller.id, pair_id=pair.id, choice="a", client_key="u"
    )
    with pytest.raises(UndoWindowPassed, match="15 s"):
        undo_judgement(
            session=session,
            labeller_id=labeller.id,
            judgement_id=done.judgement.id,
            window_seconds=15,
            lease_seconds=60,
            now=utcnow() + dt.timedelta(seconds=16),
        )
    assert _count(session) == 1


def test_undo_does_not_steal_a_live_lease(
    session: Session, make_labeller: Callable[..., tuple[Labeller, str]], make_pair: Callable[..., Pair]
) -> None:
    pair = make_pair(required=3)
    first, second = make_labeller()[0], make_labeller()[0]
    next_pair(session=session, labeller_id=first.id, lease_seconds=60)
    done = record_judgement(
        session=session, labeller_id=first.id, pair_id=pair.id, choice="a", client_key="f"
    )
    assert next_pair(session=session, labeller_id=second.id, lease_seconds=60) is not None
    with pytest.raises(UndoBlocked):
        undo_judgement(
            session=session,
            labeller_id=first.id,
            judgement_id=done.judgement.id,
            window_seconds=15,
            lease_seconds=60,
        )
    assert _count(session) == 1


def test_judgement_past_a_pairs_required_count_is_refused_and_not_stored(
    session: Session, make_labeller: Callable[..., tuple[Labeller, str]], make_pair: Callable[..., Pair]
) -> None:
    """A lease that ran out can be taken over just as its old holder's judgement commits, leaving the
    new holder a lease on a pair that is already complete: their judgement must not be stored."""
    pair = make_pair(required=1)
    first, second = make_labeller()[0], make_labeller()[0]
    next_pair(session=session, labeller_id=first.id, lease_seconds=60)
    record_judgement(session=session, labeller_id=first.id, pair_id=pair.id, choice="a", client_key="f")
    # what the takeover leaves behind when it lands after the first judgement's commit
    session.add(
        Lease(pair_id=pair.id, labeller_id=second.id, shown_left="b", expires_at=utcnow() + dt.timedelta(60))
    )
    session.flush()
    with pytest.raises(PairComplete, match=f"pair {pair.id} already has all the judgements it needs"):
        record_judgement(session=session, labeller_id=second.id, pair_id=pair.id, choice="b", client_key="s")
    assert _count(session) == 1 and _stored_counts(session)[pair.id] == 1
    assert session.scalar(select(Judgement).where(Judgement.client_key == "s")) is None


def _judge_racing(
    factory: Callable[[], Session],
    barrier: threading.Barrier,
    outcomes: list[str],
    pair_id: int,
    who: int,
    lease_first: bool,
) -> None:
    """Post a judgement of `pair_id` (after asking for a pair when `lease_first`); note what came of it."""
    barrier.wait()
    with factory() as session:
        try:
            if lease_first:
                assignment = next_pair(session=session, labeller_id=who, lease_seconds=60)
                session.commit()
                if assignment is None:
                    outcomes.append("no pair")
                    return
            record_judgement(
                session=session, labeller_id=who, pair_id=pair_id, choice="a", client_key=f"{who}-{pair_id}"
            )
            session.commit()
            outcomes.append("stored")
        except (PairComplete, PairNotLeased) as refusal:
            session.rollback()
            outcomes.append(type(refusal).__name__)


def test_racing_for_a_pairs_last_place_stores_one_judgement(engine_committed: Committed) -> None:
    """The old holder of an expired lease posts while another labeller is handed the same pair and
    posts too, released together; repeated over 10 pairs wanting one judgement each. Never two."""
    factory, labeller_ids, pair_ids = engine_committed
    with factory() as session:
        session.execute(update(Pair).values(required_judgements=1, judgement_count=1))
        session.commit()
    old, new = labeller_ids[0], labeller_ids[1]
    for pair_id in pair_ids[:10]:
        with factory() as session:  # only this pair is open; its lease has just run out
            session.execute(update(Pair).where(Pair.id == pair_id).values(judgement_count=0))
            got = next_pair(
                session=session, labeller_id=old, lease_seconds=1, now=utcnow() - dt.timedelta(seconds=5)
            )
            assert got is not None and got.pair.id == pair_id
            session.commit()
        barrier = threading.Barrier(2)
        outcomes: list[str] = []
        threads = [
            threading.Thread(target=_judge_racing, args=(factory, barrier, outcomes, pair_id, old, False)),
            threading.Thread(target=_judge_racing, args=(factory, barrier, outcomes, pair_id, new, True)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert outcomes.count("stored") == 1, outcomes
        with factory() as session:
            rows = session.scalar(
                select(func.count()).select_from(Judgement).where(Judgement.pair_id == pair_id)
            )
            assert rows == 1 and session.get_one(Pair, pair_id).judgement_count == 1


def _post_at_once(
    factory: Callable[[], Session], who: int, pair_id: int, key: str, threads: int = 8
) -> tuple[list[tuple[int, bool]], list[BaseException]]:
    """Post one judgement from `threads` threads released together; (judgement id, created) each."""
    barrier = threading.Barrier(threads)
    outcomes: list[tuple[int, bool]] = []
    errors: list[BaseException] = []

    def post() -> None:
        try:
            barrier.wait()
            with factory() as session:
                done = record_judgement(
                    session=session, labeller_id=who, pair_id=pair_id, choice="a", client_key=key
                )
                session.commit()
                outcomes.append((done.judgement.id, done.created))
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=post) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    return outcomes, errors


def test_concurrent_identical_posts_record_one_judgement(engine_committed: Committed) -> None:
    """Eight threads retry the same judgement at once (same client key): one row, one id for all.

    Repeated for six labellers, since a race shows up only in some interleavings.
    """
    factory, labeller_ids, _ = engine_committed
    for number, who in enumerate(labeller_ids[:6]):
        with factory() as session:
            got = next_pair(session=session, labeller_id=who, lease_seconds=60)
            assert got is not None
            session.commit()
        outcomes, errors = _post_at_once(factory, who, got.pair.id, f"retry-key-{number}")
        assert not errors
        assert len({judgement_id for judgement_id, _ in outcomes}) == 1
        assert sum(created for _, created in outcomes) == 1 and len(outcomes) == 8
        with factory() as session:
            assert _count(session) == number + 1
            assert sum(_stored_counts(session).values()) == number + 1
