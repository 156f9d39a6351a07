"""Which nodes hold which partition (discovery) and who trains each round (sampling).

Clients are addressed by partition: nodes are discovered with a QUERY message
(partition-id, records held), and rounds sample partitions, so a resumed run (whose node
ids are new) continues the same schedule.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

from flwr.serverapp import Grid

from common import keys
from common.config import FederationConfig
from server.replies import NodeInfo, query_problem, short_error
from server.wire import query_message

log = logging.getLogger("dpfl.server")
DISCOVERY_TIMEOUT = 120.0


def next_cohort(
    queue: list[int], nodes: list[int], size: int, rng: random.Random
) -> tuple[list[int], list[int]]:
    """Take the first `size` distinct nodes of `queue`, a concatenation of shuffled passes
    over all `nodes` (a new pass is appended when fewer than `size` remain); returns
    (chosen, remaining queue). A node is taken once per pass, so after R rounds none has
    joined more than ceil(R * size / len(nodes)) times."""
    connected = set(nodes)
    queue = [n for n in queue if n in connected]
    size = min(size, len(nodes))
    while len(set(queue)) < size:
        extra = list(nodes)
        rng.shuffle(extra)
        queue += extra
    chosen: list[int] = []
    rest: list[int] = []
    for i, n in enumerate(queue):
        if len(chosen) == size:
            rest += queue[i:]
            break
        (rest if n in chosen else chosen).append(n)
    return chosen, rest


@dataclass
class Cohort:
    """A round's sample: (node id, partition) pairs to ask, and why it is empty or short
    (discovery problems, too few clients)."""

    members: list[tuple[int, int]] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    @property
    def partitions(self) -> list[int]:
        return sorted(p for _, p in self.members)


class Cohorts:
    """Discovers nodes and draws each round's cohort. "cohorts": a seeded shuffle of all
    partitions cut into cohorts, so every client joins equally often (its noise is
    calibrated for exactly that); "random": an independent uniform sample each round, as
    Flower's FedAvg does."""

    def __init__(self, fed: FederationConfig, *, seed: int) -> None:
        self.fed = fed
        self.nodes: dict[int, NodeInfo] = {}
        self._rng = random.Random(seed)
        self._queue: list[int] = []

    def size(self, num_clients: int) -> int:
        return self.fed.clients_per_round(num_clients)

    def discover(self, grid: Grid, problems: list[str] | None = None) -> dict[int, int]:
        """Ask connected nodes not yet known which partition they hold; returns
        {partition_id: node_id} over the connected, known nodes. A node that does not
        answer or answers badly is left out (and asked again next time)."""
        connected = set(grid.get_node_ids())
        new = sorted(connected - set(self.nodes))
        if new:
            timeout = min(self.fed.round_timeout, DISCOVERY_TIMEOUT)
            for reply in grid.send_and_receive([query_message(n) for n in new], timeout=timeout):
                node = reply.metadata.src_node_id
                info, problem = _declaration(reply)
                if info is None:
                    log.warning("node %d: %s", node, problem)
                    if problems is not None:
                        problems.append(f"node {node}: {problem}")
                    continue
                self.nodes[node] = info
        by_partition: dict[int, int] = {}
        for node in sorted(connected & set(self.nodes)):
            pid = self.nodes[node].partition_id
            if pid in by_partition:
                log.warning("nodes %d and %d both hold partition %d; only %d is used",
                            by_partition[pid], node, pid, by_partition[pid])
                continue
            by_partition[pid] = node
        return by_partition

    def sample(self, grid: Grid) -> Cohort:
        """This round's cohort; waits at most node-wait-timeout for min-available-clients."""
        cohort = Cohort()
        deadline = time.monotonic() + self.fed.node_wait_timeout
        need = self.fed.min_available_clients
        while len(by_partition := self.discover(grid, cohort.reasons)) < need:
            if time.monotonic() > deadline:
                cohort.reasons.append(
                    f"only {len(by_partition)} client(s) available after waiting "
                    f"{self.fed.node_wait_timeout:.0f}s, fewer than min-available-clients="
                    f"{need}: round skipped")
                return cohort
            log.info("waiting for clients: %d available, %d needed", len(by_partition), need)
            time.sleep(min(3.0, self.fed.node_wait_timeout))
        partitions = sorted(by_partition)
        size = self.size(len(partitions))
        if self.fed.client_sampling == "random":
            chosen = self._rng.sample(partitions, size)
        else:
            chosen, self._queue = next_cohort(self._queue, partitions, size, self._rng)
        cohort.members = [(by_partition[p], p) for p in chosen]
        return cohort

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self._rng.getstate()
        return {"rng": [version, list(internal), gauss], "queue": list(self._queue)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self._queue = [int(p) for p in state["queue"]]


def _declaration(reply: Any) -> tuple[NodeInfo | None, str]:
    """A discovery reply -> (what the node declared, "") or (None, why it is unusable)."""
    if reply.has_error():
        return None, f"discovery failed: {short_error(reply.error.reason or '')}"
    if keys.METRICS not in reply.content.metric_records:
        return None, "discovery reply has no metrics"
    metrics = dict(reply.content[keys.METRICS])
    problem = query_problem(metrics)
    if problem:
        return None, problem
    return NodeInfo(int(metrics[keys.PARTITION_ID]), int(metrics[keys.NUM_EXAMPLES]),
                    bool(metrics[keys.OWN_DATA])), ""
