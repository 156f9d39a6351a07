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
