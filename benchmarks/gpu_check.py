"""``make gpu-check``: the one command for a fresh single-GPU machine (Hopper or Ampere, CUDA driver, registries).

Within the time limit (8 minutes by default) it installs what it needs into its own virtual environment and then, most
valuable result first, writes after every part into one results folder (``gpu_check.json``, ``gpu_check.md`` and the
raw logs under ``logs/``):

=============  =====================================================================================================
preflight      the GPU and its driver (``nvidia-smi``), Python, free disk
install        ``torch==2.13.0`` (the CUDA build: PyPI's Linux wheel, or ``--torch-index-url``), the pinned
               requirements (triton left to the version the CUDA torch wheel pins), the demo model packages, alignx
kernel-tests   the CUDA tests of every kernel at large shapes (``pytest -m gpu``: bf16 and fp32, padded and packed)
extras         flash-attn and the peer kernels of the benchmarks, each only if a wheel installs (a skip is recorded
               with pip's reason; torch must stay 2.13.0)
train          20 stage-1 steps of Gemma-3-270M, ZeRO-2, bf16 (flash-attention when installed, SDPA otherwise):
               tokens/s and peak memory (``configs/gpu_check_gemma3.yaml``)
bench          the short GPU sweep (``benchmarks.run --quick``): every op against its peers, with the GEMM rate and
               copy bandwidth measured in the same run and every claim as a fraction of them
=============  =====================================================================================================

Each part has a time budget; a part must finish by the sum of the budgets up to it (time a part does not use goes
to the next ones), so a slow part cannot starve the results written before it, and parts whose time is gone are
recorded as skipped. The exit code is non-zero when a part failed or ran out of time.

``--dry-run`` (``make gpu-check DRY_RUN=1``) runs on a CPU machine: it prints the plan with each part's budget and
command, then checks what can be checked without CUDA — the results format (written and read back), the argument
parsing of every command (with ``--check-python``, the project's CPU environment), the collection of the GPU tests,
the training config, the quick benchmark shapes and the skip logic of the optional installs — and exits 0 when all
of them pass.

This file uses the standard library only: it runs before any environment exists.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCHEMA = 1
TORCH = "torch==2.13.0"
TIME_LIMIT_S = 480.0
KERNEL_TESTS = (
    "tests/test_span_pool.py",
    "tests/test_info_nce.py",
    "tests/test_lang_match.py",
    "tests/test_linear_ce.py",
)
BENCH_OPS = ("span_pool", "info_nce", "lang_match", "linear_ce")
TRAIN_CONFIG = "configs/gpu_check_gemma3.yaml"
TRAIN_STEPS = 20
# (pip name, import name, what it adds): installed only from a wheel, one by one, each skip recorded with its reason.
OPTIONAL = (
    ("flash-attn", "flash_attn", "FlashAttention-2 for training (model.attn_implementation auto)"),
    ("liger-kernel", "liger_kernel", "benchmark peer: fused linear cross-entropy (InfoNCE and LM head)"),
    ("inf-cl", "inf_cl", "benchmark peer: Inf-CL tiled contrastive loss"),
    ("cut-cross-entropy", "cut_cross_entropy", "benchmark peer: Apple's cut cross-entropy (LM head)"),
    ("memeff", "memeff", "benchmark peer: memory-efficient InfoNCE"),
)
STATUSES = ("ok", "failed", "timeout", "skipped", "checked", "planned")
FAILING = ("failed", "timeout")


# ----------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class PartResult:
    """One part of the check: its status, time, log, the numbers it produced and the optional things it skipped."""

    name: str
    budget_s: float
    status: str = "planned"
    seconds: float = 0.0
    log: str = ""
    note: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    skips: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Context:
    """Where things go and which interpreter runs them."""

    results: Path
    venv: Path
    dry_run: bool = False
    check_python: str | None = None
    torch_index_url: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    def log(self, name: str) -> Path:
        (self.results / "logs").mkdir(parents=True, exist_ok=True)
        return self.results / "logs" / f"{name}.log"


def validate_results(doc: dict[str, Any]) -> list[str]:
    """Problems of a ``gpu_check.json`` document (empty when it has the documented format)."""
    problems = []
    for key, kind in (("schema", int), ("started", str), ("dry_run", bool), ("time_limit_s", (int, float)),
                      ("parts", list), ("exit_code", int), ("machine", dict)):  # fmt: skip
        if not isinstance(doc.get(key), kind):
            problems.append(f"{key}: missing or not {kind}")
    for i, part in enumerate(doc.get("parts", [])):
        for key in ("name", "budget_s", "status", "seconds", "log", "summary", "skips"):
            if key not in part:
                problems.append(f"parts[{i}].{key} missing")
        if part.get("status") not in STATUSES:
            problems.append(f"parts[{i}].status {part.get('status')!r} not in {STATUSES}")
        for skip in part.get("skips", []):
            if not (isinstance(skip, dict) and skip.get("what") and skip.get("reason")):
                problems.append(f"parts[{i}] skip without what/reason: {skip!r}")
    return problems


def write_results(ctx: Context, parts: Sequence[PartResult], started: str, time_limit: float) -> int:
    """(Re)write ``gpu_check.json`` and ``gpu_check.md``; returns the exit code these results mean."""
    code = 1 if any(p.status in FAILING for p in parts) else 0
    doc = {
        "schema": SCHEMA,
        "started": started,
        "dry_run": ctx.dry_run,
        "time_limit_s": time_limit,
        "machine": ctx.facts,
        "parts": [asdict(p) for p in parts],
        "exit_code": code,
    }
    ctx.results.mkdir(parents=True, exist_ok=True)
    tmp = ctx.results / ".gpu_check.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, ctx.results / "gpu_check.json")
    (ctx.results / "gpu_check.md").write_text(render_markdown(doc))
    return code


def _headline(part: dict[str, Any]) -> str:
    """The few numbers of a part worth a table cell."""
    s = part["summary"]
    if part["status"] in ("checked", "planned", "skipped") or part["status"] in FAILING and part["note"]:
        return part["note"]
    if part["name"] == "kernel-tests" and "tests" in s:
        return f"{s['passed']}/{s['tests']} passed" + (f", failed: {', '.join(s['failed'][:3])}" if s["failed"] else "")
    if part["name"] == "train" and s.get("tokens_per_s") is not None:
        peak = s.get("peak_memory_gib")
        return f"{s['tokens_per_s']:.0f} tokens/s, peak {peak:.2f} GiB, {s.get('attention', '?')}"
    if part["name"] == "bench" and "roofline" in s:
        roof = ", ".join(f"{k} {v:.4g}" for k, v in s["roofline"].items())
        return f"{s.get('verdicts_pass', 0)} PASS / {s.get('verdicts_miss', 0)} MISS; measured {roof}"
    if part["name"] == "preflight" and "gpu" in s:
        return f"{s['gpu']} (driver {s.get('driver', '?')}, {s.get('memory', '?')})"
    if part["name"] == "extras" and "installed" in s:
        return f"installed: {', '.join(s['installed']) or 'none'}"
    return part.get("note", "")


def summary_table(doc: dict[str, Any]) -> str:
    rows = [["part", "budget s", "used s", "status", "result"]]
    for p in doc["parts"]:
        cell = " ".join(_headline(p).split())
        cell = cell if len(cell) <= 160 else cell[:157] + "..."
        rows.append([p["name"], f"{p['budget_s']:.0f}", f"{p['seconds']:.0f}", p["status"], cell])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows[1:])])


def render_markdown(doc: dict[str, Any]) -> str:
    kind = "dry run (CPU: plan and checks only)" if doc["dry_run"] else "run"
    out = [f"# alignx GPU check — {kind}", "", f"Started {doc['started']}, time limit {doc['time_limit_s']:.0f} s, "
           f"exit code {doc['exit_code']}.", ""]  # fmt: skip
    if doc["machine"]:
        out += ["Machine: " + ", ".join(f"{k} {v}" for k, v in doc["machine"].items()), ""]
    out += [summary_table(doc), ""]
    skips = [(p["name"], s) for p in doc["parts"] for s in p["skips"]]
    if skips:
        out += ["## Skipped", ""] + [f"- {name}: **{s['what']}** — {s['reason']}" for name, s in skips] + [""]
    for p in doc["parts"]:
        if p["summary"] or p["note"]:
            out += [f"## {p['name']}", ""]
            if p["note"]:
                out += [p["note"], ""]
            if p["summary"]:
                out += ["```json", json.dumps(p["summary"], indent=2), "```", ""]
            if p["log"]:
                out += [f"Log: `{p['log']}`", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------------------
# Running commands


def run_cmd(cmd: Sequence[str], log: Path, timeout: float, env: dict[str, str] | None = None) -> tuple[int, bool]:
    """Run ``cmd`` in the repository with its output appended to ``log``; ``(exit code, timed out)``. On time-out the
    whole process group is killed (pip and pytest start children)."""
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=max(timeout, 1.0)), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            f.write(f"\n[gpu_check] killed after {timeout:.0f} s (time budget)\n")
            return -9, True


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def _tail(log: Path, pattern: str = r"(ERROR|Error|error)[: ]", n: int = 1) -> str:
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    hits = [ln.strip() for ln in lines if re.search(pattern, ln)]
    return " | ".join((hits or [ln.strip() for ln in lines if ln.strip()])[-n:])[:400]


def _json_of(cmd: Sequence[str], log: Path, timeout: float) -> dict[str, Any] | None:
    """Run a command that prints one JSON line last; its value (None if it failed)."""
    out = tempfile.NamedTemporaryFile(suffix=".json", delete=False)
    out.close()
    code, _ = run_cmd([*cmd, out.name], log, timeout, _env())
    try:
        return json.loads(Path(out.name).read_text()) if code == 0 else None
    except (OSError, json.JSONDecodeError):
        return None
    finally:
        Path(out.name).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------------
# Parts


def parse_nvidia_smi(text: str) -> list[dict[str, str]]:
    """``nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader`` lines."""
    gpus = []
    for line in text.strip().splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) >= 4:
            gpus.append({"gpu": cells[0], "driver": cells[1], "memory": cells[2], "compute_capability": cells[3]})
    return gpus


def preflight(ctx: Context, res: PartResult, timeout: float) -> None:
    smi = shutil.which("nvidia-smi")
    free = shutil.disk_usage(REPO).free / 2**30
    ctx.facts.update(python=sys.version.split()[0], free_disk_gib=round(free, 1))
    if sys.version_info < (3, 10):  # noqa: UP036 - this file runs under whatever python3 the machine has
        res.status, res.note = "failed", f"Python {sys.version.split()[0]}: alignx needs >= 3.10"
        return
    if smi is None:
        res.status, res.note = "failed", "no NVIDIA driver: nvidia-smi is not on PATH"
        return
    query = [smi, "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader"]
    proc = subprocess.run(query, capture_output=True, text=True, timeout=timeout)
    ctx.log("preflight").write_text(proc.stdout + proc.stderr)
    gpus = parse_nvidia_smi(proc.stdout)
    if proc.returncode != 0 or not gpus:
        res.status, res.note = "failed", f"nvidia-smi found no GPU: {(proc.stderr or proc.stdout).strip()[:300]}"
        return
    res.summary = dict(gpus[0], count=len(gpus))
    ctx.facts.update(gpu=gpus[0]["gpu"], driver=gpus[0]["driver"])
    res.status = "ok" if free >= 15 else "failed"
    if free < 15:
        res.note = f"{free:.1f} GiB free on {REPO}: the CUDA stack, the model cache and the results need ~15 GiB"


def gpu_requirements(path: Path) -> list[str]:
    """requirements.txt for the GPU environment: the CPU-checked triton pin is left out, so pip keeps the triton
    that the CUDA torch 2.13.0 wheel pins (3.7.1); every other pin stays."""
    return [ln for ln in path.read_text().splitlines() if ln.strip() and not re.match(r"\s*triton\s*[=<>~!]", ln)]


def install_commands(ctx: Context, requirements: Path) -> list[list[str]]:
    torch_cmd = [ctx.python, "-m", "pip", "install", "-q", TORCH]
    if ctx.torch_index_url:
        torch_cmd += ["--index-url", ctx.torch_index_url]
    return [
        [sys.executable, "-m", "venv", str(ctx.venv)],
        [ctx.python, "-m", "pip", "install", "-q", "--upgrade", "pip", "setuptools"],
        torch_cmd,
        [ctx.python, "-m", "pip", "install", "-q", "-c", "constraints.txt", "-r", str(requirements),
         "-r", "requirements-demo.txt"],
        [ctx.python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", "."],
    ]  # fmt: skip


PROBE_TORCH = (
    "import json, sys, torch; ok = torch.cuda.is_available(); "
    "json.dump({'torch': torch.__version__, 'cuda': torch.version.cuda, 'available': ok, "
    "'device': torch.cuda.get_device_name() if ok else None, "
    "'bf16': bool(ok and torch.cuda.is_bf16_supported())}, open(sys.argv[1], 'w'))"
)


def install(ctx: Context, res: PartResult, timeout: float) -> None:
    log, deadline = ctx.log("install"), time.monotonic() + timeout
    res.log = str(log)
    requirements = ctx.results / "requirements-gpu.txt"
    requirements.write_text("\n".join(gpu_requirements(REPO / "requirements.txt")) + "\n")
    for cmd in install_commands(ctx, requirements):
        if cmd[1:3] == ["-m", "venv"] and Path(ctx.python).exists():
            continue
        code, timed_out = run_cmd(cmd, log, deadline - time.monotonic(), _env())
        if code != 0:
            res.status = "timeout" if timed_out else "failed"
            res.note = f"`{' '.join(cmd[-4:])}` {'ran out of time' if timed_out else 'failed'}: {_tail(log)}"
            return
    probe = _json_of([ctx.python, "-c", PROBE_TORCH], log, max(deadline - time.monotonic(), 60))
    res.summary = probe or {}
    if not probe or not probe["available"] or probe["torch"].split("+")[0] != TORCH.split("==")[1]:
        res.status, res.note = "failed", f"torch is not the CUDA build of {TORCH} or sees no GPU: {probe}"
        return
    ctx.facts.update(torch=probe["torch"], cuda=probe["cuda"])
    res.status = "ok"


def parse_junit(path: Path) -> dict[str, Any]:
    """Counts and failed test ids of a pytest ``--junitxml`` report."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = sum(int(s.get("tests", 0)) for s in suites)
    failed, skipped = [], 0
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        elif case.find("skipped") is not None:
            skipped += 1
    return {"tests": total, "failed": failed, "skipped": skipped, "passed": total - len(failed) - skipped}


