import numpy as np
import pytest
import torch

from core.diffusion.models import ModelNotFoundError, clip_tokenizer, load_pipeline
from core.diffusion.sampler import sample_trajectories


def test_tokenizer_is_the_real_clip_bpe():
    tok = clip_tokenizer()
    assert len(tok) == 49408
    # ids of the released SD 1.x tokenizer: <|startoftext|> a photo of a cat <|endoftext|>
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.model_max_length == 77


def test_local_folder_loads_through_the_same_path(tmp_path, settings):
    pipe = load_pipeline("tiny:sd")
    pipe.save_pretrained(tmp_path / "model")
    loaded = load_pipeline(str(tmp_path / "model"))
    assert type(loaded).__name__ == "StableDiffusionPipeline"
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    a = sample_trajectories(pipe, ["a cat"], [3], settings).images
    b = sample_trajectories(loaded, ["a cat"], [3], settings).images
    assert np.array_equal(a, b)


def test_missing_models_say_how_to_fix_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="local folder that holds model_index.json"):
        load_pipeline("densealign-tests/no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="has no model_index.json"):
        load_pipeline(str(tmp_path / "empty"))
    with pytest.raises(ModelNotFoundError, match="neither an existing folder"):
        load_pipeline("./not/here")


def test_dtype_is_applied():
    pipe = load_pipeline("tiny:sd", dtype=torch.float64)
    assert pipe.unet.dtype == torch.float64
