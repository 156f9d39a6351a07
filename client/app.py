"""The dpfl ClientApp: decode, train under the ledger, encode. Logic lives in trainer.py.

Handlers: `query` tells the server which partition this node holds and how many
records (node discovery), `train` runs one round of DP-SGD under the privacy ledger, as
named steps: decode the request, load the ledger, refuse what the node's policy or the
weights rule out (before touching data), answer a replayed request from the kept
reply, plan the spend under the budget, train, release, commit the ledger. With
secure-aggregation=secagg+ a round is four `train.secagg_*` messages (client/secure.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client import secure, wire
from client.attacks import apply_attack, attack_before_training
from client.ledger import Ledger, held_ledger, load_replay, save_ledger, save_replay
from client.trainer import BudgetExceeded, RoundResult, plan_spend, train_round
from common import audit, keys, privacy
from common.aggregation import model_problem
from common.catalogue import DEFAULT_DATASET, class_list
from common.config import DataConfig, ExperimentConfig, parse_config
from common.data import (
    cached_split,
    input_spec,
    load_split,
    own_partition_of,
    partition_of,
    partitions_of,
    source_fingerprint,
)
from common.errors import DataError
from common.models import MODEL_FEATURES, build_model, get_weights
from common.node import NODE_CONFIG_ENV, NodeConfig, parse_node_config
from common.records import run_label
from common.split import Split
from common.tables import own_spec, own_split

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


@lru_cache(maxsize=8)
def _template(model: str, shape: tuple[int, ...], classes: int) -> dict[str, np.ndarray]:
    return dict(get_weights(build_model(model, seed=0, shape=shape, classes=classes)))


def template(cfg: ExperimentConfig, node: NodeConfig) -> dict[str, np.ndarray]:
    """The global model's names, shapes and dtypes for this run's model and dataset (a
    node with its own records in a table or image format: their shape, the run's
    classes)."""
    features = MODEL_FEATURES.get(cfg.train.model, "")
    if node.dataset:
        return _template(cfg.train.model, *_own(node, lambda: own_spec(
            node.dataset, node.label_column, node.classes, features)))
    return _template(cfg.train.model, *input_spec(cfg.data, features))


def own_data_problem(cfg: ExperimentConfig, node: NodeConfig) -> str | None:
    """Why this node's own records (node config dataset) cannot serve this run, from the
    two configs alone, before any file is read. The data holder owns the schema (source,
    label column, classes): a run can only agree with it, never probe the records with
    other class lists or columns."""
    if not node.dataset:
        return None
    if list(class_list(cfg.data.classes)) != list(class_list(node.classes)):
        return (f"the run's classes ({cfg.data.classes!r}) are not this node's (node config "
                "classes): the federation's class list must be the same everywhere")
    if cfg.data.standardize:
        return ("this node uses its own records as given; the run standardises its data "
                "with statistics of the server's copy (standardize=true): set standardize=false "
                "and give every party's features on one public scale")
    return None


def _own(node: NodeConfig, read: Callable[[], Any]) -> Any:
    """`read()` of the node's own records. What is wrong with them goes to the node's own
    log, not to the server: the reply says only that they cannot be read."""
    try:
        return read()
    except DataError as exc:
        print(f"dpfl node: its own records (node config dataset) cannot be used: {exc}",
              file=sys.stderr, flush=True)
        raise DataError("this node's own records (node config dataset) cannot be used for "
                        "this run; the reason is in the node's log") from None


def _data(cfg: ExperimentConfig, node: NodeConfig) -> Split:
    return with_canaries(cfg, node, _records(cfg, node))


def _records(cfg: ExperimentConfig, node: NodeConfig) -> Split:
    """This node's training records as the model takes them, from the node's cache when
    an earlier message computed them (every message of a deployed node is a new
    process, which would otherwise decompress, partition and transform its data again);
    a simulation's actors keep them in memory as well."""
    features = MODEL_FEATURES.get(cfg.train.model, "")
    key: dict[str, Any]
    if node.dataset:
        problem = own_data_problem(cfg, node)
        if problem:
            raise DataError(problem)
        key = {"own": node.dataset, "label_column": node.label_column, "classes": node.classes}
        fingerprint = _own(node, lambda: source_fingerprint(node.dataset))
    elif node.data_dir:
        if cfg.data.dataset != "fashion-mnist":
            raise DataError(f"this node's data-dir holds Fashion-MNIST IDX files; the run "
                            f"trains dataset={cfg.data.dataset!r}")
        key = {"data_dir": node.data_dir}
        fingerprint = source_fingerprint("fashion-mnist", node.data_dir)
    else:
        if not node.cache_records:  # a simulation's: every partition is in memory
            return _load_records(cfg, node, features)
        key = {"data": dataclasses.asdict(cfg.data), "partition": node.partition_id,
               "num_partitions": node.num_partitions}
        fingerprint = source_fingerprint(cfg.data.dataset, cfg.data.data_dir)
    if fingerprint is None or not node.cache_records:  # a Hub name: no files to key by
        return _load_records(cfg, node, features)
    return cached_split({"v": 1, **key, "features": features, "source": fingerprint},
                        lambda: _load_records(cfg, node, features))


