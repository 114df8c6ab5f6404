"""Evaluation of multilingual alignment: per-layer retrieval and cosine gap, a language-identity probe,
translation (chrF++, BLEU) and held-out perplexity, with a markdown report and plots.

``alignx eval`` (:mod:`alignx.eval.cli`) runs it on one model; :mod:`alignx.eval.pipeline` holds the steps
(:func:`evaluate`, driven by an :class:`~alignx.config.EvalConfig`, and :class:`Evaluator` for a model path) and
:func:`write_report` the report (used by the demo and ``alignx compare``: base, stage1, stage2, ...).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Evaluator", "collect_results", "evaluate", "load_eval_units", "load_model", "write_report"]


def __getattr__(name: str) -> Any:
    # Lazy: importing alignx.eval must not import torch, transformers or matplotlib.
    if name in ("Evaluator", "evaluate", "load_model"):
        from alignx.eval import pipeline

        return getattr(pipeline, name)
    if name == "load_eval_units":
        from alignx.eval import data

        return data.load_eval_units
    if name in ("collect_results", "write_report"):
        from alignx.eval import report

        return getattr(report, name)
    raise AttributeError(f"module 'alignx.eval' has no attribute {name!r}")
