"""docker-compose.yml for real: the image built where no registry is reachable (a base
image from Debian packages, scripts/build-image.sh), the federation up in containers
(certificates, SuperLink with TLS and node authentication, registration, three nodes),
private rounds started from the host with `flwr run`, a node container killed mid-run
and brought back by its restart policy with its ledger on its volume, an unregistered
node refused. The test starts its own Docker engine (own data root, exec root and
socket) and stops it, and every container, by id and process id."""

import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from common.config import project_root
from common.records import read_json
from simulations import deploy, runtime
from tests.helpers import read_rounds
from tests.test_privacy import dp_accounting_epsilon

pytestmark = pytest.mark.slow
ROOT = project_root()
RUN = ("num-partitions=3 num-rounds=5 fraction-train=1.0 min-train-clients=2 "
       "min-available-clients=3 round-timeout=240.0 node-wait-timeout=180.0 "
       "target-epsilon=3.0 model='logreg' evaluation='federated'")


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "starting a Docker engine needs root"
    for tool in ("dockerd", "docker", "docker-compose"):
        if shutil.which(tool) is None:
            return f"needs {tool} (Debian's docker.io and docker-compose)"
    if shutil.which("debootstrap") is None and shutil.which("apt-get") is None:
        return "needs debootstrap (or apt-get to install it)"
    return None


@pytest.fixture(scope="module")
def engine():
    """A Docker engine of this test's own; its environment (DOCKER_HOST) for commands."""
    why = _why_not()
    if why and os.environ.get("DPFL_REQUIRE_CONTAINERS") == "1":
        # `make test` on a machine with root and a package index offering docker.io
        # (scripts/install-test-tools.sh --required): the tools should be there
        pytest.fail(f"the container test must run here (root, and apt offers docker.io) "
                    f"but {why}: scripts/install-test-tools.sh did not install them")
    if why:
        pytest.skip(why)
    root = Path(tempfile.mkdtemp(prefix="dpfl-docker-"))  # short: a socket path is short
    sock = root / "docker.sock"
    log = open(root / "dockerd.log", "ab")
    proc = subprocess.Popen(
        ["dockerd", "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
         "--host", f"unix://{sock}", "--pidfile", str(root / "docker.pid"),
         "--bridge", "none"],  # compose makes its own network; leave docker0 to any other engine
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    env = {**os.environ, "DOCKER_HOST": f"unix://{sock}"}
    try:
        deadline = time.time() + 120
        while subprocess.run(["docker", "info"], env=env, capture_output=True).returncode != 0:
            assert proc.poll() is None, (root / "dockerd.log").read_text()[-3000:]
            assert time.time() < deadline, "dockerd did not answer within 120 s"
            time.sleep(0.5)
        yield env
    finally:
        ids = subprocess.run(["docker", "ps", "-aq"], env=env, capture_output=True,
                             text=True).stdout.split()
        if ids:
            subprocess.run(["docker", "rm", "-f", *ids], env=env, capture_output=True)
        runtime.stop(proc, grace=30)
        log.close()
        # dockerd leaves its network namespace mounted in its exec root
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                  if line.split()[1].startswith(str(root))]
        for mount in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
        assert not root.exists(), f"{root} is left behind"


