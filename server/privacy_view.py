"""The clients' privacy as the server heard it: each one's history and epsilon.

The server never trusts a client's claimed epsilon alone: it recomputes epsilon from the
reported history (keeping the claim if it is larger). A client that was asked to train
and whose reply carried no history (failed, timed out) may have spent more than its
history shows: those rounds are marked unconfirmed. Its own ledger is the truth.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from common import privacy
from common.config import ExperimentConfig
from common.records import ClientRecord, PrivacyRecord
from server.replies import ReportedPrivacy


class PrivacyView:
    def __init__(self, *, delta: float, accountant: str) -> None:
        self.delta = delta
        self.accountant = accountant
        self.clients: dict[int, ClientRecord] = {}

    def assess(self, reported: ReportedPrivacy) -> ClientRecord:
        """The record of what a client reported, its epsilon recomputed (changes nothing)."""
        try:
            eps = privacy.epsilon(reported.history, self.delta, self.accountant)
            alone = privacy.epsilon_alone(reported.history, self.delta, self.accountant)
        except ValueError:  # e.g. Skellam releases under the prv accountant
            eps = alone = math.inf
        if not math.isnan(reported.claimed_epsilon):
            eps = max(eps, reported.claimed_epsilon)
        return ClientRecord(
            history=reported.history, epsilon=eps, noise_multiplier=reported.noise_multiplier,
            sample_rate=reported.sample_rate, epsilon_alone=max(alone, eps))

    def record(self, reported: ReportedPrivacy, assessed: ClientRecord | None = None) -> None:
        """Keep what a client reported (`assessed`: its `assess`ment, when made already)."""
        self.clients[reported.partition_id] = assessed or self.assess(reported)

    def unconfirmed(self, partitions: Iterable[int], server_round: int) -> None:
        """These partitions were asked to train in `server_round` and reported nothing."""
        for pid in partitions:
            c = self.clients.get(pid, ClientRecord())
            self.clients[pid] = replace(c, unconfirmed_rounds=[*c.unconfirmed_rounds, server_round])

    def history(self, partition_id: int) -> list:
        c = self.clients.get(partition_id)
        return c.history if c is not None else []

    def epsilon_stats(self) -> tuple[float, float]:
        """(max, mean) epsilon over every client that has reported so far."""
        eps = [c.epsilon for c in self.clients.values()]
        return (max(eps), sum(eps) / len(eps)) if eps else (0.0, 0.0)

    def as_record(self, cfg: ExperimentConfig) -> PrivacyRecord:
        priv = cfg.privacy
        return PrivacyRecord(
            accountant=self.accountant, delta=self.delta, target_epsilon=priv.budget,
            private=priv.private, max_grad_norm=priv.max_grad_norm,
            adjacency=privacy.ADJACENCY, source="replies",
            clients={str(p): c for p, c in sorted(self.clients.items())},
        )

    def state_dict(self) -> dict[str, Any]:
        return {str(p): c.to_json() for p, c in self.clients.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clients = {int(p): ClientRecord.from_json(c) for p, c in state.items()}
