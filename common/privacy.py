"""Privacy accounting as pure functions of a DP-SGD history.

A history is a list of entries, each a mechanism run `steps` times:
- `(noise_multiplier, sample_rate, steps)`: the Poisson-subsampled Gaussian (local DP-SGD);
- `("skellam", mu, l1, l2, share, steps)`: a full-batch integer release whose noise in
  the securely aggregated sum is Skellam of variance `mu`, with L1/L2 sensitivities
  `l1`, `l2` (integer units; common/ddp.py); `share` is the variance the client added
  itself, all that protects the release from a server that unmasks it alone (with
  colluding or fake cohort members; `epsilon_alone`);
- `("skellam", mu, l1, l2, share, beta, steps)`: the same with sensitivities that hold
  except with probability `beta` per release over the client's own rounding (ddp's
  high-probability bound): the release is then beta-approximately RDP (Bun & Steinke
  2016, section 8: with probability 1 - beta, the same on both neighbours, it is the
  Skellam mechanism at l1, l2), composition adds the betas, and epsilon is converted
  at delta minus their sum.
The ledger only stores it; epsilon is always recomputed from the whole history, so it
composes over every step a client ever took. The math is Opacus' own accountants (RDP by
default, PRV selectable) for Gaussian-only histories; a history with Skellam releases is
composed in RDP over integer orders (Opacus' Gaussian RDP plus the Skellam bound).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from common import ddp

Entry = tuple  # (sigma, q, steps) or ("skellam", mu, l1, l2, share[, beta], steps)
SKELLAM = "skellam"

# Neighbouring datasets of one client: one record replaced by a null record that
# contributes nothing (a zero gradient); the client's record count n stays the same and
# is public. Under this relation the Poisson-subsampled Gaussian has the same RDP bound
# Opacus computes for add/remove (Kairouz et al. 2021; Ponomareva et al. 2023, "How to
# DP-fy ML", section 5.1), so the accounting below holds as it is.
ADJACENCY = "zero-out"


def _entry(raw: Sequence) -> Entry:
    """One history entry, normalised and checked (steps may be 0). A Skellam entry with
    beta 0 is written without it."""
    if len(raw) in (6, 7) and raw[0] == SKELLAM:
        mu, l1, l2, share = (float(raw[1]), float(raw[2]), float(raw[3]), float(raw[4]))
        beta, steps = (float(raw[5]) if len(raw) == 7 else 0.0), int(raw[-1])
        if not (0 <= share <= mu < math.inf and 0 < l1 < math.inf and 0 < l2 < math.inf
                and steps >= 0 and 0 <= beta < 1e-3) or steps != raw[-1]:
            raise ValueError(f"history entry {list(raw)!r} is out of range")
        return (SKELLAM, mu, l1, l2, share, beta, steps) if beta else (SKELLAM, mu, l1, l2, share, steps)
    if len(raw) != 3:
        raise ValueError(f"history entry {raw!r} must be [noise_multiplier, sample_rate, steps] "
                         "or [\"skellam\", mu, l1, l2, share, (beta,) steps]")
    sigma, q, steps = float(raw[0]), float(raw[1]), int(raw[2])
    if not (sigma >= 0 and 0 < q <= 1 and steps >= 0) or steps != raw[2]:
        raise ValueError(f"history entry {raw!r} is out of range")
    return (sigma, q, steps)


def skellam_entry(*, mu: float, l1: float, l2: float, share: float, beta: float = 0.0,
                  steps: int = 1) -> Entry:
    """A Skellam release's entry (beta 0: the worst-case sensitivities)."""
    return _entry((SKELLAM, mu, l1, l2, share, beta, steps))


def tail(history: Iterable[Sequence]) -> float:
    """The summed per-release failure probabilities of high-probability sensitivities:
    part of delta."""
    return sum(e[5] * e[6] for e in merge_history(history) if e[0] == SKELLAM and len(e) == 7)


