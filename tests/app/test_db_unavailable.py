"""When the database cannot be reached (pool exhausted, Postgres restarting) the app answers 503
with Retry-After and a message, never a 500, and records nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from app.main import create_app
from core.settings import Settings


class Unreachable:
    """A session factory whose sessions fail on first use, as an exhausted pool or a down server does."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def __call__(self) -> Unreachable:
        return self

    def __getattr__(self, name: str) -> object:
        if name == "close":
            return lambda: None

        def fail(*args: object, **kwargs: object) -> None:
            raise self.exc

        return fail


@pytest.mark.parametrize(
    "exc",
    [
        PoolTimeout("QueuePool limit of size 5 overflow 10 reached"),
        OperationalError("SELECT 1", {}, Exception("the database system is starting up")),
    ],
)
def test_database_unavailable_is_a_503_with_retry_after(exc: Exception, tmp_path: Path) -> None:
    settings = Settings(secret_key="x" * 32, blob_dir=str(tmp_path), cookie_secure=False)  # type: ignore[arg-type]
    client = TestClient(create_app(settings, session_factory=Unreachable(exc)), raise_server_exceptions=False)  # type: ignore[arg-type]
    response = client.get("/api/v1/pairs/next", headers={"Authorization": "Bearer some-token-value"})
    assert response.status_code == 503
    assert response.headers["retry-after"] == "2"
    assert "nothing was recorded" in response.json()["detail"]
