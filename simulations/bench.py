"""`dpfl bench`: figures for the default model on this machine (printed, not asserted).

1. Local training throughput: non-private SGD vs DP-SGD in each Opacus grad-sample mode,
   through dpfl's own trainer on one real Fashion-MNIST partition.
2. With --round: a short default simulation; seconds per round, the share of round wall
   time spent inside client training, and the machine-wide peak memory increase.
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


def round_figures(overrides: dict, client_cpus: float) -> dict:
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
        run_dir = simulate(overrides, output_dir=out, client_cpus=client_cpus, progress=None)
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


def main(args: argparse.Namespace) -> int:
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
        figs = round_figures(over, client_cpus=1.0)
        print("  simulation (defaults, 20 rounds): " + json.dumps(figs, indent=2))
    return 0
