"""Local training for one round: Opacus DP-SGD under the client's privacy ledger.

The ledger's history is the only input to accounting; this module decides the round's
spend *before* training (the budget guard), trains with Opacus (Poisson sampling,
per-sample clipping, Gaussian noise) and returns the history extended by exactly the
steps taken. The non-private baseline goes through the same function and records its
steps with noise_multiplier 0, so its epsilon is reported as infinite.
"""

from __future__ import annotations

import math
import os
import secrets
import sys
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common import ddp, privacy
from common.config import PrivacyConfig, RuntimeConfig, TrainConfig
from common.data import Split
from common.models import build_model, get_weights, set_weights


@dataclass(frozen=True)
class RoundResult:
    weights: dict[str, np.ndarray]
    num_examples: int
    train_loss: float
    steps: int


# For the audit's own test only (tests/test_audit.py): a broken mechanism. Scales the
# noise a client actually adds while its ledger keeps the noise it should have added, so
# that the audit must catch the difference from what the server sees. Never set it in a
# real run: every process it touches says so on stderr.
BROKEN_NOISE_ENV = "DPFL_TEST_ONLY_BROKEN_NOISE_SCALE"


def broken_noise_scale() -> float:
    raw = os.environ.get(BROKEN_NOISE_ENV, "")
    if not raw:
        return 1.0
    print(f"dpfl: WARNING: {BROKEN_NOISE_ENV}={raw}: this client adds {raw} x the noise its "
          "ledger records (a test of the privacy audit; the guarantee does NOT hold)",
          file=sys.stderr)
    return float(raw)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but torch sees no CUDA device")
    return torch.device(name)


def nonfinite_samples(model: nn.Module, batch_size: int, device: torch.device) -> torch.Tensor:
    """Samples whose per-sample gradient (hooks, functorch, ew) or per-sample gradient
    norm (ghost clipping) holds a non-finite value after a backward pass."""
    bad = torch.zeros(batch_size, dtype=torch.bool, device=device)
    for p in model.parameters():
        for attr in ("grad_sample", "_norm_sample"):
            t = getattr(p, attr, None)
            if isinstance(t, torch.Tensor) and t.shape[:1] == (batch_size,) and batch_size:
                bad |= ~torch.isfinite(t.reshape(batch_size, -1)).all(1)
    return bad


