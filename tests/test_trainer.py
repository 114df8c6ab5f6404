"""The trainer end to end on CPU: ``train.py`` with ``configs/tiny_cpu.yaml`` (random 4-layer Llama, offline tokenizer,
generated records, ZeRO-3, fp32).

* ``--stage all`` runs stage 1 -> stage 2 from one command; both exports load with ``AutoModelForCausalLM`` and hold
  no language-matching weights; every loss term, lr, grad norm, tokens/s, drops and eval losses are logged.
* A run killed with SIGKILL, resumed, stopped by SIGTERM (checkpoint on the signal), and resumed again reproduces
  the uninterrupted run's loss curve step for step (1e-5) and its exported weights.
* Bad input stops before any model is loaded, with a message naming the key / file and line, and a non-zero exit.

The uninterrupted reference run is shared with ``tests/test_dist.py`` (2 processes must match it).
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import (
    REPO,
    TINY,
    TOTAL_STEPS,
    by_step,
    clean_env,
    load_weights,
    process_group_scope,
    reference_run,
    run_train,
    shared_data,
    tiny_args,
)

from alignx.cli import main as alignx_main
from alignx.cli import train_main
from alignx.metrics import read_metrics

TERMS = ("train/loss", "train/ntp", "train/ctr", "train/lam", "train/grad_norm", "train/lr")


# ----------------------------------------------------------------------------------------------------------------
# Fixtures (the helpers shared with test_dist.py and others are in helpers.py)


@pytest.fixture(scope="module", autouse=True)
def _own_process_group() -> Iterator[None]:
    with process_group_scope():
        yield


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return reference_run(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp()


# ----------------------------------------------------------------------------------------------------------------
# Stage 1 -> stage 2 from one command


def test_stage_all_exports_plain_hf_models(reference: Path) -> None:
    from transformers import AutoModelForCausalLM

    from alignx.config import load_config
    from alignx.testing import tiny_pretrained

    base_keys = set(AutoModelForCausalLM.from_pretrained(tiny_pretrained("tiny-llama")).state_dict())
    for stage in (1, 2):
        export = reference / f"stage{stage}" / "export"
        model = AutoModelForCausalLM.from_pretrained(export)
        assert set(model.state_dict()) == base_keys
        assert model.config.use_cache  # exported for generation (training ran without the KV cache)
        saved = load_weights(export)
        assert not [k for k in saved if "lang_head" in k or k.startswith("lm.")]
        assert set(saved) <= base_keys
        summary = json.loads((reference / f"stage{stage}" / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["steps"] == summary["total_steps"]
        cfg = load_config(reference / f"stage{stage}" / "config.yaml")  # the resolved config, loadable
        assert cfg.train.output_dir == str(reference)
    s2 = load_config(reference / "stage2" / "config.yaml")
    assert s2.model.name_or_path == str(reference / "stage1" / "export")
    assert s2.objective.kind == "ntp"
    assert json.loads((reference / "stage1" / "summary.json").read_text())["steps"] == TOTAL_STEPS
    # Stage 2 started from stage 1's weights, not from the base model.
    s1 = load_weights(reference / "stage1" / "export")
    base_w = AutoModelForCausalLM.from_pretrained(tiny_pretrained("tiny-llama")).state_dict()
    assert any(not torch.equal(s1[k], base_w[k]) for k in s1)


def test_metrics_hold_every_term_and_are_finite(reference: Path) -> None:
    s1 = by_step(reference / "stage1" / "metrics.jsonl")
    assert sorted(k for k in s1 if k > 0) == list(range(1, TOTAL_STEPS + 1))
    for step in range(1, TOTAL_STEPS + 1):
        row = s1[step]
        for key in (*TERMS, "train/tokens_per_s", "train/rows_dropped"):
            assert key in row and row[key] is not None and math.isfinite(row[key]), (step, key)
        # The logged total is the weighted sum of the logged terms (reference weights 0.3 / 0.4).
        assert row["train/loss"] == pytest.approx(
            row["train/ntp"] + 0.3 * row["train/ctr"] + 0.4 * row["train/lam"], rel=1e-5
        )
    assert any(k.startswith("data/dropped/") for k in s1[0])
    evals = [s for s, r in s1.items() if "eval/loss" in r]
    assert evals == [4, 8, 12]
    assert s1[TOTAL_STEPS]["eval/loss"] < s1[4]["eval/loss"]
    assert s1[TOTAL_STEPS]["train/loss"] < s1[1]["train/loss"]
    # lr: 0 at the first step (warm-up 2), peak at step 3, linear decay to 1/10 of the peak at the last step.
    assert [s1[s]["train/lr"] for s in (1, 2, 3, TOTAL_STEPS)] == pytest.approx([0.0, 5e-4, 1e-3, 1e-4])
    s2 = by_step(reference / "stage2" / "metrics.jsonl")
    assert "train/ctr" not in s2[1] and math.isfinite(s2[4]["train/ntp"])
    assert list((reference / "stage1" / "tensorboard").glob("events.out.tfevents.*"))


# ----------------------------------------------------------------------------------------------------------------
# SIGKILL, SIGTERM, resume


def _wait_for(proc: subprocess.Popen, cond, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (code {proc.returncode}) before {what}:\n{out[-2000:]}\n{err[-3000:]}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def _popen(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=REPO,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _max_step(path: Path) -> int:
    return max((r["step"] for r in read_metrics(path) if "train/loss" in r), default=0) if path.is_file() else 0


def test_sigkill_and_sigterm_resume_reproduce_the_run(reference: Path, base: Path) -> None:
    out = base / "interrupted"
    args = tiny_args(base, out, "--stage", "1")
    ckpts, metrics = out / "stage1" / "checkpoints", out / "stage1" / "metrics.jsonl"

    # 1. SIGKILL right after the first checkpoint (step 4) is complete.
    proc = _popen(args)
    _wait_for(proc, lambda: (ckpts / "latest").is_file(), "the first checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert (ckpts / "latest").read_text() == "step_4"
    assert not (out / "stage1" / "summary.json").exists()

    # 2. Resume; SIGTERM mid-way: the run checkpoints where it stands and exits with 143.
    proc = _popen([*args, "--resume", "auto"])
    _wait_for(proc, lambda: _max_step(metrics) >= 6, "step 6 of the resumed run")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    stopped = int((ckpts / "latest").read_text().removeprefix("step_"))
    assert 6 <= stopped < TOTAL_STEPS, "SIGTERM should stop the run before its end"
    assert not (out / "stage1" / "export").exists()

    # 3. Resume to the end.
    proc = run_train([*args, "--resume", "auto"])
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert f"resumed from {ckpts / f'step_{stopped}'} at step {stopped}" in proc.stdout

    got, want = by_step(metrics), by_step(reference / "stage1" / "metrics.jsonl")
    assert sorted(got) == sorted(want)
    for step, row in want.items():
        for key, value in row.items():
            if key.endswith("tokens_per_s"):
                continue
            assert got[step][key] == pytest.approx(value, abs=1e-5, rel=0), (step, key)
    resumed, uninterrupted = load_weights(out / "stage1" / "export"), load_weights(reference / "stage1" / "export")
    for key, ref in uninterrupted.items():
        torch.testing.assert_close(resumed[key], ref, atol=1e-5, rtol=0, msg=key)


# ----------------------------------------------------------------------------------------------------------------
# Bad input: clear errors, before any model is loaded


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a model is loaded."""
    import alignx.model

    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(alignx.model, "load_causal_lm", boom)


