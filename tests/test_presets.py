"""Named configurations (common/presets.py): a preset's keys under the user's, a clear
error for an unknown name, the hint a new user gets from distributed noise alone, and
the secure sweep built on the preset."""

import pytest

from common.config import ConfigError, default_run_config, parse_config
from common.presets import PRESETS, hint, with_preset
from simulations.sweep import load_grid


def test_a_preset_lies_under_the_users_keys_and_validates():
    keys = with_preset("distributed", {"learning-rate": 3.0})
    assert keys["noise"] == "distributed" and keys["learning-rate"] == 3.0
    cfg = parse_config({**default_run_config(), **keys})
    assert cfg.secure.enabled and cfg.secure.noise == "distributed"
    assert cfg.train.learning_rate == 3.0 and cfg.privacy.max_grad_norm == 0.2
    assert with_preset("", {"seed": 1}) == {"seed": 1}


def test_an_unknown_preset_names_the_known_ones():
    with pytest.raises(ConfigError, match="unknown preset; known: distributed"):
        with_preset("central", {})


def test_distributed_noise_alone_gets_a_hint_and_the_preset_does_not():
    defaults = default_run_config()
    alone = parse_config({**defaults, "secure-aggregation": "secagg+",
                          "noise": "distributed"}).to_run_config()
    line = hint(alone, defaults)
    assert line is not None and "--preset distributed" in line and "88.0%" in line
    tuned = parse_config({**defaults, **PRESETS["distributed"][0]}).to_run_config()
    assert hint(tuned, defaults) is None
    assert hint(parse_config(defaults).to_run_config(), defaults) is None  # local noise


def test_the_secure_sweep_uses_the_preset_and_command_line_keys_win():
    spec = load_grid("secagg")
    assert {k: spec["fixed"][k] for k in PRESETS["distributed"][0]} == PRESETS["distributed"][0]
    assert load_grid("secagg", "", "learning-rate=3.0")["fixed"]["learning-rate"] == 3.0
    with pytest.raises(ConfigError, match="unknown preset"):
        load_grid("secagg", preset="nope")


def test_the_cli_refuses_a_preset_with_resume(tmp_path, capsys):
    from simulations.cli import main

    assert main(["simulate", "--preset", "distributed", "--resume", str(tmp_path)]) != 0
    assert "--preset cannot be given with it" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["simulate", "audit", "sweep"])
def test_help_shows_each_preset_as_written(command, capsys):
    from simulations.cli import main

    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name, (_, what) in PRESETS.items():
        assert f"{name}: {' '.join(what.split())}" in text
