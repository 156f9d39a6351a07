"""This machine's cache folder: arrays built once and shared by every process.

Three caches use it, all through `arrays_once`: Fashion-MNIST's decoded pixels (every
process of a run memory-maps one copy instead of decompressing its own), fixed features
(common.features: minutes of scattering transforms, once per set of records) and a
deployed node's prepared records (every message of a deployed node is a new process).
Each keeps its newest sets only: a run config chooses keys (its seed, its partitioner),
and without a bound a server could fill a node's disk by cycling them.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from common.files import atomic_write

CACHE_ENV = "DPFL_CACHE_DIR"


def cache_dir() -> Path:
    """DPFL_CACHE_DIR, else $XDG_CACHE_HOME/dpfl/fashion-mnist, else ~/.cache/…"""
    if env := os.environ.get(CACHE_ENV):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dpfl" / "fashion-mnist"


def arrays_once(folder: Path, digest: str, build: Callable[[], Mapping[str, np.ndarray]], *,
                names: Sequence[str], keep: int, mmap: str = "") -> dict[str, np.ndarray]:
    """The arrays `build()` returns (one per name in `names`), built once on this machine
    and kept in `folder` as `<digest>-<name>.npy`: one process builds them under a lock
    while the others wait, then every one loads them, the `mmap` one memory-mapped (one
    copy in the page cache for all). `digest` must name everything the arrays depend on.
    Only the `keep` most recently used sets stay. Raises OSError or ValueError when the
    folder cannot serve; whatever `build()` raises passes through."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {n: folder / f"{digest}-{n}.npy" for n in names}
    with open(folder / f".{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process builds, the others wait and share
        try:
            if not all(p.exists() for p in paths.values()):
                built = build()
                for n, p in paths.items():
                    atomic_write(p, _saver(built[n]))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    out = {n: np.load(p, mmap_mode="r" if n == mmap else None) for n, p in paths.items()}
    first = names[0]
    os.utime(paths[first])  # used now: eviction keeps what is in use
    evict_oldest(folder, f"*-{first}.npy", keep, lambda p: [
        *(p.with_name(p.name.replace(f"-{first}.npy", f"-{n}.npy")) for n in names),
        p.with_name(f".{p.name.removesuffix(f'-{first}.npy')}.lock")])
    return out


def _saver(array: np.ndarray) -> Callable[[str], None]:
    return lambda tmp: np.save(tmp, np.ascontiguousarray(array))


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
