"""A long-running process's heartbeat: what it is doing now, written to the database every few seconds.

The process sets its state as it works (`set("training", "round 3: step 40/60", version=2)`); a daemon
thread writes the latest state every `period` seconds, and at once when the state changes, so a job
that runs for minutes still beats. A database outage is logged and retried at the next beat, never
fatal. `stop()` writes a last beat that says the process exited.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager

from sqlalchemy.orm import Session

from core.db.base import utcnow
from core.db.heartbeats import beat

logger = logging.getLogger(__name__)


class Heartbeat:
    def __init__(
        self,
        *,
        sessions: Callable[[], AbstractContextManager[Session]],
        role: str,
        period: float = 10.0,
        host: str | None = None,
        pid: int | None = None,
    ) -> None:
        self.sessions = sessions
        self.role = role
        self.period = period
        self.host = host or socket.gethostname()
        self.pid = os.getpid() if pid is None else pid
        self.started_at = utcnow()
        self._lock = threading.Lock()
        self._state: tuple[str, str, int | None] = ("starting", "", None)
        self._wake = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    @property
    def state(self) -> str:
        return self._state[0]

    def set(self, state: str, detail: str = "", *, version: int | None = None) -> None:
        """Say what the process is doing now; written at once by the beating thread."""
        with self._lock:
            changed = self._state != (state, detail, version)
            self._state = (state, detail, version)
        if changed:
            self._wake.set()

    def start(self) -> Heartbeat:
        self._thread = threading.Thread(target=self._run, name=f"{self.role}-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self, detail: str = "") -> None:
        """Stop beating and record a clean exit (best effort: the database may be down)."""
        self._done.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.period + 5)
        self._write(stopped=True, detail=detail)

    def beat_now(self) -> bool:
        return self._write(stopped=False)

    def _run(self) -> None:
        while not self._done.is_set():
            self._write(stopped=False)
            self._wake.wait(self.period)
            self._wake.clear()

    def _write(self, *, stopped: bool, detail: str | None = None) -> bool:
        with self._lock:
            state, current_detail, version = self._state
        try:
            with self.sessions() as session:
                beat(
                    session=session,
                    role=self.role,
                    host=self.host,
                    pid=self.pid,
                    state="stopped" if stopped else state,
                    detail=current_detail if detail is None else detail,
                    policy_version=version,
                    started_at=self.started_at,
                    stopped=stopped,
                )
                session.commit()
        except Exception as exc:  # the database may be restarting: say so once, keep going
            if not self._failing:
                logger.warning("could not write the %s heartbeat: %s", self.role, exc)
            self._failing = True
            return False
        if self._failing:
            logger.info("%s heartbeat written again", self.role)
        self._failing = False
        return True
