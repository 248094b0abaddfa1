"""The demo stack (app, worker, trainer, oracle labeller; SQLite, in-process queue, shipped model)
runs headless through one training round and publishes a version."""

from __future__ import annotations

import json
import re
import socket
import sqlite3
from pathlib import Path

import pytest

from densealign.demo import DEFAULT_MODEL
from densealign.demo import main as demo_main


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_demo_runs_one_round_headless(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert (DEFAULT_MODEL / "model_index.json").is_file(), "the shipped model is missing from models/"
    data = tmp_path / "demo"
    caplog.set_level("INFO")
    rc = demo_main(
        [
            "--data", str(data), "--port", str(free_port()), "--oracle", "faithfulness",
            "--steps", "4", "--round-labels", "4", "--round-steps", "2", "--eval-seeds", "1",
            "--exit-after-versions", "1",
        ]
    )  # fmt: skip
    assert rc == 0
    db = sqlite3.connect(data / "densealign.db")
    versions = db.execute("SELECT version, metrics FROM policy_versions ORDER BY version").fetchall()
    assert [v for v, _ in versions] == [0, 1]
    metrics = json.loads(versions[1][1])
    assert metrics["pairs_used"] >= 1 and 0.0 <= metrics["judge_score"] <= 1.0
    # 8 training prompts (the default) + 4 held-out ones, 1 seed each, scored case by case.
    assert metrics["eval_samples"] == len(metrics["judge_scores"]) == 12
    assert abs(sum(metrics["judge_scores"]) / 12 - metrics["judge_score"]) < 1e-4
    assert abs(sum(metrics["judge_scores"][:8]) / 8 - metrics["judge_score_train"]) < 1e-4
    assert abs(sum(metrics["judge_scores"][8:]) / 4 - metrics["judge_score_held_out"]) < 1e-4
    # paired against version 0's per-case scores (same cases: the paired mean is the difference of
    # the means), which the demo logged when it scored version 0
    [v0_line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("version 0:")]
    v0_train = float(re.search(r"judge score ([0-9.]+) on the 8 trained prompts", v0_line).group(1))  # type: ignore[union-attr]
    assert abs(metrics["judge_score_train"] - v0_train - metrics["judge_gain_train"]) < 1e-3
    assert metrics["judge_gain_train_se"] >= 0.0 and "judge_gain_held_out" in metrics
    # publishing version 1 put it to a blind vote against version 0 on the held-out prompts
    campaigns = db.execute(
        "SELECT version, baseline_version, origin, prompt_split, target_votes FROM eval_campaigns"
    )
    assert campaigns.fetchall() == [(1, 0, "publish", "eval", 60)]
    judged = db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]
    assert judged >= 4
    assert any("pairs are ready after" in r.getMessage() for r in caplog.records)
    published = [r.getMessage() for r in caplog.records if "version 1 published" in r.getMessage()]
    gain = f"paired gain {metrics['judge_gain_train']:+.3f}"
    assert len(published) == 1 and gain in published[0] and "over 8 prompt/seed cases" in published[0]
