"""Which decided pairs may train together: grouping by the sampler settings they were drawn with.

A round rebuilds each trajectory's DDIM schedule and guidance from its recorded settings, so one round
can only use pairs drawn with the same settings. Every trajectory row records them (`TrajectoryLatents.sampler`,
written by the worker from `SamplerSettings.to_dict()`); a pair belongs to its trajectories' group, and
a pair whose two trajectories disagree belongs to none (it can never be trained on). Keying:
- every field of `SamplerSettings` always counts; a field an older record lacks takes its default,
  which is how `core.diffusion.sampler.TrajectoryLatents.from_bytes` reads the same record back;
- `base_model` counts only when both sides record it (older rows don't);
- any other key (e.g. the scheduler's name) is ignored.

Pure Python (the app imports it and must start without torch).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

# The fields of core.diffusion.sampler.SamplerSettings and their defaults, restated because core.db
# may not import torch; tests/core/db/test_training.py fails when the two drift apart.
SAMPLER_FIELDS: dict[str, Any] = {
    "num_steps": 50,
    "guidance_scale": 7.5,
    "eta": 1.0,
    "height": None,
    "width": None,
    "negative_prompt": None,
    "reduction": "mean",
}


class SamplerOptions(Protocol):
    """How workers are told to sample (core.settings.SamplerConfig, `DENSEALIGN_SAMPLER__*`)."""

    @property
    def num_steps(self) -> int: ...
    @property
    def guidance_scale(self) -> float: ...
    @property
    def eta(self) -> float: ...
    @property
    def image_size(self) -> int | None: ...


def configured_sampler(options: SamplerOptions) -> dict[str, Any]:
    """The settings part of the record a worker started with these options writes: worker/main.py
    builds its SamplerSettings with `image_size` for both sides (None = the model's native size).

    It names no base model: workers record the one their pipeline was loaded from, which need not be
    spelled as DENSEALIGN_MODEL__BASE_MODEL is (a folder's path is normalised), so the newest pairs'
    base model stands for the current one (`split_by_sampler`)."""
    return SAMPLER_FIELDS | {
        "num_steps": options.num_steps,
        "guidance_scale": options.guidance_scale,
        "eta": options.eta,
        "height": options.image_size,
        "width": options.image_size,
    }


@dataclass(frozen=True)
class SamplerGroup:
    """The part of a sampler record that decides whether two pairs can train in one round."""

    settings: tuple[tuple[str, Any], ...]  # (field, value) for every SAMPLER_FIELDS entry, in order
    base_model: str | None = None

    @classmethod
    def of(cls, record: Mapping[str, Any]) -> SamplerGroup:
        settings = tuple(
            (name, _hashable(record.get(name, default))) for name, default in SAMPLER_FIELDS.items()
        )
        base = record.get("base_model")
        return cls(settings, base if isinstance(base, str) and base else None)

    def accepts(self, other: SamplerGroup) -> bool:
        """Same settings, and the same base model unless one side does not record it."""
        return self.settings == other.settings and (
            self.base_model is None or other.base_model is None or self.base_model == other.base_model
        )

    def describe(self) -> str:
        """e.g. 'steps 20, guidance 7.5, eta 1.0, native size' (non-default extras appended)."""
        s = dict(self.settings)
        size = (
            "native size" if s["height"] is None and s["width"] is None else f"{s['width']}x{s['height']} px"
        )
        parts = [f"steps {s['num_steps']}", f"guidance {s['guidance_scale']}", f"eta {s['eta']}", size]
        if s["negative_prompt"] is not None:
            parts.append(f"negative prompt {s['negative_prompt']!r}")
        if s["reduction"] != SAMPLER_FIELDS["reduction"]:
            parts.append(f"log-probs reduced by {s['reduction']}")
        if self.base_model is not None:
            parts.append(self.base_model)
        return ", ".join(parts)


def pair_group(a: Mapping[str, Any], b: Mapping[str, Any]) -> SamplerGroup | None:
    """The group of a pair from its two trajectories' records; None when they disagree."""
    ga, gb = SamplerGroup.of(a), SamplerGroup.of(b)
    if not ga.accepts(gb):
        return None
    return SamplerGroup(ga.settings, ga.base_model or gb.base_model)


def trainable_together(groups: Iterable[SamplerGroup | None]) -> bool:
    """Whether pairs of these groups can share a round: one set of settings and at most one base model."""
    groups = list(groups)
    if not groups or any(g is None for g in groups):
        return False
    settings = {g.settings for g in groups if g is not None}
    bases = {g.base_model for g in groups if g is not None and g.base_model is not None}
    return len(settings) == 1 and len(bases) <= 1


def describe_group(group: SamplerGroup | None) -> str:
    return group.describe() if group is not None else "trajectories sampled with different settings"


class HasSampler(Protocol):
    @property
    def pair_id(self) -> int: ...
    @property
    def sampler(self) -> SamplerGroup | None: ...


P = TypeVar("P", bound=HasSampler)


@dataclass(frozen=True)
class GroupCount:
    group: SamplerGroup | None  # None: pairs whose two trajectories disagree
    pairs: int
    current: bool  # trained on at the trainer's settings

    @property
    def label(self) -> str:
        return describe_group(self.group)


@dataclass(frozen=True)
class PairGroups(Generic[P]):
    """Fresh decided pairs split into those a round may train on now and the rest, counted by group."""

    # The settings trained on: the configured (current) ones, else those of the newest pair.
    target: SamplerGroup | None
    configured: bool  # whether `target` came from the trainer's settings
    usable: list[P]
    counts: list[GroupCount]  # current group(s) first, then by size

    @property
    def other_settings_pairs(self) -> int:
        return sum(c.pairs for c in self.counts if not c.current)

    def explain(self, min_new_pairs: int) -> str:
        """One line for the log and the dashboard: what a round would train on, and what waits unused."""
        if self.target is None:
            return f"no decided pairs waiting, need {min_new_pairs}"
        where = "the current settings" if self.configured else "the newest pairs' settings"
        where += f" ({self.target.describe()})"
        n = len(self.usable)
        line = f"{n} decided pairs at {where}, " + (
            f"need {min_new_pairs}" if n < min_new_pairs else f"enough for a round (needs {min_new_pairs})"
        )
        others = self.other_settings_pairs
        if others:
            detail = "; ".join(f"{c.label}: {c.pairs}" for c in self.counts if not c.current)
            line += f"; {others} more at other settings are not used ({detail})"
        return line


def split_by_sampler(pairs: Iterable[P], current: Mapping[str, Any] | None) -> PairGroups[P]:
    """Keep the pairs `current` accepts (None: the newest pair's group), count every group.

    Where `current` names no base model, the newest base model recorded at its settings is taken
    (records without one match it), so the pairs kept can always share a round."""
    pairs = list(pairs)
    target = SamplerGroup.of(current) if current is not None else None
    if target is None:
        grouped = [p for p in pairs if p.sampler is not None]
        target = max(grouped, key=lambda p: p.pair_id).sampler if grouped else None
    if target is not None and target.base_model is None:
        # Keep to one base model, the newest recorded at these settings, so a round never mixes two.
        named = [
            p for p in pairs if p.sampler is not None and p.sampler.base_model and target.accepts(p.sampler)
        ]
        if named:
            target = max(named, key=lambda p: p.pair_id).sampler
    usable = [p for p in pairs if p.sampler is not None and target is not None and target.accepts(p.sampler)]
    by_group = Counter(p.sampler for p in pairs)
    counts = [
        GroupCount(group, n, group is not None and target is not None and target.accepts(group))
        for group, n in by_group.items()
    ]
    counts.sort(key=lambda c: (not c.current, -c.pairs, describe_group(c.group)))
    return PairGroups(target, current is not None, usable, counts)


def _hashable(value: Any) -> Any:
    """Records are JSON: lists become tuples so the group can key a dict."""
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value
