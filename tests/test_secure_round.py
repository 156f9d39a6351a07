"""Secure aggregation end to end in one process: the server's four-stage round
(server/round.py with server/secure_round.py's exchange) against the real ClientApp handlers (client/secure.py) through
an in-process grid. What the server holds is inspected: masked vectors that look uniform
and carry nothing of one client's release, and a sum that decodes to the cohort's clipped
gradients plus the noise the clients' ledgers account for."""

import math

import numpy as np
import pytest

from client.ledger import STATE_KEY, Ledger
from common import ddp, privacy
from common.data import partition_of, partitions_of
from common.errors import ConfigError
from common.models import build_model, get_weights
from common.secagg import Advert
from server.round import play
from server.secure_round import SecureExchange
from server.strategy import CohortFedAvg
from tests.helpers import fast_config, skellam_epsilon
from tests.local_grid import LocalGrid

SECURE = {"secure-aggregation": "secagg+", "noise": "distributed", "min-train-clients": 2}


def _setup(num_nodes=6, drop_at=None, node_extra=None, **overrides):
    over = {**SECURE, "fraction-train": 1.0, "num-partitions": num_nodes, **overrides}
    cfg = fast_config(**over)
    grid = LocalGrid(num_nodes, drop_at=drop_at, node_extra=node_extra, **over)
    sizes = {i: len(p) for i, p in enumerate(partitions_of(cfg.data, num_nodes))}
    strategy = CohortFedAvg(cfg, partition_sizes=sizes)
    strategy.cohorts.discover(grid)
    return cfg, grid, strategy, SecureExchange(cfg, strategy)


def _model():
    return dict(get_weights(build_model("logreg", seed=0)))


def _clipped_sum(cfg, pid, num_nodes, model):
    """Partition `pid`'s summed per-record gradients of the logistic regression, each
    clipped to max-grad-norm, computed here in numpy (not by Opacus)."""
    data = partition_of(cfg.data, pid, num_nodes, "")
    x = data.images.reshape(len(data.labels), -1).astype(np.float64)
    w, b = model["1.weight"].astype(np.float64), model["1.bias"].astype(np.float64)
    z = x @ w.T + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(p)), data.labels] -= 1.0
    norms = np.linalg.norm(p, axis=1) * np.sqrt((x * x).sum(1) + 1.0)
    f = np.minimum(1.0, cfg.privacy.max_grad_norm / norms)[:, None]
    return np.concatenate([((p * f).T @ x).ravel(), (p * f).sum(0)])


def _ledger(grid, pid):
    record = grid.contexts[1000 + pid].state.config_records.get(STATE_KEY)
    return Ledger.from_json(str(record["json"])) if record is not None else Ledger()


