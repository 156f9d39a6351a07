"""DP-SGD through dpfl's real trainer and ClientApp: clipping, noise, ledger, guard."""

import math

import numpy as np
import pytest
import torch

from client.app import train as client_train
from client.trainer import train_round
from common import keys, privacy
from common.config import resolve_config
from common.models import build_model, get_weights
from common.split import Split
from tests.helpers import PARTITION_SIZE, context, train_message, weights_of
from tests.test_privacy import dp_accounting_epsilon

MODES = ["hooks", "ghost", "functorch"]


def _one_step(images, labels, *, sigma, clip, lr=1.0, model="logreg", mode="hooks"):
    cfg = resolve_config({"model": model, "batch-size": len(labels), "learning-rate": lr,
                          "max-grad-norm": clip, "noise-multiplier": sigma,
                          "grad-sample-mode": mode})
    start = get_weights(build_model(model, seed=0))
    plan = privacy.RoundPlan(noise_multiplier=sigma, sample_rate=1.0, steps=1,
                             epsilon_before=0.0, epsilon_after=0.0)
    res = train_round(start, Split(images, labels), plan, train=cfg.train, priv=cfg.privacy,
                      runtime=cfg.runtime, seed=3)
    return {k: res.weights[k] - start[k] for k in start}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", [1, 8])
def test_every_per_sample_gradient_is_clipped(n, mode):
    rng = np.random.default_rng(0)
    images = (rng.normal(size=(n, 1, 28, 28)) * 3).astype(np.float32)  # raw grads >> clip
    labels = rng.integers(0, 10, size=n)
    clip = 0.1
    delta = _one_step(images, labels, sigma=1e-9, clip=clip, mode=mode)
    norm = math.sqrt(sum(float((d.astype(np.float64) ** 2).sum()) for d in delta.values()))
    # update = -lr * (sum of clipped per-sample grads) / n: each term has norm <= clip
    assert norm <= clip * (1 + 1e-4)
    if n == 1:
        assert norm > 0.99 * clip  # the raw gradient was far larger, so clipping was active


@pytest.mark.parametrize("mode", MODES)
def test_noise_has_the_right_scale(mode):
    n, sigma, clip = 50, 2.0, 0.5
    images = np.zeros((n, 1, 28, 28), dtype=np.float32)  # zero inputs: weight gradients are 0
    labels = np.arange(n) % 10
    delta = _one_step(images, labels, sigma=sigma, clip=clip, mode=mode)
    weight_key = next(k for k in delta if k.endswith("weight"))
    noise = delta[weight_key].ravel().astype(np.float64) * n  # update = -noise / n
    est = float(noise.std())
    assert abs(est / (sigma * clip) - 1) < 0.05
    for wrong in (2 / 3 * sigma, 1.5 * sigma):  # the test would reject a wrong scale
        assert abs(est / (wrong * clip) - 1) > 0.2
    assert abs(float(noise.mean())) < 4 * sigma * clip / math.sqrt(noise.size)


def _run_rounds(ctx, rounds, planned, start_round=1):
    weights = get_weights(build_model(str(ctx.run_config["model"]), seed=0))
    replies = []
    for r in range(start_round, start_round + rounds):
        reply = client_train(train_message(weights, server_round=r, planned_rounds=planned), ctx)
        replies.append(reply)
        if keys.ARRAYS in reply.content.array_records:
            weights = weights_of(reply)
    return replies


def test_ledger_over_k_rounds_equals_one_run_of_equal_steps():
    ctx = context(partition_id=3, batch_size=20)
    replies = _run_rounds(ctx, rounds=3, planned=4)
    eps = [float(r.content[keys.METRICS][keys.EPSILON]) for r in replies]
    assert eps == sorted(eps) and eps[0] > 0  # epsilon only grows
    sigma = float(replies[0].content[keys.METRICS][keys.NOISE_MULTIPLIER])
    q, steps = privacy.poisson_plan(PARTITION_SIZE, 20, 1)
    one_run = [(sigma, q, 3 * steps)]
    assert eps[-1] == pytest.approx(privacy.epsilon(one_run, 1e-5), rel=1e-9)
    assert eps[-1] == pytest.approx(dp_accounting_epsilon(one_run, 1e-5), rel=0.01)
    from opacus.accountants import RDPAccountant

    continuous = RDPAccountant()
    for _ in range(3 * steps):
        continuous.step(noise_multiplier=sigma, sample_rate=q)
    assert eps[-1] == pytest.approx(continuous.get_epsilon(1e-5), rel=1e-9)


