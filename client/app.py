"""The dpfl ClientApp: decode, train under the ledger, encode. Logic lives in trainer.py.

Two handlers: `query` tells the server which partition this node holds and how many
records (node discovery), `train` runs one round of DP-SGD under the privacy ledger.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.attacks import apply_attack, attack_before_training
from client.ledger import adopt_known, load_ledger, load_replay, save_ledger, save_replay
from client.trainer import BudgetExceeded, plan_spend, train_round
from common import keys
from common.config import ExperimentConfig, parse_config
from common.data import Split, cached_partitions, load_partition, load_split
from common.models import MODEL_FEATURES

app = ClientApp()


@lru_cache(maxsize=4)
def _config(items: tuple) -> ExperimentConfig:
    return parse_config(dict(items))


@dataclass(frozen=True)
class Node:
    """This node's identity and files, from its node config (and the run config)."""

    partition_id: int
    num_partitions: int
    own_data_dir: str  # node config `data-dir`: the node's own records, used whole
    ledger_file: Path | None


def _node(cfg: ExperimentConfig, context: Context) -> Node:
    nc = context.node_config
    pid = int(keys.number(nc[keys.NODE_PARTITION_ID], keys.NODE_PARTITION_ID))
    num = int(keys.number(nc[keys.NODE_NUM_PARTITIONS], keys.NODE_NUM_PARTITIONS))
    if not 0 <= pid < num:
        raise ValueError(f"node config partition-id={pid} must be in [0, {num - 1}] "
                         f"(num-partitions={num})")
    ledger_path = nc.get(keys.NODE_LEDGER_PATH)
    if not ledger_path and cfg.privacy.ledger_dir:
        ledger_path = str(Path(cfg.privacy.ledger_dir).expanduser() / f"partition-{pid}.json")
    return Node(pid, num, str(nc.get(keys.NODE_DATA_DIR, "")),
                Path(str(ledger_path)).expanduser() if ledger_path else None)


def _data(cfg: ExperimentConfig, node: Node) -> Split:
    features = MODEL_FEATURES.get(cfg.train.model, "")
    if node.own_data_dir:
        split = load_split("train", node.own_data_dir, features)
        return Split(np.asarray(split.images, dtype=np.float32), split.labels)
    return load_partition(
        node.partition_id, node.num_partitions, partitioner=cfg.data.partitioner,
        seed=cfg.data.seed, alpha=cfg.data.dirichlet_alpha,
        labels_per_client=cfg.data.labels_per_client, data_dir=cfg.data.data_dir, features=features,
    )


def _num_examples(cfg: ExperimentConfig, node: Node) -> int:
    if node.own_data_dir:
        return len(load_split("train", node.own_data_dir).labels)
    d = cfg.data
    return len(cached_partitions(d.data_dir, d.partitioner, node.num_partitions, d.seed,
                                 float(d.dirichlet_alpha), d.labels_per_client)[node.partition_id])


@app.query()
def query(msg: Message, context: Context) -> Message:
    cfg = _config(tuple(sorted(context.run_config.items())))
    node = _node(cfg, context)
    return Message(content=RecordDict({keys.METRICS: MetricRecord({
        keys.PARTITION_ID: node.partition_id, keys.NUM_EXAMPLES: _num_examples(cfg, node),
        keys.OWN_DATA: int(bool(node.own_data_dir)),
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


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = _config(tuple(sorted(context.run_config.items())))
    node = _node(cfg, context)
    pid = node.partition_id
    server_cfg = msg.content[keys.CONFIG]
    server_round = int(keys.number(server_cfg[keys.SERVER_ROUND], keys.SERVER_ROUND))
    attack = cfg.attack.mode_for(pid)
    attack_before_training(attack, cfg)
    global_weights = keys.from_array_record(msg.content.array_records[keys.ARRAYS])

    ledger = adopt_known(
        load_ledger(context, node.ledger_file),
        str(server_cfg[keys.KNOWN_HISTORY]) if keys.KNOWN_HISTORY in server_cfg else None,
        keys.number(server_cfg[keys.KNOWN_SIGMA], keys.KNOWN_SIGMA) if keys.KNOWN_SIGMA in server_cfg else None,
    )
    priv = cfg.privacy
    key = request_key(cfg, context, server_round, global_weights)
    replay = load_replay(ledger, node.ledger_file, key)
    if replay is not None:
        # The same request again (a resumed run redoing the round that was cut off):
        # releasing the same output twice costs no privacy; training again would.
        weights, metrics = replay
        return _reply(msg, metrics, ledger.history, arrays=keys.to_array_record(weights))

    data = _data(cfg, node)
    metrics = {keys.NUM_EXAMPLES: 0, keys.TRAIN_LOSS: math.nan, keys.PARTITION_ID: pid,
               keys.REFUSED: 0, keys.TRAIN_SECONDS: 0.0}
    try:
        plan = plan_spend(
            ledger, num_examples=len(data), train=cfg.train, priv=priv,
            planned_rounds=int(keys.number(server_cfg[keys.PLANNED_ROUNDS], keys.PLANNED_ROUNDS)),
            client=f"client {pid}",
        )
    except BudgetExceeded as exc:
        metrics.update({keys.REFUSED: 1, keys.EPSILON: ledger.epsilon(priv.target_delta, priv.accountant),
                        keys.NOISE_MULTIPLIER: ledger.noise_multiplier or 0.0,
                        keys.SAMPLE_RATE: 0.0, keys.STEPS: 0})
        save_ledger(context, ledger, node.ledger_file)  # keeps a freshly calibrated sigma
        return _reply(msg, metrics, ledger.history, reason=f"{exc} in round {server_round}")

    t0 = time.perf_counter()
    result = train_round(
        global_weights, data, plan, train=cfg.train, priv=priv,
        runtime=cfg.runtime, seed=cfg.data.seed * 100_003 + server_round * 1009 + pid,
    )
    metrics.update({
        keys.NUM_EXAMPLES: result.num_examples,
        # The training loss is a statistic of the client's records that no DP mechanism
        # covers: a private client withholds it (NaN) rather than leak it unaccounted.
        keys.TRAIN_LOSS: result.train_loss if not plan.noise_multiplier else math.nan,
        keys.EPSILON: plan.epsilon_after, keys.NOISE_MULTIPLIER: plan.noise_multiplier,
        keys.SAMPLE_RATE: plan.sample_rate, keys.STEPS: result.steps,
        keys.TRAIN_SECONDS: time.perf_counter() - t0,
    })
    weights, metrics = apply_attack(attack, cfg, global_weights, result.weights, metrics)
    ledger.spend(plan.entry)
    # Only after the round trained; the reply is kept beside the ledger so that the same
    # request, asked again after a restart, gets the same answer at no extra cost.
    save_replay(ledger, node.ledger_file, key, weights, metrics)
    save_ledger(context, ledger, node.ledger_file)
    return _reply(msg, metrics, ledger.history, arrays=keys.to_array_record(weights))

