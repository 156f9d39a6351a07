"""One validated, frozen experiment config parsed from Flower's run config.

Defaults live once, in `[tool.flwr.app.config]` of pyproject.toml. `parse_config` turns
the run config (defaults + `--run-config` overrides) into an `ExperimentConfig`; nothing
reads `context.run_config` after that. Every check names the field (by its run-config
key) and the allowed range, so a bad config stops before any training.

Why one module of ~650 lines: it is the run config's schema, one frozen dataclass per
section (federation, server, data, train, privacy, attack, baseline, secure, audit,
evaluation, runtime, in pyproject's order), each with the checks of its own keys, then the checks
across sections (ExperimentConfig) and the parser. Split, a reader would lose the one
place that lists every key and its rule; the node's config is its own module
(common/node.py).
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from common.catalogue import (
    DEFAULT_DATASET,
    MODEL_NAMES,
    classes_problem,
    dataset_problem,
    default_model,
    default_partitions,
    is_import_path,
    model_problem_for,
)
from common.errors import ConfigError

PARTITIONERS = ("iid", "dirichlet", "pathological", "natural")
ACCOUNTANTS = ("rdp", "prv")
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost")
CALIBRATE_FOR = ("run", "participations")
DEVICES = ("cpu", "cuda", "auto")
CLIENT_SAMPLING = ("cohorts", "random")
DISCOVERY = ("auto", "all", "lazy")
FULL_DISCOVERY_LIMIT = 1000  # discovery=auto asks every node up to this many partitions
LR_SCHEDULES = ("constant", "cosine")
AGGREGATIONS = ("fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum")
SECURE_AGGREGATION = ("none", "secagg+")
AUTO_MODEL = "auto"  # the dataset's default model (common.models.default_model)
NOISE_PLACEMENTS = ("local", "distributed")
EVALUATIONS = ("server", "federated")
ATTACKS = ("sign-flip", "scale", "nan", "crash", "hang", "inflate-examples", "wrong-shape")




def check_field(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} {rule}")


def clients_per_round(num_clients: int, fraction: float, minimum: int) -> int:
    """How many clients a round samples out of `num_clients` available ones."""
    return min(num_clients, max(int(num_clients * fraction), minimum))


@dataclass(frozen=True, kw_only=True)
class FederationConfig:
    num_rounds: int
    fraction_train: float
    min_train_clients: int
    min_available_clients: int
    num_partitions: int
    client_sampling: str
    max_idle_rounds: int
    round_timeout: float
    node_wait_timeout: float
    discovery: str  # all: every node asked at start; lazy: a node when first sampled

    def __post_init__(self) -> None:
        check_field(self.num_rounds >= 1, "num-rounds", self.num_rounds, "must be >= 1")
        check_field(self.discovery in DISCOVERY, "discovery", self.discovery,
               f"must be one of {', '.join(DISCOVERY)}")
        check_field(
            0.0 < self.fraction_train <= 1.0,
            "fraction-train", self.fraction_train, "must be in (0, 1]",
        )
        check_field(self.num_partitions >= 0, "num-partitions", self.num_partitions,
               "must be >= 1 (or 0: the dataset's default)")
        top = self.num_partitions or math.inf  # 0: checked again once resolved
        check_field(
            1 <= self.min_train_clients <= top,
            "min-train-clients", self.min_train_clients,
            f"must be in [1, num-partitions={self.num_partitions}]",
        )
        check_field(
            1 <= self.min_available_clients <= top,
            "min-available-clients", self.min_available_clients,
            f"must be in [1, num-partitions={self.num_partitions}]",
        )
        check_field(
            self.max_idle_rounds >= 0, "max-idle-rounds", self.max_idle_rounds,
            "must be >= 0 (0: never stop early)",
        )
        check_field(
            self.client_sampling in CLIENT_SAMPLING, "client-sampling", self.client_sampling,
            f"must be one of {', '.join(CLIENT_SAMPLING)}",
        )
        for key, value in (("round-timeout", self.round_timeout),
                           ("node-wait-timeout", self.node_wait_timeout)):
            check_field(0 < value < math.inf, key, value, "must be > 0 seconds and finite")

    def clients_per_round(self, num_clients: int) -> int:
        return clients_per_round(num_clients, self.fraction_train, self.min_train_clients)

    @property
    def lazy_discovery(self) -> bool:
        """Nodes are asked which partition they hold only when first sampled (never all at
        once): discovery=lazy, or auto beyond FULL_DISCOVERY_LIMIT partitions."""
        return self.discovery == "lazy" or (
            self.discovery == "auto" and self.num_partitions > FULL_DISCOVERY_LIMIT)


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """How the server turns a round's updates into the next model: the aggregation rule
    (robust rules for untrusted clients), the update-norm bound, and the server
    optimizer (learning rate, momentum, schedule, weight averaging for evaluation)."""

    aggregation: str
    trim_fraction: float
    krum_malicious: int
    krum_select: int
    max_update_norm: float
    server_learning_rate: float
    server_momentum: float
    server_lr_schedule: str
    server_ema: float

    def __post_init__(self) -> None:
        check_field(
            self.aggregation in AGGREGATIONS, "aggregation", self.aggregation,
            f"must be one of {', '.join(AGGREGATIONS)}",
        )
        check_field(
            0 <= self.trim_fraction < 0.5, "trim-fraction", self.trim_fraction,
            "must be in [0, 0.5)",
        )
        check_field(self.krum_malicious >= 0, "krum-malicious", self.krum_malicious, "must be >= 0")
        check_field(self.krum_select >= 1, "krum-select", self.krum_select, "must be >= 1")
        check_field(
            self.max_update_norm >= 0 and math.isfinite(self.max_update_norm),
            "max-update-norm", self.max_update_norm, "must be >= 0 (0 disables the bound)",
        )
        check_field(
            0 < self.server_learning_rate < math.inf,
            "server-learning-rate", self.server_learning_rate, "must be > 0 and finite",
        )
        check_field(
            0 <= self.server_momentum < 1, "server-momentum", self.server_momentum,
            "must be in [0, 1)",
        )
        check_field(
            self.server_lr_schedule in LR_SCHEDULES, "server-lr-schedule",
            self.server_lr_schedule, f"must be one of {', '.join(LR_SCHEDULES)}",
        )
        check_field(0 <= self.server_ema < 1, "server-ema", self.server_ema, "must be in [0, 1)")


@dataclass(frozen=True)
class SourceKey:
    """What a run's records are, as opposed to how they are partitioned: the key of every
    per-process copy of them (common.data). Fashion-MNIST is its folder alone."""

    dataset: str
    data_dir: str = ""
    label_column: str = "label"
    partition_by: str = ""
    standardize: bool = True
    classes: str = ""


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    dataset: str  # common/data.py: fashion-mnist, digits, breast-cancer, csv:PATH, parquet:PATH
    label_column: str  # a table's label column
    partition_by: str  # partitioner=natural: the table's column whose values are the clients
    partitioner: str
    dirichlet_alpha: float
    labels_per_client: int
    seed: int
    data_dir: str
    standardize: bool  # a table's features standardised with the training part's statistics
    classes: str  # the federation's class list, public ('a,b,c'); "": the labels, sorted

    @property
    def source(self) -> SourceKey:
        if self.dataset == DEFAULT_DATASET:
            return SourceKey(self.dataset, self.data_dir)
        return SourceKey(self.dataset, "", self.label_column, self.partition_by,
                         self.standardize, self.classes)

    def __post_init__(self) -> None:
        problem = dataset_problem(self.dataset)
        check_field(problem is None, "dataset", self.dataset, problem or "")
        problem = classes_problem(self.classes)
        check_field(problem is None, "classes", self.classes, problem or "")
        check_field(bool(self.label_column), "label-column", self.label_column, "must not be empty")
        natural = self.partitioner == "natural"
        check_field(not natural or (bool(self.partition_by) and ":" in self.dataset), "partitioner",
               self.partitioner, "needs a table (dataset=csv:PATH or parquet:PATH) and "
               "partition-by=COLUMN, the column whose values are the clients")
        check_field(not self.partition_by or natural, "partition-by", self.partition_by,
               "needs partitioner=natural")
        check_field(self.partition_by != self.label_column, "partition-by", self.partition_by,
               "must not be the label column")
        check_field(
            self.partitioner in PARTITIONERS, "partitioner", self.partitioner,
            f"must be one of {', '.join(PARTITIONERS)}",
        )
        check_field(
            self.dirichlet_alpha > 0 and math.isfinite(self.dirichlet_alpha),
            "dirichlet-alpha", self.dirichlet_alpha, "must be > 0",
        )
        check_field(
            1 <= self.labels_per_client <= 10,
            "labels-per-client", self.labels_per_client, "must be in [1, 10]",
        )
        check_field(self.seed >= 0, "seed", self.seed, "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    model: str
    local_epochs: int
    batch_size: int
    learning_rate: float
    momentum: float

    def __post_init__(self) -> None:
        check_field(
            self.model in MODEL_NAMES or self.model == AUTO_MODEL or is_import_path(self.model),
            "model", self.model,
            f"must be {AUTO_MODEL}, one of {', '.join(MODEL_NAMES)}, or 'package.module:builder'"
        )
        check_field(self.local_epochs >= 1, "local-epochs", self.local_epochs, "must be >= 1")
        check_field(self.batch_size >= 0, "batch-size", self.batch_size, "must be >= 0 (0: full batch)")
        check_field(0 < self.learning_rate < math.inf, "learning-rate", self.learning_rate,
               "must be > 0 and finite")
        check_field(0 <= self.momentum < 1, "momentum", self.momentum, "must be in [0, 1)")


@dataclass(frozen=True, kw_only=True)
class BaselineConfig:
    """The non-private baseline's optimizer (keys `baseline-*`). DP-SGD's settings (one
    large step on clipped, noisy gradients) diverge without clipping, so a run without DP
    trains with these instead of batch-size, learning-rate and server-momentum; see
    `ExperimentConfig.client_train` and `ExperimentConfig.server_momentum`."""

    batch_size: int
    learning_rate: float
    server_momentum: float

    def __post_init__(self) -> None:
        check_field(self.batch_size >= 0, "baseline-batch-size", self.batch_size,
               "must be >= 0 (0: full batch)")
        check_field(0 < self.learning_rate < math.inf, "baseline-learning-rate", self.learning_rate,
               "must be > 0 and finite")
        check_field(0 <= self.server_momentum < 1, "baseline-server-momentum", self.server_momentum,
               "must be in [0, 1)")


@dataclass(frozen=True, kw_only=True)
class PrivacyConfig:
    """Record-level DP-SGD at each client. Names follow Opacus."""

    dp: bool
    target_epsilon: float
    target_delta: float
    noise_multiplier: float
    max_grad_norm: float
    accountant: str
    calibrate_for: str
    participation_margin: float

    def __post_init__(self) -> None:
        check_field(
            self.target_epsilon > 0, "target-epsilon", self.target_epsilon,
            "must be > 0 (use inf or dp=false for the non-private baseline)",
        )
        check_field(
            0 < self.target_delta < 1, "target-delta", self.target_delta, "must be in (0, 1)"
        )
        check_field(
            self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier),
            "noise-multiplier", self.noise_multiplier,
            "must be >= 0 (0 calibrates it from target-epsilon)",
        )
        check_field(
            0 < self.max_grad_norm < math.inf,
            "max-grad-norm", self.max_grad_norm, "must be > 0 and finite",
        )
        check_field(
            self.accountant in ACCOUNTANTS, "accountant", self.accountant,
            f"must be one of {', '.join(ACCOUNTANTS)}",
        )
        check_field(
            self.calibrate_for in CALIBRATE_FOR, "calibrate-for", self.calibrate_for,
            f"must be one of {', '.join(CALIBRATE_FOR)}",
        )
        check_field(
            self.participation_margin >= 1 and math.isfinite(self.participation_margin),
            "participation-margin", self.participation_margin, "must be >= 1",
        )

    @property
    def private(self) -> bool:
        """True when clients run DP-SGD (noise and clipping) and account for it."""
        if not self.dp:
            return False
        return math.isfinite(self.target_epsilon) or self.noise_multiplier > 0

    @property
    def budget(self) -> float:
        """The epsilon this run promises each client: target-epsilon, or inf without DP."""
        return self.target_epsilon if self.private else math.inf

    def check_delta(self, num_examples: int, *, client: str = "client") -> None:
        """delta must be below 1/n for the client's n records, or the guarantee is vacuous."""
        if self.private and self.target_delta >= 1.0 / max(num_examples, 1):
            raise ConfigError(
                f"target-delta={self.target_delta!r} must be < 1/n = {1.0 / num_examples:.3g} "
                f"for {client} with n={num_examples} records"
            )


