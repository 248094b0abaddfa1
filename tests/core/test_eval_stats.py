"""Evaluation statistics: win rates with Wilson and prompt-bootstrap intervals, Bradley-Terry scores."""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.eval_stats import Vote, WinRate, bradley_terry, win_rate


def votes_of(outcomes: list[str], *, prompts: int, version: int = 1, baseline: int = 0) -> list[Vote]:
    """The outcomes as votes of `version` against `baseline`, dealt round-robin over `prompts` prompts."""
    return [Vote(k % prompts, version, baseline, outcome) for k, outcome in enumerate(outcomes)]


def test_wilson_interval_matches_the_formula_for_7_of_10() -> None:
    # Wilson 1927 with z = 1.959963984540054 (95%), z^2 = 3.841458820694126, p = 0.7, n = 10:
    #   centre = (p + z^2 / 2n) / (1 + z^2 / n) = 0.892072941 / 1.384145882 = 0.644493440
    #   half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)
    #          = 1.416006 * sqrt(0.021 + 0.009603647) = 0.247715293
    # (figures to 30 digits with mpmath: 0.396778147461145, 0.892208732593699).
    result = win_rate(votes_of(["win"] * 7 + ["loss"] * 3, prompts=10))
    assert (result.votes, result.wins, result.losses, result.ties, result.prompts) == (10, 7, 3, 0, 10)
    assert result.rate == pytest.approx(0.7, abs=1e-12)
    assert result.wilson is not None
    assert result.wilson[0] == pytest.approx(0.396778147461145, abs=1e-9)
    assert result.wilson[1] == pytest.approx(0.892208732593699, abs=1e-9)


def test_ties_count_half() -> None:
    # 5 wins, 3 ties, 2 losses: 6.5 successes of 10; Wilson by the same formula with p = 0.65 gives
    # [0.353670723511169, 0.863069436529964].
    result = win_rate(votes_of(["win"] * 5 + ["tie"] * 3 + ["loss"] * 2, prompts=10))
    assert (result.wins, result.ties, result.losses) == (5, 3, 2)
    assert result.rate == pytest.approx(0.65, abs=1e-12)
    assert result.wilson is not None
    assert result.wilson[0] == pytest.approx(0.353670723511169, abs=1e-9)
    assert result.wilson[1] == pytest.approx(0.863069436529964, abs=1e-9)


def test_bootstrap_contains_the_rate_and_is_deterministic_for_a_seed() -> None:
    votes = votes_of((["win"] * 3 + ["loss"] * 2) * 20, prompts=15)
    first, again, other = win_rate(votes, seed=7), win_rate(votes, seed=7), win_rate(votes, seed=8)
    assert first.bootstrap is not None and first.rate is not None
    assert first.rate == pytest.approx(0.6, abs=1e-12)
    assert first.bootstrap[0] < first.rate < first.bootstrap[1]
    assert again.bootstrap == first.bootstrap
    assert other.bootstrap != first.bootstrap
    # The vote order does not matter, only the seed.
    assert win_rate(votes[::-1], seed=7).bootstrap == first.bootstrap


def clustered(prompts: int, votes_per_prompt: int) -> list[Vote]:
    """Half the prompts favour the version 9:1, half are a coin toss 5:5 (overall 70%)."""
    votes = []
    for prompt in range(prompts):
        wins = votes_per_prompt * (9 if prompt % 2 == 0 else 5) // 10
        outcomes = ["win"] * wins + ["loss"] * (votes_per_prompt - wins)
        votes += [Vote(prompt, 1, 0, outcome) for outcome in outcomes]
    return votes