def kernel_tests(ctx: Context, res: PartResult, timeout: float) -> None:
    log, xml = ctx.log("kernel-tests"), ctx.results / "kernel_tests.xml"
    res.log = str(log)
    cmd = [ctx.python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={xml}",
           "-o", "addopts=-ra", *KERNEL_TESTS]  # fmt: skip
    code, timed_out = run_cmd(cmd, log, timeout, _env())
    if xml.is_file():
        res.summary = parse_junit(xml)
    if timed_out:
        res.status, res.note = "timeout", "the GPU kernel tests did not finish in their budget"
    elif code != 0 or not res.summary.get("passed"):
        res.status, res.note = "failed", _tail(log, r"(FAILED|ERROR|SKIPPED|Error)")
    else:
        res.status = "ok"


def install_optional(ctx: Context, res: PartResult, deadline: float,
                     installer: Callable[[str], list[str]] | None = None) -> None:  # fmt: skip
    """Each optional package from a wheel only, one at a time; a failure is a recorded skip, never a failed part.
    A package that installs but does not import is uninstalled again (and skipped); torch must stay pinned."""
    log = ctx.log("extras")
    res.log = str(log)
    pin = ctx.results / "torch-pin.txt"
    pin.write_text(TORCH + "\n")
    installer = installer or (lambda pkg: [ctx.python, "-m", "pip", "install", "-q", "--only-binary=:all:",
                                           "-c", str(pin), pkg])  # fmt: skip
    installed = []
    for pkg, module, what in OPTIONAL:
        left = deadline - time.monotonic()
        if left < 5:
            res.skips.append({"what": pkg, "reason": "no time left in the extras budget"})
            continue
        code, timed_out = run_cmd(installer(pkg), log, min(left, 90), _env())
        if code != 0:
            why = "install ran out of time" if timed_out else f"no installable wheel: {_tail(log)}"
            res.skips.append({"what": pkg, "reason": f"{why} ({what})"})
            continue
        code, _ = run_cmd([ctx.python, "-c", f"import {module}"], log, 60, _env())
        if code != 0:
            run_cmd([ctx.python, "-m", "pip", "uninstall", "-y", pkg], log, 60, _env())
            res.skips.append({"what": pkg, "reason": f"installed but does not import: {_tail(log)} ({what})"})
            continue
        installed.append(pkg)
    res.summary = {"installed": installed, "skipped": [s["what"] for s in res.skips]}
    ctx.facts["flash_attn"] = "flash-attn" in installed
    res.status = "ok"


