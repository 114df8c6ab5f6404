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

:class:`MetricWindow` sums the model's terms over the micro-batches between two log lines and reduces them over the
ranks into one such line.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from alignx.dist import sum_over_ranks
from alignx.objective import DIAG

if TYPE_CHECKING:
    from alignx.engine import DistInfo, Engine

__all__ = ["DIAG_KEYS", "MetricWindow", "MetricsLogger", "format_table", "read_metrics"]

JSONL = "metrics.jsonl"

# Terms the model returns that are means per micro-batch (averaged) and counts (summed).
MEAN_TERMS = ("loss", "ntp", "ctr", "lam")
COUNT_TERMS = ("rows_kept", "rows_dropped")
# The contrastive diagnostics the objective reports (alignx.objective.contrastive_diagnostics), logged as train/<key>.
DIAG_KEYS = (
    "top1",
    "chance",
    "nce_ratio",
    "pos_sim",
    "pos_sim_std",
    "neg_sim",
    "neg_sim_std",
    "raw_cos",
    "raw_cos_std",
    "raw_top1",
    "top_dims_share",
    "same_lang_top",
    "trained",
)


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


class MetricWindow:
    """Sums of the model's terms over the micro-batches since the last log, reduced over ranks on demand.

    ``skip``: terms the objective does not have (plain NTP returns zeros for ``ctr`` and ``lam``; they are not
    logged).
    """

    def __init__(self, skip: tuple[str, ...] = ()) -> None:
        self.skip = skip
        self.sums = dict.fromkeys(MEAN_TERMS + COUNT_TERMS, 0.0)
        self.micro = 0
        self.tokens = 0
        self.positions = 0  # token slots processed (padding included)
        self.steps = 0
        self.candidates: list[int] = []  # contrastive candidates per anchor, last micro-batch of each step
        self.lr: list[float] = []
        self.grad_norm: list[float] = []
        self.present: set[str] = set()
        self.diag: dict[str, list[float]] = {}  # diag/... -> [sum, micro-batches that reported it]
        self.last_loss = float("nan")
        self.t0 = time.time()

    def add(self, out: dict[str, torch.Tensor], tokens: int, positions: int | None = None) -> None:
        for key in MEAN_TERMS + COUNT_TERMS:
            if key in out and key not in self.skip:
                self.sums[key] += float(out[key].detach().float().item())
                self.present.add(key)
        self.last_loss = float(out["loss"].detach().float().item())
        self.micro += 1
        self.tokens += tokens
        self.positions += tokens if positions is None else positions

    def add_diagnostics(self, diag: dict[str, torch.Tensor]) -> None:
        """The contrastive diagnostics of one micro-batch (``diag/...``; none when it kept no row)."""
        for key, value in diag.items():
            acc = self.diag.setdefault(key, [0.0, 0.0])
            acc[0] += float(value)
            acc[1] += 1.0

    def reduce(self, info: DistInfo, engine: Engine | None, prefix: str = "train") -> dict[str, float]:
        """Means over all ranks' micro-batches (sums for counts); resets the window."""
        keys = MEAN_TERMS + COUNT_TERMS
        extra = [self.micro, self.tokens, self.positions]
        vec = torch.tensor([self.sums[k] for k in keys] + extra, dtype=torch.float64)
        if info.world_size > 1:
            vec = sum_over_ranks(vec, info.device)
        values = vec.tolist()
        micro, tokens, positions = values[-3:]
        diag = self._reduce_diag(info)
        elapsed = max(time.time() - self.t0, 1e-9)
        row = {}
        for k, v in zip(keys, values):
            if k in self.present:
                row[f"{prefix}/{k}"] = v / max(micro, 1) if k in MEAN_TERMS else v
        row[f"{prefix}/tokens_per_s"] = tokens / elapsed
        if self.steps > 0:
            row[f"{prefix}/positions_per_step"] = positions / self.steps
            row[f"{prefix}/padding_fraction"] = 1.0 - tokens / max(positions, 1.0)
        row.update({f"{prefix}/{k.removeprefix(DIAG)}": v for k, v in diag.items()})
        if self.candidates and self.candidates[-1] > 0:  # global modes: the same on every rank
            row[f"{prefix}/candidates"] = float(self.candidates[-1])
        if engine is not None:
            if self.lr:
                row[f"{prefix}/lr"] = self.lr[-1]
            if self.grad_norm:
                row[f"{prefix}/grad_norm"] = self.grad_norm[-1]
        self.__init__(self.skip)
        return row

    def _reduce_diag(self, info: DistInfo) -> dict[str, float]:
        """Means of the diagnostics over the micro-batches (of all ranks) that reported them. Every rank reduces
        the same fixed key list (a rank without a kept row reports none), so the collective always matches."""
        keys = [DIAG + k for k in DIAG_KEYS]
        vec = torch.tensor([v for k in keys for v in self.diag.get(k, [0.0, 0.0])], dtype=torch.float64)
        if info.world_size > 1:
            vec = sum_over_ranks(vec, info.device)
        sums, counts = vec.view(-1, 2).unbind(1)
        return {k: float(s / c) for k, s, c in zip(keys, sums.tolist(), counts.tolist()) if c > 0}
