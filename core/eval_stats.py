"""Statistics of human evaluation campaigns: win rates with intervals, and Bradley-Terry scores.

A campaign shows people two images for the same held-out prompt, one from the version under
evaluation (side 'a') and one from a comparison version (side 'b'), and asks which they prefer.
Pure numpy, no database and no torch (the web app imports it). This module computes:

- `win_rate`: the version's share of the votes of one comparison, a tie counting as half a win, with
  two 95% intervals. The Wilson score interval (E. B. Wilson 1927, "Probable inference, the law of
  succession, and statistical inference", J. Amer. Statist. Assoc. 22(158), 209-212) treats votes as
  independent. A percentile bootstrap that resamples prompts (each prompt with all its votes: a cluster
  bootstrap) allows for votes on the same prompt agreeing more than chance, as some prompts favour one
  version. The reported interval is the union of the two, and the verdict reads it against 50%.
- `bradley_terry`: one log-strength per version from all campaigns together, relative to an anchor
  version (the base), fitted by the MM algorithm of D. R. Hunter 2004 ("MM algorithms for generalized
  Bradley-Terry models", Ann. Statist. 32(1), 384-406, eq. 3), with percentile bootstrap intervals
  over votes.

Ours, not the papers': ties as half a win to each side (in the rate and in the Bradley-Terry
likelihood) rather than a tie model such as Rao-Kupper's or Davidson's; Wilson's formula applied to
the non-integer success count wins + ties/2; the union of the two intervals as the reported one; and
the regulariser: `prior` virtual ties of every scored version against the anchor, so that a version
that won (or lost) every vote still gets a finite score. Its pull is that of `prior` extra votes at
50%: with the default of one, 200 votes at 70% against the anchor fit to 140.5 / 201 = 0.699.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

# The version's share of one vote, by outcome: a tie is half a win to each side.
OUTCOMES = {"win": 1.0, "loss": 0.0, "tie": 0.5}
# The win rate a version must beat (and the bar the dashboard draws): no preference either way.
NO_PREFERENCE = 0.5
# Bradley-Terry scores carry 95% intervals.
SCORE_CONFIDENCE = 0.95
# MM stops when no log-strength moved more than this in one iteration, or fails after MAX_ITER.
TOLERANCE = 1e-10
MAX_ITER = 100_000


@dataclass(frozen=True)
class Vote:
    """One person's judgement of one evaluation pair."""

    prompt_id: int
    version: int  # the version under evaluation (side 'a' of the pair)
    baseline: int  # the comparison version (side 'b')
    outcome: str  # 'win' (version preferred), 'loss' (baseline preferred) or 'tie'

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"vote outcome {self.outcome!r} is not one of 'win', 'loss', 'tie'")


@dataclass(frozen=True)
class WinRate:
    """A version's win rate against one comparison version, with its intervals."""

    votes: int
    wins: int
    losses: int
    ties: int
    prompts: int  # distinct prompts with votes
    rate: float | None  # (wins + ties/2) / votes; None with no votes
    wilson: tuple[float, float] | None  # Wilson score interval on rate, votes treated as independent
    bootstrap: tuple[float, float] | None  # percentile interval resampling prompts; None with < 2 prompts
    low: float | None  # the reported interval: the union (wider) of the two, conservative
    high: float | None
    verdict: str  # 'better' (low > 0.5), 'worse' (high < 0.5), 'undecided' or 'no votes'


@dataclass(frozen=True)
class Score:
    """A version's Bradley-Terry score relative to the anchor version."""

    version: int
    score: float  # log-strength relative to the anchor (anchor = 0.0)
    low: float  # 95% bootstrap interval on score (anchor: 0, 0)
    high: float
    votes: int  # votes involving this version
    win_rate_vs_anchor: float  # logistic(score): the modelled chance it beats the anchor


def figures(result: WinRate) -> str | None:
    """The result in words for logs and pages ("62% of 40 votes, 95% interval 47% to 75%"); None
    with no votes."""
    if result.rate is None or result.low is None or result.high is None:
        return None
    return f"{result.rate:.0%} of {result.votes} votes, 95% interval {result.low:.0%} to {result.high:.0%}"


