"""`dpfl bench`: figures for the default model on this machine (printed, not asserted).

1. Local training throughput: non-private SGD vs DP-SGD in each Opacus grad-sample mode,
   through dpfl's own trainer on one real Fashion-MNIST partition.
2. With --round (20 rounds of the defaults) or --run "k=v ...": one whole `dpfl simulate`
   command as a user runs it: its wall, where its start-up and each round go, peak
   memory of every process.
3. With --deploy N: a run on N local SuperNodes (real processes) against its simulated
   twin: seconds a round each, and the ratio. With --secure R: R secure rounds of
   `--preset distributed` against the same rounds with plain exchanges and local noise
   (the same full-batch step): seconds a round each, the ratio, the secure round by stage.
4. With --scale N1,N2,...: a simulation of each many virtual clients (cohorts of
   --cohort): time to the first round, seconds a round, peak memory of the process tree.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import threading
import time
import warnings
from dataclasses import replace
from pathlib import Path

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


def _log_times(path: Path) -> list[tuple[float, str]]:
    """(timestamp, message) of every timestamped `dpfl |` line of a ServerApp's log."""
    return _times_in(path.read_text(errors="replace") if path.exists() else "")


def _times_in(text: str) -> list[tuple[float, str]]:
    """(timestamp, message) of every timestamped `dpfl |` line of a ServerApp's output."""
    import datetime

    out = []
    for line in text.splitlines():
        head, sep, message = line.partition(" dpfl | ")
        if not sep:
            continue
        stamp = head[-23:]  # "YYYY-MM-DD HH:MM:SS,mmm", after any prefix Flower adds
        try:
            when = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        except ValueError:
            continue
        out.append((when, message))
    return out


def server_log(run: RunDir) -> Path:
    return run.logs / ("server.log" if (run.logs / "server.log").exists() else "flwr.log")


def round_ends(times: list[tuple[float, str]]) -> list[float]:
    """When each round's line was logged: the round is trained, evaluated and recorded."""
    return [t for t, m in times if m.startswith("round ") and "/" in m.split()[1]]


def seconds_per_round(ends: list[float]) -> float:
    """The median time between consecutive rounds' ends (a round's own work and whatever
    overlaps it), NaN with fewer than two rounds."""
    import statistics

    gaps = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    return statistics.median(gaps) if gaps else math.nan


def command_figures(run_config: str = "", *, runtime_args: list[str] | None = None) -> dict:
    """Time one whole `dpfl simulate -c RUN_CONFIG` command as a user runs it (a new
    process; its wall from start to exit), with the peak memory of its whole process
    tree, and where the time went, from the ServerApp's timestamped log and the rounds'
    records: before the ServerApp starts (the command's imports and checks, the
    runtime's start), the ServerApp's data and model, discovery, round 1, the later
    rounds (each: the server's own work while the clients train, which is the previous
    round's evaluation and records, then the wait for the clients and the aggregation),
    and after the last round."""
    import statistics
    import subprocess

    from simulations import runtime

    out_dir = Path(tempfile.mkdtemp(prefix="dpfl-bench-run-"))
    cmd = [runtime.tool("dpfl"), "simulate", "--quiet", "--output-dir", str(out_dir),
           *(["--run-config", run_config] if run_config else []), *(runtime_args or [])]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with TreeMemory(every=0.2, pid=proc.pid) as mem:  # the command's processes, not this one's
        output, _ = proc.communicate()
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{output[-4000:]}")
    run = RunDir(next(p for p in out_dir.iterdir() if p.is_dir()))
    times = _log_times(server_log(run))

    def first(prefix: str) -> float:
        return next((t for t, m in times if m.startswith(prefix)), math.nan)

    ends = round_ends(times)
    rows = run.rounds()
    if not rows or not ends:
        raise RuntimeError(f"{' '.join(cmd)} recorded no round; logs in {run.logs}")
    later = rows[1:] or rows
    per_round = seconds_per_round(ends)
    clients = statistics.median(r.seconds_clients for r in later)
    evaluation = statistics.median(r.seconds_evaluate for r in later)
    in_round = statistics.median(r.seconds for r in later)
    started, ready, discovered = (first("ServerApp started"), first("test set and model ready"),
                                  first("run directory"))
    r = 3
    return {
        "command": " ".join(cmd[1:]), "wall_seconds": round(wall, 2),
        "first_round_after_seconds": round(ends[0] - t0, 2) if ends else None,
        "seconds_per_round_after_1": round(per_round, 4),
        "round_breakdown_seconds": {
            "server's own work while the clients train (the previous round's evaluation, "
            "checkpoint and records), then aggregation": round(in_round - clients, r),
            "waiting for the clients (send, train, reply; replies checked as they come)":
                round(clients, r),
            # a difference of two medians: a few ms below zero when nothing is between
            "between rounds": round(max(per_round - in_round, 0.0), r),
            "of the server's work: the central evaluation": round(evaluation, r)},
        "start_up_seconds": {
            "before the ServerApp (imports, checks, runtime start)": round(started - t0, 2),
            "ServerApp: test set and model": round(ready - started, 2),
            "discovery (clients start, load data, answer)": round(discovered - ready, 2),
            "round 1": round(ends[0] - discovered, 2) if ends else None},
        "after_last_round_seconds": round(t0 + wall - ends[-1], 2) if ends else None,
        "rounds": len(rows), "final_accuracy": rows[-1].test_accuracy if rows else None,
        "mean_accuracy_last_10": round(statistics.mean(x.test_accuracy for x in rows[-10:]), 4),
        **{k: round(v, 3) if isinstance(v, float) else v for k, v in mem.figures().items()},
        "run_dir": str(run.path),
    }


