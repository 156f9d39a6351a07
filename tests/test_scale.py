"""Discovery that scales: with `discovery=lazy` (the default beyond 1,000 partitions) a
round asks only the nodes it sampled and has not met, never the whole federation; a run
waits for the federation it was configured for and refuses to start with fewer nodes
(it never plans, and calibrates noise, for another one). Real ServerApp loop and real
ClientApps in process (tests/local_grid.py)."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from common.partitions import partition_indices
from common.records import RunDir
from server import app as server_app
from server.cohorts import FederationError
from tests.helpers import TINY_DATA, run_config
from tests.local_grid import LocalGrid


def _run(out, grid, **over):
    rc = {**run_config(**over), "output-dir": str(out)}
    server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                  run_config=rc))
    (path,) = [p for p in Path(out).iterdir() if p.is_dir()]
    return RunDir(path)


def _types(messages):
    return [m.metadata.message_type for m in messages]


def test_lazy_discovery_asks_only_the_sampled_nodes_and_keeps_participation_equal(tmp_path):
    over = {"num-partitions": 20, "discovery": "lazy", "fraction-train": 0.2,
            "num-rounds": 10, "target-epsilon": 3.0}
    grid = LocalGrid(20, **over)
    run = _run(tmp_path, grid, **over)
    rows = run.rounds()
    assert len(rows) == 10 and all(r.clients_trained == 4 for r in rows)
    # Queries: one per node, each sent in the round that first sampled it (4 at most a
    # round), never the whole federation up front.
    queries = [m for m in grid.sent if m.metadata.message_type == "query"]
    assert sorted(m.metadata.dst_node_id for m in queries) == sorted(grid.contexts)
    kinds = _types(grid.sent)
    per_round, count = [], 0
    for kind in kinds:
        if kind == "query":
            count += 1
        elif count or kind == "train":
            per_round.append(count)
            count = 0
    assert max(per_round) <= 4 and kinds[0] == "query" and kinds[4] == "train"
    # Passes over the nodes: 10 rounds x 4 = 40 = 2 participations for each of 20 clients.
    joined = Counter(p for r in rows for p in r.partitions_trained)
    assert sorted(joined) == list(range(20)) and set(joined.values()) == {2}
    assert run.summary().epsilon_max <= 3.0


@pytest.mark.parametrize("discovery", ["all", "lazy"])
@pytest.mark.slow  # seconds of real work; the fast suite stays under a minute
def test_a_run_refuses_to_start_without_the_configured_federation(tmp_path, discovery):
    """Six partitions configured, five nodes there (in `all` mode the sixth never
    answers): after node-wait-timeout the run stops before planning anything."""
    over = {"num-partitions": 6, "discovery": discovery, "node-wait-timeout": 1.0,
            "min-available-clients": 2}
    grid = LocalGrid(6, drop_at={5: "query"}, **over)
    if discovery == "lazy":
        del grid.contexts[1005]  # not connected at all
    with pytest.raises(FederationError, match="only 5 of num-partitions=6"):
        _run(tmp_path, grid, **over)
    assert not any(t == "train" for t in _types(grid.sent))
    run = RunDir(next(p for p in tmp_path.iterdir() if p.is_dir()))
    assert run.info() is None and not run.rounds()  # nothing planned or recorded


@pytest.mark.slow  # seconds of real work; the fast suite stays under a minute
def test_iid_partitions_are_flwr_datasets_shards_computed_at_once():
    """The IID split is computed in one pass (flwr-datasets builds one dataset per
    partition: a minute for 100,000), and is exactly what its IidPartitioner gives."""
    from common.partitions import _partitioner_indices

    labels = np.random.default_rng(0).integers(0, 10, 1003)
    for n in (1, 7, 100, 1003):
        assert [p.tolist() for p in partition_indices(labels, "iid", n, seed=5)] == \
            [p.tolist() for p in _partitioner_indices(labels, "iid", n, seed=5)]
    big = np.zeros(60_000, dtype=np.int64)
    parts = partition_indices(big, "iid", 10_000, seed=42)
    assert len(parts) == 10_000 and {len(p) for p in parts} == {6}
    assert sorted(np.concatenate(parts).tolist()) == list(range(60_000))


# ---- an existing Ray cluster ---------------------------------------------------------


def _ray_state(address, code):
    """Run `code` in a fresh Ray driver connected to `address` (never in this process);
    its printed last line, parsed as JSON."""
    import json
    import subprocess
    import sys

    script = ("import json, ray\n"
              f"ray.init(address={address!r}, include_dashboard=False, logging_level='ERROR')\n"
              + code)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_simulation_runs_on_an_existing_ray_cluster_of_two_nodes(tmp_path):
    """A Ray head and a second Ray node, started here on loopback (one CPU each, stopped
    by process id: never `ray stop`, which would stop any other Ray on the machine);
    `dpfl simulate --ray-address` runs its virtual clients on both (Ray's actor table)."""
    import os
    import shutil
    import tempfile
    import time

    import psutil

    from common.records import read_json
    from simulations import runtime
    from simulations.runtime import Backend
    from simulations.simulate import simulate

    ray_tmp = Path(tempfile.mkdtemp(prefix="dpfl-ray-", dir="/tmp"))  # short: Ray's sockets
    port = runtime.free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--num-gpus", "0",
              "--object-store-memory", str(200 * 2**20), "--block"]
    procs = []
    try:
        procs.append(runtime.start(
            [runtime.tool("ray"), "start", "--head", "--port", str(port),
             "--include-dashboard=false", "--temp-dir", str(ray_tmp), *common],
            env=env, log_file=tmp_path / "ray-head.log"))
        runtime.wait_for_port(port, proc=procs[0], timeout=120, what="ray head",
                              log_file=tmp_path / "ray-head.log")
        procs.append(runtime.start(
            [runtime.tool("ray"), "start", "--address", address, *common],
            env=env, log_file=tmp_path / "ray-worker.log"))
        deadline = time.time() + 180
        while _ray_state(address, "print(sum(n['Alive'] for n in ray.nodes()))") < 2:
            assert time.time() < deadline, (tmp_path / "ray-worker.log").read_text()[-3000:]
            time.sleep(2)

        run = simulate({"num-partitions": 6, "num-rounds": 3, "fraction-train": 1.0,
                        "model": "logreg", "data-dir": TINY_DATA, "target-epsilon": 3.0},
                       output_dir=str(tmp_path / "runs"), progress=None,
                       backend=Backend(ray_address=address))
        summary = read_json(run / "summary.json")
        assert summary["rounds"] == 3 and summary["epsilon_max"] <= 3.0
        assert all(r["clients_trained"] == 6 for r in _rows(run))
        nodes = _ray_state(address, (
            "from ray._private.state import state\n"
            "acts = [a for a in state.actor_table(None).values()"
            " if a.get('ActorClassName') == 'ClientAppActor']\n"
            "print(json.dumps(sorted({a['Address']['NodeID'] for a in acts})))\n"))
        assert len(nodes) == 2, nodes  # the clients' actors ran on both Ray nodes
    finally:
        for proc in reversed(procs):
            runtime.stop(proc, grace=20)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    leftovers = [p for p in psutil.process_iter(["cmdline"])
                 if any(str(ray_tmp) in part for part in (p.info["cmdline"] or []))]
    assert not leftovers


