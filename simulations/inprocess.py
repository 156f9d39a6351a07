"""dpfl's in-process simulation runtime: Flower's ServerApp and ClientApp, unchanged,
without a SuperLink, Ray or a process per client.

The ServerApp's `main(grid, context)` runs in this process with an `InProcessGrid`; the
ClientApp runs in a few worker processes (one per core by default), each taking the next
message whose node is free, as Flower's simulation engine gives messages to its Ray
actors. As there, a virtual node's `Context` (its `state`) lives with the runtime and
travels with each of its messages, so any worker can serve any node, and a node never
runs two messages at once (a second one waits for the first). A ClientApp's exception
comes back as an error reply (Flower's error codes), a worker that dies is replaced and
its message answered with an error: the server sees what a SuperNode would report. One
deliberate difference: a node's context is kept as its ClientApp left it even when it
raised (Flower's engine drops those changes), so that a secure-aggregation client that
marked a round's shares as revealed before failing never reveals them again.

What a virtual node is told is what Flower's simulation tells it: node config
`partition-id` and `num-partitions` (plus the harness's node policy in NODE_CONFIG_ENV),
the run config, its own context. The privacy code runs the same path either way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from simulations.runtime import keep_freed_memory, worker_context

# Flower's error codes (flwr.common.constant.ErrorCode), as its simulation engine sets them
CLIENT_APP_RAISED_EXCEPTION = 2
UNKNOWN = 0

log = logging.getLogger("dpfl.inprocess")


def node_ids(num_nodes: int, seed: int | None = None) -> list[int]:
    """Random distinct 63-bit node ids, as Flower's simulation gives its virtual nodes
    (the server learns which partition a node holds only from the node)."""
    rng = np.random.default_rng(seed)
    ids: set[int] = set()
    while len(ids) < num_nodes:
        ids.update(int(i) for i in rng.integers(1, 2**63 - 1, size=num_nodes - len(ids)))
    out = sorted(ids)
    rng.shuffle(out)
    return out


# --------------------------------------------------------------------------- worker side


def _serve(conn: Connection, env: dict[str, str], cwd: str, threads: int, log_file: str) -> None:
    """A worker: the environment and folder of the runtime that starts it (the fork
    server has those of its own start), its output to `log_file`, then (message,
    context) pairs answered until None comes."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the runtime, which stops us
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    if log_file:
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    keep_freed_memory()
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    from flwr.supercore.task_identity import TaskIdentity

    from client.app import app as client_app

    conn.send(("ready", os.getpid()))
    while True:
        try:
            item = conn.recv()
        except (EOFError, OSError):
            return
        if item is None:
            return
        message_id, message, context = item
        TaskIdentity.run_id = context.run_id
        TaskIdentity.node_id = context.node_id
        TaskIdentity.task_id = 1
        try:
            reply = client_app(message, context)
        except Exception as exc:  # noqa: BLE001 - reported to the server, as Flower does
            reason = f"{type(exc)}:<'{exc}'>"
            print(f"dpfl worker: node {context.node_id}: {reason}\n{traceback.format_exc()}",
                  flush=True)
            reply = Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                            reply_to=message)
        try:
            conn.send((message_id, reply, context))
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            conn.send((message_id, Message(Error(code=UNKNOWN, reason=f"the reply could not be "
                                                 f"sent: {exc}"), reply_to=message), context))


# --------------------------------------------------------------------------- runtime side


