"""The trainer with DENSEALIGN_RETENTION__DROP_TRAINED_LATENTS on, in the real loop: after each version it
deletes the latents of the pairs its round trained and nothing else; pairs at other sampler settings
keep theirs and train later.

Pairs are sampled through the real worker path at 3 steps, then at 2 (tests/trainer/test_sampler_groups.py).
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from core.db import make_engine, make_session_factory
from core.db.errors import LatentsPruned
from core.db.models import Pair, Trajectory
from core.db.training import round_preference_pairs
from core.settings import RetentionConfig, Settings
from core.storage import LocalBlobStore
from tests.trainer.test_sampler_groups import at_steps, rounds, sample_and_label
from tests.worker.test_loop import seed_database
from trainer.main import build_trainer

pytestmark = pytest.mark.slow


def with_retention(settings: Settings) -> Settings:
    return settings.model_copy(update={"retention": RetentionConfig(drop_trained_latents=True)})


def blobs_of(settings: Settings, pair_ids: list[int]) -> dict[str, tuple[str, bool]]:
    """latents key -> (image key, marked pruned) of every trajectory of `pair_ids`."""
    with make_session_factory(make_engine(settings.database_url))() as session:
        pairs = session.scalars(select(Pair).where(Pair.id.in_(pair_ids))).all()
        ids = [t for p in pairs for t in (p.trajectory_a_id, p.trajectory_b_id)]
        rows = session.scalars(select(Trajectory).where(Trajectory.id.in_(ids))).all()
        return {r.latents_key or "": (r.image_key, r.latents_pruned_at is not None) for r in rows}


def test_the_trainer_prunes_what_its_rounds_trained_and_keeps_what_waits(
    loop_settings: Settings, redis: Any
) -> None:
    at3, at2 = with_retention(loop_settings), with_retention(at_steps(loop_settings, 2))
    store = LocalBlobStore(at3.blob_dir)
    token = seed_database(at3)
    old = sample_and_label(at3, redis, token)
    new = sample_and_label(at2, redis, token)
    published: list[int] = []

    assert build_trainer(at2, on_publish=published.append).run_once() == 1
    assert published == [1], "the trainer's own callback still runs after the prune"
    trained, waiting = blobs_of(at2, new), blobs_of(at2, old)
    assert len(trained) == len(waiting) == 8
    assert all(marked and not store.exists(key) for key, (_, marked) in trained.items())
    assert all(not marked and store.exists(key) for key, (_, marked) in waiting.items())
    assert all(store.exists(image) for image, _ in [*trained.values(), *waiting.values()])

    # The 3-step pairs, left waiting with their latents, train when the settings come back.
    assert build_trainer(at3).run_once() == 2
    assert [r[:3] for r in rounds(at3)] == [("done", 1, new), ("done", 2, old)]
    assert all(marked and not store.exists(key) for key, (_, marked) in blobs_of(at3, old).items())
    session = make_session_factory(make_engine(at3.database_url))()
    with session, pytest.raises(LatentsPruned, match="were pruned at"):
        round_preference_pairs(session=session, round_id=1)
