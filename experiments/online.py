"""Does discounting help? Run the online loop unattended for a label budget and score each version.

Each cell of the grid (settings x seed) runs the real loop, in-process and synchronously so that it
is reproducible: the sampling worker (`worker.sampling.PairSampler`, seeds drawn from the cell's seed),
a programmatic labeller going through the REST API (`densealign.labeller.label_loop` on the FastAPI app),
and the trainer (`trainer.rounds.Trainer`), on a fresh SQLite database with the shipped shapes
model. After every round the new version is scored by the judge on fixed held-out seeds, for the
training prompts and for prompts never trained on, and compared per (prompt, seed) with version 0
(win rate; ties count half). One JSON row per evaluation point goes to --out (JSON lines).

Usage:
  python experiments/online.py --gammas 1.0 0.97 0.9 0.8 --seeds 0 1 2 --out experiments/results/grid.jsonl
  python experiments/online.py --gammas 0.9 --seeds 1 --rounds 1    # rerun one cell: same numbers
  python experiments/online.py --gammas 0.9 1.0 --seeds 0 1 2 3 --jobs 8 --device cuda    # in parallel

Cells are reproducible on the same kind of device with the same torch build; a CPU run and a CUDA
run of one cell draw different noise (the generators live on the device) and differ.

Defaults (the grid's settings): 8 training prompts, 3 rounds of 64 labelled pairs, 60 optimizer
steps of 4 pairs per round, lr 1e-3, clip 1e-2, beta 10, M 3, 20 DDIM steps, 16 evaluation seeds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

RESULTS = ROOT / "experiments" / "results"


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


# A copy of the tree without .git (a remote machine) names its commit in DENSEALIGN_COMMIT.
COMMIT = os.environ.get("DENSEALIGN_COMMIT") or _commit()


def summarise(scored: tuple[list[float], list[bool]], base: list[float]) -> dict[str, float]:
    """Mean score (± s.e. over samples), accept rate, the paired difference from version 0 on the same
    (prompt, seed) (± s.e.), and the win rate against version 0 (ties count half)."""
    from trainer.judging import mean_se, paired_difference

    scores, accepted = scored
    mean, se = mean_se(scores)
    diff, diff_se = paired_difference(scores, base)
    wins = sum(
        1.0 if s > b + 1e-6 else 0.5 if abs(s - b) <= 1e-6 else 0.0 for s, b in zip(scores, base, strict=True)
    )
    return {
        "mean": mean,
        "se": se,
        "accept": sum(accepted) / len(accepted),
        "diff_vs_v0": diff,
        "diff_vs_v0_se": diff_se,
        "win_rate_vs_v0": wins / len(scores),
    }


def run_cell(
    args: argparse.Namespace,
    gamma: float,
    beta: float,
    m: int,
    noise: float,
    pairing: str,
    lr_schedule: str,
    seed: int,
) -> Iterator[dict[str, Any]]:
    """Yield the cell's rows as they are measured (version 0 first), so a cell cut short keeps them."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from core.diffusion.sampler import SamplerSettings
    from core.judges import make_judge
    from core.settings import Settings
    from densealign.demo import demo_prompts, pick_prompts, prepare_database
    from densealign.labeller import label_loop
    from trainer.judging import judge_cases
    from trainer.main import build_trainer
    from worker.main import build_sampler

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            demo=True,
            database_url=f"sqlite:///{tmp}/x.db",
            blob_dir=f"{tmp}/blobs",
            overlap_share=0.0,
            # the labeller is this process's program, not a person: the per-person limit (a burst of 60)
            # refused the 61st judgement of a 64-pair round with 429
            judgement_rate_per_minute=1e6,
            judgement_burst=1_000_000,
            model={"base_model": args.model, "device": args.device, "lora_rank": 4},  # type: ignore[arg-type]
            sampler={"num_steps": args.steps, "guidance_scale": 7.5},  # type: ignore[arg-type]
            pool={"pairing": pairing},  # type: ignore[arg-type]
            dpo={  # type: ignore[arg-type]
                "gamma": gamma, "beta": beta, "sampled_steps": m, "clip": args.clip, "lr": args.lr,
                "min_new_pairs": 1, "steps_per_round": args.round_steps,
                "pairs_per_step": 4, "checkpoint_every": 1000, "seed": seed, "max_version_lag": 0,
                "lr_schedule": lr_schedule,
            },
            # each published version is put to a blind vote against version 0 on the held-out prompts
            eval={"auto_votes": args.human_eval_votes, "prompt_split": "eval"},  # type: ignore[arg-type]
        )  # fmt: skip
        train, held_out = demo_prompts()
        train = pick_prompts(train, args.prompts)
        _, token = prepare_database(settings, train, held_out)
        sampler = build_sampler(settings)
        sampler.seed_source = random.Random(seed)
        trainer = build_trainer(settings)
        client = TestClient(create_app(settings))
        judge = make_judge(args.judge)
        eval_settings = SamplerSettings(num_steps=args.steps, guidance_scale=7.5)
        eval_seeds = [50_000 + i for i in range(args.eval_seeds)]
        cases = {
            "train": [(p, s) for p in train for s in eval_seeds],
            "held_out": [(p, s) for p in held_out for s in eval_seeds],
        }
        base = {k: judge_cases(trainer.policy, judge, c, eval_settings)[0] for k, c in cases.items()}
        labels = 0
        round_metrics: dict[str, Any] = {}
        for round_index in range(args.rounds + 1):
            if round_index > 0:
                prompt_rng = random.Random(seed * 1000 + round_index)
                prompt_ids = [prompt_rng.randrange(len(train)) + 1 for _ in range(args.pairs_per_round)]
                for start in range(0, len(prompt_ids), args.pairs_per_job):
                    sampler.sample_pairs(prompt_ids[start : start + args.pairs_per_job])
                labels += label_loop(
                    base_url="",
                    token=token,
                    client=client,
                    preference=args.judge,
                    noise=noise,
                    seed=seed * 1000 + round_index,
                    idle_wait=0.0,
                    name="experiment",
                    tie_margin=args.tie_margin,
                )
                version = trainer.run_once()
                assert version == round_index, f"round {round_index} published {version}: no decisive pair?"
                with trainer.sessions() as session:
                    from core.db.policies import get_policy_version

                    published = get_policy_version(session=session, version=version).metrics
                round_metrics = {
                    k: published[k]
                    for k in (
                        "implicit_accuracy",
                        "mean_abs_logratio",
                        "clipped_share",
                        "grad_norm",
                        "pairs_used",
                    )
                }
            scores = {k: judge_cases(trainer.policy, judge, c, eval_settings) for k, c in cases.items()}
            row: dict[str, Any] = {
                "gamma": gamma, "beta": beta, "sampled_steps": m, "noise": noise, "pairing": pairing,
                "lr_schedule": lr_schedule, "seed": seed,
                "version": round_index, "labels_used": labels, "judge": args.judge,
                "train": summarise(scores["train"], base["train"]),
                "held_out": summarise(scores["held_out"], base["held_out"]),
                "round": round_metrics,
                "settings": {"steps": args.steps, "lr": args.lr, "clip": args.clip, "round_steps": args.round_steps,
                             "pairs_per_round": args.pairs_per_round, "eval_seeds": args.eval_seeds,
                             "prompts": args.prompts, "threads": args.threads, "model": args.model,
                             "tie_margin": args.tie_margin, "device": args.device, "commit": COMMIT},
                "wall_s": time.perf_counter() - started,
            }  # fmt: skip
            if round_index > 0 and args.human_eval_votes > 0:
                row["human_eval"] = human_evaluation(sampler, client, token, args, noise, seed, round_index)
            print(json.dumps(row), flush=True)
            yield row
        client.close()


