"""Accounting: pinned values, an independent library, calibration, and the budget guard."""

import math
import random

import dp_accounting
import pytest
from opacus.accountants import RDPAccountant

from client.budget import plan_spend
from client.ledger import Ledger
from common import privacy
from common.config import resolve_config
from common.errors import BudgetExceeded


def dp_accounting_epsilon(history, delta):
    """epsilon from Google's dp-accounting (independent RDP implementation)."""
    acc = dp_accounting.rdp.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    for sigma, q, steps in history:
        acc.compose(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
        )
    return acc.get_epsilon(delta)


def test_rdp_matches_pinned_opacus_value():
    # The value Opacus' own tests pin: sigma=1.5, q=0.04, 2250 steps, delta=1e-5.
    assert privacy.epsilon([(1.5, 0.04, 2250)], 1e-5) == pytest.approx(7.3291, abs=1e-3)


@pytest.mark.parametrize(
    "history",
    [
        [(1.5, 0.04, 2250)],
        [(0.8, 0.1, 100)],
        [(2.0, 0.2, 60), (2.0, 0.2, 60), (3.0, 0.5, 10)],
        [(5.0, 1.0, 20)],
    ],
)
def test_rdp_agrees_with_dp_accounting(history):
    ours = privacy.epsilon(history, 1e-5, "rdp")
    assert ours == pytest.approx(dp_accounting_epsilon(history, 1e-5), rel=0.01)


@pytest.mark.parametrize("history", [[(1.0, 0.05, 500)], [(5.0, 1.0, 15)], [(2.0, 0.2, 60)]])
def test_prv_agrees_with_dp_accounting_pld(history):
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    for sigma, q, steps in history:
        pld.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    ours = privacy.epsilon(history, 1e-5, "prv")
    assert ours == pytest.approx(pld.get_epsilon(1e-5), rel=0.01)


def test_prv_is_close_to_and_below_rdp():
    hist = [(1.0, 0.05, 500)]
    prv, rdp = privacy.epsilon(hist, 1e-5, "prv"), privacy.epsilon(hist, 1e-5, "rdp")
    assert 0.5 * rdp < prv <= rdp * 1.01


@pytest.mark.parametrize("target,q,steps", [(3.0, 0.1, 200), (1.0, 0.2, 50), (8.0, 1.0, 30)])
def test_calibrate_then_recompute_is_at_or_below_target(target, q, steps):
    sigma = privacy.calibrate_noise(
        target_epsilon=target, target_delta=1e-5, sample_rate=q, steps=steps
    )
    eps = privacy.epsilon([(sigma, q, steps)], 1e-5)
    assert eps <= target
    assert eps > 0.97 * target  # not wastefully noisy


def test_history_merges_and_composes_like_one_run():
    rounds = [(1.2, 0.1, 10)] * 7
    assert privacy.merge_history(rounds) == [(1.2, 0.1, 70)]
    assert privacy.epsilon(rounds, 1e-5) == privacy.epsilon([(1.2, 0.1, 70)], 1e-5)


def test_empty_history_is_zero_and_no_noise_is_infinite():
    assert privacy.epsilon([], 1e-5) == 0.0
    assert math.isinf(privacy.epsilon([(0.0, 0.1, 5)], 1e-5))


def test_history_entries_are_validated():
    with pytest.raises(ValueError):
        privacy.merge_history([(1.0, 1.5, 3)])
    with pytest.raises(ValueError):
        privacy.merge_history([(1.0, 0.5)])


def test_poisson_plan_matches_opacus_dataloader():
    assert privacy.poisson_plan(600, 64, 2) == (0.1, 20)
    assert privacy.poisson_plan(600, 600, 1) == (1.0, 1)
    assert privacy.poisson_plan(600, 0, 3) == (1.0, 3)  # 0: full batch
    with pytest.raises(ValueError):
        privacy.poisson_plan(0, 64, 1)


def test_planned_participations():
    kw = dict(num_rounds=50, clients_per_round=10, num_clients=100, margin=2.0)
    assert privacy.planned_participations(calibrate_for="run", **kw) == 50
    assert privacy.planned_participations(calibrate_for="participations", **kw) == 10


@pytest.mark.parametrize("seed", range(5))
def test_epsilon_never_exceeds_budget_however_rounds_fall(seed):
    """Random configs and random participation: the guard refuses before the budget."""
    rng = random.Random(seed)
    target = rng.choice([0.5, 1.0, 3.0, 8.0])
    overrides = {
        "target-epsilon": target,
        "batch-size": rng.choice([16, 64, 200]),
        "local-epochs": rng.choice([1, 2]),
        "calibrate-for": rng.choice(["run", "participations"]),
        "participation-margin": rng.choice([1.0, 1.5]),
        "noise-multiplier": rng.choice([0.0, 0.0, 0.7, 3.0]),
    }
    cfg = resolve_config(overrides)
    ledger, refused, trained = Ledger(), 0, 0
    planned = rng.randint(1, 10)
    for _ in range(40):  # far more rounds than calibrated for
        if rng.random() < 0.5:
            continue
        try:
            plan = plan_spend(ledger, num_examples=600, train=cfg.train, priv=cfg.privacy,
                              planned_rounds=planned, client="c")
        except BudgetExceeded:
            refused += 1
            continue
        ledger.spend(plan.entry)
        trained += 1
        assert ledger.epsilon(1e-5, "rdp") <= target
    if overrides["noise-multiplier"] == 0.0 and trained + refused > planned:
        assert refused > 0  # calibrated for `planned` rounds: more must be refused


def test_guard_message_states_the_privacy_consequence():
    cfg = resolve_config({"target-epsilon": 1.0, "noise-multiplier": 0.5})
    with pytest.raises(BudgetExceeded, match=r"client 7 would reach epsilon=.* > budget 1.0"):
        plan_spend(Ledger(), num_examples=600, train=cfg.train, priv=cfg.privacy,
                   planned_rounds=1, client="client 7")


def test_epsilon_from_the_per_step_cache_is_opacus_compute_rdp_bit_for_bit():
    """RDP is computed once per (q, sigma) and multiplied by the steps, as compute_rdp
    itself does: the same epsilon to the last bit as Opacus over the whole history."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = RDPAccountant.DEFAULT_ALPHAS
    rng = random.Random(7)
    for _ in range(2):
        history = [(rng.uniform(0.3, 5.0), rng.uniform(0.001, 1.0), rng.randint(1, 3000))
                   for _ in range(rng.randint(1, 3))]
        rdp = sum(compute_rdp(q=q, noise_multiplier=s, steps=t, orders=orders)
                  for s, q, t in privacy.merge_history(history))
        expected = float(get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)[0])
        assert privacy.epsilon(history, 1e-5) == expected
