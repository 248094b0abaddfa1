"""The figures the demo logs and publishes with each version (trainer/judging.py `JudgeEvaluator`),
on hand-made judge scores, against a recomputation with the standard library: scores and accept rates
per part, and the paired gain over version 0 with its standard error.

Sampling is replaced by a stand-in that hands the judge (prompt, seed) tokens, so the cases' order,
their batching and the split into trained and held-out prompts are all checked.
"""

from __future__ import annotations

import math
import statistics
from types import SimpleNamespace
from typing import Any

import pytest

from core.diffusion.sampler import SamplerSettings
from trainer import judging
from trainer.judging import JudgeEvaluator

TRAIN, HELD_OUT, SEEDS = ["a red circle", "a blue square"], ["a green triangle"], [0, 1, 2]
# (prompt, seed) -> score, for version 0 and version 1.
V0 = {
    ("a red circle", 0): 0.2, ("a red circle", 1): 0.4, ("a red circle", 2): 0.6,
    ("a blue square", 0): 0.1, ("a blue square", 1): 0.3, ("a blue square", 2): 0.5,
    ("a green triangle", 0): 0.5, ("a green triangle", 1): 0.5, ("a green triangle", 2): 0.7,
}  # fmt: skip
V1 = {
    ("a red circle", 0): 0.3, ("a red circle", 1): 0.4, ("a red circle", 2): 0.9,
    ("a blue square", 0): 0.2, ("a blue square", 1): 0.2, ("a blue square", 2): 0.8,
    ("a green triangle", 0): 0.4, ("a green triangle", 1): 0.6, ("a green triangle", 2): 0.7,
}  # fmt: skip


class TableJudge:
    """Scores the stand-in images (which are their own (prompt, seed)) from a table."""

    def __init__(self) -> None:
        self.table: dict[tuple[str, int], float] = {}
        self.seen: list[tuple[str, int]] = []

    def score(self, prompt: str, image: tuple[str, int]) -> float:
        assert image[0] == prompt, "an image was scored against another case's prompt"
        self.seen.append(image)
        return self.table[image]


@pytest.fixture
def judge(monkeypatch: pytest.MonkeyPatch) -> TableJudge:
    table_judge = TableJudge()
    batches: list[int] = []

    def sample(pipe: Any, prompts: list[str], seeds: list[int], settings: Any) -> Any:
        batches.append(len(prompts))
        return SimpleNamespace(pil_images=lambda: list(zip(prompts, seeds, strict=True)))

    monkeypatch.setattr(judging, "sample_trajectories", sample)
    monkeypatch.setattr(judging, "make_judge", lambda name: table_judge)
    table_judge.batches = batches  # type: ignore[attr-defined]
    return table_judge


def mean_and_se(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def test_scores_and_paired_gains_over_version_0_are_what_the_scores_give(judge: TableJudge) -> None:
    evaluator = JudgeEvaluator(
        judge="table",
        prompts=TRAIN,
        seeds=SEEDS,
        settings=SamplerSettings(num_steps=2),
        batch=4,
        held_out=HELD_OUT,
    )
    policy: Any = SimpleNamespace(pipe=None)
    cases = [(p, s) for p in TRAIN + HELD_OUT for s in SEEDS]
    train_cases, held_cases = cases[:6], cases[6:]

    judge.table = V0
    v0 = evaluator(policy)
    assert judge.seen == cases and judge.batches == [4, 4, 1]  # type: ignore[attr-defined]
    assert v0["judge_scores"] == [V0[c] for c in cases] and v0["eval_samples"] == 9
    assert v0["judge_score"] == pytest.approx(statistics.fmean(V0.values()))
    assert v0["judge_score_train"] == pytest.approx(statistics.fmean(V0[c] for c in train_cases))
    assert v0["judge_score_held_out"] == pytest.approx(statistics.fmean(V0[c] for c in held_cases))
    # no accept rule: a score of at least 0.5 accepts (0.6, 0.5, 0.5, 0.5, 0.7)
    assert v0["judge_accept"] == pytest.approx(5 / 9)
    assert "judge_gain_train" not in v0

    evaluator.baseline = v0["judge_scores"]
    judge.table = V1
    v1 = evaluator(policy)
    for part, part_cases in (("train", train_cases), ("held_out", held_cases)):
        gain, se = mean_and_se([V1[c] - V0[c] for c in part_cases])
        assert v1[f"judge_gain_{part}"] == pytest.approx(gain, abs=6e-6), part
        assert v1[f"judge_gain_{part}_se"] == pytest.approx(se, abs=6e-6), part
    # train: differences 0.1, 0, 0.3, 0.1, -0.1, 0.3: mean 0.7 / 6, and it is positive (version 1 is better)
    assert v1["judge_gain_train"] == pytest.approx(0.7 / 6, abs=6e-6)
    assert v1["judge_gain_held_out"] == pytest.approx(0.0, abs=6e-6)
    # the gain is the difference of the parts' means (same cases on both sides)
    assert v1["judge_gain_train"] == pytest.approx(
        v1["judge_score_train"] - v0["judge_score_train"], abs=1e-5
    )


def test_a_baseline_of_other_cases_is_refused(judge: TableJudge) -> None:
    judge.table = V0
    evaluator = JudgeEvaluator(
        judge="table", prompts=TRAIN, seeds=SEEDS, settings=SamplerSettings(num_steps=2), baseline=[0.5] * 8
    )
    with pytest.raises(ValueError, match="baseline has 8 cases but this evaluation has 6"):
        evaluator(SimpleNamespace(pipe=None))  # type: ignore[arg-type]