def _load_records(cfg: ExperimentConfig, node: NodeConfig, features: str) -> Split:
    if node.dataset:
        split = _own(node, lambda: own_split(node.dataset, node.label_column, node.classes,
                                             features))
    elif node.data_dir:
        split = load_split(_node_folder(cfg, node), "train", features)
    elif node.cache_records:
        # A deployed node: features of its own records only (a simulation's actors share
        # one copy of the whole training set's, computed once).
        return own_partition_of(cfg.data, node.partition_id, node.num_partitions, features)
    else:
        return partition_of(cfg.data, node.partition_id, node.num_partitions, features)
    return split.with_records(split.images, split.labels)


def with_canaries(cfg: ExperimentConfig, node: NodeConfig, split: Split) -> Split:
    """A privacy audit's run (audit-canaries > 0): the partition's canary slots appended,
    each holding its canary or a null record (common/audit.py)."""
    if not cfg.audit.audit_canaries:
        return split
    canaries = audit.Canaries(cfg.audit.audit_canaries, cfg.federation.num_partitions,
                              split.shape, cfg.data.seed, split.num_classes)
    x, y = canaries.slots(node.partition_id)
    return split.with_records(np.concatenate([split.images, x]), np.concatenate([split.labels, y]))


def _node_folder(cfg: ExperimentConfig, node: NodeConfig) -> DataConfig:
    """The run's data config for the Fashion-MNIST files in the node's own data-dir."""
    return dataclasses.replace(cfg.data, dataset=DEFAULT_DATASET, data_dir=node.data_dir)


def _num_examples(cfg: ExperimentConfig, node: NodeConfig) -> int:
    problem = node.named_source_problem(cfg.data, cfg.train.model)
    if problem:  # before any file is opened
        raise DataError(problem)
    slots = audit.slot_count(cfg.audit.audit_canaries, cfg.federation.num_partitions,
                             node.partition_id)
    # Only the count: discovery must answer in seconds, and a deployed node's first
    # features (minutes for tens of thousands of images) wait for its first round.
    if node.dataset:
        problem = own_data_problem(cfg, node)
        if problem:
            raise DataError(problem)
        return len(_own(node, lambda: own_split(node.dataset, node.label_column,
                                                node.classes))) + slots
    if node.data_dir:
        return len(load_split(_node_folder(cfg, node), "train").labels) + slots
    return len(partitions_of(cfg.data, node.num_partitions)[node.partition_id]) + slots


@app.query()
def query(msg: Message, context: Context) -> Message:
    cfg, node = _config(context), _node(context)
    return wire.query_reply(msg, partition_id=node.partition_id,
                            num_examples=_num_examples(cfg, node), own_data=node.own_data)


