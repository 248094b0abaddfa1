"""Workers sample evaluation pairs through their real path (refill -> RQ job -> PairSampler) on the tiny
model: each side with its pinned version, both from one seed, so the policy is the only difference."""

from __future__ import annotations

import random
from typing import Any

import torch
from rq import Queue, SimpleWorker
from sqlalchemy import select

from core import blob_keys
from core.db import make_engine, make_session_factory
from core.db.campaigns import start_campaign
from core.db.models import Pair, Trajectory
from core.db.policies import publish_policy_version, set_current_policy
from core.db.prompts import add_prompt
from core.pool import refill_pool
from core.queue import QUEUE_NAME, RqSamplingQueue
from core.settings import Settings
from worker.main import build_sampler
from worker.sampling import PairSampler, install


def publish_random_adapter(sampler: PairSampler, tmp_path: Any, *, std: float) -> None:
    """Version 1 (not made current): random LoRA weights drawn N(0, std) that change the images; the
    worker's own adapter is zeroed again afterwards (it samples version 0 until told otherwise)."""
    policy = sampler.policy
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.lora_parameters():
            p.normal_(0.0, std)
    path, sha = policy.save_adapter(tmp_path / "adapter")
    policy.reset_adapter()
    key = blob_keys.adapter(1)
    sampler.blobs.put(key, path.read_bytes())
    with sampler.sessions() as session, session.begin():
        publish_policy_version(
            session=session, version=1, parent_version=0, lora_key=key, lora_sha256=sha, make_current=False
        )


def eval_images(sampler: PairSampler, pair_ids: list[int]) -> list[dict[int, bytes]]:
    """Per pair: version -> PNG bytes of its side."""
    out = []
    with sampler.sessions() as session:
        for pair_id in pair_ids:
            pair = session.get_one(Pair, pair_id)
            assert pair.kind == "eval"
            sides = [session.get_one(Trajectory, t) for t in (pair.trajectory_a_id, pair.trajectory_b_id)]
            assert sides[0].seed == sides[1].seed and sides[0].latents_key is None
            out.append({t.policy_version: sampler.blobs.get(t.image_key) for t in sides})
            if sides[0].policy_version == sides[1].policy_version:  # A/A: both images, keyed a and b
                out[-1] = {
                    -1: sampler.blobs.get(sides[0].image_key),
                    -2: sampler.blobs.get(sides[1].image_key),
                }
    return out


def test_eval_jobs_pin_each_side_and_share_the_noise(
    loop_settings: Settings, redis: Any, tmp_path: Any
) -> None:
    sessions = make_session_factory(make_engine(loop_settings.database_url))
    with sessions() as session, session.begin():
        publish_policy_version(session=session, version=0)
        prompts = [
            add_prompt(session=session, text=t, split="eval").id for t in ("a red circle", "a blue square")
        ]
    sampler = build_sampler(loop_settings)
    assert isinstance(sampler, PairSampler)
    install(sampler)
    publish_random_adapter(sampler, tmp_path, std=0.5)  # large enough to change the images

    # A/A: version 0 against itself gives identical images, pair by pair.
    with sessions() as session, session.begin():
        aa = start_campaign(session=session, version=0, baseline_version=0, target_votes=2).id
    sampler.seed_source = random.Random(7)
    aa_pairs = sampler.sample_eval_pairs(aa, prompts)
    aa_images = eval_images(sampler, aa_pairs)
    assert all(images[-1] == images[-2] for images in aa_images)

    # Version 1 vs 0 through the real queue: the pool refill enqueues the campaign's jobs, RQ runs them.
    with sessions() as session, session.begin():
        campaign = start_campaign(session=session, version=1, baseline_version=0, target_votes=2).id
    sampler.seed_source = random.Random(7)  # the same seeds as the A/A job
    queue = RqSamplingQueue(redis, retries=0)
    with sessions() as session:
        queued = refill_pool(
            session=session,
            queue=queue,
            target_per_prompt=1,
            max_version_lag=2,
            pairs_per_job=8,
            eval_pool_pairs=4,
        )
    # the A/A campaign wants no more pairs (its 2 open pairs cover its 2 votes); the new one wants its 2
    # votes' worth, one per prompt
    assert queued == 2
    SimpleWorker([Queue(QUEUE_NAME, connection=redis)], connection=redis).work(burst=True)
    with sessions() as session:
        pair_ids = list(
            session.scalars(select(Pair.id).where(Pair.campaign_id == campaign).order_by(Pair.id))
        )
        prompt_of = {p: session.get_one(Pair, p).prompt_id for p in pair_ids}
    assert sorted(prompt_of.values()) == sorted(prompts)
    images = eval_images(sampler, pair_ids)
    for pair_id, by_version in zip(pair_ids, images, strict=True):
        # the baseline side is version 0 from the A/A job's seed for that prompt: same noise, same image
        aa_of_prompt = aa_images[prompts.index(prompt_of[pair_id])]
        assert by_version[0] == aa_of_prompt[-1]
        assert by_version[1] != by_version[0], "version 1's adapter should change the image"
    # a training job after the eval job (which left the baseline loaded) samples the current version
    with sessions() as session, session.begin():
        train_prompt = add_prompt(session=session, text="a green triangle").id
        set_current_policy(session=session, version=1)
    (pair_id,) = sampler.sample_pairs([train_prompt])
    with sessions() as session:
        pair = session.get_one(Pair, pair_id)
        assert (pair.kind, pair.policy_version, sampler.loaded_version) == ("train", 1, 1)
