"""`dpfl sweep`: a grid of `dpfl simulate` runs, resumable, then `dpfl report`.

A grid is a TOML file (see simulations/grids/) or command-line axes:

    [sweep]
    name = "default"                  # the sweep directory's name
    [fixed]                           # overrides for every point
    num-rounds = 150
    [grid]                            # axes: every combination is a point
    target-epsilon = [0.5, 1, inf]    # inf: the non-private baseline
    partition = ["iid", "dirichlet:0.5", "pathological:2"]
    seed = [42, 43]

`partition` is shorthand for partitioner (+ dirichlet-alpha / labels-per-client); any
other config key can be an axis. Each point is an ordinary run directory under the sweep
directory, made by the same code as `dpfl simulate`. Running the same command again skips
finished points, resumes interrupted ones from their checkpoint, and retries failed ones.
"""

from __future__ import annotations

import itertools
import math
import re
import shutil
import sys
import time
import tomllib
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from common.config import ConfigError, ExperimentConfig, parse_overrides, resolve_config
from common.data import DataError
from common.presets import with_preset
from common.records import (
    SWEEP_FILE,
    Failure,
    RoundRecord,
    RunDir,
    decode_float,
    encode,
    read_json,
    write_json,
)
from simulations import simulate as sim
from simulations.runtime import Backend

GRIDS = Path(__file__).resolve().parent / "grids"


@dataclass(frozen=True)
class Point:
    name: str
    overrides: dict[str, Any]  # the point's config overrides (fixed + axes)
    cfg: ExperimentConfig  # parsed once, here; the run directory is set when it runs

    def config_in(self, sweep_dir: Path) -> ExperimentConfig:
        """The point's config, running as `sweep_dir`/name."""
        rt = replace(self.cfg.runtime, output_dir=str(sweep_dir), run_name=self.name)
        return replace(self.cfg, runtime=rt)


def parse_partition(value: str) -> dict[str, Any]:
    """"iid" | "dirichlet:ALPHA" | "pathological:K" -> config overrides."""
    kind, _, arg = str(value).partition(":")
    try:
        if kind == "iid" and not arg:
            return {"partitioner": "iid"}
        if kind == "dirichlet":
            return {"partitioner": "dirichlet", "dirichlet-alpha": float(arg or 0.5)}
        if kind in ("pathological", "labels"):
            return {"partitioner": "pathological", "labels-per-client": int(arg or 2)}
    except ValueError:
        pass
    raise ConfigError(
        f"partition={value!r} must be iid, dirichlet:ALPHA or pathological:K (labels per client)"
    )


def _label(value: Any) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return re.sub(r"[^A-Za-z0-9.]+", "-", str(value)).strip("-")


SHORT = {"target-epsilon": "eps", "partition": "", "num-partitions": "n", "seed": "seed"}


def point_name(axes: Mapping[str, Any]) -> str:
    parts = []
    for key, value in axes.items():
        prefix = SHORT.get(key, key)
        parts.append(f"{prefix}-{_label(value)}" if prefix else _label(value))
    return "_".join(parts) or "point"


def load_grid(path: Path | None, axes_text: str = "", fixed_text: str = "", *,
              preset: str = "") -> dict[str, Any]:
    """{name, fixed, grid} from a TOML file and/or command-line text. A preset (the
    file's `[sweep] preset`, or `preset`, which wins) lies under both's fixed keys."""
    spec: dict[str, Any] = {"name": "", "fixed": {}, "grid": {}}
    if path is not None:
        path = Path(path)
        if not path.exists() and (GRIDS / f"{path}.toml").exists():
            path = GRIDS / f"{path}.toml"  # a shipped grid by name: `dpfl sweep default`
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"grid file {path}: {exc}") from exc
        unknown = sorted(set(raw) - {"sweep", "fixed", "grid"})
        if unknown:
            raise ConfigError(f"grid file {path}: unknown table(s) {', '.join(unknown)}; "
                              "expected [sweep], [fixed], [grid]")
        spec["name"] = str(raw.get("sweep", {}).get("name", path.stem))
        preset = preset or str(raw.get("sweep", {}).get("preset", ""))
        spec["fixed"].update(raw.get("fixed", {}))
        spec["grid"].update(raw.get("grid", {}))
    spec["fixed"] = with_preset(preset, spec["fixed"])
    spec["fixed"].update(parse_overrides(fixed_text))
    for key, raw_values in parse_overrides(axes_text).items():
        spec["grid"][key] = raw_values if isinstance(raw_values, list) else [
            parse_overrides(f"v={v}")["v"] for v in str(raw_values).split(",")
        ]
    for key, values in spec["grid"].items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid axis {key!r} must be a non-empty list of values")
        spec["grid"][key] = [_number_or_text(v) for v in values]
    if not spec["grid"]:
        raise ConfigError("the grid has no axes: give a grid file or --grid 'key=v1,v2 ...'")
    return spec


def _number_or_text(value: Any) -> Any:
    """A grid value; an encoded number ("inf", e.g. from sweep.json) is decoded."""
    if isinstance(value, str) and not math.isnan(decode_float(value)):
        return decode_float(value)
    return value


def expand(spec: Mapping[str, Any]) -> list[Point]:
    """Every combination of the axes, validated as a config (a bad value stops here)."""
    keys = list(spec["grid"])
    points = []
    for combo in itertools.product(*(spec["grid"][k] for k in keys)):
        axes = dict(zip(keys, combo, strict=True))
        over = dict(spec["fixed"])
        for key, value in axes.items():
            if key == "partition":
                over.update(parse_partition(value))
            else:
                over[key] = value
        for reserved in ("run-name", "output-dir", "resume"):
            if reserved in over:
                raise ConfigError(f"{reserved} is set by the sweep; it cannot be in the grid")
        cfg = resolve_config(over)  # unknown keys and bad values are named before anything runs
        points.append(Point(point_name(axes), over, cfg))
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise ConfigError("two points of the grid get the same name; make the axis values distinct")
    return points


