"""`densealign worker` / `python -m worker`: preload the policy, then serve sampling jobs from RQ.

The pipeline is loaded once; jobs run in this process (RQ `SimpleWorker`, no fork per job), so a
job costs only its sampling. A background tick tops the pool up every `pool.tick_seconds`.
Bad settings (an unknown base model, a LoRA rank that does not fit the published adapters, ...)
stop the process at start with one line that says what to fix.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from redis import Redis
from rq.defaults import DEFAULT_WORKER_TTL

from core.blob_stores import open_blob_store
from core.db import make_engine, make_session_factory
from core.db.errors import NoCurrentPolicy
from core.heartbeat import Heartbeat
from core.pool import refill_pool
from core.queue import JOB_TIMEOUT_SECONDS, QUEUE_NAME, RqSamplingQueue, SamplingQueue
from core.settings import Settings, SettingsError, load_settings
from core.sweep import sweep_orphans
from worker.runner import serve_until_stopped

if TYPE_CHECKING:  # the model code (torch) is imported once the process can stop on SIGTERM
    from worker.sampling import PairSampler

logger = logging.getLogger("densealign.worker")
SWEEP_SECONDS = 600.0  # how often a worker looks for blobs of killed jobs


def build_sampler(settings: Settings) -> PairSampler:
    """Load the base model and adapter, and check they fit the current published version.

    The adapter is fused into the base weights for sampling unless `sampler.fuse_adapter` is off
    (core/diffusion/policy.py: ~10% faster on CPU; swaps stay exact).
    """
    from core.diffusion.policy import policy_from_config
    from core.diffusion.sampler import SamplerSettings
    from worker.sampling import OverlapPolicy, PairSampler

    size = settings.sampler.image_size
    policy = policy_from_config(settings.model)
    if settings.sampler.fuse_adapter:
        policy.fuse()
    sampler = PairSampler(
        policy=policy,
        settings=SamplerSettings(
            num_steps=settings.sampler.num_steps,
            guidance_scale=settings.sampler.guidance_scale,
            eta=settings.sampler.eta,
            height=size,
            width=size,
        ),
        sessions=make_session_factory(make_engine(settings.database_url)),
        blobs=open_blob_store(settings.blob_url, settings.blob_dir),
        overlap=OverlapPolicy(settings.overlap_k, settings.agreement_k, settings.overlap_share),
        pairing=settings.pool.pairing,
    )
    with sampler.sessions() as session:
        sampler.sync_policy(session)
    return sampler


def start_refill_tick(settings: Settings, queue: SamplingQueue, stop: threading.Event) -> threading.Thread:
    """Top the pool up every `pool.tick_seconds` until `stop` is set; sweep orphan blobs now and then."""
    sessions = make_session_factory(make_engine(settings.database_url))
    store = open_blob_store(settings.blob_url, settings.blob_dir)
    # Older than any job can run, so a running job's not-yet-inserted blobs are never taken.
    orphan_age = dt.timedelta(seconds=JOB_TIMEOUT_SECONDS + 600)
    next_sweep = time.monotonic()

    def loop() -> None:
        nonlocal next_sweep
        while not stop.is_set():
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + SWEEP_SECONDS
                try:
                    with sessions() as session:
                        sweep_orphans(session=session, store=store, older_than=orphan_age)
                except Exception as exc:
                    logger.warning("orphan sweep failed: %s", exc)
            try:
                # first the jobs of workers that died mid-job, so their slots count as busy again
                queue.requeue_abandoned()
                with sessions() as session:
                    refill_pool(
                        session=session,
                        queue=queue,
                        target_per_prompt=settings.pool.target_per_prompt,
                        max_version_lag=settings.dpo.max_version_lag,
                        pairs_per_job=settings.pool.pairs_per_job,
                        eval_pool_pairs=settings.eval.pool_pairs,
                    )
            except Exception as exc:  # a tick must never kill the worker; the next one retries
                logger.warning("pool refill failed: %s", exc)
            stop.wait(settings.pool.tick_seconds)

    thread = threading.Thread(target=loop, name="pool-refill", daemon=True)
    thread.start()
    return thread


def _exit_now(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def start(settings: Settings) -> tuple[PairSampler, Redis, Heartbeat]:
    """Load the model and check it against the current version, reach Redis, start the heartbeat.
    Raises SettingsError with one line to fix on bad settings."""
    from core.diffusion.models import ModelNotFoundError
    from core.diffusion.policy import AdapterMismatchError
    from worker.sampling import install

    try:
        sampler = build_sampler(settings)
    except (ModelNotFoundError, AdapterMismatchError, NoCurrentPolicy, ValueError) as exc:
        raise SettingsError(str(exc)) from None
    install(sampler)
    # redis-py 8 gives every connection a 5 s socket timeout unless told otherwise, and RQ raises
    # only the pool's default (for connections made later) before its blocking wait for the next
    # job; the connection pinged here would keep 5 s, so an idle worker timed out after 5 s and
    # quit. An explicit timeout above RQ's blocking wait (worker TTL - 15 s) holds for them all.
    redis = Redis.from_url(settings.redis_url, socket_timeout=DEFAULT_WORKER_TTL)
    redis.ping()
    # Beats start once the process can work (compose's start period covers the model load), so a
    # start that fails on bad settings prints its one line and nothing else.
    heartbeat = Heartbeat(
        sessions=make_session_factory(make_engine(settings.database_url)),
        role="worker",
        period=settings.heartbeat_seconds,
    ).start()
    return sampler, redis, heartbeat


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="densealign worker", description="Serve sampling jobs from RQ.")
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    parser.add_argument("--no-tick", action="store_true", help="do not run the periodic pool refill here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    # Until RQ installs its own handlers (a warm shutdown), SIGTERM stops the model load at once: as
    # PID 1 in a container the default action would be to ignore it.
    signal.signal(signal.SIGTERM, _exit_now)
    try:
        settings = load_settings()
        sampler, redis, heartbeat = start(settings)
    except SettingsError as exc:
        print(f"densealign worker: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # services down: say which
        print(f"densealign worker: cannot start: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    if not args.no_tick:
        start_refill_tick(settings, RqSamplingQueue(redis, retries=settings.pool.job_retries), stop)
    try:
        return serve_until_stopped(
            redis=redis,
            queue_names=[QUEUE_NAME],
            heartbeat=heartbeat,
            loaded_version=lambda: sampler.loaded_version,
            burst=args.burst,
            model_family=sampler.policy.family,
        )
    finally:
        stop.set()
        heartbeat.stop("exited")
