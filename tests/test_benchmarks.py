"""The benchmark suite, at tiny shapes: the harness's statistics, memory method, search and verdict logic, and every
script end to end (rows, skips with reasons, providers that compute the same function, verdicts, the report).

Nothing here is a speed test: no timing is a pass/fail criterion. The memory method is checked against a known
allocation because a method that cannot see an op's allocations would make every memory claim meaningless.
"""

from __future__ import annotations

import csv
import json
from dataclasses import fields
from pathlib import Path

import pytest
from helpers import import_benchmarks

harness = import_benchmarks()
from benchmarks import (  # noqa: E402
    bench_data_validation,
    bench_info_nce,
    bench_lang_match,
    bench_linear_ce,
    bench_span_pool,
    bench_step,
    claims,
    memory,
    report,
    results,
)

COMMON = ["--tiny", "--no-memory", "--skip-compile", "--threads", "1"]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every script once at its tiny shape into one results folder (shared by the tests below)."""
    out = tmp_path_factory.mktemp("bench-results")
    args = [*COMMON, "--out-dir", str(out), "--run-id", "test-run"]
    for module in (bench_span_pool, bench_info_nce, bench_lang_match, bench_linear_ce):
        assert module.main(args) == 0
    step_args = ["--tiny", "--no-memory", "--no-search", "--threads", "1", "--rounds", "1"]
    assert bench_step.main([*step_args, "--out-dir", str(out), "--run-id", "test-run"]) == 0
    return out


# ----------------------------------------------------------------------------------------------------------------
# Harness pieces


def test_quantiles_interpolate_order_statistics() -> None:
    t = harness.quantiles([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.n) == (3.0, 1.8, 4.2, 5)
    one = harness.quantiles([7.0])
    assert (one.median_ms, one.p20_ms, one.p80_ms, one.n) == (7.0, 7.0, 7.0, 1)
    with pytest.raises(ValueError):
        harness.quantiles([])


def test_cpu_sampling_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counts only: a fast call is warmed up and sampled min_reps times; a slow first call counts as a sample."""
    calls = []
    policy = harness.TimingPolicy(min_reps=3, max_reps=3, budget_s=0.0)
    fast = harness.time_callable(lambda: calls.append(1), "cpu", policy=policy)
    assert fast.n == 3 and len(calls) == 4  # one uncounted warm-up
    monkeypatch.setattr(harness, "SLOW_S", 0.0)  # every call is "slow": the first one counts, 2 samples in all
    calls.clear()
    slow = harness.time_callable(lambda: calls.append(1), "cpu", policy=policy)
    assert slow.n == 2 and len(calls) == 2
    calls.clear()
    forced = harness.time_callable(lambda: calls.append(1), "cpu", policy=policy, force_warmup=True)
    assert forced.n == 3 and len(calls) == 4  # torch.compile providers: the first call never counts


def test_memory_method_sees_a_known_peak() -> None:
    """Fresh process + MALLOC_MMAP_THRESHOLD_ + clear_refs: two live 64 MiB tensors and a 64 MiB gradient (which is
    subtracted) must read as 128 MiB of extra memory."""
    nbytes = 64 << 20
    res = memory.run_subprocess_job(
        "benchmarks.memory", "calibration_job", {"nbytes": nbytes}, timeout=120, memory_env=True, threads=1
    )
    assert res["status"] == "ok", res
    # A wrong method is off by a whole 64 MiB tensor; the process's own allocations add up to about 6 MiB (measured).
    assert abs(res["bytes"] - 2 * nbytes) < 16 << 20, res
    assert res["method"] == memory.METHOD_CPU


def test_max_rel_err_and_upstream_grad() -> None:
    import torch

    a, b = torch.tensor([1.0, -4.0]), torch.tensor([1.0, -3.0])
    assert harness.max_rel_err([a], [b]) == pytest.approx(1 / 3)
    assert harness.upstream_grad(torch.zeros(())) is None
    g1, g2 = harness.upstream_grad(torch.zeros(3, 4)), harness.upstream_grad(torch.ones(3, 4))
    assert torch.equal(g1, g2) and g1.std() > 0  # seeded, identical for every provider
    with pytest.raises(ValueError):
        harness.max_rel_err([a], [torch.zeros(3)])


def _row(provider: str, **kw) -> results.Row:
    return results.Row(shape="s", provider=provider, mode="full", status="ok", **kw)


