"""Bytes per stored pair, and what DENSEALIGN_RETENTION__DROP_TRAINED_LATENTS keeps.

Prints the figures and writes them to bench/results/storage.json (or --out). A pair stores two
trajectories, each a latents file (core/diffusion/sampler.py `TrajectoryLatents.to_bytes`: the
num_steps + 1 latents in float16, the timesteps in int64, the per-step log-probs in float32, a JSON
header) and a PNG of its final image (written as the worker writes it, `image.save(buf, "PNG")`).

1. Latents files, serialised for real: random float16 latents of each shape (the format stores them
   uncompressed, so their values do not change the size), the prompt "a red circle above a blue
   square", for
   - the shipped model (models/densealign-shapes: 4 x 8 x 8 latents, 64 px) at the CPU/demo pace
     of docker-compose.cpu.yml and densealign/demo.py (20 steps) and at DENSEALIGN_SAMPLER__NUM_STEPS's
     default (50);
   - SD 1.5 shapes (4 x 64 x 64 latents, 512 px) and SDXL shapes (4 x 128 x 128, 1024 px), 50 steps.
2. PNGs. The shipped model's are measured on a real run: --pairs pairs sampled with
   `sample_trajectories` on the shipped model at 20 steps (CPU, one thread); their latents files are
   measured too, to check (1). SD 1.5 / SDXL images cannot be drawn here (no weights offline), so
   their PNG size is an assumption, bracketed by two measured synthetic images of that size: uniform
   noise (what PNG cannot compress: the upper bound, about the raw 3 bytes per pixel) and a
   natural-image stand-in (random phases with a 1/f amplitude spectrum, the power law photographs
   follow), whose size is what the totals use.
3. Retention, simulated on a real SQLite database and a local blob store with shipped-model blobs
   (20 steps, the measured PNGs): --rounds finished rounds of --round-pairs pairs, then what waits
   (--waiting decided pairs below the next round's threshold, --open pool pairs, one evaluation
   campaign of --eval-pairs pairs, images only); `storage_report` before and after `prune_latents`,
   and the same bookkeeping in closed form for SD 1.5 and SDXL.
4. The prune's queries at scale, on Postgres (--postgres, a scratch database next to it): --scale-pairs
   training pairs (two trajectories each) inserted in SQL, 320 per round, every round finished but the
   last (running); the time to find the prunable trajectories (keep_rounds 0 and 5) and to mark them
   (one UPDATE, rolled back). No blobs: this measures the database side only.

Usage: python bench/storage.py [--pairs 8] [--rounds 10] [--round-pairs 48] [--scale-pairs 100000]
       [--postgres URL] [--out FILE]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))  # after the repo root: bench/core.py must not shadow core/

from common import drop_database, scratch_database  # noqa: E402

from core import blob_keys  # noqa: E402
from core.db import make_engine, make_session_factory  # noqa: E402
from core.db.campaigns import create_eval_pair, start_campaign  # noqa: E402
from core.db.pairs import create_pair, create_trajectory  # noqa: E402
from core.db.policies import publish_policy_version  # noqa: E402
from core.db.prompts import add_prompt  # noqa: E402
from core.db.training import (  # noqa: E402
    PreferencePair,
    finish_training_round,
    record_round_pairs,
    start_training_round,
)
from core.diffusion.sampler import SamplerSettings, TrajectoryLatents  # noqa: E402
from core.retention import prune_latents, storage_report  # noqa: E402
from core.storage import LocalBlobStore  # noqa: E402

PROMPT = "a red circle above a blue square"
SHIPPED = ROOT / "models" / "densealign-shapes"
# name -> (latent channels, latent side, image side, DDIM steps)
SHAPES = {
    "shipped_20_steps": (4, 8, 64, 20),
    "shipped_50_steps": (4, 8, 64, 50),
    "sd15": (4, 64, 512, 50),
    "sdxl": (4, 128, 1024, 50),
}
PAIRS_PER_TOTAL = 100_000


def latents_file_bytes(channels: int, side: int, image: int, steps: int) -> int:
    latents = torch.randn(steps + 1, channels, side, side)  # (num_steps + 1, C, H, W)
    trajectory = TrajectoryLatents(
        prompt=PROMPT,
        seed=random.getrandbits(63),
        latents=latents,
        timesteps=torch.arange(steps, 0, -1, dtype=torch.int64) * (1000 // steps),
        log_probs=torch.randn(steps),
        settings=SamplerSettings(num_steps=steps, height=image, width=image),
    )
    return len(trajectory.to_bytes())


def png_bytes(image: Image.Image) -> int:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return len(buf.getvalue())


def noise_image(side: int, rng: np.random.Generator) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


def one_over_f_image(side: int, rng: np.random.Generator) -> Image.Image:
    """Random phases, amplitude 1/f per channel (channels correlated as photographs' are)."""
    fy, fx = np.meshgrid(np.fft.fftfreq(side), np.fft.fftfreq(side), indexing="ij")
    amplitude = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / side)
    shared = np.exp(2j * np.pi * rng.random((side, side)))
    channels = []
    for _ in range(3):
        own = np.exp(2j * np.pi * rng.random((side, side)))
        field = np.real(np.fft.ifft2(amplitude * (0.8 * shared + 0.2 * own)))
        channels.append((field - field.mean()) / field.std())
    pixels = np.clip(128 + 40 * np.stack(channels, -1), 0, 255).round().astype(np.uint8)
    return Image.fromarray(pixels)


