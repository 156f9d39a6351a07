"""FedAvg with dpfl's additions: reply validation, refusals, and the clients' privacy view.

Flower's FedAvg samples nodes and sends messages; this subclass replaces its aggregation so
that a failed, refused or malformed reply is classified and excluded with a reason
instead of crashing the ServerApp, and so that each client's epsilon is tracked as max and
mean over clients (never a weighted average).
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common import keys, privacy
from common.aggregation import metrics_problem, robust_aggregate, update_problem
from common.config import clients_per_round

log = logging.getLogger("dpfl.server")
MAX_HISTORY_ENTRIES = 10_000  # a longer reported history is not read (cost bound)


@dataclass
class RoundOutcome:
    """What happened to the replies of one round (written to rounds.jsonl)."""

    sampled: int = 0
    trained: int = 0
    failed: int = 0
    refused: int = 0
    invalid: int = 0
    timed_out: int = 0
    train_loss: float = math.nan
    reasons: list[str] = field(default_factory=list)
    aggregated: bool = False
    partitions_sampled: list[int] = field(default_factory=list)
    partitions_trained: list[int] = field(default_factory=list)
    partitions_aggregated: list[int] = field(default_factory=list)


@dataclass
class ClientPrivacy:
    """A client's privacy as the server last heard it. `unconfirmed_rounds`: rounds it was
    asked to train whose reply carried no history (failed, timed out): it may have trained
    and spent more than `history` shows; its own ledger is the truth."""

    history: list
    epsilon: float
    noise_multiplier: float
    sample_rate: float
    unconfirmed_rounds: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class NodeInfo:
    """What a node declared when discovered: its partition and how many records it holds."""

    partition_id: int
    num_examples: int
    own_data: bool


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


def short_error(reason: str, limit: int = 300) -> str:
    """The last line of a client's error (its exception message, without the remote
    traceback Flower wraps around it)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", reason)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    last = lines[-1] if lines else text.strip()
    last = last.removesuffix("'>")
    return last if len(last) <= limit else last[: limit - 3] + "..."


def query_problem(metrics: dict[str, Any]) -> str | None:
    """Why a discovery reply is unusable, or None."""
    if set(metrics) != keys.QUERY_METRIC_KEYS:
        return f"discovery reply must hold exactly {sorted(keys.QUERY_METRIC_KEYS)}"
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            return f"discovery reply {k}={v!r} must be an integer >= 0"
    return None


