"""A Hugging Face model directory from trained weights: ``save_pretrained`` + tokenizer + the completeness manifest.

:meth:`alignx.engine.Engine.export_hf` gathers the weights (from ZeRO-3 shards too) and calls :func:`write_hf_dir`
on rank 0; :func:`alignx.schedule.check_export` reads the manifest back. A leaf: it knows no engine and no config.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["EXPORT_MANIFEST", "write_hf_dir"]

EXPORT_MANIFEST = "alignx_export.json"
"""Written last into an exported directory: its files with their sizes and ``complete: true``."""


def write_hf_dir(
    lm: nn.Module,
    state: Mapping[str, torch.Tensor],
    out_dir: Path,
    tokenizer: Any | None = None,
    *,
    excluded_prefixes: list[str],
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``out_dir``: ``lm.save_pretrained`` with the full ``state`` (safetensors; the KV cache switched on for
    generation), the tokenizer, then :data:`EXPORT_MANIFEST` (parameters, the left-out submodule prefixes, every
    file with its size, ``meta``). Written under ``<out_dir>.partial`` and renamed when complete."""
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # Training switches the KV cache off; the exported model is for generation, so it is saved on.
    use_cache = getattr(lm.config, "use_cache", None)
    if use_cache is not None:
        lm.config.use_cache = True
    try:
        lm.save_pretrained(tmp, state_dict=dict(state), safe_serialization=True)
    finally:
        if use_cache is not None:
            lm.config.use_cache = use_cache
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    manifest = {
        "format": 1,
        "num_parameters": sum(t.numel() for t in {id(t): t for t in state.values()}.values()),
        "excluded_prefixes": excluded_prefixes,
        "files": {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()},
        **dict(meta or {}),
        "complete": True,
    }
    (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
