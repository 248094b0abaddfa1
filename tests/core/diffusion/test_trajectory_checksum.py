"""A stored trajectory carries its own sha256: a flipped bit anywhere in the file is refused when it
is read back, never trained on as a different trajectory; files from before the checksum still load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save

from core.diffusion.sampler import SamplerSettings, TrajectoryCorrupt, TrajectoryLatents


def trajectory() -> TrajectoryLatents:
    g = torch.Generator().manual_seed(0)
    return TrajectoryLatents(
        prompt="a red circle above a blue square",
        seed=12345,
        latents=torch.randn(4, 4, 4, 4, generator=g),
        timesteps=torch.tensor([751, 501, 251]),
        log_probs=torch.randn(3, generator=g),
        settings=SamplerSettings(num_steps=3, height=32, width=32),
    )


def same(a: TrajectoryLatents, b: TrajectoryLatents) -> bool:
    return (
        (a.prompt, a.seed, a.settings, a.extra) == (b.prompt, b.seed, b.settings, b.extra)
        and torch.equal(a.latents, b.latents)
        and torch.equal(a.timesteps, b.timesteps)
        and torch.equal(a.log_probs, b.log_probs)
    )


def test_every_flipped_bit_is_refused_or_changes_nothing():
    data = trajectory().to_bytes()
    original = TrajectoryLatents.from_bytes(data)
    refused = 0
    for position in range(len(data)):
        flipped = bytearray(data)
        flipped[position] ^= 0x01
        try:
            loaded = TrajectoryLatents.from_bytes(bytes(flipped), name="blob 'x'")
        except ValueError:
            refused += 1
            continue
        # Only a flip in the checksum's own key name can pass: the file then reads unchecked, unchanged.
        assert same(loaded, original), f"a flipped bit at byte {position} of {len(data)} was read as data"
    assert refused >= len(data) - len("sha256")


def test_a_flipped_latent_names_the_blob_and_the_fix():
    data = bytearray(trajectory().to_bytes())
    data[-100] ^= 0x01  # inside the tensor bytes
    with pytest.raises(
        TrajectoryCorrupt, match=r"blob 'trajectories/v0/x' is corrupt: its bytes do not match the sha256"
    ):
        TrajectoryLatents.from_bytes(bytes(data), name="blob 'trajectories/v0/x'")
    data[:8] = (10**9).to_bytes(8, "little")  # a header length past the end of the file
    with pytest.raises(TrajectoryCorrupt, match="does not parse as safetensors"):
        TrajectoryLatents.from_bytes(bytes(data))


def test_a_trajectory_written_before_the_checksum_still_loads():
    t = trajectory()
    metadata = {
        "format": "densealign.trajectory",
        "format_version": "1",
        "prompt": t.prompt,
        "seed": str(t.seed),
        "settings": json.dumps(t.settings.to_dict()),
        "extra": "{}",
    }
    tensors = {"latents": t.latents.half(), "timesteps": t.timesteps, "log_probs": t.log_probs}
    loaded = TrajectoryLatents.from_bytes(save(tensors, metadata=metadata))
    assert same(loaded, TrajectoryLatents.from_bytes(t.to_bytes()))
