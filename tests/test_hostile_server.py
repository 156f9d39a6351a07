"""A hostile server against the real ClientApp, with crafted messages.

The server is not trusted: it chooses the run config, the global weights and everything
in a train message. Each test plays one attack and checks that the client's guarantee
holds anyway: its ledger never shorter than what it released, its epsilon never above
its own node's budget, and no decision outside the DP mechanism that depends on its data.
"""

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from flwr.app.message.message import make_message

from client.app import query as client_query
from client.app import train as client_train
from client.ledger import Ledger, load_ledger
from client.trainer import train_round
from common import keys, privacy
from common.config import ConfigError, resolve_config
from common.errors import DataError
from common.models import build_model, get_weights
from common.node import parse_node_config
from common.split import Split
from tests.helpers import context, metadata, new_strategy, train_message, weights_of

GLOBAL = get_weights(build_model("logreg", seed=0))
BUDGET = 3.0


# The fast tests' run config names the tiny data folder (data-dir): a node reads it only
# with the harness's permission, which these nodes get (their data is not what is tested).
TINY_DATA_OK = {"read-named-files": True}


def _node(tmp_path, pid=3, **policy):
    """A data holder's node config: its ledger file and (defaults, or) its policy."""
    return {keys.NODE_LEDGER_PATH: str(tmp_path / f"node-{pid}.json"), **TINY_DATA_OK, **policy}


def _ask(ctx, server_round, *, weights=GLOBAL, view=None, planned=15):
    msg = train_message(weights, server_round=server_round, planned_rounds=planned)
    if view is not None:
        cfg = ConfigRecord(dict(msg.content[keys.CONFIG]))
        cfg[keys.KNOWN_HISTORY] = json.dumps(view)
        msg.content[keys.CONFIG] = cfg
    reply = client_train(msg, ctx)
    return reply, reply.content[keys.METRICS]


def _ctx(tmp_path, pid=3, run_id=1, policy=None, **run):
    run = {"model": "logreg", "target_epsilon": BUDGET, **run}
    return context(partition_id=pid, harness_policy=False, run_id=run_id,
                   node_extra=_node(tmp_path, pid, **(policy or {"max-epsilon": BUDGET})), **run)


def _own_epsilon(ledger: Ledger) -> float:
    """Epsilon of the steps this client really took (its own noise multiplier)."""
    own = [e for e in ledger.history if e[0] == ledger.noise_multiplier]
    return privacy.epsilon(own, 1e-5)


# ---- 1. borrowed history ---------------------------------------------------------------


@pytest.mark.parametrize("with_file", [True, False])
def test_a_borrowed_cheap_history_never_resets_or_replaces_the_ledger(tmp_path, with_file):
    """Every round the server hands the client a long, cheap-looking history (huge sigma,
    many steps). Asked 40 rounds, the client trains only as long as its own steps stay
    within budget (an honest run stops it after 15), and its ledger holds every step it
    released."""
    cheap = [[1e6, 1.0, 1000]]
    state = None
    trained = 0
    for r in range(1, 41):
        ctx = _ctx(tmp_path) if with_file else context(
            partition_id=3, harness_policy=False, model="logreg", target_epsilon=BUDGET,
            node_extra={"max-epsilon": BUDGET, **TINY_DATA_OK}, state=state)
        state = ctx.state
        # A view that keeps growing and drops the client's own entries.
        _, m = _ask(ctx, r, view=[[1e6, 1.0, 1000 * r]] if r > 1 else cheap)
        trained += int(not m[keys.REFUSED])
        assert float(m[keys.EPSILON]) <= BUDGET
    ledger = load_ledger(ctx, tmp_path / "node-3.json" if with_file else None)
    own_steps = sum(e[2] for e in ledger.history if e[0] == ledger.noise_multiplier)
    assert own_steps == trained  # one full-batch step per round it trained
    assert trained <= 15
    assert _own_epsilon(ledger) <= BUDGET
    assert ledger.epsilon(1e-5, "rdp") <= BUDGET


