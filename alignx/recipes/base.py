"""The recipe protocol: everything a method plugs into the shared trainer, engine and evaluation.

A :class:`Recipe` names its objective class, how its stage-1 records are prepared, which columns a row carries, how
rows are collated and in which order they are batched, and which objective terms are always 0. Every field but the
descriptive ones has the shared AlignX pipeline as its default (:mod:`alignx.data`, :class:`AlignXObjective`), so a
new recipe states only what it changes. The registry is :data:`alignx.recipes.RECIPES`.

The three recipes on the shared pipeline are defined here: :data:`ALIGNX` (the default), :data:`CPT_SFT` (its
stage-1 text with plain NTP) and :data:`SFT` (no stage 1; its preparation is the stage-2 instruction data, which
every recipe's stage 2 uses).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from alignx.data import Collator, PackedCollator, micro_batches, prepare_stage1, prepare_stage2
from alignx.objective import AlignXObjective

if TYPE_CHECKING:
    from alignx.config import Config

__all__ = ["ALIGNX", "CPT_SFT", "SFT", "Recipe", "RecipeError", "shared_collator", "shared_micro_batches"]


class RecipeError(ValueError):
    """An unknown recipe or a recipe that cannot run with what it was given."""


def shared_collator(tokenizer: Any, cfg: Config) -> Collator | PackedCollator:
    """The shared collator: packed rows (``data.packing``) or padded micro-batches (``data.padding_side``)."""
    if cfg.data.packing:
        return PackedCollator()
    return Collator(tokenizer, padding_side=cfg.data.padding_side, pad_to_multiple_of=8)


def shared_micro_batches(
    rows: Any, micro_batch_size: int, *, strata: Sequence[Hashable] | None = None, **order: Any
) -> list[list[int]]:
    """:func:`alignx.data.micro_batches` over the ``length`` column of the prepared training ``rows``."""
    return micro_batches(list(rows["length"]), micro_batch_size, strata=strata, **order)


@dataclass(frozen=True)
class Recipe:
    """One entry of the registry.

    Attributes:
        name: the recipe's name (``alignx compare --recipes``) and the stem of its config file.
        title: one line for reports.
        reference: where the method comes from.
        kind: ``objective.kind`` of its stage 1 (None without stage 1). The registry's kinds are the values the config
            accepts.
        stage1: which stage-1 records it trains on: ``"pairs"`` (``alignx data build``'s stage-1 translation
            instructions), ``"afp"`` (:func:`alignx.recipes.afp.build_records`), ``"clmap"``
            (:func:`alignx.recipes.clmap.build_records`), or None (no stage 1).
        objective: the objective class, built as ``objective(cfg.objective, min_target_tokens=...)``.
        prepare: ``(cfg, tokenizer, *, train_file, eval_file=None, cache_dir=None, verbose=True) -> Prepared``.
        collator: ``(tokenizer, cfg) -> callable(rows) -> batch``.
        micro_batches: ``(rows, micro_batch_size, *, world_size, rank, seed, epoch, group_by_length, drop_last,
            grad_accum[, strata]) -> this rank's micro-batches`` over the prepared training ``rows``.
        own_batch_order: ``micro_batches`` decides the batch composition itself (e.g. language-balanced), so
            ``data.batching=direction`` cannot apply.
        extra_columns: row columns its collator needs besides the shared ones.
        unused_terms: objective terms that are always 0 for it (not logged).
    """

    name: str
    title: str
    reference: str
    kind: str | None
    stage1: str | None
    objective: type[AlignXObjective] = AlignXObjective
    prepare: Callable[..., Any] = prepare_stage1
    collator: Callable[[Any, Config], Any] = shared_collator
    micro_batches: Callable[..., list[list[int]]] = shared_micro_batches
    own_batch_order: bool = False
    extra_columns: tuple[str, ...] = ()
    unused_terms: tuple[str, ...] = ()

    @property
    def stages(self) -> str:
        """The ``--stage`` argument of the trainer: ``"all"`` (stage 1 then 2) or ``"2"``."""
        return "all" if self.stage1 is not None else "2"

    def build_objective(self, cfg: Config) -> AlignXObjective:
        """This recipe's objective for ``cfg`` (its ``objective`` section and ``data.min_target_tokens``)."""
        return self.objective(cfg.objective, min_target_tokens=cfg.data.min_target_tokens)


ALIGNX = Recipe(
    "alignx",
    "AlignX: NTP + contrastive (mid layer, tau 0.1) + language matching, then SFT",
    "Bu et al., EMNLP 2025 (arXiv 2509.24338)",
    kind="alignx",
    stage1="pairs",
)
CPT_SFT = dataclasses.replace(
    ALIGNX,
    name="cpt_sft",
    title="CPT-then-SFT: the AlignX stage-1 text with plain NTP (lambda_ctr = lambda_lam = 0), then SFT",
    reference="baseline",
    kind="ntp",
    unused_terms=("ctr", "lam"),
)
SFT = Recipe(
    "sft",
    "SFT only: stage 2 from the base model",
    "baseline",
    kind=None,
    stage1=None,
    prepare=prepare_stage2,
    unused_terms=("ctr", "lam"),
)
