"""The fine-tuning baselines AlignX is measured against; configuration only, no objective of their own.

- ``sft`` (SFT only): stage 2 — the multilingual instruction fine-tuning every recipe ends with — started from the
  base model itself (``stage2.init_from`` = the base model's directory), no stage 1.
- ``cpt_sft`` (CPT then SFT): stage 1 on the very AlignX stage-1 text (the translation instructions) with the
  auxiliary losses switched off — ``objective.kind: ntp``, i.e. ``lambda_ctr = lambda_lam = 0``, no contrastive
  pooling and no language-matching head — then the same stage 2.

Their configs are ``configs/recipes/sft.yaml`` and ``configs/recipes/cpt_sft.yaml``.
"""

from __future__ import annotations

from pathlib import Path

from alignx.model import resolve_model_source

__all__ = ["base_model_dir"]


def base_model_dir(name_or_path: str, cache_dir: str | None = None) -> str:
    """The Hugging Face directory of ``model.name_or_path`` that stage 2 of ``sft`` starts from.

    Packaged names (``gemma3-270m``, ``smollm2-135m``) and the ``tiny-*`` test models resolve to their cached
    directories (created on first use); a local directory is returned as is.

    Raises:
        ValueError: the model is only available as a GGUF file or a hub id (stage 2 needs a local directory).
    """
    src = resolve_model_source(name_or_path, cache_dir)
    if src.gguf_file or not (Path(src.path) / "config.json").is_file():
        raise ValueError(
            f"model {name_or_path!r} resolves to {src.path!r}{' (GGUF)' if src.gguf_file else ''}, not a local HF "
            "directory; the sft baseline starts stage 2 from a directory (stage2.init_from)"
        )
    return src.path