class TreeMemory:
    """Peak memory while a block runs, sampled every `every` seconds: machine-wide used
    memory above the start, and the summed proportional set size (PSS: shared pages
    split between their users) of this process and every descendant (the SuperLink,
    the simulation, Ray's GCS, raylet and workers)."""

    def __init__(self, every: float = 1.0, pid: int | None = None) -> None:
        import psutil

        self._psutil, self.every, self.pid = psutil, every, pid
        self.base = psutil.virtual_memory().used
        self.peak_used, self.peak_tree, self.peak_processes = self.base, 0, 0
        self.at_peak: dict[str, int] = {}
        self.each_peak: dict[str, int] = {}  # each kind of process's own peak
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _tree(self) -> dict[str, int]:
        """PSS by process (named by its command), this process and every descendant."""
        try:
            me = self._psutil.Process(self.pid)
            tree = [me, *me.children(recursive=True)]
        except self._psutil.NoSuchProcess:
            return {}
        sizes: dict[str, int] = {}
        for proc in tree:
            try:
                info = proc.memory_full_info()
                cmd = proc.cmdline()
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied):
                continue
            name = _process_name(cmd) or proc.name()
            if "multiprocessing.forkserver" in " ".join(cmd):  # the in-process runtime's
                try:
                    forked = "forkserver" in " ".join(proc.parent().cmdline())
                except (self._psutil.NoSuchProcess, self._psutil.AccessDenied, AttributeError):
                    forked = False
                name = "client worker" if forked else "fork server (client imports)"
            elif "multiprocessing.resource_tracker" in " ".join(cmd):
                name = "resource tracker"
            sizes[name] = sizes.get(name, 0) + getattr(info, "pss", info.rss)
        return sizes

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak_used = max(self.peak_used, self._psutil.virtual_memory().used)
            sizes = self._tree()
            for name, size in sizes.items():
                self.each_peak[name] = max(self.each_peak.get(name, 0), size)
            if sum(sizes.values()) > self.peak_tree:
                self.peak_tree, self.peak_processes = sum(sizes.values()), len(sizes)
                self.at_peak = sizes
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
                "process_kinds_at_peak": self.peak_processes,
                "pss_mib_by_process_at_peak": _mib(self.at_peak),
                "peak_pss_mib_of_each_process": _mib(self.each_peak)}


def _mib(sizes: dict[str, int]) -> dict[str, int]:
    return {k: round(v / 2**20) for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])}


def _process_name(cmd: list[str]) -> str:
    """A short name for a process of the run: its program (or Ray's worker title)."""
    if not cmd:
        return ""
    if cmd[0].startswith("ray::"):
        return cmd[0].split()[0]
    prog = [c for c in cmd[:4] if not c.startswith("-")
            and not c.endswith(("python", "python3", "python3.11"))]
    name = os.path.basename(prog[0]) if prog else os.path.basename(cmd[0])
    return "dpfl (this command)" if name in ("dpfl", "cli.py") else name


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
    run = RunDir(run_dir)
    rows = run.rounds()
    return {"clients": num_clients, "cohort": cohort, "rounds": len(rows),
            "wall_seconds_total": round(time.time() - t0, 1),
            "first_round_after_seconds": round(first[0], 1) if first else None,
            "seconds_round_1": round(rows[0].seconds, 2) if rows else None,
            "seconds_per_round_after_1": round(
                seconds_per_round(round_ends(_log_times(server_log(run)))), 3),
            **{k: round(v, 2) if isinstance(v, float) else v for k, v in mem.figures().items()},
            "final_accuracy": rows[-1].test_accuracy if rows else None, "run_dir": str(run_dir)}


