"""Distributed discrete noise for secure aggregation: the pure math (no transport).

Secure aggregation sums integers modulo 2^bits, so a client's release is made integer
before any noise is added (continuous noise followed by rounding is not covered by the
Gaussian mechanism's proof: the rounding error would depend on the client's own value):

1. each record's clipped gradient (L2 <= clip) is scaled by `scale` and rounded to
   integers by conditional randomized rounding: unbiased coordinate-wise rounding,
   redrawn until the rounded vector's norm is at most `rounded_l2_bound` (Kairouz, Liu &
   Steinke 2021), so one record moves the integer sum by at most that bound in L2 and
   by at most `rounded_l1_bound` in L1;
2. the client adds integer Skellam noise Sk = Poisson(mu/2) - Poisson(mu/2) of variance
   mu per coordinate (Agarwal, Kairouz & Liu 2021). Skellam is closed under summation:
   K clients adding variance mu/K each give exactly a Skellam of variance mu in the sum,
   the noise of one central mechanism;
3. values are taken modulo 2^bits (`wrap`) for the masks; the sum is read back centred.

Accounting: the Skellam mechanism's RDP bound (Agarwal et al. 2021, Theorem 3.5) for
integer order alpha > 1 and integer sensitivities D1 (L1), D2 (L2), in integer units:

    eps(alpha) <= alpha D2^2 / (2 mu) + min(((2 alpha - 1) D2^2 + 6 D1) / (4 mu^2), 3 D1 / (2 mu))

composed over steps by adding RDP, converted to (epsilon, delta) as Opacus' RDP
accountant does. Only full-batch steps (sample rate 1) are accounted here: no
amplification by subsampling is claimed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RDP_ORDERS: tuple[int, ...] = tuple(range(2, 64)) + tuple(range(64, 513, 8))
MAX_ROUNDING_TRIES = 1000


@dataclass(frozen=True)
class Encoding:
    """How a record's clipped gradient becomes integers. `scale`: integer units per unit
    of gradient; `beta`: the rounding's tail probability in the norm bound (each retry of
    conditional rounding succeeds with probability >= 1 - beta); `dim`: coordinates."""

    clip: float
    scale: float
    dim: int
    beta: float = math.exp(-0.5)

    def __post_init__(self) -> None:
        if not (self.clip > 0 and self.scale > 0 and self.dim >= 1 and 0 < self.beta < 1):
            raise ValueError(f"bad encoding {self}")

    @property
    def rounded_l2_bound(self) -> float:
        """The L2 norm every rounded record is conditioned to stay within (Kairouz et al.
        2021, Theorem 1): min(c + sqrt(d), sqrt(c^2 + d/4 + sqrt(2 ln(1/beta)) (c + sqrt(d)/2)))
        for the scaled clip norm c = scale * clip."""
        c, d = self.scale * self.clip, self.dim
        first = c + math.sqrt(d)
        second = math.sqrt(c * c + d / 4 + math.sqrt(2 * math.log(1 / self.beta)) * (c + math.sqrt(d) / 2))
        return min(first, second)

    @property
    def rounded_l1_bound(self) -> float:
        """An integer vector's L1 norm is at most sqrt(d) times its L2 norm and at most its
        squared L2 norm (every nonzero coordinate has |x| >= 1, so |x| <= x^2)."""
        l2 = self.rounded_l2_bound
        return min(math.sqrt(self.dim) * l2, l2 * l2)


def _round_rows(rows: np.ndarray, bound: float, rng: np.random.Generator) -> np.ndarray:
    """Rows rounded as `conditional_round` says, as integer-valued floats (float32 while
    every value is below 2^20, which holds them and their fractions closely enough; the
    norms are taken in float64, exactly)."""
    rows = np.asarray(rows)
    if rows.ndim != 2:
        raise ValueError("conditional_round takes a 2-D array, one row per record")
    small = rows.size == 0 or float(np.abs(rows).max()) < 2.0**20
    dtype = np.float32 if small else np.float64
    rows = rows.astype(dtype, copy=False)
    floor = np.floor(rows)
    frac = rows - floor
    out = floor + (rng.random(rows.shape, dtype=dtype) < frac)

    def norms2(a: np.ndarray) -> np.ndarray:
        return np.einsum("ij,ij->i", a, a, dtype=np.float64)

    todo = np.flatnonzero(norms2(out) > bound * bound)
    for _ in range(MAX_ROUNDING_TRIES - 1):
        if not todo.size:
            break
        redraw = floor[todo] + (rng.random((todo.size, rows.shape[1]), dtype=dtype) < frac[todo])
        ok = norms2(redraw) <= bound * bound
        out[todo[ok]] = redraw[ok]
        todo = todo[~ok]
    if todo.size:
        i = int(todo[0])
        raise ValueError(f"row {i} could not be rounded within L2 bound {bound:.4g} "
                         f"(its norm is {float(np.linalg.norm(rows[i])):.4g}): clip before scaling")
    return out


def conditional_round(rows: np.ndarray, bound: float, rng: np.random.Generator) -> np.ndarray:
    """Unbiased randomized rounding of each row (floor, plus 1 with probability of the
    fractional part), each row redrawn until its L2 norm is at most `bound`. Returns int64.
    The bound is enforced on the output, whatever the input: it is what the sensitivity
    rests on."""
    return _round_rows(rows, bound, rng).astype(np.int64)


def conditional_round_sum(rows: np.ndarray, bound: float, rng: np.random.Generator) -> np.ndarray:
    """The sum over rows of `conditional_round(rows)` (int64), without the int64 copy."""
    return np.rint(_round_rows(rows, bound, rng).sum(axis=0, dtype=np.float64)).astype(np.int64)


def skellam(mu: float, shape: int | Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Symmetric Skellam noise of variance `mu` per coordinate (int64; zeros for mu=0)."""
    if mu < 0 or not math.isfinite(mu):
        raise ValueError(f"Skellam variance {mu!r} must be finite and >= 0")
    if mu == 0:
        return np.zeros(shape, dtype=np.int64)
    return rng.poisson(mu / 2, size=shape).astype(np.int64) - rng.poisson(mu / 2, size=shape).astype(np.int64)


