"""Faults and bad input, unit level: checkpoints, replayed requests, attacks, identity and
num-examples checks, robust aggregation, config validation of the reliability keys."""

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict
from flwr.app.message.message import make_message

from client.app import query as client_query
from client.app import train as client_train
from client.ledger import load_ledger, replay_file
from common import keys
from common.aggregation import robust_aggregate
from common.config import ConfigError
from common.models import build_model, get_weights
from server import checkpoint
from server.replies import short_error
from tests.helpers import PARTITION_SIZE, context, metadata, new_strategy, train_message, weights_of

GLOBAL = get_weights(build_model("logreg", seed=0))


def _ctx(pid=3, **kw):
    return context(partition_id=pid, model="logreg", **kw)


# ---- replayed requests: the same request twice costs privacy once ------------------


def test_same_request_after_restart_is_answered_again_without_spending(tmp_path):
    path = tmp_path / "partition-3.json"
    node = {keys.NODE_LEDGER_PATH: str(path)}
    first = client_train(train_message(GLOBAL, server_round=1, planned_rounds=3), _ctx(node_extra=node))
    history = json.loads(path.read_text())["history"]
    # A restarted node (empty state) receives the very same request: a resumed run redoing
    # the round that was cut off.
    again = client_train(train_message(GLOBAL, server_round=1, planned_rounds=3), _ctx(node_extra=node))
    assert json.loads(path.read_text())["history"] == history  # nothing more spent
    a, b = (weights_of(r) for r in (first, again))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert float(again.content[keys.METRICS][keys.EPSILON]) == float(first.content[keys.METRICS][keys.EPSILON])
    # Another round (or another model) is a new request: it trains and spends.
    client_train(train_message(GLOBAL, server_round=2, planned_rounds=3), _ctx(node_extra=node))
    assert json.loads(path.read_text())["history"][0][2] == 2 * history[0][2]


def test_a_reply_file_newer_than_its_ledger_is_not_replayed(tmp_path):
    path = tmp_path / "partition-3.json"
    node = {keys.NODE_LEDGER_PATH: str(path)}
    client_train(train_message(GLOBAL, server_round=1, planned_rounds=3), _ctx(node_extra=node))
    saved = path.read_text()
    client_train(train_message(GLOBAL, server_round=2, planned_rounds=3), _ctx(node_extra=node))
    path.write_text(saved)  # as if killed after writing round 2's reply, before its ledger
    assert replay_file(path).exists()
    again = client_train(train_message(GLOBAL, server_round=2, planned_rounds=3), _ctx(node_extra=node))
    assert int(again.content[keys.METRICS][keys.STEPS]) == 1
    assert json.loads(path.read_text())["history"][0][2] == 2  # round 2 spent (again) honestly


@pytest.mark.parametrize("damage", ["torn", "empty", "gone"])
def test_a_reply_file_a_power_loss_damaged_is_not_replayed(tmp_path, damage):
    """The reply file is not synced to disk (only the ledger is): whatever a power loss
    leaves of it, the same request trains again and spends again, never fails or
    replays a wrong answer."""
    path = tmp_path / "partition-3.json"
    node = {keys.NODE_LEDGER_PATH: str(path)}
    client_train(train_message(GLOBAL, server_round=1, planned_rounds=3), _ctx(node_extra=node))
    kept = replay_file(path)
    if damage == "gone":
        kept.unlink()
    else:
        kept.write_bytes(kept.read_bytes()[: 300 if damage == "torn" else 0])
    again = client_train(train_message(GLOBAL, server_round=1, planned_rounds=3), _ctx(node_extra=node))
    assert not again.has_error() and int(again.content[keys.METRICS][keys.STEPS]) == 1
    assert json.loads(path.read_text())["history"][0][2] == 2  # spent again, honestly


