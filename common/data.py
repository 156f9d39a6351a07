"""Datasets: find, verify, download, load and partition.

`dataset` (run config) picks the source: `fashion-mnist` (the default, below),
`digits` and `breast-cancer` (real data bundled with scikit-learn: offline), or a user's
table, `csv:PATH` / `parquet:PATH`, with a label column (`label-column`) and numeric
feature columns. Datasets without a test split of their own get one carved out: 20% of
the records, drawn with the fixed seed TEST_SEED (the same split in every run);
features are standardised with the training part's mean and standard deviation
(`standardize=true`) or used as given (`standardize=false`; image pixels are scaled to
[0, 1] either way). Classes are the label values in sorted order, or in the order of the
run's public class list (`classes='a,b,c'`). A deployed node reads its own records
(node config `dataset`, the same formats) with `own_split`: never standardised with its
own statistics, its labels mapped through the run's class list.

Fashion-MNIST:

Files are looked up in this order: an explicit `data-dir`, the system datasets folder of
the Debian package `dataset-fashion-mnist`, the user cache; otherwise they are downloaded
into the cache. Every file is checked by the SHA-256 of its *decompressed* IDX payload
(the same bytes whichever gzip produced the archive), so a corrupt, truncated or foreign
file is rejected with its name. Partitions come from `flwr-datasets` partitioners,
deterministic for a seed.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import shutil
import tempfile
import urllib.request
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from common.files import atomic_write, atomic_write_text

if TYPE_CHECKING:
    from common.config import DataConfig

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
URL_ENV = "DPFL_DATA_URL"
CACHE_ENV = "DPFL_CACHE_DIR"

# name -> (sha256 of the decompressed IDX bytes, decompressed size, IDX shape)
FILES: dict[str, tuple[str, int, tuple[int, ...]]] = {
    "train-images-idx3-ubyte.gz": (
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 47040016, (60000, 28, 28),
    ),
    "train-labels-idx1-ubyte.gz": (
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60008, (60000,),
    ),
    "t10k-images-idx3-ubyte.gz": (
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 7840016, (10000, 28, 28),
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10008, (10000,),
    ),
}
MEAN, STD = 0.2860, 0.3530
NUM_CLASSES = 10
DEFAULT_DATASET = "fashion-mnist"
BUNDLED = ("digits", "breast-cancer")  # scikit-learn's, offline
TABLE_FORMATS = ("csv", "parquet")
HF_SOURCES = ("hf", "disk", "imagefolder")  # Hugging Face datasets: by name, saved, a folder
TEST_FRACTION, TEST_SEED = 0.2, 0


def default_partitions(dataset: str) -> int:
    """What num-partitions=0 means: 100 clients of Fashion-MNIST's 60,000 records; 10 of
    a smaller dataset (digits: 1,438 training records, breast-cancer: 455), so that each
    client holds enough records for its own DP-SGD noise."""
    return 100 if dataset == DEFAULT_DATASET else 10


def class_list(classes: str) -> tuple[str, ...]:
    """The run's public class list (`classes='a,b,c'`), in class order; () when unset."""
    return tuple(c.strip() for c in classes.split(",")) if classes.strip() else ()


def classes_problem(classes: str) -> str | None:
    """Why `classes` is not a class list, or None."""
    names = class_list(classes)
    if not names:
        return None
    if any(not c for c in names):
        return "holds an empty class name"
    if len(set(names)) != len(names):
        return "names a class twice"
    if len(names) < 2:
        return "must name at least two classes"
    return None


def own_data_problem(dataset: str) -> str | None:
    """Why `dataset` (node config) is not a source a node can hold its own records in."""
    kind, _, path = dataset.partition(":")
    if kind in TABLE_FORMATS + HF_SOURCES and path:
        return None
    return ("must be csv:PATH, parquet:PATH, disk:PATH, imagefolder:PATH or hf:NAME (the "
            "node's own records; Fashion-MNIST IDX files go in data-dir)")


def dataset_problem(dataset: str) -> str | None:
    """Why `dataset` is not a dataset name dpfl knows (syntax only; files are read later)."""
    if dataset == DEFAULT_DATASET or dataset in BUNDLED:
        return None
    kind, _, path = dataset.partition(":")
    if kind in TABLE_FORMATS + HF_SOURCES and path:
        return None
    return (f"must be {DEFAULT_DATASET}, {', '.join(BUNDLED)}, csv:PATH, parquet:PATH, "
            "hf:NAME, disk:PATH or imagefolder:PATH")


