"""`dpfl simulate`: the apps with N virtual clients through Flower's simulation runtime.

The config is validated first (a bad field stops here, before any process starts); then
a private SuperLink is started, `flwr run` submits this project with the overrides, and
progress is read from the run's rounds.jsonl as the ServerApp writes it.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from common import audit, presets, privacy, roster
from common.catalogue import DEFAULT_DATASET
from common.config import (
    ConfigError,
    ExperimentConfig,
    default_run_config,
    parse_config,
    project_root,
    resolve_config,
)
from common.data import input_spec, partitions_of, release_cached
from common.errors import SimulationError
from common.fashion_mnist import locate
from common.models import MODEL_FEATURES, build_model, dp_problem
from common.node import NODE_CONFIG_ENV, node_policy_for
from common.records import ClientRecord, RoundRecord, RunDir, run_dir
from simulations import runtime

ROSTER_DIR = "roster"  # a secure run's roster and members' identity keys (the harness issues them)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if '"' not in text:
        return json.dumps(text, ensure_ascii=False)
    if "'" not in text and "\n" not in text:
        return f"'{text}'"  # a TOML literal string
    raise ConfigError(f"the value {text!r} holds both quote characters: it cannot be passed "
                      "to flwr run's --run-config")


def format_overrides(overrides: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={toml_value(v)}" for k, v in overrides.items())


def new_run_name() -> str:
    return time.strftime("sim-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def named(cfg: ExperimentConfig, output_dir: str | None = None) -> ExperimentConfig:
    """`cfg` with its run directory fixed: `output_dir` (if given) made absolute, and a
    fresh run-name if it has none."""
    rt = cfg.runtime
    chosen = output_dir or rt.output_dir or str(default_run_config()["output-dir"])
    out = str(Path(chosen).expanduser().resolve())
    return replace(cfg, runtime=replace(rt, output_dir=out, run_name=rt.run_name or new_run_name()))


def check(cfg: ExperimentConfig) -> RunDir:
    """Everything that can be checked before starting processes; creates the (empty) run
    directory, refusing one that already holds a run."""
    from flwr.common.config import parse_config_args

    text = format_overrides(cfg.to_run_config())
    if parse_config({**default_run_config(), **parse_config_args([text])}).to_run_config() \
            != cfg.to_run_config():  # what flwr run will read back
        raise ConfigError(f"the run config does not survive flwr run's --run-config syntax: {text}")
    run = RunDir(run_dir(cfg.runtime.output_dir, cfg.runtime.run_name))
    if run.holds_run():
        raise ConfigError(f"run-name={cfg.runtime.run_name!r}: {run.path} already holds a run")
    if cfg.data.dataset == DEFAULT_DATASET:
        locate(cfg.data.data_dir or None)  # data problems are reported before any process starts
    check_partitions(cfg)
    check_model(cfg)
    if cfg.runtime.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("device='cuda' but torch sees no CUDA device on this machine")
    try:
        return run.create()
    except OSError as exc:  # FileExistsError included: the check above can race
        raise ConfigError(f"output-dir={cfg.runtime.output_dir!r}: {exc}") from exc


def prepare(overrides: Mapping[str, Any], output_dir: str | None = None) -> ExperimentConfig:
    """Defaults + `overrides`, validated, named and checked (see `check`)."""
    cfg = named(resolve_config(overrides), output_dir)
    if cfg.data.data_dir and not Path(cfg.data.data_dir).expanduser().is_absolute():
        # the apps run from Flower's copy of the project, not from here
        cfg = replace(cfg, data=replace(cfg.data, data_dir=str(Path(cfg.data.data_dir).resolve())))
    check(cfg)
    release_data()
    return cfg


def release_data() -> None:
    """Drop the arrays the checks loaded (the training set, its partitions): this process
    only follows the run from here, for as long as it lasts."""
    import gc

    release_cached()
    gc.collect()


def check_model(cfg: ExperimentConfig) -> None:
    """The model builds for the dataset's records and, in a private run, Opacus can train
    it (its ModuleValidator, with the fix Opacus suggests)."""
    shape, classes = input_spec(cfg.data, MODEL_FEATURES.get(cfg.train.model, ""))
    try:
        model = build_model(cfg.train.model, shape=shape, classes=classes)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    problem = dp_problem(model, cfg.train.model) if cfg.privacy.private else None
    if problem:
        raise ConfigError(problem)


def check_partitions(cfg: ExperimentConfig) -> None:
    """Every virtual client must hold data, and delta must be below 1/n for the smallest."""
    d = cfg.data
    parts = cfg.federation.num_partitions
    sizes = [len(p) for p in partitions_of(d, parts)]
    if min(sizes) == 0:
        raise ConfigError(
            f"num-partitions={cfg.federation.num_partitions}: partition {sizes.index(0)} of "
            f"the {d.partitioner} split has no records"
        )
    n = [size + audit.slot_count(cfg.audit.audit_canaries, parts, i)  # with canary slots
         for i, size in enumerate(sizes)]
    cfg.privacy.check_delta(min(n), client=f"the smallest client (partition {n.index(min(n))})")


def simulate(
    overrides: Mapping[str, Any], *, output_dir: str | None = None,
    backend: runtime.Backend | None = None,
    progress: Callable[[str], None] | None = print, timeout: float = 6 * 3600,
    ledger_dir: str | Path | None = None,
) -> Path:
    """Run one experiment; returns its run directory (with summary.json). Every virtual
    client keeps its ledger in `ledger_dir` (default: the run's `ledgers/`), so a resumed
    run, or a later run given the same folder, continues its epsilon."""
    backend = backend or runtime.Backend()
    backend.check()
    if backend.engine == "inprocess":
        runtime.warm_up()  # its imports run beside the checks
    cfg = prepare(overrides, output_dir)
    line = presets.hint(cfg.to_run_config(), default_run_config())
    if line:
        print(line, file=sys.stderr)  # a warning, not progress: shown with --quiet too
    return launch(cfg, backend=backend, progress=progress, timeout=timeout,
                  ledger_dir=ledger_dir)


def resume_config(path: Path) -> ExperimentConfig:
    """The config a killed run started with, set to resume it."""
    from server import checkpoint

    run = RunDir(Path(path).expanduser().resolve())
    info = run.info()
    if info is None:
        raise ConfigError(f"{run.path} is not a dpfl run directory (no run config)")
    checkpoint.load(run.path)  # a clear error if finished, unstarted or unreadable
    cfg = info.config()
    return replace(cfg, runtime=replace(cfg.runtime, resume=True, output_dir=str(run.path.parent),
                                        run_name=run.path.name))


def resume(run_dir: Path, *, backend: runtime.Backend | None = None,
           progress: Callable[[str], None] | None = print, timeout: float = 6 * 3600,
           ledger_dir: str | Path | None = None) -> Path:
    """Continue a killed `dpfl simulate` run from its last complete round (with the ledger
    folder it ran with: the run's `ledgers/` unless `ledger_dir` is given)."""
    (backend or runtime.Backend()).check()
    return launch(resume_config(run_dir), backend=backend, progress=progress,
                  timeout=timeout, ledger_dir=ledger_dir)


def node_env(cfg: ExperimentConfig, ledger_dir: Path, roster_dir: Path | None = None
             ) -> dict[str, str]:
    """The node config every virtual client gets (NODE_CONFIG_ENV): a policy that accepts
    exactly this run (the harness is both the data holders and the server here), where
    its ledger file lives and, for secure aggregation, the roster the harness issued and
    the folder of the members' identity keys. Only the harness sets it, never the run
    config."""
    policy = {**node_policy_for(cfg), "ledger-dir": str(ledger_dir), "cache-records": False}
    if cfg.secure.enabled and roster_dir is not None:
        policy.update(harness_roster(roster_dir, cfg.federation.num_partitions))
    return {NODE_CONFIG_ENV: format_overrides(policy)}


def harness_roster(folder: Path, num_partitions: int) -> dict[str, str]:
    """Node config of a simulation's members: the harness issues the roster (one identity
    key per partition, kept for a resumed run) and every member trusts it."""
    roster_file = roster.issue(folder, range(num_partitions))
    return {"roster": str(roster_file), "identity-dir": str(folder)}


def reconcile_privacy(run: RunDir, ledger_dir: Path, cfg: ExperimentConfig) -> None:
    """Every client's epsilon from its own ledger file, the truth in simulation: it also
    counts rounds whose reply the server never used (timed out, failed after training).
    Rewrites the privacy record's clients and the summary's epsilon max and mean."""
    from client.ledger import Ledger

    ledgers = sorted(ledger_dir.glob("partition-*.json"))
    record = run.privacy()
    if not ledgers or record is None:
        return
    priv = cfg.privacy
    clients = dict(record.clients)
    for path in ledgers:
        pid = path.stem.removeprefix("partition-")
        if not pid.isdigit() or int(pid) >= cfg.federation.num_partitions:
            continue
        ledger = Ledger.from_json(path.read_text(), source=str(path))
        eps = ledger.epsilon(priv.target_delta, priv.accountant)
        clients[pid] = replace(
            clients.get(pid, ClientRecord()), history=[list(e) for e in ledger.history],
            epsilon=eps, epsilon_alone=max(eps, privacy.epsilon_alone(
                ledger.history, priv.target_delta, priv.accountant)),
            noise_multiplier=ledger.noise_multiplier or 0.0, unconfirmed_rounds=[],
            ledger=str(path))
    record = replace(record, clients=clients, source="ledger files")
    run.write_privacy(record)
    summary = run.summary()
    if summary is not None:
        eps_max, eps_mean = record.epsilon_stats()
        run.write_summary(replace(summary, epsilon_max=eps_max, epsilon_mean=eps_mean,
                                  clients_unconfirmed=0))


def launch(cfg: ExperimentConfig, *, progress: Callable[[str], None] | None, timeout: float,
           ledger_dir: str | Path | None = None, backend: runtime.Backend | None = None) -> Path:
    """Run `cfg` on the backend's runtime (dpfl's in-process one, or Flower's simulation
    engine on Ray) and follow it; returns its run directory."""
    backend = backend or runtime.Backend()
    run = RunDir(run_dir(cfg.runtime.output_dir, cfg.runtime.run_name))
    ledgers = Path(ledger_dir).expanduser().resolve() if ledger_dir else run.ledgers
    say = progress or (lambda _msg: None)
    n = cfg.federation.num_partitions
    where = (f" on the Ray cluster at {backend.ray_address}" if backend.ray_address
             else " on Flower's simulation engine" if backend.engine == "flower" else "")
    say(f"dpfl: {'resuming ' if cfg.runtime.resume else ''}{n} virtual clients, "
        f"{cfg.federation.num_rounds} rounds, "
        + (f"target epsilon {cfg.privacy.target_epsilon}, delta {cfg.privacy.target_delta}"
           if cfg.privacy.private else "non-private baseline")
        + where + f" -> {run.path}")
    t0 = time.time()
    client_env = node_env(cfg, ledgers, run.path / ROSTER_DIR)
    log_name = "flwr.log" if backend.engine == "flower" else "server.log"
    try:
        if backend.engine == "flower":
            _launch_flower(cfg, run, backend, client_env, say, t0, timeout)
        else:
            _launch_inprocess(cfg, run, backend, client_env, say, t0, timeout)
    except BaseException:
        with contextlib.suppress(Exception):  # what the clients spent, even in a failed run
            reconcile_privacy(run, ledgers, cfg)
        raise
    reconcile_privacy(run, ledgers, cfg)
    if run.summary() is None:
        log = run.logs / log_name
        tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
        raise SimulationError(f"the run ended without a summary; logs in {run.logs}\n{tail}")
    if ledgers == run.ledgers:
        from client.ledger import REPLY_SUFFIX

        for spare in [*ledgers.glob(f"*{REPLY_SUFFIX}"), *ledgers.glob("*.reply.npz")]:
            spare.unlink(missing_ok=True)  # only needed to resume (.npz: older dpfl's)
    return run.path


def _launch_flower(cfg: ExperimentConfig, run: RunDir, backend: runtime.Backend,
                   client_env: dict[str, str], say: Callable[[str], None], t0: float,
                   timeout: float) -> None:
    """A private SuperLink, `flwr run` of this project, the run followed from its files."""
    flwr_home = Path(tempfile.mkdtemp(prefix="dpfl-flwr-home-"))
    try:
        with runtime.simulation_superlink(flwr_home, run.logs / "superlink.log",
                                          extra_env={**client_env, **backend.env(client_env)}
                                          ) as connection:
            cmd = [
                runtime.tool("flwr"), "run", str(project_root()), connection,
                "--run-config", format_overrides(cfg.to_run_config()),
                "--federation-config", backend.federation_config(cfg.federation.num_partitions),
                "--stream",
            ]
            proc = runtime.start(cmd, env=runtime.flower_env(flwr_home),
                                 log_file=run.logs / "flwr.log", cwd=project_root())
            try:
                _follow(proc, run, cfg, say, t0, timeout)
            finally:
                runtime.stop(proc)
    finally:
        shutil.rmtree(flwr_home, ignore_errors=True)


def _source(record: Any) -> bool:
    """Names a log line's source in the run's server.log: dpfl's or Flower's."""
    record.source = "dpfl" if record.name.startswith("dpfl") else "flwr"
    return True


def _launch_inprocess(cfg: ExperimentConfig, run: RunDir, backend: runtime.Backend,
                      client_env: dict[str, str], say: Callable[[str], None], t0: float,
                      timeout: float) -> None:
    """The ServerApp in this process on an InProcessGrid, the ClientApp in worker
    processes (simulations/inprocess.py); progress read from the run's files by a
    thread, as for Flower's runtime."""
    import _thread
    import logging
    import os
    import random
    import threading

    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from common import keys
    from server.app import app as server_app
    from simulations.inprocess import InProcessGrid, WorkerPool, node_ids

    n = cfg.federation.num_partitions
    workers = backend.worker_count(cfg)
    threads = cfg.runtime.num_threads or max(1, (os.cpu_count() or 1) // workers)
    run.logs.mkdir(parents=True, exist_ok=True)
    run_config = {**default_run_config(), **cfg.to_run_config()}
    run_id = random.SystemRandom().randrange(1, 2**63)
    server_log = logging.getLogger("dpfl.server")
    handler = logging.FileHandler(run.logs / "server.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(source)s | %(message)s"))
    handler.addFilter(_source)
    server_log.addHandler(handler)
    server_log.setLevel(logging.INFO)
    server_log.propagate = False
    flower_log = logging.getLogger("flwr")  # Flower's own lines go to the log as well
    flower_handlers = list(flower_log.handlers)
    for h in flower_handlers:
        flower_log.removeHandler(h)
    flower_log.addHandler(handler)
    flower_propagates, flower_log.propagate = flower_log.propagate, False
    done = threading.Event()
    late = threading.Event()

    def follow() -> None:
        shown = _shown_before(run, cfg)
        while True:
            finished = done.wait(timeout=0.5)
            shown = _show_rounds(run, cfg, say, t0, shown)
            if finished:
                return
            if time.time() - t0 > timeout and not late.is_set() and not done.is_set():
                late.set()
                _thread.interrupt_main()

    follower = threading.Thread(target=follow, name="dpfl-progress", daemon=True)
    follower.start()
    try:
        with WorkerPool(workers, env=client_env, threads=threads,
                        log_file=str(run.logs / "clients.log")) as pool:
            pool.add_nodes({node: {keys.NODE_PARTITION_ID: p, keys.NODE_NUM_PARTITIONS: n}
                            for p, node in enumerate(node_ids(n))},
                           run_id=run_id, run_config=run_config)
            TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 1
            server_app(InProcessGrid(pool, run_id),
                       Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(),
                               run_config=run_config))
    except KeyboardInterrupt:
        if late.is_set():
            raise SimulationError(f"the run took longer than {timeout:.0f}s; stopped") from None
        raise
    except Exception as exc:
        import traceback

        with open(run.logs / "server.log", "a") as f:
            f.write(traceback.format_exc())
        raise SimulationError(f"the ServerApp stopped: {type(exc).__name__}: {exc} "
                              f"(logs in {run.logs})") from exc
    finally:
        done.set()  # first: the follower never interrupts the clean-up
        follower.join(timeout=5)
        runtime.stop_fork_server()
        server_log.removeHandler(handler)
        flower_log.removeHandler(handler)
        for h in flower_handlers:
            flower_log.addHandler(h)
        flower_log.propagate = flower_propagates
        handler.close()


def _follow(proc: subprocess.Popen, run: RunDir, cfg: ExperimentConfig,
            say: Callable[[str], None], t0: float, timeout: float) -> None:
    shown = _shown_before(run, cfg)
    while True:
        finished = run.status() == "finished"
        done = proc.poll() is not None or finished
        shown = _show_rounds(run, cfg, say, t0, shown)
        if done:
            if finished:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            return
        if time.time() - t0 > timeout:
            raise SimulationError(f"the run took longer than {timeout:.0f}s; stopped")
        time.sleep(1.0)


def _shown_before(run: RunDir, cfg: ExperimentConfig) -> int:
    """Rounds already on the console when following starts (a resumed run's)."""
    return len(run.rounds()) if cfg.runtime.resume else 0


def _show_rounds(run: RunDir, cfg: ExperimentConfig, say: Callable[[str], None], t0: float,
                 shown: int) -> int:
    """One progress line for each round recorded since `shown`; the rounds shown now."""
    rows = run.rounds()
    for row in rows[shown:]:
        say(progress_line(row, cfg.federation.num_rounds, time.time() - t0))
    return len(rows)


def progress_line(row: RoundRecord, num_rounds: int, elapsed: float) -> str:
    federated = (f"  federated {row.federated_accuracy:.4f} ± {row.federated_accuracy_interval:.4f}"
                 f" ({row.federated_examples} records on {row.federated_nodes} nodes)"
                 if row.federated_nodes else "")
    return (
        f"round {row.round:>3}/{num_rounds}  accuracy {row.test_accuracy:.4f}{federated}  "
        f"epsilon max {row.epsilon_max:.3f}  trained {row.clients_trained}/{row.clients_sampled}"
        f"  refused {row.clients_refused}  failed {row.clients_failed}  [{elapsed:.0f}s]"
    )


def summary_text(path: Path) -> str:
    summary = RunDir(path).summary()
    if summary is None:
        raise SimulationError(f"{path} holds no finished run")
    return summary.text(path)
