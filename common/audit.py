"""Empirical privacy audit in one run: canaries and the epsilon lower bound (pure math).

Steinke, Nasr & Jagielski 2023 ("Privacy auditing with one (1) training run"): m canary
records, each included in training independently with probability 1/2; after one run
the auditor scores every canary, guesses "in" for the r/2 highest scores and "out" for
the r/2 lowest, abstains on the rest, and counts the correct guesses v. If the run is
(eps, delta)-DP with respect to each canary, v is stochastically dominated as their
Theorem (with delta) states, so a v too large for (eps, delta) at significance 0.05
refutes eps: `epsilon_lower_bound` is the largest eps refuted.

The canaries (`Canaries`): out-of-distribution inputs (i.i.d. standard normal values in
the model's input shape; dpfl's inputs are normalised) with a uniformly random label,
canary i placed in partition i mod P. A client's dataset holds a slot for every canary
of its partition: the canary when it is included, otherwise a null record (all inputs
NaN, which the trainer treats as a record that contributes nothing: the zero-out
neighbour of dpfl's guarantee). So the record count, which the client declares, does not
depend on membership. The design (inputs, labels, placement) derives from the run seed;
membership from a separate stream of it, read by the auditor only to count correct
guesses at the end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NUM_CLASSES = 10
SIGNIFICANCE = 0.05  # 95% confidence
_DESIGN, _MEMBERSHIP = 0xA0D17, 0x1A5D17


@dataclass(frozen=True)
class Canaries:
    """m canaries for a federation of `partitions` clients, from `seed`."""

    count: int
    partitions: int
    shape: tuple[int, ...]
    seed: int
    classes: int = NUM_CLASSES

    def __post_init__(self) -> None:
        if self.count < 0 or self.partitions < 1 or self.classes < 2:
            raise ValueError(f"bad canaries {self}")

    def inputs(self, ids: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """float32 inputs of canaries `ids` (all by default), count x shape."""
        ids = np.arange(self.count) if ids is None else np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), *self.shape), dtype=np.float32)
        for k, i in enumerate(ids):
            rng = np.random.default_rng([self.seed, _DESIGN, int(i)])
            out[k] = rng.standard_normal(self.shape, dtype=np.float32)
        return out

    def labels(self, ids: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        rng = np.random.default_rng([self.seed, _DESIGN])
        every = rng.integers(0, self.classes, size=self.count).astype(np.int64)
        return every if ids is None else every[np.asarray(ids, dtype=np.int64)]

    def partition(self) -> np.ndarray:
        """The partition each canary's slot is in."""
        return np.arange(self.count) % self.partitions

    def of_partition(self, partition_id: int) -> np.ndarray:
        """The canaries whose slots partition `partition_id` holds."""
        if not 0 <= partition_id < self.partitions:
            return np.zeros(0, dtype=np.int64)
        return np.arange(partition_id, self.count, self.partitions)

    def membership(self) -> np.ndarray:
        """Which canaries are in training (bool, each with probability 1/2)."""
        rng = np.random.default_rng([self.seed, _MEMBERSHIP])
        return rng.random(self.count) < 0.5

    def slots(self, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, labels) partition `partition_id` adds to its data: each of its canaries
        if included, else a null record (NaN inputs, contributes nothing)."""
        ids = self.of_partition(partition_id)
        x, y = self.inputs(ids), self.labels(ids)
        x[~self.membership()[ids]] = np.nan
        return x, y


def slot_count(count: int, partitions: int, partition_id: int) -> int:
    """How many canary slots partition `partition_id` holds (public: it is in n)."""
    if count <= 0 or not 0 <= partition_id < partitions:
        return 0
    return len(range(partition_id, count, partitions))


# ---- the bound -------------------------------------------------------------------------


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[>= v correct of r guesses] under (epsilon, delta)-DP with m canaries (Steinke et
    al. 2023, Theorem with delta): P[Bin(r, q) >= v] + 2 m delta max_i (P[Bin(r, q) >=
    v - i] - P[Bin(r, q) >= v]) / i, q = e^eps / (1 + e^eps)."""
    from scipy import stats  # here: a client imports this module, and needs none of SciPy

    if not (0 <= v <= r <= m and epsilon >= 0 and 0 <= delta <= 1):
        raise ValueError(f"p_value(m={m}, r={r}, v={v}, epsilon={epsilon}, delta={delta})")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(stats.binom.sf(v - 1, r, q))
    if delta == 0 or v == 0:
        return beta
    i = np.arange(1, v + 1)
    alpha = float(np.max((stats.binom.sf(v - i - 1, r, q) - beta) / i))
    return min(beta + 2 * m * delta * alpha, 1.0)


