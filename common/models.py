"""Models that Opacus accepts (no BatchNorm), picked by name from a registry.

The default `cnn` is the small tanh CNN used for DP-SGD on (Fashion-)MNIST by Papernot et
al. 2021 and Tramèr & Boneh 2021 (~26k parameters): bounded activations and few
parameters keep the noise added per step small relative to the signal.
"""

from __future__ import annotations

import copy
import importlib
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from common.catalogue import (  # noqa: F401 (model names and shapes, re-exported)
    IMAGE_28,
    MODEL_FEATURES,
    MODEL_NAMES,
    SCATTER,
    Shape,
    default_model,
    is_import_path,
    model_problem_for,
)


def _cnn(shape: Shape, classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=8, stride=2, padding=3),
        nn.Tanh(),
        nn.MaxPool2d(2, 1),
        nn.Conv2d(16, 32, kernel_size=4, stride=2),
        nn.Tanh(),
        nn.MaxPool2d(2, 1),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 32),
        nn.Tanh(),
        nn.Linear(32, classes),
    )


def _mlp(shape: Shape, classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), 128), nn.Tanh(),
                         nn.Linear(128, classes))


def _logreg(shape: Shape, classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), classes))


def _scatter_linear(shape: Shape, classes: int) -> nn.Module:
    # Tramèr & Boneh 2021: scattering features, GroupNorm (per sample, no parameters), linear.
    # 81 coefficients per image channel (common.features): groups of 3 channels.
    if len(shape) != 3 or shape[0] % 81:
        raise ValueError(f"model=scatter-linear takes scattering features (81 C x H/4 x W/4), "
                         f"not records of shape {shape}")
    return nn.Sequential(nn.GroupNorm(shape[0] // 3, shape[0], affine=False), nn.Flatten(),
                         nn.Linear(math.prod(shape), classes))


class _Block(nn.Module):
    """A residual block with GroupNorm (per record: no batch statistics, so Opacus-valid)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.GroupNorm(8, channels),
            nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.GroupNorm(8, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


def _resnet_gn(shape: Shape, classes: int) -> nn.Module:
    """A small ResNet-style network with GroupNorm for colour (or grey) images of any size
    (e.g. 3x32x32): stem, two stages of one residual block, global average pooling."""
    if len(shape) != 3:
        raise ValueError(f"model=resnet-gn takes images (channels x height x width), not {shape}")
    return nn.Sequential(
        nn.Conv2d(shape[0], 32, 3, padding=1, bias=False), nn.GroupNorm(8, 32), nn.ReLU(),
        _Block(32), nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), nn.GroupNorm(8, 64),
        nn.ReLU(), _Block(64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes))


MODELS: dict[str, Callable[[Shape, int], nn.Module]] = {
    "cnn": _cnn, "mlp": _mlp, "logreg": _logreg, "scatter-linear": _scatter_linear,
    "resnet-gn": _resnet_gn,
}
if tuple(MODELS) != MODEL_NAMES:
    raise ImportError("common.catalogue.MODEL_NAMES must name every registered model")
# The input shape a model is built for when none is given (Fashion-MNIST's), and the
# shapes it accepts (None: any).
_DEFAULT_SHAPE: dict[str, Shape] = {"scatter-linear": SCATTER}
_ONLY_SHAPE: dict[str, Shape] = {"cnn": IMAGE_28}


def _builder(name: str) -> Callable[[Shape, int], nn.Module]:
    if name in MODELS:
        return MODELS[name]
    if not is_import_path(name):
        raise ValueError(f"model={name!r} must be one of {', '.join(MODELS)}, or "
                         "'package.module:builder' (a function of (input shape, classes))")
    module, _, attr = name.partition(":")
    try:
        found = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"model={name!r}: cannot import it ({type(exc).__name__}: {exc})") from exc
    if not callable(found):
        raise ValueError(f"model={name!r}: {attr} is not callable")
    return found  # type: ignore[no-any-return]


def build_model(name: str, *, seed: int | None = None, shape: Sequence[int] | None = None,
                classes: int = 10) -> nn.Module:
    """A fresh model for records of `shape` (default: Fashion-MNIST's for this model) and
    `classes` labels; with `seed`, its initial weights are reproducible. `name` is a
    registry name or a user's builder, `package.module:builder`."""
    builder = _builder(name)
    dims: Shape = tuple(int(d) for d in shape) if shape is not None else \
        _DEFAULT_SHAPE.get(name, IMAGE_28)
    if name in _ONLY_SHAPE and dims != _ONLY_SHAPE[name]:
        raise ValueError(f"model={name} takes records of shape {_ONLY_SHAPE[name]}, not {dims}")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = builder(dims, classes)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model={name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def dp_problem(model: nn.Module, name: str) -> str | None:
    """Why Opacus cannot train `model` with DP-SGD (its ModuleValidator), with the fix it
    offers, or None."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if not errors:
        return None
    first = str(errors[0]).split(". ")[0]
    fixable = ModuleValidator.is_valid(ModuleValidator.fix(copy.deepcopy(model)))
    return (f"model={name!r} cannot be trained with DP-SGD: {first} ({len(errors)} problem(s))"
            + ("; Opacus can fix it: build it with "
               "opacus.validators.ModuleValidator.fix(model) (e.g. BatchNorm -> GroupNorm)"
               if fixable else ""))


def get_weights(model: nn.Module) -> OrderedDict[str, np.ndarray]:
    """Plain weights (never Opacus' `_module.` prefixes) as numpy arrays."""
    inner = getattr(model, "_module", model)
    return OrderedDict((k, v.detach().cpu().numpy().copy()) for k, v in inner.state_dict().items())


def set_weights(model: nn.Module, weights: dict[str, np.ndarray]) -> None:
    inner = getattr(model, "_module", model)
    state = OrderedDict((k, torch.from_numpy(np.asarray(v).copy())) for k, v in weights.items())
    inner.load_state_dict(state, strict=True)


def parameter_names(model_name: str, shape: Sequence[int] | None = None,
                    classes: int = 10) -> list[str]:
    """The order of an integer release's coordinates: the model's parameters (built for
    records of `shape` and `classes` labels), each flattened. Every named weight must be a
    parameter (no buffers) to be released."""
    model = build_model(model_name, shape=shape, classes=classes)
    names = [n for n, _ in model.named_parameters()]
    if names != list(model.state_dict()):
        raise ValueError(f"model {model_name} has buffers; its weights cannot all be released")
    return names


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _tensor_ready(x: np.ndarray) -> np.ndarray:
    """`x` as float32 torch can take without a copy when it already is (a read-only
    memory-mapped array, or another dtype, is copied)."""
    if x.dtype == np.float32 and x.flags.writeable:
        return x
    return np.array(x, dtype=np.float32)


@torch.no_grad()
def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, *, batch_size: int = 2000,
             device: str = "cpu") -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) on a labelled set."""
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(labels), batch_size):
        x = torch.from_numpy(_tensor_ready(images[start : start + batch_size])).to(device)
        y = torch.from_numpy(labels[start : start + batch_size]).to(device)
        out = model(x)
        # the cross-entropy as log-sum-exp minus the true class's logit: torch's
        # log-softmax over ten classes takes five times as long (a third of a small
        # model's evaluation)
        total_loss += float((torch.logsumexp(out, 1) - out.gather(1, y[:, None])[:, 0]).sum())
        correct += int((out.argmax(1) == y).sum())
    n = max(len(labels), 1)
    return total_loss / n, correct / n


@torch.no_grad()
def per_record_results(model: nn.Module, images: np.ndarray, labels: np.ndarray, *,
                       batch_size: int = 2000, device: str = "cpu"
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Each record's (correct: 0/1, cross-entropy loss; inf or NaN where the logits are
    not finite) on a labelled set."""
    model.eval()
    correct, losses = [], []
    for start in range(0, len(labels), batch_size):
        x = torch.from_numpy(_tensor_ready(images[start : start + batch_size])).to(device)
        y = torch.from_numpy(labels[start : start + batch_size]).to(device)
        out = model(x).double()
        losses.append((torch.logsumexp(out, 1) - out.gather(1, y[:, None])[:, 0]).cpu().numpy())
        correct.append((out.argmax(1) == y).cpu().numpy().astype(np.float64))
    if not correct:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(correct), np.concatenate(losses)
