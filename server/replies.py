"""What a client's reply is worth: read its privacy report, judge it, decode its update.

Pure functions of a reply and what the server knows (the round's global model, the
nodes' declarations, the partitions' sizes): nothing here changes any state. A reply
that must not be averaged is `Rejected` with a kind and a reason; the round counts them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Message

from common import keys, privacy
from common.aggregation import metrics_problem, update_problem
from common.arrays import from_array_record

MAX_HISTORY_ENTRIES = 10_000  # a longer reported history is not read (cost bound)
REJECTION_KINDS = ("failed", "refused", "invalid")


@dataclass(frozen=True)
class NodeInfo:
    """What a node declared when discovered: its partition and how many records it holds."""

    partition_id: int
    num_examples: int
    own_data: bool


@dataclass(frozen=True)
class Accepted:
    partition_id: int
    update: dict[str, np.ndarray]
    num_examples: float
    train_loss: float  # NaN: withheld by a private client


@dataclass(frozen=True)
class Rejected:
    kind: str  # one of REJECTION_KINDS
    reason: str


@dataclass(frozen=True)
class ReportedPrivacy:
    """The privacy a reply reports: the client's whole history and its claims."""

    partition_id: int
    history: list
    claimed_epsilon: float
    noise_multiplier: float
    sample_rate: float


