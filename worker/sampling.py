"""What a sampling worker does for one job: follow the current policy, sample a pair, store it.

`PairSampler` holds the preloaded policy (pipeline + LoRA adapter), the database session factory and
the blob store. For each `sample_pairs(prompt_ids)` job it:
1. reads the current policy version from Postgres (the truth) and, if it changed, hot-swaps that
   version's adapter in place (version 0 = the base model: the adapter is zeroed);
2. samples two trajectories per prompt id with fresh random seeds, recorded, all in one batch
   (one UNet call per step for the whole job: far more pairs per second than one pair at a time);
   with `pairing='aligned'` both sides of a pair start from one initial noise z_0 (`z0_seed`) and
   differ only in the per-step noise, so they share a layout and differ in detail;
3. writes each trajectory (latents fp16, log-probs; safetensors) and its PNG to the blob store under
   new unique keys;
4. inserts all the job's trajectories and pairs in one transaction. If anything fails after step 3, the
   blobs it wrote are deleted and the error propagates, so RQ retries the job and no half-written
   pair or row is left behind (a crash between 3 and 4 leaves only unreferenced blobs).

Each trajectory row's `sampler` record is `SamplerSettings.to_dict()` plus what else a stock diffusers
pipeline needs to draw the same image again (`reproduction_record`): the base model, the pipeline
class, the dtype, the device of the seeded generators, the scheduler with its config, and whether
the adapter was fused into the base weights (`adapter_fused`; see core/diffusion/policy.py).

Workers built by `worker.main.build_sampler` sample fused (`DENSEALIGN_SAMPLER__FUSE_ADAPTER`, on by
default): every swap, the evaluation jobs' swaps to each side's version and back included, writes
the new version's W0 + scale * B @ A from an untouched copy of W0, so a version's images do not
depend on which versions were loaded before it.
"""

from __future__ import annotations

import io
import json
import logging
import random
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from core import blob_keys
from core.db.campaigns import create_eval_pair, get_campaign
from core.db.models import PolicyVersion
from core.db.pairs import create_pair, create_trajectory, required_judgements
from core.db.policies import get_current_policy, get_policy_version
from core.db.prompts import get_prompt
from core.diffusion.models import Pipeline, denoiser, family_of
from core.diffusion.policy import Policy
from core.diffusion.sampler import SamplerSettings, sample_trajectories
from core.storage import BlobStore

logger = logging.getLogger(__name__)


@dataclass
class OverlapPolicy:
    """How many judgements a new pair asks for (see Settings.overlap_k / agreement_k / overlap_share)."""

    overlap_k: int = 1
    agreement_k: int = 3
    agreement_share: float = 0.0


