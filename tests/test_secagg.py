"""SecAgg+ math (common/secagg.py) in one process, with its real crypto: the server
gets the survivors' sum and nothing else, dropouts are recovered from shares, and every
request that would unmask one client is refused."""

import numpy as np
import pytest

from common import ddp
from common.secagg import Advert, Params, Participant, ProtocolError, View, prg, unmask

BITS = 20


def _view(public, threshold, server_round=1, noise=1.0):
    params = Params(server_round=server_round, threshold=threshold, bits=BITS, scale=1.0,
                    clip=1.0, dim=5, noise_multiplier=noise)
    return View(params, tuple(Advert(i, k, 10) for i, k in sorted(public.items())))


def _round(n=6, threshold=4, server_round=1):
    clients = {i: Participant(cid=i, server_round=server_round, bits=BITS) for i in range(n)}
    public = {i: c.advertise() for i, c in clients.items()}
    view = _view(public, threshold, server_round)
    boxes = {i: c.share(view) for i, c in clients.items()}
    for j, c in clients.items():
        c.receive({i: boxes[i][j] for i in clients})
    return clients, public


def _reveal(clients, alive, answering=None):
    """Every survivor confirms `alive`; those `answering` reveal, each having seen every
    survivor's confirmation (the signatures are checked by client/secure.py)."""
    for i in alive:
        clients[i].confirm(alive)
    return [clients[i].reveal(alive) for i in (alive if answering is None else answering)]


def _values(n, size=50, seed=0):
    rng = np.random.default_rng(seed)
    return {i: rng.integers(-1000, 1000, size=size) for i in range(n)}


def test_the_server_recovers_exactly_the_sum():
    clients, public = _round()
    values = _values(6)
    masked = {i: c.masked(values[i]) for i, c in clients.items()}
    revealed = _reveal(clients, sorted(clients))
    total = unmask(masked, revealed, public, server_round=1, bits=BITS, threshold=4)
    assert np.array_equal(total, sum(values.values()))


def test_clients_that_drop_before_masking_are_recovered_from_shares():
    clients, public = _round(n=7, threshold=4)
    values = _values(7)
    alive, gone = [0, 2, 3, 5, 6], [1, 4]
    masked = {i: clients[i].masked(values[i]) for i in alive}
    revealed = _reveal(clients, alive, answering=alive[:4])  # 4 of 5 answer: enough
    assert all(r[j][0] == "s" for r in revealed for j in gone)
    total = unmask(masked, revealed, public, server_round=1, bits=BITS, threshold=4)
    assert np.array_equal(total, sum(values[i] for i in alive))


def test_one_masked_vector_looks_uniform_and_unrelated_to_its_input():
    clients, _ = _round()
    value = np.arange(20_000) % 7
    y = clients[0].masked(value)
    assert 0 <= y.min() and y.max() < 2**BITS
    assert abs(float(y.mean()) / 2**BITS - 0.5) < 0.01
    assert abs(np.corrcoef(y, value)[0, 1]) < 0.03
    assert not np.array_equal(y, _round()[0][0].masked(np.zeros_like(value)))
    with pytest.raises(ProtocolError, match="already masked"):  # one release per round
        clients[0].masked(value)


