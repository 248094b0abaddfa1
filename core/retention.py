"""What the blob store holds (bytes by kind), and deleting the latents nothing will read again.

A trajectory's latents (its .safetensors blob: every step's latent in float16) are most of the store,
and only training rounds read them; once every pair a trajectory is in was trained by a finished round
no round takes it again (core/db/retention.py says exactly which, and what is always kept). Images
stay: the labelling pages, the dashboard and the export show them.

Pruning marks first and deletes second: one transaction stamps `latents_pruned_at` on every prunable
trajectory and commits, then the blobs of all marked trajectories still on disk are deleted. A crash in
between leaves marked rows whose blobs still exist, never a row pointing at a missing blob without the
marker, and the next prune (by hand, or the trainer's after its next version) deletes them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import cast

from sqlalchemy.orm import Session, sessionmaker

from core.db.retention import (
    LatentsCounts,
    latents_counts,
    mark_latents_pruned,
    prunable_latents,
    pruned_latents_keys,
)
from core.storage import BlobStore, ListableBlobStore

logger = logging.getLogger(__name__)

# Kinds of blob, by key prefix (core/blob_keys.py); the first that matches names a key's kind.
KINDS = (
    ("eval_images", "images/eval/"),
    ("trajectories", "trajectories/"),
    ("images", "images/"),
    ("policies", "policies/"),
    ("rounds", "rounds/"),
)
TRAJECTORIES = "trajectories"


@dataclass
class Usage:
    files: int = 0
    bytes: int = 0

    def add(self, size: int) -> None:
        self.files += 1
        self.bytes += size


@dataclass
class StorageReport:
    """Bytes and files by kind, trajectory rows by what became of their latents, and what is prunable."""

    usage: dict[str, Usage]
    temp_files: Usage  # `.tmp-*.part` files a killed write left (the orphan sweep removes them)
    trajectories: LatentsCounts
    prunable: Usage  # latents the current retention settings would delete now
    pending: Usage  # latents marked pruned whose blobs are still on disk (a prune interrupted)
    keep_rounds: int

    @property
    def total(self) -> Usage:
        return Usage(sum(u.files for u in self.usage.values()), sum(u.bytes for u in self.usage.values()))

    def to_dict(self) -> dict[str, object]:
        return asdict(self) | {"total": asdict(self.total)}


@dataclass
class PruneResult:
    marked: int  # trajectories newly marked pruned by this run
    # blobs deleted, this run's and any an interrupted run left; bytes only where the store has local paths
    deleted: Usage = field(default_factory=Usage)
    dry_run: bool = False


def blob_size(store: BlobStore, key: str, *, read: bool = True) -> int:
    """A blob's size in bytes: from the file system when the store has a path for it, else by reading
    it (an S3 store: one GET per blob, so a report there takes a while) or, with `read=False`, 0."""
    path = store.local_path(key)
    if path is not None:
        try:
            return path.stat().st_size
        except FileNotFoundError:  # deleted meanwhile
            return 0
    return len(store.get(key)) if read else 0


def _sizes(store: ListableBlobStore, prefix: str) -> tuple[dict[str, int], Usage]:
    """key -> size of every blob under `prefix`, and the temp files there."""
    sizes, temp = {}, Usage()
    for key, _mtime, is_temp in store.files_under(prefix):
        if is_temp:
            temp.add(_temp_size(store, key))
        else:
            sizes[key] = blob_size(store, key)
    return sizes, temp


def _temp_size(store: BlobStore, key: str) -> int:
    # temp files are not valid keys (they start with a dot); only the local store lists them
    root = getattr(store, "root", None)
    if root is None:
        return 0
    try:
        return int((root / key).stat().st_size)
    except FileNotFoundError:
        return 0


def storage_report(*, session: Session, store: ListableBlobStore, keep_rounds: int = 0) -> StorageReport:
    """Walk the store once per top-level prefix and read the trajectory rows."""
    usage = {name: Usage() for name in ("trajectories", "images", "eval_images", "policies", "rounds")}
    temp = Usage()
    traj_sizes: dict[str, int] = {}
    for top in sorted({prefix.split("/")[0] for _, prefix in KINDS}):
        sizes, stray = _sizes(store, top)
        temp.files, temp.bytes = temp.files + stray.files, temp.bytes + stray.bytes
        for key, size in sizes.items():
            kind = next(name for name, prefix in KINDS if key.startswith(prefix))
            usage[kind].add(size)
            if kind == TRAJECTORIES:
                traj_sizes[key] = size
    prunable, pending = Usage(), Usage()
    for _tid, key in prunable_latents(session=session, keep_rounds=keep_rounds):
        prunable.add(traj_sizes.get(key, 0))
    for key in pruned_latents_keys(session=session) & traj_sizes.keys():
        pending.add(traj_sizes[key])
    return StorageReport(usage, temp, latents_counts(session=session), prunable, pending, keep_rounds)


def prune_latents(
    *, session: Session, store: ListableBlobStore, keep_rounds: int = 0, dry_run: bool = False
) -> PruneResult:
    """Mark every prunable trajectory and commit, then delete the blobs of all marked trajectories still
    in the store (so a run after a crash finishes the last one's deletes). A dry run changes nothing and
    reports what would be deleted."""
    if dry_run:
        stored = {key for key, _mtime, is_temp in store.files_under(TRAJECTORIES) if not is_temp}
        result = PruneResult(marked=0, dry_run=True)
        for _tid, key in prunable_latents(session=session, keep_rounds=keep_rounds):
            if key in stored:
                result.deleted.add(blob_size(store, key))
        return result
    marked = mark_latents_pruned(session=session, keep_rounds=keep_rounds)
    session.commit()  # the markers first: from here on a missing blob is explained
    result = PruneResult(marked=marked)
    pending = pruned_latents_keys(session=session)
    for key, _mtime, is_temp in store.files_under(TRAJECTORIES):
        if not is_temp and key in pending:
            size = blob_size(store, key, read=False)  # a blob about to go is not downloaded to size it
            store.delete(key)
            result.deleted.add(size)
    if marked or result.deleted.files:
        logger.info(
            "retention: marked %d trajectories' latents pruned, deleted %d blobs (%s)",
            marked,
            result.deleted.files,
            human_bytes(result.deleted.bytes),
        )
    return result


def prune_after_publish(
    *,
    sessions: sessionmaker[Session],
    store: BlobStore,
    keep_rounds: int,
    then: Callable[[int], None] | None = None,
) -> Callable[[int], None]:
    """The trainer's `on_publish` under DENSEALIGN_RETENTION__DROP_TRAINED_LATENTS: prune once the new
    version's round is closed ('done'), then call `then`. A failed prune is logged, not raised: the
    trainer goes on, and the next version's prune (or `densealign storage prune`) finishes it."""
    if not hasattr(store, "files_under"):
        raise ValueError(f"the blob store {store!r} cannot list its files, which pruning latents needs")
    listed = cast(ListableBlobStore, store)

    def on_publish(version: int) -> None:
        try:
            with sessions() as session:
                prune_latents(session=session, store=listed, keep_rounds=keep_rounds)
        except Exception:
            logger.exception(
                "retention: pruning latents after version %d failed; the next prune retries", version
            )
        if then is not None:
            then(version)

    return on_publish


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