def _rows(run):
    from tests.helpers import read_rounds

    return read_rounds(Path(run) / "rounds.jsonl")


def test_a_bad_or_unreachable_ray_address_is_named_before_anything_starts(tmp_path):
    from common.config import ConfigError
    from simulations import runtime
    from simulations.runtime import Backend
    from simulations.simulate import simulate

    for bad in ("localhost", "ray://host:10001", "host:port"):
        with pytest.raises(ConfigError, match="--ray-address"):
            Backend(ray_address=bad)
    with pytest.raises(ConfigError, match="no Ray head answers there"):
        simulate({}, output_dir=str(tmp_path),
                 backend=Backend(ray_address=f"127.0.0.1:{runtime.free_port()}"))
    assert not any(tmp_path.iterdir())
    assert Backend(client_cpus=0.5, client_gpus=0.25).federation_config(10) == \
        "num-supernodes=10 client-resources-num-cpus=0.5 client-resources-num-gpus=0.25"


def test_a_deployed_node_prepares_its_records_once_and_again_when_its_files_change(
        tmp_path, monkeypatch):
    """Every message of a deployed node is a new process: the records it trains on are
    kept in its cache folder after the first, memory-mapped by the next (the same
    arrays), and built again when a data file changes. Simulation keeps them in memory."""
    import os
    import shutil

    from client.app import _config, _node
    from client.selection import prepared as _records
    from common.cache import CACHE_ENV, cache_dir
    from tests.helpers import context

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    data = tmp_path / "data"
    shutil.copytree(TINY_DATA, data)
    ctx = context(partition_id=0, harness_policy=False, data_dir="", model="logreg",
                  node_extra={"data-dir": str(data)})
    cfg, node = _config(ctx), _node(ctx)
    splits = cache_dir() / "splits"
    first = _records(cfg, node)
    assert len(list(splits.glob("*-x.npy"))) == 1
    again = _records(cfg, node)
    assert np.array_equal(first.images, again.images) and np.array_equal(first.labels, again.labels)
    assert again.images.dtype == np.float32 and len(again) == 1000
    images = data / "train-images-idx3-ubyte.gz"
    os.utime(images, ns=(images.stat().st_atime_ns, images.stat().st_mtime_ns + 10**9))
    _records(cfg, node)
    assert len(list(splits.glob("*-x.npy"))) == 2  # a changed file: built again
    sim = context(partition_id=0, harness_policy=False, data_dir="", model="logreg",
                  node_extra={"data-dir": str(data), "cache-records": False})
    _records(_config(sim), _node(sim))
    assert len(list(splits.glob("*-x.npy"))) == 2  # the simulation harness's nodes: no files
    # Keys a run config can vary (here the file again) never fill the node's disk.
    from common.data import KEEP_SPLITS

    for step in range(2, 2 + KEEP_SPLITS):
        os.utime(images, ns=(images.stat().st_atime_ns, images.stat().st_mtime_ns + step * 10**9))
        _records(cfg, node)
    assert len(list(splits.glob("*-x.npy"))) == KEEP_SPLITS
    assert len(list(splits.glob("*.npy"))) == 3 * KEEP_SPLITS  # images, labels, classes
    assert np.array_equal(_records(cfg, node).images, first.images)  # the newest is kept


