"""Distributed discrete noise for secure aggregation: the pure math (no transport).

Secure aggregation sums integers modulo 2^bits, so a client's release is made integer
before any noise is added (continuous noise followed by rounding is not covered by the
Gaussian mechanism's proof: the rounding error would depend on the client's own value):

1. each record's gradient is clipped to L2 <= clip and the client sums them;
2. the sum is rotated (`Rotation`: random signs, a random permutation and a blockwise
   orthonormal Walsh-Hadamard transform, seeded by the round's signed view; padded to
   `padded_dim`) and multiplied by `scale`: S. Rotation is orthogonal, so one record
   still moves S by a vector g with ||g||_2 <= c = scale * clip, and it spreads the sum
   over all coordinates, so each is about ||S|| / sqrt(d) (Kairouz, Liu & Steinke 2021);
3. S is rounded to integers by unbiased randomized rounding, floor(S + U) with U uniform
   on [0, 1)^d (`randomized_round`);
4. the client adds integer Skellam noise Sk = Poisson(mu/2) - Poisson(mu/2) of variance
   mu per coordinate (Agarwal, Kairouz & Liu 2021). Skellam is closed under summation:
   K clients adding variance mu/K each give exactly a Skellam of variance mu in the sum,
   the noise of one central mechanism;
5. values are taken modulo 2^bits (`wrap`) for the masks and bit-packed on the wire
   (`pack`); the sum is read back centred and rotated back by the server. The server's
   scale (`noise_scale`) makes a few standard deviations of a coordinate of the sum fill
   half the field; a coordinate beyond wraps (modular clipping), which costs accuracy
   there and no privacy (the sum modulo 2^bits is a function of the noisy sum).

Sensitivity of the rounded release (`Encoding`). Take the same U on both neighbouring
datasets (the release is a mixture over U). Per coordinate, with S = a + g on one side
and a on the other, floor(a_i + g_i + U_i) - floor(a_i + U_i) = floor(g_i) + B_i with B_i
Bernoulli(frac(g_i)), independent over i: the difference D is distributed exactly as the
randomized rounding of g, whatever a is. Two bounds on ||D||_2:
- worst case, for every U: ||D||_2 <= c + sqrt(d) (`worst_l2_bound`);
- with probability >= 1 - beta over U: ||D||_2^2 <= c^2 + d/4 + sqrt(2 ln(1/beta)) (c +
  sqrt(d)/2) (`tail_l2_bound`; the bound of Kairouz, Liu & Steinke 2021's conditional
  rounding). Proof: E D_i^2 = g_i^2 + p_i(1 - p_i) <= g_i^2 + 1/4, and D_i^2 - E D_i^2 =
  (2 floor(g_i) + 1)(B_i - p_i) ranges over an interval of length |2 floor(g_i) + 1| <=
  2|g_i| + 1; Hoeffding gives P(||D||^2 - E||D||^2 >= t) <= exp(-2 t^2 / sum (2|g_i| +
  1)^2) and sum (2|g_i| + 1)^2 <= (2c + sqrt(d))^2, so t = sqrt(ln(1/beta)/2) (2c +
  sqrt(d)) suffices.
L1: an integer vector has ||D||_1 <= min(sqrt(d) ||D||_2, ||D||_2^2). On the event G
(the same U on both sides, probability P(G) >= 1 - beta) the two releases are mixtures
over U in G of Skellams shifted by at most those bounds; Renyi divergence is jointly
quasi-convex (van Erven & Harremoes 2014, Theorem 13), so those conditional mixtures
are no further apart than the worst pair of shifted Skellams, and each release is that
mixture with weight P(G) plus another with weight 1 - P(G) on both sides: beta-
approximate RDP (Bun & Steinke 2016, Definition 8.1), whose composition adds the betas
and whose conversion to (epsilon, delta) adds their sum to delta (common/privacy.py).
At 16 bits with the default model (d ~ 40,000, c ~ 700) the worst-case bound is 1.3 c,
the high-probability one (beta = 1e-12) 1.02 c: fewer bits cost almost no noise.

Accounting: the Skellam mechanism's RDP bound (Agarwal et al. 2021, Theorem 3.5) for
integer order alpha > 1 and integer-unit sensitivities D1 (L1), D2 (L2):

    eps(alpha) <= alpha D2^2 / (2 mu) + min(((2 alpha - 1) D2^2 + 6 D1) / (4 mu^2), 3 D1 / (2 mu))

composed over steps by adding RDP, converted to (epsilon, delta) as Opacus' RDP
accountant does (at delta minus the releases' summed beta). Only full-batch steps
(sample rate 1) are accounted here: no amplification by subsampling is claimed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RDP_ORDERS: tuple[int, ...] = tuple(range(2, 64)) + tuple(range(64, 513, 8))


# the probability, per release, that the rounding moves one record's effect beyond the
# high-probability bound (Encoding.rounded_l2_bound); accounted as part of delta
ROUNDING_BETA = 1e-12


@dataclass(frozen=True)
class Encoding:
    """How a client's sum of clipped gradients becomes integers. `scale`: integer units
    per unit of gradient; `dim`: coordinates of the release (the rotated, padded length);
    `beta`: the probability a release may exceed the high-probability sensitivity bound
    (0: the worst-case bound c + sqrt(dim) only)."""

    clip: float
    scale: float
    dim: int
    beta: float = 0.0

    def __post_init__(self) -> None:
        if not (self.clip > 0 and self.scale > 0 and self.dim >= 1 and 0 <= self.beta < 1):
            raise ValueError(f"bad encoding {self}")

    @property
    def worst_l2_bound(self) -> float:
        """How far one record can move the rounded release in L2: c + sqrt(dim), c = scale * clip."""
        return self.scale * self.clip + math.sqrt(self.dim)

    @property
    def tail_l2_bound(self) -> float:
        """... except with probability `beta` over the rounding: the square root of
        c^2 + dim/4 + sqrt(2 ln(1/beta)) (c + sqrt(dim)/2) (module docstring)."""
        if self.beta <= 0:
            return math.inf
        c, d = self.scale * self.clip, self.dim
        return math.sqrt(c * c + d / 4 + math.sqrt(2 * math.log(1 / self.beta)) * (c + math.sqrt(d) / 2))

    @property
    def rounded_l2_bound(self) -> float:
        """The L2 sensitivity accounted: the smaller of the two bounds."""
        return min(self.worst_l2_bound, self.tail_l2_bound)

    @property
    def tail(self) -> float:
        """The probability per release that the accounted bound fails: `beta` when the
        high-probability bound is the one used, else 0 (the worst case always holds)."""
        return self.beta if self.tail_l2_bound < self.worst_l2_bound else 0.0

    @property
    def rounded_l1_bound(self) -> float:
        """... and in L1: an integer vector's L1 norm is at most sqrt(dim) times its L2
        norm, and at most its square."""
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


def field_problem(*, bits: int, noise_variance: float) -> str | None:
    """Why a field of `bits` would leave the sum of honest releases useless, or None: the
    honest noise alone (total variance `noise_variance` per coordinate) spreads over more
    than half the field at two standard deviations, so most coordinates would wrap.
    Utility only: the sum modulo 2^bits is a function of the noisy sum, whatever wraps
    (a member refuses such a view so that it spends nothing on a sum that says nothing)."""
    if not (2 <= bits <= 62):
        return f"secagg-bits={bits} must be in [2, 62]"
    spread = 2 * math.sqrt(max(noise_variance, 0.0))
    if not math.isfinite(spread) or spread >= 2.0 ** (bits - 1):
        return (f"the honest noise alone (variance {noise_variance:.3g} a coordinate) would "
                f"wrap around the {bits}-bit field: the sum would say nothing")
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


HADAMARD_BLOCK = 1024  # the rotation's largest block: a dimension is padded to a multiple


def hadamard_block(dim: int) -> int:
    """The rotation's block for `dim` coordinates: min(HADAMARD_BLOCK, next power of 2)."""
    if dim < 1:
        raise ValueError(f"dim={dim} must be >= 1")
    return min(HADAMARD_BLOCK, 1 << (dim - 1).bit_length())


