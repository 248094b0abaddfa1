"""What `densealign migrate`, `densealign invite` and `densealign eval` leave behind and print, run
in-process against a scratch Postgres database (tests/test_operator_path.py runs migrate and invite
as processes on the happy path; this pins their values and repeats).

- migrate: version 0 is recorded once for the configured base model; migrating again keeps one
  version 0, leaves the current version alone, and warns when the base model setting changed.
- invite: the link is DENSEALIGN_PUBLIC_BASE_URL + /invite/<secret>, the secret redeems for the
  named labeller and role within DENSEALIGN_INVITE_TTL_HOURS; a taken name fails with the reason.
- eval: each printed line equals a recomputation with a stock diffusers pipeline (the adapter loaded
  with `load_lora_weights`) and the judge, on the same prompts and seeds.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import select

from app.invite import main as invite_main
from core.db import make_engine, make_session_factory
from core.db.base import utcnow
from core.db.labellers import accept_invite, find_invite
from core.db.migrate import main as migrate_main
from core.db.models import PolicyVersion
from core.db.policies import get_current_policy, publish_policy_version
from tests.conftest import scratch_postgres_database

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ROOT / "models" / "densealign-shapes"


@pytest.fixture
def database(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An empty scratch database, named to the commands by DENSEALIGN_DATABASE_URL."""
    for name in [k for k in os.environ if k.startswith("DENSEALIGN_")]:
        if name not in (
            "DENSEALIGN_REQUIRE_SERVICES",
            "DENSEALIGN_TEST_POSTGRES_URL",
            "DENSEALIGN_TEST_REDIS_URL",
        ):
            monkeypatch.delenv(name)
    with scratch_postgres_database() as url:
        monkeypatch.setenv("DENSEALIGN_DATABASE_URL", url)
        monkeypatch.setenv("DENSEALIGN_SECRET_KEY", "commands-test-secret-key-0123456789")
        yield url


def versions(url: str) -> list[tuple[int, str | None, Any]]:
    engine = make_engine(url)
    try:
        with make_session_factory(engine)() as session:
            rows = session.scalars(select(PolicyVersion).order_by(PolicyVersion.version)).all()
            return [(r.version, r.lora_key, r.metrics.get("base_model")) for r in rows]
    finally:
        engine.dispose()


def current(url: str) -> int:
    engine = make_engine(url)
    try:
        with make_session_factory(engine)() as session:
            return get_current_policy(session=session).version
    finally:
        engine.dispose()


