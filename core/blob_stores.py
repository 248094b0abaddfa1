"""Which blob store a process uses: the one place that turns `blob_url` / `blob_dir` into a store.

`DENSEALIGN_BLOB_URL` empty: the local directory `DENSEALIGN_BLOB_DIR` (one machine, or a shared
volume). `file:///path`: a local directory too. `s3://bucket/prefix`: an S3-compatible bucket
(core/storage_s3.py), with endpoint and credentials from the standard AWS_* variables. The app,
workers, trainer and CLI commands all open their store here, so they always agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from core.storage import InvalidBlobKey, LocalBlobStore, validate_key

if TYPE_CHECKING:
    from core.storage_s3 import S3BlobStore

# S3's bucket naming rules: 3-63 lower-case letters, digits, '.' and '-', starting and ending with
# a letter or digit.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class InvalidBlobUrl(ValueError):
    def __init__(self, url: str, why: str) -> None:
        super().__init__(
            f"{url!r} is not a blob store URL ({why}): use s3://bucket[/prefix], "
            "file:///absolute/path, or leave it empty for DENSEALIGN_BLOB_DIR"
        )


@dataclass(frozen=True)
class BlobLocation:
    """Where blobs live: `scheme` is "file" (`path` a directory) or "s3" (`bucket` and `prefix`)."""

    scheme: str
    path: str = ""
    bucket: str = ""
    prefix: str = ""


def parse_blob_url(url: str) -> BlobLocation:
    """Check and split a blob store URL; raises `InvalidBlobUrl` naming what is wrong."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise InvalidBlobUrl(url, "a file URL needs an absolute path, file:///path")
        return BlobLocation("file", path=unquote(parts.path))
    if parts.scheme == "s3":
        if not _BUCKET.fullmatch(parts.netloc):
            raise InvalidBlobUrl(url, f"{parts.netloc!r} is not an S3 bucket name")
        if parts.query or parts.fragment:
            raise InvalidBlobUrl(url, "no ?query or #fragment")
        prefix = parts.path.strip("/")
        if prefix:
            try:
                validate_key(prefix)
            except InvalidBlobKey:
                raise InvalidBlobUrl(url, f"the prefix {prefix!r} is not a valid key") from None
        return BlobLocation("s3", bucket=parts.netloc, prefix=prefix)
    raise InvalidBlobUrl(url, f"unknown scheme {parts.scheme!r}" if parts.scheme else "no scheme")


def open_blob_store(blob_url: str | None, blob_dir: str) -> LocalBlobStore | S3BlobStore:
    """The store `settings.blob_url` names, or the local directory `settings.blob_dir` without one."""
    if not blob_url:
        return LocalBlobStore(blob_dir)
    location = parse_blob_url(blob_url)
    if location.scheme == "file":
        return LocalBlobStore(location.path)
    # Imported here so that processes on a local directory never load boto3 (~0.3 s at start).
    from core.storage_s3 import S3BlobStore

    return S3BlobStore(location.bucket, location.prefix)