def test_new_run_with_same_ledger_is_not_a_replay(tmp_path):
    node = {keys.NODE_LEDGER_PATH: str(tmp_path / "l.json")}
    client_train(train_message(GLOBAL, server_round=1, planned_rounds=3), _ctx(node_extra=node))
    client_train(train_message(GLOBAL, server_round=1, planned_rounds=3), _ctx(node_extra=node, run_id=2))
    ledger = load_ledger(_ctx(), tmp_path / "l.json")
    assert ledger.history[0][2] == 2


# ---- node discovery and the client's identity --------------------------------------


def test_query_reports_partition_and_size():
    msg = make_message(metadata(message_type="query"), content=RecordDict({"config": ConfigRecord({})}))
    reply = client_query(msg, context(partition_id=4, num_partitions=10))
    m = reply.content[keys.METRICS]
    assert (int(m[keys.PARTITION_ID]), int(m[keys.NUM_EXAMPLES]), int(m[keys.OWN_DATA])) == (4, PARTITION_SIZE, 0)


def test_partition_id_outside_the_range_is_a_clear_error():
    msg = make_message(metadata(message_type="query"), content=RecordDict({"config": ConfigRecord({})}))
    with pytest.raises(ValueError, match=r"partition-id=10 must be in \[0, 9\]"):
        client_query(msg, context(partition_id=10, num_partitions=10))


def test_client_errors_are_shortened_to_their_message():
    reason = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::X\x1b[39m\n"
              '  File "a.py", line 1\nRuntimeError: disk full\'>')
    assert short_error(reason) == "RuntimeError: disk full"


# ---- robust aggregation ---------------------------------------------------------------


def _updates(values):
    return [{"w": np.full(4, v, dtype=np.float32)} for v in values]


@pytest.mark.parametrize("method", ["fedmedian", "fedtrimmedavg", "krum", "multikrum"])
def test_robust_rules_ignore_one_outlier_where_fedavg_does_not(method):
    ups = _updates([1.0, 1.1, 0.9, 1.05, 0.95, -100.0])
    avg, _ = robust_aggregate("fedavg", ups, [1] * 6)
    robust, used = robust_aggregate(method, ups, [1] * 6, trim_fraction=0.2, krum_malicious=1,
                                    krum_select=3)
    assert avg["w"][0] < -10
    assert 0.85 < robust["w"][0] < 1.15
    assert (5 not in used) if "krum" in method else len(used) == 6
    assert robust["w"].dtype == np.float32


# ---- checkpoints -------------------------------------------------------------------


def test_strategy_state_round_trips_and_continues_the_same_schedule(tmp_path):
    from server import optimizer
    from server.cohorts import next_cohort

    def fresh():
        return new_strategy(fraction_train=0.3, server_momentum=0.9, server_ema=0.9, seed=7)

    a = fresh()
    parts = list(range(10))
    for _ in range(2):
        _, a.cohorts._queue = next_cohort(a.cohorts._queue, parts, 3, a.cohorts._rng)
    a.opt_state, _ = optimizer.step(a.optimizer, a.opt_state, 1, GLOBAL,
                                    {k: v + 0.1 for k, v in GLOBAL.items()})
    a.privacy.unconfirmed([4], 2)
    checkpoint.save(tmp_path, model=GLOBAL, strategy=a.state_dict(),
                    meta={"round": 2, "run_config": {"seed": 7}, "history": []})
    ck = checkpoint.load(tmp_path)
    b = fresh()
    b.load_state_dict(ck.meta["strategy"], ck.strategy_arrays)
    assert b.privacy.clients == a.privacy.clients
    for _ in range(5):
        ca, a.cohorts._queue = next_cohort(a.cohorts._queue, parts, 3, a.cohorts._rng)
        cb, b.cohorts._queue = next_cohort(b.cohorts._queue, parts, 3, b.cohorts._rng)
        assert ca == cb
    step = {k: v + 0.2 for k, v in GLOBAL.items()}
    (sa, ra), (sb, rb) = (optimizer.step(s.optimizer, s.opt_state, 2, GLOBAL, step) for s in (a, b))
    assert all(np.array_equal(ra[k], rb[k]) for k in ra)
    assert sa.ema is not None and sb.ema is not None
    assert all(np.array_equal(sa.ema[k], sb.ema[k]) for k in sa.ema)
    assert all(np.array_equal(ck.model[k], GLOBAL[k]) for k in GLOBAL)


