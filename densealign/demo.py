"""`densealign demo` (`make demo`): the whole loop on one machine, no Docker, Postgres, Redis or GPU.

One process runs the web app (uvicorn), a sampling worker and the trainer as threads, on a SQLite
file and an in-process job queue, with the small shapes model that ships in models/. It migrates
and seeds a fresh database (version 0, prompts, an admin invite), prints the login link and how
long it took until pairs were ready, and logs all three parts until Ctrl-C stops them cleanly.
With `--oracle faithfulness` (`make demo ORACLE=faithfulness`) a programmatic labeller judges pairs
through the REST API, so the loop runs unattended; each published version is scored by the same
judge on held-out seeds and printed next to version 0's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from alembic import command
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.main import create_app
from app.refill import PoolRefiller
from core.basemodel.shapes import all_prompts
from core.db import make_engine, make_session_factory
from core.db.labellers import create_invite, create_labeller
from core.db.migrate import alembic_config
from core.db.models import Pair
from core.db.policies import ensure_base_version, get_policy_version
from core.db.prompts import add_prompt
from core.diffusion.sampler import SamplerSettings
from core.heartbeat import Heartbeat
from core.queue import ThreadQueue
from core.settings import Settings
from densealign.labeller import label_loop
from trainer.judging import JudgeEvaluator
from trainer.main import build_trainer, serve_rounds
from worker.main import build_sampler, start_refill_tick

log = logging.getLogger("densealign.demo")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "models" / "densealign-shapes"


def demo_prompts() -> tuple[list[str], list[str]]:
    """Training prompts the annotators see, and held-out ones for evaluation only."""
    prompts = all_prompts()
    singles, pairs = prompts[:12], prompts[12:]
    train = singles + pairs[::27][:8]
    held_out = pairs[13::27][:4]
    return train, held_out


def pick_prompts(train: list[str], n: int) -> list[str]:
    """n of the training prompts, evenly spaced (so one- and two-object scenes both appear)."""
    if not 1 <= n <= len(train):
        raise SystemExit(f"--prompts must be between 1 and {len(train)}, got {n}")
    return [train[i * len(train) // n] for i in range(n)]


def build_settings(args: argparse.Namespace) -> Settings:
    data = Path(args.data).resolve()
    return Settings(
        demo=True,
        cookie_secure=False,
        database_url=f"sqlite:///{data / 'densealign.db'}",
        blob_dir=str(data / "blobs"),
        public_base_url=f"http://{args.host}:{args.port}",
        overlap_share=0.0,
        model={"base_model": str(args.model), "device": "cpu", "lora_rank": 4},  # type: ignore[arg-type]
        sampler={"num_steps": args.steps, "guidance_scale": 7.5},  # type: ignore[arg-type]
        dpo={  # type: ignore[arg-type]
            # Scaled to a 4M-parameter model on a CPU: larger steps and clip than SD 1.5's, few steps
            # per round, so versions arrive every few minutes. gamma and M are the paper's.
            "min_new_pairs": args.round_labels,
            "steps_per_round": args.round_steps,
            "pairs_per_step": 4,
            "sampled_steps": 3,
            "lr": args.lr,
            "clip": args.clip,
            "beta": args.beta,
            "checkpoint_every": 10,
            "poll_seconds": 2.0,
        },
        pool={"target_per_prompt": 2, "tick_seconds": 5.0},  # type: ignore[arg-type]
        # Every published version is put to a blind vote against version 0 by whoever labels (the oracle
        # too), so the dashboard's evaluation chart fills in while the demo runs.
        eval={  # type: ignore[arg-type]
            "share": args.eval_share,
            "auto_votes": args.eval_votes,
            "prompt_split": args.eval_prompts,
        },
    )


def prepare_database(settings: Settings, train: list[str], held_out: list[str]) -> tuple[str, str]:
    """Migrate, seed version 0 and prompts; returns (admin invite link, oracle token)."""
    config = alembic_config(settings.database_url)
    config.attributes["skip_logging"] = True
    command.upgrade(config, "head")
    engine = make_engine(settings.database_url)
    with make_session_factory(engine)() as session, session.begin():
        ensure_base_version(session=session, base_model=settings.model.base_model)
        for text in train:
            add_prompt(session=session, text=text, split="train")
        for text in held_out:
            add_prompt(session=session, text=text, split="eval")
        _, secret = create_invite(session=session, name="admin", role="admin", ttl=dt.timedelta(days=7))
        token = create_labeller(session=session, name="oracle").token
    engine.dispose()
    return f"{settings.public_base_url}/invite/{secret}", token


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="densealign demo", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="var/demo", help="folder for the SQLite file and blobs (wiped)")
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="base model folder or hub id")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--oracle", default="none", help="none, faithfulness, compressibility, incompressibility"
    )
    parser.add_argument("--noise", type=float, default=0.0, help="share of the oracle's decisions flipped")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps per image")
    parser.add_argument("--round-labels", type=int, default=48, help="new decided pairs that start a round")
    parser.add_argument("--round-steps", type=int, default=60, help="optimizer steps per round")
    parser.add_argument("--lr", type=float, default=1e-3)
    # 1e-3 saturates on the shapes model's 8x8x4 latents (most log-ratios clipped within two rounds, then
    # no gradient); 1e-2 keeps learning (docs/results.md).
    parser.add_argument("--clip", type=float, default=1e-2)
    # beta 3 gained more than the paper's 10 in each of 3 paired seeds; over 10 seeds gamma 0.9 at beta 3
    # gained +0.052 in judge score by 384 labels, gamma 1.0 nothing (docs/results.md).
    parser.add_argument("--beta", type=float, default=3.0, help="DPO beta (the product default is 10)")
    parser.add_argument(
        "--prompts", type=int, default=8, help="training prompts (of 20): fewer learn faster per label"
    )
    parser.add_argument("--eval-seeds", type=int, default=6, help="held-out seeds per prompt for the judge")
    parser.add_argument(
        "--eval-votes", type=int, default=60, help="human-evaluation votes per published version (0 = none)"
    )
    parser.add_argument(
        "--eval-share", type=float, default=0.2, help="share of served pairs that are evaluation pairs"
    )
    parser.add_argument(
        "--eval-prompts",
        choices=("eval", "train"),
        default="eval",
        help="evaluate on the held-out prompts (eval) or the trained ones (train)",
    )
    parser.add_argument(
        "--exit-after-versions", type=int, default=None, help="stop once this many are published"
    )
    return parser.parse_args(argv)


@dataclass
class Demo:
    """What the demo's threads share: settings, the database, the stop signal and the judge's scores."""

    args: argparse.Namespace
    settings: Settings
    engine: Engine
    train: list[str]
    held_out: list[str]
    started: float = field(default_factory=time.perf_counter)
    stop: threading.Event = field(default_factory=threading.Event)
    scores: dict[int, dict[str, Any]] = field(default_factory=dict)
    server: uvicorn.Server | None = None
    sessions: sessionmaker[Session] = field(init=False)

    def __post_init__(self) -> None:
        self.sessions = make_session_factory(self.engine)

    @property
    def judge_name(self) -> str:
        return self.args.oracle if self.args.oracle != "none" else "faithfulness"

    def evaluator(self) -> JudgeEvaluator:
        return JudgeEvaluator(
            judge=self.judge_name,
            prompts=self.train,
            held_out=self.held_out,
            seeds=[10_000 + i for i in range(self.args.eval_seeds)],
            settings=SamplerSettings(num_steps=self.args.steps, guidance_scale=7.5),
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(threadName)-8s %(levelname)s %(message)s")
    for noisy in ("httpx", "uvicorn.access", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = build_settings(args)
    data = Path(args.data)
    if data.exists():
        shutil.rmtree(data)
    data.mkdir(parents=True)
    train, held_out = demo_prompts()
    train = pick_prompts(train, args.prompts)
    invite_link, oracle_token = prepare_database(settings, train, held_out)
    demo = Demo(args, settings, make_engine(settings.database_url), train, held_out)
    log.info("loading the base model %s", args.model)
    # The worker's own sampler and refill tick, the app's own refiller: only the queue is in-process.
    sampler = build_sampler(settings)
    queue = ThreadQueue(retries=settings.pool.job_retries)
    refiller = PoolRefiller(
        sessions=demo.sessions,
        queue=queue,
        target_per_prompt=settings.pool.target_per_prompt,
        max_version_lag=settings.dpo.max_version_lag,
        pairs_per_job=settings.pool.pairs_per_job,
        eval_pool_pairs=settings.eval.pool_pairs,
    )
    app = create_app(settings, session_factory=demo.sessions, refiller=refiller)
    demo.server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"))
    start_refill_tick(settings, queue, demo.stop)  # its first refill runs at once
    jobs = {
        "worker": lambda: queue.run_worker(
            sampler.sample_pairs, demo.stop, eval_handler=sampler.sample_eval_pairs
        ),
        "trainer": lambda: run_trainer(demo),
        "labeller": lambda: announce_then_label(demo, invite_link, oracle_token),
    }
    threads = [threading.Thread(target=fn, name=name, daemon=True) for name, fn in jobs.items()]
    for thread in threads:
        thread.start()
    log.info("DenseAlign demo at %s (Ctrl-C stops everything)", settings.public_base_url)
    try:
        demo.server.run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its clean shutdown
        log.info("stopping")
    finally:
        demo.stop.set()
        for thread in threads:
            thread.join(timeout=60)
    log_summary(demo)
    return 0


def run_trainer(demo: Demo) -> None:
    """The trainer's own loop (`trainer.main.serve_rounds`), with each version judged and logged."""
    settings = demo.settings
    evaluator = demo.evaluator()
    trainer = build_trainer(
        settings, on_publish=lambda version: on_publish(demo, version), evaluate=evaluator
    )
    trainer.should_stop = demo.stop.is_set
    demo.scores[0] = evaluator(trainer.policy)
    evaluator.baseline = demo.scores[0]["judge_scores"]
    base = demo.scores[0]
    log.info(
        "version 0: %s judge score %.3f on the %d trained prompts, %.3f on %d held-out ones; accepts %.0f%%",
        demo.judge_name,
        base["judge_score_train"],
        len(demo.train),
        base["judge_score_held_out"],
        len(demo.held_out),
        100 * base["judge_accept"],
    )
    heartbeat = Heartbeat(sessions=demo.sessions, role="trainer", period=settings.heartbeat_seconds).start()
    try:
        serve_rounds(
            trainer,
            engine=demo.engine,
            heartbeat=heartbeat,
            stop=demo.stop,
            poll_seconds=settings.dpo.poll_seconds,
        )
    finally:
        heartbeat.stop("exited")


