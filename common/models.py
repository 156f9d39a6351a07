"""Models that Opacus accepts (no BatchNorm), picked by name from a registry.

The default `cnn` is the small tanh CNN used for DP-SGD on (Fashion-)MNIST by Papernot et
al. 2021 and Tramèr & Boneh 2021 (~26k parameters): bounded activations and few
parameters keep the noise added per step small relative to the signal.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch
from torch import nn


def _cnn() -> nn.Module:
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
        nn.Linear(32, 10),
    )


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.Tanh(), nn.Linear(128, 10))


def _logreg() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))


def _scatter_linear() -> nn.Module:
    # Tramèr & Boneh 2021: scattering features, GroupNorm (per sample, no parameters), linear.
    return nn.Sequential(nn.GroupNorm(27, 81, affine=False), nn.Flatten(), nn.Linear(81 * 7 * 7, 10))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "cnn": _cnn, "mlp": _mlp, "logreg": _logreg, "scatter-linear": _scatter_linear,
}
# Models that take fixed features (common.features) instead of raw images.
MODEL_FEATURES: dict[str, str] = {"scatter-linear": "scatter"}


def build_model(name: str, *, seed: int | None = None) -> nn.Module:
    """A fresh model; with `seed`, its initial weights are reproducible."""
    if name not in MODELS:
        raise ValueError(f"model={name!r} must be one of {', '.join(MODELS)}")
    if seed is None:
        return MODELS[name]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name]()


def get_weights(model: nn.Module) -> OrderedDict[str, np.ndarray]:
    """Plain weights (never Opacus' `_module.` prefixes) as numpy arrays."""
    inner = getattr(model, "_module", model)
    return OrderedDict((k, v.detach().cpu().numpy().copy()) for k, v in inner.state_dict().items())


def set_weights(model: nn.Module, weights: dict[str, np.ndarray]) -> None:
    inner = getattr(model, "_module", model)
    state = OrderedDict((k, torch.from_numpy(np.asarray(v).copy())) for k, v in weights.items())
    inner.load_state_dict(state, strict=True)


def parameter_names(model_name: str) -> list[str]:
    """The order of an integer release's coordinates: the model's parameters, each
    flattened. Every named weight must be a parameter (no buffers) to be released."""
    model = build_model(model_name)
    names = [n for n, _ in model.named_parameters()]
    if names != list(model.state_dict()):
        raise ValueError(f"model {model_name} has buffers; its weights cannot all be released")
    return names


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, *, batch_size: int = 2000,
             device: str = "cpu") -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) on a labelled set."""
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(labels), batch_size):
        x = torch.from_numpy(images[start : start + batch_size]).to(device)
        y = torch.from_numpy(labels[start : start + batch_size]).to(device)
        out = model(x)
        total_loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
    n = max(len(labels), 1)
    return total_loss / n, correct / n
