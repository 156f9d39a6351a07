"""The data holder's side: node config, owned by the node's operator, never by the server.

In deployment it is Flower's node config (`flower-supernode --node-config`); Flower's
simulation sets only partition-id and num-partitions per virtual node, so the harness
that starts the simulation passes the rest in the environment variable NODE_CONFIG_ENV
(the same `k=v ...` syntax). The node's identity (partition), its records, its privacy
policy (enforced as the stricter of policy and run config) and where its ledger lives.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from common.catalogue import classes_problem, is_import_path, own_data_problem
from common.config import (
    ConfigError,
    DataConfig,
    EvaluationConfig,
    ExperimentConfig,
    PrivacyConfig,
    check_field,
    coerce_value,
    parse_overrides,
)

NODE_CONFIG_ENV = "DPFL_NODE_CONFIG"
EVAL_HOLDOUT = 0.1  # a simulation's nodes under evaluation=federated hold out this share
# node config ledger-path value for a ledger kept in the run's Context.state only
EPHEMERAL_LEDGER = ":ephemeral:"
STATE_DIR_ENV = "DPFL_STATE_DIR"


def state_dir() -> Path:
    """The node's state folder: DPFL_STATE_DIR, else $XDG_STATE_HOME/dpfl, else
    ~/.local/state/dpfl (the node operator's environment, never the server's)."""
    if os.environ.get(STATE_DIR_ENV):
        return Path(os.environ[STATE_DIR_ENV]).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "dpfl"


def default_ledger_file(partition_id: int) -> Path:
    """Where a node keeps its ledger unless its node config says otherwise: one file per
    partition-id in the state folder, for every run on this machine."""
    return state_dir() / "ledgers" / f"partition-{partition_id}.json"


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    """One node's identity, files and privacy policy, owned by its data holder.

    The policy is enforced by the client as the stricter of the policy and the run
    config: a run that asks for less privacy than the node allows (DP off, a larger
    target-epsilon or target-delta, a smaller fixed noise multiplier) is refused and
    spends nothing. Defaults are private: DP required, epsilon <= 8 at delta <= 1e-5."""

    partition_id: int
    num_partitions: int
    data_dir: str = ""  # the node's own records (IDX files), used whole
    dataset: str = ""  # or in a table or Hugging Face format (csv:PATH, ...), used whole
    label_column: str = "label"  # its label column
    classes: str = ""  # the classes its labels take, in the federation's order ('a,b,c')
    # this node's ledger file (default: `default_ledger_file`); EPHEMERAL_LEDGER keeps it
    # in the run's Context.state only, a budget per run (the operator's explicit choice)
    ledger_path: str = ""
    ledger_dir: str = ""  # simulation: one ledger file per partition in this folder
    ledger_wait: float = 120.0  # seconds a request waits for another one's ledger lock
    # the operator says this node has trained before: a missing ledger file is refused
    trained_before: bool = False
    # a node with no ledger of its own may take the server's view of its history (only
    # ever lengthening it); off by default: a fresh node would adopt phantom steps
    adopt_server_history: bool = False
    require_dp: bool = True
    max_epsilon: float = 8.0
    max_delta: float = 1e-5
    min_noise_multiplier: float = 0.0
    # secure aggregation: the least noise of its own share (noise std over the rounded
    # sensitivity), so that its release alone keeps a stated epsilon
    min_share_noise_multiplier: float = 0.0
    # ... and the epsilon of its releases with only its own shares, composed over its
    # history (what it keeps if the server and colluding members unmask its release);
    # 40: every default federation passes (the default max-epsilon 8 in cohorts of 10
    # reaches 29.7 at threshold 0.8, 32.2 at 0.9, 34.6 at 1), and an unmasked release is
    # never a loss without a bound
    max_epsilon_alone: float = 40.0
    # secure aggregation: the federation's roster (members' identity public keys), this
    # node's identity key, and the key that must have signed the roster (optional)
    roster: str = ""
    identity_key: str = ""
    identity_dir: str = ""  # simulation: identity-<partition>.key in this folder
    roster_issuer: str = ""
    min_secagg_cohort: int = 3  # the smallest cohort it shares secrets with
    min_secagg_threshold: float = 0.5  # t >= this share of the cohort (always t > K/2)
    max_model_norm: float = 1e4  # L2 norm bound on an incoming global model (inf: none)
    # federated evaluation: the share of its records this node holds out of training to
    # evaluate global models on (0: it does not evaluate), and the largest share of its
    # budget a run may plan for evaluations (run config eval-budget-share)
    eval_holdout: float = 0.0
    max_eval_budget_share: float = 0.25
    simulated_attacks: bool = False  # only a simulation harness sets this
    # only a simulation harness sets this: read the files (or download the dataset) that
    # the run config names in dataset= and data-dir=, and import the model code it names
    # in model=. A deployed node reads its own data-dir or a bundled dataset and builds a
    # registered model, never a path or module the server chose.
    read_named_files: bool = False
    # keep this node's prepared records in its cache folder (a deployed node runs every
    # message in a new process); a simulation's actors keep them in memory instead
    cache_records: bool = True

    def __post_init__(self) -> None:
        check_field(self.num_partitions >= 1, "node config num-partitions", self.num_partitions,
               "must be >= 1")
        check_field(0 <= self.partition_id < self.num_partitions, "node config partition-id",
               self.partition_id, f"must be in [0, {self.num_partitions - 1}] "
               f"(num-partitions={self.num_partitions})")
        check_field(self.max_epsilon > 0, "node config max-epsilon", self.max_epsilon,
               "must be > 0 (inf: no cap)")
        check_field(0 < self.max_delta < 1, "node config max-delta", self.max_delta, "must be in (0, 1)")
        check_field(0 <= self.min_noise_multiplier < math.inf, "node config min-noise-multiplier",
               self.min_noise_multiplier, "must be >= 0 and finite")
        check_field(0 <= self.min_share_noise_multiplier < math.inf,
               "node config min-share-noise-multiplier", self.min_share_noise_multiplier,
               "must be >= 0 and finite")
        check_field(self.max_epsilon_alone > 0, "node config max-epsilon-alone",
               self.max_epsilon_alone, "must be > 0 (inf: no bound)")
        check_field(self.min_secagg_cohort >= 2, "node config min-secagg-cohort",
               self.min_secagg_cohort, "must be >= 2")
        check_field(0.5 <= self.min_secagg_threshold <= 1, "node config min-secagg-threshold",
               self.min_secagg_threshold, "must be in [0.5, 1] (the threshold is always above "
               "half the cohort)")
        check_field(not (self.identity_key and self.identity_dir), "node config identity-key",
               self.identity_key, "and identity-dir both name the identity key: set one")
        check_field(self.max_model_norm > 0, "node config max-model-norm", self.max_model_norm,
               "must be > 0 (inf: no bound)")
        check_field(0 <= self.eval_holdout <= 0.5, "node config eval-holdout", self.eval_holdout,
               "must be in [0, 0.5] (the share of its records held out for evaluation)")
        check_field(0 < self.max_eval_budget_share <= 0.5, "node config max-eval-budget-share",
               self.max_eval_budget_share, "must be in (0, 0.5]")
        check_field(0 <= self.ledger_wait < math.inf, "node config ledger-wait", self.ledger_wait,
               "must be >= 0 seconds and finite")
        check_field(not (self.ledger_path and self.ledger_dir), "node config ledger-path",
               self.ledger_path, "and ledger-dir both name the ledger: set one")
        if self.dataset:
            problem = own_data_problem(self.dataset)
            check_field(problem is None, "node config dataset", self.dataset, problem or "")
            check_field(not self.data_dir, "node config dataset", self.dataset,
                   "and data-dir both name the node's records: set one")
            check_field(bool(self.label_column), "node config label-column", self.label_column,
                   "must not be empty")
            problem = classes_problem(self.classes)
            check_field(problem is None and bool(self.classes), "node config classes", self.classes,
                   problem or "must list the classes of the node's labels, in the federation's "
                   "order ('a,b,...'), with node config dataset")
        else:
            check_field(not self.classes, "node config classes", self.classes,
                   "goes with node config dataset (the node's own records)")

    @property
    def own_data(self) -> bool:
        """This node trains on its own records (data-dir or dataset), not a partition."""
        return bool(self.data_dir or self.dataset)

    @property
    def identity_file(self) -> Path | None:
        """This node's identity key file (secure aggregation), or None when unset."""
        if self.identity_key:
            return Path(self.identity_key).expanduser()
        if self.identity_dir:
            return Path(self.identity_dir).expanduser() / f"identity-{self.partition_id}.key"
        return None

    @property
    def ledger_file(self) -> Path | None:
        """This node's ledger file; None only for an ephemeral ledger (node config
        ledger-path=":ephemeral:")."""
        if self.ledger_path == EPHEMERAL_LEDGER:
            return None
        if self.ledger_path:
            return Path(self.ledger_path).expanduser()
        if self.ledger_dir:
            return Path(self.ledger_dir).expanduser() / f"partition-{self.partition_id}.json"
        return default_ledger_file(self.partition_id)

    def named_source_problem(self, data: DataConfig, model: str) -> str | None:
        """Why this node will not read the data or import the model code the run config
        names, or None. A path, download or module chosen by the server would let it make
        the node read any file (and learn of it from errors) or run any importable code;
        decided from the two configs alone, before any file is opened."""
        if self.read_named_files:
            return None
        if is_import_path(model):
            return (f"the run config names code to import on this node (model={model!r}); "
                    "this node builds only registered models (node config read-named-files "
                    "is for simulation harnesses)")
        if ":" in data.dataset and not self.own_data:
            return (f"the run config names a file or download for the data "
                    f"(dataset={data.dataset!r}); this node reads only its own records (node "
                    "config data-dir or dataset) or a bundled dataset (node config "
                    "read-named-files is for simulation harnesses)")
        if data.data_dir and not self.own_data:
            return (f"the run config names a data folder on this node (data-dir="
                    f"{data.data_dir!r}); this node reads only its own data-dir (node config) "
                    "(read-named-files is for simulation harnesses)")
        return None

    def evaluation_problem(self, ev: EvaluationConfig) -> str | None:
        """Why this node will not evaluate for a run with evaluation config `ev`, or None
        (from the two configs alone)."""
        if not ev.federated:
            return "the run evaluates at the server (evaluation=server)"
        if self.eval_holdout <= 0:
            return ("this node holds no records out for evaluation (node config "
                    "eval-holdout=0)")
        if ev.eval_budget_share > self.max_eval_budget_share:
            return (f"the run's eval-budget-share={ev.eval_budget_share} exceeds this "
                    f"node's max-eval-budget-share={self.max_eval_budget_share}")
        return None

    def policy_problem(self, priv: PrivacyConfig) -> str | None:
        """Why this node refuses a run with privacy config `priv`, or None. Depends only on
        the two configs, never on the node's data."""
        if not priv.private:
            if self.require_dp:
                return ("the run asks for no differential privacy (dp=false or "
                        "target-epsilon=inf) but this node requires it (node config require-dp)")
            return None
        if priv.target_epsilon > self.max_epsilon:
            return (f"the run's target-epsilon={priv.target_epsilon} exceeds this node's "
                    f"max-epsilon={self.max_epsilon}")
        if priv.target_delta > self.max_delta:
            return (f"the run's target-delta={priv.target_delta} exceeds this node's "
                    f"max-delta={self.max_delta}")
        if 0 < priv.noise_multiplier < self.min_noise_multiplier:
            return (f"the run's noise-multiplier={priv.noise_multiplier} is below this node's "
                    f"min-noise-multiplier={self.min_noise_multiplier}")
        return None


