"""Distributed discrete noise (common/ddp.py), checked against independent computations:
the Skellam RDP bound against the exact Rényi divergence of the Skellam PMF, the
composed epsilon against the Gaussian mechanism it approaches (dp-accounting), the
sampler's closure under summation, the rounding's norm bound, modular wrap."""

import math

import numpy as np
import pytest
from scipy.special import ive, logsumexp

from common import ddp, privacy
from tests.helpers import skellam_epsilon


def exact_skellam_renyi(alpha: int, mu: float, shift: int) -> float:
    """D_alpha(Sk + shift || Sk) for Sk of variance mu, summed over the PMF
    P(k) = exp(-mu) I_|k|(mu) (scipy's exponentially scaled Bessel function)."""
    half = shift + int(20 * math.sqrt(mu)) + 20
    k = np.arange(-half, half + 1)
    log_p = np.log(ive(np.abs(k), mu))
    log_q = np.log(ive(np.abs(k - shift), mu))
    return float(logsumexp(alpha * log_q + (1 - alpha) * log_p) / (alpha - 1))


@pytest.mark.parametrize("mu", [4.0, 40.0, 400.0])
@pytest.mark.parametrize("shift", [1, 3])
@pytest.mark.parametrize("alpha", [2, 8, 32])
def test_skellam_rdp_bound_holds_against_the_exact_divergence(mu, shift, alpha):
    exact = exact_skellam_renyi(alpha, mu, shift)
    bound = ddp.skellam_rdp(alpha, mu, l1=shift, l2=shift)
    assert exact <= bound * (1 + 1e-9)
    if mu >= 400:  # and it is tight where the noise is large: close to the Gaussian's
        gaussian = alpha * shift * shift / (2 * mu)
        assert exact == pytest.approx(gaussian, rel=0.05) and bound == pytest.approx(gaussian, rel=0.05)


def test_composed_epsilon_approaches_the_gaussian_mechanism_from_above():
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    l2, steps, delta = 20.0, 15, 1e-5
    for mu in (2e3, 2e4, 2e5):
        eps = privacy.epsilon([(privacy.SKELLAM, mu, l2 * l2, l2, mu, steps)], delta)
        acc = RdpAccountant(orders=list(ddp.RDP_ORDERS))
        acc.compose(dp_accounting.GaussianDpEvent(math.sqrt(mu) / l2), steps)
        gauss = acc.get_epsilon(delta)
        assert gauss <= eps <= gauss * 1.10 + 0.01, (mu, eps, gauss)


def test_skellam_shares_sum_to_the_central_noise():
    rng = np.random.default_rng(0)
    mu, k, n = 36.0, 10, 200_000
    total = sum(ddp.skellam(mu / k, n, rng) for _ in range(k))
    assert total.dtype == np.int64
    assert abs(float(total.mean())) < 4 * math.sqrt(mu / n)
    assert float(total.var()) == pytest.approx(mu, rel=0.02)
    assert not ddp.skellam(0.0, 5, rng).any()
    with pytest.raises(ValueError, match="variance"):
        ddp.skellam(-1.0, 5, rng)


def test_randomized_rounding_is_unbiased_and_one_record_moves_it_within_the_bound():
    rng = np.random.default_rng(1)
    enc = ddp.Encoding(clip=0.1, scale=300.0, dim=50)
    x = rng.normal(size=enc.dim) * 40
    g = rng.normal(size=enc.dim)
    g *= enc.clip * enc.scale / np.linalg.norm(g)  # one record at the clip
    for seed in range(200):  # the coupling of the proof: the same U on both sides
        a = ddp.randomized_round(x, np.random.default_rng(seed))
        b = ddp.randomized_round(x + g, np.random.default_rng(seed))
        assert a.dtype == np.int64
        assert np.linalg.norm(b - a) <= enc.rounded_l2_bound
        assert np.abs(b - a).sum() <= enc.rounded_l1_bound
    mean = np.mean([ddp.randomized_round(x, rng) for _ in range(4000)], axis=0)
    assert np.abs(mean - x).max() < 0.05