def secure_figures(*, rounds: int, backend: Backend | None = None) -> dict:
    """The same work twice, side by side: `--preset distributed` for `rounds` rounds (a
    secure round: five exchanges, one full-batch DP-SGD release per client, masked) and
    the same run with plain rounds and local noise (one exchange, the same full-batch
    step). Median seconds a round after round 1 (the rounds' own seconds), their ratio,
    the secure round's seconds by stage, payload bytes a client sends and receives."""
    import statistics

    from common.presets import PRESETS
    from simulations.simulate import simulate

    secure = {**PRESETS["distributed"][0], "num-rounds": rounds}
    plain = {**secure, "secure-aggregation": "none", "noise": "local"}
    out: dict = {"rounds": rounds}
    for name, over in (("local", plain), ("secure", secure)):
        run = RunDir(simulate(over, output_dir=tempfile.mkdtemp(prefix=f"dpfl-bench-{name}-"),
                              backend=backend, progress=None))
        rows = run.rounds()
        later = rows[1:] or rows
        per_round = statistics.median(r.seconds for r in later)
        figs: dict[str, object] = {"seconds_per_round_after_1": round(per_round, 3),
                "bytes_up_per_client": round(statistics.median(
                    r.bytes_up / max(r.clients_trained, 1) for r in later)),
                "bytes_down_per_client": round(statistics.median(
                    r.bytes_down / max(r.clients_sampled, 1) for r in later)),
                "final_accuracy": rows[-1].test_accuracy, "epsilon_max": rows[-1].epsilon_max}
        stages = [r.seconds_by_stage for r in later if r.seconds_by_stage]
        if stages:
            figs["seconds_by_stage"] = {k: round(statistics.median(s[k] for s in stages), 3)
                                        for k in stages[0]}
        out[name] = figs
    out["ratio"] = round(out["secure"]["seconds_per_round_after_1"]
                         / out["local"]["seconds_per_round_after_1"], 2)
    return out


