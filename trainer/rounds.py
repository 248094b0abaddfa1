"""A training round: decided pairs in, a new published policy version out, resumable at any point.

1. Pick the pairs: decided pairs (`core.db.training`) from versions at most `max_version_lag` behind
   the current one, not used by any earlier round, sampled with the current sampler settings (pairs
   of other settings wait, reported: `core.db.sampler_groups`). They are recorded with the round, so
   a resumed round trains on exactly the same pairs and no label is counted twice.
2. Start from the current version's adapter and optimizer state (version 0: the base model).
3. `steps_per_round` optimizer steps of discounted dense-reward DPO; step k draws its pairs and step
   indices from a generator seeded by (seed, round, k), so a resumed round repeats the same draws.
   Every `checkpoint_every` steps the adapter, optimizer and metric sums go to the blob store
   (atomic writes); a killed trainer resumes from the last one.
   What does not change within a round is prepared once (`RoundExamples`): the pairs (one query), the
   trajectories' latents (read once while they fit `max_round_trajectories_mb`), each distinct
   prompt's conditioning (the text encoder is frozen; LoRA is on the UNet only), and the reference's
   step means of the (trajectory, step) rows already evaluated (`ReferenceCache`, capped by
   `reference_cache_mb`). A resumed round first replays the reference part of its earlier draws into
   the cache, so its steps see the same cached values, bit for bit, as the uninterrupted round's.
4. Publish: write the adapter (diffusers safetensors) and optimizer state under policies/vN/, then
   in one transaction insert version N (with the round's metrics), make it current and close the
   round. Only then is the version visible, so nobody sees a half-written one.
"""

from __future__ import annotations

import io
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sqlalchemy.orm import Session, sessionmaker

from core import blob_keys
from core.db.campaigns import start_auto_campaign
from core.db.models import TrainingRound
from core.db.policies import (
    get_current_policy,
    get_policy_version,
    latest_version_number,
    publish_policy_version,
)
from core.db.reliability import fit_labellers, store_abilities
from core.db.sampler_groups import describe_group, trainable_together
from core.db.training import (
    PreferencePair,
    finish_training_round,
    fresh_pair_groups,
    record_round_pairs,
    round_preference_pairs,
    running_round,
    start_training_round,
    weigh_by_reliability,
)
from core.diffusion.conditioning import Conditioning
from core.diffusion.policy import Policy
from core.diffusion.sampler import (
    SamplerSettings,
    StepSchedule,
    TrajectoryLatents,
    encode_prompts,
    step_schedule,
)
from core.diffusion.training import (
    PairBatch,
    ReferenceCache,
    StepMetrics,
    draw_step_indices,
    make_optimizer,
    scheduled_lr,
    train_step,
    warm_reference_cache,
)
from core.settings import DpoConfig, EvalConfig
from core.storage import BlobNotFound, BlobStore
from trainer.data_parallel import DataParallel, DataParallelError

# What rank 0 tells the other ranks when the trainer stops (`Trainer.release_followers`).
_EXIT = "exit"

logger = logging.getLogger(__name__)


class RoundAlreadyFinished(RuntimeError):
    def __init__(self, round_id: int) -> None:
        super().__init__(f"training round {round_id} was finished by another trainer; nothing published")


@dataclass
class RoundMetrics:
    """Sums over a round's steps, turned into the published metrics at the end."""

    num_steps: int
    steps: int = 0
    sums: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(
            ("loss", "implicit_accuracy", "mean_abs_logratio", "clipped_share", "grad_norm"), 0.0
        )
    )
    by_step_abs: list[float] = field(default_factory=list)
    by_step_clipped: list[float] = field(default_factory=list)
    by_step_count: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.by_step_count:
            self.by_step_abs = [0.0] * self.num_steps
            self.by_step_clipped = [0.0] * self.num_steps
            self.by_step_count = [0] * self.num_steps

    def add(self, m: Any, clip: float) -> None:
        self.steps += 1
        for key in self.sums:
            self.sums[key] += float(getattr(m, key))
        for idx, lw, ll in zip(
            m.step_indices.flatten().tolist(),
            m.logratio_w.flatten().tolist(),
            m.logratio_l.flatten().tolist(),
            strict=True,
        ):
            for value in (lw, ll):
                self.by_step_abs[idx] += abs(value)
                self.by_step_clipped[idx] += float(abs(value) > clip)
                self.by_step_count[idx] += 1

    def summary(self) -> dict[str, Any]:
        n = max(self.steps, 1)
        out: dict[str, Any] = {key: value / n for key, value in self.sums.items()}
        out["optimizer_steps"] = self.steps
        out["abs_logratio_by_step"] = [
            (a / c if c else None) for a, c in zip(self.by_step_abs, self.by_step_count, strict=True)
        ]
        out["clipped_share_by_step"] = [
            (a / c if c else None) for a, c in zip(self.by_step_clipped, self.by_step_count, strict=True)
        ]
        return out


