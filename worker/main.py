"""`densealign worker` / `python -m worker`: preload the policy, then serve sampling jobs from RQ.

The pipeline is loaded once; jobs run in this process (RQ `SimpleWorker`, no fork per job), so a
job costs only its sampling. A background tick tops the pool up every `pool.tick_seconds`.
Bad settings (an unknown base model, a LoRA rank that does not fit the published adapters, ...)
stop the process at start with one line that says what to fix.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from typing import Any

from core.settings import Settings, SettingsError, load_settings

logger = logging.getLogger("densealign.worker")


def build_sampler(settings: Settings) -> Any:
    """Load the base model and adapter, and check they fit the current published version."""

    from core.db import make_engine, make_session_factory
    from core.diffusion.policy import policy_from_config
    from core.diffusion.sampler import SamplerSettings
    from core.storage import LocalBlobStore
    from worker.sampling import OverlapPolicy, Sampler

    size = settings.sampler.image_size
    sampler = Sampler(
        policy=policy_from_config(settings.model),
        settings=SamplerSettings(
            num_steps=settings.sampler.num_steps,
            guidance_scale=settings.sampler.guidance_scale,
            eta=settings.sampler.eta,
            height=size,
            width=size,
        ),
        sessions=make_session_factory(make_engine(settings.database_url)),
        blobs=LocalBlobStore(settings.blob_dir),
        overlap=OverlapPolicy(settings.overlap_k, settings.agreement_k, settings.overlap_share),
    )
    with sampler.sessions() as session:
        sampler.sync_policy(session)
    return sampler


def start_refill_tick(settings: Settings, redis: object, stop: threading.Event) -> threading.Thread:
    """Top the pool up every `pool.tick_seconds` until `stop` is set."""
    from core.db import make_engine, make_session_factory
    from core.pool import refill_pool
    from core.queue import RqSamplingQueue

    sessions = make_session_factory(make_engine(settings.database_url))
    queue = RqSamplingQueue(redis, retries=settings.pool.job_retries)

    def loop() -> None:
        while not stop.is_set():
            try:
                with sessions() as session:
                    refill_pool(
                        session=session,
                        queue=queue,
                        redis=redis,
                        target_per_prompt=settings.pool.target_per_prompt,
                        max_version_lag=settings.dpo.max_version_lag,
                        pairs_per_job=settings.pool.pairs_per_job,
                    )
            except Exception as exc:  # a tick must never kill the worker; the next one retries
                logger.warning("pool refill failed: %s", exc)
            stop.wait(settings.pool.tick_seconds)

    thread = threading.Thread(target=loop, name="pool-refill", daemon=True)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="densealign worker", description="Serve sampling jobs from RQ.")
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    parser.add_argument("--no-tick", action="store_true", help="do not run the periodic pool refill here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    try:
        settings = load_settings()
        from redis import Redis
        from rq import Queue, SimpleWorker

        from core.diffusion.models import ModelNotFoundError
        from core.diffusion.policy import AdapterMismatchError
        from core.queue import QUEUE_NAME

        try:
            sampler = build_sampler(settings)
        except (ModelNotFoundError, AdapterMismatchError, ValueError) as exc:
            raise SettingsError(str(exc)) from None
        from worker.sampling import Sampler, install

        assert isinstance(sampler, Sampler)
        install(sampler)
        redis = Redis.from_url(settings.redis_url)
        redis.ping()
    except SettingsError as exc:
        print(f"densealign worker: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # services down: say which
        print(f"densealign worker: cannot start: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    if not args.no_tick:
        start_refill_tick(settings, redis, stop)
    worker = SimpleWorker([Queue(QUEUE_NAME, connection=redis)], connection=redis)
    try:
        worker.work(burst=args.burst, with_scheduler=True, logging_level="INFO")
    finally:
        stop.set()
    return 0