class DPFedAvg(FedAvg):
    """Clients are addressed by partition: nodes are discovered with a QUERY message
    (partition-id, records held), and rounds sample partitions, so a resumed run (whose
    node ids are new) continues the same schedule."""

    def __init__(self, *, max_update_norm: float = 0.0, server_learning_rate: float = 1.0,
                 server_momentum: float = 0.0, server_lr_schedule: str = "constant",
                 server_ema: float = 0.0, num_rounds: int = 1,
                 client_sampling: str = "cohorts", seed: int = 0,
                 wait_timeout: float = 600.0, reply_timeout: float = 3600.0,
                 aggregation: str = "fedavg", trim_fraction: float = 0.2,
                 krum_malicious: int = 0, krum_select: int = 1,
                 partition_sizes: dict[int, int] | None = None, delta: float = 1e-5,
                 accountant: str = "rdp", **kwargs: Any) -> None:
        super().__init__(fraction_evaluate=0.0, min_evaluate_nodes=0, **kwargs)
        self.client_sampling = client_sampling
        self.wait_timeout = wait_timeout
        self.reply_timeout = reply_timeout
        self.aggregation = aggregation
        self.trim_fraction = trim_fraction
        self.krum_malicious = krum_malicious
        self.krum_select = krum_select
        self.partition_sizes = dict(partition_sizes or {})
        self.delta = delta
        self.accountant = accountant
        self._rng = random.Random(seed)
        self._queue: list[int] = []
        self.max_update_norm = max_update_norm
        self.server_learning_rate = server_learning_rate
        self.server_momentum = server_momentum
        self.server_lr_schedule = server_lr_schedule
        self.server_ema = server_ema
        self.num_rounds = num_rounds
        self._velocity: dict[str, np.ndarray] = {}
        self.ema: dict[str, np.ndarray] | None = None
        self.clients: dict[int, ClientPrivacy] = {}
        self.outcomes: dict[int, RoundOutcome] = {}
        self.nodes: dict[int, NodeInfo] = {}
        self._global: dict[str, np.ndarray] = {}

    # ---- discovery and sampling -------------------------------------------------------

    def discover(self, grid: Grid, problems: list[str] | None = None) -> dict[int, int]:
        """Ask connected nodes not yet known which partition they hold; returns
        {partition_id: node_id} over the connected, known nodes. A node that does not
        answer or answers badly is left out (and asked again next time)."""
        connected = set(grid.get_node_ids())
        new = sorted(connected - set(self.nodes))
        if new:
            msgs = [Message(RecordDict({self.configrecord_key: ConfigRecord({})}), dst_node_id=n,
                            message_type=MessageType.QUERY) for n in new]
            for reply in grid.send_and_receive(msgs, timeout=min(self.reply_timeout, 120.0)):
                node = reply.metadata.src_node_id
                problem = None
                if reply.has_error():
                    problem = f"discovery failed: {short_error(reply.error.reason or '')}"
                elif keys.METRICS not in reply.content.metric_records:
                    problem = "discovery reply has no metrics"
                else:
                    metrics = dict(reply.content[keys.METRICS])
                    problem = query_problem(metrics)
                if problem:
                    log.warning("node %d: %s", node, problem)
                    if problems is not None:
                        problems.append(f"node {node}: {problem}")
                    continue
                self.nodes[node] = NodeInfo(
                    int(keys.number(metrics[keys.PARTITION_ID], keys.PARTITION_ID)),
                    int(keys.number(metrics[keys.NUM_EXAMPLES], keys.NUM_EXAMPLES)),
                    bool(metrics[keys.OWN_DATA]))
        by_partition: dict[int, int] = {}
        for node in sorted(connected & set(self.nodes)):
            pid = self.nodes[node].partition_id
            if pid in by_partition:
                log.warning("nodes %d and %d both hold partition %d; only %d is used",
                            by_partition[pid], node, pid, by_partition[pid])
                continue
            by_partition[pid] = node
        return by_partition

    def sample_size(self, num_nodes: int) -> int:
        return clients_per_round(num_nodes, self.fraction_train, self.min_train_nodes)

    def sample(self, grid: Grid, outcome: RoundOutcome) -> list[int]:
        """This round's nodes. "cohorts": a seeded shuffle of all partitions cut into
        cohorts, so every client joins equally often (its noise is calibrated for exactly
        that); "random": an independent uniform sample each round, as Flower's FedAvg
        does. Waits at most `wait_timeout` seconds for min-available-clients."""
        deadline = time.monotonic() + self.wait_timeout
        while len(by_partition := self.discover(grid, outcome.reasons)) < self.min_available_nodes:
            if time.monotonic() > deadline:
                outcome.reasons.append(
                    f"only {len(by_partition)} client(s) available after waiting "
                    f"{self.wait_timeout:.0f}s, fewer than min-available-clients="
                    f"{self.min_available_nodes}: round skipped"
                )
                return []
            log.info("waiting for clients: %d available, %d needed", len(by_partition),
                     self.min_available_nodes)
            time.sleep(min(3.0, self.wait_timeout))
        partitions = sorted(by_partition)
        size = self.sample_size(len(partitions))
        if self.client_sampling == "random":
            chosen = self._rng.sample(partitions, size)
        else:
            chosen, self._queue = next_cohort(self._queue, partitions, size, self._rng)
        outcome.partitions_sampled = sorted(chosen)
        return [by_partition[p] for p in chosen]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = keys.from_array_record(arrays)
        outcome = self.outcomes[server_round] = RoundOutcome()
        nodes = self.sample(grid, outcome)
        outcome.sampled = len(nodes)
        config[keys.SERVER_ROUND] = server_round
        messages = []
        for node in nodes:
            record = RecordDict({self.arrayrecord_key: arrays,
                                 self.configrecord_key: self.node_train_config(node, config)})
            messages.append(Message(content=record, dst_node_id=node, message_type=MessageType.TRAIN))
        return messages

    def node_train_config(self, node: int, config: ConfigRecord) -> ConfigRecord:
        """The round's config for one node, with that client's history as last seen."""
        out = ConfigRecord(dict(config))
        known = self.clients.get(self.nodes[node].partition_id) if node in self.nodes else None
        if known is not None and known.history:
            out[keys.KNOWN_HISTORY] = json.dumps([list(e) for e in known.history])
        return out

    # ---- aggregation ------------------------------------------------------------------

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        outcome = self.outcomes.setdefault(server_round, RoundOutcome())
        replies = list(replies)
        outcome.timed_out = max(outcome.sampled - len(replies), 0)
        if outcome.timed_out:
            outcome.reasons.append(f"{outcome.timed_out} client(s) did not reply within "
                                   f"round-timeout={self.reply_timeout:g}s")
        updates, weights, losses, pids = [], [], [], []
        heard: set[int] = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                outcome.failed += 1
                outcome.reasons.append(f"node {node} failed: {short_error(msg.error.reason or '')}")
                continue
            # Privacy first, from every reply that carries a history, valid or not: the
            # client may have trained and spent before its reply was found unusable.
            pid = self._record_privacy(msg)
            if pid is not None:
                heard.add(pid)
            verdict = self._classify(msg)
            if verdict is not None:
                kind, reason = verdict
                setattr(outcome, kind, getattr(outcome, kind) + 1)
                outcome.reasons.append(f"node {node}: {reason}")
                continue
            metrics = msg.content[keys.METRICS]
            updates.append(keys.from_array_record(msg.content.array_records[keys.ARRAYS]))
            weights.append(keys.number(metrics[keys.NUM_EXAMPLES], keys.NUM_EXAMPLES))
            losses.append(keys.number(metrics[keys.TRAIN_LOSS], keys.TRAIN_LOSS))
            pids.append(int(keys.number(metrics[keys.PARTITION_ID], keys.PARTITION_ID)))
        for pid in set(outcome.partitions_sampled) - heard:
            client = self.clients.setdefault(pid, ClientPrivacy([], 0.0, 0.0, 0.0))
            client.unconfirmed_rounds.append(server_round)
        outcome.trained = len(updates)
        outcome.partitions_trained = sorted(pids)
        if len(updates) < self.min_train_nodes or not updates:
            outcome.reasons.append(
                f"only {len(updates)} valid update(s), fewer than min-train-clients="
                f"{self.min_train_nodes}: the global model is kept"
            )
            for reason in outcome.reasons:
                log.warning("round %d: %s", server_round, reason)
            return None, None
        for reason in outcome.reasons:
            log.warning("round %d: %s", server_round, reason)
        outcome.aggregated = True
        released = [(loss, w) for loss, w in zip(losses, weights, strict=True) if not math.isnan(loss)]
        if released:
            outcome.train_loss = float(np.average([x for x, _ in released],
                                                  weights=[w for _, w in released]))
        model, used = robust_aggregate(
            self.aggregation, updates, weights, trim_fraction=self.trim_fraction,
            krum_malicious=self.krum_malicious, krum_select=self.krum_select,
        )
        outcome.partitions_aggregated = sorted(pids[i] for i in used)
        avg = self._server_step(server_round, model)
        return keys.to_array_record(avg), MetricRecord({
            keys.NUM_EXAMPLES: int(sum(weights)), keys.TRAIN_LOSS: outcome.train_loss,
        })

    def server_lr(self, server_round: int) -> float:
        if self.server_lr_schedule == "cosine":
            frac = (server_round - 1) / max(self.num_rounds, 1)
            return self.server_learning_rate * 0.5 * (1 + math.cos(math.pi * frac))
        return self.server_learning_rate

    def _server_step(self, server_round: int, avg: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Server optimizer on the averaged update (FedAvgM with an optional cosine schedule)
        and an exponential moving average of the global models. All of it is
        post-processing of the clients' DP outputs: no privacy cost. With learning rate 1,
        no momentum and no schedule it is plain FedAvg."""
        lr = self.server_lr(server_round)
        out = {}
        for name, ref in self._global.items():
            delta = avg[name].astype(np.float64) - ref.astype(np.float64)
            vel = self.server_momentum * self._velocity.get(name, 0.0) + delta
            self._velocity[name] = vel
            out[name] = (ref + lr * vel).astype(ref.dtype)
        if self.server_ema > 0:
            d = self.server_ema
            prev = self.ema or out  # starts at the first aggregate, not the random init
            self.ema = {k: (d * prev[k] + (1 - d) * out[k]).astype(out[k].dtype) for k in out}
        return out

    def reported_model(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model that is evaluated and saved: the moving average when enabled."""
        return self.ema if (self.server_ema > 0 and self.ema is not None) else arrays

    def _record_privacy(self, msg: Message) -> int | None:
        """Record the history a reply carries, under the partition its node declared at
        discovery (the reply's own claim only for an undiscovered node); epsilon is
        recomputed here from the history (never below what the client claimed). Returns
        the partition, or None when the reply carries no readable history."""
        content = msg.content
        priv = content.config_records.get(keys.PRIVACY)
        metrics = dict(content[keys.METRICS]) if keys.METRICS in content.metric_records else {}
        info = self.nodes.get(msg.metadata.src_node_id)
        try:
            pid = info.partition_id if info is not None else int(
                keys.number(metrics[keys.PARTITION_ID], keys.PARTITION_ID))
            history = privacy.merge_history(json.loads(str(priv[keys.HISTORY])))  # type: ignore[index]
            if len(history) > MAX_HISTORY_ENTRIES:
                return None
            claimed = keys.number(metrics.get(keys.EPSILON, 0.0), keys.EPSILON)
            sigma = keys.number(metrics.get(keys.NOISE_MULTIPLIER, 0.0), keys.NOISE_MULTIPLIER)
            rate = keys.number(metrics.get(keys.SAMPLE_RATE, 0.0), keys.SAMPLE_RATE)
        except (KeyError, ValueError, TypeError):
            return None
        eps = privacy.epsilon(history, self.delta, self.accountant)
        if not math.isnan(claimed):
            eps = max(eps, claimed)
        self.clients[pid] = ClientPrivacy(history=[list(e) for e in history], epsilon=eps,
                                          noise_multiplier=sigma, sample_rate=rate)
        return pid

    def _classify(self, msg: Message) -> tuple[str, str] | None:
        """('refused' | 'invalid', reason) for a reply that must not be averaged, else None."""
        content = msg.content
        if keys.METRICS not in content.metric_records:
            return "invalid", "reply has no metrics"
        metrics = dict(content[keys.METRICS])
        problem = metrics_problem({k: v for k, v in metrics.items()}) if not metrics.get(keys.REFUSED) \
            else None
        if problem:
            return "invalid", problem
        try:
            problem = self._identity_problem(msg.metadata.src_node_id, metrics)
        except (KeyError, ValueError) as exc:
            problem = f"reply has no usable partition-id or num-examples ({exc})"
        if problem:
            return "invalid", problem
        priv = content.config_records.get(keys.PRIVACY)
        try:
            privacy.merge_history(json.loads(str(priv[keys.HISTORY])))  # type: ignore[index]
        except (KeyError, ValueError, TypeError):
            return "invalid", "reply has no privacy record with a readable history"
        if metrics.get(keys.REFUSED):
            reason = str(priv[keys.REASON]) if priv is not None else "refused"
            return "refused", reason
        if len(content.array_records) != 1 or keys.ARRAYS not in content.array_records:
            return "invalid", "reply must carry exactly one ArrayRecord named 'arrays'"
        problem = update_problem(
            self._global, keys.from_array_record(content.array_records[keys.ARRAYS]),
            max_update_norm=self.max_update_norm,
        )
        if problem:
            return "invalid", problem
        return None

    def _identity_problem(self, node: int, metrics: dict[str, Any]) -> str | None:
        """A reply must come from the partition its node declared, and claim no more
        examples than that partition holds (a client cannot buy weight by lying)."""
        pid = int(keys.number(metrics[keys.PARTITION_ID], keys.PARTITION_ID))
        n = int(keys.number(metrics.get(keys.NUM_EXAMPLES, 0), keys.NUM_EXAMPLES))
        info = self.nodes.get(node)
        if info is not None and info.partition_id != pid:
            return f"reply claims partition {pid} but the node holds partition {info.partition_id}"
        bound = None
        if info is not None and info.own_data:
            bound = info.num_examples
        elif pid in self.partition_sizes:
            bound = self.partition_sizes[pid]
        elif info is not None:
            bound = info.num_examples
        if bound is not None and n > bound:
            return f"num-examples={n} exceeds the {bound} records partition {pid} holds"
        return None

    # ---- checkpoint -------------------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-able state, named arrays) to resume the strategy exactly: the sampler's
        RNG and queue, the server optimizer and moving average, the clients' privacy."""
        version, internal, gauss = self._rng.getstate()
        meta = {
            "rng": [version, list(internal), gauss],
            "queue": list(self._queue),
            "clients": {str(p): asdict(c) for p, c in self.clients.items()},
            "has_ema": self.ema is not None,
        }
        arrays = {f"velocity/{k}": np.asarray(v) for k, v in self._velocity.items()}
        if self.ema is not None:
            arrays.update({f"ema/{k}": v for k, v in self.ema.items()})
        return meta, arrays

    def load_state_dict(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        version, internal, gauss = meta["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self._queue = [int(p) for p in meta["queue"]]
        self.clients = {
            int(p): ClientPrivacy(history=c["history"], epsilon=float(c["epsilon"]),
                                  noise_multiplier=float(c["noise_multiplier"]),
                                  sample_rate=float(c["sample_rate"]),
                                  unconfirmed_rounds=list(c.get("unconfirmed_rounds", [])))
            for p, c in meta["clients"].items()
        }
        self._velocity = {k[len("velocity/"):]: v for k, v in arrays.items() if k.startswith("velocity/")}
        ema = {k[len("ema/"):]: v for k, v in arrays.items() if k.startswith("ema/")}
        self.ema = ema if meta.get("has_ema") else None

    def epsilon_stats(self) -> tuple[float, float]:
        """(max, mean) epsilon over every client that has reported so far."""
        eps = [c.epsilon for c in self.clients.values()]
        if not eps:
            return 0.0, 0.0
        return max(eps), float(np.mean(eps))