def merge_history(history: Iterable[Sequence]) -> list[Entry]:
    """Normalise entries and merge neighbours of the same mechanism and parameters."""
    out: list[Entry] = []
    for raw in history:
        e = _entry(raw)
        if e[-1] == 0:
            continue
        if out and out[-1][:-1] == e[:-1]:
            out[-1] = (*e[:-1], out[-1][-1] + e[-1])
        else:
            out.append(e)
    return out


def extends(history: Sequence[Entry], longer: Sequence[Entry]) -> bool:
    """True when `longer` is `history` followed by more steps: every entry of `history`
    appears unchanged and in order at the start of `longer` (its last one may have
    continued with more steps of the same mechanism and parameters)."""
    a, b = merge_history(history), merge_history(longer)
    if len(a) > len(b):
        return False
    for i, e in enumerate(a):
        f = b[i]
        if e[:-1] != f[:-1] or e[-1] > f[-1] or (e[-1] < f[-1] and i < len(a) - 1):
            return False
    return True


def total_steps(history: Iterable[Sequence]) -> int:
    return sum(int(e[-1]) for e in history)


def epsilon(history: Iterable[Sequence], delta: float, accountant: str = "rdp") -> float:
    """epsilon at `delta` after every entry of `history` (0 for an empty one, inf if sigma=0)."""
    hist = merge_history(history)
    if not hist:
        return 0.0
    if any(e[0] == 0 or (e[0] == SKELLAM and e[1] == 0) for e in hist):
        return math.inf
    if any(e[0] == SKELLAM for e in hist):
        if accountant != "rdp":
            raise ValueError(f"accountant={accountant!r} cannot compose Skellam releases; use rdp")
        return _mixed_rdp_epsilon(hist, delta)
    if accountant == "rdp":
        from opacus.accountants.analysis.rdp import get_privacy_spent
        from opacus.accountants.rdp import RDPAccountant

        orders = tuple(RDPAccountant.DEFAULT_ALPHAS)
        rdp = sum(_rdp_per_step(q, sigma, orders) * steps for sigma, q, steps in hist)
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


def epsilon_alone(history: Iterable[Sequence], delta: float, accountant: str = "rdp"
                  ) -> float:
    """epsilon of the client's releases with only its own noise: every Skellam release
    counted with the share the client added (what protects it from a server that
    unmasks it alone, with colluding or fake cohort members); local DP-SGD steps as they
    are."""
    alone = [(SKELLAM, e[4], *e[2:4], *e[4:]) if e[0] == SKELLAM else e
             for e in merge_history(history)]
    return epsilon(alone, delta, accountant)


@lru_cache(maxsize=4096)
def _rdp_per_step(q: float, sigma: float, orders: tuple) -> np.ndarray:
    """Opacus' RDP of one subsampled Gaussian step at `orders`: `compute_rdp` is that
    times the steps (exactly: it multiplies), and its fractional orders take
    milliseconds, so every (q, sigma) is computed once per process. Read-only."""
    from opacus.accountants.analysis.rdp import compute_rdp

    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(orders))
    rdp.setflags(write=False)
    return rdp


def _mixed_rdp_epsilon(hist: Sequence[Entry], delta: float) -> float:
    """A history with Skellam releases: RDP over integer orders (the Skellam bound needs
    them), Gaussian entries by Opacus' compute_rdp at the same orders, converted as
    Opacus converts RDP."""
    orders = ddp.RDP_ORDERS
    total = [0.0] * len(orders)
    for e in hist:
        if e[0] == SKELLAM:
            mu, l1, l2, steps = e[1], e[2], e[3], e[-1]
            rdp = [steps * ddp.skellam_rdp(a, mu, l1, l2) for a in orders]
        else:
            sigma, q, steps = e
            rdp = list(_rdp_per_step(q, sigma, orders) * steps)
        total = [x + y for x, y in zip(total, rdp, strict=True)]
    rest = delta - tail(hist)
    return ddp.rdp_to_epsilon(total, orders, rest) if rest > 0 else math.inf