def test_bad_config_key_fails_before_loading(base: Path, capsys, monkeypatch, no_model) -> None:
    import alignx.model

    monkeypatch.setattr(alignx.model, "load_tokenizer", lambda *a, **k: pytest.fail("tokenizer loaded"))
    code = train_main(tiny_args(base, base / "bad_key", "--objective.temprature=0.05"))
    err = capsys.readouterr().err
    assert code == 2
    assert "objective.temprature" in err and "did you mean 'objective.temperature'" in err
    assert train_main(tiny_args(base, base / "bad_key", "--engine.zero_stage=three")) == 2
    assert "engine.zero_stage must be an integer" in capsys.readouterr().err
    assert train_main(["--config", str(TINY), "--data.train_file=/nonexistent/pairs.jsonl"]) == 2
    assert "data.train_file: file not found" in capsys.readouterr().err


def test_malformed_json_line_names_file_and_line(base: Path, tmp_path: Path, capsys, no_model) -> None:
    pairs, _ = shared_data(base)
    bad = tmp_path / "bad.jsonl"
    lines = pairs.read_text().splitlines()
    lines[2] = '{"src_text": "Hello", "tgt_text": '  # cut off
    bad.write_text("\n".join(lines) + "\n")
    code = train_main(tiny_args(base, tmp_path / "out", "--stage", "1", f"--data.train_file={bad}"))
    err = capsys.readouterr().err
    assert code == 1
    assert f"{bad}:3: malformed JSON" in err
    assert "Traceback" not in err


