"""`densealign trainer` / `python -m trainer`: wait for labels, train a round, publish a version, repeat.

Settings come from DENSEALIGN_* (see core/settings.py: `dpo`, `model`). A running round left by a
killed trainer is resumed first. Bad settings stop the process at start with one line.

Under torchrun (WORLD_SIZE > 1) each process is one rank of a data-parallel trainer
(trainer/data_parallel.py): rank 0 runs the loop below (lock, heartbeats, picking and publishing
rounds), the others train their share of each round rank 0 picks. A lost rank ends every rank with
exit status 1 and one line; the round resumes from its checkpoint at the next start.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from core.blob_stores import open_blob_store
from core.db import make_engine, make_session_factory
from core.db.errors import NoCurrentPolicy
from core.db.locks import AdvisoryLock
from core.db.sampler_groups import configured_sampler
from core.diffusion.models import ModelNotFoundError
from core.diffusion.policy import AdapterMismatchError, Policy, policy_from_config
from core.heartbeat import Heartbeat
from core.retention import prune_after_publish
from core.settings import Settings, SettingsError, load_settings
from core.storage import BlobStoreUnavailable
from trainer.data_parallel import DataParallel, DataParallelError, data_parallel_from_env
from trainer.rounds import RoundAlreadyFinished, Trainer

logger = logging.getLogger("densealign.trainer")


def build_trainer(
    settings: Settings,
    on_publish: Callable[[int], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    evaluate: Callable[[Policy], dict[str, Any]] | None = None,
) -> Trainer:
    """The trainer the settings describe: base model and adapter, database, blob store, round config."""
    trainer = Trainer(
        policy=policy_from_config(settings.model),
        sessions=make_session_factory(make_engine(settings.database_url)),
        blobs=open_blob_store(settings.blob_url, settings.blob_dir),
        config=settings.dpo,
        # Rounds train on pairs sampled as workers with these settings sample now.
        sampler=configured_sampler(settings.sampler),
        on_publish=on_publish,
        progress=progress,
        evaluate=evaluate,
        auto_evaluation=settings.eval,
        reliability_refresh_seconds=settings.reliability.refresh_seconds,
    )
    if settings.retention.drop_trained_latents:
        # after each published version, delete the latents no round will read again (core/retention.py)
        trainer.on_publish = prune_after_publish(
            sessions=trainer.sessions,
            store=trainer.blobs,
            keep_rounds=settings.retention.keep_rounds,
            then=on_publish,
        )
    return trainer


def install_stop_handlers(stop: threading.Event, graceful: threading.Event) -> None:
    """SIGTERM/SIGINT set `stop`; before `graceful` is set (model still loading) they exit at once.

    The trainer is PID 1 in its container, where an unhandled SIGTERM is ignored, so without this
    every `docker compose down` waited out the grace period and then killed it. A second signal
    always exits at once.
    """

    def handle(signum: int, _frame: Any) -> None:
        if stop.is_set() or not graceful.is_set():
            raise SystemExit(128 + signum)
        logger.info(
            "%s: finishing the optimizer step in hand, then checkpointing", signal.Signals(signum).name
        )
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def serve_rounds(
    trainer: Trainer,
    *,
    engine: Engine,
    heartbeat: Heartbeat,
    stop: threading.Event,
    poll_seconds: float,
    once: bool = False,
) -> None:
    """The trainer's loop until `stop`: resume or start a round when labels allow, publish, repeat.

    One trainer per deployment: a second one stands by on the advisory lock, ready to take over if the
    first goes away. Postgres going away is waited out (a running round resumes from its checkpoint).
    With `once`, at most one round is trained and the outcome printed."""
    lock = AdvisoryLock(engine, "densealign:trainer")
    standby_logged = False
    try:
        while not (stop.is_set() or trainer.group_stopping):
            try:
                if not lock.try_acquire():
                    if not standby_logged:
                        logger.info("another trainer holds the trainer lock; standing by")
                        standby_logged = True
                    heartbeat.set("standby", "another trainer is running", version=trainer.current_version)
                    trainer.idle()
                    stop.wait(poll_seconds)
                    continue
                standby_logged = False
                heartbeat.set(
                    "checking", "a round to resume, or enough new labels", version=trainer.current_version
                )
                version = trainer.run_once()
            except RoundAlreadyFinished as exc:
                logger.warning("%s", exc)
                continue
            except (OperationalError, BlobStoreUnavailable, NoCurrentPolicy) as exc:
                # Postgres or the object store restarting or unreachable: nothing is lost (a running round
                # resumes from its checkpoint), so wait and try again instead of dying. No current
                # version: wait for one.
                reason = (
                    "database unavailable"
                    if isinstance(exc, OperationalError)
                    else "object store unavailable"
                    if isinstance(exc, BlobStoreUnavailable)
                    else str(exc)
                )
                logger.warning("%s, retrying in %.0fs: %s", reason, poll_seconds, exc)
                heartbeat.set("waiting", reason, version=trainer.current_version)
                stop.wait(poll_seconds)
                continue
            if version is not None:
                trainer.current_version = version
            if once:
                print(
                    f"published version {version}" if version is not None else "not enough decided pairs yet"
                )
                return
            if version is None and not (stop.is_set() or trainer.group_stopping):
                reason = trainer.waiting_reason or "waiting for new decided pairs"
                heartbeat.set("waiting", reason, version=trainer.current_version)
                stop.wait(poll_seconds)
    finally:
        lock.release()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="densealign trainer", description="Train rounds as labels arrive.")
    parser.add_argument(
        "--once", action="store_true", help="train at most one round (if enough labels), then exit"
    )
    args = parser.parse_args(argv)
    name = _process_name()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s")
    stop, graceful = threading.Event(), threading.Event()
    install_stop_handlers(stop, graceful)
    parallel: DataParallel | None = None
    try:
        settings = load_settings()
        parallel, device = data_parallel_from_env(
            timeout_seconds=settings.dpo.collective_timeout_seconds, device=settings.model.device
        )
        if device != settings.model.device:  # each rank on its own GPU
            settings = settings.model_copy(
                update={"model": settings.model.model_copy(update={"device": device})}
            )
        engine = make_engine(settings.database_url)
        # Beats start once the model is loaded (compose's start period covers the load), so a start
        # that fails on bad settings prints its one line and nothing else.
        heartbeat = Heartbeat(
            sessions=make_session_factory(engine), role="trainer", period=settings.heartbeat_seconds
        )

        def progress(step: int, total: int) -> None:
            heartbeat.set("training", f"round step {step}/{total}", version=trainer.current_version)
            if step == total or step % max(1, total // 10) == 0:
                logger.info("round progress: step %d/%d", step, total)

        try:
            trainer = build_trainer(settings, progress=progress)
        except (ModelNotFoundError, AdapterMismatchError, ValueError) as exc:
            raise SettingsError(str(exc)) from None
        trainer.should_stop = stop.is_set
        trainer.parallel = parallel
        if parallel is None or parallel.leader:
            heartbeat.start()
    except SettingsError as exc:
        print(f"densealign trainer: {exc}", file=sys.stderr)
        return 2
    except DataParallelError as exc:
        print(f"densealign trainer: {exc}", file=sys.stderr)
        return 1
    graceful.set()
    try:
        if parallel is not None and not parallel.leader:
            trainer.follow()
        else:
            try:
                serve_rounds(
                    trainer,
                    engine=engine,
                    heartbeat=heartbeat,
                    stop=stop,
                    poll_seconds=settings.dpo.poll_seconds,
                    once=args.once,
                )
            finally:
                heartbeat.stop("exited")
            trainer.release_followers()
    except DataParallelError as exc:
        print(f"densealign trainer: {exc}", file=sys.stderr)
        return 1
    finally:
        if parallel is not None:
            parallel.close()
    logger.info("stopped")
    return 0


def _process_name() -> str:
    """`trainer`, or `trainer rank R/N` in a data-parallel group (torchrun sets RANK and WORLD_SIZE)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"trainer rank {os.environ.get('RANK', '?')}/{world}" if world > 1 else "trainer"
