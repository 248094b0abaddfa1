"""The procedural shapes data set: deterministic, grammatical, drawn where the prompt says."""

from __future__ import annotations

import random

import numpy as np
import pytest

from core.basemodel import shapes


def test_examples_are_deterministic_per_index_and_seed():
    a, prompts_a = shapes.render_batch(range(20), seed=3)
    b, prompts_b = shapes.render_batch(range(20), seed=3)
    c, prompts_c = shapes.render_batch(range(20), seed=4)
    assert prompts_a == prompts_b and np.array_equal(a, b)
    assert prompts_a != prompts_c
    # An index's example does not depend on which other indices are drawn with it.
    single, prompt = shapes.render_batch([7], seed=3)
    assert prompt[0] == prompts_a[7] and np.array_equal(single[0], a[7])
    assert a.shape == (20, 64, 64, 3) and a.dtype == np.uint8


def test_every_prompt_parses_back_to_its_scene():
    prompts = shapes.all_prompts()
    assert len(prompts) == len(set(prompts)) == 12 + 2 * 12 * 9
    for prompt in prompts:
        assert shapes.parse_prompt(prompt).prompt == prompt
    drawn = {shapes.example(i).prompt for i in range(2000)}
    assert drawn <= set(prompts)


@pytest.mark.parametrize("bad", ["a purple circle", "a red circle above a red square", "two red circles", ""])
def test_prompts_outside_the_grammar_are_refused(bad):
    with pytest.raises(shapes.PromptError):
        shapes.parse_prompt(bad)


def test_layouts_follow_the_relation_and_stay_apart():
    rng = random.Random(0)
    for _ in range(500):
        scene = shapes.random_scene(rng)
        for o in scene.objects:
            assert o.size / 2 <= o.cx <= 64 - o.size / 2 and o.size / 2 <= o.cy <= 64 - o.size / 2
        if scene.relation is None:
            continue
        first, second = scene.objects
        along = second.cy - first.cy if scene.relation == "above" else second.cx - first.cx
        across = second.cx - first.cx if scene.relation == "above" else second.cy - first.cy
        assert along >= (first.size + second.size) / 2 + 3  # bounding squares never touch
        assert abs(across) <= 10
        assert first.colour != second.colour
