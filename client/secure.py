"""The client's side of a secure-aggregation round (SecAgg+ with an integer release),
against a server that may tell every client a story of its own.

Five messages from the server, each answered from this node's own state between them
(`Context.state`; its secrets never leave the node):
1. keys: fresh key pairs for this round -> its two public keys and record count, signed
   with its identity key (node config identity-key);
2. shares: the view (every member's signed keys, the round's parameters) -> checked
   against the node's roster and policy (members, signatures, cohort size, threshold,
   field, scale, clip, the agreed noise), then Shamir shares of its secrets, encrypted
   per member and bound to the view's digest;
3. masked: the global model and the shares sent to it (each under the same view) -> its
   integer release (one full-batch DP-SGD step, clipped per record, rotated by the
   view's rotation, scaled, rounded, plus its own Skellam noise share), planned against
   the agreed noise and recorded in the ledger before it is masked, bit-packed (bits
   per coordinate) and sent;
4. confirm: the survivor set -> its signature of (view, survivors), once a round;
5. unmask: the survivors' signatures -> the shares that remove the masks of the sum,
   only when at least the threshold of survivors signed the same view and survivors.
Refusals (policy, budget, model) are decided before any data is read, as in train.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client import requests, selection, wire
from client.budget import plan_release
from client.ledger import held_ledger, save_ledger
from client.trainer import integer_gradient_sum, resolve_device
from common import ddp, keys, roster
from common.config import ExperimentConfig
from common.errors import BudgetExceeded, ConfigError
from common.models import parameter_names
from common.node import NodeConfig
from common.secagg import Advert, Participant, ProtocolError, View, survivors_body

STATE_KEY = "dpfl-secagg"
VIEW_KEY = "dpfl-secagg-view"


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


@lru_cache(maxsize=16)
def _load_identity(path: str, mtime: float) -> roster.PrivateKey:
    return roster.load_identity(path)


@lru_cache(maxsize=16)
def _load_roster(path: str, mtime: float, issuer: str) -> roster.Roster:
    return roster.Roster.load(path, issuer)


def _mtime(path: Path, key: str) -> float:
    try:
        return path.stat().st_mtime
    except OSError as exc:
        raise ConfigError(f"node config {key}: cannot read {path} ({exc.strerror})") from exc


def identity(node: NodeConfig) -> roster.PrivateKey:
    """This node's identity key (node config identity-key, or identity-dir in simulation)."""
    path = node.identity_file
    if path is None:
        raise ConfigError("secure aggregation needs this node's identity key: node config "
                          "identity-key (a deployed node's authentication key) is not set")
    return _load_identity(str(path), _mtime(path, "identity-key"))


def members(node: NodeConfig) -> roster.Roster:
    """The federation's roster as this node's operator gave it (node config roster)."""
    if not node.roster:
        raise ConfigError("secure aggregation needs the federation's roster: node config "
                          "roster (members' identity public keys) is not set")
    path = Path(node.roster).expanduser()
    return _load_roster(str(path), _mtime(path, "roster"), node.roster_issuer)


def keys_stage(msg: Message, context: Context, cfg: ExperimentConfig, node: NodeConfig
               ) -> Message:
    _require(cfg)
    key, trusted = identity(node), members(node)
    own = trusted.key_of(node.partition_id)
    if own is None or roster.openssh(own) != roster.openssh(key.public_key()):
        raise ConfigError(f"node config roster does not list this node's identity key as "
                          f"partition {node.partition_id}")
    server_round = _round_of(msg)
    participant = Participant(cid=node.partition_id, server_round=server_round,
                              bits=cfg.secure.secagg_bits)
    _save(context, participant)
    advert = Advert(node.partition_id, participant.advertise(),
                    selection.num_examples(cfg, node))
    signed = replace(advert, signature=roster.sign(key, "round-keys", advert.body(server_round)))
    return _reply(msg, **{keys.PUBLIC_KEYS: json.dumps(signed.to_json())})


def view_problem(view: View, cfg: ExperimentConfig, node: NodeConfig, trusted: roster.Roster,
                 server_round: int) -> str | None:
    """Why this node will not share its secrets under `view`, or None. Everything its
    guarantee depends on is in the view, and every member signed its own keys."""
    p, k = view.params, len(view.adverts)
    for a in view.adverts:
        if trusted.key_of(a.partition) is None:
            return f"member {a.partition} is not on this node's roster"
        if not trusted.verify(a.partition, "round-keys", a.body(server_round), a.signature):
            return f"member {a.partition}'s round keys are not signed by its identity key"
    if p.server_round != server_round:
        return f"the view is for round {p.server_round}, the request for {server_round}"
    if k < max(node.min_secagg_cohort, 2):
        return f"a cohort of {k}, smaller than node min-secagg-cohort={node.min_secagg_cohort}"
    least = max(k // 2 + 1, cfg.secure.threshold(k),
                math.ceil(node.min_secagg_threshold * k - 1e-9))
    if not least <= p.threshold <= k:
        return (f"threshold {p.threshold} of a cohort of {k}: this node needs at least {least} "
                "(above half the cohort, the run's secagg-threshold and node "
                "min-secagg-threshold)")
    run_bits = cfg.secure.secagg_bits
    if run_bits == 0 and not 8 <= p.bits <= 62:
        return f"bits {p.bits} outside [8, 62] (the run's secagg-bits=0 leaves the field to the server)"
    if (run_bits and p.bits != run_bits) or p.clip != cfg.privacy.max_grad_norm:
        return (f"bits {p.bits} and clip {p.clip:g} differ from the run's secagg-bits "
                f"{run_bits} and max-grad-norm {cfg.privacy.max_grad_norm:g}")
    if not (0 < p.scale < math.inf and p.dim >= 1 and 0 <= p.noise_multiplier < math.inf):
        return f"scale {p.scale!r}, dimension {p.dim!r} or noise {p.noise_multiplier!r} unusable"
    agreed = (p.noise_multiplier * p.encoding.rounded_l2_bound) ** 2
    # honest members add about the agreed share each
    share = agreed / p.threshold if cfg.secure.noise == "distributed" else agreed
    return ddp.field_problem(bits=p.bits, noise_variance=share * k)


