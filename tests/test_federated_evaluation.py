"""Federated evaluation under DP (common/fedeval.py, client/evaluation.py,
server/evaluation.py): the node's held-out records never train, its release is the
Gaussian mechanism it accounts for, the server's combination and its interval, and a
run that evaluates at the nodes with every evaluation in their ledgers."""

import json
import math
from collections import Counter

import numpy as np
import pytest
from flwr.app.message.message import make_message

from client.app import evaluate as client_evaluate
from client.app import train as client_train
from client.selection import eval_records_for, num_examples, records_for
from common import fedeval, keys, privacy
from common.config import ConfigError
from common.models import build_model, get_weights
from common.node import parse_node_config
from common.records import RunDir, read_json
from server.evaluation import evaluators, read_sums
from tests.helpers import FAST, PARTITION_SIZE, context, fast_config, metadata, train_message
from tests.test_privacy import dp_accounting_epsilon

FED = {"evaluation": "federated", "eval_every": 2, "eval_fraction": 0.5}


def test_the_held_out_records_are_fixed_disjoint_and_never_trained_on():
    train, held = fedeval.holdout_split(600, 0.1)
    assert len(held) == 60 and len(train) == 540
    assert not set(train) & set(held) and sorted([*train, *held]) == list(range(600))
    again = fedeval.holdout_split(600, 0.1)
    assert all(np.array_equal(a, b) for a, b in zip((train, held), again, strict=True))
    assert fedeval.holdout_count(600, 0.0) == 0 and fedeval.holdout_count(1, 0.5) == 0
    assert fedeval.holdout_count(3, 0.5) == 2 and fedeval.holdout_count(10, 0.01) == 1

    cfg = fast_config(**FED)
    node = parse_node_config({"partition-id": 2, "num-partitions": 10, "eval-holdout": 0.2,
                              "read-named-files": True})
    training, evaluating = records_for(cfg, node), eval_records_for(cfg, node)
    assert len(training) == num_examples(cfg, node) == PARTITION_SIZE - 20
    assert len(evaluating) == 20
    rows = {r.tobytes() for r in training.images}
    assert not any(r.tobytes() in rows for r in evaluating.images)


def test_a_release_is_the_gaussian_mechanism_on_bounded_per_record_values():
    right, scaled = fedeval.record_values(
        np.array([1, 0, 1, 1]), np.array([0.5, 9.0, np.inf, np.nan]), 5.0)
    assert list(right) == [1, 0, 0, 0]  # a record with non-finite logits counts as wrong
    assert list(scaled) == [0.1, 1.0, 1.0, 1.0]  # the loss clipped to the bound, over it
    correct, losses = np.ones(50), np.full(50, 2.0)
    rng = np.random.default_rng(0)
    draws = [fedeval.release(correct, losses, z=3.0, loss_bound=5.0, rng=rng) for _ in range(4000)]
    std = 3.0 * math.sqrt(2)
    assert all(d.examples == 50 and d.correct_std == pytest.approx(std) for d in draws)
    c = np.array([d.correct for d in draws])
    loss = np.array([d.loss for d in draws])
    assert np.mean(c) == pytest.approx(50, abs=0.5) and np.std(c) == pytest.approx(std, rel=0.05)
    assert np.mean(loss) == pytest.approx(100, abs=2.5)  # 50 x 2.0, noise in loss/5 units
    assert np.std(loss) == pytest.approx(5 * std, rel=0.05)
    exact = fedeval.release(correct, losses, z=0.0, loss_bound=5.0, rng=rng)
    assert exact.correct == 50.0 and exact.loss == pytest.approx(100.0, rel=1e-12)


def test_the_planned_evaluations_alone_spend_the_budget_share():
    cfg = fast_config(**FED, target_epsilon=3.0, eval_budget_share=0.2)
    planned = cfg.evaluation.planned(cfg.federation.num_rounds, 10)
    z = fedeval.noise_multiplier(cfg.privacy, cfg.evaluation, planned)
    alone = [fedeval.entry(z)] * planned
    eps = privacy.epsilon(alone, 1e-5)
    assert eps <= 0.6 and eps == pytest.approx(0.6, rel=0.02)
    assert dp_accounting_epsilon(privacy.merge_history(alone), 1e-5) == pytest.approx(eps, rel=0.01)
    assert fedeval.planned_entries(cfg.privacy, cfg.evaluation, planned) == [(z, 1.0, planned)]
    server = fast_config(target_epsilon=3.0)
    assert fedeval.planned_entries(server.privacy, server.evaluation, planned) == []


def test_no_node_is_asked_more_often_than_its_budget_planned():
    for n, rounds, every, fraction in [(10, 4, 2, 0.5), (100, 150, 10, 0.2), (7, 30, 3, 0.3),
                                       (100, 300, 7, 0.35)]:
        cfg = fast_config(evaluation="federated", num_rounds=rounds, eval_every=every,
                          eval_fraction=fraction, num_partitions=n)
        ev = cfg.evaluation
        due = ev.rounds(rounds)
        assert due[-1] == rounds and all(r % every == 0 for r in due[:-1])
        size = ev.evaluators(n)
        asked = Counter(p for j in range(len(due)) for p in evaluators(list(range(n)), j, size, 3))
        assert max(asked.values()) <= ev.planned(rounds, n)
        assert all(len(evaluators(list(range(n)), j, size, 3)) == size for j in range(len(due)))


