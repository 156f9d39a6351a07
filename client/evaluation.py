"""Federated evaluation at the node: the global model on the records this node holds
out of training (node config eval-holdout), released as noisy sums (common/fedeval.py)
under the ledger, as every release. Refusals depend on the configs and the weights
alone, as for training; nothing is read before them.
"""

from __future__ import annotations

import math
import secrets

import numpy as np
from flwr.app import Context, Message

from client import requests, selection, wire
from client.ledger import held_ledger, save_ledger
from client.trainer import resolve_device
from common import fedeval, keys, privacy
from common.config import ExperimentConfig
from common.models import build_model, per_record_results, set_weights
from common.node import NodeConfig


def evaluate_stage(msg: Message, context: Context, cfg: ExperimentConfig, node: NodeConfig
                   ) -> Message:
    request = wire.decode_request(msg)
    priv, ev = cfg.privacy, cfg.evaluation
    with held_ledger(context, node, request.known_history) as ledger:
        problem = requests.request_problem(cfg, node, request) or node.evaluation_problem(ev)
        if problem:
            return requests.refusal(msg, ledger, cfg, node, f"{problem}; evaluation of round "
                                    f"{request.server_round} refused, nothing spent")
        planned = ev.planned(cfg.federation.num_rounds, cfg.federation.num_partitions)
        z = fedeval.noise_multiplier(priv, ev, planned)
        entry = fedeval.entry(z)
        delta = priv.target_delta  # the node's policy refused a larger one
        before = ledger.epsilon(delta, priv.accountant)
        after = privacy.epsilon([*ledger.history, entry], delta, priv.accountant)
        if after > priv.budget:
            return requests.refusal(
                msg, ledger, cfg, node, f"client {node.partition_id} would reach epsilon="
                f"{after:.3f} > budget {priv.budget} (spent {before:.3f}) by evaluating; "
                f"evaluation of round {request.server_round} refused")
        data = selection.eval_records_for(cfg, node)
        model = build_model(cfg.train.model, shape=data.shape, classes=data.num_classes)
        set_weights(model, request.weights)
        correct, losses = per_record_results(model, data.images, data.labels,
                                             device=str(resolve_device(cfg.runtime.device)))
        sums = fedeval.release(correct, losses, z=z, loss_bound=ev.eval_loss_bound,
                               rng=np.random.default_rng(secrets.randbits(128)))
        ledger.spend(entry)  # saved before the sums leave
        save_ledger(context, ledger, node.ledger_file)
    metrics = {
        keys.NUM_EXAMPLES: 0, keys.PARTITION_ID: node.partition_id, keys.REFUSED: 0,
        keys.TRAIN_LOSS: math.nan, keys.EPSILON: after,
        keys.NOISE_MULTIPLIER: ledger.noise_multiplier or 0.0,  # its training's, as in a refusal
        keys.SAMPLE_RATE: 1.0, keys.STEPS: 1,
        keys.EVAL_CORRECT: sums.correct, keys.EVAL_LOSS: sums.loss,
        keys.EVAL_EXAMPLES: sums.examples, keys.EVAL_CORRECT_STD: sums.correct_std,
        keys.EVAL_LOSS_STD: sums.loss_std,
    }
    return wire.reply(msg, metrics, ledger.history)
