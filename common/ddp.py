"""Distributed discrete noise for secure aggregation: the pure math (no transport).

Secure aggregation sums integers modulo 2^bits, so a client's release is made integer
before any noise is added (continuous noise followed by rounding is not covered by the
Gaussian mechanism's proof: the rounding error would depend on the client's own value):

1. each record's gradient is clipped to L2 <= clip, the client sums them and multiplies
   by `scale`: S. One record moves S by a vector g with ||g||_2 <= c = scale * clip;
2. S is rounded to integers by unbiased randomized rounding, floor(S + U) with U uniform
   on [0, 1)^d (`randomized_round`);
3. the client adds integer Skellam noise Sk = Poisson(mu/2) - Poisson(mu/2) of variance
   mu per coordinate (Agarwal, Kairouz & Liu 2021). Skellam is closed under summation:
   K clients adding variance mu/K each give exactly a Skellam of variance mu in the sum,
   the noise of one central mechanism;
4. values are taken modulo 2^bits (`wrap`) for the masks; the sum is read back centred.

Sensitivity of the rounded release (`Encoding.rounded_l2_bound`, `rounded_l1_bound`): the
release is a mixture over U of Skellam noise shifted by floor(S + U). For neighbouring
datasets take the same U on both sides: per coordinate |floor(a + U) - floor(b + U)| <=
|a - b| + 1, so the two shifts differ by d with ||d||_2 <= c + sqrt(dim) and ||d||_1 <=
||g||_1 + dim <= sqrt(dim) (c + sqrt(dim)), and ||d||_1 <= ||d||_2^2 (integers). Renyi
divergence is jointly quasi-convex (van Erven & Harremoes 2014, Theorem 13), so the
mixtures are no further apart than the worst pair of shifted Skellams: the bound below
holds with those sensitivities. With the default 32-bit field c is ~10^5 and sqrt(dim)
~200: rounding costs ~0.1% of sensitivity. (Per-record conditional rounding, Kairouz,
Liu & Steinke 2021, is tighter when c is small, i.e. few bits, at the cost of rounding
every record's d-dimensional gradient.)

Accounting: the Skellam mechanism's RDP bound (Agarwal et al. 2021, Theorem 3.5) for
integer order alpha > 1 and integer-unit sensitivities D1 (L1), D2 (L2):

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


@dataclass(frozen=True)
class Encoding:
    """How a client's sum of clipped gradients becomes integers. `scale`: integer units
    per unit of gradient; `dim`: coordinates."""

    clip: float
    scale: float
    dim: int

    def __post_init__(self) -> None:
        if not (self.clip > 0 and self.scale > 0 and self.dim >= 1):
            raise ValueError(f"bad encoding {self}")

    @property
    def rounded_l2_bound(self) -> float:
        """How far one record moves the rounded release in L2: c + sqrt(dim), c = scale * clip."""
        return self.scale * self.clip + math.sqrt(self.dim)

    @property
    def rounded_l1_bound(self) -> float:
        """... and in L1: at most sqrt(dim) times the L2 bound, and at most its square."""
        l2 = self.rounded_l2_bound
        return min(math.sqrt(self.dim) * l2, l2 * l2)


def randomized_round(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unbiased randomized rounding, floor(x + U) with U uniform on [0, 1) (int64)."""
    values = np.asarray(values, dtype=np.float64)
    return np.floor(values + rng.random(values.shape)).astype(np.int64)


# numpy's Poisson sampler is asked for means up to POISSON_PIECE only: a larger mean is
# drawn as a sum of equal pieces (a sum of independent Poissons is exactly Poisson). At
# 2^32 its candidate floor((2a/us + b) U + lam + 0.43) still has 2^-20 resolution and
# its acceptance test's float64 error is below 1e-5 in log density; beyond 2^53 its
# draws fall on a lattice (step 4 at 2e16) and the low bits of a sum carry no noise.
POISSON_PIECE = 2.0**32
MAX_POISSON_PIECES = 1024  # a share beyond 1024 pieces (mean 2^42) is refused, not drawn
# the sum's noise stays inside its margin (TAIL_SIGMAS std + TAIL_EXTRA) with probability
# below 1e-30 a coordinate: Bernstein's inequality for a sum of centred Poissons of total
# variance V, P(|X| >= a) <= 2 exp(-a^2 / (2 (V + a/3))), at a = 12 sqrt(V) + 60
TAIL_SIGMAS, TAIL_EXTRA = 12.0, 60.0


