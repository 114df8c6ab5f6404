"""A tiny end-to-end stage 1 with the alignment options on: whitened per-language similarity, direction-homogeneous
batches and ``model.align_layer=auto``, under ZeRO-3 (``configs/tiny_cpu.yaml``).

* The run logs the contrastive diagnostics at every step, records the measured layer (console, ``align/layer``,
  the saved ``config.yaml``, ``summary.json``) and checkpoints the running statistics.
* Resumed from its step-8 checkpoint, it reproduces the rest of the uninterrupted run exactly: the same losses and
  diagnostics bit for bit, the same final statistics (so the statistics, the layer and the homogeneous batch order
  all survive a resume).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import by_step, run_train, tiny_args

ALIGN = [
    "--stage", "1",
    "--objective.similarity=whiten", "--objective.similarity_per_language=true", "--data.batching=direction",
    "--model.align_layer=auto", "--model.align_probe_records=8",
    "--train.eval_every=0", "--train.save_every=4", "--train.keep_checkpoints=10",
]  # fmt: skip


@pytest.fixture(scope="module")
def aligned_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    base = tmp_path_factory.getbasetemp()
    out = base / "aligned"
    proc = run_train(tiny_args(base, out, *ALIGN))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return base, out, proc.stdout


def _stats(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "similarity_stats.pt", weights_only=True)


def test_the_run_logs_diagnostics_and_records_the_measured_layer(aligned_run) -> None:
    _, out, stdout = aligned_run
    assert "model.align_layer=auto: layer" in stdout
    rows = by_step(out / "stage1" / "metrics.jsonl")
    layer = int(rows[0]["align/layer"])
    saved = yaml.safe_load((out / "stage1" / "config.yaml").read_text())
    summary = json.loads((out / "stage1" / "summary.json").read_text())
    assert saved["model"]["align_layer"] == layer == summary["align_layer"]
    assert summary["align_layer_probe"]["layer"] == layer and layer in summary["align_layer_probe"]["candidates"]
    train = [r for s, r in rows.items() if s > 0]
    for key in ("top1", "chance", "nce_ratio", "pos_sim", "neg_sim_std", "raw_cos", "top_dims_share", "trained"):
        assert all(f"train/{key}" in r for r in train), key
    assert train[0]["train/trained"] == 0.0 and train[-1]["train/trained"] == 1.0  # one warm-up step
    last = sorted((out / "stage1" / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]))[-1]
    stats = _stats(last)
    assert stats["per_language"] and stats["full"] and stats["steps"] == int(last.name[5:])


def test_resume_reproduces_losses_statistics_and_batches(aligned_run) -> None:
    base, out, _ = aligned_run
    resumed = base / "aligned_resumed"
    shutil.copytree(out, resumed)
    ckpts = resumed / "stage1" / "checkpoints"
    for later in ckpts.glob("step_*"):
        if int(later.name[5:]) > 8:
            shutil.rmtree(later)
    (ckpts / "latest").write_text("step_8")
    for gone in ("export", "summary.json"):
        shutil.rmtree(resumed / "stage1" / gone, ignore_errors=True)
        (resumed / "stage1" / gone).unlink(missing_ok=True)
    proc = run_train([*tiny_args(base, resumed, *ALIGN), "--resume", "auto"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "resumed from" in proc.stdout and "model.align_layer=auto: layer" not in proc.stdout
    got, want = by_step(resumed / "stage1" / "metrics.jsonl"), by_step(out / "stage1" / "metrics.jsonl")
    assert sorted(got) == sorted(want)
    for step, row in want.items():
        for key, value in row.items():
            if not key.endswith("tokens_per_s"):
                assert got[step][key] == value, (step, key)  # bit for bit
    final = max(int(p.name[5:]) for p in (out / "stage1" / "checkpoints").glob("step_*"))
    a, b = _stats(out / "stage1" / "checkpoints" / f"step_{final}"), _stats(ckpts / f"step_{final}")
    assert a["keys"] == b["keys"] and torch.equal(a["count"], b["count"])
    assert all(torch.equal(x, y) for x, y in zip(a["sum"] + a["second"], b["sum"] + b["second"]))
    saved = yaml.safe_load((resumed / "stage1" / "config.yaml").read_text())
    assert saved["model"]["align_layer"] == int(want[0]["align/layer"])