def human_evaluation(
    sampler: Any, client: Any, token: str, args: argparse.Namespace, noise: float, seed: int, version: int
) -> dict[str, Any]:
    """The product's human-side measure for `version`: its campaign against version 0 (started when it
    was published) gets its pairs sampled by the worker's evaluation path and voted on through the
    REST API by the same programmatic labeller; returns the campaign's win rate and interval.

    Seeds for these pairs come from a source of their own and the votes touch no training pair, so a
    cell's judge rows are the same with and without this measure."""
    from core.db.campaigns import campaign_results, eval_prompt_ids, list_campaigns
    from densealign.labeller import label_loop

    with sampler.sessions() as session:
        (campaign,) = [c for c in list_campaigns(session=session, version=version) if c.status == "running"]
        prompts = eval_prompt_ids(session=session, split=campaign.prompt_split)
    training_seeds, sampler.seed_source = sampler.seed_source, random.Random(seed * 1000 + version + 500_000)
    try:
        wanted = [prompts[i % len(prompts)] for i in range(campaign.target_votes)]
        for start in range(0, len(wanted), args.pairs_per_job):
            sampler.sample_eval_pairs(campaign.id, wanted[start : start + args.pairs_per_job])
    finally:
        sampler.seed_source = training_seeds
    votes = label_loop(
        base_url="",
        token=token,
        client=client,
        preference=args.judge,
        noise=noise,
        seed=seed * 1000 + version + 500_000,
        idle_wait=0.0,
        name="experiment-eval",
        tie_margin=args.tie_margin,
    )
    with sampler.sessions() as session:
        result = campaign_results(session=session, campaigns=[campaign])[campaign.id]
    assert result.votes == votes, f"{votes} labels given, {result.votes} votes counted"
    return {
        "votes": result.votes,
        "win_rate": result.rate,
        "low": result.low,
        "high": result.high,
        "verdict": result.verdict,
        "prompts": result.prompts,
    }


