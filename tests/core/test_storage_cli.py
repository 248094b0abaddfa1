"""`densealign storage report|prune` through the console script's front door: against a scratch
database it prints what it deletes and the report as JSON; bad input gets one line and a non-zero exit."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from core import blob_keys
from core.db import make_engine, make_session_factory
from core.db.models import Trajectory
from core.db.pairs import create_pair, create_trajectory
from core.db.policies import publish_policy_version
from core.db.prompts import add_prompt
from core.db.training import PreferencePair, finish_training_round, record_round_pairs, start_training_round
from core.storage import LocalBlobStore
from densealign.cli import main
from tests.conftest import migrate, scratch_postgres_database


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in [k for k in os.environ if k.startswith("DENSEALIGN_")]:
        if not name.startswith(("DENSEALIGN_TEST_", "DENSEALIGN_REQUIRE_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("DENSEALIGN_BLOB_DIR", str(tmp_path / "blobs"))
    return tmp_path / "blobs"


@pytest.fixture
def database(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    with scratch_postgres_database() as url:
        migrate(url)
        monkeypatch.setenv("DENSEALIGN_DATABASE_URL", url)
        yield url


def _one_trained_pair(url: str, store: LocalBlobStore) -> list[str]:
    """Version 0 and 1, one pair trained by a finished round, one open pair; the trained pair's keys."""
    engine = make_engine(url)
    trained: list[str] = []
    with make_session_factory(engine)() as session, session.begin():
        publish_policy_version(session=session, version=0)
        publish_policy_version(
            session=session, version=1, parent_version=0, lora_key="l", lora_sha256="0" * 64
        )
        prompt = add_prompt(session=session, text="a red circle")
        ids = []
        for i in range(4):
            latents, image = blob_keys.trajectory(0, prompt.id)
            store.put(latents, b"x" * (1000 + i))
            store.put(image, b"png")
            ids.append(
                create_trajectory(
                    session=session,
                    prompt_id=prompt.id,
                    policy_version=0,
                    seed=i,
                    image_key=image,
                    latents_key=latents,
                    log_probs_key=latents,
                    sampler={"num_steps": 2},
                ).id
            )
            if i < 2:
                trained.append(latents)
        done = create_pair(session=session, trajectory_a_id=ids[0], trajectory_b_id=ids[1])
        create_pair(session=session, trajectory_a_id=ids[2], trajectory_b_id=ids[3])
        round_ = start_training_round(session=session, base_version=0)
        record_round_pairs(
            session=session, round_id=round_.id, pairs=[PreferencePair(done.id, "p", 0, ids[0], ids[1], 1)]
        )
        finish_training_round(session=session, round_id=round_.id, status="done", produced_version=1)
    engine.dispose()
    return trained


def test_report_and_prune_print_what_the_store_holds_and_what_went(
    database: str, clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = LocalBlobStore(clean_env)
    trained = _one_trained_pair(database, store)

    assert main(["storage", "report", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["usage"]["trajectories"] == {"files": 4, "bytes": 1000 + 1001 + 1002 + 1003}
    assert report["usage"]["images"] == {"files": 4, "bytes": 12}
    assert report["prunable"] == {"files": 2, "bytes": 2001}
    assert report["total"] == {"files": 8, "bytes": 4018}

    assert main(["storage", "prune", "--dry-run"]) == 0
    assert (
        capsys.readouterr().out.strip()
        == "dry run: would delete 2 latents blobs, 2001 bytes (2.0 KiB); nothing changed"
    )
    assert all(store.exists(key) for key in trained)

    assert main(["storage", "prune"]) == 0
    assert (
        capsys.readouterr().out.strip()
        == "marked 2 trajectories pruned; deleted 2 latents blobs, 2001 bytes (2.0 KiB)"
    )
    assert not any(store.exists(key) for key in trained)
    engine = make_engine(database)
    with make_session_factory(engine)() as session:
        marked = {
            t.latents_key for t in session.query(Trajectory).filter(Trajectory.latents_pruned_at.is_not(None))
        }
    engine.dispose()
    assert marked == set(trained)

    assert main(["storage", "report"]) == 0
    out = capsys.readouterr().out
    assert "trajectory rows: 4 (2 with latents, 2 pruned, 0 image only)" in out
    assert "prunable now (keep_rounds=0): 0 latents, 0 bytes (0 B)" in out


@pytest.mark.parametrize(
    ("argv", "env", "code", "message"),
    [
        ([], {}, 2, "densealign storage: the following arguments are required: ACTION"),
        (["shrink"], {}, 2, "densealign storage: argument ACTION: invalid choice: 'shrink'"),
        (
            ["prune", "--keep-rounds", "-1"],
            {},
            2,
            "densealign storage prune: argument --keep-rounds: -1 must be 0 or more",
        ),
        (
            ["report", "--keep-rounds", "two"],
            {},
            2,
            "densealign storage report: argument --keep-rounds: 'two' is not a whole number of rounds",
        ),
        (
            ["report"],
            {"DENSEALIGN_RETENTION__KEEP_ROUNDS": "-3"},
            2,
            "densealign storage: invalid settings: DENSEALIGN_RETENTION__KEEP_ROUNDS='-3'",
        ),
        (
            ["prune"],
            {"DENSEALIGN_DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:1/nowhere"},
            1,
            "densealign storage: OperationalError",
        ),
    ],
)
def test_bad_input_gets_one_line_and_a_non_zero_exit(
    clean_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    env: dict[str, str],
    code: int,
    message: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        got = main(["storage", *argv])
    except SystemExit as exc:  # argparse's errors exit
        got = int(exc.code or 0)
    captured = capsys.readouterr()
    assert got == code
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), captured.err
