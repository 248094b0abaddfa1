"""The embedded default runs on SQLite: the same queries, on a file migrated with Alembic."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from core.db.assignment import next_pair
from core.db.dataset import iter_judged_pairs
from core.db.engine import make_engine, make_session_factory
from core.db.errors import PairNotLeased
from core.db.judgements import record_judgement, undo_judgement
from core.db.labellers import create_labeller
from core.db.pairs import create_pair, create_trajectory
from core.db.policies import publish_policy_version
from core.db.prompts import add_prompt
from core.db.stats import labeller_progress, labeller_stats, queue_depth
from tests.conftest import migrate


def test_labelling_flow_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'embedded.db'}"
    migrate(url)
    engine = make_engine(url)
    try:
        with make_session_factory(engine)() as session:
            _flow(session)
    finally:
        engine.dispose()


def _flow(session: Session) -> None:
    publish_policy_version(session=session, version=0)
    prompt = add_prompt(session=session, text="an owl")
    pair_ids = []
    for i in range(2):
        a = create_trajectory(
            session=session, prompt_id=prompt.id, policy_version=0, seed=2 * i, image_key="x/a"
        )
        b = create_trajectory(
            session=session, prompt_id=prompt.id, policy_version=0, seed=2 * i + 1, image_key="x/b"
        )
        pair_ids.append(create_pair(session=session, trajectory_a_id=a.id, trajectory_b_id=b.id).id)
    ann, bob = (create_labeller(session=session, name=n).labeller for n in ("ann", "bob"))
    session.commit()
    rng = random.Random(0)
    first = next_pair(session=session, labeller_id=ann.id, lease_seconds=60, rng=rng)
    second = next_pair(session=session, labeller_id=bob.id, lease_seconds=60, rng=rng)
    assert first is not None and second is not None
    assert {first.pair.id, second.pair.id} == set(pair_ids)
    assert queue_depth(session=session) == 0
    with pytest.raises(PairNotLeased):
        record_judgement(
            session=session, labeller_id=ann.id, pair_id=second.pair.id, choice="a", client_key="k0"
        )
    done = record_judgement(
        session=session, labeller_id=ann.id, pair_id=first.pair.id, choice="b", client_key="k1"
    )
    again = record_judgement(
        session=session, labeller_id=ann.id, pair_id=first.pair.id, choice="b", client_key="k1"
    )
    assert done.created and not again.created and again.judgement.id == done.judgement.id
    back = undo_judgement(
        session=session,
        labeller_id=ann.id,
        judgement_id=done.judgement.id,
        window_seconds=10,
        lease_seconds=60,
    )
    assert back.pair.id == first.pair.id and back.shown_left == first.shown_left
    record_judgement(session=session, labeller_id=ann.id, pair_id=first.pair.id, choice="a", client_key="k2")
    session.commit()
    assert labeller_progress(session=session, labeller_id=ann.id).total == 1
    rows = list(iter_judged_pairs(session=session))
    assert [(r["pair_id"], r["choice"], r["shown_left"]) for r in rows] == [
        (first.pair.id, "a", first.shown_left)
    ]
    stats = {s.name: s.judgements for s in labeller_stats(session=session)}
    assert stats == {"ann": 1, "bob": 0}