def test_the_server_combines_sums_with_an_interval_for_noise_and_sampling():
    parts = [fedeval.Sums(correct=80.0, loss=40.0, examples=100, correct_std=3.0, loss_std=1.0),
             fedeval.Sums(correct=150.0, loss=90.0, examples=200, correct_std=4.0, loss_std=1.0)]
    ev = fedeval.combine(parts)
    assert ev.accuracy == pytest.approx(230 / 300) and ev.loss == pytest.approx(130 / 300)
    p = 230 / 300
    assert ev.accuracy_interval == pytest.approx(
        fedeval.Z_95 * math.sqrt((9 + 16) / 300 ** 2 + p * (1 - p) / 300))
    assert (ev.examples, ev.nodes) == (300, 2)
    assert fedeval.combine([]) is None
    assert fedeval.check_sums([1.0, 1.0, 0, 1.0, 1.0]) and fedeval.check_sums(
        [math.nan, 1.0, 10, 1.0, 1.0]) and fedeval.check_sums([1.0, 1.0, 10, -1.0, 1.0])


@pytest.mark.parametrize("over, key", [
    ({"evaluation": "central"}, "evaluation"), ({"eval_every": 0}, "eval-every"),
    ({"eval_fraction": 0.0}, "eval-fraction"), ({"eval_budget_share": 0.6}, "eval-budget-share"),
    ({"eval_loss_bound": math.inf}, "eval-loss-bound"),
    ({"evaluation": "federated", "secure_aggregation": "secagg+", "noise": "distributed",
      "batch_size": 0}, "evaluation"),
])
def test_bad_evaluation_config_is_refused_by_name(over, key):
    with pytest.raises(ConfigError, match=key):
        fast_config(**over)


def _evaluate_message(weights, server_round=2):
    """An evaluate request as the server sends it (server/evaluation.py)."""
    content = train_message(weights, server_round=server_round, planned_rounds=2).content
    return make_message(metadata(src=0, dst=1, message_type="evaluate"), content=content)


def _weights():
    return get_weights(build_model("logreg", seed=0))


def test_a_node_evaluates_under_its_ledger_and_refuses_without_records_to_spare():
    ctx = context(partition_id=4, **FED)  # the harness's policy: 10% held out
    reply = client_evaluate(_evaluate_message(_weights()), ctx)
    m = reply.content[keys.METRICS]
    assert int(m[keys.REFUSED]) == 0 and int(m[keys.EVAL_EXAMPLES]) == 10
    assert read_sums(reply)[0] is not None
    history = privacy.merge_history(json.loads(str(reply.content[keys.PRIVACY][keys.HISTORY])))
    cfg = fast_config(**FED)
    z = fedeval.noise_multiplier(cfg.privacy, cfg.evaluation,
                                 cfg.evaluation.planned(cfg.federation.num_rounds, 10))
    assert history == [(z, 1.0, 1)]
    assert float(m[keys.EVAL_CORRECT_STD]) == pytest.approx(z * math.sqrt(2))
    assert float(m[keys.EPSILON]) == pytest.approx(dp_accounting_epsilon(history, 1e-5), rel=0.01)
    # the next training round calibrates with the planned evaluations counted as spent
    train = client_train(train_message(_weights(), server_round=3, planned_rounds=2), ctx)
    sigma = float(train.content[keys.METRICS][keys.NOISE_MULTIPLIER])
    assert sigma > privacy.calibrate_noise(target_epsilon=3.0, target_delta=1e-5,
                                           sample_rate=1.0, steps=2, prior=history)

    for extra, why in [({"eval-holdout": 0.0}, "eval-holdout=0"),
                       ({"max-eval-budget-share": 0.05}, "max-eval-budget-share")]:
        node = context(partition_id=5, node_extra=extra, **FED)
        refused = client_evaluate(_evaluate_message(_weights()), node)
        assert int(refused.content[keys.METRICS][keys.REFUSED]) == 1
        assert why in str(refused.content[keys.PRIVACY][keys.REASON])
        assert str(refused.content[keys.PRIVACY][keys.HISTORY]) == "[]"  # nothing spent


