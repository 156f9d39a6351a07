"""The run directory's format, owned here and nowhere else.

A run directory `<output-dir>/<run-name>/` holds:

| file | record | written |
|---|---|---|
| config.json | `RunInfo`: the run config and provenance | once, before round 1 |
| rounds.jsonl | one `RoundRecord` per line | after every round, whole and flushed |
| privacy.json | `PrivacyRecord`: every client's history and epsilon | after every round |
| summary.json | `RunSummary` | at the end: its presence means "finished" |
| model.npz | the final global model | at the end |
| checkpoint.npz | what resuming needs (server/checkpoint.py fills it) | after every round |
| failed.json | `Failure`, when a sweep point could not run | by the sweep |
| logs/, ledgers/ | the harness's process logs and the virtual clients' ledgers | by the harness |

A sweep directory holds `sweep.json` and one run directory per point. JSON has no
infinity or NaN: `encode` writes them as the strings "inf", "-inf", "nan" and
`decode_float` reads them back. JSON files are replaced atomically and rounds.jsonl lines
are written whole and flushed, so a run killed at any moment leaves files that parse.
One module (~500 lines) because it is one format: every record type, its encoding and the
run directory that reads and writes them.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from common.config import FIELD_TYPES, default_run_config, parse_config
from common.files import atomic_write, atomic_write_text

CONFIG_FILE = "config.json"
ROUNDS_FILE = "rounds.jsonl"
PRIVACY_FILE = "privacy.json"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.npz"
CHECKPOINT_FILE = "checkpoint.npz"
FAILED_FILE = "failed.json"
AUDIT_FILE = "audit.json"  # audit-canaries > 0: the empirical privacy audit
CANARY_SCORES_FILE = "canary-scores.npz"  # the auditor's running scores (resume)
LOGS_DIR = "logs"
TRANSCRIPT_DIR = "transcript"  # keep-transcript: what the server received, per round
LEDGERS_DIR = "ledgers"
SWEEP_FILE = "sweep.json"

LIBRARIES = ("torch", "flwr", "opacus", "flwr-datasets", "numpy", "dp-accounting")


# ---------------------------------------------------------------- the ∞ / NaN encoding


class Encoded(dict):  # type: ignore[type-arg]
    """A dict already as `encode` makes it: `encode` takes it as it is (a run writes every
    client's record after every round, most of them unchanged since they were encoded)."""


def encode(value: Any) -> Any:
    """A JSON-able copy of `value`: non-finite floats become "inf", "-inf" or "nan",
    numpy scalars plain numbers, tuples lists (an `Encoded` dict: itself)."""
    kind = type(value)  # the common kinds first: every round writes thousands of values
    if kind is Encoded:
        return value
    if kind is float:
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if kind is int or kind is str or kind is bool or value is None:
        return value
    if kind is list:
        return [encode(v) for v in value]
    if kind is dict:
        return {str(k): encode(v) for k, v in value.items()}
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: encode(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    if isinstance(value, np.generic):
        return encode(value.item())
    return value


def decode_float(value: Any) -> float:
    """A number as `encode` wrote it ("inf", "-inf", "nan" or a number) -> float. Anything
    else is NaN (a field an older dpfl did not write)."""
    if isinstance(value, bool):
        return math.nan
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("inf", "+inf", "-inf", "nan"):
        return float(value.strip().lower())
    return math.nan


def dumps(value: Any) -> str:
    return json.dumps(encode(value), allow_nan=False)


def pretty(value: Any, depth: int = 2, pad: str = "") -> str:
    """JSON of an encoded value with its objects spread over lines to `depth` levels and
    everything deeper on one line each (privacy.json: a client a line). Python's json
    indents only in pure Python, ten times slower than its one-line encoder, and a run
    writes every client's record after every round."""
    if depth == 0 or not isinstance(value, dict) or not value:
        return json.dumps(value, allow_nan=False)
    inner = pad + "  "
    return "{\n" + ",\n".join(f"{inner}{json.dumps(str(k))}: {pretty(v, depth - 1, inner)}"
                              for k, v in value.items()) + "\n" + pad + "}"


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, pretty(encode(data)) + "\n")


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------- records

R = TypeVar("R", bound="Record")


class Record:
    """A frozen dataclass written as one JSON object. `from_json` takes the fields it
    knows (a missing one keeps its default; an unknown one, from another dpfl version, is
    ignored) and decodes every float field."""

    def to_json(self) -> dict[str, Any]:
        """Encoded once (a record is frozen): callers must not change what it returns."""
        cached = self.__dict__.get("_json")
        if cached is None:
            cached = self.__dict__["_json"] = Encoded(encode(self))
        return cached  # type: ignore[no-any-return]

    @classmethod
    def from_json(cls: type[R], data: Mapping[str, Any]) -> R:
        kw: dict[str, Any] = {}
        for f in fields(cls):  # type: ignore[arg-type]
            if f.name in data:
                v = data[f.name]
                kw[f.name] = decode_float(v) if f.type == "float" else v
        return cls(**kw)


@dataclass(frozen=True)
class RoundRecord(Record):
    """One round, as rounds.jsonl has it: the global model's test accuracy after the
    round, what happened to the sampled clients and why, epsilon over clients so far."""

    round: int
    test_accuracy: float = math.nan
    test_loss: float = math.nan
    clients_sampled: int = 0
    clients_trained: int = 0
    clients_failed: int = 0
    clients_refused: int = 0
    clients_invalid: int = 0
    clients_timed_out: int = 0
    aggregated: bool = False
    train_loss: float = math.nan
    epsilon_max: float = 0.0
    epsilon_mean: float = 0.0
    seconds: float = 0.0  # from sending the round's model to its new model
    partitions_sampled: list[int] = field(default_factory=list)
    partitions_trained: list[int] = field(default_factory=list)
    partitions_aggregated: list[int] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    bytes_up: int = 0  # payload bytes clients sent the server this round
    bytes_down: int = 0  # payload bytes the server sent them (secure aggregation only)
    noise_shares: int = 0  # secure aggregation: clients' noise shares in the unmasked sum
    seconds_clients: float = 0.0  # of `seconds`: sending to clients and waiting for replies
    # the central evaluation of this round's model: not in `seconds` (a FedAvg round's
    # runs while the next round's clients train)
    seconds_evaluate: float = 0.0
    # secure aggregation: seconds of each stage, from its messages' sending to the last
    # reply read (keys, shares, masked, confirm, unmask) and of the server's unmasking
    seconds_by_stage: dict[str, float] = field(default_factory=dict)
    # evaluation=federated, in the rounds the federation evaluated (common/fedeval.py):
    # the noisy accuracy, the half-width of its 95% interval, the noisy loss, the records
    # and nodes it was evaluated on, and the nodes that were asked and refused or failed
    federated_accuracy: float = math.nan
    federated_accuracy_interval: float = math.nan
    federated_loss: float = math.nan
    federated_examples: int = 0
    federated_nodes: int = 0
    federated_refused: int = 0
    federated_failed: int = 0


@dataclass(frozen=True)
class ClientRecord(Record):
    """One client's privacy: its history [(sigma, q, steps), ...] and the epsilon of it.
    `unconfirmed_rounds`: rounds it was asked to train whose reply carried no history.
    `ledger`: the ledger file it was read from, when the harness read it."""

    history: list = field(default_factory=list)
    epsilon: float = 0.0
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    unconfirmed_rounds: list[int] = field(default_factory=list)
    ledger: str = ""
    # secure aggregation: epsilon with only the client's own noise shares (against a
    # server that unmasks its release alone); equal to epsilon under local DP
    epsilon_alone: float = 0.0


@dataclass(frozen=True)
class PrivacyRecord(Record):
    """privacy.json: the guarantee's parameters and every client's history. `source`:
    "replies" (what the server heard) or "ledger files" (the clients' own ledgers)."""

    accountant: str
    delta: float
    target_epsilon: float
    private: bool
    max_grad_norm: float = math.nan
    adjacency: str = ""
    source: str = "replies"
    clients: dict[str, ClientRecord] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = encode({f.name: getattr(self, f.name) for f in fields(self) if f.name != "clients"})
        out["clients"] = {str(p): c.to_json() for p, c in sorted(self.clients.items(), key=lambda kv: int(kv[0]))}
        return Encoded(out)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PrivacyRecord:
        base = {k: v for k, v in data.items() if k != "clients"}
        record = super().from_json(base)
        clients = {str(p): ClientRecord.from_json(c) for p, c in dict(data.get("clients", {})).items()}
        return replace(record, clients=clients)

    def epsilon_stats(self) -> tuple[float, float]:
        """(max, mean) epsilon over the clients (0, 0 when none has reported)."""
        eps = [c.epsilon for c in self.clients.values()]
        return (max(eps), float(np.mean(eps))) if eps else (0.0, 0.0)


@dataclass(frozen=True)
class RunSummary(Record):
    """summary.json: written last; a run directory with it is finished."""

    final_accuracy: float
    best_accuracy: float
    final_loss: float
    epsilon_max: float
    epsilon_mean: float
    target_epsilon: float
    delta: float
    private: bool
    rounds: int
    num_clients: int
    wall_seconds: float
    adjacency: str = ""
    clients_unconfirmed: int = 0
    clients_refused_total: int = 0
    clients_failed_total: int = 0
    clients_invalid_total: int = 0
    clients_timed_out_total: int = 0
    resumed: bool = False
    aggregation: str = "fedavg"
    stopped_early: str = ""
    epsilon_lower_bound: float = math.nan  # audit runs: the empirical bound (audit.json)
    # evaluation=federated: the last federated evaluation (its round, noisy accuracy and
    # the half-width of its 95% interval)
    federated_round: int = 0
    federated_accuracy: float = math.nan
    federated_accuracy_interval: float = math.nan

    @classmethod
    def of(cls, rounds: Sequence[RoundRecord], privacy: PrivacyRecord, **rest: Any) -> RunSummary:
        """The summary of these rounds under this privacy record (`rest`: num_clients,
        wall_seconds, resumed, aggregation, stopped_early)."""
        accs = [r.test_accuracy for r in rounds]
        eps_max, eps_mean = privacy.epsilon_stats()
        evaluated = [r for r in rounds if r.federated_nodes > 0]
        if evaluated:
            last = evaluated[-1]
            rest = {"federated_round": last.round, "federated_accuracy": last.federated_accuracy,
                    "federated_accuracy_interval": last.federated_accuracy_interval, **rest}
        return cls(
            final_accuracy=accs[-1] if accs else math.nan,
            best_accuracy=max(accs) if accs else math.nan,
            final_loss=rounds[-1].test_loss if rounds else math.nan,
            epsilon_max=eps_max, epsilon_mean=eps_mean,
            target_epsilon=privacy.target_epsilon, delta=privacy.delta, private=privacy.private,
            adjacency=privacy.adjacency, rounds=len(rounds),
            clients_unconfirmed=sum(bool(c.unconfirmed_rounds) for c in privacy.clients.values()),
            clients_refused_total=sum(r.clients_refused for r in rounds),
            clients_failed_total=sum(r.clients_failed for r in rounds),
            clients_invalid_total=sum(r.clients_invalid for r in rounds),
            clients_timed_out_total=sum(r.clients_timed_out for r in rounds),
            **rest,
        )

    def text(self, run_dir: Path) -> str:
        """The few lines a user reads at the end of a run."""
        lines = [
            f"run directory   {run_dir}",
            f"final accuracy  {self.final_accuracy:.4f} (best {self.best_accuracy:.4f})"
            if not math.isnan(self.final_accuracy) else
            "final accuracy  none: no test set at the server (the federated evaluation below)",
            f"epsilon         max {self.epsilon_max:.4g}  mean {self.epsilon_mean:.4g}  "
            f"(target {self.target_epsilon:g}, delta {self.delta:g})",
            f"rounds          {self.rounds} with {self.num_clients} clients, "
            f"{self.wall_seconds:.0f}s in the ServerApp",
        ]
        if self.federated_round:
            lines.append(f"federated eval  accuracy {self.federated_accuracy:.4f} ± "
                         f"{self.federated_accuracy_interval:.4f} (95%; round "
                         f"{self.federated_round}, the nodes' held-out records, under DP)")
        if not math.isnan(self.epsilon_lower_bound):
            lines.append(f"audit           epsilon lower bound {self.epsilon_lower_bound:.3f} "
                         f"(95% confidence; {run_dir / AUDIT_FILE})")
        if self.stopped_early:
            lines.append(f"STOPPED EARLY   {self.stopped_early}")
        return "\n".join(lines)


@dataclass(frozen=True)
class RunInfo(Record):
    """config.json: the run config it ran with and where it came from."""

    run_config: dict[str, Any]
    run_id: int = 0
    run_dir: str = ""
    private: bool = True
    planned_rounds_per_client: int = 0
    num_nodes_at_start: int = 0
    model_parameters: int = 0
    libraries: dict[str, str] = field(default_factory=dict)
    git_revision: str = ""

    def config(self) -> Any:
        """The run's ExperimentConfig, read as this dpfl reads it: keys an older dpfl
        wrote and this one does not know are dropped, missing ones take today's defaults,
        and encoded numbers ("inf") are decoded."""
        known = {k: v for k, v in self.run_config.items() if k in FIELD_TYPES}
        known = {k: decode_float(v) if FIELD_TYPES[k][2] is float and isinstance(v, str) else v
                 for k, v in known.items()}
        return parse_config({**default_run_config(), **known})


@dataclass(frozen=True)
class Failure(Record):
    """failed.json: why a sweep point could not run (the point is retried next time)."""

    error: str
    type: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)
    traceback: str = ""


