"""The behaviour every blob store owes its callers, checked on the local directory and on an S3
bucket (a real moto server in its own process, tests/s3.py)."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.blob_stores import open_blob_store
from core.db.models import Pair, Trajectory
from core.storage import (
    BlobCorrupt,
    BlobNotFound,
    InvalidBlobKey,
    ListableBlobStore,
    LocalBlobStore,
    get_verified,
    verify_blob,
)
from core.storage_s3 import S3BlobStore
from core.sweep import sweep_orphans
from tests.s3 import shared_server, use_server


@pytest.fixture(params=["local", "s3"])
def store(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> ListableBlobStore:
    if request.param == "local":
        return open_blob_store(None, str(tmp_path / "blobs"))
    server = shared_server()
    use_server(monkeypatch, server)
    return open_blob_store(f"s3://{server.new_bucket()}/deploy-1", str(tmp_path / "unused"))


def overwrite_behind_its_back(store: ListableBlobStore) -> Callable[[str, bytes], None]:
    """Replace a blob's bytes without going through the store (a disk or bucket gone bad)."""
    if isinstance(store, S3BlobStore):
        return lambda key, data: store.client.put_object(
            Bucket=store.bucket, Key=store._object(key), Body=data
        )
    assert isinstance(store, LocalBlobStore)
    root = store.root
    return lambda key, data: (root / key).write_bytes(data)


def test_round_trip_returns_the_sha256(store: ListableBlobStore) -> None:
    data = os.urandom(3000)
    key = "policies/v3/pytorch_lora_weights.safetensors"
    assert not store.exists(key)
    assert store.put(key, data) == hashlib.sha256(data).hexdigest()
    assert store.exists(key)
    assert store.get(key) == data
    assert get_verified(store, key, hashlib.sha256(data).hexdigest()) == data
    store.put(key, b"replaced")  # a put replaces the whole blob
    assert store.get(key) == b"replaced"
    store.delete(key)
    assert not store.exists(key)
    store.delete(key)  # deleting a missing blob is fine


def test_missing_blob_is_blob_not_found_naming_the_key(store: ListableBlobStore) -> None:
    with pytest.raises(BlobNotFound, match="'images/v0/p1/never.png'"):
        store.get("images/v0/p1/never.png")
    with pytest.raises(BlobNotFound, match="'images/v0/p1/never.png'"):
        store.open("images/v0/p1/never.png")


def test_a_corrupt_blob_is_refused_on_verified_reads(store: ListableBlobStore) -> None:
    key = "trajectories/v1/p2/abc.safetensors"
    sha = store.put(key, b"the real latents")
    overwrite_behind_its_back(store)(key, b"the real latents, bit-flipped")
    with pytest.raises(BlobCorrupt, match=f"'{key}' does not match its recorded sha256 {sha}"):
        get_verified(store, key, sha)
    with pytest.raises(BlobCorrupt, match=sha):
        verify_blob(store, key, sha)


def test_open_streams_in_chunks(store: ListableBlobStore) -> None:
    data = os.urandom((5 << 20) // 2)  # 2.5 MiB
    sha = store.put("policies/v1/pytorch_lora_weights.safetensors", data)
    with store.open("policies/v1/pytorch_lora_weights.safetensors") as handle:
        chunks = list(iter(lambda: handle.read(1 << 20), b""))
    assert [len(c) for c in chunks] == [1 << 20, 1 << 20, len(data) - (2 << 20)]
    assert b"".join(chunks) == data
    verify_blob(store, "policies/v1/pytorch_lora_weights.safetensors", sha)


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs", "a//b", ".hidden", "a/.x", ""])
def test_malformed_keys_are_refused(store: ListableBlobStore, key: str) -> None:
    with pytest.raises(InvalidBlobKey):
        store.put(key, b"x")
    with pytest.raises(InvalidBlobKey):
        store.get(key)


def test_files_under_lists_keys_below_a_prefix_only(store: ListableBlobStore) -> None:
    for key in ("images/v0/p1/a.png", "images/v0/p2/b.png", "imagesX/c.png", "policies/v1/x"):
        store.put(key, b"x")
    before = time.time()
    listed = {key: (mtime, temp) for key, mtime, temp in store.files_under("images")}
    assert sorted(listed) == ["images/v0/p1/a.png", "images/v0/p2/b.png"]
    assert all(not temp and before - 60 < mtime <= before + 1 for mtime, temp in listed.values())
    assert list(store.files_under("nothing-here")) == []


def test_orphan_sweep_removes_old_unreferenced_sampled_blobs_only(
    session: Session, pair: Pair, store: ListableBlobStore
) -> None:
    # The S3 store cannot back-date an object, so "old" is made by waiting: blobs written before
    # a 3 s pause are older than the 1.5 s cutoff, the one written after is not.
    referenced = session.scalars(
        select(Trajectory.image_key).where(Trajectory.id == pair.trajectory_a_id)
    ).one()
    old = {
        "referenced": referenced,
        "orphan": "images/v0/p1/orphan.png",
        "orphan_traj": "trajectories/v0/p1/orphan.safetensors",
        "adapter": "policies/v1/pytorch_lora_weights.safetensors",  # the trainer's: never swept
    }
    for key in old.values():
        store.put(key, b"x")
    time.sleep(3.0)
    store.put("images/v0/p1/young.png", b"x")  # maybe a running job's, not inserted yet

    removed = sweep_orphans(session=session, store=store, older_than=dt.timedelta(seconds=1.5))

    assert sorted(removed) == sorted([old["orphan"], old["orphan_traj"]])
    for key in (old["referenced"], old["adapter"], "images/v0/p1/young.png"):
        assert store.exists(key), key
    assert not store.exists(old["orphan"]) and not store.exists(old["orphan_traj"])