@contextlib.contextmanager
def _main_not_reimported() -> Iterator[None]:
    """A worker needs none of the caller's `__main__` (its target is `_serve`), but
    multiprocessing re-imports it in every new process from its file: a script read from
    standard input (`python - <<EOF`) has none ("<stdin>"), and every worker would die
    before it started. Such a `__main__` is hidden while a worker starts."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or path is None or os.path.exists(path):
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


class WorkerPool:
    """`workers` processes running the ClientApp; messages go to free workers in the
    order they were pushed, one at a time per worker."""

    def __init__(self, workers: int, *, env: Mapping[str, str], threads: int = 1,
                 log_file: str | None = None) -> None:
        if workers < 1:
            raise ValueError(f"workers={workers} must be >= 1")
        self._env = {**os.environ, **env}  # what a spawned process would inherit, and `env`
        self._threads = threads
        self._log_file = log_file
        self._ctx = worker_context()
        self._lock = threading.Lock()
        self._ready: deque[str] = deque()  # message ids whose node is free, in push order
        self._queued: dict[int, deque[str]] = {}  # node -> messages waiting for it
        self._busy_nodes: set[int] = set()
        self._tasks: dict[str, tuple[Message, int]] = {}  # message id -> (message, node)
        self._replies: dict[str, Message] = {}
        self._abandoned: set[str] = set()  # the caller stopped waiting: dropped on arrival
        self._got = threading.Condition(self._lock)
        self.contexts: dict[int, Context] = {}  # made when a node gets its first message
        self._node_configs: dict[int, dict[str, Any]] = {}
        self._run: tuple[int, dict[str, Any]] = (0, {})
        self._procs: list[Any] = []
        self._conns: list[Connection] = []
        self._running: list[str | None] = []  # per worker: the message it runs
        self._idle: list[bool] = []
        self._closed = False
        self._failed: str = ""  # why the pool cannot run messages any more
        self._early_deaths = 0  # workers in a row that died before they were ready
        pipe: tuple[Connection, Connection] = self._ctx.Pipe(duplex=False)
        self._wake_r, self._wake_w = pipe
        for _ in range(workers):
            self._start_worker()
        self._reader = threading.Thread(target=self._read, name="dpfl-inprocess", daemon=True)
        self._reader.start()

    # -- workers
    def _start_worker(self, index: int | None = None) -> None:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_serve, args=(child, self._env, os.getcwd(),
                                                      self._threads, self._log_file or ""),
                                 name="dpfl-client-worker", daemon=True)
        with _main_not_reimported():
            proc.start()
        child.close()
        if index is None:
            self._procs.append(proc)
            self._conns.append(parent)
            self._running.append(None)
            self._idle.append(False)  # until it says it is ready
        else:
            self._procs[index], self._conns[index] = proc, parent
            self._running[index], self._idle[index] = None, False

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def _dispatch(self) -> None:
        """Give ready messages to idle workers (lock held)."""
        for w, idle in enumerate(self._idle):
            if not self._ready:
                return
            if not idle:
                continue
            message_id = self._ready.popleft()
            message, node = self._tasks[message_id]
            try:
                self._conns[w].send((message_id, message, self.contexts[node]))
            except (OSError, ValueError):  # dead: the reader replaces it
                self._ready.appendleft(message_id)
                self._idle[w] = False
                continue
            self._running[w], self._idle[w] = message_id, False

    def _finish(self, message_id: str, reply: Message, context: Context | None) -> None:
        """A message's reply is in (lock held): keep it, free its node."""
        _, node = self._tasks.pop(message_id)
        if context is not None:
            self.contexts[node] = context
        reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        if message_id in self._abandoned:
            self._abandoned.discard(message_id)
        else:
            self._replies[message_id] = reply
        self._busy_nodes.discard(node)
        waiting = self._queued.get(node)
        if waiting:
            self._busy_nodes.add(node)
            self._ready.append(waiting.popleft())
            if not waiting:
                del self._queued[node]
        self._got.notify_all()

    def _read(self) -> None:
        try:
            self._read_loop()
        except Exception as exc:  # noqa: BLE001 - every waiting caller must hear of it
            self._fail(f"the runtime's reader stopped: {type(exc).__name__}: {exc}")

    def _fail(self, why: str) -> None:
        """No message can run any more: every pending one is answered with the reason,
        and later submissions are refused with it."""
        log.error("in-process runtime: %s", why)
        with self._lock:
            self._failed = why
            for message_id in list(self._tasks):
                message, _ = self._tasks[message_id]
                self._finish(message_id, Message(Error(code=UNKNOWN, reason=why),
                                                 reply_to=message), None)
            self._got.notify_all()

    def _read_loop(self) -> None:
        while not self._closed and not self._failed:
            sentinels = {p.sentinel: w for w, p in enumerate(self._procs)}
            conns = {id(c): w for w, c in enumerate(self._conns)}
            ready = wait([*self._conns, *sentinels, self._wake_r])
            with self._lock:
                if self._closed:
                    return
                for obj in ready:
                    if obj is self._wake_r:
                        with contextlib.suppress(EOFError, OSError):
                            self._wake_r.recv()
                        continue
                    if isinstance(obj, int):  # a worker's process ended
                        self._lost(sentinels[obj])
                        continue
                    w = conns.get(id(obj))
                    if w is None or self._conns[w] is not obj:  # replaced meanwhile
                        continue
                    try:
                        item: tuple[Any, ...] = self._conns[w].recv()
                    except (EOFError, OSError):
                        self._lost(w)
                        continue
                    if item[0] == "ready":
                        self._idle[w], self._early_deaths = True, 0
                        continue
                    message_id, reply, context = item
                    self._running[w], self._idle[w] = None, True
                    self._finish(message_id, reply, context)
                self._dispatch()

    def _lost(self, w: int) -> None:
        """Worker `w` died (lock held): its message gets an error reply, a new worker
        takes its place."""
        proc = self._procs[w]
        if proc.is_alive() or self._closed:
            return
        proc.join(timeout=1)
        message_id = self._running[w]
        if message_id is not None:
            message, _ = self._tasks[message_id]
            reason = (f"the worker process running this node's ClientApp died (exit code "
                      f"{proc.exitcode})")
            log.warning("node %d: %s", message.metadata.dst_node_id, reason)
            self._finish(message_id, Message(Error(code=UNKNOWN, reason=reason),
                                             reply_to=message), None)
        with contextlib.suppress(OSError):
            self._conns[w].close()
        if not self._idle[w] and message_id is None:
            self._early_deaths += 1  # it never became ready
        if self._early_deaths >= 3:
            raise RuntimeError(f"3 worker processes in a row died before they could run a "
                               f"message (last exit code {proc.exitcode}); their output is in "
                               f"{self._log_file or 'the console'}")
        self._start_worker(w)

    # -- nodes and messages
    def add_nodes(self, node_configs: Mapping[int, dict[str, Any]], *, run_id: int,
                  run_config: dict[str, Any]) -> None:
        """Virtual nodes of one run, by node id with their node config; a node's context
        is made when its first message comes (memory grows with the nodes a run meets,
        not with the federation's size)."""
        with self._lock:
            self._node_configs.update(node_configs)
            self._run = (run_id, run_config)

    def node_ids(self) -> list[int]:
        with self._lock:
            return list(dict.fromkeys([*self._node_configs, *self.contexts]))

    def submit(self, message: Message) -> str | None:
        """Queue `message` for its node; its id, or None for a node this runtime does not
        have (Flower's grid gives no id to such a message either)."""
        node = message.metadata.dst_node_id
        message_id = uuid.uuid4().hex  # always new, as the SuperLink's
        message.metadata.__dict__["_message_id"] = message_id
        with self._lock:
            if self._failed:
                raise RuntimeError(self._failed)
            if node not in self.contexts and node in self._node_configs:
                run_id, run_config = self._run
                self.contexts[node] = Context(run_id=run_id, node_id=node, state=RecordDict(),
                                              run_config=run_config,
                                              node_config=dict(self._node_configs[node]))
            if node not in self.contexts:
                log.warning("a message to node %d, which this runtime does not have", node)
                return None
            self._tasks[message_id] = (message, node)
            if node in self._busy_nodes:
                self._queued.setdefault(node, deque()).append(message_id)
            else:
                self._busy_nodes.add(node)
                self._ready.append(message_id)
            self._dispatch()
        return message_id

    def take(self, message_ids: Iterable[str], *, timeout: float = 0.0,
             each: Callable[[Message], Any] | None = None) -> list[Message]:
        """Replies to `message_ids` that are in, waiting up to `timeout` for all of them;
        each passed to `each` as it comes (outside the lock)."""
        wanted = set(message_ids)
        deadline = time.monotonic() + timeout
        got: list[Message] = []
        while True:
            with self._lock:
                while not (self._closed or wanted & self._replies.keys()):
                    left = deadline - time.monotonic()
                    if left <= 0 or not wanted:
                        break
                    self._got.wait(timeout=min(left, 1.0))
                arrived = wanted & self._replies.keys()
                new = [self._replies.pop(m) for m in arrived]
                wanted -= arrived
                done = self._closed or not wanted or time.monotonic() >= deadline
            if each is not None:
                for reply in new:
                    each(reply)
            got += new
            if done:
                return got

    def abandon(self, message_ids: Iterable[str]) -> None:
        """The caller no longer waits for these: their replies are dropped (their nodes
        still finish them, as a SuperNode would)."""
        with self._lock:
            for m in message_ids:
                if self._replies.pop(m, None) is None and m in self._tasks:
                    self._abandoned.add(m)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        with contextlib.suppress(OSError):
            self._wake_w.send(None)
        for conn in self._conns:
            with contextlib.suppress(OSError, ValueError):
                conn.send(None)
        deadline = time.monotonic() + 5
        for proc in self._procs:
            proc.join(timeout=max(deadline - time.monotonic(), 0.1))
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        self._reader.join(timeout=5)
        for conn in [*self._conns, self._wake_r, self._wake_w]:
            with contextlib.suppress(OSError):
                conn.close()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InProcessGrid(Grid):
    """Flower's Grid over a WorkerPool of virtual nodes. `receive` and `send_and_receive`
    wait for replies without polling; push/pull work as on any Grid."""

    waits_for_replies = True  # server.wire asks it to wait for replies itself

    def __init__(self, pool: WorkerPool, run_id: int) -> None:
        self._pool = pool
        self._run = Run.create_empty(run_id)

    def set_run(self, run: Run) -> None:  # Flower's runtime sets it; nothing to do here
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type,
                       ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return self._pool.node_ids()

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        return [i for i in (self._pool.submit(m) for m in messages) if i is not None]

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return self._pool.take(message_ids)

    def receive(self, message_ids: Iterable[str], *, timeout: float | None = None,
                each: Callable[[Message], Any] | None = None) -> list[Message]:
        """The replies to pushed `message_ids` that come within `timeout` seconds (woken by
        each reply, no polling, each passed to `each` as it comes); the others are
        abandoned."""
        ids = list(message_ids)
        replies = self._pool.take(ids, timeout=float("inf") if timeout is None else timeout,
                                  each=each)
        got = {r.metadata.reply_to_message_id for r in replies}
        self._pool.abandon(m for m in ids if m not in got)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> list[Message]:
        return self.receive(self.push_messages(messages), timeout=timeout)
