"""App fixtures: the FastAPI app on the test's rolled-back session, and bearer-token clients."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.main import create_app
from core.db.models import Labeller, Pair, Trajectory
from core.settings import Settings
from core.storage import LocalBlobStore


def png_bytes(color: tuple[int, int, int], size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        database_url="postgresql+psycopg://unused",
        secret_key="test-secret-key",  # type: ignore[arg-type]
        cookie_secure=False,
        blob_dir=str(tmp_path / "blobs"),
        public_base_url="http://testserver",
        max_body_bytes=10_000,
    )


@pytest.fixture
def app(settings: Settings, session: Session, blob_store: LocalBlobStore) -> FastAPI:
    def request_session() -> Session:
        # Keep what the test set up so far (a savepoint release inside the rolled-back transaction):
        # the request's own uncommitted work is then all that closing the session throws away.
        session.commit()
        return session

    return create_app(settings, session_factory=request_session, blob_store=blob_store)  # type: ignore[arg-type]


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def as_labeller(
    app: FastAPI, make_labeller: Callable[..., tuple[Labeller, str]]
) -> Callable[..., tuple[TestClient, Labeller]]:
    """A client authenticated with a fresh labeller's bearer token."""

    def make(role: str = "annotator", name: str | None = None) -> tuple[TestClient, Labeller]:
        labeller, token = make_labeller(name, role=role)
        return TestClient(app, headers={"Authorization": f"Bearer {token}"}), labeller

    return make


@pytest.fixture
def annotator(as_labeller: Callable[..., tuple[TestClient, Labeller]]) -> tuple[TestClient, Labeller]:
    return as_labeller()


@pytest.fixture
def admin_client(as_labeller: Callable[..., tuple[TestClient, Labeller]]) -> TestClient:
    return as_labeller("admin")[0]


@pytest.fixture
def pair_with_images(pair: Pair, session: Session, blob_store: LocalBlobStore) -> Pair:
    """The `pair` fixture with a red PNG for trajectory a and a blue one for b in the blob store."""
    for trajectory_id, color in ((pair.trajectory_a_id, (255, 0, 0)), (pair.trajectory_b_id, (0, 0, 255))):
        blob_store.put(session.get_one(Trajectory, trajectory_id).image_key, png_bytes(color))
    return pair


def count(session: Session, model: Any) -> int:
    return int(session.scalar(select(func.count()).select_from(model)) or 0)