@dataclass(frozen=True, kw_only=True)
class SecureAggregationConfig:
    """SecAgg+ with an integer release (docs/secure-aggregation.md). `noise`: each client
    adds the whole noise of its guarantee (local) or its share of it, so that the sum of
    any `secagg-threshold` fraction of the cohort carries it (distributed). `secagg-bits`:
    the field's width, each coordinate's bits on the wire (0: the fewest at which rounding
    adds at most 2% to the noise, chosen once a run by the server); `secagg-sigmas`: how many
    standard deviations of one coordinate of the rotated sum (noise and signal) the field
    holds (the server's scale follows; a coordinate beyond wraps)."""

    secure_aggregation: str
    noise: str
    secagg_bits: int
    secagg_threshold: float
    secagg_sigmas: float

    def __post_init__(self) -> None:
        check_field(self.secure_aggregation in SECURE_AGGREGATION, "secure-aggregation",
               self.secure_aggregation, f"must be one of {', '.join(SECURE_AGGREGATION)}")
        check_field(self.noise in NOISE_PLACEMENTS, "noise", self.noise,
               f"must be one of {', '.join(NOISE_PLACEMENTS)}")
        check_field(self.noise == "local" or self.enabled, "noise", self.noise,
               "needs secure-aggregation=secagg+ (without it the server sees each share, "
               "which carries too little noise alone)")
        check_field(self.secagg_bits == 0 or 8 <= self.secagg_bits <= 62, "secagg-bits",
                    self.secagg_bits, "must be 0 (auto: the server's choice, the fewest bits "
                    "at which rounding adds at most 2% to the noise) or in [8, 62]")
        check_field(0.5 < self.secagg_threshold <= 1, "secagg-threshold", self.secagg_threshold,
               "must be in (0.5, 1] (a fraction of the cohort; above half, so that no server "
               "can collect both secrets of one client)")
        check_field(2 <= self.secagg_sigmas <= 64, "secagg-sigmas", self.secagg_sigmas,
               "must be in [2, 64] (standard deviations of the sum the field holds)")

    @property
    def enabled(self) -> bool:
        return self.secure_aggregation != "none"

    def threshold(self, cohort: int) -> int:
        """t: the survivors a round needs (more than half the cohort, at least the
        configured fraction)."""
        return min(cohort, max(cohort // 2 + 1, math.ceil(self.secagg_threshold * cohort - 1e-9)))


@dataclass(frozen=True, kw_only=True)
class AuditConfig:
    """`audit-canaries`: m > 0 makes the run a one-run privacy audit (common/audit.py,
    docs/results/audit.md): m canary slots spread over the partitions, each canary in
    training with probability 1/2 (from the run's seed), scored by the server from what
    it sees, and an empirical epsilon lower bound in audit.json at the end."""

    audit_canaries: int

    def __post_init__(self) -> None:
        check_field(0 <= self.audit_canaries <= MAX_CANARIES, "audit-canaries", self.audit_canaries,
               f"must be in [0, {MAX_CANARIES}] (0: no audit)")


MAX_CANARIES = 20_000  # the auditor holds every canary input in memory


@dataclass(frozen=True, kw_only=True)
class EvaluationConfig:
    """Where the global model is evaluated (common/fedeval.py, docs/federated-evaluation.md).
    `server`: on the dataset's test set at the server, every round. `federated`: every
    `eval-every` rounds (and after the last), an `eval-fraction` share of the nodes
    evaluate it on records they hold out for it (node config eval-holdout, the node's
    choice) and release only noisy sums (correct predictions, loss clipped to
    `eval-loss-bound`), each release a Gaussian mechanism in the node's ledger; the
    training noise is calibrated so that the planned evaluations, at `eval-budget-share`
    of target-epsilon by themselves, fit the budget with it."""

    evaluation: str
    eval_every: int
    eval_fraction: float
    eval_budget_share: float
    eval_loss_bound: float

    def __post_init__(self) -> None:
        check_field(self.evaluation in EVALUATIONS, "evaluation", self.evaluation,
                    f"must be one of {', '.join(EVALUATIONS)}")
        check_field(self.eval_every >= 1, "eval-every", self.eval_every, "must be >= 1 (rounds)")
        check_field(0 < self.eval_fraction <= 1, "eval-fraction", self.eval_fraction,
                    "must be in (0, 1] (the share of the nodes that evaluate)")
        check_field(0 < self.eval_budget_share <= 0.5, "eval-budget-share",
                    self.eval_budget_share, "must be in (0, 0.5] (of target-epsilon)")
        check_field(0 < self.eval_loss_bound < math.inf, "eval-loss-bound",
                    self.eval_loss_bound, "must be > 0 and finite (a record's loss is "
                    "clipped to it)")

    @property
    def federated(self) -> bool:
        return self.evaluation == "federated"

    def rounds(self, num_rounds: int) -> list[int]:
        """The rounds after which the federation evaluates: every eval-every-th and the
        last."""
        out = list(range(self.eval_every, num_rounds + 1, self.eval_every))
        return out if out and out[-1] == num_rounds else [*out, num_rounds]

    def evaluators(self, num_clients: int) -> int:
        """Nodes asked to evaluate each time."""
        return max(1, min(num_clients, round(self.eval_fraction * num_clients)))

    def planned(self, num_rounds: int, num_clients: int) -> int:
        """Evaluations each node's budget plans for: the server asks the nodes in turn (a
        seeded shuffle cut in groups), so none is asked more often than this."""
        return math.ceil(len(self.rounds(num_rounds)) * self.evaluators(num_clients)
                         / num_clients)


@dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
    """Performance and I/O knobs: they never change the privacy guarantee."""

    grad_sample_mode: str
    device: str
    num_threads: int
    output_dir: str
    run_name: str
    resume: bool
    keep_transcript: bool  # secure aggregation: save what the server received each round

    def __post_init__(self) -> None:
        check_field(
            self.grad_sample_mode in GRAD_SAMPLE_MODES, "grad-sample-mode",
            self.grad_sample_mode, f"must be one of {', '.join(GRAD_SAMPLE_MODES)}",
        )
        check_field(
            self.device in DEVICES, "device", self.device, f"must be one of {', '.join(DEVICES)}"
        )
        check_field(self.num_threads >= 0, "num-threads", self.num_threads, "must be >= 0 (0: torch default)")
        check_field(
            all(c.isalnum() or c in "-_." for c in self.run_name),
            "run-name", self.run_name, "may hold only letters, digits, '-', '_' and '.'",
        )


@dataclass(frozen=True, kw_only=True)
class AttackConfig:
    """Simulated Byzantine clients, for robustness experiments only: partitions
    0 .. attackers-1 misbehave (after training under DP and accounting as usual). With
    several comma-separated attacks, attacker i uses attack i mod their count."""

    attack: str
    attackers: int
    attack_scale: float

    def __post_init__(self) -> None:
        unknown = [a for a in self.modes if a not in ATTACKS]
        check_field(not unknown, "attack", self.attack,
               f"must be empty or comma-separated names from {', '.join(ATTACKS)}")
        check_field(self.attackers >= 0, "attackers", self.attackers, "must be >= 0")
        check_field(0 < self.attack_scale < math.inf, "attack-scale", self.attack_scale,
               "must be > 0 and finite")

    @property
    def modes(self) -> list[str]:
        return [a.strip() for a in self.attack.split(",") if a.strip() and a.strip() != "none"]

    def mode_for(self, partition_id: int) -> str:
        """The attack partition `partition_id` carries out, or "" for an honest client."""
        modes = self.modes
        if not modes or partition_id >= self.attackers:
            return ""
        return modes[partition_id % len(modes)]


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    federation: FederationConfig
    server: ServerConfig
    data: DataConfig
    train: TrainConfig
    privacy: PrivacyConfig
    attack: AttackConfig
    baseline: BaselineConfig
    secure: SecureAggregationConfig
    audit: AuditConfig
    evaluation: EvaluationConfig
    runtime: RuntimeConfig = field(compare=False)

    def __post_init__(self) -> None:
        self._resolve_model()
        fed = self.federation
        if self.secure.enabled:
            self._check_secure()
            check_field(not self.evaluation.federated, "evaluation", self.evaluation.evaluation,
                        "must be server with secure-aggregation=secagg+ for now (a federated "
                        "evaluation's sums are released to the server one node at a time)")
        check_field(
            self.attack.attackers <= fed.num_partitions, "attackers", self.attack.attackers,
            f"must be <= num-partitions={fed.num_partitions}",
        )
        srv = self.server
        if srv.aggregation in ("krum", "multikrum"):
            k = fed.clients_per_round(fed.num_partitions)
            check_field(
                k > 2 * srv.krum_malicious + 2, "krum-malicious", srv.krum_malicious,
                f"must satisfy clients per round ({k}) > 2 * krum-malicious + 2",
            )
        if srv.aggregation == "multikrum":
            check_field(
                srv.krum_select <= fed.clients_per_round(fed.num_partitions), "krum-select",
                srv.krum_select, "must be <= the clients sampled per round",
            )

    def _resolve_model(self) -> None:
        """model=auto and num-partitions=0 become the dataset's defaults; a model that
        cannot take the dataset's records is refused by name."""
        data, train = self.data, self.train
        if self.federation.num_partitions == 0:
            object.__setattr__(self, "federation", replace(
                self.federation, num_partitions=default_partitions(data.dataset)))
        if train.model == AUTO_MODEL:
            object.__setattr__(self, "train", replace(train, model=default_model(data.dataset)))
        problem = model_problem_for(self.train.model, data.dataset)
        check_field(problem is None, "model", self.train.model, problem or "")

    def _check_secure(self) -> None:
        """What secure aggregation's integer release needs: one accounted full-batch
        DP-SGD step per participation, and a server that never looks at one update."""
        key = "secure-aggregation=secagg+"
        priv, fed, train = self.privacy, self.federation, self.train
        check_field(priv.private, "dp", priv.dp, f"must be true with a finite target-epsilon for {key}")
        check_field(priv.accountant == "rdp", "accountant", priv.accountant,
               f"must be rdp for {key} (Skellam releases are composed in RDP)")
        check_field(train.batch_size == 0, "batch-size", train.batch_size,
               f"must be 0 (full batch: one DP-SGD step per released update) for {key}")
        check_field(train.local_epochs == 1, "local-epochs", train.local_epochs, f"must be 1 for {key}")
        check_field(train.momentum == 0, "momentum", train.momentum, f"must be 0 for {key}")
        check_field(fed.min_train_clients >= 2, "min-train-clients", fed.min_train_clients,
               f"must be >= 2 for {key} (a cohort of one is no aggregation)")
        check_field(self.server.aggregation == "fedavg", "aggregation", self.server.aggregation,
               f"must be fedavg for {key} (the server sees only the sum)")
        check_field(self.server.max_update_norm == 0, "max-update-norm",
                    self.server.max_update_norm,
               f"must be 0 for {key} (no single update is visible to bound)")
        check_field(not self.attack.modes, "attack", self.attack.attack,
               f"must be empty for {key} (simulated attacks alter single updates)")

    @property
    def client_train(self) -> TrainConfig:
        """The client optimizer in force: `train` for a private run; for the non-private
        baseline, `train` with the baseline's batch size and learning rate."""
        if self.privacy.private:
            return self.train
        return replace(self.train, batch_size=self.baseline.batch_size,
                       learning_rate=self.baseline.learning_rate)

    @property
    def server_momentum(self) -> float:
        """The server momentum in force (the baseline's without DP)."""
        return self.server.server_momentum if self.privacy.private \
            else self.baseline.server_momentum

    def to_run_config(self) -> dict[str, Any]:
        """The flat run-config dict (dashed keys) that parses back to this config."""
        out: dict[str, Any] = {}
        for name, (_, prefix) in _SECTIONS.items():
            for k, v in asdict(getattr(self, name)).items():
                out[prefix + k.replace("_", "-")] = v
        return out


# section -> (class, prefix of its run-config keys)
_SECTIONS: dict[str, tuple[type, str]] = {
    "federation": (FederationConfig, ""),
    "server": (ServerConfig, ""),
    "data": (DataConfig, ""),
    "train": (TrainConfig, ""),
    "privacy": (PrivacyConfig, ""),
    "attack": (AttackConfig, ""),
    "baseline": (BaselineConfig, "baseline-"),
    "secure": (SecureAggregationConfig, ""),
    "audit": (AuditConfig, ""),
    "evaluation": (EvaluationConfig, ""),
    "runtime": (RuntimeConfig, ""),
}


def _field_types() -> dict[str, tuple[str, str, type]]:
    """run-config key -> (section, field name, type)."""
    out: dict[str, tuple[str, str, type]] = {}
    for section, (cls, prefix) in _SECTIONS.items():
        for f in fields(cls):
            out[prefix + f.name.replace("_", "-")] = (
                section, f.name, {"int": int, "float": float, "bool": bool, "str": str}[str(f.type)])
    return out


FIELD_TYPES = _field_types()
# keys of earlier versions: what replaced them
REMOVED_KEYS = {
    "secagg-headroom": "the server's scale now follows the noise and the rotated sum's "
                       "spread (secagg-sigmas standard deviations fill the field); remove it",
}


def coerce_value(key: str, value: Any, typ: type) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key}={value!r} must be true or false")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be an integer")
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{key}={value!r} must be an integer")
        return int(value)
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number")
        value = float(value)
        if math.isnan(value):
            raise ConfigError(f"{key}=nan is not a number")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{key}={value!r} must be a string")
    return value