def test_the_server_holds_masked_vectors_and_a_sum_that_decodes_to_the_cohort_gradient():
    cfg, grid, strategy, secure = _setup()
    model = _model()
    new = play(grid, strategy, secure, 1, dict(model), planned=3)
    out = strategy.outcomes[1]
    assert new is not None and out.aggregated and out.noise_shares == 6 and out.trained == 6
    # where the round's time went, stage by stage
    assert set(out.seconds_by_stage) == {"keys", "shares", "masked", "confirm", "unmask",
                                         "server-unmask"}
    assert all(v >= 0 for v in out.seconds_by_stage.values())
    held = secure.held
    params = held.view.params
    enc = params.encoding
    assert enc.dim == ddp.padded_dim(7850) == 8192 and params.dim == 7850
    # the scale: secagg-sigmas standard deviations of a coordinate of the rotated sum (the
    # noise of 6 shares of (z l2)^2 / t, the first round's signal: 1000 clipped gradients
    # aligned, spread over 8192 coordinates) fill half the field
    t = cfg.secure.threshold(6)
    z = params.noise_multiplier
    signal = cfg.privacy.max_grad_norm * 1000 / math.sqrt(8192)
    spread = cfg.secure.secagg_sigmas * math.sqrt(
        z * z * enc.rounded_l2_bound ** 2 * 6 / t + (held.scale * signal) ** 2)
    # the field: secagg-bits=0 (auto) lets the server pick the fewest bits at which the
    # rounding adds at most 2% to the noise; one fewer would add more
    assert cfg.secure.secagg_bits == 0 and 12 <= params.bits <= 32
    room = dict(clip=cfg.privacy.max_grad_norm, dim=8192, noise_multiplier=z, members=6,
                threshold=t, sigmas=cfg.secure.secagg_sigmas)
    assert ddp.rounding_excess(bits=params.bits, **room) <= 0.02
    assert ddp.rounding_excess(bits=params.bits - 1, **room) > 0.02
    assert spread == pytest.approx(2.0 ** (params.bits - 1), rel=1e-6)
    assert held.scale == params.scale
    rotation = held.view.rotation()
    plain = {p: _clipped_sum(cfg, p, 6, model) for p in range(6)}
    truth = {p: rotation.forward(v) * held.scale for p, v in plain.items()}

    # Every array the server received is a masked vector, bit-packed: uniform modulo
    # 2^bits and uncorrelated with the release it hides.
    arrays = [r.content.array_records for r in grid.received]
    assert all(set(a) <= {"masked"} for a in arrays)
    bits = params.bits
    packed = [a["masked"]["masked"].numpy() for a in arrays if "masked" in a]
    assert len(packed) == 6 and all(v.dtype == np.uint8 and v.size == 8192 * bits // 8
                                    for v in packed)
    top = 2.0 ** bits
    for p, v in held.masked.items():
        assert abs(float(v.mean()) / top - 0.5) < 0.02
        assert abs(np.corrcoef(v.astype(np.float64), truth[p])[0, 1]) < 0.1

    # The sum: the true clipped sum plus noise whose spread is what the ledgers promised.
    ledgers = {p: _ledger(grid, p) for p in range(6)}
    entries = {tuple(led.history[-1]) for led in ledgers.values()}
    assert len(entries) == 1
    (_, mu, l1, l2, share, beta, steps), = entries
    assert beta == ddp.ROUNDING_BETA
    assert share == pytest.approx(mu / t)
    noise = held.total - sum(truth.values())  # rounding is unbiased and small next to it
    assert float(noise.std()) == pytest.approx(math.sqrt(mu * 6 / t), rel=0.1)
    assert abs(float(noise.mean())) < 0.1 * math.sqrt(mu)
    # ... the high-probability bound is the one accounted, and each client's epsilon is
    # that of the recorded release (delta less its beta), within its budget.
    c = held.scale * cfg.privacy.max_grad_norm
    tight = math.sqrt(c * c + 8192 / 4 + math.sqrt(2 * math.log(1e12)) * (c + math.sqrt(8192) / 2))
    assert l2 == pytest.approx(tight) and l2 < c + math.sqrt(8192)
    assert (l1, steps) == (pytest.approx(min(math.sqrt(8192) * l2, l2 * l2)), 1)
    for led in ledgers.values():
        eps = led.epsilon(cfg.privacy.target_delta, "rdp")
        assert eps == pytest.approx(skellam_epsilon([(mu, l1, l2, 1)], cfg.privacy.target_delta,
                                                    beta))
    # Calibrated for the 3 planned releases: three of them spend the budget, not more.
    three = skellam_epsilon([(mu, l1, l2, 3)], cfg.privacy.target_delta, beta)
    assert 0.97 * cfg.privacy.target_epsilon <= three <= cfg.privacy.target_epsilon

    # The server rotates the sum back: the cohort's clipped gradients plus noise of the
    # same spread in the model's coordinates (the rotation is orthogonal).
    decoded = held.gradient_sum
    assert decoded.shape == (7850,)
    err = decoded - sum(plain.values())
    assert float(err.std()) == pytest.approx(math.sqrt(mu * 6 / t) / held.scale, rel=0.1)
    # The step the server took is FedAvg of one full-batch DP-SGD step per client.
    grad = decoded / 1000 * cfg.train.learning_rate
    expected_avg = model["1.weight"].ravel() - grad[:7840]
    assert np.allclose(secure.last_average["1.weight"].ravel(), expected_avg, atol=1e-5)


def test_a_client_lost_after_masking_is_recovered_and_the_round_completes():
    cfg, grid, strategy, secure = _setup(drop_at={4: "train.secagg_unmask"})
    assert play(grid, strategy, secure, 1, _model(), planned=3) is not None
    out = strategy.outcomes[1]
    assert out.aggregated and out.noise_shares == 6  # its masked vector counted


def test_clients_lost_before_masking_leave_the_rest_of_the_round_intact():
    cfg, grid, strategy, secure = _setup(drop_at={1: "train.secagg_masked"})
    assert cfg.secure.threshold(6) == 5
    assert play(grid, strategy, secure, 1, _model(), planned=3) is not None
    out = strategy.outcomes[1]
    assert out.aggregated and out.noise_shares == 5 and out.partitions_aggregated == [0, 2, 3, 4, 5]
    assert _ledger(grid, 1).history == []  # it never trained
    assert all(len(_ledger(grid, p).history) == 1 for p in (0, 2, 3, 4, 5))


