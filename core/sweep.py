"""Remove what a killed sampling job leaves behind: blobs no row references, and stray temp files.

A job writes its trajectories and images first and inserts their rows last (worker/sampling.py), so a
worker killed in between leaves blobs nothing points at, and a kill mid-write leaves a `.tmp-*.part`
file. Only files older than `older_than` are touched: a running job's blobs are unreferenced until
its insert, so the age must exceed the longest job (the job timeout). Policy adapters and round
checkpoints are the trainer's and are never swept here.
"""

from __future__ import annotations

import datetime as dt
import logging
import time

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.blob_keys import SAMPLED_PREFIXES
from core.db.models import Trajectory
from core.storage import ListableBlobStore

logger = logging.getLogger(__name__)


def sweep_orphans(*, session: Session, store: ListableBlobStore, older_than: dt.timedelta) -> list[str]:
    """Delete unreferenced sampled blobs and temp files older than `older_than`; returns their keys."""
    cutoff = time.time() - older_than.total_seconds()
    candidates = [
        (key, is_temp)
        for prefix in SAMPLED_PREFIXES
        for key, mtime, is_temp in store.files_under(prefix)
        if mtime < cutoff
    ]
    if not candidates:
        return []
    referenced: set[str] = set()
    for row in session.execute(
        select(Trajectory.image_key, Trajectory.latents_key, Trajectory.log_probs_key)
    ):
        referenced.update(key for key in row if key)
    removed = [key for key, is_temp in candidates if is_temp or key not in referenced]
    for key in removed:
        store.delete_file(key)
    if removed:
        logger.info("removed %d orphan blob(s) and temp file(s) older than %s", len(removed), older_than)
    return removed