def parse_config(run_config: Mapping[str, Any]) -> ExperimentConfig:
    """Validate a flat run config (dashed keys, as Flower passes it) into one frozen config."""
    unknown = sorted(set(run_config) - set(FIELD_TYPES))
    gone = [f"{k}: {REMOVED_KEYS[k]}" for k in unknown if k in REMOVED_KEYS]
    if gone:
        raise ConfigError("removed config key(s): " + "; ".join(gone))
    if unknown:
        raise ConfigError(
            f"unknown config key(s): {', '.join(unknown)}; known keys: {', '.join(sorted(FIELD_TYPES))}"
        )
    missing = sorted(set(FIELD_TYPES) - set(run_config))
    if missing:
        raise ConfigError(f"missing config key(s): {', '.join(missing)}")
    kwargs: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    for key, value in run_config.items():
        section, name, typ = FIELD_TYPES[key]
        kwargs[section][name] = coerce_value(key, value, typ)
    built = {s: cls(**kwargs[s]) for s, (cls, _) in _SECTIONS.items()}
    return ExperimentConfig(**built)


def project_root() -> Path:
    return Path(__file__).resolve().parent.parent


def default_run_config(pyproject: Path | None = None) -> dict[str, Any]:
    """The defaults from `[tool.flwr.app.config]`."""
    path = pyproject or project_root() / "pyproject.toml"
    with open(path, "rb") as f:
        return dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