def test_wrapped_sums_decode_to_the_true_sum():
    rng = np.random.default_rng(2)
    bits = 16
    parts = [rng.integers(-3000, 3000, size=100) for _ in range(10)]
    wrapped = sum(ddp.wrap(p, bits) for p in parts)
    assert np.array_equal(ddp.wrap(wrapped, bits), sum(parts))  # |sum| < 2^15
    w = ddp.wrap(np.array([2**15, -(2**15) - 1, 5]), bits)
    assert (w >= -(2**15)).all() and (w < 2**15).all() and list(w) == [-(2**15), 2**15 - 1, 5]


def test_calibration_meets_the_target_and_no_less_noise_would():
    enc = ddp.Encoding(clip=0.1, scale=200.0, dim=3970)
    l1, l2 = enc.rounded_l1_bound, enc.rounded_l2_bound

    def release(z, steps):
        mu = (z * l2) ** 2
        return (privacy.SKELLAM, mu, l1, l2, mu, steps)

    z = privacy.calibrate_skellam(target_epsilon=3.0, target_delta=1e-5, l1=l1, l2=l2, steps=15)
    assert privacy.epsilon([release(z, 15)], 1e-5) <= 3.0
    assert privacy.epsilon([release(z / 1.01, 15)], 1e-5) > 3.0
    prior = [release(z, 5)]
    more = privacy.calibrate_skellam(target_epsilon=3.0, target_delta=1e-5, l1=l1, l2=l2,
                                     steps=10, prior=prior)
    assert privacy.epsilon([*prior, release(more, 10)], 1e-5) <= 3.0
    with pytest.raises(ValueError, match="already spends"):
        privacy.calibrate_skellam(target_epsilon=0.1, target_delta=1e-5, l1=l1, l2=l2, steps=1,
                                  prior=prior)


# ---- the client's integer release (client/trainer.py) ----------------------------------


def _clipped_sum(weights, images, labels, clip):
    """The sum of per-record clipped gradients, computed independently with torch.func."""
    import torch
    from torch.func import functional_call, grad, vmap

    from common.models import build_model

    model = build_model("logreg")
    params = {k: torch.from_numpy(v.copy()) for k, v in weights.items()}

    def loss(p, x, y):
        out = functional_call(model, p, (x[None],))
        return torch.nn.functional.cross_entropy(out, y[None], reduction="sum")

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, torch.from_numpy(images), torch.from_numpy(labels))
    rows = torch.cat([g[k].reshape(len(labels), -1) for k in weights], dim=1).double().numpy()
    rows *= np.minimum(1.0, clip / np.linalg.norm(rows, axis=1, keepdims=True))
    return rows.sum(axis=0)


def test_integer_release_decodes_to_the_clipped_gradient_sum():
    from client.trainer import integer_gradient_sum
    from common.config import data_config
    from common.data import load_split
    from common.models import build_model, get_weights
    from tests.helpers import TINY_DATA

    data = load_split(data_config(data_dir=TINY_DATA), "train")
    part = type(data)(np.asarray(data.images[:120]), data.labels[:120])
    weights = get_weights(build_model("logreg", seed=0))
    enc = ddp.Encoding(clip=0.1, scale=1e4, dim=sum(v.size for v in weights.values()))
    out = integer_gradient_sum(weights, part, model_name="logreg", encoding=enc, mu_share=0.0, chunk=50)
    expected = _clipped_sum(weights, part.images, part.labels, 0.1)
    assert out.dtype == np.int64 and out.shape == (enc.dim,)
    assert np.abs(out / enc.scale - expected).max() <= 1 / enc.scale  # one rounding: < 1 unit
    one = integer_gradient_sum(weights, type(part)(part.images[:1] * 50, part.labels[:1]),
                               model_name="logreg", encoding=enc, mu_share=0.0)
    assert np.linalg.norm(one) <= enc.rounded_l2_bound  # a record's whole effect is bounded


