"""Summarise experiments/online.py rows: a Markdown table per setting and version, and a PNG plot.

For each (gamma, beta, M, noise) and version: labels used, and across seeds the mean (± standard
error of the per-seed means) of the judge's score on training prompts and on held-out prompts,
and the win rate against version 0. The plot draws score vs labels, one line per gamma, with a band
of ± one standard error across seeds.

Usage: python experiments/report.py experiments/results/gamma_small.jsonl --plot docs/gamma_small.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any


def load(path: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def setting(r: dict[str, Any]) -> tuple[Any, ...]:
    """The grid cell a row belongs to: (gamma, beta, M, noise)."""
    return (r["gamma"], r["beta"], r["sampled_steps"], r["noise"])


def group(rows: list[dict[str, Any]]) -> dict[tuple[Any, ...], dict[int, list[dict[str, Any]]]]:
    out: dict[tuple[Any, ...], dict[int, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        out[setting(r)][r["version"]].append(r)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| gamma | beta | M | noise | version | labels | seeds | train score | held-out score | train win rate vs v0 | held-out win rate vs v0 | train paired diff vs v0 | held-out paired diff vs v0 | train accept |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (gamma, beta, m, noise), versions in sorted(group(rows).items()):
        for version, rs in sorted(versions.items()):
            cells = []
            for split in ("train", "held_out"):
                mu, se = mean_se([r[split]["mean"] for r in rs])
                cells.append(f"{mu:.4f} ± {se:.4f}")
            for split in ("train", "held_out"):
                mu, se = mean_se([r[split]["win_rate_vs_v0"] for r in rs])
                cells.append(f"{mu:.3f} ± {se:.3f}")
            for split in ("train", "held_out"):
                mu, se = mean_se([r[split].get("diff_vs_v0", float("nan")) for r in rs])
                cells.append(f"{mu:+.4f} ± {se:.4f}")
            mu, se = mean_se([r["train"].get("accept", float("nan")) for r in rs])
            cells.append(f"{mu:.3f} ± {se:.3f}")
            labels = sum(r["labels_used"] for r in rs) / len(rs)
            lines.append(
                f"| {gamma} | {beta} | {m} | {noise} | {version} | {labels:.0f} | {len(rs)} | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(lines)


def reach_by_seed(
    rows: list[dict[str, Any]], threshold: float
) -> dict[tuple[Any, ...], dict[int, tuple[float | None, int]]]:
    """Per setting, per seed: (labels at which the training-prompt paired difference from version 0
    first reaches `threshold`, by linear interpolation between evaluation points, or None if it never
    does; the label budget that seed ran to)."""
    cells: dict[tuple[Any, ...], dict[int, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        cells[setting(r)][r["seed"]].append(r)
    out: dict[tuple[Any, ...], dict[int, tuple[float | None, int]]] = {}
    for key, seeds in sorted(cells.items()):
        out[key] = {}
        for seed, rs in sorted(seeds.items()):
            points = sorted((r["labels_used"], r["train"].get("diff_vs_v0", 0.0)) for r in rs)
            xs, ys = [x for x, _ in points], [y for _, y in points]
            out[key][seed] = (crossing(xs, ys, threshold), xs[-1])
    return out


def labels_to_reach(
    rows: list[dict[str, Any]], threshold: float
) -> dict[tuple[Any, ...], list[float | None]]:
    """reach_by_seed without the budgets, seeds in order."""
    return {
        key: [hit for _, (hit, _) in sorted(seeds.items())]
        for key, seeds in reach_by_seed(rows, threshold).items()
    }


def final_table(rows: list[dict[str, Any]]) -> str:
    """Per setting, each seed's training-prompt paired difference at its last evaluation point: with
    seeds shared across settings (same initial pool and evaluation noise), the columns pair up."""
    last: dict[tuple[Any, ...], dict[int, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        key = setting(r)
        if r["seed"] not in last[key] or r["version"] > last[key][r["seed"]]["version"]:
            last[key][r["seed"]] = r
    seeds = sorted({seed for cell in last.values() for seed in cell})
    lines = [
        "| gamma | beta | M | noise | labels | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|---|---|---|---|" + "---|" * len(seeds),
    ]
    for (gamma, beta, m, noise), cell in sorted(last.items()):
        labels = max(r["labels_used"] for r in cell.values())
        shown = [f"{cell[s]['train']['diff_vs_v0']:+.3f}" if s in cell else "" for s in seeds]
        lines.append(f"| {gamma} | {beta} | {m} | {noise} | {labels} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


# Two-sided 95% quantiles of Student's t for 1..20 degrees of freedom.
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
        2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086]  # fmt: skip


def paired_gain_table(rows: list[dict[str, Any]], num: float, den: float) -> str:
    """Per (beta, M, noise) and version: the training-prompt paired gain of gamma `num` and of gamma
    `den` over the seeds both reached, and their difference seed by seed with a 95% t-interval."""
    cells: dict[tuple[Any, ...], dict[tuple[int, int], dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        cells[setting(r)][(r["seed"], r["version"])] = r
    lines = [
        f"| beta | M | noise | labels | seeds | gamma {num} | gamma {den} | difference | 95% interval | seeds where {num} is ahead |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (gamma, beta, m, noise), a in sorted(cells.items()):
        b = cells.get((den, beta, m, noise))
        if gamma != num or not b:
            continue
        for version in sorted({v for _, v in a} & {v for _, v in b}):
            if version == 0:
                continue
            keys = sorted(k for k in a.keys() & b.keys() if k[1] == version)
            xa = [a[k]["train"]["diff_vs_v0"] for k in keys]
            xb = [b[k]["train"]["diff_vs_v0"] for k in keys]
            diff = [x - y for x, y in zip(xa, xb, strict=True)]
            (ma, sa), (mb, sb), (md, sd) = mean_se(xa), mean_se(xb), mean_se(diff)
            half = T975[min(len(keys) - 1, len(T975)) - 1] * sd if len(keys) > 1 else math.nan
            labels = mean_se([a[k]["labels_used"] for k in keys])[0]
            lines.append(
                f"| {beta} | {m} | {noise} | {labels:.0f} | {len(keys)} | {ma:+.4f} ± {sa:.4f} | {mb:+.4f} ± {sb:.4f} "
                f"| {md:+.4f} ± {sd:.4f} | [{md - half:+.4f}, {md + half:+.4f}] | {sum(d > 0 for d in diff)}/{len(keys)} |"
            )
    return "\n".join(lines)


def ratio_table(rows: list[dict[str, Any]], threshold: float, num: float, den: float) -> str:
    """Labels needed to reach `threshold` at gamma `num` over gamma `den`, paired by seed.

    Per seed the ratio is exact when both runs reached the threshold, an upper bound (<) when only
    `num` did (the other needed more than its budget), a lower bound (>) when only `den` did, and
    unknown (?) when neither did. The summary is the geometric mean over seeds where both reached,
    with a 95% t-interval of the mean log-ratio across those seeds; and, when every censored seed
    is censored in the denominator only, the bound that counting those seeds at their budget gives.
    """
    reach = reach_by_seed(rows, threshold)
    lines = [
        f"| beta | M | noise | labels to +{threshold}: gamma {num} / gamma {den}, per seed "
        "| geometric mean (seeds where both reach) | 95% interval across seeds | counting unreached at the budget |",
        "|---|---|---|---|---|---|---|",
    ]
    for (gamma, beta, m, noise), seeds in reach.items():
        if gamma != num or (den, beta, m, noise) not in reach:
            continue
        other = reach[(den, beta, m, noise)]
        shown, logs, bounded, direction = [], [], [], set()
        for seed in sorted(set(seeds) & set(other)):
            (a, budget_a), (b, budget_b) = seeds[seed], other[seed]
            if a is not None and b is not None:
                shown.append(f"{a / b:.2f}")
                logs.append(math.log(a / b))
                bounded.append(math.log(a / b))
            elif a is not None:
                shown.append(f"<{a / budget_b:.2f}")
                bounded.append(math.log(a / budget_b))
                direction.add("<")
            elif b is not None:
                shown.append(f">{budget_a / b:.2f}")
                direction.add(">")
            else:
                shown.append("?")
                direction.add("?")
        gm = (
            f"{math.exp(sum(logs) / len(logs)):.2f} ({len(logs)} seed{'s' * (len(logs) > 1)})"
            if logs
            else "-"
        )
        interval = "-"
        if len(logs) >= 2:
            mu, se = mean_se(logs)
            half = T975[min(len(logs) - 1, len(T975)) - 1] * se
            interval = f"[{math.exp(mu - half):.2f}, {math.exp(mu + half):.2f}]"
        bound = "-"
        if "<" in direction and ">" not in direction:
            unknown = f", {shown.count('?')} unknown left out" if "?" in direction else ""
            bound = f"< {math.exp(sum(bounded) / len(bounded)):.2f} ({len(bounded)} seeds{unknown})"
        lines.append(f"| {beta} | {m} | {noise} | {', '.join(shown)} | {gm} | {interval} | {bound} |")
    return "\n".join(lines)


def crossing(xs: list[float], ys: list[float], threshold: float) -> float | None:
    """The first x at which the piecewise-linear curve (xs, ys) reaches `threshold`, or None."""
    for x0, y0, x1, y1 in zip(xs, ys, xs[1:], ys[1:], strict=False):
        if y1 >= threshold > y0:
            return x0 + (threshold - y0) / (y1 - y0) * (x1 - x0)
    return None


def _mean_curve(curves: list[list[float]], idx: list[int]) -> list[float]:
    """Point by point, the mean of the curves at positions `idx` (repeats allowed)."""
    return [sum(curves[i][v] for i in idx) / len(idx) for v in range(len(curves[0]))]


def _resampled_ratio(
    xs: list[float], a: list[list[float]], b: list[list[float]], idx: list[int], threshold: float
) -> tuple[float, str]:
    """curve_ratio's ratio for the seeds at positions `idx` (repeats allowed), and how it was bounded."""
    la, lb = crossing(xs, _mean_curve(a, idx), threshold), crossing(xs, _mean_curve(b, idx), threshold)
    if la is not None and lb is not None:
        return la / lb, "both"
    if la is not None:
        return la / xs[-1], "den_unreached"
    return math.inf, "num_unreached" if lb is not None else "neither"


