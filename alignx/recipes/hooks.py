"""What a recipe tells the trainer about its stage-1 data (:class:`DataHooks`; :func:`alignx.recipes.data_hooks`).

A leaf of the package: the recipes (:mod:`alignx.recipes.afp`, :mod:`alignx.recipes.clmap`) define their hooks with
it and :mod:`alignx.recipes` imports them, so nothing here imports a recipe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from alignx.config import Config

__all__ = ["DataHooks"]


@dataclass(frozen=True)
class DataHooks:
    """How a recipe's stage-1 records differ from the shared pipeline.

    Attributes:
        prepare: replaces :func:`alignx.data.prepare_stage1`; same signature
            ``(cfg, tokenizer, *, train_file, eval_file=None, cache_dir=None, verbose=True) -> Prepared``.
        extra_columns: row columns the recipe's collator needs besides the shared ones.
        collator: ``(tokenizer, cfg) -> callable(rows) -> batch``; None = :class:`alignx.data.Collator`.
        micro_batches: replaces :func:`alignx.data.micro_batches` for training; called with the prepared training
            dataset instead of its lengths, the other arguments unchanged. None = the shared order.
        unused_terms: objective terms that are always 0 for this recipe (not logged).
    """

    prepare: Callable[..., Any]
    extra_columns: tuple[str, ...] = ()
    collator: Callable[[Any, Config], Any] | None = None
    micro_batches: Callable[..., list[list[int]]] | None = None
    unused_terms: tuple[str, ...] = ()
