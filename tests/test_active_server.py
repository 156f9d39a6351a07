"""Secure aggregation against an active server: the attacks of a server that tells every
client a story of its own, through the real ClientApp's secure handlers (client/secure.py)
with honest clients on an in-process grid.

The attacker here drives the five stages by hand. After each attack it re-derives, as
the server would, every individual release it can from what it received (`recoverable`):
a client's masked vector opens only with its self-mask seed b and, for each peer it
masked with, that peer's mask key s (or its own), each rebuilt from threshold-many
revealed shares. And each client's ledger is checked against the noise the sum it joined
really carried."""

import json
import math

import numpy as np
import pytest

from client.ledger import STATE_KEY, Ledger
from common import ddp, keys, privacy, roster
from common.arrays import to_array_record
from common.data import partitions_of
from common.models import build_model, get_weights
from common.secagg import (
    Advert,
    Params,
    PublicKeys,
    View,
    _agree,
    combine_shares,
    prg,
    survivors_body,
)
from server.secure_round import SecureExchange
from server.strategy import CohortFedAvg
from server.wire import stage_message, train_config
from tests.helpers import fast_config, roster_config
from tests.local_grid import LocalGrid

SECURE = {"secure-aggregation": "secagg+", "noise": "distributed", "min-train-clients": 2}
N = 6


def _setup(num_nodes=N, node_extra=None, **overrides):
    over = {**SECURE, "fraction-train": 1.0, "num-partitions": num_nodes, **overrides}
    cfg = fast_config(**over)
    grid = LocalGrid(num_nodes, node_extra=node_extra, **over)
    sizes = {i: len(p) for i, p in enumerate(partitions_of(cfg.data, num_nodes))}
    strategy = CohortFedAvg(cfg, partition_sizes=sizes)
    return cfg, grid, SecureExchange(cfg, strategy)


def _model():
    return dict(get_weights(build_model("logreg", seed=0)))


def _ask(grid, node_pid, action, config, arrays=None):
    """One stage message to partition `node_pid`: its reply (an error reply raises)."""
    (reply,) = grid.send_and_receive([stage_message(1000 + node_pid, action, config, arrays)])
    return reply


def _ok(reply):
    assert not reply.has_error(), reply.error.reason
    return reply.content[keys.CONFIG]


def _adverts(grid, pids, rnd):
    return {p: Advert.from_json(p, json.loads(str(_ok(_ask(grid, p, keys.SECAGG_KEYS, {
        keys.SERVER_ROUND: rnd}))[keys.PUBLIC_KEYS]))) for p in pids}


def _ledger(grid, pid):
    record = grid.contexts[1000 + pid].state.config_records.get(STATE_KEY)
    return Ledger.from_json(str(record["json"])) if record is not None else Ledger()