def curve_ratio(
    rows: list[dict[str, Any]], threshold: float, num: float, den: float, boots: int = 10_000, seed: int = 0
) -> list[dict[str, Any]]:
    """Labels at which the seed-averaged curve of gamma `num` reaches `threshold`, over gamma `den`'s,
    with a paired bootstrap over seeds; one dict per (beta, M, noise) that has both gammas.

    Per-seed crossings (ratio_table) are single noisy points; the mean curve over seeds is smoother,
    and resampling whole seeds (both gammas of a seed together, since they share the initial pool and
    evaluation noise) gives its spread. Only the seeds both gammas ran, and only the versions every
    one of those seeds reached, are used, so each curve averages the same seeds at every point.

    A resample where `den` never reaches the threshold enters at its bound (num's labels over the
    budget: the true ratio is lower); one where `num` never does, or neither does, enters as
    infinity. So the interval's upper end errs high (a claim "at most x" is safe), its lower end
    may err high too; the shares of such resamples are returned with it."""
    import random

    cells: dict[tuple[Any, ...], dict[int, dict[int, dict[str, Any]]]] = defaultdict(
        lambda: defaultdict(dict)
    )
    for r in rows:
        cells[setting(r)][r["seed"]][r["version"]] = r
    out = []
    for (gamma, beta, m, noise), a_cells in sorted(cells.items()):
        b_cells = cells.get((den, beta, m, noise))
        if gamma != num or not b_cells:
            continue
        seeds = sorted(set(a_cells) & set(b_cells))
        if not seeds:
            continue
        versions = 0
        while all(versions in a_cells[s] and versions in b_cells[s] for s in seeds):
            versions += 1
        if versions < 2:
            continue
        xs = [mean_se([a_cells[s][v]["labels_used"] for s in seeds])[0] for v in range(versions)]
        a = [[a_cells[s][v]["train"]["diff_vs_v0"] for v in range(versions)] for s in seeds]
        b = [[b_cells[s][v]["train"]["diff_vs_v0"] for v in range(versions)] for s in seeds]
        budget = xs[-1]
        everyone = list(range(len(seeds)))
        point, kind = _resampled_ratio(xs, a, b, everyone, threshold)
        rng = random.Random(seed)
        values, kinds = [], defaultdict(int)
        for _ in range(boots):
            value, k = _resampled_ratio(xs, a, b, [rng.randrange(len(seeds)) for _ in seeds], threshold)
            values.append(value)
            kinds[k] += 1
        values.sort()
        out.append(
            {
                "beta": beta, "sampled_steps": m, "noise": noise, "seeds": seeds, "budget": budget,
                "labels_num": crossing(xs, _mean_curve(a, everyone), threshold),
                "labels_den": crossing(xs, _mean_curve(b, everyone), threshold),
                "ratio": point, "kind": kind,
                "low": values[int(0.025 * boots)], "high": values[min(boots - 1, int(0.975 * boots))],
                "shares": {k: n / boots for k, n in sorted(kinds.items())},
            }
        )  # fmt: skip
    return out


