"""``make gpu-check``: the dry run on this CPU machine, the time budgets, the results format and the skip logic.

The real run needs a GPU; what it does without one is checked here: ``make gpu-check DRY_RUN=1`` passes and plans
at most 8 minutes; parts end by their cumulative deadlines (a slow part is killed, the parts after an exhausted budget
are skipped, a part after a failed one it needs is skipped, the exit code is 1); the parsers read what pytest, the
benchmark harness and the trainer really write; a package without an installable wheel is a recorded skip.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


gc = _load()


def test_make_gpu_check_dry_run_passes_within_eight_minutes(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        ["make", "-s", "gpu-check", "DRY_RUN=1", f"GPU_CHECK_ARGS=--results-dir {out}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sum(p.budget_s for p in gc.PARTS) <= 480
    assert "total           480 s = 8.0 min" in proc.stdout
    doc = json.loads((out / "gpu_check.json").read_text())
    assert gc.validate_results(doc) == [] and doc["dry_run"] and doc["exit_code"] == 0
    assert [p["name"] for p in doc["parts"]] == [p.name for p in gc.PARTS]
    assert all(p["status"] == "checked" for p in doc["parts"]), [(p["name"], p["note"]) for p in doc["parts"]]
    kernel = next(p for p in doc["parts"] if p["name"] == "kernel-tests")
    assert all(n > 0 for n in kernel["summary"]["gpu_tests_per_file"].values())
    assert "| kernel-tests |" in (out / "gpu_check.md").read_text()


def test_parts_end_by_their_cumulative_deadlines(tmp_path: Path) -> None:
    ctx = gc.Context(tmp_path / "r", tmp_path / "venv")

    def slow(ctx, res, timeout):  # noqa: ANN001
        code, timed_out = gc.run_cmd([sys.executable, "-c", "import time; time.sleep(60)"], ctx.log("slow"), timeout)
        res.status = "timeout" if timed_out else "ok"

    def ok(ctx, res, timeout):  # noqa: ANN001
        res.status = "ok"

    def boom(ctx, res, timeout):  # noqa: ANN001
        raise RuntimeError("broken part")

    parts = (
        gc.Part("first", 8, "", ok, None),
        gc.Part("slow", 6, "", slow, None),
        gc.Part("after-slow", 1, "", ok, None),
        gc.Part("needs-slow", 20, "", ok, None, ("slow",)),
        gc.Part("raises", 20, "", boom, None),
        gc.Part("last", 20, "", ok, None),
    )
    t0 = time.monotonic()
    results, code = gc.run_parts(ctx, parts, time_limit=75, started="now")
    by = {r.name: r for r in results}
    assert time.monotonic() - t0 < 30  # the 60 s sleep was killed at its deadline (8 + 6 s)
    assert by["first"].status == "ok" and by["slow"].status == "timeout"
    assert by["after-slow"].status == "skipped" and "time budget exhausted" in by["after-slow"].note
    assert by["needs-slow"].status == "skipped" and "needs slow" in by["needs-slow"].note
    assert by["raises"].status == "failed" and "broken part" in by["raises"].note
    assert by["last"].status == "ok" and code == 1
    doc = json.loads((ctx.results / "gpu_check.json").read_text())
    assert gc.validate_results(doc) == [] and doc["exit_code"] == 1


def test_a_package_without_a_wheel_or_that_does_not_import_is_a_recorded_skip(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    ctx = gc.Context(tmp_path / "r", venv)
    res = gc.PartResult("extras", 45)
    first = gc.OPTIONAL[0][0]

    def installer(pkg: str) -> list[str]:
        if pkg == first:  # "installs", but its module is not importable here
            return [sys.executable, "-c", "pass"]
        return [sys.executable, "-c", f"print('ERROR: No matching distribution found for {pkg}'); raise SystemExit(1)"]

    gc.install_optional(ctx, res, time.monotonic() + 120, installer=installer)
    assert res.status == "ok" and res.summary["installed"] == []
    reasons = {s["what"]: s["reason"] for s in res.skips}
    assert set(reasons) == {p for p, _, _ in gc.OPTIONAL}
    assert reasons[first].startswith("installed but does not import")
    for pkg, _, _ in gc.OPTIONAL[1:]:
        assert f"No matching distribution found for {pkg}" in reasons[pkg]


def test_junit_report_of_a_real_pytest_run_is_parsed(tmp_path: Path) -> None:
    (tmp_path / "test_sample.py").write_text(
        "import pytest\ndef test_ok():\n    pass\ndef test_bad():\n    assert False\n"
        "@pytest.mark.skip(reason='x')\ndef test_skip():\n    pass\n"
    )
    xml = tmp_path / "r.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                    "-o", "addopts=", str(tmp_path / "test_sample.py")], cwd=tmp_path, capture_output=True,
                   timeout=120)  # fmt: skip
    got = gc.parse_junit(xml)
    assert (got["tests"], got["passed"], got["skipped"]) == (3, 1, 1) and got["failed"] == ["test_sample::test_bad"]


def test_benchmark_rows_written_by_the_harness_are_parsed(tmp_path: Path) -> None:
    from helpers import import_benchmarks

    harness = import_benchmarks()
    from benchmarks import claims, results

    # RunInfo as run_info() fills it on a GPU machine (its device name comes from CUDA, absent here).
    info = results.RunInfo("run1", "2026-12-07T00:00:00+00:00", "abc", "cuda", "NVIDIA H100 80GB HBM3", "2.13.0", 0)
    rows = [
        info.row(bench="info_nce", shape="roofline", provider="gemm-bf16", mode="-", status="ok", metric=700.0),
        info.row(bench="info_nce", shape="roofline", provider="copy", mode="-", status="ok", metric=2900.0),
        info.row(bench="info_nce", shape="B=N=16384", provider="alignx-triton", mode="full", status="ok",
                 time_ms=20.0, metric=560.0, unit="TFLOP/s", roofline_frac=0.8),
        info.row(bench="info_nce", shape="B=N=16384", provider="inf_cl", mode="full", status="skipped",
                 note="inf_cl is not installed"),
    ]  # fmt: skip
    results.append_csv(tmp_path / "cuda.csv", rows)
    opts = harness.BenchOptions(device="cuda", out_dir=tmp_path)
    claims.append_verdicts(opts, info, [claims.Verdict("claim", 0.8, ">= 0.8", "PASS", "d")])
    got = gc.parse_bench(tmp_path)
    assert got["roofline"] == {"gemm-bf16": 700.0, "copy": 2900.0}
    triton = got["ops"]["info_nce"][0]
    assert triton["fraction_of_roofline"] == 0.8 and triton["rate"] == "560 TFLOP/s"
    assert got["ops"]["info_nce"][1]["status"] == "skipped" and got["verdicts_pass"] == 1


@pytest.mark.parametrize("peaks", [[3 << 30], [1 << 30, 2 << 30]])
def test_train_summary_fields_are_read(tmp_path: Path, peaks: list[int]) -> None:
    # The keys the trainer's summary.json holds (alignx/trainer.py, Trainer._summary).
    summary = {"steps": 20, "tokens_per_s": 12345.0, "peak_memory_bytes_per_rank": peaks, "zero_stage": 2,
               "peak_memory_method": "torch.cuda.max_memory_allocated", "first_train_loss": 9.0,
               "last_train_loss": 7.0, "precision": "bf16", "seconds": 30.0}  # fmt: skip
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    got = gc.parse_train_summary(tmp_path / "summary.json")
    assert got["tokens_per_s"] == 12345.0 and got["peak_memory_gib"] == max(peaks) / 2**30 and got["steps"] == 20