def calibrate_noise(
    *, target_epsilon: float, target_delta: float, sample_rate: float, steps: int,
    accountant: str = "rdp", prior: Sequence[Entry] = (), tolerance: float = 0.005,
) -> float:
    """Smallest noise_multiplier (within `tolerance` relative) such that `prior` followed by
    `steps` steps at `sample_rate` stays at or below `target_epsilon`."""

    def eps_at(sigma: float) -> float:
        return epsilon([*prior, (sigma, sample_rate, steps)], target_delta, accountant)

    _check_calibration(target_epsilon, steps, epsilon(prior, target_delta, accountant))
    return _smallest_noise(eps_at, target_epsilon, tolerance)


def _check_calibration(target_epsilon: float, steps: int, spent: float) -> None:
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target_epsilon={target_epsilon!r} must be finite and > 0 to calibrate")
    if steps < 1:
        raise ValueError(f"steps={steps!r} must be >= 1 to calibrate a noise multiplier")
    if spent >= target_epsilon:
        raise ValueError(
            f"the history already spends epsilon >= target_epsilon={target_epsilon}; no noise "
            "level allows more steps"
        )


def _smallest_noise(eps_at: Callable[[float], float], target_epsilon: float,
                    tolerance: float) -> float:
    """Bisection for the smallest noise multiplier whose epsilon (`eps_at`, decreasing in
    it) is at most `target_epsilon`, within `tolerance` relative."""
    lo, hi = 0.0, 1.0
    while eps_at(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError("no noise_multiplier below 1e6 reaches the target epsilon")
    while hi - lo > tolerance * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if eps_at(mid) > target_epsilon else (lo, mid)
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


@dataclass(frozen=True, kw_only=True)
class ReleasePlan:
    """One integer release under secure aggregation, decided before the client trains:
    `mu` is the Skellam variance the sum carries once `threshold` shares are in it (what
    the ledger records), `mu_share` the variance this client adds."""

    noise_multiplier: float  # sqrt(mu) / l2: noise std over the L2 sensitivity
    mu: float
    mu_share: float
    l1: float
    l2: float
    epsilon_before: float
    epsilon_after: float
    beta: float = 0.0  # the probability the sensitivities fail (ddp.Encoding.tail)

    @property
    def entry(self) -> Entry:
        return skellam_entry(mu=self.mu, l1=self.l1, l2=self.l2, share=self.mu_share,
                             beta=self.beta)


def skellam_noise_multiplier(*, fixed: float, target_epsilon: float, target_delta: float,
                             l1: float, l2: float, steps: int, prior: Sequence[Entry] = (),
                             beta: float = 0.0) -> float:
    """A client's Skellam noise multiplier: the run's noise-multiplier when set (`fixed` >
    0), else its calibration for `steps` releases after `prior`. The server's agreed level
    is this for a fresh client (no prior), so an honest cohort agrees with itself."""
    if fixed > 0:
        return fixed
    return calibrate_skellam(target_epsilon=target_epsilon, target_delta=target_delta,
                             l1=l1, l2=l2, steps=steps, prior=prior, beta=beta)


def calibrate_skellam(*, target_epsilon: float, target_delta: float, l1: float, l2: float,
                      steps: int, prior: Sequence[Entry] = (), tolerance: float = 0.005,
                      beta: float = 0.0) -> float:
    """Smallest Skellam noise multiplier z (noise std sqrt(mu) = z * l2, within `tolerance`
    relative) such that `prior` followed by `steps` releases stays within target_epsilon."""

    def eps_at(z: float) -> float:
        mu = (z * l2) ** 2
        return epsilon([*prior, skellam_entry(mu=mu, l1=l1, l2=l2, share=mu, beta=beta,
                                              steps=steps)], target_delta)

    _check_calibration(target_epsilon, steps, epsilon(prior, target_delta))
    return _smallest_noise(eps_at, target_epsilon, tolerance)
