"""FedAvg over cohorts of partitions: the server's state across rounds, and one round's
sample and aggregate.

`CohortFedAvg` holds what persists between rounds (the cohort sampler, the clients'
privacy as heard, the server optimizer's state, each round's outcome) and delegates each
job: `Cohorts` discovers nodes and samples the round, `replies.classify` judges each
reply, `PrivacyView` keeps what every client reported, `robust_aggregate` combines the
accepted updates and the server optimizer (`optimizer.step`) moves the global model. It
works on plain named arrays; Flower's types stay at the wire (server/wire.py). No
differential privacy is added here: every client adds its own noise before anything
reaches the server.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from common.aggregation import robust_aggregate
from common.config import ExperimentConfig
from common.records import ClientRecord
from server import optimizer
from server.cohorts import Cohort, Cohorts
from server.privacy_view import PrivacyView
from server.replies import Accepted, Rejected, ReportedPrivacy, decode

log = logging.getLogger("dpfl.server")


@dataclass
class RoundOutcome:
    """What happened to one round's sample and replies."""

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
    bytes_up: int = 0  # payload bytes the server received from clients
    bytes_down: int = 0  # payload bytes it sent them
    noise_shares: int = 0  # secure aggregation: noise shares in the unmasked sum
    seconds_by_stage: dict[str, float] = field(default_factory=dict)  # secure aggregation


def mean_loss(accepted: list[Accepted]) -> float:
    """The example-weighted mean of the losses clients released (NaN if none did)."""
    released = [(a.train_loss, a.num_examples) for a in accepted if not math.isnan(a.train_loss)]
    if not released:
        return math.nan
    return float(np.average([x for x, _ in released], weights=[w for _, w in released]))


@dataclass
class Judged:
    """One reply as `judge` found it: its privacy report (and the record of it) and
    whether it can be averaged."""

    reply: Message
    reported: ReportedPrivacy | None
    assessed: ClientRecord | None
    verdict: Accepted | Rejected