class Progress:
    """One line per point and per round on a terminal (rewritten in place); on a log file
    one line per point and one every `every` rounds."""

    def __init__(self, total_points: int, total_rounds: int, stream=sys.stdout, every: int = 10):
        self.k, self.total_points, self.total_rounds = 0, total_points, total_rounds
        self.rounds_done, self.t_rounds, self.every = 0, 0.0, every
        self.stream, self.tty = stream, stream.isatty()
        self.t_point = self.started = time.time()

    def say(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()

    def start_point(self, point: Point, status: str) -> None:
        self.k += 1
        self.t_point = time.time()
        self.say(f"point {self.k}/{self.total_points} {point.name} ({status})")

    def skip(self, rounds: int) -> None:
        self.total_rounds -= rounds

    def round(self, row: RoundRecord, num_rounds: int) -> None:
        self.rounds_done += 1
        per_round = (time.time() - self.started) / self.rounds_done
        left = max(self.total_rounds - self.rounds_done, 0) * per_round
        eta = f"  ~{left / 60:.0f} min left"
        line = (f"[{self.k}/{self.total_points}] round {row.round}/{num_rounds}  accuracy "
                f"{row.test_accuracy:.4f}  epsilon max {row.epsilon_max:.3f}{eta}")
        if self.tty:
            self.stream.write("\r\033[K" + line)
            self.stream.flush()
        elif row.round % self.every == 0 or row.round == num_rounds:
            self.say(line)


def run_sweep(spec: Mapping[str, Any], output_dir: str | Path, *,
              backend: Backend | None = None,
              stream=sys.stdout) -> Path:
    """Run every point not yet finished; returns the sweep directory."""
    (backend or Backend()).check()
    points = expand(spec)
    name = spec.get("name") or "sweep"
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ConfigError(f"sweep name {name!r} may hold only letters, digits, '-', '_' and '.'")
    sweep_dir = Path(output_dir).expanduser().resolve() / name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    saved = {"name": name, "fixed": dict(spec["fixed"]), "grid": dict(spec["grid"])}
    if (sweep_dir / SWEEP_FILE).exists():
        old = read_json(sweep_dir / SWEEP_FILE)
        old_cmp = {k: old.get(k) for k in ("fixed", "grid")}
        if old_cmp != _json_roundtrip({k: saved[k] for k in ("fixed", "grid")}):
            raise ConfigError(
                f"{sweep_dir} holds a sweep with another grid or fixed config; "
                "give the sweep another name (--name) or output directory"
            )
    write_json(sweep_dir / SWEEP_FILE, {**saved, "points": [p.name for p in points],
                                       "command": " ".join(["dpfl", *sys.argv[1:]])})
    per_point = {p.name: p.cfg.federation.num_rounds for p in points}
    progress = Progress(len(points), sum(per_point.values()), stream=stream)
    failures = 0
    for point in points:
        run = RunDir(sweep_dir / point.name)
        run_dir = run.path
        status = run.status()
        progress.start_point(point, {"new": "new"}.get(status, status))
        if status == "finished":
            progress.skip(per_point[point.name])
            continue
        if status == "failed":  # retried from scratch; the failed attempt is kept aside
            attic = sweep_dir / ".failed"
            attic.mkdir(exist_ok=True)
            shutil.move(str(run_dir), str(attic / f"{point.name}-{time.strftime('%Y%m%d-%H%M%S')}"))
        elif status == "unstarted":
            shutil.rmtree(run_dir)  # killed before its first round: nothing to keep
        shown = [len(run.rounds())] if status == "interrupted" else [0]
        progress.skip(shown[0])

        def on_line(_text: str, _run=run, _shown=shown, _n=per_point[point.name]) -> None:
            rows = _run.rounds()
            for row in rows[_shown[0]:]:
                progress.round(row, _n)
            _shown[0] = len(rows)

        try:
            if status == "interrupted":
                sim.resume(run_dir, backend=backend, progress=on_line)
            else:
                cfg = point.config_in(sweep_dir)
                sim.check(cfg)
                sim.launch(cfg, backend=backend, progress=on_line, timeout=6 * 3600)
            on_line("")
            s = run.summary()
            assert s is not None  # launch raises when the run did not finish
            progress.say(f"  -> final accuracy {s.final_accuracy:.4f}, epsilon max "
                         f"{s.epsilon_max:.4g} (target {s.target_epsilon:g}), "
                         f"{time.time() - progress.t_point:.0f}s")
        except (ConfigError, DataError, sim.SimulationError, OSError, ValueError) as exc:
            failures += 1
            run_dir.mkdir(parents=True, exist_ok=True)
            run.write_failure(Failure(error=str(exc), type=type(exc).__name__,
                                      overrides=point.overrides,
                                      traceback=traceback.format_exc(limit=5)))
            progress.say(f"  -> FAILED: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    progress.say(f"sweep {sweep_dir}: {len(points) - failures} of {len(points)} points finished"
                 + (f", {failures} failed (see `dpfl report {sweep_dir}`)" if failures else ""))
    return sweep_dir


def _json_roundtrip(data: Any) -> Any:
    import json

    return json.loads(json.dumps(encode(data)))
