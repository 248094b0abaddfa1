"""What reliability weighting does to the training signal, on simulated labellers with known abilities.

The product's rule (`core.db.training.weigh_by_reliability`, DENSEALIGN_DPO__LABEL_WEIGHTING=reliability)
against the plain majority, on the same votes: pairs with a true better side; a crowd whose members
name it with known probabilities; the product's overlap (each pair one vote, `--overlap-share` of them
three) and gold pairs (`--gold-share` of the pairs, with a known answer, voted on by everyone). For each
rule: the share of the training weight that points the right way, and the "net signal" per vote spent,
(right weight - wrong weight) / votes: the expected gradient a round gets per human label. Gold pairs
are not trained on (their answer is known, but they cost votes, which is the price of measuring).

This measures the labels, not the model: whether the better labels move a model further per label is
what experiments/online.py measures (docs/results.md says which rows exist).

Usage: python experiments/label_weighting.py --seeds 0 1 2 3 4 5 6 7 8 9
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.reliability import Vote, fit_abilities, pair_weight  # noqa: E402

CROWDS = {
    # five careful people
    "uniform": [0.85, 0.85, 0.85, 0.85, 0.85],
    # three careful people, one hurried, one who clicks at random
    "mixed": [0.9, 0.9, 0.85, 0.7, 0.5],
    # as mixed, but the last one has the sides swapped (a misread guideline)
    "contrarian": [0.9, 0.9, 0.85, 0.7, 0.2],
}


def simulate(
    abilities: list[float], votes_budget: int, overlap_share: float, gold_share: float, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    votes: list[Vote] = []
    truth: dict[int, str] = {}
    gold: dict[int, str] = {}
    pair = 0
    while len(votes) < votes_budget:
        pair += 1
        truth[pair] = rng.choice("ab")
        if rng.random() < gold_share:
            gold[pair] = truth[pair]
            voters = list(range(len(abilities)))
        else:
            voters = rng.sample(range(len(abilities)), 3 if rng.random() < overlap_share else 1)
        for j in voters:
            right = rng.random() < abilities[j]
            side = truth[pair] if right else ("b" if truth[pair] == "a" else "a")
            votes.append(Vote(pair, j, side))
    fit = fit_abilities(votes, gold)
    by_pair: dict[int, list[str]] = {}
    for v in votes:
        by_pair.setdefault(v.pair_id, []).append(v.side)
    result: dict[str, Any] = {"votes": len(votes), "pairs": len(truth), "gold_pairs": len(gold)}
    for rule in ("majority", "reliability"):
        right = wrong = 0.0
        trained = 0
        for p, sides in by_pair.items():
            if p in gold:
                continue
            if rule == "majority":
                a, b = sides.count("a"), sides.count("b")
                if a == b:
                    continue
                side, weight = ("a" if a > b else "b"), 1.0
            else:
                side, weight = pair_weight(fit.posterior[p])
            trained += 1
            if side == truth[p]:
                right += weight
            else:
                wrong += weight
        result[rule] = {
            "pairs_trained": trained,
            "right_share": right / (right + wrong) if right + wrong else math.nan,
            "net_signal_per_vote": (right - wrong) / len(votes),
        }
    result["abilities"] = {j: round(a.accuracy, 3) for j, a in fit.abilities.items()}
    return result


def mean_ci(xs: list[float]) -> tuple[float, float, float]:
    """Mean and a 95% t-interval (10 seeds: t = 2.262)."""
    from report import T975  # type: ignore[import-not-found]

    n = len(xs)
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else math.nan
    half = T975[min(n - 1, len(T975)) - 1] * sd / math.sqrt(n) if n > 1 else math.nan
    return m, m - half, m + half


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--votes", type=int, default=384, help="votes spent per run (the label budget)")
    parser.add_argument("--overlap-share", type=float, default=0.2, help="pairs that get 3 votes")
    parser.add_argument("--gold-share", type=float, default=0.05, help="pairs with a known answer")
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results" / "label_weighting.json"))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "experiments"))
    runs: dict[str, list[dict[str, Any]]] = {}
    lines = [
        "| crowd | abilities | right share: majority | reliability | difference [95%] "
        "| net signal per vote: majority | reliability | difference [95%] | seeds where reliability is ahead |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for crowd, abilities in CROWDS.items():
        runs[crowd] = [
            simulate(abilities, args.votes, args.overlap_share, args.gold_share, seed) for seed in args.seeds
        ]
        maj = [r["majority"]["net_signal_per_vote"] for r in runs[crowd]]
        rel = [r["reliability"]["net_signal_per_vote"] for r in runs[crowd]]
        diff = [b - a for a, b in zip(maj, rel, strict=True)]
        d, lo, hi = mean_ci(diff)
        shares_m = [r["majority"]["right_share"] for r in runs[crowd]]
        shares_r = [r["reliability"]["right_share"] for r in runs[crowd]]
        sd, slo, shi = mean_ci([b - a for a, b in zip(shares_m, shares_r, strict=True)])
        lines.append(
            f"| {crowd} | {', '.join(str(a) for a in abilities)} | {mean_ci(shares_m)[0]:.3f} "
            f"| {mean_ci(shares_r)[0]:.3f} | {sd:+.3f} [{slo:+.3f}, {shi:+.3f}] "
            f"| {mean_ci(maj)[0]:.3f} | {mean_ci(rel)[0]:.3f} | {d:+.3f} [{lo:+.3f}, {hi:+.3f}] "
                f"| {sum(x > 0 for x in diff)}/{len(diff)} |"
        )
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "runs": runs}, indent=1))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