def test_a_server_view_is_adopted_only_when_it_extends_the_clients_own_history():
    from client.ledger import adopt_view

    mine = Ledger(history=[(2.0, 1.0, 5)], noise_multiplier=2.0)
    longer = adopt_view(mine, "[[2.0, 1.0, 5], [2.0, 0.5, 3]]")
    assert longer.history == [(2.0, 1.0, 5), (2.0, 0.5, 3)] and longer.noise_multiplier == 2.0
    for hostile in ("[[9.0, 1.0, 50]]",                      # drops own entries
                    "[[2.0, 1.0, 5], [1e6, 1.0, 100]]",     # another sigma
                    "[[2.0, 1.0, 3], [2.0, 0.5, 30]]",      # own entry shortened
                    "[[2.0, 1.0, 4]]", "[]", "[[2.0, 1.0, -1]]", "{}"):
        assert adopt_view(mine, hostile) is mine, hostile
    fresh = adopt_view(Ledger(), "[[4.0, 1.0, 3]]")  # a client that lost its ledger
    assert fresh.history == [(4.0, 1.0, 3)] and fresh.noise_multiplier is None


def test_a_ledger_file_wins_over_any_server_view(tmp_path):
    ctx = _ctx(tmp_path)
    _ask(ctx, 1)
    saved = json.loads((tmp_path / "node-3.json").read_text())["history"]
    sigma = saved[0][0]
    # Even a view that only extends the file is ignored: the file is the authority.
    _, m = _ask(_ctx(tmp_path), 2, view=[[sigma, 1.0, 40]])
    assert json.loads((tmp_path / "node-3.json").read_text())["history"] == [[sigma, 1.0, 2]]
    assert float(m[keys.EPSILON]) == pytest.approx(privacy.epsilon([(sigma, 1.0, 2)], 1e-5))


# ---- 2. the budget is the node's ------------------------------------------------------


@pytest.mark.parametrize("run,expect", [
    ({"dp": False}, "requires it (node config require-dp)"),
    ({"target_epsilon": math.inf}, "requires it"),
    ({"target_epsilon": 50.0}, "target-epsilon=50.0 exceeds this node's max-epsilon=3.0"),
    ({"target_delta": 1e-3}, "target-delta=0.001 exceeds this node's max-delta=1e-05"),
    ({"noise_multiplier": 0.3}, "noise-multiplier=0.3 is below this node's min-noise-multiplier=1.0"),
])
def test_a_run_asking_for_less_privacy_than_the_node_allows_is_refused(tmp_path, run, expect):
    policy = {"max-epsilon": BUDGET, "min-noise-multiplier": 1.0}
    reply, m = _ask(_ctx(tmp_path, policy=policy, **run), 1)
    assert int(m[keys.REFUSED]) == 1 and expect in str(reply.content[keys.PRIVACY][keys.REASON])
    assert keys.ARRAYS not in reply.content.array_records and math.isnan(float(m[keys.TRAIN_LOSS]))
    assert not (tmp_path / "node-3.json").exists()  # nothing spent


def test_a_spent_client_sent_dp_false_stays_refused_and_releases_nothing(tmp_path):
    for r in range(1, 5):
        _ask(_ctx(tmp_path), r, planned=2)
    before = (tmp_path / "node-3.json").read_text()
    reply, m = _ask(_ctx(tmp_path, dp=False), 5)
    assert int(m[keys.REFUSED]) == 1 and keys.ARRAYS not in reply.content.array_records
    assert math.isnan(float(m[keys.TRAIN_LOSS]))
    assert (tmp_path / "node-3.json").read_text() == before


def test_node_defaults_are_private_and_stricter_run_configs_are_accepted(tmp_path):
    node = parse_node_config({"partition-id": 0, "num-partitions": 2})
    assert (node.require_dp, node.max_epsilon, node.max_delta) == (True, 8.0, 1e-5)
    stricter = resolve_config({"target-epsilon": 1.0, "target-delta": 1e-6, "noise-multiplier": 2.0})
    assert node.policy_problem(stricter.privacy) is None
    # A node may opt out of DP or raise its cap only in its own config (or the harness's).
    loose = parse_node_config({"partition-id": 0, "num-partitions": 2}, "require-dp=false max-epsilon=inf")
    assert loose.policy_problem(resolve_config({"dp": False}).privacy) is None
    with pytest.raises(ConfigError, match="unknown node config key"):
        parse_node_config({"partition-id": 0, "num-partitions": 2, "target-epsilon": 9.0})
    with pytest.raises(ConfigError, match="max-epsilon=0.0 must be > 0"):
        parse_node_config({"partition-id": 0, "num-partitions": 2}, "max-epsilon=0.0")


