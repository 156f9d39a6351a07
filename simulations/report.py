"""`dpfl report SWEEP_DIR`: results.csv, results.md, accuracy_vs_epsilon.png,
accuracy_per_round.png and report.md from the run directories of a sweep.

Reads only files a run writes atomically (config.json, summary.json, rounds.jsonl,
failed.json), so a sweep killed at any moment can be reported: unfinished points are
listed with the rounds they have.
"""

from __future__ import annotations

import csv
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import ConfigError, ExperimentConfig, default_run_config
from common.files import atomic_write, atomic_write_text
from common.records import SWEEP_FILE, Failure, RoundRecord, RunDir, RunInfo, RunSummary, read_json

# Published centralized DP-SGD results on Fashion-MNIST at epsilon = 3 (delta = 1e-5):
# Tramer & Boneh, "Differentially Private Learning Needs Better Features (or Much More
# Data)", ICLR 2021, Table 1.
REFERENCES = [
    (3.0, 0.860, "end-to-end CNN, centralized (Tramèr & Boneh 2021)"),
    (3.0, 0.897, "ScatterNet + linear, centralized (Tramèr & Boneh 2021)"),
]

PRIVACY_MODEL = (
    "Record-level differential privacy at each client: every client runs DP-SGD (Opacus) "
    "with Poisson sampling, per-sample gradient clipping and Gaussian noise, and composes "
    "its epsilon over every step it takes in every round it joins (RDP accountant unless "
    "the config says PRV). A record's guarantee is its own client's (epsilon, delta); the "
    "tables report the maximum and the mean over clients, never a weighted average. There "
    "is no client-level (user-level) guarantee."
)
LOCAL_SEEN = "With local noise the server sees each client's noisy model."
SECURE_SEEN = (
    "With secure-aggregation=secagg+ the server sees only each cohort's sum (SecAgg+): each "
    "client releases one full-batch step, clipped per record, rounded to integers and "
    "masked; with noise=distributed it adds its share of Skellam noise, so that the "
    "threshold of survivors carries the noise its ledger records (docs/secure-aggregation.md).")


def privacy_model(runs: list[Run]) -> str:
    """The report's privacy model, saying what the server saw in these runs."""
    secure = {r.cfg.secure.enabled for r in runs}
    seen = [text for on, text in ((False, LOCAL_SEEN), (True, SECURE_SEEN)) if on in secure]
    return " ".join([PRIVACY_MODEL, *seen])


@dataclass
class Run:
    name: str
    dir: Path
    run_config: dict[str, Any]  # as recorded (shown in the report)
    cfg: ExperimentConfig  # as this dpfl reads it
    summary: RunSummary | None
    rounds: list[RoundRecord]
    failed: Failure | None
    libraries: dict[str, str] = field(default_factory=dict)

    @property
    def status(self) -> str:
        if self.summary is not None:
            return "stopped early" if self.summary.stopped_early else "finished"
        return "failed" if self.failed else "incomplete"

    @property
    def budget(self) -> float:
        return self.cfg.privacy.budget


def partition_label(cfg: ExperimentConfig) -> str:
    d = cfg.data
    if d.partitioner == "dirichlet":
        return f"Dirichlet(α={d.dirichlet_alpha:g})"
    if d.partitioner == "pathological":
        return f"{d.labels_per_client} labels/client"
    return "IID"


def load_runs(sweep_dir: Path) -> list[Run]:
    order: list[str] = []
    if (sweep_dir / SWEEP_FILE).exists():
        order = list(read_json(sweep_dir / SWEEP_FILE).get("points", []))
    dirs = sorted((d for d in sweep_dir.iterdir() if d.is_dir() and not d.name.startswith(".")),
                  key=lambda d: (order.index(d.name) if d.name in order else len(order), d.name))
    runs = []
    for d in dirs:
        run = RunDir(d)
        failed, info = run.failure(), run.info()
        if info is None and failed is not None:
            info = RunInfo(run_config={**default_run_config(), **failed.overrides})
        if info is None:
            continue  # not a run directory
        try:
            cfg = info.config()
        except ConfigError as exc:  # a config this dpfl no longer accepts: say so, go on
            print(f"dpfl report: {d.name} skipped: its config does not parse ({exc})", file=sys.stderr)
            continue
        runs.append(Run(d.name, d, dict(info.run_config), cfg, run.summary(), run.rounds(),
                        failed, dict(info.libraries)))
    return runs


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    if any(math.isinf(v) for v in vals):
        return max(vals), 0.0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


