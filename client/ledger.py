"""A client's privacy ledger: its DP-SGD history and its fixed noise multiplier.

Only the history is stored; epsilon is recomputed from it (common.privacy). The ledger is
loaded before a round and saved only after the round trained successfully, so a crash
never loses spent budget that was reported, and epsilon only grows. In simulation it
lives in the node's `Context.state`; with a `ledger-path` it is also kept in a file
(written atomically), which outlives SuperNode restarts and new runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context

from common import privacy
from common.files import atomic_write_text
from common.records import decode_float, encode

STATE_KEY = "dpfl-ledger"


@dataclass
class Ledger:
    history: list[privacy.Entry] = field(default_factory=list)
    noise_multiplier: float | None = None
    # The last reply sent: the request it answered and its metrics (weights in a file
    # beside the ledger file), so that the same request asked again gets the same answer.
    replay: dict[str, Any] | None = None

    def to_json(self) -> str:
        return json.dumps(
            {"history": [list(e) for e in self.history], "noise_multiplier": self.noise_multiplier,
             "replay": self.replay}
        )

    @classmethod
    def from_json(cls, text: str, *, source: str = "ledger") -> Ledger:
        try:
            raw = json.loads(text)
            history = privacy.merge_history(raw["history"])
            sigma = raw.get("noise_multiplier")
            sigma = None if sigma is None else float(sigma)
            replay = raw.get("replay")
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{source} is unreadable ({exc}); refusing to reset epsilon") from exc
        return cls(history=history, noise_multiplier=sigma,
                   replay=replay if isinstance(replay, dict) else None)

    def spend(self, entry: privacy.Entry) -> None:
        self.history = privacy.merge_history([*self.history, entry])

    def epsilon(self, delta: float, accountant: str) -> float:
        return privacy.epsilon(self.history, delta, accountant)


def load_ledger(context: Context, path: Path | None = None, server_view: str | None = None
                ) -> Ledger:
    """The client's own ledger: the longer of node state and the ledger file. The server's
    view of this client's history (`server_view`, JSON) is only a safety net for a
    client that has lost its ledger: it is never read when a ledger file exists, and
    otherwise only adopted when it extends the client's own history (`adopt_view`)."""
    candidates = []
    if STATE_KEY in context.state.config_records:
        candidates.append(
            Ledger.from_json(str(context.state.config_records[STATE_KEY]["json"]), source="node state ledger")
        )
    file_exists = path is not None and path.exists()
    if file_exists:
        assert path is not None
        candidates.append(Ledger.from_json(path.read_text(), source=str(path)))
    own = max(candidates, key=lambda led: privacy.total_steps(led.history)) if candidates else Ledger()
    return own if file_exists else adopt_view(own, server_view)


def adopt_view(ledger: Ledger, history_json: str | None) -> Ledger:
    """The server's view of this client's history, when it may only lengthen the ledger:
    the client's own history must be a prefix of it, and every step it adds must use
    the client's own noise multiplier (when it has one). Adopting adds accounted steps,
    so epsilon can only rise; the noise multiplier is never taken from the server. Any
    other view (shorter, diverging, another sigma, unreadable) is ignored."""
    if not history_json:
        return ledger
    try:
        view = privacy.merge_history(json.loads(history_json))
    except (ValueError, TypeError):
        return ledger
    if (privacy.total_steps(view) <= privacy.total_steps(ledger.history)
            or not privacy.extends(ledger.history, view)):
        return ledger
    sigma = ledger.noise_multiplier
    mine = len(ledger.history)
    added = view[mine - 1:] if mine else view  # the continued last entry and the new ones
    if sigma is not None and any(len(e) == 3 and e[0] != sigma for e in added):
        return ledger
    return Ledger(history=view, noise_multiplier=sigma, replay=ledger.replay)


def save_ledger(context: Context, ledger: Ledger, path: Path | None = None) -> None:
    text = ledger.to_json()
    if path is not None:
        atomic_write_text(path, text)
    context.state.config_records[STATE_KEY] = ConfigRecord({"json": text})


