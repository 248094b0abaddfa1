"""The worker's idle state names its model family, which the dashboard shows with every process."""

from __future__ import annotations

from typing import Any

from core.queue import QUEUE_NAME
from worker.runner import serve_until_stopped


class RecordingHeartbeat:
    def __init__(self) -> None:
        self.states: list[tuple[str, str, int | None]] = []

    def set(self, state: str, detail: str = "", *, version: int | None = None) -> None:
        self.states.append((state, detail, version))


def test_idle_state_names_the_model_family(redis: Any) -> None:
    beat = RecordingHeartbeat()
    code = serve_until_stopped(
        redis=redis,
        queue_names=[QUEUE_NAME],
        heartbeat=beat,  # type: ignore[arg-type]
        loaded_version=lambda: 3,
        burst=True,
        model_family="sd3",
    )
    assert code == 0
    assert beat.states[0] == ("idle", "waiting for sampling jobs (sd3 model)", 3)
