"""`train_step` and the round's metric sums on hand-made log-ratios: every reported figure is an exact value.

The UNet is replaced by a stand-in: `pair_log_ratios` returns two trainable tensors whose values the
test chose, so the loss, its gradient, the implicit accuracy, the clipped share, the gradient-norm
clip and the exact (all-steps) variant can be checked against sums written out here by hand.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from core.diffusion import training
from core.diffusion.sampler import SamplerSettings
from core.diffusion.training import PairBatch, StepMetrics, train_step
from core.settings import DpoConfig
from trainer.rounds import RoundMetrics

# Three pairs, two sampled steps each. Pair 0: the winner is ahead; pair 1: the loser is ahead;
# pair 2: the winner is slightly ahead. 3.0 and -2.0 are outside the clip band of 1.0.
W = [[0.5, 3.0], [-0.4, -2.0], [0.05, 0.05]]
L = [[-0.2, 0.1], [0.3, 0.3], [0.0, -0.05]]


class StandIn:
    """A policy whose only trainable parameters are the log-ratios themselves."""

    def __init__(self, w: list[list[float]], lo: list[list[float]]) -> None:
        self.w = torch.nn.Parameter(torch.tensor(w, dtype=torch.float64))
        self.l = torch.nn.Parameter(torch.tensor(lo, dtype=torch.float64))
        self.asked: list[torch.Tensor] = []

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return [self.w, self.l]

    def pair_log_ratios(
        self, policy: Any, batch: Any, step_idx: torch.Tensor, schedule: Any, reference_cache: Any = None
    ) -> Any:
        self.asked.append(step_idx.clone())
        return self.w * 1.0, self.l * 1.0


def batch_of(pairs: int, steps: int) -> PairBatch:
    latents = torch.zeros(pairs, steps + 1, 1, 2, 2)
    return PairBatch(["p"] * pairs, latents, latents.clone(), SamplerSettings(num_steps=steps))


def step(
    monkeypatch: pytest.MonkeyPatch, stand_in: StandIn, hp: DpoConfig, steps: int, lr: float = 1.0
) -> StepMetrics:
    monkeypatch.setattr(training, "pair_log_ratios", stand_in.pair_log_ratios)
    optimizer = torch.optim.SGD(stand_in.lora_parameters(), lr=lr)
    schedule: Any = SimpleNamespace(num_steps=steps)
    batch = batch_of(stand_in.w.shape[0], steps)
    return train_step(stand_in, optimizer, batch, hp, schedule, torch.Generator().manual_seed(0))  # type: ignore[arg-type]


def clamp(x: float, c: float) -> float:
    return max(-c, min(c, x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def sampled_by_hand(
    beta: float, clip: float
) -> tuple[list[float], float, list[list[float]], list[list[float]]]:
    """Margins s_w - s_l, loss, and d loss / d l_w, d loss / d l_l, for W and L with M = 2."""
    b, m = len(W), len(W[0])
    margins = [
        beta * (sum(clamp(x, clip) for x in w) / m - sum(clamp(x, clip) for x in lo) / m)
        for w, lo in zip(W, L, strict=True)
    ]
    loss = sum(-math.log(sigmoid(x)) for x in margins) / b
    # d(-log sigmoid(x))/dx = -sigmoid(-x); x = beta/M sum clamp(l_w) - ...; clamp passes 1 inside the band.
    gw = [[-sigmoid(-x) * beta / m / b * (abs(v) < clip) for v in w] for x, w in zip(margins, W, strict=True)]
    gl = [
        [sigmoid(-x) * beta / m / b * (abs(v) < clip) for v in lo] for x, lo in zip(margins, L, strict=True)
    ]
    return margins, loss, gw, gl


def test_sampled_step_reports_exact_loss_accuracy_logratio_and_clipped_share(monkeypatch):
    hp = DpoConfig(beta=2.0, clip=1.0, sampled_steps=2, max_grad_norm=100.0)
    stand_in = StandIn(W, L)
    metrics = step(monkeypatch, stand_in, hp, steps=5)
    margins, loss, gw, gl = sampled_by_hand(2.0, 1.0)
    assert [x > 0 for x in margins] == [True, False, True]
    assert metrics.loss == pytest.approx(loss, rel=1e-12)
    assert metrics.implicit_accuracy == pytest.approx(2 / 3)
    values = [v for row in W + L for v in row]
    assert metrics.mean_abs_logratio == pytest.approx(sum(abs(v) for v in values) / 12)
    assert metrics.clipped_share == pytest.approx(2 / 12)  # 3.0 and -2.0
    grad_norm = math.sqrt(sum(g * g for row in gw + gl for g in row))
    assert metrics.grad_norm == pytest.approx(grad_norm, rel=1e-9)
    # the same sampled steps were asked for both trajectories of each pair, one row per pair
    [asked] = stand_in.asked
    assert asked.shape == (3, 2) and torch.equal(metrics.step_indices, asked)
    assert int(asked.min()) >= 0 and int(asked.max()) < 5
    assert metrics.logratio_w.tolist() == W and metrics.logratio_l.tolist() == L
    # under the clip (max_grad_norm 100), plain SGD at lr 1 moves each value by minus its gradient
    moved_w = (stand_in.w.detach() - torch.tensor(W, dtype=torch.float64)).flatten().tolist()
    moved_l = (stand_in.l.detach() - torch.tensor(L, dtype=torch.float64)).flatten().tolist()
    assert moved_w == pytest.approx([-g for row in gw for g in row], rel=1e-9)
    assert moved_l == pytest.approx([-g for row in gl for g in row], rel=1e-9)
    # the winner's values inside the band went up, the loser's down; 3.0 (outside) did not move
    assert moved_w[0] > 0 and moved_l[0] < 0 and moved_w[1] == 0.0


def test_gradient_norm_is_clipped_to_max_grad_norm_and_reported_before_clipping(monkeypatch):
    hp = DpoConfig(beta=2.0, clip=1.0, sampled_steps=2, max_grad_norm=0.05)
    stand_in = StandIn(W, L)
    metrics = step(monkeypatch, stand_in, hp, steps=5)
    _, _, gw, gl = sampled_by_hand(2.0, 1.0)
    grads = [g for row in gw + gl for g in row]
    norm = math.sqrt(sum(g * g for g in grads))
    assert norm > 0.05 * 2, (
        "the hand-made gradient must be well above the clip for this test to mean anything"
    )
    assert metrics.grad_norm == pytest.approx(norm, rel=1e-9)
    moved = torch.cat(
        [
            (stand_in.w.detach() - torch.tensor(W, dtype=torch.float64)).flatten(),
            (stand_in.l.detach() - torch.tensor(L, dtype=torch.float64)).flatten(),
        ]
    )
    # the step is the gradient scaled down to norm 0.05, same direction
    assert float(moved.norm()) == pytest.approx(0.05, rel=1e-5)
    assert moved.tolist() == pytest.approx([-g * 0.05 / norm for g in grads], rel=1e-5, abs=1e-12)


def test_exact_step_evaluates_every_step_with_the_discount_weights(monkeypatch):
    n, beta, clip, gamma = 3, 4.0, 0.5, 0.5
    w_vals = [[0.2, 0.0, 0.0], [0.0, 0.0, 0.9], [0.6, -0.1, 0.0]]
    l_vals = [[0.0, 0.1, 0.0], [0.0, 0.0, -0.2], [0.0, 0.0, 0.0]]
    hp = DpoConfig(beta=beta, gamma=gamma, clip=clip, exact=True, max_grad_norm=100.0)
    stand_in = StandIn(w_vals, l_vals)
    metrics = step(monkeypatch, stand_in, hp, steps=n)
    weights = [gamma**i / sum(gamma**j for j in range(n)) for i in range(n)]  # 4/7, 2/7, 1/7
    margins = [
        beta * sum(wi * (clamp(a, clip) - clamp(c, clip)) for wi, a, c in zip(weights, w, lo, strict=True))
        for w, lo in zip(w_vals, l_vals, strict=True)
    ]
    # pair 0: 4 (4/7 0.2 - 2/7 0.1) > 0; pair 1: 4/7 (0.5 + 0.2) > 0; pair 2: 4 (4/7 0.5 - 2/7 0.1) > 0
    assert metrics.loss == pytest.approx(sum(-math.log(sigmoid(x)) for x in margins) / 3, rel=1e-6)
    assert metrics.implicit_accuracy == 1.0
    assert metrics.step_indices.tolist() == [[0, 1, 2]] * 3
    assert stand_in.asked[0].tolist() == [[0, 1, 2]] * 3
    assert metrics.clipped_share == pytest.approx(2 / 18)  # 0.9 and 0.6
    # inside the band each step moves by its discount weight: step 1 twice as far as step 2
    grad_w0 = [(stand_in.w.detach()[2, i] - w_vals[2][i]).item() for i in (1, 2)]
    expected = sigmoid(-margins[2]) * beta / 3
    assert grad_w0 == pytest.approx([expected * weights[1], expected * weights[2]], rel=1e-6)


def test_exact_accuracy_counts_weighted_margins_not_the_unweighted_mean(monkeypatch):
    # The loser leads at the late steps; the weighted margin favours the winner, the plain mean doesn't.
    w_vals = [[0.3, 0.0, 0.0, 0.0]]
    l_vals = [[0.0, 0.2, 0.2, 0.2]]
    hp = DpoConfig(beta=1.0, gamma=0.3, clip=1.0, exact=True)
    metrics = step(monkeypatch, StandIn(w_vals, l_vals), hp, steps=4)
    assert metrics.implicit_accuracy == 1.0


def metrics_of(indices: list[list[int]], w: list[list[float]], lo: list[list[float]], **values: float) -> Any:
    return SimpleNamespace(
        step_indices=torch.tensor(indices),
        logratio_w=torch.tensor(w),
        logratio_l=torch.tensor(lo),
        **{
            "loss": 0.0,
            "implicit_accuracy": 0.0,
            "mean_abs_logratio": 0.0,
            "clipped_share": 0.0,
            "grad_norm": 0.0,
        }
        | values,
    )


def test_round_metrics_average_steps_and_bin_log_ratios_by_step_index():
    sums = RoundMetrics(num_steps=4)
    sums.add(
        metrics_of([[0, 2]], [[0.5, -0.25]], [[2.0, 0.0]], loss=0.75, implicit_accuracy=1.0, grad_norm=3.0),
        clip=1.0,
    )
    sums.add(
        metrics_of([[2, 2]], [[-1.5, 0.25]], [[0.5, 0.5]], loss=0.25, implicit_accuracy=0.0, grad_norm=1.0),
        clip=1.0,
    )
    summary = sums.summary()
    assert summary["optimizer_steps"] == 2
    assert summary["loss"] == 0.5 and summary["implicit_accuracy"] == 0.5 and summary["grad_norm"] == 2.0
    # step 0: |0.5|, |2.0|; step 2: |-0.25|, |0.0|, |-1.5|, |0.5|, |0.25|, |0.5|; steps 1 and 3: none
    assert summary["abs_logratio_by_step"] == [1.25, None, 0.5, None]
    assert summary["clipped_share_by_step"] == [0.5, None, pytest.approx(1 / 6), None]