def extras(ctx: Context, res: PartResult, timeout: float) -> None:
    install_optional(ctx, res, time.monotonic() + timeout)
    probe = _json_of([ctx.python, "-c", PROBE_TORCH], ctx.log("extras"), 60)
    if not probe or probe["torch"].split("+")[0] != TORCH.split("==")[1] or not probe["available"]:
        res.status, res.note = "failed", f"an optional package replaced or broke torch: {probe}"


WRITE_PAIRS = (
    "import sys; from alignx.testing import PARALLEL, write_pairs_jsonl; "
    "write_pairs_jsonl(sys.argv[1], 200, langs=tuple(k for k in PARALLEL if k != 'en'))"
)


def train_command(ctx: Context, pairs: Path, out: Path) -> list[str]:
    return [ctx.python, "train.py", "--config", TRAIN_CONFIG, f"--data.train_file={pairs}",
            f"--train.output_dir={out}", f"--data.cache_dir={out / 'data_cache'}", "--stage", "1"]  # fmt: skip


def parse_train_summary(path: Path) -> dict[str, Any]:
    s = json.loads(path.read_text())
    peaks = [b for b in s.get("peak_memory_bytes_per_rank", []) if isinstance(b, int) and b >= 0]
    return {
        "steps": s["steps"],
        "tokens_per_s": s.get("tokens_per_s"),
        "peak_memory_gib": max(peaks) / 2**30 if peaks else None,
        "peak_memory_method": s.get("peak_memory_method"),
        "first_loss": s.get("first_train_loss"),
        "last_loss": s.get("last_train_loss"),
        "zero_stage": s.get("zero_stage"),
        "precision": s.get("precision"),
        "seconds": s.get("seconds"),
    }


