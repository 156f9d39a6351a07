"""The auditor of a privacy audit run (audit-canaries > 0): scores canaries on what the
server sees, and at the end turns the scores into an empirical epsilon lower bound.

The auditor is the adversary of dpfl's threat model, the server, with white-box access:
it knows the model it sent each round and every canary's design (common/audit.py), not
which canaries are in training. Each round it computes every relevant canary's
per-sample gradient direction u at the model it sent, and projects what it received on
it, in units of the clipped canary's contribution:

- per-client updates (local noise): the update of the client that holds the canary's
  slot, w_sent - w_client, times its expected batch size over the learning rate, minus
  the same projection of the other clients' updates of that round (their data pull the
  same way; the canary is only in one client);
- the cohort's sum (secure aggregation): the unmasked sum (in gradient units) in rounds
  where the slot's client is among the survivors, minus its mean in rounds where it is not.

Black-box, the final model's loss on each canary (lower loss: more likely a member).
Membership is read only at the end, to count correct guesses. Both bounds go in
audit.json; `epsilon_lower_bound` (summary.json, reports) is the white-box one.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Message
from torch import nn

from common import audit, keys
from common.config import ExperimentConfig
from common.models import build_model, parameter_names, set_weights
from common.records import PrivacyRecord, RunDir
from server.replies import Accepted

log = logging.getLogger("dpfl.server")


class CanaryScorer:
    """Accumulates white-box canary scores round by round (state in canary-scores.npz)."""

    def __init__(self, cfg: ExperimentConfig, input_shape: tuple[int, ...], classes: int) -> None:
        self.cfg = cfg
        self.canaries = audit.Canaries(cfg.audit.audit_canaries, cfg.federation.num_partitions,
                                       tuple(input_shape), cfg.data.seed, classes)
        self.x = torch.from_numpy(self.canaries.inputs())
        self.y = torch.from_numpy(self.canaries.labels())
        self.names = parameter_names(cfg.train.model, input_shape, classes)
        self.model = build_model(cfg.train.model, shape=input_shape, classes=classes)
        m = self.canaries.count
        self.scores = np.zeros(m)  # per-client mode: sum over participations of own - others
        self.sum_in, self.n_in = np.zeros(m), np.zeros(m)  # cohort-sum mode
        self.sum_out, self.n_out = np.zeros(m), np.zeros(m)
        self.secure = cfg.secure.enabled
        self.seconds = 0.0

    # ---- what the server saw ----------------------------------------------------------

    def directions(self, weights: Mapping[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
        """Unit per-sample gradient directions of canaries `ids` at `weights` (rows),
        computed for all of them at once (torch.func: vmap of the per-record gradient)."""
        from torch.func import functional_call, grad, vmap

        dim = sum(np.asarray(weights[n]).size for n in self.names)
        if not len(ids):
            return np.zeros((0, dim))
        params = {n: torch.from_numpy(np.asarray(weights[n], dtype=np.float32)) for n in self.names}

        def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out = functional_call(self.model, p, (x[None],))
            return nn.functional.cross_entropy(out, y[None])

        rows = []
        for start in range(0, len(ids), 256):
            chunk = torch.from_numpy(np.asarray(ids[start:start + 256], dtype=np.int64))
            g = vmap(grad(loss), in_dims=(None, 0, 0))(params, self.x[chunk], self.y[chunk])
            flat = torch.cat([g[n].reshape(len(chunk), -1) for n in self.names], dim=1).double()
            rows.append(flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-300))
        return torch.cat(rows).numpy()

    def flat(self, weights: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([np.asarray(weights[n], dtype=np.float64).ravel() for n in self.names])

    def observe_replies(self, sent: Mapping[str, np.ndarray], replies: Iterable[Message],
                        verdict: Any) -> None:
        """Per-client updates: `verdict(msg)` is the verdict aggregation took of a reply."""
        t0 = time.time()
        lr = self.cfg.client_train.learning_rate
        base = self.flat(sent)
        pulls: dict[int, np.ndarray] = {}
        for msg in replies:
            v = verdict(msg)
            if not isinstance(v, Accepted):
                continue
            metrics = msg.content.metric_records[keys.METRICS]
            batch = keys.number(metrics[keys.SAMPLE_RATE], keys.SAMPLE_RATE) * v.num_examples
            pulls[v.partition_id] = (base - self.flat(v.update)) * max(batch, 1.0) / lr
        if len(pulls) >= 1:
            parts = sorted(pulls)
            ids = np.concatenate([self.canaries.of_partition(p) for p in parts])
            if len(ids):
                proj = self.directions(sent, ids) @ np.stack([pulls[p] for p in parts]).T
                owner = np.searchsorted(parts, self.canaries.partition()[ids])
                own = proj[np.arange(len(ids)), owner]
                others = (proj.sum(axis=1) - own) / max(len(parts) - 1, 1)
                clip = self.cfg.privacy.max_grad_norm if self.cfg.privacy.private else 1.0
                self.scores[ids] += (own - (others if len(parts) > 1 else 0.0)) / clip
        self.seconds += time.time() - t0

    def observe_sum(self, sent: Mapping[str, np.ndarray], total: np.ndarray,
                    survivors: Iterable[int]) -> None:
        """Secure aggregation: the unmasked sum (gradient units) of `survivors`' releases."""
        t0 = time.time()
        ids = np.arange(self.canaries.count)
        proj = self.directions(sent, ids) @ np.asarray(total, dtype=np.float64)
        inside = np.isin(self.canaries.partition(), list(survivors))
        self.sum_in[inside] += proj[inside]
        self.n_in[inside] += 1
        self.sum_out[~inside] += proj[~inside]
        self.n_out[~inside] += 1
        self.seconds += time.time() - t0

    def white_box(self) -> np.ndarray:
        if not self.secure:
            return self.scores.copy()
        mean_in = np.divide(self.sum_in, self.n_in, out=np.zeros_like(self.sum_in), where=self.n_in > 0)
        mean_out = np.divide(self.sum_out, self.n_out, out=np.zeros_like(self.sum_out),
                             where=self.n_out > 0)
        return (mean_in - mean_out) / self.cfg.privacy.max_grad_norm

    # ---- state ------------------------------------------------------------------------

    def arrays(self) -> dict[str, np.ndarray]:
        return {"scores": self.scores, "sum_in": self.sum_in, "n_in": self.n_in,
                "sum_out": self.sum_out, "n_out": self.n_out,
                "seconds": np.array([self.seconds])}

    def load(self, arrays: Mapping[str, np.ndarray]) -> None:
        for name in ("scores", "sum_in", "n_in", "sum_out", "n_out"):
            if name in arrays and arrays[name].shape == (self.canaries.count,):
                setattr(self, name, np.array(arrays[name], dtype=np.float64))
        if "seconds" in arrays:
            self.seconds = float(arrays["seconds"][0])

    # ---- the verdict ------------------------------------------------------------------

    @torch.no_grad()
    def black_box(self, final: Mapping[str, np.ndarray]) -> np.ndarray:
        set_weights(self.model, dict(final))
        losses = nn.functional.cross_entropy(self.model(self.x), self.y, reduction="none")
        return -np.nan_to_num(losses.double().numpy(), nan=1e300, posinf=1e300)

    def verdict(self, final: Mapping[str, np.ndarray], privacy: PrivacyRecord) -> dict[str, Any]:
        """audit.json: the bound from the white-box scores (the headline) and the
        black-box one, beside the epsilon the ledgers state."""
        member = self.canaries.membership()
        delta = privacy.delta
        eps_max, _ = privacy.epsilon_stats()
        white = audit.summarize(np.nan_to_num(self.white_box()), member, delta)
        black = audit.summarize(self.black_box(final), member, delta)
        return {
            "epsilon": eps_max, "delta": delta, "target_epsilon": privacy.target_epsilon,
            "epsilon_lower_bound": white["epsilon_lower_bound"],
            "confidence": 1 - audit.SIGNIFICANCE, "canaries": self.canaries.count,
            "members": int(member.sum()), "guesses": white["guesses"],
            "correct": white["correct"], "auc": white["auc"],
            "tpr_at_1pct_fpr": white["tpr_at_1pct_fpr"],
            "adversary": ("server, white-box: the cohort's unmasked sum each round"
                          if self.secure else "server, white-box: each client's update each round"),
            "white_box": white, "black_box": {**black, "score": "minus the final model's loss"},
            "scoring_seconds": self.seconds,
        }


def finish(scorer: CanaryScorer, run: RunDir, final: Mapping[str, np.ndarray],
           privacy: PrivacyRecord) -> float:
    """Write audit.json; the white-box epsilon lower bound."""
    result = scorer.verdict(final, privacy)
    run.write_audit(result)
    log.info("audit: epsilon lower bound %.3f (white-box, %d%% confidence; black-box %.3f) "
             "against epsilon %.3f; %d of %d guesses correct, AUC %.3f",
             result["epsilon_lower_bound"], round(100 * result["confidence"]),
             result["black_box"]["epsilon_lower_bound"], result["epsilon"], result["correct"],
             result["guesses"], result["auc"])
    return float(result["epsilon_lower_bound"]) if math.isfinite(result["epsilon_lower_bound"]) \
        else math.inf