def on_publish(demo: Demo, version: int) -> None:
    """Log a published version's judge scores next to version 0's; stop after --exit-after-versions."""
    with demo.sessions() as session:
        metrics = get_policy_version(session=session, version=version).metrics
    demo.scores[version] = metrics
    base = demo.scores[0]
    log.info(
        "version %d published %.1f min after start: %s judge score on the trained prompts %.3f "
        "(version 0: %.3f; paired gain %+.3f ± %.3f over %d prompt/seed cases), on held-out "
        "prompts %.3f (version 0: %.3f; paired gain %+.3f ± %.3f); accepts %.0f%% (version 0: %.0f%%)",
        version,
        (time.perf_counter() - demo.started) / 60,
        demo.judge_name,
        metrics["judge_score_train"],
        base["judge_score_train"],
        metrics["judge_gain_train"],
        metrics["judge_gain_train_se"],
        len(demo.train) * demo.args.eval_seeds,
        metrics["judge_score_held_out"],
        base["judge_score_held_out"],
        metrics["judge_gain_held_out"],
        metrics["judge_gain_held_out_se"],
        100 * metrics["judge_accept"],
        100 * base["judge_accept"],
    )
    if demo.args.exit_after_versions is not None and version >= demo.args.exit_after_versions:
        demo.stop.set()
        if demo.server is not None:
            demo.server.should_exit = True


