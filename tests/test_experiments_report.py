"""experiments/report.py: labels-to-threshold by interpolation, and the gamma ratio paired by seed
with its censoring (a run that never reached the threshold within its budget)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))

import report  # noqa: E402


def rows_for(gamma: float, seed: int, diffs: list[float], per_round: int = 64) -> list[dict[str, Any]]:
    return [
        {
            "gamma": gamma, "beta": 10.0, "sampled_steps": 3, "noise": 0.0, "seed": seed, "version": v,
            "labels_used": v * per_round,
            "train": {"mean": 0.6 + d, "se": 0.01, "accept": 0.3, "diff_vs_v0": d, "win_rate_vs_v0": 0.5},
            "held_out": {"mean": 0.5, "se": 0.01, "accept": 0.1, "diff_vs_v0": 0.0, "win_rate_vs_v0": 0.5},
        }
        for v, d in enumerate(diffs)
    ]  # fmt: skip


def test_labels_to_reach_interpolates_and_marks_unreached() -> None:
    rows = rows_for(0.9, 0, [0.0, 0.01, 0.03]) + rows_for(0.9, 1, [0.0, -0.01, 0.015])
    reach = report.reach_by_seed(rows, 0.02)
    key = (0.9, 10.0, 3, 0.0)
    assert reach[key][0] == (pytest.approx(96.0), 128)  # halfway from +0.01 at 64 to +0.03 at 128
    assert reach[key][1] == (None, 128)
    assert report.labels_to_reach(rows, 0.02)[key] == [pytest.approx(96.0), None]


def test_ratio_is_paired_by_seed_with_interval_and_censored_bounds() -> None:
    rows = (
        rows_for(0.9, 0, [0.0, 0.04, 0.05])  # reaches +0.02 at 32 labels
        + rows_for(1.0, 0, [0.0, 0.01, 0.03])  # at 96: ratio 1/3
        + rows_for(0.9, 1, [0.0, 0.02, 0.05])  # at 64
        + rows_for(1.0, 1, [0.0, 0.0, 0.02])  # at 128: ratio 1/2
        + rows_for(0.9, 2, [0.0, 0.01, 0.03])  # at 96
        + rows_for(1.0, 2, [0.0, 0.0, 0.0])  # never within 128: ratio < 96/128
    )
    line = report.ratio_table(rows, 0.02, 0.9, 1.0).splitlines()[-1]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[3] == "0.33, 0.50, <0.75"
    assert cells[4] == "0.41 (2 seeds)"  # sqrt(1/3 * 1/2)
    low, high = (float(x) for x in cells[5].strip("[]").split(","))
    assert low < 0.41 < high  # t-interval over 2 seeds: wide
    assert cells[6] == "< 0.50 (3 seeds)"  # (1/3 * 1/2 * 3/4) ** (1/3)


def test_main_keeps_one_copy_of_repeated_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = tmp_path / "a.jsonl"
    again = tmp_path / "b.jsonl"
    first.write_text("".join(json.dumps(r) + "\n" for r in rows_for(0.9, 0, [0.0, 0.03])))
    again.write_text("".join(json.dumps(r) + "\n" for r in rows_for(0.9, 0, [0.0, 0.03, 0.04])))
    assert report.main([str(first), str(again)]) == 0
    out = capsys.readouterr().out
    # one seed per version row, not two
    assert "| 0.9 | 10.0 | 3 | 0.0 | 1 | 64 | 1 |" in out
    assert "| 0.9 | 10.0 | 3 | 0.0 | 2 | 128 | 1 |" in out


def test_final_table_lines_up_seeds_at_the_last_point() -> None:
    rows = (
        rows_for(0.9, 0, [0.0, 0.01, 0.03]) + rows_for(0.9, 2, [0.0, -0.02]) + rows_for(1.0, 0, [0.0, -0.01])
    )
    lines = report.final_table(rows).splitlines()
    assert lines[0] == "| gamma | beta | M | noise | labels | seed 0 | seed 2 |"
    assert lines[2] == "| 0.9 | 10.0 | 3 | 0.0 | 128 | +0.030 | -0.020 |"
    assert lines[3] == "| 1.0 | 10.0 | 3 | 0.0 | 64 | -0.010 |  |"


def test_crossing_interpolates_between_points() -> None:
    assert report.crossing([0, 64, 128], [0.0, 0.01, 0.03], 0.02) == pytest.approx(96.0)
    assert report.crossing([0, 64, 128], [0.0, 0.03, 0.01], 0.02) == pytest.approx(64 * 2 / 3)
    assert report.crossing([0, 64, 128], [0.0, 0.01, 0.015], 0.02) is None


def test_curve_ratio_uses_the_mean_curve_and_resamples_seeds_in_pairs() -> None:
    rows: list[dict[str, Any]] = []
    for seed, wobble in enumerate([-0.002, 0.0, 0.002]):
        # gamma 0.9's mean curve reaches +0.01 at 32 labels, gamma 1.0's at 64: ratio 0.5
        rows += rows_for(0.9, seed, [0.0, 0.02 + wobble, 0.04 + wobble])
        rows += rows_for(1.0, seed, [0.0, 0.01 + wobble, 0.02 + wobble])
    (c,) = report.curve_ratio(rows, 0.01, 0.9, 1.0, boots=500)
    assert c["seeds"] == [0, 1, 2]
    assert c["labels_num"] == pytest.approx(32.0)
    assert c["labels_den"] == pytest.approx(64.0)
    assert (c["ratio"], c["kind"]) == (pytest.approx(0.5), "both")
    assert c["shares"] == {"both": 1.0}
    assert c["low"] < 0.5 < c["high"] < 1.0
    # the same resamples every time
    assert report.curve_ratio(rows, 0.01, 0.9, 1.0, boots=500) == [c]


def test_curve_ratio_bounds_an_unreached_denominator_and_cuts_to_shared_versions() -> None:
    rows = (
        rows_for(0.9, 0, [0.0, 0.02, 0.04, 0.06])  # a fourth point gamma 1.0 lacks: not used
        + rows_for(1.0, 0, [0.0, 0.0, 0.005])
        + rows_for(0.9, 1, [0.0, 0.02, 0.04])
        + rows_for(1.0, 1, [0.0, 0.0, 0.005])
        + rows_for(1.0, 7, [0.0, 0.05, 0.05])  # a seed gamma 0.9 never ran: not used
    )
    (c,) = report.curve_ratio(rows, 0.01, 0.9, 1.0, boots=200)
    assert c["seeds"] == [0, 1]
    assert c["budget"] == 128
    assert c["labels_den"] is None
    assert (c["ratio"], c["kind"]) == (pytest.approx(32 / 128), "den_unreached")
    assert c["shares"] == {"den_unreached": 1.0}
    line = report.curve_ratio_table(rows, 0.01, 0.9, 1.0).splitlines()[-1]
    assert "| 32 / > 128 | < 0.25 |" in line
    assert line.endswith("| den unreached 100% |")


def test_curve_ratio_table_says_unknown_when_neither_curve_gets_there() -> None:
    rows = rows_for(0.9, 0, [0.0, 0.001, 0.002]) + rows_for(1.0, 0, [0.0, 0.0, 0.003])
    line = report.curve_ratio_table(rows, 0.01, 0.9, 1.0).splitlines()[-1]
    assert "| > 128 / > 128 | unknown | [unbounded, unbounded] | neither 100% |" in line
    rows = rows_for(0.9, 0, [0.0, 0.0, 0.0]) + rows_for(1.0, 0, [0.0, 0.02, 0.03])
    line = report.curve_ratio_table(rows, 0.01, 0.9, 1.0).splitlines()[-1]
    assert "| > 128 / 32 | > 4.00 |" in line


def test_paired_gain_table_differences_seed_by_seed() -> None:
    rows = (
        rows_for(0.9, 0, [0.0, 0.03, 0.05])
        + rows_for(1.0, 0, [0.0, 0.01, 0.02])
        + rows_for(0.9, 1, [0.0, 0.01, 0.03])
        + rows_for(1.0, 1, [0.0, 0.02, 0.02])
        + rows_for(0.9, 2, [0.0, 0.04])  # seed 2 of gamma 1.0 never ran: left out
    )
    lines = report.paired_gain_table(rows, 0.9, 1.0).splitlines()
    assert len(lines) == 4  # header, rule, 64 and 128 labels
    at64 = [c.strip() for c in lines[2].strip("|").split("|")]
    assert at64[3:8] == ["64", "2", "+0.0200 ± 0.0100", "+0.0150 ± 0.0050", "+0.0050 ± 0.0150"]
    low, high = (float(x) for x in at64[8].strip("[]").split(","))
    assert (low, high) == (
        pytest.approx(0.005 - 12.706 * 0.015, abs=1e-4),
        pytest.approx(0.005 + 12.706 * 0.015, abs=1e-4),
    )
    assert at64[9] == "1/2"
    at128 = [c.strip() for c in lines[3].strip("|").split("|")]
    assert at128[7] == "+0.0200 ± 0.0100" and at128[9] == "2/2"


def test_an_option_is_compared_with_the_default_seed_by_seed_per_judge() -> None:
    """--compare pairing: rows without the axis ran the default; differences are paired by seed, with a
    hand-computed mean and t-interval, and labels-to-threshold come from the seed-averaged curves."""

    def cell(pairing: str | None, judge: str, seed: int, diffs: list[float]) -> list[dict[str, Any]]:
        rows = rows_for(0.9, seed, diffs)
        for r in rows:
            r["judge"] = judge
            if pairing is not None:
                r["pairing"] = pairing
        return rows

    rows = []
    for seed, (base, aligned) in enumerate([(0.00, 0.02), (0.01, 0.02), (0.02, 0.05)]):
        rows += cell(None, "faithfulness", seed, [0.0, base / 2, base])
        rows += cell("aligned", "faithfulness", seed, [0.0, aligned / 2, aligned])
        rows += cell("independent", "compressibility", seed, [0.0, 0.0, 0.0])  # only the default
    (found,) = report.option_comparison(rows, "pairing", "independent", boots=200)
    assert (found["judge"], found["option"], found["seeds"], found["budget"]) == (
        "faithfulness",
        "aligned",
        [0, 1, 2],
        128,
    )
    final = found["points"][-1]["train"]
    mean, se, low, high = final["difference"]
    assert mean == pytest.approx(0.02) and se == pytest.approx(0.01 / 3**0.5)
    assert (low, high) == (
        pytest.approx(0.02 - 4.303 * 0.01 / 3**0.5),
        pytest.approx(0.02 + 4.303 * 0.01 / 3**0.5),
    )
    assert final["ahead"] == 3 and final["option"][0] == pytest.approx(sum(d for d in (0.02, 0.02, 0.05)) / 3)
    # mean curves: aligned 0, 0.015, 0.03 -> +0.02 at 64 + 64 * (0.005 / 0.015); default 0, 0.005, 0.01
    reach = found["reach"][0.02]
    assert reach["labels_option"] == pytest.approx(64 + 64 / 3) and reach["labels_baseline"] is None
    assert reach["kind"] == "den_unreached" and reach["ratio"] == pytest.approx((64 + 64 / 3) / 128)
    table = report.option_tables(rows, "pairing", "independent")
    assert "| faithfulness | aligned | 3 | 43 / 128 | 0.33 [" in table and "| 85 / > 128 | < 0.67 [" in table
