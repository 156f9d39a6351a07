"""The server, job by job: reply classification, aggregation with exclusions, the server
optimizer, cohort sampling. Bad replies are excluded with a reason, never fatal."""

import math
import random
from collections import Counter

import numpy as np
import pytest

from common import keys
from common.aggregation import metrics_problem, multikrum_indices, update_problem, weighted_average
from common.models import build_model, get_weights
from server import optimizer
from server.cohorts import next_cohort
from server.replies import Accepted, NodeInfo, Rejected, classify, read_privacy
from tests.helpers import aggregate, new_strategy, reply_metrics, train_reply

GLOBAL = get_weights(build_model("logreg", seed=0))


def _shifted(delta):
    return {k: (v + delta).astype(v.dtype) for k, v in GLOBAL.items()}


# ---- classification: a value, no side effects ----------------------------------------


def test_classify_returns_accepted_with_the_decoded_update():
    verdict = classify(train_reply(1, _shifted(0.1)), reference=GLOBAL, nodes={})
    assert isinstance(verdict, Accepted) and verdict.partition_id == 1
    assert np.allclose(next(iter(verdict.update.values())), next(iter(GLOBAL.values())) + 0.1)


@pytest.mark.parametrize("mutate,expect", [
    (lambda w: {k: v for k, v in list(w.items())[:-1]}, "array names differ"),
    (lambda w: {**w, next(iter(w)): np.zeros((3, 3), np.float32)}, "has shape"),
    (lambda w: {**w, next(iter(w)): next(iter(w.values())).astype(np.float64)}, "dtype"),
    (lambda w: {**w, next(iter(w)): np.full_like(next(iter(w.values())), np.nan)}, "non-finite"),
])
def test_mismatched_or_non_finite_arrays_are_rejected(mutate, expect):
    verdict = classify(train_reply(2, mutate(_shifted(0.0))), reference=GLOBAL, nodes={})
    assert isinstance(verdict, Rejected) and verdict.kind == "invalid" and expect in verdict.reason


@pytest.mark.parametrize("metrics,expect", [
    (reply_metrics(2, num_examples=-5), "positive integer"),
    (reply_metrics(2, num_examples=2.5), "positive integer"),
    ({k: v for k, v in reply_metrics(2).items() if k != keys.EPSILON}, "lack epsilon"),
    (reply_metrics(2, extra=1.0), "unexpected keys"),
    (reply_metrics(2, train_loss=math.inf), "finite"),
    (reply_metrics(2, train_loss=-1.0), "finite"),
])
def test_bad_metrics_are_rejected(metrics, expect):
    verdict = classify(train_reply(2, _shifted(0.0), metrics=metrics), reference=GLOBAL, nodes={})
    assert isinstance(verdict, Rejected) and verdict.kind == "invalid" and expect in verdict.reason


def test_a_client_cannot_buy_weight_or_speak_for_another_partition():
    nodes = {10: NodeInfo(0, 100, False), 11: NodeInfo(1, 100, False), 12: NodeInfo(2, 100, False)}
    sizes = {0: 100, 1: 100, 2: 100}

    def judge(src, pid, n):
        return classify(train_reply(src, GLOBAL, metrics=reply_metrics(pid, num_examples=n)),
                        reference=GLOBAL, nodes=nodes, partition_sizes=sizes)

    assert isinstance(judge(10, 0, 100), Accepted)
    assert "exceeds the 100 records partition 1 holds" in judge(11, 1, 100_000).reason
    assert "claims partition 0 but the node holds partition 2" in judge(12, 0, 100).reason


def test_own_data_nodes_are_bounded_by_what_they_declared():
    nodes = {10: NodeInfo(0, 900, True)}

    def judge(n):
        return classify(train_reply(10, GLOBAL, metrics=reply_metrics(0, num_examples=n)),
                        reference=GLOBAL, nodes=nodes, partition_sizes={0: 100})

    assert isinstance(judge(900), Accepted) and isinstance(judge(901), Rejected)


def test_update_norm_bound():
    verdict = classify(train_reply(1, _shifted(10.0)), reference=GLOBAL, nodes={}, max_update_norm=5.0)
    assert isinstance(verdict, Rejected) and "exceeds max-update-norm" in verdict.reason


def test_the_audit_scorer_reads_the_verdict_aggregation_took():
    """An audit run's scorer used to classify each reply again, without the update-norm
    bound, so it could score an update that aggregation had rejected. Now both read
    the strategy's one verdict of the reply."""
    from server.replies import NodeInfo

    s = new_strategy(partition_sizes={1: 100}, max_update_norm=5.0)
    s.cohorts.nodes[1] = NodeInfo(1, 100, False)
    reply = train_reply(1, _shifted(10.0), metrics=reply_metrics(1))
    judged = s.judge(reply, GLOBAL)
    assert isinstance(judged.verdict, Rejected) and s.verdict(reply, GLOBAL) is judged.verdict
    again = train_reply(1, _shifted(10.0), metrics=reply_metrics(1))  # not judged yet
    assert isinstance(s.verdict(again, GLOBAL), Rejected)
    # what the scorer did before: a verdict of its own, without the bound
    assert isinstance(classify(reply, reference=GLOBAL, nodes=s.cohorts.nodes,
                               partition_sizes=s.partition_sizes), Accepted)