class Attacker:
    """What a server holds: the views it sent, shares, masked vectors, reveals."""

    def __init__(self, grid, secure, rnd=1):
        self.grid, self.secure, self.rnd = grid, secure, rnd
        self.shares: dict[int, dict[int, str]] = {}
        self.masked: dict[int, np.ndarray] = {}
        self.views: dict[int, View] = {}
        self.revealed: list[dict] = []
        self.signatures: dict[int, str] = {}
        self.errors: dict[int, str] = {}

    def share(self, pid, view):
        self.views[pid] = view
        reply = _ask(self.grid, pid, keys.SECAGG_SHARES,
                     {keys.SERVER_ROUND: self.rnd, keys.VIEW: view.to_json()})
        if reply.has_error():
            self.errors[pid] = reply.error.reason
            return False
        self.shares[pid] = {int(j): t for j, t in json.loads(str(reply.content[keys.CONFIG][keys.SHARES])).items()}
        return True

    def mask(self, pid, senders, model):
        config = train_config(server_round=self.rnd, planned_rounds=3, known_history=None)
        config[keys.SHARES] = json.dumps({str(i): self.shares[i][pid] for i in senders})
        reply = _ask(self.grid, pid, keys.SECAGG_MASKED, config, to_array_record(model))
        if reply.has_error():
            self.errors[pid] = reply.error.reason
            return False
        if reply.content[keys.METRICS][keys.REFUSED]:
            self.errors[pid] = str(reply.content[keys.PRIVACY][keys.REASON])
            return False
        self.masked[pid] = reply.content.array_records[keys.MASKED][keys.MASKED].numpy().astype(np.int64)
        return True

    def confirm(self, pid, survivors):
        reply = _ask(self.grid, pid, keys.SECAGG_CONFIRM,
                     {keys.SERVER_ROUND: self.rnd, keys.SURVIVORS: json.dumps(survivors)})
        if reply.has_error():
            self.errors[pid] = reply.error.reason
            return None
        sig = str(reply.content[keys.CONFIG][keys.SIGNATURE])
        self.signatures[pid] = sig
        return sig

    def unmask(self, pid, signatures):
        reply = _ask(self.grid, pid, keys.SECAGG_UNMASK,
                     {keys.SERVER_ROUND: self.rnd, keys.SIGNATURES: json.dumps(
                         {str(p): s for p, s in signatures.items()})})
        if reply.has_error():
            self.errors[pid] = reply.error.reason
            return False
        raw = json.loads(str(reply.content[keys.CONFIG][keys.REVEALED]))
        self.revealed.append({int(j): (k, bytes.fromhex(v)) for j, (k, v) in raw.items()})
        return True

    def secret(self, of, kind, threshold):
        shares = [r[of][1] for r in self.revealed if of in r and r[of][0] == kind]
        return combine_shares(shares[:threshold]) if len(shares) >= threshold else None

    def recoverable(self, target, peers, public, threshold, bits):
        """The target's individual release, if the attacker can open its masked vector
        alone (its seed b and every pairwise mask rebuilt), else None."""
        if target not in self.masked:
            return None
        b = self.secret(target, "b", threshold)
        if b is None:
            return None
        size = self.masked[target].size
        m = (1 << bits) - 1
        out = (self.masked[target] - prg(b, self.rnd, size, bits)) & m
        for j in peers:
            if j == target:
                continue
            s_j = self.secret(j, "s", threshold)
            if s_j is None:
                return None
            pair = prg(_agree(s_j, public[target].s), self.rnd, size, bits)
            out = (out - pair if target < j else out + pair) & m
        return out


def _honest_view(secure, adverts, rnd=1, **change):
    view = secure.view_for(rnd, list(adverts.values()), 7850, 3)
    if change:
        view = View(Params(**{**view.params.__dict__, **change}), view.adverts)
    return view


def _masked_round(grid, secure, model, rnd=1):
    """Keys, one honest view, shares and masked releases from all N: what an attacker
    holds before the consistency stage."""
    adverts = _adverts(grid, range(N), rnd)
    att = Attacker(grid, secure, rnd=rnd)
    view = _honest_view(secure, adverts, rnd=rnd)
    for p in range(N):
        assert att.share(p, view)
    for p in range(N):
        assert att.mask(p, range(N), model)
    return att, adverts, view


def test_inconsistent_views_leave_the_target_without_peers_and_nothing_spent():
    """Attack 1: the target is shown a cohort of three (t = 3) whose other members are shown
    the full cohort of six: their shares name another view, so the target takes none,
    masks nothing and spends nothing; the attacker recovers no release."""
    cfg, grid, secure = _setup()
    model = _model()
    adverts = _adverts(grid, range(N), 1)
    att = Attacker(grid, secure)
    small = _honest_view(secure, {p: adverts[p] for p in (0, 1, 2)})
    full = _honest_view(secure, adverts)
    assert small.params.threshold == 3 and full.params.threshold == 5
    assert att.share(0, small)
    for p in range(1, N):
        assert att.share(p, full)
    before = _ledger(grid, 0).history
    assert not att.mask(0, [0, 1, 2], model)
    assert "another view" in att.errors[0]
    assert _ledger(grid, 0).history == before == []


def test_a_split_survivor_list_gets_too_few_signatures_and_nothing_is_revealed():
    """Attacks 1-2 at the consistency stage: one view, then survivor lists split (the
    target and half the cohort told "1 dropped", the rest told "all survived"). Each
    client signs one list once; neither list gathers t = 5 signatures, so nobody reveals
    and neither the target's release nor client 1's mask key can be had."""
    cfg, grid, secure = _setup()
    att, adverts, view = _masked_round(grid, secure, _model())
    everyone, without_1 = list(range(N)), [0, 2, 3, 4, 5]
    sig_a = {p: att.confirm(p, everyone) for p in (1, 2, 3)}
    sig_b = {p: att.confirm(p, without_1) for p in (0, 4, 5)}
    assert att.confirm(0, everyone) is None and "already confirmed" in att.errors[0]
    for p in range(N):
        # every signature it can get, of either list: too few on the list the client signed
        assert not att.unmask(p, {**sig_a, **sig_b})
        assert "fewer than the threshold" in att.errors[p]
    public = {p: a.keys for p, a in adverts.items()}
    assert att.recoverable(0, range(N), public, 5, view.params.bits) is None