class DataError(RuntimeError):
    """A dataset file is missing, corrupt, truncated or of the wrong format."""


def cache_dir() -> Path:
    if env := os.environ.get(CACHE_ENV):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dpfl" / "fashion-mnist"


def read_idx(
    path: Path, *, verify: bool = True, name: str | None = None, label: str | None = None
) -> np.ndarray:
    """Decode one gzipped IDX file; with `verify`, insist on the official payload of `name`.
    Errors name the file as `label` (default: the path)."""
    name = name or path.name
    where = label or str(path)
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{where}: not a readable gzip file ({exc})") from exc
    if len(raw) < 8 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{where}: not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise DataError(
            f"{where}: IDX header says {dims} ({int(np.prod(dims))} bytes) but "
            f"{len(raw) - offset} bytes follow: truncated or corrupt"
        )
    if verify and name in FILES:
        digest, size, shape = FILES[name]
        if dims != shape or hashlib.sha256(raw).hexdigest() != digest:
            raise DataError(f"{where}: checksum mismatch, not the official Fashion-MNIST {name}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _download(url: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            shutil.copyfileobj(resp, out)
        read_idx(Path(tmp), name=dest.name, label=f"{dest.name} downloaded from {url}")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _has_all(folder: Path) -> bool:
    return all((folder / n).is_file() for n in FILES)


def locate(data_dir: str | os.PathLike[str] | None = None, *, download: bool = True) -> Path:
    """The folder holding the four Fashion-MNIST files, downloading them if needed."""
    if data_dir:
        folder = Path(data_dir).expanduser()
        missing = [n for n in FILES if not (folder / n).is_file()]
        if missing:
            raise DataError(f"data-dir {folder} lacks {', '.join(missing)}")
        return folder
    for folder in (SYSTEM_DIR, cache_dir()):
        if _has_all(folder):
            return folder
    if not download:
        raise DataError(
            f"Fashion-MNIST not found in {SYSTEM_DIR} or {cache_dir()} "
            "(install the Debian package dataset-fashion-mnist or allow the download)"
        )
    folder = cache_dir()
    base = os.environ.get(URL_ENV, DEFAULT_URL).rstrip("/") + "/"
    for name in FILES:
        if (folder / name).is_file():
            continue
        try:
            _download(base + name, folder / name)
        except OSError as exc:
            raise DataError(f"could not download {base + name}: {exc}") from exc
    return folder


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # float32, N x input shape (Fashion-MNIST: 1 x 28 x 28), normalised
    labels: np.ndarray  # int64, N, in [0, num_classes)
    num_classes: int = NUM_CLASSES  # of the dataset (not only the classes present here)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shape(self) -> tuple[int, ...]:
        """One record's input shape."""
        return tuple(int(d) for d in self.images.shape[1:])

    def with_records(self, images: np.ndarray, labels: np.ndarray) -> Split:
        """Other records of the same dataset."""
        return Split(np.asarray(images, dtype=np.float32), np.asarray(labels, dtype=np.int64),
                     self.num_classes)


def _normalise(images: np.ndarray) -> np.ndarray:
    return ((images.astype(np.float32) / 255.0 - MEAN) / STD)[:, None, :, :]


def with_features(split: Split, features: str, where: str) -> Split:
    """The records with their images replaced by `features` of them (common.features),
    computed once and memory mapped."""
    from common.features import cached_features, feature_problem

    problem = feature_problem(features, split.shape)
    if problem:
        raise DataError(f"{where}: {problem}; choose a model that takes the records as they are")
    return Split(cached_features(features, split.images, cache_dir() / "features"), split.labels,
                 split.num_classes)


def load_split(split: str, data_dir: str = "", features: str = "",
               dataset: str = DEFAULT_DATASET, label_column: str = "label",
               partition_by: str = "", standardize: bool = True, classes: str = "") -> Split:
    """`split` is "train" or "test"; arrays are cached per process (one copy however the
    arguments are passed). With `features`, the images are replaced by that fixed
    transform of them (common.features), memory mapped. `data_dir` is Fashion-MNIST's
    folder; other datasets name their own source."""
    return _load_split(split, data_dir, features, dataset, label_column, partition_by,
                       standardize, classes)


@lru_cache(maxsize=4)
def _load_split(split: str, data_dir: str, features: str, dataset: str, label_column: str,
                partition_by: str, standardize: bool, classes: str) -> Split:
    if dataset != DEFAULT_DATASET:
        if features:
            raw = load_split(split, data_dir, "", dataset, label_column, partition_by,
                             standardize, classes)
            return with_features(raw, features, f"dataset={dataset}")
        train, test, _ = _carved(dataset, label_column, partition_by, standardize, classes)
        return {"train": train, "test": test}[split]
    if features:
        raw = load_split(split, data_dir)
        return with_features(raw, features, f"Fashion-MNIST {split}")
    prefix = {"train": "train", "test": "t10k"}[split]
    folder = locate(data_dir or None)
    verify = not data_dir  # a user's own folder may hold their own data in the same format
    files = [folder / f"{prefix}-images-idx3-ubyte.gz", folder / f"{prefix}-labels-idx1-ubyte.gz"]

    def read() -> tuple[np.ndarray, np.ndarray]:
        images = read_idx(files[0], verify=verify)
        labels = read_idx(files[1], verify=verify)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"{folder}: {prefix} images {images.shape} and labels {labels.shape} do not match"
            )
        if labels.size and int(labels.max()) >= NUM_CLASSES:
            raise DataError(f"{folder}: {prefix} labels hold values >= {NUM_CLASSES}")
        return _normalise(images), labels.astype(np.int64)

    return Split(*shared_arrays(files, verify, read))


