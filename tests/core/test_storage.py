from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from core.storage import BlobNotFound, InvalidBlobKey, LocalBlobStore


def test_put_get_roundtrip_and_sha256(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    digest = store.put("trajectories/7/image.png", b"\x89PNG-data")
    assert digest == hashlib.sha256(b"\x89PNG-data").hexdigest()
    assert store.get("trajectories/7/image.png") == b"\x89PNG-data"
    assert store.exists("trajectories/7/image.png")
    assert store.local_path("trajectories/7/image.png") == tmp_path / "trajectories/7/image.png"


def test_overwrite_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    store.put("a/b", b"one")
    store.put("a/b", b"two")
    assert store.get("a/b") == b"two"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b"]


@pytest.mark.parametrize(
    "key", ["../etc/passwd", "/abs", "a/../b", "a//b", ".hidden", "a/.x", "", "a b", "x" * 300]
)
def test_keys_that_could_escape_or_are_malformed_are_refused(tmp_path: Path, key: str) -> None:
    store = LocalBlobStore(tmp_path / "root")
    with pytest.raises(InvalidBlobKey):
        store.put(key, b"x")
    assert not (tmp_path / "etc").exists()


def test_missing_blob_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(BlobNotFound, match="'nope/x'"):
        LocalBlobStore(tmp_path).get("nope/x")
    LocalBlobStore(tmp_path).delete("nope/x")  # deleting a missing blob is fine
