"""The `dpfl` command."""

from __future__ import annotations

import argparse
import signal
import sys

from common.config import ConfigError, parse_overrides
from common.data import DataError
from common.presets import PRESETS, with_preset


def _backend(args: argparse.Namespace):
    """Where the virtual clients run (simulations.runtime.Backend), from the flags."""
    from simulations.runtime import Backend

    return Backend(client_cpus=args.client_cpus, client_gpus=args.client_gpus,
                   ray_address=args.ray_address, runtime=args.runtime, workers=args.workers)


def _preset_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="", choices=["", *PRESETS], metavar="NAME",
                   help="a named configuration, under --run-config: "  # argparse formats %
                        + "; ".join(f"{n}: {text}" for n, (_, text) in PRESETS.items())
                        .replace("%", "%%"))


def _backend_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", default="auto", choices=["auto", "inprocess", "flower"],
                   help="inprocess: dpfl's runtime (the ServerApp here, the ClientApp in "
                        "worker processes); flower: Flower's simulation engine on Ray "
                        "(SuperLink, flwr run); auto (default): flower when a Ray option "
                        "below is given, else inprocess")
    p.add_argument("--workers", type=int, default=0,
                   help="inprocess: worker processes running clients (default: one per core, "
                        "at most a cohort)")
    p.add_argument("--client-cpus", type=float, default=1.0,
                   help="Ray: CPUs reserved per virtual client (default 1: two at a time on 2 cores)")
    p.add_argument("--client-gpus", type=float, default=0.0,
                   help="Ray: GPUs (a fraction: of one GPU) reserved per virtual client")
    p.add_argument("--ray-address", default="", metavar="HOST:PORT",
                   help="Ray: run the virtual clients on this existing Ray cluster (its "
                        "head's address; default: a Ray started on this machine)")


def _simulate(args: argparse.Namespace) -> int:
    backend = _backend(args)
    if backend.engine == "inprocess":
        from simulations.runtime import warm_up

        warm_up()  # the workers' imports, beside this command's own
    from common.records import RunDir
    from simulations.simulate import resume, simulate, summary_text

    progress = None if args.quiet else print
    if args.resume:
        if args.run_config or args.output_dir:
            raise ConfigError("--resume continues a run with the config it started with: "
                              "--run-config and --output-dir cannot be given with it")
        if args.preset:
            raise ConfigError("--resume continues a run with the config it started with: "
                              "--preset cannot be given with it")
        run_dir = resume(args.resume, backend=backend, progress=progress,
                         ledger_dir=args.ledger_dir)
    else:
        overrides = with_preset(args.preset, parse_overrides(" ".join(args.run_config or [])))
        run_dir = simulate(overrides, output_dir=args.output_dir, backend=backend,
                           progress=progress, ledger_dir=args.ledger_dir)
    print(summary_text(run_dir))
    summary = RunDir(run_dir).summary()
    return 1 if summary is None or summary.stopped_early else 0


def _audit(args: argparse.Namespace) -> int:
    from common.records import RunDir
    from simulations.simulate import simulate, summary_text

    overrides = with_preset(args.preset, parse_overrides(" ".join(args.run_config or [])))
    if args.canaries is not None:
        if "audit-canaries" in overrides and overrides["audit-canaries"] != args.canaries:
            raise ConfigError(f"--canaries {args.canaries} and audit-canaries="
                              f"{overrides['audit-canaries']} disagree: give one")
        overrides["audit-canaries"] = args.canaries
    overrides.setdefault("audit-canaries", 1000)
    if not (isinstance(overrides["audit-canaries"], int) and overrides["audit-canaries"] >= 1):
        raise ConfigError(f"--canaries / audit-canaries={overrides['audit-canaries']!r} must be "
                          "an integer >= 1 for an audit")
    run_dir = simulate(overrides, output_dir=args.output_dir, backend=_backend(args),
                       progress=None if args.quiet else print, ledger_dir=None)
    print(summary_text(run_dir))
    result = RunDir(run_dir).audit()
    if result is None:
        print("dpfl: error: the run wrote no audit.json", file=sys.stderr)
        return 1
    print(audit_text(result))
    summary = RunDir(run_dir).summary()
    return 1 if summary is None or summary.stopped_early else 0


def audit_text(result: dict) -> str:
    """The audit's lines for a terminal."""
    from common.records import decode_float

    eps = decode_float(result["epsilon"])
    lines = [f"audit           {result['canaries']} canaries ({result['members']} in training), "
             f"adversary: {result['adversary']}"]
    for name in ("white_box", "black_box"):
        r = result[name]
        lines.append(f"  {name.replace('_', '-'):<10} epsilon lower bound "
                     f"{decode_float(r['epsilon_lower_bound']):.3f} ({r['correct']} of "
                     f"{r['guesses']} guesses correct), AUC {decode_float(r['auc']):.3f}, "
                     f"TPR at 1% FPR {decode_float(r['tpr_at_1pct_fpr']):.3f}")
    lines.append(f"  stated         epsilon {eps:.3f} (delta {decode_float(result['delta']):g}); "
                 f"the bound holds with {100 * decode_float(result['confidence']):.0f}% confidence")
    return "\n".join(lines)


