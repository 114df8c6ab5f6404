"""The method family in one trainer: AlignX, its two relatives and the fine-tuning baselines, as recipes.

A recipe is a configuration (``configs/recipes/<name>.yaml``) plus, at most, one small objective class and its
data format; every recipe runs on the same trainer, engine, data pipeline and evaluation. The registry:

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

The trainer asks this package, through :func:`data_hooks`, how a stage's records are prepared, which columns a
row carries, how rows are collated and in which order they are batched; ``None`` (kinds ``alignx`` and ``ntp``,
and every stage 2) means the shared AlignX pipeline (:mod:`alignx.data`). :mod:`alignx.objective` maps
``objective.kind`` to the objective class (:data:`alignx.objective.RECIPE_OBJECTIVES`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from alignx.recipes import afp, clmap
from alignx.recipes.hooks import DataHooks

if TYPE_CHECKING:
    from alignx.config import Config

__all__ = [
    "RECIPES",
    "DataHooks",
    "Recipe",
    "RecipeError",
    "data_hooks",
    "get_recipe",
    "recipe_config_path",
]


class RecipeError(ValueError):
    """An unknown recipe or a recipe that cannot run with what it was given."""


@dataclass(frozen=True)
class Recipe:
    """One entry of the registry.

    Attributes:
        name: the recipe's name (``alignx compare --recipes``) and the stem of its config file.
        title: one line for reports.
        reference: where the method comes from.
        stage1: which stage-1 records it trains on: ``"pairs"`` (``alignx data build``'s stage-1 translation
            instructions), ``"afp"`` (:func:`alignx.recipes.afp.build_records`), ``"clmap"``
            (:func:`alignx.recipes.clmap.build_records`), or None (no stage 1).
        kind: ``objective.kind`` of its stage 1 (None without stage 1).
    """

    name: str
    title: str
    reference: str
    stage1: str | None
    kind: str | None

    @property
    def stages(self) -> str:
        """The ``--stage`` argument of the trainer: ``"all"`` (stage 1 then 2) or ``"2"``."""
        return "all" if self.stage1 is not None else "2"


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "alignx",
            "AlignX: NTP + contrastive (mid layer, tau 0.1) + language matching, then SFT",
            "Bu et al., EMNLP 2025 (arXiv 2509.24338)",
            "pairs",
            "alignx",
        ),
        Recipe(
            "afp",
            "AFP: InfoNCE on separately encoded pairs (tau 0.05) + 1.5 x CLM on cross-lingual instructions, then SFT",
            "Li et al., NAACL 2024 (arXiv 2311.08089)",
            "afp",
            "afp",
        ),
        Recipe(
            "clmap",
            "Cross-lingual mapping CPT (src->tgt both ways) + monolingual NTP, balanced batches, then SFT",
            "Zheng et al. (arXiv 2604.10590)",
            "clmap",
            "clmap",
        ),
        Recipe(
            "cpt_sft",
            "CPT-then-SFT: the AlignX stage-1 text with plain NTP (lambda_ctr = lambda_lam = 0), then SFT",
            "baseline",
            "pairs",
            "ntp",
        ),
        Recipe("sft", "SFT only: stage 2 from the base model", "baseline", None, None),
    )
}
"""Every recipe, by name."""


def get_recipe(name: str) -> Recipe:
    """The registry entry of ``name``; an unknown name is an error listing the valid ones."""
    if name not in RECIPES:
        raise RecipeError(f"unknown recipe {name!r}; valid recipes: {', '.join(RECIPES)}")
    return RECIPES[name]


def recipe_config_path(name: str, root: str | Path | None = None) -> Path:
    """``configs/recipes/<name>.yaml`` of the repository (or under ``root``)."""
    get_recipe(name)
    base = Path(root) if root is not None else Path(__file__).resolve().parents[2] / "configs" / "recipes"
    path = base / f"{name}.yaml"
    if not path.is_file():
        raise RecipeError(f"the config of recipe {name!r} is missing: {path}")
    return path


# ----------------------------------------------------------------------------------------------------------------
# What the trainer asks


def data_hooks(cfg: Config) -> DataHooks | None:
    """The data hooks of ``cfg.objective.kind`` (None = the shared AlignX pipeline: kinds ``alignx`` and ``ntp``)."""
    kind = cfg.objective.kind
    if kind == "afp":
        return afp.DATA_HOOKS
    if kind == "clmap":
        return clmap.DATA_HOOKS
    return None
