"""The server's reply validation: bad replies are excluded with a reason, never fatal."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, MetricRecord, RecordDict
from flwr.app.message.message import make_message

from common import keys
from common.aggregation import metrics_problem, update_problem, weighted_average
from common.models import build_model, get_weights
from server.strategy import DPFedAvg
from tests.helpers import metadata

GLOBAL = get_weights(build_model("cnn", seed=0))


def _metrics(**over):
    m = {keys.NUM_EXAMPLES: 600, keys.TRAIN_LOSS: 1.0, keys.EPSILON: 1.5,
         keys.NOISE_MULTIPLIER: 2.0, keys.SAMPLE_RATE: 0.1, keys.STEPS: 10,
         keys.PARTITION_ID: 0, keys.REFUSED: 0}
    m.update(over)
    return m


def _reply(src, weights=None, metrics=None, reason="", history="[[2.0, 0.1, 10]]"):
    content = RecordDict({
        keys.METRICS: MetricRecord(metrics or _metrics(**{keys.PARTITION_ID: src})),
        keys.PRIVACY: ConfigRecord({keys.HISTORY: history, keys.REASON: reason}),
    })
    if weights is not None:
        content[keys.ARRAYS] = keys.to_array_record(weights)
    return make_message(metadata(src=src, dst=0, reply_to="x"), content=content)


def _shifted(delta):
    return {k: (v + delta).astype(v.dtype) for k, v in GLOBAL.items()}


def _aggregate(replies, sampled=None, **kw):
    strategy = DPFedAvg(min_train_nodes=1, **kw)
    strategy._global = GLOBAL
    from server.strategy import RoundOutcome

    strategy.outcomes[1] = RoundOutcome(sampled=sampled or len(replies))
    arrays, _ = strategy.aggregate_train(1, replies)
    return strategy, strategy.outcomes[1], arrays


def test_nan_update_is_excluded_from_aggregate():
    bad = _shifted(0.0)
    first = next(iter(bad))
    bad[first] = bad[first].copy()
    bad[first].flat[0] = np.nan
    _, out, arrays = _aggregate([_reply(1, _shifted(0.1)), _reply(2, bad)])
    assert out.trained == 1 and out.invalid == 1
    assert any("non-finite" in r for r in out.reasons)
    avg = keys.from_array_record(arrays)
    assert np.allclose(avg[first], GLOBAL[first] + 0.1, atol=1e-6)


@pytest.mark.parametrize(
    "mutate,expect",
    [
        (lambda w: {k: v for k, v in list(w.items())[:-1]}, "array names differ"),
        (lambda w: {**w, next(iter(w)): np.zeros((3, 3), np.float32)}, "has shape"),
        (lambda w: {**w, next(iter(w)): next(iter(w.values())).astype(np.float64)}, "dtype"),
    ],
)
def test_mismatched_arrays_are_excluded(mutate, expect):
    _, out, arrays = _aggregate([_reply(1, _shifted(0.0)), _reply(2, mutate(_shifted(0.0)))])
    assert out.trained == 1 and out.invalid == 1 and arrays is not None
    assert any(expect in r for r in out.reasons)


@pytest.mark.parametrize(
    "metrics,expect",
    [
        (_metrics(**{keys.NUM_EXAMPLES: -5}), "positive integer"),
        (_metrics(**{keys.NUM_EXAMPLES: 2.5}), "positive integer"),
        ({k: v for k, v in _metrics().items() if k != keys.EPSILON}, "lack epsilon"),
        (_metrics(extra=1.0), "unexpected keys"),
        (_metrics(**{keys.TRAIN_LOSS: float("inf")}), "finite"),
        (_metrics(**{keys.TRAIN_LOSS: -1.0}), "finite"),
    ],
)
def test_bad_metrics_are_excluded(metrics, expect):
    _, out, _ = _aggregate([_reply(1, _shifted(0.0)), _reply(2, _shifted(0.0), metrics=metrics)])
    assert out.trained == 1 and out.invalid == 1
    assert any(expect in r for r in out.reasons)


def test_error_and_refused_replies_are_counted_with_reasons():
    err = make_message(metadata(src=3, dst=0, reply_to="x"), error=Error(code=0, reason="boom"))
    refused = _reply(4, metrics=_metrics(**{keys.REFUSED: 1, keys.NUM_EXAMPLES: 0, keys.PARTITION_ID: 4}),
                     reason="client 4 would reach epsilon=3.2 > budget 3.0")
    strategy, out, arrays = _aggregate([_reply(1, _shifted(0.0)), err, refused], sampled=4)
    assert (out.trained, out.failed, out.refused, out.timed_out) == (1, 1, 1, 1)
    assert any("boom" in r for r in out.reasons) and any("budget 3.0" in r for r in out.reasons)
    assert 4 in strategy.clients  # a refusing client's epsilon is still tracked
    assert arrays is not None


def test_below_minimum_keeps_the_global_model():
    strategy = DPFedAvg(min_train_nodes=2)
    strategy._global = GLOBAL
    arrays, metrics = strategy.aggregate_train(1, [_reply(1, _shifted(0.0))])
    assert arrays is None and metrics is None
    assert "global model is kept" in strategy.outcomes[1].reasons[-1]


def test_update_norm_bound():
    _, out, _ = _aggregate([_reply(1, _shifted(0.0)), _reply(2, _shifted(10.0))],
                           max_update_norm=5.0)
    assert out.invalid == 1 and any("exceeds max-update-norm" in r for r in out.reasons)


def test_epsilon_is_max_and_mean_not_weighted():
    replies = [_reply(1, _shifted(0.0), metrics=_metrics(**{keys.EPSILON: 1.0, keys.PARTITION_ID: 1, keys.NUM_EXAMPLES: 10})),
               _reply(2, _shifted(0.0), metrics=_metrics(**{keys.EPSILON: 3.0, keys.PARTITION_ID: 2, keys.NUM_EXAMPLES: 1000}))]
    strategy, _, _ = _aggregate(replies)
    assert strategy.epsilon_stats() == (3.0, 2.0)


def test_weighted_average_is_fedavg():
    a = {"w": np.array([0.0, 2.0], np.float32)}
    b = {"w": np.array([4.0, 6.0], np.float32)}
    out = weighted_average([a, b], [1, 3])
    assert out["w"].dtype == np.float32 and np.allclose(out["w"], [3.0, 5.0])
    assert update_problem(a, b) is None
    assert metrics_problem(_metrics()) is None


def test_server_momentum_accelerates_a_constant_update():
    strategy = DPFedAvg(min_train_nodes=1, server_learning_rate=1.0, server_momentum=0.5)
    w = GLOBAL
    steps = []
    for r in (1, 2):
        strategy._global = w
        arrays, _ = strategy.aggregate_train(r, [_reply(1, {k: v + 0.1 for k, v in w.items()})])
        new = keys.from_array_record(arrays)
        k = next(iter(new))
        steps.append(float((new[k] - w[k]).mean()))
        w = new
    assert steps[0] == pytest.approx(0.1, rel=1e-4) and steps[1] == pytest.approx(0.15, rel=1e-4)


def test_cohorts_give_every_client_the_same_number_of_rounds():
    import random
    from collections import Counter

    from server.strategy import next_cohort

    rng, queue, nodes = random.Random(0), [], list(range(100, 200))
    counts: Counter = Counter()
    for _ in range(30):  # 30 rounds x 10 clients = 3 passes over 100 nodes
        chosen, queue = next_cohort(queue, nodes, 10, rng)
        assert len(set(chosen)) == 10
        counts.update(chosen)
    assert set(counts.values()) == {3}
    chosen, _ = next_cohort(queue, nodes[:5], 10, rng)  # fewer nodes than asked: all of them
    assert sorted(chosen) == nodes[:5]


def test_cosine_schedule_and_moving_average_are_post_processing():
    strategy = DPFedAvg(min_train_nodes=1, server_lr_schedule="cosine", num_rounds=4,
                        server_ema=0.5)
    assert strategy.server_lr(1) == pytest.approx(1.0)
    assert strategy.server_lr(3) == pytest.approx(0.5)
    w, k = GLOBAL, next(iter(GLOBAL))
    for r in (1, 2):
        strategy._global = w
        arrays, _ = strategy.aggregate_train(r, [_reply(1, {n: v + 0.2 for n, v in w.items()})])
        w = keys.from_array_record(arrays)
        reported = strategy.reported_model(w)
        if r == 1:  # the average starts at the first aggregate
            assert np.allclose(reported[k], GLOBAL[k] + 0.2, atol=1e-6)
    lr2 = strategy.server_lr(2)
    assert np.allclose(w[k], GLOBAL[k] + 0.2 + 0.2 * lr2, atol=1e-5)
    assert np.allclose(reported[k], GLOBAL[k] + 0.2 + 0.1 * lr2, atol=1e-5)  # halfway: decay 0.5


@pytest.mark.parametrize("n,k", [(7, 2), (7, 5), (33, 10), (33, 20), (100, 15), (10, 3)])
def test_cohorts_never_exceed_the_planned_participations(n, k):
    """Clients' noise is calibrated for ceil(R*K/N) rounds: cohorts must never exceed it."""
    import math
    import random
    from collections import Counter

    from server.strategy import next_cohort

    for seed in range(3):
        rng, queue, counts = random.Random(seed), [], Counter()
        for r in range(1, 120):
            chosen, queue = next_cohort(queue, list(range(n)), k, rng)
            assert len(set(chosen)) == k
            counts.update(chosen)
            assert max(counts.values()) <= math.ceil(r * k / n)