def padded_dim(dim: int) -> int:
    """The rotated release's length: `dim` padded to a whole number of Hadamard blocks."""
    block = hadamard_block(dim)
    return -(-dim // block) * block


def _walsh_hadamard(x: np.ndarray) -> np.ndarray:
    """The orthonormal Walsh-Hadamard transform of each row of `x` (rows of length a
    power of 2); its own inverse."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < n:
        y = x.reshape(*lead, n // (2 * h), 2, h)
        x = np.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), axis=-2)
        h *= 2
    return x.reshape(*lead, n) / math.sqrt(n)


@dataclass(frozen=True)
class Rotation:
    """A randomized Hadamard rotation of R^dim into R^padded_dim(dim): random signs, a
    random permutation, then an orthonormal Walsh-Hadamard transform of each block. It is
    orthogonal (norms and sensitivities are kept), so a release rotated before rounding
    has its coordinates flattened: each one is about ||x|| / sqrt(d), rarely more than a
    few times that, so a field sized for a few standard deviations of the sum seldom
    wraps. Every member and the server derive it from the same seed (the signed view's
    digest), so the sum of rotated releases is the rotation of the sum."""

    seed: bytes
    dim: int

    @property
    def padded(self) -> int:
        return padded_dim(self.dim)

    @property
    def block(self) -> int:
        return hadamard_block(self.dim)

    def _draws(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(np.frombuffer(self.seed, dtype=np.uint32))
        signs = rng.integers(0, 2, self.padded).astype(np.float64) * 2 - 1
        return signs, rng.permutation(self.padded)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """R x: `dim` values in, `padded` out (float64)."""
        x = np.asarray(x, dtype=np.float64)
        if x.shape != (self.dim,):
            raise ValueError(f"rotation of {self.dim} values given shape {x.shape}")
        signs, perm = self._draws()
        z = np.zeros(self.padded)
        z[:self.dim] = x
        z = (z * signs)[perm]
        return _walsh_hadamard(z.reshape(-1, self.block)).reshape(-1)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """R^T y: `padded` values in, the first `dim` of the un-rotated vector out."""
        y = np.asarray(y, dtype=np.float64)
        if y.shape != (self.padded,):
            raise ValueError(f"inverse rotation of {self.padded} values given shape {y.shape}")
        signs, perm = self._draws()
        z = _walsh_hadamard(y.reshape(-1, self.block)).reshape(-1)
        out = np.empty(self.padded)
        out[perm] = z
        return (out * signs)[:self.dim]


def noise_scale(*, bits: int, clip: float, dim: int, noise_multiplier: float, members: int,
                threshold: int, signal: float, sigmas: float, beta: float = ROUNDING_BETA
                ) -> float:
    """The integer scale at which `sigmas` standard deviations of one coordinate of the
    cohort's rotated sum fill half the field: the noise of `members` honest releases
    (each a share (z l2)^2 / t, l2 the accounted sensitivity at that scale) and the
    signal, whose per-coordinate RMS is `signal` (gradient units). A coordinate beyond it
    wraps (modular clipping): the sum is wrong there and privacy is untouched (the sum
    modulo 2^bits is a function of the noisy sum). Raises ValueError when the field
    cannot hold even the rounding's share of the noise."""
    half = 2.0 ** (bits - 1)
    share = noise_multiplier ** 2 * members / max(threshold, 1)

    def spread(scale: float) -> float:
        l2 = Encoding(clip=clip, scale=scale, dim=dim, beta=beta).rounded_l2_bound
        return sigmas * math.sqrt(share * l2 * l2 + (scale * signal) ** 2)

    lo, hi = 1e-12, 1.0
    if spread(lo) >= half:
        raise ValueError(f"a {bits}-bit field cannot hold {sigmas:g} standard deviations of "
                         f"the rounding noise of {dim} coordinates at noise multiplier "
                         f"{noise_multiplier:.3g}: more secagg-bits")
    while spread(hi) < half:
        lo, hi = hi, hi * 2
        if hi > 2.0 ** 80:
            raise ValueError(f"signal {signal!r} and noise multiplier {noise_multiplier!r} "
                             "leave the scale unbounded")
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if spread(mid) < half else (lo, mid)
    return lo


AUTO_BITS = (12, 32)  # the fields secagg-bits=0 chooses from
AUTO_EXCESS = 0.02  # ... the fewest bits at which rounding adds at most 2% to the noise


def rounding_excess(*, bits: int, clip: float, dim: int, noise_multiplier: float, members: int,
                    threshold: int, sigmas: float) -> float:
    """How much the rounding adds to the noise (l2 / c - 1) at the scale the noise alone
    would allow in a field of `bits` (no signal to hold: the field's best); inf where
    the field cannot hold the noise at all."""
    try:
        scale = noise_scale(bits=bits, clip=clip, dim=dim, noise_multiplier=noise_multiplier,
                            members=members, threshold=threshold, signal=0.0, sigmas=sigmas)
    except ValueError:
        return math.inf
    enc = Encoding(clip=clip, scale=scale, dim=dim, beta=ROUNDING_BETA)
    return enc.rounded_l2_bound / (scale * clip) - 1


def auto_bits(*, clip: float, dim: int, noise_multiplier: float, members: int, threshold: int,
              sigmas: float) -> int:
    """The fewest bits in AUTO_BITS at which the rounding adds at most AUTO_EXCESS to the
    noise (the largest if none does): 16 at epsilon 3 in the default federation, 18 at
    epsilon 0.5, where the noise is larger and the field must hold more of it."""
    for bits in range(AUTO_BITS[0], AUTO_BITS[1] + 1):
        if rounding_excess(bits=bits, clip=clip, dim=dim, noise_multiplier=noise_multiplier,
                           members=members, threshold=threshold, sigmas=sigmas) <= AUTO_EXCESS:
            return bits
    return AUTO_BITS[1]


def signal_rms(rotated_sum: np.ndarray, *, noise_variance: float) -> float:
    """The per-coordinate RMS of a decoded sum's signal (gradient units), for the next
    round's scale: its mean square less the noise variance the honest shares carry, and
    never below half its RMS. (Taking the noise for signal would feed back: a smaller
    scale makes the noise larger in gradient units, which would shrink the next scale.)"""
    ms = float(np.mean(np.square(rotated_sum)))
    return math.sqrt(max(ms - noise_variance, ms / 4))


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Integers in [0, 2^bits) as a little-endian bit string of `bits` bits each
    (uint8, ceil(n bits / 8) bytes): what a masked vector costs on the wire."""
    v = np.asarray(values)
    if v.ndim != 1 or v.dtype.kind not in "ui" or (v.size and (v.min() < 0 or int(v.max()) >> bits)):
        raise ValueError(f"pack needs a vector of integers in [0, 2^{bits})")
    as_bits = np.unpackbits(v.astype("<u8").view(np.uint8).reshape(-1, 8), axis=1,
                            bitorder="little")[:, :bits]
    return np.packbits(as_bits.reshape(-1), bitorder="little")


def unpack(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The `count` integers (int64) that `pack` wrote at `bits` bits each."""
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 1 or data.size != -(-count * bits // 8):
        raise ValueError(f"a packed vector of {count} values at {bits} bits must be "
                         f"{-(-count * bits // 8)} bytes (uint8), got {data.dtype} {data.shape}")
    as_bits = np.unpackbits(data, bitorder="little")[:count * bits].reshape(count, bits)
    full = np.zeros((count, 64), dtype=np.uint8)
    full[:, :bits] = as_bits
    return np.packbits(full, axis=1, bitorder="little").view("<u8").reshape(-1).astype(np.int64)


def rdp_to_epsilon(rdp: Sequence[float], orders: Sequence[int], delta: float) -> float:
    """(epsilon at delta) from RDP values, as Opacus' RDP accountant converts them."""
    best = math.inf
    for r, a in zip(rdp, orders, strict=True):
        if math.isinf(r):
            continue
        eps = r + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1)
        best = min(best, eps)
    return max(best, 0.0)