NODE_FIELD_TYPES = {
    f.name.replace("_", "-"): {"int": int, "float": float, "bool": bool, "str": str}[str(f.type)]
    for f in fields(NodeConfig)
}


def parse_node_config(node_config: Mapping[str, Any], env_text: str = "") -> NodeConfig:
    """The node's config: `env_text` (NODE_CONFIG_ENV, `k=v ...`) overridden by Flower's
    node config. Unknown keys and bad values stop with the key named."""
    merged = {**(parse_overrides(env_text) if env_text.strip() else {}), **dict(node_config)}
    unknown = sorted(set(merged) - set(NODE_FIELD_TYPES))
    if unknown:
        raise ConfigError(f"unknown node config key(s): {', '.join(unknown)}; known keys: "
                          f"{', '.join(sorted(NODE_FIELD_TYPES))}")
    for key in ("partition-id", "num-partitions"):
        if key not in merged:
            raise ConfigError(f"node config lacks {key}")
    return NodeConfig(**{k.replace("-", "_"): coerce_value(f"node config {k}", v, NODE_FIELD_TYPES[k])
                         for k, v in merged.items()})


def node_policy_for(cfg: ExperimentConfig) -> dict[str, Any]:
    """The node policy a simulation harness gives its virtual nodes so that they accept
    exactly the run it starts (its data holders and its server are the same person); with
    federated evaluation each holds out EVAL_HOLDOUT of its records."""
    priv, ev = cfg.privacy, cfg.evaluation
    return {
        "eval-holdout": EVAL_HOLDOUT if ev.federated else 0.0,
        "max-eval-budget-share": ev.eval_budget_share,
        "require-dp": priv.private,
        "max-epsilon": priv.target_epsilon if priv.private else math.inf,
        "max-delta": priv.target_delta,
        "min-noise-multiplier": priv.noise_multiplier,
        "simulated-attacks": bool(cfg.attack.modes),
        "read-named-files": ":" in cfg.data.dataset or bool(cfg.data.data_dir)
                            or ":" in cfg.train.model,
    }


