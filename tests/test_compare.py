"""``alignx compare``: every recipe through the shared trainer and evaluation on the committed Bible fixture and a
tiny random model — one run end to end, then the report-only path and the argument errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignx.compare import main as compare_main
from alignx.compare import parse_budget
from alignx.recipes import RECIPES, RecipeError
from alignx.schedule import verify_export

BIBLE = Path(__file__).parent / "fixtures" / "bible" / "verses.tsv"
ALL = list(RECIPES)


def args(out: Path, *extra: str) -> list[str]:
    return [
        "--out", str(out), "--model", "tiny-llama", "--langs", "fr", "--versions", "en=WEB,fr=LSG",
        "--bible-db", str(BIBLE), "--train-pairs", "8", "--eval-pairs", "4", "--translate-pairs", "1",
        "--max-new-tokens", "4", "--batch-size", "2", "--micro-batch-size", "2", "--budget", "2:1",
        "--cutoff-len", "128", "--eval-batch-size", "4", "--no-progress", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("compare")
    assert compare_main(args(out, "--recipes", ",".join(ALL))) == 0
    return out


def test_every_recipe_trains_on_the_same_budget_and_is_evaluated(run: Path) -> None:
    state = json.loads((run / "compare.json").read_text())
    assert state["budget"] == {"stage1": 2, "stage2": 1}
    assert list(state["recipes"]) == ALL
    for name, info in state["recipes"].items():
        recipe = RECIPES[name]
        stages = info["stages"]
        assert stages["stage2"]["steps"] == 1 and stages["stage2"]["objective"] == "ntp"
        assert stages["stage2"]["global_batch_size"] == 2
        if recipe.stage1 is None:
            assert "stage1" not in stages and not (run / "runs" / name / "stage1").exists()
        else:
            assert stages["stage1"]["steps"] == 2 and stages["stage1"]["objective"] == recipe.kind
            assert stages["stage1"]["train_records"] >= 2
        verify_export(info["export"])  # a complete HF directory
        assert not any((run / "runs" / name).glob("stage*/checkpoints"))  # removed after the export
        result = json.loads((run / "eval" / f"{name}.json").read_text())
        assert result["model"] == info["export"] and result["retrieval"]["fr"]["n"] == 4
    # Stage 1 of each recipe read its own records.
    afp_rows = state["recipes"]["afp"]["stages"]["stage1"]["train_records"]
    assert afp_rows == state["data"]["afp"]["train"]["records"]
    assert state["recipes"]["clmap"]["stages"]["stage1"]["train_records"] == state["data"]["clmap"]["train"]["records"]
    # sft starts stage 2 from the base model itself.
    sft_cfg = (run / "runs" / "sft" / "stage2" / "config.yaml").read_text()
    assert "tiny-llama" in sft_cfg


def test_the_comparison_report_puts_the_recipes_side_by_side(run: Path) -> None:
    text = (run / "compare.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| metric |"))
    assert header == "| metric | base | " + " | ".join(ALL) + " |"
    assert "stage 1 = 2 optimizer steps × 2 records = 4 records" in text
    for name in ALL:
        assert f"| {name} | {RECIPES[name].title} |" in text
    report = (run / "eval" / "report.md").read_text()
    assert "| direction | base | " in report and "chrF++" in report and "perplexity" in report
    for plot in ("retrieval_by_layer.png", "per_language.png", "probe_by_layer.png"):
        assert (run / "eval" / plot).stat().st_size > 1000


def test_report_only_rebuilds_from_the_results(run: Path) -> None:
    (run / "compare.md").unlink()
    assert compare_main(args(run, "--report-only")) == 0
    assert "| metric | base | alignx" in (run / "compare.md").read_text()


def test_budget_and_recipe_errors(tmp_path: Path, capsys) -> None:
    assert (parse_budget("24").stage1, parse_budget("24").stage2) == (24, 24)
    assert (parse_budget("24:8").stage1, parse_budget("24:8").stage2) == (24, 8)
    for bad in ("x", "0:3", "4:-1"):
        with pytest.raises(RecipeError):
            parse_budget(bad)
    assert compare_main(["--out", str(tmp_path), "--recipes", "alignx,dpo"]) == 2
    assert "unknown recipe 'dpo'" in capsys.readouterr().err
    assert compare_main(["--out", str(tmp_path), "--budget", "ten"]) == 2