def request_key(cfg: ExperimentConfig, context: Context, request: wire.TrainRequest) -> str:
    """Identifies one training request: the run (its config, but not `resume`), the round
    and the exact global model. A resumed run asks the same again for the round that
    was cut off."""
    h = hashlib.sha256()
    run = run_label(cfg.runtime.run_name, context.run_id)
    h.update(_run_text(run, tuple(sorted(context.run_config.items()))))
    h.update(json.dumps(request.server_round).encode())
    for name, arr in request.weights.items():
        h.update(name.encode())
        h.update(str(arr.dtype).encode() + str(arr.shape).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


@lru_cache(maxsize=4)
def _run_text(run: str, items: tuple) -> bytes:
    """The run's part of a request key: its label and config (but not `resume`)."""
    return json.dumps([run, {k: v for k, v in items if k != "resume"}], default=str).encode()


MAX_PLANNED_ROUNDS = 1_000_000


def request_problem(cfg: ExperimentConfig, node: NodeConfig, request: wire.TrainRequest) -> str | None:
    """Why this node refuses the request before touching any data, or None. Every reason
    depends only on the run config, the node config and the global weights, all of them
    known to the server (and, for a node with its own table or images, their record
    shape: one fact of its schema, the same for every record): a refusal reveals nothing
    about the records."""
    problem = node.named_source_problem(cfg.data, cfg.train.model) or \
        node.policy_problem(cfg.privacy) or own_data_problem(cfg, node)
    if problem:
        return problem
    problem = wire.round_problem(request.server_round)
    if problem:
        return problem
    planned = request.planned_rounds
    if not (planned.is_integer() and 1 <= planned <= MAX_PLANNED_ROUNDS):
        return f"planned-rounds={planned!r} must be an integer in [1, {MAX_PLANNED_ROUNDS}]"
    if cfg.attack.mode_for(node.partition_id) and not node.simulated_attacks:
        return (f"the run config asks this node to misbehave (attack={cfg.attack.attack!r}); "
                "only a simulation harness may enable that (node config simulated-attacks)")
    return model_problem(template(cfg, node), request.weights, max_norm=node.max_model_norm)


def refusal(msg: Message, ledger: Ledger, cfg: ExperimentConfig, node: NodeConfig,
            reason: str) -> Message:
    """A reply that trains nothing and spends nothing: the ledger as it stands."""
    delta = min(cfg.privacy.target_delta, node.max_delta)
    metrics = {keys.NUM_EXAMPLES: 0, keys.TRAIN_LOSS: math.nan, keys.PARTITION_ID: node.partition_id,
               keys.REFUSED: 1, keys.EPSILON: ledger.epsilon(delta, cfg.privacy.accountant),
               keys.NOISE_MULTIPLIER: ledger.noise_multiplier or 0.0, keys.SAMPLE_RATE: 0.0,
               keys.STEPS: 0}
    return wire.reply(msg, metrics, ledger.history, reason=reason)


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
        problem = request_problem(cfg, node, request)
        if not problem and cfg.secure.enabled:
            problem = ("the run config has secure-aggregation=secagg+: this node releases "
                       "updates only through it")
        if problem:
            return refusal(msg, ledger, cfg, node,
                           f"{problem}; round {request.server_round} refused, nothing spent")
        key = request_key(cfg, context, request)
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
    data = _data(cfg, node)
    try:
        plan = plan_spend(
            ledger, num_examples=len(data), train=cfg.client_train, priv=cfg.privacy,
            planned_rounds=int(request.planned_rounds), client=f"client {node.partition_id}",
            min_noise_multiplier=node.min_noise_multiplier,
        )
    except BudgetExceeded as exc:
        save_ledger(context, ledger, node.ledger_file)  # keeps a freshly calibrated sigma
        return refusal(msg, ledger, cfg, node, f"{exc} in round {request.server_round}")
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


# Secure aggregation (client/secure.py): four messages of a round, each its own action.
@app.train(keys.SECAGG_KEYS)
def secagg_keys(msg: Message, context: Context) -> Message:
    return secure.keys_stage(msg, context, _config(context), _node(context))


@app.train(keys.SECAGG_SHARES)
def secagg_shares(msg: Message, context: Context) -> Message:
    return secure.shares_stage(msg, context, _config(context), _node(context))


@app.train(keys.SECAGG_MASKED)
def secagg_masked(msg: Message, context: Context) -> Message:
    return secure.masked_stage(msg, context, _config(context), _node(context),
                               problem_of=request_problem, refusal=refusal, data_of=_data)


@app.train(keys.SECAGG_UNMASK)
def secagg_unmask(msg: Message, context: Context) -> Message:
    return secure.unmask_stage(msg, context, _config(context), _node(context))
