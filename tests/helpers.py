"""Builders for real Flower messages and contexts used by several tests."""

import time
import uuid
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.app.message.message import make_message

from common import keys
from common.config import default_run_config, node_policy_for, parse_config

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
        node_config.update(node_policy_for(parse_config(rc)))
    node_config.update(node_extra or {})
    return Context(run_id=run_id, node_id=1000 + partition_id, node_config=node_config,
                   state=state if state is not None else RecordDict(), run_config=rc)


def metadata(src=0, dst=1, reply_to="", message_type="train"):
    return Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=src, dst_node_id=dst,
                    reply_to_message_id=reply_to, group_id="1", created_at=time.time(),
                    ttl=3600.0, message_type=message_type)


def train_message(weights, server_round=1, planned_rounds=3, dst=1):
    content = RecordDict({
        keys.ARRAYS: keys.to_array_record(weights),
        keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: server_round,
                                   keys.PLANNED_ROUNDS: planned_rounds}),
    })
    return make_message(metadata(src=0, dst=dst), content=content)


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