def replay_file(path: Path) -> Path:
    return path.with_name(path.stem + REPLY_SUFFIX)


REPLY_SUFFIX = ".reply.bin"
_REPLY_MAGIC = b"dpfl reply 1\n"


def save_replay(ledger: Ledger, path: Path | None, key: str, weights: dict[str, np.ndarray],
                metrics: dict[str, Any]) -> None:
    """Keep the reply to request `key` beside the ledger file (before the ledger that
    names it is saved). Only with a ledger file: node state does not outlive the process
    that a resume replaces. The file is written in place and not synced to disk:
    privacy rests on the ledger alone (synced before the reply leaves). Its header names
    the request and a digest of the weights, so a file that a crash or a power loss
    tore or took back is never taken for the reply the ledger names (`load_replay`):
    that request trains again and spends again, as if no reply were kept."""
    if path is None:
        return
    arrays = [np.asarray(v) for v in weights.values()]
    if any(a.dtype.kind not in "fiub" for a in arrays):
        ledger.replay = None  # nothing kept: the same request would train again
        return
    payload = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)
    head = json.dumps({"request": key, "sha256": hashlib.sha256(payload).hexdigest(),
                       "arrays": [[n, a.dtype.str, list(a.shape)]
                                  for n, a in zip(weights, arrays, strict=True)]}).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(replay_file(path), "wb") as f:
        f.write(_REPLY_MAGIC + len(head).to_bytes(4, "little") + head + payload)
    ledger.replay = {"key": key, "metrics": encode(metrics)}


def load_replay(ledger: Ledger, path: Path | None, key: str
                ) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The reply already sent for request `key`, or None."""
    if path is None or not ledger.replay or ledger.replay.get("key") != key:
        return None
    try:
        data = replay_file(path).read_bytes()
        if not data.startswith(_REPLY_MAGIC):
            return None
        at = len(_REPLY_MAGIC)
        size = int.from_bytes(data[at:at + 4], "little")
        head = json.loads(data[at + 4:at + 4 + size])
        payload = data[at + 4 + size:]
        if head["request"] != key or hashlib.sha256(payload).hexdigest() != head["sha256"]:
            return None  # a newer reply whose ledger was never saved, or a torn one
        weights, offset = {}, 0
        for name, dtype, shape in head["arrays"]:
            kind = np.dtype(dtype)
            count = int(np.prod(shape, dtype=np.int64))
            weights[str(name)] = np.frombuffer(payload, kind, count, offset).reshape(shape).copy()
            offset += count * kind.itemsize
        if offset != len(payload):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    metrics = {k: decode_float(v) if isinstance(v, str) else v
               for k, v in ledger.replay["metrics"].items()}
    return weights, metrics


def show_ledger(path: Path, *, delta: float, accountant: str) -> str:
    if not path.exists():
        return f"{path}: no ledger (nothing spent yet)"
    ledger = Ledger.from_json(path.read_text(), source=str(path))
    steps = privacy.total_steps(ledger.history)
    alone = ""
    if any(e[0] == privacy.SKELLAM for e in ledger.history):
        alone = (f" (secure aggregation: epsilon "
                 f"{privacy.epsilon_alone(ledger.history, delta, accountant):.4f} for its releases "
                 "with only its own noise share)")
    return (f"{path}: epsilon {ledger.epsilon(delta, accountant):.4f} at delta {delta:g} "
            f"({accountant}){alone}, {steps} DP-SGD steps, noise multiplier "
            f"{ledger.noise_multiplier}, history {[list(e) for e in ledger.history]}")


def reset_ledger(path: Path) -> Path:
    """Move a ledger file aside (never delete it); returns where it went."""
    import time

    if not path.exists():
        raise FileNotFoundError(f"{path}: no ledger to reset")
    backup = path.with_name(f"{path.stem}.reset-{time.strftime('%Y%m%d-%H%M%S')}{path.suffix}")
    path.rename(backup)
    spare = replay_file(path)
    if spare.exists():
        spare.unlink()
    return backup