def shipped_run(pairs: int) -> dict[str, object]:
    """Sample `pairs` pairs with the shipped model at the demo's 20 steps; sizes of what a job stores."""
    from core.basemodel.evaluate import eval_prompts
    from core.diffusion.models import load_pipeline
    from core.diffusion.sampler import sample_trajectories

    torch.set_num_threads(1)
    pipe = load_pipeline(str(SHIPPED))
    prompts = [p for p in eval_prompts(pairs) for _ in "ab"]
    start = time.perf_counter()
    batch = sample_trajectories(
        pipe, prompts, list(range(len(prompts))), SamplerSettings(num_steps=20, guidance_scale=7.5)
    )
    seconds = time.perf_counter() - start
    pngs, files = [], []
    for i, image in enumerate(batch.pil_images()):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        pngs.append(buf.getvalue())
        files.append(len(batch.trajectory(i).to_bytes()))
    return {
        "images": len(pngs),
        "image_size": list(batch.pil_images()[0].size),
        "png_bytes": [len(p) for p in pngs],
        "png_median": statistics.median(len(p) for p in pngs),
        "latents_file_bytes": files,
        "sampling_seconds": seconds,
        "_pngs": pngs,
    }


def simulate_retention(args: argparse.Namespace, pngs: list[bytes]) -> dict[str, object]:
    """A SQLite database and blob store after `rounds` finished rounds and what waits; report, prune,
    report."""
    from alembic import command

    from core.db.migrate import alembic_config

    rng = random.Random(0)
    channels, side, image, steps = SHAPES["shipped_20_steps"]
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.db"
        config = alembic_config(url)
        config.attributes["skip_logging"] = True
        command.upgrade(config, "head")
        store = LocalBlobStore(Path(tmp) / "blobs")
        engine = make_engine(url)
        sessions = make_session_factory(engine)

        def trajectory_blobs() -> bytes:
            latents = torch.randn(steps + 1, channels, side, side)
            return TrajectoryLatents(
                PROMPT,
                rng.getrandbits(63),
                latents,
                torch.arange(steps, 0, -1) * 50,
                torch.randn(steps),
                SamplerSettings(num_steps=steps, height=image, width=image),
            ).to_bytes()

        with sessions() as session, session.begin():
            publish_policy_version(session=session, version=0)
            prompt = add_prompt(session=session, text=PROMPT)

            def pair() -> tuple[int, int, int]:
                ids = []
                for _ in "ab":
                    latents_key, image_key = blob_keys.trajectory(0, prompt.id)
                    store.put(latents_key, trajectory_blobs())
                    store.put(image_key, rng.choice(pngs))
                    row = create_trajectory(
                        session=session,
                        prompt_id=prompt.id,
                        policy_version=0,
                        seed=rng.getrandbits(40),
                        image_key=image_key,
                        latents_key=latents_key,
                        log_probs_key=latents_key,
                        sampler={"num_steps": steps},
                    )
                    ids.append(row.id)
                made = create_pair(session=session, trajectory_a_id=ids[0], trajectory_b_id=ids[1])
                return made.id, ids[0], ids[1]

            for r in range(args.rounds):
                trained = [pair() for _ in range(args.round_pairs)]
                round_ = start_training_round(session=session, base_version=r)
                decided = [PreferencePair(pid, PROMPT, 0, a, b, 1) for pid, a, b in trained]
                record_round_pairs(session=session, round_id=round_.id, pairs=decided)
                publish_policy_version(
                    session=session,
                    version=r + 1,
                    parent_version=r,
                    lora_key=f"l/{r + 1}",
                    lora_sha256="0" * 64,
                )
                finish_training_round(
                    session=session, round_id=round_.id, status="done", produced_version=r + 1
                )
            for _ in range(args.waiting + args.open):
                pair()
            campaign = start_campaign(
                session=session, version=args.rounds, baseline_version=0, target_votes=1, prompt_split="train"
            )
            for i in range(args.eval_pairs):
                sides = []
                for version in (args.rounds, 0):
                    key = blob_keys.eval_image(campaign.id, version, prompt.id)
                    store.put(key, rng.choice(pngs))
                    sides.append(
                        create_trajectory(
                            session=session,
                            prompt_id=prompt.id,
                            policy_version=version,
                            seed=i,
                            image_key=key,
                        ).id
                    )
                create_eval_pair(
                    session=session,
                    campaign_id=campaign.id,
                    version_trajectory_id=sides[0],
                    baseline_trajectory_id=sides[1],
                    rng=rng,
                )
        with sessions() as session:
            before = storage_report(session=session, store=store)
            start = time.perf_counter()
            result = prune_latents(session=session, store=store)
            prune_seconds = time.perf_counter() - start
            after = storage_report(session=session, store=store)
        engine.dispose()
    return {
        "rounds": args.rounds,
        "round_pairs": args.round_pairs,
        "waiting_pairs": args.waiting,
        "open_pairs": args.open,
        "eval_pairs": args.eval_pairs,
        "before": before.to_dict(),
        "after": after.to_dict(),
        "pruned_trajectories": result.marked,
        "deleted_bytes": result.deleted.bytes,
        "prune_seconds": prune_seconds,
    }


