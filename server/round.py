"""One round, whatever the exchange: sample the cohort, get the cohort's average from it,
step the global model.

    cohort  = strategy.begin_round(r, grid)           # the sampler's draw, the outcome opened
    pending = exchange.send(grid, r, cohort, model, planned)
    meanwhile()                                       # the previous round's records
    average = exchange.collect(r, pending)            # the cohort's average, or None
    model   = strategy.step(r, model, average)        # the server optimizer

The server state the round reads and moves is explicit: the model and the participations
planned for each client (the loop's `RunState`), the sampler, the privacy view and the
optimizer state (`CohortFedAvg`). An exchange is how the cohort's average comes in:

- `FedAvgExchange`: the model out, each client's noised update back, judged one by one
  as it arrives and averaged (robust aggregation) by the strategy;
- `SecureExchange` (server/secure_round.py): five SecAgg+ stages whose unmasked sum of
  integer releases decodes to the same FedAvg of one DP-SGD step per client.

Either exchange fills the round's outcome (who trained, refused, failed, why) and feeds
the privacy view; neither touches the model or the optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from flwr.serverapp import Grid

from common.arrays import to_array_record
from common.config import ExperimentConfig
from server import wire
from server.audit import CanaryScorer
from server.cohorts import Cohort
from server.strategy import CohortFedAvg
from server.wire import payload_bytes, train_config, train_message

Weights = dict[str, np.ndarray]


class Exchange(Protocol):
    """How a round gets its cohort's average: `send` starts it (messages out, so the
    clients work while the server records the previous round), `collect` finishes it."""

    def send(self, grid: Grid, server_round: int, cohort: Cohort, model: Weights,
             planned: int) -> Any: ...

    def collect(self, server_round: int, pending: Any) -> Weights | None: ...

    def transcript(self) -> dict[str, np.ndarray] | None:
        """What the server held in the last round beyond the replies (keep-transcript)."""


def play(grid: Grid, strategy: CohortFedAvg, exchange: Exchange, server_round: int,
         model: Weights, planned: int, meanwhile: Callable[[], None] | None = None
         ) -> Weights | None:
    """Round `server_round` from the global `model`: the new global model, or None when
    the cohort's average could not be had (the model is kept; the outcome says why).
    `meanwhile` runs once the cohort has its messages (the previous round's records)."""
    cohort = strategy.begin_round(server_round, grid)
    pending = exchange.send(grid, server_round, cohort, model, planned)
    if meanwhile is not None:
        meanwhile()
    average = exchange.collect(server_round, pending)
    strategy.log_reasons(server_round)
    return None if average is None else strategy.step(server_round, model, average)


@dataclass
class _Sent:
    model: Weights
    messages: wire.Sent


class FedAvgExchange:
    """The plain exchange: the global model to every member with its round and planned
    participations; noised updates back, each judged as it arrives."""

    def __init__(self, cfg: ExperimentConfig, strategy: CohortFedAvg,
                 scorer: CanaryScorer | None = None) -> None:
        self.timeout = cfg.federation.round_timeout
        self.strategy, self.scorer = strategy, scorer

    def send(self, grid: Grid, server_round: int, cohort: Cohort, model: Weights,
             planned: int) -> _Sent:
        arrays = to_array_record(model)
        history = self.strategy.privacy.history
        messages = [train_message(node, arrays, train_config(
                        server_round=server_round, planned_rounds=planned,
                        known_history=history(pid)))
                    for node, pid in cohort.members]
        self.strategy.outcomes[server_round].bytes_down = sum(
            payload_bytes(m.content) for m in messages)
        return _Sent(model, wire.send(grid, messages))

    def collect(self, server_round: int, pending: _Sent) -> Weights | None:
        s, sent = self.strategy, pending.model
        replies = (wire.receive(pending.messages, timeout=self.timeout,
                                each=lambda m: s.judge(m, sent))
                   if pending.messages.messages else [])
        s.outcomes[server_round].bytes_up = sum(
            payload_bytes(r.content) for r in replies if not r.has_error())
        if self.scorer is not None:  # an audit run: scored on aggregation's own verdicts
            self.scorer.observe_replies(sent, replies, lambda m: s.verdict(m, sent))
        return s.average(server_round, replies, sent)

    def transcript(self) -> dict[str, np.ndarray] | None:
        return None  # nothing beyond the replies themselves
