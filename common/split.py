"""A split: records as a model takes them (float32 inputs, int64 class indices), and the
same records with fixed features in place of their inputs (common.features)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.cache import cache_dir
from common.catalogue import NUM_CLASSES
from common.errors import DataError
from common.features import cached_features, feature_problem, feature_shape


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


def with_features(split: Split, features: str, where: str) -> Split:
    """The records with their inputs replaced by `features` of them (common.features),
    computed once on this machine and memory mapped."""
    problem = feature_problem(features, split.shape)
    if problem:
        raise DataError(f"{where}: {problem}; choose a model that takes the records as they are")
    return Split(cached_features(features, split.images, cache_dir() / "features"), split.labels,
                 split.num_classes)


def spec(split: Split, features: str, where: str) -> tuple[tuple[int, ...], int]:
    """(one record's input shape, classes) a model takes for `split` with `features`."""
    if not features:
        return split.shape, split.num_classes
    problem = feature_problem(features, split.shape)
    if problem:
        raise DataError(f"{where}: {problem}; choose a model that takes the records as they are")
    return feature_shape(features, split.shape), split.num_classes