def test_client_refuses_once_budget_is_spent_and_keeps_its_ledger():
    ctx = context(partition_id=5, batch_size=25, target_epsilon=2.0)
    replies = _run_rounds(ctx, rounds=3, planned=2)
    m = [r.content[keys.METRICS] for r in replies]
    assert [int(x[keys.REFUSED]) for x in m] == [0, 0, 1]
    assert keys.ARRAYS not in replies[2].content.array_records
    reason = str(replies[2].content[keys.PRIVACY][keys.REASON])
    assert "would reach epsilon" in reason and "budget 2.0" in reason
    assert float(m[1][keys.EPSILON]) <= 2.0
    assert float(m[2][keys.EPSILON]) == float(m[1][keys.EPSILON])  # refusal spends nothing


def test_ledger_survives_client_restart(tmp_path):
    path = tmp_path / "ledger.json"
    first = context(partition_id=7, batch_size=25, node_extra={keys.NODE_LEDGER_PATH: str(path)})
    before = _run_rounds(first, rounds=2, planned=4)
    restarted = context(partition_id=7, batch_size=25,  # fresh node state, same ledger file
                        node_extra={keys.NODE_LEDGER_PATH: str(path)})
    after = _run_rounds(restarted, rounds=1, planned=4, start_round=3)
    sigma = float(before[0].content[keys.METRICS][keys.NOISE_MULTIPLIER])
    assert float(after[0].content[keys.METRICS][keys.NOISE_MULTIPLIER]) == sigma
    q, steps = privacy.poisson_plan(PARTITION_SIZE, 25, 1)
    assert float(after[0].content[keys.METRICS][keys.EPSILON]) == pytest.approx(
        privacy.epsilon([(sigma, q, 3 * steps)], 1e-5), rel=1e-9)


def test_corrupt_ledger_file_is_an_error_not_a_reset(tmp_path, capsys):
    from client.ledger import LedgerUnavailable

    path = tmp_path / "ledger.json"
    path.write_text("{not json")
    ctx = context(partition_id=1, node_extra={keys.NODE_LEDGER_PATH: str(path)})
    with pytest.raises(LedgerUnavailable, match="trains nothing and spends nothing"):
        _run_rounds(ctx, rounds=1, planned=2)
    assert "refusing to reset epsilon" in capsys.readouterr().err  # the node's log
    assert path.read_text() == "{not json"


def test_nonprivate_baseline_reports_infinite_epsilon():
    ctx = context(partition_id=2, target_epsilon=math.inf)
    (reply,) = _run_rounds(ctx, rounds=1, planned=2)
    m = reply.content[keys.METRICS]
    assert math.isinf(float(m[keys.EPSILON])) and float(m[keys.NOISE_MULTIPLIER]) == 0.0


def test_reply_weights_are_the_plain_models():
    ctx = context(partition_id=0)
    (reply,) = _run_rounds(ctx, rounds=1, planned=2)
    names = list(reply.content[keys.ARRAYS].keys())
    assert names == list(build_model(str(ctx.run_config["model"])).state_dict().keys())
    assert not any(n.startswith("_module") for n in names)


def test_delta_must_be_below_one_over_n():
    ctx = context(partition_id=0, target_delta=0.01)  # 600 records: 1/n = 0.0017
    with pytest.raises(ValueError, match="target-delta=0.01 must be < 1/n"):
        _run_rounds(ctx, rounds=1, planned=2)