def refuted_epsilon(m: int, r: int, v: int, delta: float, significance: float) -> float:
    """The largest epsilon whose (epsilon, delta) claim v correct of r refutes at this
    significance (0 when none)."""
    from scipy import optimize

    if r == 0 or p_value(m, r, v, 0.0, delta) > significance:
        return 0.0
    hi = 1.0
    while p_value(m, r, v, hi, delta) <= significance:
        hi *= 2
        if hi > 1e3:
            return math.inf
    return float(optimize.brentq(lambda e: p_value(m, r, v, e, delta) - significance, 0.0, hi,
                                 xtol=1e-6))


def guess_counts(m: int) -> list[int]:
    """The numbers of guesses tried (fixed before looking at scores; a Bonferroni
    correction pays for trying several)."""
    counts = [r for r in (10, 20, 50, 100, 200, 500, 1000, 2000, 5000) if r <= m]
    return counts or ([m - m % 2] if m >= 2 else [])


def epsilon_lower_bound(scores: np.ndarray, member: np.ndarray, delta: float,
                        significance: float = SIGNIFICANCE) -> dict:
    """The one-run bound: for each r in `guess_counts`, guess "in" for the r/2 highest
    scores and "out" for the r/2 lowest; the best refuted epsilon at significance /
    len(counts). Returns epsilon_lower_bound, guesses, correct."""
    scores, member = np.asarray(scores, dtype=np.float64), np.asarray(member, dtype=bool)
    if scores.shape != member.shape or scores.ndim != 1:
        raise ValueError("scores and membership must be two vectors of the same length")
    m = len(scores)
    if not np.isfinite(scores).all():
        raise ValueError("canary scores must be finite")
    counts = guess_counts(m)
    order = np.argsort(scores, kind="stable")
    best = {"epsilon_lower_bound": 0.0, "guesses": 0, "correct": 0}
    for r in counts:
        low, high = order[: r // 2], order[m - (r - r // 2):]
        v = int((~member[low]).sum() + member[high].sum())
        eps = refuted_epsilon(m, r, v, delta, significance / len(counts))
        if eps > best["epsilon_lower_bound"] or best["guesses"] == 0:
            best = {"epsilon_lower_bound": eps, "guesses": r, "correct": v}
    return best


def auc(scores: np.ndarray, member: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for membership (ties count one half)."""
    from scipy import stats

    scores, member = np.asarray(scores, dtype=np.float64), np.asarray(member, dtype=bool)
    pos, neg = int(member.sum()), int((~member).sum())
    if not pos or not neg:
        return math.nan
    ranks = stats.rankdata(scores)
    return float((ranks[member].sum() - pos * (pos + 1) / 2) / (pos * neg))


def tpr_at_fpr(scores: np.ndarray, member: np.ndarray, fpr: float = 0.01) -> float:
    """The true-positive rate of the threshold that lets at most `fpr` of non-members in."""
    scores, member = np.asarray(scores, dtype=np.float64), np.asarray(member, dtype=bool)
    out = np.sort(scores[~member])[::-1]
    if not len(out) or not member.any():
        return math.nan
    allowed = int(math.floor(fpr * len(out)))
    threshold = out[allowed] if allowed < len(out) else -math.inf  # strictly above it
    return float((scores[member] > threshold).mean())


def summarize(scores: np.ndarray, member: np.ndarray, delta: float) -> dict:
    """The audit's figures for one score vector."""
    return {**epsilon_lower_bound(scores, member, delta), "auc": auc(scores, member),
            "tpr_at_1pct_fpr": tpr_at_fpr(scores, member, 0.01)}
