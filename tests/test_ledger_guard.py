"""A budget no run can reset or fork: a hostile server against the real ClientApp.

Every test plays the server: it starts new runs (fresh `Context`s, new run ids, empty
node state, as Flower gives every new run), runs them side by side, offers histories and
round numbers of its choosing. Each then re-accounts every release the node made,
independently (Google's dp-accounting, from the sigma, sample rate and steps the reply
carried), and checks it against the node's `max-epsilon`, with every release in the
node's ledger.
"""

import fcntl
import json
import math
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from client.app import train as client_train
from client.ledger import (
    BUSY,
    UNAVAILABLE,
    Ledger,
    LedgerUnavailable,
    lock_file,
    reset_ledger,
    trained_marker,
)
from common import keys
from common.models import build_model, get_weights
from common.node import EPHEMERAL_LEDGER, STATE_DIR_ENV, default_ledger_file
from tests.helpers import context, train_message
from tests.test_privacy import dp_accounting_epsilon

GLOBAL = get_weights(build_model("logreg", seed=0))
BUDGET = 3.0
DELTA = 1e-5


def _node(**extra):
    """A data holder's node config: its budget and nothing about where its ledger lives
    (the default), unless `extra` says so."""
    return {"max-epsilon": BUDGET, "read-named-files": True, **extra}


def _run(run_id, pid=3, node=None, **run):
    """A new run as Flower starts it: a fresh context (empty state, a new run id)."""
    return context(partition_id=pid, harness_policy=False, run_id=run_id, model="logreg",
                   target_epsilon=BUDGET, node_extra=node if node is not None else _node(), **run)


def _ask(ctx, server_round, *, planned=2, view=None):
    msg = train_message(GLOBAL, server_round=server_round, planned_rounds=planned,
                        known_history=None if view is None else json.dumps(view))
    reply = client_train(msg, ctx)
    return reply, reply.content[keys.METRICS]


def _released(metrics_list):
    """The (sigma, q, steps) of every release, as the replies carried them."""
    return [(float(m[keys.NOISE_MULTIPLIER]), float(m[keys.SAMPLE_RATE]), int(m[keys.STEPS]))
            for m in metrics_list if not int(m[keys.REFUSED])]


# ---- 1. a new run is not a new budget ---------------------------------------------------


def test_a_new_run_never_resets_a_default_nodes_budget():
    """Three runs of two rounds each on a node with the default config (no ledger-path):
    before, each run started from an empty Context.state, 6 releases, true epsilon 5.60
    against max-epsilon 3. Now the node's default ledger file carries every run."""
    seen = []
    for run_id in (1, 2, 3):
        ctx = _run(run_id)
        for r in (1, 2):
            seen.append(_ask(ctx, r)[1])
    released = _released(seen)
    assert 1 <= len(released) <= 2  # sigma was calibrated for 2 releases, in all runs
    assert dp_accounting_epsilon(released, DELTA) <= BUDGET
    path = default_ledger_file(3)
    assert path.parent.parent == Path(os.environ[STATE_DIR_ENV])
    ledger = Ledger.from_json(path.read_text())
    assert sum(e[2] for e in ledger.history) == sum(s for _, _, s in released)
    refused = [m for m in seen if int(m[keys.REFUSED])]
    assert refused and all(float(m[keys.EPSILON]) <= BUDGET for m in seen)


def test_a_node_restarted_between_runs_keeps_its_ledger(tmp_path):
    """A SuperNode restart loses its Context.state; the default ledger file does not."""
    _ask(_run(1), 1)
    before = default_ledger_file(3).read_text()
    _, m = _ask(_run(2), 1)  # a new run, a new state: the spent step is still counted
    history = Ledger.from_json(default_ledger_file(3).read_text()).history
    assert sum(e[2] for e in history) == 2 and before != default_ledger_file(3).read_text()
    assert float(m[keys.EPSILON]) == pytest.approx(
        dp_accounting_epsilon([tuple(history[0])], DELTA), rel=0.01)


def test_an_ephemeral_ledger_is_the_operators_explicit_choice(tmp_path):
    """Only `ledger-path=":ephemeral:"` keeps a per-run budget, and it writes no file."""
    node = _node(**{"ledger-path": EPHEMERAL_LEDGER})
    for run_id in (1, 2):
        _, m = _ask(_run(run_id, node=node), 1)
        assert int(m[keys.REFUSED]) == 0 and int(m[keys.STEPS]) == 1
    assert not default_ledger_file(3).exists()


# ---- a ledger that cannot be used is refused, never reset ------------------------------


