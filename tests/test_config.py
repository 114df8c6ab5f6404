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
    with pytest.raises(ConfigError, match="optim.lr must be a finite number"):
        load_config(None, ["--optim.lr=fast"])


def _numeric(tp) -> bool:
    import types
    import typing

    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    return any(a in (int, float) for a in args)


def test_every_numeric_key_has_a_range() -> None:
    """A numeric setting added without a range in alignx.config.RANGES fails here (and would reach torch unchecked)."""
    import dataclasses
    import typing

    from alignx.config import RANGES

    numeric = [
        f"{sec.name}.{f.name}"
        for sec in dataclasses.fields(Config)
        for f in dataclasses.fields(typing.get_type_hints(Config)[sec.name])
        if _numeric(typing.get_type_hints(typing.get_type_hints(Config)[sec.name])[f.name])
    ]
    assert sorted(numeric) == sorted(RANGES)
    load_config(None, {})  # the defaults are in range


@pytest.mark.parametrize(
    "key, bad, good",
    [
        ("optim.lr", -1e-5, 1e-5),
        ("optim.eps", 0, 1e-8),
        ("train.max_steps", 0, -1),
        ("train.epochs", 0, 0.5),
        ("objective.similarity_decay", 1.5, 1.0),
        ("objective.inert_tolerance", -0.1, 0.0),
        ("engine.zero_stage", 4, 3),
        ("data.min_target_tokens", 0, 1),
        ("stage2.lr", 0.0, None),
    ],
)
def test_out_of_range_values_name_the_key(key: str, bad, good) -> None:
    with pytest.raises(ConfigError, match=rf"^{key} must be .*, got"):
        load_config(None, {key: bad})
    load_config(None, {key: good})


def test_non_finite_numbers_and_batch_split() -> None:
    for value in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="objective.temperature must be a finite number"):
            load_config(None, {"objective.temperature": value})
    with pytest.raises(ConfigError, match="optim.betas must be two numbers in"):
        load_config(None, {"optim.betas": [0.9]})
    with pytest.raises(ConfigError, match="global_batch_size=128 is not a multiple of train.micro_batch_size=12"):
        load_config(None, {"train.micro_batch_size": 12})