def test_integer_release_adds_the_share_and_ignores_a_non_finite_record():
    from client.trainer import integer_gradient_sum
    from common.config import data_config
    from common.data import load_split
    from common.models import build_model, get_weights
    from tests.helpers import TINY_DATA

    data = load_split(data_config(data_dir=TINY_DATA), "train")
    images = np.asarray(data.images[:20]).copy()
    weights = get_weights(build_model("logreg", seed=0))
    enc = ddp.Encoding(clip=0.1, scale=1e3, dim=sum(v.size for v in weights.values()))
    clean = integer_gradient_sum(weights, type(data)(images[1:], data.labels[1:20]),
                                 model_name="logreg", encoding=enc, mu_share=0.0)
    images[0, 0, 0, 0] = np.inf
    dirty = integer_gradient_sum(weights, type(data)(images, data.labels[:20]),
                                 model_name="logreg", encoding=enc, mu_share=0.0)
    assert np.abs(dirty - clean).max() <= 1  # only rounding differs: the bad record is zero
    noisy = integer_gradient_sum(weights, type(data)(images[1:], data.labels[1:20]),
                                 model_name="logreg", encoding=enc, mu_share=900.0)
    assert float(np.var(noisy - clean)) == pytest.approx(900.0, rel=0.1)


def test_skellam_releases_live_in_the_same_history_as_dp_sgd_steps():
    from common import privacy

    s = ("skellam", 4e6, 3e5, 1.2e3, 4e5, 1)
    hist = privacy.merge_history([[1.0, 1.0, 2], ["skellam", 4e6, 3e5, 1.2e3, 4e5, 1], list(s)])
    assert hist == [(1.0, 1.0, 2), ("skellam", 4e6, 3e5, 1.2e3, 4e5, 2)]
    assert privacy.total_steps(hist) == 4
    assert privacy.extends(hist[:1], hist) and not privacy.extends(hist, hist[:1])
    delta = 1e-5
    both = privacy.epsilon(hist, delta)
    assert both > privacy.epsilon(hist[:1], delta) and both > privacy.epsilon(hist[1:], delta)
    assert privacy.epsilon(hist[1:], delta) == pytest.approx(skellam_epsilon([(4e6, 3e5, 1.2e3, 2)], delta))
    with pytest.raises(ValueError, match="prv"):
        privacy.epsilon(hist, delta, "prv")
    # Alone (only its share of the noise) it is worth far less.
    assert privacy.epsilon_alone(hist, delta) > 2 * both
    assert privacy.epsilon_alone(hist[:1], delta) == privacy.epsilon(hist[:1], delta)
    for bad in (["skellam", -1, 1, 1, 0, 1], ["skellam", 1, 0, 1, 1, 1], ["skellam", 1, 1, 1, 1, 0.5],
                ["skellam", 1, 1, 1, 2, 1], ["skellam", 1, 1, 1, 1]):
        with pytest.raises(ValueError, match="out of range|must be"):
            privacy.merge_history([bad])


def test_a_calibrated_skellam_noise_multiplier_spends_the_budget_over_the_planned_releases():
    from common import privacy

    enc = ddp.Encoding(clip=0.1, scale=1e6, dim=39_700)
    l1, l2 = enc.rounded_l1_bound, enc.rounded_l2_bound
    z = privacy.calibrate_skellam(target_epsilon=3.0, target_delta=1e-5, l1=l1, l2=l2, steps=30)
    eps = privacy.epsilon([("skellam", (z * l2) ** 2, l1, l2, 1.0, 30)], 1e-5)
    assert 3.0 * 0.98 <= eps <= 3.0
    # Close to the Gaussian's noise multiplier for the same 30 full-batch steps.
    sigma = privacy.calibrate_noise(target_epsilon=3.0, target_delta=1e-5, sample_rate=1.0, steps=30)
    assert sigma <= z <= 1.05 * sigma


