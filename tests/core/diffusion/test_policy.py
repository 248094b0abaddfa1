import numpy as np
import pytest
import torch

from core.diffusion.ddim import ddim_schedule
from core.diffusion.policy import WEIGHT_NAME, AdapterMismatchError, LoraSettings, Policy
from core.diffusion.sampler import encode_prompts, sample_trajectories
from core.diffusion.training import PairBatch, make_optimizer, pair_log_ratios, train_step
from core.settings import DpoConfig


def _pairs(pipe, settings):
    batch = sample_trajectories(pipe, ["a cat", "a cat"], [1, 2], settings)
    return PairBatch(["a cat"], batch.latents[:1].half(), batch.latents[1:].half(), settings)


def _images(pipe, settings, seed=7):
    return sample_trajectories(pipe, ["a dog"], [seed], settings).images


def _train(policy, settings, steps=2):
    pairs = _pairs(policy.pipe, settings)
    schedule = ddim_schedule(policy.pipe.scheduler, settings.num_steps)
    opt = make_optimizer(policy, lr=1e-2)
    hp = DpoConfig(sampled_steps=2, clip=1.0)
    metrics = [
        train_step(policy, opt, pairs, hp, schedule, torch.Generator().manual_seed(0)) for _ in range(steps)
    ]
    return metrics


def test_log_ratio_is_zero_at_init_and_training_moves_every_lora_parameter_and_no_base_one(
    make_pipe, settings
):
    policy = Policy(make_pipe(), LoraSettings(rank=2))
    pairs = _pairs(policy.pipe, settings)
    schedule = ddim_schedule(policy.pipe.scheduler, settings.num_steps)
    lw, ll = pair_log_ratios(policy, pairs, torch.tensor([[0, 3]]), schedule)
    assert torch.equal(lw, torch.zeros(1, 2)) and torch.equal(ll, torch.zeros(1, 2))

    lora_before = {n: p.detach().clone() for n, p in policy.denoiser.named_parameters() if ".lora_" in n}
    base_before = {n: p.detach().clone() for n, p in policy.denoiser.named_parameters() if ".lora_" not in n}
    text_before = {n: p.detach().clone() for n, p in policy.pipe.text_encoder.named_parameters()}
    # B starts at zero, so the first step moves only B (A's gradient is B^T dL/dh = 0); the second moves A.
    metrics = _train(policy, settings, steps=2)
    assert metrics[0].loss == pytest.approx(np.log(2), abs=1e-6)
    assert metrics[1].mean_abs_logratio > 0
    assert metrics[0].step_indices.shape == (1, 2)
    after = dict(policy.denoiser.named_parameters())
    unmoved = [n for n, p in lora_before.items() if torch.equal(p, after[n])]
    assert not unmoved, f"LoRA parameters that did not move: {unmoved[:3]}"
    assert len(lora_before) > 0
    assert all(torch.equal(p, after[n]) for n, p in base_before.items())
    assert all(
        torch.equal(p, dict(policy.pipe.text_encoder.named_parameters())[n]) for n, p in text_before.items()
    )


def test_reference_policy_equals_the_base_model_exactly(make_pipe, settings):
    policy = Policy(make_pipe(), LoraSettings(rank=2))
    _train(policy, settings, steps=2)
    base = make_pipe()
    cond = encode_prompts(base, ["a dog"], settings)
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(501)
    with torch.no_grad():
        expected = base.unet(z, t, encoder_hidden_states=cond.cond).sample
        with policy.reference():
            ref = policy.denoiser(z, t, encoder_hidden_states=cond.cond).sample
        trained = policy.denoiser(z, t, encoder_hidden_states=cond.cond).sample
    assert torch.equal(ref, expected)
    assert not torch.equal(trained, expected)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_saved_adapter_loads_in_a_stock_pipeline_and_reproduces_images(make_pipe, settings, kind, tmp_path):
    policy = Policy(make_pipe(kind), LoraSettings(rank=4, alpha=8))
    _train(policy, settings, steps=2)
    ours = _images(policy.pipe, settings)
    path, sha = policy.save_adapter(tmp_path)
    assert path == tmp_path / WEIGHT_NAME and len(sha) == 64
    stock = make_pipe(kind)
    call = {"num_inference_steps": settings.num_steps, "guidance_scale": settings.guidance_scale, "eta": 1.0}
    plain = stock(["a dog"], generator=[torch.Generator().manual_seed(7)], output_type="np", **call).images
    stock.load_lora_weights(str(tmp_path))
    adapted = stock(["a dog"], generator=[torch.Generator().manual_seed(7)], output_type="np", **call).images
    assert not np.array_equal(plain, adapted), "the adapter changed nothing: it was not loaded"
    assert np.array_equal(adapted, ours)


def test_hot_swap_then_swap_back_restores_outputs_exactly(make_pipe, settings, tmp_path):
    policy = Policy(make_pipe(), LoraSettings(rank=2))
    _train(policy, settings, steps=2)
    policy.save_adapter(tmp_path / "v1")
    v1 = _images(policy.pipe, settings)
    _train(policy, settings, steps=1)
    _, sha2 = policy.save_adapter(tmp_path / "v2")
    v2 = _images(policy.pipe, settings)
    assert not np.array_equal(v1, v2)
    lora_ids = [id(p) for p in policy.lora_parameters()]
    policy.hot_swap(tmp_path / "v1")
    assert np.array_equal(_images(policy.pipe, settings), v1)
    policy.hot_swap(tmp_path / "v2" / WEIGHT_NAME, expected_sha256=sha2)
    assert np.array_equal(_images(policy.pipe, settings), v2)
    assert [id(p) for p in policy.lora_parameters()] == lora_ids, "hot-swap must update parameters in place"
    policy.reset_adapter()
    assert np.array_equal(_images(policy.pipe, settings), _images(make_pipe(), settings))


def test_hot_swap_refuses_a_mismatched_or_corrupt_adapter(make_pipe, settings, tmp_path):
    other = Policy(make_pipe(), LoraSettings(rank=3))
    other.save_adapter(tmp_path / "r3")
    policy = Policy(make_pipe(), LoraSettings(rank=2))
    with pytest.raises(AdapterMismatchError, match="another LoRA rank than 2"):
        policy.hot_swap(tmp_path / "r3")
    q_only = Policy(make_pipe(), LoraSettings(rank=2, target_modules=("to_q",)))
    q_only.save_adapter(tmp_path / "q")
    with pytest.raises(AdapterMismatchError, match="keys do not match"):
        policy.hot_swap(tmp_path / "q")
    with pytest.raises(ValueError, match="sha256"):
        policy.hot_swap(tmp_path / "r3", expected_sha256="0" * 64)
    with pytest.raises(FileNotFoundError, match="no adapter"):
        policy.hot_swap(tmp_path / "missing")


def test_bad_hyperparameters_name_the_value():
    with pytest.raises(ValueError, match=r"gamma\n  Input should be greater than 0"):
        DpoConfig(gamma=0.0)
    with pytest.raises(ValueError, match=r"beta\n  Input should be greater than 0"):
        DpoConfig(beta=-1.0)
    with pytest.raises(ValueError, match=r"sampled_steps\n  Input should be greater than or equal to 1"):
        DpoConfig(sampled_steps=0)
    with pytest.raises(ValueError, match="LoRA rank must be >= 1"):
        LoraSettings(rank=0)
