"""A full disk under the blob store: a clear error, no half rows, no partial files, nothing current broken.

The full disk is simulated inside `core.storage` only: `DiskFillsUp` stands in for the `os` module
there, so files the blob store opens take the next `files_that_fit` writes whole and then half of one
more before that write fails with ENOSPC, as a filling disk does. One test also fills a real, tiny
tmpfs when the test may mount one (root), so the mapping of a real ENOSPC is checked too.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from rq import Queue, SimpleWorker
from rq.job import Job, JobStatus
from safetensors.torch import load
from sqlalchemy import func, select

from app.main import create_app
from core import storage
from core.db import make_engine, make_session_factory
from core.db.models import Pair, PolicyVersion, TrainingRound, Trajectory
from core.db.policies import get_current_policy
from core.queue import QUEUE_NAME, RqSamplingQueue
from core.settings import Settings
from core.storage import BlobStoreFull, LocalBlobStore, get_verified
from tests.conftest import skip_or_fail
from tests.worker.test_loop import label_everything, refill_and_work, seed_database
from trainer.main import build_trainer
from worker import sampling
from worker.main import build_sampler


class FillingFile:
    """A file on a disk with `disk.files_that_fit` whole files of room left, then half of one more."""

    def __init__(self, real: Any, disk: DiskFillsUp) -> None:
        self.real, self.disk = real, disk

    def write(self, data: bytes) -> int:
        if self.disk.files_that_fit > 0:
            self.disk.files_that_fit -= 1
            return int(self.real.write(data))
        self.real.write(data[: len(data) // 2])
        self.real.flush()
        self.disk.partial.append((os.readlink(f"/proc/self/fd/{self.real.fileno()}"), len(data) // 2))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self) -> FillingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.real.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class DiskFillsUp:
    """Stands in for `os` inside core.storage; `files_that_fit=None` is a disk with room to spare."""

    def __init__(self, files_that_fit: int | None = None) -> None:
        self.files_that_fit: int | float = float("inf") if files_that_fit is None else files_that_fit
        self.partial: list[tuple[str, int]] = []  # (temp file, bytes it held) of each write that failed

    def fill(self) -> None:
        self.files_that_fit = 0

    def fdopen(self, fd: int, mode: str) -> FillingFile:
        return FillingFile(os.fdopen(fd, mode), self)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> DiskFillsUp:
    fake = DiskFillsUp()
    monkeypatch.setattr(storage, "os", fake)
    return fake


def count(settings: Settings, model: Any) -> int:
    with make_session_factory(make_engine(settings.database_url))() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def full_message(root: Path) -> str:
    return f"the blob store at {root.resolve()} is full (no space left on device)"


def test_put_on_a_full_disk_names_the_store_and_leaves_no_temp_file(
    tmp_path: Path, disk: DiskFillsUp
) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    store.put("images/old.png", b"kept")
    disk.fill()
    with pytest.raises(BlobStoreFull) as raised:
        store.put("images/old.png", b"x" * 1000)
    assert str(raised.value) == (
        f"{full_message(tmp_path / 'blobs')} while writing 1000 bytes to blob 'images/old.png'; nothing was "
        "stored: free space there or point DENSEALIGN_BLOB_DIR at a bigger volume"
    )
    assert raised.value.errno == errno.ENOSPC and isinstance(raised.value, OSError)
    [(temp, held)] = disk.partial
    assert held == 500 and Path(temp).parent == tmp_path / "blobs" / "images"
    assert files_under(tmp_path / "blobs") == [tmp_path / "blobs" / "images" / "old.png"]
    assert store.get("images/old.png") == b"kept"  # the blob it was replacing is untouched


def test_other_write_errors_are_not_reported_as_a_full_disk(tmp_path: Path, disk: DiskFillsUp) -> None:
    store = LocalBlobStore(tmp_path / "blobs")

    def broken(*args: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    disk.fsync = broken  # type: ignore[attr-defined]
    with pytest.raises(OSError, match="Input/output error") as raised:
        store.put("a/b", b"data")
    assert not isinstance(raised.value, BlobStoreFull)
    assert files_under(tmp_path / "blobs") == []


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB filesystem, where the test may mount one (root, a kernel that allows it)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        # .ci/run runs as root, where the mount works: there a refused mount fails the test.
        skip_or_fail(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or done.returncode})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_real_full_filesystem_raises_blob_store_full(tiny_tmpfs: Path) -> None:
    store = LocalBlobStore(tiny_tmpfs)
    store.put("small", b"s" * 1000)
    with pytest.raises(BlobStoreFull, match=re.escape(full_message(tiny_tmpfs))):
        store.put("large", os.urandom(256 * 1024))
    assert files_under(tiny_tmpfs) == [tiny_tmpfs / "small"]


@pytest.mark.slow
@pytest.mark.parametrize("files_that_fit", [0, 2], ids=["first-blob", "third-blob"])
def test_worker_job_on_a_full_disk_fails_clearly_and_leaves_nothing(
    loop_settings: Settings, redis: Any, disk: DiskFillsUp, files_that_fit: int
) -> None:
    seed_database(loop_settings)
    sampling.install(build_sampler(loop_settings))
    disk.files_that_fit = files_that_fit
    queue = RqSamplingQueue(redis, retries=0)
    job_id = queue.enqueue_sample_pairs([1])
    worker = SimpleWorker([Queue(QUEUE_NAME, connection=redis)], connection=redis)
    worker.work(burst=True)
    job = Job.fetch(job_id, connection=redis)
    assert job.get_status() == JobStatus.FAILED
    result = job.latest_result()
    assert result is not None and result.exc_string is not None
    last_line = result.exc_string.strip().splitlines()[-1]
    assert last_line.startswith(f"core.storage.BlobStoreFull: {full_message(Path(loop_settings.blob_dir))}")
    assert len(disk.partial) == 1 and disk.partial[0][1] > 0  # it failed partway through a write
    assert count(loop_settings, Trajectory) == 0 and count(loop_settings, Pair) == 0
    assert files_under(Path(loop_settings.blob_dir)) == []  # neither the earlier blobs nor the temp file
    # once there is room again, the same job succeeds
    disk.files_that_fit = float("inf")
    job.requeue()
    worker.work(burst=True)
    assert job.get_status(refresh=True) == JobStatus.FINISHED
    assert count(loop_settings, Pair) == 1 and len(files_under(Path(loop_settings.blob_dir))) == 4


@pytest.mark.slow
def test_trainer_publishing_on_a_full_disk_keeps_the_current_version(
    loop_settings: Settings, redis: Any, disk: DiskFillsUp
) -> None:
    token = seed_database(loop_settings)
    sampling.install(build_sampler(loop_settings))
    client = TestClient(create_app(loop_settings))
    refill_and_work(loop_settings, redis)
    label_everything(client, token)
    assert build_trainer(loop_settings).run_once() == 1
    refill_and_work(loop_settings, redis)  # pairs of version 1, labelled for a second round
    assert label_everything(client, token) >= loop_settings.dpo.min_new_pairs

    def fill_after_the_last_step(step: int, total: int) -> None:
        if step == total:  # the next writes are the new version's files
            disk.fill()

    with pytest.raises(BlobStoreFull, match=re.escape(full_message(Path(loop_settings.blob_dir)))):
        build_trainer(loop_settings, progress=fill_after_the_last_step).run_once()
    assert len(disk.partial) == 1 and "policies/v2" in disk.partial[0][0]
    sessions = make_session_factory(make_engine(loop_settings.database_url))
    with sessions() as session:
        assert list(session.scalars(select(PolicyVersion.version).order_by(PolicyVersion.version))) == [0, 1]
        current = get_current_policy(session=session)
        assert session.scalars(select(TrainingRound.status).order_by(TrainingRound.id)).all() == [
            "done",
            "running",  # resumed, not lost, once there is room
        ]
    assert current.version == 1 and current.lora_key is not None and current.lora_sha256 is not None
    blobs = Path(loop_settings.blob_dir)
    assert not (blobs / "policies" / "v2").exists() or files_under(blobs / "policies" / "v2") == []
    assert not [p for p in files_under(blobs) if p.name.endswith(".part")]
    adapter = load(get_verified(LocalBlobStore(blobs), current.lora_key, current.lora_sha256))
    assert adapter and all(t.isfinite().all() for t in adapter.values())
    assert build_sampler(loop_settings).loaded_version == 1  # a new worker loads it (sha256 checked)
    disk.files_that_fit = float("inf")
    assert build_trainer(loop_settings).run_once() == 2
