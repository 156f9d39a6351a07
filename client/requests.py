"""What a training request may ask of this node, decided before any record is read: the
checks that refuse it (from the run config, the node config and the weights alone, all
known to the server), the refusal that spends nothing, and the key that recognises the
same request asked again.
"""

from __future__ import annotations

import hashlib
import json
import math
from functools import lru_cache

import numpy as np
from flwr.app import Context, Message

from client import wire
from client.ledger import Ledger
from client.selection import own_data_problem, template
from common import keys
from common.aggregation import model_problem
from common.config import ExperimentConfig
from common.node import NodeConfig
from common.records import run_label


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
