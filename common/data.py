"""A run's data, by its data config: the training set and its partitions, the held-out
test set, the input shape a model must take, and a node's prepared records.

Every function takes the run's `DataConfig` itself. Where the records come from is in
the source modules (common.fashion_mnist, common.tables), which rows a client holds in
common.partitions, what is kept on disk in common.cache, what names are valid in
common.catalogue. Loaded arrays are kept per process (one copy however they are asked
for), keyed by `DataConfig.source` (what the records are, not how they are split).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from common import fashion_mnist, tables
from common.cache import arrays_once, cache_dir
from common.catalogue import BUNDLED, DEFAULT_DATASET, IMAGE_28, NUM_CLASSES
from common.config import DataConfig, SourceKey
from common.errors import DataError
from common.features import cache_path, feature_shape
from common.partitions import natural_partitions, partition_indices
from common.split import Split, spec, with_features


def load_split(data: DataConfig, split: str, features: str = "") -> Split:
    """The run's "train" or "test" split; with `features`, its inputs replaced by that
    fixed transform of them (common.features), memory mapped."""
    return _load(data.source, split, features)


@lru_cache(maxsize=4)
def _load(source: SourceKey, split: str, features: str) -> Split:
    if features:
        raw = _load(source, split, "")
        where = (f"Fashion-MNIST {split}" if source.dataset == DEFAULT_DATASET
                 else f"dataset={source.dataset}")
        return with_features(raw, features, where)
    if source.dataset == DEFAULT_DATASET:
        return fashion_mnist.load(split, source.data_dir)
    train, test, _ = tables.carved(source.dataset, source.label_column, source.partition_by,
                                   source.standardize, source.classes)
    return {"train": train, "test": test}[split]


def partitions_of(data: DataConfig, num_partitions: int) -> tuple[np.ndarray, ...]:
    """Row indices of every partition of the run's training set (cached per process)."""
    return _partitions(data, num_partitions)


@lru_cache(maxsize=8)
def _partitions(data: DataConfig, num_partitions: int) -> tuple[np.ndarray, ...]:
    if data.partitioner == "natural":
        s = data.source
        ids = tables.carved(s.dataset, s.label_column, s.partition_by, True, s.classes)[2]
        return natural_partitions(ids, num_partitions, f"{s.dataset} column {s.partition_by!r}")
    # Labels as a default standardisation gives them (standardising never changes labels).
    labels = _load(replace(data, standardize=True).source, "train", "").labels
    return tuple(partition_indices(labels, data.partitioner, num_partitions, seed=data.seed,
                                   alpha=float(data.dirichlet_alpha),
                                   labels_per_client=data.labels_per_client))


def partition_of(data: DataConfig, partition_id: int, num_partitions: int,
                 features: str = "") -> Split:
    """One client's share of the run's training set."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id={partition_id} must be in [0, {num_partitions - 1}]")
    idx = partitions_of(data, num_partitions)[partition_id]
    train = load_split(data, "train", features)
    return train.with_records(train.images[idx], train.labels[idx])


def own_partition_of(data: DataConfig, partition_id: int, num_partitions: int,
                     features: str = "") -> Split:
    """One partition for a deployed node, which holds only it: its records' features
    are computed for those records alone, unless the whole training set's are already
    in this machine's cache (then they are read from it)."""
    if not features:
        return partition_of(data, partition_id, num_partitions)
    train = load_split(data, "train")
    if cache_path(features, train.images, cache_dir() / "features").exists():
        return partition_of(data, partition_id, num_partitions, features)
    part = with_features(partition_of(data, partition_id, num_partitions), features,
                         f"partition {partition_id}")
    return part.with_records(part.images, part.labels)  # float32, as every training split


def input_spec(data: DataConfig, features: str = "") -> tuple[tuple[int, ...], int]:
    """(one record's input shape, number of classes) of the run's dataset, as a model
    must take them (Fashion-MNIST's without reading it)."""
    if data.dataset == DEFAULT_DATASET:
        return (feature_shape(features, IMAGE_28) if features else IMAGE_28), NUM_CLASSES
    return spec(load_split(data, "train"), features, f"dataset={data.dataset}")


def held_out_split(data: DataConfig, features: str = "") -> Split:
    """The run's test set (the server's evaluation), in memory as float32: evaluated every
    round, a memory-mapped or float16 copy would be converted batch by batch each time."""
    test = load_split(data, "test", features)
    return Split(np.array(test.images, dtype=np.float32), np.asarray(test.labels, dtype=np.int64),
                 test.num_classes)


def release_cached() -> None:
    """Forget every array this process keeps (a command that only follows a run)."""
    for cached in (_load, _partitions, tables.carved, tables.own_split):
        cached.cache_clear()


# ---------------------------------------------------------------- a node's prepared records


def source_fingerprint(dataset: str, data_dir: str = "") -> list | None:
    """What identifies a dataset's files on disk (path, size and modification time of
    each), or None when it cannot be told without reading them (a Hub name)."""
    if dataset == DEFAULT_DATASET:
        folder = fashion_mnist.locate(data_dir or None)
        files = [folder / n for n in fashion_mnist.FILES]
    elif dataset in BUNDLED:
        import sklearn

        return [dataset, sklearn.__version__]
    else:
        kind, _, path = dataset.partition(":")
        root = Path(path).expanduser()
        if kind == "hf" and not root.is_dir():
            return None
        files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
    out: list = []
    try:
        for f in files:
            st = f.stat()
            out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    except OSError as exc:
        raise DataError(f"dataset={dataset}: {exc}") from exc
    return out


KEEP_SPLITS = 4


def cached_split(key: dict, build: Callable[[], Split]) -> Split:
    """`build()`, computed once and kept in this machine's cache folder as arrays that
    later processes memory-map in milliseconds (common.cache). A deployed node starts a
    fresh process for every message, which would otherwise decompress, partition and
    transform its data each time. `key` must name everything the split depends on, the
    files' fingerprint included (a changed file is a new key)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def arrays() -> dict[str, np.ndarray]:
        split = build()
        # Fixed features come from a float16 cache (common.features): kept at that precision.
        x = split.images.astype(np.float16) if key.get("features") else split.images
        return {"x": x, "y": split.labels, "classes": np.asarray([split.num_classes])}

    out = arrays_once(cache_dir() / "splits", digest, arrays, names=("x", "y", "classes"),
                      keep=KEEP_SPLITS, mmap="x")
    return Split(np.asarray(out["x"], dtype=np.float32), out["y"], int(out["classes"][0]))
