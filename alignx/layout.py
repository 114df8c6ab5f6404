"""Where a run's stages write, under ``train.output_dir`` (the layout is described in :mod:`alignx.schedule`).

A leaf module (it imports nothing from alignx at run time): the trainer, the schedule, the demo and the comparison
all name the same directories.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from alignx.config import Config

__all__ = ["export_dir", "stage_dir"]


def stage_dir(cfg: Config, stage: int) -> Path:
    """``<train.output_dir>/stage<stage>``."""
    return Path(cfg.train.output_dir) / f"stage{stage}"


def export_dir(cfg: Config, stage: int) -> Path:
    """The Hugging Face directory a finished stage exports: ``<stage dir>/export``."""
    return stage_dir(cfg, stage) / "export"