# an honest server keeps the agreed share's Poisson means near 2^36 (16 pieces) at most,
# so that a member whose own ledger needs 32x the agreed noise can still draw it exactly
AGREED_POISSON_MEAN = 2.0**36


def scale_cap(*, noise_multiplier: float, clip: float, dim: int, shares: int) -> float:
    """The largest integer scale at which a share of the agreed noise (noise multiplier
    z over the rounded L2 sensitivity, split into `shares` shares) keeps each Poisson's
    mean within AGREED_POISSON_MEAN. Precision below the noise buys nothing: the cap only
    binds where the field would give units far finer than the noise's std."""
    if noise_multiplier <= 0:
        return math.inf
    l2 = math.sqrt(2 * AGREED_POISSON_MEAN * shares) / noise_multiplier
    return max(l2 - math.sqrt(dim), math.sqrt(dim)) / clip


def poisson(lam: float, shape: int | Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Poisson(lam) (int64), from draws of mean at most POISSON_PIECE."""
    if not (0 <= lam <= POISSON_PIECE * MAX_POISSON_PIECES):
        raise ValueError(f"Poisson mean {lam!r} must be in [0, 2^32 * {MAX_POISSON_PIECES}]")
    pieces = max(1, math.ceil(lam / POISSON_PIECE))
    out = rng.poisson(lam / pieces, size=shape).astype(np.int64)
    for _ in range(pieces - 1):
        out += rng.poisson(lam / pieces, size=shape)
    return out


def skellam_problem(mu: float) -> str | None:
    """Why Skellam noise of variance `mu` cannot be drawn exactly, or None."""
    if not (0 <= mu < math.inf):
        return f"Skellam variance {mu!r} must be finite and >= 0"
    if mu / 2 > POISSON_PIECE * MAX_POISSON_PIECES:
        return (f"a noise share of variance {mu:.3g} is beyond what is drawn exactly "
                f"({2 * POISSON_PIECE * MAX_POISSON_PIECES:.3g}): the integer scale is too "
                "large (fewer secagg-bits)")
    return None


def skellam(mu: float, shape: int | Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Symmetric Skellam noise of variance `mu` per coordinate (int64; zeros for mu=0):
    Poisson(mu/2) - Poisson(mu/2), each drawn exactly (`poisson`)."""
    problem = skellam_problem(mu)
    if problem:
        raise ValueError(problem)
    if mu == 0:
        return np.zeros(shape, dtype=np.int64)
    return poisson(mu / 2, shape, rng) - poisson(mu / 2, shape, rng)


def field_problem(*, bits: int, scale: float, clip: float, records: int, members: int,
                  noise_variance: float) -> str | None:
    """Why a field of `bits` could wrap the sum of `members` honest releases, or None.
    The cohort's clipped gradients sum to L2 norm <= clip * records, so no coordinate of
    the scaled sum exceeds scale * clip * records; rounding adds under 1 a member; the
    noise (total variance `noise_variance`) stays within its tail margin. All of it must
    fit in half the field (the sum is read back centred)."""
    worst = (scale * clip * records + members
             + TAIL_SIGMAS * math.sqrt(max(noise_variance, 0.0)) + TAIL_EXTRA)
    if not (2 <= bits <= 62):
        return f"secagg-bits={bits} must be in [2, 62]"
    if not math.isfinite(worst) or worst >= 2.0 ** (bits - 1):
        return (f"a sum of {members} releases ({records} records, scale {scale:.6g}, clip "
                f"{clip:g}, noise variance {noise_variance:.3g}) could reach {worst:.3g}, beyond "
                f"the {bits}-bit field's {2.0 ** (bits - 1):.3g}: it could wrap")
    return None


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


