from __future__ import annotations

import random

import pytest
from sqlalchemy.orm import Session

from core.db.errors import PairInvalid, PolicyVersionExists
from core.db.models import PolicyVersion, Prompt
from core.db.pairs import create_pair, create_trajectory, required_judgements
from core.db.policies import get_current_policy, publish_policy_version, set_current_policy
from core.db.prompts import add_prompt, import_prompts


def test_agreement_share_gets_agreement_k() -> None:
    rng = random.Random(0)
    draws = [
        required_judgements(rng=rng, overlap_k=1, agreement_k=3, agreement_share=0.25) for _ in range(4000)
    ]
    assert set(draws) == {1, 3}
    assert 900 < draws.count(3) < 1100
    assert {
        required_judgements(rng=rng, overlap_k=2, agreement_k=3, agreement_share=0.0) for _ in range(50)
    } == {2}


def test_pair_needs_one_prompt_and_one_version(
    session: Session, policy_version: PolicyVersion, prompt: Prompt
) -> None:
    other = add_prompt(session=session, text="a different prompt")
    a = create_trajectory(session=session, prompt_id=prompt.id, policy_version=0, seed=1, image_key="i/a")
    b = create_trajectory(session=session, prompt_id=other.id, policy_version=0, seed=2, image_key="i/b")
    with pytest.raises(PairInvalid, match=f"trajectories {a.id} \\(prompt {prompt.id}, version 0\\)"):
        create_pair(session=session, trajectory_a_id=a.id, trajectory_b_id=b.id)
    with pytest.raises(PairInvalid, match="given twice"):
        create_pair(session=session, trajectory_a_id=a.id, trajectory_b_id=a.id)


def test_versions_are_immutable_and_current_can_roll_back(
    session: Session, policy_version: PolicyVersion
) -> None:
    publish_policy_version(session=session, version=1, parent_version=0, lora_key="p/1", lora_sha256="a" * 64)
    assert get_current_policy(session=session).version == 1
    with pytest.raises(PolicyVersionExists, match="policy version 1 already exists"):
        publish_policy_version(
            session=session, version=1, parent_version=0, lora_key="p/x", lora_sha256="b" * 64
        )
    with pytest.raises(ValueError, match="policy version 2 needs lora_key and lora_sha256"):
        publish_policy_version(session=session, version=2, parent_version=1)
    set_current_policy(session=session, version=0)
    assert get_current_policy(session=session).version == 0


def test_import_skips_duplicates_and_blank_lines(session: Session) -> None:
    add_prompt(session=session, text="a blue bird")
    added = import_prompts(
        session=session, lines=["a blue bird", "", "  a  red bird ", "a red bird"], split="eval"
    )
    assert [(p.text, p.split) for p in added] == [("a red bird", "eval")]
    with pytest.raises(ValueError, match="line 2: prompt text has 2001 characters"):
        import_prompts(session=session, lines=["fine", "x" * 2001])