def test_ratio_verdicts() -> None:
    rows = [_row("alignx", time_ms=1.0, extra_mem_mb=5.0), _row("dense", time_ms=2.0, extra_mem_mb=100.0)]
    alignx, dense = claims.lookup(rows, "s", "alignx"), claims.lookup(rows, "s", "dense")
    v = claims.ratio_verdict("mem", alignx, dense, "extra_mem_mb", at_most=0.1)
    assert (v.verdict, v.measured) == ("PASS", 0.05)
    v = claims.ratio_verdict("speed", dense, alignx, "time_ms", at_least=50, why_if_miss="because")
    assert (v.verdict, v.measured) == ("MISS", 2.0) and "because" in v.detail
    assert claims.ratio_verdict("ctx", alignx, dense, "time_ms").verdict == "INFO"
    skipped = results.Row(shape="s", provider="x", mode="full", status="skipped", note="needs CUDA")
    v = claims.ratio_verdict("gone", skipped, dense, "time_ms", at_most=1)
    assert v.verdict == "N/A" and "needs CUDA" in v.detail and v.measured is None
    assert claims.ratio_verdict("none", None, dense, "time_ms", at_most=1).verdict == "N/A"
    assert claims.value_verdict("roof", _row("t", roofline_frac=0.9), "roofline_frac", at_least=0.8).verdict == "PASS"


RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _recorded_rows(path: Path) -> list[results.Row]:
    """The rows of ``cpu.csv`` as the scripts held them when they checked their claims (numbers parsed back)."""
    types = {f.name: f.type for f in fields(results.Row)}
    out = []
    for r in read_csv(path):
        kw = {k: (None if v == "" else float(v) if "float" in types[k] else int(v) if "int" in types[k] else v)
              for k, v in r.items()}  # fmt: skip
        out.append(results.Row(**kw))
    return out


def test_claims_table_gives_the_recorded_verdicts() -> None:
    """The committed measurements, fed to the claims table, give the verdicts recorded in ``cpu_ratios.csv`` by the
    scripts of their day. Claims added later are not in the old runs; runs where a bench appended the same case twice
    are left out (which row counts depends on the process that checked it)."""
    rows = _recorded_rows(RESULTS / "cpu.csv")
    recorded = {(r["run_id"], r["claim"]): r for r in read_csv(RESULTS / "cpu_ratios.csv")}
    modules = {m.BENCH.name: m for m in (bench_span_pool, bench_info_nce, bench_lang_match, bench_linear_ce)}
    checked = 0
    for run, bench in sorted({(r.run_id, r.bench) for r in rows}):
        mine = [r for r in rows if r.run_id == run and r.bench == bench]
        if len({(r.shape, r.provider, r.mode) for r in mine}) < len(mine):
            continue
        if bench in modules:
            got = claims.evaluate(bench, mine, modules[bench].shapes("cpu"), "cpu", units=modules[bench].BENCH.units)
        else:
            real_model = bench == "step" and not any(r.shape.startswith("llama d=") for r in mine)
            got = claims.evaluate(bench, mine, flags=("real-model",) if real_model else ())
        for v in got:
            rec = recorded.get((run, v.claim))
            if rec is None:  # a claim added after that run
                continue
            assert (v.verdict, v.target) == (rec["verdict"], rec["target"]), (run, v)
            want = float(rec["measured"]) if rec["measured"] else None  # written with 6 digits, from 6-digit rows
            assert v.measured == (None if want is None else pytest.approx(want, rel=1e-4)), (run, v)
            assert ("not conclusive" in v.detail) == ("not conclusive" in rec["detail"]), (run, v)
            checked += 1
    assert checked >= 100


@pytest.mark.parametrize("true_max,start,limit", [(1, 16, 512), (23, 16, 512), (100, 16, 512), (700, 16, 512),
                                                   (5, 16, 512), (0, 16, 512), (16, 16, 16)])  # fmt: skip