def test_checkpoint_refuses_other_config_finished_and_unreadable_runs(tmp_path):
    from common.records import CHECKPOINT_FILE

    with pytest.raises(ConfigError, match=f"no {CHECKPOINT_FILE}"):
        checkpoint.load(tmp_path)
    checkpoint.save(tmp_path, model=GLOBAL, strategy=({}, {}),
                    meta={"round": 1, "run_config": {"seed": 7, "resume": False}})
    ck = checkpoint.load(tmp_path)
    checkpoint.check_matches(ck, {"seed": 7, "resume": True})
    with pytest.raises(ConfigError, match=r"seed \(7 then, 8 now\)"):
        checkpoint.check_matches(ck, {"seed": 8, "resume": True})
    # a key added by a later dpfl is no difference at its default, and one otherwise
    checkpoint.check_matches(ck, {"seed": 7, "dataset": "fashion-mnist", "resume": True})
    with pytest.raises(ConfigError, match=r"dataset \(None then, 'digits' now\)"):
        checkpoint.check_matches(ck, {"seed": 7, "dataset": "digits", "resume": True})
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"torn")
    with pytest.raises(ConfigError, match="unreadable"):
        checkpoint.load(tmp_path)
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match="finished run"):
        checkpoint.load(tmp_path)


def test_sampler_state_is_json_safe():
    s = new_strategy(seed=3)
    meta, _ = s.state_dict()
    restored = new_strategy(seed=99)
    restored.load_state_dict(json.loads(json.dumps(meta)), {})
    assert restored.cohorts._rng.random() == s.cohorts._rng.random()  # continues where it was


# ---- the server's view as a floor for a client's ledger ------------------------------


def test_a_node_allowed_to_adopt_takes_the_history_the_server_saw_for_a_lost_ledger():
    """Only with its operator's `adopt-server-history=true` (test_ledger_guard.py: a
    fresh node offered a history ignores it by default)."""
    from common.records import ClientRecord
    from server.wire import train_config

    s = new_strategy()
    s.privacy.clients[3] = ClientRecord(history=[[6.0, 1.0, 3]], epsilon=1.0, noise_multiplier=6.0,
                                        sample_rate=1.0)
    msg = train_message(GLOBAL, server_round=4, planned_rounds=6)
    msg.content[keys.CONFIG] = train_config(server_round=4, planned_rounds=6,
                                            known_history=s.privacy.history(3))
    # fresh node state: no ledger of its own
    reply = client_train(msg, _ctx(node_extra={"adopt-server-history": True}))
    m = reply.content[keys.METRICS]
    sigma = float(m[keys.NOISE_MULTIPLIER])  # its own calibration, never the server's sigma
    history = json.loads(str(reply.content[keys.PRIVACY][keys.HISTORY]))
    assert history[0] == [6.0, 1.0, 3] and history[1] == [sigma, 1.0, 1]
    from common import privacy

    assert float(m[keys.EPSILON]) == pytest.approx(privacy.epsilon([(6.0, 1.0, 3), (sigma, 1.0, 1)], 1e-5))


def test_a_shorter_server_view_never_lowers_a_ledger(tmp_path):
    from client.ledger import Ledger, adopt_view

    mine = Ledger(history=[(2.0, 1.0, 5)], noise_multiplier=2.0)
    assert adopt_view(mine, "[[2.0, 1.0, 2]]") is mine
    assert adopt_view(mine, "not json") is mine
    assert adopt_view(mine, "[[2.0, 1.0, 9]]").history == [(2.0, 1.0, 9)]