@dataclass
class PairSampler:
    policy: Policy
    settings: SamplerSettings
    sessions: sessionmaker[Session]
    blobs: BlobStore
    overlap: OverlapPolicy = field(default_factory=OverlapPolicy)
    loaded_version: int = 0
    last_swap_seconds: float | None = None
    rng: random.Random = field(default_factory=random.Random)
    # Where trajectory seeds come from: fresh OS randomness by default; a seeded Random makes a
    # whole run reproducible (experiments).
    seed_source: random.Random | None = None
    # How a job's pairs are drawn (core.pool.PAIRINGS): 'independent' (two fresh seeds) or 'aligned'
    # (one initial noise z_0 per pair, a fresh step-noise seed per side).
    pairing: str = "independent"
    # The base model named in each trajectory's record (a hub id or a folder); None = the one the
    # pipeline was loaded from (`pipe.name_or_path`, None for the in-code tiny models).
    base_model: str | None = None

    def sampling_record(self) -> dict[str, Any]:
        """What every trajectory of a job records as `sampler`: the settings, then how to redraw it."""
        return self.settings.to_dict() | reproduction_record(
            self.policy.pipe, base_model=self.base_model, adapter_fused=self.policy.fused
        )

    def sync_policy(self, session: Session) -> int:
        """Make the loaded adapter the current version's; returns that version."""
        current = get_current_policy(session=session)
        self.load_version(current)
        return current.version

    def load_version(self, row: PolicyVersion) -> None:
        """Hot-swap the adapter of `row` in place (version 0: the adapter is zeroed)."""
        if row.version == self.loaded_version:
            return
        start = time.perf_counter()
        family = (row.metrics or {}).get("model_family")
        self.policy.load_published(
            self.blobs, row.lora_key, row.lora_sha256, family=family, version=row.version
        )
        self.last_swap_seconds = time.perf_counter() - start
        logger.info(
            "hot-swapped policy version %d -> %d in %.3fs",
            self.loaded_version,
            row.version,
            self.last_swap_seconds,
        )
        self.loaded_version = row.version

    def sample_pair(self, prompt_id: int) -> int:
        """Run a one-pair job; returns the new pair's id."""
        return self.sample_pairs([prompt_id])[0]

    def sample_pairs(self, prompt_ids: list[int]) -> list[int]:
        """Run one job: a pair for each prompt id, all 2k trajectories in one batched pass.

        Returns the new pair ids in the order of `prompt_ids`. All-or-nothing: the pairs are inserted
        in one transaction, and on any failure the job's blobs are deleted before the error propagates.
        """
        if not prompt_ids:
            raise ValueError("a sampling job needs at least one prompt id")
        with self.sessions() as session:
            texts = {pid: get_prompt(session=session, prompt_id=pid).text for pid in set(prompt_ids)}
            version = self.sync_policy(session)
        seeds = self._seeds(2 * len(prompt_ids))
        # aligned: one z_0 per pair (drawn after the step seeds, so an independent run's seeds are unchanged)
        z0_seeds = (
            [z for z in self._seeds(len(prompt_ids)) for _ in "ab"] if self.pairing == "aligned" else None
        )
        prompts = [texts[pid] for pid in prompt_ids for _ in "ab"]
        start = time.perf_counter()
        batch = sample_trajectories(self.policy.pipe, prompts, seeds, self.settings, z0_seeds=z0_seeds)
        sampled_seconds = time.perf_counter() - start
        written: list[str] = []
        try:
            keys = []
            for i, image in enumerate(batch.pil_images()):
                traj_key, image_key = blob_keys.trajectory(version, prompt_ids[i // 2])
                self.blobs.put(traj_key, batch.trajectory(i).to_bytes())
                written.append(traj_key)
                self._put_png(written, image_key, image)
                keys.append((traj_key, image_key))
            pair_ids = self._insert_pairs(prompt_ids, version, seeds, keys, z0_seeds)
        except BaseException:
            self._delete_blobs(written)
            raise
        logger.info(
            "%d pairs (prompts %s) sampled with policy version %d in %.1fs",
            len(pair_ids),
            sorted(set(prompt_ids)),
            version,
            sampled_seconds,
        )
        return pair_ids

    def _seeds(self, n: int) -> list[int]:
        source = self.seed_source
        return [source.getrandbits(63) if source else secrets.randbits(63) for _ in range(n)]

    def _insert_pairs(
        self,
        prompt_ids: list[int],
        version: int,
        seeds: list[int],
        keys: list[tuple[str, str]],
        z0_seeds: list[int] | None = None,
    ) -> list[int]:
        """Insert the job's trajectories (two per prompt id, in order) and their pairs in one transaction."""
        record = self.sampling_record()
        pair_ids = []
        with self.sessions() as session, session.begin():
            for k, prompt_id in enumerate(prompt_ids):
                rows = [
                    create_trajectory(
                        session=session,
                        prompt_id=prompt_id,
                        policy_version=version,
                        seed=seeds[i],
                        z0_seed=z0_seeds[i] if z0_seeds else None,
                        image_key=keys[i][1],
                        latents_key=keys[i][0],
                        log_probs_key=keys[i][0],
                        sampler=record,
                    )
                    for i in (2 * k, 2 * k + 1)
                ]
                required = required_judgements(
                    rng=self.rng,
                    overlap_k=self.overlap.overlap_k,
                    agreement_k=self.overlap.agreement_k,
                    agreement_share=self.overlap.agreement_share,
                )
                pair = create_pair(
                    session=session,
                    trajectory_a_id=rows[0].id,
                    trajectory_b_id=rows[1].id,
                    required=required,
                    pairing="aligned" if z0_seeds else "independent",
                )
                pair_ids.append(pair.id)
        return pair_ids

    def sample_eval_pairs(self, campaign_id: int, prompt_ids: list[int]) -> list[int]:
        """Run one evaluation job: for each prompt id, an image of the campaign's version and one of its
        baseline from the same seed and settings (so the policy is the only difference), stored as an
        evaluation pair. Images only: evaluation pairs are never trained on, so no latents are kept.

        Returns the new pair ids; none when the campaign ended while the job waited. The adapter left
        loaded is the baseline's; the next training job swaps back to the current version.
        """
        if not prompt_ids:
            raise ValueError("a sampling job needs at least one prompt id")
        loaded = self._running_campaign(campaign_id, prompt_ids)
        if loaded is None:
            return []
        texts, sides = loaded
        seeds = self._seeds(len(prompt_ids))
        prompts = [texts[pid] for pid in prompt_ids]
        images = []
        for row in sides:  # both sides even in an A/A campaign: their images must come out identical
            self.load_version(row)
            images.append(sample_trajectories(self.policy.pipe, prompts, seeds, self.settings).pil_images())
        written: list[str] = []
        try:
            keys = [
                [
                    self._put_png(written, blob_keys.eval_image(campaign_id, row.version, pid), image)
                    for pid, image in zip(prompt_ids, side, strict=True)
                ]
                for row, side in zip(sides, images, strict=True)
            ]
            pair_ids = self._insert_eval_pairs(campaign_id, prompt_ids, sides, seeds, keys)
        except BaseException:
            self._delete_blobs(written)
            raise
        logger.info(
            "%d evaluation pairs for campaign %d (prompts %s)",
            len(pair_ids),
            campaign_id,
            sorted(set(prompt_ids)),
        )
        return pair_ids

    def _running_campaign(
        self, campaign_id: int, prompt_ids: list[int]
    ) -> tuple[dict[int, str], list[PolicyVersion]] | None:
        """The prompts' texts and the campaign's two versions (its own, then the baseline); None when the
        campaign has ended."""
        with self.sessions() as session:
            campaign = get_campaign(session=session, campaign_id=campaign_id)
            if campaign.status != "running":
                logger.info(
                    "evaluation campaign %d has ended (%s); job skipped", campaign_id, campaign.status
                )
                return None
            texts = {pid: get_prompt(session=session, prompt_id=pid).text for pid in set(prompt_ids)}
            sides = [
                get_policy_version(session=session, version=v)
                for v in (campaign.version, campaign.baseline_version)
            ]
            session.expunge_all()
        return texts, sides

    def _insert_eval_pairs(
        self,
        campaign_id: int,
        prompt_ids: list[int],
        sides: list[PolicyVersion],
        seeds: list[int],
        keys: list[list[str]],
    ) -> list[int]:
        record = self.sampling_record()
        pair_ids = []
        with self.sessions() as session, session.begin():
            for k, prompt_id in enumerate(prompt_ids):
                ours, theirs = (
                    create_trajectory(
                        session=session,
                        prompt_id=prompt_id,
                        policy_version=row.version,
                        seed=seeds[k],
                        image_key=keys[side][k],
                        sampler=record,
                    )
                    for side, row in enumerate(sides)
                )
                pair = create_eval_pair(
                    session=session,
                    campaign_id=campaign_id,
                    version_trajectory_id=ours.id,
                    baseline_trajectory_id=theirs.id,
                    rng=self.rng,
                )
                pair_ids.append(pair.id)
        return pair_ids

    def _put_png(self, written: list[str], key: str, image: Image.Image) -> str:
        """Store `image` as a PNG under `key`, noting the key in `written` (deleted if the job fails)."""
        png = io.BytesIO()
        image.save(png, format="PNG")
        self.blobs.put(key, png.getvalue())
        written.append(key)
        return key

    def _delete_blobs(self, keys: list[str]) -> None:
        for key in keys:
            try:
                self.blobs.delete(key)
            except Exception:  # best effort: an unreferenced blob is harmless (and swept later)
                logger.warning("could not delete blob %s of a failed job", key)


def reproduction_record(
    pipe: Pipeline, *, base_model: str | None = None, adapter_fused: bool = False
) -> dict[str, Any]:
    """What a stock diffusers pipeline needs, beyond the settings and the seed, to draw an image again.

    `StableDiffusionPipeline.from_pretrained(base_model, torch_dtype=dtype)` with
    `scheduler = <class_name>.from_config(config)` and `generator=torch.Generator(generator_device)
    .manual_seed(seed)` redraws it (plus the policy version's LoRA for versions >= 1:
    `pipe.load_lora_weights(folder)`, then `pipe.fuse_lora()` if `adapter_fused`, which makes the
    stock weights the worker's bit for bit). The scheduler is the one the worker samples with (DDIM
    from the model's schedule with x0 clipping off), not the one the model folder ships.
    """
    scheduler = pipe.scheduler
    return {
        "base_model": base_model if base_model is not None else pipe.name_or_path,
        "pipeline": type(pipe).__name__,
        "family": family_of(pipe),
        "dtype": str(denoiser(pipe).dtype).removeprefix("torch."),
        "generator_device": denoiser(pipe).device.type,
        "scheduler": {
            "class_name": type(scheduler).__name__,
            # to_json_string turns numpy/tuple values into plain JSON, as save_pretrained writes them
            "config": json.loads(scheduler.to_json_string()),
        },
        "adapter_fused": adapter_fused,
    }


_CURRENT: PairSampler | None = None


def install(sampler: PairSampler) -> None:
    """Make `sampler` the one RQ jobs in this process use (set once by the worker's entry point)."""
    global _CURRENT
    _CURRENT = sampler


def current() -> PairSampler:
    if _CURRENT is None:
        raise RuntimeError("no sampler installed in this process: start workers with `densealign worker`")
    return _CURRENT