def win_rate(
    votes: Sequence[Vote], *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> WinRate:
    """The win rate of the votes' version against their baseline, ties counted half.

    All votes must share one (version, baseline): a campaign's. The bootstrap is deterministic given
    `seed`; both intervals are clamped to [0, 1].
    """
    _check_resampling(confidence, resamples)
    comparisons = sorted({(vote.version, vote.baseline) for vote in votes})
    if len(comparisons) > 1:
        raise ValueError(
            f"win_rate takes the votes of one (version, baseline) comparison, got {comparisons}: "
            "split the votes by comparison first"
        )
    wins = sum(vote.outcome == "win" for vote in votes)
    losses = sum(vote.outcome == "loss" for vote in votes)
    ties = len(votes) - wins - losses
    prompts = len({vote.prompt_id for vote in votes})
    if not votes:
        return WinRate(0, 0, 0, 0, 0, None, None, None, None, None, "no votes")
    successes = wins + ties / 2
    rate = successes / len(votes)
    wilson = _wilson(successes, len(votes), confidence)
    bootstrap = _prompt_bootstrap(votes, confidence, resamples, seed) if prompts >= 2 else None
    low, high = wilson if bootstrap is None else (min(wilson[0], bootstrap[0]), max(wilson[1], bootstrap[1]))
    verdict = "better" if low > NO_PREFERENCE else "worse" if high < NO_PREFERENCE else "undecided"
    return WinRate(len(votes), wins, losses, ties, prompts, rate, wilson, bootstrap, low, high, verdict)


def _check_resampling(confidence: float, resamples: int) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")


def _wilson(successes: float, n: int, confidence: float) -> tuple[float, float]:
    """Wilson's score interval: the p with |p_hat - p| <= z sqrt(p (1 - p) / n)."""
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p_hat = successes / n
    centre = (p_hat + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p_hat * (1 - p_hat) / n + z * z / (4 * n * n))
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


def _prompt_bootstrap(
    votes: Sequence[Vote], confidence: float, resamples: int, seed: int
) -> tuple[float, float]:
    """Percentile interval of the win rate over resamples of prompts, each with all its votes."""
    # Prompts in sorted order, so that the interval does not depend on the order of the votes.
    column = {prompt: k for k, prompt in enumerate(sorted({vote.prompt_id for vote in votes}))}
    successes = np.zeros(len(column))  # (prompts,) wins + ties/2 per prompt
    counts = np.zeros(len(column))  # (prompts,) votes per prompt, each at least 1
    for vote in votes:
        successes[column[vote.prompt_id]] += OUTCOMES[vote.outcome]
        counts[column[vote.prompt_id]] += 1
    draws = np.random.default_rng(seed).integers(0, len(column), size=(resamples, len(column)))
    rates = successes[draws].sum(axis=1) / counts[draws].sum(axis=1)  # (resamples,)
    tail = (1 - confidence) / 2
    low, high = np.quantile(rates, [tail, 1 - tail])
    return max(0.0, float(low)), min(1.0, float(high))


def bradley_terry(
    votes: Sequence[Vote], *, anchor: int = 0, resamples: int = 200, seed: int = 0, prior: float = 1.0
) -> list[Score]:
    """Bradley-Terry scores of every version connected to `anchor` through votes, sorted by version.

    Versions with no chain of votes to the anchor are left out, and so are votes of a version against
    itself (they say nothing about strength); with no votes involving the anchor the list is empty.
    `prior` (> 0) virtual ties of each scored version against the anchor keep every score finite.
    The intervals resample votes with replacement (deterministic given `seed`), the prior kept fixed;
    so a version that won every one of its votes wins every resample too, and its interval has no
    width: read its `votes`, or its campaign's `win_rate`, before its interval.
    """
    if prior <= 0:
        raise ValueError(
            f"prior must be > 0 so that a version that won every vote gets a finite score, got {prior}"
        )
    _check_resampling(SCORE_CONFIDENCE, resamples)
    votes = [vote for vote in votes if vote.version != vote.baseline]
    versions = _connected(votes, anchor)
    if not versions:
        return []
    column = {version: k for k, version in enumerate(versions)}
    # A vote with one side connected has both, so this keeps the votes among scored versions.
    votes = [vote for vote in votes if vote.version in column]
    table = np.array([(column[v.version], column[v.baseline], OUTCOMES[v.outcome]) for v in votes])
    wins, involved = _win_matrices(table, len(versions), resamples, seed)
    theta = _fit_mm(wins, column[anchor], prior)  # (1 + resamples, versions)
    tail = (1 - SCORE_CONFIDENCE) / 2
    low, high = np.quantile(theta[1:], [tail, 1 - tail], axis=0)  # (versions,) each
    return [
        Score(
            version=version,
            score=float(theta[0, k]),
            low=float(low[k]),
            high=float(high[k]),
            votes=int(involved[k]),
            win_rate_vs_anchor=float(1 / (1 + np.exp(-theta[0, k]))),
        )
        for k, version in enumerate(versions)
    ]


def _win_matrices(table: np.ndarray, size: int, resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Win matrices of the votes and of `resamples` resamples of them, and the votes per version.

    `table` holds one row (a, b, share) per vote, a and b version columns. Votes are grouped by row,
    so that a resample of votes with replacement is one multinomial draw over the groups.
    """
    groups, sizes = np.unique(table, axis=0, return_counts=True)  # (groups, 3), (groups,)
    a, b, share = groups[:, 0].astype(int), groups[:, 1].astype(int), groups[:, 2]
    draws = np.random.default_rng(seed).multinomial(len(table), sizes / len(table), size=resamples)
    weights = np.vstack([sizes, draws]).astype(float)  # (1 + resamples, groups): the data, then resamples
    index = np.arange(len(groups))
    lands = np.zeros((len(groups), size * size))  # (groups, versions^2): where a group's wins land
    lands[index, a * size + b], lands[index, b * size + a] = share, 1 - share  # a != b: no overlap
    wins = (weights @ lands).reshape(-1, size, size)  # (1 + resamples, versions, versions)
    return wins, np.bincount(a, sizes, size) + np.bincount(b, sizes, size)


def _connected(votes: Sequence[Vote], anchor: int) -> list[int]:
    """The versions reachable from the anchor through votes, anchor included; [] if it has none."""
    neighbours: dict[int, set[int]] = {}
    for vote in votes:
        neighbours.setdefault(vote.version, set()).add(vote.baseline)
        neighbours.setdefault(vote.baseline, set()).add(vote.version)
    if anchor not in neighbours:
        return []
    seen, frontier = {anchor}, [anchor]
    while frontier:
        fresh = neighbours[frontier.pop()] - seen
        seen |= fresh
        frontier.extend(fresh)
    return sorted(seen)


def _fit_mm(wins: np.ndarray, anchor: int, prior: float) -> np.ndarray:
    """Log-strengths maximising the Bradley-Terry likelihood, by Hunter's MM, for a batch of data sets.

    Notation (Hunter 2004, section 3): `wins[f, i, j]` -> w_ij, the times i beat j (ties half to
    each); `n` -> N_ij = w_ij + w_ji; `strength` -> gamma_i; `total` -> W_i = sum_j w_ij. The update
    gamma_i <- W_i / sum_j N_ij / (gamma_i + gamma_j) never lowers the likelihood; rescaling so that
    gamma_anchor = 1 fixes the scale the likelihood leaves free.
    """
    wins = wins.copy()  # (fits, versions, versions)
    others = np.arange(wins.shape[1]) != anchor
    # 1. The prior: virtual ties with the anchor, which also keep every version's W_i above zero.
    wins[:, others, anchor] += prior / 2
    wins[:, anchor, others] += prior / 2
    n = wins + wins.transpose(0, 2, 1)
    total = wins.sum(axis=2)  # (fits, versions)
    strength = np.ones(total.shape)
    for _ in range(MAX_ITER):
        # 2. The MM step, all versions at once, then the anchor back to 1.
        updated = total / (n / (strength[:, :, None] + strength[:, None, :])).sum(axis=2)
        updated /= updated[:, anchor, None]
        step = np.max(np.abs(np.log(updated) - np.log(strength)))
        strength = updated
        if step < TOLERANCE:
            return np.log(strength)
    raise ArithmeticError(
        f"Bradley-Terry MM did not converge in {MAX_ITER} iterations (last step {step:.2e}); "
        "a larger prior steadies it"
    )
