"""Processes of Flower's runtime that dpfl starts and always stops, by PID.

`flwr run` against the magic `:local:` address starts a detached SuperLink that keeps
running after the run; dpfl instead starts its own `flower-superlink` on free loopback
ports with a private FLWR_HOME, and kills its whole process group when done.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import FLOWER_ENV

RUNTIMES = ("auto", "inprocess", "flower")


@dataclass(frozen=True)
class Backend:
    """Where the virtual clients run. `inprocess` (dpfl's runtime, simulations/
    inprocess.py): the ServerApp in the dpfl process, the ClientApp in `workers` worker
    processes (default: one per core, at most a cohort). `flower`: Flower's simulation
    engine on Ray, which it starts on this machine, or an existing Ray cluster
    (`ray_address`, HOST:PORT of its head: `ray start --head` there, `ray start
    --address HOST:PORT` on every other machine, each with the same Python environment
    and dpfl installed at the same path), each client reserving `client_cpus` and
    `client_gpus`. `auto`: `flower` when a Ray address or client resources are given,
    else `inprocess`. Never changes what a client computes: both run the same ServerApp
    and ClientApp through Flower's Message API."""

    client_cpus: float = 1.0
    client_gpus: float = 0.0
    ray_address: str = ""
    runtime: str = "auto"
    workers: int = 0

    @property
    def engine(self) -> str:
        if self.runtime != "auto":
            return self.runtime
        ray = bool(self.ray_address) or self.client_gpus > 0 or self.client_cpus != 1.0
        return "flower" if ray else "inprocess"

    def worker_count(self, cfg: Any) -> int:
        """In-process workers: as asked, else one per core but no more than a cohort."""
        if self.workers:
            return self.workers
        cohort = cfg.federation.clients_per_round(cfg.federation.num_partitions)
        return max(1, min(os.cpu_count() or 1, cohort))

    def __post_init__(self) -> None:
        from common.config import ConfigError

        if self.runtime not in RUNTIMES:
            raise ConfigError(f"--runtime={self.runtime!r} must be one of {', '.join(RUNTIMES)}")
        if not 0 <= self.workers <= 1024:
            raise ConfigError(f"--workers={self.workers!r} must be between 1 and 1024 "
                              "(0: one per core)")
        if self.runtime == "inprocess" and (self.ray_address or self.client_gpus
                                            or self.client_cpus != 1.0):
            raise ConfigError("--ray-address, --client-cpus and --client-gpus are Ray's: they "
                              "need --runtime flower (the in-process runtime uses --workers, "
                              "and device='cuda' in the run config for a GPU)")

        if not 0 < self.client_cpus < 1e6:
            raise ConfigError(f"--client-cpus={self.client_cpus!r} must be > 0")
        if not 0 <= self.client_gpus < 1e6:
            raise ConfigError(f"--client-gpus={self.client_gpus!r} must be >= 0")
        if self.ray_address:
            host, sep, port = self.ray_address.rpartition(":")
            if not (sep and host and port.isdigit()) or "://" in self.ray_address:
                raise ConfigError(f"--ray-address={self.ray_address!r} must be HOST:PORT of "
                                  "a Ray cluster's head (as `ray start --head` prints it)")

    def check(self) -> None:
        """A clear error, before anything starts, when the cluster's head is unreachable."""
        from common.config import ConfigError

        if not self.ray_address:
            return
        host, _, port = self.ray_address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=10).close()
        except OSError as exc:
            raise ConfigError(f"--ray-address={self.ray_address}: no Ray head answers there "
                              f"({exc}); start one with `ray start --head --port {port}`") from exc

    def federation_config(self, num_supernodes: int) -> str:
        """`flwr run --federation-config`: the federation size and each client's share."""
        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else repr(float(x))

        text = f"num-supernodes={num_supernodes} client-resources-num-cpus={num(self.client_cpus)}"
        if self.client_gpus:
            text += f" client-resources-num-gpus={float(self.client_gpus)!r}"
        return text

    def env(self, client_env: dict[str, str]) -> dict[str, str]:
        """What the simulation process needs. On this machine's own Ray, its workers
        inherit the environment (`client_env` included). On an existing cluster
        (RAY_ADDRESS) the workers are started by that cluster's nodes, so `client_env`
        (the node config, Flower's switches, dpfl's own variables) travels in the job's
        runtime environment, which Ray merges with the one Flower sets."""
        if not self.ray_address:
            return {}
        env_vars = {**FLOWER_ENV, **{k: v for k, v in os.environ.items() if k.startswith("DPFL_")},
                    **client_env}
        return {"RAY_ADDRESS": self.ray_address,
                "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"env_vars": env_vars}})}


# What the in-process runtime's fork server imports once for all its workers.
PRELOAD = ["simulations.preload"]


def worker_context() -> Any:
    """The multiprocessing context of the in-process runtime's workers: forked from
    Python's fork server, which imports the ClientApp and Opacus once and never runs a
    torch operation, so workers start in milliseconds and share those modules' memory
    (a process whose torch threads have run must never fork)."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(trim: int = 256 << 20, mmap: int = 128 << 20) -> bool:
    """Ask glibc's malloc to keep up to `trim` bytes of freed memory in the process and to
    serve blocks under `mmap` bytes from its heap. By default it maps a large block
    afresh and hands freed memory back to the kernel; a client's round frees and
    allocates the same arrays again (its records, their shuffled copy, the model, Opacus'
    per-sample gradients: 95 MB for the default model), and each fresh page costs a
    page fault: a sixth of a small model's round on this machine's virtual CPUs. Setting
    either disables glibc's own adaptive threshold (at most 32 MB), so both are set high:
    with 16 MB, the 32 MB buffer a matrix product packs for a large batch faulted in
    afresh every time (an evaluation took twice as long). Memory stays at the round's
    peak instead of returning to the kernel between rounds. False where there is no
    glibc (nothing changes)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_TRIM_THRESHOLD, trim)) and \
            bool(libc.mallopt(M_MMAP_THRESHOLD, mmap))
    except (OSError, AttributeError):
        return False