# ---------------------------------------------------------------- the directory


def run_label(run_name: str, run_id: int | None = None) -> str:
    """A run's name: its run-name, or "run-<Flower run id>" when none was given."""
    return run_name or f"run-{run_id}"


def run_dir(output_dir: str | Path, run_name: str, run_id: int | None = None) -> Path:
    """Where the run lives (absolute): `output_dir` / its `run_label`."""
    return Path(output_dir).expanduser().resolve() / run_label(run_name, run_id)


def run_status(path: Path) -> str:
    """"finished" (summary.json), "failed" (failed.json), "interrupted" (a checkpoint to
    resume from), "unstarted" (a folder without either), "new" (no folder)."""
    if (path / SUMMARY_FILE).exists():
        return "finished"
    if (path / FAILED_FILE).exists():
        return "failed"
    if (path / CHECKPOINT_FILE).exists():
        return "interrupted"
    return "unstarted" if path.exists() else "new"


class RunDir:
    """One run directory: every read and write of its files goes through here."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # -- places
    @property
    def checkpoint_file(self) -> Path:
        return self.path / CHECKPOINT_FILE

    @property
    def logs(self) -> Path:
        return self.path / LOGS_DIR

    @property
    def ledgers(self) -> Path:
        return self.path / LEDGERS_DIR

    def status(self) -> str:
        return run_status(self.path)

    def holds_run(self) -> bool:
        """True when the folder already holds a run's records (finished or not)."""
        return (self.path / SUMMARY_FILE).exists() or (self.path / ROUNDS_FILE).exists()

    def create(self, *, resume: bool = False) -> RunDir:
        """Create the folder, or refuse one that is not writable or (unless resuming)
        already holds a run. Nothing in it is touched."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise OSError(f"output directory {self.path} is not writable: {exc}") from exc
        if self.holds_run() and not resume:
            raise FileExistsError(f"{self.path} already holds a run; choose another run-name or output-dir")
        return self

    # -- config.json
    def write_info(self, info: RunInfo) -> None:
        write_json(self.path / CONFIG_FILE, info.to_json())

    def info(self) -> RunInfo | None:
        p = self.path / CONFIG_FILE
        return RunInfo.from_json(read_json(p)) if p.exists() else None

    # -- rounds.jsonl
    def append_round(self, row: RoundRecord) -> None:
        line = dumps(row.to_json()) + "\n"
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ROUNDS_FILE, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def rewrite_rounds(self, rows: Iterable[RoundRecord]) -> None:
        """Replace rounds.jsonl by exactly `rows` (atomically; used on resume)."""
        atomic_write_text(self.path / ROUNDS_FILE, "".join(dumps(r.to_json()) + "\n" for r in rows))

    def rounds(self) -> list[RoundRecord]:
        """Every complete line of rounds.jsonl (a torn last line is skipped)."""
        p = self.path / ROUNDS_FILE
        rows: list[RoundRecord] = []
        if not p.exists():
            return rows
        for line in p.read_text().splitlines():
            try:
                rows.append(RoundRecord.from_json(json.loads(line)))
            except (json.JSONDecodeError, TypeError, AttributeError):
                continue
        return rows

    # -- privacy.json, summary.json, model.npz, failed.json
    def write_privacy(self, record: PrivacyRecord) -> None:
        write_json(self.path / PRIVACY_FILE, record.to_json())

    def privacy(self) -> PrivacyRecord | None:
        p = self.path / PRIVACY_FILE
        return PrivacyRecord.from_json(read_json(p)) if p.exists() else None

    def write_summary(self, summary: RunSummary) -> None:
        write_json(self.path / SUMMARY_FILE, summary.to_json())

    def summary(self) -> RunSummary | None:
        p = self.path / SUMMARY_FILE
        return RunSummary.from_json(read_json(p)) if p.exists() else None

    def write_model(self, weights: Mapping[str, np.ndarray]) -> None:
        atomic_write(self.path / MODEL_FILE, lambda tmp: np.savez(tmp, **dict(weights)))  # type: ignore[arg-type]

    def write_transcript(self, server_round: int, arrays: Mapping[str, np.ndarray]) -> Path:
        """What the server received in a secure-aggregation round (keep-transcript)."""
        path = self.path / TRANSCRIPT_DIR / f"round-{server_round}.npz"
        path.parent.mkdir(exist_ok=True)
        atomic_write(path, lambda tmp: np.savez(tmp, **dict(arrays)))  # type: ignore[arg-type]
        return path

    def write_audit(self, result: Mapping[str, Any]) -> None:
        write_json(self.path / AUDIT_FILE, dict(result))

    def audit(self) -> dict[str, Any] | None:
        p = self.path / AUDIT_FILE
        return read_json(p) if p.exists() else None

    def write_canary_scores(self, arrays: Mapping[str, np.ndarray]) -> None:
        atomic_write(self.path / CANARY_SCORES_FILE, lambda tmp: np.savez(tmp, **dict(arrays)))  # type: ignore[arg-type]

    def canary_scores(self) -> dict[str, np.ndarray]:
        p = self.path / CANARY_SCORES_FILE
        if not p.exists():
            return {}
        with np.load(p) as z:
            return {k: z[k] for k in z.files}

    def write_failure(self, failure: Failure) -> None:
        write_json(self.path / FAILED_FILE, failure.to_json())

    def failure(self) -> Failure | None:
        p = self.path / FAILED_FILE
        return Failure.from_json(read_json(p)) if p.exists() else None


# ---------------------------------------------------------------- provenance


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = "not installed"
    return out


def git_revision(folder: Path) -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
            timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
