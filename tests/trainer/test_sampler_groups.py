"""A sampler-settings change never stops the trainer: rounds train on the current settings' pairs only.

Pairs are sampled through the real worker path (`build_sampler`, RQ jobs) at 3 steps, then the
workers are restarted at 2 steps, as an operator changing DENSEALIGN_SAMPLER__NUM_STEPS would.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.main import create_app
from core.db import make_engine, make_session_factory
from core.db.models import Pair, PolicyVersion, TrainingRound, TrainingRoundPair, Trajectory
from core.db.policies import get_policy_version
from core.db.training import preference_pairs, record_round_pairs, start_training_round
from core.settings import SamplerConfig, Settings
from tests.worker.test_loop import label_everything, refill_and_work, seed_database
from trainer.main import build_trainer
from worker import sampling
from worker.main import build_sampler

pytestmark = pytest.mark.slow

AT_2 = "steps 2, guidance 7.5, eta 1.0, native size"  # the tiny model records no base model


def at_steps(settings: Settings, steps: int) -> Settings:
    return settings.model_copy(update={"sampler": SamplerConfig(num_steps=steps, guidance_scale=7.5)})


def sample_and_label(settings: Settings, redis: Any, token: str) -> list[int]:
    """Workers started with `settings` fill the pool; every new pair is judged. Returns their ids."""
    sessions = make_session_factory(make_engine(settings.database_url))
    with sessions() as session:
        before = set(session.scalars(select(Pair.id)))
    sampling.install(build_sampler(settings))
    assert refill_and_work(settings, redis) == 4
    assert label_everything(TestClient(create_app(settings)), token) == 4
    with sessions() as session:
        new = sorted(set(session.scalars(select(Pair.id))) - before)
        pairs = session.scalars(select(Pair).where(Pair.id.in_(new))).all()
        ids = [t for p in pairs for t in (p.trajectory_a_id, p.trajectory_b_id)]
        records = session.scalars(select(Trajectory.sampler).where(Trajectory.id.in_(ids))).all()
    assert len(new) == 4 and len(records) == 8
    assert {r["num_steps"] for r in records} == {settings.sampler.num_steps}
    return new


def rounds(settings: Settings) -> list[tuple[str, int | None, list[int], dict[str, Any]]]:
    """(status, produced version, recorded pair ids, metrics) of every round, oldest first."""
    with make_session_factory(make_engine(settings.database_url))() as session:
        return [
            (
                r.status,
                r.produced_version,
                sorted(
                    session.scalars(
                        select(TrainingRoundPair.pair_id).where(TrainingRoundPair.round_id == r.id)
                    )
                ),
                r.metrics,
            )
            for r in session.scalars(select(TrainingRound).order_by(TrainingRound.id))
        ]


def test_after_a_settings_change_the_trainer_trains_on_the_current_group_and_reports_the_rest(
    loop_settings: Settings, redis: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trainer.rounds")
    at3, at2 = loop_settings, at_steps(loop_settings, 2)
    token = seed_database(at3)
    old = sample_and_label(at3, redis, token)
    new = sample_and_label(at2, redis, token)

    trainer = build_trainer(at2)
    assert trainer.run_once() == 1
    [(status, version, pair_ids, metrics)] = rounds(at2)
    assert (status, version, pair_ids) == ("done", 1, new)
    assert metrics["other_settings_pairs"] == 4 and metrics["sampler_settings"] == AT_2
    assert metrics["pairs_used"] == 4 and metrics["optimizer_steps"] == 3
    assert len(metrics["abs_logratio_by_step"]) == 2  # trained with the 2-step schedule
    with make_session_factory(make_engine(at2.database_url))() as session:
        published = get_policy_version(session=session, version=1).metrics
    assert published["other_settings_pairs"] == 4 and published["sampler_settings"] == AT_2
    assert (
        f"round 1 on base version 0: 4 decided pairs at the current settings ({AT_2}), enough for a round "
        "(needs 3); 4 more at other settings are not used (steps 3, guidance 7.5, eta 1.0, native size: 4)"
    ) in caplog.messages

    # The 3-step pairs wait, said at every check, and never crash the trainer.
    caplog.clear()
    assert trainer.run_once() is None
    assert trainer.run_once() is None
    assert trainer.waiting_reason.startswith("0 decided pairs at the current settings")
    waiting = (
        f"waiting: 0 decided pairs at the current settings ({AT_2}), need 3; 4 more at other settings are "
        "not used (steps 3, guidance 7.5, eta 1.0, native size: 4)"
    )
    assert caplog.messages == [waiting, waiting]

    # Settings that match no group with enough pairs: the trainer waits instead of raising.
    assert build_trainer(at_steps(at3, 5)).run_once() is None

    # Back at 3 steps (still within max_version_lag of version 1): those pairs train now.
    assert build_trainer(at3).run_once() == 2
    (_, _, _, first), (status, version, pair_ids, metrics) = rounds(at3)
    assert (status, version, pair_ids, metrics["other_settings_pairs"]) == ("done", 2, old, 0)
    assert len(metrics["abs_logratio_by_step"]) == 3


def test_a_round_running_when_the_settings_change_resumes_on_its_own_pairs_and_settings(
    loop_settings: Settings, redis: Any
) -> None:
    at3, at2 = loop_settings, at_steps(loop_settings, 2)
    token = seed_database(at3)
    old = sample_and_label(at3, redis, token)
    stopped = build_trainer(at3)
    stopped.should_stop = lambda: True  # SIGTERM during the first optimizer step
    assert stopped.run_once() is None
    assert [r[:3] for r in rounds(at3)] == [("running", None, old)]

    new = sample_and_label(at2, redis, token)
    seen: list[int] = []
    trainer = build_trainer(at2, progress=lambda step, total: seen.append(step))
    assert trainer.run_once() == 1
    assert seen == [2, 3], "the round resumes after its checkpoint, with its own 3-step pairs"
    assert trainer.run_once() == 2
    (s1, v1, p1, m1), (s2, v2, p2, m2) = rounds(at2)
    assert (s1, v1, p1, len(m1["abs_logratio_by_step"])) == ("done", 1, old, 3)
    assert (s2, v2, p2, len(m2["abs_logratio_by_step"])) == ("done", 2, new, 2)
    assert m2["other_settings_pairs"] == 0


def test_a_running_round_that_mixed_settings_is_failed_and_its_pairs_train_by_group(
    loop_settings: Settings, redis: Any
) -> None:
    at3, at2 = loop_settings, at_steps(loop_settings, 2)
    token = seed_database(at3)
    old = sample_and_label(at3, redis, token)
    new = sample_and_label(at2, redis, token)
    # What a trainer before grouping by settings recorded: every decided pair in one round.
    sessions = make_session_factory(make_engine(at2.database_url))
    with sessions() as session, session.begin():
        mixed = start_training_round(session=session, base_version=0)
        record_round_pairs(session=session, round_id=mixed.id, pairs=preference_pairs(session=session))

    assert build_trainer(at2).run_once() == 1
    (s1, v1, p1, m1), (s2, v2, p2, m2) = rounds(at2)
    assert (s1, v1, p1) == ("failed", None, sorted(old + new))
    assert m1["failed"] == (
        "its pairs cannot train in one round (steps 3, guidance 7.5, eta 1.0, native size: 4; "
        "steps 2, guidance 7.5, eta 1.0, native size: 4)"
    )
    assert (s2, v2, p2, m2["other_settings_pairs"]) == ("done", 1, new, 4)
    with sessions() as session:
        assert session.scalar(select(PolicyVersion.version).order_by(PolicyVersion.version.desc())) == 1