def train(ctx: Context, res: PartResult, timeout: float) -> None:
    log, deadline = ctx.log("train"), time.monotonic() + timeout
    res.log = str(log)
    pairs, out = ctx.results / "train" / "pairs.jsonl", ctx.results / "train" / "run"
    pairs.parent.mkdir(parents=True, exist_ok=True)
    code, _ = run_cmd([ctx.python, "-c", WRITE_PAIRS, str(pairs)], log, 60, _env())
    if code != 0:
        res.status, res.note = "failed", f"could not write the training pairs: {_tail(log)}"
        return
    code, timed_out = run_cmd(train_command(ctx, pairs, out), log, deadline - time.monotonic(), _env())
    summary = out / "stage1" / "summary.json"
    if summary.is_file():
        res.summary = parse_train_summary(summary)
    res.summary["attention"] = "flash_attention_2" if ctx.facts.get("flash_attn") else "sdpa"
    if timed_out:
        res.status, res.note = "timeout", "training did not finish in its budget"
    elif code != 0 or res.summary.get("steps") != TRAIN_STEPS:
        res.status, res.note = "failed", f"exit {code}: {_tail(log, r'(alignx|Error)')}"
    else:
        res.status = "ok"


def bench_command(ctx: Context, out: Path) -> list[str]:
    return [ctx.python, "-m", "benchmarks.run", "--device", "cuda", "--only", ",".join(BENCH_OPS), "--quick",
            "--skip-compile", "--out-dir", str(out), "--no-report"]  # fmt: skip