def test_a_missing_ledger_of_a_node_that_has_trained_is_refused(capsys):
    _ask(_run(1), 1)
    path = default_ledger_file(3)
    assert trained_marker(path).exists()
    path.unlink()  # lost (a bad restore, a wrong volume): not a fresh node
    with pytest.raises(LedgerUnavailable) as err:
        _ask(_run(2), 1)
    assert str(err.value) == UNAVAILABLE  # one fixed sentence for the server
    assert "has trained before" in capsys.readouterr().err  # the reason, in the node's log
    assert not path.exists()
    # The operator's deliberate reset removes the marker; the node starts again at 0.
    assert reset_ledger(path) is None and not trained_marker(path).exists()
    _, m = _ask(_run(3), 1)
    assert int(m[keys.REFUSED]) == 0


def test_an_operator_who_says_the_node_trained_before_gets_a_refusal_not_a_fresh_ledger():
    with pytest.raises(LedgerUnavailable, match="cannot open its privacy ledger"):
        _ask(_run(1, node=_node(**{"trained-before": True})), 1)
    assert not default_ledger_file(3).exists()


@pytest.mark.parametrize("damage", ["garbage", "a directory"])
def test_a_ledger_that_cannot_be_read_or_written_is_refused_and_kept(tmp_path, capsys, damage):
    path = tmp_path / "ledger.json"
    if damage == "garbage":
        path.write_text("{not json")
    else:
        path.mkdir()
    with pytest.raises(LedgerUnavailable) as err:
        _ask(_run(1, node=_node(**{"ledger-path": str(path)})), 1)
    assert str(err.value) == UNAVAILABLE and str(path) not in str(err.value)
    assert str(path) in capsys.readouterr().err
    assert path.is_dir() if damage != "garbage" else path.read_text() == "{not json"


def test_a_state_folder_that_cannot_be_created_is_refused(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(STATE_DIR_ENV, str(blocker / "state"))
    with pytest.raises(LedgerUnavailable, match="cannot open its privacy ledger"):
        _ask(_run(1), 1)


# ---- 2. one spender at a time ------------------------------------------------------------


def test_a_request_waits_for_the_ledger_lock_then_refuses_nothing_spent():
    node = _node(**{"ledger-wait": 0.3})
    path = default_ledger_file(3)
    path.parent.mkdir(parents=True)
    fd = os.open(lock_file(path), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another process is between load and save
    try:
        start = time.monotonic()
        with pytest.raises(LedgerUnavailable) as err:
            _ask(_run(1, node=node), 1)
        assert str(err.value) == BUSY and time.monotonic() - start >= 0.3
        assert not path.exists()  # nothing trained, nothing spent
        # Released while it waits: the request goes on.
        threading.Timer(0.3, lambda: fcntl.flock(fd, fcntl.LOCK_UN)).start()
        _, m = _ask(_run(1, node=_node(**{"ledger-wait": 30})), 1)
        assert int(m[keys.REFUSED]) == 0 and path.exists()
    finally:
        os.close(fd)


CONCURRENT_NODE = textwrap.dedent("""
    import json, sys, time
    from client.app import train
    from tests.helpers import context, train_message
    from tests.test_ledger_guard import GLOBAL, _node
    from common import keys
    run_id, ledger, start, rounds = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    ctx = context(partition_id=3, harness_policy=False, run_id=run_id, model="logreg",
                  target_epsilon=3.0, node_extra=_node(**{"ledger-path": ledger}))
    while time.time() < start:
        time.sleep(0.005)
    out = []
    for r in range(1, rounds + 1):
        m = train(train_message(GLOBAL, server_round=r, planned_rounds=5), ctx).content["metrics"]
        out.append({k: float(m[k]) for k in (keys.REFUSED, keys.NOISE_MULTIPLIER,
                                             keys.SAMPLE_RATE, keys.STEPS, keys.EPSILON)})
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_concurrent_runs_in_separate_processes_cannot_fork_the_ledger(tmp_path):
    """Three runs at once on one node, each request in its own process (as Flower's
    executor starts ClientApp processes side by side), all released at the same moment
    after their imports. Before, each loaded the ledger, trained, then saved: 15 releases
    against a ledger of 5 steps (true epsilon 5.60 against 3). Now every release is in
    the ledger, and the releases' own epsilon is within the budget."""
    ledger = tmp_path / "ledger.json"
    start = time.time() + 25  # after every process has imported torch and the app
    root = Path(__file__).resolve().parent.parent
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_NODE, str(run), str(ledger),
                               str(start), "5"], cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for run in (1, 2, 3)]
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=600)
            assert p.returncode == 0, err[-3000:]
            outputs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            p.kill()
    metrics = [{keys.REFUSED: m[keys.REFUSED], keys.NOISE_MULTIPLIER: m[keys.NOISE_MULTIPLIER],
                keys.SAMPLE_RATE: m[keys.SAMPLE_RATE], keys.STEPS: int(m[keys.STEPS])}
               for run in outputs for m in run]
    released = _released(metrics)
    history = Ledger.from_json(ledger.read_text()).history
    assert sum(e[2] for e in history) == sum(s for _, _, s in released)  # every release
    assert 1 <= len(released) <= 5  # sigma calibrated for 5 releases, over all runs
    assert dp_accounting_epsilon(released, DELTA) <= BUDGET
    assert all(m[keys.EPSILON] <= BUDGET for run in outputs for m in run)


