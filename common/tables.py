"""Datasets other than Fashion-MNIST: scikit-learn's bundled sets, a user's table
(`csv:PATH`, `parquet:PATH`: a label column and numeric feature columns), and Hugging
Face datasets (`hf:NAME`, `disk:PATH`, `imagefolder:PATH`), for a run's shared data or a
node's own records.

Datasets without a test split of their own get one carved out: 20% of the records, drawn
with the fixed seed TEST_SEED (the same split in every run); features are standardised
with the training part's mean and standard deviation (`standardize=true`) or used as
given (`standardize=false`; image pixels are scaled to [0, 1] either way). Classes are
the label values in sorted order, or in the order of the run's public class list
(`classes='a,b,c'`). A deployed node reads its own records with `own_split`: never
standardised with its own statistics, its labels mapped through the federation's class
list. Values are checked finite in float32, the dtype they are trained in.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from common.catalogue import BUNDLED, HF_SOURCES, class_list
from common.errors import DataError
from common.split import Split, spec, with_features

TEST_FRACTION, TEST_SEED = 0.2, 0


@dataclass(frozen=True)
class _Source:
    """A dataset as read: features, raw labels, the partition-by ids (or None), a name for
    errors, and its own test split when it has one."""

    x: np.ndarray
    labels: np.ndarray
    ids: np.ndarray | None
    where: str
    test: tuple[np.ndarray, np.ndarray] | None = None
    label_names: tuple[str, ...] = ()  # a Hugging Face ClassLabel's names (labels index them)
    images: bool = False  # image pixels (scaled to [0, 1]), not table columns


def _class_order(src: _Source, labels: np.ndarray, classes: str) -> np.ndarray:
    """The class order: the run's public list, else the label values present, sorted."""
    if classes:
        return np.asarray(class_list(classes), dtype=object)
    order = np.unique(labels)
    if len(order) < 2:
        raise DataError(f"{src.where}: the label column holds one class ({order[0]!r}); "
                        "a classifier needs at least two")
    return order


def _encode(src: _Source, labels: np.ndarray, order: np.ndarray, classes: str) -> np.ndarray:
    """Labels as class indices (int64) in `order`; a label outside the run's class list
    is named."""
    if not classes:
        return np.searchsorted(order, labels).astype(np.int64)
    names = src.label_names
    as_text = [names[int(v)] if names else str(v) for v in labels]
    index = {c: i for i, c in enumerate(order)}
    unknown = sorted(set(as_text) - set(index))
    if unknown:
        raise DataError(f"{src.where}: label(s) {', '.join(map(repr, unknown[:5]))} are not in "
                        f"the run's classes ({', '.join(order)})")
    return np.fromiter((index[t] for t in as_text), dtype=np.int64, count=len(as_text))


def _scaler(x_train: np.ndarray, standardize: bool):
    """x -> float32 features: standardised with the training part's per-feature mean and
    standard deviation, or as given."""
    if not standardize:
        return lambda x: np.asarray(x, dtype=np.float32)
    flat = x_train.reshape(len(x_train), -1)
    mean, std = flat.mean(axis=0), flat.std(axis=0)
    std[std == 0] = 1.0  # a constant feature stays constant (0)
    return lambda x: ((x.reshape(len(x), -1) - mean) / std).reshape(x.shape).astype(np.float32)


