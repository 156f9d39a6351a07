"""The secure exchange of a round (server/round.py plays it): secure aggregation (SecAgg+)
with an integer release, as five message exchanges with the cohort (client/secure.py
answers them):

1. keys    -> each client's signed advert: public keys, record count (U1: who answered)
2. shares  -> the view out (U1's signed adverts, the round's parameters); encrypted
              shares bound to the view back                           (U2)
3. masked  -> the model and each client's shares out; masked integer releases back (U3)
4. confirm -> survivors U3 out; each survivor's signature of (view, U3) back
5. unmask  -> the signatures out; revealed shares back (from clients holding t of them)
then `secagg.unmask` rebuilds the masks and yields the sum of U3's releases. What the
server holds in a round: signed public keys, shares encrypted for others, masked vectors
(each uniform modulo 2^bits), signatures and the sum. Never one client's unmasked
release, whatever it sends: an honest server sends every member the same view.

The sum decodes to the cohort's summed clipped per-record gradients plus the Skellam
noise of the survivors; divided by the survivors' record counts (declared at discovery,
public) and multiplied by the client learning rate, it is exactly the FedAvg of one
full-batch DP-SGD step per client, and the server optimizer takes it from there.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from common import ddp, keys, privacy
from common.arrays import to_array_record
from common.config import ExperimentConfig
from common.data import input_spec
from common.errors import ConfigError
from common.models import MODEL_FEATURES, parameter_names
from common.secagg import Advert, Params, ProtocolError, PublicKeys, View, unmask
from server import wire
from server.audit import CanaryScorer
from server.cohorts import Cohort
from server.replies import Rejected, decode, short_error
from server.strategy import CohortFedAvg, RoundOutcome
from server.wire import payload_bytes, stage_message, train_config

log = logging.getLogger("dpfl.server")


@dataclass
class Held:
    """Everything the server received in one round (kept for tests and audits)."""

    public_keys: dict[int, PublicKeys] = field(default_factory=dict)
    shares: dict[int, dict[int, str]] = field(default_factory=dict)  # from -> to -> token
    masked: dict[int, np.ndarray] = field(default_factory=dict)
    revealed: list[dict[int, tuple[str, bytes]]] = field(default_factory=list)
    total: np.ndarray | None = None  # the unmasked integer sum (rotated, padded)
    gradient_sum: np.ndarray | None = None  # its decoding: total / scale, rotated back
    scale: float = 0.0
    records: dict[int, int] = field(default_factory=dict)  # declared record counts
    view: View | None = None  # the view the server sent (every member the same)
    signatures: dict[int, str] = field(default_factory=dict)  # survivors' confirmations

    def arrays(self) -> dict[str, np.ndarray]:
        """As named arrays (keep-transcript): masked-<partition>, total, and the keys and
        shares as JSON bytes."""
        out = {f"masked-{p}": v for p, v in self.masked.items()}
        if self.total is not None:
            out["total"] = self.total
        meta = {"scale": self.scale, "records": {str(p): n for p, n in self.records.items()},
                "public_keys": {str(p): [k.c.hex(), k.s.hex()] for p, k in self.public_keys.items()},
                "shares": {str(i): v for i, v in self.shares.items()},
                "revealed": [{str(j): [k, b.hex()] for j, (k, b) in r.items()} for r in self.revealed],
                "view": self.view.to_json() if self.view is not None else None,
                "signatures": {str(p): v for p, v in self.signatures.items()}}
        out["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        return out


def first_signal(cfg: ExperimentConfig, records: int, padded: int) -> float:
    """The per-coordinate RMS assumed for a cohort's rotated sum before any sum was seen:
    every one of `records` clipped gradients aligned (norm clip * records), spread evenly
    over `padded` coordinates by the rotation."""
    return cfg.privacy.max_grad_norm * max(records, 1) / math.sqrt(padded)


@dataclass
class _Started:
    """A secure round once its masked stage went out (the clients train while the server
    records the previous round), or `failed` before it (the outcome says why)."""

    cohort: Cohort
    model: dict[str, np.ndarray]
    planned: int
    failed: bool = False
    masked_sent: wire.Sent | None = None
    view: View | None = None
    sizes: dict[int, int] = field(default_factory=dict)  # U2's declared record counts


class SecureExchange:
    """The secure exchange of a round (server/round.py): the cohort's average from the
    unmasked sum of its integer releases. `held` is what the last round's server received."""

    def __init__(self, cfg: ExperimentConfig, strategy: CohortFedAvg,
                 scorer: CanaryScorer | None = None) -> None:
        self.cfg, self.strategy, self.scorer = cfg, strategy, scorer
        self.names = parameter_names(
            cfg.train.model, *input_spec(cfg.data, MODEL_FEATURES.get(cfg.train.model, "")))
        self.held = Held()
        self.last_average: dict[str, np.ndarray] = {}  # FedAvg of the last round's steps
        self._agreed: float | None = None
        self._bits: int | None = None  # the field (secagg-bits, or auto's choice), fixed a run
        # the last decoded sum's per-coordinate signal RMS (rotated, gradient units) and
        # its records: the next scale's estimate of the signal
        self._signal: tuple[float, int] | None = None

    def transcript(self) -> dict[str, np.ndarray]:
        return self.held.arrays()

    def _send(self, grid: Grid, messages: list[Message], out: RoundOutcome) -> wire.Sent:
        if not messages:
            return wire.Sent(grid, 0.0, [], [])
        out.bytes_down += sum(payload_bytes(m.content) for m in messages)
        return wire.send(grid, messages)

    def _replies(self, sent: wire.Sent, out: RoundOutcome, stage: str) -> dict[int, Message]:
        """Wait (round-timeout) and return the good replies by node; every error or
        missing reply is a reason. The stage's seconds (from sending) go to the outcome."""
        if not sent.messages:
            return {}
        try:
            replies = wire.receive(sent, timeout=self.cfg.federation.round_timeout)
        finally:
            out.seconds_by_stage[stage] = time.monotonic() - sent.started
        got: dict[int, Message] = {}
        for r in replies:
            node = r.metadata.src_node_id
            if r.has_error():
                out.reasons.append(f"{stage}: node {node} failed: {short_error(r.error.reason or '')}")
                continue
            out.bytes_up += payload_bytes(r.content)
            got[node] = r
        missing = len(sent.messages) - len(replies)
        if missing:
            out.reasons.append(f"{stage}: {missing} node(s) did not reply within round-timeout="
                               f"{self.cfg.federation.round_timeout:g}s")
        return got

    def _ask(self, grid: Grid, messages: list[Message], out: RoundOutcome, stage: str
             ) -> dict[int, Message]:
        return self._replies(self._send(grid, messages, out), out, stage)

    def send(self, grid: Grid, server_round: int, cohort: Cohort,
             model: dict[str, np.ndarray], planned: int) -> _Started:
        """Stages 1-2 (keys, then the view and shares: short exchanges), then the masked
        stage out: the clients train while the server records the previous round."""
        self.held = Held()
        s, held = self.strategy, self.held
        out = s.outcomes[server_round]
        pid_of = dict(cohort.members)
        node_of = {p: n for n, p in cohort.members}
        rnd = {keys.SERVER_ROUND: server_round}
        failed = _Started(cohort, model, planned, failed=True)

        adverts: dict[int, Advert] = {}
        got = self._ask(grid, [stage_message(n, keys.SECAGG_KEYS, rnd)
                               for n, _ in cohort.members], out, "keys")
        for node, r in got.items():
            try:
                adverts[pid_of[node]] = Advert.from_json(
                    pid_of[node], json.loads(str(r.content[keys.CONFIG][keys.PUBLIC_KEYS])))
            except (KeyError, ValueError, TypeError) as exc:
                out.reasons.append(f"keys: node {node}: unreadable reply ({exc})")
        u1 = sorted(adverts)
        if len(u1) < self.cfg.federation.min_train_clients:
            self._fail(out, f"only {len(u1)} client(s) sent keys")
            return failed
        held.public_keys = {p: adverts[p].keys for p in u1}
        dim = sum(model[n].size for n in self.names)
        held.view = view = self.view_for(server_round, [adverts[p] for p in u1], dim, planned)
        text = view.to_json()
        got = self._ask(grid, [stage_message(node_of[p], keys.SECAGG_SHARES,
                                             {**rnd, keys.VIEW: text}) for p in u1], out, "shares")
        for node, r in got.items():
            try:
                boxes = {int(j): str(t) for j, t in
                         json.loads(str(r.content[keys.CONFIG][keys.SHARES])).items()}
                if set(boxes) != set(u1):
                    raise ValueError("not one share per client of the cohort")
                held.shares[pid_of[node]] = boxes
            except (KeyError, ValueError, TypeError, AttributeError) as exc:
                out.reasons.append(f"shares: node {node}: unreadable reply ({exc})")
        u2 = sorted(held.shares)
        if len(u2) < view.params.threshold:
            self._fail(out, f"{len(u2)} client(s) sent shares, fewer than "
                       f"the threshold {view.params.threshold}")
            return failed

        sizes = {p: adverts[p].records for p in u2}
        held.scale, held.records = view.params.scale, sizes
        arrays = to_array_record(model)
        msgs = []
        for p in u2:
            config = train_config(server_round=server_round, planned_rounds=planned,
                                  known_history=s.privacy.history(p))
            config[keys.SHARES] = json.dumps({str(i): held.shares[i][p] for i in u2})
            msgs.append(stage_message(node_of[p], keys.SECAGG_MASKED, config, arrays))
        return _Started(cohort, model, planned, masked_sent=self._send(grid, msgs, out),
                        view=view, sizes=sizes)

    def _calibrate(self, encoding: ddp.Encoding, planned: int) -> float:
        """The noise multiplier the cohort is asked to agree on: noise-multiplier, or a
        fresh client's calibration for `planned` releases at `encoding` (fixed for the
        run at its first secure round, as each client fixes its own)."""
        priv = self.cfg.privacy
        return privacy.skellam_noise_multiplier(
            fixed=priv.noise_multiplier, target_epsilon=priv.target_epsilon,
            target_delta=priv.target_delta, l1=encoding.rounded_l1_bound,
            l2=encoding.rounded_l2_bound, steps=planned, beta=encoding.tail)

    def view_for(self, server_round: int, adverts: list[Advert], dim: int, planned: int
                 ) -> View:
        """The round as this server tells every member: their signed adverts and one set
        of parameters (the run's threshold and clip; the field, secagg-bits or with 0 the
        fewest bits at which rounding adds at most 2% to the noise; the agreed noise; the scale
        at which secagg-sigmas standard deviations of a coordinate of the rotated sum
        fill half the field, from the noise and the last sum's spread, capped where its
        units would be finer than the noise). Raises ConfigError when the field is too
        narrow for the noise."""
        sec, clip = self.cfg.secure, self.cfg.privacy.max_grad_norm
        threshold = sec.threshold(len(adverts))
        records, padded = sum(a.records for a in adverts), ddp.padded_dim(dim)
        if self._signal is None:
            signal = first_signal(self.cfg, records, padded)
        else:
            rms, seen = self._signal
            signal = rms * records / max(seen, 1)
        shares = threshold if sec.noise == "distributed" else 1
        room: dict[str, Any] = dict(clip=clip, dim=padded, members=len(adverts),
                                     threshold=shares, sigmas=sec.secagg_sigmas)
        scale, z, bits = 1.0, self._agreed, self._bits
        for _ in range(1 if z is not None else 3):  # z and bits are fixed at the first round
            if self._agreed is None:
                enc = ddp.Encoding(clip=clip, scale=scale, dim=padded, beta=ddp.ROUNDING_BETA)
                z = self._calibrate(enc, planned)
                bits = sec.secagg_bits or ddp.auto_bits(noise_multiplier=z, **room)
            assert z is not None and bits is not None
            try:
                scale = ddp.noise_scale(bits=bits, noise_multiplier=z, signal=signal, **room)
            except ValueError as exc:
                raise ConfigError(f"secagg-bits={bits}: {exc}") from exc
            scale = min(scale, ddp.scale_cap(noise_multiplier=z, clip=clip, dim=padded,
                                             shares=shares))
        assert z is not None and bits is not None
        if self._agreed is None:
            excess = ddp.rounding_excess(bits=bits, noise_multiplier=z, **room)
            if excess > 0.05:  # only where the user chose the bits: auto keeps it within 2%
                log.warning("secagg-bits=%d: rounding adds %.0f%% to the noise at this noise "
                            "level; secagg-bits=%d (or 0: auto) would keep it within %.0f%%",
                            bits, 100 * excess, ddp.auto_bits(noise_multiplier=z, **room),
                            100 * ddp.AUTO_EXCESS)
        self._agreed, self._bits = z, bits
        params = Params(server_round=server_round, threshold=threshold, bits=bits,
                        scale=scale, clip=clip, dim=dim, noise_multiplier=z)
        return View(params, tuple(sorted(adverts, key=lambda a: a.partition)))

    def collect(self, server_round: int, started: _Started) -> dict[str, np.ndarray] | None:
        """Stages 3-5 in: the cohort's average, or None (the model is kept) when the round
        cannot complete: fewer than the threshold survive or confirm, or the sum cannot be
        unmasked."""
        if started.failed or started.masked_sent is None or started.view is None:
            return None
        s, held, model = self.strategy, self.held, started.model
        view, sizes, sent = started.view, started.sizes, started.masked_sent
        grid = sent.grid
        out = s.outcomes[server_round]
        pid_of = dict(started.cohort.members)
        node_of = {p: n for n, p in started.cohort.members}
        rnd = {keys.SERVER_ROUND: server_round}
        params, threshold, scale = view.params, view.params.threshold, view.params.scale
        padded = ddp.padded_dim(params.dim)
        u2 = sorted(sizes)
        got = self._replies(sent, out, "masked")
        heard = set()
        for node, r in got.items():
            decoded = decode(r, reference=None, nodes=s.cohorts.nodes,
                             partition_sizes=s.partition_sizes)
            reported = decoded.reported
            if reported is not None:
                s.privacy.record(reported)
                heard.add(reported.partition_id)
            rejected = decoded.verdict if isinstance(decoded.verdict, Rejected) else None
            problem = rejected.reason if rejected else _masked_problem(r, padded, params.bits)
            if rejected is not None and rejected.kind == "refused":
                out.refused += 1
                out.reasons.append(rejected.reason)
                continue
            if problem:
                out.invalid += 1
                out.reasons.append(f"masked: {problem}" if rejected else
                                   f"masked: node {node}: {problem}")
                continue
            held.masked[pid_of[node]] = ddp.unpack(
                r.content.array_records[keys.MASKED][keys.MASKED].numpy(), params.bits, padded)
        s.privacy.unconfirmed(set(u2) - heard, server_round)
        u3 = sorted(held.masked)
        out.trained = len(u3)
        out.partitions_trained = u3
        if len(u3) < threshold:
            return self._fail(out, f"{len(u3)} masked release(s), fewer than the "
                              f"threshold {threshold}: nothing can be unmasked")

        survivors = {**rnd, keys.SURVIVORS: json.dumps(u3)}
        got = self._ask(grid, [stage_message(node_of[p], keys.SECAGG_CONFIRM, survivors)
                               for p in u3], out, "confirm")
        for node, r in got.items():
            try:
                held.signatures[pid_of[node]] = str(r.content[keys.CONFIG][keys.SIGNATURE])
            except (KeyError, TypeError) as exc:
                out.reasons.append(f"confirm: node {node}: unreadable reply ({exc})")
        if len(held.signatures) < threshold:
            return self._fail(out, f"{len(held.signatures)} survivor(s) confirmed, fewer than "
                              f"the threshold {threshold}: nothing can be unmasked")
        signed = {**rnd, keys.SIGNATURES: json.dumps(
            {str(p): v for p, v in sorted(held.signatures.items())})}
        got = self._ask(grid, [stage_message(node_of[p], keys.SECAGG_UNMASK, signed)
                               for p in u3], out, "unmask")
        for node, r in got.items():
            try:
                raw = json.loads(str(r.content[keys.CONFIG][keys.REVEALED]))
                held.revealed.append({int(j): (str(k), bytes.fromhex(v)) for j, (k, v) in raw.items()})
            except (KeyError, ValueError, TypeError) as exc:
                out.reasons.append(f"unmask: node {node}: unreadable reply ({exc})")
        t_unmask = time.monotonic()
        try:
            total = unmask(held.masked, held.revealed,
                           {p: held.public_keys[p] for p in u2}, server_round=server_round,
                           bits=params.bits, threshold=threshold)
        except (ProtocolError, ValueError) as exc:
            return self._fail(out, f"the sum could not be unmasked: {exc}")
        held.total = total
        rotated = total.astype(np.float64) / scale
        held.gradient_sum = gradient_sum = view.rotation().inverse(rotated)
        out.seconds_by_stage["server-unmask"] = time.monotonic() - t_unmask
        records = sum(sizes[p] for p in u3)
        shares = threshold if self.cfg.secure.noise == "distributed" else 1
        self._signal = (ddp.signal_rms(rotated, noise_variance=(
            params.noise_multiplier * params.encoding.rounded_l2_bound / scale) ** 2
            * len(u3) / shares), records)
        if self.scorer is not None:  # an audit run: the auditor sees what the server sees
            self.scorer.observe_sum(model, gradient_sum, u3)
        out.failed = out.sampled - out.trained - out.refused - out.invalid
        out.aggregated, out.noise_shares = True, len(u3)
        out.partitions_aggregated = u3
        return self._average(model, gradient_sum, records)

    def _average(self, model: dict[str, np.ndarray], gradient_sum: np.ndarray, records: int
                 ) -> dict[str, np.ndarray]:
        """FedAvg of one full-batch step per survivor: sent - lr * sum / records."""
        grad = gradient_sum / max(records, 1)
        average, at = {}, 0
        for name in self.names:
            w = model[name]
            g = grad[at:at + w.size].reshape(w.shape)
            at += w.size
            average[name] = (w.astype(np.float64) - self.cfg.train.learning_rate * g).astype(w.dtype)
        self.last_average = average
        return average

    def _fail(self, out: RoundOutcome, reason: str) -> dict[str, np.ndarray] | None:
        out.failed = max(out.sampled - out.trained - out.refused - out.invalid, 0)
        out.reasons.append(f"{reason}: the global model is kept")
        return None  # the global model is kept


def _masked_problem(msg: Message, padded: int, bits: int) -> str | None:
    """Why a masked reply is unusable (its metrics are judged by `classify`), or None."""
    metrics = dict(msg.content[keys.METRICS]) if keys.METRICS in msg.content.metric_records else {}
    if metrics.get(keys.REFUSED):
        return None
    rec = msg.content.array_records.get(keys.MASKED)
    if rec is None or keys.MASKED not in rec:
        return "reply carries no masked vector"
    arr = rec[keys.MASKED].numpy()
    size = -(-padded * bits // 8)
    if arr.ndim != 1 or arr.size != size or arr.dtype != np.uint8:
        return (f"masked vector must be {padded} values of {bits} bits packed in {size} bytes, "
                f"got {arr.dtype} {arr.shape}")
    return None
