"""Bad config stops before training, with an error naming the field."""

import math

import pytest

from common.config import ConfigError, parse_overrides, resolve_config
from tests.helpers import FAST


def test_defaults_parse():
    cfg = resolve_config({})
    assert cfg.privacy.private and cfg.privacy.target_epsilon == 3.0
    assert cfg.federation.num_partitions == 100


# Every bad value names its field (and, where it helps, the rule it breaks).
SA = {"secure-aggregation": "secagg+"}
BAD_CONFIG = [
    ({"secure-aggregation": "secagg"}, "secure-aggregation"),
    ({"noise": "central"}, "noise"),
    ({"noise": "distributed"}, "noise.*needs secure-aggregation=secagg"),
    ({**SA, "secagg-bits": 7}, "secagg-bits"),
    ({**SA, "secagg-bits": 63}, "secagg-bits"),
    ({**SA, "secagg-threshold": 0.5}, "secagg-threshold"),
    ({**SA, "secagg-threshold": 1.1}, "secagg-threshold"),
    ({**SA, "secagg-sigmas": 1.0}, "secagg-sigmas"),
    ({**SA, "secagg-sigmas": 100.0}, "secagg-sigmas"),
    ({"secagg-headroom": 1.0}, "removed config key.*secagg-headroom.*secagg-sigmas"),
    ({"audit-canaries": -1}, "audit-canaries"),
    ({"audit-canaries": 20_001}, "audit-canaries"),
    ({"audit-canaries": 2.5}, "audit-canaries"),
    ({**SA, "dp": False}, "dp=.*secagg"),
    ({**SA, "target-epsilon": math.inf}, "dp=.*secagg"),
    ({**SA, "accountant": "prv"}, "accountant"),
    ({**SA, "batch-size": 32}, "batch-size"),
    ({**SA, "local-epochs": 2}, "local-epochs"),
    ({**SA, "momentum": 0.5}, "momentum"),
    ({**SA, "aggregation": "krum"}, "aggregation"),
    ({**SA, "min-train-clients": 1}, "min-train-clients.*no aggregation"),
    ({**SA, "max-update-norm": 5.0}, "max-update-norm"),
    ({**SA, "attack": "nan", "attackers": 1}, "attack"),
    ({"target-epsilon": 0.0}, "target-epsilon"),
    ({"target-epsilon": -1.0}, "target-epsilon"),
    ({"target-delta": 1.0}, "target-delta"),
    ({"fraction-train": 0.0}, "fraction-train"),
    ({"fraction-train": 1.5}, "fraction-train"),
    ({"min-train-clients": 200}, "min-train-clients"),
    ({"min-available-clients": 101}, "min-available-clients"),
    ({"partitioner": "shard"}, "partitioner"),
    ({"max-grad-norm": -1.0}, "max-grad-norm"),
    ({"batch-size": -1}, "batch-size"),
    ({"baseline-batch-size": -1}, "baseline-batch-size"),
    ({"baseline-learning-rate": 0.0}, "baseline-learning-rate"),
    ({"num-rounds": 2.5}, "num-rounds"),
    ({"dp": "maybe"}, "dp"),
    ({"resume": "yes"}, "resume"),
    ({"model": "resnet"}, "model"),
    ({"accountant": "gdp"}, "accountant"),
    ({"learning-rate": math.nan}, "learning-rate"),
    ({"no-such-key": 1}, "unknown config key.*no-such-key"),
    ({"run-name": "../escape"}, "run-name"),
    ({"max-idle-rounds": -1}, "max-idle-rounds"),
    ({"server-momentum": 1.0}, "server-momentum"),
    ({"attack-scale": 0.0}, "attack-scale"),
    ({"attack": "flip"}, "attack='flip' must be empty"),
    ({"attack": "nan", "attackers": 101}, "attackers=101 must be <= num-partitions=100"),
    ({"aggregation": "mean"}, "aggregation='mean' must be one of"),
    ({"trim-fraction": 0.5}, "trim-fraction=0.5 must be in"),
    ({"aggregation": "krum", "krum-malicious": 4}, r"krum-malicious=4 must satisfy clients per round \(10\)"),
    ({"krum-select": 0}, "krum-select"),
    ({"aggregation": "multikrum", "krum-select": 11}, "krum-select"),
    ({"round-timeout": 0.0}, "round-timeout=0.0 must be > 0"),
    ({"node-wait-timeout": math.inf}, "node-wait-timeout=inf must be > 0"),
]


@pytest.mark.parametrize("overrides,field", BAD_CONFIG)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        resolve_config(overrides)


def test_overrides_use_flwr_syntax_and_accept_bare_words():
    got = parse_overrides('num-rounds=5 target-epsilon=inf partitioner=dirichlet run-name="a b" dp=false')
    assert got == {"num-rounds": 5, "target-epsilon": math.inf, "partitioner": "dirichlet",
                   "run-name": "a b", "dp": False}
    with pytest.raises(ConfigError):
        parse_overrides("num-rounds")


