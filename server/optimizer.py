"""The server optimizer on the clients' averaged model (pure functions).

FedAvgM (server momentum) with an optional cosine learning-rate schedule, and an
exponential moving average of the global models for evaluation. All of it is
post-processing of the clients' DP outputs: no privacy cost. With learning rate 1, no
momentum, no schedule and no average it is plain FedAvg.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class ServerOptimizer:
    learning_rate: float = 1.0
    momentum: float = 0.0
    schedule: str = "constant"  # or "cosine" over num_rounds
    ema: float = 0.0  # decay of the moving average; 0: none
    num_rounds: int = 1

    def lr(self, server_round: int) -> float:
        if self.schedule == "cosine":
            frac = (server_round - 1) / max(self.num_rounds, 1)
            return self.learning_rate * 0.5 * (1 + math.cos(math.pi * frac))
        return self.learning_rate


@dataclass(frozen=True)
class OptimizerState:
    velocity: Weights = field(default_factory=dict)
    ema: Weights | None = None  # None until the first aggregate

    def arrays(self) -> Weights:
        """Named arrays for a checkpoint."""
        out = {f"velocity/{k}": np.asarray(v) for k, v in self.velocity.items()}
        if self.ema is not None:
            out.update({f"ema/{k}": v for k, v in self.ema.items()})
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], has_ema: bool) -> OptimizerState:
        velocity = {k[len("velocity/"):]: v for k, v in arrays.items() if k.startswith("velocity/")}
        ema = {k[len("ema/"):]: v for k, v in arrays.items() if k.startswith("ema/")}
        return cls(velocity=velocity, ema=ema if has_ema else None)


def step(opt: ServerOptimizer, state: OptimizerState, server_round: int,
         global_model: Mapping[str, np.ndarray], average: Mapping[str, np.ndarray]
         ) -> tuple[OptimizerState, Weights]:
    """One server step from `global_model` towards the clients' `average`; returns the
    new state and the new global model (each array in its dtype)."""
    lr = opt.lr(server_round)
    velocity, out = {}, {}
    for name, ref in global_model.items():
        delta = average[name].astype(np.float64) - ref.astype(np.float64)
        vel = opt.momentum * state.velocity.get(name, 0.0) + delta
        velocity[name] = vel
        out[name] = (ref + lr * vel).astype(ref.dtype)
    ema = state.ema
    if opt.ema > 0:
        d = opt.ema
        prev = ema or out  # starts at the first aggregate, not the random init
        ema = {k: (d * prev[k] + (1 - d) * out[k]).astype(out[k].dtype) for k in out}
    return OptimizerState(velocity=velocity, ema=ema), out


def reported(opt: ServerOptimizer, state: OptimizerState, model: Weights) -> Weights:
    """The model that is evaluated and saved: the moving average when enabled."""
    return state.ema if (opt.ema > 0 and state.ema is not None) else model
