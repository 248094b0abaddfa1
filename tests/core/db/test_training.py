from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy.orm import Session

from core.db.assignment import next_pair
from core.db.errors import InvalidInput
from core.db.judgements import record_judgement
from core.db.models import Labeller, Pair, Prompt
from core.db.pairs import create_pair, create_trajectory
from core.db.policies import publish_policy_version
from core.db.sampler_groups import SAMPLER_FIELDS, GroupCount, SamplerGroup, configured_sampler
from core.db.training import (
    finish_training_round,
    fresh_pair_groups,
    fresh_preference_pairs,
    majority,
    preference_pairs,
    record_round_pairs,
    round_preference_pairs,
    start_training_round,
)
from core.settings import SamplerConfig


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


# -- grouping by sampler settings --------------------------------------------------------------

_seeds = itertools.count(1)


def decided_pair(
    session: Session,
    who: Labeller,
    prompt: Prompt,
    sampler_a: dict[str, Any],
    sampler_b: dict[str, Any] | None = None,
    choice: str = "a",
) -> Pair:
    """A pair whose trajectories recorded these sampler settings, judged `choice` by `who` (required 1).

    Judged at once, so it is the only open pair `next_pair` can hand out."""
    a, b = (
        create_trajectory(
            session=session,
            prompt_id=prompt.id,
            policy_version=0,
            seed=(seed := next(_seeds)),
            image_key=f"images/{seed}.png",
            sampler=record,
        )
        for record in (sampler_a, sampler_b if sampler_b is not None else sampler_a)
    )
    pair = create_pair(session=session, trajectory_a_id=a.id, trajectory_b_id=b.id, required=1)
    _judge(session, who, pair, choice)
    return pair


def test_sampler_fields_are_those_of_sampler_settings_and_match_what_the_worker_records() -> None:
    from core.diffusion.sampler import SamplerSettings

    assert {f.name: f.default for f in dataclasses.fields(SamplerSettings)} == SAMPLER_FIELDS
    # worker/main.py build_sampler: SamplerSettings(num_steps, guidance_scale, eta, height=width=image_size)
    config = SamplerConfig(num_steps=20, guidance_scale=5.0, eta=0.5, image_size=64)
    recorded = SamplerSettings(num_steps=20, guidance_scale=5.0, eta=0.5, height=64, width=64).to_dict()
    assert configured_sampler(config) == recorded
    assert configured_sampler(SamplerConfig()) == SamplerSettings().to_dict()


def test_fresh_pairs_keep_to_the_current_sampler_settings_and_count_the_other_groups(
    session: Session, policy_version: object, prompt: Prompt, labeller: Labeller
) -> None:
    current = configured_sampler(SamplerConfig(num_steps=20))  # what workers are configured with now
    worker_20 = SAMPLER_FIELDS | {"num_steps": 20}  # a record that names no base model
    new_20 = worker_20 | {"base_model": "sd-model", "scheduler": {"class_name": "DDIMScheduler"}}
    other_model = worker_20 | {"base_model": "another-model"}
    at_50 = dict(SAMPLER_FIELDS)
    legacy_50 = {"num_steps": 50, "guidance_scale": 7.5, "eta": 1.0, "height": None, "width": None}

    # the same settings drawn from another base model, before the newest pairs (from sd-model)
    elsewhere = decided_pair(session, labeller, prompt, other_model)
    same = [decided_pair(session, labeller, prompt, worker_20) for _ in range(2)]
    same.append(decided_pair(session, labeller, prompt, new_20, choice="b"))  # extra keys are ignored
    # other settings: 50 steps (one record written before negative_prompt/reduction existed)
    old = [decided_pair(session, labeller, prompt, r) for r in (at_50, at_50, legacy_50)]
    mixed = decided_pair(session, labeller, prompt, worker_20, at_50)  # its trajectories disagree
    decided_pair(session, labeller, prompt, worker_20, choice="tie")  # no decision: not counted
    used = decided_pair(session, labeller, prompt, worker_20)
    taken = start_training_round(session=session, base_version=0)
    record_round_pairs(
        session=session,
        round_id=taken.id,
        pairs=[p for p in preference_pairs(session=session) if p.pair_id == used.id],
    )

    got = fresh_preference_pairs(session=session, min_version=0, sampler=current)
    assert [p.pair_id for p in got] == [p.id for p in same]
    assert got[2].winner_trajectory_id == same[2].trajectory_b_id
    everything = fresh_preference_pairs(session=session, min_version=0)
    assert [p.pair_id for p in everything] == [p.id for p in [elsewhere, *same, *old, mixed]]
    assert fresh_preference_pairs(session=session, min_version=1, sampler=current) == []

    groups = fresh_pair_groups(session=session, min_version=0, sampler=current)
    assert groups.usable == got
    g20, g50 = SamplerGroup.of(worker_20), SamplerGroup.of(at_50)
    # the configured settings name no base model: the newest one recorded at them (sd-model) is taken
    assert groups.target == dataclasses.replace(g20, base_model="sd-model")
    assert groups.counts == [
        GroupCount(g20, 2, True),
        GroupCount(dataclasses.replace(g20, base_model="sd-model"), 1, True),
        GroupCount(g50, 3, False),
        GroupCount(dataclasses.replace(g20, base_model="another-model"), 1, False),
        GroupCount(None, 1, False),
    ]
    assert groups.other_settings_pairs == 5
    assert groups.explain(32) == (
        "3 decided pairs at the current settings (steps 20, guidance 7.5, eta 1.0, native size, sd-model), "
        "need 32; 5 more at other settings are not used (steps 50, guidance 7.5, eta 1.0, native size: 3; "
        "steps 20, guidance 7.5, eta 1.0, native size, another-model: 1; "
        "trajectories sampled with different settings: 1)"
    )
    assert "native size, sd-model), enough for a round (needs 3); 5 more" in groups.explain(3)

    # Without configured settings, the newest pair's group is trained on.
    newest = fresh_pair_groups(session=session, min_version=0, sampler=None)
    assert newest.target == g50
    assert [p.pair_id for p in newest.usable] == [p.id for p in old]
    assert newest.explain(32).startswith("3 decided pairs at the newest pairs' settings (steps 50, ")

    # A round's recorded pairs carry their group too (the trainer checks them before resuming).
    assert [p.sampler for p in round_preference_pairs(session=session, round_id=taken.id)] == [g20]


def test_no_pairs_yet_explains_itself(session: Session, policy_version: object) -> None:
    groups = fresh_pair_groups(session=session, min_version=0, sampler=None)
    assert (groups.target, groups.usable, groups.counts) == (None, [], [])
    assert groups.explain(32) == "no decided pairs waiting, need 32"


def test_finishing_a_round_keeps_the_metrics_recorded_at_its_start(
    session: Session, policy_version: object
) -> None:
    row = start_training_round(session=session, base_version=0, metrics={"other_settings_pairs": 4})
    failed = finish_training_round(session=session, round_id=row.id, status="failed", metrics={"failed": "x"})
    assert failed.metrics == {"other_settings_pairs": 4, "failed": "x"}
