"""DENSEALIGN_DPO__LABEL_WEIGHTING=reliability against the real database: labellers vote through the
lease path, gold pairs measure them, and a round's pairs get the winner and loss weight the ability
model gives (a known contrarian's lone vote is turned round, at the weight hand-computed from the
fitted abilities); the weights are what the round reads back."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, cast

import pytest
from sqlalchemy.orm import Session

from core.db import make_engine, make_session_factory
from core.db.assignment import next_pair
from core.db.judgements import record_judgement
from core.db.labellers import create_labeller
from core.db.models import Labeller, Pair
from core.db.pairs import create_pair, create_trajectory, mark_gold
from core.db.policies import publish_policy_version
from core.db.prompts import add_prompt
from core.db.training import (
    preference_pairs,
    record_round_pairs,
    round_preference_pairs,
    start_training_round,
    weigh_by_reliability,
)
from core.reliability import PRIOR_A, PRIOR_B
from core.settings import Settings
from core.storage import LocalBlobStore
from trainer.rounds import Trainer


def vote(session: Session, labeller: Labeller, choose: Callable[[Pair], str]) -> int:
    """Lease and judge every pair the labeller is served; returns how many."""
    done = 0
    while (assignment := next_pair(session=session, labeller_id=labeller.id, lease_seconds=60)) is not None:
        record_judgement(
            session=session,
            labeller_id=labeller.id,
            pair_id=assignment.pair.id,
            choice=choose(assignment.pair),
            client_key=uuid.uuid4().hex,
        )
        done += 1
    return done


def test_reliability_weighting_turns_a_contrarians_vote_round(
    session: Session, make_pair: Callable[..., Pair], make_labeller: Callable[..., tuple[Labeller, str]]
) -> None:
    gold = [make_pair(required=2) for _ in range(10)]
    for pair in gold:
        mark_gold(session=session, pair_id=pair.id, answer="a")
    good, contrarian = make_labeller("good")[0], make_labeller("contrarian")[0]
    assert vote(session, contrarian, lambda p: "b") == 10  # wrong on every gold pair
    lone_contrarian = make_pair()
    assert vote(session, contrarian, lambda p: "a") == 1
    assert vote(session, good, lambda p: "a") == 10  # right on every gold pair
    lone_good = make_pair()
    assert vote(session, good, lambda p: "a") == 1

    # the plain majority: the two lone pairs, side a winning (gold pairs are 1-1 draws)
    decided = {p.pair_id: p for p in preference_pairs(session=session)}
    assert set(decided) == {lone_contrarian.id, lone_good.id}
    assert all(
        p.winner_trajectory_id == session.get_one(Pair, p.pair_id).trajectory_a_id for p in decided.values()
    )

    weighed = {p.pair_id: p for p in weigh_by_reliability(session=session, pairs=list(decided.values()))}
    # abilities, as the posterior mode under Beta(2, 1) of gold-scored votes: 0/10 and 10/10 right
    # (the lone votes are not informative); the good one is capped at 0.99
    p_contrarian = (0 + PRIOR_A - 1) / (10 + PRIOR_A + PRIOR_B - 2)
    p_good = 0.99
    turned = weighed[lone_contrarian.id]
    assert turned.winner_trajectory_id == lone_contrarian.trajectory_b_id
    assert turned.loser_trajectory_id == lone_contrarian.trajectory_a_id
    assert turned.weight == pytest.approx(1 - 2 * p_contrarian)
    kept = weighed[lone_good.id]
    assert kept.winner_trajectory_id == lone_good.trajectory_a_id and kept.weight == pytest.approx(
        2 * p_good - 1
    )

    # what the round records is what it reads back
    round_ = start_training_round(session=session, base_version=0)
    record_round_pairs(session=session, round_id=round_.id, pairs=list(weighed.values()))
    back = {p.pair_id: p for p in round_preference_pairs(session=session, round_id=round_.id)}
    assert back[lone_contrarian.id].weight == pytest.approx(turned.weight)
    assert back[lone_contrarian.id].winner_trajectory_id == lone_contrarian.trajectory_b_id
    assert back[lone_good.id].weight == pytest.approx(kept.weight)


def test_the_trainer_refreshes_stored_abilities_on_its_period(loop_settings: Settings) -> None:
    """`Trainer.refresh_abilities` (called at every check of `run_once`) refits and stores abilities
    once per `reliability.refresh_seconds`, in its own transaction on the deployment's database."""
    sessions = make_session_factory(make_engine(loop_settings.database_url))
    with sessions() as session, session.begin():
        publish_policy_version(session=session, version=0)
        prompt = add_prompt(session=session, text="a red circle").id
        pair_ids = []
        for i in range(6):
            a, b = (
                create_trajectory(
                    session=session,
                    prompt_id=prompt,
                    policy_version=0,
                    seed=2 * i + k,
                    image_key=f"i/{i}/{k}",
                )
                for k in (0, 1)
            )
            pair = create_pair(session=session, trajectory_a_id=a.id, trajectory_b_id=b.id, required=2)
            mark_gold(session=session, pair_id=pair.id, answer="a")
            pair_ids.append(pair.id)
        labeller = create_labeller(session=session, name="measured").labeller
        assert vote(session, labeller, lambda p: "a" if p.id != pair_ids[0] else "b") == 6
        labeller_id = labeller.id
    trainer = Trainer(
        policy=cast(Any, None),  # refreshing abilities touches only the database
        sessions=sessions,
        blobs=LocalBlobStore(loop_settings.blob_dir),
        config=loop_settings.dpo,
        reliability_refresh_seconds=60.0,
    )
    assert trainer.refresh_abilities(now=1000.0) == 1
    with sessions() as session:
        row = session.get_one(Labeller, labeller_id)
        # 5 of 6 gold answers right: (5 + 1) / (6 + 1) under the Beta(2, 1) prior
        assert row.ability == pytest.approx(6 / 7) and row.ability_votes == 6
    assert trainer.refresh_abilities(now=1059.0) is None  # not due yet
    assert trainer.refresh_abilities(now=1060.0) == 1
    assert Trainer(
        policy=cast(Any, None), sessions=sessions, blobs=LocalBlobStore(loop_settings.blob_dir),
        config=loop_settings.dpo,
    ).refresh_abilities() is None  # fmt: skip
