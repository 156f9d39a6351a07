"""Partitioning: which of a training set's rows each client holds. Pure functions of the
labels (or a table's id column) and the partitioner's parameters, deterministic for a
seed; `flwr-datasets` partitioners, with IID computed in one pass (tested equal)."""

from __future__ import annotations

import warnings

import numpy as np

from common.errors import DataError


def make_partitioner(
    name: str, num_partitions: int, *, seed: int, alpha: float = 0.5, labels_per_client: int = 2
):
    """A flwr-datasets partitioner by dpfl's name for it."""
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    if name == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if name == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions, partition_by="label", alpha=alpha,
            min_partition_size=10, self_balancing=True, seed=seed,
        )
    if name == "pathological":
        return PathologicalPartitioner(
            num_partitions=num_partitions, partition_by="label",
            num_classes_per_partition=labels_per_client, seed=seed,
        )
    raise ValueError(f"partitioner={name!r} must be one of iid, dirichlet, pathological")


def partition_indices(
    labels: np.ndarray, name: str, num_partitions: int, *, seed: int,
    alpha: float = 0.5, labels_per_client: int = 2,
) -> list[np.ndarray]:
    """Row indices of every partition, deterministic for (labels, name, params, seed).
    IID: flwr-datasets' IidPartitioner's contiguous shards of the seeded shuffle, computed
    in one pass (the partitioner builds a dataset per partition: a minute for 100,000)."""
    if num_partitions > len(labels):
        raise DataError(
            f"num-partitions={num_partitions} exceeds the {len(labels)} training records"
        )
    if name != "iid":
        return _partitioner_indices(labels, name, num_partitions, seed=seed, alpha=alpha,
                                    labels_per_client=labels_per_client)
    order = _shuffled(len(labels), seed)
    return [np.sort(shard) for shard in np.array_split(order, num_partitions)]


def _shuffled(n: int, seed: int) -> np.ndarray:
    """The row order of `datasets.Dataset.shuffle(seed=seed)` on n rows: its permutation
    from `np.random.default_rng(seed)` (tested against it), without importing datasets
    and building a dataset (2 s at 60,000 rows, in every process that partitions)."""
    return np.random.default_rng(seed).permutation(n).astype(np.int64)


def _partitioner_indices(
    labels: np.ndarray, name: str, num_partitions: int, *, seed: int,
    alpha: float = 0.5, labels_per_client: int = 2,
) -> list[np.ndarray]:
    """Row indices of every partition by the flwr-datasets partitioner itself (its caller,
    partition_indices, has checked the count)."""
    import datasets
    from datasets import Dataset

    datasets.disable_progress_bars()
    ds = Dataset.from_dict({"idx": np.arange(len(labels)), "label": labels})
    ds = ds.shuffle(seed=seed).flatten_indices()  # IID shards need a seeded shuffle first
    part = make_partitioner(
        name, num_partitions, seed=seed, alpha=alpha, labels_per_client=labels_per_client
    )
    part.dataset = ds
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # flwr-datasets prints every alpha on retries
            return [np.sort(np.asarray(part.load_partition(i)["idx"], dtype=np.int64))
                    for i in range(num_partitions)]
    except (ValueError, IndexError) as exc:
        raise DataError(
            f"the {name} partitioner cannot split {len(labels)} records into "
            f"{num_partitions} partitions: {exc}"
        ) from exc


def natural_partitions(ids: np.ndarray, num_partitions: int, where: str) -> tuple[np.ndarray, ...]:
    """One partition per distinct id (sorted), as flwr-datasets' NaturalIdPartitioner: the
    data's own owners (a writer, a hospital) are the clients."""
    distinct = np.unique(ids)
    if len(distinct) != num_partitions:
        raise DataError(f"partitioner=natural: {where} holds {len(distinct)} distinct ids in "
                        f"the training part; set num-partitions={len(distinct)}")
    return tuple(np.flatnonzero(ids == d) for d in distinct)