@torch.no_grad()
def nonfinite_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Samples whose own loss is not finite (a NaN input, e.g. an audit's null record)."""
    losses = nn.functional.cross_entropy(model(x), y, reduction="none")
    return ~torch.isfinite(losses)


def all_finite(grads: list[torch.Tensor]) -> bool:
    """Whether every element of `grads` is finite. One sum first (a sum of finite
    numbers is finite unless it overflows; any inf or NaN makes it inf or NaN), the
    element-wise check only when that sum is not finite."""
    if not grads:
        return True
    if bool(torch.isfinite(torch.stack([g.sum(dtype=torch.float64) for g in grads]).sum())):
        return True
    return all(bool(torch.isfinite(g).all()) for g in grads)


def computed_gradients(model: nn.Module) -> list[torch.Tensor]:
    """What the backward pass left on each trainable parameter, whatever the mode: its
    gradient, or (Opacus' `ew` mode, which leaves `p.grad` None) its per-sample
    gradients; every non-finite per-sample value shows in one of them. A parameter the
    loss does not reach has neither (and carries nothing of the data); a pass that left
    nothing at all to check is an error, never taken for a finite one."""
    out = [t for p in model.parameters() if p.requires_grad
           for t in [p.grad if p.grad is not None else getattr(p, "grad_sample", None)]
           if isinstance(t, torch.Tensor)]
    if not out and any(p.requires_grad for p in model.parameters()):
        raise RuntimeError("the backward pass left no gradient and no per-sample gradient: "
                           "the round's values cannot be checked finite, so it releases nothing")
    return out


def finite_step(model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module,
                x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward on the batch, with every sample whose gradient is not finite
    taken out (a zero contribution, as the null record of zero-out adjacency), so that
    what the DP step releases is finite whatever the data. Otherwise one record could turn
    the whole update non-finite: a membership test outside the mechanism. Any non-finite
    per-sample value makes the batch's summed gradient non-finite, so the per-sample check
    (and a recomputation without those samples) runs only then. Returns (loss, labels
    used); the caller takes the optimizer step."""
    while True:
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(x), y)
        loss.backward()
        if len(y) == 0 or all_finite(computed_gradients(model)):
            return loss, y
        bad = nonfinite_samples(model, len(y), x.device)
        if not bool(bad.any()):
            bad = nonfinite_losses(model, x, y)  # no per-sample gradients (non-private)
        if not bool(bad.any()):
            bad = torch.ones_like(bad)  # which sample is at fault cannot be told: none counts
        x, y = x[~bad], y[~bad]  # samples are independent (no batch statistics)


def shuffled_order(n: int, generator: torch.Generator) -> torch.Tensor:
    """The record order of one epoch of `DataLoader(shuffle=True, generator=generator)` over
    n records, from the same draws of `generator` (the loader's base seed, its sampler's
    permutation, the sampler's draw for a remainder of none), so a non-private round
    trains exactly as through the loader, without its per-record indexing and collation
    (a fifth of a small model's round)."""
    torch.empty((), dtype=torch.int64).random_(generator=generator)  # the loader's base seed
    order = torch.randperm(n, generator=generator)
    torch.randperm(n, generator=generator)  # RandomSampler's second draw, of 0 records
    return order


GATHER_RECORDS = 1024  # records taken from the data at once (a few MB, however large it is)


def tensor_batches(tensors: tuple[torch.Tensor, ...], batch_size: int,
                   generator: torch.Generator) -> Iterator[tuple[torch.Tensor, ...]]:
    """One shuffled epoch of (x, y) batches, as the DataLoader would give them: the
    shuffled records taken a block of whole batches at a time, then split (one indexing
    per block, not one per batch)."""
    order = shuffled_order(len(tensors[0]), generator)
    block = max(1, GATHER_RECORDS // batch_size) * batch_size
    for start in range(0, len(order), block):
        idx = order[start:start + block]
        yield from zip(*(torch.index_select(t, 0, idx).split(batch_size) for t in tensors),
                       strict=True)


def sampled_batches(tensors: tuple[torch.Tensor, ...], loader: Any
                    ) -> Iterator[tuple[torch.Tensor, ...]]:
    """The batches of one epoch of Opacus' DPDataLoader `loader`, from the same draws of
    its generator (the loader's base seed, then its Poisson sampler's index lists; an
    empty list is a zero-length batch, as its collate gives), each batch taken from the
    tensors at once instead of record by record and collated (a fifth of a round)."""
    torch.empty((), dtype=torch.int64).random_(generator=loader.generator)  # None: torch's
    for idx in loader.batch_sampler:
        index = torch.as_tensor(idx, dtype=torch.int64)
        yield tuple(torch.index_select(t, 0, index) for t in tensors)


class PlainSGD:
    """torch.optim.SGD's update for the non-private baseline (momentum without dampening,
    no Nesterov, no weight decay: what TrainConfig offers), bit for bit, without the
    optimizer's per-step hooks and profiler records (a fifth of a small model's step)."""

    def __init__(self, params: Iterable[torch.Tensor], *, lr: float, momentum: float) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.momentum = lr, momentum
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        with torch.no_grad():
            for i, p in enumerate(self.params):
                grad = p.grad
                if grad is None:
                    continue
                if self.momentum:
                    buf = self.buffers[i]
                    if buf is None:
                        buf = self.buffers[i] = torch.clone(grad).detach()
                    else:
                        buf.mul_(self.momentum).add_(grad)
                    grad = buf
                p.add_(grad, alpha=-self.lr)


def model_is_finite(model: nn.Module) -> bool:
    """Whether every parameter and floating-point buffer of `model` is finite."""
    return all_finite([t.detach() for t in (*model.parameters(), *model.buffers())
                       if t.is_floating_point()])


def train_round(
    weights: dict[str, np.ndarray], data: Split, plan: privacy.RoundPlan, *,
    train: TrainConfig, priv: PrivacyConfig, runtime: RuntimeConfig, seed: int,
) -> RoundResult:
    """Run `plan.steps` local steps from `weights`; private iff plan.noise_multiplier > 0.
    Private rounds draw their Poisson samples and noise from OS entropy, not from `seed`
    (Opacus' secure_mode would need torchcsprng, which is not installed).

    A sample whose gradient is not finite must not reach the update (`finite_step`).
    Checking every step costs a tenth of a small model's round, and a non-finite value
    never leaves a model trained by SGD once it is in (inf or NaN, minus or times anything,
    stays inf or NaN): so a non-private round first trains without the check and, only
    when the model it ends with is not finite, trains again from the same draws checking
    every step. Either way the model is the one that checking every step gives; the
    first attempt is never released. A private round checks every step: whether it had
    to train twice would depend on its records (an audit's null record is NaN), and the
    time it took would tell the server so, outside the DP mechanism."""
    if runtime.num_threads > 0:
        torch.set_num_threads(runtime.num_threads)
    device = resolve_device(runtime.device)
    private = plan.noise_multiplier > 0
    # DP needs the Poisson sample and the noise to be secret: never derive them from the
    # run's (public) seed. The non-private baseline stays reproducible.
    if private:
        seed = secrets.randbits(63)
    noise_seed = secrets.randbits(63) if private else 0
    for checked in ((True,) if private else (False, True)):
        result = _train(weights, data, plan, train=train, priv=priv, runtime=runtime,
                        device=device, seed=seed, noise_seed=noise_seed, checked=checked)
        if result is not None:
            return result
    raise AssertionError("a checked round always returns")  # pragma: no cover


def _train(
    weights: dict[str, np.ndarray], data: Split, plan: privacy.RoundPlan, *,
    train: TrainConfig, priv: PrivacyConfig, runtime: RuntimeConfig, device: torch.device,
    seed: int, noise_seed: int, checked: bool,
) -> RoundResult | None:
    """One attempt at the round from `seed` (batches) and `noise_seed` (DP noise). Without
    `checked`, None as soon as the loss or, at the end, the model is not finite."""
    private = plan.noise_multiplier > 0
    if device.type == "cpu":  # torch.manual_seed also queues seeds for every accelerator
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)
    model = build_model(train.model, shape=data.shape, classes=data.num_classes)
    set_weights(model, weights)
    model.to(device)
    model.train()
    tensors = (torch.from_numpy(data.images), torch.from_numpy(data.labels))
    generator = torch.Generator().manual_seed(seed)
    criterion: nn.Module = nn.CrossEntropyLoss()
    optimizer: Any
    if private:
        from opacus import PrivacyEngine

        loader = DataLoader(TensorDataset(*tensors), batch_size=train.batch_size or len(data),
                            shuffle=True, generator=generator)
        engine = PrivacyEngine(accountant=priv.accountant)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            made = engine.make_private(
                module=model,
                optimizer=torch.optim.SGD(model.parameters(), lr=train.learning_rate,
                                          momentum=train.momentum),
                data_loader=loader,
                noise_multiplier=plan.noise_multiplier * broken_noise_scale(),
                max_grad_norm=priv.max_grad_norm,
                poisson_sampling=True, grad_sample_mode=runtime.grad_sample_mode,
                noise_generator=torch.Generator().manual_seed(noise_seed),
                **({"criterion": criterion} if runtime.grad_sample_mode == "ghost" else {}),
            )
        if runtime.grad_sample_mode == "ghost":
            model, optimizer, criterion, loader = made
        else:
            model, optimizer, loader = made
        if not math.isclose(loader.sample_rate, plan.sample_rate, rel_tol=1e-9):
            raise RuntimeError(
                f"Opacus samples at q={loader.sample_rate}, the ledger planned {plan.sample_rate}"
            )
    else:
        optimizer = PlainSGD(model.parameters(), lr=train.learning_rate, momentum=train.momentum)
        batch_size = train.batch_size or len(data)
        if batch_size < 1:
            raise ValueError(f"batch_size should be a positive integer value, not {batch_size}")

    total_loss, seen, steps = 0.0, 0, 0
    try:
        for _ in range(train.local_epochs):
            batches = (sampled_batches(tensors, loader) if private else
                       tensor_batches(tensors, batch_size, generator))
            for x, y in batches:
                x, y = x.to(device), y.to(device)
                if checked:
                    # Poisson sampling can draw an empty batch; Opacus still takes a noisy step.
                    loss, y = finite_step(model, optimizer, criterion, x, y)
                else:
                    optimizer.zero_grad(set_to_none=True)
                    loss = criterion(model(x), y)
                    loss.backward()
                optimizer.step()
                steps += 1
                if len(y):
                    value = loss.item()
                    if not (checked or math.isfinite(value)):
                        return None
                    total_loss += value * len(y)
                seen += len(y)
        if not (checked or model_is_finite(model)):
            return None
        if private:
            spent = privacy.total_steps(engine.accountant.history)
            if spent != plan.steps or steps != plan.steps:
                raise RuntimeError(
                    f"accounting mismatch: planned {plan.steps} steps, Opacus counted {spent}, "
                    f"the loop took {steps}"
                )
        weights_out = get_weights(model)
    finally:
        # Opacus keeps per-sample gradients (n x parameters, ~95 MB a round here) on the
        # parameters, inside reference cycles with its hooks: free them now, not at some
        # later garbage collection, or a long-lived simulation actor grows by that much
        # every round.
        optimizer.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.grad_sample = None  # type: ignore[attr-defined]
        if hasattr(model, "remove_hooks"):
            model.remove_hooks()  # type: ignore[operator]
        del model, optimizer

    return RoundResult(
        weights=weights_out, num_examples=len(data),
        train_loss=total_loss / max(seen, 1), steps=plan.steps,
    )


def _flat_grad(p: torch.Tensor) -> torch.Tensor:
    """A parameter's gradient, flat, float64 on the CPU (zeros if the loss does not reach it)."""
    g = p.grad
    return torch.zeros(p.numel(), dtype=torch.float64) if g is None else \
        g.detach().reshape(-1).to("cpu", torch.float64)


def integer_gradient_sum(
    weights: dict[str, np.ndarray], data: Split, *, model_name: str, encoding: ddp.Encoding,
    mu_share: float, rotation: ddp.Rotation | None = None, chunk: int = 256, device: str = "cpu",
) -> np.ndarray:
    """One full-batch DP-SGD step's release for secure aggregation: the sum over records
    of each record's gradient clipped to `encoding.clip`, rotated by `rotation` (the
    round's, from the view; None: not rotated), times `encoding.scale`, rounded to
    integers by randomized rounding, plus this client's Skellam share of variance
    `mu_share` per coordinate (one record moves the rounded sum by at most
    `encoding.rounded_l2_bound`, except with probability `encoding.tail`;
    common/ddp.py). A record whose gradient is not finite
    contributes zero (the null record of zero-out adjacency). Computed in float64 with
    Opacus' ghost clipping (GradSampleModuleFastGradientClipping): one forward pass; a
    first backward pass gives each record's gradient norm without materialising
    per-record gradients, a second one through the same graph the sum of the gradients
    weighted by their clipping factors (as Opacus' own DPLossFastGradientClipping). Rounding and
    noise draw from OS entropy. Returns the flat int64 vector in the model's parameter
    order (`common.models.parameter_names`). Its caller plans and records the release in
    the ledger before sending it (`plan_release`)."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    model = build_model(model_name, shape=data.shape, classes=data.num_classes)
    set_weights(model, weights)
    model = model.double().to(torch.device(device))
    gsm = GradSampleModuleFastGradientClipping(
        model, batch_first=True, loss_reduction="sum", max_grad_norm=encoding.clip,
        use_ghost_clipping=True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    size = sum(params[n].numel() for n in names)
    if (rotation.dim, rotation.padded) != (size, encoding.dim) if rotation else size != encoding.dim:
        raise ValueError(f"encoding.dim={encoding.dim} and rotation "
                         f"{(rotation.dim, rotation.padded) if rotation else None} do not fit "
                         f"the model's {size} parameters")
    total = torch.zeros(size, dtype=torch.float64)
    for start in range(0, len(data), chunk):
        x = torch.from_numpy(np.asarray(data.images[start:start + chunk], dtype=np.float64)).to(device)
        y = torch.from_numpy(data.labels[start:start + chunk]).to(device)
        with warnings.catch_warnings():  # inputs need no gradient: Opacus hooks say so
            warnings.simplefilter("ignore")
            gsm.zero_grad(set_to_none=True)
            gsm.enable_hooks()
            losses = nn.functional.cross_entropy(gsm(x), y, reduction="none")
            losses.sum().backward(retain_graph=True)  # the graph serves the weighted pass too
            norms = gsm.get_norm_sample().detach().double()
            good = torch.isfinite(norms)  # a non-finite value makes the norm inf or nan
            if not bool(good.all()):  # 0 x NaN is NaN: such records leave the forward pass
                x, y, norms = x[good], y[good], norms[good]
                if not len(y):
                    continue
                gsm.disable_hooks()
                losses = nn.functional.cross_entropy(gsm(x), y, reduction="none")
            factor = torch.clamp(encoding.clip / norms.clamp_min(1e-300), max=1.0)
            gsm.zero_grad(set_to_none=True)
            gsm.disable_hooks()  # the weighted pass: plain gradients of sum_i factor_i loss_i
            (factor.to(losses.device) * losses).sum().backward()
        total += torch.cat([_flat_grad(params[n]) for n in names])
    gsm.zero_grad(set_to_none=True)
    gsm.remove_hooks()
    rng = np.random.default_rng(secrets.randbits(128))
    flat = rotation.forward(total.numpy()) if rotation else total.numpy()
    release = ddp.randomized_round(flat * encoding.scale, rng)
    return release + ddp.skellam(mu_share * broken_noise_scale() ** 2, encoding.dim, rng)
