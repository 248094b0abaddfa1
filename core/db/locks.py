"""Process-wide locks held in the database, so at most one process does a job (one trainer per deployment).

On Postgres a session-level advisory lock, held on a connection of its own for as long as the process
holds the lock: the server releases it when that connection ends, so a killed holder frees it at
once and a Postgres restart frees it for whoever asks first. SQLite (the embedded single-process
mode) has no such lock and nothing to guard against: the lock is always granted there.
"""

from __future__ import annotations

import hashlib
import logging

from sqlalchemy import Connection, Engine, text

logger = logging.getLogger(__name__)


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for `name`."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


class AdvisoryLock:
    def __init__(self, engine: Engine, name: str) -> None:
        self.engine = engine
        self.name = name
        self.key = lock_key(name)
        self._conn: Connection | None = None

    @property
    def supported(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def try_acquire(self) -> bool:
        """Take the lock if it is free (or already ours and still held); never waits."""
        if not self.supported:
            return True
        if self.held():
            return True
        conn = self.engine.connect()
        try:
            got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key}).scalar())
            conn.commit()
        except Exception:
            conn.close()
            raise
        if got:
            self._conn = conn
            logger.info("holding the %s lock", self.name)
        else:
            conn.close()
        return got

    def held(self) -> bool:
        """Whether this process still holds the lock (its connection is alive)."""
        if not self.supported:
            return True
        if self._conn is None:
            return False
        try:
            self._conn.execute(text("SELECT 1"))
            self._conn.commit()
            return True
        except Exception:  # the connection died (Postgres restarted): the server let the lock go
            logger.warning("lost the %s lock with its database connection", self.name)
            self._drop()
            return False

    def release(self) -> None:
        if self._conn is None:
            return
        try:
            self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
            self._conn.commit()
        except Exception:  # the connection is gone, and the lock with it
            pass
        self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.invalidate()
                self._conn.close()
            except Exception:
                pass
            self._conn = None
