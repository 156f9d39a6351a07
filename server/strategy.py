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
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common import keys
from common.aggregation import metrics_problem, update_problem, weighted_average

log = logging.getLogger("dpfl.server")


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
    train_seconds: float = 0.0
    reasons: list[str] = field(default_factory=list)
    aggregated: bool = False


@dataclass
class ClientPrivacy:
    history: list
    epsilon: float
    noise_multiplier: float
    sample_rate: float


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


class DPFedAvg(FedAvg):
    def __init__(self, *, max_update_norm: float = 0.0, server_learning_rate: float = 1.0,
                 server_momentum: float = 0.0, server_lr_schedule: str = "constant",
                 server_ema: float = 0.0, num_rounds: int = 1,
                 client_sampling: str = "cohorts", seed: int = 0,
                 wait_timeout: float = 600.0, **kwargs: Any) -> None:
        super().__init__(fraction_evaluate=0.0, min_evaluate_nodes=0, **kwargs)
        self.client_sampling = client_sampling
        self.wait_timeout = wait_timeout
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
        self._global: dict[str, np.ndarray] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = keys.from_array_record(arrays)
        outcome = self.outcomes[server_round] = RoundOutcome()
        nodes = self.sample(grid, outcome)
        outcome.sampled = len(nodes)
        config[keys.SERVER_ROUND] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, nodes, MessageType.TRAIN)

    def sample_size(self, num_nodes: int) -> int:
        return min(num_nodes, max(int(num_nodes * self.fraction_train), self.min_train_nodes))

    def sample(self, grid: Grid, outcome: RoundOutcome) -> list[int]:
        """This round's clients. "cohorts": a seeded shuffle of all nodes cut into cohorts,
        so every client joins equally often (its noise is calibrated for exactly that);
        "random": an independent uniform sample each round, as Flower's FedAvg does."""
        deadline = time.monotonic() + self.wait_timeout
        while len(nodes := sorted(grid.get_node_ids())) < self.min_available_nodes:
            if time.monotonic() > deadline:
                outcome.reasons.append(
                    f"only {len(nodes)} node(s) connected after {self.wait_timeout:.0f}s, "
                    f"fewer than min-available-clients={self.min_available_nodes}"
                )
                return []
            log.info("waiting for nodes: %d connected, %d needed", len(nodes),
                     self.min_available_nodes)
            time.sleep(1.0)
        size = self.sample_size(len(nodes))
        if self.client_sampling == "random":
            return self._rng.sample(nodes, size)
        chosen, self._queue = next_cohort(self._queue, nodes, size, self._rng)
        return chosen

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        outcome = self.outcomes.setdefault(server_round, RoundOutcome())
        replies = list(replies)
        outcome.timed_out = max(outcome.sampled - len(replies), 0)
        if outcome.timed_out:
            outcome.reasons.append(f"{outcome.timed_out} client(s) did not reply in time")
        updates, weights, losses = [], [], []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                outcome.failed += 1
                outcome.reasons.append(f"node {node} failed: {msg.error.reason}")
                continue
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
            outcome.train_seconds += keys.number(metrics[keys.TRAIN_SECONDS], keys.TRAIN_SECONDS)
        for reason in outcome.reasons:
            log.warning("round %d: %s", server_round, reason)
        outcome.trained = len(updates)
        if len(updates) < self.min_train_nodes or not updates:
            outcome.reasons.append(
                f"only {len(updates)} valid update(s), fewer than min-train-clients="
                f"{self.min_train_nodes}: the global model is kept"
            )
            return None, None
        outcome.aggregated = True
        released = [(loss, w) for loss, w in zip(losses, weights, strict=True) if not math.isnan(loss)]
        if released:
            outcome.train_loss = float(np.average([x for x, _ in released],
                                                  weights=[w for _, w in released]))
        avg = self._server_step(server_round, weighted_average(updates, weights))
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

    def _classify(self, msg: Message) -> tuple[str, str] | None:
        """('refused' | 'invalid', reason) for a reply that must not be averaged, else None.
        Records the client's privacy state from every well-formed reply."""
        content = msg.content
        if keys.METRICS not in content.metric_records:
            return "invalid", "reply has no metrics"
        metrics = dict(content[keys.METRICS])
        problem = metrics_problem({k: v for k, v in metrics.items()}) if not metrics.get(keys.REFUSED) \
            else None
        if problem:
            return "invalid", problem
        priv = content.config_records.get(keys.PRIVACY)
        if priv is not None:
            try:
                history = json.loads(str(priv[keys.HISTORY]))
            except (KeyError, ValueError):
                return "invalid", "privacy record has no readable history"
            try:
                pid = int(keys.number(metrics.get(keys.PARTITION_ID, msg.metadata.src_node_id),
                                      keys.PARTITION_ID))
                record = ClientPrivacy(
                    history=history,
                    epsilon=keys.number(metrics.get(keys.EPSILON, math.nan), keys.EPSILON),
                    noise_multiplier=keys.number(metrics.get(keys.NOISE_MULTIPLIER, 0.0),
                                                 keys.NOISE_MULTIPLIER),
                    sample_rate=keys.number(metrics.get(keys.SAMPLE_RATE, 0.0), keys.SAMPLE_RATE),
                )
            except ValueError as exc:
                return "invalid", str(exc)
            self.clients[pid] = record
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

    def epsilon_stats(self) -> tuple[float, float]:
        """(max, mean) epsilon over every client that has reported so far."""
        eps = [c.epsilon for c in self.clients.values()]
        if not eps:
            return 0.0, 0.0
        return max(eps), float(np.mean(eps))
