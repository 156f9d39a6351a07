"""`dpfl sweep` and `dpfl report`: grid parsing (fast), and a real small sweep that is
killed, rerun, has a failing point, and is reported (slow)."""

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.config import ConfigError
from common.records import read_json
from simulations.report import group_rows, load_runs, partition_label, report
from simulations.sweep import GRIDS, expand, load_grid, point_name, run_sweep
from tests.helpers import read_rounds, sigkill_tree


def test_shipped_grids_expand_to_valid_points():
    default = expand(load_grid(GRIDS / "default.toml"))
    assert len(default) == 12
    assert {p.overrides["target-epsilon"] for p in default} == {0.5, 1.0, 2.0, 4.0, 8.0, math.inf}
    assert {p.overrides["partitioner"] for p in default} == {"iid", "dirichlet"}
    assert all(p.overrides["num-partitions"] == 100 for p in default)
    assert len(expand(load_grid(Path("noniid")))) == 15  # a shipped grid by name


def test_command_line_axes_and_names():
    spec = load_grid(None, "target-epsilon=1,inf partition=iid,pathological:3", "num-rounds=5")
    points = expand(spec)
    assert [p.name for p in points] == ["eps-1_iid", "eps-1_pathological-3", "eps-inf_iid",
                                        "eps-inf_pathological-3"]
    assert points[1].overrides == {"num-rounds": 5, "target-epsilon": 1, "partitioner": "pathological",
                                   "labels-per-client": 3}
    assert point_name({"seed": 4, "dirichlet-alpha": 0.1}) == "seed-4_dirichlet-alpha-0.1"


@pytest.mark.parametrize("axes,match", [
    ("partition=shards", "partition='shards' must be iid, dirichlet:ALPHA or pathological:K"),
    ("target-epsilon=-1,2", "target-epsilon=-1.0 must be > 0"),
    ("no-such-key=1,2", "unknown config key"),
    ("run-name=a,b", "run-name is set by the sweep"),
])
def test_bad_grids_are_named_before_anything_runs(axes, match):
    with pytest.raises(ConfigError, match=match):
        expand(load_grid(None, axes))


def test_grid_file_errors_are_clear(tmp_path):
    bad = tmp_path / "g.toml"
    bad.write_text("[grid]\ntarget-epsilon = [1.0,\n")
    with pytest.raises(ConfigError, match="grid file"):
        load_grid(bad)
    bad.write_text("[grids]\nseed = [1]\n")
    with pytest.raises(ConfigError, match=r"unknown table\(s\) grids"):
        load_grid(bad)
    with pytest.raises(ConfigError, match="no axes"):
        load_grid(None, "")


def test_a_sweep_dir_is_not_reused_for_another_grid(tmp_path):
    # Both points fail before starting (delta too large for 600 records): quick and real.
    spec = load_grid(None, "target-delta=0.5,0.6")
    spec["name"] = "s"
    run_sweep(spec, tmp_path, stream=open(tmp_path / "log", "w"))
    assert all((tmp_path / "s" / p / "failed.json").exists()
               for p in ("target-delta-0.5", "target-delta-0.6"))
    other = load_grid(None, "target-delta=0.5,0.7")
    other["name"] = "s"
    with pytest.raises(ConfigError, match="another grid"):
        run_sweep(other, tmp_path)


def test_partition_labels():
    from common.config import resolve_config

    assert partition_label(resolve_config({"partitioner": "iid"})) == "IID"
    assert partition_label(resolve_config({"partitioner": "dirichlet", "dirichlet-alpha": 0.5})) \
        == "Dirichlet(α=0.5)"
    assert partition_label(resolve_config({"partitioner": "pathological", "labels-per-client": 2})) \
        == "2 labels/client"


# ---- a real sweep -------------------------------------------------------------------

AXES = "num-rounds=2,3 target-delta=1e-5,0.5"
FIXED = "num-partitions=4 target-epsilon=2.0"


def _sweep_cmd(out):
    return [sys.executable, "-m", "simulations.cli", "sweep", "-g", AXES, "-c", FIXED,
            "--name", "t", "--output-dir", str(out)]


@pytest.mark.slow
def test_sweep_survives_a_kill_records_a_failure_and_reports(tmp_path):
    sweep = tmp_path / "t"
    names = ["num-rounds-2_target-delta-1e-05", "num-rounds-2_target-delta-0.5",
             "num-rounds-3_target-delta-1e-05", "num-rounds-3_target-delta-0.5"]
    proc = subprocess.Popen(_sweep_cmd(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 400
        while not read_rounds(sweep / names[2] / "rounds.jsonl"):
            assert proc.poll() is None and time.time() < deadline, "the sweep did not reach point 3"
            time.sleep(0.2)
    finally:
        sigkill_tree(proc.pid)
    first_summary = sweep / names[0] / "summary.json"
    stamp = first_summary.stat().st_mtime_ns
    assert "target-delta=0.5 must be < 1/n" in read_json(sweep / names[1] / "failed.json")["error"]
    assert not (sweep / names[2] / "summary.json").exists()

    # A killed sweep can be reported as it is.
    report(sweep)
    assert "incomplete" in (sweep / "results.md").read_text()

    again = subprocess.run(_sweep_cmd(tmp_path), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    out = again.stdout
    assert f"point 1/4 {names[0]} (finished)" in out and f"point 3/4 {names[2]} (interrupted)" in out
    assert "FAILED: target-delta=0.5" in out and "2 of 4 points finished, 2 failed" in out
    assert first_summary.stat().st_mtime_ns == stamp  # a finished point is not recomputed
    assert read_json(sweep / names[2] / "summary.json")["resumed"] is True
    assert [r["round"] for r in read_rounds(sweep / names[2] / "rounds.jsonl")] == [1, 2, 3]

    rows = group_rows(load_runs(sweep), ["num-rounds", "target-delta"])
    finished = [r for r in rows if r["seeds"]]
    assert len(finished) == 2 and all(r["epsilon_max"] <= r["target_epsilon"] for r in finished)
    for name in ("results.csv", "results.md", "report.md", "accuracy_vs_epsilon.png",
                 "accuracy_per_round.png"):
        assert (sweep / name).stat().st_size > 0
    assert (sweep / "accuracy_vs_epsilon.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (sweep / "report.md").read_text()
    assert "Record-level differential privacy" in text and "opacus" in text
    assert "each client's noisy model" in text and "secagg+" not in text  # local noise only
    assert "## Failed points" in text and names[1] in text


def test_the_report_says_what_the_server_saw():
    """A secure-aggregation sweep's report no longer says there is no secure aggregation."""
    from types import SimpleNamespace

    from simulations.report import privacy_model

    def run(secure):
        return SimpleNamespace(cfg=SimpleNamespace(secure=SimpleNamespace(enabled=secure)))

    secure = privacy_model([run(True)])
    assert "only each cohort's sum" in secure and "noisy model" not in secure
    assert "no secure aggregation" not in secure
    both = privacy_model([run(True), run(False)])
    assert "only each cohort's sum" in both and "each client's noisy model" in both
