"""Which records a request trains on: this node's own records (its data-dir or its
table), or its partition of the run's shared dataset, prepared once per node (a deployed
node's cache folder) and with an audit's canary slots when the run has them; and the
model template those records make. Nothing here spends or decides privacy.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np

from common import audit, fedeval
from common.catalogue import DEFAULT_DATASET, class_list
from common.config import DataConfig, ExperimentConfig
from common.data import (
    cached_split,
    input_spec,
    load_split,
    own_partition_of,
    partition_of,
    partitions_of,
    source_fingerprint,
)
from common.errors import DataError
from common.models import MODEL_FEATURES, build_model, get_weights
from common.node import NodeConfig
from common.split import Split
from common.tables import own_spec, own_split


@lru_cache(maxsize=8)
def _template(model: str, shape: tuple[int, ...], classes: int) -> dict[str, np.ndarray]:
    return dict(get_weights(build_model(model, seed=0, shape=shape, classes=classes)))


def template(cfg: ExperimentConfig, node: NodeConfig) -> dict[str, np.ndarray]:
    """The global model's names, shapes and dtypes for this run's model and dataset (a
    node with its own records in a table or image format: their shape, the run's
    classes)."""
    features = MODEL_FEATURES.get(cfg.train.model, "")
    if node.dataset:
        return _template(cfg.train.model, *own(node, lambda: own_spec(
            node.dataset, node.label_column, node.classes, features)))
    return _template(cfg.train.model, *input_spec(cfg.data, features))


def own_data_problem(cfg: ExperimentConfig, node: NodeConfig) -> str | None:
    """Why this node's own records (node config dataset) cannot serve this run, from the
    two configs alone, before any file is read. The data holder owns the schema (source,
    label column, classes): a run can only agree with it, never probe the records with
    other class lists or columns."""
    if not node.dataset:
        return None
    if list(class_list(cfg.data.classes)) != list(class_list(node.classes)):
        return (f"the run's classes ({cfg.data.classes!r}) are not this node's (node config "
                "classes): the federation's class list must be the same everywhere")
    if cfg.data.standardize:
        return ("this node uses its own records as given; the run standardises its data "
                "with statistics of the server's copy (standardize=true): set standardize=false "
                "and give every party's features on one public scale")
    return None


def own(node: NodeConfig, read: Callable[[], Any]) -> Any:
    """`read()` of the node's own records. What is wrong with them goes to the node's own
    log, not to the server: the reply says only that they cannot be read."""
    try:
        return read()
    except DataError as exc:
        print(f"dpfl node: its own records (node config dataset) cannot be used: {exc}",
              file=sys.stderr, flush=True)
        raise DataError("this node's own records (node config dataset) cannot be used for "
                        "this run; the reason is in the node's log") from None


def records_for(cfg: ExperimentConfig, node: NodeConfig) -> Split:
    """The records a training request trains on: the node's records less those it holds
    out for evaluation (node config eval-holdout), with an audit's canary slots."""
    return with_canaries(cfg, node, held_out(prepared(cfg, node), node.eval_holdout)[0])


def eval_records_for(cfg: ExperimentConfig, node: NodeConfig) -> Split:
    """The records this node evaluates global models on (never trained on)."""
    return held_out(prepared(cfg, node), node.eval_holdout)[1]


def held_out(split: Split, fraction: float) -> tuple[Split, Split]:
    """(training part, held-out part) of a node's records (common.fedeval.holdout_split)."""
    if fraction <= 0:
        return split, split.with_records(split.images[:0], split.labels[:0])
    train, held = fedeval.holdout_split(len(split), fraction)
    return (split.with_records(split.images[train], split.labels[train]),
            split.with_records(split.images[held], split.labels[held]))