@lru_cache(maxsize=4)
def carved(dataset: str, label_column: str, partition_by: str = "", standardize: bool = True,
            classes: str = "") -> tuple[Split, Split, np.ndarray]:
    """(train, test, the training records' ids) of a dataset other than Fashion-MNIST:
    its own test split, or 20% carved out with TEST_SEED; features standardised with the
    training part's statistics (or as given); ids: the `partition_by` column (natural
    partitions), else empty."""
    src = read_source(dataset, label_column, partition_by)
    where = src.where
    if src.test is not None:
        x_train, l_train, ids = src.x, src.labels, src.ids
        x_test, l_test = src.test
        if x_test.shape[1:] != x_train.shape[1:]:
            raise DataError(f"{where}: test records have shape {x_test.shape[1:]}, training "
                            f"records {x_train.shape[1:]}")
    else:
        if len(src.labels) < 10:
            raise DataError(f"{where}: {len(src.labels)} records are too few to carve a test "
                            "split from")
        order = np.random.default_rng(TEST_SEED).permutation(len(src.labels))
        cut = int(round(len(order) * TEST_FRACTION))
        test, train = order[:cut], order[cut:]
        x_train, l_train, x_test, l_test = src.x[train], src.labels[train], src.x[test], src.labels[test]
        ids = src.ids[train] if src.ids is not None else None
    order = _class_order(src, np.concatenate([l_train, l_test]), classes)
    scale = _scaler(x_train, standardize)

    def split(x: np.ndarray, labels: np.ndarray) -> Split:
        return Split(scale(x), _encode(src, labels, order, classes), len(order))

    return split(x_train, l_train), split(x_test, l_test), ids if ids is not None else np.zeros(0)


def read_source(dataset: str, label_column: str, partition_by: str = "") -> _Source:
    """A bundled dataset, a user's table, or a Hugging Face dataset (by name, saved to
    disk, or an image folder)."""
    if dataset in BUNDLED:
        if partition_by:
            raise DataError(f"dataset={dataset} has no id column to partition by "
                            f"(partition-by={partition_by!r})")
        from sklearn import datasets as bundled

        loaded = bundled.load_digits() if dataset == "digits" else bundled.load_breast_cancer()
        x = np.asarray(loaded.data, dtype=np.float64)
        if dataset == "digits":  # 8x8 images of 17 grey levels
            return _Source(x.reshape(len(x), 1, 8, 8) / 16.0, np.asarray(loaded.target), None,
                           f"dataset={dataset}", images=True)
        return _Source(x, np.asarray(loaded.target), None, f"dataset={dataset}")
    kind, _, path = dataset.partition(":")
    if kind in HF_SOURCES:
        return _read_hf(kind, path, label_column, partition_by)
    where = f"{kind} file {path}"
    if not Path(path).expanduser().is_file():
        raise DataError(f"{where}: no such file")
    import pandas as pd

    try:
        table = pd.read_csv(path) if kind == "csv" else pd.read_parquet(path)
    except Exception as exc:  # the readers raise many types for a bad file
        raise DataError(f"{where}: unreadable as {kind} ({type(exc).__name__}: {exc})") from exc
    return _from_table(table, label_column, partition_by, where)


def _from_table(table: Any, label_column: str, partition_by: str, where: str) -> _Source:
    """A pandas table: a label column, numeric feature columns, an optional id column."""
    import pandas as pd

    if label_column not in table.columns:
        raise DataError(f"{where}: no label column {label_column!r} (columns: "
                        f"{', '.join(map(str, table.columns))}); set label-column")
    ids = None
    if partition_by:
        if partition_by not in table.columns:
            raise DataError(f"{where}: no column {partition_by!r} to partition by (columns: "
                            f"{', '.join(map(str, table.columns))})")
        ids = table[partition_by].to_numpy()
        if pd.isna(ids).any():
            raise DataError(f"{where}: the partition-by column {partition_by!r} has missing values")
    features = table.drop(columns=[c for c in (label_column, partition_by) if c])
    if features.shape[1] == 0:
        raise DataError(f"{where}: no feature column besides the label {label_column!r}")
    bad = [str(c) for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])]
    if bad:
        raise DataError(f"{where}: column(s) {', '.join(bad)} are not numeric; dpfl reads "
                        "numeric features or one image column (encode or drop the others)")
    x = features.to_numpy(dtype=np.float64)
    # Checked in the dtype the records are trained in: a value beyond float32's range
    # is finite here and inf in training.
    with np.errstate(over="ignore"):
        finite = np.isfinite(x.astype(np.float32)).all(axis=1)
    if not finite.all():
        rows = np.flatnonzero(~finite)
        raise DataError(f"{where}: {len(rows)} row(s) hold missing or non-finite values, or "
                        f"values beyond float32's range (first: row {int(rows[0])})")
    labels = table[label_column].to_numpy()
    if pd.isna(labels).any():
        raise DataError(f"{where}: the label column {label_column!r} has missing values")
    return _Source(x, labels, ids, where)