_PAIR = re.compile(r"""(\S+?)=('[^']*'|"[^"]*"|\S+)""")


def parse_overrides(text: str) -> dict[str, Any]:
    """Parse `k=v k2=v2` as `flwr run --run-config` does (TOML values); a bare word that is
    not TOML (e.g. `partitioner=iid`) is taken as a string."""
    out: dict[str, Any] = {}
    rest = _PAIR.sub("", text).strip()
    if rest:
        raise ConfigError(f"cannot parse run config near {rest!r}: expected key=value pairs")
    for key, raw in _PAIR.findall(text):
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw
    return out


def data_config(**fields: Any) -> DataConfig:
    """The default run's data config with `fields` (DataConfig's names) replaced: for
    tools and tests that read data outside a run."""
    return replace(_default_data(), **fields)


@lru_cache(maxsize=1)
def _default_data() -> DataConfig:
    return resolve_config({}).data


def resolve_config(overrides: Mapping[str, Any]) -> ExperimentConfig:
    """Defaults + overrides, validated. Unknown override keys are rejected by name."""
    defaults = default_run_config()
    unknown = sorted(set(overrides) - set(defaults))
    gone = [f"{k}: {REMOVED_KEYS[k]}" for k in unknown if k in REMOVED_KEYS]
    if gone:
        raise ConfigError("removed config key(s): " + "; ".join(gone))
    if unknown:
        raise ConfigError(
            f"unknown config key(s): {', '.join(unknown)}; known keys: {', '.join(sorted(defaults))}"
        )
    return parse_config({**defaults, **overrides})