# Prompts per text-encoder call when a round encodes its prompts (bounds the encoder's activations).
_ENCODE_BATCH = 64


@dataclass
class RoundExamples:
    """A round's pairs, ready to batch: what stays the same for the whole round is read or computed once.

    - `trajectories`: every trajectory of the round, decoded once, when their float16 latents fit the
      limit (SD 1.5 at 512 px, 50 steps: 1.6 MiB each); empty beyond it, and `batch` reads from `blobs`.
    - `cond`: one conditioning row per distinct prompt, encoded once (SD 1.5: 2 x 77 x 768 values per
      prompt, 462 KiB in float32); a batch indexes it instead of running the text encoder.
    """

    pairs: list[PreferencePair]
    settings: SamplerSettings
    blobs: BlobStore
    trajectories: dict[int, TrajectoryLatents]
    cond: Conditioning
    prompt_row: dict[str, int]

    @classmethod
    def load(
        cls, pairs: list[PreferencePair], blobs: BlobStore, policy: Policy, max_trajectory_bytes: int
    ) -> RoundExamples:
        if not pairs:
            raise ValueError("a round needs at least one pair to train on")
        first = _read(blobs, pairs[0].winner_latents_key)
        keys = {p.winner_trajectory_id: p.winner_latents_key for p in pairs} | {
            p.loser_trajectory_id: p.loser_latents_key for p in pairs
        }
        trajectories: dict[int, TrajectoryLatents] = {}
        if len(keys) * first.latents.numel() * 2 <= max_trajectory_bytes:  # stored as float16
            trajectories[pairs[0].winner_trajectory_id] = first
            for tid, key in keys.items():
                if tid not in trajectories:
                    trajectories[tid] = _checked(_read(blobs, key), key, first.settings)
        prompts = sorted({p.prompt for p in pairs})
        chunks = range(0, len(prompts), _ENCODE_BATCH)
        cond = Conditioning.concat(
            [encode_prompts(policy.pipe, prompts[i : i + _ENCODE_BATCH], first.settings) for i in chunks]
        )
        return cls(pairs, first.settings, blobs, trajectories, cond, {p: i for i, p in enumerate(prompts)})

    def __len__(self) -> int:
        return len(self.pairs)

    def trajectory(self, tid: int, key: str | None) -> TrajectoryLatents:
        got = self.trajectories.get(tid)
        return got if got is not None else _checked(_read(self.blobs, key), key, self.settings)

    def batch(self, idx: list[int]) -> PairBatch:
        """The pairs `idx` (repeats allowed) with their conditioning rows and trajectory ids."""
        pairs = [self.pairs[i] for i in idx]
        ws = [self.trajectory(p.winner_trajectory_id, p.winner_latents_key).latents for p in pairs]
        ls = [self.trajectory(p.loser_trajectory_id, p.loser_latents_key).latents for p in pairs]
        return PairBatch(
            [p.prompt for p in pairs],
            torch.stack(ws),
            torch.stack(ls),
            self.settings,
            cond=self.cond.index(torch.tensor([self.prompt_row[p.prompt] for p in pairs])),
            ids_w=[p.winner_trajectory_id for p in pairs],
            ids_l=[p.loser_trajectory_id for p in pairs],
            weights=torch.tensor([p.weight for p in pairs]) if any(p.weight != 1.0 for p in pairs) else None,
        )


