"""A hostile ServerApp against dpfl's real ClientApp, through real Flower processes.

The test plays the data holders' harness: it starts a simulation SuperLink whose virtual
nodes get their policy (budget 3, DP required) and ledger folder from DPFL_NODE_CONFIG.
The server is tests/hostile_app/hostile_server.py, submitted with `flwr run` like any
app: first with an ordinary run config, attacking with borrowed histories, too many
rounds and overflowing weights; then with a run config that turns DP off.
"""

import json
import math
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from client.ledger import Ledger
from common import privacy
from common.config import default_run_config, project_root
from common.node import NODE_CONFIG_ENV
from simulations import runtime
from simulations.simulate import format_overrides

pytestmark = pytest.mark.slow
BUDGET = 3.0


def _app(tmp_path: Path) -> Path:
    """The hostile app: dpfl's own pyproject (every config key, the real ClientApp) with
    the ServerApp swapped for the hostile one."""
    app = tmp_path / "hostile-app"
    app.mkdir()
    text = (project_root() / "pyproject.toml").read_text()
    text, n = re.subn(r'serverapp = "server\.app:app"', 'serverapp = "hostile_server:app"', text)
    assert n == 1
    (app / "pyproject.toml").write_text(text)
    shutil.copy(Path(__file__).parent / "hostile_app" / "hostile_server.py", app)
    return app


def _flwr_run(app: Path, connection: str, home: Path, run_config: dict, log: Path) -> None:
    cmd = [runtime.tool("flwr"), "run", str(app), connection,
           "--run-config", format_overrides(run_config),
           "--federation-config", "num-supernodes=2 client-resources-num-cpus=1", "--stream"]
    proc = runtime.start(cmd, env=runtime.flower_env(home), log_file=log, cwd=app)
    try:
        out = Path(str(run_config["output-dir"])) / "hostile.json"
        deadline = time.monotonic() + 900  # generous: a busy machine only makes it slower
        while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
        for _ in range(30):  # the file is written last; give the write a moment
            if out.exists():
                break
            time.sleep(1)
        assert out.exists(), log.read_text()[-3000:]
    finally:
        runtime.stop(proc)


def test_a_hostile_server_cannot_spend_more_than_the_nodes_budget(tmp_path):
    app = _app(tmp_path)
    ledgers = tmp_path / "ledgers"
    home = Path(tempfile.mkdtemp(prefix="dpfl-hostile-home-"))
    policy = {"require-dp": True, "max-epsilon": BUDGET, "max-delta": 1e-5,
              "ledger-dir": str(ledgers)}
    base = {k: v for k, v in default_run_config().items()}
    base.update({"model": "logreg", "num-partitions": 2, "target-epsilon": BUDGET})
    try:
        with runtime.simulation_superlink(home, tmp_path / "superlink.log",
                                          extra_env={NODE_CONFIG_ENV: format_overrides(policy)}) as conn:
            # Run 1: 40 rounds asked, a cheap history offered every round, then weights
            # that overflow for bright records.
            attack = tmp_path / "attack"
            _flwr_run(app, conn, home, {**base, "num-rounds": 40, "output-dir": str(attack)},
                      tmp_path / "flwr-1.log")
            seen = json.loads((attack / "hostile.json").read_text())
            # Run 2: the run config turns DP off.
            nodp = tmp_path / "nodp"
            before = {p.name: p.read_text() for p in ledgers.glob("partition-*.json")}
            _flwr_run(app, conn, home, {**base, "num-rounds": 1, "dp": False,
                                        "output-dir": str(nodp)}, tmp_path / "flwr-2.log")
            seen_nodp = json.loads((nodp / "hostile.json").read_text())
    finally:
        shutil.rmtree(home, ignore_errors=True)

    assert not any("error" in s for s in seen), seen
    for pid in (0, 1):
        mine = [s for s in seen if s["partition"] == pid]
        trained = [s for s in mine[:-1] if not s["refused"]]
        # An honest run plans 15 full-batch steps for this budget; the borrowed history
        # did not buy more.
        assert 1 <= len(trained) <= 15
        assert all(s["epsilon"] <= BUDGET for s in mine)
        assert all("would reach epsilon" in s["reason"] for s in mine[len(trained):-1])
        ledger = Ledger.from_json((ledgers / f"partition-{pid}.json").read_text())
        own = [e for e in ledger.history if e[0] == ledger.noise_multiplier]
        assert privacy.total_steps(own) == len(trained)  # the ledger holds every released step
        assert privacy.epsilon(own, 1e-5) <= ledger.epsilon(1e-5, "rdp") <= BUDGET
        # The overflowing weights: refused before any data was read.
        last = mine[-1]
        assert last["refused"] == 1 and "max-model-norm" in last["reason"]
    # DP off: every node refuses every request (1 round + the overflow one), nothing spent.
    assert len(seen_nodp) == 4 and all(s["refused"] == 1 and "require-dp" in s["reason"]
                                       and s["finite"] is None for s in seen_nodp)
    assert {p.name: p.read_text() for p in ledgers.glob("partition-*.json")} == before
    assert not math.isnan(seen[0]["epsilon"])
    leftovers = subprocess.run(["pgrep", "-f", str(home)], capture_output=True, text=True).stdout
    assert not leftovers.strip()


