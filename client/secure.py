"""The client's side of a secure-aggregation round (SecAgg+ with an integer release).

Four messages from the server, each answered from this node's own state between them
(`Context.state`; its secrets never leave the node):
1. keys: fresh key pairs for this round -> its two public keys;
2. shares: the cohort's public keys -> Shamir shares of its secrets, encrypted per peer;
3. masked: the global model and the shares sent to it -> its integer release (one
   full-batch DP-SGD step, clipped per record, rounded, plus its Skellam noise share),
   planned and recorded in the ledger before it is masked and sent;
4. unmask: who survived and who dropped -> the shares that remove the masks of the sum,
   never both of one client's secrets, never with fewer survivors than the threshold.
Refusals (policy, budget, model) are decided before any data is read, as in train.
"""

from __future__ import annotations

import json
import math

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client import requests, selection, wire
from client.budget import plan_release
from client.ledger import held_ledger, save_ledger
from client.trainer import integer_gradient_sum, resolve_device
from common import ddp, keys
from common.config import ExperimentConfig
from common.errors import BudgetExceeded
from common.models import parameter_names
from common.node import NodeConfig
from common.secagg import Participant, ProtocolError, PublicKeys

STATE_KEY = "dpfl-secagg"
MAX_SCALE = 2.0**62


def wire_dtype(bits: int) -> type:
    """The narrowest unsigned integer type that holds values modulo 2^bits."""
    return next(t for t, b in ((np.uint8, 8), (np.uint16, 16), (np.uint32, 32), (np.uint64, 64))
                if bits <= b)


def _round_of(msg: Message) -> int:
    """The round a stage is for; a number no stage can use is refused at every stage,
    before anything is spent."""
    server_round = int(keys.number(msg.content[keys.CONFIG][keys.SERVER_ROUND], keys.SERVER_ROUND))
    problem = wire.round_problem(server_round)
    if problem:
        raise ProtocolError(problem)
    return server_round


def _save(context: Context, participant: Participant) -> None:
    context.state.config_records[STATE_KEY] = ConfigRecord({"json": participant.to_state()})


def _load(context: Context, server_round: int) -> Participant:
    record = context.state.config_records.get(STATE_KEY)
    if record is None:
        raise ProtocolError(f"round {server_round}: this node holds no keys (keys stage missed)")
    participant = Participant.from_state(str(record["json"]))
    if participant.server_round != server_round:
        raise ProtocolError(f"round {server_round}: this node's keys are for round "
                            f"{participant.server_round}")
    return participant


def _reply(msg: Message, **config: str) -> Message:
    return Message(content=RecordDict({keys.CONFIG: ConfigRecord(dict(config))}), reply_to=msg)


def keys_stage(msg: Message, context: Context, cfg: ExperimentConfig, node: NodeConfig
               ) -> Message:
    _require(cfg)
    participant = Participant(cid=node.partition_id, server_round=_round_of(msg),
                              bits=cfg.secure.secagg_bits)
    _save(context, participant)
    pk = participant.advertise()
    return _reply(msg, **{keys.PUBLIC_KEYS: json.dumps([pk.c.hex(), pk.s.hex()])})


def shares_stage(msg: Message, context: Context, cfg: ExperimentConfig, node: NodeConfig
                 ) -> Message:
    _require(cfg)
    participant = _load(context, _round_of(msg))
    raw = json.loads(str(msg.content[keys.CONFIG][keys.PUBLIC_KEYS]))
    peers = {int(p): PublicKeys(bytes.fromhex(c), bytes.fromhex(s)) for p, (c, s) in raw.items()}
    # The threshold is the client's own, from the run config and the cohort's size.
    boxes = participant.share(peers, cfg.secure.threshold(len(peers)))
    _save(context, participant)
    return _reply(msg, **{keys.SHARES: json.dumps({str(j): ct.decode() for j, ct in boxes.items()})})


