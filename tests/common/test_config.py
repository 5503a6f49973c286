import math

import pytest

from common.config import RunConfig, parse_overrides, pyproject_run_config


def test_pyproject_config_matches_dataclass_defaults():
    from_pyproject = RunConfig.from_run_config(pyproject_run_config())
    assert from_pyproject == RunConfig()
    assert set(pyproject_run_config()) == set(RunConfig().to_run_config())


def test_kebab_keys_and_conversion():
    cfg = RunConfig.from_run_config({"target-epsilon": "inf", "ti-steps": 7, "center": "false", "clip-norm": 1})
    assert math.isinf(cfg.target_epsilon) and not cfg.private
    assert cfg.effective_sampling_rate == 1.0
    assert cfg.ti_steps == 7 and cfg.center is False and cfg.clip_norm == 1.0


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match="clip-nrom"):
        RunConfig.from_run_config({"clip-nrom": 1.0})


@pytest.mark.parametrize(
    "key,value",
    [("clip-norm", -1.0), ("sampling-rate", 0.0), ("sampling-rate", 1.5), ("target-delta", 1.0),
     ("bound", "squash"), ("ti-steps", 0), ("prompt-template", "no token"), ("resolution", 60),
     ("lora-variant", "dora")],
)
def test_invalid_values_are_named(key, value):
    with pytest.raises(ValueError, match=key):
        RunConfig.from_run_config({key: value})


@pytest.mark.parametrize("value", [0.0, -1.0, "nan"])
def test_max_noise_to_signal_must_be_positive(value):
    with pytest.raises(ValueError, match="max-noise-to-signal"):
        RunConfig.from_run_config({"max-noise-to-signal": value})


def test_max_noise_to_signal_defaults_to_10_and_inf_disables_it():
    assert RunConfig().max_noise_to_signal == 10.0 == pyproject_run_config()["max-noise-to-signal"]
    cfg = RunConfig.from_run_config({"max-noise-to-signal": "inf"})
    assert math.isinf(cfg.max_noise_to_signal) and cfg.to_run_config()["max-noise-to-signal"] == "inf"


def test_lora_variant_applies_to_lora_only():
    assert RunConfig.from_run_config({"adapter": "lora", "lora-variant": "ffa", "num-sites": 2}).lora_variant == "ffa"
    with pytest.raises(ValueError, match="lora-variant: applies to adapter 'lora' only"):
        RunConfig.from_run_config({"adapter": "ti", "lora-variant": "ffa"})


def test_type_errors_are_named():
    with pytest.raises(ValueError, match="ti-steps"):
        RunConfig.from_run_config({"ti-steps": 2.5})
    with pytest.raises(ValueError, match="center"):
        RunConfig.from_run_config({"center": "maybe"})


def test_run_config_round_trip():
    cfg = RunConfig(target_epsilon=math.inf, seed=3)
    assert RunConfig.from_run_config(cfg.to_run_config()) == cfg


def test_parse_overrides_toml_scalars():
    assert parse_overrides('target-epsilon=2 center=false model-path="/m x" output-dir=out/a') == {
        "target-epsilon": 2, "center": False, "model-path": "/m x", "output-dir": "out/a"}
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides("oops")
