"""Job names and id-only payloads shared by the app (which enqueues) and workers (which run them).

No torch here: the app imports this module. Payloads carry database ids only; the worker reads
everything else from Postgres and the blob store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Dotted paths of the worker functions RQ imports to run sampling jobs.
SAMPLE_PAIRS = "worker.jobs.sample_pairs"
SAMPLE_EVAL_PAIRS = "worker.jobs.sample_eval_pairs"


@dataclass(frozen=True)
class SamplePairs:
    """Sample one pair for each prompt id (repeats allowed) in one batched pass of the policy."""

    prompt_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("a sampling job needs at least one prompt id")

    def kwargs(self) -> dict[str, Any]:
        return {"prompt_ids": list(self.prompt_ids)}


@dataclass(frozen=True)
class SampleEvalPairs:
    """Sample one evaluation pair (the campaign's version vs its baseline, one seed) per prompt id."""

    campaign_id: int
    prompt_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("a sampling job needs at least one prompt id")

    def kwargs(self) -> dict[str, Any]:
        return {"campaign_id": self.campaign_id, "prompt_ids": list(self.prompt_ids)}


def in_full_jobs(wanted: int, *, on_hand: int, pool: int, pairs_per_job: int) -> int:
    """How many of `wanted` missing pairs to sample now so that jobs stay full.

    A judgement frees one slot, and sending a 1-pair job for it would undo the worker's batching
    (pairs/s falls ~3x). So a remainder short of a full job waits for more judgements while at least
    half the `pool` is still open or on its way (`on_hand`), counting the full jobs sent now (without
    them, labelling that outpaced one refill by a few pairs sent 1-3 pair jobs: bench/loop.py measured
    5.6 pairs per job of 8); below that, annotators come first and the remainder goes too.
    """
    full = wanted - wanted % pairs_per_job
    return full if 2 * (on_hand + full) >= pool else wanted
