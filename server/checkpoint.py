"""The server's checkpoint: everything needed to continue a run after its last complete
round, in one file written atomically (`CHECKPOINT_FILE` in the run directory, common.records).

It holds the global model, the strategy's state (sampler RNG and queue, server optimizer,
moving average, the clients' privacy view) and the run-level records (every round's row,
the idle count, the planned participations). Clients keep their own ledgers (files under
`ledger-dir`); the checkpoint never stands in for them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.config import ConfigError, ExperimentConfig, default_run_config
from common.files import atomic_write
from common.records import CHECKPOINT_FILE, encode, run_status

_META = "__meta__"


@dataclass
class Checkpoint:
    model: dict[str, np.ndarray]
    strategy_arrays: dict[str, np.ndarray]
    meta: dict[str, Any]


def save(run_dir: Path, *, model: dict[str, np.ndarray],
         strategy: tuple[dict[str, Any], dict[str, np.ndarray]], meta: dict[str, Any]) -> None:
    strategy_meta, strategy_arrays = strategy
    text = json.dumps(encode({**meta, "strategy": strategy_meta}), allow_nan=False)
    arrays = {f"model/{k}": v for k, v in model.items()}
    arrays.update({f"strategy/{k}": v for k, v in strategy_arrays.items()})
    arrays[_META] = np.frombuffer(text.encode(), dtype=np.uint8)
    atomic_write(run_dir / CHECKPOINT_FILE, lambda tmp: np.savez(tmp, **arrays))  # type: ignore[arg-type]


def load(run_dir: Path) -> Checkpoint:
    path = run_dir / CHECKPOINT_FILE
    if run_status(run_dir) == "finished":
        raise ConfigError(f"{run_dir} holds a finished run: nothing to resume")
    if not path.exists():
        raise ConfigError(
            f"{run_dir} has no {CHECKPOINT_FILE}: the run stopped before its first round completed; "
            "start it again instead of resuming"
        )
    try:
        with np.load(path) as z:
            data = {k: z[k] for k in z.files}
        meta = json.loads(data.pop(_META).tobytes().decode())
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{path} is unreadable ({exc}); it cannot be resumed") from exc
    model = {k[len("model/"):]: v for k, v in data.items() if k.startswith("model/")}
    strat = {k[len("strategy/"):]: v for k, v in data.items() if k.startswith("strategy/")}
    return Checkpoint(model=model, strategy_arrays=strat, meta=meta)


def load_matching(run_dir: Path, cfg: ExperimentConfig) -> Checkpoint:
    """The checkpoint to resume `run_dir` with `cfg`, or a clear error."""
    ckpt = load(run_dir)
    check_matches(ckpt, cfg.to_run_config())
    return ckpt


def check_matches(ckpt: Checkpoint, run_config: dict[str, Any]) -> None:
    """A run resumes with the config it started with (only `resume` may differ)."""
    saved = {k: v for k, v in ckpt.meta["run_config"].items() if k != "resume"}
    now = encode({k: v for k, v in run_config.items() if k != "resume"})
    # A key this dpfl added after the checkpoint was written is no difference when the
    # run has it at its default (an older run resumes after an upgrade).
    defaults = encode(default_run_config())
    added = {k for k in set(now) - set(saved) if now[k] == defaults.get(k)}
    diff = sorted(k for k in (set(saved) | set(now)) - added if saved.get(k) != now.get(k))
    if diff:
        raise ConfigError(
            "the checkpoint was written with another config; differing keys: "
            + ", ".join(f"{k} ({saved.get(k)!r} then, {now.get(k)!r} now)" for k in diff)
        )
