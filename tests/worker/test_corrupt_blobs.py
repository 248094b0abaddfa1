"""A flipped byte in a stored adapter or trajectory is refused, with an error naming the blob, by every
production path that reads one: the worker's hot-swap, the trainer's start of a round, the REST
download, `densealign export` and `densealign eval`; a corrupt trajectory stops the round that would
train on it before anything is published."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.main import create_app
from core.db import make_engine, make_session_factory
from core.db.models import Pair, PolicyVersion, Trajectory
from core.db.policies import publish_policy_version, set_current_policy
from core.diffusion.policy import WEIGHT_NAME
from core.diffusion.sampler import TrajectoryCorrupt
from core.settings import SamplerConfig, Settings
from core.storage import BlobCorrupt, LocalBlobStore
from tests.worker.test_loop import label_everything, seed_database
from trainer.export import main as export_main
from trainer.judging import main as eval_main
from trainer.main import build_trainer
from worker.main import build_sampler

pytestmark = pytest.mark.slow


def small(settings: Settings) -> Settings:
    """16 px images and rounds that start at one decided pair: the same paths, little CPU."""
    return settings.model_copy(
        update={
            "sampler": SamplerConfig(num_steps=3, guidance_scale=7.5, image_size=16),
            "dpo": settings.dpo.model_copy(update={"min_new_pairs": 1}),
        }
    )


def flip_byte(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x01
    path.write_bytes(bytes(data))


def use_settings_env(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    """What the CLI commands read: the same database, blob store and model as `settings`."""
    for name, value in {
        "DENSEALIGN_DATABASE_URL": settings.database_url,
        "DENSEALIGN_BLOB_DIR": settings.blob_dir,
        "DENSEALIGN_MODEL__BASE_MODEL": settings.model.base_model,
        "DENSEALIGN_MODEL__DEVICE": "cpu",
        "DENSEALIGN_MODEL__LORA_RANK": str(settings.model.lora_rank),
        "DENSEALIGN_SAMPLER__NUM_STEPS": str(settings.sampler.num_steps),
        "DENSEALIGN_SAMPLER__IMAGE_SIZE": str(settings.sampler.image_size),
    }.items():
        monkeypatch.setenv(name, value)


def test_a_flipped_byte_in_a_published_adapter_is_refused_everywhere(
    loop_settings: Settings, redis: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any, tmp_path: Path
) -> None:
    settings = small(loop_settings)
    token = seed_database(settings)
    headers = {"Authorization": f"Bearer {token}"}
    sampler = build_sampler(settings)
    assert sampler.loaded_version == 0
    # Version 1: an adapter as the trainer writes it (the sampler's own, fresh one will do).
    with tempfile.TemporaryDirectory() as tmp:
        path, sha = sampler.policy.save_adapter(tmp)
        data = path.read_bytes()
    blobs = LocalBlobStore(settings.blob_dir)
    key = f"policies/v1/{WEIGHT_NAME}"
    assert blobs.put(key, data) == sha
    sessions = make_session_factory(make_engine(settings.database_url))
    with sessions() as session, session.begin():
        publish_policy_version(session=session, version=1, parent_version=0, lora_key=key, lora_sha256=sha)
    client = TestClient(create_app(settings))
    use_settings_env(monkeypatch, settings)
    # Intact, it is served and exported as it is.
    download = client.get("/api/v1/policies/1/lora.safetensors", headers=headers)
    assert download.status_code == 200 and download.content == data
    assert export_main(["--version", "1", "--out", str(tmp_path / "intact")]) == 0
    assert (tmp_path / "intact" / WEIGHT_NAME).read_bytes() == data

    # One bit flips inside the tensors (the file still parses as safetensors).
    local = blobs.local_path(key)
    assert local is not None
    flip_byte(local, len(data) - 16)
    said = f"blob {key!r} does not match its recorded sha256 {sha}: the file is corrupt"

    # The worker keeps its loaded version (the base model) and the job fails, naming the blob.
    with sessions() as session, pytest.raises(BlobCorrupt, match=re.escape(said)):
        sampler.sync_policy(session)
    assert sampler.loaded_version == 0
    # The trainer does not start a round from it.
    with pytest.raises(BlobCorrupt, match=re.escape(said)):
        build_trainer(settings)._start_state(1)
    # The REST download refuses it: a server error that says which blob, not a file under a wrong digest.
    refused = client.get("/api/v1/policies/1/lora.safetensors", headers=headers)
    assert refused.status_code == 500 and said in refused.json()["detail"]
    # export writes nothing and says why.
    capsys.readouterr()
    assert export_main(["--version", "1", "--out", str(tmp_path / "corrupt")]) == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / "corrupt").exists() or not any((tmp_path / "corrupt").iterdir())
    # eval, after a rollback to version 0 (the fix the message suggests), scores version 0 and refuses 1.
    with sessions() as session, session.begin():
        set_current_policy(session=session, version=0)
    assert eval_main(["--version", "1", "--prompts", "1", "--steps", "1"]) == 2
    out = capsys.readouterr()
    assert out.out.startswith("version 0: accepted ") and f"densealign eval: version 1: {said}" in out.err
    with sessions() as session:
        assert sampler.sync_policy(session) == 0


def test_a_flipped_byte_in_a_stored_trajectory_stops_the_round(loop_settings: Settings, redis: Any) -> None:
    settings = small(loop_settings)
    token = seed_database(settings)
    sampler = build_sampler(settings)
    [pair_id] = sampler.sample_pairs([1])
    assert label_everything(TestClient(create_app(settings)), token) == 1
    sessions = make_session_factory(make_engine(settings.database_url))
    with sessions() as session:
        pair = session.get_one(Pair, pair_id)
        key = session.get_one(Trajectory, pair.trajectory_b_id).latents_key
    assert key is not None
    local = LocalBlobStore(settings.blob_dir).local_path(key)
    assert local is not None
    flip_byte(local, local.stat().st_size - 100)  # a latent's bytes, near the end of the file

    said = f"trajectory blob {key!r} is corrupt: its bytes do not match the sha256"
    with pytest.raises(TrajectoryCorrupt, match=re.escape(said)):
        build_trainer(settings).run_once()
    with sessions() as session:
        assert list(session.scalars(select(PolicyVersion.version))) == [0]