def test_the_rotation_is_orthogonal_invertible_seeded_and_flattens_a_spike():
    rot = ddp.Rotation(seed=bytes(range(32)), dim=7850)
    assert rot.padded == ddp.padded_dim(7850) == 8192 and rot.block == 1024
    assert ddp.padded_dim(50) == 64 and ddp.padded_dim(1024) == 1024 and ddp.padded_dim(1025) == 2048
    rng = np.random.default_rng(3)
    x = rng.normal(size=7850)
    y = rot.forward(x)
    assert y.shape == (8192,) and np.linalg.norm(y) == pytest.approx(np.linalg.norm(x))
    assert np.allclose(rot.inverse(y), x, atol=1e-12)
    # linear: the sum of rotated releases is the rotation of the sum
    x2 = rng.normal(size=7850)
    assert np.allclose(rot.forward(x) + rot.forward(x2), rot.forward(x + x2))
    assert np.array_equal(ddp.Rotation(seed=bytes(range(32)), dim=7850).forward(x), y)
    assert not np.allclose(ddp.Rotation(seed=bytes(32), dim=7850).forward(x), y)
    # all the mass on one coordinate ends up spread: no coordinate above 1/sqrt(block)
    spike = np.zeros(7850)
    spike[17] = 1.0
    assert np.abs(rot.forward(spike)).max() == pytest.approx(1 / math.sqrt(1024))
    # a sum concentrated on a few coordinates: its largest coordinate after rotation is a
    # few times the RMS, not sqrt(d) times
    dense = np.zeros(7850)
    dense[:20] = rng.normal(size=20) * 100
    r = rot.forward(dense)
    assert np.abs(r).max() < 6 * np.sqrt(np.mean(r * r))
    with pytest.raises(ValueError, match="7850"):
        rot.forward(np.zeros(10))


@pytest.mark.parametrize("c", [3.0, 40.0])
def test_one_record_moves_the_rounded_release_beyond_the_tail_bound_rarely(c):
    """The coupled difference of the rounding (the same U on both sides) is the
    randomized rounding of the record's scaled gradient g: its norm exceeds the
    high-probability bound with probability at most beta (here checked at beta = 0.02
    with 4,000 draws: fewer than 2%), and never exceeds the worst-case bound."""
    rng = np.random.default_rng(4)
    dim = 400
    g = rng.uniform(-1, 1, dim) + 0.5  # fractional parts spread: the rounding's variance is large
    g *= c / np.linalg.norm(g)
    a = rng.normal(size=dim) * 30
    enc = ddp.Encoding(clip=c, scale=1.0, dim=dim, beta=0.02)
    assert enc.tail_l2_bound < enc.worst_l2_bound and enc.tail == 0.02
    over, norms = 0, []
    for seed in range(4000):
        u = np.random.default_rng(seed)
        d = ddp.randomized_round(a + g, u) - ddp.randomized_round(a, np.random.default_rng(seed))
        n = float(np.linalg.norm(d))
        norms.append(n)
        over += n > enc.tail_l2_bound
        assert n <= enc.worst_l2_bound
    assert over / 4000 < 0.02
    # and the bound is not loose by much: the mean squared norm is c^2 + sum p(1 - p)
    assert np.mean(np.square(norms)) <= c * c + dim / 4
    assert enc.tail_l2_bound ** 2 < 1.6 * (c * c + dim / 4)
    # beta = 0 (or a bound no better than the worst case): the worst case, no tail
    assert ddp.Encoding(clip=c, scale=1.0, dim=dim).rounded_l2_bound == enc.worst_l2_bound
    assert ddp.Encoding(clip=c, scale=1.0, dim=dim).tail == 0.0


def test_a_tail_bound_release_is_accounted_at_delta_less_its_betas():
    enc = ddp.Encoding(clip=0.2, scale=4000.0, dim=40960, beta=1e-6)
    l1, l2 = enc.rounded_l1_bound, enc.rounded_l2_bound
    assert l2 < 0.82 * enc.worst_l2_bound
    mu = (8.0 * l2) ** 2
    entry = privacy.skellam_entry(mu=mu, l1=l1, l2=l2, share=mu, beta=1e-6, steps=30)
    assert entry == (privacy.SKELLAM, mu, l1, l2, mu, 1e-6, 30)
    assert privacy.tail([entry]) == pytest.approx(3e-5)
    orders = ddp.RDP_ORDERS
    rdp = [30 * ddp.skellam_rdp(a, mu, l1, l2) for a in orders]
    assert privacy.epsilon([entry], 1e-4) == pytest.approx(ddp.rdp_to_epsilon(rdp, orders, 1e-4 - 3e-5))
    assert privacy.epsilon([entry], 1e-4) > privacy.epsilon([entry[:5] + entry[6:]], 1e-4)
    assert privacy.epsilon([entry], 2e-5) == math.inf  # the betas alone spend more than delta
    # beta 0 is the old six-field entry; old ledgers read as they were
    assert privacy.skellam_entry(mu=mu, l1=l1, l2=l2, share=mu, steps=2) == (
        privacy.SKELLAM, mu, l1, l2, mu, 2)
    with pytest.raises(ValueError, match="out of range"):
        privacy.epsilon([(privacy.SKELLAM, mu, l1, l2, mu, 0.5, 1)], 1e-5)


