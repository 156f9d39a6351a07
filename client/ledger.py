"""A node's privacy ledger: its DP-SGD history and its fixed noise multiplier.

Only the history is stored; epsilon is recomputed from it (common.privacy). The ledger is
the node's, whole and alone, for all runs and all time:
- **durable by default**: a file (written atomically and synced), at the node config's
  `ledger-path`, or in the simulation harness's `ledger-dir`, or else at the node's
  default place (`default_ledger_file`: under `DPFL_STATE_DIR`, else
  `$XDG_STATE_HOME/dpfl`, else `~/.local/state/dpfl`). Only a node config that says
  `ledger-path=":ephemeral:"` keeps it in `Context.state` alone (a budget per run);
- **one spender at a time**: a request holds an exclusive lock on a file beside the
  ledger (`fcntl.flock`, across processes) from loading the ledger through planning,
  training and the synced save (`held_ledger`); another request waits at most the
  node's `ledger-wait` seconds, then refuses, nothing spent;
- **never silently reset**: a missing file is a fresh ledger only for a node that has
  never trained: a marker beside it (written with the first spend) or the operator's
  `trained-before=true` makes the node refuse instead; an unreadable file is refused,
  never reset; the server's view of the history is adopted only where the operator
  allows it (`adopt-server-history=true`) and only when it lengthens the ledger.
A node that cannot open or lock its ledger trains nothing: the reason goes to its own
log, one fixed sentence to the server.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context

from common import privacy
from common.errors import LedgerUnavailable
from common.files import atomic_write_text
from common.node import NodeConfig
from common.records import decode_float, encode

STATE_KEY = "dpfl-ledger"




UNAVAILABLE = ("this node cannot open its privacy ledger (the reason is in the node's own "
               "log); it trains nothing and spends nothing until its operator fixes it")
BUSY = ("this node's privacy ledger is in use by another request (another run training on "
        "this node) for longer than the node's ledger-wait; nothing trained, nothing spent")


def unavailable(detail: str) -> LedgerUnavailable:
    """The exception for a ledger this node cannot use: `detail` to the node's log, the
    fixed sentence to the server."""
    print(f"dpfl node: privacy ledger unavailable: {detail}", file=sys.stderr, flush=True)
    return LedgerUnavailable(UNAVAILABLE)


def lock_file(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def trained_marker(path: Path) -> Path:
    """Beside the ledger: says that this node has spent budget, so that a ledger file
    that went missing is refused rather than taken for a fresh node's."""
    return path.with_name(path.name + ".trained")


@contextmanager
def locked(path: Path, wait: float) -> Iterator[None]:
    """Hold the exclusive lock beside ledger `path` (across processes); wait at most
    `wait` seconds for it, then raise LedgerUnavailable(BUSY)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_file(path), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise unavailable(f"{lock_file(path)}: {exc}") from None
    try:
        deadline = time.monotonic() + wait
        pause = 0.005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    print(f"dpfl node: {lock_file(path)} still held after {wait:g} s "
                          "(ledger-wait); the request is refused", file=sys.stderr, flush=True)
                    raise LedgerUnavailable(BUSY) from None
                time.sleep(pause)
                pause = min(pause * 2, 0.2)
            except OSError as exc:
                raise unavailable(f"{lock_file(path)}: cannot be locked ({exc})") from None
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def held_ledger(context: Context, node: NodeConfig, server_view: str | None = None
                ) -> Iterator[Ledger]:
    """This node's ledger for one request that may spend: loaded under the node's lock,
    which is held until the block ends (the caller plans, trains, spends and saves inside
    it). Raises LedgerUnavailable when the ledger cannot be opened, read or locked."""
    path = node.ledger_file
    if path is None:  # ephemeral: this run's Context.state only (one message at a time)
        yield load_ledger(context, None, server_view if node.adopt_server_history else None)
        return
    with locked(path, node.ledger_wait):
        if not path.exists() and (node.trained_before or trained_marker(path).exists()):
            why = (f"its marker {trained_marker(path)} says this node has trained before"
                   if trained_marker(path).exists() else "node config trained-before=true")
            raise unavailable(f"{path} is missing, but {why}: restore the ledger file, or "
                              "reset it deliberately (dpfl ledger reset)")
        try:
            ledger = load_ledger(context, path, server_view if node.adopt_server_history else None)
        except (OSError, ValueError) as exc:
            raise unavailable(str(exc)) from None
        yield ledger


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
    """The client's own ledger: the longer of node state and the ledger file (requests
    that spend read it through `held_ledger`). The server's view of this client's
    history (`server_view`, JSON; passed only where the node's operator allows it) is
    never read when a ledger file exists, and otherwise only adopted when it extends the
    client's own history (`adopt_view`)."""
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
    """Write the ledger (synced) to its file, the first time a history is saved also the
    marker that this node has trained, and keep a copy in the node's state."""
    text = ledger.to_json()
    if path is not None:
        if ledger.history and not trained_marker(path).exists():
            atomic_write_text(trained_marker(path), "this node has spent privacy budget: its "
                              f"ledger is {path.name}; a missing ledger is refused, never reset "
                              "(dpfl ledger reset moves it aside deliberately)\n")
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
        if trained_marker(path).exists():
            return (f"{path}: MISSING, but {trained_marker(path).name} says this node has "
                    "trained: the node refuses to train until the file is restored or reset")
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


def reset_ledger(path: Path, *, wait: float = 60.0) -> Path | None:
    """Move a ledger file aside (never delete it), under the node's lock, and remove its
    marker, so that the node's next request starts a new ledger at epsilon 0: the
    operator's deliberate reset. Returns where the ledger went (None: the file was
    already missing and only the marker that refused a fresh start is removed)."""
    marker = trained_marker(path)
    if not path.exists() and not marker.exists():
        raise FileNotFoundError(f"{path}: no ledger to reset")
    with locked(path, wait):
        backup = None
        if path.exists():
            stamp = time.strftime('%Y%m%d-%H%M%S')
            backup = path.with_name(f"{path.stem}.reset-{stamp}{path.suffix}")
            path.rename(backup)
        replay_file(path).unlink(missing_ok=True)
        marker.unlink(missing_ok=True)
    return backup
