"""Which nodes hold which partition (discovery) and who trains each round (sampling).

Clients are addressed by partition: a node says which partition it holds, and how many
records, in a QUERY reply. Discovery is bounded either way:

- `all` (the default up to FULL_DISCOVERY_LIMIT partitions): every node is asked at the
  start, in batches of DISCOVERY_BATCH, and rounds sample *partitions*, so a resumed run
  (whose node ids are new in simulation) continues exactly the same schedule;
- `lazy` (beyond it): rounds sample *nodes* from those connected, and only a sampled node
  not yet known is asked, just before its round: at most a cohort of queries a round,
  whatever the federation's size (asking 10,000 nodes at once takes Flower's simulation
  engine minutes: it scans every queued message for every node). A resumed run keeps its
  queue only for nodes that kept their ids.

Either way the run waits (node-wait-timeout) for `num-partitions` nodes before it plans
anything, and refuses to start with fewer: it never calibrates its clients' noise for a
federation other than the one it was configured for.
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
from common.errors import FederationError
from server.replies import NodeInfo, query_problem, short_error
from server.wire import query_message, send_and_receive

log = logging.getLogger("dpfl.server")
DISCOVERY_TIMEOUT = 120.0
DISCOVERY_BATCH = 500  # queries in flight at once




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
    clients cut into cohorts, so every client joins equally often (its noise is
    calibrated for exactly that); "random": an independent uniform sample each round, as
    Flower's FedAvg does."""

    def __init__(self, fed: FederationConfig, *, seed: int) -> None:
        self.fed = fed
        self.lazy = fed.lazy_discovery
        self.nodes: dict[int, NodeInfo] = {}
        self.ignored: set[int] = set()  # claimed a partition that another node holds
        self._rng = random.Random(seed)
        self._queue: list[int] = []  # partitions (all) or node ids (lazy)

    def size(self, num_clients: int) -> int:
        return self.fed.clients_per_round(num_clients)

    def _ask(self, grid: Grid, nodes: list[int], problems: list[str] | None) -> None:
        """Ask `nodes` which partition they hold (DISCOVERY_BATCH at a time); a node that
        does not answer or answers badly stays unknown (and is asked again later)."""
        timeout = min(self.fed.round_timeout, DISCOVERY_TIMEOUT)
        for start in range(0, len(nodes), DISCOVERY_BATCH):
            batch = nodes[start : start + DISCOVERY_BATCH]
            for reply in send_and_receive(grid, [query_message(n) for n in batch], timeout=timeout):
                node = reply.metadata.src_node_id
                info, problem = _declaration(reply)
                if info is None:
                    log.warning("node %d: %s", node, problem)
                    if problems is not None:
                        problems.append(f"node {node}: {problem}")
                    continue
                self.nodes[node] = info

    def _holders(self, connected: set[int]) -> dict[int, int]:
        """{partition_id: node_id} over the connected, known nodes; a second node claiming
        a partition is ignored (warned once)."""
        by_partition: dict[int, int] = {}
        for node in sorted(connected & set(self.nodes)):
            pid = self.nodes[node].partition_id
            if pid in by_partition:
                if node not in self.ignored:
                    log.warning("nodes %d and %d both hold partition %d; only %d is used",
                                by_partition[pid], node, pid, by_partition[pid])
                    self.ignored.add(node)
                continue
            by_partition[pid] = node
        return by_partition

    def discover(self, grid: Grid, problems: list[str] | None = None) -> dict[int, int]:
        """{partition_id: node_id} over the connected nodes known so far; with discovery
        `all`, connected nodes not yet known are asked first."""
        connected = set(grid.get_node_ids())
        if not self.lazy:
            self._ask(grid, sorted(connected - set(self.nodes)), problems)
        return self._holders(connected)

    def begin(self, grid: Grid) -> int:
        """Wait (node-wait-timeout) for the configured federation: num-partitions nodes
        connected, and with discovery `all` every one of them answered. Returns
        num-partitions; raises FederationError when fewer are there in time."""
        need = self.fed.num_partitions
        deadline = time.monotonic() + self.fed.node_wait_timeout
        while True:
            problems: list[str] = []
            have = len(self.discover(grid, problems)) if not self.lazy else \
                len(list(grid.get_node_ids()))
            if have >= need:
                return need
            if time.monotonic() > deadline:
                what = "nodes answered discovery" if not self.lazy else "nodes connected"
                detail = f" ({'; '.join(problems[:3])})" if problems else ""
                raise FederationError(
                    f"only {have} of num-partitions={need} {what} after waiting "
                    f"{self.fed.node_wait_timeout:.0f}s{detail}: start the missing nodes, "
                    f"or set num-partitions to the federation you have")
            log.info("waiting for the federation: %d of %d nodes", have, need)
            time.sleep(min(3.0, self.fed.node_wait_timeout))

    def sample(self, grid: Grid) -> Cohort:
        """This round's cohort; waits at most node-wait-timeout for min-available-clients."""
        cohort = Cohort()
        deadline = time.monotonic() + self.fed.node_wait_timeout
        need = self.fed.min_available_clients
        while True:
            if self.lazy:
                connected = set(grid.get_node_ids())  # once a round: O(nodes) in simulation
                pool = sorted(connected - self.ignored)
            else:
                by_partition = self.discover(grid, cohort.reasons)
                pool = sorted(by_partition)
            if len(pool) >= need:
                break
            if time.monotonic() > deadline:
                cohort.reasons.append(
                    f"only {len(pool)} client(s) available after waiting "
                    f"{self.fed.node_wait_timeout:.0f}s, fewer than min-available-clients="
                    f"{need}: round skipped")
                return cohort
            log.info("waiting for clients: %d available, %d needed", len(pool), need)
            time.sleep(min(3.0, self.fed.node_wait_timeout))
        size = self.size(len(pool))
        if self.fed.client_sampling == "random":
            chosen = self._rng.sample(pool, size)
        else:
            chosen, self._queue = next_cohort(self._queue, pool, size, self._rng)
        if not self.lazy:
            cohort.members = [(by_partition[p], p) for p in chosen]
            return cohort
        self._ask(grid, [n for n in chosen if n not in self.nodes], cohort.reasons)
        holders = self._holders(connected)
        cohort.members = [(n, self.nodes[n].partition_id) for n in chosen
                          if n in self.nodes and holders.get(self.nodes[n].partition_id) == n]
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
