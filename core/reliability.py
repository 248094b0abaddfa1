"""How reliable each labeller is: a one-coin Dawid-Skene model of a/b votes, fitted by EM.

Model (Dawid and Skene, Applied Statistics 1979, in its "one-coin" form): each pair has a true better
side y in {a, b}, a priori even; labeller j names it with probability p_j (their ability) and the
other side otherwise, independently across votes. EM alternates the posterior q_i = P(y_i = a | votes)
of every pair and the abilities p_j = (expected correct votes + A - 1) / (votes + A + B - 2), the
posterior mode under a Beta(A, B) prior; A = 2, B = 1 says "better than chance until shown otherwise",
which also breaks the model's mirror symmetry (everyone wrong on every pair fits the votes as well).

Which votes inform an ability: votes on pairs that at least two labellers decided (a or b) and votes on
gold pairs (a known answer, marked by an admin). A pair only one person decided says nothing about
that person: the model would simply agree with them. Ties and skips are not votes here.

The interval is a 95% Wilson score interval on (expected correct, informative votes): it reflects how
many votes a labeller has, not the uncertainty in everyone else's abilities, so it is somewhat narrow
when few labellers overlap.

`pair_weight` turns a pair's posterior into what a round trains on: the more likely side, weighted by
how sure the votes make it (|2q - 1|: 1 for a certain pair, 0 for a coin flip).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

PRIOR_A = 2.0
PRIOR_B = 1.0
# Abilities are kept inside (FLOOR, 1 - FLOOR), so one labeller's vote never makes a pair certain.
FLOOR = 0.01
Z95 = 1.959963984540054


@dataclass(frozen=True)
class Vote:
    pair_id: int
    labeller_id: int
    side: str  # 'a' or 'b'


@dataclass(frozen=True)
class Ability:
    labeller_id: int
    accuracy: float  # P(their vote names the better side)
    low: float  # 95% interval
    high: float
    votes: int  # informative votes (overlapped or gold pairs)
    gold_votes: int


@dataclass(frozen=True)
class ReliabilityFit:
    abilities: dict[int, Ability]  # labellers with at least one vote
    posterior: dict[int, float]  # pair id -> P(side a is the better one), every voted pair
    iterations: int

    def accuracy(self, labeller_id: int) -> float:
        """The labeller's ability, or the prior's mode for someone without informative votes."""
        ability = self.abilities.get(labeller_id)
        return ability.accuracy if ability is not None else _mode(0.0, 0)


def _mode(correct: float, n: int) -> float:
    value = (correct + PRIOR_A - 1.0) / (n + PRIOR_A + PRIOR_B - 2.0) if n + PRIOR_A + PRIOR_B > 2 else 0.5
    return min(max(value, FLOOR), 1.0 - FLOOR)


def wilson(successes: float, n: int) -> tuple[float, float]:
    """95% Wilson score interval for a proportion; (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def fit_abilities(
    votes: Iterable[Vote],
    gold: Mapping[int, str] | None = None,
    *,
    max_iterations: int = 200,
    tolerance: float = 1e-7,
) -> ReliabilityFit:
    """Fit the one-coin model to a/b `votes`; `gold` maps pair ids to their known better side."""
    gold = dict(gold or {})
    for pair_id, side in gold.items():
        if side not in ("a", "b"):
            raise ValueError(f"gold answer {side!r} of pair {pair_id} must be 'a' or 'b'")
    by_pair: dict[int, list[tuple[int, int]]] = defaultdict(list)  # pair -> [(labeller, +1 a / -1 b)]
    for vote in votes:
        if vote.side not in ("a", "b"):
            raise ValueError(f"vote {vote.side!r} on pair {vote.pair_id} is not 'a' or 'b'")
        by_pair[vote.pair_id].append((vote.labeller_id, 1 if vote.side == "a" else -1))
    informative = {p for p, vs in by_pair.items() if p in gold or len({j for j, _ in vs}) >= 2}
    labellers = {j for vs in by_pair.values() for j, _ in vs}

    # start from the vote share (the majority), gold pairs at their answer
    q = {p: (sum(s > 0 for _, s in vs) / len(vs)) for p, vs in by_pair.items()}
    q.update({p: 1.0 if gold[p] == "a" else 0.0 for p in by_pair if p in gold})
    ability = {j: _mode(0.0, 0) for j in labellers}
    correct: dict[int, float] = defaultdict(float)
    count: dict[int, int] = defaultdict(int)
    iterations = 0
    for iterations in range(1, max_iterations + 1):  # noqa: B007 (reported)
        correct = defaultdict(float)
        count = defaultdict(int)
        for p in informative:
            for j, s in by_pair[p]:
                correct[j] += q[p] if s > 0 else 1.0 - q[p]
                count[j] += 1
        new_ability = {j: _mode(correct[j], count[j]) for j in labellers}
        change = max((abs(new_ability[j] - ability[j]) for j in labellers), default=0.0)
        ability = new_ability
        for p, vs in by_pair.items():
            if p not in gold:
                q[p] = _sigmoid(sum(s * _logit(ability[j]) for j, s in vs))
        if change < tolerance:
            break
    gold_votes: dict[int, int] = defaultdict(int)
    for p in gold:
        for j, _ in by_pair.get(p, []):
            gold_votes[j] += 1
    abilities = {}
    for j in sorted(labellers):
        n = count.get(j, 0)
        low, high = wilson(correct.get(j, 0.0), n)
        abilities[j] = Ability(j, ability[j], low, high, n, gold_votes[j])
    return ReliabilityFit(abilities=abilities, posterior=q, iterations=iterations)


def pair_weight(q: float) -> tuple[str, float]:
    """The side a round trains on as the winner, and the pair's loss weight |2q - 1|, from P(a better)."""
    return ("a" if q >= 0.5 else "b"), abs(2.0 * q - 1.0)
