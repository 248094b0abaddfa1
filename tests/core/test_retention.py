"""Retention deletes exactly the latents no round will read again, marks them first, and the report
counts the bytes on disk.

One scene, against the real database and a local blob store: pairs trained by two finished rounds
(prunable), and every kind that must keep its latents: an open pair, a decided pair at other sampler
settings that no round took yet, a running round's pair, a failed round's pair, a trajectory shared by
a trained pair and an open one, and an evaluation pair (images only).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core import blob_keys
from core.blob_stores import open_blob_store
from core.db.campaigns import create_eval_pair, start_campaign
from core.db.errors import LatentsPruned
from core.db.models import Pair, Prompt, Trajectory
from core.db.pairs import create_pair, create_trajectory
from core.db.policies import publish_policy_version
from core.db.training import (
    PreferencePair,
    finish_training_round,
    record_round_pairs,
    round_preference_pairs,
    start_training_round,
)
from core.retention import prune_after_publish, prune_latents, storage_report
from core.storage import LocalBlobStore
from tests.s3 import shared_server, use_server

SETTINGS = {"num_steps": 2, "guidance_scale": 7.5}
OTHER_SETTINGS = {"num_steps": 4, "guidance_scale": 7.5}


@dataclass
class Scene:
    store: LocalBlobStore
    prunable: set[str] = field(default_factory=set)  # latents keys of the two finished rounds' pairs
    newest_round: set[str] = field(default_factory=set)  # of them, the newest finished round's
    kept: set[str] = field(default_factory=set)  # latents keys that must survive any prune
    images: set[str] = field(default_factory=set)
    rounds: dict[str, int] = field(default_factory=dict)
    trajectory_of: dict[str, int] = field(default_factory=dict)  # latents key -> trajectory id


def _trajectory(session: Session, scene: Scene, prompt: Prompt, size: int, sampler: dict[str, float]) -> int:
    latents_key, image_key = blob_keys.trajectory(0, prompt.id)
    scene.store.put(latents_key, os.urandom(size))
    scene.store.put(image_key, os.urandom(size // 10))
    scene.images.add(image_key)
    row = create_trajectory(
        session=session,
        prompt_id=prompt.id,
        policy_version=0,
        seed=random.getrandbits(40),
        image_key=image_key,
        sampler=sampler,
        latents_key=latents_key,
        log_probs_key=latents_key,
    )
    scene.trajectory_of[latents_key] = row.id
    return row.id


def _keys(session: Session, *trajectory_ids: int) -> set[str]:
    rows = session.scalars(select(Trajectory.latents_key).where(Trajectory.id.in_(trajectory_ids)))
    return {key for key in rows if key is not None}


def _pair(
    session: Session, scene: Scene, prompt: Prompt, size: int, sampler: dict[str, float] = SETTINGS
) -> Pair:
    a = _trajectory(session, scene, prompt, size, sampler)
    b = _trajectory(session, scene, prompt, size + 7, sampler)
    return create_pair(session=session, trajectory_a_id=a, trajectory_b_id=b)


def _round(session: Session, pairs: list[Pair], status: str, produced: int | None = None) -> int:
    round_ = start_training_round(session=session, base_version=0)
    decided = [PreferencePair(p.id, "p", 0, p.trajectory_a_id, p.trajectory_b_id, 1) for p in pairs]
    record_round_pairs(session=session, round_id=round_.id, pairs=decided)
    if status != "running":
        finish_training_round(session=session, round_id=round_.id, status=status, produced_version=produced)
    return round_.id


@pytest.fixture
def scene(session: Session, prompt: Prompt, policy_version: object, blob_store: LocalBlobStore) -> Scene:
    scene = Scene(blob_store)
    for version in (1, 2):
        publish_policy_version(
            session=session, version=version, parent_version=0, lora_key=f"l/{version}", lora_sha256="0" * 64
        )
    # trained by finished rounds: round 1 (two pairs, one of them sharing a trajectory with an open pair)
    # and round 2, the newest finished round
    first, second = _pair(session, scene, prompt, 3000), _pair(session, scene, prompt, 3100)
    shared = _pair(session, scene, prompt, 3200)
    open_with_shared = create_pair(
        session=session,
        trajectory_a_id=shared.trajectory_a_id,
        trajectory_b_id=_trajectory(session, scene, prompt, 3300, SETTINGS),
    )
    newest = _pair(session, scene, prompt, 3400)
    scene.rounds["done"] = _round(session, [first, second, shared], "done", produced=1)
    scene.rounds["newest"] = _round(session, [newest], "done", produced=2)
    # never pruned: open, decided but waiting at other sampler settings, running round, failed round
    open_pair = _pair(session, scene, prompt, 3500)
    waiting = _pair(session, scene, prompt, 3600, sampler=OTHER_SETTINGS)
    running = _pair(session, scene, prompt, 3700)
    failed = _pair(session, scene, prompt, 3800)
    scene.rounds["failed"] = _round(session, [failed], "failed")
    scene.rounds["running"] = _round(session, [running], "running")

    scene.prunable = _keys(
        session,
        first.trajectory_a_id,
        first.trajectory_b_id,
        second.trajectory_a_id,
        second.trajectory_b_id,
        shared.trajectory_b_id,
        newest.trajectory_a_id,
        newest.trajectory_b_id,
    )
    scene.newest_round = _keys(session, newest.trajectory_a_id, newest.trajectory_b_id)
    scene.kept = _keys(
        session,
        shared.trajectory_a_id,  # also in the open pair
        open_with_shared.trajectory_b_id,
        *(t for p in (open_pair, waiting, running, failed) for t in (p.trajectory_a_id, p.trajectory_b_id)),
    )
    # an evaluation pair: images only, under images/eval/
    campaign = start_campaign(
        session=session, version=1, baseline_version=0, target_votes=4, prompt_split="train"
    )
    sides = []
    for version in (1, 0):
        image = blob_keys.eval_image(campaign.id, version, prompt.id)
        blob_store.put(image, os.urandom(500))
        scene.images.add(image)
        sides.append(
            create_trajectory(
                session=session, prompt_id=prompt.id, policy_version=version, seed=7, image_key=image
            ).id
        )
    create_eval_pair(
        session=session,
        campaign_id=campaign.id,
        version_trajectory_id=sides[0],
        baseline_trajectory_id=sides[1],
        rng=random.Random(0),
    )
    # the trainer's blobs
    blob_store.put(blob_keys.adapter(1), os.urandom(900))
    blob_store.put(blob_keys.optimizer(1), os.urandom(1900))
    blob_store.put(blob_keys.round_checkpoint(scene.rounds["running"]), os.urandom(2900))
    session.flush()
    return scene


def _on_disk(store: LocalBlobStore) -> dict[str, int]:
    root = Path(store.root)
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def _pruned_marks(session: Session) -> set[str]:
    rows = session.scalars(select(Trajectory.latents_key).where(Trajectory.latents_pruned_at.is_not(None)))
    return {key for key in rows if key is not None}


def test_prune_deletes_exactly_the_latents_of_finished_rounds_and_marks_them(
    session: Session, scene: Scene
) -> None:
    before = _on_disk(scene.store)
    assert len(scene.prunable) == 7 and len(scene.kept) == 10

    result = prune_latents(session=session, store=scene.store, keep_rounds=0)

    after = _on_disk(scene.store)
    assert set(before) - set(after) == scene.prunable
    assert result.marked == 7
    assert (result.deleted.files, result.deleted.bytes) == (7, sum(before[k] for k in scene.prunable))
    assert _pruned_marks(session) == scene.prunable
    assert scene.kept <= set(after) and scene.images <= set(after)
    # a second run finds nothing more to do
    again = prune_latents(session=session, store=scene.store, keep_rounds=0)
    assert (again.marked, again.deleted.files) == (0, 0)


def test_keep_rounds_keeps_the_newest_finished_rounds_latents(session: Session, scene: Scene) -> None:
    result = prune_latents(session=session, store=scene.store, keep_rounds=1)

    assert result.marked == 5
    assert _pruned_marks(session) == scene.prunable - scene.newest_round
    assert scene.newest_round <= set(_on_disk(scene.store))


def test_a_dry_run_changes_nothing_and_says_what_a_prune_deletes(session: Session, scene: Scene) -> None:
    before = _on_disk(scene.store)

    dry = prune_latents(session=session, store=scene.store, dry_run=True)

    assert _on_disk(scene.store) == before and _pruned_marks(session) == set()
    assert (dry.dry_run, dry.marked) == (True, 0)
    real = prune_latents(session=session, store=scene.store)
    assert (
        (dry.deleted.files, dry.deleted.bytes)
        == (real.deleted.files, real.deleted.bytes)
        == (
            7,
            sum(before[k] for k in scene.prunable),
        )
    )


def test_report_counts_the_bytes_on_disk_and_what_is_prunable(session: Session, scene: Scene) -> None:
    disk = _on_disk(scene.store)

    def total(prefix: str, but: str | None = None) -> tuple[int, int]:
        keys = [k for k in disk if k.startswith(prefix) and not (but and k.startswith(but))]
        return len(keys), sum(disk[k] for k in keys)

    report = storage_report(session=session, store=scene.store)

    got = {name: (u.files, u.bytes) for name, u in report.usage.items()}
    assert got == {
        "trajectories": total("trajectories/"),
        "images": total("images/", but="images/eval/"),
        "eval_images": total("images/eval/"),
        "policies": total("policies/"),
        "rounds": total("rounds/"),
    }
    assert (report.total.files, report.total.bytes) == (len(disk), sum(disk.values()))
    assert got["trajectories"][0] == 17 and got["eval_images"] == (2, 1000)
    assert (report.prunable.files, report.prunable.bytes) == (7, sum(disk[k] for k in scene.prunable))
    t = report.trajectories
    assert (t.trajectories, t.kept, t.pruned, t.without) == (19, 17, 0, 2)

    prune_latents(session=session, store=scene.store)
    after = storage_report(session=session, store=scene.store)
    assert after.usage["trajectories"].files == 10 and after.prunable.files == 0 and after.pending.files == 0
    assert (after.trajectories.kept, after.trajectories.pruned) == (10, 7)


def test_a_crash_between_marking_and_deleting_is_finished_by_the_next_run(
    session: Session, scene: Scene, monkeypatch: pytest.MonkeyPatch
) -> None:
    deleted: list[str] = []
    real_delete = scene.store.delete

    def crash_after_two(key: str) -> None:
        if len(deleted) == 2:
            raise OSError("killed mid-prune")
        real_delete(key)
        deleted.append(key)

    monkeypatch.setattr(scene.store, "delete", crash_after_two)
    with pytest.raises(OSError, match="killed mid-prune"):
        prune_latents(session=session, store=scene.store)

    # every prunable row is marked (committed before any delete); two blobs went, five remain
    assert _pruned_marks(session) == scene.prunable
    left = scene.prunable & set(_on_disk(scene.store))
    assert len(left) == 5 and set(deleted) == scene.prunable - left
    report = storage_report(session=session, store=scene.store)
    assert report.pending.files == 5 and report.prunable.files == 0

    monkeypatch.setattr(scene.store, "delete", real_delete)
    rerun = prune_latents(session=session, store=scene.store)
    assert (rerun.marked, rerun.deleted.files) == (0, 5)
    assert not scene.prunable & set(_on_disk(scene.store))


def test_reading_a_pruned_trajectory_names_it(session: Session, scene: Scene) -> None:
    prune_latents(session=session, store=scene.store)

    with pytest.raises(LatentsPruned) as caught:
        round_preference_pairs(session=session, round_id=scene.rounds["done"])
    assert scene.trajectory_of[_key_of(session, caught.value.trajectory_id)] == caught.value.trajectory_id
    assert f"trajectory {caught.value.trajectory_id}'s latents (trajectories/" in str(caught.value)
    assert "were pruned at" in str(caught.value)
    # the running round's pairs read as before
    assert len(round_preference_pairs(session=session, round_id=scene.rounds["running"])) == 1


def _key_of(session: Session, trajectory_id: int) -> str:
    key = session.scalar(select(Trajectory.latents_key).where(Trajectory.id == trajectory_id))
    assert key is not None
    return key


def test_the_trainers_hook_prunes_after_a_version_and_never_stops_it(
    session: Session, scene: Scene, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    sessions = sessionmaker(bind=session.connection(), join_transaction_mode="create_savepoint")
    published: list[int] = []
    hook = prune_after_publish(sessions=sessions, store=scene.store, keep_rounds=1, then=published.append)

    def broken(key: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(scene.store, "delete", broken)
    hook(2)  # the prune fails after marking: logged, and the trainer's own callback still runs
    assert published == [2] and "pruning latents after version 2 failed" in caplog.text
    monkeypatch.undo()
    hook(3)
    assert published == [2, 3]
    assert not (scene.prunable - scene.newest_round) & set(_on_disk(scene.store))
    assert scene.newest_round <= set(_on_disk(scene.store))


def test_prune_and_report_on_an_s3_bucket(
    session: Session, prompt: Prompt, policy_version: object, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    server = shared_server()
    use_server(monkeypatch, server)
    store = open_blob_store(f"s3://{server.new_bucket()}/deploy-1", str(tmp_path / "unused"))
    publish_policy_version(session=session, version=1, parent_version=0, lora_key="l/1", lora_sha256="0" * 64)
    sizes: dict[str, int] = {}
    ids = []
    for i in range(4):
        latents, image = blob_keys.trajectory(0, prompt.id)
        for key, size in ((latents, 2000 + i), (image, 300 + i)):
            store.put(key, os.urandom(size))
            sizes[key] = size
        ids.append(
            create_trajectory(
                session=session,
                prompt_id=prompt.id,
                policy_version=0,
                seed=i,
                image_key=image,
                latents_key=latents,
                sampler=SETTINGS,
            ).id
        )
    trained = create_pair(session=session, trajectory_a_id=ids[0], trajectory_b_id=ids[1])
    create_pair(session=session, trajectory_a_id=ids[2], trajectory_b_id=ids[3])
    _round(session, [trained], "done", produced=1)
    trained_keys = _keys(session, ids[0], ids[1])

    report = storage_report(session=session, store=store)
    assert (report.usage["trajectories"].files, report.usage["trajectories"].bytes) == (4, 8006)
    assert (report.usage["images"].files, report.usage["images"].bytes) == (4, 1206)
    assert (report.prunable.files, report.prunable.bytes) == (2, 4001)

    result = prune_latents(session=session, store=store)
    assert (result.marked, result.deleted.files) == (2, 2)
    assert [store.exists(k) for k in sorted(sizes) if k.startswith("trajectories/")] == [
        k not in trained_keys for k in sorted(sizes) if k.startswith("trajectories/")
    ]
    assert _pruned_marks(session) == trained_keys