KEEP_PIXELS = 4  # decoded image sets kept in the cache folder


def shared_arrays(files: list[Path], verify: bool,
                  read: Callable[[], tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """`read()`'s (images, labels), decoded once on this machine and memory-mapped from
    the cache folder: every process of a run (the server, each simulation worker, the
    next run's) shares one copy in the page cache instead of decompressing and holding
    its own (180 MB for Fashion-MNIST's training set). Keyed by the files' path, size
    and modification time; read directly when the cache folder is not writable."""
    try:
        key = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    except OSError:
        return read()  # read() names the missing file
    digest = hashlib.sha256(json.dumps({"v": 1, "files": key, "verify": verify,
                                        "normalise": [float(MEAN), float(STD)]}).encode()
                            ).hexdigest()[:32]
    folder = cache_dir() / "pixels"
    x_path, y_path = folder / f"{digest}-x.npy", folder / f"{digest}-y.npy"
    decoded: tuple[np.ndarray, np.ndarray] | None = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f".{digest}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one process decodes, the others wait and share
            try:
                if not (x_path.exists() and y_path.exists()):
                    decoded = read()  # a bad file stops here, with its reason
                    atomic_write(x_path, lambda tmp: np.save(tmp, np.ascontiguousarray(decoded[0])))
                    atomic_write(y_path, lambda tmp: np.save(tmp, decoded[1]))
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        images, labels = np.load(x_path, mmap_mode="r"), np.load(y_path)
        os.utime(x_path)  # used now: eviction keeps what is in use
    except DataError:
        raise
    except (OSError, ValueError):  # the cache folder cannot serve: decoded in memory
        return decoded if decoded is not None else read()
    with contextlib.suppress(OSError):
        evict_oldest(folder, "*-x.npy", KEEP_PIXELS, lambda p: [
            p, p.with_name(p.name.replace("-x.npy", "-y.npy")),
            p.with_name(f".{p.name.removesuffix('-x.npy')}.lock")])
    return images, labels


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
def _carved(dataset: str, label_column: str, partition_by: str = "", standardize: bool = True,
            classes: str = "") -> tuple[Split, Split, np.ndarray]:
    """(train, test, the training records' ids) of a dataset other than Fashion-MNIST:
    its own test split, or 20% carved out with TEST_SEED; features standardised with the
    training part's statistics (or as given); ids: the `partition_by` column (natural
    partitions), else empty."""
    src = _read_source(dataset, label_column, partition_by)
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


def _read_source(dataset: str, label_column: str, partition_by: str = "") -> _Source:
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


# ---------------------------------------------------------------- partitioning (pure)


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


@lru_cache(maxsize=8)
def cached_partitions(
    data_dir: str, name: str, num_partitions: int, seed: int, alpha: float, labels_per_client: int,
    dataset: str = DEFAULT_DATASET, label_column: str = "label", partition_by: str = "",
    classes: str = "",
) -> tuple[np.ndarray, ...]:
    if name == "natural":
        return natural_partitions(_carved(dataset, label_column, partition_by, True, classes)[2],
                                  num_partitions, f"{dataset} column {partition_by!r}")
    labels = load_split("train", data_dir, dataset=dataset, label_column=label_column,
                        classes=classes).labels
    return tuple(partition_indices(
        labels, name, num_partitions, seed=seed, alpha=alpha, labels_per_client=labels_per_client
    ))


def natural_partitions(ids: np.ndarray, num_partitions: int, where: str) -> tuple[np.ndarray, ...]:
    """One partition per distinct id (sorted), as flwr-datasets' NaturalIdPartitioner: the
    data's own owners (a writer, a hospital) are the clients."""
    distinct = np.unique(ids)
    if len(distinct) != num_partitions:
        raise DataError(f"partitioner=natural: {where} holds {len(distinct)} distinct ids in "
                        f"the training part; set num-partitions={len(distinct)}")
    return tuple(np.flatnonzero(ids == d) for d in distinct)


def load_partition(
    partition_id: int, num_partitions: int, *, partitioner: str, seed: int,
    alpha: float = 0.5, labels_per_client: int = 2, data_dir: str = "", features: str = "",
    dataset: str = DEFAULT_DATASET, label_column: str = "label", partition_by: str = "",
    standardize: bool = True, classes: str = "",
) -> Split:
    """One client's share of the training set."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id={partition_id} must be in [0, {num_partitions - 1}]")
    idx = cached_partitions(
        data_dir, partitioner, num_partitions, seed, float(alpha), labels_per_client,
        dataset, label_column, partition_by, classes,
    )[partition_id]
    train = load_split("train", data_dir, features, dataset, label_column, partition_by,
                       standardize, classes)
    return train.with_records(train.images[idx], train.labels[idx])


def partitions_of(cfg: DataConfig, num_partitions: int) -> tuple[np.ndarray, ...]:
    """Row indices of every partition of the shared training set under the run's data
    config (cached per process)."""
    return cached_partitions(cfg.data_dir, cfg.partitioner, num_partitions, cfg.seed,
                             float(cfg.dirichlet_alpha), cfg.labels_per_client, cfg.dataset,
                             cfg.label_column, cfg.partition_by, cfg.classes)


def own_partition_of(cfg: DataConfig, partition_id: int, num_partitions: int,
                     features: str = "") -> Split:
    """One partition for a deployed node, which holds only it: its records' features
    are computed for those records alone, unless the whole training set's are already
    in this machine's cache (then they are read from it)."""
    if not features:
        return partition_of(cfg, partition_id, num_partitions)
    from common.features import cache_path

    train = load_split("train", cfg.data_dir, "", cfg.dataset, cfg.label_column,
                       cfg.partition_by, cfg.standardize, cfg.classes)
    if cache_path(features, train.images, cache_dir() / "features").exists():
        return partition_of(cfg, partition_id, num_partitions, features)
    part = with_features(partition_of(cfg, partition_id, num_partitions), features,
                         f"partition {partition_id}")
    return part.with_records(part.images, part.labels)  # float32, as every training split


def partition_of(cfg: DataConfig, partition_id: int, num_partitions: int, features: str = "") -> Split:
    """One client's share of the shared training set under the run's data config."""
    return load_partition(partition_id, num_partitions, partitioner=cfg.partitioner, seed=cfg.seed,
                          alpha=cfg.dirichlet_alpha, labels_per_client=cfg.labels_per_client,
                          data_dir=cfg.data_dir, features=features, dataset=cfg.dataset,
                          label_column=cfg.label_column, partition_by=cfg.partition_by,
                          standardize=cfg.standardize, classes=cfg.classes)


def input_spec(cfg: DataConfig, features: str = "") -> tuple[tuple[int, ...], int]:
    """(one record's input shape, number of classes) of the run's dataset, as a model
    must take them (Fashion-MNIST's without reading it)."""
    from common.features import feature_shape

    if cfg.dataset == DEFAULT_DATASET:
        from common.models import IMAGE_28

        return (feature_shape(features, IMAGE_28) if features else IMAGE_28), NUM_CLASSES
    train = load_split("train", cfg.data_dir, "", cfg.dataset, cfg.label_column,
                       cfg.partition_by, cfg.standardize, cfg.classes)
    return _spec(train, features, f"dataset={cfg.dataset}")


def _spec(split: Split, features: str, where: str) -> tuple[tuple[int, ...], int]:
    if not features:
        return split.shape, split.num_classes
    from common.features import feature_problem, feature_shape

    problem = feature_problem(features, split.shape)
    if problem:
        raise DataError(f"{where}: {problem}; choose a model that takes the records as they are")
    return feature_shape(features, split.shape), split.num_classes


def held_out_split(cfg: DataConfig, features: str = "") -> Split:
    """The run's test set (the server's evaluation)."""
    test = load_split("test", cfg.data_dir, features, cfg.dataset, cfg.label_column,
                      cfg.partition_by, cfg.standardize, cfg.classes)
    # in memory as float32 (evaluated every round: a memory-mapped or float16 copy
    # would be converted batch by batch each time)
    return Split(np.array(test.images, dtype=np.float32), np.asarray(test.labels, dtype=np.int64),
                 test.num_classes)


# ---------------------------------------------------------------- a node's cache


def source_fingerprint(dataset: str, data_dir: str = "") -> list | None:
    """What identifies a dataset's files on disk (path, size and modification time of
    each), or None when it cannot be told without reading them (a Hub name)."""
    if dataset == DEFAULT_DATASET:
        folder = locate(data_dir or None)
        files = [folder / n for n in FILES]
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


def cached_split(key: dict, build: Callable[[], Split]) -> Split:
    """`build()`, computed once and kept in this machine's cache folder as arrays that
    later processes memory-map in milliseconds. A deployed node starts a fresh process
    for every message, which would otherwise decompress, partition and transform its
    data each time. `key` must name everything the split depends on, the files'
    fingerprint included (a changed file is a new key)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]
    folder = cache_dir() / "splits"
    x_path, y_path, meta = (folder / f"{digest}-x.npy", folder / f"{digest}-y.npy",
                            folder / f"{digest}.json")
    if meta.exists():
        try:
            classes = int(json.loads(meta.read_text())["num_classes"])
            images = np.asarray(np.load(x_path, mmap_mode="r"), dtype=np.float32)
            labels = np.load(y_path)
            os.utime(meta)  # used now: eviction keeps the newest in use
            return Split(images, labels, classes)
        except (OSError, ValueError, KeyError):
            pass  # unreadable: built again below
    split = build()
    # Fixed features come from a float16 cache (common.features): kept at that precision.
    stored = split.images.astype(np.float16) if key.get("features") else split.images
    atomic_write(x_path, lambda tmp: np.save(tmp, np.ascontiguousarray(stored)))
    atomic_write(y_path, lambda tmp: np.save(tmp, np.ascontiguousarray(split.labels)))
    atomic_write_text(meta, json.dumps({"num_classes": split.num_classes, "key": key},
                                       default=str))
    evict_oldest(folder, "*.json", KEEP_SPLITS, lambda m: [m, m.with_name(f"{m.stem}-x.npy"),
                                                            m.with_name(f"{m.stem}-y.npy")])
    return split.with_records(split.images, split.labels)  # as a later read gives it


# A run config chooses keys (its seed, its partitioner): without a bound a server could
# fill a node's disk by cycling them, run after run.
KEEP_SPLITS = 4


def evict_oldest(folder: Path, pattern: str, keep: int,
                 files_of: Callable[[Path], list[Path]] = lambda p: [p]) -> None:
    """Delete all but the `keep` newest entries matching `pattern` (with their files). A
    process still reading an evicted file keeps its data (Linux unlinks lazily); a
    later one builds it again."""
    def mtime(p: Path) -> int:
        try:
            return p.stat().st_mtime_ns
        except OSError:  # evicted by another process meanwhile
            return -1

    entries = sorted(folder.glob(pattern), key=mtime, reverse=True)
    for old in entries[keep:]:
        for f in files_of(old):
            f.unlink(missing_ok=True)


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
    src = _read_source(dataset, label_column)
    order = _class_order(src, src.labels, classes)
    split = Split(np.asarray(src.x, dtype=np.float32), _encode(src, src.labels, order, classes),
                  len(order))
    if len(split) == 0:
        raise DataError(f"{src.where}: no records")
    return with_features(split, features, src.where) if features else split


def own_spec(dataset: str, label_column: str, classes: str, features: str = ""
             ) -> tuple[tuple[int, ...], int]:
    """(input shape, classes) a model takes for this node's own records."""
    return _spec(own_split(dataset, label_column, classes), features, dataset)
