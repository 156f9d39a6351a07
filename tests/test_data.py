"""Fashion-MNIST files: lookup order, checksums, the download path, partitioners."""

import functools
import gzip
import hashlib
import http.server
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from common import cache, fashion_mnist
from common.config import data_config
from common.data import load_split, partition_of
from common.errors import DataError
from common.fashion_mnist import FILES, locate, read_idx
from common.partitions import partition_indices
from tests.helpers import TINY_DATA


def _official(monkeypatch):
    """The folder whose files the download tests serve. The fast suite serves the tiny
    subset and makes its checksums the official ones for the test (the mechanism is the
    same); `test_real_files_match_the_official_checksums` checks the real table."""
    table = {}
    for name in FILES:
        raw = gzip.decompress((Path(TINY_DATA) / name).read_bytes())
        shape = read_idx(Path(TINY_DATA) / name, verify=False).shape
        table[name] = (hashlib.sha256(raw).hexdigest(), len(raw), shape)
    monkeypatch.setattr(fashion_mnist, "FILES", table)
    return Path(TINY_DATA)


@pytest.fixture
def http_server(tmp_path):
    """A local HTTP server on 127.0.0.1 serving a folder; stopped after the test."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def _isolate(monkeypatch, tmp_path, url):
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "no-system")
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(fashion_mnist.URL_ENV, url)


def test_download_verifies_and_caches(http_server, tmp_path, monkeypatch):
    root, url = http_server
    source = _official(monkeypatch)
    for name in FILES:
        shutil.copy(source / name, root / name)
    _isolate(monkeypatch, tmp_path, url)
    folder = locate()
    assert folder == tmp_path / "cache"
    assert read_idx(folder / "t10k-labels-idx1-ubyte.gz").shape == (300,)
    (root / "t10k-labels-idx1-ubyte.gz").unlink()  # cached now: no second download needed
    assert locate() == folder


def test_truncated_download_is_rejected_naming_the_file(http_server, tmp_path, monkeypatch):
    root, url = http_server
    source = _official(monkeypatch)
    for name in FILES:
        shutil.copy(source / name, root / name)
    blob = (root / "train-labels-idx1-ubyte.gz").read_bytes()
    (root / "train-labels-idx1-ubyte.gz").write_bytes(blob[: len(blob) // 2])
    _isolate(monkeypatch, tmp_path, url)
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz"):
        locate()
    assert not (tmp_path / "cache" / "train-labels-idx1-ubyte.gz").exists()


def test_wrong_content_fails_the_checksum(http_server, tmp_path, monkeypatch):
    root, url = http_server
    source = _official(monkeypatch)
    for name in FILES:
        shutil.copy(source / name, root / name)
    raw = bytearray(gzip.decompress((root / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    raw[100] = (raw[100] + 1) % 10  # one label changed: still a valid IDX file
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(raw)))
    _isolate(monkeypatch, tmp_path, url)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz downloaded from .*: checksum mismatch"):
        locate()


def test_unreachable_source_is_a_clear_error(tmp_path, monkeypatch):
    _isolate(monkeypatch, tmp_path, "http://127.0.0.1:9/")
    with pytest.raises(DataError, match="could not download"):
        locate()


def test_explicit_data_dir_missing_files_is_named(tmp_path):
    with pytest.raises(DataError, match="lacks"):
        locate(tmp_path)


def test_not_gzip_is_rejected(tmp_path):
    bad = tmp_path / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(b"hello")
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz"):
        read_idx(bad)


@pytest.mark.slow
def test_real_data_loads_with_expected_shapes():
    train = load_split(data_config(), "train")
    test = load_split(data_config(), "test")
    assert train.images.shape == (60000, 1, 28, 28) and len(test) == 10000
    assert set(np.unique(train.labels)) == set(range(10))


LABELS = np.repeat(np.arange(10), 600)


# flwr-datasets' partitioners (dirichlet, pathological) cost its import (datasets,
# matplotlib: about 3 s) in the process: those tests run in the slow suite
FLWR_DATASETS = pytest.mark.slow


@pytest.mark.parametrize("name", ["iid", pytest.param("dirichlet", marks=FLWR_DATASETS),
                                  pytest.param("pathological", marks=FLWR_DATASETS)])
def test_partitions_are_deterministic_and_disjoint(name):
    a = partition_indices(LABELS, name, 20, seed=1)
    b = partition_indices(LABELS, name, 20, seed=1)
    c = partition_indices(LABELS, name, 20, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=False))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=False))
    joined = np.concatenate(a)
    assert len(joined) == len(np.unique(joined))  # disjoint


@FLWR_DATASETS
def test_iid_is_balanced_and_pathological_has_k_labels():
    iid = partition_indices(LABELS, "iid", 10, seed=0)
    assert {len(p) for p in iid} == {600}
    path = partition_indices(LABELS, "pathological", 10, seed=0, labels_per_client=2)
    assert all(len(np.unique(LABELS[p])) <= 2 for p in path)


@FLWR_DATASETS
def test_dirichlet_is_skewed():
    parts = partition_indices(LABELS, "dirichlet", 10, seed=0, alpha=0.1)
    shares = [np.bincount(LABELS[p], minlength=10).max() / len(p) for p in parts]
    assert np.mean(shares) > 0.4  # IID would be ~0.1


def test_partition_id_out_of_range():
    with pytest.raises(DataError, match="partition-id=10"):
        partition_of(data_config(partitioner="iid", seed=0), 10, 10)


@pytest.mark.slow
def test_real_files_match_the_official_checksums():
    """The installed (or cached) Fashion-MNIST passes the checksum table dpfl ships."""
    folder = locate(download=False)
    for name, (_, _, shape) in FILES.items():
        assert read_idx(folder / name).shape == shape


def test_scatter_features_are_cached_and_shared(tmp_path):
    from common.features import cached_features

    images = load_split(data_config(data_dir=TINY_DATA), "test").images[:40]
    first = cached_features("scatter", images, tmp_path)
    assert first.shape == (40, 81, 7, 7) and np.isfinite(first).all()
    files = sorted(p.name for p in tmp_path.glob("scatter-*-x.npy"))
    again = cached_features("scatter", images, tmp_path)
    assert np.array_equal(first, again) and sorted(p.name for p in tmp_path.glob("scatter-*-x.npy")) == files
    other = cached_features("scatter", images[:20], tmp_path)  # other data: its own file
    assert len(list(tmp_path.glob("scatter-*-x.npy"))) == 2 and np.allclose(other, first[:20], rtol=2e-3, atol=2e-3)  # float16
    with pytest.raises(ValueError, match="features='nope'"):
        cached_features("nope", images, tmp_path)


def test_tiny_real_subset_loads_from_a_data_dir():
    """The fast suite's data: real Fashion-MNIST rows in the official format."""
    train = load_split(data_config(data_dir=TINY_DATA), "train")
    test = load_split(data_config(data_dir=TINY_DATA), "test")
    assert train.images.shape == (1000, 1, 28, 28) and len(test) == 300
    assert np.bincount(train.labels).tolist() == [100] * 10
    assert abs(float(train.images.mean())) < 0.2  # normalised with the dataset's mean/std
