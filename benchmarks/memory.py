"""Extra memory of one call, and the fresh processes that measure it (what no benchmark library provides).

*Extra* memory is the peak beyond what existed before the call (inputs, model, ...), minus the gradients it leaves in
the inputs' ``.grad`` (unavoidable outputs of any implementation). On CUDA: ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``. On CPU (:data:`METHOD_CPU`): each measurement runs in a fresh subprocess with
``MALLOC_MMAP_THRESHOLD_=65536`` (glibc then serves every block >= 64 KiB with mmap and returns it to the OS on free,
so the resident set tracks live memory); the process resets the peak resident set by writing ``5`` to
``/proc/self/clear_refs`` (VmHWM := VmRSS), runs the call once and reports ``VmHWM - VmRSS_before`` from
``/proc/self/status``. :func:`run_subprocess_job` runs any ``module.func(**kwargs)`` that way (also with a time limit,
for ``torch.compile`` and for allocations the machine may not hold) and returns its JSON result.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .results import REPO

METHOD_CPU = "rss: fresh process, MALLOC_MMAP_THRESHOLD_=65536, clear_refs=5, VmHWM - VmRSS_before - grads"
METHOD_CUDA = "cuda: max_memory_allocated - memory_allocated_before - grads"
MMAP_THRESHOLD = "65536"
RESULT_TAG = "@@RESULT "


def _proc_status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":", 1)
            out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current VmRSS (``echo 5 > /proc/self/clear_refs``); True when the reset took effect."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    st = _proc_status()
    return st["VmHWM"] <= st["VmRSS"] + (1 << 20)


def cpu_extra_memory(run_once: Callable[[], Any], leaves: Sequence[torch.Tensor]) -> tuple[int, str]:
    """Peak resident bytes of one ``run_once()`` beyond the resident set before it, minus the gradient tensors it
    leaves in ``leaves`` (meaningful in a process started with :data:`MMAP_THRESHOLD`, see the module docstring)."""
    gc.collect()
    before = _proc_status()["VmRSS"]
    if not reset_peak_rss():
        return -1, "unavailable: /proc/self/clear_refs cannot reset VmHWM here"
    out = run_once()
    peak = _proc_status()["VmHWM"]
    del out
    grads = sum(t.grad.numel() * t.grad.element_size() for t in leaves if t.grad is not None)
    return peak - before - grads, METHOD_CPU


def cuda_extra_memory(run_once: Callable[[], Any], leaves: Sequence[torch.Tensor]) -> tuple[int, str]:
    """Allocator peak of one ``run_once()`` beyond what was allocated before it, minus the gradient tensors."""
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = run_once()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    grads = sum(t.grad.numel() * t.grad.element_size() for t in leaves if t.grad is not None)
    return peak - before - grads, METHOD_CUDA


def available_bytes(device: str) -> int:
    """``MemAvailable`` on CPU; the device's total memory on CUDA."""
    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def is_oom(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def calibration_job(nbytes: int) -> dict[str, Any]:
    """Check of the memory method: one call that holds two live ``nbytes`` tensors at its peak (``2 * nbytes``
    expected) and leaves a gradient of ``nbytes`` in a leaf (subtracted). Returns the measured extra bytes."""
    leaf = torch.zeros(nbytes // 4, requires_grad=True)

    def once() -> None:
        x = torch.empty(nbytes // 4).fill_(1.0)
        y = x * 2.0
        leaf.grad = torch.ones_like(leaf)
        del x, y

    extra, method = cpu_extra_memory(once, [leaf])
    if method.startswith("unavailable"):
        return {"status": "error", "note": method}
    return {"status": "ok", "bytes": int(extra), "expected": 2 * nbytes, "method": method}


def short_error(e: BaseException, n: int = 300) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text if len(text) <= n else text[: n - 3] + "..."


def run_subprocess_job(
    module: str, func: str, kwargs: dict[str, Any], *, timeout: float, memory_env: bool, threads: int
) -> dict[str, Any]:
    """Call ``module.func(**kwargs)`` in a fresh Python process and return its JSON result.

    ``memory_env`` sets ``MALLOC_MMAP_THRESHOLD_`` (CPU memory probes). A time-out, a crash or a kill by the kernel's
    out-of-memory handler becomes a ``{"status": ...}`` result with the reason.
    """
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    if memory_env:
        env["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    job = json.dumps({"module": module, "func": func, "kwargs": kwargs})
    cmd = [sys.executable, "-m", "benchmarks.memory", "--job", job]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "note": f"did not finish within {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    if proc.returncode in (-9, 137):
        return {"status": "oom", "note": "the process was killed (SIGKILL: out of memory)"}
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"status": "error", "note": f"exit {proc.returncode}: " + " | ".join(tail)}


def _worker_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description="benchmark worker (internal)")
    parser.add_argument("--job", required=True)
    args = parser.parse_args(argv)
    job = json.loads(args.job)
    result = getattr(importlib.import_module(job["module"]), job["func"])(**job["kwargs"])
    sys.stdout.flush()
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
