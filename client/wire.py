"""The client's side of the wire: decode a training request, encode a reply."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from common import keys
from common.arrays import from_array_record, to_array_record

MAX_SERVER_ROUND = 2**40  # a round number every stage can use (the secure masks' nonce: 16 bytes)


def round_problem(server_round: int) -> str | None:
    """Why a request's round number is refused, at every stage and before anything is
    spent, or None."""
    if not 1 <= server_round <= MAX_SERVER_ROUND:
        return f"server-round={server_round!r} must be an integer in [1, {MAX_SERVER_ROUND}]"
    return None


@dataclass(frozen=True)
class TrainRequest:
    server_round: int
    planned_rounds: float  # checked by the client (client.app.request_problem)
    weights: dict[str, np.ndarray]
    known_history: str | None  # the server's view of this client's history (JSON)


def decode_request(msg: Message) -> TrainRequest:
    config = msg.content[keys.CONFIG]
    view = config.get(keys.KNOWN_HISTORY)
    return TrainRequest(
        server_round=int(keys.number(config[keys.SERVER_ROUND], keys.SERVER_ROUND)),
        planned_rounds=keys.number(config[keys.PLANNED_ROUNDS], keys.PLANNED_ROUNDS),
        weights=from_array_record(msg.content.array_records[keys.ARRAYS]),
        known_history=str(view) if view is not None else None,
    )


def reply(msg: Message, metrics: Mapping[str, Any], history: list, *, reason: str = "",
          weights: Mapping[str, np.ndarray] | None = None) -> Message:
    """A train reply: metrics, the client's whole history (and why it refused), and its
    model unless it refused."""
    content = RecordDict({
        keys.METRICS: MetricRecord(dict(metrics)),
        keys.PRIVACY: ConfigRecord({keys.HISTORY: json.dumps([list(e) for e in history]),
                                    keys.REASON: reason}),
    })
    if weights is not None:
        content[keys.ARRAYS] = to_array_record(weights)
    return Message(content=content, reply_to=msg)


def query_reply(msg: Message, *, partition_id: int, num_examples: int, own_data: bool) -> Message:
    return Message(content=RecordDict({keys.METRICS: MetricRecord({
        keys.PARTITION_ID: partition_id, keys.NUM_EXAMPLES: num_examples,
        keys.OWN_DATA: int(own_data),
    })}), reply_to=msg)
