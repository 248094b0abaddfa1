"""The labeller-ability model recovers known accuracies from synthetic votes, uses gold answers, and
turns a pair's votes into a winner and a loss weight as computed by hand."""

from __future__ import annotations

import math
import random

import pytest

from core.reliability import Vote, fit_abilities, pair_weight, wilson


def synthetic_votes(
    accuracies: list[float], pairs: int, per_pair: int, seed: int
) -> tuple[list[Vote], dict[int, str]]:
    rng = random.Random(seed)
    truth = {p: rng.choice("ab") for p in range(pairs)}
    votes = []
    for p, better in truth.items():
        for j in rng.sample(range(len(accuracies)), per_pair):
            right = rng.random() < accuracies[j]
            votes.append(Vote(p, j, better if right else ("b" if better == "a" else "a")))
    return votes, truth


def test_abilities_are_recovered_from_overlapped_votes() -> None:
    accuracies = [0.95, 0.9, 0.8, 0.7, 0.6, 0.5]
    votes, truth = synthetic_votes(accuracies, pairs=600, per_pair=3, seed=1)
    fit = fit_abilities(votes)
    for j, true in enumerate(accuracies):
        got = fit.abilities[j]
        assert abs(got.accuracy - true) < 0.06, (j, got, true)
        assert got.votes == sum(v.labeller_id == j for v in votes)
    # the intervals ignore the uncertainty in the others' abilities (see the module), so they are a
    # little narrow: most, not all, cover the truth
    covered = sum(fit.abilities[j].low < true < fit.abilities[j].high for j, true in enumerate(accuracies))
    assert covered >= 5
    # weighing voters by ability names the true side more often than a plain majority of the 3 votes
    right = sum((fit.posterior[p] > 0.5) == (truth[p] == "a") for p in truth)
    majority = sum(
        (sum(v.side == "a" for v in votes if v.pair_id == p) >= 2) == (truth[p] == "a") for p in truth
    )
    assert right > majority, (right, majority)
    # the ordering of the labellers is recovered exactly
    ranked = sorted(fit.abilities, key=lambda j: -fit.abilities[j].accuracy)
    assert ranked == list(range(len(accuracies)))


def test_gold_answers_fix_the_truth_and_inform_a_lone_labeller() -> None:
    # labeller 7 only ever votes alone, on gold pairs: 8 right of 10
    votes = [Vote(p, 7, "a" if p < 8 else "b") for p in range(10)]
    gold = {p: "a" for p in range(10)}
    fit = fit_abilities(votes, gold)
    ability = fit.abilities[7]
    # posterior mode under Beta(2, 1): (8 + 1) / (10 + 1)
    assert ability.accuracy == pytest.approx(9 / 11)
    assert (ability.votes, ability.gold_votes) == (10, 10)
    assert (ability.low, ability.high) == pytest.approx(wilson(8, 10))
    assert all(fit.posterior[p] == 1.0 for p in gold)
    # a labeller who only ever votes alone, without gold, has no informative votes: the prior's mode
    lone = fit_abilities([Vote(100 + p, 3, "a") for p in range(20)])
    assert lone.abilities[3].votes == 0 and lone.accuracy(3) == pytest.approx(1.0 - 0.01)
    assert lone.accuracy(99) == lone.accuracy(3)


def test_a_pairs_weight_is_hand_computed() -> None:
    # two labellers of known ability (from gold) disagree on pair 50
    votes = [Vote(p, 0, "a") for p in range(9)] + [Vote(9, 0, "b")]  # 9 of 10 right
    votes += [Vote(10 + p, 1, "a" if p < 6 else "b") for p in range(10)]  # 6 of 10 right
    gold = {p: "a" for p in range(20)}
    votes += [Vote(50, 0, "b"), Vote(50, 1, "a")]
    fit = fit_abilities(votes, gold)
    p0 = fit.abilities[0].accuracy
    p1 = fit.abilities[1].accuracy
    # pair 50 informs both abilities too: recompute the fixed point's q from the fitted abilities
    log_odds = math.log(p1 / (1 - p1)) - math.log(p0 / (1 - p0))
    q = 1 / (1 + math.exp(-log_odds))
    assert fit.posterior[50] == pytest.approx(q, rel=1e-6)
    side, weight = pair_weight(fit.posterior[50])
    assert side == "b" and weight == pytest.approx(1 - 2 * q)
    assert p0 > 0.8 and 0.55 < p1 < 0.7
    assert pair_weight(0.5) == ("a", 0.0) and pair_weight(1.0) == ("a", 1.0) and pair_weight(0.1)[0] == "b"


def test_bad_votes_are_refused_with_the_value() -> None:
    with pytest.raises(ValueError, match="'tie' on pair 3"):
        fit_abilities([Vote(3, 1, "tie")])
    with pytest.raises(ValueError, match="gold answer 'c' of pair 4"):
        fit_abilities([], {4: "c"})