def test_a_hostile_secure_server_in_real_processes_unmasks_no_one(tmp_path):
    """Secure aggregation against an active server, through real Flower processes: the
    harness issues the roster; tests/hostile_app/hostile_secagg_server.py shows the target
    (partition 0) a cohort of three while the others see four, forwards it every share,
    splits the survivor list and asks everyone to reveal with every signature it got.
    The target spends nothing (no share of another view is taken), the others' split
    list gathers too few signatures, so nobody reveals anything."""
    from simulations.simulate import harness_roster

    app = _app(tmp_path)
    (app / "pyproject.toml").write_text((app / "pyproject.toml").read_text().replace(
        'serverapp = "hostile_server:app"', 'serverapp = "hostile_secagg_server:app"'))
    shutil.copy(Path(__file__).parent / "hostile_app" / "hostile_secagg_server.py", app)
    ledgers = tmp_path / "ledgers"
    home = Path(tempfile.mkdtemp(prefix="dpfl-hostile-home-"))
    policy = {"require-dp": True, "max-epsilon": BUDGET, "max-delta": 1e-5,
              "ledger-dir": str(ledgers), **harness_roster(tmp_path / "roster", 4)}
    base = {k: v for k, v in default_run_config().items()}
    base.update({"model": "logreg", "num-partitions": 4, "target-epsilon": BUDGET,
                 "secure-aggregation": "secagg+", "noise": "distributed",
                 "secagg-threshold": 0.75, "batch-size": 0, "local-epochs": 1,
                 "momentum": 0.0, "min-train-clients": 2, "num-rounds": 1})
    out = tmp_path / "attack"
    try:
        with runtime.simulation_superlink(home, tmp_path / "superlink.log",
                                          extra_env={NODE_CONFIG_ENV: format_overrides(policy)}) as conn:
            cmd = [runtime.tool("flwr"), "run", str(app), conn, "--run-config",
                   format_overrides({**base, "output-dir": str(out)}),
                   "--federation-config", "num-supernodes=4 client-resources-num-cpus=1",
                   "--stream"]
            proc = runtime.start(cmd, env=runtime.flower_env(home), log_file=tmp_path / "flwr.log",
                                 cwd=app)
            try:
                deadline = time.monotonic() + 900
                while not (out / "hostile.json").exists() and proc.poll() is None \
                        and time.monotonic() < deadline:
                    time.sleep(1)
                time.sleep(1)
                assert (out / "hostile.json").exists(), (tmp_path / "flwr.log").read_text()[-3000:]
            finally:
                runtime.stop(proc)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    seen = json.loads((out / "hostile.json").read_text())
    # The files are the ground truth (error texts cross Ray and are checked in-process,
    # tests/test_active_server.py): the target's ledger holds no release, the others'
    # one each, and no reveal reached the server.
    target = ledgers / "partition-0.json"
    assert not target.exists() or not Ledger.from_json(target.read_text()).history, seen
    for p in (1, 2, 3):
        assert len(Ledger.from_json((ledgers / f"partition-{p}.json").read_text()).history) == 1
    assert not seen["revealed"], seen  # nobody revealed: the split list had too few signatures
    assert len(seen["signatures"]) < 3  # the threshold of the full view: 3 of 4
