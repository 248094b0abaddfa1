"""Fixtures for the model tests: tiny Stable Diffusion pipelines built in code, offline, on CPU."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from core.diffusion.models import Pipeline, load_pipeline  # noqa: E402
from core.diffusion.sampler import SamplerSettings  # noqa: E402

PROMPTS = ["a red circle above a blue square", "a photo of a cat"]
SEEDS = [11, 12]


@pytest.fixture
def make_pipe() -> Callable[..., Pipeline]:
    """A factory: each call builds a fresh tiny pipeline with the same (seeded) weights."""

    def make(kind: str = "sd") -> Pipeline:
        return load_pipeline(f"tiny:{kind}")

    return make


@pytest.fixture
def settings() -> SamplerSettings:
    return SamplerSettings(num_steps=4, guidance_scale=7.5, eta=1.0)
