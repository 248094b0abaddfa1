"""The online loop against real services: a scratch Postgres database, Redis db 15, a temp blob dir."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.settings import Settings
from tests.conftest import migrate, scratch_postgres_database, skip_or_fail

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REDIS_URL = os.environ.get("DENSEALIGN_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture
def redis() -> Iterator[Any]:
    from redis import Redis

    client = Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except Exception as exc:
        skip_or_fail(f"Redis at {REDIS_URL} is not reachable ({type(exc).__name__}); .ci/run starts it")
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture
def loop_settings(tmp_path: Path, redis: Any) -> Iterator[Settings]:
    """Settings for a tiny, fast loop on a fresh, migrated Postgres database."""
    with scratch_postgres_database() as url:
        migrate(url)
        yield Settings(
            database_url=url,
            redis_url=REDIS_URL,
            blob_dir=str(tmp_path / "blobs"),
            secret_key="test-secret-key-not-for-production",  # type: ignore[arg-type]
            cookie_secure=False,
            overlap_share=0.0,
            model={"base_model": "tiny:sd", "device": "cpu", "lora_rank": 2},  # type: ignore[arg-type]
            sampler={"num_steps": 3, "guidance_scale": 7.5},  # type: ignore[arg-type]
            dpo={  # type: ignore[arg-type]
                "min_new_pairs": 3,
                "steps_per_round": 3,
                "pairs_per_step": 2,
                "sampled_steps": 2,
                "lr": 1e-2,
                "clip": 1.0,
                "checkpoint_every": 1,
            },
            # One pair per job: the end-to-end test compares the worker's images with a stock pipeline
            # run on a batch of 2, and CPU float32 results depend on the batch size.
            pool={"target_per_prompt": 2, "job_retries": 1, "pairs_per_job": 1},  # type: ignore[arg-type]
        )
