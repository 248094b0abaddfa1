"""Blob store addressed by key: latents, log-probs, images and LoRA files never go into the database.

`LocalBlobStore` keeps blobs under one directory; writes go to a temporary file in the destination
directory and are renamed into place, so a reader never sees half a blob and a crash leaves only a
stray temp file. A write that fails (a full disk among other things) deletes its temp file; a full
disk or quota raises `BlobStoreFull`, which names the directory and the size. `S3BlobStore`
(core/storage_s3.py) keeps blobs in an S3-compatible bucket behind the same `BlobStore` protocol;
`core.blob_stores.open_blob_store` picks one from the settings.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

# Slash-separated segments of letters, digits, '.', '_' and '-', none starting with '.', so no key
# can be absolute, climb out with '..' or name a hidden file.
_KEY = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*$")
MAX_KEY_LENGTH = 255


class InvalidBlobKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(
            f"blob key {key!r} is invalid: use up to {MAX_KEY_LENGTH} characters of slash-separated segments "
            "of letters, digits, '.', '_' and '-', no segment starting with '.'"
        )


class BlobNotFound(KeyError):
    def __init__(self, key: str) -> None:
        super().__init__(f"no blob with key {key!r}; it was never written or has been deleted")

    def __str__(self) -> str:
        return str(self.args[0])


class BlobCorrupt(ValueError):
    def __init__(self, key: str, expected_sha256: str) -> None:
        super().__init__(
            f"blob {key!r} does not match its recorded sha256 {expected_sha256}: the file is corrupt; "
            "re-publish it or roll back to another version"
        )


class BlobStoreFull(OSError):
    """No room left where the blob store writes (ENOSPC or EDQUOT); nothing was stored."""

    def __init__(self, root: Path, key: str, size: int) -> None:
        super().__init__(
            errno.ENOSPC,
            f"the blob store at {root} is full (no space left on device) while writing {size} bytes to blob "
            f"{key!r}; nothing was stored: free space there or point DENSEALIGN_BLOB_DIR at a bigger volume",
        )
        self.root, self.key, self.size = root, key, size

    def __str__(self) -> str:
        return str(self.strerror)


FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class BlobStoreUnavailable(RuntimeError):
    """A remote blob store (an S3 endpoint) did not answer, retries included; retrying later may work."""


def get_verified(store: BlobStore, key: str, sha256: str) -> bytes:
    """The blob's bytes, after checking them against the sha256 recorded when it was written."""
    data = store.get(key)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise BlobCorrupt(key, sha256)
    return data


def verify_blob(store: BlobStore, key: str, sha256: str) -> None:
    """Raise `BlobCorrupt` unless the blob matches `sha256`; reads it in chunks, for blobs served as files."""
    digest = hashlib.sha256()
    with store.open(key) as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != sha256:
        raise BlobCorrupt(key, sha256)


def validate_key(key: str) -> str:
    if len(key) > MAX_KEY_LENGTH or not _KEY.fullmatch(key):
        raise InvalidBlobKey(key)
    return key


class BlobStore(Protocol):
    def put(self, key: str, data: bytes) -> str:
        """Store `data` under `key` (replacing any blob there); returns its sha256 hex digest."""
        ...

    def get(self, key: str) -> bytes: ...

    def open(self, key: str) -> BinaryIO: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def local_path(self, key: str) -> Path | None:
        """A filesystem path to the blob when the backend has one (lets the web app stream files)."""
        ...


class ListableBlobStore(BlobStore, Protocol):
    """A store that lists and deletes files by path (the orphan sweep): local and S3 stores."""

    def files_under(self, prefix: str) -> Iterator[tuple[str, float, bool]]:
        """(key, modification time, is a leftover temp file) of every file below `prefix`."""
        ...

    def delete_file(self, key: str) -> None: ...


class LocalBlobStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def put(self, key: str, data: bytes) -> str:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
        except OSError as exc:
            if exc.errno in FULL_ERRNOS:
                raise BlobStoreFull(self.root, key, len(data)) from exc
            raise
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
                raise BlobStoreFull(self.root, key, len(data)) from exc
            raise
        return hashlib.sha256(data).hexdigest()

    def get(self, key: str) -> bytes:
        with self.open(key) as handle:
            return handle.read()

    def open(self, key: str) -> BinaryIO:
        try:
            return self._path(key).open("rb")
        except FileNotFoundError:
            raise BlobNotFound(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def local_path(self, key: str) -> Path | None:
        path = self._path(key)
        return path if path.is_file() else None

    def files_under(self, prefix: str) -> Iterator[tuple[str, float, bool]]:
        """(key, modification time, is a leftover temp file) of every file below `prefix`."""
        top = self._path(prefix)
        if not top.is_dir():
            return
        for path in top.rglob("*"):
            if path.is_file():
                try:
                    mtime = path.stat().st_mtime
                except FileNotFoundError:  # deleted meanwhile
                    continue
                name = path.name
                yield (
                    path.relative_to(self.root).as_posix(),
                    mtime,
                    name.startswith(".tmp-") and name.endswith(".part"),
                )

    def delete_file(self, key: str) -> None:
        """Delete a file by its path below the root, temp files included (keys never start with a dot)."""
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise InvalidBlobKey(key)
        path.unlink(missing_ok=True)
