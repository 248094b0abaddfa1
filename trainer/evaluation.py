"""Score a policy with a programmatic judge on fixed prompts and seeds (held out from labelling).

Used by the trainer to record, with each published version, how a judge rates fresh samples of it:
the demo's "quality of each version" and the experiments' evaluation points. Fixed seeds make
versions comparable: the same initial noise, only the adapter differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.diffusion.policy import Policy
from core.diffusion.sampler import SamplerSettings, sample_trajectories


@dataclass
class JudgeEvaluator:
    judge: str
    prompts: list[str]
    seeds: list[int]
    settings: SamplerSettings
    batch: int = 8

    def __call__(self, policy: Policy) -> dict[str, Any]:
        from core.judges import make_judge

        judge = make_judge(self.judge)
        cases = [(p, s) for p in self.prompts for s in self.seeds]
        scores, accepted = [], []
        for i in range(0, len(cases), self.batch):
            chunk = cases[i : i + self.batch]
            images = sample_trajectories(
                policy.pipe, [p for p, _ in chunk], [s for _, s in chunk], self.settings
            ).pil_images()
            for (prompt, _), image in zip(chunk, images, strict=True):
                scores.append(judge.score(prompt, image))
                verdict = getattr(judge, "accepts", None)
                accepted.append(bool(verdict(prompt, image)) if verdict else scores[-1] >= 0.5)
        n = max(len(scores), 1)
        return {
            "judge": self.judge,
            "judge_score": sum(scores) / n,
            "judge_accept": sum(accepted) / n,
            "eval_samples": len(scores),
        }
