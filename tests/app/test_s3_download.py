"""The adapter download with the blob store in an S3 bucket (a moto server, tests/s3.py): the app
checks the object's sha256 and streams it in chunks, never reading it whole, and refuses a corrupt
one. The app tests' `blob_store` fixture is replaced here, so `app` and the clients use the bucket."""

from __future__ import annotations

import hashlib
import os
from typing import Any, BinaryIO

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from core.blob_stores import open_blob_store
from core.db.policies import publish_policy_version
from core.storage_s3 import S3BlobStore, make_client
from tests.s3 import MotoServer, free_port, shared_server, use_server

KEY = "policies/v1/pytorch_lora_weights.safetensors"


@pytest.fixture
def blob_store(monkeypatch: pytest.MonkeyPatch) -> S3BlobStore:
    server = shared_server()
    use_server(monkeypatch, server)
    store = open_blob_store(f"s3://{server.new_bucket()}/app", "unused")
    assert isinstance(store, S3BlobStore)
    return store


class ReadSpy:
    """Records the size of every read the app makes of the objects it opens; `get` is forbidden."""

    def __init__(self, store: S3BlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reads: list[int] = []
        self.opened = 0
        real_open = store.open

        def spying_open(key: str) -> BinaryIO:
            handle = real_open(key)
            real_read = handle.read
            self.opened += 1

            def read(size: int = -1) -> bytes:
                data = real_read(size)
                self.reads.append(len(data))
                return data

            handle.read = read  # type: ignore[method-assign]
            return handle

        def no_get(key: str) -> Any:
            raise AssertionError(f"the download read {key} whole")

        monkeypatch.setattr(store, "open", spying_open)
        monkeypatch.setattr(store, "get", no_get)


def test_lora_download_streams_from_the_bucket_with_its_sha256(
    admin_client: TestClient,
    policy_version: object,
    session: Session,
    blob_store: S3BlobStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = os.urandom((5 << 20) // 2)  # 2.5 MiB: three chunks of at most 1 MiB
    digest = blob_store.put(KEY, data)
    publish_policy_version(session=session, version=1, parent_version=0, lora_key=KEY, lora_sha256=digest)
    spy = ReadSpy(blob_store, monkeypatch)

    response = admin_client.get("/api/v1/policies/1/lora.safetensors")

    assert response.status_code == 200
    assert response.content == data and hashlib.sha256(response.content).hexdigest() == digest
    assert response.headers["x-content-sha256"] == digest
    assert response.headers["content-disposition"] == 'attachment; filename="lora-v1.safetensors"'
    # two streamed passes (verify, then send), each in chunks of at most 1 MiB
    assert spy.opened == 2
    assert max(spy.reads) == 1 << 20 and sum(spy.reads) == 2 * len(data)


def test_a_corrupt_adapter_in_the_bucket_is_refused(
    admin_client: TestClient, policy_version: object, session: Session, blob_store: S3BlobStore
) -> None:
    digest = blob_store.put(KEY, b"the adapter as published")
    blob_store.client.put_object(Bucket=blob_store.bucket, Key=f"app/{KEY}", Body=b"the adapter, bit-flipped")
    publish_policy_version(session=session, version=1, parent_version=0, lora_key=KEY, lora_sha256=digest)

    response = admin_client.get("/api/v1/policies/1/lora.safetensors")

    assert response.status_code == 500
    assert KEY in response.json()["detail"] and digest in response.json()["detail"]


def test_an_unreachable_object_store_is_503_naming_the_object(
    annotator: tuple[TestClient, Any], pair: Any, blob_store: S3BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same store object, now pointed at a port nobody listens on, with 2 quick attempts.
    dead = MotoServer(auth=False, port=free_port())
    use_server(monkeypatch, dead)
    monkeypatch.setattr(blob_store, "client", make_client(max_attempts=2, connect_timeout=1, read_timeout=1))
    monkeypatch.setattr(blob_store, "endpoint", dead.url)
    monkeypatch.setattr(blob_store, "max_attempts", 2)
    monkeypatch.setattr(blob_store, "outage_waits", ())
    api, _ = annotator

    response = api.get(f"/api/v1/pairs/{pair.id}/images/a")

    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    assert response.json()["detail"].startswith(f"could not read s3://{blob_store.bucket}/app/images/")
    assert f"the S3 endpoint {dead.url} did not answer in " in response.json()["detail"]
    assert "(2 attempts, the last: EndpointConnectionError)" in response.json()["detail"]
