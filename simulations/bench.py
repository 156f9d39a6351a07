"""`dpfl bench`: figures for the default model on this machine (printed, not asserted).

1. Local training throughput: non-private SGD vs DP-SGD in each Opacus grad-sample mode,
   through dpfl's own trainer on one real Fashion-MNIST partition.
2. With --round: a short default simulation; seconds per round, the share of round wall
   time spent inside client training, and the machine-wide peak memory increase.
3. With --scale N1,N2,...: a simulation of each many virtual clients (cohorts of
   --cohort): time to the first round, seconds a round, peak memory of the process tree.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
import warnings
from dataclasses import replace

import torch

from client.trainer import train_round
from common import privacy
from common.config import resolve_config
from common.data import partition_of
from common.models import MODEL_FEATURES, build_model, get_weights
from common.records import RunDir
from simulations.runtime import Backend


def throughput(mode: str, *, model: str, batch_size: int, threads: int, seconds: float) -> float:
    """Samples/s of one client's local training (one real partition of the default 100);
    mode "off" is plain SGD, otherwise DP-SGD with that Opacus grad-sample mode."""
    torch.set_num_threads(threads)
    cfg = resolve_config({
        "model": model, "batch-size": batch_size, "num-threads": threads,
        "grad-sample-mode": mode if mode != "off" else "hooks",
    })
    data = partition_of(replace(cfg.data, partitioner="iid", seed=0), 0,
                        cfg.federation.num_partitions, MODEL_FEATURES.get(model, ""))
    weights = get_weights(build_model(cfg.train.model, seed=0))
    q, steps = privacy.poisson_plan(len(data), batch_size, 1)
    plan = privacy.RoundPlan(noise_multiplier=0.0 if mode == "off" else 1.0, sample_rate=q,
                             steps=steps, epsilon_before=0.0, epsilon_after=0.0)
    done, start = 0, time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_round(weights, data, plan, train=cfg.client_train, priv=cfg.privacy,  # warm-up
                    runtime=cfg.runtime, seed=0)
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            train_round(weights, data, plan, train=cfg.client_train, priv=cfg.privacy,
                        runtime=cfg.runtime, seed=done)
            done += len(data)
    return done / (time.perf_counter() - start)


def round_figures(overrides: dict, backend: Backend | None = None) -> dict:
    """Run a short simulation and measure it."""
    import psutil

    from simulations.simulate import simulate

    base = psutil.virtual_memory().used
    peak = [base]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], psutil.virtual_memory().used)
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out = tempfile.mkdtemp(prefix="dpfl-bench-")
    t0 = time.time()
    try:
        run_dir = simulate(overrides, output_dir=out, backend=backend, progress=None)
    finally:
        stop.set()
        watcher.join()
    rows = RunDir(run_dir).rounds()
    later = rows[1:] or rows  # round 1 includes one-off start-up (actors, data, calibration)
    return {
        "wall_seconds_total": time.time() - t0,
        "seconds_round_1": rows[0].seconds if rows else None,
        "seconds_per_round_after_1": sum(r.seconds for r in later) / len(later),
        "peak_memory_increase_gib": (peak[0] - base) / 2**30,
        "final_accuracy": rows[-1].test_accuracy if rows else None,
        "run_dir": str(run_dir),
    }


class TreeMemory:
    """Peak memory while a block runs, sampled every `every` seconds: machine-wide used
    memory above the start, and the summed proportional set size (PSS: shared pages
    split between their users) of this process and every descendant (the SuperLink,
    the simulation, Ray's GCS, raylet and workers)."""

    def __init__(self, every: float = 1.0) -> None:
        import psutil

        self._psutil, self.every = psutil, every
        self.base = psutil.virtual_memory().used
        self.peak_used, self.peak_tree, self.peak_processes = self.base, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _tree(self) -> tuple[int, int]:
        me = self._psutil.Process()
        total, count = 0, 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                info = proc.memory_full_info()
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied):
                continue
            total += getattr(info, "pss", info.rss)
            count += 1
        return total, count

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak_used = max(self.peak_used, self._psutil.virtual_memory().used)
            tree, count = self._tree()
            if tree > self.peak_tree:
                self.peak_tree, self.peak_processes = tree, count
            self._stop.wait(self.every)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def figures(self) -> dict:
        return {"peak_machine_used_increase_gib": (self.peak_used - self.base) / 2**30,
                "peak_process_tree_pss_gib": self.peak_tree / 2**30,
                "processes_at_peak": self.peak_processes}


def scale_figures(num_clients: int, *, cohort: int, rounds: int,
                  backend: Backend | None = None, extra: dict | None = None) -> dict:
    """One simulation of `num_clients` virtual clients, `cohort` a round: time to the
    first round, seconds a round after it, peak memory of the whole process tree."""
    from simulations.simulate import simulate

    overrides = {"num-partitions": num_clients, "fraction-train": cohort / num_clients,
                 "min-train-clients": cohort, "num-rounds": rounds, **(extra or {})}
    out = tempfile.mkdtemp(prefix="dpfl-bench-scale-")
    first: list[float] = []
    t0 = time.time()

    def progress(line: str) -> None:
        if line.startswith("round") and not first:
            first.append(time.time() - t0)

    with TreeMemory() as mem:
        run_dir = simulate(overrides, output_dir=out, backend=backend, progress=progress)
    rows = RunDir(run_dir).rounds()
    later = rows[1:] or rows
    return {"clients": num_clients, "cohort": cohort, "rounds": len(rows),
            "wall_seconds_total": round(time.time() - t0, 1),
            "first_round_after_seconds": round(first[0], 1) if first else None,
            "seconds_round_1": round(rows[0].seconds, 2) if rows else None,
            "seconds_per_round_after_1": round(sum(r.seconds for r in later) / len(later), 3),
            **{k: round(v, 2) if isinstance(v, float) else v for k, v in mem.figures().items()},
            "final_accuracy": rows[-1].test_accuracy if rows else None, "run_dir": str(run_dir)}


def main(args: argparse.Namespace) -> int:
    if args.scale:
        sizes = [int(n) for n in args.scale.split(",") if n.strip()]
        print(f"dpfl bench --scale: {', '.join(map(str, sizes))} virtual clients, cohorts of "
              f"{args.cohort}, {args.rounds} rounds, {os.cpu_count()} CPUs"
              + (f", Ray cluster {args.ray_address}" if args.ray_address else ""))
        for n in sizes:
            figs = scale_figures(n, cohort=args.cohort, rounds=args.rounds,
                                 backend=Backend(client_cpus=args.client_cpus,
                                                 client_gpus=args.client_gpus,
                                                 ray_address=args.ray_address))
            print(json.dumps(figs), flush=True)
        return 0
    cfg = resolve_config({})
    model = args.model or cfg.train.model
    batch = cfg.train.batch_size if args.batch_size is None else args.batch_size
    print(f"dpfl bench: model {model}, batch {batch or 'full'}, {args.threads} thread(s), "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}")
    kw = {"model": model, "batch_size": batch, "threads": args.threads, "seconds": args.seconds}
    base = throughput("off", **kw)
    print(f"  non-private SGD          {base:9.0f} samples/s")
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        sps = throughput(mode, **kw)
        print(f"  DP-SGD {mode:<10}        {sps:9.0f} samples/s  ({base / sps:.2f}x slower)")
    if args.round:
        over = {"num-rounds": 20}
        figs = round_figures(over)
        print("  simulation (defaults, 20 rounds): " + json.dumps(figs, indent=2))
    return 0