def deploy_figures(num_nodes: int, *, rounds: int, extra: dict | None = None) -> dict:
    """The same run twice: on Flower's deployment runtime as real local processes (a
    `flower-superlink` and `num_nodes` `flower-supernode`s on loopback, insecure: TLS
    costs nothing measurable here), and as its simulated twin. Seconds a round after
    round 1 for each, and their ratio."""
    import shutil
    import subprocess

    from common.config import project_root
    from simulations import deploy, runtime
    from simulations.simulate import format_overrides, simulate

    over = {"num-partitions": num_nodes, "num-rounds": rounds, "fraction-train": 1.0,
            "min-available-clients": num_nodes, "min-train-clients": num_nodes, **(extra or {})}
    work = Path(tempfile.mkdtemp(prefix="dpfl-bench-deploy-"))
    home = work / "flwr-home"
    home.mkdir()
    port = runtime.free_port()
    (home / "config.toml").write_text(deploy.connection_toml(f"127.0.0.1:{port}", "",
                                                             insecure=True))
    env = runtime.flower_env(home)
    procs: list[subprocess.Popen] = []
    try:
        procs.append(runtime.start(
            [runtime.tool(c) if i == 0 else c for i, c in enumerate(deploy.superlink_command(
                host="127.0.0.1", port=port, certs="", database=str(work / "superlink.db"),
                insecure=True))], env=env, log_file=work / "superlink.log", cwd=work))
        runtime.wait_for_port(port, proc=procs[0], timeout=60, what="flower-superlink",
                              log_file=work / "superlink.log")
        for i in range(num_nodes):
            (work / f"node-{i}").mkdir()
            cmd = deploy.supernode_command(i, num_nodes=num_nodes, superlink=f"127.0.0.1:{port}",
                                           certs="", state_dir=str(work / f"node-{i}"),
                                           port=runtime.free_port(), insecure=True)
            procs.append(runtime.start([runtime.tool(cmd[0]), *cmd[1:]], env=env,
                                       log_file=work / f"node-{i}.log", cwd=work))
        t0 = time.time()
        text = format_overrides({**over, "output-dir": str(work / "runs"), "run-name": "deploy"})
        done = subprocess.run([runtime.tool("flwr"), "run", str(project_root()), deploy.CONNECTION,
                               "--stream", "--run-config", text], env=env, cwd=project_root(),
                              capture_output=True, text=True, timeout=3600)
        deploy_wall = time.time() - t0
        if done.returncode != 0:
            raise RuntimeError(f"the deployment run failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        rows = RunDir(work / "runs" / "deploy").rounds()
        deployed = _times_in(done.stdout + "\n" + done.stderr)
    finally:
        for proc in reversed(procs):
            runtime.stop(proc)
    twin_run = RunDir(simulate(over, output_dir=str(work / "sim"), progress=None))
    twin = twin_run.rounds()
    simulated = _log_times(server_log(twin_run))
    if not os.environ.get("DPFL_BENCH_KEEP"):
        shutil.rmtree(work, ignore_errors=True)

    def after_1(times: list[tuple[float, str]], rs: list) -> float:
        """Seconds between rounds' ends (a round's records overlap the next round);
        the rounds' own seconds where the output had no timestamped round lines."""
        per_round = seconds_per_round(round_ends(times))
        if not math.isnan(per_round):
            return per_round
        later = rs[1:] or rs
        return sum(r.seconds for r in later) / len(later)

    dep, sim = after_1(deployed, rows), after_1(simulated, twin)
    return {"nodes": num_nodes, "rounds": len(rows), "deployment_wall_seconds": round(deploy_wall, 1),
            "deployment_seconds_round_1": round(rows[0].seconds, 2),
            "deployment_seconds_per_round_after_1": round(dep, 2),
            "simulation_seconds_round_1": round(twin[0].seconds, 2),
            "simulation_seconds_per_round_after_1": round(sim, 2),
            "ratio": round(dep / sim, 2),
            "deployment_accuracy": rows[-1].test_accuracy, "simulation_accuracy": twin[-1].test_accuracy}


def main(args: argparse.Namespace) -> int:
    if args.deploy:
        print(f"dpfl bench --deploy: {args.deploy} SuperNodes as local processes against the "
              f"simulated twin, {args.rounds} rounds, {os.cpu_count()} CPUs")
        print(json.dumps(deploy_figures(args.deploy, rounds=args.rounds)), flush=True)
        return 0
    if args.secure:
        print(f"dpfl bench --secure: {args.secure} rounds of `--preset distributed` against "
              f"the same run with plain rounds and local noise, {os.cpu_count()} CPUs")
        print(json.dumps(secure_figures(rounds=args.secure, backend=Backend(
            client_cpus=args.client_cpus, client_gpus=args.client_gpus,
            ray_address=args.ray_address, runtime=args.runtime, workers=args.workers)),
            indent=2), flush=True)
        return 0
    if args.run is not None:
        print(f"dpfl bench --run: one whole `dpfl simulate` command, {os.cpu_count()} CPUs")
        print(json.dumps(command_figures(args.run, runtime_args=_runtime_args(args)), indent=2,
                         ensure_ascii=False))
        return 0
    if args.scale:
        sizes = [int(n) for n in args.scale.split(",") if n.strip()]
        print(f"dpfl bench --scale: {', '.join(map(str, sizes))} virtual clients, cohorts of "
              f"{args.cohort}, {args.rounds} rounds, {os.cpu_count()} CPUs"
              + (f", Ray cluster {args.ray_address}" if args.ray_address else ""))
        for n in sizes:
            figs = scale_figures(n, cohort=args.cohort, rounds=args.rounds,
                                 backend=Backend(client_cpus=args.client_cpus,
                                                 client_gpus=args.client_gpus,
                                                 ray_address=args.ray_address,
                                                 runtime=args.runtime, workers=args.workers))
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
        print(json.dumps(command_figures("num-rounds=20", runtime_args=_runtime_args(args)),
                         indent=2, ensure_ascii=False))
    return 0


def _runtime_args(args: argparse.Namespace) -> list[str]:
    """The runtime flags given to `dpfl bench`, for the `dpfl simulate` it times."""
    out = ["--runtime", args.runtime]
    if args.workers:
        out += ["--workers", str(args.workers)]
    if args.ray_address:
        out += ["--ray-address", args.ray_address]
    if args.client_cpus != 1.0:
        out += ["--client-cpus", str(args.client_cpus)]
    if args.client_gpus:
        out += ["--client-gpus", str(args.client_gpus)]
    return out
