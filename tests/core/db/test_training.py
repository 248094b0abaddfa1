from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy.orm import Session

from core.db.assignment import next_pair
from core.db.errors import InvalidInput
from core.db.judgements import record_judgement
from core.db.models import Labeller, Pair
from core.db.policies import publish_policy_version
from core.db.training import (
    finish_training_round,
    majority,
    preference_pairs,
    start_training_round,
    trajectory_keys,
)


@pytest.mark.parametrize(
    ("choices", "expected"),
    [
        (["a"], "a"),
        (["a", "b", "b"], "b"),
        (["a", "b"], None),
        (["a", "tie", "tie"], "tie"),
        (["skip", "skip"], None),
        (["skip", "a"], "a"),
    ],
)
def test_majority(choices: list[str], expected: str | None) -> None:
    assert majority(choices) == expected


def _judge(session: Session, who: Labeller, pair: Pair, choice: str) -> None:
    got = next_pair(session=session, labeller_id=who.id, lease_seconds=60, exclude=[])
    assert got is not None and got.pair.id == pair.id
    record_judgement(
        session=session, labeller_id=who.id, pair_id=pair.id, choice=choice, client_key=f"{who.id}-{pair.id}"
    )


def test_preference_pairs_aggregate_by_majority(
    session: Session, make_labeller: Callable[..., tuple[Labeller, str]], make_pair: Callable[..., Pair]
) -> None:
    people = [make_labeller()[0] for _ in range(3)]
    decisive = make_pair(required=3)
    for who, choice in zip(people, ["b", "b", "a"], strict=True):
        _judge(session, who, decisive, choice)
    tied = make_pair(required=1)
    _judge(session, people[0], tied, "tie")
    partial = make_pair(required=3)
    _judge(session, people[0], partial, "a")
    got = preference_pairs(session=session)
    assert [(p.pair_id, p.winner_trajectory_id, p.loser_trajectory_id, p.votes) for p in got] == [
        (decisive.id, decisive.trajectory_b_id, decisive.trajectory_a_id, 3)
    ]
    with_partial = preference_pairs(session=session, complete_only=False)
    assert [p.pair_id for p in with_partial] == [decisive.id, partial.id]
    assert preference_pairs(session=session, versions=[1]) == []
    assert preference_pairs(session=session, after_pair_id=decisive.id) == []


def test_training_round_lifecycle(session: Session, policy_version: object) -> None:
    row = start_training_round(session=session, base_version=0)
    with pytest.raises(InvalidInput, match="names no produced_version"):
        finish_training_round(session=session, round_id=row.id, status="done")
    publish_policy_version(session=session, version=1, parent_version=0, lora_key="p/1", lora_sha256="c" * 64)
    done = finish_training_round(
        session=session,
        round_id=row.id,
        status="done",
        produced_version=1,
        pairs_used=4,
        metrics={"loss": 0.6},
    )
    assert (done.status, done.produced_version, done.pairs_used, done.metrics) == (
        "done",
        1,
        4,
        {"loss": 0.6},
    )
    assert done.finished_at is not None


def test_trajectory_keys(session: Session, pair: Pair) -> None:
    rows = trajectory_keys(session=session, trajectory_ids=[pair.trajectory_a_id, pair.trajectory_b_id])
    assert set(rows) == {pair.trajectory_a_id, pair.trajectory_b_id}
    assert all(row.image_key.startswith("images/") for row in rows.values())
