"""The round loop: start or resume a run, train round after round, evaluate, record,
checkpoint, stop early when nothing can be aggregated, and finish the run directory.

The loop owns time and files; the strategy owns one round's algorithm (as FedJAX keeps
the training loop apart from the algorithm). After every round the checkpoint is written
first and the round's line second, so a kill between the two loses no round (resume
rewrites rounds.jsonl from the checkpoint).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np
from flwr.serverapp import Grid

from common import privacy
from common.config import ExperimentConfig, project_root
from common.records import (
    RoundRecord,
    RunDir,
    RunInfo,
    RunSummary,
    git_revision,
    library_versions,
)
from server import checkpoint, evaluation, wire
from server.audit import CanaryScorer
from server.audit import finish as audit_finish
from server.round import Exchange, FedAvgExchange, play
from server.secure_round import SecureExchange
from server.strategy import CohortFedAvg

log = logging.getLogger("dpfl.server")
Weights = dict[str, np.ndarray]
Evaluate = Callable[[Weights], tuple[float, float]]  # model -> (loss, accuracy)


@dataclass
class RunState:
    """Where a run stands between rounds (what the checkpoint holds besides the strategy)."""

    model: Weights
    planned: int  # participations each client's noise is calibrated for
    num_clients: int
    next_round: int = 1
    idle: int = 0
    history: list[RoundRecord] = field(default_factory=list)
    elapsed_before: float = 0.0  # seconds spent by earlier attempts (resume)
    resumed: bool = False

    _history_json: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def history_json(self) -> list[dict[str, Any]]:
        """`history` as JSON, each record encoded once (history only grows; a round's
        checkpoint would otherwise encode every earlier round again)."""
        if len(self._history_json) > len(self.history):
            self._history_json.clear()
        self._history_json += [r.to_json() for r in self.history[len(self._history_json):]]
        return self._history_json

    def meta(self, cfg: ExperimentConfig, elapsed: float) -> dict[str, Any]:
        return {"round": self.next_round - 1, "idle": self.idle,
                "history": self.history_json(),
                "run_config": cfg.to_run_config(), "planned_rounds_per_client": self.planned,
                "num_clients": self.num_clients, "elapsed_seconds": self.elapsed_before + elapsed}


def start(grid: Grid, cfg: ExperimentConfig, strategy: CohortFedAvg, run: RunDir, *,
          model: Weights, run_id: int, model_parameters: int) -> RunState:
    """A new run: wait for the configured federation (num-partitions nodes; discovery
    `all` asks every one), plan each client's participations for it, write config.json."""
    fed, priv = cfg.federation, cfg.privacy
    num_clients = strategy.cohorts.begin(grid)
    planned = privacy.planned_participations(
        num_rounds=fed.num_rounds, clients_per_round=strategy.cohorts.size(num_clients),
        num_clients=num_clients, calibrate_for=priv.calibrate_for, margin=priv.participation_margin)
    run.write_info(RunInfo(
        run_config=cfg.to_run_config(), run_id=run_id, run_dir=str(run.path),
        private=priv.private, planned_rounds_per_client=planned, num_nodes_at_start=num_clients,
        model_parameters=model_parameters, libraries=library_versions(),
        git_revision=git_revision(project_root())))
    return RunState(model=model, planned=planned, num_clients=num_clients)


def restore(grid: Grid, cfg: ExperimentConfig, strategy: CohortFedAvg, run: RunDir,
            ckpt: checkpoint.Checkpoint) -> RunState:
    """A resumed run: the strategy and run state exactly as after the last complete
    round; rounds.jsonl rewritten to exactly the checkpointed rounds (none torn or lost)."""
    meta = ckpt.meta
    strategy.load_state_dict(meta["strategy"], ckpt.strategy_arrays)
    state = RunState(
        model=ckpt.model, planned=int(meta["planned_rounds_per_client"]),
        num_clients=int(meta["num_clients"]), next_round=int(meta["round"]) + 1,
        idle=int(meta["idle"]), history=[RoundRecord.from_json(r) for r in meta["history"]],
        elapsed_before=float(meta["elapsed_seconds"]), resumed=True)
    run.rewrite_rounds(state.history)
    log.info("resuming %s after round %d of %d", run.path, state.next_round - 1,
             cfg.federation.num_rounds)
    strategy.cohorts.begin(grid)
    return state