def test_read_privacy_uses_the_declared_partition_and_bounds_the_history():
    nodes = {10: NodeInfo(4, 100, False)}
    reported = read_privacy(train_reply(10, metrics=reply_metrics(9), history="[[2.0, 0.5, 3]]"), nodes)
    assert reported is not None and reported.partition_id == 4 and reported.history == [[2.0, 0.5, 3]]
    assert read_privacy(train_reply(10, history="[[2.0, 0.5, 3]"), nodes) is None  # unreadable
    assert read_privacy(train_reply(10, error="boom"), nodes) is None


# ---- aggregation: exclusions, counts, privacy first ------------------------------------


def test_nan_update_is_excluded_from_the_aggregate():
    bad = {**_shifted(0.0), next(iter(GLOBAL)): np.full_like(next(iter(GLOBAL.values())), np.nan)}
    out, model = aggregate(new_strategy(server_momentum=0.0, server_lr_schedule="constant",
                                        server_ema=0.0),
                           [train_reply(1, _shifted(0.1)), train_reply(2, bad)], GLOBAL)
    assert out.trained == 1 and out.invalid == 1 and any("non-finite" in r for r in out.reasons)
    first = next(iter(GLOBAL))
    assert np.allclose(model[first], GLOBAL[first] + 0.1, atol=1e-6)


def test_error_and_refused_replies_are_counted_with_reasons():
    refused = train_reply(4, metrics=reply_metrics(4, refused=1, num_examples=0),
                          reason="client 4 would reach epsilon=3.2 > budget 3.0")
    s = new_strategy()
    out, model = aggregate(s, [train_reply(1, _shifted(0.0)), train_reply(3, error="boom"), refused],
                           GLOBAL, sampled=4)
    assert (out.trained, out.failed, out.refused, out.timed_out) == (1, 1, 1, 1)
    assert any("boom" in r for r in out.reasons) and any("budget 3.0" in r for r in out.reasons)
    assert 4 in s.privacy.clients  # a refusing client's epsilon is still tracked
    assert model is not None


def test_below_minimum_keeps_the_global_model():
    out, model = aggregate(new_strategy(min_train_clients=2), [train_reply(1, _shifted(0.0))], GLOBAL)
    assert model is None and "global model is kept" in out.reasons[-1]


def test_epsilon_is_max_and_mean_over_clients_not_weighted():
    cheap = "[[100.0, 0.01, 1]]"  # its own epsilon is far below the claims
    replies = [train_reply(1, GLOBAL, metrics=reply_metrics(1, epsilon=1.0, num_examples=10), history=cheap),
               train_reply(2, GLOBAL, metrics=reply_metrics(2, epsilon=3.0, num_examples=100), history=cheap)]
    s = new_strategy()
    aggregate(s, replies, GLOBAL)
    assert s.privacy.epsilon_stats() == (3.0, 2.0)


def test_epsilon_is_recorded_from_replies_that_fail_validation_and_silence_is_marked():
    from common import privacy

    s = new_strategy(nodes={10: NodeInfo(0, 100, False), 11: NodeInfo(1, 100, False)})
    bad = {**GLOBAL, next(iter(GLOBAL)): np.full_like(next(iter(GLOBAL.values())), np.nan)}
    replies = [train_reply(10, bad, metrics=reply_metrics(0), history="[[1.0, 1.0, 30]]"),
               train_reply(11, GLOBAL, metrics=reply_metrics(1))]
    out, _ = aggregate(s, replies, GLOBAL, sampled=3, partitions=[0, 1, 2])
    assert out.invalid == 1
    eps0 = s.privacy.clients[0].epsilon
    assert eps0 == pytest.approx(privacy.epsilon([(1.0, 1.0, 30)], 1e-5)) and eps0 > 1.0
    assert s.privacy.clients[2].unconfirmed_rounds == [1] and s.privacy.clients[1].unconfirmed_rounds == []
    assert s.privacy.epsilon_stats()[0] == eps0


def test_weighted_average_is_fedavg():
    a = {"w": np.array([0.0, 2.0], np.float32)}
    b = {"w": np.array([4.0, 6.0], np.float32)}
    out = weighted_average([a, b], [1, 3])
    assert out["w"].dtype == np.float32 and np.allclose(out["w"], [3.0, 5.0])
    assert update_problem(a, b) is None
    assert metrics_problem(reply_metrics()) is None


