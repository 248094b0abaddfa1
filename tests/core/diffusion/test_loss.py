import math

import pytest
import torch

from core.diffusion.loss import (
    dense_dpo_loss,
    dense_dpo_loss_exact,
    discount_weights,
    implicit_scores,
    sample_step_indices,
)


def test_discount_weights_match_method_figures():
    w = discount_weights(50, 0.9)
    assert w.shape == (50,)
    assert w.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert w.argmax().item() == 0 and bool((w[:-1] > w[1:]).all())
    # METHOD.md: with gamma 0.9 and 50 steps the first 10 steps carry 65.5%, the last 10 carry 1%.
    assert w[:10].sum().item() == pytest.approx(0.655, abs=5e-4)
    assert w[-10:].sum().item() == pytest.approx(0.01, abs=5e-4)
    assert w[3].item() == pytest.approx(0.9**3 * 0.1 / (1 - 0.9**50), rel=1e-6)


def test_gamma_one_is_uniform_trajectory_level_dpo():
    assert torch.allclose(discount_weights(7, 1.0), torch.full((7,), 1 / 7))


@pytest.mark.parametrize("gamma", [0.0, -0.5, 1.01, float("nan")])
def test_bad_gamma_names_the_value(gamma):
    with pytest.raises(ValueError, match=r"gamma must be in \(0, 1\]"):
        discount_weights(10, gamma)


def test_sample_step_indices_shape_distribution_and_seed():
    w = discount_weights(5, 0.5)
    idx = sample_step_indices(w, 4000, 3, generator=torch.Generator().manual_seed(0))
    assert idx.shape == (4000, 3) and idx.dtype == torch.long
    freq = torch.bincount(idx.flatten(), minlength=5).float() / idx.numel()
    assert torch.allclose(freq, w, atol=0.01)
    again = sample_step_indices(w, 4000, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(idx, again)
    with pytest.raises(ValueError, match="1-D"):
        sample_step_indices(w.view(1, 5), 2, 1)


def test_loss_value_on_hand_made_tensors():
    lw = torch.tensor([[1e-4, 3e-5, -2e-5]])
    ll = torch.tensor([[-5e-5, 0.0, 5e-4]])  # the last one is clipped to 1e-4
    beta, clip = 10.0, 1e-4
    s_w = beta * (1e-4 + 3e-5 - 2e-5) / 3
    s_l = beta * (-5e-5 + 0.0 + 1e-4) / 3
    expected = -math.log(1 / (1 + math.exp(-(s_w - s_l))))
    assert dense_dpo_loss(lw, ll, beta=beta, clip=clip).item() == pytest.approx(expected, rel=1e-6)
    # at zero log-ratio the loss is log 2, and it never leaves the band log 2 +- 2 beta clip
    zeros = torch.zeros(2, 3)
    assert dense_dpo_loss(zeros, zeros, beta=beta, clip=clip).item() == pytest.approx(math.log(2), abs=1e-7)
    big = torch.full((2, 3), 10.0)
    extreme = dense_dpo_loss(big, -big, beta=beta, clip=clip).item()
    assert extreme == pytest.approx(-math.log(1 / (1 + math.exp(-2 * beta * clip))), rel=1e-6)


def test_gradient_is_zero_outside_the_clip_band_and_exact_inside():
    lw = torch.tensor([[5e-5, 2e-4, -3e-4]], requires_grad=True)
    ll = torch.tensor([[0.0, 0.0, 0.0]], requires_grad=True)
    beta = 10.0
    dense_dpo_loss(lw, ll, beta=beta, clip=1e-4).backward()
    margin = beta * (5e-5 + 1e-4 - 1e-4) / 3
    d = -(1 - 1 / (1 + math.exp(-margin))) * beta / 3  # d loss / d l_w inside the band
    assert lw.grad is not None and ll.grad is not None
    assert lw.grad[0, 0].item() == pytest.approx(d, rel=1e-5)
    assert lw.grad[0, 1].item() == 0.0 and lw.grad[0, 2].item() == 0.0
    assert ll.grad[0, 0].item() == pytest.approx(-d, rel=1e-5)


def test_exact_loss_weights_each_step():
    lw = torch.tensor([[1e-4, 0.0, 0.0], [0.0, 0.0, 1e-4]])
    ll = torch.zeros(2, 3)
    w = discount_weights(3, 0.5)
    beta = 10.0
    margins = beta * 1e-4 * torch.stack([w[0], w[2]])
    expected = -torch.nn.functional.logsigmoid(margins).mean()
    assert dense_dpo_loss_exact(lw, ll, w, beta=beta, clip=1e-4).item() == pytest.approx(
        expected.item(), rel=1e-6
    )
    with pytest.raises(ValueError, match="weights must have shape"):
        dense_dpo_loss_exact(lw, ll, w[:2], beta=beta, clip=1e-4)


def test_sampled_score_and_loss_agree_with_exact_in_expectation():
    g = torch.Generator().manual_seed(3)
    n, clip, beta = 10, 1e-4, 10.0
    lw = (torch.rand(1, n, generator=g) - 0.3) * 3e-4
    ll = (torch.rand(1, n, generator=g) - 0.7) * 3e-4
    w = discount_weights(n, 0.8)
    exact_score = (beta * (lw.clamp(-clip, clip) * w).sum()).item()
    idx = sample_step_indices(w, 20000, 3, generator=g)
    sampled_w = lw[0, idx]  # (draws, M)
    sampled_l = ll[0, idx]
    scores = implicit_scores(sampled_w, beta=beta, clip=clip)
    stderr = scores.std().item() / math.sqrt(scores.numel())
    assert abs(scores.mean().item() - exact_score) < 4 * stderr
    # the loss is nearly linear in a margin this small, so its expectation agrees too
    losses = -torch.nn.functional.logsigmoid(scores - implicit_scores(sampled_l, beta=beta, clip=clip))
    exact_loss = dense_dpo_loss_exact(lw, ll, w, beta=beta, clip=clip).item()
    assert losses.mean().item() == pytest.approx(
        exact_loss, abs=4 * losses.std().item() / math.sqrt(20000) + 1e-7
    )
    assert dense_dpo_loss(sampled_w, sampled_l, beta=beta, clip=clip).item() == pytest.approx(
        losses.mean().item()
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"beta": 0.0, "clip": 1e-4}, "beta must be > 0"), ({"beta": 10.0, "clip": -1.0}, "clip must be > 0")],
)
def test_bad_beta_and_clip_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dense_dpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), **kwargs)


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match=r"same shape, got \(2, 3\) and \(2, 2\)"):
        dense_dpo_loss(torch.zeros(2, 3), torch.zeros(2, 2), beta=1.0, clip=1.0)
    with pytest.raises(ValueError, match="pairs, steps"):
        dense_dpo_loss(torch.zeros(3), torch.zeros(3), beta=1.0, clip=1.0)


