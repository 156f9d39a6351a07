"""Fixed, data-independent feature extractors (no privacy cost: each record's features
depend on that record alone and on no one else's data).

`scatter`: the wavelet scattering transform (kymatio, J=2, L=8: 81 x 7 x 7 per image)
that Tramèr & Boneh (2021) pair with a linear model for the best published DP accuracy
on Fashion-MNIST. Computed once per dataset file and cached on disk (float16, memory
mapped), so every process of a run shares one copy.
"""

from __future__ import annotations

import fcntl
import hashlib
from pathlib import Path

import numpy as np

from common.files import atomic_write

FEATURES = ("scatter",)
SCATTER_SHAPE = (81, 7, 7)


def scattering(images: np.ndarray, *, chunk: int = 2000) -> np.ndarray:
    """Scattering coefficients of N x 1 x 28 x 28 images -> N x 81 x 7 x 7 (float32)."""
    import torch

    # The 2-D frontend only: kymatio's package __init__ also imports its 3-D code, which
    # breaks with current SciPy.
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    transform = ScatteringTorch2D(J=2, shape=(28, 28), L=8)
    out = np.empty((len(images), *SCATTER_SHAPE), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(images), chunk):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + chunk, 0]))
            out[start : start + chunk] = transform(x).numpy()
    return out


def cached_features(kind: str, images: np.ndarray, cache_dir: Path) -> np.ndarray:
    """Features of `images`, computed once and shared through a memory-mapped file."""
    if kind not in FEATURES:
        raise ValueError(f"features={kind!r} must be one of {', '.join(FEATURES)}")
    digest = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()[:16]
    path = cache_dir / f"{kind}-{digest}.npy"
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{kind}-{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process computes, the others wait and share
        try:
            if not path.exists():
                feats = scattering(images).astype(np.float16)
                atomic_write(path, lambda tmp: np.save(tmp, feats))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return np.load(path, mmap_mode="r")
