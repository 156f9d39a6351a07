"""Checks on client updates before aggregation (pure functions of arrays and metrics).

A reply that fails a check is excluded with the returned reason; it never reaches the
averaging, so one broken or hostile client cannot crash the round or poison it with NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from common import keys


def _structure_problem(
    reference: Mapping[str, np.ndarray], arrays: Mapping[str, np.ndarray], what: str
) -> str | None:
    """Names (in order), shapes, dtypes and finiteness of `arrays` against `reference`."""
    if list(arrays) != list(reference):
        missing = sorted(set(reference) - set(arrays))
        extra = sorted(set(arrays) - set(reference))
        return f"{what}: array names differ from the model (missing {missing}, unexpected {extra})"
    for name, ref in reference.items():
        arr = arrays[name]
        if arr.shape != ref.shape:
            return f"{what}: array {name!r} has shape {arr.shape}, expected {ref.shape}"
        if arr.dtype != ref.dtype:
            return f"{what}: array {name!r} has dtype {arr.dtype}, expected {ref.dtype}"
        if not np.all(np.isfinite(arr)):
            return f"{what}: array {name!r} holds non-finite values"
    return None


def _norm(arrays: Mapping[str, np.ndarray], minus: Mapping[str, np.ndarray] | None = None) -> float:
    sq = 0.0
    for name, arr in arrays.items():
        a = arr.astype(np.float64)
        if minus is not None:
            a = a - minus[name].astype(np.float64)
        sq += float(np.sum(a * a))
    return math.sqrt(sq)


def update_problem(
    reference: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray], *,
    max_update_norm: float = 0.0,
) -> str | None:
    """Why `update` cannot be averaged into `reference`, or None if it can."""
    problem = _structure_problem(reference, update, "update")
    if problem or max_update_norm <= 0:  # 0: no bound on the update's norm
        return problem
    norm = _norm(update, reference)
    if norm > max_update_norm:
        return f"update norm {norm:.4g} exceeds max-update-norm {max_update_norm}"
    return None


def model_problem(
    template: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray], *, max_norm: float,
) -> str | None:
    """Why a client refuses to train on global `weights` (checked before it touches any
    data, so the answer depends only on the weights): names, shapes and dtypes of the
    model `template`, finite values, and an L2 norm of at most `max_norm` (a bounded model
    on bounded inputs cannot overflow float32 for one record and not for another)."""
    problem = _structure_problem(template, weights, "global model")
    if problem:
        return problem
    norm = _norm(weights)
    if norm > max_norm:
        return f"global model norm {norm:.4g} exceeds this node's max-model-norm={max_norm}"
    return None


def metrics_problem(metrics: Mapping[str, object]) -> str | None:
    """Why a train reply's metrics are unusable, or None."""
    missing = sorted(keys.REPLY_METRIC_KEYS - set(metrics))
    if missing:
        return f"metrics lack {', '.join(missing)}"
    extra = sorted(set(metrics) - keys.REPLY_METRIC_KEYS)
    if extra:
        return f"metrics hold unexpected keys {', '.join(extra)}"
    for k, v in metrics.items():
        if isinstance(v, list) or isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"metric {k!r}={v!r} is not a number"
    n = keys.number(metrics[keys.NUM_EXAMPLES], keys.NUM_EXAMPLES)
    if not (n.is_integer() and n > 0):
        return f"num-examples={n!r} must be a positive integer"
    loss = float(metrics[keys.TRAIN_LOSS])  # type: ignore[arg-type]
    if not (math.isnan(loss) or 0 <= loss < math.inf):  # NaN: withheld by a private client
        return f"metric {keys.TRAIN_LOSS!r}={loss!r} must be finite and >= 0, or NaN (withheld)"
    for k in (keys.NOISE_MULTIPLIER, keys.SAMPLE_RATE, keys.STEPS):
        if not math.isfinite(float(metrics[k])) or float(metrics[k]) < 0:  # type: ignore[arg-type]
            return f"metric {k!r}={metrics[k]!r} must be finite and >= 0"
    eps = float(metrics[keys.EPSILON])  # type: ignore[arg-type]
    if math.isnan(eps) or eps < 0:
        return f"epsilon={eps!r} must be >= 0"
    return None


def weighted_average(
    updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """FedAvg's average, in float64 then cast back to each array's dtype."""
    if not updates or len(updates) != len(weights) or sum(weights) <= 0:
        raise ValueError("need at least one update and positive weights of the same count")
    total = float(sum(weights))
    out = {}
    for name, ref in updates[0].items():
        acc = sum(np.asarray(u[name], dtype=np.float64) * (w / total) for u, w in zip(updates, weights, strict=False))
        out[name] = np.asarray(acc, dtype=ref.dtype)
    return out


def multikrum_indices(updates: Sequence[Mapping[str, np.ndarray]], num_malicious: int,
                num_select: int) -> list[int]:
    """Krum / Multi-Krum (Blanchard et al. 2017), as Flower's `select_multikrum`: score each
    update by the summed squared distances to its n - f - 2 nearest others and return the
    indices of the `num_select` lowest scores (ties: the earlier update). Distances are
    computed in float64 (Flower's in the arrays' dtype, where float32 cancels badly for
    nearly identical large-norm updates); otherwise the choice is the same."""
    flat = np.stack([np.concatenate([np.asarray(a, np.float64).ravel() for a in u.values()])
                     for u in updates])
    sq = np.square(flat).sum(axis=1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2 * flat @ flat.T, 0.0)
    nearest = max(1, len(updates) - num_malicious - 2)
    scores = [float(np.sort(row)[1:nearest + 1].sum()) for row in dist]
    return [int(i) for i in np.argsort(scores, kind="stable")[:num_select]]


def robust_aggregate(
    method: str, updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], *,
    trim_fraction: float = 0.2, krum_malicious: int = 0, krum_select: int = 1,
) -> tuple[dict[str, np.ndarray], list[int]]:
    """Aggregate client models with one of Flower's rules; returns (model, indices of the
    updates it used). fedavg: weighted mean; fedmedian: coordinate-wise median (as
    Flower's FedMedian); fedtrimmedavg: coordinate-wise trimmed mean (Flower's
    `trim_mean`); krum / multikrum: the update(s) closest to their neighbours
    (`multikrum_indices`, as Flower's `select_multikrum`), averaged by weight."""
    from flwr.serverapp.strategy.fedtrimmedavg import trim_mean  # numpy only

    everyone = list(range(len(updates)))
    if method == "fedavg":
        return weighted_average(updates, weights), everyone
    names = list(updates[0])
    if method in ("fedmedian", "fedtrimmedavg"):
        out = {}
        for name in names:
            stack = np.stack([np.asarray(u[name], dtype=np.float64) for u in updates])
            agg = np.median(stack, axis=0) if method == "fedmedian" else trim_mean(stack, trim_fraction)
            out[name] = np.asarray(agg, dtype=updates[0][name].dtype)
        return out, everyone
    if method in ("krum", "multikrum"):
        idx = sorted(multikrum_indices(updates, krum_malicious,
                                 1 if method == "krum" else min(krum_select, len(updates))))
        return weighted_average([updates[i] for i in idx], [weights[i] for i in idx]), idx
    raise ValueError(f"unknown aggregation {method!r}")
