"""The blob store in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, ...), through boto3.

Keys are those of `core/blob_keys.py` below an optional prefix: `s3://bucket/prefix` keeps blob `k`
at object `prefix/k`. The guarantees are the local store's:

- atomic visibility: an S3 PUT is atomic, a reader sees the whole old object or the whole new one,
  never a partial one; blobs above `multipart_threshold` go up as a multipart upload, which S3
  shows only once `CompleteMultipartUpload` succeeds (a failed upload is aborted). Nothing is ever
  rewritten in place, so there is no temp object to sweep.
- `put` returns the sha256 of the bytes (also stored as the object's `sha256` metadata); readers
  check blobs against the digest recorded in the database (`get_verified`, `verify_blob`).
- `open` returns the streaming body of a GET, read in chunks: a large adapter is never held whole.

Endpoint and credentials come from the standard AWS variables, read by botocore itself
(AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION, or a profile). Two layers of retries ride out an outage: botocore's standard
mode retries a failed request at once (`max_attempts` in all, backoff of tens of milliseconds, which
covers a dropped connection or a throttled request), and when the endpoint still does not answer
the store waits `outage_waits` seconds in turn (1, 2, 4: an object store restarting) and tries the
operation again. What still fails raises one of the errors below, naming the bucket, the key and
what to do; the longest wait is bounded (about 7 s when connections are refused, plus the connect
timeouts when the host does not answer at all).
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import io
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO, TypeVar, cast
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
)

from core.storage import BlobNotFound, BlobStoreFull, BlobStoreUnavailable, validate_key

logger = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_MAX_ATTEMPTS = 3  # botocore's attempts per request (its standard mode's default)
OUTAGE_WAITS = (1.0, 2.0, 4.0)  # seconds between whole tries while the endpoint does not answer
MULTIPART_THRESHOLD = 64 << 20  # bytes; smaller blobs go up in one PUT
PART_SIZE = 16 << 20  # bytes per multipart part (S3's minimum is 5 MiB, all parts but the last)

_MISSING_KEY = frozenset({"NoSuchKey", "404", "NotFound"})
_DENIED = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "403",
        "Forbidden",
    }
)
# Quota or disk-full answers of S3-compatible stores (AWS itself has no per-bucket quota).
_FULL = frozenset(
    {"QuotaExceeded", "XMinioStorageFull", "XMinioAdminBucketQuotaExceeded", "InsufficientStorage", "507"}
)


class BlobStoreError(RuntimeError):
    """The object store refused or could not serve a request; the message says what to do."""


class BlobBucketMissing(BlobStoreError):
    def __init__(self, bucket: str, endpoint: str) -> None:
        super().__init__(
            f"the S3 bucket {bucket!r} does not exist at {endpoint}: create it (e.g. `aws s3 mb s3://{bucket}`) "
            "or point DENSEALIGN_BLOB_URL at an existing bucket"
        )


class BlobStoreAccessDenied(BlobStoreError):
    def __init__(self, op: str, location: str, endpoint: str, code: str) -> None:
        super().__init__(
            f"the S3 endpoint {endpoint} refused to {op} {location} ({code}): check AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, and that they may read, write, list and delete in that bucket"
        )


class BlobStoreUnreachable(BlobStoreError, BlobStoreUnavailable):
    def __init__(
        self, op: str, location: str, endpoint: str, attempts: int, seconds: float, cause: BaseException
    ) -> None:
        super().__init__(
            f"could not {op} {location}: the S3 endpoint {endpoint} did not answer in {seconds:.1f} s "
            f"({attempts} attempts, the last: {type(cause).__name__}): check that the object store is up "
            "and AWS_ENDPOINT_URL points at it"
        )
        self.attempts, self.seconds, self.cause = attempts, seconds, cause


class BlobBucketFull(BlobStoreFull):
    """The bucket's quota or the object store's disks are full; nothing was stored."""

    def __init__(self, location: str, key: str, size: int, code: str) -> None:
        OSError.__init__(
            self,
            errno.ENOSPC,
            f"the S3 blob store is full ({code}) while writing {size} bytes to {location}; nothing was "
            "stored: raise the bucket's quota, free space in the object store or point DENSEALIGN_BLOB_URL "
            "at another bucket",
        )
        self.root, self.key, self.size = Path(location), key, size  # root: as the local store's
        self.location = location  # the object's s3:// URL


def _is_aws(endpoint: str) -> bool:
    host = urlsplit(endpoint).hostname or ""
    return host.endswith(".amazonaws.com") or host.endswith(".amazonaws.com.cn")


def make_client(*, max_attempts: int, connect_timeout: float, read_timeout: float) -> Any:
    """An S3 client from the standard AWS configuration, with bounded retries and timeouts.

    Another S3-compatible store (MinIO, Ceph, moto) is addressed path-style (`endpoint/bucket/key`):
    its buckets are rarely DNS names of their own, which virtual-host style would need."""

    def build(addressing: str) -> Any:
        config = Config(
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            s3={"addressing_style": addressing},
        )
        return boto3.session.Session().client("s3", config=config)

    client = build("auto")
    return client if _is_aws(client.meta.endpoint_url) else build("path")


class S3BlobStore:
    """A `BlobStore` in `bucket`, every key below `prefix` (no leading or trailing slash needed)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Any | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        connect_timeout: float = 3.0,
        read_timeout: float = 60.0,
        outage_waits: Sequence[float] = OUTAGE_WAITS,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        part_size: int = PART_SIZE,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.max_attempts = max_attempts
        self.outage_waits = tuple(outage_waits)
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.client = client or make_client(
            max_attempts=max_attempts, connect_timeout=connect_timeout, read_timeout=read_timeout
        )
        self.endpoint: str = self.client.meta.endpoint_url

    def __repr__(self) -> str:
        return f"S3BlobStore({self.url!r}, endpoint={self.endpoint!r})"

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _object(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _location(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._object(key)}"

    @contextmanager
    def _errors(self, op: str, key: str, size: int = 0) -> Iterator[None]:
        """Turn botocore's errors (after its retries) into the store's, each naming bucket and key."""
        location = self._location(key)
        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code == "NoSuchBucket":
                raise BlobBucketMissing(self.bucket, self.endpoint) from exc
            if code in _MISSING_KEY:
                raise BlobNotFound(key) from exc
            if code in _DENIED:
                raise BlobStoreAccessDenied(op, location, self.endpoint, code) from exc
            if code in _FULL:
                raise BlobBucketFull(location, key, size, code) from exc
            message = error.get("Message", "")
            raise BlobStoreError(
                f"could not {op} {location} at {self.endpoint}: {code} {message}".rstrip()
            ) from exc
        except NoCredentialsError as exc:
            raise BlobStoreAccessDenied(op, location, self.endpoint, "no credentials found") from exc
        except (ConnectionError, HTTPClientError, IncompleteReadError) as exc:
            raise BlobStoreUnreachable(op, location, self.endpoint, self.max_attempts, 0.0, exc) from exc
        except BotoCoreError as exc:
            raise BlobStoreError(f"could not {op} {location} at {self.endpoint}: {exc}") from exc

    def _call(self, op: str, key: str, request: Callable[[], T], size: int = 0) -> T:
        """`request()` with errors translated; while the endpoint does not answer, wait and try again."""
        started = time.monotonic()
        for tries, wait in enumerate((*self.outage_waits, None), start=1):
            try:
                with self._errors(op, key, size):
                    return request()
            except BlobStoreUnreachable as exc:
                if wait is None:
                    raise BlobStoreUnreachable(
                        op,
                        self._location(key),
                        self.endpoint,
                        tries * self.max_attempts,
                        time.monotonic() - started,
                        exc.cause,
                    ) from exc.cause
                logger.warning(
                    "the S3 endpoint %s did not answer (%s) to %s %s; trying again in %g s",
                    self.endpoint,
                    type(exc.cause).__name__,
                    op,
                    self._location(key),
                    wait,
                )
                time.sleep(wait)
        raise AssertionError("unreachable")  # the loop returns or raises

    # -- the BlobStore protocol ----------------------------------------------------------------

    def put(self, key: str, data: bytes) -> str:
        """One PUT (or a multipart upload above `multipart_threshold`); the object appears whole."""
        name = self._object(validate_key(key))
        digest = hashlib.sha256(data).hexdigest()

        def upload() -> None:
            if len(data) <= self.multipart_threshold:
                self.client.put_object(Bucket=self.bucket, Key=name, Body=data, Metadata={"sha256": digest})
            else:
                self._put_multipart(name, data, digest)

        self._call("write", key, upload, len(data))
        return digest

    def _put_multipart(self, name: str, data: bytes, digest: str) -> None:
        upload = self.client.create_multipart_upload(
            Bucket=self.bucket, Key=name, Metadata={"sha256": digest}
        )
        upload_id = upload["UploadId"]
        try:
            parts = []
            view = memoryview(data)
            for number, start in enumerate(range(0, len(data), self.part_size), start=1):
                part = self.client.upload_part(
                    Bucket=self.bucket,
                    Key=name,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=bytes(view[start : start + self.part_size]),
                )
                parts.append({"PartNumber": number, "ETag": part["ETag"]})
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=name, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            # Best effort: an upload left open is invisible to readers and costs only its parts'
            # storage, which a bucket lifecycle rule (AbortIncompleteMultipartUpload) reclaims.
            with suppress(Exception):  # the first error is the one to report
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id)
            raise

    def get(self, key: str) -> bytes:
        name = self._object(validate_key(key))

        def download() -> bytes:
            body = self.client.get_object(Bucket=self.bucket, Key=name)["Body"]
            try:
                return cast(bytes, body.read())  # botocore checks the length against Content-Length
            finally:
                body.close()

        return self._call("read", key, download)

    def open(self, key: str) -> BinaryIO:
        """The object as a file streamed from the GET's body (read it in chunks, close it). A
        connection lost mid-stream is not retried: the reader gets `BlobStoreUnreachable`."""
        name = self._object(validate_key(key))
        response = self._call("read", key, lambda: self.client.get_object(Bucket=self.bucket, Key=name))
        return cast(BinaryIO, _ObjectReader(response["Body"], lambda: self._errors("read", key)))

    def exists(self, key: str) -> bool:
        name = self._object(validate_key(key))
        try:
            self._call("look up", key, lambda: self.client.head_object(Bucket=self.bucket, Key=name))
        except BlobNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        """Delete the object; deleting a missing one is fine (S3's DELETE is idempotent)."""
        name = self._object(validate_key(key))
        self._call("delete", key, lambda: self.client.delete_object(Bucket=self.bucket, Key=name))

    def local_path(self, key: str) -> Path | None:
        return None  # never on this machine: the app streams the object instead

    # -- what core/sweep.py needs --------------------------------------------------------------

    def files_under(self, prefix: str) -> Iterator[tuple[str, float, bool]]:
        """(key, last-modified time, False) of every object below `prefix`: S3 has no temp files."""
        top = self._object(validate_key(prefix)) + "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        with self._errors("list", prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=top)
            for page in pages:
                for item in page.get("Contents", []):
                    modified: dt.datetime = item["LastModified"]
                    yield item["Key"][strip:], modified.timestamp(), False

    def delete_file(self, key: str) -> None:
        self.delete(key)


class _ObjectReader(io.RawIOBase):
    """A GET's streaming body as a plain file: `with` yields this object (botocore's body would hand
    out the raw urllib3 stream, skipping its length check), and a connection lost mid-read raises
    `BlobStoreUnreachable` naming the object."""

    def __init__(self, body: Any, errors: Callable[[], AbstractContextManager[None]]) -> None:
        self._body = body
        self._errors = errors

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        with self._errors():
            return cast(bytes, self._body.read(None if size is None or size < 0 else size))

    def readall(self) -> bytes:
        return self.read()

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()