@pytest.mark.parametrize("bits", [8, 12, 13, 16, 31, 62])
def test_bit_packing_round_trips_and_costs_bits_per_value(bits):
    rng = np.random.default_rng(bits)
    v = rng.integers(0, 1 << bits, 1001, dtype=np.int64)
    packed = ddp.pack(v, bits)
    assert packed.dtype == np.uint8 and packed.size == -(-1001 * bits // 8)
    assert np.array_equal(ddp.unpack(packed, bits, 1001), v)
    with pytest.raises(ValueError, match="integers in"):
        ddp.pack(np.array([1 << bits]), bits)
    with pytest.raises(ValueError, match="bytes"):
        ddp.unpack(packed[:-1], bits, 1001)


def test_the_noise_scale_fills_the_field_with_k_standard_deviations():
    kw = dict(clip=0.2, dim=40960, noise_multiplier=8.0, members=10, threshold=9)
    for bits, signal in ((16, 1.8), (20, 0.0), (14, 5.0)):
        scale = ddp.noise_scale(bits=bits, signal=signal, sigmas=4.0, **kw)
        enc = ddp.Encoding(clip=0.2, scale=scale, dim=40960, beta=ddp.ROUNDING_BETA)
        std = math.sqrt(64.0 * 10 / 9 * enc.rounded_l2_bound ** 2 + (scale * signal) ** 2)
        assert 4.0 * std == pytest.approx(2.0 ** (bits - 1), rel=1e-9)
    # the field's noise check: two standard deviations of the honest noise must fit
    assert ddp.field_problem(bits=16, noise_variance=(2.0 ** 14) ** 2 * 0.99) is None
    assert "would wrap" in ddp.field_problem(bits=16, noise_variance=(2.0 ** 14) ** 2 * 1.01)
    with pytest.raises(ValueError, match="more secagg-bits"):
        ddp.noise_scale(bits=12, signal=1.0, sigmas=4.0, **kw)


def test_the_signal_estimate_takes_the_noise_out_and_keeps_a_floor():
    rng = np.random.default_rng(5)
    signal, noise = rng.normal(size=40_000) * 3.0, rng.normal(size=40_000) * 4.0
    est = ddp.signal_rms(signal + noise, noise_variance=16.0)
    assert est == pytest.approx(3.0, rel=0.05)
    # noise alone, or noise larger than announced: half the RMS, never zero
    assert ddp.signal_rms(noise, noise_variance=16.0) == pytest.approx(2.0, rel=0.05)
    assert ddp.signal_rms(noise, noise_variance=1e9) == pytest.approx(2.0, rel=0.05)


def test_auto_bits_are_the_fewest_at_which_rounding_adds_at_most_two_percent():
    room = dict(clip=0.2, dim=39_936, members=10, threshold=9, sigmas=4.0)
    # the default federation at epsilon 3 (z = 8.22 for 30 releases) and at 0.5 (z = 42)
    assert ddp.auto_bits(noise_multiplier=8.22, **room) == 16
    assert ddp.auto_bits(noise_multiplier=42.0, **room) == 18
    for z in (3.5, 8.22, 42.0):
        bits = ddp.auto_bits(noise_multiplier=z, **room)
        assert ddp.rounding_excess(bits=bits, noise_multiplier=z, **room) <= ddp.AUTO_EXCESS
        assert ddp.rounding_excess(bits=bits - 1, noise_multiplier=z, **room) > ddp.AUTO_EXCESS
    # a field that cannot hold the noise at all is no candidate
    assert ddp.rounding_excess(bits=12, noise_multiplier=8.22, **room) == math.inf