def parse_bench(out: Path, device: str = "cuda") -> dict[str, Any]:
    """Roofline (GEMM TFLOP/s, copy GB/s), each op's providers at its quick shape, and the claims' verdicts."""
    import csv

    rows = list(csv.DictReader((out / f"{device}.csv").open())) if (out / f"{device}.csv").is_file() else []
    roofline: dict[str, float] = {}
    ops: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["shape"] == "roofline" and r["metric"]:
            roofline[r["provider"]] = max(roofline.get(r["provider"], 0.0), float(r["metric"]))
        elif r["mode"] == "full":
            ops.setdefault(r["bench"], []).append({
                "shape": r["shape"], "provider": r["provider"], "status": r["status"],
                "time_ms": float(r["time_ms"]) if r["time_ms"] else None,
                "rate": f"{float(r['metric']):.4g} {r['unit']}" if r["metric"] else None,
                "fraction_of_roofline": float(r["roofline_frac"]) if r["roofline_frac"] else None,
                "note": r["note"],
            })  # fmt: skip
    ratios = out / f"{device}_ratios.csv"
    verdicts = list(csv.DictReader(ratios.open())) if ratios.is_file() else []
    return {
        "roofline": roofline,
        "ops": ops,
        "verdicts": [{k: v[k] for k in ("claim", "measured", "target", "verdict", "detail")} for v in verdicts],
        "verdicts_pass": sum(v["verdict"] == "PASS" for v in verdicts),
        "verdicts_miss": sum(v["verdict"] == "MISS" for v in verdicts),
    }


