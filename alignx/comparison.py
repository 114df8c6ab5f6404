"""A comparison of trained models on one held-out evaluation: the base model, then every contender trained and its
exports evaluated, then the report. ``alignx compare`` runs the recipes (one contender each) on one budget; the demo
is the comparison of one recipe (:mod:`alignx.demo`).

Also the recipe comparison's own pieces: the shared data with the afp / clmap records, the budget, the config
overrides every recipe gets, the training of one recipe, and ``compare.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignx.config import load_config
from alignx.data.build import _parse_versions, build
from alignx.data.sources import SPLITS, Unit, load_units
from alignx.eval.pipeline import Evaluator
from alignx.eval.report import best_layer, write_report
from alignx.layout import export_dir, stage_dir
from alignx.recipes import RECIPES, Recipe, RecipeError, afp, clmap, recipe_config_path
from alignx.recipes.baselines import base_model_dir
from alignx.schedule import run_stages, verify_export

# ---------------------------------------------------------------------------------------------------------------
# The comparison: base -> train each contender -> evaluate its exports


@dataclass
class Trained:
    """What training one contender left to evaluate: the exported model of each stage, and the layer it aligned
    (None: the evaluation config's)."""

    exports: dict[int, str]
    align_layer: int | None = None


@dataclass
class Contender:
    """One trained line of a comparison: its name, how it trains, and the label of each stage's result."""

    name: str
    train: Callable[[], Trained]
    labels: dict[int, str]


def run_comparison(
    evaluate: Evaluator, base: str | None, contenders: Sequence[Contender], *, prefix: str
) -> dict[str, dict[str, Any]]:
    """Evaluate the base model, then train each contender and evaluate the exports the schedule names.

    ``evaluate.cfg.schedule`` lists what is evaluated: ``base`` (the model ``base``, unless None), ``stage1``,
    ``stage2`` (each contender's export of that stage). ``prefix`` starts the progress lines. Returns the results
    by label, in the order they were measured.
    """
    schedule = evaluate.cfg.schedule
    results: dict[str, dict[str, Any]] = {}
    if base is not None and "base" in schedule:
        print(f"{prefix} evaluating the base model {base}", flush=True)
        results["base"] = evaluate(base, "base")
    for contender in contenders:
        trained = contender.train()
        for stage, model in trained.exports.items():
            if f"stage{stage}" in schedule:
                label = contender.labels[stage]
                results[label] = evaluate(model, label, trained.align_layer)
    return results


# ---------------------------------------------------------------------------------------------------------------
# Budget


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


def build_recipe_data(args: argparse.Namespace, out: Path) -> dict[str, Any]:
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


def recipe_contender(recipe: Recipe, args: argparse.Namespace, budget: Budget, data: Path, out: Path) -> Contender:
    """``recipe`` as a contender: trained by :func:`run_recipe` (summary in ``runs/<name>/recipe.json``), its stage-1
    result labelled ``<name>-stage1`` and its final one ``<name>``."""

    def train() -> Trained:
        print(f"[compare] recipe {recipe.name}: {recipe.title}", flush=True)
        t0 = time.perf_counter()
        info = run_recipe(recipe, args, budget, data, out)
        info["wall_seconds_train"] = round(time.perf_counter() - t0, 1)
        (out / "runs" / recipe.name / "recipe.json").write_text(json.dumps(info, indent=2) + "\n")
        stage1 = {1: info["stage1_export"]} if info["stage1_export"] else {}
        return Trained({**stage1, 2: info["export"]})

    return Contender(recipe.name, train, {1: f"{recipe.name}-stage1", 2: recipe.name})


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _clear(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


# ---------------------------------------------------------------------------------------------------------------
# Report


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


def _setup_lines(state: dict[str, Any]) -> list[str]:
    """The title, the model and languages, the budget and the data."""
    a = state["args"]
    budget = state["budget"]
    return [
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
    ]


def _recipe_lines(state: dict[str, Any]) -> list[str]:
    """One row per trained recipe: what stage 1 trains, the losses of both stages, the training time."""
    lines = [
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
    return lines


def _headline_lines(state: dict[str, Any], results: dict[str, dict]) -> list[str]:
    """The headline metrics (:func:`headline`) with a column per result: base, then the recipes."""
    labels = [lb for lb in ("base", *state["recipes"]) if lb in results]
    lines = [
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
    return lines


def render_compare(state: dict[str, Any], results: dict[str, dict]) -> str:
    """``compare.md``: setup, budget, per-recipe training and the headline metrics side by side."""
    lines = _setup_lines(state) + _recipe_lines(state) + _headline_lines(state, results)
    chance = next(iter(results.values()))["retrieval"] if results else {}
    if chance:
        lines += ["", f"Retrieval chance: {next(iter(chance.values()))['chance']:.3f}."]
    lines += ["", "Per-language and per-layer tables and plots: [eval/report.md](eval/report.md).", ""]
    return "\n".join(lines)


def gather_results(results: dict[str, dict], eval_dir: Path) -> dict[str, dict]:
    """``results`` (measured by this run), then every other result in ``eval_dir`` by file name."""
    for path in sorted(eval_dir.glob("*.json")):
        obj = json.loads(path.read_text())
        if "retrieval" in obj:
            results.setdefault(obj["label"], obj)
    return results


def comparison_state(args: argparse.Namespace, budget: Budget, info: dict[str, Any], data: Path, out: Path) -> dict:
    """``compare.json``: the settings, the budget, the data's summary and every trained recipe's summary."""
    return {
        "args": {k: v for k, v in vars(args).items() if k not in ("recipes", "reuse", "report_only", "no_base")},
        "budget": {"stage1": budget.stage1, "stage2": budget.stage2},
        "data": info or _read_json(data / "recipes.json"),
        "recipes": {
            n: _read_json(out / "runs" / n / "recipe.json")
            for n in RECIPES
            if (out / "runs" / n / "recipe.json").is_file()
        },
    }


def write_comparison(state: dict[str, Any], results: dict[str, dict], out: Path) -> dict[str, str]:
    """``compare.json``, ``eval/report.md`` with its plots, and ``compare.md``; returns the report's paths."""
    order = [lb for lb in ("base", *state["recipes"]) if lb in results]
    order += [lb for lb in results if lb not in order]
    (out / "compare.json").write_text(json.dumps(state, indent=2) + "\n")
    paths = write_report([results[lb] for lb in order], out / "eval")
    (out / "compare.md").write_text(render_compare(state, results), encoding="utf-8")
    return paths
