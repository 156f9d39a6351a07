"""Simulated misbehaving clients (config `attack`, `attackers`), for robustness
experiments and fault tests. An attacker trains under DP and accounts like any client;
only what it sends (or whether it answers) changes."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from common import keys
from common.config import ExperimentConfig


def attack_before_training(attack: str, cfg: ExperimentConfig) -> None:
    if attack == "crash":
        raise RuntimeError("simulated client crash (attack=crash)")
    if attack == "hang":
        time.sleep(cfg.federation.round_timeout + 5.0)  # answers after the server gave up


def apply_attack(
    attack: str, cfg: ExperimentConfig, global_weights: dict[str, np.ndarray],
    weights: dict[str, np.ndarray], metrics: dict[str, Any],
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The (weights, metrics) an attacker sends instead of its honest ones."""
    s = cfg.attack.attack_scale
    if attack in ("sign-flip", "scale"):
        sign = -1.0 if attack == "sign-flip" else 1.0
        weights = {k: (g + sign * s * (weights[k].astype(np.float64) - g)).astype(g.dtype)
                   for k, g in global_weights.items()}
    elif attack == "nan":
        weights = dict(weights)
        first = next(iter(weights))
        weights[first] = np.full_like(weights[first], np.nan)
    elif attack == "wrong-shape":
        weights = dict(weights)
        first = next(iter(weights))
        weights[first] = weights[first].reshape(-1)[:-1].copy()
    elif attack == "inflate-examples":
        metrics = {**metrics, keys.NUM_EXAMPLES: int(metrics[keys.NUM_EXAMPLES]) * 1000}
    return weights, metrics