def cell_argv(
    argv: list[str],
    gamma: float,
    beta: float,
    m: int,
    noise: float,
    pairing: str,
    lr_schedule: str,
    seed: int,
    out: Path,
) -> list[str]:
    """This script's command line for one cell: the grid options replaced, everything else kept."""
    grid = {"--gammas", "--betas", "--ms", "--noises", "--pairings", "--lr-schedules", "--seeds", "--out", "--jobs"}
    kept: list[str] = []
    skipping = False
    for arg in argv:
        if arg.startswith("--"):
            name = arg.split("=", 1)[0]
            skipping = name in grid and "=" not in arg
            if name in grid:
                continue
        elif skipping:
            continue
        kept.append(arg)
    cell = ["--gammas", str(gamma), "--betas", str(beta), "--ms", str(m), "--noises", str(noise)]
    cell += ["--pairings", pairing, "--lr-schedules", lr_schedule]
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        *kept,
        *cell,
        "--seeds",
        str(seed),
        "--out",
        str(out),
    ]


def run_parallel(
    argv: list[str], cells: list[tuple[float, float, int, float, str, str, int]], out: Path, jobs: int
) -> int:
    """Run each cell in its own process, `jobs` at a time; append their rows to `out` in grid order.

    Each cell writes to its own part file beside `out` as it goes, so a run that is stopped keeps
    every finished evaluation point; the part files are appended to `out` and removed at the end."""
    from concurrent.futures import ThreadPoolExecutor

    parts = [out.with_name(f"{out.stem}.part{i}.jsonl") for i in range(len(cells))]

    def one(i: int) -> int:
        cmd = cell_argv(argv, *cells[i], parts[i])
        with parts[i].with_suffix(".log").open("w") as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        print(f"cell {i + 1}/{len(cells)} {cells[i]} exit {code}", flush=True)
        return code

    # Seed-major start order: when fewer cells run at once than there are, the settings compared
    # on a seed finish together, and a run stopped early leaves paired cells rather than whole
    # settings missing.
    order = sorted(range(len(cells)), key=lambda i: (cells[i][-1], i))
    codes = [0] * len(cells)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for i, code in zip(order, pool.map(one, order), strict=True):
            codes[i] = code
    with out.open("a") as fh:
        for part in parts:
            if part.exists():
                fh.write(part.read_text())
                part.unlink()
    failed = [cells[i] for i, c in enumerate(codes) if c != 0]
    if failed:
        print(f"{len(failed)} cell(s) failed: {failed}; see the .log files beside {out}", file=sys.stderr)
        return 1
    for part in parts:
        part.with_suffix(".log").unlink(missing_ok=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gammas", type=float, nargs="+", default=[1.0, 0.9])
    parser.add_argument("--betas", type=float, nargs="+", default=[10.0])
    parser.add_argument("--ms", type=int, nargs="+", default=[3], help="steps sampled per trajectory")
    parser.add_argument("--noises", type=float, nargs="+", default=[0.0], help="label noise rates")
    parser.add_argument(
        "--pairings",
        nargs="+",
        default=["independent"],
        choices=["independent", "aligned"],
        help="how the worker draws a pair's two images (DENSEALIGN_POOL__PAIRING)",
    )
    parser.add_argument(
        "--lr-schedules",
        nargs="+",
        default=["constant"],
        choices=["constant", "cosine"],
        help="the learning rate over a round's steps (DENSEALIGN_DPO__LR_SCHEDULE)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs-per-round", type=int, default=64)
    parser.add_argument("--round-steps", type=int, default=60)
    parser.add_argument("--pairs-per-job", type=int, default=16, help="pairs the worker samples per batch")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--clip", type=float, default=1e-2)
    parser.add_argument("--eval-seeds", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=8, help="training prompts (of the demo's 20)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (fixed: reproducible)")
    parser.add_argument("--judge", default="faithfulness")
    parser.add_argument(
        "--tie-margin",
        type=float,
        default=None,
        help="the labeller says 'tie' on closer scores (default 1e-3)",
    )
    parser.add_argument(
        "--human-eval-votes",
        type=int,
        default=0,
        help="after each round, votes of a blind evaluation campaign vs version 0 on held-out prompts",
    )
    parser.add_argument("--model", default=str(ROOT / "models" / "densealign-shapes"))
    parser.add_argument("--device", default="cpu", help="torch device for sampling and training (cpu, cuda)")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once, each in its own process")
    parser.add_argument("--out", default=str(RESULTS / "online.jsonl"))
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: give at least 1 cell at a time")
    if args.device.startswith("cuda"):
        # cuBLAS needs a fixed workspace for its deterministic kernels (same seed, same numbers)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cells = list(
        itertools.product(
            args.gammas, args.betas, args.ms, args.noises, args.pairings, args.lr_schedules, args.seeds
        )
    )
    if args.jobs > 1 and len(cells) > 1:
        return run_parallel(sys.argv[1:] if argv is None else argv, cells, out, args.jobs)
    with out.open("a") as fh:
        for cell in cells:
            for row in run_cell(args, *cell):
                fh.write(json.dumps(row) + "\n")
                fh.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
