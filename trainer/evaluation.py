"""Score a policy with a programmatic judge on fixed prompts and seeds (held out from labelling).

Used by the trainer to record, with each published version, how a judge rates fresh samples of it:
the demo's "quality of each version" and the experiments' evaluation points. Fixed seeds make
versions comparable: the same initial noise, only the adapter differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from core.diffusion.policy import Policy
from core.diffusion.sampler import SamplerSettings, sample_trajectories


@dataclass
class JudgeEvaluator:
    """Scores `prompts` (the ones being trained on) and `held_out` (never labelled) at `seeds`.

    Metrics: the overall score and accept rate, the score of each part, and the per-case scores in
    order (trained cases first). Once `baseline` holds version 0's per-case scores, each part also
    gets its paired gain over version 0 with a standard error (`judge_gain_train`, ..._se): the
    figure that shows whether training helps, long before the raw means separate."""

    judge: str
    prompts: list[str]
    seeds: list[int]
    settings: SamplerSettings
    batch: int = 32
    held_out: list[str] = field(default_factory=list)
    baseline: list[float] | None = None

    def __call__(self, policy: Policy) -> dict[str, Any]:
        from core.judges import make_judge

        cases = [(p, s) for p in self.prompts + self.held_out for s in self.seeds]
        scores, accepted = judge_cases(policy, make_judge(self.judge), cases, self.settings, self.batch)
        n = max(len(scores), 1)
        metrics: dict[str, Any] = {
            "judge": self.judge,
            "judge_score": sum(scores) / n,
            "judge_accept": sum(accepted) / n,
            "eval_samples": len(scores),
        }
        n_train = len(self.prompts) * len(self.seeds)
        parts = {"train": slice(0, n_train), "held_out": slice(n_train, len(scores))}
        for name, part in parts.items():
            if not scores[part]:
                continue
            metrics[f"judge_score_{name}"] = sum(scores[part]) / len(scores[part])
            if self.baseline is not None:
                if len(self.baseline) != len(scores):
                    raise ValueError(
                        f"baseline has {len(self.baseline)} cases but this evaluation has {len(scores)}: "
                        "score version 0 with the same prompts and seeds"
                    )
                gain, se = paired_difference(scores[part], self.baseline[part])
                metrics[f"judge_gain_{name}"] = round(gain, 5)
                metrics[f"judge_gain_{name}_se"] = round(se, 5)
        # Per (prompt, seed) case, in order: versions compare pairwise on the same initial noise.
        metrics["judge_scores"] = [round(s, 5) for s in scores]
        return metrics


def judge_cases(
    policy: Policy, judge: Any, cases: list[tuple[str, int]], settings: SamplerSettings, batch: int = 32
) -> tuple[list[float], list[bool]]:
    """The judge's score and accept/reject of one fresh sample per (prompt, seed), in order.

    Judges without an accept rule (the model-free ones) accept a score of at least 0.5."""
    scores: list[float] = []
    accepted: list[bool] = []
    for i in range(0, len(cases), batch):
        chunk = cases[i : i + batch]
        images = sample_trajectories(
            policy.pipe, [p for p, _ in chunk], [s for _, s in chunk], settings
        ).pil_images()
        for (prompt, _), image in zip(chunk, images, strict=True):
            scores.append(judge.score(prompt, image))
            accepts = getattr(judge, "accepts", None)
            accepted.append(bool(accepts(prompt, image)) if accepts else scores[-1] >= 0.5)
    return scores, accepted


def paired_difference(scores: list[float], base: list[float]) -> tuple[float, float]:
    """Mean and standard error of scores[k] - base[k] over cases scored with the same prompt and seed.

    Pairing removes most of the prompt-to-prompt and seed-to-seed spread, so a small change between
    versions shows long before the two means' own error bars separate."""
    if len(scores) != len(base) or not scores:
        raise ValueError(f"need the same non-zero number of cases, got {len(scores)} and {len(base)}")
    return mean_se([s - b for s, b in zip(scores, base, strict=True)])


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (NaN with fewer than two values)."""
    n = len(values)
    mean = sum(values) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else float("nan")
    return mean, se
