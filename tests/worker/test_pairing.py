"""Aligned pairs (`DENSEALIGN_POOL__PAIRING=aligned`) through the worker's real path (refill -> RQ job ->
PairSampler) on the shipped model: both sides start from one initial noise z_0 and differ only in the
per-step noise, the pair records how it was drawn, and the REST record redraws both sides in a stock
diffusers pipeline, bit for bit in one call and with the README's snippet one side at a time."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy import select

from core.db import make_engine, make_session_factory
from core.db.errors import PairInvalid
from core.db.models import Pair, Trajectory
from core.db.pairs import create_pair
from core.diffusion.sampler import TrajectoryLatents
from core.settings import Settings
from tests.worker.test_reproduce import (
    SHAPES,
    admin_client,
    readme_snippet,
    sample_with_the_worker,
    stock_pipeline,
    to_uint8,
)

STEPS = 6


def aligned_settings(settings: Settings, pairing: str) -> Settings:
    return settings.model_copy(
        update={
            "model": settings.model.model_copy(update={"base_model": str(SHAPES)}),
            "sampler": settings.sampler.model_copy(update={"num_steps": STEPS}),
            "pool": settings.pool.model_copy(
                update={"target_per_prompt": 2, "pairs_per_job": 2, "pairing": pairing}
            ),
        }
    )


@pytest.mark.slow
def test_aligned_pairs_share_z0_and_redraw_in_stock_diffusers(
    loop_settings: Settings, redis: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = aligned_settings(loop_settings, "aligned")
    pair_ids = sample_with_the_worker(settings, redis)
    assert len(pair_ids) == 4
    sessions = make_session_factory(make_engine(settings.database_url))
    from core.storage import LocalBlobStore

    blobs = LocalBlobStore(settings.blob_dir)
    with sessions() as session:
        pairs = [session.get_one(Pair, p) for p in pair_ids]
        assert {p.pairing for p in pairs} == {"aligned"}
        z0_seeds = []
        for pair in pairs:
            a, b = (session.get_one(Trajectory, t) for t in (pair.trajectory_a_id, pair.trajectory_b_id))
            assert a.z0_seed is not None and a.z0_seed == b.z0_seed and a.seed != b.seed
            z0_seeds.append(a.z0_seed)
            # the stored trajectories: one z_0, then paths that part
            ta, tb = (TrajectoryLatents.from_bytes(blobs.get(t.latents_key or "")) for t in (a, b))
            assert torch.equal(ta.latents[0], tb.latents[0])
            assert not torch.equal(ta.latents[-1], tb.latents[-1])
            assert ta.extra == tb.extra == {"z0_seed": a.z0_seed}
        assert len(set(z0_seeds)) == 4, "each pair draws its own z_0"

        # a pair claiming to be aligned from two sides of different z_0 is refused
        (other,) = [p for p in pairs[1:] if p.prompt_id == pairs[0].prompt_id]
        with pytest.raises(PairInvalid, match="not aligned"):
            create_pair(
                session=session,
                trajectory_a_id=pairs[0].trajectory_a_id,
                trajectory_b_id=other.trajectory_a_id,
                pairing="aligned",
            )
        session.rollback()

    client = admin_client(settings)
    records = [client.get(f"/api/v1/pairs/{p}").json() for p in pair_ids]
    assert {r["pairing"] for r in records} == {"aligned"}
    sides = [r[s] for r in records for s in ("a", "b")]
    rec = sides[0]["sampler"]
    served = [
        np.asarray(Image.open(io.BytesIO(client.get(s["image_url"]).content)).convert("RGB")) for s in sides
    ]
    # the two sides of a pair look alike (one layout) far more than two pairs' images do
    within = np.mean([np.abs(served[i].astype(int) - served[i + 1]).mean() for i in (0, 2, 4, 6)])
    across = np.mean([np.abs(served[i].astype(int) - served[i + 2]).mean() for i in (0, 4)])
    assert within < across, (within, across)

    # each job (2 pairs, 4 images) in one stock call: latents from the z0 seeds, generators from the seeds
    pipe = stock_pipeline(rec)
    shape = (1, pipe.unet.config.in_channels, 8, 8)
    for start in (0, 4):
        batch = sides[start : start + 4]
        latents = torch.cat(
            [torch.randn(shape, generator=torch.Generator().manual_seed(s["z0_seed"])) for s in batch]
        )
        images = pipe(
            [r["prompt"]["text"] for r in records[start // 2 : start // 2 + 2] for _ in "ab"],
            num_inference_steps=rec["num_steps"],
            guidance_scale=rec["guidance_scale"],
            eta=rec["eta"],
            latents=latents,
            generator=[torch.Generator().manual_seed(s["seed"]) for s in batch],
            output_type="np",
        ).images
        for i, image in enumerate(to_uint8(images)):
            assert np.array_equal(image, served[start + i]), f"image {start + i} differs"

    # the README's snippet, as written, redraws an aligned pair's side a
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pair.json").write_text(client.get(f"/api/v1/pairs/{pair_ids[0]}").text)
    exec(compile(readme_snippet(), "README.md", "exec"), {})
    redrawn = np.asarray(Image.open(tmp_path / "redrawn.png").convert("RGB"))
    assert np.abs(redrawn.astype(int) - served[0]).max() <= 1

    # a judgement through the API, and the export names the pairing and both sides' z0 seed
    served_pair = client.get("/api/v1/pairs/next").json()["pair"]
    body = {"pair_id": served_pair["pair_id"], "choice": "a", "client_key": "aligned-export-1"}
    assert client.post("/api/v1/judgements", json=body).status_code == 201
    exported = client.get("/api/v1/export")
    (row,) = [json.loads(line) for line in exported.text.splitlines() if line.strip()]
    z0 = z0_seeds[pair_ids.index(served_pair["pair_id"])]
    assert (row["pairing"], row["z0_seed_a"], row["z0_seed_b"]) == ("aligned", z0, z0)


def test_independent_pairs_are_the_default_and_say_so(loop_settings: Settings, redis: Any) -> None:
    assert Settings.model_fields["pool"].default_factory().pairing == "independent"  # type: ignore[misc]
    settings = aligned_settings(loop_settings, "independent")
    pair_ids = sample_with_the_worker(settings, redis)
    sessions = make_session_factory(make_engine(settings.database_url))
    with sessions() as session:
        pairs = list(session.scalars(select(Pair).where(Pair.id.in_(pair_ids))))
        assert {p.pairing for p in pairs} == {"independent"}
        trajectories = list(session.scalars(select(Trajectory)))
        assert len(trajectories) == 8 and {t.z0_seed for t in trajectories} == {None}
    records = [admin_client(settings).get(f"/api/v1/pairs/{p}").json() for p in pair_ids[:1]]
    assert records[0]["pairing"] == "independent" and records[0]["a"]["z0_seed"] is None
