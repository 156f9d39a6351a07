"""dpfl's in-process runtime (simulations/inprocess.py): the real ServerApp and ClientApp
through Flower's Message API, the ClientApp in worker processes, on the tiny real data."""

import math
import os
import signal
import time

import numpy as np
import psutil
import pytest
from flwr.supercore.task_identity import TaskIdentity

from common.config import ConfigError
from common.records import RunDir, read_json
from server.wire import query_message
from simulations.inprocess import InProcessGrid, WorkerPool, node_ids
from simulations.runtime import Backend
from simulations.simulate import simulate
from tests.helpers import FAST, context
from tests.test_privacy import dp_accounting_epsilon

RUN = {**FAST, "num-rounds": 4, "fraction-train": 0.3, "seed": 3}


def _run(tmp_path, name, workers, **over):
    return RunDir(simulate({**RUN, "run-name": name, **over}, output_dir=str(tmp_path),
                           backend=Backend(runtime="inprocess", workers=workers), progress=None))


@pytest.mark.slow
def test_a_private_run_trains_under_every_client_s_ledger(tmp_path):
    run = _run(tmp_path, "private", 2, **{"target-epsilon": 3.0})
    rows, summary, priv = run.rounds(), read_json(run.path / "summary.json"), run.privacy()
    assert [r.round for r in rows] == [1, 2, 3, 4]
    assert all(r.clients_trained == r.clients_sampled == 3 for r in rows)
    assert all(r.seconds_clients > 0 and r.seconds_evaluate > 0 for r in rows)
    assert priv.source == "ledger files"
    joined = {p: sum(p in r.partitions_trained for r in rows) for p in range(10)}
    for pid, count in joined.items():
        ledger = read_json(run.path / "ledgers" / f"partition-{pid}.json")
        sigma = ledger["noise_multiplier"]
        assert ledger["history"] == [[sigma, 1.0, count]]  # one full-batch step a round joined
        expect = dp_accounting_epsilon([(sigma, 1.0, count)], 1e-5)
        assert float(priv.clients[str(pid)].epsilon) == pytest.approx(expect, rel=0.01)
        assert expect <= 3.0
    assert 0 < summary["epsilon_max"] <= 3.0
    assert (run.logs / "server.log").read_text().count("round ") >= 4


@pytest.mark.slow
def test_the_schedule_does_not_change_what_is_computed(tmp_path):
    """A non-private run is reproducible: one worker or two (messages served in another
    order, by other processes), the same final model to the last bit."""
    one = _run(tmp_path, "one", 1, **{"target-epsilon": math.inf, "num-threads": 1})
    two = _run(tmp_path, "two", 2, **{"target-epsilon": math.inf, "num-threads": 1})
    a, b = np.load(one.path / "model.npz"), np.load(two.path / "model.npz")
    assert sorted(a.files) == sorted(b.files)
    for name in a.files:
        np.testing.assert_array_equal(a[name], b[name])
    assert [r.partitions_trained for r in one.rounds()] == [r.partitions_trained for r in two.rounds()]


@pytest.mark.slow
def test_a_failing_client_is_an_error_reply_and_the_run_goes_on(tmp_path):
    """A node whose partition is out of range raises in the ClientApp: the server gets
    Flower's error reply, as from a SuperNode, and the other clients' rounds go on."""
    from flwr.app import Context, RecordDict

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    good = context(partition_id=0)
    with WorkerPool(1, env={}) as pool:
        pool.contexts[5] = Context(run_id=1, node_id=5, state=RecordDict(),
                                   run_config=good.run_config,
                                   node_config={**good.node_config, "partition-id": 99})
        pool.contexts[6] = good
        replies = InProcessGrid(pool, 1).send_and_receive(
            [query_message(5), query_message(6)], timeout=120)
    by_node = {r.metadata.src_node_id: r for r in replies}
    assert by_node[5].has_error() and "partition-id=99" in by_node[5].error.reason
    assert not by_node[6].has_error()


@pytest.mark.slow  # seconds of real work; the fast suite stays under a minute
def test_a_worker_that_dies_is_replaced_and_every_message_is_answered():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    with WorkerPool(2, env={}) as pool:
        for n in range(1, 9):
            pool.contexts[n] = context(partition_id=n - 1)
        grid = InProcessGrid(pool, 1)
        assert len(grid.send_and_receive([query_message(n) for n in range(1, 9)],
                                         timeout=120)) == 8
        before = pool.pids
        # killed mid-message or idle: either way an answer (a reply or the error) comes
        ids = grid.push_messages([query_message(n) for n in range(1, 9)])
        for pid in before:
            os.kill(pid, signal.SIGKILL)
        replies = pool.take(ids, timeout=120)
        assert len(replies) == 8
        assert all(not r.has_error() or "died" in r.error.reason for r in replies)
        deadline = time.time() + 60
        while set(pool.pids) & set(before) and time.time() < deadline:
            time.sleep(0.1)
        assert not set(pool.pids) & set(before)
        again = grid.send_and_receive([query_message(n) for n in range(1, 9)], timeout=120)
        assert len(again) == 8 and not any(r.has_error() for r in again)
        pids = pool.pids
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in pids)


