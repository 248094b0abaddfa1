"""Judge agreement of a model: the share of its samples that the faithfulness judge accepts.

`acceptance(pipe, ...)` samples one image per (prompt, seed) with the DenseAlign sampler and asks
the judge; `main` is a command that prints it for a model folder next to two baselines: ground-truth
renders of the same prompts (the judge's ceiling) and random prompt/image pairings (its floor).
The evaluation prompts are a fixed, seeded draw from the data set's distribution (75% two-object).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from tqdm import tqdm

from core.basemodel import shapes
from core.diffusion.models import Pipeline, load_pipeline
from core.diffusion.sampler import SamplerSettings, sample_trajectories
from core.judges import FaithfulnessJudge

logger = logging.getLogger(__name__)
# Data-set seed of the evaluation prompts: disjoint from training's default seed 0.
EVAL_SEED = 12345


@dataclass(frozen=True)
class Agreement:
    accepted: int
    total: int
    mean_score: float

    @property
    def rate(self) -> float:
        return self.accepted / self.total


def eval_prompts(n: int, seed: int = EVAL_SEED) -> list[str]:
    """n prompts drawn like the data set's, reproducibly."""
    return [shapes.example(i, seed).prompt for i in range(n)]


def acceptance(
    pipe: Pipeline,
    prompts: list[str],
    seeds: list[int],
    settings: SamplerSettings,
    batch_size: int = 8,
    progress: bool = False,
) -> Agreement:
    """Sample one image per (prompt, seed) and count how many the faithfulness judge accepts."""
    judge = FaithfulnessJudge()
    accepted, scores = 0, []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="eval", unit="batch", disable=not progress):
        batch = sample_trajectories(
            pipe, prompts[start : start + batch_size], seeds[start : start + batch_size], settings
        )
        for prompt, image in zip(batch.prompts, batch.pil_images(), strict=True):
            verdict = judge.verdict(prompt, image)
            accepted += verdict.accepted
            scores.append(verdict.score)
    return Agreement(accepted, len(prompts), sum(scores) / len(scores))


def baselines(prompts: list[str], seed: int = EVAL_SEED) -> dict[str, Agreement]:
    """Ground-truth renders of each prompt, and renders of a shuffled prompt judged against each prompt."""
    judge = FaithfulnessJudge()
    rng = random.Random(seed)
    truth = [shapes.render(shapes.random_scene(rng, p)) for p in prompts]
    shuffled = prompts[:]
    rng.shuffle(shuffled)
    others = [shapes.render(shapes.random_scene(rng, p)) for p in shuffled]
    out = {}
    for name, images in (("ground_truth", truth), ("random_pairing", others)):
        verdicts = [judge.verdict(p, im) for p, im in zip(prompts, images, strict=True)]
        out[name] = Agreement(
            sum(v.accepted for v in verdicts), len(verdicts), sum(v.score for v in verdicts) / len(verdicts)
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="densealign eval-base",
        description="Share of a shapes model's samples that the faithfulness judge accepts, with baselines.",
    )
    p.add_argument("--model", default="models/densealign-shapes", help="diffusers folder or hub id")
    p.add_argument("--prompts", type=int, default=64, help="number of evaluation prompts (one seed each)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--json", help="also write the figures to this file")
    ns = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    pipe = load_pipeline(ns.model, device=ns.device)
    prompts = eval_prompts(ns.prompts)
    settings = SamplerSettings(num_steps=ns.steps, guidance_scale=ns.guidance, eta=ns.eta)
    t0 = time.perf_counter()
    model = acceptance(pipe, prompts, list(range(len(prompts))), settings, progress=True)
    elapsed = time.perf_counter() - t0
    figures = {"model": model, **baselines(prompts)}
    lines = [
        f"{ns.model}: {ns.prompts} prompts x 1 seed, {ns.steps} steps, guidance {ns.guidance}, eta {ns.eta}"
    ]
    lines += [
        f"  {name:15s} accepted {a.accepted:4d}/{a.total} = {a.rate:6.1%}   mean score {a.mean_score:.3f}"
        for name, a in figures.items()
    ]
    lines.append(f"  sampling took {elapsed:.1f} s ({elapsed / len(prompts):.2f} s per image)")
    sys.stdout.write("\n".join(lines) + "\n")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(
                {
                    k: {"accepted": a.accepted, "total": a.total, "rate": a.rate, "mean_score": a.mean_score}
                    for k, a in figures.items()
                }
                | {"settings": settings.to_dict()},
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
