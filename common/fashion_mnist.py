"""Fashion-MNIST: find, verify, download and decode the four IDX files.

Files are looked up in this order: an explicit folder (a run's or a node's `data-dir`),
the system datasets folder of the Debian package `dataset-fashion-mnist`, the user
cache; otherwise they are downloaded into the cache. Every file is checked by the
SHA-256 of its *decompressed* IDX payload (the same bytes whichever gzip produced the
archive), so a corrupt, truncated or foreign file is rejected with its name. A user's
own folder may hold their own data in the same format (not checked against the
official digests). Decoded pixels are kept once on this machine (common.cache).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from common.cache import arrays_once, cache_dir
from common.catalogue import NUM_CLASSES
from common.errors import DataError
from common.split import Split

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
URL_ENV = "DPFL_DATA_URL"

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
KEEP_PIXELS = 4  # decoded image sets kept in the cache folder


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


def normalise(images: np.ndarray) -> np.ndarray:
    """uint8 N x 28 x 28 -> float32 N x 1 x 28 x 28, with the dataset's mean and std."""
    return ((images.astype(np.float32) / 255.0 - MEAN) / STD)[:, None, :, :]


def load(split: str, data_dir: str = "") -> Split:
    """The "train" or "test" split from `data_dir` (or the default places), decoded and
    normalised once on this machine and memory-mapped from the cache folder: every
    process of a run (the server, each simulation worker, the next run's) shares one copy
    in the page cache instead of decompressing and holding its own (180 MB for the
    training set). Keyed by the files' path, size and modification time; read directly
    when the cache folder cannot serve."""
    prefix = {"train": "train", "test": "t10k"}[split]
    folder = locate(data_dir or None)
    verify = not data_dir  # a user's own folder may hold their own data in the same format
    files = [folder / f"{prefix}-images-idx3-ubyte.gz", folder / f"{prefix}-labels-idx1-ubyte.gz"]

    def read() -> dict[str, np.ndarray]:
        images = read_idx(files[0], verify=verify)
        labels = read_idx(files[1], verify=verify)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"{folder}: {prefix} images {images.shape} and labels {labels.shape} do not match"
            )
        if labels.size and int(labels.max()) >= NUM_CLASSES:
            raise DataError(f"{folder}: {prefix} labels hold values >= {NUM_CLASSES}")
        return {"x": normalise(images), "y": labels.astype(np.int64)}

    try:
        key = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
        digest = hashlib.sha256(json.dumps({"v": 1, "files": key, "verify": verify,
                                            "normalise": [float(MEAN), float(STD)]}).encode()
                                ).hexdigest()[:32]
        arrays = arrays_once(cache_dir() / "pixels", digest, read, names=("x", "y"),
                             keep=KEEP_PIXELS, mmap="x")
    except (OSError, ValueError):
        # A missing file (read() names it) or a cache folder that cannot serve: decoded
        # in memory. read() reports bad files as DataError, which passes through.
        arrays = read()
    return Split(arrays["x"], arrays["y"])