def test_all_records_dropped_is_a_clear_error(base: Path, tmp_path: Path, capsys, no_model) -> None:
    bad = tmp_path / "empty.jsonl"
    recs = [{"src_text": " ", "tgt_text": "Habari", "src_lang": "en", "tgt_lang": "sw"}] * 5
    recs += [{"src_text": "Hello", "tgt_text": "x", "src_lang": "en", "tgt_lang": "qq"}] * 5
    bad.write_text("".join(json.dumps(r) + "\n" for r in recs))
    code = train_main(tiny_args(base, tmp_path / "out", "--stage", "1", f"--data.train_file={bad}"))
    err = capsys.readouterr().err
    assert code == 1
    assert "no usable record" in err and "empty_source" in err and "unknown_language" in err


def test_fewer_records_than_one_step_is_a_clear_error(base: Path, tmp_path: Path, capsys, no_model) -> None:
    pairs, _ = shared_data(base)
    small = tmp_path / "small.jsonl"
    small.write_text("".join(pairs.read_text().splitlines(keepends=True)[:11]))  # 8 held out, 3 < global batch 4
    code = train_main(tiny_args(base, tmp_path / "out", "--stage", "1", f"--data.train_file={small}"))
    err = capsys.readouterr().err
    assert code == 1 and "fewer than one global batch of 4" in err


def test_fresh_run_refuses_a_directory_with_checkpoints(reference: Path, base: Path, capsys, no_model) -> None:
    code = train_main(tiny_args(base, reference, "--stage", "1"))
    assert code == 1 and "--resume auto" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Stage 2 hand-off checks


def test_stage2_without_stage1_export_names_the_command(base: Path, tmp_path: Path, capsys) -> None:
    code = train_main(tiny_args(base, tmp_path / "fresh", "--stage", "2", "--optim.lr=0.002"))
    err = capsys.readouterr().err
    assert code == 1
    assert "stage 2 starts from stage 1's export" in err
    assert f"deepspeed train.py --config {TINY} --stage 1" in err and "--optim.lr=0.002" in err


def test_stage2_refuses_an_incomplete_export(reference: Path, tmp_path: Path, capsys) -> None:
    import shutil

    from alignx.schedule import StageError, verify_export

    export = tmp_path / "run" / "stage1" / "export"
    shutil.copytree(reference / "stage1" / "export", export)
    assert verify_export(export)["complete"]
    weights = export / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a copy cut short
    with pytest.raises(StageError, match="model.safetensors has .* bytes, the manifest says"):
        verify_export(export)
    (export / "alignx_export.json").unlink()
    with pytest.raises(StageError, match="did not finish"):
        verify_export(export)


# ----------------------------------------------------------------------------------------------------------------
# alignx console script


def test_alignx_config_prints_every_key_with_its_doc(capsys) -> None:
    from alignx.config import _all_keys

    assert alignx_main(["config"]) == 0
    out = capsys.readouterr().out
    for key in _all_keys():
        section, name = key.split(".")
        assert f"  {name}: " in out
    assert "# DeepSpeed ZeRO stage 0-3." in out
    assert alignx_main(["config", "--config", str(TINY)]) == 0
    assert "zero3_param_persistence_threshold: 0  #" in capsys.readouterr().out
    assert alignx_main(["config", "--engine.zero_stag=1"]) == 2


def test_alignx_dispatch_missing_module_is_clear(monkeypatch, capsys) -> None:
    import alignx.cli

    monkeypatch.setitem(alignx.cli.DISPATCH, "eval", ("alignx.no_such_module", "main", 1))
    assert alignx_main(["eval", "--x"]) == 2
    assert "`alignx eval` needs alignx.no_such_module" in capsys.readouterr().err
    assert alignx_main(["nonsense"]) == 2