def test_migrate_records_version_0_once_and_keeps_it_on_every_rerun(
    database: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Alembic's logging setup replaces the root handlers, so what migrate logs is read from stderr.
    monkeypatch.setenv("DENSEALIGN_MODEL__BASE_MODEL", "tiny:sd")
    assert migrate_main([]) == 0
    assert versions(database) == [(0, None, "tiny:sd")] and current(database) == 0
    assert "recorded policy version 0: the base model tiny:sd" in capsys.readouterr().err

    # Migrating again (every compose start does) records nothing new and says nothing about version 0.
    assert migrate_main([]) == 0
    assert versions(database) == [(0, None, "tiny:sd")]
    assert "version 0" not in capsys.readouterr().err

    # A published version stays current through a rerun; a changed base model only warns.
    engine = make_engine(database)
    with make_session_factory(engine)() as session, session.begin():
        publish_policy_version(
            session=session, version=1, parent_version=0, lora_key="l/1", lora_sha256="0" * 64
        )
    engine.dispose()
    monkeypatch.setenv("DENSEALIGN_MODEL__BASE_MODEL", "some/other-model")
    assert migrate_main([]) == 0
    assert versions(database) == [(0, None, "tiny:sd"), (1, "l/1", None)] and current(database) == 1
    err = capsys.readouterr().err
    assert (
        "policy version 0 was recorded for base model tiny:sd, but DENSEALIGN_MODEL__BASE_MODEL is "
        "some/other-model"
    ) in err


def test_invite_prints_a_link_on_the_public_base_url_that_redeems_once(
    database: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert migrate_main([]) == 0
    monkeypatch.setenv("DENSEALIGN_PUBLIC_BASE_URL", "https://label.example.org/team/")
    monkeypatch.setenv("DENSEALIGN_INVITE_TTL_HOURS", "2")
    capsys.readouterr()
    assert invite_main(["bob", "--role", "admin"]) == 0
    out = capsys.readouterr().out
    match = re.fullmatch(r"https://label\.example\.org/team/invite/([A-Za-z0-9_-]{20,})\n", out)
    assert match, f"not a link on the public base URL: {out!r}"
    engine = make_engine(database)
    try:
        with make_session_factory(engine)() as session, session.begin():
            invite = find_invite(session=session, secret=match.group(1))
            assert (invite.name, invite.role) == ("bob", "admin")
            left = invite.expires_at - utcnow()
            assert dt.timedelta(hours=2) - dt.timedelta(minutes=5) < left <= dt.timedelta(hours=2)
            issued = accept_invite(session=session, secret=match.group(1))
            assert (issued.labeller.name, issued.labeller.role) == ("bob", "admin")
    finally:
        engine.dispose()
    # bob exists now: a second invite for the name fails, saying why, and prints no link.
    assert invite_main(["bob"]) == 1
    taken = capsys.readouterr()
    assert taken.out == "" and "bob" in taken.err


def judge_by_hand(pipe: Any, prompts: list[str], seeds: list[int], steps: int) -> str:
    """What `densealign eval` should print for one version, computed without `acceptance`."""
    from core.diffusion.sampler import SamplerSettings, sample_trajectories
    from core.judges import FaithfulnessJudge

    judge = FaithfulnessJudge()
    images = sample_trajectories(pipe, prompts, seeds, SamplerSettings(num_steps=steps)).pil_images()
    verdicts = [judge.verdict(p, image) for p, image in zip(prompts, images, strict=True)]
    accepted = sum(v.accepted for v in verdicts)
    mean = sum(v.score for v in verdicts) / len(verdicts)
    return f"accepted {accepted}/{len(prompts)} = {accepted / len(prompts):.1%} (mean score {mean:.3f})"


@pytest.mark.slow
def test_eval_prints_each_versions_acceptance_as_a_recomputation_gives_it(
    database: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from core.basemodel.evaluate import eval_prompts
    from core.diffusion.models import load_pipeline
    from core.diffusion.policy import LoraSettings, Policy
    from core.storage import LocalBlobStore
    from trainer.judging import main as eval_main

    monkeypatch.setenv("DENSEALIGN_MODEL__BASE_MODEL", str(SHAPES))
    monkeypatch.setenv("DENSEALIGN_MODEL__DEVICE", "cpu")
    monkeypatch.setenv("DENSEALIGN_MODEL__LORA_RANK", "2")
    monkeypatch.setenv("DENSEALIGN_BLOB_DIR", str(tmp_path / "blobs"))
    assert migrate_main([]) == 0
    # Version 1: a rank-2 adapter with random weights, large enough to change what the model draws.
    policy = Policy(load_pipeline(str(SHAPES)), LoraSettings(rank=2))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.lora_parameters():
            p.normal_(0.0, 0.3)
    adapter = tmp_path / "adapter"
    path, sha = policy.save_adapter(adapter)
    key = "policies/v1/pytorch_lora_weights.safetensors"
    LocalBlobStore(tmp_path / "blobs").put(key, path.read_bytes())
    engine = make_engine(database)
    with make_session_factory(engine)() as session, session.begin():
        publish_policy_version(session=session, version=1, parent_version=0, lora_key=key, lora_sha256=sha)
    engine.dispose()

    n, steps = 4, 4
    capsys.readouterr()
    assert eval_main(["--version", "1", "--prompts", str(n), "--steps", str(steps)]) == 0
    printed = capsys.readouterr().out.splitlines()

    prompts, seeds = eval_prompts(n), list(range(n))
    base = load_pipeline(str(SHAPES))
    expected_v0 = "version 0: " + judge_by_hand(base, prompts, seeds, steps)
    base.load_lora_weights(str(adapter))
    expected_v1 = "version 1: " + judge_by_hand(base, prompts, seeds, steps)
    assert printed == [expected_v0, expected_v1]
    assert expected_v0 != expected_v1, "the adapter changed nothing: the test cannot tell the versions apart"
