"""Values the whole package agrees on, defined once: the ignored label, the span ids and the stage-1 instruction.

A leaf module: it imports nothing from alignx, so every module (the kernels included) can import it.
"""

from __future__ import annotations

__all__ = ["DEFAULT_INSTRUCTION", "IGNORE_INDEX", "PROMPT_SPAN", "RECIPE_DATA_KINDS", "SOURCE_SPAN", "TARGET_SPAN"]

IGNORE_INDEX = -100
"""The label of a token the LM loss does not count (torch's and Hugging Face's ``ignore_index``)."""

PROMPT_SPAN, SOURCE_SPAN, TARGET_SPAN = 0, 1, 2
"""``span_ids`` / token regions: 0 prompt or padding (no span), 1 source tokens, 2 target tokens."""

DEFAULT_INSTRUCTION = "Translate the following sentence from {src} to {tgt}."
"""The stage-1 instruction (``data.instruction``); ``{src}`` and ``{tgt}`` are replaced by language names."""

RECIPE_DATA_KINDS = ("afp", "clmap")
"""``objective.kind`` values whose recipe reads and prepares its own stage-1 records (:func:`alignx.recipes.data_hooks`
returns their hooks, None for the other kinds): :mod:`alignx.data` does not read their stage-1 files."""
