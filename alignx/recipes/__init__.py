"""The method family in one trainer: AlignX, its two relatives and the fine-tuning baselines, as recipes.

A recipe is a configuration (``configs/recipes/<name>.yaml``) plus one :class:`Recipe` entry
(:mod:`alignx.recipes.base`): its objective class, record preparation, columns, collator, batch order and unused
terms, each defaulting to the shared AlignX pipeline. Every recipe runs on the same trainer, engine, data pipeline and
evaluation. The registry (:data:`RECIPES`, the one place a recipe is listed):

===========  =========================================================================  ==============  ========
recipe       stage 1 (what the model is continued-trained on)                           objective.kind  stage 2
===========  =========================================================================  ==============  ========
``alignx``   translation instructions: NTP + contrastive + language matching (AlignX)   ``alignx``      SFT
``afp``      separately encoded translation pairs (InfoNCE) + cross-lingual instruction  ``afp``         SFT
             following (CLM), ``1.0 L_CL + 1.5 L_CLM`` (Li et al., NAACL 2024)
``clmap``    cross-lingual mapping (src -> tgt, both directions) mixed with monolingual  ``clmap``       SFT
             NTP, language-balanced batches (arXiv 2604.10590)
``cpt_sft``  the AlignX stage-1 text with the auxiliary losses off (plain NTP)          ``ntp``         SFT
``sft``      none: stage 2 from the base model                                          --              SFT
===========  =========================================================================  ==============  ========

Stage 2 is the same instruction fine-tuning for every recipe (:func:`alignx.schedule.stage_config`).

The trainer asks :func:`stage_recipe` for the recipe of a stage (stage 1: the one of ``objective.kind``; stage 2:
:data:`alignx.recipes.base.SFT`) and uses its fields without branching; the model builds its objective with
:func:`build_objective`; the config accepts exactly the kinds of the registry (:data:`KINDS`).

Adding a recipe: one module defining ``RECIPE = Recipe(...)`` (and its objective class, if it has its own) and its
entry in :data:`RECIPES`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from alignx.recipes import afp, clmap
from alignx.recipes.base import ALIGNX, CPT_SFT, SFT, Recipe, RecipeError

if TYPE_CHECKING:
    from alignx.config import Config, ObjectiveConfig
    from alignx.objective import AlignXObjective

__all__ = [
    "KINDS",
    "RECIPES",
    "RECIPE_OBJECTIVES",
    "Recipe",
    "RecipeError",
    "build_objective",
    "data_hooks",
    "get_recipe",
    "recipe_config_path",
    "recipe_of_kind",
    "stage_recipe",
]

RECIPES: dict[str, Recipe] = {r.name: r for r in (ALIGNX, afp.RECIPE, clmap.RECIPE, CPT_SFT, SFT)}
"""Every recipe, by name: the registry."""

_BY_KIND: dict[str, Recipe] = {r.kind: r for r in RECIPES.values() if r.kind is not None}
KINDS: tuple[str, ...] = tuple(_BY_KIND)
"""The ``objective.kind`` values (one per recipe with a stage 1), in registry order."""

RECIPE_OBJECTIVES: dict[str, type[AlignXObjective]] = {
    k: r.objective for k, r in _BY_KIND.items() if r.objective is not ALIGNX.objective
}
"""Kinds whose recipe brings its own objective class (the others use :class:`alignx.objective.AlignXObjective`)."""


def get_recipe(name: str) -> Recipe:
    """The registry entry of ``name``; an unknown name is an error listing the valid ones."""
    if name not in RECIPES:
        raise RecipeError(f"unknown recipe {name!r}; valid recipes: {', '.join(RECIPES)}")
    return RECIPES[name]


def recipe_of_kind(kind: str) -> Recipe:
    """The recipe whose stage 1 is ``objective.kind = kind``."""
    if kind not in _BY_KIND:
        raise RecipeError(f"unknown objective.kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    return _BY_KIND[kind]


def stage_recipe(cfg: Config, stage: int) -> Recipe:
    """What the trainer runs in ``stage``: the recipe of ``cfg.objective.kind`` (stage 1) or the shared
    instruction fine-tuning of every recipe (stage 2)."""
    return recipe_of_kind(cfg.objective.kind) if stage == 1 else SFT


def build_objective(cfg: ObjectiveConfig, *, min_target_tokens: int = 3) -> AlignXObjective:
    """The objective of ``cfg.kind``: the class of its recipe (:class:`AlignXObjective` or a recipe's own)."""
    return recipe_of_kind(cfg.kind).objective(cfg, min_target_tokens=min_target_tokens)


def data_hooks(cfg: Config) -> Recipe | None:
    """The recipe of ``cfg.objective.kind`` when it prepares its own stage-1 records, else None (the shared
    AlignX pipeline: kinds ``alignx`` and ``ntp``)."""
    recipe = recipe_of_kind(cfg.objective.kind)
    return recipe if recipe.prepare is not ALIGNX.prepare else None


def recipe_config_path(name: str, root: str | Path | None = None) -> Path:
    """``configs/recipes/<name>.yaml`` of the repository (or under ``root``)."""
    get_recipe(name)
    base = Path(root) if root is not None else Path(__file__).resolve().parents[2] / "configs" / "recipes"
    path = base / f"{name}.yaml"
    if not path.is_file():
        raise RecipeError(f"the config of recipe {name!r} is missing: {path}")
    return path
