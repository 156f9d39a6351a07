"""The server's side of the wire: named numpy weights <-> Flower records and messages."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from common import keys


def to_array_record(weights: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Named numpy weights -> ArrayRecord (names kept, so shapes can be checked by name)."""
    return ArrayRecord({name: Array(value) for name, value in weights.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> ordered dict of named numpy arrays."""
    return {name: record[name].numpy() for name in record}


POLL_SECONDS = 0.1


class Waited:
    """Seconds the server has spent in `send_and_receive` (sending, then waiting for the
    clients' replies): the round loop reads it for each round's breakdown."""

    seconds = 0.0


def send_and_receive(grid: Any, messages: Iterable[Message], *, timeout: float) -> list[Message]:
    start = time.monotonic()
    try:
        return _send_and_receive(grid, messages, timeout=timeout)
    finally:
        Waited.seconds += time.monotonic() - start


def _send_and_receive(grid: Any, messages: Iterable[Message], *, timeout: float) -> list[Message]:
    """Push `messages` and collect their replies until all are in or `timeout` passes,
    polling every POLL_SECONDS. Flower's deployment grid sleeps 3 s between polls, so
    every exchange of a deployed round waited up to 3 s for replies already there. A
    grid that waits for replies itself (dpfl's in-process runtime) or has no push/pull
    (a test's) is asked to send and receive."""
    if getattr(grid, "waits_for_replies", False) or not (
            hasattr(grid, "push_messages") and hasattr(grid, "pull_messages")):
        return list(grid.send_and_receive(messages, timeout=timeout))
    waiting = set(grid.push_messages(messages))
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while waiting:
        got = list(grid.pull_messages(waiting))
        replies += got
        waiting -= {m.metadata.reply_to_message_id for m in got}
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(POLL_SECONDS)
    return replies


def query_message(node: int) -> Message:
    """Discovery: which partition a node holds and how many records."""
    return Message(RecordDict({keys.CONFIG: ConfigRecord({})}), dst_node_id=node,
                   message_type=MessageType.QUERY)


def train_config(*, server_round: int, planned_rounds: int, known_history: list | None
                 ) -> ConfigRecord:
    """What a training request says besides the model: the round, the participations the
    client's noise is planned for, and its history as the server last saw it (never a
    noise multiplier: the client calibrates its own)."""
    config = ConfigRecord({keys.SERVER_ROUND: server_round, keys.PLANNED_ROUNDS: planned_rounds})
    if known_history:
        config[keys.KNOWN_HISTORY] = json.dumps([list(e) for e in known_history])
    return config


def train_message(node: int, arrays: ArrayRecord, config: ConfigRecord) -> Message:
    return Message(content=RecordDict({keys.ARRAYS: arrays, keys.CONFIG: config}),
                   dst_node_id=node, message_type=MessageType.TRAIN)


def stage_message(node: int, action: str, config: Mapping, arrays: ArrayRecord | None = None
                  ) -> Message:
    """A secure-aggregation stage: message type "train.<action>" (client/secure.py)."""
    content = RecordDict({keys.CONFIG: ConfigRecord(dict(config))})
    if arrays is not None:
        content[keys.ARRAYS] = arrays
    return Message(content, dst_node_id=node, message_type=f"{MessageType.TRAIN}.{action}")
