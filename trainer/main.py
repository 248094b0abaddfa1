"""`densealign trainer` / `python -m trainer`: wait for labels, train a round, publish a version, repeat.

Settings come from DENSEALIGN_* (see core/settings.py: `dpo`, `model`). A running round left by a
killed trainer is resumed first. Bad settings stop the process at start with one line.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from core.settings import Settings, SettingsError, load_settings

logger = logging.getLogger("densealign.trainer")
POLICY_CHANNEL = "densealign:policy"


def build_trainer(
    settings: Settings, on_publish: Any = None, progress: Any = None, evaluate: Any = None
) -> Any:

    from core.db import make_engine, make_session_factory
    from core.diffusion.policy import policy_from_config
    from core.diffusion.training import DpoHyperparameters
    from core.storage import LocalBlobStore
    from trainer.rounds import RoundConfig, Trainer

    d = settings.dpo
    hp = DpoHyperparameters(
        beta=d.beta,
        gamma=d.gamma,
        clip=d.clip,
        num_sampled_steps=d.sampled_steps,
        max_grad_norm=d.max_grad_norm,
    )
    return Trainer(
        policy=policy_from_config(settings.model),
        sessions=make_session_factory(make_engine(settings.database_url)),
        blobs=LocalBlobStore(settings.blob_dir),
        config=RoundConfig(
            hp=hp,
            lr=d.lr,
            weight_decay=d.weight_decay,
            pairs_per_step=d.pairs_per_step,
            steps_per_round=d.steps_per_round,
            min_new_pairs=d.min_new_pairs,
            max_version_lag=d.max_version_lag,
            checkpoint_every=d.checkpoint_every,
            seed=d.seed,
        ),
        on_publish=on_publish,
        progress=progress,
        evaluate=evaluate,
    )


def redis_notifier(redis_url: str) -> Any:
    """Publish new versions on Redis so workers learn of them at once (Postgres stays the truth)."""
    from redis import Redis

    redis = Redis.from_url(redis_url)

    def notify(version: int) -> None:
        try:
            redis.publish(POLICY_CHANNEL, str(version))
        except Exception as exc:  # Redis down: workers still find the version in Postgres
            logger.warning("could not announce version %d on Redis: %s", version, exc)

    return notify


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="densealign trainer", description="Train rounds as labels arrive.")
    parser.add_argument(
        "--once", action="store_true", help="train at most one round (if enough labels), then exit"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s trainer %(levelname)s %(message)s")
    try:
        settings = load_settings()
        from core.diffusion.models import ModelNotFoundError
        from core.diffusion.policy import AdapterMismatchError

        def progress(step: int, total: int) -> None:
            if step == total or step % max(1, total // 10) == 0:
                logger.info("round progress: step %d/%d", step, total)

        try:
            trainer = build_trainer(settings, redis_notifier(settings.redis_url), progress)
        except (ModelNotFoundError, AdapterMismatchError, ValueError) as exc:
            raise SettingsError(str(exc)) from None
    except SettingsError as exc:
        print(f"densealign trainer: {exc}", file=sys.stderr)
        return 2
    while True:
        version = trainer.run_once()
        if args.once:
            print(f"published version {version}" if version is not None else "not enough decided pairs yet")
            return 0
        if version is None:
            time.sleep(settings.dpo.poll_seconds)