def test_members_off_the_roster_or_with_forged_keys_are_refused():
    """Attack 3 (Sybil cohort): members the server runs are not on the roster; a roster
    member's partition with the server's own keys fails its signature; a cohort below the
    node's minimum is refused. Nothing is shared."""
    cfg, grid, secure = _setup()
    adverts = _adverts(grid, range(N), 1)
    att = Attacker(grid, secure)
    fake_keys = PublicKeys(b"\x01" * 33, b"\x02" * 33)
    sybil = {**adverts, 77: Advert(77, fake_keys, 1000, adverts[1].signature)}
    assert not att.share(0, _honest_view(secure, sybil))
    assert "member 77 is not on this node's roster" in att.errors[0]
    forged = {**adverts, 1: Advert(1, fake_keys, 1000, adverts[1].signature)}
    assert not att.share(0, _honest_view(secure, forged))
    assert "member 1's round keys are not signed" in att.errors[0]
    tiny = {p: adverts[p] for p in (0, 1)}
    assert not att.share(0, _honest_view(secure, tiny))
    assert "min-secagg-cohort" in att.errors[0]


def test_replayed_round_keys_and_confirmations_are_refused():
    """A server that replays signed messages of another round: round-1 adverts in a
    round-2 view fail their signatures; round-1 confirmations do not count in round 2;
    an unmask request without the consistency stage is refused."""
    cfg, grid, secure = _setup()
    model = _model()
    att1, old, _ = _masked_round(grid, secure, model)
    old_sigs = {p: att1.confirm(p, list(range(N))) for p in range(N)}

    fresh = _adverts(grid, range(N), 2)
    att2 = Attacker(grid, secure, rnd=2)
    replayed = {**fresh, 3: old[3]}
    assert not att2.share(0, _honest_view(secure, replayed, rnd=2))
    assert "not signed" in att2.errors[0]
    view2 = _honest_view(secure, fresh, rnd=2)
    for p in range(N):
        assert att2.share(p, view2)
    for p in range(N):
        assert att2.mask(p, range(N), model)
    assert not att2.unmask(0, old_sigs)  # no consistency stage yet
    assert "confirmed no survivors" in att2.errors[0]
    for p in range(N):
        att2.confirm(p, list(range(N)))
    assert not att2.unmask(0, old_sigs)  # last round's signatures do not count
    assert "0 survivor(s) signed" in att2.errors[0]
    assert att2.unmask(0, att2.signatures)


@pytest.mark.parametrize("change", [{"scale": 1e-3}, {"noise_multiplier": 0.01},
                                    {"threshold": 6}])
def test_per_client_parameters_split_the_cohort_into_views_that_never_mix(change):
    """Attacks 4-5: the server gives the target another scale, noise level or threshold
    than the rest. The parameters are in the view's digest: the target's peers' shares
    name the other view, so it masks nothing and spends nothing."""
    cfg, grid, secure = _setup()
    model = _model()
    adverts = _adverts(grid, range(N), 1)
    att = Attacker(grid, secure)
    assert att.share(0, _honest_view(secure, adverts, **change))
    for p in range(1, N):
        assert att.share(p, _honest_view(secure, adverts))
    assert not att.mask(0, range(N), model)
    assert "another view" in att.errors[0]
    assert _ledger(grid, 0).history == []