def wrap(values: np.ndarray, bits: int) -> np.ndarray:
    """Integers modulo 2^bits, centred in [-2^(bits-1), 2^(bits-1)) (int64)."""
    if not 2 <= bits <= 62:
        raise ValueError(f"bits={bits} must be in [2, 62]")
    m = 1 << bits
    return ((np.asarray(values, dtype=np.int64) + m // 2) % m) - m // 2


def skellam_rdp(alpha: int, mu: float, l1: float, l2: float) -> float:
    """RDP of order `alpha` of one Skellam release of variance `mu` with L1 and L2
    sensitivities `l1`, `l2` (all in integer units)."""
    if alpha <= 1 or int(alpha) != alpha:
        raise ValueError(f"alpha={alpha} must be an integer > 1")
    if mu <= 0:
        return math.inf
    return (alpha * l2 * l2 / (2 * mu)
            + min(((2 * alpha - 1) * l2 * l2 + 6 * l1) / (4 * mu * mu), 3 * l1 / (2 * mu)))


def rdp_to_epsilon(rdp: Sequence[float], orders: Sequence[int], delta: float) -> float:
    """(epsilon at delta) from RDP values, as Opacus' RDP accountant converts them."""
    best = math.inf
    for r, a in zip(rdp, orders, strict=True):
        if math.isinf(r):
            continue
        eps = r + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1)
        best = min(best, eps)
    return max(best, 0.0)


Release = tuple[float, float, float, int]  # (mu, l1, l2, steps), integer units


def epsilon(history: Sequence[Release], delta: float, orders: Sequence[int] = RDP_ORDERS) -> float:
    """Epsilon at `delta` of a composition of Skellam releases [(mu, l1, l2, steps), ...]."""
    if not history:
        return 0.0
    rdp = [sum(steps * skellam_rdp(a, mu, l1, l2) for mu, l1, l2, steps in history) for a in orders]
    return rdp_to_epsilon(rdp, orders, delta)


def calibrate_mu(target_epsilon: float, delta: float, l1: float, l2: float, steps: int,
                 prior: Sequence[Release] = ()) -> float:
    """The smallest total Skellam variance (to 0.1%) for which `steps` more releases after
    `prior` stay within `target_epsilon`."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if epsilon(prior, delta) >= target_epsilon:
        raise ValueError("the prior releases already spend the target epsilon")

    def eps(mu: float) -> float:
        return epsilon([*prior, (mu, l1, l2, steps)], delta)

    lo, hi = 1e-6, max(1.0, l2 * l2)
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 4
        if hi > 1e30:
            raise ValueError("no Skellam variance reaches the target epsilon")
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if eps(mid) <= target_epsilon else (mid, hi)
    return hi
