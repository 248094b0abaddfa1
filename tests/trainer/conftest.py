"""The trainer against real services: the online loop's fixtures (scratch Postgres, Redis, tiny model)."""

from tests.worker.conftest import loop_settings, redis

__all__ = ["loop_settings", "redis"]