def _docker(env, *args, check=True, timeout=600):
    proc = subprocess.run(["docker", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, f"docker {' '.join(args)}:\n{proc.stdout}{proc.stderr}"
    return proc.stdout.strip()


def _state(env, container):
    info = json.loads(_docker(env, "inspect", container))[0]
    return info["State"], info["RestartCount"]


def test_the_federation_runs_in_containers_built_without_a_registry(engine, tmp_path):
    env = engine
    t0 = time.time()
    build = subprocess.run([str(ROOT / "scripts" / "build-image.sh")], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    print(f"image built in {time.time() - t0:.0f}s: {build.stdout.strip().splitlines()[-1]}")

    fed = tmp_path / "fed"
    certs = fed / "deploy" / "certs"
    deploy.make_certs(certs, num_nodes=4)  # node-3's key is never registered
    (fed / "docker-compose.yml").write_text(deploy.compose_yaml(3))
    project = f"dpfl{uuid.uuid4().hex[:8]}"
    compose = ["docker-compose", "-p", project]
    home = fed / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(deploy.connection_toml("127.0.0.1:9093", str(certs)))
    run = None
    try:
        t1 = time.time()
        up = subprocess.run([*compose, "up", "-d"], env=env, cwd=fed, capture_output=True,
                            text=True, timeout=600)
        assert up.returncode == 0, up.stdout + up.stderr
        register = f"{project}_register_1"
        while _state(env, register)[0]["Status"] != "exited":
            assert time.time() - t1 < 300, "registration did not finish"
            time.sleep(1)
        assert _state(env, register)[0]["ExitCode"] == 0
        print(f"federation up (superlink healthy, 3 keys registered) in {time.time() - t1:.0f}s")

        # A node whose key was never registered is refused.
        intruder = _docker(env, "run", "-d", "--network", f"{project}_default",
                           "-v", f"{certs}:/certs:ro", "dpfl:latest", "flower-supernode",
                           "--superlink", "superlink:9093", "--root-certificates", "/certs/ca.crt",
                           "--auth-supernode-private-key", "/certs/node-3",
                           "--node-config", "partition-id=0 num-partitions=3")
        deadline = time.time() + 180
        while _state(env, intruder)[0]["Status"] == "running":
            assert time.time() < deadline, "the unregistered node was never refused"
            time.sleep(1)
        assert _state(env, intruder)[0]["ExitCode"] != 0
        logs = subprocess.run(["docker", "logs", intruder], env=env, capture_output=True,
                              text=True)
        assert "Failed to activate SuperNode" in logs.stdout + logs.stderr

        # Private rounds from the host; node 1 killed once round 2 is recorded.
        runs = fed / "runs"
        t2 = time.time()
        with open(fed / "flwr-run.log", "w") as out:
            run = subprocess.Popen(
                [runtime.tool("flwr"), "run", str(ROOT), deploy.CONNECTION, "--stream",
                 "--run-config", f"{RUN} run-name='containers'"],
                env=runtime.flower_env(home), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        rounds = runs / "containers" / "rounds.jsonl"
        while len(read_rounds(rounds)) < 2:
            assert run.poll() is None, (fed / "flwr-run.log").read_text()[-3000:]
            assert time.time() - t2 < 600, "round 2 never came"
            time.sleep(0.2)
        node1 = f"{project}_node-1_1"
        pid = _state(env, node1)[0]["Pid"]
        os.kill(pid, 9)  # the node's process dies: a crash, not a `docker stop`
        assert run.wait(timeout=900) == 0, (fed / "flwr-run.log").read_text()[-3000:]
        state, restarts = _state(env, node1)
        assert restarts >= 1 and state["Status"] == "running"  # `restart: unless-stopped`

        rows = read_rounds(rounds)
        summary = read_json(runs / "containers" / "summary.json")
        print(f"5 rounds in containers: {time.time() - t2:.0f}s, per round "
              f"{[round(r['seconds'], 1) for r in rows]}")
        assert summary["rounds"] == 5 and summary["epsilon_max"] <= 3.0
        # the nodes evaluated the last model on the 10% of their records they hold out
        assert summary["federated_round"] == 5, rows[-1]
        evaluated = rows[-1]["federated_nodes"]
        assert evaluated >= 2 and rows[-1]["federated_examples"] == 2000 * evaluated
        assert abs(summary["federated_accuracy"] - rows[-1]["test_accuracy"]) <= \
            2 * summary["federated_accuracy_interval"]
        privacy = read_json(runs / "containers" / "privacy.json")
        for i in range(3):
            ledger = json.loads(_docker(env, "exec", f"{project}_node-{i}_1", "cat",
                                        "/state/ledger.json"))
            joined = sum(i in r["partitions_trained"] for r in rows)
            # every step a node took, and its evaluation, is in the ledger on its volume,
            # across the restart
            sigma = ledger["noise_multiplier"]
            history = [tuple(e) for e in ledger["history"]]
            assert sum(e[2] for e in history if e[0] == sigma) == joined, (i, rows)
            assert sum(e[2] for e in history if e[0] != sigma) <= 1  # its one evaluation
            assert float(privacy["clients"][str(i)]["epsilon"]) == pytest.approx(
                dp_accounting_epsilon(history, 1e-5), rel=0.01)
        assert sum(1 in r["partitions_trained"] for r in rows[2:]) >= 1  # back after the kill
    finally:
        if run is not None and run.poll() is None:
            runtime.stop(run)
        down = subprocess.run([*compose, "down", "-v", "--remove-orphans"], env=env, cwd=fed,
                              capture_output=True, text=True, timeout=300)
        assert down.returncode == 0, down.stdout + down.stderr
    assert not _docker(env, "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}")