def test_largest_fitting(true_max: int, start: int, limit: int) -> None:
    probed = []

    def fits(b: int) -> bool:
        probed.append(b)
        return b <= true_max

    best, exact = bench_step.largest_fitting(fits, start, limit)
    want = min(true_max, limit)
    assert best <= want and (best == 0) == (want == 0)
    assert best >= want - max(1, want // 8)
    if exact:
        assert best == want
    assert len(probed) == len(set(probed))  # every probe is a fresh measurement: never the same size twice


# ----------------------------------------------------------------------------------------------------------------
# The scripts end to end


def test_op_scripts_rows_and_same_function(tiny_results: Path) -> None:
    rows = read_csv(tiny_results / "cpu.csv")
    assert {r["run_id"] for r in rows} == {"test-run"}
    for bench in (bench_span_pool.BENCH, bench_info_nce.BENCH, bench_lang_match.BENCH):
        mine = [r for r in rows if r["bench"] == bench.name and r["shape"] != "roofline"]
        assert {r["provider"] for r in mine} == {p.name for p in bench.providers}
        roof = [r for r in rows if r["bench"] == bench.name and r["shape"] == "roofline"]
        assert roof and all(float(r["metric"]) > 0 for r in roof)
        for r in mine:
            if r["status"] == "skipped":
                assert r["note"], f"{bench.name}/{r['provider']}: a skip must give its reason"
                continue
            assert r["status"] == "ok", (bench.name, r["provider"], r["note"])
            assert float(r["time_ms"]) > 0 and r["unit"] == bench.unit
            if r["mode"] == "full" and r["provider"] != "reference":
                # Every provider computes the reference's function: output and every gradient.
                assert r["note"] == "err vs reference"
                assert float(r["max_rel_err"]) < 1e-4, (bench.name, r["provider"], r["max_rel_err"])
        ran = {r["provider"] for r in mine if r["status"] == "ok"}
        assert {"reference", "alignx"} <= ran
        skipped = {r["provider"]: r["note"] for r in mine if r["status"] == "skipped"}
        assert "compile" in skipped and "alignx-triton" in skipped and "CUDA" in skipped["alignx-triton"]


def test_linear_ce_script_rows_and_same_function(tiny_results: Path) -> None:
    """The dense HF head is the base; every other provider (today's chunked loss, torch's policies, alignx) computes
    its loss and both gradients; the GPU-only providers are skipped with their reason; the claims are recorded."""
    rows = [r for r in read_csv(tiny_results / "cpu.csv") if r["bench"] == "linear_ce" and r["shape"] != "roofline"]
    assert {r["provider"] for r in rows} == {p.name for p in bench_linear_ce.BENCH.providers}
    assert {r["mode"] for r in rows} == {"fwd", "full"}  # forward-time gradients: no separate backward mode
    full = {r["provider"]: r for r in rows if r["mode"] == "full"}
    assert full["hf"]["status"] == "ok" and not full["hf"]["max_rel_err"]  # the base
    ran = {p for p, r in full.items() if r["status"] == "ok"}
    assert {"hf", "objective", "alignx", "torch-lce-compact", "torch-lce-compact-bigchunk"} <= ran
    for p in ran - {"hf"}:
        assert full[p]["note"] == "err vs hf" and float(full[p]["max_rel_err"]) < 1e-5, (p, full[p]["max_rel_err"])
    for p in ("alignx-triton", "liger", "cce"):
        assert full[p]["status"] == "skipped" and full[p]["note"], p
    ratios = [r for r in read_csv(tiny_results / "cpu_ratios.csv") if r["claim"].startswith("LinearCE")]
    claims = " | ".join(r["claim"] for r in ratios)
    assert "HF head + cross-entropy" in claims and "at its best policy (torch-lce-" in claims


def test_official_idioms_ran(tiny_results: Path) -> None:
    rows = read_csv(tiny_results / "cpu.csv")
    ok = {(r["bench"], r["provider"]) for r in rows if r["status"] == "ok"}
    assert {("info_nce", "official"), ("lang_match", "official"), ("span_pool", "masked-product"),
            ("span_pool", "segment_reduce"), ("span_pool", "embedding_bag")} <= ok  # fmt: skip


def test_step_objectives_agree(tiny_results: Path) -> None:
    rows = [r for r in read_csv(tiny_results / "cpu.csv") if r["bench"] == "step"]
    full = {r["provider"]: r for r in rows if r["mode"] == "full"}
    assert set(full) == set(bench_step.OBJECTIVES)
    assert all(r["status"] == "ok" and float(r["time_ms"]) > 0 for r in full.values())
    assert float(full["official"]["max_rel_err"]) < 1e-3  # alignx and the official style: the same gradients
    assert full["alignx"]["note"].startswith("ops: ")


def test_verdicts_recorded(tiny_results: Path) -> None:
    ratios = read_csv(tiny_results / "cpu_ratios.csv")
    claims = " | ".join(r["claim"] for r in ratios)
    for needle in ("InfoNCE", "LangMatch", "LinearCE", "Span pooling", "Stage-1 step"):
        assert needle in claims
    assert {r["verdict"] for r in ratios} <= {"PASS", "MISS", "N/A", "INFO"}
    same = [r for r in ratios if "same loss and gradients" in r["claim"]]
    assert same and same[0]["verdict"] == "PASS"


def test_report_markdown_and_plots(tiny_results: Path) -> None:
    path = report.render("cpu", tiny_results)
    text = path.read_text()
    assert "## Ratios" in text and "masked-product" in text and "alignx-triton" in text
    for bench in ("span_pool", "info_nce", "lang_match", "linear_ce", "step"):
        png = tiny_results / f"cpu_{bench}.png"
        assert png.exists() and png.stat().st_size > 1000
        assert f"({png.name})" in text


# ----------------------------------------------------------------------------------------------------------------
# Data validation (issue 16): the checks against a bypass that removes exactly them


def test_data_validation_bypass_removes_the_checks_only() -> None:
    """The bypassed normalisers give the checked rows for every record the checks pass (and for the field errors that
    predate them), keep what the checks drop, and the bypass is undone on exit."""
    from alignx.data import records, tokenize

    ok1 = {"src_text": "Hapo mwanzo.", "tgt_text": "In the beginning.", "src_lang": "sw", "tgt_lang": "en"}
    for rec in (ok1, {**ok1, "instruction": "Translate."}, {**ok1, "src_lang": "xx"}, {**ok1, "tgt_text": " "},
                {**ok1, "src_text": None}, {**ok1, "tgt_lang": 3}):  # fmt: skip
        assert bench_data_validation.normalize_stage1_unchecked(rec, 7) == records.normalize_stage1(rec, 7), rec
    ok2 = {"instruction": "Repeat.", "input": "", "output": "Karibu.", "lang": "sw"}
    for rec in (ok2, {**ok2, "input": None}, {**ok2, "lang": "xx"}, {**ok2, "output": ""}):
        assert bench_data_validation.normalize_stage2_unchecked(rec, 7) == records.normalize_stage2(rec, 7), rec
    for rec in ({**ok1, "tgt_lang": "sw"}, {**ok1, "tgt_text": ok1["src_text"]}, {**ok1, "src_text": "a\x00b"}):
        assert records.normalize_stage1(rec)["drop"] in records.POISON_REASONS
        assert bench_data_validation.normalize_stage1_unchecked(rec)["drop"] == ""
    assert records.normalize_stage2({**ok2, "output": "\x07"})["drop"] == "bad_characters"
    assert bench_data_validation.normalize_stage2_unchecked({**ok2, "output": "\x07"})["drop"] == ""

    real = {name: getattr(tokenize, name) for name in bench_data_validation.BYPASS}
    with bench_data_validation.checks_bypassed():
        assert all(getattr(tokenize, name) is bench_data_validation.BYPASS[name] for name in real)
    assert all(getattr(tokenize, name) is fn for name, fn in real.items())


def test_data_validation_script_tiny(tmp_path: Path) -> None:
    """The script end to end on synthetic records: both arms prepare every file, the checked arm drops the six
    poisoned records and the bypassed arm keeps them, and the rows, the verdict and the JSON are written. Nothing
    about the times is asserted."""
    out = tmp_path / "results"
    argv = ["--tiny", "--out-dir", str(out), "--run-id", "test-run", "--scratch", str(tmp_path)]
    assert bench_data_validation.main(argv) == 0
    result = json.loads((out / "cpu_data_validation.json").read_text())
    checked, bypassed = result["arms"]["checked"], result["arms"]["bypassed"]
    poisoned = {"bad_characters": 1, "same_language": 1, "identical_text": 1, "duplicate": 1}
    assert checked["drops"]["stage1/train"] == poisoned
    assert checked["drops"]["stage2/train"] == {"bad_characters": 1, "duplicate": 1}
    assert not any(bypassed["drops"].values())
    assert sum(bypassed["kept"].values()) - sum(checked["kept"].values()) == 6
    assert result["data"]["lines"] == {"stage1/train": 44, "stage1/dev": 12, "stage2/train": 26, "stage2/dev": 8}
    assert result["reps"] == 1 and set(result["ratio_of_medians"]) == {"cpu", "wall"}
    rows = [r for r in read_csv(out / "cpu.csv") if r["bench"] == "data_validation"]
    assert {(r["provider"], r["mode"]) for r in rows} == {
        (a, c) for a in ("checked", "bypassed") for c in ("cpu", "wall")
    }
    assert all(r["status"] == "ok" and r["run_id"] == "test-run" and float(r["time_ms"]) > 0 for r in rows)
    ratios = [r for r in read_csv(out / "cpu_ratios.csv") if r["claim"].startswith("Data preparation")]
    assert ratios[0]["target"] == "<= 1.05" and ratios[0]["verdict"] in ("PASS", "MISS")
    assert not list(tmp_path.glob("alignx-bench-data-*"))  # the data and the caches are removed
    text = report.render("cpu", out, "test-run", plots=False).read_text()
    assert "bypassed" in text and "Data preparation" in text