def masked_stage(msg: Message, context: Context, cfg: ExperimentConfig, node: NodeConfig
                 ) -> Message:
    """Train and release, refusing and reading data as the plain train handler does."""
    _require(cfg)
    request = wire.decode_request(msg)
    config = msg.content[keys.CONFIG]
    _round_of(msg)
    # One spender at a time: the node's ledger is held from here to the synced save.
    with held_ledger(context, node, request.known_history) as ledger:
        problem = requests.request_problem(cfg, node, request)
        scale = keys.number(config[keys.SCALE], keys.SCALE)
        if not problem and not (0 < scale <= MAX_SCALE):
            problem = f"scale={scale!r} must be in (0, {MAX_SCALE:g}]"
        if problem:
            return requests.refusal(msg, ledger, cfg, node, f"{problem}; round "
                                    f"{request.server_round} refused, nothing spent")
        participant = _load(context, request.server_round)
        shares = json.loads(str(config[keys.SHARES]))
        participant.receive({int(i): ct.encode() for i, ct in shares.items()})
        participant.check_ready()  # before any data is read or budget spent
        data = selection.records_for(cfg, node)
        names = parameter_names(cfg.train.model, data.shape, data.num_classes)
        encoding = ddp.Encoding(clip=cfg.privacy.max_grad_norm, scale=scale,
                                dim=sum(request.weights[n].size for n in names))
        try:
            plan = plan_release(
                ledger, encoding=encoding, priv=cfg.privacy,
                planned_rounds=int(request.planned_rounds), threshold=participant.threshold,
                distributed=cfg.secure.noise == "distributed", client=f"client {node.partition_id}",
                num_examples=len(data), min_noise_multiplier=node.min_noise_multiplier,
                min_share_noise_multiplier=node.min_share_noise_multiplier)
        except BudgetExceeded as exc:
            save_ledger(context, ledger, node.ledger_file)
            return requests.refusal(msg, ledger, cfg, node, f"{exc} in round {request.server_round}")
        release = integer_gradient_sum(request.weights, data, model_name=cfg.train.model,
                                       encoding=encoding, mu_share=plan.mu_share,
                                       device=str(resolve_device(cfg.runtime.device)))
        # Everything that could fail is done before the spend (nothing is spent for what
        # cannot be released), and the spend is saved before anything leaves: once masked
        # and sent, t reveals expose the sum.
        masked: np.ndarray = participant.masked(release).astype(wire_dtype(participant.bits))
        ledger.spend(plan.entry)
        save_ledger(context, ledger, node.ledger_file)
    _save(context, participant)
    metrics = {
        keys.NUM_EXAMPLES: len(data), keys.PARTITION_ID: node.partition_id, keys.REFUSED: 0,
        keys.TRAIN_LOSS: math.nan, keys.EPSILON: plan.epsilon_after,
        keys.NOISE_MULTIPLIER: plan.noise_multiplier, keys.SAMPLE_RATE: 1.0, keys.STEPS: 1,
    }
    out = wire.reply(msg, metrics, ledger.history)
    out.content.array_records[keys.MASKED] = ArrayRecord({keys.MASKED: Array(masked)})
    return out


def unmask_stage(msg: Message, context: Context, cfg: ExperimentConfig, node: NodeConfig
                 ) -> Message:
    _require(cfg)
    config = msg.content[keys.CONFIG]
    participant = _load(context, _round_of(msg))
    survivors = [int(i) for i in json.loads(str(config[keys.SURVIVORS]))]
    dropped = [int(i) for i in json.loads(str(config[keys.DROPPED]))]
    revealed = participant.reveal(survivors, dropped)  # marks the round revealed
    _save(context, participant)
    return _reply(msg, **{keys.REVEALED: json.dumps(
        {str(j): [kind, share.hex()] for j, (kind, share) in revealed.items()})})


def _require(cfg: ExperimentConfig) -> None:
    if not cfg.secure.enabled:
        raise ProtocolError("the run config has secure-aggregation=none: this node takes no "
                            "part in a secure-aggregation round")

