"""The server's side of the wire: named numpy weights <-> Flower records and messages."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from common import keys

POLL_SECONDS = 0.1


class Waited:
    """Seconds the server has spent sending to clients and waiting for their replies
    (`send`, `receive`): the round loop reads it for each round's breakdown."""

    seconds = 0.0


@dataclass
class Sent:
    """Messages on their way: `receive` collects their replies. Between the two the
    server may do other work (the previous round's evaluation and records)."""

    grid: Any
    started: float
    ids: list[str] | None  # None: a grid without push and pull, sent at `receive`
    messages: list[Message]


def send(grid: Any, messages: Iterable[Message]) -> Sent:
    """Push `messages` (a grid with push and pull; a test's grid without them is asked
    to send and receive at `receive`)."""
    start = time.monotonic()
    messages = list(messages)
    try:
        if not (hasattr(grid, "push_messages") and hasattr(grid, "pull_messages")):
            return Sent(grid, start, None, messages)
        return Sent(grid, start, list(grid.push_messages(messages)), messages)
    finally:
        Waited.seconds += time.monotonic() - start


def receive(sent: Sent, *, timeout: float, each: Callable[[Message], Any] | None = None
            ) -> list[Message]:
    """The replies to `sent` that come within `timeout` seconds of its sending, each
    passed to `each` as it comes (the server reads a reply while others still train). A
    grid that waits for replies itself (dpfl's in-process runtime) is asked to; any
    other is polled every POLL_SECONDS (Flower's deployment grid would sleep 3 s between
    polls, so every exchange of a deployed round waited up to 3 s for replies already
    there)."""
    start = time.monotonic()
    grid = sent.grid
    try:
        if sent.ids is None:
            replies = list(grid.send_and_receive(sent.messages, timeout=timeout))
            if each is not None:
                for reply in replies:
                    each(reply)
            return replies
        deadline = sent.started + timeout
        if getattr(grid, "waits_for_replies", False):
            return list(grid.receive(sent.ids, timeout=max(deadline - time.monotonic(), 0.0),
                                     each=each))
        waiting = set(sent.ids)
        replies = []
        while waiting:
            got = list(grid.pull_messages(waiting))
            if each is not None:
                for reply in got:
                    each(reply)
            replies += got
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if not waiting or time.monotonic() >= deadline:
                break
            time.sleep(POLL_SECONDS)
        return replies
    finally:
        Waited.seconds += time.monotonic() - start


def send_and_receive(grid: Any, messages: Iterable[Message], *, timeout: float) -> list[Message]:
    return receive(send(grid, messages), timeout=timeout)


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


def payload_bytes(content: RecordDict) -> int:
    """Bytes of a message's payload: array buffers and config/metric values."""
    n = 0
    for rec in content.array_records.values():
        n += sum(len(a.data) for a in rec.values())
    for cr in content.config_records.values():
        n += sum(len(str(v).encode()) if not isinstance(v, bytes) else len(v) for v in cr.values())
    for mr in content.metric_records.values():
        n += 8 * len(mr)
    return n