def bench(ctx: Context, res: PartResult, timeout: float) -> None:
    log, out = ctx.log("bench"), ctx.results / "bench"
    res.log = str(log)
    code, timed_out = run_cmd(bench_command(ctx, out), log, timeout, _env())
    res.summary = parse_bench(out)
    skipped = [(op, r) for op, rs in res.summary["ops"].items() for r in rs if r["status"] == "skipped"]
    res.skips = [{"what": f"{op} {r['provider']}", "reason": r["note"]} for op, r in skipped]
    if timed_out:
        res.status, res.note = "timeout", "the sweep did not finish in its budget (the rows written so far are kept)"
    elif code != 0 or not res.summary["roofline"]:
        res.status, res.note = "failed", _tail(log, r"(FAILED|Error|error)")
    else:
        res.status = "ok"


# ----------------------------------------------------------------------------------------------------------------
# Dry-run checks (CPU)


def _check(ctx: Context, res: PartResult, code: str, *args: str) -> dict[str, Any] | None:
    """Run a check snippet with the CPU environment's Python; it writes its JSON result to ``sys.argv[-1]``."""
    if ctx.check_python is None:
        res.status, res.note = "failed", "no CPU environment to check with (make install, or --check-python)"
        return None
    out = _json_of([ctx.check_python, "-c", code, *args], ctx.log(f"dry-{res.name}"), 300)
    if out is None:
        res.status, res.note = "failed", f"check failed: {_tail(ctx.log(f'dry-{res.name}'), r'Error')}"
    return out


def dry_preflight(ctx: Context, res: PartResult) -> None:
    sample = "NVIDIA H100 80GB HBM3, 560.35.03, 81559 MiB, 9.0\n"
    parsed = parse_nvidia_smi(sample)
    ok = parsed == [{"gpu": "NVIDIA H100 80GB HBM3", "driver": "560.35.03", "memory": "81559 MiB",
                     "compute_capability": "9.0"}]  # fmt: skip
    here = "nvidia-smi present" if shutil.which("nvidia-smi") else "no nvidia-smi here: a real run stops at this part"
    res.status = "checked" if ok else "failed"
    res.note = f"nvidia-smi output parsing checked; {here}"


def dry_install(ctx: Context, res: PartResult) -> None:
    req = gpu_requirements(REPO / "requirements.txt")
    pinned = "torch==2.13.0" in (REPO / "constraints.txt").read_text().split()
    cmds = install_commands(ctx, Path("requirements-gpu.txt"))
    ok = pinned and not any(ln.startswith("triton") for ln in req) and any(ln.startswith("deepspeed") for ln in req)
    ok = ok and cmds[2][-1] == TORCH and all((REPO / f).is_file() for f in ("requirements-demo.txt", "setup.py"))
    res.summary = {"commands": [" ".join(c) for c in cmds]}
    res.status = "checked" if ok else "failed"
    res.note = "torch pinned to 2.13.0 (constraints.txt), triton left to the CUDA torch wheel, every file present"


COLLECT = (
    "import json, subprocess, sys; files = sys.argv[1:-1]; "
    "p = subprocess.run([sys.executable, '-m', 'pytest', '--collect-only', '-q', '-m', 'gpu', "
    "'-p', 'no:cacheprovider', *files], capture_output=True, text=True); "
    "ids = [ln for ln in p.stdout.splitlines() if '::' in ln]; "
    "json.dump({'code': p.returncode, 'ids': ids, 'tail': p.stdout[-500:] + p.stderr[-500:]}, open(sys.argv[-1], 'w'))"
)


def dry_kernel_tests(ctx: Context, res: PartResult) -> None:
    out = _check(ctx, res, COLLECT, *KERNEL_TESTS)
    if out is None:
        return
    per_file = {f: sum(i.startswith(f) for i in out["ids"]) for f in KERNEL_TESTS}
    text = " ".join(out["ids"])
    coverage = {
        "bf16": "bf16" in text or "bfloat16" in text,
        "fp32": "fp32" in text or "float32" in text,
        "packed": "packed" in text,
    }
    res.summary = {"gpu_tests_per_file": per_file, "covers": coverage}
    ok = out["code"] == 0 and all(per_file.values()) and all(coverage.values())
    res.status = "checked" if ok else "failed"
    res.note = f"{len(out['ids'])} GPU tests collected" + ("" if ok else f" (coverage {coverage}): {out['tail']}")


