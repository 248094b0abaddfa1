"""What a sampling worker does for one job: follow the current policy, sample a pair, store it.

`Sampler` holds the preloaded policy (pipeline + LoRA adapter), the database session factory and
the blob store. For each `sample_pair(prompt_id)` job it:
1. reads the current policy version from Postgres (the truth) and, if it changed, hot-swaps that
   version's adapter in place (version 0 = the base model: the adapter is zeroed);
2. samples two trajectories of the prompt with fresh random seeds, recorded;
3. writes each trajectory (latents fp16, log-probs; safetensors) and its PNG to the blob store under
   new unique keys;
4. inserts both trajectories and the pair in one transaction. If anything fails after step 3, the
   blobs it wrote are deleted and the error propagates, so RQ retries the job and no half-written
   pair or row is left behind (a crash between 3 and 4 leaves only unreferenced blobs).
"""

from __future__ import annotations

import io
import logging
import random
import secrets
import time
import uuid
from dataclasses import dataclass, field

from safetensors.torch import load
from sqlalchemy.orm import Session, sessionmaker

from core.db.pairs import create_pair, create_trajectory, required_judgements
from core.db.policies import get_current_policy
from core.db.prompts import get_prompt
from core.diffusion.policy import Policy
from core.diffusion.sampler import SamplerSettings, sample_trajectories
from core.storage import BlobStore, get_verified

logger = logging.getLogger(__name__)


@dataclass
class OverlapPolicy:
    """How many judgements a new pair asks for (see Settings.overlap_k / agreement_k / overlap_share)."""

    overlap_k: int = 1
    agreement_k: int = 3
    agreement_share: float = 0.0


@dataclass
class Sampler:
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

    def sync_policy(self, session: Session) -> int:
        """Make the loaded adapter the current version's; returns that version."""
        current = get_current_policy(session=session)
        if current.version == self.loaded_version:
            return current.version
        start = time.perf_counter()
        if current.version == 0:
            self.policy.reset_adapter()
        else:
            assert current.lora_key is not None and current.lora_sha256 is not None
            self.policy.hot_swap(load(get_verified(self.blobs, current.lora_key, current.lora_sha256)))
        self.last_swap_seconds = time.perf_counter() - start
        logger.info(
            "hot-swapped policy version %d -> %d in %.3fs",
            self.loaded_version,
            current.version,
            self.last_swap_seconds,
        )
        self.loaded_version = current.version
        return current.version

    def sample_pair(self, prompt_id: int) -> int:
        """Run one job; returns the new pair's id."""
        with self.sessions() as session:
            prompt = get_prompt(session=session, prompt_id=prompt_id)
            text = prompt.text
            version = self.sync_policy(session)
        source = self.seed_source
        seeds = (
            [source.getrandbits(63), source.getrandbits(63)]
            if source
            else [secrets.randbits(63) for _ in "ab"]
        )
        batch = sample_trajectories(self.policy.pipe, [text, text], seeds, self.settings)
        written: list[str] = []
        try:
            keys = []
            for i, image in enumerate(batch.pil_images()):
                stem = f"v{version}/p{prompt_id}/{uuid.uuid4().hex}"
                traj_key, image_key = f"trajectories/{stem}.safetensors", f"images/{stem}.png"
                self.blobs.put(traj_key, batch.trajectory(i).to_bytes())
                written.append(traj_key)
                png = io.BytesIO()
                image.save(png, format="PNG")
                self.blobs.put(image_key, png.getvalue())
                written.append(image_key)
                keys.append((traj_key, image_key))
            with self.sessions() as session, session.begin():
                rows = [
                    create_trajectory(
                        session=session,
                        prompt_id=prompt_id,
                        policy_version=version,
                        seed=seed,
                        image_key=image_key,
                        latents_key=traj_key,
                        log_probs_key=traj_key,
                        sampler=self.settings.to_dict(),
                    )
                    for seed, (traj_key, image_key) in zip(seeds, keys, strict=True)
                ]
                required = required_judgements(
                    rng=self.rng,
                    overlap_k=self.overlap.overlap_k,
                    agreement_k=self.overlap.agreement_k,
                    agreement_share=self.overlap.agreement_share,
                )
                pair = create_pair(
                    session=session, trajectory_a_id=rows[0].id, trajectory_b_id=rows[1].id, required=required
                )
                pair_id = pair.id
        except BaseException:
            for key in written:
                try:
                    self.blobs.delete(key)
                except Exception:  # best effort: an unreferenced blob is harmless
                    logger.warning("could not delete blob %s of a failed job", key)
            raise
        logger.info("prompt %d: pair %d sampled with policy version %d", prompt_id, pair_id, version)
        return pair_id


_CURRENT: Sampler | None = None


def install(sampler: Sampler) -> None:
    """Make `sampler` the one RQ jobs in this process use (set once by the worker's entry point)."""
    global _CURRENT
    _CURRENT = sampler


def current() -> Sampler:
    if _CURRENT is None:
        raise RuntimeError("no sampler installed in this process: start workers with `densealign worker`")
    return _CURRENT
