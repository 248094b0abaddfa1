"""Job names and id-only payloads shared by the app (which enqueues) and workers (which run them).

No torch here: the app imports this module. Payloads carry database ids only; the worker reads
everything else from Postgres and the blob store.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# Dotted path of the worker function RQ imports to run a sampling job.
SAMPLE_PAIR = "worker.jobs.sample_pair"


@dataclass(frozen=True)
class SamplePair:
    """Sample two trajectories of one prompt with the current policy and insert them as a pair."""

    prompt_id: int

    def kwargs(self) -> dict[str, Any]:
        return asdict(self)