def dry_extras(ctx: Context, res: PartResult) -> None:
    """The skip logic, with installers that fail the way pip does (no network, nothing installed)."""
    scratch = PartResult("extras", res.budget_s)
    py = sys.executable
    fail = lambda pkg: [py, "-c", f"print('ERROR: No matching distribution found for {pkg}'); raise SystemExit(1)"]  # noqa: E731
    sub = Context(ctx.results / "dry-extras", ctx.venv, dry_run=True)
    sub.results.mkdir(parents=True, exist_ok=True)
    install_optional(sub, scratch, time.monotonic() + 60, installer=fail)
    reasons_ok = all(f"No matching distribution found for {pkg}" in s["reason"]
                     for (pkg, _, _), s in zip(OPTIONAL, scratch.skips))  # fmt: skip
    ok = scratch.status == "ok" and len(scratch.skips) == len(OPTIONAL) and reasons_ok
    res.summary = {"simulated_skips": scratch.skips}
    res.status = "checked" if ok else "failed"
    res.note = "skip logic: a package without an installable wheel is recorded with pip's reason and the part goes on"
    shutil.rmtree(sub.results, ignore_errors=True)


TRAIN_CHECK = (
    "import json, sys, tempfile; from pathlib import Path; from alignx.config import load_config; "
    "from alignx.testing import PARALLEL, write_pairs_jsonl; "
    "p = write_pairs_jsonl(Path(tempfile.mkdtemp()) / 'pairs.jsonl', 200, "
    "langs=tuple(k for k in PARALLEL if k != 'en')); "
    "c = load_config(sys.argv[1], ['--data.train_file=' + str(p)]); "
    "json.dump({'steps': c.train.max_steps, 'zero': c.engine.zero_stage, 'precision': c.engine.precision, "
    "'model': c.model.name_or_path, 'records': len(set(p.read_text().splitlines()))}, open(sys.argv[-1], 'w'))"
)


def dry_train(ctx: Context, res: PartResult) -> None:
    out = _check(ctx, res, TRAIN_CHECK, TRAIN_CONFIG)
    if out is None:
        return
    res.summary = out
    ok = out == {"steps": TRAIN_STEPS, "zero": 2, "precision": "bf16", "model": "gemma3-270m", "records": 200}
    res.status = "checked" if ok else "failed"
    res.note = "training config and data checked: " + " ".join(train_command(ctx, Path("PAIRS"), Path("OUT"))[1:])


BENCH_CHECK = (
    "import importlib, json, subprocess, sys; "
    "h = subprocess.run([sys.executable, '-m', 'benchmarks.run', '--help'], capture_output=True, text=True); "
    "import benchmarks; from benchmarks.harness import quick_shapes; out = {}; "
    "[out.__setitem__(op, [s.name for s in quick_shapes(importlib.import_module('benchmarks.bench_' + op)"
    ".shapes('cuda'))]) for op in sys.argv[1].split(',')]; "
    "roof = {op: importlib.import_module('benchmarks.bench_' + op).BENCH.roofline for op in sys.argv[1].split(',')}; "
    "json.dump({'help_ok': h.returncode == 0 and '--quick' in h.stdout, 'shapes': out, 'roofline': roof}, "
    "open(sys.argv[-1], 'w'))"
)


def dry_bench(ctx: Context, res: PartResult) -> None:
    out = _check(ctx, res, BENCH_CHECK, ",".join(BENCH_OPS))
    if out is None:
        return
    res.summary = out
    ok = out["help_ok"] and all(out["shapes"].get(op) for op in BENCH_OPS)
    res.status = "checked" if ok else "failed"
    res.note = "quick CUDA shapes of every op and the sweep's arguments checked: " + " ".join(
        bench_command(ctx, Path("OUT"))[1:]
    )


# ----------------------------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class Part:
    name: str
    budget_s: float
    what: str
    run: Callable[[Context, PartResult, float], None]
    dry: Callable[[Context, PartResult], None]
    needs: tuple[str, ...] = ()


PARTS = (
    Part("preflight", 10, "GPU, driver, Python, disk", preflight, dry_preflight),
    Part(
        "install",
        150,
        f"{TORCH} (CUDA), pinned requirements, demo models, alignx",
        install,
        dry_install,
        ("preflight",),
    ),  # fmt: skip
    Part(
        "kernel-tests",
        90,
        "pytest -m gpu: every kernel at large shapes, bf16/fp32, padded/packed",
        kernel_tests,
        dry_kernel_tests,
        ("install",),
    ),  # fmt: skip
    Part("extras", 45, "flash-attn and the benchmark peers, wheels only", extras, dry_extras, ("install",)),
    Part(
        "train",
        90,
        f"{TRAIN_STEPS} stage-1 steps, Gemma-3-270M, ZeRO-2, bf16: tokens/s, peak memory",
        train,
        dry_train,
        ("install",),
    ),  # fmt: skip
    Part(
        "bench",
        95,
        "short sweep of every op vs its peers, GEMM and copy roofline measured",
        bench,
        dry_bench,
        ("install",),
    ),  # fmt: skip
)