def test_requests_that_would_unmask_one_client_are_refused():
    clients, public = _round(n=6, threshold=4)
    with pytest.raises(ProtocolError, match="masked nothing"):
        clients[0].confirm(list(range(6)))
    for c in clients.values():
        c.masked(np.zeros(5, dtype=np.int64))
    with pytest.raises(ProtocolError, match="confirmed no survivors"):
        clients[0].reveal(list(range(6)))
    with pytest.raises(ProtocolError, match="not among the peers"):
        clients[0].confirm([0, 1, 2, 3, 9])
    with pytest.raises(ProtocolError, match="fewer than the threshold"):
        clients[0].confirm([0, 1, 2])
    with pytest.raises(ProtocolError, match="listed as dropped"):
        clients[0].confirm([1, 2, 3, 4])
    clients[1].confirm(list(range(6)))
    with pytest.raises(ProtocolError, match="already confirmed"):  # one story a round
        clients[1].confirm(list(range(5)))
    with pytest.raises(ProtocolError, match="fewer than the threshold"):  # 3 signers < t
        clients[1].reveal([1, 2, 3])
    with pytest.raises(ProtocolError, match="fewer than the threshold"):  # signers not survivors
        clients[1].reveal([1, 2, 3, 7, 8])
    clients[1].reveal(list(range(6)))
    with pytest.raises(ProtocolError, match="already revealed"):
        clients[1].reveal(list(range(6)))
    with pytest.raises(ProtocolError, match="threshold 3 must be"):  # 2t <= n lets a server split
        _round(n=6, threshold=3)
    with pytest.raises(ProtocolError, match="no aggregation"):  # the server would see it alone
        _round(n=1, threshold=1)


def test_a_peer_shown_another_view_is_no_peer():
    """The server shows client 0 a cohort with threshold 2 and the others one with
    threshold 4 (or another noise level): their shares name another view's digest, so
    client 0 takes none of them, and it never masks with a peer of another story."""
    clients = {i: Participant(cid=i, server_round=1, bits=BITS) for i in range(4)}
    public = {i: c.advertise() for i, c in clients.items()}
    mine = clients[0].share(_view({0: public[0], 1: public[1], 2: public[2]}, 2))
    theirs = {i: clients[i].share(_view(public, 3)) for i in (1, 2, 3)}
    for i in (1, 2):
        with pytest.raises(ProtocolError, match="another view"):
            clients[0].receive({i: theirs[i][0]})
    clients[0].receive({0: mine[0]})
    with pytest.raises(ProtocolError, match="fewer than the threshold"):
        clients[0].masked(np.zeros(5, dtype=np.int64))
    other_noise = Participant(cid=0, server_round=1, bits=BITS)
    assert _view(public, 3).digest() != _view(public, 3, noise=2.0).digest()
    with pytest.raises(ProtocolError, match="already shared"):
        clients[1].share(_view(public, 3))
    assert other_noise.view == ""


def test_fewer_shares_than_the_threshold_unmask_nothing():
    clients, public = _round(n=6, threshold=4)
    values = _values(6)
    masked = {i: c.masked(values[i]) for i, c in clients.items()}
    revealed = _reveal(clients, sorted(clients), answering=[0, 1, 2])
    with pytest.raises(ProtocolError, match="fewer than the threshold"):
        unmask(masked, revealed, public, server_round=1, bits=BITS, threshold=4)


def test_masks_depend_on_the_round_and_the_key():
    key = bytes(range(32))
    a, b = prg(key, 1, 1000, BITS), prg(key, 2, 1000, BITS)
    assert not np.array_equal(a, b) and np.array_equal(a, prg(key, 1, 1000, BITS))
    assert a.max() < 2**BITS and a.min() >= 0


def test_distributed_noise_through_secure_aggregation_sums_to_the_central_noise():
    """Each of 8 clients adds a Skellam share of mu/8 to its integer vector; the server's
    unmasked sum minus the true sum is one Skellam of variance mu."""
    n, mu, size = 8, 400.0, 20_000
    clients, public = _round(n=n, threshold=5)
    rng = np.random.default_rng(3)
    values = {i: rng.integers(-50, 50, size=size) for i in range(n)}
    masked = {i: c.masked(values[i] + ddp.skellam(mu / n, size, rng)) for i, c in clients.items()}
    revealed = _reveal(clients, sorted(clients))
    noise = unmask(masked, revealed, public, server_round=1, bits=BITS, threshold=5) - sum(values.values())
    assert float(noise.var()) == pytest.approx(mu, rel=0.05) and abs(float(noise.mean())) < 1.0


