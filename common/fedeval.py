"""Federated evaluation under DP: pure math (no torch, no Flower, no I/O).

A node evaluates the global model on records it holds out from training (node config
`eval-holdout`, its own choice) and releases two sums over them, each record
contributing a value in [0, 1] to each: whether the model classifies it correctly, and
its cross-entropy loss clipped to [0, eval-loss-bound] and divided by the bound (a
record whose logits are not finite counts as wrong with the bound's loss). Its count of
held-out records is released exactly: under zero-out adjacency (common/privacy.py) the
number of records is public, and a null record adds 0 to both sums. So one record moves
the pair of sums by at most sqrt(2) in L2 (`SENSITIVITY`), and the release with Gaussian
noise of standard deviation z * sqrt(2) on each sum is the Gaussian mechanism with noise
multiplier z: in the ledger it is the entry (z, 1, 1), a full-batch DP-SGD step's RDP,
composed with every other release of the node.

The noise multiplier z follows from the run config alone: the evaluations a node plans
for (`EvaluationConfig.planned`), by themselves, reach `eval-budget-share` of
target-epsilon; its training noise is then calibrated with those evaluations counted
as already spent (`planned_entries`), so training and evaluation together fit the
budget. The guard of the ledger still checks every release against the budget.

The server adds the nodes' noisy sums (`combine`): accuracy = sum of correct / sum of
records, and an interval that holds both the noise (known variance) and the sampling of
the evaluated records from the population (binomial).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from common import privacy
from common.config import EvaluationConfig, PrivacyConfig

SENSITIVITY = math.sqrt(2.0)  # one record's (correct, clipped loss / bound), each in [0, 1]
Z_95 = 1.959963984540054  # two-sided 95% normal quantile
HOLDOUT_SEED = 0x5EED_E7A1  # the held-out positions: fixed, never data-dependent


def holdout_count(n: int, fraction: float) -> int:
    """Records of `n` held out for evaluation: round(fraction n), at least 1 and leaving at
    least 1 to train when fraction > 0."""
    if fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, round(fraction * n)))


def holdout_split(n: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(training positions, held-out positions) of a node's `n` records, both sorted: a
    fixed permutation's last holdout_count(n, fraction) positions are held out (the same
    every run and message; independent of the records' values)."""
    k = holdout_count(n, fraction)
    order = np.random.default_rng(HOLDOUT_SEED).permutation(n)
    return np.sort(order[: n - k]), np.sort(order[n - k:])


def noise_multiplier(priv: PrivacyConfig, ev: EvaluationConfig, planned: int) -> float:
    """z of each evaluation release: `planned` releases alone spend eval-budget-share of
    target-epsilon (a fixed noise-multiplier run without a finite target: that
    multiplier). 0 for a run without DP."""
    if not priv.private:
        return 0.0
    if not math.isfinite(priv.target_epsilon):
        return priv.noise_multiplier
    return privacy.calibrate_noise(
        target_epsilon=ev.eval_budget_share * priv.target_epsilon,
        target_delta=priv.target_delta, sample_rate=1.0, steps=max(planned, 1),
        accountant=priv.accountant)


def entry(z: float) -> privacy.Entry:
    """One evaluation release in the ledger: the Gaussian mechanism at noise multiplier z."""
    return (z, 1.0, 1)


def planned_entries(priv: PrivacyConfig, ev: EvaluationConfig, planned: int) -> list:
    """The evaluations a node plans for, as ledger entries (for calibrating its training
    noise with them counted as spent); none when the run evaluates at the server."""
    if not ev.federated or planned < 1 or not priv.private:
        return []
    return [(noise_multiplier(priv, ev, planned), 1.0, planned)]


@dataclass(frozen=True)
class Sums:
    """What one node releases: noisy sums over its held-out records, their exact count,
    and the noise's standard deviation on each sum (in its own units)."""

    correct: float
    loss: float  # the sum of clipped losses (scaled back by the bound)
    examples: int
    correct_std: float
    loss_std: float


def record_values(correct: np.ndarray, losses: np.ndarray, loss_bound: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Each record's (correct, clipped loss / bound) in [0, 1]: a non-finite loss counts
    as the bound, and such a record as wrong."""
    losses = np.asarray(losses, dtype=np.float64)
    finite = np.isfinite(losses)
    right = np.where(finite, np.asarray(correct, dtype=np.float64), 0.0)
    scaled = np.where(finite, np.clip(losses, 0.0, loss_bound) / loss_bound, 1.0)
    return np.clip(right, 0.0, 1.0), scaled


def release(correct: np.ndarray, losses: np.ndarray, *, z: float, loss_bound: float,
            rng: np.random.Generator) -> Sums:
    """The noisy sums of one node's per-record `correct` (0/1) and `losses`."""
    right, scaled = record_values(correct, losses, loss_bound)
    std = z * SENSITIVITY
    noise = rng.normal(0.0, std, 2) if std > 0 else np.zeros(2)
    return Sums(correct=float(right.sum() + noise[0]),
                loss=float((scaled.sum() + noise[1]) * loss_bound),
                examples=int(len(right)), correct_std=std, loss_std=std * loss_bound)


@dataclass(frozen=True)
class Evaluation:
    """The federation's evaluation of one model: noisy accuracy and loss with a 95%
    interval for the accuracy (noise and sampling of the evaluated records)."""

    accuracy: float
    accuracy_interval: float  # half-width
    loss: float
    examples: int
    nodes: int


def combine(parts: Iterable[Sums]) -> Evaluation | None:
    """The nodes' releases summed; None when no node released anything."""
    parts = list(parts)
    n = sum(p.examples for p in parts)
    if not parts or n <= 0:
        return None
    acc = sum(p.correct for p in parts) / n
    noise_var = sum(p.correct_std ** 2 for p in parts) / n ** 2
    p = min(max(acc, 0.0), 1.0)
    sampling_var = p * (1 - p) / n
    return Evaluation(accuracy=acc, accuracy_interval=Z_95 * math.sqrt(noise_var + sampling_var),
                      loss=sum(q.loss for q in parts) / n, examples=n, nodes=len(parts))


def check_sums(values: Sequence[float]) -> str | None:
    """Why a node's reported (correct, loss, examples, correct_std, loss_std) is unusable,
    or None."""
    correct, loss, examples, cstd, lstd = values
    if not all(math.isfinite(v) for v in values):
        return "evaluation sums must be finite"
    if examples < 1 or not float(examples).is_integer():
        return f"eval-examples={examples!r} must be an integer >= 1"
    if cstd < 0 or lstd < 0:
        return "evaluation noise must be >= 0"
    return None
