"""Shared test builders: run configs on the tiny data, node contexts, real Flower
messages (requests and replies), a server strategy, and process helpers."""

import time
import uuid
from pathlib import Path

from flwr.app import ConfigRecord, Context, Error, Message, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message

from common import keys
from common.arrays import from_array_record, to_array_record
from common.config import default_run_config, parse_config
from common.node import node_policy_for

# The tiny real Fashion-MNIST subset (tests/data/README.md): 1,000 training records, so
# the NUM_PARTITIONS partitions of the fast tests' run config hold PARTITION_SIZE each.
TINY_DATA = str(Path(__file__).resolve().parent / "data" / "fashion-mnist-tiny")
NUM_PARTITIONS = 10
PARTITION_SIZE = 100
# What the fast tests run unless they say otherwise: the tiny data, a model that needs
# no feature computation, partitions of PARTITION_SIZE records.
FAST = {"data-dir": TINY_DATA, "model": "logreg", "num-partitions": NUM_PARTITIONS}


def run_config(**overrides):
    cfg = {**default_run_config(), **FAST}
    cfg.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return cfg


def fast_config(**overrides):
    """The validated config of `run_config(**overrides)`."""
    return parse_config(run_config(**overrides))


def context(partition_id=0, num_partitions=NUM_PARTITIONS, state=None, node_extra=None, run_id=1,
            harness_policy=True, **overrides):
    """A node's context. With `harness_policy` its node config holds the policy that
    `dpfl simulate` gives virtual nodes (accepting exactly this run config); without,
    only what `node_extra` sets (the node's defaults for the rest)."""
    rc = run_config(**overrides)
    node_config = {keys.NODE_PARTITION_ID: partition_id, keys.NODE_NUM_PARTITIONS: num_partitions}
    if harness_policy:
        cfg = parse_config(rc)
        node_config.update(node_policy_for(cfg))
        if cfg.secure.enabled:
            node_config.update(roster_config(num_partitions))
    node_config.update(node_extra or {})
    return Context(run_id=run_id, node_id=1000 + partition_id, node_config=node_config,
                   state=state if state is not None else RecordDict(), run_config=rc)


_ROSTERS: dict = {}


def roster_config(num_partitions):
    """Node config naming a roster of `num_partitions` members and their identity keys,
    issued once per process as the simulation harness issues one per run."""
    import atexit
    import shutil
    import tempfile

    from simulations.simulate import harness_roster

    if num_partitions not in _ROSTERS:
        folder = Path(tempfile.mkdtemp(prefix="dpfl-test-roster-"))
        atexit.register(shutil.rmtree, folder, True)
        _ROSTERS[num_partitions] = harness_roster(folder, num_partitions)
    return dict(_ROSTERS[num_partitions])


def metadata(src=0, dst=1, reply_to="", message_type="train"):
    return Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=src, dst_node_id=dst,
                    reply_to_message_id=reply_to, group_id="1", created_at=time.time(),
                    ttl=3600.0, message_type=message_type)


def train_message(weights, server_round=1, planned_rounds=3, dst=1, known_history=None):
    """A training request as the server sends it."""
    config = ConfigRecord({keys.SERVER_ROUND: server_round, keys.PLANNED_ROUNDS: planned_rounds})
    if known_history is not None:
        config[keys.KNOWN_HISTORY] = known_history
    content = RecordDict({keys.ARRAYS: to_array_record(weights), keys.CONFIG: config})
    return make_message(metadata(src=0, dst=dst), content=content)


def weights_of(reply):
    """The model a train reply carries."""
    return from_array_record(reply.content[keys.ARRAYS])


def reply_metrics(partition_id=0, **over):
    """A complete, valid metrics record of a train reply (keys given as metric names or
    with underscores)."""
    m = {keys.NUM_EXAMPLES: PARTITION_SIZE, keys.TRAIN_LOSS: 1.0, keys.EPSILON: 1.0,
         keys.NOISE_MULTIPLIER: 1.0, keys.SAMPLE_RATE: 1.0, keys.STEPS: 1,
         keys.PARTITION_ID: partition_id, keys.REFUSED: 0}
    m.update({k.replace("_", "-"): v for k, v in over.items()})
    return m


def train_reply(src, weights=None, *, metrics=None, history="[[1.0, 1.0, 1]]", reason="",
                error=None):
    """A train reply as the server receives it from node `src`: `metrics` (default: a
    valid record for partition `src`), the privacy record, the model if given; or, with
    `error`, a failed reply."""
    meta = metadata(src=src, dst=0, reply_to="x")
    if error is not None:
        return make_message(meta, error=Error(code=0, reason=error))
    content = RecordDict({
        keys.METRICS: MetricRecord(metrics if metrics is not None else reply_metrics(src)),
        keys.PRIVACY: ConfigRecord({keys.HISTORY: history, keys.REASON: reason}),
    })
    if weights is not None:
        content[keys.ARRAYS] = to_array_record(weights)
    return make_message(meta, content=content)


def new_strategy(partition_sizes=None, nodes=None, **overrides):
    """The server's strategy for a fast run config (min-train-clients 1 unless given);
    `nodes`: {node id: NodeInfo} as if discovered."""
    from server.strategy import CohortFedAvg

    s = CohortFedAvg(fast_config(**{"min_train_clients": 1, **overrides}),
                     partition_sizes=partition_sizes)
    s.cohorts.nodes.update(nodes or {})
    return s


def aggregate(strategy, replies, sent, *, server_round=1, sampled=None, partitions=None):
    """One round's aggregation of `replies` to the model `sent`, as if the round had
    sampled `sampled` clients (default: one per reply) holding `partitions`; returns
    (the round's outcome, the new global model or None)."""
    from server.strategy import RoundOutcome

    strategy.outcomes[server_round] = RoundOutcome(
        sampled=len(replies) if sampled is None else sampled,
        partitions_sampled=list(partitions or []))
    average = strategy.average(server_round, list(replies), sent)
    model = None if average is None else strategy.step(server_round, sent, average)
    return strategy.outcomes[server_round], model


def as_reply(reply: Message, src: int) -> Message:
    """The reply as the server receives it (source node id set)."""
    if reply.has_error():
        return make_message(metadata(src=src, dst=0, reply_to="x"), error=reply.error)
    return make_message(metadata(src=src, dst=0, reply_to="x"), content=reply.content)


def sigkill_tree(pid):
    """SIGKILL a process and all its descendants at once (a crash, not a shutdown);
    returns the processes, all of them gone."""
    import psutil

    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    return procs


def read_rounds(path):
    """The rows of a run's rounds file (`path`) as JSON dicts (NaN as "nan", so that rows
    compare equal), read through common.records."""
    from common.records import RunDir

    return [r.to_json() for r in RunDir(Path(path).parent).rounds()]


def skellam_epsilon(history, delta, beta=0.0):
    """Epsilon of Skellam releases alone [(mu, l1, l2, steps), ...], composed here from the
    Skellam RDP bound (common.ddp): the tests' own composition, to check the accountant's.
    `beta`: each release's probability of exceeding its sensitivities, taken from delta."""
    from common import ddp

    if not history:
        return 0.0
    orders = ddp.RDP_ORDERS
    rdp = [sum(steps * ddp.skellam_rdp(a, mu, l1, l2) for mu, l1, l2, steps in history)
           for a in orders]
    return ddp.rdp_to_epsilon(rdp, orders, delta - beta * sum(h[-1] for h in history))
