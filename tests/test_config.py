from pathlib import Path

import pytest

from alignx.config import Config, ConfigError, load_config, parse_overrides, save_config


def test_overrides_and_types() -> None:
    cfg = load_config(None, ["--objective.temperature=0.05", "--train.max_steps", "10", "--eval.langs=[sw, hi]"])
    assert cfg.objective.temperature == 0.05
    assert cfg.train.max_steps == 10
    assert cfg.eval.langs == ["sw", "hi"]


def test_unknown_key_suggests_closest() -> None:
    with pytest.raises(ConfigError, match=r"objective\.temprature.*did you mean 'objective\.temperature'"):
        load_config(None, ["--objective.temprature=0.05"])


def test_unknown_section_and_bad_type(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("objectiv:\n  temperature: 0.1\n")
    with pytest.raises(ConfigError, match="did you mean 'objective'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="engine.zero_stage must be an integer"):
        load_config(None, {"engine.zero_stage": "three"})
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        load_config(None, {"objective.temperature": 0})


def test_grad_accum_is_derived() -> None:
    cfg = Config()
    assert cfg.train.grad_accum_steps(1) == 8
    assert cfg.train.grad_accum_steps(8) == 1
    with pytest.raises(ConfigError, match="not a multiple"):
        cfg.train.grad_accum_steps(3)


def test_save_roundtrip(tmp_path: Path) -> None:
    cfg = load_config(None, ["--model.align_layer=3", "--data.padding_side=right"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_override_syntax_error() -> None:
    with pytest.raises(ConfigError, match="expected an override"):
        parse_overrides(["temperature=0.1"])


def test_exponent_without_a_dot_is_a_number() -> None:
    """YAML 1.1 reads ``3e-5`` as a string; a learning rate typed that way on the command line must still work."""
    from alignx.config import ConfigError, load_config

    assert load_config(None, ["--optim.lr=3e-5"]).optim.lr == 3e-5
    with pytest.raises(ConfigError, match="optim.lr must be a number"):
        load_config(None, ["--optim.lr=fast"])