def query_scale(admin_url: str, pairs: int, per_round: int = 320) -> dict[str, object]:
    """Time the prunable query and the marking UPDATE over `pairs` pairs in a scratch Postgres database."""
    from sqlalchemy import text

    from core.db.retention import mark_latents_pruned, prunable_latents

    url = scratch_database(admin_url, "densealign_bench_retention")
    rounds = -(-pairs // per_round)
    try:
        engine = make_engine(url)
        with engine.begin() as conn:
            conn.execute(
                text("INSERT INTO policy_versions (version, metrics, created_at) VALUES (0, '{}', now())")
            )
            conn.execute(
                text(
                    "INSERT INTO prompts (text, split, active, created_at) VALUES ('p', 'train', true, now())"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO trajectories (id, prompt_id, policy_version, seed, sampler, latents_key, image_key, "
                    "created_at) SELECT g, 1, 0, g, '{}', 'trajectories/v0/p1/' || g || '.safetensors', "
                    "'images/v0/p1/' || g || '.png', now() FROM generate_series(1, :n) g"
                ),
                {"n": 2 * pairs},
            )
            conn.execute(
                text(
                    "INSERT INTO pairs (id, prompt_id, policy_version, kind, pairing, trajectory_a_id, trajectory_b_id, "
                    "required_judgements, judgement_count, created_at) SELECT g, 1, 0, 'train', 'independent', "
                    "2 * g - 1, 2 * g, 1, 1, now() FROM generate_series(1, :n) g"
                ),
                {"n": pairs},
            )
            conn.execute(
                text(
                    "INSERT INTO training_rounds (id, base_version, status, pairs_used, votes_used, metrics, started_at) "
                    "SELECT g, 0, CASE WHEN g = :r THEN 'running' ELSE 'done' END, 0, 0, '{}', now() "
                    "FROM generate_series(1, :r) g"
                ),
                {"r": rounds},
            )
            conn.execute(
                text(
                    "INSERT INTO training_round_pairs (round_id, pair_id, winner, votes, weight) "
                    "SELECT 1 + (g - 1) / :k, g, 'a', 1, 1 FROM generate_series(1, :n) g"
                ),
                {"k": per_round, "n": pairs},
            )
            conn.execute(text("ANALYZE"))
        out: dict[str, object] = {"pairs": pairs, "rounds": rounds, "pairs_per_round": per_round}
        with make_session_factory(engine)() as session:
            for keep in (0, 5):
                start = time.perf_counter()
                found = prunable_latents(session=session, keep_rounds=keep)
                out[f"prunable_keep_{keep}"] = len(found)
                out[f"find_seconds_keep_{keep}"] = time.perf_counter() - start
            start = time.perf_counter()
            out["marked"] = mark_latents_pruned(session=session)
            out["mark_seconds"] = time.perf_counter() - start
            session.rollback()
        engine.dispose()
    finally:
        drop_database(admin_url, url)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8, help="pairs sampled with the shipped model")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--round-pairs", type=int, default=48, help="pairs per round (the CPU pace's 48)")
    parser.add_argument("--waiting", type=int, default=20, help="decided pairs waiting for the next round")
    parser.add_argument("--open", type=int, default=24, help="unlabelled pool pairs")
    parser.add_argument("--eval-pairs", type=int, default=50)
    parser.add_argument(
        "--scale-pairs", type=int, default=100_000, help="pairs for the query timing; 0 = skip"
    )
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "storage.json"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    run = shipped_run(args.pairs)
    pngs = run.pop("_pngs")
    assert isinstance(pngs, list)
    png_for = {
        "shipped_20_steps": float(run["png_median"]),  # type: ignore[arg-type]
        "shipped_50_steps": float(run["png_median"]),  # type: ignore[arg-type]
    }
    synthetic = {}
    for name, (_c, _s, side, _n) in SHAPES.items():
        if name.startswith("shipped"):
            continue
        synthetic[name] = {
            "raw_rgb_bytes": side * side * 3,
            "png_uniform_noise": png_bytes(noise_image(side, rng)),
            "png_one_over_f": statistics.median(png_bytes(one_over_f_image(side, rng)) for _ in range(3)),
        }
        png_for[name] = float(synthetic[name]["png_one_over_f"])

    shapes = {}
    for name, (channels, side, image, steps) in SHAPES.items():
        latents = latents_file_bytes(channels, side, image, steps)
        png = png_for[name]
        per_pair = 2 * (latents + png)
        shapes[name] = {
            "latent_shape": [steps + 1, channels, side, side],
            "image_side": image,
            "num_steps": steps,
            "latents_file_bytes": latents,
            "latents_tensor_bytes": (steps + 1) * channels * side * side * 2,
            "png_bytes": png,
            "png_source": "measured (shipped model run)" if name.startswith("shipped") else "1/f stand-in",
            "pair_bytes": per_pair,
            "pair_latents_share": 2 * latents / per_pair,
            "bytes_100k_pairs": per_pair * PAIRS_PER_TOTAL,
            "latents_bytes_100k_pairs": 2 * latents * PAIRS_PER_TOTAL,
            "images_bytes_100k_pairs": 2 * png * PAIRS_PER_TOTAL,
        }
        print(
            f"{name:18s} latents file {latents:>10,d} B  png {png:>10,.0f} B  pair {per_pair:>12,.0f} B  "
            f"100k pairs {per_pair * PAIRS_PER_TOTAL / 1e9:8.2f} GB (latents {2 * latents / per_pair:.1%})"
        )
    print("shipped run:", {k: v for k, v in run.items() if k != "png_bytes"})
    print("synthetic PNGs:", synthetic)

    retention = simulate_retention(args, pngs)
    b, a = retention["before"], retention["after"]
    assert isinstance(b, dict) and isinstance(a, dict)
    print(
        f"retention ({args.rounds} rounds x {args.round_pairs} pairs, {args.waiting} waiting, {args.open} open, "
        f"{args.eval_pairs} eval): {b['total']['bytes']:,} B before prune, {a['total']['bytes']:,} B after; "
        f"trajectories {b['usage']['trajectories']['bytes']:,} -> {a['usage']['trajectories']['bytes']:,} B"
    )

    scale = query_scale(args.postgres, args.scale_pairs) if args.scale_pairs else None
    if scale:
        print("prune queries at scale (Postgres):", scale)

    out = {
        "retention_queries_postgres": scale,
        "machine": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "shapes": shapes,
        "shipped_run": run,
        "synthetic_png": synthetic,
        "retention_simulation": retention,
    }
    Path(args.out).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
