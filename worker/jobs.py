"""RQ job functions, imported by dotted name (`core.jobs.SAMPLE_PAIR`). Thin: the work is in sampling.py."""

from __future__ import annotations

from worker.sampling import current


def sample_pair(prompt_id: int) -> int:
    """Sample two trajectories of `prompt_id` with the current policy and store them as a pair."""
    return current().sample_pair(prompt_id)