def test_fewer_survivors_than_the_threshold_unmask_nothing_but_spend_what_was_released():
    cfg, grid, strategy, secure = _setup(drop_at={1: "train.secagg_masked", 2: "train.secagg_masked"})
    model = _model()
    assert play(grid, strategy, secure, 1, dict(model), planned=3) is None
    out = strategy.outcomes[1]
    assert not out.aggregated and any("fewer than the threshold" in r for r in out.reasons)
    assert secure.held.total is None
    # Their masked releases were sent: spent, even though nothing was unmasked.
    assert all(len(_ledger(grid, p).history) == 1 for p in (0, 3, 4, 5))


def test_shares_lost_with_a_client_leave_it_out_of_the_masks():
    cfg, grid, strategy, secure = _setup(drop_at={3: "train.secagg_shares"})
    assert play(grid, strategy, secure, 1, _model(), planned=3) is not None
    assert strategy.outcomes[1].partitions_aggregated == [0, 1, 2, 4, 5]


def test_a_client_over_budget_refuses_before_reading_data_and_the_round_goes_on():
    cfg, grid, strategy, secure = _setup()
    model = _model()
    for r in (1, 2, 3):
        assert play(grid, strategy, secure, r, dict(model), planned=3) is not None
    assert play(grid, strategy, secure, 4, dict(model), planned=3) is None  # a fourth release is over
    out = strategy.outcomes[4]
    assert out.refused == 6 and all("would reach epsilon" in r for r in out.reasons[:6])
    for p in range(6):
        led = _ledger(grid, p)
        assert privacy.total_steps(led.history) == 3
        assert led.epsilon(cfg.privacy.target_delta, "rdp") <= cfg.privacy.target_epsilon


def test_a_plain_train_request_in_a_secure_run_is_refused():
    from client.app import app
    from tests.helpers import context, train_message

    ctx = context(partition_id=0, **SECURE)
    reply = app(train_message(_model()), ctx)
    assert reply.content["metrics"]["refused"] == 1
    assert "secure-aggregation=secagg+" in str(reply.content["privacy"]["reason"])


def test_a_share_floor_keeps_each_release_alone_within_a_stated_epsilon():
    """The node's min-share-noise-multiplier: its own share alone has at least that noise
    multiplier, so a server that unmasks its release alone (with fake or colluding cohort
    members) still faces a stated epsilon (epsilon_alone); the sum then carries more."""
    extra = {"min-share-noise-multiplier": 5.0}
    cfg, grid, strategy, secure = _setup(node_extra=extra)
    assert play(grid, strategy, secure, 1, _model(), planned=3) is not None
    (_, mu, l1, l2, share, beta, _), = {tuple(_ledger(grid, p).history[-1]) for p in range(6)}
    assert share == pytest.approx((5.0 * l2) ** 2)
    led = _ledger(grid, 0)
    alone = privacy.epsilon_alone(led.history, cfg.privacy.target_delta)
    assert alone == pytest.approx(skellam_epsilon([(share, l1, l2, 1)], cfg.privacy.target_delta,
                                                  beta))
    plain_cfg, plain_grid, plain_strategy, plain = _setup()
    play(plain_grid, plain_strategy, plain, 1, _model(), planned=3)
    plain_led = _ledger(plain_grid, 0)
    assert privacy.epsilon_alone(plain_led.history, 1e-5) > alone
    assert strategy.privacy.clients[0].epsilon_alone == pytest.approx(alone)


def test_a_masked_request_that_cannot_complete_spends_nothing():
    """A server that sends the masked stage again (a second release of the same round),
    or with fewer shares than the threshold, gets an error before the client reads data
    or spends budget."""
    import json

    from common.arrays import to_array_record
    from server.wire import stage_message as _message
    from server.wire import train_config

    cfg, grid, strategy, secure = _setup()
    model = _model()
    assert play(grid, strategy, secure, 1, dict(model), planned=3) is not None
    before = {p: _ledger(grid, p).history for p in range(6)}
    masked = [m for m in grid.sent if m.metadata.message_type == "train.secagg_masked"]
    again = grid.send_and_receive(masked[:1])  # the same request again
    assert again[0].has_error() and "already masked" in again[0].error.reason

    # A fresh round whose masked stage carries only the client's own share.
    adverts = [Advert.from_json(p, json.loads(str(r.content["config"]["public-keys"])))
               for p, r in zip(range(6), grid.send_and_receive(
                   [_message(1000 + p, "secagg_keys", {"server-round": 3}) for p in range(6)]),
                   strict=True)]
    view = secure.view_for(3, adverts, 7850, 3)
    boxes = grid.send_and_receive([_message(1000, "secagg_shares",
                                            {"server-round": 3, "view": view.to_json()})])
    own = json.loads(str(boxes[0].content["config"]["shares"]))
    config = train_config(server_round=3, planned_rounds=3, known_history=None)
    config["shares"] = json.dumps({"0": own["0"]})  # only its own: 1 of t = 5
    reply = grid.send_and_receive([_message(1000, "secagg_masked", config, to_array_record(model))])
    assert reply[0].has_error() and "fewer than the threshold" in reply[0].error.reason
    assert {p: _ledger(grid, p).history for p in range(6)} == before


