"""Run directories: atomic JSON files, a flushed rounds.jsonl, the final weights.

Layout of `<output-dir>/<run-id>/`: config.json, rounds.jsonl, summary.json,
privacy.json, model.npz. JSON files are written to a temporary file and renamed, and each
rounds.jsonl line is written whole and flushed, so a run killed at any moment leaves
files that parse.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

LIBRARIES = ("torch", "flwr", "opacus", "flwr-datasets", "numpy", "dp-accounting")


def jsonable(value: Any) -> Any:
    """Non-finite floats become the strings "inf", "-inf", "nan" (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return jsonable(value.item())
    return value


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """`write(tmp_path)` fills a temporary file beside `path`, which then replaces `path`:
    readers see the old file or the whole new one, never a torn one. The temporary name
    keeps `path`'s extension (np.save / np.savez would otherwise append one). The directory
    is fsynced after the rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # The rename itself must survive a power loss: sync the directory entry too.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def prepare_run_dir(run_dir: Path, *, resume: bool = False) -> None:
    """Create a run directory, or refuse one that is not writable or (unless resuming)
    already holds a run."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise OSError(f"output directory {run_dir} is not writable: {exc}") from exc
    holds_run = (run_dir / "summary.json").exists() or (run_dir / "rounds.jsonl").exists()
    if holds_run and not resume:
        raise FileExistsError(f"{run_dir} already holds a run; choose another run-name or output-dir")


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n")


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def read_rounds(path: Path) -> list[dict[str, Any]]:
    """Every complete line of rounds.jsonl (a torn last line is skipped)."""
    rows: list[dict[str, Any]] = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


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


class RunWriter:
    """Writes one run's directory; created before the first round."""

    def __init__(self, run_dir: Path, *, resume: bool = False):
        self.dir = run_dir
        prepare_run_dir(run_dir, resume=resume)

    def rewrite_rounds(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Replace rounds.jsonl by exactly `rows` (atomically; used on resume)."""
        atomic_write_text(self.dir / "rounds.jsonl", "".join(
            json.dumps(jsonable(r), allow_nan=False) + "\n" for r in rows))

    def write_config(self, data: Mapping[str, Any]) -> None:
        write_json(self.dir / "config.json", data)

    def append_round(self, row: Mapping[str, Any]) -> None:
        line = json.dumps(jsonable(row), allow_nan=False) + "\n"
        with open(self.dir / "rounds.jsonl", "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def write_summary(self, data: Mapping[str, Any]) -> None:
        write_json(self.dir / "summary.json", data)

    def write_privacy(self, data: Mapping[str, Any]) -> None:
        write_json(self.dir / "privacy.json", data)

    def write_model(self, weights: Mapping[str, np.ndarray]) -> None:
        atomic_write(self.dir / "model.npz", lambda tmp: np.savez(tmp, **dict(weights)))  # type: ignore[arg-type]
