"""Run every benchmark script on one device, then write the report (``make bench`` / ``make bench-gpu``).

``python -m benchmarks.run --device cpu`` runs ``bench_span_pool``, ``bench_info_nce``, ``bench_lang_match``,
``bench_linear_ce``, ``bench_step`` and ``bench_data_validation`` one after the other, each in its own process, under
one run id; rows are appended to ``benchmarks/results/<device>.csv``, the PASS/MISS ratios to
``<device>_ratios.csv``, and :mod:`benchmarks.report` writes ``<device>.md`` and the PNG plots. The CPU subset is
sized for about 20 minutes on an idle 2-core machine with 2 torch threads; the load average is recorded next to every
number because a shared machine slows everything down unevenly.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .claims import append_verdicts, evaluate, print_verdicts
from .harness import BenchOptions
from .memory import run_subprocess_job
from .results import REPO, RESULTS_DIR, Row, RunInfo, run_info, say

SCRIPTS = ("span_pool", "info_nce", "lang_match", "linear_ce", "step", "data_validation")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every script (0 = torch default)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {','.join(SCRIPTS)}")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    parser.add_argument("--no-memory", action="store_true", help="timing only")
    parser.add_argument("--skip-compile", action="store_true", help="report the torch.compile providers as skipped")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke run of the whole pipeline)")
    parser.add_argument("--quick", action="store_true", help="one shape per op (the short GPU sweep of gpu_check)")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate the markdown and plots")
    args = parser.parse_args(argv)

    scripts = [s for s in args.only.split(",") if s] or list(SCRIPTS)
    unknown = sorted(set(scripts) - set(SCRIPTS))
    if unknown:
        raise SystemExit(f"--only: unknown script(s) {unknown}; choose from {SCRIPTS}")
    info = run_info(args.device, args.threads)
    say(f"== alignx benchmarks, run {info.run_id}: {info.device_name}, torch {info.torch}, commit {info.commit}, "
        f"{args.threads} threads; load average at start {_load()} ==")  # fmt: skip
    load1, cores = os.getloadavg()[0], os.cpu_count() or 1
    if args.device == "cpu" and load1 > cores:
        say(f"warning: load average {load1:.1f} on {cores} cores: other processes will preempt the benchmark's "
            f"{args.threads} threads; with more than one thread, small ops then wait on preempted threads and their "
            "times can grow by 10x. Prefer an idle machine, or --threads 1 (recorded with every row).")  # fmt: skip
    t_start = time.perf_counter()
    if args.device == "cpu" and not args.no_memory:
        _check_memory_method(args, info)
    env = _script_env(args.threads)
    failed = [name for name in scripts if not _run_script(name, args, info, env)]
    elapsed = time.perf_counter() - t_start

    _print_run_verdicts(os.path.join(args.out_dir, f"{args.device}_ratios.csv"), info.run_id)
    say(f"\nTotal {elapsed / 60:.1f} min; load average at the end {_load()} (2 cores: > 2 means a shared machine).")
    if not args.no_report:
        from .report import main as report_main

        report_main(["--device", args.device, "--out-dir", args.out_dir, "--run-id", info.run_id])
    if failed:
        say(f"failed scripts: {failed}")
        return 1
    return 0


def _script_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    if env.pop("TRITON_INTERPRET", None):
        say("note: TRITON_INTERPRET is unset for the benchmarks (the interpreter is a test tool, not a benchmark)")
    env["OMP_NUM_THREADS"] = str(threads) if threads > 0 else env.get("OMP_NUM_THREADS", "")
    return env


def _run_script(name: str, args: argparse.Namespace, info: RunInfo, env: dict[str, str]) -> bool:
    """``benchmarks.bench_<name>`` in its own process under the run's id; True when it succeeded."""
    cmd = [sys.executable, "-m", f"benchmarks.bench_{name}", "--device", args.device, "--threads", str(args.threads),
           "--run-id", info.run_id, "--out-dir", args.out_dir]  # fmt: skip
    cmd += ["--no-memory"] * args.no_memory + ["--tiny"] * args.tiny
    # The step benchmark has one model and batch: --quick (one shape per op) does not apply to it.
    cmd += ["--quick"] * (args.quick and name != "step") + ["--skip-compile"] * (args.skip_compile and name != "step")
    t0 = time.perf_counter()
    say(f"\n-- {name}: load average {_load()} --")
    code = subprocess.run(cmd, cwd=REPO, env=env).returncode
    say(f"-- {name}: {'done' if code == 0 else f'FAILED (exit {code})'} in {time.perf_counter() - t0:.0f} s, "
        f"load average {_load()} --")  # fmt: skip
    return code == 0


def _check_memory_method(args: argparse.Namespace, info: RunInfo) -> None:
    """Calibrate the CPU memory method on a known peak (two live 256 MiB tensors and a 256 MiB gradient, subtracted)
    and record it with the run's ratios."""
    nbytes = 256 << 20
    res = run_subprocess_job("benchmarks.memory", "calibration_job", {"nbytes": nbytes}, timeout=300,
                             memory_env=True, threads=args.threads)  # fmt: skip
    if res["status"] == "ok":
        rows = [Row(provider="measured", mode="full", status="ok", extra_mem_mb=res["bytes"] / 2**20,
                    mem_method=res["method"]),
                Row(provider="expected", mode="full", status="ok", extra_mem_mb=res["expected"] / 2**20)]  # fmt: skip
    else:
        rows = [Row(provider="measured", mode="full", status=res["status"], note=res.get("note", ""))]
    [v] = evaluate("memory-method", rows)
    if res["status"] == "ok":
        v.detail += f" ({res['method']})"
    print_verdicts("memory method", [v])
    append_verdicts(BenchOptions(device=args.device, out_dir=Path(args.out_dir)), info, [v])


def _load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def _print_run_verdicts(path: str, run_id: str) -> None:
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["run_id"] == run_id]
    if not rows:
        return
    say(f"\n== All ratios of run {run_id} ==")
    for r in rows:
        measured = r["measured"] or "n/a"
        say(f"  [{r['verdict']:4}] {r['claim']}: {measured} (target {r['target']}; load {r['load1']})  {r['detail']}")


if __name__ == "__main__":
    sys.exit(main())