def prepared(cfg: ExperimentConfig, node: NodeConfig) -> Split:
    """This node's training records as the model takes them, from the node's cache when
    an earlier message computed them (every message of a deployed node is a new
    process, which would otherwise decompress, partition and transform its data again);
    a simulation's actors keep them in memory as well."""
    features = MODEL_FEATURES.get(cfg.train.model, "")
    key: dict[str, Any]
    if node.dataset:
        problem = own_data_problem(cfg, node)
        if problem:
            raise DataError(problem)
        key = {"own": node.dataset, "label_column": node.label_column, "classes": node.classes}
        fingerprint = own(node, lambda: source_fingerprint(node.dataset))
    elif node.data_dir:
        if cfg.data.dataset != "fashion-mnist":
            raise DataError(f"this node's data-dir holds Fashion-MNIST IDX files; the run "
                            f"trains dataset={cfg.data.dataset!r}")
        key = {"data_dir": node.data_dir}
        fingerprint = source_fingerprint("fashion-mnist", node.data_dir)
    else:
        if not node.cache_records:  # a simulation's: every partition is in memory
            return _load_records(cfg, node, features)
        key = {"data": dataclasses.asdict(cfg.data), "partition": node.partition_id,
               "num_partitions": node.num_partitions}
        fingerprint = source_fingerprint(cfg.data.dataset, cfg.data.data_dir)
    if fingerprint is None or not node.cache_records:  # a Hub name: no files to key by
        return _load_records(cfg, node, features)
    return cached_split({"v": 1, **key, "features": features, "source": fingerprint},
                        lambda: _load_records(cfg, node, features))


def _load_records(cfg: ExperimentConfig, node: NodeConfig, features: str) -> Split:
    if node.dataset:
        split = own(node, lambda: own_split(node.dataset, node.label_column, node.classes,
                                             features))
    elif node.data_dir:
        split = load_split(node_folder(cfg, node), "train", features)
    elif node.cache_records:
        # A deployed node: features of its own records only (a simulation's actors share
        # one copy of the whole training set's, computed once).
        return own_partition_of(cfg.data, node.partition_id, node.num_partitions, features)
    else:
        return partition_of(cfg.data, node.partition_id, node.num_partitions, features)
    return split.with_records(split.images, split.labels)


def with_canaries(cfg: ExperimentConfig, node: NodeConfig, split: Split) -> Split:
    """A privacy audit's run (audit-canaries > 0): the partition's canary slots appended,
    each holding its canary or a null record (common/audit.py)."""
    if not cfg.audit.audit_canaries:
        return split
    canaries = audit.Canaries(cfg.audit.audit_canaries, cfg.federation.num_partitions,
                              split.shape, cfg.data.seed, split.num_classes)
    x, y = canaries.slots(node.partition_id)
    return split.with_records(np.concatenate([split.images, x]), np.concatenate([split.labels, y]))


def node_folder(cfg: ExperimentConfig, node: NodeConfig) -> DataConfig:
    """The run's data config for the Fashion-MNIST files in the node's own data-dir."""
    return dataclasses.replace(cfg.data, dataset=DEFAULT_DATASET, data_dir=node.data_dir)


def num_examples(cfg: ExperimentConfig, node: NodeConfig) -> int:
    problem = node.named_source_problem(cfg.data, cfg.train.model)
    if problem:  # before any file is opened
        raise DataError(problem)
    slots = audit.slot_count(cfg.audit.audit_canaries, cfg.federation.num_partitions,
                             node.partition_id)
    # Only the count: discovery must answer in seconds, and a deployed node's first
    # features (minutes for tens of thousands of images) wait for its first round.
    if node.dataset:
        problem = own_data_problem(cfg, node)
        if problem:
            raise DataError(problem)
        n = len(own(node, lambda: own_split(node.dataset, node.label_column, node.classes)))
    elif node.data_dir:
        n = len(load_split(node_folder(cfg, node), "train").labels)
    else:
        n = len(partitions_of(cfg.data, node.num_partitions)[node.partition_id])
    return n - fedeval.holdout_count(n, node.eval_holdout) + slots
