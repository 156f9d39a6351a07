"""A fast in-process emulation of dpfl's default federated DP-SGD round, to choose
schedules before running them for real (`python -m simulations.emulate --help`).

It computes what the default run computes (scattering features, GroupNorm, linear model;
each cohort client takes one full-batch DP-SGD step with per-sample clipping; FedAvg
weighted by records; server momentum, cosine schedule, moving average) in closed form
with numpy; IID partitions are its own seeded split, not flwr-datasets'. Either noise
placement:
- local: each client adds N(0, sigma^2 C^2) to its own clipped sum (today's dpfl);
- distributed: the cohort's sum carries one N(0, sigma^2 C^2 * K / t) (Skellam shares
  under secure aggregation are calibrated so that t of the K clients suffice; the
  Gaussian stands in for the Skellam of equal variance that the integer protocol adds);
- distributed with `--bits B`: the integer path itself, as `server.secure_round` and
  `client.trainer` run it: each client's clipped sum rotated, scaled (the server's noise
  scale: `--sigmas` standard deviations of a coordinate of the sum fill half the field)
  and randomly rounded, Skellam noise calibrated on the rounded sensitivity
  (`common.ddp.Encoding`), the sum wrapped modulo 2^B, read back centred and rotated
  back. This is what accuracy against bits is measured with.
sigma is calibrated per client as dpfl does (its participations, sample rate 1). The
figures it prints are estimates for choosing a schedule, not results: a result comes
from `dpfl simulate`.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time

import numpy as np

from common import ddp, privacy
from common.config import data_config
from common.data import load_split
from common.models import build_model, get_weights


def _features(split: str) -> tuple[np.ndarray, np.ndarray]:
    s = load_split(data_config(), split, "scatter")
    x = np.asarray(s.images, dtype=np.float32).reshape(len(s), 27, -1)  # GroupNorm(27, 81)
    x = (x - x.mean(axis=2, keepdims=True)) / np.sqrt(x.var(axis=2, keepdims=True) + 1e-5)
    return x.reshape(len(s), -1), s.labels


def run(*, noise: str, rounds: int, cohort: int = 10, clients: int = 100, lr: float = 4.0,
        clip: float = 0.1, server_momentum: float = 0.9, ema: float = 0.95, epsilon: float = 3.0,
        delta: float = 1e-5, threshold_fraction: float = 1.0, schedule: str = "cosine",
        bits: int | None = None, sigmas: float = 4.0, seed: int = 42) -> dict:
    xtr, ytr = _features("train")
    xte, yte = _features("test")
    rng = np.random.default_rng(seed)
    parts = np.array_split(rng.permutation(len(ytr)), clients)
    w0 = get_weights(build_model("scatter-linear", seed=seed))
    w, b = w0["2.weight"].astype(np.float64), w0["2.bias"].astype(np.float64)
    participations = math.ceil(rounds * cohort / clients)
    sigma = privacy.calibrate_noise(target_epsilon=epsilon, target_delta=delta, sample_rate=1.0,
                                    steps=participations) if math.isfinite(epsilon) else 0.0
    dim = w.size + b.size
    if bits is not None and noise != "distributed":
        raise ValueError("--bits models the integer path of distributed noise only")
    vel_w, vel_b = np.zeros_like(w), np.zeros_like(b)
    state: dict = {}  # the integer path's z and the last sum's spread
    everyone = cohort >= clients  # every client every round: the whole set, in client order
    if everyone:
        x_all = xtr[np.concatenate(parts)].astype(np.float64)
        y_all = ytr[np.concatenate(parts)]
        sq_all = (x_all * x_all).sum(axis=1) + 1.0
    ema_w, ema_b = None, None
    order: list[int] = []
    t0 = time.time()
    for r in range(1, rounds + 1):
        if len(order) < cohort:
            order += list(rng.permutation(clients))
        chosen, order = order[:cohort], order[cohort:]
        if everyone:
            chosen = list(range(clients))
            x, y, sq = x_all, y_all, sq_all
        else:
            idx = np.concatenate([parts[c] for c in chosen])
            x, y = xtr[idx].astype(np.float64), ytr[idx]
            sq = (x * x).sum(axis=1) + 1.0
        z = x @ w.T + b
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        err = p
        err[np.arange(len(y)), y] -= 1.0
        norms = np.linalg.norm(err, axis=1) * np.sqrt(sq)
        f = np.minimum(1.0, clip / np.maximum(norms, 1e-12))[:, None]
        gw, gb = (err * f).T @ x, (err * f).sum(axis=0)
        if bits is not None:
            gw, gb = _integer_sum(err * f, x, [len(parts[c]) for c in chosen], clip=clip,
                                  bits=bits, sigmas=sigmas, dim=dim, epsilon=epsilon,
                                  delta=delta, steps=participations, t=threshold_fraction,
                                  state=state, rng=rng)
        elif noise == "local":
            std = sigma * clip * math.sqrt(cohort)  # K independent shares in the sum
        else:
            std = sigma * clip * math.sqrt(1.0 / threshold_fraction)
        if bits is None:
            gw += rng.normal(0, std, gw.shape)
            gb += rng.normal(0, std, gb.shape)
        dw, db = -lr * gw / len(y), -lr * gb / len(y)
        slr = 0.5 * (1 + math.cos(math.pi * (r - 1) / rounds)) if schedule == "cosine" else 1.0
        vel_w, vel_b = server_momentum * vel_w + dw, server_momentum * vel_b + db
        w, b = w + slr * vel_w, b + slr * vel_b
        ema_w = w.copy() if ema_w is None else ema * ema_w + (1 - ema) * w
        ema_b = b.copy() if ema_b is None else ema * ema_b + (1 - ema) * b
    assert ema_w is not None and ema_b is not None  # rounds >= 1
    acc = float(((xte @ ema_w.T + ema_b).argmax(axis=1) == yte).mean())
    return {"noise": noise, "rounds": rounds, "cohort": cohort, "lr": lr, "clip": clip,
            "sigma": sigma, "participations": participations, "bits": bits, "accuracy": acc,
            "wrapped": state.get("wrapped", 0), "seconds": time.time() - t0}


def _integer_sum(g: np.ndarray, x: np.ndarray, sizes: list[int], *, clip: float, bits: int,
                 sigmas: float, dim: int, epsilon: float, delta: float, steps: int, t: float,
                 state: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The cohort's unmasked sum in gradient units, through the integer path as
    `server.secure_round` and `client.trainer` run it: each client's clipped sum rotated
    (a fresh seeded rotation per round), scaled by the server's noise scale (secagg-sigmas
    standard deviations of the noise and of the last sum's spread fill the field),
    randomly rounded, a Skellam share (mu / t of the cohort each, mu = (z l2)^2 at the
    high-probability rounding bound, z calibrated once); the sum modulo 2^bits read back
    centred, divided by scale and rotated back. `state` carries z and the last spread."""
    records, k = sum(sizes), len(sizes)
    threshold = max(math.ceil(t * k - 1e-9), k // 2 + 1)
    padded = ddp.padded_dim(dim)
    rms, seen = state.get("signal", (clip * records / math.sqrt(padded), records))
    signal = rms * records / max(seen, 1)
    scale = 1.0
    for _ in range(1 if "fixed" in state else 3):  # server.secure_round.view_for
        if "fixed" not in state:
            enc = ddp.Encoding(clip, scale, padded, ddp.ROUNDING_BETA)
            state["z"] = privacy.calibrate_skellam(
                target_epsilon=epsilon, target_delta=delta, l1=enc.rounded_l1_bound,
                l2=enc.rounded_l2_bound, steps=steps, beta=enc.tail)
        scale = ddp.noise_scale(bits=bits, clip=clip, dim=padded, noise_multiplier=state["z"],
                                members=k, threshold=threshold, signal=signal, sigmas=sigmas)
        scale = min(scale, ddp.scale_cap(noise_multiplier=state["z"], clip=clip, dim=padded,
                                         shares=threshold))
    state["fixed"] = True
    enc = ddp.Encoding(clip, scale, padded, ddp.ROUNDING_BETA)
    mu = (state["z"] * enc.rounded_l2_bound) ** 2
    rotation = ddp.Rotation(seed=rng.bytes(32), dim=dim)
    total = np.zeros(padded, dtype=np.int64)
    at = 0
    for n in sizes:
        s = np.concatenate([(g[at:at + n].T @ x[at:at + n]).ravel(), g[at:at + n].sum(axis=0)])
        at += n
        total += ddp.randomized_round(rotation.forward(s) * scale, rng)
    # k shares of mu / t each: Skellam is closed under summation
    total += ddp.skellam(mu * k / threshold, padded, rng)
    rotated = ddp.wrap(total, bits).astype(np.float64) / scale
    state["signal"] = (ddp.signal_rms(rotated, noise_variance=mu * k / threshold / scale ** 2),
                       records)
    state["wrapped"] = state.get("wrapped", 0) + int(np.sum(np.abs(total) >= 2 ** (bits - 1)))
    centred = rotation.inverse(rotated)
    nw = g.shape[1] * x.shape[1]
    return centred[:nw].reshape(g.shape[1], x.shape[1]), centred[nw:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--noise", choices=("local", "distributed"), default="distributed")
    ap.add_argument("--rounds", type=int, nargs="+", default=[150])
    ap.add_argument("--lr", type=float, nargs="+", default=[4.0])
    ap.add_argument("--clip", type=float, nargs="+", default=[0.1])
    ap.add_argument("--cohort", type=int, default=10)
    ap.add_argument("--epsilon", type=float, default=3.0)
    ap.add_argument("--threshold-fraction", type=float, default=1.0)
    ap.add_argument("--server-momentum", type=float, nargs="+", default=[0.9])
    ap.add_argument("--ema", type=float, nargs="+", default=[0.95])
    ap.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    ap.add_argument("--bits", type=int, nargs="+", default=[None],
                    help="emulate the integer path of secure aggregation with this field")
    ap.add_argument("--sigmas", type=float, default=4.0,
                    help="secagg-sigmas: standard deviations of the rotated sum the field holds")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42])
    args = ap.parse_args()
    for rounds, lr, clip, mom, ema, bits in itertools.product(
            args.rounds, args.lr, args.clip, args.server_momentum, args.ema, args.bits):
        try:
            runs = [run(noise=args.noise, rounds=rounds, lr=lr, clip=clip, cohort=args.cohort,
                        epsilon=args.epsilon, threshold_fraction=args.threshold_fraction,
                        server_momentum=mom, ema=ema, schedule=args.schedule, bits=bits,
                        sigmas=args.sigmas, seed=s)
                    for s in args.seeds]
        except ValueError as exc:
            print(f"bits {bits}: {exc}", flush=True)
            continue
        wrapped = sum(r["wrapped"] for r in runs)
        accs = [r["accuracy"] for r in runs]
        field = f"bits {bits} sigmas {args.sigmas:g} wrapped {wrapped} " if bits else ""
        print(f"{field}{args.noise:<11} rounds {rounds:>4} lr {lr:<5g} clip {clip:<5g} momentum {mom:g} "
              f"ema {ema:g} {args.schedule} cohort {args.cohort} eps {args.epsilon:g}: accuracy "
              f"{100 * np.mean(accs):.2f}% ± {100 * np.std(accs):.2f} (seeds {args.seeds}: "
              f"{', '.join(f'{100 * a:.2f}' for a in accs)})", flush=True)


if __name__ == "__main__":
    main()