def print_plan(parts: Sequence[Part], scale: float) -> None:
    total = sum(p.budget_s * scale for p in parts)
    print("alignx GPU check — plan (most valuable results first; each part ends by the sum of the budgets so far)")
    elapsed = 0.0
    for p in parts:
        elapsed += p.budget_s * scale
        print(f"  {p.name:<13} {p.budget_s * scale:5.0f} s  (done by {elapsed:4.0f} s)  {p.what}")
    print(f"  {'total':<13} {total:5.0f} s = {total / 60:.1f} min", flush=True)


def run_parts(ctx: Context, parts: Sequence[Part], time_limit: float, started: str) -> tuple[list[PartResult], int]:
    """Run (or dry-check) every part in order within the budgets; results are rewritten after each part."""
    scale = time_limit / sum(p.budget_s for p in parts)
    results = [PartResult(p.name, round(p.budget_s * scale, 1)) for p in parts]
    t0, cumulative = time.monotonic(), 0.0
    status = {}
    for part, res in zip(parts, results):
        cumulative += part.budget_s * scale
        start = time.monotonic()
        missing = [n for n in part.needs if status.get(n) not in ("ok", "checked")]
        left = t0 + cumulative - start
        if ctx.dry_run:
            part.dry(ctx, res)
        elif missing:
            res.status, res.note = "skipped", f"needs {', '.join(missing)}, which did not succeed"
        elif left < 5:
            res.status, res.note = "skipped", "time budget exhausted before this part"
        else:
            try:
                part.run(ctx, res, left)
            except Exception as e:  # recorded in the results, never lost: the next parts still run
                res.status, res.note = "failed", f"{type(e).__name__}: {e}"
        res.seconds = round(time.monotonic() - start, 1)
        status[part.name] = res.status
        code = write_results(ctx, results, started, time_limit)
        print(
            f"[gpu_check] {part.name}: {res.status} in {res.seconds:.0f} s {' '.join(res.note.split())[:200]}",
            flush=True,
        )
    return results, code


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU: print the plan, check what needs no CUDA, exit 0")
    ap.add_argument("--venv", default=str(REPO / ".venv-gpu"), help="virtual environment created for the check")
    ap.add_argument("--results-dir", default=None, help="default: gpu_check_results/<UTC time>")
    ap.add_argument("--time-limit", type=float, default=TIME_LIMIT_S, help="seconds for all parts (budgets scale)")
    ap.add_argument("--torch-index-url", default=os.environ.get("TORCH_INDEX_URL") or None,
                    help="pip index of the CUDA torch wheel (default PyPI: its Linux wheel is CUDA)")  # fmt: skip
    ap.add_argument("--check-python", default=None, help="dry run: the CPU environment's python (default .venv)")
    args = ap.parse_args(argv)
    if args.time_limit <= 0:
        ap.error("--time-limit must be positive")
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    stamp = now.strftime("%Y%m%dT%H%M%SZ") + ("-dry" if args.dry_run else "")
    results = Path(args.results_dir or REPO / "gpu_check_results" / stamp).resolve()
    check_python = args.check_python or (str(REPO / ".venv" / "bin" / "python") if args.dry_run else None)
    if check_python and not Path(check_python).exists():
        check_python = None
    ctx = Context(results, Path(args.venv).resolve(), args.dry_run, check_python, args.torch_index_url)
    ctx.facts["host"] = os.uname().nodename
    scale = args.time_limit / sum(p.budget_s for p in PARTS)
    print_plan(PARTS, scale)
    if args.dry_run and sum(p.budget_s * scale for p in PARTS) > TIME_LIMIT_S:
        print(f"[gpu_check] the plan exceeds {TIME_LIMIT_S:.0f} s", flush=True)
    parts, code = run_parts(ctx, PARTS, args.time_limit, now.isoformat())
    doc = json.loads((results / "gpu_check.json").read_text())
    problems = validate_results(doc)
    if problems:
        print("[gpu_check] results format: " + "; ".join(problems), flush=True)
        code = 1
    print("\n" + summary_table(doc))
    print(f"\nResults: {results}/gpu_check.md, gpu_check.json, logs/")
    return code


if __name__ == "__main__":
    sys.exit(main())
