"""End to end: `dpfl simulate` with real Flower processes, real Opacus, real data."""

import math
import os
import signal
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from common.records import read_json
from simulations.simulate import simulate
from tests.helpers import read_rounds, sigkill_tree
from tests.test_privacy import dp_accounting_epsilon

pytestmark = pytest.mark.slow

# 100 clients of 600 images, cohorts of 10, 30 rounds (3 participations per client) at a
# small budget, where the noise visibly costs accuracy: measured 73.5% at epsilon 0.25,
# 80.0% with the noise switched off, 87-90% non-private.
SMALL = {"num-rounds": 30, "target-epsilon": 0.25}


FLOWER_PROCESSES = ("flower-superlink", "flower-superexec", "flwr-simulation",
                    "ray::ClientAppActor", "raylet", "gcs_server",
                    "multiprocessing.forkserver")  # the in-process runtime's workers
# Every process this test session starts inherits this mark (Ray's actors too, though
# they are re-parented to init), so leftovers are told apart from other runs on a
# shared machine.
SESSION = os.environ.setdefault("DPFL_TEST_SESSION", uuid.uuid4().hex)


def _no_leftover_flower_processes():
    """Flower and Ray processes started by this test session that are still alive."""
    left = []
    for proc in psutil.process_iter(["cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        if not any(p in line for p in FLOWER_PROCESSES):
            continue
        try:
            ours = proc.environ().get("DPFL_TEST_SESSION") == SESSION
            if ours and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(line)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return left


@pytest.fixture(scope="module")
def private_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return simulate(SMALL, output_dir=str(out), progress=None)


def test_private_simulation_meets_band_and_budget(private_run):
    summary = read_json(private_run / "summary.json")
    rows = read_rounds(private_run / "rounds.jsonl")
    assert [r["round"] for r in rows] == list(range(1, 31))
    assert all(r["clients_trained"] == 10 and r["clients_failed"] == 0 for r in rows)
    assert all(r["clients_refused"] == 0 for r in rows)  # cohorts: calibrated exactly
    # A floor (it learns) and a ceiling (the noise is really there).
    assert 0.65 <= summary["final_accuracy"] <= 0.78
    assert summary["epsilon_max"] <= summary["target_epsilon"] == 0.25
    assert summary["num_clients"] == 100 and summary["rounds"] == 30
    assert summary["epsilon_max"] > 0.9 * 0.25  # the budget is used, not wasted


def test_privacy_json_recomputes_with_dp_accounting(private_run):
    priv = read_json(private_run / "privacy.json")
    assert priv["accountant"] == "rdp" and len(priv["clients"]) == 100
    for client in priv["clients"].values():
        history = [tuple(e) for e in client["history"]]
        assert sum(e[2] for e in history) > 0
        independent = dp_accounting_epsilon(history, priv["delta"])
        assert client["epsilon"] == pytest.approx(independent, rel=0.01)
        assert client["epsilon"] <= priv["target_epsilon"]


def test_run_files_are_complete(private_run):
    config = read_json(private_run / "config.json")
    assert config["run_config"]["num-partitions"] == 100
    assert config["libraries"]["opacus"].startswith("1.6")
    assert (private_run / "model.npz").stat().st_size > 0
    assert not _no_leftover_flower_processes()


def test_nonprivate_baseline_beats_the_private_run(tmp_path, private_run):
    run = simulate({**SMALL, "target-epsilon": math.inf}, output_dir=str(tmp_path), progress=None)
    summary = read_json(run / "summary.json")
    assert summary["private"] is False and summary["epsilon_max"] == "inf"
    assert summary["final_accuracy"] > read_json(private_run / "summary.json")["final_accuracy"]
    assert summary["final_accuracy"] >= 0.85


def test_cli_rejects_bad_config_before_starting(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "simulate", "--output-dir", str(tmp_path),
         "--run-config", "fraction-train=0"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "fraction-train=0.0 must be in (0, 1]" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())


def test_run_that_cannot_train_stops_early_and_says_why(tmp_path):
    # noise-multiplier fixed and a budget too small for even one round: every client refuses
    run = simulate({"num-partitions": 10, "num-rounds": 50, "noise-multiplier": 0.5,
                    "target-epsilon": 0.1, "max-idle-rounds": 3},
                   output_dir=str(tmp_path), progress=None)
    summary = read_json(run / "summary.json")
    rows = read_rounds(run / "rounds.jsonl")
    assert summary["rounds"] == 3 and "3 consecutive round(s)" in summary["stopped_early"]
    assert all(r["clients_refused"] == r["clients_sampled"] > 0 for r in rows)
    assert "would reach epsilon" in rows[0]["reasons"][0]
    assert summary["epsilon_max"] == 0.0  # nothing was spent


def test_interrupted_simulation_leaves_no_process_behind(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulations.cli", "simulate", "--output-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},  # see each round line as it is printed
    )
    try:
        for line in proc.stdout:  # wait until rounds are running
            if line.startswith("round"):
                break
        proc.send_signal(signal.SIGINT)
        t0 = time.time()
        out, _ = proc.communicate(timeout=180)
        print(f"stopped {time.time() - t0:.1f}s after SIGINT")
    finally:
        if proc.poll() is None:
            sigkill_tree(proc.pid)  # the harness and everything it started
            proc.wait()
    assert proc.returncode == 130 and "interrupted" in out
    assert not _no_leftover_flower_processes()
    run = next(tmp_path.iterdir())
    assert read_rounds(run / "rounds.jsonl")  # what was written stays readable


def test_both_runtimes_train_the_same_model(tmp_path):
    """The same non-private run on dpfl's in-process runtime and on Flower's simulation
    engine (SuperLink, flwr run, Ray actors): the same apps, so the same clients each
    round and the same final model to the last bit (one torch thread each, so that
    sums are taken in the same order)."""
    import numpy as np

    from simulations.runtime import Backend

    run = {"num-partitions": 10, "num-rounds": 3, "fraction-train": 0.3, "seed": 7,
           "target-epsilon": math.inf, "model": "logreg", "num-threads": 1}
    ours = simulate({**run, "run-name": "inprocess"}, output_dir=str(tmp_path), progress=None,
                    backend=Backend(runtime="inprocess"))
    flower = simulate({**run, "run-name": "flower"}, output_dir=str(tmp_path), progress=None,
                      backend=Backend(runtime="flower"))
    assert [r["partitions_trained"] for r in read_rounds(ours / "rounds.jsonl")] == \
        [r["partitions_trained"] for r in read_rounds(flower / "rounds.jsonl")]
    a, b = np.load(ours / "model.npz"), np.load(flower / "model.npz")
    assert sorted(a.files) == sorted(b.files)
    for name in a.files:
        np.testing.assert_array_equal(a[name], b[name])
    assert (flower / "logs" / "flwr.log").exists() and (ours / "logs" / "server.log").exists()
    assert not _no_leftover_flower_processes()
