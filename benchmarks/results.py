"""Where and when a number was measured, and the CSV it goes to: one :class:`Row` per measurement, skip or
roofline value, every row carrying the run id, commit, device and the load average at the moment it was measured."""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import subprocess
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Row:
    """One CSV row: one (bench, shape, provider, mode) measurement, a skip, or a roofline measurement."""

    run_id: str = ""
    date: str = ""
    commit: str = ""
    device: str = ""
    device_name: str = ""
    torch: str = ""
    threads: int = 0
    load1: float = 0.0
    bench: str = ""
    shape: str = ""
    provider: str = ""
    mode: str = ""
    status: str = ""
    time_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    reps: int | None = None
    metric: float | None = None
    unit: str = ""
    roofline_frac: float | None = None
    extra_mem_mb: float | None = None
    mem_method: str = ""
    max_rel_err: float | None = None
    note: str = ""


CSV_FIELDS = [f.name for f in fields(Row)]


@dataclass
class RunInfo:
    """Where and when: filled once per script run and copied into every row."""

    run_id: str
    date: str
    commit: str
    device: str
    device_name: str
    torch: str
    threads: int

    def row(self, **kw: Any) -> Row:
        return Row(
            run_id=self.run_id,
            date=self.date,
            commit=self.commit,
            device=self.device,
            device_name=self.device_name,
            torch=self.torch,
            threads=self.threads,
            load1=round(os.getloadavg()[0], 2),
            **kw,
        )


def git_commit() -> str:
    """Short commit hash of the checkout, with ``-dirty`` when the working tree differs from it (read-only git)."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=20
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "unknown") + ("-dirty" if dirty else "")


def device_name(device: str) -> str:
    """Human name of the device: the GPU's name, or the CPU model with its core count."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def run_info(device: str, threads: int, run_id: str | None = None) -> RunInfo:
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    return RunInfo(
        run_id=run_id or now.strftime("%Y%m%dT%H%M%SZ"),
        date=now.isoformat(),
        commit=git_commit(),
        device=device,
        device_name=device_name(device),
        torch=torch.__version__,
        threads=threads,
    )


def append_csv(path: Path, rows: Iterable[Row]) -> None:
    """Append rows to ``path`` (header written when the file is new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(v) for k, v in asdict(r).items()})


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def say(msg: str) -> None:
    """Print a progress line without breaking an active tqdm bar."""
    try:
        from tqdm import tqdm

        tqdm.write(msg)
    except ImportError:  # pragma: no cover - tqdm is a requirement
        print(msg, flush=True)
