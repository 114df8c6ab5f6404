"""Evaluation of multilingual alignment: per-layer retrieval and cosine gap, a language-identity probe,
translation (chrF++, BLEU) and held-out perplexity, with a markdown report and plots.

``alignx eval`` (:mod:`alignx.eval.cli`) runs it on one model; :func:`evaluate` and :func:`write_report` are the
same steps as functions (used by the demo schedule: base, stage1, stage2).
"""

from __future__ import annotations

from typing import Any

__all__ = ["collect_results", "evaluate", "load_eval_units", "load_model", "write_report"]


def __getattr__(name: str) -> Any:
    # Lazy: importing alignx.eval must not import torch, transformers or matplotlib.
    if name in ("evaluate", "load_eval_units", "load_model"):
        from alignx.eval import cli

        return getattr(cli, name)
    if name in ("collect_results", "write_report"):
        from alignx.eval import report

        return getattr(report, name)
    raise AttributeError(f"module 'alignx.eval' has no attribute {name!r}")
