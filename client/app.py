"""The dpfl ClientApp: decode, train under the ledger, encode. Each job has its module:
which records (client/selection.py), what a request may ask (client/requests.py), what it
may spend (client/budget.py), how it trains (client/trainer.py), the ledger
(client/ledger.py), the secure stages (client/secure.py).

Handlers: `query` tells the server which partition this node holds and how many
records (node discovery), `train` runs one round of DP-SGD under the privacy ledger, as
named steps: decode the request, load the ledger, refuse what the node's policy or the
weights rule out (before touching data), answer a replayed request from the kept
reply, plan the spend under the budget, train, release, commit the ledger. With
secure-aggregation=secagg+ a round is five `train.secagg_*` messages (client/secure.py).
"""

from __future__ import annotations

import math
import os
from functools import lru_cache

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client import evaluation, requests, secure, selection, wire
from client.attacks import apply_attack, attack_before_training
from client.budget import plan_spend
from client.ledger import Ledger, held_ledger, load_replay, save_ledger, save_replay
from client.trainer import RoundResult, train_round
from common import fedeval, keys, privacy
from common.config import ExperimentConfig, parse_config
from common.errors import BudgetExceeded
from common.node import NODE_CONFIG_ENV, NodeConfig, parse_node_config

app = ClientApp()


@lru_cache(maxsize=4)
def _parse(items: tuple) -> ExperimentConfig:
    return parse_config(dict(items))


def _config(context: Context) -> ExperimentConfig:
    """The run's config, parsed once per run in this process."""
    return _parse(tuple(sorted(context.run_config.items())))


def _node(context: Context) -> NodeConfig:
    """This node's identity, files and privacy policy: Flower's node config over what the
    harness put in NODE_CONFIG_ENV (both the node operator's, never the server's)."""
    return parse_node_config(context.node_config, os.environ.get(NODE_CONFIG_ENV, ""))


@app.query()
def query(msg: Message, context: Context) -> Message:
    cfg, node = _config(context), _node(context)
    return wire.query_reply(msg, partition_id=node.partition_id,
                            num_examples=selection.num_examples(cfg, node), own_data=node.own_data)


def released_metrics(node: NodeConfig, plan: privacy.RoundPlan, result: RoundResult) -> dict:
    """What the client tells the server besides its model. The training loss is a
    statistic of the records that no DP mechanism covers: a private client withholds it
    (NaN) rather than leak it unaccounted."""
    return {
        keys.NUM_EXAMPLES: result.num_examples, keys.PARTITION_ID: node.partition_id,
        keys.REFUSED: 0,
        keys.TRAIN_LOSS: result.train_loss if not plan.noise_multiplier else math.nan,
        keys.EPSILON: plan.epsilon_after, keys.NOISE_MULTIPLIER: plan.noise_multiplier,
        keys.SAMPLE_RATE: plan.sample_rate, keys.STEPS: result.steps,
    }


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, node = _config(context), _node(context)
    request = wire.decode_request(msg)
    # One spender at a time: the node's ledger is held from here to the synced save.
    with held_ledger(context, node, request.known_history) as ledger:
        problem = requests.request_problem(cfg, node, request)
        if not problem and cfg.secure.enabled:
            problem = ("the run config has secure-aggregation=secagg+: this node releases "
                       "updates only through it")
        if problem:
            return requests.refusal(msg, ledger, cfg, node,
                                    f"{problem}; round {request.server_round} refused, "
                                    "nothing spent")
        key = requests.request_key(cfg, context, request)
        replay = load_replay(ledger, node.ledger_file, key)
        if replay is not None:
            # The same request again (a resumed run redoing the round that was cut off):
            # releasing the same output twice costs no privacy; training again would.
            weights, metrics = replay
            return wire.reply(msg, metrics, ledger.history, weights=weights)
        return train_and_reply(msg, context, cfg, node, request, ledger, key)


def train_and_reply(msg: Message, context: Context, cfg: ExperimentConfig, node: NodeConfig,
                    request: wire.TrainRequest, ledger: Ledger, key: str) -> Message:
    attack = cfg.attack.mode_for(node.partition_id)  # only with simulated-attacks
    attack_before_training(attack, cfg)
    data = selection.records_for(cfg, node)
    try:
        plan = plan_spend(
            ledger, num_examples=len(data), train=cfg.client_train, priv=cfg.privacy,
            planned_rounds=int(request.planned_rounds), client=f"client {node.partition_id}",
            min_noise_multiplier=node.min_noise_multiplier,
            also_planned=fedeval.planned_entries(cfg.privacy, cfg.evaluation, cfg.evaluation.planned(
                cfg.federation.num_rounds, cfg.federation.num_partitions)),
        )
    except BudgetExceeded as exc:
        save_ledger(context, ledger, node.ledger_file)  # keeps a freshly calibrated sigma
        return requests.refusal(msg, ledger, cfg, node, f"{exc} in round {request.server_round}")
    seed = cfg.data.seed * 100_003 + request.server_round * 1009 + node.partition_id
    result = train_round(request.weights, data, plan, train=cfg.client_train, priv=cfg.privacy,
                         runtime=cfg.runtime, seed=seed)
    weights, metrics = apply_attack(attack, cfg, request.weights, result.weights,
                                    released_metrics(node, plan, result))
    ledger.spend(plan.entry)
    # Only after the round trained; the reply is kept beside the ledger so that the same
    # request, asked again after a restart, gets the same answer at no extra cost.
    save_replay(ledger, node.ledger_file, key, weights, metrics)
    save_ledger(context, ledger, node.ledger_file)
    return wire.reply(msg, metrics, ledger.history, weights=weights)


# Secure aggregation (client/secure.py): five messages of a round, each its own action.
@app.train(keys.SECAGG_KEYS)
def secagg_keys(msg: Message, context: Context) -> Message:
    return secure.keys_stage(msg, context, _config(context), _node(context))


@app.train(keys.SECAGG_SHARES)
def secagg_shares(msg: Message, context: Context) -> Message:
    return secure.shares_stage(msg, context, _config(context), _node(context))


@app.train(keys.SECAGG_MASKED)
def secagg_masked(msg: Message, context: Context) -> Message:
    return secure.masked_stage(msg, context, _config(context), _node(context))


@app.train(keys.SECAGG_CONFIRM)
def secagg_confirm(msg: Message, context: Context) -> Message:
    return secure.confirm_stage(msg, context, _config(context), _node(context))


@app.train(keys.SECAGG_UNMASK)
def secagg_unmask(msg: Message, context: Context) -> Message:
    return secure.unmask_stage(msg, context, _config(context), _node(context))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation: noisy sums over the node's held-out records, in its ledger
    (client/evaluation.py)."""
    return evaluation.evaluate_stage(msg, context, _config(context), _node(context))
