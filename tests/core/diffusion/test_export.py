import numpy as np
import pytest
import torch
from safetensors import safe_open

from core.diffusion.export import export_adapter
from core.diffusion.policy import LoraSettings, Policy


def _images(pipe):
    return pipe(
        ["a cat"],
        num_inference_steps=3,
        eta=1.0,
        generator=[torch.Generator().manual_seed(3)],
        output_type="np",
    ).images


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_exported_adapter_loads_in_a_stock_pipeline(make_pipe, tmp_path, fmt):
    policy = Policy(make_pipe(), LoraSettings(rank=4, alpha=8))
    with torch.no_grad():
        for p in policy.lora_parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    source, _ = policy.save_adapter(tmp_path / "saved")
    target = export_adapter(source, tmp_path / fmt, fmt)
    if fmt == "kohya":
        with safe_open(str(target), "pt") as fh:
            keys = list(fh.keys())  # noqa: SIM118
            alpha_key = next(k for k in keys if k.endswith(".alpha"))
            assert fh.get_tensor(alpha_key).item() == 8.0
        assert all(k.startswith("lora_unet_") for k in keys)
        assert any(k.endswith("attn1_to_out_0.lora_up.weight") for k in keys)
    stock = make_pipe()
    plain = _images(stock)
    stock.load_lora_weights(str(target.parent), weight_name=target.name)
    adapted = _images(stock)
    assert not np.array_equal(plain, adapted)
    assert np.array_equal(adapted, _images(policy.pipe))


def test_unknown_format_is_refused(make_pipe, tmp_path):
    source, _ = Policy(make_pipe(), LoraSettings(rank=2)).save_adapter(tmp_path)
    with pytest.raises(ValueError, match="format 'ckpt' is not one of diffusers, kohya"):
        export_adapter(source, tmp_path / "out", "ckpt")