def _read_hf(kind: str, arg: str, label_column: str, partition_by: str) -> _Source:
    """`hf:NAME` (datasets.load_dataset: the Hub when online, or a local dataset folder),
    `disk:PATH` (datasets.load_from_disk), `imagefolder:PATH` (one folder per class).
    Its own "test" split is used when it has one."""
    import datasets

    where = f"{kind} dataset {arg}"
    datasets.disable_progress_bars()
    try:
        if kind == "disk":
            loaded = datasets.load_from_disk(arg)
        elif kind == "imagefolder":
            if not Path(arg).expanduser().is_dir():
                raise DataError(f"{where}: no such folder")
            loaded = datasets.load_dataset("imagefolder", data_dir=arg)
        else:
            loaded = datasets.load_dataset(arg)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types (missing, offline, corrupt)
        raise DataError(f"{where}: cannot load it ({type(exc).__name__}: {exc})") from exc
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        train = loaded["train"] if "train" in loaded else loaded[names[0]]
        test = loaded["test"] if "test" in loaded else None
    else:
        train, test = loaded, None
    src = _from_hf(train, label_column, partition_by, where)
    if test is None:
        return src
    own = _from_hf(test, label_column, "", f"{where} (test split)")
    return replace(src, test=(own.x, own.labels))


def _from_hf(ds: Any, label_column: str, partition_by: str, where: str) -> _Source:
    """One split of a Hugging Face dataset: one image column (decoded, same size for every
    record), or numeric columns as a table."""
    import datasets

    if label_column not in ds.column_names:
        raise DataError(f"{where}: no label column {label_column!r} (columns: "
                        f"{', '.join(ds.column_names)}); set label-column")
    label = ds.features[label_column]
    names = tuple(label.names) if isinstance(label, datasets.ClassLabel) else ()
    images = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
    if not images:
        return replace(_from_table(ds.to_pandas(), label_column, partition_by, where),
                       label_names=names)
    if len(images) > 1:
        raise DataError(f"{where}: several image columns ({', '.join(images)}); dpfl reads one")
    arrays = [np.asarray(img) for img in ds[images[0]]]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        first = next(i for i, a in enumerate(arrays) if a.shape != arrays[0].shape)
        raise DataError(f"{where}: images of mixed shapes ({arrays[0].shape} and, at record "
                        f"{first}, {arrays[first].shape}); resize them to one size")
    x = np.stack(arrays).astype(np.float64)
    x = x[:, None] if x.ndim == 3 else np.moveaxis(x, -1, 1)  # N x C x H x W
    if partition_by and partition_by not in ds.column_names:
        raise DataError(f"{where}: no column {partition_by!r} to partition by")
    ids = np.asarray(ds[partition_by]) if partition_by else None
    return _Source(x / 255.0, np.asarray(ds[label_column]), ids, where, label_names=names,
                   images=True)


# ---------------------------------------------------------------- a node's own records


@lru_cache(maxsize=2)
def own_split(dataset: str, label_column: str, classes: str, features: str = "") -> Split:
    """A deployed node's own records (node config `dataset`), used whole: its training
    split when the source has several. Features as given (image pixels in [0, 1]): a
    standardisation with the node's own statistics would make its update depend on every
    one of its records outside the DP mechanism. Labels mapped through the node's public
    class list (the federation's, in its order: the labels present in a node's records
    are not the federation's classes)."""
    if not class_list(classes):
        raise DataError(f"{dataset}: a node's own records need its class list (node config "
                        "classes='a,b,...') to map their labels")
    src = read_source(dataset, label_column)
    order = _class_order(src, src.labels, classes)
    split = Split(np.asarray(src.x, dtype=np.float32), _encode(src, src.labels, order, classes),
                  len(order))
    if len(split) == 0:
        raise DataError(f"{src.where}: no records")
    return with_features(split, features, src.where) if features else split


def own_spec(dataset: str, label_column: str, classes: str, features: str = ""
             ) -> tuple[tuple[int, ...], int]:
    """(input shape, classes) a model takes for this node's own records."""
    return spec(own_split(dataset, label_column, classes), features, dataset)