def _read(blobs: BlobStore, key: str | None) -> TrajectoryLatents:
    if key is None:
        raise ValueError("a round's trajectory has no latents key: it was stored without its latents")
    return TrajectoryLatents.from_bytes(blobs.get(key), name=f"trajectory blob {key!r}")


def _checked(trajectory: TrajectoryLatents, key: str | None, settings: SamplerSettings) -> TrajectoryLatents:
    if trajectory.settings != settings:
        raise ValueError(
            f"trajectory {key} was sampled with {trajectory.settings}, the round's first with {settings}; "
            "the blobs disagree with their rows' sampler records, which keep a round to one settings "
            "group: check that the blob store belongs to this database"
        )
    return trajectory


@dataclass
class Trainer:
    policy: Policy
    sessions: sessionmaker[Session]
    blobs: BlobStore
    # Settings.dpo as it is: the loss, the optimizer, the round's size and pace, its memory limits.
    config: DpoConfig
    # The sampler record workers write now (`configured_sampler(...)`): a new round trains only on pairs
    # drawn with settings it accepts; pairs at other settings wait, reported. None = the newest pair's.
    sampler: dict[str, Any] | None = None
    on_publish: Callable[[int], None] | None = None
    progress: Callable[[int, int], None] | None = None
    # Scores the trained policy before publishing (e.g. a judge on held-out seeds); merged into metrics.
    evaluate: Callable[[Policy], dict[str, Any]] | None = None
    # Asked after every optimizer step (SIGTERM sets it): checkpoint there and return without publishing.
    should_stop: Callable[[], bool] | None = None
    # The human evaluation campaign started with each published version (Settings.eval).
    auto_evaluation: EvalConfig | None = None
    # Why the last `run_once` trained nothing (e.g. "12 decided pairs at the current settings ..., need
    # 32"), for the heartbeat and the log.
    waiting_reason: str = field(default="", init=False)
    # The version workers sample with, as the last `run_once` read it (for the heartbeat).
    current_version: int | None = field(default=None, init=False)
    # Seconds between refits of every labeller's stored ability (Settings.reliability); None = never.
    reliability_refresh_seconds: float | None = None
    # This process's rank when torchrun runs the trainer on several processes (trainer/data_parallel.py);
    # None: one process. Rank 0 picks and publishes the rounds; every rank trains its share of each step.
    parallel: DataParallel | None = None
    # Data-parallel: some rank was asked to stop (a SIGTERM to its host's torchrun only); rank 0's loop
    # then ends as if it had been, and with it every rank.
    group_stopping: bool = field(default=False, init=False)
    _abilities_due: float = field(default=0.0, init=False)

    def refresh_abilities(self, now: float | None = None) -> int | None:
        """Refit and store every labeller's ability when `reliability_refresh_seconds` have passed since
        the last time; returns how many were stored (None: not due)."""
        now = time.monotonic() if now is None else now
        if self.reliability_refresh_seconds is None or now < self._abilities_due:
            return None
        with self.sessions() as session, session.begin():
            stored = store_abilities(session=session, fit=fit_labellers(session=session))
        self._abilities_due = now + self.reliability_refresh_seconds
        return stored

    def run_once(self) -> int | None:
        """Resume a running round, or start one if enough labels at the current sampler settings wait;
        returns the published version (None: nothing to train yet, or stopped mid-round).

        Data-parallel: rank 0 calls this and tells the other ranks (waiting in `follow`) what it picked."""
        try:
            picked = self._pick_round()
        except BaseException:
            self.idle()  # the other ranks wait for rank 0's next pick
            raise
        self._tell_followers(picked)
        if picked is None:
            return None
        if self.parallel is None:
            return self._train(*picked)
        try:
            return self._train(*picked)
        except (DataParallelError, RoundAlreadyFinished):  # the other ranks know (or died)
            raise
        except Exception as exc:
            # The other ranks are mid-round, in step with rank 0's collectives: they cannot wait for a
            # retry (a database outage, say), so every rank stops; the next start resumes the round.
            raise DataParallelError(
                f"rank 0 of {self.parallel.world}: round {picked[0]} failed mid-way ({type(exc).__name__}: "
                f"{exc}); every rank stops, and the next start resumes the round from its checkpoint"
            ) from exc

    def idle(self) -> None:
        """Data-parallel rank 0, training nothing now (standby, waiting, an error): the other ranks wait."""
        self._tell_followers(None)

    def release_followers(self) -> None:
        """Data-parallel rank 0, stopping: the other ranks leave `follow` and exit."""
        self._tell_followers(_EXIT)

    def follow(self) -> None:
        """Data-parallel ranks other than 0: train the rounds rank 0 picks until it stops."""
        assert self.parallel is not None and not self.parallel.leader
        while (picked := self._hear_leader("waiting for rank 0's next round")) != _EXIT:
            if picked is not None:
                self._train(*picked)

    def _tell_followers(self, message: tuple[int, int] | int | str | None) -> None:
        """Data-parallel rank 0: what the others do next (a round, a published version, wait, exit); hears
        in return whether any of them was asked to stop."""
        if self.parallel is not None:
            parts = self.parallel.gather("telling the ranks what comes next", (message, self._stopping()))
            asked = [rank for rank, (_, stop) in enumerate(parts) if stop and rank > 0]
            if asked and not self.group_stopping:
                logger.info("rank %s asked to stop: every rank stops", ", ".join(map(str, asked)))
            self.group_stopping |= bool(asked)

    def _hear_leader(self, what: str) -> Any:
        """Data-parallel ranks other than 0: rank 0's message (`_tell_followers`), telling it ours."""
        assert self.parallel is not None
        return self.parallel.gather(what, (None, self._stopping()))[0][0]

    def _stopping(self) -> bool:
        return self.should_stop is not None and self.should_stop()

    def _pick_round(self) -> tuple[int, int] | None:
        """The round to train now, (round id, base version), as `run_once` describes; writes its rows."""
        cfg = self.config
        self.refresh_abilities()
        with self.sessions() as session, session.begin():
            self._start_evaluation(session)
            round_ = running_round(session=session)
            if round_ is not None and not self._resumable(session, round_.id):
                round_ = None
            if round_ is None:
                current = self.current_version = get_current_policy(session=session).version
                groups = fresh_pair_groups(
                    session=session, min_version=max(0, current - cfg.max_version_lag), sampler=self.sampler
                )
                if len(groups.usable) < cfg.min_new_pairs:
                    # Said at every check while pairs at other settings wait, so the log shows why nothing
                    # trains; otherwise at debug level (an idle trainer checks every few seconds).
                    level = logging.INFO if groups.other_settings_pairs else logging.DEBUG
                    self.waiting_reason = groups.explain(cfg.min_new_pairs)
                    logger.log(level, "waiting: %s", self.waiting_reason)
                    return None
                assert groups.target is not None  # there are usable pairs
                round_ = start_training_round(
                    session=session,
                    base_version=current,
                    metrics={
                        "sampler_settings": groups.target.describe(),
                        "other_settings_pairs": groups.other_settings_pairs,
                    },
                )
                usable = groups.usable
                if cfg.label_weighting == "reliability":
                    usable = weigh_by_reliability(session=session, pairs=usable)
                record_round_pairs(session=session, round_id=round_.id, pairs=usable)
                logger.info(
                    "round %d on base version %d: %s", round_.id, current, groups.explain(cfg.min_new_pairs)
                )
            return round_.id, round_.base_version

    def _start_evaluation(self, session: Session, published: int | None = None) -> None:
        """Start the automatic evaluation campaign of the newest version if none runs (Settings.eval)."""
        auto = self.auto_evaluation
        if auto is None:
            return
        campaign = start_auto_campaign(session=session, auto=auto)
        if campaign is not None:
            logger.info(
                "evaluation campaign %d: version %d vs %d, %d votes wanted",
                campaign.id,
                campaign.version,
                campaign.baseline_version,
                campaign.target_votes,
            )
        elif published is not None and auto.promote_if_wins and auto.auto_votes > 0:
            logger.warning(
                "version %d is published but not current: the gate (DENSEALIGN_EVAL__PROMOTE_IF_WINS) makes it "
                "current once people prefer it in an evaluation campaign, which starts when the running one "
                "ends (needs active prompts of split %r); an admin can also make it current by hand",
                published,
                auto.prompt_split,
            )

    def _resumable(self, session: Session, round_id: int) -> bool:
        """A round a stopped trainer left running resumes on its own pairs with their own sampler settings,
        whatever the settings are now. One that cannot train (pairs of several settings, recorded before
        rounds kept to one group, or no pairs at all) is failed instead: its pairs return to the pool."""
        pairs = round_preference_pairs(session=session, round_id=round_id)
        groups = Counter(p.sampler for p in pairs)
        if trainable_together(groups):
            logger.info(
                "resuming round %d: %d pairs at %s", round_id, len(pairs), describe_group(pairs[0].sampler)
            )
            return True
        found = "; ".join(f"{describe_group(g)}: {n}" for g, n in groups.items()) or "no pairs"
        reason = f"its pairs cannot train in one round ({found})"
        logger.warning(
            "round %d: %s; marked failed, its pairs go back to the pool by settings", round_id, reason
        )
        finish_training_round(session=session, round_id=round_id, status="failed", metrics={"failed": reason})
        return False

    # -- internals -----------------------------------------------------------------------------

    def _load_examples(self, round_id: int) -> RoundExamples:
        """The round's pairs (one query) with their trajectories and prompts loaded once."""
        with self.sessions() as session:
            pairs = round_preference_pairs(session=session, round_id=round_id)
        limit = int(self.config.max_round_trajectories_mb * 2**20)
        return RoundExamples.load(pairs, self.blobs, self.policy, limit)

    def _batch(self, examples: RoundExamples, idx: list[int]) -> PairBatch:
        return examples.batch(idx)

    def _draw(self, round_id: int, step: int, num_pairs: int) -> tuple[torch.Generator, list[int]]:
        """Step `step`'s generator and pairs: the same for a resumed round (seeded by seed, round, step)."""
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + round_id * 10_007 + step)
        idx = torch.randint(num_pairs, (min(cfg.pairs_per_step, num_pairs),), generator=gen).tolist()
        return gen, idx

    def _replay_reference(
        self,
        examples: RoundExamples,
        round_id: int,
        steps: int,
        schedule: StepSchedule,
        cache: ReferenceCache,
    ) -> None:
        """Rebuild the cache a resumed round had at step `steps`: the reference part of each earlier step,
        on the same draws (a third of a step's UNet work or less; no policy pass, no backward)."""
        for step in range(steps):
            gen, idx = self._draw(round_id, step, len(examples))
            step_idx = draw_step_indices(self.config, schedule.num_steps, len(idx), gen)
            if self.parallel is not None:  # this rank's cache holds its own share's rows
                share = self.parallel.share(len(idx))
                idx, step_idx = idx[share], step_idx[share]
            warm_reference_cache(self.policy, examples.batch(idx), step_idx, schedule, cache)

    def _start_state(self, base_version: int) -> torch.optim.Optimizer:
        with self.sessions() as session:
            base = get_policy_version(session=session, version=base_version)
            lora_key, lora_sha256 = base.lora_key, base.lora_sha256
            family = (base.metrics or {}).get("model_family")
        self.policy.load_published(self.blobs, lora_key, lora_sha256, family=family, version=base_version)
        optimizer = make_optimizer(self.policy, lr=self.config.lr, weight_decay=self.config.weight_decay)
        try:
            state = torch.load(
                io.BytesIO(self.blobs.get(blob_keys.optimizer(base_version))), weights_only=True
            )
            optimizer.load_state_dict(state)
        except BlobNotFound:
            pass
        return optimizer

    def _train(self, round_id: int, base_version: int) -> int | None:
        started = time.perf_counter()
        cfg = self.config
        examples = self._load_examples(round_id)
        optimizer = self._start_state(base_version)
        ckpt_key = blob_keys.round_checkpoint(round_id)
        schedule = step_schedule(self.policy.pipe, examples.settings)
        cache = ReferenceCache(int(cfg.reference_cache_mb * 2**20))
        metrics, start_step = self._resume(ckpt_key, optimizer, examples.settings.num_steps)
        if self.parallel is not None:
            self._join_ranks(start_step)
        if start_step:
            logger.info("round %d: resumed at step %d", round_id, start_step)
            self._replay_reference(examples, round_id, start_step, schedule, cache)
        for step in range(start_step, cfg.steps_per_round):
            for group in optimizer.param_groups:  # set by the step's index, so a resumed round matches
                group["lr"] = scheduled_lr(cfg, step)
            step_metrics, stop = self._step(examples, round_id, step, optimizer, schedule, cache)
            metrics.add(step_metrics, cfg.clip)
            if self.progress:
                self.progress(step + 1, cfg.steps_per_round)
            if stop and step + 1 < cfg.steps_per_round:
                if self.parallel is not None:  # every rank stops here, whichever was asked
                    self.group_stopping = True
                    if not self._stopping():
                        logger.info("another rank asked to stop: every rank stops")
                self._checkpoint(ckpt_key, step + 1, optimizer, metrics)
                logger.info(
                    "round %d: stopped at step %d/%d; it resumes there",
                    round_id,
                    step + 1,
                    cfg.steps_per_round,
                )
                return None
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps_per_round:
                self._checkpoint(ckpt_key, step + 1, optimizer, metrics)
        logger.info(
            "round %d: reference cache hit rate %.2f (%d rows kept, %d evicted)",
            round_id,
            cache.hit_rate(),
            len(cache),
            cache.evictions,
        )
        hit_rate = cache.hit_rate()
        if self.parallel is not None:
            self.parallel.check_same(self.policy.lora_parameters())
            # each rank caches the rows of its own shares: the round's rate is over all ranks' lookups
            counts = self.parallel.gather("sharing the reference cache counts", (cache.hits, cache.misses))
            hits, misses = (sum(c[i] for c in counts) for i in (0, 1))
            hit_rate = hits / max(hits + misses, 1)
            if not self.parallel.leader:
                return self._hear_leader("waiting for rank 0 to publish")  # type: ignore[no-any-return]
        summary = metrics.summary() | {
            "pairs_used": len(examples),
            "labels_used": sum(p.votes for p in examples.pairs),
            "round_seconds": time.perf_counter() - started,
            "gamma": cfg.gamma,
            "beta": cfg.beta,
            "clip": cfg.clip,
            "sampled_steps": cfg.sampled_steps,
            "lr_schedule": cfg.lr_schedule,
            "lr_last": scheduled_lr(cfg, cfg.steps_per_round - 1),
            "reference_cache_hit_rate": hit_rate,
        }
        if self.evaluate is not None:
            summary |= self.evaluate(self.policy)
        try:
            version = self._publish(round_id, base_version, optimizer, summary)
        except BaseException:
            self.idle()
            raise
        self._tell_followers(version)
        self.blobs.delete(ckpt_key)
        if self.on_publish:
            self.on_publish(version)
        return version

    def _step(
        self,
        examples: RoundExamples,
        round_id: int,
        step: int,
        optimizer: torch.optim.Optimizer,
        schedule: StepSchedule,
        cache: ReferenceCache,
    ) -> tuple[StepMetrics, bool]:
        """Optimizer step `step` of the round, and whether to stop after it (`should_stop`).

        Data-parallel, this rank trains its share of the step's pairs at the step indices one process
        would draw for them, and the metrics and the stop are those of the whole step, on every rank."""
        cfg, parallel = self.config, self.parallel
        gen, idx = self._draw(round_id, step, len(examples))
        if parallel is None:
            m = train_step(self.policy, optimizer, self._batch(examples, idx), cfg, schedule, gen, cache)
            return m, self._stopping()
        step_idx = draw_step_indices(cfg, schedule.num_steps, len(idx), gen)  # (B, M): the same stream
        share = parallel.share(len(idx))
        pairs = share.stop - share.start
        params = self.policy.lora_parameters()
        m = train_step(
            self.policy,
            optimizer,
            self._batch(examples, idx[share]),
            cfg,
            schedule,
            gen,
            cache,
            step_idx=step_idx[share],
            reduce_gradients=lambda: parallel.reduce_gradients(params, pairs / len(idx)),
        )
        return parallel.combine(m, pairs, self._stopping())

    def _join_ranks(self, start_step: int) -> None:
        """Data-parallel: every rank starts the round at rank 0's step with rank 0's adapter (version 0's
        LoRA A matrices are drawn at random in each process)."""
        assert self.parallel is not None
        starts = self.parallel.gather("agreeing on the round's first step", start_step)
        if len(set(starts)) != 1:
            raise DataParallelError(
                f"the ranks would resume the round at different steps {starts} (their blob stores differ?): "
                "every rank must read the same blob store"
            )
        self.parallel.broadcast_parameters(self.policy.lora_parameters())

    def _resume(
        self, ckpt_key: str, optimizer: torch.optim.Optimizer, num_steps: int
    ) -> tuple[RoundMetrics, int]:
        """The metric sums and the next step from the round's checkpoint (adapter and optimizer restored
        in place), or fresh ones at step 0."""
        if not self.blobs.exists(ckpt_key):
            return RoundMetrics(num_steps=num_steps), 0
        ckpt = torch.load(io.BytesIO(self.blobs.get(ckpt_key)), weights_only=False)
        self.policy.hot_swap(ckpt["adapter"])
        optimizer.load_state_dict(ckpt["optimizer"])
        return ckpt["metrics"], ckpt["step"]

    def _checkpoint(
        self, key: str, step: int, optimizer: torch.optim.Optimizer, metrics: RoundMetrics
    ) -> None:
        if self.parallel is not None and not self.parallel.leader:
            return  # rank 0 writes; the ranks hold the same state
        buf = io.BytesIO()
        adapter = self.policy.lora_state()
        torch.save(
            {"step": step, "adapter": adapter, "optimizer": optimizer.state_dict(), "metrics": metrics}, buf
        )
        self.blobs.put(key, buf.getvalue())

    def _publish(
        self, round_id: int, base_version: int, optimizer: torch.optim.Optimizer, metrics: dict[str, Any]
    ) -> int:
        with self.sessions() as session:
            version = (latest_version_number(session=session) or 0) + 1
        with tempfile.TemporaryDirectory() as tmp:
            path, _ = self.policy.save_adapter(tmp)
            data = Path(path).read_bytes()
        lora_key = blob_keys.adapter(version)
        sha = self.blobs.put(lora_key, data)
        buf = io.BytesIO()
        torch.save(optimizer.state_dict(), buf)
        self.blobs.put(blob_keys.optimizer(version), buf.getvalue())
        with self.sessions() as session, session.begin():
            # The round row, locked: if another trainer finished this round meanwhile (a second trainer
            # that took over while this one had lost its database connection), publish nothing.
            round_row = session.get(TrainingRound, round_id, with_for_update=True)
            if round_row is None or round_row.status != "running":
                raise RoundAlreadyFinished(round_id)
            # what the round recorded when it started (its sampler settings, the pairs left waiting),
            # and the model family the adapter fits: a worker of another family refuses it
            metrics = {**(round_row.metrics or {}), **metrics, "model_family": self.policy.family}
            publish_policy_version(
                session=session,
                version=version,
                parent_version=base_version,
                lora_key=lora_key,
                lora_sha256=sha,
                metrics=metrics,
                # with the gate on, the version's campaign makes it current if people prefer it
                make_current=self.auto_evaluation is None or not self.auto_evaluation.promote_if_wins,
            )
            self._start_evaluation(session, published=version)
            finish_training_round(
                session=session,
                round_id=round_id,
                status="done",
                produced_version=version,
                pairs_used=metrics["pairs_used"],
                votes_used=metrics["labels_used"],
                metrics=metrics,
            )
        logger.info(
            "round %d published policy version %d (implicit accuracy %.3f)",
            round_id,
            version,
            metrics["implicit_accuracy"],
        )
        return version