@pytest.mark.slow
@pytest.mark.skipif(not __import__("torch").cuda.is_available(),
                    reason="no CUDA device on this machine: the GPU path runs where one exists")
def test_bench_scale_runs_clients_on_a_gpu(tmp_path):
    from simulations.bench import scale_figures
    from simulations.runtime import Backend

    figs = scale_figures(20, cohort=4, rounds=3, backend=Backend(client_gpus=0.5),
                         extra={"device": "cuda", "model": "logreg"})
    assert figs["rounds"] == 3 and figs["final_accuracy"] > 0.3


@pytest.mark.slow  # seconds of real work; the fast suite stays under a minute
def test_a_deployed_node_computes_features_of_its_own_records_only(tmp_path, monkeypatch):
    """A deployed node (it keeps its records: cache-records) computes the model's fixed
    features for the records of its partition, not for the whole training set."""
    from client.app import _config, _node
    from client.app import train as client_train
    from client.selection import prepared as _records
    from common.cache import CACHE_ENV, cache_dir
    from common.models import build_model, get_weights
    from tests.helpers import context, train_message

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    ctx = context(partition_id=3, harness_policy=False, model="scatter-linear",
                  node_extra={"read-named-files": True})  # the tiny data named in the run
    split = _records(_config(ctx), _node(ctx))
    assert split.shape == (81, 7, 7) and len(split) == 100
    # float32 the first time too (it was float16, and every node's first round failed
    # where nothing was cached: found in containers)
    assert split.images.dtype == np.float32
    assert _records(_config(ctx), _node(ctx)).images.dtype == np.float32  # from the cache
    reply = client_train(train_message(get_weights(build_model(
        "scatter-linear", shape=(81, 7, 7), classes=10)), dst=ctx.node_id), ctx)
    assert not reply.has_error() and reply.content["metrics"]["refused"] == 0
    (features,) = (cache_dir() / "features").glob("scatter-*-x.npy")
    assert np.load(features, mmap_mode="r").shape == (100, 81, 7, 7)  # its 100, not 1,000
    # Where the whole training set's features are cached already, a node reads its rows.
    from common.config import data_config
    from common.data import load_split

    whole = load_split(data_config(data_dir=TINY_DATA), "train", "scatter")
    other = context(partition_id=4, harness_policy=False, model="scatter-linear",
                    node_extra={"read-named-files": True})
    split = _records(_config(other), _node(other))
    assert len(list((cache_dir() / "features").glob("scatter-*-x.npy"))) == 2  # no third
    from common.data import partitions_of

    rows = partitions_of(_config(other).data, 10)[4]
    assert np.array_equal(split.images, np.asarray(whole.images[rows], dtype=np.float32))