def test_bootstrap_is_wider_with_the_same_votes_on_fewer_prompts() -> None:
    few, many = win_rate(clustered(8, 50)), win_rate(clustered(40, 10))
    assert (few.votes, few.wins, few.prompts, many.votes, many.wins, many.prompts) == (
        400,
        280,
        8,
        400,
        280,
        40,
    )
    assert few.wilson == many.wilson  # Wilson sees 280 of 400 either way
    assert few.bootstrap is not None and many.bootstrap is not None and few.wilson is not None
    few_width, many_width = few.bootstrap[1] - few.bootstrap[0], many.bootstrap[1] - many.bootstrap[0]
    # Prompt means have sd 0.2: about 2 * 1.96 * 0.2 / sqrt(8) = 0.28 wide, vs 0.12 with 40 prompts.
    assert few_width > 2 * many_width
    assert 0.2 < few_width < 0.35
    # With 8 prompts the clustering dominates: the reported interval is the bootstrap's, wider than Wilson's.
    assert (few.low, few.high) == few.bootstrap
    assert few_width > few.wilson[1] - few.wilson[0]


@pytest.mark.parametrize(
    ("wins", "losses", "verdict"),
    [(80, 20, "better"), (20, 80, "worse"), (11, 9, "undecided"), (9, 11, "undecided")],
)
def test_verdict_reads_the_reported_interval_against_one_half(wins: int, losses: int, verdict: str) -> None:
    result = win_rate(votes_of(["win"] * wins + ["loss"] * losses, prompts=20))
    assert result.verdict == verdict
    assert result.low is not None and result.high is not None and result.rate is not None
    assert result.low <= result.rate <= result.high
    assert (result.low > 0.5) == (verdict == "better")
    assert (result.high < 0.5) == (verdict == "worse")


def test_reported_interval_is_the_union_and_clamped() -> None:
    result = win_rate(votes_of(["win"] * 10, prompts=5))
    assert result.rate == 1.0
    assert result.bootstrap == (1.0, 1.0)  # every resample is all wins
    assert result.wilson is not None and result.wilson[1] == 1.0
    assert result.wilson[0] == pytest.approx(
        10 / (10 + 1.959963984540054**2), abs=1e-9
    )  # p = 1: n / (n + z^2)
    assert (result.low, result.high) == (result.wilson[0], 1.0)
    assert result.verdict == "better"


def test_one_prompt_has_no_bootstrap_and_reports_wilson() -> None:
    result = win_rate(votes_of(["win"] * 6 + ["loss"] * 4, prompts=1))
    assert result.prompts == 1 and result.bootstrap is None
    assert result.wilson is not None and (result.low, result.high) == result.wilson


def test_no_votes() -> None:
    assert win_rate([]) == WinRate(0, 0, 0, 0, 0, None, None, None, None, None, "no votes")


def test_bad_input_is_refused_with_the_values_named() -> None:
    with pytest.raises(ValueError, match="'draw'"):
        Vote(1, 1, 0, "draw")
    with pytest.raises(ValueError, match=r"\[\(1, 0\), \(2, 0\)\]"):
        win_rate([Vote(1, 1, 0, "win"), Vote(1, 2, 0, "win")])
    with pytest.raises(ValueError, match="got 1.5"):
        win_rate([Vote(1, 1, 0, "win")], confidence=1.5)
    with pytest.raises(ValueError, match="got 0"):
        bradley_terry([Vote(1, 1, 0, "win")], prior=0)


TRUE_STRENGTHS = {0: 0.0, 1: 0.5, 2: 1.0, 3: -0.3}
# Connected but not complete: v3 never meets v1 or v2, and v1 meets v2 in one direction only.
COMPARISONS = [(1, 0), (2, 1), (2, 0), (3, 0)]


def simulated_votes(votes_per_comparison: int, seed: int) -> list[Vote]:
    """Bradley-Terry votes from TRUE_STRENGTHS, 10% of them ties taken symmetrically around the
    boundary so that the expected share (wins + ties/2) is still logistic(s_a - s_b)."""
    rng = np.random.default_rng(seed)
    votes = []
    for version, baseline in COMPARISONS:
        p = 1 / (1 + math.exp(TRUE_STRENGTHS[baseline] - TRUE_STRENGTHS[version]))
        for k, u in enumerate(rng.random(votes_per_comparison)):
            outcome = "win" if u < p - 0.05 else "tie" if u < p + 0.05 else "loss"
            votes.append(Vote(k % 100, version, baseline, outcome))
    return votes


