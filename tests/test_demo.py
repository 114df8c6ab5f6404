"""alignx demo: its command line and the config it trains with (the run itself needs the packaged model)."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignx.config import load_config
from alignx.demo import demo_overrides, parse_args, parser


def test_demo_defaults_make_a_valid_config(tmp_path: Path) -> None:
    args = parser().parse_args([])
    cfg = load_config(None, demo_overrides(args, tmp_path / "data", tmp_path / "train"))
    assert cfg.model.name_or_path == "gemma3-270m"
    assert cfg.objective.kind == "alignx" and cfg.objective.center == "none"
    assert (cfg.train.max_steps, cfg.stage2.max_steps) == (40, 12)
    assert cfg.train.global_batch_size == cfg.train.micro_batch_size == 8
    assert cfg.train.eval_every == 0
    assert cfg.data.train_file == str(tmp_path / "data" / "stage1" / "train.jsonl")
    assert cfg.stage2.train_file == str(tmp_path / "data" / "stage2" / "train.jsonl")


def test_demo_centred_objective_and_bad_center(tmp_path: Path) -> None:
    args = parser().parse_args(["--center", "batch", "--steps", "3"])
    cfg = load_config(None, demo_overrides(args, tmp_path, tmp_path))
    assert cfg.objective.center == "batch" and cfg.train.max_steps == 3
    with pytest.raises(SystemExit):
        parser().parse_args(["--center", "layer"])


def test_demo_defaults_are_the_measured_alignment_settings_and_the_reference_is_one_flag(tmp_path: Path) -> None:
    cfg = load_config(None, demo_overrides(parse_args([]), tmp_path, tmp_path))
    assert (cfg.objective.similarity, cfg.objective.similarity_per_language) == ("whiten", True)
    assert cfg.data.batching == "direction" and cfg.model.align_layer == "auto"
    ref = load_config(None, demo_overrides(parse_args(["--reference"]), tmp_path, tmp_path))
    assert (ref.objective.similarity, ref.objective.similarity_per_language) == ("cosine", False)
    assert ref.data.batching == "mixed" and ref.model.align_layer is None and ref.objective.center == "none"
    centred = load_config(None, demo_overrides(parse_args(["--center", "batch"]), tmp_path, tmp_path))
    assert centred.objective.similarity == "center"
    assert (
        load_config(None, demo_overrides(parse_args(["--align-layer", "11"]), tmp_path, tmp_path)).model.align_layer
        == 11
    )


def test_demo_learning_rate_is_the_measured_one_and_the_reference_keeps_its_own(tmp_path: Path) -> None:
    """7e-5 doubles Swahili within +2 % English perplexity (examples/demo); --reference keeps its committed 3e-5."""
    cfg = load_config(None, demo_overrides(parse_args([]), tmp_path, tmp_path))
    ref = load_config(None, demo_overrides(parse_args(["--reference"]), tmp_path, tmp_path))
    assert (cfg.optim.lr, ref.optim.lr) == (7e-5, 3e-5)
    for argv in (["--lr", "1e-4"], ["--reference", "--lr", "1e-4"]):
        assert load_config(None, demo_overrides(parse_args(argv), tmp_path, tmp_path)).optim.lr == 1e-4