def test_clients_lost_while_shares_were_sent_are_left_out_of_the_masks():
    """Client 5 sent keys but no shares: the others mask only with the peers whose shares
    reached them, and the sum of those still unmasks exactly."""
    n, threshold = 6, 4
    clients = {i: Participant(cid=i, server_round=1, bits=BITS) for i in range(n)}
    public = {i: c.advertise() for i, c in clients.items()}
    view = _view(public, threshold)
    boxes = {i: c.share(view) for i, c in clients.items() if i != 5}
    u2 = sorted(boxes)
    for j in u2:
        clients[j].receive({i: boxes[i][j] for i in u2})
    values = _values(n)
    masked = {i: clients[i].masked(values[i]) for i in u2}
    revealed = _reveal(clients, u2)
    total = unmask(masked, revealed, {i: public[i] for i in u2}, server_round=1, bits=BITS,
                   threshold=threshold)
    assert np.array_equal(total, sum(values[i] for i in u2))
    lonely = Participant(cid=0, server_round=1, bits=BITS)
    own = lonely.share(_view({**public, 0: lonely.advertise()}, threshold))
    lonely.receive({0: own[0]})  # only its own share came back
    with pytest.raises(ProtocolError, match="fewer than the threshold"):
        lonely.masked(values[0])


def test_a_participant_survives_the_trip_through_node_state():
    clients, public = _round(n=5, threshold=3)
    back = {i: Participant.from_state(c.to_state()) for i, c in clients.items()}
    values = _values(5)
    masked = {i: back[i].masked(values[i]) for i in back}
    for i in back:
        back[i].confirm(sorted(back))
    revealed = [Participant.from_state(back[i].to_state()).reveal(sorted(back)) for i in back]
    total = unmask(masked, revealed, public, server_round=1, bits=BITS, threshold=3)
    assert np.array_equal(total, sum(values.values()))


def test_shamir_shares_combine_from_any_threshold_and_say_nothing_below_it():
    import itertools
    import secrets

    from common.secagg import combine_shares, create_shares

    secret = secrets.token_bytes(32)
    shares = create_shares(secret, 4, 7)
    assert len(shares) == 7 and len({s[4:] for s in shares}) == 7
    for subset in itertools.combinations(shares, 4):
        assert combine_shares(list(subset)) == secret
    assert combine_shares(shares) == secret  # more than t: the same polynomial
    # t - 1 shares fit every secret equally (a degree-3 polynomial through them and any
    # value at 0): interpolating them yields some other number, never the secret
    wrong = [combine_shares(list(sub)) for sub in itertools.combinations(shares, 3)
             if _combines(sub)]
    assert secret not in wrong
    # a fresh sharing of the same secret shares nothing with this one but the secret
    again = create_shares(secret, 4, 7)
    assert all(a[4:] != b[4:] for a, b in zip(shares, again, strict=True))
    for bad in ([shares[0], shares[0], shares[1], shares[2]], [s[:-1] for s in shares[:4]]):
        with pytest.raises(ValueError):
            combine_shares(bad)
    with pytest.raises(ValueError):
        create_shares(secret[:16], 2, 3)


def _combines(shares):
    from common.secagg import combine_shares

    try:
        combine_shares(list(shares))
        return True
    except ValueError:  # the interpolated value is not a 32-byte number: no secret at all
        return False


def test_key_agreement_is_symmetric_and_refuses_a_point_that_is_no_key():
    from common.secagg import _agree, _keypair

    (a_sk, a_pk), (b_sk, b_pk) = _keypair(), _keypair()
    assert len(a_pk) == 32 and _agree(a_sk, b_pk) == _agree(b_sk, a_pk)
    assert _agree(a_sk, b_pk) != _agree(a_sk, _keypair()[1])
    with pytest.raises(ProtocolError, match="unusable public key"):
        _agree(a_sk, bytes(32))  # a low-order point: the shared secret would be zero
