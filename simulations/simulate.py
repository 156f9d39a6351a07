"""`dpfl simulate`: the apps with N virtual clients through Flower's simulation runtime.

The config is validated first (a bad field stops here, before any process starts); then
a private SuperLink is started, `flwr run` submits this project with the overrides, and
progress is read from the run's rounds.jsonl as the ServerApp writes it.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from common.config import (
    FIELD_TYPES,
    NODE_CONFIG_ENV,
    ConfigError,
    ExperimentConfig,
    default_run_config,
    node_policy_for,
    project_root,
    resolve_config,
)
from common.data import cached_partitions as partition_cache
from common.data import locate
from common.results import prepare_run_dir, read_json, read_rounds, write_json
from simulations import runtime

LEDGERS = "ledgers"


class SimulationError(RuntimeError):
    """The run did not complete; the message says where its logs are."""


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value))


def format_overrides(overrides: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={toml_value(v)}" for k, v in overrides.items())


def new_run_name() -> str:
    return time.strftime("sim-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def prepare(overrides: Mapping[str, Any], output_dir: str | None = None
            ) -> tuple[ExperimentConfig, dict[str, Any]]:
    """Validate everything that can be checked before starting processes."""
    over = dict(overrides)
    if output_dir is not None:
        over["output-dir"] = output_dir
    over.setdefault("run-name", "")
    if not over["run-name"]:
        over["run-name"] = new_run_name()
    out = Path(str(over.get("output-dir") or default_run_config()["output-dir"])).expanduser()
    over["output-dir"] = str(out.resolve())
    cfg = resolve_config(over)
    run_dir = out.resolve() / cfg.runtime.run_name
    if (run_dir / "rounds.jsonl").exists() or (run_dir / "summary.json").exists():
        raise ConfigError(f"run-name={cfg.runtime.run_name!r}: {run_dir} already holds a run")
    locate(cfg.data.data_dir or None)  # data problems are reported before any process starts
    check_partitions(cfg)
    if cfg.runtime.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("device='cuda' but torch sees no CUDA device on this machine")
    try:
        prepare_run_dir(run_dir)
    except OSError as exc:  # FileExistsError included: the check above can race
        raise ConfigError(f"output-dir={str(out)!r}: {exc}") from exc
    return cfg, over


def check_partitions(cfg: ExperimentConfig) -> None:
    """Every virtual client must hold data, and delta must be below 1/n for the smallest."""
    d = cfg.data
    sizes = [len(p) for p in partition_cache(
        d.data_dir, d.partitioner, cfg.federation.num_partitions, d.seed,
        float(d.dirichlet_alpha), d.labels_per_client,
    )]
    smallest = min(sizes)
    if smallest == 0:
        raise ConfigError(
            f"num-partitions={cfg.federation.num_partitions}: partition {sizes.index(0)} of "
            f"the {d.partitioner} split has no records"
        )
    cfg.privacy.check_delta(smallest, client=f"the smallest client (partition {sizes.index(smallest)})")


def simulate(
    overrides: Mapping[str, Any], *, output_dir: str | None = None, client_cpus: float = 1.0,
    progress: Callable[[str], None] | None = print, timeout: float = 6 * 3600,
    ledger_dir: str | Path | None = None,
) -> Path:
    """Run one experiment; returns its run directory (with summary.json). Every virtual
    client keeps its ledger in `ledger_dir` (default: the run's `ledgers/`), so a resumed
    run, or a later run given the same folder, continues its epsilon."""
    cfg, over = prepare(overrides, output_dir)
    return _launch(cfg, over, client_cpus=client_cpus, progress=progress, timeout=timeout,
                   ledger_dir=ledger_dir)


def resume_overrides(run_dir: Path) -> dict[str, Any]:
    """The run config a killed run started with, set to resume it."""
    from server import checkpoint

    run_dir = Path(run_dir).expanduser().resolve()
    if not (run_dir / "config.json").exists():
        raise ConfigError(f"{run_dir} is not a dpfl run directory (no config.json)")
    checkpoint.load(run_dir)  # a clear error if finished, unstarted or unreadable
    saved = read_json(run_dir / "config.json")["run_config"]
    over: dict[str, Any] = {}
    for key, value in saved.items():
        if key not in FIELD_TYPES:
            continue  # a key of an older dpfl (e.g. ledger-dir, now the harness's)
        typ = FIELD_TYPES.get(key, (None, str))[1]
        over[key] = float(value) if typ is float and isinstance(value, str) else value
    over.update({"resume": True, "output-dir": str(run_dir.parent), "run-name": run_dir.name})
    return over


def resume(run_dir: Path, *, client_cpus: float = 1.0,
           progress: Callable[[str], None] | None = print, timeout: float = 6 * 3600,
           ledger_dir: str | Path | None = None) -> Path:
    """Continue a killed `dpfl simulate` run from its last complete round (with the ledger
    folder it ran with: the run's `ledgers/` unless `ledger_dir` is given)."""
    over = resume_overrides(run_dir)
    cfg = resolve_config(over)
    return _launch(cfg, over, client_cpus=client_cpus, progress=progress, timeout=timeout,
                   ledger_dir=ledger_dir)


def node_env(cfg: ExperimentConfig, ledger_dir: Path) -> dict[str, str]:
    """The node config every virtual client gets (NODE_CONFIG_ENV): a policy that accepts
    exactly this run (the harness is both the data holders and the server here), and
    where its ledger file lives. Only the harness sets it, never the run config."""
    policy = {**node_policy_for(cfg), "ledger-dir": str(ledger_dir)}
    return {NODE_CONFIG_ENV: format_overrides(policy)}


def reconcile_privacy(run_dir: Path, ledger_dir: Path, cfg: ExperimentConfig) -> None:
    """Every client's epsilon from its own ledger file, the truth in simulation: it also
    counts rounds whose reply the server never used (timed out, failed after training).
    Rewrites privacy.json's clients and summary.json's epsilon max and mean."""
    from client.ledger import Ledger

    ledgers = sorted(ledger_dir.glob("partition-*.json"))
    if not ledgers or not (run_dir / "privacy.json").exists():
        return
    priv = cfg.privacy
    record = read_json(run_dir / "privacy.json")
    clients = record.setdefault("clients", {})
    for path in ledgers:
        pid = path.stem.removeprefix("partition-")
        if not pid.isdigit() or int(pid) >= cfg.federation.num_partitions:
            continue
        ledger = Ledger.from_json(path.read_text(), source=str(path))
        eps = ledger.epsilon(priv.target_delta, priv.accountant)
        entry = clients.setdefault(pid, {"sample_rate": 0.0})
        entry.update({"history": [list(e) for e in ledger.history], "epsilon": eps,
                      "noise_multiplier": ledger.noise_multiplier or 0.0,
                      "unconfirmed_rounds": [], "ledger": str(path)})
    record["source"] = "ledger files"
    write_json(run_dir / "privacy.json", record)
    if (run_dir / "summary.json").exists():
        values = [float(c["epsilon"]) for c in clients.values()] or [0.0]
        summary = read_json(run_dir / "summary.json")
        summary.update({"epsilon_max": max(values), "epsilon_mean": sum(values) / len(values),
                        "clients_unconfirmed": 0})
        write_json(run_dir / "summary.json", summary)


def _launch(cfg: ExperimentConfig, over: dict[str, Any], *, client_cpus: float,
            progress: Callable[[str], None] | None, timeout: float,
            ledger_dir: str | Path | None = None) -> Path:
    run_dir = Path(over["output-dir"]) / cfg.runtime.run_name
    logs = run_dir / "logs"
    ledgers = Path(ledger_dir).expanduser().resolve() if ledger_dir else run_dir / LEDGERS
    flwr_home = Path(tempfile.mkdtemp(prefix="dpfl-flwr-home-"))
    say = progress or (lambda _msg: None)
    n = cfg.federation.num_partitions
    say(f"dpfl: {'resuming ' if cfg.runtime.resume else ''}{n} virtual clients, "
        f"{cfg.federation.num_rounds} rounds, "
        + (f"target epsilon {cfg.privacy.target_epsilon}, delta {cfg.privacy.target_delta}"
           if cfg.privacy.private else "non-private baseline")
        + f" -> {run_dir}")
    t0 = time.time()
    try:
        with runtime.simulation_superlink(flwr_home, logs / "superlink.log",
                                          extra_env=node_env(cfg, ledgers)) as connection:
            cmd = [
                runtime.tool("flwr"), "run", str(project_root()), connection,
                "--run-config", format_overrides(over),
                "--federation-config",
                f"num-supernodes={n} client-resources-num-cpus={toml_value(int(client_cpus) if float(client_cpus).is_integer() else float(client_cpus))}",
                "--stream",
            ]
            proc = runtime.start(cmd, env=runtime.flower_env(flwr_home), log_file=logs / "flwr.log",
                                 cwd=project_root())
            try:
                _follow(proc, run_dir, cfg, say, t0, timeout)
            finally:
                runtime.stop(proc)
    finally:
        shutil.rmtree(flwr_home, ignore_errors=True)
    reconcile_privacy(run_dir, ledgers, cfg)
    if not (run_dir / "summary.json").exists():
        tail = (logs / "flwr.log").read_text(errors="replace")[-4000:] if (logs / "flwr.log").exists() else ""
        raise SimulationError(f"the run ended without a summary; logs in {logs}\n{tail}")
    if ledgers == run_dir / LEDGERS:
        for spare in ledgers.glob("*.reply.npz"):  # only needed to resume
            spare.unlink(missing_ok=True)
    return run_dir


def _follow(proc: subprocess.Popen, run_dir: Path, cfg: ExperimentConfig,
            say: Callable[[str], None], t0: float, timeout: float) -> None:
    shown = len(read_rounds(run_dir / "rounds.jsonl")) if cfg.runtime.resume else 0
    while True:
        done = proc.poll() is not None or (run_dir / "summary.json").exists()
        rows = read_rounds(run_dir / "rounds.jsonl")
        for row in rows[shown:]:
            say(progress_line(row, cfg.federation.num_rounds, time.time() - t0))
        shown = len(rows)
        if done:
            if (run_dir / "summary.json").exists():
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            return
        if time.time() - t0 > timeout:
            raise SimulationError(f"the run took longer than {timeout:.0f}s; stopped")
        time.sleep(1.0)


def progress_line(row: Mapping[str, Any], num_rounds: int, elapsed: float) -> str:
    eps = row.get("epsilon_max")
    eps_txt = f"{float(eps):.3f}" if eps is not None else "-"
    return (
        f"round {row['round']:>3}/{num_rounds}  accuracy {float(row['test_accuracy']):.4f}  "
        f"epsilon max {eps_txt}  trained {row['clients_trained']}/{row['clients_sampled']}"
        f"  refused {row['clients_refused']}  failed {row['clients_failed']}  "
        f"[{elapsed:.0f}s]"
    )


def summary_text(run_dir: Path) -> str:
    s = read_json(run_dir / "summary.json")
    lines = [
        f"run directory   {run_dir}",
        f"final accuracy  {float(s['final_accuracy']):.4f} (best {float(s['best_accuracy']):.4f})",
        f"epsilon         max {s['epsilon_max']}  mean {s['epsilon_mean']}  "
        f"(target {s['target_epsilon']}, delta {s['delta']})",
        f"rounds          {s['rounds']} with {s['num_clients']} clients, "
        f"{float(s['wall_seconds']):.0f}s in the ServerApp",
    ]
    if s.get("stopped_early"):
        lines.append(f"STOPPED EARLY   {s['stopped_early']}")
    return "\n".join(lines)

