"""Model builders a user would write, imported by path in tests (`model='tests.user_models:small'`)."""

import math

from torch import nn


def small(shape, classes):
    """A GroupNorm MLP for any input shape: Opacus can train it."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), 32), nn.GroupNorm(4, 32),
                         nn.Tanh(), nn.Linear(32, classes))


def with_batchnorm(shape, classes):
    """BatchNorm mixes the records of a batch: Opacus refuses it (and offers a fix)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), 32), nn.BatchNorm1d(32),
                         nn.Tanh(), nn.Linear(32, classes))


def not_a_model(shape, classes):
    return "a string"
