"""The one-run privacy audit: the bound on synthetic scores with known answers, the
canary design, and whole audit runs (the real ServerApp loop and ClientApp, in process)
that must catch a mechanism whose noise was secretly turned down and must not accuse a
correct one."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from scipy import stats

from client.trainer import BROKEN_NOISE_ENV, finite_step
from common import audit
from common.records import RunDir
from server import app as server_app
from tests.helpers import TINY_DATA, run_config
from tests.local_grid import LocalGrid

# ---- the bound ---------------------------------------------------------------------------


def test_the_p_value_is_the_binomial_tail_without_delta_and_grows_with_delta():
    for eps in (0.0, 0.5, 2.0):
        q = math.exp(eps) / (1 + math.exp(eps))
        for r, v in ((10, 7), (100, 80), (500, 500)):
            assert audit.p_value(1000, r, v, eps, 0.0) == pytest.approx(stats.binom.sf(v - 1, r, q))
            assert audit.p_value(1000, r, v, eps, 1e-5) >= audit.p_value(1000, r, v, eps, 0.0)
    # more epsilon claimed: more correct guesses are plausible
    assert audit.p_value(1000, 100, 80, 1.0, 1e-5) > audit.p_value(1000, 100, 80, 0.5, 1e-5)


def test_perfect_guesses_refute_exactly_the_epsilon_the_binomial_gives():
    """All r guesses right, delta 0: the claim is refuted while q^r <= alpha, so the bound
    is log(q / (1 - q)) at q = alpha^(1/r) (alpha: 0.05 over the guess counts tried)."""
    m = 1000
    member = np.random.default_rng(0).random(m) < 0.5
    got = audit.epsilon_lower_bound(member.astype(float) + np.linspace(0, 0.5, m), member, 0.0)
    r = got["guesses"]
    assert got["correct"] == r
    q = (audit.SIGNIFICANCE / len(audit.guess_counts(m))) ** (1 / r)
    assert got["epsilon_lower_bound"] == pytest.approx(math.log(q / (1 - q)), abs=1e-4)


@pytest.mark.parametrize("eps0", [0.5, 1.0, 2.0, 4.0])
def test_randomized_response_at_eps0_is_never_accused_and_is_found_with_many_canaries(eps0):
    """Scores from eps0-DP randomized response (the worst case for eps0): the bound stays
    at most eps0 over seeds, and with 10^5 canaries it comes within 25% of it."""
    for seed in range(10):
        rng = np.random.default_rng(seed)
        member = rng.random(1000) < 0.5
        said = np.where(rng.random(1000) < 1 / (1 + math.exp(-eps0)), member, ~member)
        got = audit.epsilon_lower_bound(said + rng.random(1000) * 1e-3, member, 1e-5)
        assert got["epsilon_lower_bound"] <= eps0
    rng = np.random.default_rng(99)
    member = rng.random(100_000) < 0.5
    said = np.where(rng.random(100_000) < 1 / (1 + math.exp(-eps0)), member, ~member)
    got = audit.epsilon_lower_bound(said + rng.random(100_000) * 1e-3, member, 0.0)
    assert 0.75 * eps0 <= got["epsilon_lower_bound"] <= eps0


def test_scores_that_carry_nothing_give_a_zero_bound_and_auc_near_one_half():
    rng = np.random.default_rng(3)
    member = rng.random(2000) < 0.5
    scores = rng.standard_normal(2000)
    assert audit.epsilon_lower_bound(scores, member, 1e-5)["epsilon_lower_bound"] == 0.0
    assert abs(audit.auc(scores, member) - 0.5) < 0.05
    assert audit.auc(member.astype(float), member) == 1.0
    assert audit.tpr_at_fpr(member.astype(float), member) == 1.0


def test_bad_scores_are_refused_by_name():
    with pytest.raises(ValueError, match="finite"):
        audit.epsilon_lower_bound(np.array([1.0, math.nan]), np.array([True, False]), 1e-5)
    with pytest.raises(ValueError, match="same length"):
        audit.epsilon_lower_bound(np.zeros(3), np.zeros(2, dtype=bool), 1e-5)


# ---- the canaries --------------------------------------------------------------------------


def test_canary_slots_fill_every_partition_and_hide_membership_only_in_their_content():
    c = audit.Canaries(count=205, partitions=10, shape=(1, 28, 28), seed=7)
    again = audit.Canaries(count=205, partitions=10, shape=(1, 28, 28), seed=7)
    assert np.array_equal(c.inputs([3, 4]), again.inputs([3, 4]))
    assert np.array_equal(c.membership(), again.membership())
    assert not np.array_equal(c.membership(), audit.Canaries(205, 10, (1, 28, 28), 8).membership())
    assert 80 < c.membership().sum() < 125
    member = c.membership()
    total = 0
    for p in range(10):
        x, y = c.slots(p)
        ids = c.of_partition(p)
        assert len(x) == len(y) == audit.slot_count(205, 10, p) == len(ids)
        assert (c.partition()[ids] == p).all()
        # a slot is its canary exactly when the canary is in training, else all NaN
        assert np.array_equal(np.isfinite(x).all(axis=(1, 2, 3)), member[ids])
        assert np.isnan(x[~member[ids]]).all()
        assert np.array_equal(x[member[ids]], c.inputs(ids)[member[ids]])
        total += len(x)
    assert total == 205
    assert audit.slot_count(205, 10, 10) == 0 and len(c.of_partition(-1)) == 0


def test_a_null_record_contributes_nothing_to_a_non_private_step():
    """The non-private baseline has no per-sample gradients: a NaN record is found by its
    loss and left out, and the rest of the batch still trains (not the whole batch lost)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x = torch.randn(5, 4)
    y = torch.tensor([0, 1, 2, 0, 1])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with_null = torch.cat([x, torch.full((1, 4), math.nan)])
    _, used = finite_step(model, opt, torch.nn.CrossEntropyLoss(), with_null, torch.cat([y, y[:1]]))
    grads = [p.grad.clone() for p in model.parameters()]
    assert len(used) == 5
    finite_step(model, opt, torch.nn.CrossEntropyLoss(), x, y)
    for g, p in zip(grads, model.parameters(), strict=True):
        assert torch.equal(g, p.grad)