class CohortFedAvg:
    """FedAvg whose rounds sample partitions in cohorts and whose aggregation excludes,
    with a reason, every reply that failed, refused or is malformed."""

    def __init__(self, cfg: ExperimentConfig, *, partition_sizes: Mapping[int, int] | None = None
                 ) -> None:
        fed = cfg.federation
        self.fed = fed
        self.partition_sizes = dict(partition_sizes or {})
        self.cohorts = Cohorts(fed, seed=cfg.data.seed)
        self.privacy = PrivacyView(delta=cfg.privacy.target_delta, accountant=cfg.privacy.accountant)
        self.srv = srv = cfg.server
        self.optimizer = optimizer.ServerOptimizer(
            learning_rate=srv.server_learning_rate, momentum=cfg.server_momentum,
            schedule=srv.server_lr_schedule, ema=srv.server_ema, num_rounds=fed.num_rounds)
        self.opt_state = optimizer.OptimizerState()
        self.outcomes: dict[int, RoundOutcome] = {}
        self._judged: dict[int, Judged] = {}  # id(reply) -> what `judge` made of it

    # ---- one round --------------------------------------------------------------------

    def begin_round(self, server_round: int, grid: Grid) -> Cohort:
        """Round `server_round`'s cohort, with its outcome opened (sampled, and why the
        sample is empty or short)."""
        cohort = self.cohorts.sample(grid)
        self.outcomes[server_round] = RoundOutcome(
            sampled=len(cohort.members), partitions_sampled=cohort.partitions,
            reasons=list(cohort.reasons))
        self._judged.clear()
        return cohort

    def judge(self, msg: Message, sent: Mapping[str, np.ndarray]) -> Judged:
        """Read and check one reply to the model `sent`, changing nothing: its privacy
        report, its epsilon, its verdict. The round calls it as each reply comes, while
        the others still train, and `average` takes what it found."""
        decoded = decode(msg, reference=sent, nodes=self.cohorts.nodes,
                         partition_sizes=self.partition_sizes,
                         max_update_norm=self.srv.max_update_norm)
        reported, verdict = decoded.reported, decoded.verdict
        assert verdict is not None  # a reference was given: the payload was judged
        judged = Judged(msg, reported, self.privacy.assess(reported) if reported else None,
                        verdict)
        self._judged[id(msg)] = judged
        return judged

    def judged(self, msg: Message, sent: Mapping[str, np.ndarray]) -> Judged:
        """What `judge` found of a reply of this round (judging it now if it has not been)."""
        j = self._judged.get(id(msg))
        return j if j is not None and j.reply is msg else self.judge(msg, sent)

    def verdict(self, msg: Message, sent: Mapping[str, np.ndarray]) -> Accepted | Rejected:
        """The verdict the round's average takes: the audit scorer reads the same one,
        never its own."""
        return self.judged(msg, sent).verdict

    def average(self, server_round: int, replies: list[Message], sent: Mapping[str, np.ndarray]
                ) -> dict[str, np.ndarray] | None:
        """The cohort's average of the replies to the model `sent`, or None when too few
        are usable (the global model is kept). Records each reply's privacy first, valid or
        not: the client may have trained and spent before its reply was found unusable."""
        out = self.outcomes.setdefault(server_round, RoundOutcome())
        judged = [self.judged(msg, sent) for msg in replies]
        self._judged.clear()
        heard = set()
        for j in judged:
            if j.reported is not None:
                self.privacy.record(j.reported, j.assessed)
                heard.add(j.reported.partition_id)
        self.privacy.unconfirmed(set(out.partitions_sampled) - heard, server_round)

        verdicts = [j.verdict for j in judged]
        # in partition order, not arrival order: the same updates give the same model
        # to the last bit, however the runtime scheduled the clients
        accepted = sorted((v for v in verdicts if isinstance(v, Accepted)),
                          key=lambda a: a.partition_id)
        rejected = [v for v in verdicts if isinstance(v, Rejected)]
        counts = Counter(r.kind for r in rejected)
        out.failed, out.refused, out.invalid = counts["failed"], counts["refused"], counts["invalid"]
        out.timed_out = max(out.sampled - len(replies), 0)
        if out.timed_out:
            out.reasons.append(f"{out.timed_out} client(s) did not reply within "
                               f"round-timeout={self.fed.round_timeout:g}s")
        out.reasons += [r.reason for r in rejected]
        out.trained = len(accepted)
        out.partitions_trained = sorted(a.partition_id for a in accepted)
        if not accepted or len(accepted) < self.fed.min_train_clients:
            out.reasons.append(
                f"only {len(accepted)} valid update(s), fewer than min-train-clients="
                f"{self.fed.min_train_clients}: the global model is kept")
            return None
        out.aggregated = True
        out.train_loss = mean_loss(accepted)
        average, used = robust_aggregate(
            self.srv.aggregation, [a.update for a in accepted], [a.num_examples for a in accepted],
            trim_fraction=self.srv.trim_fraction, krum_malicious=self.srv.krum_malicious,
            krum_select=self.srv.krum_select)
        out.partitions_aggregated = sorted(accepted[i].partition_id for i in used)
        return average

    def step(self, server_round: int, sent: Mapping[str, np.ndarray],
             average: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The round's new global model: the server optimizer's step from the model `sent`
        towards the cohort's `average` (however the round obtained it: averaged updates,
        or a secure round's unmasked sum)."""
        self.opt_state, model = optimizer.step(self.optimizer, self.opt_state, server_round,
                                               sent, average)
        return model

    def log_reasons(self, server_round: int) -> None:
        for reason in self.outcomes[server_round].reasons:
            log.warning("round %d: %s", server_round, reason)

    def reported_model(self, model: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model that is evaluated and saved (the moving average when enabled)."""
        return optimizer.reported(self.optimizer, self.opt_state, model)

    # ---- checkpoint -------------------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-able state, named arrays) to resume exactly: the sampler, the server
        optimizer and moving average, the clients' privacy as heard."""
        meta = {**self.cohorts.state_dict(), "clients": self.privacy.state_dict(),
                "has_ema": self.opt_state.ema is not None}
        return meta, self.opt_state.arrays()

    def load_state_dict(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.cohorts.load_state_dict(meta)
        self.privacy.load_state_dict(meta["clients"])
        self.opt_state = optimizer.OptimizerState.from_arrays(arrays, bool(meta.get("has_ema")))
