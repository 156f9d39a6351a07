"""The dpfl ClientApp: decode, train under the ledger, encode. Logic lives in trainer.py."""

from __future__ import annotations

import json
import math
import time
from functools import lru_cache
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.ledger import load_ledger, save_ledger
from client.trainer import BudgetExceeded, plan_spend, train_round
from common import keys
from common.config import ExperimentConfig, parse_config
from common.data import load_partition
from common.models import MODEL_FEATURES

app = ClientApp()


@lru_cache(maxsize=4)
def _config(items: tuple) -> ExperimentConfig:
    return parse_config(dict(items))


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


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = _config(tuple(sorted(context.run_config.items())))
    pid = int(keys.number(context.node_config[keys.NODE_PARTITION_ID], keys.NODE_PARTITION_ID))
    num_parts = int(keys.number(context.node_config[keys.NODE_NUM_PARTITIONS],
                                keys.NODE_NUM_PARTITIONS))
    data_dir = str(context.node_config.get(keys.NODE_DATA_DIR, cfg.data.data_dir))
    ledger_path = context.node_config.get(keys.NODE_LEDGER_PATH)
    if not ledger_path and cfg.privacy.ledger_dir:
        ledger_path = str(Path(cfg.privacy.ledger_dir).expanduser() / f"partition-{pid}.json")
    ledger_file = Path(str(ledger_path)) if ledger_path else None
    server_cfg = msg.content[keys.CONFIG]
    server_round = int(keys.number(server_cfg[keys.SERVER_ROUND], keys.SERVER_ROUND))

    data = load_partition(
        pid, num_parts, partitioner=cfg.data.partitioner, seed=cfg.data.seed,
        alpha=cfg.data.dirichlet_alpha, labels_per_client=cfg.data.labels_per_client,
        data_dir=data_dir, features=MODEL_FEATURES.get(cfg.train.model, ""),
    )
    ledger = load_ledger(context, ledger_file)
    priv = cfg.privacy
    metrics = {keys.NUM_EXAMPLES: 0, keys.TRAIN_LOSS: math.nan, keys.PARTITION_ID: pid, keys.REFUSED: 0,
               keys.TRAIN_SECONDS: 0.0}
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
        save_ledger(context, ledger, ledger_file)  # keeps a freshly calibrated sigma
        return _reply(msg, metrics, ledger.history, reason=f"{exc} in round {server_round}")

    t0 = time.perf_counter()
    result = train_round(
        keys.from_array_record(msg.content.array_records[keys.ARRAYS]), data, plan, train=cfg.train, priv=priv,
        runtime=cfg.runtime, seed=cfg.data.seed * 100_003 + server_round * 1009 + pid,
    )
    ledger.spend(plan.entry)
    save_ledger(context, ledger, ledger_file)  # only after the round trained
    metrics.update({
        keys.NUM_EXAMPLES: result.num_examples,
        # The training loss is a statistic of the client's records that no DP mechanism
        # covers: a private client withholds it (NaN) rather than leak it unaccounted.
        keys.TRAIN_LOSS: result.train_loss if not plan.noise_multiplier else math.nan,
        keys.EPSILON: plan.epsilon_after, keys.NOISE_MULTIPLIER: plan.noise_multiplier,
        keys.SAMPLE_RATE: plan.sample_rate, keys.STEPS: result.steps,
        keys.TRAIN_SECONDS: time.perf_counter() - t0,
    })
    return _reply(msg, metrics, ledger.history, arrays=keys.to_array_record(result.weights))
