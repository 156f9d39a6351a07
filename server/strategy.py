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
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
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


class DPFedAvg(FedAvg):
    def __init__(self, *, max_update_norm: float = 0.0, server_learning_rate: float = 1.0,
                 server_momentum: float = 0.0, **kwargs: Any) -> None:
        super().__init__(fraction_evaluate=0.0, min_evaluate_nodes=0, **kwargs)
        self.max_update_norm = max_update_norm
        self.server_learning_rate = server_learning_rate
        self.server_momentum = server_momentum
        self._velocity: dict[str, np.ndarray] = {}
        self.clients: dict[int, ClientPrivacy] = {}
        self.outcomes: dict[int, RoundOutcome] = {}
        self._global: dict[str, np.ndarray] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = keys.from_array_record(arrays)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.outcomes[server_round] = RoundOutcome(sampled=len(messages))
        return messages

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
            updates.append(keys.from_array_record(msg.content[keys.ARRAYS]))
            weights.append(float(metrics[keys.NUM_EXAMPLES]))
            losses.append(float(metrics[keys.TRAIN_LOSS]))
            outcome.train_seconds += float(metrics[keys.TRAIN_SECONDS])
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
        outcome.train_loss = float(np.average(losses, weights=weights))
        avg = self._server_step(weighted_average(updates, weights))
        return keys.to_array_record(avg), MetricRecord({
            keys.NUM_EXAMPLES: int(sum(weights)), keys.TRAIN_LOSS: outcome.train_loss,
        })

    def _server_step(self, avg: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Server optimizer on the averaged update (FedAvgM); post-processing, no privacy cost.
        With learning rate 1 and momentum 0 it is plain FedAvg."""
        if self.server_learning_rate == 1.0 and self.server_momentum == 0.0:
            return avg
        out = {}
        for name, ref in self._global.items():
            delta = avg[name].astype(np.float64) - ref.astype(np.float64)
            vel = self.server_momentum * self._velocity.get(name, 0.0) + delta
            self._velocity[name] = vel
            out[name] = (ref + self.server_learning_rate * vel).astype(ref.dtype)
        return out

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
            pid = int(metrics.get(keys.PARTITION_ID, msg.metadata.src_node_id))
            self.clients[pid] = ClientPrivacy(
                history=history, epsilon=float(metrics.get(keys.EPSILON, math.nan)),
                noise_multiplier=float(metrics.get(keys.NOISE_MULTIPLIER, 0.0)),
                sample_rate=float(metrics.get(keys.SAMPLE_RATE, 0.0)),
            )
        if metrics.get(keys.REFUSED):
            reason = str(priv[keys.REASON]) if priv is not None else "refused"
            return "refused", reason
        if len(content.array_records) != 1 or keys.ARRAYS not in content.array_records:
            return "invalid", "reply must carry exactly one ArrayRecord named 'arrays'"
        problem = update_problem(
            self._global, keys.from_array_record(content[keys.ARRAYS]),
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
