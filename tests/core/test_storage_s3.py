"""What only the S3 store has: its URL setting, its errors (each one line naming the bucket, the key
and the fix), bounded retries, multipart uploads, and riding out an object store killed with -9.

The server is moto's, in its own process (tests/s3.py), except in the short-outage test; the quota
answer is the one thing moto cannot produce, so that test stubs the client's reply."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from typing import Any

import pytest
from botocore.stub import Stubber
from moto.server import ThreadedMotoServer

from core.blob_stores import InvalidBlobUrl, open_blob_store, parse_blob_url
from core.settings import Settings, SettingsError, load_settings
from core.storage import BlobNotFound, BlobStoreFull, LocalBlobStore
from core.storage_s3 import (
    BlobBucketFull,
    BlobBucketMissing,
    BlobStoreAccessDenied,
    BlobStoreUnreachable,
    S3BlobStore,
)
from tests.s3 import MotoServer, free_port, shared_server, use_server


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> MotoServer:
    server = shared_server()
    use_server(monkeypatch, server)
    return server


# -- the setting and the factory ----------------------------------------------------------------


def test_blob_url_picks_the_store(server: MotoServer, tmp_path: Any) -> None:
    local = open_blob_store(None, str(tmp_path / "dir"))
    assert isinstance(local, LocalBlobStore) and local.root == tmp_path / "dir"
    assert isinstance(open_blob_store("", str(tmp_path / "dir")), LocalBlobStore)
    as_file = open_blob_store(f"file://{tmp_path}/other", "ignored")
    assert isinstance(as_file, LocalBlobStore) and as_file.root == tmp_path / "other"
    s3 = open_blob_store("s3://densealign-blobs/prod/v2/", "ignored")
    assert isinstance(s3, S3BlobStore)
    assert (s3.bucket, s3.prefix, s3.endpoint) == ("densealign-blobs", "prod/v2", server.url)
    assert s3.local_path("anything") is None


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://bucket/x", "unknown scheme 'http'"),
        ("bucket/x", "no scheme"),
        ("s3://Bad_Bucket/x", "'Bad_Bucket' is not an S3 bucket name"),
        ("s3://ok-bucket/../x", "the prefix '../x' is not a valid key"),
        ("file://relative/path", "absolute path"),
    ],
)
def test_a_bad_blob_url_is_one_line_naming_the_fix(
    url: str, why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(InvalidBlobUrl, match="use s3://bucket") as raised:
        parse_blob_url(url)
    assert why in str(raised.value)
    monkeypatch.setenv("DENSEALIGN_BLOB_URL", url)
    with pytest.raises(SettingsError) as from_settings:
        load_settings()
    assert f"DENSEALIGN_BLOB_URL={url!r}" in str(from_settings.value) and why in str(from_settings.value)
    assert "\n" not in str(from_settings.value)


def test_empty_blob_url_means_the_blob_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DENSEALIGN_BLOB_URL", "")
    assert Settings().blob_url is None
    monkeypatch.setenv("DENSEALIGN_BLOB_URL", "s3://densealign-blobs")
    assert Settings().blob_url == "s3://densealign-blobs"


# -- errors -------------------------------------------------------------------------------------


def test_objects_live_below_the_prefix(server: MotoServer) -> None:
    bucket = server.new_bucket()
    store = S3BlobStore(bucket, "/team-a/")
    digest = store.put("images/v0/p1/x.png", b"png")
    head = server.client().head_object(Bucket=bucket, Key="team-a/images/v0/p1/x.png")
    assert head["Metadata"] == {"sha256": digest} and head["ContentLength"] == 3


def test_a_missing_bucket_says_so_and_how_to_create_it(server: MotoServer) -> None:
    store = S3BlobStore("densealign-no-such-bucket")
    for call in (lambda: store.put("images/x.png", b"x"), lambda: store.get("images/x.png")):
        with pytest.raises(BlobBucketMissing) as raised:
            call()
        assert str(raised.value) == (
            f"the S3 bucket 'densealign-no-such-bucket' does not exist at {server.url}: create it "
            "(e.g. `aws s3 mb s3://densealign-no-such-bucket`) or point DENSEALIGN_BLOB_URL at an existing bucket"
        )


def test_a_missing_key_in_a_bucket_is_blob_not_found(server: MotoServer) -> None:
    store = S3BlobStore(server.new_bucket())
    with pytest.raises(BlobNotFound, match="'policies/v9/optimizer.pt'"):
        store.get("policies/v9/optimizer.pt")
    assert store.exists("policies/v9/optimizer.pt") is False


@pytest.mark.parametrize(
    ("key_id", "secret", "code"),
    [(None, "wrong-secret", "SignatureDoesNotMatch"), ("AKIAUNKNOWN000000000", "x", "InvalidAccessKeyId")],
)
def test_bad_credentials_name_the_object_and_the_variables(
    server: MotoServer, monkeypatch: pytest.MonkeyPatch, key_id: str | None, secret: str, code: str
) -> None:
    bucket = server.new_bucket()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id or server.key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    store = S3BlobStore(bucket, "p")
    with pytest.raises(BlobStoreAccessDenied) as raised:
        store.put("images/x.png", b"x")
    assert str(raised.value) == (
        f"the S3 endpoint {server.url} refused to write s3://{bucket}/p/images/x.png ({code}): check "
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and that they may read, write, list and delete in that bucket"
    )
    with pytest.raises(BlobStoreAccessDenied, match=f"refused to read s3://{bucket}/p/images/x.png"):
        store.get("images/x.png")


def test_a_full_bucket_is_blob_store_full(server: MotoServer) -> None:
    store = S3BlobStore(server.new_bucket())
    with Stubber(store.client) as stub:
        stub.add_client_error("put_object", service_error_code="XMinioStorageFull", http_status_code=507)
        with pytest.raises(BlobStoreFull) as raised:
            store.put("images/x.png", b"12345")
    assert isinstance(raised.value, BlobBucketFull) and raised.value.key == "images/x.png"
    assert str(raised.value) == (
        f"the S3 blob store is full (XMinioStorageFull) while writing 5 bytes to s3://{store.bucket}/images/x.png; "
        "nothing was stored: raise the bucket's quota, free space in the object store or point "
        "DENSEALIGN_BLOB_URL at another bucket"
    )
    assert not store.exists("images/x.png")


# -- multipart ----------------------------------------------------------------------------------


def test_a_large_blob_goes_up_in_parts_and_appears_whole(server: MotoServer) -> None:
    store = S3BlobStore(server.new_bucket(), multipart_threshold=6 << 20, part_size=5 << 20)
    data = os.urandom(11 << 20)
    sha = store.put("rounds/1/checkpoint.pt", data)
    head = server.client().head_object(Bucket=store.bucket, Key="rounds/1/checkpoint.pt")
    assert head["ETag"].strip('"').endswith("-3")  # three parts: 5 + 5 + 1 MiB
    assert head["Metadata"] == {"sha256": sha}
    assert store.get("rounds/1/checkpoint.pt") == data


def test_a_failed_multipart_upload_is_aborted_and_shows_nothing(
    server: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = S3BlobStore(server.new_bucket(), multipart_threshold=6 << 20, part_size=5 << 20)
    store.put("rounds/1/checkpoint.pt", b"the previous checkpoint")

    def fail(**_: Any) -> None:
        raise ConnectionResetError("network gone before the last part")

    monkeypatch.setattr(store.client, "complete_multipart_upload", fail)
    with pytest.raises(ConnectionResetError):
        store.put("rounds/1/checkpoint.pt", os.urandom(11 << 20))
    assert store.get("rounds/1/checkpoint.pt") == b"the previous checkpoint"
    assert server.client().list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []


# -- outages ------------------------------------------------------------------------------------


def count_attempts(store: S3BlobStore) -> list[str]:
    sent: list[str] = []
    store.client.meta.events.register("before-send.s3", lambda request, **_: sent.append(request.method))
    return sent


def test_an_unreachable_endpoint_fails_after_the_bounded_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    nobody = MotoServer(auth=False, port=free_port())  # never started: connections are refused
    use_server(monkeypatch, nobody)
    store = S3BlobStore("densealign-blobs", max_attempts=3, connect_timeout=1, outage_waits=(0.5, 1.0))
    sent = count_attempts(store)
    started = time.monotonic()
    with pytest.raises(BlobStoreUnreachable) as raised:
        store.put("images/x.png", b"x")
    took = time.monotonic() - started
    assert sent == ["PUT"] * 9  # 3 tries of 3 attempts each, 0.5 s and 1 s apart
    assert 1.5 <= took < 10 and raised.value.attempts == 9 and 1.5 <= raised.value.seconds <= took
    assert str(raised.value) == (
        f"could not write s3://densealign-blobs/images/x.png: the S3 endpoint {nobody.url} did not answer in "
        f"{raised.value.seconds:.1f} s (9 attempts, the last: EndpointConnectionError): check that the object "
        "store is up and AWS_ENDPOINT_URL points at it"
    )


def test_an_object_store_killed_mid_run_fails_clearly_then_recovers(monkeypatch: pytest.MonkeyPatch) -> None:
    server = MotoServer(auth=False).start()
    try:
        use_server(monkeypatch, server)
        bucket = server.new_bucket()
        store = S3BlobStore(
            bucket, "run", max_attempts=3, connect_timeout=1, read_timeout=5, outage_waits=(0.5,)
        )
        sha = store.put("images/v0/p1/a.png", b"before the crash")

        server.kill()  # kill -9: the process and everything it held in memory are gone
        for op, call in (
            ("write", lambda: store.put("images/v0/p1/b.png", b"during")),
            ("read", lambda: store.get("images/v0/p1/a.png")),
        ):
            started = time.monotonic()
            with pytest.raises(BlobStoreUnreachable, match=f"could not {op} s3://{bucket}/run/images/v0/p1/"):
                call()
            assert time.monotonic() - started < 10

        server.start()  # same port, same store object: no reconnect needed
        # moto keeps state in memory only, so the restarted server is empty: bucket and blob are gone
        with pytest.raises(BlobBucketMissing):
            store.get("images/v0/p1/a.png")
        server.client().create_bucket(Bucket=bucket)
        assert store.put("images/v0/p1/a.png", b"before the crash") == sha
        assert store.get("images/v0/p1/a.png") == b"before the crash"
    finally:
        server.stop()


def test_a_short_outage_is_ridden_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """The endpoint stops answering for about 1.5 s (an object store restarting) while a write and a
    read are under way: both finish once it is back, without an error. moto runs in-process here
    (its threaded server), so its buckets outlive the stop, as a real store's data outlive a restart."""
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    try:
        use_server(monkeypatch, MotoServer(auth=False, port=port))
        store = S3BlobStore(
            "densealign-outage", max_attempts=2, connect_timeout=1, outage_waits=(1.0, 2.0, 4.0)
        )
        store.client.create_bucket(Bucket="densealign-outage")
        store.put("images/v0/p1/old.png", b"written before")
        sent = count_attempts(store)

        moto.stop()
        restart = threading.Timer(1.5, moto.start)
        restart.start()
        started = time.monotonic()
        sha = store.put("images/v0/p1/new.png", b"written during the outage")
        assert store.get("images/v0/p1/old.png") == b"written before"
        took = time.monotonic() - started
        restart.join()

        assert 1.5 <= took < 8
        assert len(sent) >= 5  # the refused tries (2 attempts each) before the put went through, and the get
        assert store.get("images/v0/p1/new.png") == b"written during the outage"
        assert sha == hashlib.sha256(b"written during the outage").hexdigest()
    finally:
        moto.stop()
