"""The orphan sweep removes what killed jobs leave behind, and nothing else."""

from __future__ import annotations

import datetime as dt
import os
import time

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db.models import Pair, Trajectory
from core.storage import LocalBlobStore
from core.sweep import sweep_orphans

HOUR = dt.timedelta(hours=1)


def age(store: LocalBlobStore, key: str, seconds: float) -> None:
    path = store.root / key
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_sweep_removes_old_unreferenced_blobs_and_temp_files_only(
    session: Session, pair: Pair, blob_store: LocalBlobStore
) -> None:
    referenced = session.scalars(
        select(Trajectory.image_key).where(Trajectory.id == pair.trajectory_a_id)
    ).one()
    keys = {
        "referenced": referenced,
        "orphan": "images/v0/p1/orphan.png",
        "orphan_traj": "trajectories/v0/p1/orphan.safetensors",
        "young_orphan": "images/v0/p1/young.png",  # maybe a running job's, not inserted yet
        "adapter": "policies/v1/pytorch_lora_weights.safetensors",  # the trainer's: never swept
    }
    for key in keys.values():
        blob_store.put(key, b"x")
    temp = blob_store.root / "images/v0/p1/.tmp-abc123.part"
    temp.write_bytes(b"half a png")
    for name in ("referenced", "orphan", "orphan_traj", "adapter"):
        age(blob_store, keys[name], 2 * 3600)
    age(blob_store, "images/v0/p1/.tmp-abc123.part", 2 * 3600)

    removed = sweep_orphans(session=session, store=blob_store, older_than=HOUR)

    assert sorted(removed) == sorted([keys["orphan"], keys["orphan_traj"], "images/v0/p1/.tmp-abc123.part"])
    assert not temp.exists()
    for name in ("referenced", "young_orphan", "adapter"):
        assert blob_store.exists(keys[name]), name
    assert not blob_store.exists(keys["orphan"]) and not blob_store.exists(keys["orphan_traj"])
    assert sweep_orphans(session=session, store=blob_store, older_than=HOUR) == []