def warm_up() -> None:
    """Start the fork server in the background (its imports take seconds), so that it
    is ready when the command's own imports and checks are done. Light to call: the
    command calls it before importing torch."""
    import threading
    from multiprocessing import forkserver

    def start() -> None:
        worker_context()
        with contextlib.suppress(Exception):  # a failure shows again when workers start
            forkserver.ensure_running()

    threading.Thread(target=start, name="dpfl-warm-up", daemon=True).start()


def stop_fork_server() -> None:
    """Stop this process's fork server once a run's workers are done (the worker pool
    stops the workers themselves): a run leaves no process behind. The next run starts
    a fresh one, with the environment of that time."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    with contextlib.suppress(OSError, ChildProcessError, AttributeError):
        server._stop()  # type: ignore[union-attr]  # CPython's own way to stop it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment of every Flower process dpfl starts."""
    env = dict(os.environ)
    env.update(FLOWER_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    # Flower spawns `flwr-serverapp` / `flwr-clientapp` by name: use this interpreter's.
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def wait_for_port(port: int, *, proc: subprocess.Popen | None, timeout: float, what: str,
                  log_file: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log_file.read_text()[-3000:] if log_file and log_file.exists() else ""
            raise RuntimeError(f"{what} exited with code {proc.returncode}\n{tail}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not open port {port} within {timeout:.0f}s")


def stop(proc: subprocess.Popen, *, grace: float = 8.0) -> None:
    """Stop a process started with start_new_session=True and every descendant, by PID:
    SIGTERM to all of them at once, SIGKILL to whatever is left after `grace` seconds.

    Flower's SuperLink starts the simulation (and Ray's processes) in sessions of their
    own, so killing the process group alone would leave them running."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    for child in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    deadline = time.monotonic() + grace
    _, alive = psutil.wait_procs(tree, timeout=grace)
    try:
        proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(alive, timeout=5)


def start(cmd: Sequence[str], *, env: dict[str, str], log_file: Path,
          cwd: Path | None = None) -> subprocess.Popen:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    out = open(log_file, "ab")
    try:
        return subprocess.Popen(
            list(cmd), env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
    finally:
        out.close()


@contextmanager
def simulation_superlink(flwr_home: Path, log_file: Path,
                         extra_env: dict[str, str] | None = None) -> Iterator[str]:
    """A private simulation SuperLink; yields the name of its connection in FLWR_HOME.
    `extra_env` reaches every process it starts, the virtual clients included (the node
    operator's channel in simulation: see common.node.NODE_CONFIG_ENV)."""
    port = free_port()  # Flower 1.41 serves Runtime, Control and Fleet APIs on this one port
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "dpfl-sim"\n\n'
        f'[superlink.dpfl-sim]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = {**flower_env(flwr_home), **(extra_env or {})}
    proc = start([
        tool("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
        "--host", "127.0.0.1", "--port", str(port),
        "--disable-runtime-dependency-installation",
    ], env=env, log_file=log_file, cwd=flwr_home)
    try:
        wait_for_port(port, proc=proc, timeout=60, what="flower-superlink", log_file=log_file)
        yield "dpfl-sim"
    finally:
        stop(proc)
