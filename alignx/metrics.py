"""Training metrics: one JSON line per logging event (``metrics.jsonl``) and TensorBoard events, written by rank 0.

A line is ``{"step": int, "time": unix seconds, "<split>/<name>": float, ...}``; ``split`` is ``train``, ``eval`` or
``data``. The names the trainer writes:

=====================  ==================================================================================
``train/loss``         total objective, mean over the step's micro-batches and ranks (and the log interval)
``train/ntp|ctr|lam``  the terms of the objective (AlignX: ``loss = ntp + lambda_ctr ctr + lambda_lam lam``)
``train/lr``           learning rate applied by the last step of the interval
``train/grad_norm``    global gradient norm of that step, before clipping
``train/tokens_per_s`` non-padding tokens over all ranks per second of wall time
``train/rows_dropped`` rows the objective left out of the span losses (fewer than min_target_tokens)
``eval/*``             the same terms on the held-out records
``data/dropped/<r>``   training lines and records dropped at preprocessing, by reason (logged once at step 0):
                       bad lines skipped, records that would bias the objective, truncation (``DROP_REASONS``)
``data/eval_dropped/`` the same for a separate eval file
=====================  ==================================================================================

After a resume, lines of steps later than the checkpoint (written by the interrupted run) are removed, so the file
holds one value per step, as TensorBoard's ``purge_step`` does for the event files.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["MetricsLogger", "format_table", "read_metrics"]

JSONL = "metrics.jsonl"


class MetricsLogger:
    """Append metrics to ``run_dir/metrics.jsonl`` and to TensorBoard (``run_dir/tensorboard``) on rank 0.

    Args:
        run_dir: the stage's run directory.
        enabled: False on every rank but 0 (all calls become no-ops).
        tensorboard: also write TensorBoard events (skipped with a warning when tensorboard is not installed).
        resume_step: the step a resumed run restarts from; lines with a larger step are dropped first.
    """

    def __init__(self, run_dir: str | Path, *, enabled: bool, tensorboard: bool, resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / JSONL
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._truncate_after(resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # pragma: no cover - tensorboard is in requirements.txt
                print(f"[metrics] TensorBoard disabled: {e}")
            else:
                # TensorBoard purges events at steps >= purge_step; the checkpoint's own step stays.
                purge = None if resume_step is None else resume_step + 1
                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge)

    def _truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.path)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """Write ``values`` (keys ``split/name``) for optimizer step ``step``; non-finite values are kept as null."""
        if not self.enabled or not values:
            return
        clean = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in values.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": int(step), "time": round(time.time(), 3), **clean}) + "\n")
        if self._tb is not None:
            for key, value in clean.items():
                if value is not None:
                    self._tb.add_scalar(key, value, int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All lines of a ``metrics.jsonl`` file (a partially written last line, from a killed run, is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def format_table(rows: list[tuple[str, Any]], title: str | None = None) -> str:
    """Two-column text table: ``name | value`` with numbers formatted for reading."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if v == 0 or 1e-3 <= abs(v) < 1e5:
                return f"{v:.4f}"
            return f"{v:.3e}"
        return str(v)

    cells = [(str(k), fmt(v)) for k, v in rows]
    width = max((len(k) for k, _ in cells), default=0)
    vwidth = max((len(v) for _, v in cells), default=0)
    rule = "-" * (width + vwidth + 3)
    lines = [title, rule] if title else [rule]
    lines += [f"{k:<{width}} | {v}" for k, v in cells]
    lines.append(rule)
    return "\n".join(lines)
