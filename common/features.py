"""Fixed, data-independent feature extractors (no privacy cost: each record's features
depend on that record alone and on no one else's data).

`scatter`: the wavelet scattering transform (kymatio, J=2, L=8) that Tramèr & Boneh
(2021) pair with a linear model for the best published DP accuracy on Fashion-MNIST:
81 coefficients per channel on a grid a quarter of the image's side (1 x 28 x 28 ->
81 x 7 x 7; 3 x 32 x 32 -> 243 x 8 x 8), for images of any size from 8 x 8. Computed
once per set of records (keyed by their bytes) and cached on disk (float16, memory
mapped), so every process of a run shares one copy.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from common.cache import arrays_once
from common.catalogue import FEATURES

SCATTER_SHAPE = (81, 7, 7)  # of a 1 x 28 x 28 image
_J, _ORIENTATIONS, _COEFFICIENTS = 2, 8, 81  # 1 + J L + L^2 J (J - 1) / 2
MIN_SIDE = 8


def feature_problem(kind: str, shape: tuple[int, ...]) -> str | None:
    """Why records of `shape` have no `kind` features, or None."""
    if kind not in FEATURES:
        return f"features={kind!r} must be one of {', '.join(FEATURES)}"
    if len(shape) != 3:
        return (f"scattering features are computed from images (channels x height x width); "
                f"these records have shape {shape}")
    if min(shape[1:]) < MIN_SIDE:
        return f"scattering features need images of at least {MIN_SIDE}x{MIN_SIDE}, not {shape}"
    return None


def feature_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The features' shape for one record of `shape` (C x H x W -> 81 C x H/4 x W/4)."""
    problem = feature_problem(kind, shape)
    if problem:
        raise ValueError(problem)
    c, h, w = shape
    return (_COEFFICIENTS * c, h // 2**_J, w // 2**_J)


def scattering(images: np.ndarray, *, chunk: int = 2000) -> np.ndarray:
    """Scattering coefficients of N x C x H x W images -> N x 81 C x H/4 x W/4 (float32)."""
    import torch

    # The 2-D frontend only: kymatio's package __init__ also imports its 3-D code, which
    # breaks with current SciPy.
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    shape = feature_shape("scatter", tuple(images.shape[1:]))
    transform = ScatteringTorch2D(J=_J, shape=tuple(images.shape[2:]), L=_ORIENTATIONS)
    out = np.empty((len(images), *shape), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(images), chunk):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + chunk],
                                                      dtype=np.float32))
            # N x C x 81 x H' x W' -> N x 81 C x H' x W' (channel-major)
            out[start : start + chunk] = transform(x).reshape(len(x), *shape).numpy()
    return out


def _digest(kind: str, images: np.ndarray) -> str:
    return f"{kind}-{hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()[:16]}"


def cache_path(kind: str, images: np.ndarray, folder: Path) -> Path:
    """Where the `kind` features of exactly these images are cached (keyed by their bytes)."""
    return folder / f"{_digest(kind, images)}-x.npy"


def cached_features(kind: str, images: np.ndarray, folder: Path) -> np.ndarray:
    """Features of `images`, computed once on this machine (float16) and shared through a
    memory-mapped file (common.cache)."""
    problem = feature_problem(kind, tuple(images.shape[1:]))
    if problem:
        raise ValueError(problem)
    return arrays_once(folder, _digest(kind, images),
                       lambda: {"x": scattering(images).astype(np.float16)},
                       names=("x",), keep=KEEP_FEATURES, mmap="x")["x"]


KEEP_FEATURES = 8  # feature sets kept (a node's partitions under past run configs)