def round_record(server_round: int, strategy: CohortFedAvg, loss: float, acc: float,
                 seconds: float) -> RoundRecord:
    out = strategy.outcomes[server_round]
    eps_max, eps_mean = strategy.privacy.epsilon_stats()
    return RoundRecord(
        round=server_round, test_accuracy=acc, test_loss=loss, clients_sampled=out.sampled,
        clients_trained=out.trained, clients_failed=out.failed, clients_refused=out.refused,
        clients_invalid=out.invalid, clients_timed_out=out.timed_out, aggregated=out.aggregated,
        train_loss=out.train_loss, epsilon_max=eps_max, epsilon_mean=eps_mean, seconds=seconds,
        partitions_sampled=out.partitions_sampled, partitions_trained=out.partitions_trained,
        partitions_aggregated=out.partitions_aggregated, reasons=out.reasons[:20],
        bytes_up=out.bytes_up, bytes_down=out.bytes_down, noise_shares=out.noise_shares,
        seconds_by_stage={k: round(v, 4) for k, v in out.seconds_by_stage.items()})


@dataclass
class Trained:
    """A round whose new model is in; its evaluation, checkpoint and records are to do."""

    server_round: int
    seconds: float  # from sending its model to aggregating the replies
    seconds_clients: float  # of which sending and waiting for replies
    strategy_state: tuple[dict[str, Any], dict[str, np.ndarray]] | None = None
    federated: evaluation.Outcome | None = None  # its federated evaluation, if it had one


def record_round(cfg: ExperimentConfig, strategy: CohortFedAvg, run: RunDir, state: RunState,
                 evaluate: Evaluate, done: Trained, started: float,
                 scorer: CanaryScorer | None = None) -> None:
    """Evaluate round `done`'s model, then write its checkpoint (first) and its records.
    The run state and the strategy must be as the round left them, except the strategy's
    sampler when the next round has been sent: `done.strategy_state` holds its state
    from before."""
    server_round = done.server_round
    t_eval = time.time()
    loss, acc = evaluate(strategy.reported_model(state.model))
    row = replace(round_record(server_round, strategy, loss, acc, done.seconds),
                  seconds_clients=done.seconds_clients, seconds_evaluate=time.time() - t_eval)
    if done.federated is not None:
        fed_eval, result = done.federated, done.federated.result
        row = replace(row, federated_refused=fed_eval.refused, federated_failed=fed_eval.failed,
                      reasons=(row.reasons + fed_eval.reasons)[:20])
        if result is not None:
            row = replace(row, federated_accuracy=result.accuracy,
                          federated_accuracy_interval=result.accuracy_interval,
                          federated_loss=result.loss, federated_examples=result.examples,
                          federated_nodes=result.nodes)
    state.history.append(row)
    state.next_round = server_round + 1
    checkpoint.save(run.path, model=state.model,
                    strategy=done.strategy_state or strategy.state_dict(),
                    meta=state.meta(cfg, time.time() - started))
    run.append_round(row)
    run.write_privacy(strategy.privacy.as_record(cfg))  # kept current: a killed run has it
    if scorer is not None:
        run.write_canary_scores(scorer.arrays())
    fed = cfg.federation
    log.info(
        "round %d/%d: test accuracy %.4f, loss %.4f, epsilon max %.3f mean %.3f, "
        "trained %d/%d, refused %d, failed %d, invalid %d, timed out %d, %.1fs",
        server_round, fed.num_rounds, acc, loss, row.epsilon_max, row.epsilon_mean,
        row.clients_trained, row.clients_sampled, row.clients_refused, row.clients_failed,
        row.clients_invalid, row.clients_timed_out, row.seconds)