def test_noise_is_not_derived_from_the_public_seed():
    """Two private rounds with identical inputs and seed must draw different noise."""
    images = np.zeros((20, 1, 28, 28), dtype=np.float32)
    labels = np.arange(20) % 10
    a = _one_step(images, labels, sigma=1.0, clip=0.5)
    b = _one_step(images, labels, sigma=1.0, clip=0.5)
    key = next(k for k in a if k.endswith("weight"))
    assert not np.allclose(a[key], b[key])


def test_private_client_withholds_its_training_loss():
    (private,) = _run_rounds(context(partition_id=4), rounds=1, planned=2)
    (baseline,) = _run_rounds(context(partition_id=4, dp=False), rounds=1, planned=2)
    assert math.isnan(float(private.content[keys.METRICS][keys.TRAIN_LOSS]))
    assert float(baseline.content[keys.METRICS][keys.TRAIN_LOSS]) > 0


def test_ledger_dir_carries_epsilon_into_a_new_run(tmp_path):
    ledgers = tmp_path / "ledgers"
    node = {"ledger-dir": str(ledgers)}
    first = _run_rounds(context(partition_id=9, node_extra=node), rounds=1, planned=2)
    assert (ledgers / "partition-9.json").exists()
    # A new run: empty node state, same ledger folder -> epsilon continues, then the guard stops it
    again = _run_rounds(context(partition_id=9, node_extra=node, run_id=2), rounds=2, planned=2)
    eps = [float(r.content[keys.METRICS][keys.EPSILON]) for r in first + again]
    assert eps[1] > eps[0] and int(again[1].content[keys.METRICS][keys.REFUSED]) == 1


@pytest.mark.parametrize("n,batch", [(600, 32), (100, 100), (7, 3), (50, 64), (2500, 32),
                                     (3000, 1100)])
def test_direct_batches_are_the_data_loader_s_batches(n, batch):
    """A non-private epoch batches tensors directly with exactly the DataLoader's draws."""
    from torch.utils.data import DataLoader, TensorDataset

    from client.trainer import tensor_batches

    x, y = torch.randn(n, 3), torch.arange(n)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True,
                        generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    want = [(bx.tolist(), by.tolist()) for _ in range(3) for bx, by in loader]
    got = [(bx.tolist(), by.tolist()) for _ in range(3) for bx, by in tensor_batches((x, y), batch, g)]
    assert got == want


@pytest.mark.parametrize("q", [1.0, 0.1, 0.0001])
def test_poisson_batches_are_opacus_loader_s_batches_empty_ones_included(q):
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import DataLoader, TensorDataset

    from client.trainer import sampled_batches

    x, y = torch.randn(50, 3), torch.arange(50)
    base = DataLoader(TensorDataset(x, y), batch_size=max(1, int(50 * q)))
    ours, theirs = (DPDataLoader.from_data_loader(base, generator=torch.Generator().manual_seed(3))
                    for _ in range(2))
    want = [(tuple(bx.shape), by.tolist()) for _ in range(2) for bx, by in theirs]
    got = [(tuple(bx.shape), by.tolist()) for _ in range(2) for bx, by in sampled_batches((x, y), ours)]
    assert got == want
    if q < 0.01:
        assert any(shape[0] == 0 for shape, _ in got)  # an empty batch is a zero-length one


# ---- the round's fast path: plain SGD, one check at the end ---------------------------------


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_plain_sgd_is_torch_sgd_bit_for_bit(momentum):
    from client.trainer import PlainSGD

    torch.manual_seed(0)
    models = [build_model("cnn", seed=1) for _ in range(2)]
    ours = PlainSGD(models[0].parameters(), lr=0.05, momentum=momentum)
    theirs = torch.optim.SGD(models[1].parameters(), lr=0.05, momentum=momentum)
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8) % 10
    for _ in range(4):
        for model, opt in zip(models, (ours, theirs), strict=True):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values(), strict=True):
        assert torch.equal(a, b)
    start = build_model("cnn", seed=1).state_dict()
    assert not all(torch.equal(a, start[k]) for k, a in models[0].state_dict().items())