@pytest.mark.parametrize("planned", [0, -3, 2.5, 10**9])
def test_a_planned_round_count_that_cannot_calibrate_is_refused(tmp_path, planned):
    reply, m = _ask(_ctx(tmp_path), 1, planned=planned)
    assert int(m[keys.REFUSED]) == 1 and "planned-rounds" in str(reply.content[keys.PRIVACY][keys.REASON])
    assert not (tmp_path / "node-3.json").exists()


def test_a_node_never_reads_a_file_or_folder_the_server_names(tmp_path):
    """A hostile run config points the node at a file of its own (here one the test
    writes, standing for a private table): the node refuses before opening it, and the
    reason is the same whether the file exists or not, so it reveals nothing of it."""
    secret = tmp_path / "patients.csv"
    secret.write_text("name,diagnosis\nalice,sick\nbob,well\n" * 10)
    reasons = []
    for dataset in (f"csv:{secret}", f"csv:{tmp_path / 'none.csv'}", f"imagefolder:{tmp_path}"):
        ctx = context(partition_id=3, harness_policy=False, model="logreg", data_dir="",
                      dataset=dataset, target_epsilon=BUDGET,
                      node_extra={keys.NODE_LEDGER_PATH: str(tmp_path / "n.json")})
        reply, m = _ask(ctx, 1)
        reason = str(reply.content[keys.PRIVACY][keys.REASON])
        assert int(m[keys.REFUSED]) == 1 and "read-named-files" in reason
        assert "alice" not in reason and "diagnosis" not in reason  # nothing of the file
        reasons.append(reason.replace(dataset, "X"))
        with pytest.raises(DataError, match="read-named-files"):  # discovery, too
            client_query(make_message(metadata(message_type="query"),
                                      content=RecordDict({"config": ConfigRecord({})})), ctx)
    assert len(set(reasons)) == 1  # the file's existence changes nothing
    # a run-config data-dir is refused the same way; the node's own data-dir is its choice
    ctx = context(partition_id=3, harness_policy=False, model="logreg", target_epsilon=BUDGET,
                  node_extra={keys.NODE_LEDGER_PATH: str(tmp_path / "n2.json")})
    reply, m = _ask(ctx, 1)
    assert int(m[keys.REFUSED]) == 1 and "data-dir" in str(reply.content[keys.PRIVACY][keys.REASON])
    # and so is code: a module the server names is never imported on the node
    ctx = context(partition_id=3, harness_policy=False, model="tests.user_models:small",
                  data_dir="", target_epsilon=BUDGET,
                  node_extra={keys.NODE_LEDGER_PATH: str(tmp_path / "n3.json")})
    import sys

    sys.modules.pop("tests.user_models", None)
    reply, m = _ask(ctx, 1)
    assert int(m[keys.REFUSED]) == 1 and "code to import" in str(reply.content[keys.PRIVACY][keys.REASON])
    assert "tests.user_models" not in sys.modules  # refused before importing it


def test_simulated_attacks_need_the_nodes_own_switch(tmp_path):
    reply, m = _ask(_ctx(tmp_path, pid=0, attack="nan", attackers=1), 1)
    assert int(m[keys.REFUSED]) == 1
    assert "simulated-attacks" in str(reply.content[keys.PRIVACY][keys.REASON])
    policy = {"max-epsilon": BUDGET, "simulated-attacks": True}
    reply, m = _ask(_ctx(tmp_path, pid=0, policy=policy, attack="nan", attackers=1), 1)
    assert int(m[keys.REFUSED]) == 0  # the harness's switch: it attacks as configured
    assert np.isnan(next(iter(weights_of(reply).values()))).all()


# ---- 3. no data-dependent decision outside the mechanism ----------------------------


