"""The dpfl ServerApp: FedAvg rounds, central evaluation, and the run directory."""

from __future__ import annotations

import logging
import math
import random
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
from common.data import load_split
from common.models import (
    MODEL_FEATURES,
    build_model,
    count_parameters,
    evaluate,
    get_weights,
    set_weights,
)
from common.results import RunWriter, git_revision, library_versions
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
               train_config: ConfigRecord, evaluate_fn: Callable[[int, ArrayRecord], None],
               max_idle_rounds: int, timeout: float = 3600.0) -> str:
    """The FedAvg round loop (as Strategy.start, plus an early stop): returns why it
    stopped early, or "" if it ran every round."""
    evaluate_fn(0, arrays)
    idle = 0
    for server_round in range(1, num_rounds + 1):
        messages = strategy.configure_train(server_round, arrays, ConfigRecord(dict(train_config)), grid)
        replies = grid.send_and_receive(messages=messages, timeout=timeout)
        new_arrays, _ = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays, idle = new_arrays, 0
        else:
            idle += 1
        evaluate_fn(server_round, arrays)
        if max_idle_rounds and idle >= max_idle_rounds:
            reasons = strategy.outcomes[server_round].reasons
            return (f"{idle} consecutive round(s) without a valid update (max-idle-rounds="
                    f"{max_idle_rounds}); last: {reasons[0] if reasons else 'no replies'}")
    return ""


@app.main()
def main(grid: Grid, context: Context) -> None:
    _setup_logging()
    t0 = time.time()
    cfg = parse_config(context.run_config)
    fed, priv = cfg.federation, cfg.privacy
    writer = RunWriter(run_dir_for(cfg, context))
    random.seed(cfg.data.seed)  # Flower's node sampling uses the global `random`
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
    )
    num_nodes = len(list(grid.get_node_ids())) or fed.num_partitions
    clients_per_round = strategy.sample_size(num_nodes)
    planned = privacy.planned_participations(
        num_rounds=fed.num_rounds, clients_per_round=clients_per_round, num_clients=num_nodes,
        calibrate_for=priv.calibrate_for, margin=priv.participation_margin,
    )
    writer.write_config({
        "run_config": cfg.to_run_config(), "run_id": context.run_id, "run_dir": str(writer.dir),
        "private": priv.private, "planned_rounds_per_client": planned,
        "num_nodes_at_start": num_nodes, "model_parameters": count_parameters(model),
        "libraries": library_versions(), "git_revision": git_revision(project_root()),
    })
    log.info("run directory %s", writer.dir)
    log.info(
        "%d rounds, %d of %d clients a round, %s, model %s (%d parameters)",
        fed.num_rounds, clients_per_round, num_nodes,
        f"DP-SGD target epsilon={priv.target_epsilon} delta={priv.target_delta}"
        if priv.private else "NON-PRIVATE", cfg.train.model, count_parameters(model),
    )

    history: list[dict] = []
    round_start = [time.time()]

    def privacy_record() -> dict:
        return {
            "accountant": priv.accountant, "delta": priv.target_delta,
            "target_epsilon": priv.target_epsilon if priv.private else math.inf,
            "private": priv.private, "max_grad_norm": priv.max_grad_norm,
            "clients": {
                str(pid): {"history": c.history, "epsilon": c.epsilon,
                           "noise_multiplier": c.noise_multiplier, "sample_rate": c.sample_rate}
                for pid, c in sorted(strategy.clients.items())
            },
        }

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> None:
        set_weights(model, strategy.reported_model(keys.from_array_record(arrays)))
        loss, acc = evaluate(model, test.images, test.labels)
        if server_round == 0:
            log.info("round 0: test accuracy %.4f (initial model)", acc)
            round_start[0] = time.time()
            return
        out = strategy.outcomes.get(server_round)
        eps_max, eps_mean = strategy.epsilon_stats()
        row = {
            "round": server_round, "test_accuracy": acc, "test_loss": loss,
            "clients_sampled": out.sampled if out else 0,
            "clients_trained": out.trained if out else 0,
            "clients_failed": out.failed if out else 0,
            "clients_refused": out.refused if out else 0,
            "clients_invalid": out.invalid if out else 0,
            "clients_timed_out": out.timed_out if out else 0,
            "aggregated": out.aggregated if out else False,
            "train_loss": out.train_loss if out else math.nan,
            "client_train_seconds": out.train_seconds if out else 0.0,
            "epsilon_max": eps_max, "epsilon_mean": eps_mean,
            "seconds": time.time() - round_start[0],
            "reasons": out.reasons[:20] if out else [],
        }
        writer.append_round(row)
        writer.write_privacy(privacy_record())  # kept current: a killed run still has it
        history.append(row)
        log.info(
            "round %d/%d: test accuracy %.4f, loss %.4f, epsilon max %.3f mean %.3f, "
            "trained %d/%d, refused %d, failed %d, %.1fs",
            server_round, fed.num_rounds, acc, loss, eps_max, eps_mean, row["clients_trained"],
            row["clients_sampled"], row["clients_refused"], row["clients_failed"], row["seconds"],
        )
        round_start[0] = time.time()

    stopped = run_rounds(
        grid, strategy, keys.to_array_record(get_weights(model)), num_rounds=fed.num_rounds,
        train_config=ConfigRecord({keys.PLANNED_ROUNDS: planned}), evaluate_fn=evaluate_fn,
        max_idle_rounds=fed.max_idle_rounds,
    )
    if stopped:
        log.warning("run stopped early: %s", stopped)

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
        "delta": priv.target_delta, "private": priv.private,
        "rounds": len(history), "num_clients": num_nodes,
        "clients_refused_total": sum(r["clients_refused"] for r in history),
        "clients_failed_total": sum(r["clients_failed"] for r in history),
        "wall_seconds": time.time() - t0,
        "stopped_early": stopped,
    }
    writer.write_summary(summary)
    log.info(
        "done: final accuracy %.4f, epsilon max %.3f (target %s), %d rounds in %.0fs -> %s",
        summary["final_accuracy"], eps_max, summary["target_epsilon"], len(history),
        summary["wall_seconds"], writer.dir,
    )