# Keys shown in their own columns, or that name a run rather than configure it.
_COLUMNS = {"partitioner", "dirichlet-alpha", "labels-per-client", "num-partitions",
            "target-epsilon", "dp", "seed", "run-name", "ledger-dir", "output-dir", "resume"}


def varying_keys(runs: Sequence[Run]) -> list[str]:
    keys = sorted({k for r in runs for k in r.run_config})
    return [k for k in keys if len({str(r.run_config.get(k)) for r in runs}) > 1]


def group_rows(runs: Sequence[Run], axes: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per (partition, clients, target epsilon, other axes): mean ± std over
    seeds. `axes`: the sweep's grid keys (default: every key that varies)."""
    if axes is None:
        axes = varying_keys(runs)
    extra = [k for k in axes if k not in _COLUMNS and k != "partition"]
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        setting = " ".join(f"{k}={r.run_config.get(k)}" for k in extra)
        key = (partition_label(r.cfg), r.cfg.federation.num_partitions, r.budget, setting)
        groups.setdefault(key, []).append(r)
    rows = []
    def order(key: tuple) -> tuple:
        part, clients, eps, setting = key
        return (part != "IID", part, clients, setting, eps)  # IID first, then by label

    for (part, clients, eps, setting), members in sorted(groups.items(), key=lambda kv: order(kv[0])):
        summaries = [m.summary for m in members if m.summary is not None]
        final = _mean_std([s.final_accuracy for s in summaries])
        best = _mean_std([s.best_accuracy for s in summaries])
        eps_max = max((s.epsilon_max for s in summaries), default=math.nan)
        eps_mean = _mean_std([s.epsilon_mean for s in summaries])[0]
        bounds = [s.epsilon_lower_bound for s in summaries if not math.isnan(s.epsilon_lower_bound)]
        rows.append({
            "dataset": members[0].cfg.data.dataset,
            "partition": part, "clients": clients, "target_epsilon": eps, "setting": setting,
            "epsilon_max": eps_max, "epsilon_mean": eps_mean,
            # audit runs: the largest empirical lower bound over seeds
            "epsilon_lower_bound": max(bounds) if bounds else math.nan,
            "final_accuracy_mean": final[0], "final_accuracy_std": final[1],
            "best_accuracy_mean": best[0], "best_accuracy_std": best[1],
            "seeds": len(summaries), "points": len(members),
            "rounds": max((len(m.rounds) for m in members), default=0),
            "wall_seconds": statistics.fmean([s.wall_seconds for s in summaries])
            if summaries else math.nan,
            "status": ", ".join(sorted({m.status for m in members})),
            "runs": " ".join(m.name for m in members),
        })
    return rows


def _fmt_eps(x: float) -> str:
    return "∞" if math.isinf(x) else ("-" if math.isnan(x) else f"{x:.4g}")


def _fmt_acc(mean: float, std: float, seeds: int) -> str:
    if math.isnan(mean):
        return "-"
    return f"{100 * mean:.1f}%" + (f" ± {100 * std:.1f}" if seeds > 1 else "")


def results_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    with_setting = any(r["setting"] for r in rows)
    audited = any(not math.isnan(r.get("epsilon_lower_bound", math.nan)) for r in rows)
    head = ("| partition | clients | " + ("setting | " if with_setting else "")
            + "target ε | achieved ε max | ε mean | " + ("ε lower bound (audit) | " if audited else "")
            + "final accuracy | best accuracy | seeds | "
            "rounds | wall time | status |\n|---|---|" + ("---|" if with_setting else "")
            + ("---|" if audited else "") + "---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        wall = "-" if math.isnan(r["wall_seconds"]) else f"{r['wall_seconds'] / 60:.1f} min"
        lines.append(
            f"| {r['partition']} | {r['clients']} | " + (f"{r['setting']} | " if with_setting else "")
            + f"{_fmt_eps(r['target_epsilon'])} | "
            f"{_fmt_eps(r['epsilon_max'])} | {_fmt_eps(r['epsilon_mean'])} | "
            + (f"{_fmt_eps(r.get('epsilon_lower_bound', math.nan))} | " if audited else "")
            + f"{_fmt_acc(r['final_accuracy_mean'], r['final_accuracy_std'], r['seeds'])} | "
            f"{_fmt_acc(r['best_accuracy_mean'], r['best_accuracy_std'], r['seeds'])} | "
            f"{r['seeds']} | {r['rounds']} | {wall} | {r['status']} |"
        )
    return head + "\n".join(lines) + "\n"


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    if not rows:
        atomic_write_text(path, "")
        return

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)

    atomic_write(path, write)


def plot_accuracy_vs_epsilon(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=130)
    finite = [r for r in rows if not math.isinf(r["target_epsilon"]) and not math.isnan(r["final_accuracy_mean"])]
    series = sorted({(r["partition"], r["clients"], r["setting"]) for r in rows})
    multi_clients = len({c for _, c, _ in series}) > 1
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (part, clients, setting) in enumerate(series):
        color = colors[i % len(colors)]
        label = part + (f", {clients} clients" if multi_clients else "") + (f", {setting}" if setting else "")
        pts = sorted((r for r in finite if (r["partition"], r["clients"], r["setting"]) == (part, clients, setting)),
                     key=lambda r: r["target_epsilon"])
        if pts:
            ax.errorbar([r["epsilon_max"] if not math.isnan(r["epsilon_max"]) else r["target_epsilon"] for r in pts],
                        [100 * r["final_accuracy_mean"] for r in pts],
                        yerr=[100 * r["final_accuracy_std"] for r in pts], marker="o", capsize=3,
                        color=color, label=f"dpfl, {label}")
        for r in rows:
            if (r["partition"], r["clients"], r["setting"]) == (part, clients, setting) \
                    and math.isinf(r["target_epsilon"]) \
                    and not math.isnan(r["final_accuracy_mean"]):
                ax.axhline(100 * r["final_accuracy_mean"], color=color, linestyle="--", linewidth=1,
                           label=f"non-private, {label} ({100 * r['final_accuracy_mean']:.1f}%)")
    datasets = sorted({str(r.get("dataset", "fashion-mnist")) for r in rows})
    references = REFERENCES if datasets == ["fashion-mnist"] else []  # published for it only
    for (eps, acc, text), marker in zip(references, ("s", "D")[:len(references)], strict=True):
        ax.scatter([eps], [100 * acc], marker=marker, s=60, color="black", zorder=5,
                   label=f"{text}: {100 * acc:.1f}%")
    ax.set_xscale("log")
    from matplotlib.ticker import FixedLocator, NullLocator

    ticks = sorted({r["target_epsilon"] for r in finite} | {e for e, _, _ in references})
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.set_xlabel("ε achieved (max over clients; δ = target δ), log scale")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title(f"{', '.join(datasets)}: accuracy against privacy budget")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7.5, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def plot_accuracy_per_round(runs: Sequence[Run], path: Path, extra: Sequence[str] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=130)
    parts = sorted({partition_label(r.cfg) for r in runs})
    styles = ["-", "--", ":", "-."]
    epsilons = sorted({r.budget for r in runs})
    seeds = len({r.run_config.get("seed") for r in runs}) > 1
    cmap = plt.get_cmap("viridis")
    for r in runs:
        if not r.rounds:
            continue
        eps = r.budget
        color = cmap(0.9 * epsilons.index(eps) / max(len(epsilons) - 1, 1))
        label = f"{partition_label(r.cfg)}, ε={_fmt_eps(eps)}"
        label += "".join(f", {k}={r.run_config.get(k)}" for k in extra)
        label += f", seed {r.run_config.get('seed')}" if seeds else ""
        ax.plot([row.round for row in r.rounds], [100 * row.test_accuracy for row in r.rounds],
                linestyle=styles[parts.index(partition_label(r.cfg)) % len(styles)],
                color=color, linewidth=1.2, label=label)
        fed = [row for row in r.rounds if row.federated_nodes]
        if fed:  # evaluation=federated: the nodes' noisy accuracy and its 95% interval
            ax.errorbar([row.round for row in fed], [100 * row.federated_accuracy for row in fed],
                        yerr=[100 * row.federated_accuracy_interval for row in fed], fmt="o",
                        color=color, markersize=3.5, capsize=3, linewidth=1,
                        label=f"{label}: federated (nodes' held-out records, DP, 95%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy per round (colour: ε; line style: partitioning)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def report(sweep_dir: Path) -> Path:
    """Write the report files into `sweep_dir`; returns report.md's path."""
    sweep_dir = Path(sweep_dir).expanduser().resolve()
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir} is not a directory")
    runs = load_runs(sweep_dir)
    if not runs:
        raise ValueError(f"{sweep_dir} holds no run directories to report")
    spec = read_json(sweep_dir / SWEEP_FILE) if (sweep_dir / SWEEP_FILE).exists() else {}
    rows = group_rows(runs, list(spec["grid"]) if spec.get("grid") else None)
    write_csv(sweep_dir / "results.csv", rows)
    table = results_markdown(rows)
    atomic_write_text(sweep_dir / "results.md", table)
    plot_accuracy_vs_epsilon(rows, sweep_dir / "accuracy_vs_epsilon.png")
    axes = list(spec["grid"]) if spec.get("grid") else varying_keys(runs)
    plot_accuracy_per_round(runs, sweep_dir / "accuracy_per_round.png",
                            [k for k in axes if k not in _COLUMNS and k != "partition"])

    libs = next((r.libraries for r in runs if r.libraries), {})
    base = runs[0].run_config
    varying = [k for k in varying_keys(runs) if k not in ("run-name", "ledger-dir")]
    if spec.get("grid"):
        varying = sorted(spec["grid"])
    shared = {k: v for k, v in sorted(base.items())
              if k not in varying and k not in ("run-name", "ledger-dir", "output-dir")}
    failed = [r for r in runs if r.status == "failed"]
    over_budget = [r for r in runs if r.summary and r.summary.epsilon_max > r.budget]
    lines = [
        f"# Sweep report: {sweep_dir.name}", "",
        f"Command: `{spec.get('command', 'dpfl sweep')}`" if spec else "",
        "",
        "## Accuracy against ε", "", "![accuracy vs epsilon](accuracy_vs_epsilon.png)", "",
        table, "",
        "Accuracy is the global model's on the dataset's test set (Fashion-MNIST: its "
        "10,000 test images; others: their own or the carved-out 20%) after the last round (mean ± std over seeds when there are several). ε is achieved at the "
        "target δ; every point's achieved ε max is at most its target"
        + ("." if not over_budget else f", EXCEPT {', '.join(r.name for r in over_budget)}."),
        "",
        "## Accuracy per round", "", "![accuracy per round](accuracy_per_round.png)", "",
        "## Privacy model", "", privacy_model(runs), "",
        "## Config", "",
        f"Varying: {', '.join(varying) if varying else '(nothing)'}. Shared by every point:", "",
        "| key | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in shared.items()], "",
        "## Library versions", "",
        ", ".join(f"{k} {v}" for k, v in libs.items()) or "(no finished run)", "",
        f"Published references drawn in the plot: {'; '.join(f'{100 * a:.1f}% at ε={e:g}, {t}' for e, a, t in REFERENCES)}.",
    ]
    if failed:
        lines += ["", "## Failed points", ""]
        lines += [f"- {r.name}: {r.failed.error.splitlines()[0] if r.failed and r.failed.error else ''}"
                  for r in failed]
    path = sweep_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