# ---- 4. spend only what can be released ---------------------------------------------------


def test_a_fresh_node_never_adopts_a_history_the_server_offers():
    """Before, a fresh node offered a `known-history` adopted phantom steps that burnt
    most of its budget (a denial of service). Now it is ignored unless the operator
    allows it (adopt-server-history=true), and then it may only lengthen the ledger."""
    phantom = [[0.5, 1.0, 2]]
    _, m = _ask(_run(1), 1, view=phantom)
    history = Ledger.from_json(default_ledger_file(3).read_text()).history
    assert int(m[keys.REFUSED]) == 0 and [list(e) for e in history] != phantom
    assert sum(e[2] for e in history) == 1
    adopting = _node(**{"adopt-server-history": True})
    _, m = _ask(_run(2, pid=4, node=adopting), 1, view=[[9.0, 1.0, 2]])
    history = Ledger.from_json(default_ledger_file(4).read_text()).history
    assert history[0] == (9.0, 1.0, 2) and sum(e[2] for e in history) == 3


@pytest.mark.parametrize("server_round", [0, -1, -(2**70), 2**41])
def test_a_round_number_no_stage_can_use_is_refused_before_anything_is_spent(server_round):
    reply, m = _ask(_run(1), server_round)
    assert int(m[keys.REFUSED]) == 1
    assert "server-round" in str(reply.content[keys.PRIVACY][keys.REASON])
    assert not default_ledger_file(3).exists()


@pytest.mark.parametrize("server_round", [-1, 0, 2**41])
def test_a_secure_round_with_a_bad_round_number_spends_nothing(server_round):
    """Before, a negative server-round went through the keys and masked stages, spent,
    and failed while masking (the round is the masks' nonce). Now every stage refuses it."""
    from common.arrays import to_array_record
    from server.wire import stage_message, train_config
    from tests.local_grid import LocalGrid

    over = {"secure-aggregation": "secagg+", "noise": "distributed", "num-partitions": 3}
    grid = LocalGrid(3, **over)
    replies = grid.send_and_receive([stage_message(1000 + p, "secagg_keys",
                                                   {"server-round": server_round})
                                     for p in range(3)])
    assert all(r.has_error() and "server-round" in r.error.reason for r in replies)
    config = train_config(server_round=server_round, planned_rounds=3, known_history=None)
    config["scale"] = 1e6
    config["shares"] = "{}"
    reply = grid.send_and_receive([stage_message(1000, "secagg_masked", config,
                                                 to_array_record(GLOBAL))])
    assert reply[0].has_error()
    assert not any(default_ledger_file(p).exists() for p in range(3))


def test_a_secure_release_waits_for_the_ledger_lock_too():
    """The masked stage spends: it holds the same lock as a plain train request."""
    from server.round import play
    from tests.test_secure_round import _setup

    _, grid, strategy, secure = _setup(num_nodes=3, node_extra={"ledger-wait": 0.2})
    path = default_ledger_file(0)
    path.parent.mkdir(parents=True)
    fd = os.open(lock_file(path), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        play(grid, strategy, secure, 1, dict(GLOBAL), planned=3)
    finally:
        os.close(fd)
    masked = [r for r in grid.received if r.metadata.message_type == "train.secagg_masked"
              and r.metadata.src_node_id == 1000]
    assert masked and masked[0].has_error() and BUSY in masked[0].error.reason
    assert not path.exists()
    assert all(default_ledger_file(p).exists() for p in (1, 2))  # the others released


def test_non_finite_own_records_are_checked_in_the_dtype_they_train_in(tmp_path):
    """A value above float32's range is finite in float64 and inf in training."""
    from common.errors import DataError
    from common.tables import own_split

    table = tmp_path / "t.csv"
    rows = ["a,b,label"] + [f"{i / 10},{i / 20},{i % 2}" for i in range(20)]
    rows[5] = "1e39,0.5,0"
    table.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match="float32's range"):
        own_split(f"csv:{table}", "label", "0,1")
    assert np.isinf(np.float32(1e39))
    assert math.isfinite(1e39)