def test_bradley_terry_recovers_known_strengths() -> None:
    # 2000 votes per comparison: standard errors about 0.04. Each 95% interval covers the truth with
    # probability ~0.95 (measured over 200 seeds: 0.93-0.95), so the containment check holds for
    # this fixed seed, not for every seed.
    scores = bradley_terry(simulated_votes(2000, seed=0))
    assert [s.version for s in scores] == [0, 1, 2, 3]
    assert [s.votes for s in scores] == [6000, 4000, 4000, 2000]
    for s in scores:
        truth = TRUE_STRENGTHS[s.version]
        assert s.score == pytest.approx(truth, abs=0.1), s
        assert s.low <= truth <= s.high, s
        assert s.high - s.low < 0.25, s
        assert s.win_rate_vs_anchor == pytest.approx(1 / (1 + math.exp(-s.score)), abs=1e-12)
    anchor = scores[0]
    assert (anchor.score, anchor.low, anchor.high, anchor.win_rate_vs_anchor) == (0.0, 0.0, 0.0, 0.5)
    assert bradley_terry(simulated_votes(2000, seed=0)) == scores  # deterministic by seed


def test_the_prior_is_one_virtual_tie_and_barely_moves_a_70_percent_rate() -> None:
    scores = bradley_terry(votes_of(["win"] * 140 + ["loss"] * 60, prompts=20))
    # With one virtual tie against the anchor the fit is exact: 140.5 / (140.5 + 60.5).
    assert scores[1].win_rate_vs_anchor == pytest.approx(140.5 / 201, abs=1e-9)
    assert abs(scores[1].win_rate_vs_anchor - 0.70) < 0.02
    assert scores[1].low < scores[1].score < scores[1].high


def test_a_version_that_won_every_vote_gets_a_finite_score() -> None:
    scores = bradley_terry(votes_of(["win"] * 30, prompts=10))
    # W_1 = 30 + 0.5 (the virtual tie), W_0 = 0.5, so gamma_1 / gamma_0 = 61.
    assert scores[1].score == pytest.approx(math.log(61), abs=1e-8)
    # Every resample of an unbeaten version is unbeaten too: a finite interval of no width (documented).
    assert scores[1].low == pytest.approx(scores[1].score) == pytest.approx(scores[1].high)
    lost_all = bradley_terry(votes_of(["loss"] * 30, prompts=10))
    assert lost_all[1].score == pytest.approx(-math.log(61), abs=1e-8)


def test_disconnected_versions_and_self_comparisons_are_left_out() -> None:
    votes = votes_of(["win", "loss", "win"], prompts=3)  # v1 vs v0
    votes += votes_of(["win"] * 5, prompts=3, version=5, baseline=4)  # no chain to v0
    votes += votes_of(["tie"] * 5, prompts=3, version=2, baseline=2)  # says nothing about v2
    scores = bradley_terry(votes)
    assert [(s.version, s.votes) for s in scores] == [(0, 3), (1, 3)]
    assert scores[1].score == pytest.approx(math.log(2.5 / 1.5), abs=1e-8)
    assert bradley_terry(votes_of(["win"] * 5, prompts=3, version=5, baseline=4)) == []
    assert bradley_terry([]) == []


def test_another_anchor_mirrors_the_scores() -> None:
    votes = simulated_votes(300, seed=1)
    by_zero = {s.version: s.score for s in bradley_terry(votes, anchor=0)}
    by_two = {s.version: s for s in bradley_terry(votes, anchor=2)}
    assert (by_two[2].score, by_two[2].low, by_two[2].high) == (0.0, 0.0, 0.0)
    # The prior ties move to the new anchor, so the scores shift slightly, not exactly.
    assert by_two[0].score == pytest.approx(-by_zero[2], abs=0.02)
    assert by_two[1].score == pytest.approx(by_zero[1] - by_zero[2], abs=0.02)