def _sweep(args: argparse.Namespace) -> int:
    from simulations.report import report
    from simulations.sweep import load_grid, run_sweep

    spec = load_grid(args.grid_file, " ".join(args.grid or []), " ".join(args.run_config or []),
                     preset=args.preset)
    if args.name:
        spec["name"] = args.name
    sweep_dir = run_sweep(spec, args.output_dir, backend=_backend(args))
    print(f"report: {report(sweep_dir)}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from simulations.report import report

    path = report(args.sweep_dir)
    print(path.with_name("results.md").read_text(), end="")
    print(f"report: {path}")
    return 0


def _deploy(args: argparse.Namespace) -> int:
    from pathlib import Path

    from simulations import deploy

    if args.deploy_command == "certs":
        from common import roster

        issuer = roster.load_identity(args.roster_issuer_key) if args.roster_issuer_key else None
        written = deploy.make_certs(Path(args.out), num_nodes=args.nodes, if_missing=args.if_missing,
                                    hosts=tuple(args.host), ips=tuple(args.ip), issuer=issuer)
        for path in written:
            print(f"wrote {path}")
        if issuer is not None:
            print(f'roster signed; each node may set roster-issuer="{roster.openssh(issuer.public_key())}"')
        if not written:
            print(f"{args.out}: certificates and {args.nodes} node keys already exist; nothing written")
        return 0
    text = deploy.compose_yaml(args.nodes, insecure=args.insecure, max_epsilon=args.max_epsilon,
                               max_delta=args.max_delta, eval_holdout=args.eval_holdout)
    if args.insecure:
        print("dpfl: WARNING: insecure compose file: no TLS, no node authentication", file=sys.stderr)
    if args.output == "-":
        print(text, end="")
    else:
        Path(args.output).write_text(text)
        print(f"wrote {args.output} ({args.nodes} SuperNodes)")
    return 0


def _ledger(args: argparse.Namespace) -> int:
    from pathlib import Path

    from client.ledger import reset_ledger, show_ledger
    from common.node import default_ledger_file

    path = Path(args.path) if args.path else default_ledger_file(args.partition_id)
    if args.ledger_command == "show":
        print(show_ledger(path, delta=args.delta, accountant=args.accountant))
        return 0
    print(show_ledger(path, delta=args.delta, accountant=args.accountant))
    if not args.yes:
        print("reset would move this ledger aside, so that the node trains again as if it had "
              "spent nothing. Its data's earlier releases still happened: the guarantee for "
              "those records is then the sum of both budgets. Re-run with --yes to reset.")
        return 1
    backup = reset_ledger(path)
    moved = f"the ledger was moved to {backup}" if backup else "the ledger was already missing"
    print(f"reset: {moved} and its trained-before marker removed; the next round starts a new "
          "ledger at epsilon 0")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from simulations.bench import main as bench_main

    return bench_main(args)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpfl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run one federated experiment with virtual clients")
    sim.add_argument("--run-config", "-c", action="append", metavar='"k=v ..."',
                     help="override config keys (pyproject [tool.flwr.app.config]); repeatable")
    _preset_flag(sim)
    sim.add_argument("--output-dir", help="where run directories go (default: runs/)")
    _backend_flags(sim)
    sim.add_argument("--quiet", action="store_true", help="no per-round progress")
    sim.add_argument("--resume", metavar="RUN_DIR",
                     help="continue a killed run from its last complete round")
    sim.add_argument("--ledger-dir", metavar="DIR",
                     help="keep each virtual client's privacy ledger here (partition-<id>.json), "
                          "so a later run continues its epsilon (default: the run's ledgers/)")
    sim.set_defaults(func=_simulate)

    aud = sub.add_parser("audit", help="one simulation with canaries: an empirical epsilon "
                         "lower bound beside the stated epsilon (audit.json)")
    aud.add_argument("--run-config", "-c", action="append", metavar='"k=v ..."',
                     help="override config keys, as for simulate; repeatable")
    _preset_flag(aud)
    aud.add_argument("--canaries", type=int, default=None,
                     help="canary records, each in training with probability 1/2 (default 1000)")
    aud.add_argument("--output-dir", help="where run directories go (default: runs/)")
    _backend_flags(aud)
    aud.add_argument("--quiet", action="store_true", help="no per-round progress")
    aud.set_defaults(func=_audit)

    sweep = sub.add_parser("sweep", help="a grid of simulations (resumable), then a report")
    sweep.add_argument("grid_file", nargs="?", default=None,
                       help="TOML grid (or the name of one in simulations/grids/, e.g. default)")
    sweep.add_argument("--grid", "-g", action="append", metavar='"k=v1,v2 ..."',
                       help="axes on the command line (partition=iid,dirichlet:0.5 target-epsilon=1,inf)")
    sweep.add_argument("--run-config", "-c", action="append", metavar='"k=v ..."',
                       help="overrides for every point")
    _preset_flag(sweep)
    sweep.add_argument("--name", help="the sweep directory's name (default: the grid's)")
    sweep.add_argument("--output-dir", default="sweeps", help="where sweep directories go (default: sweeps/)")
    _backend_flags(sweep)
    sweep.set_defaults(func=_sweep)

    rep = sub.add_parser("report", help="tables, plots and report.md of a sweep directory")
    rep.add_argument("sweep_dir")
    rep.set_defaults(func=_report)

    dep = sub.add_parser("deploy", help="certificates, node keys and docker-compose.yml")
    dsub = dep.add_subparsers(dest="deploy_command", required=True)
    certs = dsub.add_parser("certs", help="a CA, the SuperLink's TLS certificate and node keys")
    certs.add_argument("--out", default="deploy/certs")
    certs.add_argument("--nodes", type=int, default=3)
    certs.add_argument("--host", action="append", default=["superlink", "localhost"],
                       help="DNS names of the SuperLink (repeatable)")
    certs.add_argument("--ip", action="append", default=["127.0.0.1"], help="IP addresses of the SuperLink")
    certs.add_argument("--if-missing", action="store_true",
                       help="make only what does not exist yet (never overwrite)")
    certs.add_argument("--roster-issuer-key", default="",
                       help="a private key (PEM or OpenSSH) that signs roster.json, so that nodes "
                            "with node config roster-issuer accept it from any channel")
    comp = dsub.add_parser("compose", help="write docker-compose.yml for N SuperNodes")
    comp.add_argument("--nodes", type=int, default=3)
    comp.add_argument("--output", default="docker-compose.yml", help="'-' for standard output")
    comp.add_argument("--max-epsilon", type=float, default=8.0,
                      help="each node's privacy budget: runs asking for more are refused (default 8)")
    comp.add_argument("--max-delta", type=float, default=1e-5,
                      help="the largest delta a node accepts (default 1e-5)")
    comp.add_argument("--eval-holdout", type=float, default=0.1,
                      help="the share of each node's records kept out of training for "
                           "federated evaluation (default 0.1; 0: the nodes never evaluate)")
    comp.add_argument("--insecure", action="store_true",
                      help="no TLS and no node authentication (testing only)")
    dep.set_defaults(func=_deploy)

    led = sub.add_parser("ledger", help="show or reset a node's privacy ledger file")
    lsub = led.add_subparsers(dest="ledger_command", required=True)
    for name, text in (("show", "epsilon spent and the history"),
                       ("reset", "move the ledger aside (asks for --yes)")):
        p = lsub.add_parser(name, help=text)
        p.add_argument("path", nargs="?", help="the ledger file (default: the node's default "
                       "ledger, under DPFL_STATE_DIR or ~/.local/state/dpfl)")
        p.add_argument("--partition-id", type=int, default=0,
                       help="with no path: the default ledger of this partition-id")
        p.add_argument("--delta", type=float, default=1e-5)
        p.add_argument("--accountant", default="rdp", choices=["rdp", "prv"])
        if name == "reset":
            p.add_argument("--yes", action="store_true")
    led.set_defaults(func=_ledger)

    bench = sub.add_parser("bench", help="measure DP-SGD throughput and round time")
    bench.add_argument("--batch-size", type=int, default=None, help="0: full batch (default: config)")
    bench.add_argument("--model", default=None, help="default: the config's model")
    bench.add_argument("--seconds", type=float, default=10.0, help="time per throughput figure")
    bench.add_argument("--modes", default="hooks,functorch,ghost", help="grad-sample modes to time")
    bench.add_argument("--threads", type=int, default=2)
    bench.add_argument("--round", action="store_true",
                       help="also time a short simulation (20 rounds of the defaults) as --run does")
    bench.add_argument("--run", default=None, metavar='"k=v ..."',
                       help="instead: time one whole `dpfl simulate --run-config ...` command: "
                            "start-up phases, seconds a round and their breakdown, memory of "
                            "every process ('' for the defaults)")
    bench.add_argument("--scale", default="", metavar="N1,N2,...",
                       help="instead: simulations of N virtual clients each (e.g. 1000,10000)")
    bench.add_argument("--deploy", type=int, default=0, metavar="N",
                       help="instead: a run on N local SuperNodes against its simulated twin")
    bench.add_argument("--secure", type=int, default=0, metavar="R",
                       help="instead: R secure rounds (--preset distributed) against the same "
                            "rounds with plain exchanges and local noise, side by side")
    bench.add_argument("--cohort", type=int, default=10, help="--scale: clients a round")
    bench.add_argument("--rounds", type=int, default=10, help="--scale, --deploy: rounds a run")
    _backend_flags(bench)
    bench.set_defaults(func=_bench)

    args = parser.parse_args(argv)
    # Ctrl-C and SIGTERM stop a run and every process it started, even when dpfl was
    # started with SIGINT ignored (as a background job of a non-interactive shell is).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.func(args))
    except (ConfigError, DataError, FileExistsError, FileNotFoundError) as exc:
        print(f"dpfl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dpfl: interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, ValueError) as exc:
        print(f"dpfl: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