def shares_stage(msg: Message, context: Context, cfg: ExperimentConfig, node: NodeConfig
                 ) -> Message:
    _require(cfg)
    server_round = _round_of(msg)
    participant = _load(context, server_round)
    try:
        view = View.from_json(str(msg.content[keys.CONFIG][keys.VIEW]))
    except (KeyError, ValueError, TypeError) as exc:
        raise ProtocolError(f"round {server_round}: the view is unreadable ({exc!r})") from exc
    problem = view_problem(view, cfg, node, members(node), server_round)
    if problem:
        raise ProtocolError(f"round {server_round}: {problem}; this node shares nothing")
    boxes = participant.share(view)
    _save(context, participant)
    context.state.config_records[VIEW_KEY] = ConfigRecord({"json": view.to_json()})
    return _reply(msg, **{keys.SHARES: json.dumps({str(j): ct.decode() for j, ct in boxes.items()})})


def _view(context: Context, participant: Participant) -> View:
    record = context.state.config_records.get(VIEW_KEY)
    view = View.from_json(str(record["json"])) if record is not None else None
    if view is None or view.digest() != participant.view:
        raise ProtocolError(f"round {participant.server_round}: this node holds no view")
    return view


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
        if problem:
            return requests.refusal(msg, ledger, cfg, node, f"{problem}; round "
                                    f"{request.server_round} refused, nothing spent")
        participant = _load(context, request.server_round)
        view = _view(context, participant)
        params = view.params
        shares = json.loads(str(config[keys.SHARES]))
        participant.receive({int(i): ct.encode() for i, ct in shares.items()})
        participant.check_ready()  # before any data is read or budget spent
        data = selection.records_for(cfg, node)
        names = parameter_names(cfg.train.model, data.shape, data.num_classes)
        dim = sum(request.weights[n].size for n in names)
        if dim != params.dim:
            raise ProtocolError(f"round {request.server_round}: the model has {dim} "
                                f"parameters, the view says {params.dim}")
        encoding = params.encoding
        try:
            plan = plan_release(
                ledger, encoding=encoding, priv=cfg.privacy,
                planned_rounds=int(request.planned_rounds), threshold=params.threshold,
                distributed=cfg.secure.noise == "distributed", client=f"client {node.partition_id}",
                num_examples=len(data), agreed_noise_multiplier=params.noise_multiplier,
                min_noise_multiplier=node.min_noise_multiplier,
                min_share_noise_multiplier=node.min_share_noise_multiplier,
                max_epsilon_alone=node.max_epsilon_alone)
        except BudgetExceeded as exc:
            save_ledger(context, ledger, node.ledger_file)
            return requests.refusal(msg, ledger, cfg, node, f"{exc} in round {request.server_round}")
        release = integer_gradient_sum(request.weights, data, model_name=cfg.train.model,
                                       encoding=encoding, mu_share=plan.mu_share,
                                       rotation=view.rotation(),
                                       device=str(resolve_device(cfg.runtime.device)))
        # Everything that could fail is done before the spend (nothing is spent for what
        # cannot be released), and the spend is saved before anything leaves: once masked
        # and sent, t reveals expose the sum.
        masked = ddp.pack(participant.masked(release), participant.bits)
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


def confirm_stage(msg: Message, context: Context, cfg: ExperimentConfig, node: NodeConfig
                  ) -> Message:
    """The consistency check: sign the survivor set under this node's view, once."""
    _require(cfg)
    participant = _load(context, _round_of(msg))
    survivors = [int(i) for i in json.loads(str(msg.content[keys.CONFIG][keys.SURVIVORS]))]
    body = participant.confirm(survivors)  # marks the round confirmed
    _save(context, participant)
    return _reply(msg, **{keys.SIGNATURE: roster.sign(identity(node), "survivors", body)})


def unmask_stage(msg: Message, context: Context, cfg: ExperimentConfig, node: NodeConfig
                 ) -> Message:
    """Reveal only when at least t survivors signed the same view and survivor set."""
    _require(cfg)
    config = msg.content[keys.CONFIG]
    participant = _load(context, _round_of(msg))
    signatures = {int(i): str(v) for i, v in json.loads(str(config[keys.SIGNATURES])).items()}
    confirmed = participant.confirmed
    body = survivors_body(participant.view, participant.server_round, confirmed)
    trusted = members(node)
    signers = [i for i, sig in signatures.items()
               if i in confirmed and trusted.verify(i, "survivors", body, sig)]
    revealed = participant.reveal(signers)  # marks the round revealed
    _save(context, participant)
    return _reply(msg, **{keys.REVEALED: json.dumps(
        {str(j): [kind, share.hex()] for j, (kind, share) in revealed.items()})})


def _require(cfg: ExperimentConfig) -> None:
    if not cfg.secure.enabled:
        raise ProtocolError("the run config has secure-aggregation=none: this node takes no "
                            "part in a secure-aggregation round")

