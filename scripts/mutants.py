"""Plant hand-written one-line bugs (mutants) in a scratch copy of the repository and run the tests that
should catch each; print killed/survived per mutant and the score.

    .venv/bin/python scripts/mutants.py                      # every mutant, this checkout's tests
    .venv/bin/python scripts/mutants.py --check              # only check that every snippet still applies
    .venv/bin/python scripts/mutants.py --only batch-swap    # some mutants, by name
    .venv/bin/python scripts/mutants.py --tests-from DIR     # DIR's tests/ (e.g. an older commit's worktree)
    .venv/bin/python scripts/mutants.py --json out.json      # also write the results

The working tree is never touched: the source (without .git, the virtualenv and caches) is copied to a
temporary directory, each mutant is applied there, its tests run there, and the file is restored. Each
mutant names an exact snippet of the current source; when code moves and a snippet is no longer found
exactly once, the script stops before running anything and names the mutant, so the list is kept in
step with the code. Before the mutants, the union of their tests runs once unmutated; a test that
fails there is deselected from the mutant runs (and reported), so a test broken for other reasons is
never counted as a kill.

Tests run with the project's interpreter (this one), PYTHONPATH at the copy (so subprocesses import it
too), OMP_NUM_THREADS=1 (CPU tests on a shared machine), and Redis db 9 unless
DENSEALIGN_TEST_REDIS_URL says otherwise. A mutant is killed when its tests fail (pytest exit code 1,
or 2 for an error while collecting); exit code 5 (no test ran) or a pass is a survivor.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis", "artifacts"
)

# Test groups, fastest first within each (pytest stops at the first failure).
DIRECTION = [
    "tests/core/diffusion/test_direction.py",
    "tests/trainer/test_round_direction.py",
    "tests/core/diffusion/test_policy.py",
    "tests/worker/test_loop.py",
]
STEP = [
    "tests/core/diffusion/test_training_step.py",
    "tests/core/diffusion/test_loss.py",
    "tests/core/diffusion/test_direction.py",
    "tests/core/diffusion/test_policy.py",
]
ROUND = [
    "tests/trainer/test_round_pairs.py",
    "tests/trainer/test_round_examples.py",
    "tests/core/db/test_training.py",
    "tests/trainer/test_round_direction.py",
    "tests/worker/test_loop.py",
    "tests/worker/test_faults.py::test_trainer_killed_mid_round_resumes_without_double_counting",
]
BLOBS = [
    "tests/core/test_storage.py",
    "tests/worker/test_corrupt_blobs.py",
    "tests/core/diffusion/test_trajectory_checksum.py",
    "tests/core/diffusion/test_sampler.py",
    "tests/worker/test_loop.py",
]
LEASE = ["tests/core/db/test_lease_guard.py", "tests/core/db/test_assignment.py"]
KEYS = ["tests/e2e/test_label_keys.py", "tests/e2e/test_label_browser.py"]
EVAL = ["tests/app/test_demo_gains.py", "tests/app/test_demo.py"]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    original: str  # must occur exactly once in the file
    mutated: str
    tests: list[str]
    why: str = ""


MUTANTS = [
    # -- the direction of learning: winner and loser swapped at three layers ----------------------
    Mutant(
        "batch-swap",
        "trainer/rounds.py",
        "            torch.stack(ws),\n            torch.stack(ls),",
        "            torch.stack(ls),\n            torch.stack(ws),",
        ROUND,
        "the trainer's batch puts each loser where the winner goes",
    ),
    Mutant(
        "pair-log-ratios-order",
        "core/diffusion/training.py",
        "    return ratios[: b * m].view(b, m), ratios[b * m :].view(b, m)",
        "    return ratios[b * m :].view(b, m), ratios[: b * m].view(b, m)",
        DIRECTION,
        "pair_log_ratios returns (loser, winner)",
    ),
    Mutant(
        "round-pairs-winner",
        "core/db/training.py",
        '    a_won = TrainingRoundPair.winner == "a"',
        '    a_won = TrainingRoundPair.winner == "b"',
        ROUND,
        "the round's recorded winner is read back as the loser",
    ),
    Mutant(
        "record-round-winner",
        "core/db/training.py",
        '        winner = "a" if p.winner_trajectory_id == traj_a else "b"',
        '        winner = "b" if p.winner_trajectory_id == traj_a else "a"',
        ROUND,
        "the round records the loser's side as the winner",
    ),
    # -- the training step -------------------------------------------------------------------------
    Mutant(
        "accuracy-inverted",
        "core/diffusion/training.py",
        "        accuracy = (margin > 0).float().mean()",
        "        accuracy = (margin < 0).float().mean()",
        STEP,
        "implicit accuracy reports the share of pairs the loser leads",
    ),
    Mutant(
        "no-grad-clip",
        "core/diffusion/training.py",
        "grad_norm = torch.nn.utils.clip_grad_norm_(policy.lora_parameters(), hp.max_grad_norm)",
        'grad_norm = torch.nn.utils.clip_grad_norm_(policy.lora_parameters(), float("inf"))',
        STEP,
        "max_grad_norm is ignored",
    ),
    Mutant(
        "exact-accuracy-unweighted",
        "core/diffusion/training.py",
        "        if hp.exact:\n            w = weights.to(logratio_w.device)",
        "        if False:\n            w = weights.to(logratio_w.device)",
        STEP,
        "exact=True reports accuracy from the unweighted mean instead of the discounted score",
    ),
    Mutant(
        "clipped-share-inverted",
        "core/diffusion/training.py",
        "clipped_share=float((both.abs() > hp.clip).float().mean()),",
        "clipped_share=float((both.abs() < hp.clip).float().mean()),",
        STEP,
        "the clipped share counts the log-ratios inside the band",
    ),
    # -- the loss ----------------------------------------------------------------------------------
    Mutant(
        "loss-sign",
        "core/diffusion/loss.py",
        "    score_l = beta * logratio_l.clamp(-clip, clip).mean(dim=1)  # (B,)\n"
        "    return -F.logsigmoid(score_w - score_l).mean()",
        "    score_l = beta * logratio_l.clamp(-clip, clip).mean(dim=1)  # (B,)\n"
        "    return -F.logsigmoid(score_l - score_w).mean()",
        STEP,
        "the sampled-step loss prefers the loser",
    ),
    Mutant(
        "exact-loss-uniform",
        "core/diffusion/loss.py",
        "    w = weights.to(logratio_w.dtype)",
        "    w = torch.full_like(weights, 1.0 / weights.numel()).to(logratio_w.dtype)",
        STEP,
        "the exact loss drops the discount (gamma = 1 whatever is asked)",
    ),
    # -- the round: freshness, resume, metrics -----------------------------------------------------
    Mutant(
        "version-lag-ignored",
        "trainer/rounds.py",
        "min_version=max(0, current - cfg.max_version_lag)",
        "min_version=0",
        ["tests/core/db/test_version_lag.py", "tests/core/db/test_training.py", "tests/worker/test_loop.py"],
        "the trainer takes pairs from any version",
    ),
    Mutant(
        "resume-reseeds",
        "trainer/rounds.py",
        "cfg.seed * 1_000_003 + round_id * 10_007 + step)",
        "cfg.seed * 1_000_003 + round_id * 10_007 + step - start_step)",
        ROUND,
        "a resumed round draws other pairs and steps than the uninterrupted one",
    ),
    Mutant(
        "resume-without-cache-replay",
        "trainer/rounds.py",
        "            self._replay_reference(examples, round_id, start_step, schedule, cache)",
        "            pass",
        ROUND,
        "a resumed round starts with an empty reference cache: its steps drift from the uninterrupted round's",
    ),
    Mutant(
        "resume-drops-optimizer",
        "trainer/rounds.py",
        '        optimizer.load_state_dict(ckpt["optimizer"])',
        "        pass",
        ROUND,
        "a resumed round restarts AdamW's moments",
    ),
    Mutant(
        "round-metrics-signed",
        "trainer/rounds.py",
        "                self.by_step_abs[idx] += abs(value)",
        "                self.by_step_abs[idx] += value",
        ["tests/core/diffusion/test_training_step.py", "tests/worker/test_loop.py"],
        "the per-step |log-ratio| sums signed values",
    ),
    # -- the blob store ----------------------------------------------------------------------------
    Mutant(
        "get-verified-unchecked",
        "core/storage.py",
        "    if hashlib.sha256(data).hexdigest() != sha256:\n        raise BlobCorrupt(key, sha256)\n    return data",
        "    return data",
        BLOBS,
        "get_verified skips the sha256 check (worker, trainer, export, eval)",
    ),
    Mutant(
        "download-unchecked",
        "app/routes/policies.py",
        "        verify_blob(store, row.lora_key, row.lora_sha256)\n",
        "",
        ["tests/worker/test_corrupt_blobs.py", "tests/app/test_api.py"],
        "the REST download serves the file without checking it",
    ),
    Mutant(
        "trajectory-unchecked",
        "core/diffusion/sampler.py",
        "if expected is not None and _checksum(data) != expected:",
        "if False:",
        ["tests/core/diffusion/test_trajectory_checksum.py", "tests/worker/test_corrupt_blobs.py"],
        "a stored trajectory's checksum is not checked",
    ),
    Mutant(
        "put-wrong-digest",
        "core/storage.py",
        "        return hashlib.sha256(data).hexdigest()",
        "        return hashlib.sha256(data[:-1]).hexdigest()",
        BLOBS,
        "the store reports a digest that is not the blob's",
    ),
    # -- the lease ---------------------------------------------------------------------------------
    Mutant(
        "lease-guard-dropped",
        "core/db/assignment.py",
        "        where=or_(Lease.expires_at <= now, Lease.labeller_id == labeller_id),\n",
        "",
        LEASE,
        "a live lease can be taken over by another labeller",
    ),
    Mutant(
        "lease-claim-ignored",
        "core/db/assignment.py",
        "    return session.execute(stmt).scalar_one_or_none() is not None",
        "    session.execute(stmt)\n    return True",
        LEASE,
        "next_pair hands out a pair whose claim was refused",
    ),
    # -- the labelling page ------------------------------------------------------------------------
    Mutant(
        "tie-keys-skip",
        "app/static/label.js",
        'ArrowDown: "tie", t: "tie", T: "tie",',
        'ArrowDown: "skip", t: "skip", T: "skip",',
        KEYS,
        "the tie keys record a skip",
    ),
    Mutant(
        "space-tie",
        "app/static/label.js",
        '" ": "skip"',
        '" ": "tie"',
        KEYS,
        "Space records a tie",
    ),
    Mutant(
        "shift-u-ignored",
        "app/static/label.js",
        'u: "undo", U: "undo"',
        'u: "undo"',
        KEYS,
        "U (with Shift) does not undo",
    ),
    # -- the demo's reported gains -----------------------------------------------------------------
    Mutant(
        "gain-sign",
        "trainer/judging.py",
        "return mean_se([s - b for s, b in zip(scores, base, strict=True)])",
        "return mean_se([b - s for s, b in zip(scores, base, strict=True)])",
        EVAL,
        "the paired gain is version 0 minus the version",
    ),
    Mutant(
        "gain-se-biased",
        "trainer/judging.py",
        "sum((v - mean) ** 2 for v in values) / (n - 1) / n",
        "sum((v - mean) ** 2 for v in values) / n / n",
        EVAL,
        "the gain's standard error divides by n instead of n - 1",
    ),
]


@dataclass
class Result:
    name: str
    path: str
    why: str
    status: str  # killed | survived | no tests
    killed_by: str = ""
    seconds: float = 0.0
    tests: list[str] = field(default_factory=list)
    summary: str = ""  # pytest's last line, e.g. "12 passed in 40.1s"


def check_snippets(tree: Path, mutants: list[Mutant]) -> list[str]:
    """One line per mutant whose original snippet is not found exactly once in `tree`."""
    problems = []
    for m in mutants:
        path = tree / m.path
        if not path.is_file():
            problems.append(f"{m.name}: {m.path} does not exist")
            continue
        count = path.read_text().count(m.original)
        if count != 1:
            problems.append(
                f"{m.name}: snippet found {count} times in {m.path} (need exactly 1): {m.original!r}"
            )
    return problems


def test_env(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(copy),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        DENSEALIGN_TEST_REDIS_URL=os.environ.get("DENSEALIGN_TEST_REDIS_URL", "redis://127.0.0.1:6379/9"),
    )
    return env


def existing(copy: Path, tests: list[str]) -> list[str]:
    return [t for t in tests if (copy / t.split("::")[0]).is_file()]


def pytest_run(copy: Path, args: list[str], timeout: float) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    try:
        done = subprocess.run(
            cmd, cwd=copy, env=test_env(copy), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return 124, "timed out"
    return done.returncode, done.stdout + done.stderr


def baseline_failures(copy: Path, tests: list[str], timeout: float) -> list[str]:
    """Node ids of the tests that fail with no mutant applied."""
    report = copy / ".mutants-baseline.xml"
    code, output = pytest_run(copy, [*tests, f"--junitxml={report}"], timeout)
    if code not in (0, 1):
        raise SystemExit(f"the unmutated tests could not run (pytest exit {code}):\n{output[-3000:]}")
    failed = []
    for case in ET.parse(report).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            module = case.get("classname", "").replace(".", "/")
            failed.append(f"{module}.py::{case.get('name')}")
    report.unlink()
    return failed


def first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" ", 1)[1].split(" - ")[0]
    return "(see pytest output)"


def run_mutant(copy: Path, m: Mutant, deselect: list[str], timeout: float) -> Result:
    tests = existing(copy, m.tests)
    result = Result(m.name, m.path, m.why, "no tests", tests=tests)
    if not tests:
        return result
    path = copy / m.path
    source = path.read_text()
    path.write_text(source.replace(m.original, m.mutated, 1))
    start = time.monotonic()
    try:
        args = ["-x", *tests, *(f"--deselect={d}" for d in deselect)]
        code, output = pytest_run(copy, args, timeout)
    finally:
        path.write_text(source)
    result.seconds = round(time.monotonic() - start, 1)
    result.summary = next((line.strip("= ") for line in reversed(output.splitlines()) if line.strip()), "")
    if code in (1, 2):
        result.status, result.killed_by = "killed", first_failure(output)
    elif code == 124:
        result.status, result.killed_by = "killed", "timed out"
    else:
        result.status = "survived" if code == 0 else "no tests"
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    parser.add_argument("--check", action="store_true", help="only check that every snippet applies")
    parser.add_argument(
        "--tests-from", type=Path, help="take tests/ from this tree instead of the checkout's"
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds per pytest run")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    unknown = sorted(set(args.only or []) - {m.name for m in MUTANTS})
    if unknown:
        raise SystemExit(
            f"unknown mutants: {', '.join(unknown)}; known: {', '.join(m.name for m in MUTANTS)}"
        )
    problems = check_snippets(ROOT, mutants)
    if problems:
        print("these mutants no longer apply (the code moved: update MUTANTS):", file=sys.stderr)
        for line in problems:
            print("  " + line, file=sys.stderr)
        return 2
    if args.check:
        print(f"all {len(mutants)} mutants apply")
        return 0

    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="densealign-mutants-") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=IGNORE, symlinks=True)
        if args.tests_from is not None:
            shutil.rmtree(copy / "tests")
            shutil.copytree(args.tests_from / "tests", copy / "tests", ignore=IGNORE)
        tests = sorted({t for m in mutants for t in existing(copy, m.tests)})
        deselect = [] if args.no_baseline else baseline_failures(copy, tests, args.timeout)
        for node in deselect:
            print(f"failing without any mutant, deselected: {node}")
        for m in mutants:
            r = run_mutant(copy, m, deselect, args.timeout)
            results.append(r)
            by = f" by {r.killed_by}" if r.killed_by else ""
            print(f"{r.status:9} {m.name:26} {r.seconds:7.1f}s  {m.path}{by} ({r.summary})", flush=True)
        # The code may have moved while the tests ran (others edit the tree): say so now, not next time.
        moved = check_snippets(ROOT, mutants)
    killed = sum(r.status == "killed" for r in results)
    print(f"mutation score: {killed}/{len(results)} killed ({100 * killed / len(results):.0f}%)")
    for line in moved:
        print(f"warning: no longer applies to the checkout: {line}", file=sys.stderr)
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 1 if moved else 0


if __name__ == "__main__":
    sys.exit(main())
