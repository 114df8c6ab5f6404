"""Stage 1 -> stage 2: each stage writes its own directory; stage 2 starts from stage 1's VERIFIED export.

Layout under ``train.output_dir``::

    stage1/                    stage 1 (AlignX objective)
        config.yaml            the resolved config this stage ran with (loadable by alignx.config.load_config)
        metrics.jsonl          + tensorboard/   (alignx.metrics)
        checkpoints/step_<n>/  DeepSpeed checkpoints (+ per-rank RNG state, + alignx_manifest.json: the files' SHA-256
                               signed with this user's key), checkpoints/latest = newest complete
        export/                Hugging Face model directory, no language-matching head, + alignx_export.json
        summary.json           the final summary (also printed as a table)
    stage2/                    stage 2 (instruction tuning, NTP only), same layout, started from stage1/export
    bad_lines.jsonl            every bad line of the input files, when data.on_bad_lines=error refused them

Stage 2 is the same trainer with a different view of the config (:func:`stage_config`): the model is stage 1's
export (or ``stage2.init_from``), the data is ``stage2.train_file``, the objective is plain next-token prediction,
and ``stage2.lr / epochs / max_steps / labels`` replace their stage-1 counterparts. Before stage 2 builds anything,
:func:`verify_export` checks the export is complete (manifest present, every listed file there with its size,
weights without any head tensor); if not, the error names the command that produces it.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alignx.config import Config, ConfigError
from alignx.data import validate_inputs
from alignx.export import EXPORT_MANIFEST
from alignx.layout import export_dir, stage_dir
from alignx.models import PACKAGED, model_name_problem, packaged_model_dir
from alignx.storage import probe_output_dir
from alignx.trainer import Trainer

__all__ = [
    "StageError",
    "export_dir",
    "parse_stages",
    "preflight",
    "run_stages",
    "stage_command",
    "stage_config",
    "stage_dir",
    "verify_export",
]

STAGES = (1, 2)


class StageError(RuntimeError):
    """A stage cannot start (its input is missing or incomplete); the message says which command fixes it."""


def parse_stages(stage: str | int) -> tuple[int, ...]:
    """``"1"`` -> (1,), ``"2"`` -> (2,), ``"all"`` -> (1, 2)."""
    text = str(stage).strip().lower()
    if text == "all":
        return STAGES
    if text in ("1", "2"):
        return (int(text),)
    raise ConfigError(f"--stage must be 1, 2 or all, got {stage!r}")


def stage_config(cfg: Config, stage: int) -> Config:
    """The config a stage runs with (a copy; ``cfg`` is not modified).

    Stage 1 is ``cfg`` itself. Stage 2: ``model.name_or_path`` = ``stage2.init_from`` or stage 1's export (whose
    tokenizer is loaded with it), ``data.train_file/eval_file`` = ``stage2.train_file/eval_file``, ``objective.kind =
    "ntp"``, ``data.labels = stage2.labels``, ``optim.lr = stage2.lr`` (if set), ``train.epochs/max_steps =
    stage2.epochs/max_steps``.
    """
    if stage not in STAGES:
        raise ConfigError(f"stage must be 1 or 2, got {stage!r}")
    out = copy.deepcopy(cfg)
    if stage == 1:
        return out
    s2 = cfg.stage2
    out.model.name_or_path = s2.init_from or str(export_dir(cfg, 1))
    out.model.tokenizer = None
    out.model.align_layer = None
    out.data.train_file = s2.train_file
    out.data.eval_file = s2.eval_file
    out.data.labels = s2.labels
    out.objective.kind = "ntp"
    out.optim.lr = s2.lr if s2.lr is not None else cfg.optim.lr
    out.train.epochs = s2.epochs
    out.train.max_steps = s2.max_steps
    return out


def check_stage_inputs(cfg: Config, stages: Sequence[int]) -> None:
    """Config-level checks of what each requested stage needs (before anything is loaded)."""
    if 1 in stages and not cfg.data.train_file:
        raise ConfigError("stage 1 needs data.train_file (a JSONL of {src_text, tgt_text, src_lang, tgt_lang})")
    if 2 in stages and not cfg.stage2.train_file:
        raise ConfigError("stage 2 needs stage2.train_file (a JSONL of {instruction, input, output, lang})")
    for key, value in (("data.train_file", cfg.data.train_file), ("data.eval_file", cfg.data.eval_file)):
        if 1 in stages and value and not Path(value).is_file():
            raise ConfigError(f"{key}: file not found: {value}")
    for key, value in (("stage2.train_file", cfg.stage2.train_file), ("stage2.eval_file", cfg.stage2.eval_file)):
        if 2 in stages and value and not Path(value).is_file():
            raise ConfigError(f"{key}: file not found: {value}")


def _estimate_model_dir(cfg: Config, stages: Sequence[int]) -> Path | None:
    """The directory whose weights size the run (for the free-space estimate), if it is on disk already."""
    if 1 not in stages:
        return Path(cfg.stage2.init_from) if cfg.stage2.init_from else export_dir(cfg, 1)

    name = cfg.model.name_or_path
    if name in PACKAGED:
        return packaged_model_dir(name, cfg.model.cache_dir)
    return Path(name) if Path(name).is_dir() else None


def preflight(cfg: Config, stages: Sequence[int]) -> None:
    """What can fail before any model or data is loaded, checked at once, each in one line: the batch split over the
    ranks, the model and tokenizer names (:func:`alignx.models.model_name_problem`, no hub retries offline), the
    output directory (writable, room for the run: :func:`alignx.storage.probe_output_dir`) and every input file of
    every stage (:func:`alignx.data.validate_inputs`)."""
    check_stage_inputs(cfg, stages)
    # The launcher sets WORLD_SIZE before this process starts: the split is known before the group exists.
    cfg.train.grad_accum_steps(int(os.environ.get("WORLD_SIZE", "1")))
    if 1 in stages:
        for key in ("name_or_path", "tokenizer"):
            name = getattr(cfg.model, key)
            problem = model_name_problem(name, f"model.{key}", weights=key == "name_or_path") if name else None
            if problem is not None:
                raise ConfigError(problem)
    probe_output_dir(cfg, tuple(stages), _estimate_model_dir(cfg, stages))
    validate_inputs(cfg, tuple(stages))


def stage_command(stage: int | str, config_path: str | None, overrides: Sequence[str] = ()) -> str:
    """The launch command of one stage, as a user would type it."""
    parts = ["deepspeed", "train.py"]
    if config_path:
        parts += ["--config", str(config_path)]
    parts += ["--stage", str(stage), *overrides]
    return shlex.join(parts)


def verify_export(path: str | Path) -> dict[str, Any]:
    """Check that ``path`` is a complete alignx export; returns its manifest.

    Complete means: :data:`alignx.export.EXPORT_MANIFEST` exists (it is written last) with ``complete: true``,
    every file it lists exists with the listed size, ``config.json`` and a weights file are among them, and no
    weight name starts with an excluded prefix (the language-matching head).

    Raises:
        StageError: listing every problem found.
    """
    path = Path(path)
    manifest_file = path / EXPORT_MANIFEST
    if not path.is_dir():
        raise StageError(f"{path} does not exist")
    if not manifest_file.is_file():
        raise StageError(f"{path} has no {EXPORT_MANIFEST} (the export did not finish)")
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError as e:
        raise StageError(f"{manifest_file} is not valid JSON: {e}") from None
    problems = []
    if not manifest.get("complete"):
        problems.append("the manifest does not say complete")
    files = manifest.get("files", {})
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            problems.append(f"{name} is missing")
        elif f.stat().st_size != size:
            problems.append(f"{name} has {f.stat().st_size} bytes, the manifest says {size}")
    if "config.json" not in files:
        problems.append("no config.json")
    weights = [n for n in files if n.endswith(".safetensors")]
    if not weights:
        problems.append("no .safetensors weights")
    excluded = tuple(manifest.get("excluded_prefixes", ()))
    if weights and excluded and not problems:
        from safetensors import safe_open

        for name in weights:
            with safe_open(str(path / name), framework="pt") as f:
                bad = [k for k in f.keys() if k.startswith(excluded)]
            if bad:
                problems.append(f"{name} holds excluded weights {bad[:3]}")
    if problems:
        raise StageError(f"{path} is not a complete export: " + "; ".join(problems))
    return manifest


def _check_stage2_start(cfg: Config, config_path: str | None, overrides: Sequence[str]) -> None:
    if cfg.stage2.init_from:
        start = Path(cfg.stage2.init_from)
        if not (start / "config.json").is_file():
            raise StageError(f"stage2.init_from={start} is not a Hugging Face model directory (no config.json)")
        return
    try:
        verify_export(export_dir(cfg, 1))
    except StageError as e:
        raise StageError(
            f"stage 2 starts from stage 1's export, and {e}.\nProduce it with:\n  "
            f"{stage_command(1, config_path, overrides)}\n(or set stage2.init_from to a Hugging Face model directory)"
        ) from None


def run_stages(cfg: Config, stage: str | int, *, config_path: str | None = None, overrides: Sequence[str] = ()) -> int:
    """Run the requested stage(s) in this process; returns the process exit code.

    0 = every stage completed; 143 = stopped by SIGTERM after writing a checkpoint (resume with ``--resume auto``).
    """
    stages = parse_stages(stage)
    preflight(cfg, stages)
    for s in stages:
        if s == 2:
            _check_stage2_start(cfg, config_path, overrides)
        result = Trainer(stage_config(cfg, s), s).run()
        if result.status != "completed":
            return 143
    return 0