def test_a_low_agreed_noise_or_lying_planned_rounds_never_leave_a_ledger_short():
    """Attack 5: every member gets the same view, with an agreed noise level far below what
    their ledgers need, and the target is told 12 planned rounds while the others are
    told 1. Each member adds what its own ledger needs beyond what the other t - 1
    signed survivors add at the agreed level: the sum's true variance (the shares the
    ledgers hold) is at least every member's recorded mu, so each true epsilon is at
    most its ledger's."""
    cfg, grid, secure = _setup()
    model = _model()
    adverts = _adverts(grid, range(N), 1)
    att = Attacker(grid, secure)
    view = _honest_view(secure, adverts, noise_multiplier=0.05)
    t = view.params.threshold
    for p in range(N):
        assert att.share(p, view)
    for p in range(N):
        config = train_config(server_round=1, planned_rounds=12 if p == 0 else 1,
                              known_history=None)
        config[keys.SHARES] = json.dumps({str(i): att.shares[i][p] for i in range(N)})
        reply = _ask(grid, p, keys.SECAGG_MASKED, config, to_array_record(model))
        assert not reply.has_error(), reply.error.reason
        assert not reply.content[keys.METRICS][keys.REFUSED], reply.content[keys.PRIVACY][keys.REASON]
    entries = {p: _ledger(grid, p).history[-1] for p in range(N)}
    for p, (_, mu, l1, l2, share, beta, _) in entries.items():
        # the least noise a sum holding p's release carries: its own share and the t - 1
        # smallest of the others' (the shares the ledgers hold)
        least = share + sum(sorted(e[4] for q, e in entries.items() if q != p)[:t - 1])
        assert mu <= least * (1 + 1e-9)
        true_eps = privacy.epsilon([(privacy.SKELLAM, least, l1, l2, share, beta, 1)], 1e-5)
        assert true_eps <= _ledger(grid, p).epsilon(1e-5, "rdp") + 1e-9
    # the target, told 20 rounds, needed far more noise and added it itself
    assert entries[0][4] > 5 * entries[1][4]


@pytest.mark.parametrize("change", [{"scale": 2.0**50}, {"bits": 7}, {"bits": 63},
                                    {"clip": 1.0}])
def test_numbers_that_would_not_stay_noise_are_refused(change):
    """Attack 6: a scale at which the honest noise alone would wrap around the field (and
    could not be drawn exactly), a field or clip other than the run's: refused before
    anything is shared. (A coordinate of the signal beyond the field wraps by design:
    modular clipping costs accuracy, not privacy.)"""
    cfg, grid, secure = _setup()
    adverts = _adverts(grid, range(N), 1)
    att = Attacker(grid, secure)
    assert not att.share(0, _honest_view(secure, adverts, **change))
    assert any(w in att.errors[0] for w in ("would wrap", "differ from the run", "outside [8, 62]"))


def test_a_noise_share_beyond_the_exact_sampler_is_refused_before_anything_is_spent():
    """A node whose floor asks for a share past what is drawn exactly refuses, spends
    nothing (the server's honest scale keeps agreed shares far below the limit)."""
    cfg, grid, secure = _setup(node_extra={"min-share-noise-multiplier": 1e6})
    model = _model()
    adverts = _adverts(grid, range(N), 1)
    att = Attacker(grid, secure)
    view = _honest_view(secure, adverts)
    for p in range(N):
        assert att.share(p, view)
    reply = _ask(grid, 0, keys.SECAGG_MASKED, {**dict(train_config(
        server_round=1, planned_rounds=3, known_history=None)), keys.SHARES: json.dumps(
            {str(i): att.shares[i][0] for i in range(N)})}, to_array_record(model))
    assert reply.content[keys.METRICS][keys.REFUSED] == 1
    assert "drawn exactly" in str(reply.content[keys.PRIVACY][keys.REASON])
    assert _ledger(grid, 0).history == []


def test_a_release_alone_is_bounded_by_the_nodes_max_epsilon_alone():
    """Attack 3's residue (colluding roster members): what a release keeps with only its
    own share is a node budget, enforced like max-epsilon and composed over releases."""
    cfg, grid, secure = _setup(node_extra={"max-epsilon-alone": 4.0})
    model = _model()
    for rnd in (1, 2, 3):
        adverts = _adverts(grid, range(N), rnd)
        att = Attacker(grid, secure, rnd=rnd)
        view = _honest_view(secure, adverts, rnd=rnd)
        for p in range(N):
            assert att.share(p, view)
        ok = [att.mask(p, range(N), model) for p in range(N)]
        if not all(ok):
            break
    led = _ledger(grid, 0)
    assert privacy.epsilon_alone(led.history, 1e-5) <= 4.0
    refused = [r for r in grid.received if r.has_content() and keys.PRIVACY in r.content
               and "max-epsilon-alone" in str(r.content[keys.PRIVACY][keys.REASON])]
    assert refused, "the bound was reached within three releases"