@pytest.mark.slow  # seconds of real work; the fast suite stays under a minute
def test_one_node_runs_one_message_at_a_time_and_keeps_its_state():
    """Messages to one node wait for each other (its context is updated by each in turn)
    while another node's run beside them."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    with WorkerPool(2, env={}) as pool:
        pool.contexts[1] = context(partition_id=0)
        pool.contexts[2] = context(partition_id=1)
        ids = [pool.submit(query_message(1)) for _ in range(3)] + [pool.submit(query_message(2))]
        replies = pool.take(ids, timeout=120)
        assert len(replies) == 4 and not any(r.has_error() for r in replies)
        assert pool.contexts[1].node_config["partition-id"] == 0


def test_node_ids_are_distinct_random_and_do_not_reveal_partitions():
    ids = node_ids(1000)
    assert len(set(ids)) == 1000 and all(0 < i < 2**63 for i in ids)
    assert ids != sorted(ids) and node_ids(1000) != ids


def test_ray_options_need_flower_s_runtime():
    assert Backend().engine == "inprocess"
    assert Backend(ray_address="127.0.0.1:6379").engine == "flower"
    assert Backend(client_gpus=0.5).engine == "flower"
    assert Backend(runtime="flower").engine == "flower"
    with pytest.raises(ConfigError, match="need --runtime flower"):
        Backend(runtime="inprocess", ray_address="127.0.0.1:6379")
    with pytest.raises(ConfigError, match="--runtime='ray'"):
        Backend(runtime="ray")
    with pytest.raises(ConfigError, match="--workers"):
        Backend(workers=-1)


@pytest.mark.slow
def test_bench_run_times_a_whole_command_and_names_every_process(tmp_path):
    from simulations.bench import command_figures

    # private rounds (Opacus), so that the workers live for more than a few memory samples
    over = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
                    for k, v in {**RUN, "num-rounds": 8}.items())
    figs = command_figures(over, runtime_args=["--workers", "2"])
    assert figs["rounds"] == 8 and figs["wall_seconds"] > figs["first_round_after_seconds"] > 0
    start = figs["start_up_seconds"]
    assert all(v >= 0 for v in start.values()), start
    assert all(v >= 0 for v in figs["round_breakdown_seconds"].values())
    assert any(k.startswith("waiting for the clients") and v > 0
               for k, v in figs["round_breakdown_seconds"].items())
    assert {"dpfl (this command)", "client worker"} <= set(figs["peak_pss_mib_of_each_process"])
    assert set(figs["pss_mib_by_process_at_peak"]) <= set(figs["peak_pss_mib_of_each_process"])


@pytest.mark.slow  # seconds of real work; the fast suite stays under a minute
def test_a_message_to_an_unknown_node_gets_no_id_as_on_flower_s_grid():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    with WorkerPool(1, env={}) as pool:
        pool.contexts[1] = context(partition_id=0)
        grid = InProcessGrid(pool, 1)
        ids = grid.push_messages([query_message(1), query_message(999)])
        assert len(ids) == 1
        assert len(grid.pull_messages(ids) or pool.take(ids, timeout=120)) == 1


def test_workers_that_cannot_start_stop_the_pool_with_the_reason(tmp_path):
    """A worker that dies before it is ready (here: its log file cannot be opened) is
    not restarted for ever: after three, every caller hears why."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    with WorkerPool(1, env={}, log_file=str(tmp_path / "missing" / "clients.log")) as pool:
        pool.contexts[1] = context(partition_id=0)
        deadline = time.time() + 120
        while not pool._failed and time.time() < deadline:
            time.sleep(0.1)
        assert "died before they could run a message" in pool._failed
        with pytest.raises(RuntimeError, match="died before"):
            pool.submit(query_message(1))


@pytest.mark.slow
def test_a_script_read_from_standard_input_can_simulate(tmp_path):
    """`python - <<EOF`: multiprocessing would re-import `<stdin>` in every worker (none
    would start); the runtime starts them without the caller's main module."""
    import subprocess
    import sys

    script = (f"from simulations.simulate import simulate\n"
              f"from simulations.runtime import Backend\n"
              f"simulate({dict(RUN, **{'num-rounds': 1})!r},"
              f" output_dir={str(tmp_path)!r}, backend=Backend(runtime='inprocess', workers=2),"
              f" progress=None)\n")
    done = subprocess.run([sys.executable, "-"], input=script, text=True, capture_output=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = [RunDir(p) for p in tmp_path.iterdir() if p.is_dir()]
    assert [r.round for r in run.rounds()] == [1]