def test_a_secure_run_cut_off_mid_round_resumes_and_every_release_stays_accounted(tmp_path):
    """The ServerApp is stopped after round 3's masked releases were sent (the clients
    have spent) but before they were unmasked; the run resumes from round 2's checkpoint
    and redoes round 3 as a new protocol run. The rounds before the cut are kept, and
    each client's ledger holds every release it made, the lost one included: a resumed
    secure round is a second release, never a free replay."""
    from flwr.app import Context, RecordDict

    from common.records import RunDir
    from server import app as server_app
    from tests.helpers import run_config

    over = {**SECURE, "fraction-train": 0.5, "num-partitions": 6, "num-rounds": 4,
            "output-dir": str(tmp_path), "run-name": "cut"}

    class Cut(Exception):
        pass

    class CutGrid(LocalGrid):
        cut = True

        def send_and_receive(self, messages, timeout=None):
            if self.cut and any(m.metadata.message_type.endswith("secagg_unmask")
                                and m.content["config"]["server-round"] == 3 for m in messages):
                self.cut = False
                raise Cut()
            return super().send_and_receive(messages, timeout)

    grid = CutGrid(6, **over)

    def main(**extra):
        rc = {**run_config(**over), **extra}
        server_app.main(grid, Context(run_id=9, node_id=0, node_config={}, state=RecordDict(),
                                      run_config=rc))

    with pytest.raises(Cut):
        main()
    run = RunDir(tmp_path / "cut")
    before = run.rounds()
    assert [r.round for r in before] == [1, 2] and run.summary() is None
    def releases(p):  # the ledger merges equal consecutive releases: count their steps
        return sum(int(e[-1]) for e in _ledger(grid, p).history)

    spent_in_cut = {p: releases(p) for p in range(6)}

    main(resume=True)
    rows, summary = run.rounds(), run.summary()
    assert [r.round for r in rows] == [1, 2, 3, 4] and summary.resumed
    assert [r.to_json() for r in rows[:2]] == [r.to_json() for r in before]
    released = {p: 0 for p in range(6)}
    for r in rows:
        for p in r.partitions_trained:
            released[p] += 1
    lost = [p for p in range(6) if spent_in_cut[p] > sum(
        p in r.partitions_trained for r in before)]
    assert lost, "some client released in the round that was cut off"
    for p in range(6):
        # every completed release, plus the one sent in the cut-off round
        assert releases(p) == released[p] + (p in lost)
    assert summary.epsilon_max <= 3.0
    # the lost release cost those clients a participation: their budget is spent earlier
    assert any("would reach epsilon" in reason for r in rows[2:] for reason in r.reasons)


def test_a_field_too_narrow_for_the_noise_is_named_and_a_tight_one_warned(caplog):
    """Few bits: where even the rounding's share of the noise does not fit, the run stops
    with the key to change; where rounding would add over 5% to the noise, it says so."""
    cfg, grid, strategy, secure = _setup(**{"secagg-bits": 8})
    with pytest.raises(ConfigError, match="secagg-bits=8.*more secagg-bits"):
        play(grid, strategy, secure, 1, _model(), planned=3)
    cfg, grid, strategy, secure = _setup(**{"secagg-bits": 11})
    with caplog.at_level("WARNING", logger="dpfl.server"):
        assert play(grid, strategy, secure, 1, _model(), planned=3) is not None
    assert "secagg-bits=11: rounding adds" in caplog.text
    caplog.clear()
    cfg, grid, strategy, secure = _setup()
    with caplog.at_level("WARNING", logger="dpfl.server"):
        assert play(grid, strategy, secure, 1, _model(), planned=3) is not None
    assert "rounding adds" not in caplog.text
