"""Privacy accounting as pure functions of a DP-SGD history.

A history is a list of `(noise_multiplier, sample_rate, steps)` entries: the Poisson-
subsampled Gaussian mechanism run `steps` times. The ledger only stores it; epsilon is
always recomputed from the whole history, so it composes over every step a client ever
took. The math is Opacus' own accountants (RDP by default, PRV selectable).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Entry = tuple[float, float, int]

# Neighbouring datasets of one client: one record replaced by a null record that
# contributes nothing (a zero gradient); the client's record count n stays the same and
# is public. Under this relation the Poisson-subsampled Gaussian has the same RDP bound
# Opacus computes for add/remove (Kairouz et al. 2021; Ponomareva et al. 2023, "How to
# DP-fy ML", section 5.1), so the accounting below holds as it is.
ADJACENCY = "zero-out"


def merge_history(history: Iterable[Sequence[float]]) -> list[Entry]:
    """Normalise entries and merge neighbours with equal (noise_multiplier, sample_rate)."""
    out: list[Entry] = []
    for raw in history:
        if len(raw) != 3:
            raise ValueError(f"history entry {raw!r} must be [noise_multiplier, sample_rate, steps]")
        sigma, q, steps = float(raw[0]), float(raw[1]), int(raw[2])
        if not (sigma >= 0 and 0 < q <= 1 and steps >= 0) or steps != raw[2]:
            raise ValueError(f"history entry {raw!r} is out of range")
        if steps == 0:
            continue
        if out and out[-1][0] == sigma and out[-1][1] == q:
            out[-1] = (sigma, q, out[-1][2] + steps)
        else:
            out.append((sigma, q, steps))
    return out


def extends(history: Sequence[Entry], longer: Sequence[Entry]) -> bool:
    """True when `longer` is `history` followed by more steps: every entry of `history`
    appears unchanged and in order at the start of `longer` (its last one may have
    continued with more steps of the same noise multiplier and sample rate)."""
    a, b = merge_history(history), merge_history(longer)
    if len(a) > len(b):
        return False
    for i, (sigma, q, steps) in enumerate(a):
        s2, q2, n2 = b[i]
        if (sigma, q) != (s2, q2) or steps > n2 or (steps < n2 and i < len(a) - 1):
            return False
    return True


def total_steps(history: Iterable[Sequence[float]]) -> int:
    return sum(int(e[2]) for e in history)


def epsilon(history: Iterable[Sequence[float]], delta: float, accountant: str = "rdp") -> float:
    """epsilon at `delta` after every entry of `history` (0 for an empty one, inf if sigma=0)."""
    hist = merge_history(history)
    if not hist:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in hist):
        return math.inf
    if accountant == "rdp":
        from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
        from opacus.accountants.rdp import RDPAccountant

        orders = RDPAccountant.DEFAULT_ALPHAS
        rdp = sum(
            compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
            for sigma, q, steps in hist
        )
        eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
        return float(eps)
    if accountant == "prv":
        from opacus.accountants import PRVAccountant

        acc = PRVAccountant()
        acc.history = list(hist)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(acc.get_epsilon(delta=delta))
    raise ValueError(f"accountant={accountant!r} must be rdp or prv")


def calibrate_noise(
    *, target_epsilon: float, target_delta: float, sample_rate: float, steps: int,
    accountant: str = "rdp", prior: Sequence[Entry] = (), tolerance: float = 0.005,
) -> float:
    """Smallest noise_multiplier (within `tolerance` relative) such that `prior` followed by
    `steps` steps at `sample_rate` stays at or below `target_epsilon`."""
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target_epsilon={target_epsilon!r} must be finite and > 0 to calibrate")
    if steps < 1:
        raise ValueError(f"steps={steps!r} must be >= 1 to calibrate a noise multiplier")
    if epsilon(prior, target_delta, accountant) >= target_epsilon:
        raise ValueError(
            f"the history already spends epsilon >= target_epsilon={target_epsilon}; no noise "
            "level allows more steps"
        )

    def eps_at(sigma: float) -> float:
        return epsilon([*prior, (sigma, sample_rate, steps)], target_delta, accountant)

    lo, hi = 0.0, 1.0
    while eps_at(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError("no noise_multiplier below 1e6 reaches the target epsilon")
    while hi - lo > tolerance * hi:
        mid = (lo + hi) / 2
        if eps_at(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def poisson_plan(num_examples: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """(sample_rate, steps) for `epochs` local epochs, exactly as Opacus' DPDataLoader does:
    q = 1 / ceil(n / B), and its sampler takes int(1 / q) Poisson-sampled steps per epoch
    (one fewer than ceil(n / B) where 1 / q rounds down in floating point, e.g. n = 93,
    B = 1). B=0: full batch, q = 1, one step per epoch."""
    if num_examples < 1:
        raise ValueError("a client needs at least one example to train")
    q = 1.0 / (math.ceil(num_examples / batch_size) if batch_size > 0 else 1)
    return q, int(1 / q) * epochs


@dataclass(frozen=True, kw_only=True)
class RoundPlan:
    """What a client will spend this round, decided before it trains."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_before: float
    epsilon_after: float

    @property
    def entry(self) -> Entry:
        return (self.noise_multiplier, self.sample_rate, self.steps)


def plan_round(
    history: Sequence[Entry], *, noise_multiplier: float, sample_rate: float, steps: int,
    delta: float, accountant: str,
) -> RoundPlan:
    return RoundPlan(
        noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps,
        epsilon_before=epsilon(history, delta, accountant),
        epsilon_after=epsilon([*history, (noise_multiplier, sample_rate, steps)], delta, accountant),
    )


def planned_participations(
    *, num_rounds: int, clients_per_round: int, num_clients: int, calibrate_for: str,
    margin: float,
) -> int:
    """Rounds a client's noise is calibrated for: all of them, or its expected share x margin."""
    if calibrate_for == "run" or clients_per_round >= num_clients:
        return num_rounds
    expected = num_rounds * clients_per_round / num_clients
    return max(1, min(num_rounds, math.ceil(expected * margin)))