def _overflow_weights(threshold: float) -> dict[str, np.ndarray]:
    """Logistic regression whose class-0 logit overflows float32 exactly for images whose
    pixel sum exceeds `threshold`: a membership test for bright records."""
    w = {k: v.copy() for k, v in GLOBAL.items()}
    w["1.weight"][0, :] = np.float32(3.0e38 / threshold)
    return w


def test_weights_built_to_overflow_are_refused_before_any_data_is_read(tmp_path):
    hostile = _overflow_weights(100.0)
    reasons = set()
    for pid in (3, 4):  # two clients with different data give the same answer
        reply, m = _ask(_ctx(tmp_path, pid=pid), 1, weights=hostile)
        assert int(m[keys.REFUSED]) == 1
        reasons.add(str(reply.content[keys.PRIVACY][keys.REASON]))
    assert len(reasons) == 1 and "exceeds this node's max-model-norm" in reasons.pop()
    for bad in ({**GLOBAL, "1.bias": np.full(10, np.nan, np.float32)},
                {**GLOBAL, "1.bias": np.zeros(11, np.float32)},
                {k: v.astype(np.float64) for k, v in GLOBAL.items()}):
        _, m = _ask(_ctx(tmp_path), 1, weights=bad)
        assert int(m[keys.REFUSED]) == 1
    assert not (tmp_path / "node-3.json").exists()


@pytest.mark.parametrize("mode", ["ghost", "hooks", "functorch", "ew"])
def test_a_record_that_overflows_contributes_nothing_and_the_release_stays_finite(mode):
    """With the norm bound lifted, crafted weights overflow for one bright record only.
    The update released with that record is finite, as it is without it (the record
    replaced by a null record): the reply cannot tell the two apart by finiteness."""
    rng = np.random.default_rng(0)
    images = (rng.random((20, 1, 28, 28)) * 0.2).astype(np.float32)  # pixel sums ~ 78
    labels = (np.arange(20) % 10).astype(np.int64)
    weights = _overflow_weights(300.0)
    with_record = images.copy()
    with_record[0] = 1.0  # pixel sum 784: its logit overflows
    model = build_model("logreg")
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    with torch.no_grad():
        logits = model(torch.from_numpy(with_record))
    finite = torch.isfinite(logits).all(1).tolist()
    assert finite == [False] + [True] * 19  # the attack is real: one record is not finite
    cfg = resolve_config({"model": "logreg", "noise-multiplier": 1.0, "grad-sample-mode": mode})
    plan = privacy.RoundPlan(noise_multiplier=1.0, sample_rate=1.0, steps=1,
                             epsilon_before=0.0, epsilon_after=0.0)
    for data in (with_record, images):
        out = train_round(weights, Split(data, labels), plan, train=cfg.train, priv=cfg.privacy,
                          runtime=cfg.runtime, seed=0)
        assert all(np.isfinite(v).all() for v in out.weights.values())


def test_the_real_client_releases_a_finite_update_from_overflowing_weights(tmp_path):
    """The same attack through the ClientApp on a real Fashion-MNIST partition (some of
    its images are bright enough to overflow, most are not)."""
    policy = {"max-epsilon": BUDGET, "max-model-norm": math.inf}
    reply, m = _ask(_ctx(tmp_path, policy=policy), 1, weights=_overflow_weights(150.0))
    assert int(m[keys.REFUSED]) == 0
    update = weights_of(reply)
    assert all(np.isfinite(v).all() for v in update.values())


# ---- what a reply carries, and what the server records ------------------------------


def test_a_reply_carries_no_timing_and_states_only_public_metadata(tmp_path):
    reply, m = _ask(_ctx(tmp_path), 1)
    assert set(m.keys()) == set(keys.REPLY_METRIC_KEYS)
    assert "train-seconds" not in m and math.isnan(float(m[keys.TRAIN_LOSS]))