def test_multikrum_picks_what_flowers_multikrum_picks():
    """dpfl's Krum works on arrays; Flower's works on RecordDicts. Same choice."""
    from flwr.app import RecordDict
    from flwr.serverapp.strategy.multikrum import select_multikrum

    from common.arrays import to_array_record

    rng = np.random.default_rng(0)
    ups = [{"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
           for _ in range(9)]
    ups[2] = {k: v * 50 for k, v in ups[2].items()}
    for f, m in ((1, 1), (2, 3), (0, 5)):
        contents = [RecordDict({"arrays": to_array_record(u)}) for u in ups]
        chosen = select_multikrum(contents, num_malicious_nodes=f, num_nodes_to_select=m)
        expected = sorted(contents.index(c) for c in chosen)
        assert sorted(multikrum_indices(ups, f, m)) == expected and 2 not in expected


# ---- the server optimizer: a pure step ---------------------------------------------------


def test_server_momentum_accelerates_a_constant_update():
    opt = optimizer.ServerOptimizer(learning_rate=1.0, momentum=0.5)
    state, w, steps = optimizer.OptimizerState(), GLOBAL, []
    for r in (1, 2):
        state, new = optimizer.step(opt, state, r, w, {k: v + 0.1 for k, v in w.items()})
        k = next(iter(new))
        steps.append(float((new[k] - w[k]).mean()))
        w = new
    assert steps[0] == pytest.approx(0.1, rel=1e-4) and steps[1] == pytest.approx(0.15, rel=1e-4)


def test_the_step_is_pure_and_plain_fedavg_without_momentum_schedule_or_average():
    opt = optimizer.ServerOptimizer()
    state = optimizer.OptimizerState()
    avg = _shifted(0.3)
    s1, m1 = optimizer.step(opt, state, 1, GLOBAL, avg)
    s2, m2 = optimizer.step(opt, state, 1, GLOBAL, avg)
    assert state.velocity == {} and all(np.array_equal(m1[k], m2[k]) for k in m1)
    assert all(np.allclose(m1[k], avg[k]) for k in avg)
    assert optimizer.reported(opt, s1, m1) is m1


def test_cosine_schedule_and_moving_average_are_post_processing():
    opt = optimizer.ServerOptimizer(schedule="cosine", num_rounds=4, ema=0.5)
    assert opt.lr(1) == pytest.approx(1.0) and opt.lr(3) == pytest.approx(0.5)
    state, w, k = optimizer.OptimizerState(), GLOBAL, next(iter(GLOBAL))
    for r in (1, 2):
        state, w = optimizer.step(opt, state, r, w, {n: v + 0.2 for n, v in w.items()})
        reported = optimizer.reported(opt, state, w)
        if r == 1:  # the average starts at the first aggregate
            assert np.allclose(reported[k], GLOBAL[k] + 0.2, atol=1e-6)
    lr2 = opt.lr(2)
    assert np.allclose(w[k], GLOBAL[k] + 0.2 + 0.2 * lr2, atol=1e-5)
    assert np.allclose(reported[k], GLOBAL[k] + 0.2 + 0.1 * lr2, atol=1e-5)  # halfway: decay 0.5


# ---- cohorts -----------------------------------------------------------------------------


def test_cohorts_give_every_client_the_same_number_of_rounds():
    rng, queue, nodes = random.Random(0), [], list(range(100, 200))
    counts: Counter = Counter()
    for _ in range(30):  # 30 rounds x 10 clients = 3 passes over 100 nodes
        chosen, queue = next_cohort(queue, nodes, 10, rng)
        assert len(set(chosen)) == 10
        counts.update(chosen)
    assert set(counts.values()) == {3}
    chosen, _ = next_cohort(queue, nodes[:5], 10, rng)  # fewer nodes than asked: all of them
    assert sorted(chosen) == nodes[:5]


@pytest.mark.parametrize("n,k", [(7, 2), (7, 5), (33, 10), (33, 20), (100, 15), (10, 3)])
def test_cohorts_never_exceed_the_planned_participations(n, k):
    """Clients' noise is calibrated for ceil(R*K/N) rounds: cohorts must never exceed it."""
    for seed in range(3):
        rng, queue, counts = random.Random(seed), [], Counter()
        for r in range(1, 120):
            chosen, queue = next_cohort(queue, list(range(n)), k, rng)
            assert len(set(chosen)) == k
            counts.update(chosen)
            assert max(counts.values()) <= math.ceil(r * k / n)


@pytest.mark.parametrize("data", [b"not an npy array", b"\x93NUMPY\x01\x00", None],
                         ids=["garbage", "cut", "a 36 TiB claim"])
def test_an_unreadable_model_is_rejected_not_fatal(data):
    """One client's model that cannot be read (garbage, a cut header, a shape no memory
    holds) rejects that reply; the round goes on."""
    from flwr.app import Array

    from common import keys
    from common.models import build_model, get_weights
    from server.replies import Rejected, classify
    from tests.helpers import train_reply

    ref = dict(get_weights(build_model("logreg", seed=0)))
    msg = train_reply(3, ref)
    good = msg.content[keys.ARRAYS]["1.bias"].data
    bad = data if data is not None else good.replace(b"(10,)", b"(10000000000000,)")
    msg.content[keys.ARRAYS]["1.bias"] = Array(dtype="float32", shape=(10,),
                                               stype="numpy.ndarray", data=bad)
    verdict = classify(msg, reference=ref, nodes={}, partition_sizes={})
    assert isinstance(verdict, Rejected) and verdict.kind == "invalid"
    assert "cannot be read" in verdict.reason