def curve_ratio_table(rows: list[dict[str, Any]], threshold: float, num: float, den: float) -> str:
    def labels(x: float | None, budget: float) -> str:
        return f"{x:.0f}" if x is not None else f"> {budget:.0f}"

    def value(x: float) -> str:
        return "unbounded" if math.isinf(x) else f"{x:.2f}"

    lines = [
        f"| beta | M | noise | seeds | labels to +{threshold}, mean curve: gamma {num} / gamma {den} "
        "| ratio | 95% bootstrap interval (seeds) | resamples where a curve never reaches it |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in curve_ratio(rows, threshold, num, den):
        a, b, budget = c["labels_num"], c["labels_den"], c["budget"]
        if a is not None and b is not None:
            ratio = f"{a / b:.2f}"
        elif a is not None:
            ratio = f"< {a / budget:.2f}"
        elif b is not None:
            ratio = f"> {budget / b:.2f}"
        else:
            ratio = "unknown"
        missed = (
            ", ".join(f"{k.replace('_', ' ')} {v:.0%}" for k, v in c["shares"].items() if k != "both")
            or "none"
        )
        lines.append(
            f"| {c['beta']} | {c['sampled_steps']} | {c['noise']} | {len(c['seeds'])} "
            f"| {labels(c['labels_num'], c['budget'])} / {labels(c['labels_den'], c['budget'])} "
            f"| {ratio} | [{value(c['low'])}, {value(c['high'])}] | {missed} |"
        )
    return "\n".join(lines)


def threshold_table(rows: list[dict[str, Any]], threshold: float) -> str:
    lines = [
        f"| gamma | beta | M | noise | labels to reach +{threshold} (per seed; - = not within the budget) | seeds reaching |",
        "|---|---|---|---|---|---|",
    ]
    for (gamma, beta, m, noise), hits in labels_to_reach(rows, threshold).items():
        shown = ", ".join("-" if h is None else f"{h:.0f}" for h in hits)
        lines.append(
            f"| {gamma} | {beta} | {m} | {noise} | {shown} | {sum(h is not None for h in hits)}/{len(hits)} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    for (gamma, beta, m, noise), versions in sorted(group(rows).items()):
        label = f"gamma={gamma}" + (f", beta={beta}" if beta != 10.0 else "") + (f", M={m}" if m != 3 else "")
        label += f", noise={noise}" if noise else ""
        for ax, split in zip(axes, ("train", "held_out"), strict=True):
            xs, mus, ses = [], [], []
            for _, rs in sorted(versions.items()):
                mu, se = mean_se([r[split].get("diff_vs_v0", r[split]["mean"]) for r in rs])
                xs.append(sum(r["labels_used"] for r in rs) / len(rs))
                mus.append(mu)
                ses.append(0.0 if math.isnan(se) else se)
            ax.plot(xs, mus, marker="o", label=label)
            ax.fill_between(
                xs,
                [a - b for a, b in zip(mus, ses, strict=True)],
                [a + b for a, b in zip(mus, ses, strict=True)],
                alpha=0.2,
            )
    for ax, title in zip(axes, ("training prompts", "held-out prompts"), strict=True):
        ax.set_xlabel("labels used")
        ax.set_ylabel("judge score minus version 0's, same prompt and seed")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


# -- options against today's default (issue 18) --------------------------------------------------------

OPTION_DEFAULTS = {"pairing": "independent", "lr_schedule": "constant"}


def option_of(r: dict[str, Any], axis: str) -> Any:
    """A row's value on an option axis; rows written before the axis existed ran its default."""
    return r.get(axis, OPTION_DEFAULTS.get(axis))


def t_interval(diffs: list[float]) -> tuple[float, float, float, float]:
    """Mean, standard error and the 95% t-interval of paired differences."""
    mean, se = mean_se(diffs)
    half = T975[min(len(diffs) - 1, len(T975)) - 1] * se if len(diffs) > 1 else math.nan
    return mean, se, mean - half, mean + half


def option_comparison(
    rows: list[dict[str, Any]], axis: str, baseline: Any, thresholds: tuple[float, ...] = (0.01, 0.02),
    boots: int = 10_000, seed: int = 0,
) -> list[dict[str, Any]]:
    """Each option on `axis` against `baseline`, per judge, paired by seed (both ran the same seed's
    prompts, initial pool and evaluation noise): labels at which the seed-averaged training-prompt
    curve reaches each threshold (option over baseline, with a bootstrap over seeds as `curve_ratio`),
    and at every evaluation point both had, the paired gain of each, their difference with a 95%
    t-interval, and the same on the held-out prompts."""
    import random

    cells: dict[tuple[Any, Any], dict[int, dict[int, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        cells[(r.get("judge", "faithfulness"), option_of(r, axis))][r["seed"]][r["version"]] = r
    out = []
    for (judge, option), a_cells in sorted(cells.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        b_cells = cells.get((judge, baseline))
        if option == baseline or not b_cells:
            continue
        seeds = sorted(set(a_cells) & set(b_cells))
        versions = 0
        while seeds and all(versions in a_cells[s] and versions in b_cells[s] for s in seeds):
            versions += 1
        if versions < 2:
            continue
        xs = [mean_se([a_cells[s][v]["labels_used"] for s in seeds])[0] for v in range(versions)]
        curves = {
            part: (
                [[a_cells[s][v][part]["diff_vs_v0"] for v in range(versions)] for s in seeds],
                [[b_cells[s][v][part]["diff_vs_v0"] for v in range(versions)] for s in seeds],
            )
            for part in ("train", "held_out")
        }
        a, b = curves["train"]
        everyone = list(range(len(seeds)))
        reach = {}
        for threshold in thresholds:
            rng = random.Random(seed)
            values = sorted(
                _resampled_ratio(xs, a, b, [rng.randrange(len(seeds)) for _ in seeds], threshold)[0]
                for _ in range(boots)
            )
            point, kind = _resampled_ratio(xs, a, b, everyone, threshold)
            reach[threshold] = {
                "labels_option": crossing(xs, _mean_curve(a, everyone), threshold),
                "labels_baseline": crossing(xs, _mean_curve(b, everyone), threshold),
                "ratio": point, "kind": kind,
                "low": values[int(0.025 * boots)], "high": values[min(boots - 1, int(0.975 * boots))],
            }  # fmt: skip
        points = []
        for v in range(1, versions):
            point = {"labels": xs[v]}
            for part, (pa, pb) in curves.items():
                xa, xb = [c[v] for c in pa], [c[v] for c in pb]
                diff = [x - y for x, y in zip(xa, xb, strict=True)]
                point[part] = {
                    "option": mean_se(xa), "baseline": mean_se(xb), "difference": t_interval(diff),
                    "ahead": sum(d > 0 for d in diff),
                }  # fmt: skip
            points.append(point)
        out.append(
            {"judge": judge, "axis": axis, "option": option, "baseline": baseline, "seeds": seeds,
             "budget": xs[-1], "reach": reach, "points": points}
        )  # fmt: skip
    return out


def option_tables(rows: list[dict[str, Any]], axis: str, baseline: Any) -> str:
    """Markdown: labels to reach +0.01 / +0.02 (option / baseline on the seed-averaged curve), then the
    paired gains at every evaluation point, training and held-out prompts."""

    def labels(x: float | None, budget: float) -> str:
        return f"{x:.0f}" if x is not None else f"> {budget:.0f}"

    def ratio(r: dict[str, Any]) -> str:
        if r["kind"] == "both":
            return f"{r['ratio']:.2f}"
        return f"< {r['ratio']:.2f}" if r["kind"] == "den_unreached" else "not reached"

    def bound(x: float) -> str:
        return "unbounded" if math.isinf(x) else f"{x:.2f}"

    lines = [
        f"| judge | {axis} | seeds | labels to +0.01: {axis} / {baseline} | ratio [95%] "
        f"| labels to +0.02: {axis} / {baseline} | ratio [95%] |",
        "|---|---|---|---|---|---|---|",
    ]
    found = option_comparison(rows, axis, baseline)
    for c in found:
        r1, r2 = c["reach"][0.01], c["reach"][0.02]
        lines.append(
            f"| {c['judge']} | {c['option']} | {len(c['seeds'])} "
            f"| {labels(r1['labels_option'], c['budget'])} / {labels(r1['labels_baseline'], c['budget'])} "
            f"| {ratio(r1)} [{bound(r1['low'])}, {bound(r1['high'])}] "
            f"| {labels(r2['labels_option'], c['budget'])} / {labels(r2['labels_baseline'], c['budget'])} "
            f"| {ratio(r2)} [{bound(r2['low'])}, {bound(r2['high'])}] |"
        )
    lines += [
        "",
        f"| judge | prompts | labels | seeds | {axis} | {baseline} | difference | 95% interval | seeds ahead |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in found:
        for part in ("train", "held_out"):
            for point in c["points"]:
                p = point[part]
                (ma, sa), (mb, sb) = p["option"], p["baseline"]
                md, sd, lo, hi = p["difference"]
                lines.append(
                    f"| {c['judge']} | {part} | {point['labels']:.0f} | {len(c['seeds'])} | {ma:+.4f} ± {sa:.4f} "
                    f"| {mb:+.4f} ± {sb:.4f} | {md:+.4f} ± {sd:.4f} | [{lo:+.4f}, {hi:+.4f}] "
                    f"| {p['ahead']}/{len(c['seeds'])} |"
                )
    if not found:
        return f"(no paired cells of a {axis} other than {baseline!r} and {baseline!r} itself)"
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="+", help="JSON-lines files written by experiments/online.py")
    parser.add_argument("--plot", default=None, help="write a PNG here")
    parser.add_argument(
        "--threshold", type=float, default=0.02, help="paired score gain for the labels table"
    )
    parser.add_argument(
        "--ratio",
        nargs=2,
        type=float,
        default=(0.9, 1.0),
        metavar=("NUM", "DEN"),
        help="compare labels-to-threshold of gamma NUM over gamma DEN (default 0.9 1.0)",
    )
    parser.add_argument("--gammas", nargs="+", type=float, default=None, help="keep only these gammas")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="keep only these seeds")
    parser.add_argument(
        "--max-labels",
        type=int,
        default=None,
        help="keep only evaluation points at or below this many labels",
    )
    parser.add_argument(
        "--compare",
        default=None,
        choices=sorted(OPTION_DEFAULTS),
        help="tables of each option on this axis against today's default (per judge, paired by seed)",
    )
    args = parser.parse_args(argv)
    # A cell rerun (say with more rounds) repeats its earlier rows exactly; the last copy wins.
    unique: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in (r for path in args.rows for r in load(path)):
        options = tuple(option_of(r, axis) for axis in OPTION_DEFAULTS)
        unique[(*setting(r), *options, r.get("judge"), r["seed"], r["version"])] = r
    rows = [
        r
        for r in unique.values()
        if (args.gammas is None or r["gamma"] in args.gammas)
        and (args.seeds is None or r["seed"] in args.seeds)
        and (args.max_labels is None or r["labels_used"] <= args.max_labels)
    ]
    if not rows:
        parser.error("no rows left: check the files and the --gammas, --seeds and --max-labels filters")
    if args.compare:
        print(option_tables(rows, args.compare, OPTION_DEFAULTS[args.compare]))
        return 0
    print(table(rows))
    print()
    print(threshold_table(rows, args.threshold))
    print()
    print(final_table(rows))
    print()
    print(ratio_table(rows, args.threshold, *args.ratio))
    print()
    print(paired_gain_table(rows, *args.ratio))
    print()
    print(curve_ratio_table(rows, args.threshold, *args.ratio))
    if args.plot:
        plot(rows, args.plot)
        print(f"\nplot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