def test_reconcile_takes_every_clients_epsilon_from_its_ledger_file(tmp_path):
    from common.records import ClientRecord, PrivacyRecord, RunDir, RunSummary
    from simulations.simulate import reconcile_privacy

    cfg = resolve_config({"num-partitions": 3})
    ledgers = tmp_path / "ledgers"
    ledgers.mkdir()
    for pid, steps in ((0, 2), (1, 9)):
        (ledgers / f"partition-{pid}.json").write_text(
            Ledger(history=[(2.0, 1.0, steps)], noise_multiplier=2.0).to_json())
    run = RunDir(tmp_path)
    heard = PrivacyRecord(accountant="rdp", delta=1e-5, target_epsilon=3.0, private=True, clients={
        "1": ClientRecord(history=[[2.0, 1.0, 3]], epsilon=0.5, noise_multiplier=2.0,
                          sample_rate=1.0, unconfirmed_rounds=[4])})
    run.write_privacy(heard)
    run.write_summary(RunSummary.of([], heard, num_clients=3, wall_seconds=1.0))
    reconcile_privacy(run, ledgers, cfg)
    truth = privacy.epsilon([(2.0, 1.0, 9)], 1e-5)
    rec = run.privacy()
    assert rec is not None and rec.source == "ledger files"
    assert rec.clients["1"].epsilon == pytest.approx(truth)
    assert rec.clients["1"].unconfirmed_rounds == [] and "0" in rec.clients
    summary = run.summary()
    assert summary is not None and summary.epsilon_max == pytest.approx(truth)


# ---- the plan counts the steps Opacus takes ---------------------------------------------


def _mismatched_pairs(limit=12):
    pairs = []
    for n in range(1, 3000):
        for b in (1, 2, 3, 5, 7, 16, 33):
            k = math.ceil(n / b)
            if int(1 / (1 / k)) != k:
                pairs.append((n, b))
    return pairs[:limit]


def test_planned_steps_are_the_steps_opacus_takes_where_ceil_and_int_differ():
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import DataLoader, TensorDataset

    pairs = _mismatched_pairs()
    assert (93, 1) in pairs  # the case a client once failed on every round
    for n, b in [*pairs, (600, 32), (600, 0), (7, 2)]:
        q, steps = privacy.poisson_plan(n, b, 1)
        data = TensorDataset(torch.zeros(n, 1), torch.zeros(n))
        loader = DPDataLoader.from_data_loader(DataLoader(data, batch_size=b or n))
        assert loader.sample_rate == q and sum(1 for _ in loader) == steps, (n, b)


def test_a_client_of_93_records_with_batch_1_trains_and_accounts_its_steps():
    rng = np.random.default_rng(1)
    data = Split(rng.random((93, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 93))
    cfg = resolve_config({"model": "logreg", "batch-size": 1, "noise-multiplier": 1.0,
                          "grad-sample-mode": "hooks"})
    q, steps = privacy.poisson_plan(93, 1, 1)
    plan = privacy.plan_round([], noise_multiplier=1.0, sample_rate=q, steps=steps, delta=1e-5,
                              accountant="rdp")
    out = train_round(GLOBAL, data, plan, train=cfg.train, priv=cfg.privacy, runtime=cfg.runtime,
                      seed=0)
    assert out.steps == steps == 92


def test_server_never_sends_a_noise_multiplier_to_adopt():
    from common.records import ClientRecord
    from server.wire import train_config

    s = new_strategy()
    s.privacy.clients[3] = ClientRecord(history=[[6.0, 1.0, 3]], epsilon=1.0, noise_multiplier=6.0,
                                        sample_rate=1.0)
    config = train_config(server_round=4, planned_rounds=2, known_history=s.privacy.history(3))
    assert set(config.keys()) == {keys.SERVER_ROUND, keys.PLANNED_ROUNDS, keys.KNOWN_HISTORY}
    assert json.loads(str(config[keys.KNOWN_HISTORY])) == [[6.0, 1.0, 3]]


def test_a_raised_noise_floor_applies_to_a_ledger_whose_sigma_was_fixed_before(tmp_path):
    _, m = _ask(_ctx(tmp_path), 1, planned=2)
    low = float(m[keys.NOISE_MULTIPLIER])
    floor = low * 2
    _, m = _ask(_ctx(tmp_path, policy={"max-epsilon": BUDGET, "min-noise-multiplier": floor}), 2,
                planned=2)
    assert int(m[keys.REFUSED]) == 0 and float(m[keys.NOISE_MULTIPLIER]) == floor
    history = json.loads((tmp_path / "node-3.json").read_text())["history"]
    assert history == [[low, 1.0, 1], [floor, 1.0, 1]]
