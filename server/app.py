"""The dpfl ServerApp: FedAvg rounds, central evaluation, and the run directory."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from common import keys, privacy
from common.config import ExperimentConfig, parse_config, project_root
from common.data import DataError, cached_partitions, load_split
from common.models import (
    MODEL_FEATURES,
    build_model,
    count_parameters,
    evaluate,
    get_weights,
    set_weights,
)
from common.results import RunWriter, git_revision, library_versions
from server import checkpoint
from server.strategy import DPFedAvg

app = ServerApp()
log = logging.getLogger("dpfl.server")


def run_dir_for(cfg: ExperimentConfig, context: Context) -> Path:
    name = cfg.runtime.run_name or f"run-{context.run_id}"
    return Path(cfg.runtime.output_dir).expanduser().resolve() / name


def _setup_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("dpfl | %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def run_rounds(grid: Grid, strategy: DPFedAvg, arrays: ArrayRecord, *, num_rounds: int,
               train_config: ConfigRecord, on_round: Callable[[int, ArrayRecord, int], None],
               max_idle_rounds: int, timeout: float, start_round: int = 1, idle: int = 0
               ) -> tuple[str, ArrayRecord]:
    """The FedAvg round loop (as Strategy.start, plus early stop and resume): after each
    round `on_round(round, arrays, idle)` evaluates, records and checkpoints. Returns (why
    it stopped early or "" if it ran every round, the last global model)."""
    for server_round in range(start_round, num_rounds + 1):
        messages = strategy.configure_train(server_round, arrays, ConfigRecord(dict(train_config)), grid)
        replies = grid.send_and_receive(messages=messages, timeout=timeout) if messages else []
        new_arrays, _ = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays, idle = new_arrays, 0
        else:
            idle += 1
        on_round(server_round, arrays, idle)
        if max_idle_rounds and idle >= max_idle_rounds:
            reasons = strategy.outcomes[server_round].reasons
            return (f"{idle} consecutive round(s) without a valid update (max-idle-rounds="
                    f"{max_idle_rounds}); last: {reasons[-1] if reasons else 'no replies'}"), arrays
    return "", arrays


def partition_sizes(cfg: ExperimentConfig, num_partitions: int) -> dict[int, int]:
    """Records per partition of the shared training set (bounds each client's
    num-examples); empty if the server cannot compute them."""
    d = cfg.data
    try:
        parts = cached_partitions(d.data_dir, d.partitioner, num_partitions, d.seed,
                                  float(d.dirichlet_alpha), d.labels_per_client)
    except (DataError, OSError) as exc:
        log.warning("cannot compute partition sizes (%s): num-examples is bounded by what "
                    "each node declared", exc)
        return {}
    return {i: len(p) for i, p in enumerate(parts)}


@app.main()
def main(grid: Grid, context: Context) -> None:
    _setup_logging()
    t0 = time.time()
    cfg = parse_config(context.run_config)
    fed, priv = cfg.federation, cfg.privacy
    run_dir = run_dir_for(cfg, context)
    ckpt = None
    if cfg.runtime.resume:
        ckpt = checkpoint.load(run_dir)  # raises a clear error if there is nothing to resume
        checkpoint.check_matches(ckpt, cfg.to_run_config())
    writer = RunWriter(run_dir, resume=cfg.runtime.resume)
    torch.manual_seed(cfg.data.seed)
    if cfg.runtime.num_threads > 0:
        torch.set_num_threads(cfg.runtime.num_threads)

    model = build_model(cfg.train.model, seed=cfg.data.seed)
    test = load_split("test", cfg.data.data_dir, MODEL_FEATURES.get(cfg.train.model, ""))
    test = type(test)(np.asarray(test.images, dtype=np.float32), test.labels)
    strategy = DPFedAvg(
        fraction_train=fed.fraction_train, min_train_nodes=fed.min_train_clients,
        min_available_nodes=fed.min_available_clients, max_update_norm=fed.max_update_norm,
        server_learning_rate=fed.server_learning_rate, server_momentum=fed.server_momentum,
        server_lr_schedule=fed.server_lr_schedule, server_ema=fed.server_ema,
        num_rounds=fed.num_rounds, client_sampling=fed.client_sampling, seed=cfg.data.seed,
        wait_timeout=fed.node_wait_timeout, reply_timeout=fed.round_timeout,
        aggregation=fed.aggregation, trim_fraction=fed.trim_fraction,
        krum_malicious=fed.krum_malicious, krum_select=fed.krum_select,
        partition_sizes=partition_sizes(cfg, fed.num_partitions),
        delta=priv.target_delta, accountant=priv.accountant,
    )
    history: list[dict] = []
    arrays = keys.to_array_record(get_weights(model))
    start_round, idle, elapsed_before = 1, 0, 0.0
    if ckpt is not None:
        arrays = keys.to_array_record(ckpt.model)
        strategy.load_state_dict(ckpt.meta["strategy"], ckpt.strategy_arrays)
        history = list(ckpt.meta["history"])
        start_round, idle = int(ckpt.meta["round"]) + 1, int(ckpt.meta["idle"])
        elapsed_before = float(ckpt.meta["elapsed_seconds"])
        planned = int(ckpt.meta["planned_rounds_per_client"])
        num_nodes = int(ckpt.meta["num_clients"])
        writer.rewrite_rounds(history)  # exactly the checkpointed rounds, none torn or lost
        log.info("resuming %s after round %d of %d", writer.dir, start_round - 1, fed.num_rounds)
        strategy.discover(grid)
    else:
        # Discovery: which partition each node holds. Planning uses the clients known at start.
        num_nodes = len(strategy.discover(grid)) or fed.num_partitions
        planned = privacy.planned_participations(
            num_rounds=fed.num_rounds, clients_per_round=strategy.sample_size(num_nodes),
            num_clients=num_nodes, calibrate_for=priv.calibrate_for, margin=priv.participation_margin,
        )
        writer.write_config({
            "run_config": cfg.to_run_config(), "run_id": context.run_id, "run_dir": str(writer.dir),
            "private": priv.private, "planned_rounds_per_client": planned,
            "num_nodes_at_start": num_nodes, "model_parameters": count_parameters(model),
            "libraries": library_versions(), "git_revision": git_revision(project_root()),
        })
    clients_per_round = strategy.sample_size(num_nodes)
    log.info("run directory %s", writer.dir)
    log.info(
        "%d rounds, %d of %d clients a round, %s, model %s (%d parameters), aggregation %s",
        fed.num_rounds, clients_per_round, num_nodes,
        f"DP-SGD target epsilon={priv.target_epsilon} delta={priv.target_delta}"
        if priv.private else "NON-PRIVATE", cfg.train.model, count_parameters(model),
        fed.aggregation,
    )

    round_start = [time.time()]

    def privacy_record() -> dict:
        return {
            "accountant": priv.accountant, "delta": priv.target_delta,
            "target_epsilon": priv.target_epsilon if priv.private else math.inf,
            "private": priv.private, "max_grad_norm": priv.max_grad_norm,
            "adjacency": privacy.ADJACENCY, "source": "replies",
            "clients": {
                str(pid): {"history": c.history, "epsilon": c.epsilon,
                           "noise_multiplier": c.noise_multiplier, "sample_rate": c.sample_rate,
                           "unconfirmed_rounds": c.unconfirmed_rounds}
                for pid, c in sorted(strategy.clients.items())
            },
        }

    def accuracy(arrays: ArrayRecord) -> tuple[float, float]:
        set_weights(model, strategy.reported_model(keys.from_array_record(arrays)))
        return evaluate(model, test.images, test.labels)

    def on_round(server_round: int, arrays: ArrayRecord, idle: int) -> None:
        loss, acc = accuracy(arrays)
        out = strategy.outcomes[server_round]
        eps_max, eps_mean = strategy.epsilon_stats()
        row = {
            "round": server_round, "test_accuracy": acc, "test_loss": loss,
            "clients_sampled": out.sampled, "clients_trained": out.trained,
            "clients_failed": out.failed, "clients_refused": out.refused,
            "clients_invalid": out.invalid, "clients_timed_out": out.timed_out,
            "aggregated": out.aggregated, "train_loss": out.train_loss,
            "epsilon_max": eps_max, "epsilon_mean": eps_mean,
            "seconds": time.time() - round_start[0],
            "partitions_sampled": out.partitions_sampled,
            "partitions_trained": out.partitions_trained,
            "partitions_aggregated": out.partitions_aggregated,
            "reasons": out.reasons[:20],
        }
        history.append(row)
        # Checkpoint first, then the round's line: a kill between the two loses no round
        # (resume rewrites rounds.jsonl from the checkpoint).
        checkpoint.save(writer.dir, model=keys.from_array_record(arrays), strategy=strategy.state_dict(),
                        meta={"round": server_round, "idle": idle, "history": history,
                              "run_config": cfg.to_run_config(),
                              "planned_rounds_per_client": planned, "num_clients": num_nodes,
                              "elapsed_seconds": elapsed_before + time.time() - t0})
        writer.append_round(row)
        writer.write_privacy(privacy_record())  # kept current: a killed run still has it
        log.info(
            "round %d/%d: test accuracy %.4f, loss %.4f, epsilon max %.3f mean %.3f, "
            "trained %d/%d, refused %d, failed %d, invalid %d, timed out %d, %.1fs",
            server_round, fed.num_rounds, acc, loss, eps_max, eps_mean, row["clients_trained"],
            row["clients_sampled"], row["clients_refused"], row["clients_failed"],
            row["clients_invalid"], row["clients_timed_out"], row["seconds"],
        )
        round_start[0] = time.time()

    if start_round == 1:
        log.info("round 0: test accuracy %.4f (initial model)", accuracy(arrays)[1])
    round_start[0] = time.time()
    stopped, arrays = run_rounds(
        grid, strategy, arrays, num_rounds=fed.num_rounds, start_round=start_round, idle=idle,
        train_config=ConfigRecord({keys.PLANNED_ROUNDS: planned}), on_round=on_round,
        max_idle_rounds=fed.max_idle_rounds, timeout=fed.round_timeout,
    )
    if stopped:
        log.warning("run stopped early: %s", stopped)

    set_weights(model, strategy.reported_model(keys.from_array_record(arrays)))
    writer.write_model(get_weights(model))
    eps_max, eps_mean = strategy.epsilon_stats()
    writer.write_privacy(privacy_record())
    accs = [r["test_accuracy"] for r in history]
    summary = {
        "final_accuracy": accs[-1] if accs else math.nan,
        "best_accuracy": max(accs) if accs else math.nan,
        "final_loss": history[-1]["test_loss"] if history else math.nan,
        "epsilon_max": eps_max, "epsilon_mean": eps_mean,
        "target_epsilon": priv.target_epsilon if priv.private else math.inf,
        "delta": priv.target_delta, "private": priv.private, "adjacency": privacy.ADJACENCY,
        "clients_unconfirmed": sum(bool(c.unconfirmed_rounds) for c in strategy.clients.values()),
        "rounds": len(history), "num_clients": num_nodes,
        "clients_refused_total": sum(r["clients_refused"] for r in history),
        "clients_failed_total": sum(r["clients_failed"] for r in history),
        "clients_invalid_total": sum(r["clients_invalid"] for r in history),
        "clients_timed_out_total": sum(r["clients_timed_out"] for r in history),
        "wall_seconds": elapsed_before + time.time() - t0,
        "resumed": bool(ckpt is not None),
        "aggregation": fed.aggregation,
        "stopped_early": stopped,
    }
    writer.write_summary(summary)
    log.info(
        "done: final accuracy %.4f, epsilon max %.3f (target %s), %d rounds in %.0fs -> %s",
        summary["final_accuracy"], eps_max, summary["target_epsilon"], len(history),
        summary["wall_seconds"], writer.dir,
    )
