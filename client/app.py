"""The dpfl ClientApp: decode, train under the ledger, encode. Logic lives in trainer.py.

Two handlers: `query` tells the server which partition this node holds and how many
records (node discovery), `train` runs one round of DP-SGD under the privacy ledger.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from functools import lru_cache

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.attacks import apply_attack, attack_before_training
from client.ledger import Ledger, load_ledger, load_replay, save_ledger, save_replay
from client.trainer import BudgetExceeded, plan_spend, train_round
from common import keys
from common.aggregation import model_problem
from common.config import (
    NODE_CONFIG_ENV,
    ExperimentConfig,
    NodeConfig,
    parse_config,
    parse_node_config,
)
from common.data import Split, cached_partitions, load_partition, load_split
from common.models import MODEL_FEATURES, build_model, get_weights

app = ClientApp()


@lru_cache(maxsize=4)
def _config(items: tuple) -> ExperimentConfig:
    return parse_config(dict(items))


def _node(context: Context) -> NodeConfig:
    """This node's identity, files and privacy policy: Flower's node config over what the
    harness put in NODE_CONFIG_ENV (both the node operator's, never the server's)."""
    return parse_node_config(context.node_config, os.environ.get(NODE_CONFIG_ENV, ""))


@lru_cache(maxsize=8)
def _template(model: str) -> dict[str, np.ndarray]:
    return dict(get_weights(build_model(model, seed=0)))


def _data(cfg: ExperimentConfig, node: NodeConfig) -> Split:
    features = MODEL_FEATURES.get(cfg.train.model, "")
    if node.data_dir:
        split = load_split("train", node.data_dir, features)
        return Split(np.asarray(split.images, dtype=np.float32), split.labels)
    return load_partition(
        node.partition_id, node.num_partitions, partitioner=cfg.data.partitioner,
        seed=cfg.data.seed, alpha=cfg.data.dirichlet_alpha,
        labels_per_client=cfg.data.labels_per_client, data_dir=cfg.data.data_dir, features=features,
    )


def _num_examples(cfg: ExperimentConfig, node: NodeConfig) -> int:
    if node.data_dir:
        return len(load_split("train", node.data_dir).labels)
    d = cfg.data
    return len(cached_partitions(d.data_dir, d.partitioner, node.num_partitions, d.seed,
                                 float(d.dirichlet_alpha), d.labels_per_client)[node.partition_id])


@app.query()
def query(msg: Message, context: Context) -> Message:
    cfg = _config(tuple(sorted(context.run_config.items())))
    node = _node(context)
    return Message(content=RecordDict({keys.METRICS: MetricRecord({
        keys.PARTITION_ID: node.partition_id, keys.NUM_EXAMPLES: _num_examples(cfg, node),
        keys.OWN_DATA: int(bool(node.data_dir)),
    })}), reply_to=msg)


def _reply(msg: Message, metrics: dict, history: list, reason: str = "",
           arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({
        keys.METRICS: MetricRecord(metrics),
        keys.PRIVACY: ConfigRecord({keys.HISTORY: json.dumps([list(e) for e in history]),
                                    keys.REASON: reason}),
    })
    if arrays is not None:
        content[keys.ARRAYS] = arrays
    return Message(content=content, reply_to=msg)


def request_key(cfg: ExperimentConfig, context: Context, server_round: int,
                weights: dict[str, np.ndarray]) -> str:
    """Identifies one training request: the run (its config, but not `resume`), the round
    and the exact global model. A resumed run asks the same again for the round that
    was cut off."""
    h = hashlib.sha256()
    run_config = {k: v for k, v in sorted(context.run_config.items()) if k != "resume"}
    run = cfg.runtime.run_name or f"run-{context.run_id}"
    h.update(json.dumps([run, run_config, server_round], default=str).encode())
    for name, arr in weights.items():
        h.update(name.encode())
        h.update(str(arr.dtype).encode() + str(arr.shape).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


MAX_PLANNED_ROUNDS = 1_000_000


def request_problem(cfg: ExperimentConfig, node: NodeConfig, weights: dict[str, np.ndarray],
                    planned_rounds: float) -> str | None:
    """Why this node refuses the request before touching any data, or None. Every reason
    depends only on the run config, the node config and the global weights, all of them
    known to the server: a refusal reveals nothing about the records."""
    problem = node.policy_problem(cfg.privacy)
    if problem:
        return problem
    if not (planned_rounds.is_integer() and 1 <= planned_rounds <= MAX_PLANNED_ROUNDS):
        return f"planned-rounds={planned_rounds!r} must be an integer in [1, {MAX_PLANNED_ROUNDS}]"
    if cfg.attack.mode_for(node.partition_id) and not node.simulated_attacks:
        return (f"the run config asks this node to misbehave (attack={cfg.attack.attack!r}); "
                "only a simulation harness may enable that (node config simulated-attacks)")
    return model_problem(_template(cfg.train.model), weights, max_norm=node.max_model_norm)


def _refusal(msg: Message, ledger: Ledger, cfg: ExperimentConfig, node: NodeConfig,
             reason: str) -> Message:
    delta = min(cfg.privacy.target_delta, node.max_delta)
    metrics = {keys.NUM_EXAMPLES: 0, keys.TRAIN_LOSS: math.nan, keys.PARTITION_ID: node.partition_id,
               keys.REFUSED: 1, keys.EPSILON: ledger.epsilon(delta, cfg.privacy.accountant),
               keys.NOISE_MULTIPLIER: ledger.noise_multiplier or 0.0, keys.SAMPLE_RATE: 0.0,
               keys.STEPS: 0}
    return _reply(msg, metrics, ledger.history, reason=reason)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = _config(tuple(sorted(context.run_config.items())))
    node = _node(context)
    server_cfg = msg.content[keys.CONFIG]
    server_round = int(keys.number(server_cfg[keys.SERVER_ROUND], keys.SERVER_ROUND))
    global_weights = keys.from_array_record(msg.content.array_records[keys.ARRAYS])
    view = server_cfg.get(keys.KNOWN_HISTORY)
    ledger = load_ledger(context, node.ledger_file, str(view) if view is not None else None)

    planned = keys.number(server_cfg[keys.PLANNED_ROUNDS], keys.PLANNED_ROUNDS)
    problem = request_problem(cfg, node, global_weights, planned)
    if problem:
        return _refusal(msg, ledger, cfg, node, f"{problem}; round {server_round} refused, "
                                                "nothing spent")
    key = request_key(cfg, context, server_round, global_weights)
    replay = load_replay(ledger, node.ledger_file, key)
    if replay is not None:
        # The same request again (a resumed run redoing the round that was cut off):
        # releasing the same output twice costs no privacy; training again would.
        weights, metrics = replay
        return _reply(msg, metrics, ledger.history, arrays=keys.to_array_record(weights))

    attack = cfg.attack.mode_for(node.partition_id)  # only with simulated-attacks
    attack_before_training(attack, cfg)
    data = _data(cfg, node)
    try:
        plan = plan_spend(
            ledger, num_examples=len(data), train=cfg.train, priv=cfg.privacy,
            planned_rounds=int(planned),
            client=f"client {node.partition_id}", min_noise_multiplier=node.min_noise_multiplier,
        )
    except BudgetExceeded as exc:
        save_ledger(context, ledger, node.ledger_file)  # keeps a freshly calibrated sigma
        return _refusal(msg, ledger, cfg, node, f"{exc} in round {server_round}")

    result = train_round(
        global_weights, data, plan, train=cfg.train, priv=cfg.privacy,
        runtime=cfg.runtime, seed=cfg.data.seed * 100_003 + server_round * 1009 + node.partition_id,
    )
    metrics = {
        keys.NUM_EXAMPLES: result.num_examples, keys.PARTITION_ID: node.partition_id,
        keys.REFUSED: 0,
        # The training loss is a statistic of the client's records that no DP mechanism
        # covers: a private client withholds it (NaN) rather than leak it unaccounted.
        keys.TRAIN_LOSS: result.train_loss if not plan.noise_multiplier else math.nan,
        keys.EPSILON: plan.epsilon_after, keys.NOISE_MULTIPLIER: plan.noise_multiplier,
        keys.SAMPLE_RATE: plan.sample_rate, keys.STEPS: result.steps,
    }
    weights, metrics = apply_attack(attack, cfg, global_weights, result.weights, metrics)
    ledger.spend(plan.entry)
    # Only after the round trained; the reply is kept beside the ledger so that the same
    # request, asked again after a restart, gets the same answer at no extra cost.
    save_replay(ledger, node.ledger_file, key, weights, metrics)
    save_ledger(context, ledger, node.ledger_file)
    return _reply(msg, metrics, ledger.history, arrays=keys.to_array_record(weights))
