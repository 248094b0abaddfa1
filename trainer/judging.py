"""How a programmatic judge scores a policy on fixed prompts and seeds (held out from labelling).

- `JudgeEvaluator`: used by the trainer to record, with each published version, how a judge rates
  fresh samples of it (the demo's "quality of each version", the experiments' evaluation points).
  Fixed seeds make versions comparable: the same initial noise, only the adapter differs.
- `main` (`densealign eval --version N`): loads the base model from settings, hot-swaps version N's
  adapter (checked against its sha256), samples one image per (prompt, seed) on fixed evaluation
  prompts and seeds, and prints the faithfulness judge's acceptance next to version 0's on the very
  same prompts and seeds.

People's judgement of a version (blind A/B campaigns) is elsewhere: `core.db.campaigns`.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from typing import Any

from core.basemodel.evaluate import acceptance, eval_prompts
from core.blob_stores import open_blob_store
from core.db import make_engine, make_session_factory
from core.db.errors import DomainError
from core.db.policies import get_policy_version
from core.diffusion.policy import AdapterMismatchError, Policy, policy_from_config
from core.diffusion.sampler import SamplerSettings, sample_trajectories
from core.judges import make_judge
from core.settings import SettingsError, load_settings
from core.storage import BlobCorrupt


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


def main(argv: list[str] | None = None) -> int:
    """`densealign eval --version N`: the faithfulness judge's acceptance of version N next to version 0's."""
    parser = argparse.ArgumentParser(prog="densealign eval", description=main.__doc__)
    parser.add_argument("--version", type=int, required=True, help="policy version (0 = the base model)")
    parser.add_argument("--prompts", type=int, default=64, help="evaluation prompts (one seed each)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the sampler setting)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        with make_session_factory(make_engine(settings.database_url))() as session:
            row = get_policy_version(session=session, version=args.version)
            key, sha = row.lora_key, row.lora_sha256
        policy = policy_from_config(settings.model)
    except (SettingsError, DomainError, ValueError) as exc:
        print(f"densealign eval: {exc}", file=sys.stderr)
        return 2
    sampler_settings = SamplerSettings(
        num_steps=args.steps or settings.sampler.num_steps, guidance_scale=settings.sampler.guidance_scale
    )
    prompts = eval_prompts(args.prompts)
    seeds = list(range(args.prompts))
    base = acceptance(policy.pipe, prompts, seeds, sampler_settings, progress=True)
    print(
        f"version 0: accepted {base.accepted}/{base.total} = {base.rate:.1%} (mean score {base.mean_score:.3f})"
    )
    if key is not None and sha is not None:
        try:
            policy.load_published(open_blob_store(settings.blob_url, settings.blob_dir), key, sha)
        except (BlobCorrupt, AdapterMismatchError) as exc:
            print(f"densealign eval: version {args.version}: {exc}", file=sys.stderr)
            return 2
        result = acceptance(policy.pipe, prompts, seeds, sampler_settings, progress=True)
        print(
            f"version {args.version}: accepted {result.accepted}/{result.total} = {result.rate:.1%} "
            f"(mean score {result.mean_score:.3f})"
        )
    return 0
