"""train-base end to end on a toy budget: the folder it writes loads as a SD 1.x pipeline."""

from __future__ import annotations

import json

import pytest

from core.basemodel.architecture import Sizes
from core.basemodel.train import TrainConfig, train_base
from core.diffusion.models import load_pipeline
from core.diffusion.sampler import SamplerSettings, sample_trajectories


@pytest.mark.slow
def test_train_base_writes_a_loadable_pipeline(tmp_path):
    config = TrainConfig(vae_steps=2, vae_batch=4, num_examples=8, unet_steps=2, unet_batch=4, warmup_steps=1)
    sizes = Sizes(vae_channels=(16, 16), unet_channels=(32, 32), text_width=32, text_layers=1)
    info = train_base(config, tmp_path, sizes=sizes)
    saved = json.loads((tmp_path / "train_info.json").read_text())
    assert saved["config"]["unet_steps"] == 2 and saved["timings"] == info["timings"]
    pipe = load_pipeline(str(tmp_path))
    # The VAE's scaling factor was fitted to the latents, not left at the default 0.18215.
    assert pipe.vae.config.scaling_factor == saved["scaling_factor"] != 0.18215
    images = sample_trajectories(pipe, ["a red circle"], [0], SamplerSettings(num_steps=2)).images
    assert images.shape == (1, 64, 64, 3)