def test_an_evaluation_past_the_budget_is_refused_and_spends_nothing():
    ctx = context(partition_id=6, target_epsilon=0.5, eval_budget_share=0.5, eval_every=1,
                  eval_fraction=1.0, evaluation="federated", num_rounds=2)
    # a server asking again and again: each answer spends, until the next would pass 0.5
    replies = []
    for r in range(1, 40):
        replies.append(client_evaluate(_evaluate_message(_weights(), r), ctx))
        if int(replies[-1].content[keys.METRICS][keys.REFUSED]):
            break
    refused = [int(r.content[keys.METRICS][keys.REFUSED]) for r in replies]
    assert refused[-1] == 1 and not any(refused[:-1]) and len(replies) > 2
    last = replies[-1]
    assert "would reach epsilon" in str(last.content[keys.PRIVACY][keys.REASON])
    history = json.loads(str(last.content[keys.PRIVACY][keys.HISTORY]))
    assert sum(e[2] for e in history) == len(replies) - 1  # the refusal spent nothing
    assert float(last.content[keys.METRICS][keys.EPSILON]) == pytest.approx(
        dp_accounting_epsilon(privacy.merge_history(history), 1e-5), rel=0.01)
    assert dp_accounting_epsilon(privacy.merge_history(history), 1e-5) <= 0.5 * 1.01


@pytest.mark.slow
def test_a_private_run_evaluates_at_the_nodes_and_every_ledger_holds_it(tmp_path):
    from simulations.runtime import Backend
    from simulations.simulate import simulate

    run = RunDir(simulate({**FAST, "num-rounds": 4, "fraction-train": 0.3, "seed": 3,
                           "evaluation": "federated", "eval-every": 2, "eval-fraction": 0.5,
                           "run-name": "fe"}, output_dir=str(tmp_path),
                          backend=Backend(runtime="inprocess", workers=2), progress=None))
    rows = run.rounds()
    assert [r.federated_nodes for r in rows] == [0, 5, 0, 5]
    assert all(math.isnan(rows[i].federated_accuracy) for i in (0, 2))
    assert all(r.federated_examples == 50 and r.federated_accuracy_interval > 0
               for r in (rows[1], rows[3]))
    priv = run.privacy()
    evaluated = 0
    for pid in range(10):
        ledger = read_json(run.path / "ledgers" / f"partition-{pid}.json")
        history = privacy.merge_history(ledger["history"])
        evals = sum(e[2] for e in history if e[0] != ledger["noise_multiplier"])
        evaluated += evals
        eps = dp_accounting_epsilon(history, 1e-5)
        assert eps <= 3.0 and float(priv.clients[str(pid)].epsilon) == pytest.approx(eps, rel=0.01)
    assert evaluated == 10  # two evaluations of five nodes, each in its node's ledger


@pytest.mark.slow
def test_on_fashion_mnist_the_federated_accuracy_holds_the_truth_within_its_interval(tmp_path):
    """The default federation (100 nodes of 600 images, 10% held out by each) with
    federated evaluation every 25 rounds by every node: each noisy accuracy is checked
    against the truth the server knows here (the same model on the 10,000 test images,
    drawn from the population the held-out records come from). A 95% interval: each
    holds it with probability 0.95, so all six must be within twice it (1e-4 to fail
    each) and most within it."""
    from common.config import resolve_config
    from simulations.simulate import simulate

    keys_ = {"evaluation": "federated", "eval-every": 25, "eval-budget-share": 0.2}
    run = RunDir(simulate({**keys_, "run-name": "fe-real"}, output_dir=str(tmp_path),
                          progress=None))
    rows = [r for r in run.rounds() if r.federated_nodes]
    assert [r.round for r in rows] == [25, 50, 75, 100, 125, 150]
    assert all(r.federated_nodes == 100 and r.federated_examples == 6000 for r in rows)
    off = [abs(r.federated_accuracy - r.test_accuracy) / r.federated_accuracy_interval
           for r in rows]
    assert max(off) <= 2 and sum(x <= 1 for x in off) >= 4, off
    summary = read_json(run.path / "summary.json")
    assert summary["federated_round"] == 150 and 0 < summary["epsilon_max"] <= 3.0
    assert summary["final_accuracy"] > 0.8  # training still works with 20% for evaluation
    priv = run.privacy()
    cfg = resolve_config(keys_)
    z = fedeval.noise_multiplier(cfg.privacy, cfg.evaluation, 6)
    for pid in ("0", "57", "99"):
        history = privacy.merge_history(priv.clients[pid].history)
        assert sum(e[2] for e in history if e[0] == z) == 6  # every evaluation, in its ledger
        assert dp_accounting_epsilon(history, 1e-5) == pytest.approx(
            float(priv.clients[pid].epsilon), rel=0.01)


def test_a_server_without_a_test_set_runs_a_federated_evaluation_only(tmp_path):
    from common.errors import DataError
    from server.app import evaluator, server_test_set

    missing = str(tmp_path / "no-data")
    assert server_test_set(fast_config(data_dir=missing, **FED)) is None
    with pytest.raises(DataError, match="lacks"):
        server_test_set(fast_config(data_dir=missing))  # evaluating at the server: it must
    assert server_test_set(fast_config(**FED)) is not None  # one it has, it still uses
    loss, acc = evaluator(None, build_model("logreg", seed=0))(_weights())
    assert math.isnan(loss) and math.isnan(acc)
