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

from common.data import partition_indices
from common.records import RunDir
from server import app as server_app
from server.cohorts import FederationError
from tests.helpers import run_config
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


def test_iid_partitions_are_flwr_datasets_shards_computed_at_once():
    """The IID split is computed in one pass (flwr-datasets builds one dataset per
    partition: a minute for 100,000), and is exactly what its IidPartitioner gives."""
    from common.data import _partitioner_indices

    labels = np.random.default_rng(0).integers(0, 10, 1003)
    for n in (1, 7, 100, 1003):
        assert [p.tolist() for p in partition_indices(labels, "iid", n, seed=5)] == \
            [p.tolist() for p in _partitioner_indices(labels, "iid", n, seed=5)]
    big = np.zeros(60_000, dtype=np.int64)
    parts = partition_indices(big, "iid", 10_000, seed=42)
    assert len(parts) == 10_000 and {len(p) for p in parts} == {6}
    assert sorted(np.concatenate(parts).tolist()) == list(range(60_000))
