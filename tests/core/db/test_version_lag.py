"""The trainer's freshness rule: a round takes decided pairs sampled by versions at most
`max_version_lag` behind the current one, and never older ones.

`Trainer.run_once` picks and records the pairs; its training (`_train`) is replaced by a stand-in
that only notes the round, so this needs no model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.db.assignment import next_pair
from core.db.judgements import record_judgement
from core.db.models import Labeller, Pair, TrainingRound, TrainingRoundPair
from core.db.policies import publish_policy_version
from core.settings import DpoConfig
from trainer.rounds import Trainer


@pytest.fixture
def pairs_by_version(
    session: Session, labeller: Labeller, make_pair: Callable[..., Pair]
) -> dict[int, list[int]]:
    """Decided pairs from versions 0 (two), 1, 2 and 3 (one each); version 3 is current."""
    for v in (1, 2, 3):
        publish_policy_version(
            session=session,
            version=v,
            parent_version=v - 1,
            lora_key=f"policies/v{v}/x",
            lora_sha256="0" * 64,
        )
    made = {v: [make_pair(version=v).id for _ in range(2 if v == 0 else 1)] for v in range(4)}
    while (got := next_pair(session=session, labeller_id=labeller.id, lease_seconds=60)) is not None:
        record_judgement(
            session=session,
            labeller_id=labeller.id,
            pair_id=got.pair.id,
            choice="a",
            client_key=f"k{got.pair.id}",
        )
    return made


def run_once(session: Session, monkeypatch: pytest.MonkeyPatch, *, lag: int, min_new_pairs: int) -> Any:
    """`run_once` on the test's transaction; returns what it returned and the rounds it trained."""
    trained: list[tuple[int, int]] = []

    def train(self: Trainer, round_id: int, base_version: int) -> int:
        trained.append((round_id, base_version))
        return 7

    monkeypatch.setattr(Trainer, "_train", train)
    trainer = Trainer(
        policy=None,  # type: ignore[arg-type]
        sessions=sessionmaker(bind=session.connection(), join_transaction_mode="create_savepoint"),
        blobs=None,  # type: ignore[arg-type]
        config=DpoConfig(max_version_lag=lag, min_new_pairs=min_new_pairs),
    )
    return trainer.run_once(), trained


def recorded(session: Session) -> list[int]:
    return sorted(session.scalars(select(TrainingRoundPair.pair_id)))


@pytest.mark.parametrize(("lag", "versions"), [(2, [1, 2, 3]), (0, [3]), (3, [0, 1, 2, 3])])
def test_a_round_trains_only_on_pairs_within_max_version_lag(
    session: Session,
    pairs_by_version: dict[int, list[int]],
    monkeypatch: pytest.MonkeyPatch,
    lag: int,
    versions: list[int],
) -> None:
    result, trained = run_once(session, monkeypatch, lag=lag, min_new_pairs=1)
    [round_] = session.scalars(select(TrainingRound)).all()
    assert (result, trained) == (7, [(round_.id, 3)])
    assert recorded(session) == sorted(p for v in versions for p in pairs_by_version[v])


def test_pairs_beyond_the_lag_do_not_count_towards_min_new_pairs(
    session: Session, pairs_by_version: dict[int, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # 5 decided pairs in all, but only 3 within a lag of 2: no round yet.
    result, trained = run_once(session, monkeypatch, lag=2, min_new_pairs=4)
    assert (result, trained) == (None, [])
    assert session.scalars(select(TrainingRound)).all() == []
