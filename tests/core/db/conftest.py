"""A scratch database with committed rows, for tests whose threads need their own connections."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.orm import Session, sessionmaker

from core.db.engine import make_engine, make_session_factory
from core.db.labellers import create_labeller
from core.db.pairs import create_pair, create_trajectory
from core.db.policies import publish_policy_version
from core.db.prompts import add_prompt
from tests.conftest import migrate, scratch_postgres_database

Committed = tuple[sessionmaker[Session], list[int], list[int]]


@pytest.fixture
def engine_committed() -> Iterator[Committed]:
    """A scratch database with 8 labellers and 20 pairs committed (threads need to see them)."""
    with scratch_postgres_database() as url:
        migrate(url)
        engine = make_engine(url, pool_size=10)
        factory = make_session_factory(engine)
        with factory() as session:
            publish_policy_version(session=session, version=0)
            prompt = add_prompt(session=session, text="a cat")
            labellers = [create_labeller(session=session, name=f"c{i}").labeller.id for i in range(8)]
            pairs = []
            for i in range(20):
                a, b = (
                    create_trajectory(
                        session=session,
                        prompt_id=prompt.id,
                        policy_version=0,
                        seed=2 * i + j,
                        image_key=f"i/{i}{j}",
                    )
                    for j in range(2)
                )
                pairs.append(
                    create_pair(session=session, trajectory_a_id=a.id, trajectory_b_id=b.id, required=3).id
                )
            session.commit()
        try:
            yield factory, labellers, pairs
        finally:
            engine.dispose()