# ---- whole audit runs, in process ----------------------------------------------------------


def _audit_run(tmp_path, **overrides):
    """The real ServerApp main loop against the real ClientApp of 10 nodes (tiny data)."""
    over = {"audit-canaries": 200, "num-rounds": 10, "fraction-train": 0.5, **overrides}
    grid = LocalGrid(10, **over)
    rc = {**run_config(**over), "output-dir": str(tmp_path)}
    server_app.main(grid, Context(run_id=7, node_id=0, node_config={}, state=RecordDict(),
                                  run_config=rc))
    (run,) = [RunDir(p) for p in tmp_path.iterdir() if p.is_dir()]
    return run


@pytest.mark.parametrize("secure", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["local-noise", "secure-aggregation"])
def test_the_audit_catches_noise_secretly_turned_down(tmp_path, monkeypatch, secure):
    """Each client adds 5% of the noise its ledger records: the ledgers say epsilon 1,
    the canaries say far more."""
    monkeypatch.setenv(BROKEN_NOISE_ENV, "0.05")
    extra = {"secure-aggregation": "secagg+", "noise": "distributed"} if secure else {}
    run = _audit_run(tmp_path, **{"target-epsilon": 1.0, **extra})
    result = run.audit()
    assert result["epsilon"] <= 1.0
    assert result["epsilon_lower_bound"] > result["epsilon"]
    assert run.summary().epsilon_lower_bound == pytest.approx(result["epsilon_lower_bound"])


@pytest.mark.parametrize("secure", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["local-noise", "secure-aggregation"])
def test_a_correct_mechanism_is_never_accused(tmp_path, secure):
    extra = {"secure-aggregation": "secagg+", "noise": "distributed"} if secure else {}
    for seed in (1, 2, 3):
        run = _audit_run(tmp_path / str(seed), **{"target-epsilon": 1.0, "seed": seed, **extra})
        result = run.audit()
        assert result["epsilon_lower_bound"] <= result["epsilon"] <= 1.0
        assert result["canaries"] == 200 and 0 < result["members"] < 200


@pytest.mark.slow  # seconds of real work; the fast suite stays under a minute
def test_without_dp_the_audit_has_power(tmp_path):
    run = _audit_run(tmp_path, dp=False)
    result = run.audit()
    assert result["epsilon"] == "inf"
    assert result["epsilon_lower_bound"] >= 2.0
    assert result["auc"] > 0.95


# ---- the command, through a real Flower simulation --------------------------------------------


@pytest.mark.slow
def test_dpfl_audit_through_a_real_simulation_catches_a_broken_mechanism(tmp_path):
    """`dpfl audit` as a user runs it (Flower's simulation runtime, Ray actors): the
    broken run is caught, the correct run with the same seed is not accused."""
    cmd = [sys.executable, "-m", "simulations.cli", "audit", "--canaries", "200", "--quiet",
           "-c", f"data-dir='{TINY_DATA}' model='logreg' num-partitions=10 num-rounds=10 "
                 "fraction-train=0.5 target-epsilon=1.0"]
    results = {}
    for name, env in (("broken", {BROKEN_NOISE_ENV: "0.05"}), ("correct", {})):
        out = tmp_path / name
        done = subprocess.run([*cmd, "--output-dir", str(out)], capture_output=True, text=True,
                              env={**_env(), **env}, cwd=Path(__file__).resolve().parent.parent)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "epsilon lower bound" in done.stdout
        (run_path,) = [p for p in out.iterdir() if p.is_dir()]
        results[name] = json.loads((run_path / "audit.json").read_text())
    assert results["broken"]["epsilon_lower_bound"] > results["broken"]["epsilon"]
    assert results["correct"]["epsilon_lower_bound"] <= results["correct"]["epsilon"]


def _env():
    import os

    return {k: v for k, v in os.environ.items() if k != BROKEN_NOISE_ENV}


def test_the_report_puts_the_lower_bound_beside_epsilon_only_for_audits():
    from simulations.report import results_markdown

    row = {"partition": "IID", "clients": 100, "target_epsilon": 3.0, "setting": "",
           "epsilon_max": 2.99, "epsilon_mean": 2.98, "epsilon_lower_bound": 0.41,
           "final_accuracy_mean": 0.85, "final_accuracy_std": 0.0, "best_accuracy_mean": 0.85,
           "best_accuracy_std": 0.0, "seeds": 1, "points": 1, "rounds": 150,
           "wall_seconds": 90.0, "status": "done", "runs": "x"}
    audited = results_markdown([row])
    assert "ε lower bound (audit)" in audited and "| 2.99 | 2.98 | 0.41 | 85.0% |" in audited
    plain = results_markdown([{**row, "epsilon_lower_bound": math.nan}])
    assert "lower bound" not in plain and "| 2.99 | 2.98 | 85.0% |" in plain