def short_error(reason: str, limit: int = 300) -> str:
    """The last line of a client's error (its exception message, without the remote
    traceback Flower wraps around it)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", reason)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    last = lines[-1] if lines else text.strip()
    last = last.removesuffix("'>")
    return last if len(last) <= limit else last[: limit - 3] + "..."


def query_problem(metrics: Mapping[str, Any]) -> str | None:
    """Why a discovery reply is unusable, or None."""
    if set(metrics) != keys.QUERY_METRIC_KEYS:
        return f"discovery reply must hold exactly {sorted(keys.QUERY_METRIC_KEYS)}"
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            return f"discovery reply {k}={v!r} must be an integer >= 0"
    return None


@dataclass(frozen=True)
class Reply:
    """One train reply, decoded once: everything the server reads of it. The privacy it
    reports (valid or not: the client may have trained and spent before its reply was
    found unusable; None when it carries no readable history) and the verdict on it:
    Accepted (its update can be averaged into the round's model), Rejected (failed,
    refused, invalid, with the reason), or None when its payload is not an update to
    judge (a secure round's masked vector, which the secure round checks)."""

    node: int
    reported: ReportedPrivacy | None
    verdict: Accepted | Rejected | None


def decode(msg: Message, *, reference: Mapping[str, np.ndarray] | None,
           nodes: Mapping[int, NodeInfo], partition_sizes: Mapping[int, int] | None = None,
           max_update_norm: float = 0.0) -> Reply:
    """Read a train reply once: its metrics, its history and (with `reference`, the
    round's global model) its update."""
    node = msg.metadata.src_node_id
    if msg.has_error():
        return Reply(node, None, Rejected(
            "failed", f"node {node} failed: {short_error(msg.error.reason or '')}"))
    content = msg.content
    metrics = dict(content[keys.METRICS]) if keys.METRICS in content.metric_records else {}
    try:
        priv = content.config_records.get(keys.PRIVACY)
        history: list | None = privacy.merge_history(json.loads(str(priv[keys.HISTORY])))  # type: ignore[index]
    except (KeyError, ValueError, TypeError):
        history = None
    reported = _reported(node, metrics, history, nodes)
    verdict: Accepted | Rejected | None = _judge(node, content, metrics, history, nodes,
                                                  partition_sizes or {})
    if verdict is None and reference is not None:
        verdict = _payload(node, content, metrics, reference, max_update_norm)
    return Reply(node, reported, verdict)


def _reported(node: int, metrics: Mapping[str, Any], history: list | None,
              nodes: Mapping[int, NodeInfo]) -> ReportedPrivacy | None:
    """The history under the partition its node declared at discovery (the reply's own
    claim only for an undiscovered node)."""
    if history is None or len(history) > MAX_HISTORY_ENTRIES:
        return None
    info = nodes.get(node)
    try:
        pid = info.partition_id if info is not None else int(
            keys.number(metrics[keys.PARTITION_ID], keys.PARTITION_ID))
        return ReportedPrivacy(
            partition_id=pid, history=[list(e) for e in history],
            claimed_epsilon=keys.number(metrics.get(keys.EPSILON, 0.0), keys.EPSILON),
            noise_multiplier=keys.number(metrics.get(keys.NOISE_MULTIPLIER, 0.0), keys.NOISE_MULTIPLIER),
            sample_rate=keys.number(metrics.get(keys.SAMPLE_RATE, 0.0), keys.SAMPLE_RATE),
        )
    except (KeyError, ValueError, TypeError):
        return None


def identity_problem(node: int, metrics: Mapping[str, Any], nodes: Mapping[int, NodeInfo],
                     partition_sizes: Mapping[int, int]) -> str | None:
    """A reply must come from the partition its node declared, and claim no more
    examples than that partition holds (a client cannot buy weight by lying)."""
    pid = int(keys.number(metrics[keys.PARTITION_ID], keys.PARTITION_ID))
    n = int(keys.number(metrics.get(keys.NUM_EXAMPLES, 0), keys.NUM_EXAMPLES))
    info = nodes.get(node)
    if info is not None and info.partition_id != pid:
        return f"reply claims partition {pid} but the node holds partition {info.partition_id}"
    bound = None
    if info is not None and info.own_data:
        bound = info.num_examples
    elif pid in partition_sizes:
        bound = partition_sizes[pid]
    elif info is not None:
        bound = info.num_examples
    if bound is not None and n > bound:
        return f"num-examples={n} exceeds the {bound} records partition {pid} holds"
    return None


def _judge(node: int, content: Any, metrics: Mapping[str, Any], history: list | None,
           nodes: Mapping[int, NodeInfo], partition_sizes: Mapping[int, int]) -> Rejected | None:
    """Everything about a reply but its payload: malformed metrics, a false identity or
    record count, no readable history, or refused. None: judge the payload."""
    if keys.METRICS not in content.metric_records:
        return Rejected("invalid", f"node {node}: reply has no metrics")
    refused = bool(metrics.get(keys.REFUSED))
    problem = None if refused else metrics_problem(metrics)
    if problem is None:
        try:
            problem = identity_problem(node, metrics, nodes, partition_sizes)
        except (KeyError, ValueError) as exc:
            problem = f"reply has no usable partition-id or num-examples ({exc})"
    if problem is None and history is None:
        problem = "reply has no privacy record with a readable history"
    if problem:
        return Rejected("invalid", f"node {node}: {problem}")
    if refused:
        priv = content.config_records.get(keys.PRIVACY)
        reason = str(priv[keys.REASON]) if priv is not None else "refused"  # type: ignore[str-bytes-safe]
        return Rejected("refused", f"node {node}: {reason}")
    return None


def _payload(node: int, content: Any, metrics: Mapping[str, Any],
             reference: Mapping[str, np.ndarray], max_update_norm: float) -> Accepted | Rejected:
    """Whether the reply's update can be averaged into `reference`."""
    if len(content.array_records) != 1 or keys.ARRAYS not in content.array_records:
        return Rejected("invalid", f"node {node}: reply must carry exactly one ArrayRecord named 'arrays'")
    try:
        update = from_array_record(content.array_records[keys.ARRAYS])
    except (ValueError, TypeError, OSError, EOFError, MemoryError) as exc:
        # np.load's refusals: not an npy array, pickled objects, too short, a size no
        # memory holds. One client's unreadable model is its own problem, not the run's.
        return Rejected("invalid", f"node {node}: its model cannot be read "
                                   f"({type(exc).__name__}: {str(exc)[:120]})")
    problem = update_problem(reference, update, max_update_norm=max_update_norm)
    if problem:
        return Rejected("invalid", f"node {node}: {problem}")
    return Accepted(partition_id=int(keys.number(metrics[keys.PARTITION_ID], keys.PARTITION_ID)),
                    update=update, num_examples=keys.number(metrics[keys.NUM_EXAMPLES], keys.NUM_EXAMPLES),
                    train_loss=keys.number(metrics[keys.TRAIN_LOSS], keys.TRAIN_LOSS))


# One-question views of `decode`, for callers that need one answer.


def read_privacy(msg: Message, nodes: Mapping[int, NodeInfo]) -> ReportedPrivacy | None:
    """The privacy a reply reports (see Reply.reported)."""
    return decode(msg, reference=None, nodes=nodes).reported


def classify(msg: Message, *, reference: Mapping[str, np.ndarray],
             nodes: Mapping[int, NodeInfo], partition_sizes: Mapping[int, int] | None = None,
             max_update_norm: float = 0.0) -> Accepted | Rejected:
    """Whether a train reply can be averaged into `reference` (the round's global model)."""
    verdict = decode(msg, reference=reference, nodes=nodes, partition_sizes=partition_sizes,
                     max_update_norm=max_update_norm).verdict
    assert verdict is not None  # a reference was given: the payload was judged
    return verdict
