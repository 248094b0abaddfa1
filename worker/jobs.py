"""RQ job functions, imported by dotted name (`core.jobs`). Thin: the work is in sampling.py."""

from __future__ import annotations

from worker.sampling import current


def sample_pairs(prompt_ids: list[int]) -> list[int]:
    """Sample one pair per prompt id in one batch with the current policy; returns the new pair ids."""
    return current().sample_pairs(prompt_ids)


def sample_eval_pairs(campaign_id: int, prompt_ids: list[int]) -> list[int]:
    """Sample an evaluation pair (campaign version vs baseline, same seed) per prompt id."""
    return current().sample_eval_pairs(campaign_id, prompt_ids)