def test_weighted_loss_equals_the_hand_computed_value():
    """Pair weights scale each pair's term before the mean (sampled and exact losses alike)."""
    lw = torch.tensor([[2e-4, 1e-4], [0.0, -1e-4], [3e-4, 3e-4]])
    ll = torch.tensor([[0.0, 0.0], [1e-4, 1e-4], [-3e-4, 0.0]])
    beta, clip, w = 10.0, 2e-4, [1.0, 0.5, 0.0]

    def term(a: list[float], b: list[float]) -> float:
        s = beta * (sum(max(-clip, min(clip, x)) for x in a) - sum(max(-clip, min(clip, x)) for x in b)) / 2
        return -math.log(1 / (1 + math.exp(-s)))

    terms = [term(lw[i].tolist(), ll[i].tolist()) for i in range(3)]
    expected = sum(wi * t for wi, t in zip(w, terms, strict=True)) / 3
    got = dense_dpo_loss(lw, ll, beta=beta, clip=clip, pair_weights=torch.tensor(w)).item()
    assert got == pytest.approx(expected, rel=1e-6)
    # all-ones weights are the plain mean; the exact loss with uniform step weights agrees
    ones = dense_dpo_loss(lw, ll, beta=beta, clip=clip, pair_weights=torch.ones(3)).item()
    assert ones == pytest.approx(dense_dpo_loss(lw, ll, beta=beta, clip=clip).item(), rel=1e-7)
    exact = dense_dpo_loss_exact(
        lw, ll, torch.tensor([0.5, 0.5]), beta=beta, clip=clip, pair_weights=torch.tensor(w)
    ).item()
    assert exact == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="one weight per pair"):
        dense_dpo_loss(lw, ll, beta=beta, clip=clip, pair_weights=torch.ones(2))
    with pytest.raises(ValueError, match="non-negative"):
        dense_dpo_loss(lw, ll, beta=beta, clip=clip, pair_weights=torch.tensor([1.0, -1.0, 1.0]))


def test_the_cosine_schedule_runs_from_lr_to_its_final_ratio():
    from core.diffusion.training import scheduled_lr
    from core.settings import DpoConfig

    constant = DpoConfig(lr=1e-3, steps_per_round=5)
    assert [scheduled_lr(constant, s) for s in range(5)] == [1e-3] * 5
    cosine = DpoConfig(lr=1e-3, steps_per_round=5, lr_schedule="cosine", lr_final_ratio=0.1)
    got = [scheduled_lr(cosine, s) for s in range(5)]
    # 0.1 + 0.9 * (1 + cos(pi * s / 4)) / 2, times lr
    expected = [1e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * s / 4))) for s in range(5)]
    assert got == pytest.approx(expected, rel=1e-12)
    assert (
        got[0] == pytest.approx(1e-3) and got[-1] == pytest.approx(1e-4) and got[2] == pytest.approx(5.5e-4)
    )