def _attempt(images, labels, *, sigma, checked, seed=11, noise_seed=12):
    from client.trainer import _train

    cfg = resolve_config({"model": "logreg", "batch-size": 4, "learning-rate": 0.1,
                          "max-grad-norm": 1.0, "noise-multiplier": sigma})
    plan = privacy.RoundPlan(noise_multiplier=sigma, sample_rate=4 / len(labels),
                             steps=len(labels) // 4,
                             epsilon_before=0.0, epsilon_after=0.0)
    return _train(get_weights(build_model("logreg", seed=0)), Split(images, labels), plan,
                  train=cfg.train, priv=cfg.privacy, runtime=cfg.runtime,
                  device=torch.device("cpu"), seed=seed, noise_seed=noise_seed, checked=checked)


@pytest.mark.parametrize("sigma", [0.0, 1.0], ids=["baseline", "private"])
def test_a_round_checked_only_at_its_end_is_the_round_checked_at_every_step(sigma):
    """Finite data: the unchecked attempt is the checked one, bit for bit (the same
    batches, the same noise). A NaN record: the unchecked attempt gives up (None) and
    the checked one trains without it. (train_round makes the unchecked attempt for the
    non-private baseline only; a private round is checked at every step.)"""
    rng = np.random.default_rng(3)
    images = rng.normal(size=(24, 1, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, size=24)
    fast, slow = (_attempt(images, labels, sigma=sigma, checked=c) for c in (False, True))
    assert fast is not None and slow is not None
    assert all(np.array_equal(fast.weights[k], slow.weights[k]) for k in fast.weights)
    assert fast.train_loss == slow.train_loss or (math.isnan(fast.train_loss)
                                                  and math.isnan(slow.train_loss))
    images[5] = np.nan
    assert _attempt(images, labels, sigma=sigma, checked=False) is None
    checked = _attempt(images, labels, sigma=sigma, checked=True)
    assert checked is not None and all(np.isfinite(w).all() for w in checked.weights.values())


def test_train_round_with_a_nan_record_returns_a_finite_model():
    """Through train_round itself: the unchecked attempt fails, the checked one is released."""
    rng = np.random.default_rng(4)
    images = rng.normal(size=(32, 1, 28, 28)).astype(np.float32)
    images[7, 0, 3, 3] = np.inf
    labels = rng.integers(0, 10, size=32)
    cfg = resolve_config({"model": "logreg", "batch-size": 8, "target-epsilon": math.inf})
    plan = privacy.RoundPlan(noise_multiplier=0.0, sample_rate=0.25, steps=4,
                             epsilon_before=0.0, epsilon_after=math.inf)
    res = train_round(get_weights(build_model("logreg", seed=0)), Split(images, labels), plan,
                      train=cfg.train, priv=cfg.privacy, runtime=cfg.runtime, seed=1)
    assert all(np.isfinite(w).all() for w in res.weights.values()) and math.isfinite(res.train_loss)


@pytest.mark.parametrize("sigma", [0.0, 1.0], ids=["baseline", "private"])
def test_a_private_round_never_trains_twice(monkeypatch, sigma):
    """Whether a round trains a second time must not depend on a private client's
    records (its duration would tell the server): a private round makes one, checked,
    attempt; the baseline may make an unchecked one first."""
    import client.trainer as trainer

    calls = []
    real = trainer._train
    monkeypatch.setattr(trainer, "_train", lambda *a, **k: calls.append(k["checked"]) or real(*a, **k))
    rng = np.random.default_rng(5)
    images = rng.normal(size=(16, 1, 28, 28)).astype(np.float32)
    images[3] = np.nan
    labels = rng.integers(0, 10, size=16)
    cfg = resolve_config({"model": "logreg", "batch-size": 4, "noise-multiplier": sigma,
                          "max-grad-norm": 1.0})
    plan = privacy.RoundPlan(noise_multiplier=sigma, sample_rate=0.25, steps=4,
                             epsilon_before=0.0, epsilon_after=0.0)
    res = train_round(get_weights(build_model("logreg", seed=0)), Split(images, labels), plan,
                      train=cfg.train, priv=cfg.privacy, runtime=cfg.runtime, seed=1)
    assert calls == ([True] if sigma else [False, True])
    assert all(np.isfinite(w).all() for w in res.weights.values())