def announce_then_label(demo: Demo, invite_link: str, oracle_token: str) -> None:
    """Say when the first pairs are ready and where to log in; then, with --oracle, label through REST."""
    while not demo.stop.is_set():
        with demo.sessions() as session:
            if session.query(Pair.id).first() is not None:
                break
        demo.stop.wait(0.5)
    if demo.stop.is_set():
        return
    since_make = ""
    if os.environ.get("DENSEALIGN_DEMO_T0", "").isdigit():  # set by `make demo` before installing
        since_make = f" ({time.time() - int(os.environ['DENSEALIGN_DEMO_T0']):.0f} s since `make demo` began, install included)"
    log.info(
        "pairs are ready after %.0f s%s. Open %s to log in as admin, then label at %s/label",
        time.perf_counter() - demo.started,
        since_make,
        invite_link,
        demo.settings.public_base_url,
    )
    if demo.args.oracle != "none":
        label_loop(
            base_url=demo.settings.public_base_url,
            token=oracle_token,
            preference=demo.args.oracle,
            noise=demo.args.noise,
            stop=demo.stop,
            name=f"oracle-{demo.args.oracle}",
        )


def log_summary(demo: Demo) -> None:
    if demo.scores:
        log.info(
            "summary: "
            + ", ".join(
                f"v{v} {m.get('judge_score_train', float('nan')):.3f} (gain {m.get('judge_gain_train', 0.0):+.3f})"
                for v, m in sorted(demo.scores.items())
            )
            + " on the trained prompts"
        )
