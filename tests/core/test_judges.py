"""Programmatic judges: the faithfulness rule accepts what the data set draws for a prompt and
rejects other prompts' drawings; JPEG compressibility orders flat over busy images; noise flips."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from core.basemodel import shapes
from core.judges import (
    CompressibilityJudge,
    FaithfulnessJudge,
    IncompressibilityJudge,
    make_judge,
    prefer_by_score,
)


def test_faithfulness_accepts_ground_truth_renders():
    judge = FaithfulnessJudge()
    scenes = [shapes.example(i, seed=11) for i in range(200)]
    verdicts = [judge.verdict(s.prompt, shapes.render(s)) for s in scenes]
    assert sum(v.accepted for v in verdicts) / len(verdicts) >= 0.95
    assert min(v.score for v in verdicts) > 0.5


def test_faithfulness_accepts_renders_at_other_sizes():
    judge = FaithfulnessJudge()
    scenes = [shapes.example(i, seed=12) for i in range(40)]
    assert sum(judge.accepts(s.prompt, shapes.render(s, size=128)) for s in scenes) >= 38


def test_faithfulness_rejects_renders_of_another_prompt():
    judge = FaithfulnessJudge()
    rng = random.Random(0)
    prompts = shapes.all_prompts()
    rejected = 0
    for i in range(200):
        scene = shapes.example(i, seed=13)
        other = rng.choice([p for p in prompts if p != scene.prompt])
        rejected += not judge.accepts(other, shapes.render(scene))
    assert rejected / 200 >= 0.95


@pytest.mark.parametrize(
    ("drawn", "asked", "failure"),
    [
        ("a red circle above a blue square", "a blue square above a red circle", "not above"),
        (
            "a red circle above a blue square",
            "a red square above a blue square",
            "the red square has the wrong shape",
        ),
        (
            "a red circle above a blue square",
            "a red circle to the left of a blue square",
            "not to the left of",
        ),
        ("a red triangle", "a red triangle above a green circle", "no green object"),
        ("a red triangle to the left of a yellow square", "a red triangle", "unasked-for yellow"),
    ],
)
def test_faithfulness_names_the_failed_check(drawn, asked, failure):
    image = shapes.render(shapes.random_scene(random.Random(1), drawn))
    verdict = FaithfulnessJudge().verdict(asked, image)
    assert not verdict.accepted and failure in verdict.failures
    assert verdict.score < FaithfulnessJudge().score(drawn, image)


def test_faithfulness_rejects_a_blank_image_and_refuses_foreign_prompts():
    blank = Image.new("RGB", (64, 64), shapes.BACKGROUND)
    assert not FaithfulnessJudge().accepts("a red circle", blank)
    with pytest.raises(shapes.PromptError):
        FaithfulnessJudge().score("a photo of a cat", blank)


def test_faithfulness_prefers_the_faithful_image():
    rng = random.Random(2)
    prompt = "a green square to the left of a yellow circle"
    good = shapes.render(shapes.random_scene(rng, prompt))
    bad = shapes.render(shapes.random_scene(rng, "a yellow circle to the left of a green square"))
    judge = FaithfulnessJudge()
    assert judge.prefer(prompt, good, bad, random.Random(0)) == "a"
    assert judge.prefer(prompt, bad, good, random.Random(0)) == "b"
    assert judge.prefer(prompt, good, good, random.Random(0)) == "tie"


def test_compressibility_prefers_the_flatter_image():
    flat = Image.new("RGB", (64, 64), (200, 100, 50))
    busy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    comp, incomp = CompressibilityJudge(), IncompressibilityJudge()
    assert 0.0 <= comp.score("", busy) < comp.score("", flat) <= 1.0
    assert comp.score("", flat) + incomp.score("", flat) == pytest.approx(1.0)
    assert comp.prefer("", flat, busy, random.Random(0)) == "a"
    assert incomp.prefer("", flat, busy, random.Random(0)) == "b"


def test_noise_rate_flips_that_share_of_decisions_and_never_a_tie():
    rng = random.Random(0)
    choices = [prefer_by_score(0.9, 0.1, rng, noise_rate=0.3) for _ in range(4000)]
    assert choices.count("b") / len(choices) == pytest.approx(0.3, abs=0.03)
    assert all(prefer_by_score(0.5, 0.5, rng, noise_rate=1.0) == "tie" for _ in range(50))
    assert all(prefer_by_score(0.9, 0.1, rng, noise_rate=1.0) == "b" for _ in range(50))
    with pytest.raises(ValueError, match="noise_rate"):
        prefer_by_score(0.9, 0.1, rng, noise_rate=1.5)


def test_make_judge_by_name():
    assert make_judge("faithfulness").name == "faithfulness"
    assert make_judge("compressibility").name == "compressibility"
    with pytest.raises(ValueError, match="unknown preference"):
        make_judge("aesthetics")


def test_label_cli_refuses_a_negative_tie_margin(capsys: pytest.CaptureFixture[str]) -> None:
    from densealign.labeller import main

    assert main(["--token", "t", "--tie-margin", "-0.1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tie-margin -0.1 is negative" in err


def test_tie_margin_turns_close_pairs_into_ties() -> None:
    rng = random.Random(0)
    assert prefer_by_score(0.53, 0.5, rng, tie_margin=0.05) == "tie"
    assert (
        prefer_by_score(0.5, 0.53, rng, tie_margin=0.05, noise_rate=1.0) == "tie"
    )  # noise never flips a tie
    assert prefer_by_score(0.56, 0.5, rng, tie_margin=0.05) == "a"
    assert prefer_by_score(0.53, 0.5, rng) == "a"  # the default margin is 1e-3
