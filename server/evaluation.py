"""Federated evaluation at the server: which nodes evaluate a model, the evaluate
messages, and the nodes' noisy sums combined (common/fedeval.py).

The evaluators of the j-th evaluation are the j-th group of a seeded shuffle of the
partitions, cut into groups of `EvaluationConfig.evaluators` and taken in turn, so no
node is asked more often than its budget planned for (`EvaluationConfig.planned`); the
choice depends only on the seed and j, so a resumed run asks the same nodes.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common import fedeval, keys
from common.arrays import to_array_record
from common.config import ExperimentConfig
from server import wire
from server.replies import read_privacy, short_error
from server.strategy import CohortFedAvg

log = logging.getLogger("dpfl.server")
SEED_OFFSET = 0xE7A1  # the evaluators' shuffle is not the cohorts'


@dataclass
class Outcome:
    """One federated evaluation: the combined result (None: no node released sums), and
    the nodes that refused or failed, with why."""

    result: fedeval.Evaluation | None = None
    refused: int = 0
    failed: int = 0
    reasons: list[str] = field(default_factory=list)


def evaluators(partitions: list[int], index: int, size: int, seed: int) -> list[int]:
    """The partitions of evaluation `index` (0-based): group `index` of a seeded shuffle
    cut into groups of `size`, cyclically."""
    order = sorted(partitions)
    random.Random(seed + SEED_OFFSET).shuffle(order)
    n = len(order)
    if n == 0:
        return []
    start = (index * size) % n
    return sorted({order[(start + i) % n] for i in range(min(size, n))})


def evaluate_message(node: int, model: dict[str, np.ndarray], server_round: int, planned: int,
                     known_history: list | None) -> Message:
    config = wire.train_config(server_round=server_round, planned_rounds=planned,
                               known_history=known_history)
    return Message(content=RecordDict({keys.ARRAYS: to_array_record(model), keys.CONFIG: config}),
                   dst_node_id=node, message_type=MessageType.EVALUATE)


def read_sums(msg: Message) -> tuple[fedeval.Sums | None, str]:
    """A reply's released sums, or (None, why there are none)."""
    if msg.has_error():
        return None, f"failed: {short_error(msg.error.reason or '')}"
    metrics = dict(msg.content[keys.METRICS]) if keys.METRICS in msg.content.metric_records else {}
    if metrics.get(keys.REFUSED):
        priv = msg.content.config_records.get(keys.PRIVACY)
        return None, f"refused: {short_error(str(priv[keys.REASON])) if priv else ''}"
    try:
        values = [keys.number(metrics[k], k) for k in (
            keys.EVAL_CORRECT, keys.EVAL_LOSS, keys.EVAL_EXAMPLES, keys.EVAL_CORRECT_STD,
            keys.EVAL_LOSS_STD)]
    except (KeyError, ValueError) as exc:
        return None, f"invalid: {exc}"
    problem = fedeval.check_sums(values)
    if problem:
        return None, f"invalid: {problem}"
    return fedeval.Sums(correct=values[0], loss=values[1], examples=int(values[2]),
                        correct_std=values[3], loss_std=values[4]), ""


class FederatedEvaluation:
    def __init__(self, cfg: ExperimentConfig, strategy: CohortFedAvg) -> None:
        self.cfg, self.strategy = cfg, strategy
        self.rounds = cfg.evaluation.rounds(cfg.federation.num_rounds)

    def due(self, server_round: int) -> bool:
        return server_round in self.rounds

    def run(self, grid: Grid, server_round: int, model: dict[str, np.ndarray], planned: int
            ) -> Outcome:
        """Ask this evaluation's nodes to evaluate `model`; their releases combined. Every
        reply's history goes to the privacy view (an evaluation is spent like a round)."""
        holders = self.strategy.cohorts.discover(grid)
        size = self.cfg.evaluation.evaluators(self.cfg.federation.num_partitions)
        chosen = [p for p in evaluators(list(holders), self.rounds.index(server_round), size,
                                        self.cfg.data.seed) if p in holders]
        view = self.strategy.privacy
        messages = [evaluate_message(holders[p], model, server_round, planned, view.history(p))
                    for p in chosen]
        replies = wire.send_and_receive(grid, messages, timeout=self.cfg.federation.round_timeout)
        out, parts = Outcome(), []
        for reply in replies:
            reported = read_privacy(reply, self.strategy.cohorts.nodes)
            if reported is not None:
                view.record(reported)
            sums, why = read_sums(reply)
            if sums is not None:
                parts.append(sums)
                continue
            node = reply.metadata.src_node_id
            out.reasons.append(f"evaluation, node {node}: {why}")
            if why.startswith("refused"):
                out.refused += 1
            else:
                out.failed += 1
        answered = {r.metadata.src_node_id for r in replies}
        for m in messages:
            if m.metadata.dst_node_id not in answered:
                out.failed += 1
                out.reasons.append(f"evaluation, node {m.metadata.dst_node_id}: no reply in time")
        out.result = fedeval.combine(parts)
        if out.result is not None:
            r = out.result
            log.info("round %d: federated evaluation on %d nodes, %d records: accuracy %.4f "
                     "± %.4f (95%%), loss %.4f", server_round, r.nodes, r.examples, r.accuracy,
                     r.accuracy_interval, r.loss)
        for why in out.reasons[:5]:
            log.warning("round %d: %s", server_round, why)
        return out