def test_an_honest_round_reveals_exactly_the_sum_and_no_individual_release():
    """The honest path through the same attacker tooling: all six confirm one list, five
    of them reveal, the sum opens, and still no individual release can be had."""
    cfg, grid, secure = _setup()
    att, adverts, view = _masked_round(grid, secure, _model())
    for p in range(N):
        att.confirm(p, list(range(N)))
    for p in range(N):
        assert att.unmask(p, att.signatures)
    public = {p: a.keys for p, a in adverts.items()}
    for p in range(N):
        assert att.recoverable(p, range(N), public, 5, view.params.bits) is None


def test_the_exact_sampler_keeps_variance_and_low_bits_at_large_means():
    """Poisson means beyond one piece are drawn as sums of pieces: the variance is the
    mean, and the low bits are uniform (numpy's single draw at 2^55 lands on a lattice)."""
    rng = np.random.default_rng(5)
    lam = 2.0**34  # four pieces
    x = ddp.poisson(lam, 200_000, rng)
    assert float(x.mean()) == pytest.approx(lam, rel=1e-6)
    assert float(x.var()) == pytest.approx(lam, rel=0.02)
    for bits in (1, 2, 3):
        counts = np.bincount((x & ((1 << bits) - 1)).astype(np.int64), minlength=1 << bits)
        assert counts.min() > 0.9 * len(x) / (1 << bits)
    lattice = np.random.default_rng(5).poisson(2.0**55, 10_000)
    assert np.all(lattice % 4 == 0)  # why one draw is never asked for such a mean
    assert ddp.skellam_problem(2.0**44) is not None and ddp.skellam_problem(2.0**42) is None
    s = ddp.skellam(2.0**36, 100_000, rng)
    assert float(s.var()) == pytest.approx(2.0**36, rel=0.02)


def test_the_roster_rejects_a_file_not_signed_by_the_named_issuer(tmp_path):
    issuer = roster.new_identity(tmp_path / "issuer.key")
    other = roster.new_identity(tmp_path / "other.key")
    member = roster.new_identity(tmp_path / "m0.key")
    members = {0: roster.openssh(member.public_key())}
    roster.write_roster(tmp_path / "signed.json", members, issuer=issuer)
    roster.write_roster(tmp_path / "forged.json", members, issuer=other)
    pub = roster.openssh(issuer.public_key())
    assert roster.Roster.load(tmp_path / "signed.json", pub).key_of(0) is not None
    from common.errors import ConfigError
    with pytest.raises(ConfigError, match="not signed by the key in node config roster-issuer"):
        roster.Roster.load(tmp_path / "forged.json", pub)
    with pytest.raises(ConfigError, match="not a roster"):
        (tmp_path / "bad.json").write_text("[]")
        roster.Roster.load(tmp_path / "bad.json")


def test_a_node_without_a_roster_or_identity_takes_no_part(tmp_path):
    """Secure aggregation needs the node's roster and identity key: without them the keys
    stage fails with a reason naming the node config key."""
    extra = {**roster_config(N), "roster": ""}
    cfg, grid, secure = _setup(node_extra=extra)
    reply = _ask(grid, 0, keys.SECAGG_KEYS, {keys.SERVER_ROUND: 1})
    assert reply.has_error() and "node config roster" in reply.error.reason
    other = roster.new_identity(tmp_path / "x.key")
    del other
    cfg, grid, secure = _setup(node_extra={"identity-key": str(tmp_path / "x.key"),
                                           "identity-dir": ""})
    reply = _ask(grid, 0, keys.SECAGG_KEYS, {keys.SERVER_ROUND: 1})
    assert reply.has_error() and "does not list this node's identity key" in reply.error.reason


def test_a_signature_of_one_kind_never_passes_for_another(tmp_path):
    key = roster.new_identity(tmp_path / "k.key")
    body = survivors_body("ab" * 32, 1, [0, 1, 2])
    sig = roster.sign(key, "survivors", body)
    assert roster.verify(key.public_key(), "survivors", body, sig)
    assert not roster.verify(key.public_key(), "round-keys", body, sig)
    assert not roster.verify(key.public_key(), "survivors", {**body, "round": 2}, sig)
    assert math.isfinite(len(sig))