def test_infinite_epsilon_or_dp_off_is_the_nonprivate_baseline():
    assert not resolve_config({"target-epsilon": math.inf}).privacy.private
    assert not resolve_config({"dp": False}).privacy.private
    assert resolve_config({"target-epsilon": math.inf, "noise-multiplier": 1.0}).privacy.private


def test_baseline_uses_its_own_optimizer_settings_explicitly():
    over = {"baseline-batch-size": 16, "baseline-learning-rate": 0.2,
            "baseline-server-momentum": 0.5}
    cfg = resolve_config({"target-epsilon": math.inf, **over})
    assert (cfg.client_train.batch_size, cfg.client_train.learning_rate) == (16, 0.2)
    assert cfg.server_momentum == 0.5
    # What the user set is kept as set (no silent swap): it is what config.json records.
    assert cfg.train == resolve_config(over).train and cfg.baseline.batch_size == 16
    assert cfg.to_run_config()["batch-size"] == resolve_config({}).train.batch_size
    private = resolve_config(over)
    assert private.client_train is private.train and private.server_momentum == 0.9


def test_round_trip_to_run_config():
    cfg = resolve_config({"num-rounds": 7})
    assert resolve_config(cfg.to_run_config()) == cfg


def test_simulate_checks_delta_and_partitions_before_starting(tmp_path):
    from common.errors import DataError
    from simulations.simulate import prepare

    with pytest.raises(ConfigError, match=r"target-delta=0.01 must be < 1/n .* smallest client"):
        prepare({**FAST, "target-delta": 0.01}, str(tmp_path))
    with pytest.raises(DataError, match="num-partitions=70000 exceeds"):
        prepare({**FAST, "num-partitions": 70000}, str(tmp_path))
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device='cuda'"):
            prepare({**FAST, "device": "cuda"}, str(tmp_path))


def test_unwritable_output_dir_and_taken_run_name_are_clear_errors(tmp_path):
    from simulations.simulate import prepare

    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    with pytest.raises(ConfigError, match="output-dir=.*a-file/runs.*not writable"):
        prepare(dict(FAST), str(blocker / "runs"))
    assert blocker.read_text() == "keep me"
    run = tmp_path / "runs" / "taken"
    run.mkdir(parents=True)
    (run / "rounds.jsonl").write_text('{"round": 1}\n')
    with pytest.raises(ConfigError, match="run-name='taken'.*already holds a run"):
        prepare({**FAST, "run-name": "taken"}, str(tmp_path / "runs"))
    assert (run / "rounds.jsonl").read_text() == '{"round": 1}\n'


def test_every_value_survives_flwr_runs_config_syntax(tmp_path):
    """The harness passes the whole config to `flwr run --run-config`: odd strings must
    arrive as they are, or stop with a clear error before any process starts."""
    from simulations.simulate import named, prepare

    odd = tmp_path / "dir with spaces, é and 'quote'"
    cfg = prepare({**FAST, "run-name": "odd"}, str(odd))
    assert cfg.runtime.output_dir == str(odd.resolve())
    with pytest.raises(ConfigError, match="both quote characters"):
        prepare({**FAST, "run-name": "odd2"}, str(tmp_path / "a'b\"c"))
    assert named(resolve_config({}), "").runtime.output_dir.endswith("runs")  # "" is the default


def test_the_secure_aggregation_threshold_is_more_than_half_and_at_least_the_fraction():
    sec = resolve_config({"secure-aggregation": "secagg+", "secagg-threshold": 0.8}).secure
    assert [sec.threshold(k) for k in (1, 2, 3, 5, 10, 100)] == [1, 2, 3, 4, 8, 80]
    sec = resolve_config({"secure-aggregation": "secagg+", "secagg-threshold": 0.51}).secure
    assert [sec.threshold(k) for k in (2, 4, 10)] == [2, 3, 6]


def test_the_pyproject_table_follows_the_config_sections():
    """`[tool.flwr.app.config]` lists the keys section by section, each under a comment
    naming its section and class, in the order of the code's sections: a reader of the
    defaults sees the code's structure."""
    import re
    from dataclasses import fields

    from common.config import _SECTIONS, project_root

    text = (project_root() / "pyproject.toml").read_text()
    table = text[text.index("[tool.flwr.app.config]"):].split("\n[", 1)[0]
    seen: list[tuple[str, list[str]]] = []
    for line in table.splitlines()[1:]:
        header = re.match(r"# --- (\w+) \((\w+)\)", line)
        if header:
            seen.append((header.group(1), []))
        elif line and not line.startswith("#"):
            seen[-1][1].append(line.split("=")[0].strip())
    expected = [(name, [prefix + f.name.replace("_", "-") for f in fields(cls)])
                for name, (cls, prefix) in _SECTIONS.items()]
    headers = {m.group(1): m.group(2) for m in re.finditer(r"# --- (\w+) \((\w+)\)", table)}
    assert {name: cls.__name__ for name, (cls, _) in _SECTIONS.items()} == headers
    assert [(n, sorted(k)) for n, k in seen] == [(n, sorted(k)) for n, k in expected]