def run_rounds(grid: Grid, cfg: ExperimentConfig, strategy: CohortFedAvg, run: RunDir,
               state: RunState, evaluate: Evaluate, started: float,
               scorer: CanaryScorer | None = None) -> str:
    """Rounds state.next_round .. num-rounds. Returns why the run stopped early, or "".
    With `scorer` (an audit run) it scores the canaries on what each round showed.

    Each round is `round.play` with the run's exchange (plain or secure). A round's
    evaluation, checkpoint and records are done while the next round's clients work:
    the next round's first messages go out first (it depends only on the model and the
    sampler, never on the evaluation). The checkpoint still holds exactly the
    state after its round (the sampler's as it was before the next cohort was drawn),
    and it is written before the next round's replies are read; a run killed in
    between resumes from the round before, whose clients answer again from their kept
    replies."""
    fed = cfg.federation
    exchange: Exchange = (SecureExchange if cfg.secure.enabled else FedAvgExchange)(
        cfg, strategy, scorer)
    federated = evaluation.FederatedEvaluation(cfg, strategy) if cfg.evaluation.federated \
        else None
    if state.next_round == 1:
        log.info("round 0: test accuracy %.4f (initial model)",
                 evaluate(strategy.reported_model(state.model))[1])

    done: Trained | None = None  # the last round, when its records are still to do

    def record(done: Trained) -> None:
        record_round(cfg, strategy, run, state, evaluate, done, started, scorer)

    for server_round in range(state.next_round, fed.num_rounds + 1):
        t0, waited = time.time(), wire.Waited.seconds
        # the previous round's records, done while this round's clients train (with the
        # sampler's state from before this round's draw)
        previous = None if done is None else replace(done, strategy_state=strategy.state_dict())
        done = None
        new = play(grid, strategy, exchange, server_round, state.model, state.planned,
                   meanwhile=None if previous is None else partial(record, previous))
        if cfg.runtime.keep_transcript and (transcript := exchange.transcript()) is not None:
            run.write_transcript(server_round, transcript)
        if new is not None:
            state.model, state.idle = new, 0
        else:
            state.idle += 1
        done = Trained(server_round, seconds=time.time() - t0,
                       seconds_clients=wire.Waited.seconds - waited)
        if federated is not None and federated.due(server_round):
            # before the next round is sent (its nodes' ledgers then hold the evaluation)
            done.federated = federated.run(grid, server_round,
                                           strategy.reported_model(state.model), state.planned)
        if fed.max_idle_rounds and state.idle >= fed.max_idle_rounds:
            record(done)
            reasons = strategy.outcomes[server_round].reasons  # all of them, not the row's 20
            return (f"{state.idle} consecutive round(s) without a valid update (max-idle-rounds="
                    f"{fed.max_idle_rounds}); last: {reasons[-1] if reasons else 'no replies'}")
    if done is not None:
        record(done)
    return ""


def finish(cfg: ExperimentConfig, strategy: CohortFedAvg, run: RunDir, state: RunState,
           stopped: str, started: float, scorer: CanaryScorer | None = None) -> RunSummary:
    """The final model, privacy record, audit (audit runs) and summary (written last: it
    marks the run done)."""
    if stopped:
        log.warning("run stopped early: %s", stopped)
    final = strategy.reported_model(state.model)
    run.write_model(final)
    record = strategy.privacy.as_record(cfg)
    run.write_privacy(record)
    bound = audit_finish(scorer, run, final, record) if scorer is not None else math.nan
    summary = RunSummary.of(
        state.history, record, num_clients=state.num_clients,
        wall_seconds=state.elapsed_before + time.time() - started, resumed=state.resumed,
        aggregation=cfg.server.aggregation, stopped_early=stopped, epsilon_lower_bound=bound)
    run.write_summary(summary)
    log.info("done: final accuracy %.4f, epsilon max %.3f (target %s), %d rounds in %.0fs -> %s",
             summary.final_accuracy, summary.epsilon_max, summary.target_epsilon, summary.rounds,
             summary.wall_seconds, run.path)
    return summary
