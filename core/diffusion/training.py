"""One optimizer step of discounted dense-reward DPO on a batch of labelled pairs.

Per pair (preferred trajectory w, rejected l, same prompt): draw M step indices from the discount
weights, the same for both trajectories; recompute each chosen step's log-ratio
log pi_theta(z_{i+1} | z_i) - log pi_ref(z_{i+1} | z_i) from the stored latents (METHOD.md: both use
the same guidance and share sigma_i, so it is a difference of squared distances to the two means);
then `dense_dpo_loss`. With `exact=True` every step is evaluated and weighted (`dense_dpo_loss_exact`).

Winners and losers of all pairs go through the UNet in one batch (2 * B * M rows, twice that with
guidance); the reference pass runs without gradient.

Within a round (trainer/rounds.py) the reference is the frozen base model, so its step mean
mu_ref(z_i, t_i, c) for a (trajectory, step i) row never changes: a `ReferenceCache` passed to
`train_step` keeps it, and the reference UNet runs only on the rows it has not seen (the loss is the
same; the row's value may come from a batch of another composition, which on CPU moves it by a few
units in the last place of float32). The batch can also carry its conditioning, encoded once per round.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from core.diffusion.conditioning import Conditioning, predict
from core.diffusion.ddim import gaussian_log_prob, gaussian_log_ratio
from core.diffusion.loss import (
    dense_dpo_loss,
    dense_dpo_loss_exact,
    discount_weights,
    implicit_scores,
    sample_step_indices,
)
from core.diffusion.policy import Policy
from core.diffusion.sampler import SamplerSettings, StepSchedule, encode_prompts
from core.settings import DpoConfig


@dataclass
class PairBatch:
    """B labelled pairs; latents as stored (float16 is fine), all sampled with `settings`."""

    prompts: list[str]
    latents_w: Tensor  # (B, num_steps + 1, C, H, W), the preferred trajectories
    latents_l: Tensor  # (B, num_steps + 1, C, H, W), the rejected trajectories
    settings: SamplerSettings
    # One conditioning row per pair, encoded once per round; None: `pair_log_ratios` encodes `prompts`.
    cond: Conditioning | None = None
    # Trajectory ids of the winners and losers (B each): the keys of a `ReferenceCache`; None: no caching.
    ids_w: list[int] | None = None
    ids_l: list[int] | None = None
    # (B,) loss weight of each pair (DENSEALIGN_DPO__LABEL_WEIGHTING=reliability); None: all 1.
    weights: Tensor | None = None

    def __post_init__(self) -> None:
        b = len(self.prompts)
        if self.weights is not None and tuple(self.weights.shape) != (b,):
            raise ValueError(f"weights must be (pairs={b},), got {tuple(self.weights.shape)}")
        expected = (b, self.settings.num_steps + 1)
        for name in ("latents_w", "latents_l"):
            shape = tuple(getattr(self, name).shape)
            if shape[:2] != expected or len(shape) != 5:
                raise ValueError(
                    f"{name} must be (pairs={b}, num_steps+1={expected[1]}, C, H, W), got {shape}"
                )


@dataclass
class StepMetrics:
    """What one step measured. The loss stays near log 2 by design; watch accuracy and clipping."""

    loss: float
    implicit_accuracy: float  # share of pairs with s_w > s_l
    mean_abs_logratio: float
    clipped_share: float  # share of evaluated log-ratios outside [-clip, clip]
    grad_norm: float  # before clipping
    step_indices: Tensor  # (B, M) which steps were evaluated
    logratio_w: Tensor  # (B, M), detached
    logratio_l: Tensor  # (B, M), detached


class ReferenceCache:
    """The reference policy's DDIM step mean mu_ref per (trajectory id, step index), for one round.

    Valid only while the reference is the same frozen base model and the schedule, guidance and prompt
    of each trajectory do not change: one cache per round. Least recently used rows are dropped once the
    stored means exceed `max_bytes`; a row is C*H*W float32 values on the UNet's device (SD 1.5 at
    512 px: 4*64*64*4 B = 64 KiB, so 512 MiB holds 8192 rows, more than a 100-step round of 4 pairs
    and M = 3 can draw, 2400).
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 (0 keeps nothing), got {max_bytes}")
        self.max_bytes = max_bytes
        self.nbytes = 0
        # rows served from the cache, distinct rows the reference UNet had to run on, rows dropped
        self.hits = self.misses = self.evictions = 0
        self._rows: OrderedDict[tuple[int, int], Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self._rows

    def get(self, key: tuple[int, int]) -> Tensor | None:
        """The row's stored mean (now the most recently used), or None."""
        row = self._rows.get(key)
        if row is not None:
            self._rows.move_to_end(key)
        return row

    def put(self, key: tuple[int, int], value: Tensor) -> None:
        size = value.numel() * value.element_size()
        if key in self._rows or size > self.max_bytes:
            return
        self._rows[key] = value
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, old = self._rows.popitem(last=False)
            self.nbytes -= old.numel() * old.element_size()
            self.evictions += 1

    def hit_rate(self) -> float:
        return self.hits / max(self.hits + self.misses, 1)


@dataclass(frozen=True)
class _StepRows:
    """What the step of rows (z_i, i) needs besides the denoiser's prediction, on the denoiser's device.
    `a`, `b` are the schedule's per-row constants: (abar_t, abar_prev) for DDIM, (sigma_i, sigma_{i+1})
    for flow matching (`row_constants`)."""

    latents: Tensor  # (rows, C, H, W) float32
    model_in: Tensor  # (rows, C, H, W) in the denoiser's dtype
    t: Tensor  # (rows,)
    a: Tensor  # (rows, 1, 1, 1)
    b: Tensor  # (rows, 1, 1, 1)

    @classmethod
    def of(cls, policy: Policy, latents: Tensor, step_idx: Tensor, schedule: StepSchedule) -> _StepRows:
        device = policy.denoiser.device
        latents = latents.to(device, torch.float32)
        step_idx = step_idx.to("cpu")
        a, b = schedule.row_constants(step_idx)
        return cls(
            latents,
            latents.to(
                policy.denoiser.dtype
            ),  # the denoiser runs in the pipeline's dtype; the rest in float32
            schedule.timesteps[step_idx].to(device),
            a.to(device),
            b.to(device),
        )

    def select(self, idx: Tensor) -> _StepRows:
        return _StepRows(self.latents[idx], self.model_in[idx], self.t[idx], self.a[idx], self.b[idx])


def _step_mean(
    policy: Policy, rows: _StepRows, cond: Conditioning, schedule: StepSchedule, settings: SamplerSettings
) -> tuple[Tensor, Tensor]:
    """(mu, sigma) of the step of `rows` under the denoiser as it is now (policy, or reference inside
    `policy.reference()`)."""
    pred = predict(
        policy.pipe,
        rows.model_in,
        rows.t,
        cond,
        settings.guidance_scale,
        timestep_scale=schedule.timestep_scale,
    )
    return schedule.step(pred.float(), rows.latents, rows.a, rows.b, eta=settings.eta)


def step_log_probs(
    policy: Policy,
    latents: Tensor,
    next_latents: Tensor,
    step_idx: Tensor,
    cond: Conditioning,
    schedule: StepSchedule,
    settings: SamplerSettings,
) -> Tensor:
    """log pi(z_{i+1} | z_i, c) of rows under the policy as it is now, recomputed as training computes its
    step means (the sampler's recorded log-probs must equal these on-policy). Returns (rows,)."""
    rows = _StepRows.of(policy, latents, step_idx, schedule)
    mean, std = _step_mean(policy, rows, cond, schedule, settings)
    next_latents = next_latents.to(rows.latents.device, torch.float32)
    return gaussian_log_prob(next_latents, mean, std, reduction=settings.reduction)


def _reference_step_means(
    policy: Policy,
    rows: _StepRows,
    cond: Conditioning,
    schedule: StepSchedule,
    settings: SamplerSettings,
    *,
    cache: ReferenceCache | None = None,
    keys: Sequence[tuple[int, int]] | None = None,
) -> Tensor:
    """mu_ref of every row, without gradient. With `cache` (and a (trajectory id, step) key per row), the
    reference UNet runs once per distinct key the cache lacks; the others are read from it. (rows, C, H, W)"""
    if cache is None or keys is None:
        with torch.no_grad(), policy.reference():
            return _step_mean(policy, rows, cond, schedule, settings)[0]
    found = [cache.get(key) for key in keys]
    first_row: dict[tuple[int, int], int] = {}  # a row per distinct key the cache lacks
    for i, (key, mean) in enumerate(zip(keys, found, strict=True)):
        if mean is None:
            first_row.setdefault(key, i)
    fresh: dict[tuple[int, int], Tensor] = {}
    if first_row:
        missing = torch.tensor(list(first_row.values()))
        with torch.no_grad(), policy.reference():
            means, _ = _step_mean(policy, rows.select(missing), cond.index(missing), schedule, settings)
        fresh = dict(zip(first_row, means, strict=True))
        for key, mean in fresh.items():
            cache.put(key, mean.clone())  # its own storage: a view would keep the whole batch alive
    cache.misses += len(first_row)
    cache.hits += len(keys) - len(first_row)
    return torch.stack(
        [mean if mean is not None else fresh[key] for key, mean in zip(keys, found, strict=True)]
    )


def step_log_ratios(
    policy: Policy,
    latents: Tensor,
    next_latents: Tensor,
    step_idx: Tensor,
    cond: Conditioning,
    schedule: StepSchedule,
    settings: SamplerSettings,
    *,
    reference_cache: ReferenceCache | None = None,
    keys: Sequence[tuple[int, int]] | None = None,
) -> Tensor:
    """log pi_theta - log pi_ref of z_{i+1} given z_i for rows (z_i, z_{i+1}, i). Returns (rows,).

    `reference_cache` and `keys` (one (trajectory id, step) per row): see `_reference_step_means`."""
    rows = _StepRows.of(policy, latents, step_idx, schedule)
    next_latents = next_latents.to(rows.latents.device, torch.float32)
    mean_policy, std = _step_mean(policy, rows, cond, schedule, settings)
    mean_ref = _reference_step_means(policy, rows, cond, schedule, settings, cache=reference_cache, keys=keys)
    return gaussian_log_ratio(next_latents, mean_policy, mean_ref, std, reduction=settings.reduction)


@dataclass(frozen=True)
class _PairRows:
    """The 2BM rows (winners first) of a batch at the (B, M) steps `step_idx`."""

    z: Tensor  # (2BM, C, H, W)
    z_next: Tensor  # (2BM, C, H, W)
    steps: Tensor  # (2BM,)
    cond: Conditioning  # 2BM rows
    keys: list[tuple[int, int]] | None  # (trajectory id, step) per row, when the batch names its ids

    @classmethod
    def of(cls, policy: Policy, batch: PairBatch, step_idx: Tensor) -> _PairRows:
        b, m = step_idx.shape
        pair_rows = torch.arange(b).repeat_interleave(m)  # (B * M,)
        steps = step_idx.reshape(-1)  # (B * M,)
        both = torch.cat([batch.latents_w, batch.latents_l])  # (2B, N + 1, C, H, W)
        rows = torch.cat([pair_rows, pair_rows + b])  # (2BM,)
        steps2 = torch.cat([steps, steps])  # (2BM,)
        cond = (
            batch.cond
            if batch.cond is not None
            else encode_prompts(policy.pipe, batch.prompts, batch.settings)
        )
        keys = None
        if batch.ids_w is not None and batch.ids_l is not None:
            ids = batch.ids_w + batch.ids_l
            keys = [(ids[r], s) for r, s in zip(rows.tolist(), steps2.tolist(), strict=True)]
        return cls(
            both[rows, steps2],
            both[rows, steps2 + 1],
            steps2,
            cond.index(torch.cat([pair_rows, pair_rows])),
            keys,
        )


def pair_log_ratios(
    policy: Policy,
    batch: PairBatch,
    step_idx: Tensor,
    schedule: StepSchedule,
    reference_cache: ReferenceCache | None = None,
) -> tuple[Tensor, Tensor]:
    """Log-ratios of both trajectories of every pair at the (B, M) steps `step_idx`. Returns two (B, M)."""
    b, m = step_idx.shape
    r = _PairRows.of(policy, batch, step_idx)
    if reference_cache is not None and r.keys is None:
        raise ValueError("a reference cache needs the batch's trajectory ids (PairBatch ids_w and ids_l)")
    ratios = step_log_ratios(
        policy,
        r.z,
        r.z_next,
        r.steps,
        r.cond,
        schedule,
        batch.settings,
        reference_cache=reference_cache,
        keys=r.keys,
    )
    return ratios[: b * m].view(b, m), ratios[b * m :].view(b, m)


def warm_reference_cache(
    policy: Policy, batch: PairBatch, step_idx: Tensor, schedule: StepSchedule, cache: ReferenceCache
) -> None:
    """Run only the reference part of a step on `cache`: the rows it lacks are computed in the same
    batch as that step computed them, so replaying a round's earlier draws leaves the cache (and the
    steps after) bit for bit as they were in the uninterrupted round."""
    r = _PairRows.of(policy, batch, step_idx)
    if r.keys is None:
        raise ValueError("a reference cache needs the batch's trajectory ids (PairBatch ids_w and ids_l)")
    rows = _StepRows.of(policy, r.z, r.steps, schedule)
    _reference_step_means(policy, rows, r.cond, schedule, batch.settings, cache=cache, keys=r.keys)


def scheduled_lr(hp: DpoConfig, step: int) -> float:
    """The learning rate of a round's optimizer step `step` (0-based) under `hp.lr_schedule`."""
    if hp.lr_schedule == "constant" or hp.steps_per_round <= 1:
        return hp.lr
    progress = min(step, hp.steps_per_round - 1) / (hp.steps_per_round - 1)
    ratio = hp.lr_final_ratio + (1.0 - hp.lr_final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return hp.lr * ratio


def draw_step_indices(
    hp: DpoConfig, num_steps: int, pairs: int, generator: torch.Generator | None = None
) -> Tensor:
    """The (B, M) step indices a step evaluates: M draws from the discount weights, or all N if exact."""
    if hp.exact:
        return torch.arange(num_steps).expand(pairs, num_steps)
    weights = discount_weights(num_steps, hp.gamma)
    return sample_step_indices(weights, pairs, hp.sampled_steps, generator=generator)


def train_step(
    policy: Policy,
    optimizer: torch.optim.Optimizer,
    batch: PairBatch,
    hp: DpoConfig,
    schedule: StepSchedule,
    generator: torch.Generator | None = None,
    reference_cache: ReferenceCache | None = None,
    *,
    step_idx: Tensor | None = None,
    reduce_gradients: Callable[[], None] | None = None,
) -> StepMetrics:
    """One optimizer step on `batch`: sample steps, compute the loss, clip gradients, step.

    `reference_cache` (optional; the batch must name its trajectory ids): reuse the reference's step
    means of rows seen earlier in the round instead of running the reference UNet on them again.
    Data-parallel training (trainer/data_parallel.py) passes this rank's share of the whole batch's
    (B, M) `step_idx` instead of drawing them, and `reduce_gradients`, called between the backward pass
    and the clipping, to combine the ranks' gradients into the whole batch's."""
    if schedule.num_steps != batch.settings.num_steps:
        raise ValueError(
            f"schedule has {schedule.num_steps} steps but the pairs were sampled with {batch.settings.num_steps}"
        )
    b, n = len(batch.prompts), schedule.num_steps
    weights = discount_weights(n, hp.gamma)
    if step_idx is None:
        step_idx = draw_step_indices(hp, n, b, generator)
    elif tuple(step_idx.shape[:1]) != (b,):
        raise ValueError(f"step_idx must have one row per pair ({b}), got shape {tuple(step_idx.shape)}")
    pair_weights = batch.weights
    optimizer.zero_grad(set_to_none=True)
    logratio_w, logratio_l = pair_log_ratios(
        policy, batch, step_idx, schedule, reference_cache=reference_cache
    )
    if hp.exact:
        loss = dense_dpo_loss_exact(
            logratio_w,
            logratio_l,
            weights.to(logratio_w.device),
            beta=hp.beta,
            clip=hp.clip,
            pair_weights=pair_weights,
        )
    else:
        loss = dense_dpo_loss(logratio_w, logratio_l, beta=hp.beta, clip=hp.clip, pair_weights=pair_weights)
    loss.backward()
    if reduce_gradients is not None:
        reduce_gradients()
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.lora_parameters(), hp.max_grad_norm)
    optimizer.step()
    return _metrics(hp, weights, step_idx, logratio_w, logratio_l, loss, grad_norm)


def _metrics(
    hp: DpoConfig,
    weights: Tensor,
    step_idx: Tensor,
    logratio_w: Tensor,
    logratio_l: Tensor,
    loss: Tensor,
    grad_norm: Tensor,
) -> StepMetrics:
    with torch.no_grad():
        both = torch.cat([logratio_w, logratio_l])
        if hp.exact:
            w = weights.to(logratio_w.device)
            margin = ((logratio_w.clamp(-hp.clip, hp.clip) - logratio_l.clamp(-hp.clip, hp.clip)) * w).sum(
                dim=1
            )
        else:
            margin = implicit_scores(logratio_w, beta=hp.beta, clip=hp.clip) - implicit_scores(
                logratio_l, beta=hp.beta, clip=hp.clip
            )
        accuracy = (margin > 0).float().mean()
    return StepMetrics(
        loss=float(loss.detach()),
        implicit_accuracy=float(accuracy),
        mean_abs_logratio=float(both.abs().mean()),
        clipped_share=float((both.abs() > hp.clip).float().mean()),
        grad_norm=float(grad_norm),
        step_indices=step_idx.clone(),
        logratio_w=logratio_w.detach().cpu(),
        logratio_l=logratio_l.detach().cpu(),
    )


def make_optimizer(policy: Policy, *, lr: float = 3e-5, weight_decay: float = 2e-3) -> torch.optim.AdamW:
    """AdamW over the LoRA parameters only (paper single prompt: lr 3e-5, weight decay 2e-3)."""
    if not lr > 0:
        raise ValueError(f"learning rate must be > 0 (paper: 3e-5), got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0 (paper: 2e-3), got {weight_decay}")
    return torch.optim.AdamW(policy.lora_parameters(), lr=lr, weight_decay=weight_decay)
