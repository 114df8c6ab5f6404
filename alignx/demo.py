"""``alignx demo`` (``make demo``): a real model, real human translations, stage 1 -> stage 2, measured before/after.

Steps, each writing under ``--out`` (default ``runs/demo``)::

    data/          alignx data build --sources bible --langs en,<langs>     (train = every book but John and Mark)
    eval/base.json        evaluation of the packaged model before training
    train/stage1/         AlignX stage 1 (NTP + contrastive + language matching), exported to train/stage1/export
    eval/stage1.json      evaluation after stage 1
    train/stage2/         stage 2 (multilingual instruction tuning), exported to train/stage2/export
    eval/stage2.json      evaluation after stage 2
    eval/report.md + PNG plots: the before/after tables of the three results

The evaluation is held out by book (test = Mark, centring and probe on John), so nothing measured was trained on.
The defaults: Gemma-3-270M, English <-> Swahili/Tagalog/Hindi, 40 stage-1 and 12 stage-2 steps of 8 pairs (one
micro-batch: 8 contrastive candidates), peak lr 7e-5 (3e-5 with ``--reference``), and the alignment settings
measured to make the contrastive term learn on Gemma 3 (docs/alignment.md, examples/ablation): the cosine taken
after a per-language shrunk ZCA whitening with running statistics (``--similarity whiten --per-language``), one
language direction per micro-batch (``--batching direction``) and the aligned layer measured on the base model
(``--align-layer auto``: 11).
``--reference`` runs the official objective instead (raw cosine, mixed batches, layer num_layers // 2; ``make demo
DEMO_ARGS=--reference``). ``--steps``/``--stage2-steps``/``--train-pairs`` scale the run; everything is a function
of ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alignx.comparison import Contender, Trained, run_comparison
from alignx.config import Config, ConfigError, EvalConfig, load_config, parse_overrides
from alignx.data.build import build, format_stats
from alignx.data.sources import SourceError
from alignx.eval.data import EvalError, load_eval_units
from alignx.eval.pipeline import Evaluator
from alignx.eval.report import collect_results, write_report
from alignx.layout import export_dir, stage_dir
from alignx.schedule import run_stages
from alignx.similarity import SPACES


def demo_overrides(args: argparse.Namespace, data: Path, train_dir: Path) -> dict[str, Any]:
    """Config values of the demo run (everything else keeps the reference defaults)."""
    return {
        "model.name_or_path": args.model,
        "model.align_layer": args.align_layer,
        "data.train_file": str(data / "stage1" / "train.jsonl"),
        "data.eval_file": str(data / "stage1" / "dev.jsonl"),
        "data.cutoff_len": 256,
        "train.output_dir": str(train_dir),
        "train.max_steps": args.steps,
        "train.global_batch_size": args.batch_size,
        "train.micro_batch_size": args.micro_batch_size,
        "train.eval_every": 0,  # the demo's measure is its own held-out evaluation, not the loss on dev
        "train.save_every": 0,
        "train.log_every": 1,
        "train.seed": args.seed,
        "train.tensorboard": False,
        "objective.center": args.center,
        "objective.similarity": args.similarity,
        "objective.similarity_per_language": args.per_language,
        "data.batching": args.batching,
        "data.labels": args.labels,
        "optim.lr": demo_lr(args),
        "optim.warmup_steps": max(1, args.steps // 10),
        "stage2.train_file": str(data / "stage2" / "train.jsonl"),
        "stage2.eval_file": str(data / "stage2" / "dev.jsonl"),
        "stage2.max_steps": args.stage2_steps,
    }


def demo_langs(args: argparse.Namespace) -> list[str]:
    """The languages trained and evaluated against English (``--langs``)."""
    return [x.strip() for x in args.langs.split(",") if x.strip()]


def build_data(args: argparse.Namespace, data: Path, *, progress: bool = True) -> dict[str, Any]:
    """The demo's data under ``data``: ``alignx data build --sources bible --langs en,<langs>`` with the demo's seed
    and sizes (``--train-pairs`` train verses, ``--eval-pairs`` held-out verses per language); returns the build
    summary. ``benchmarks/bench_data_validation.py`` prepares exactly these files."""
    return build(
        ["bible"],
        ["en", *demo_langs(args)],
        data,
        seed=args.seed,
        max_per_lang=args.train_pairs,
        max_eval_per_lang=args.eval_pairs,
        progress=progress,
    )


def _layer(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {value!r}") from None


DEMO_LR = 7e-5
"""The demo's peak learning rate: the one measured setting that doubles Swahili retrieval while English perplexity
stays within +2 % after stage 1 (examples/ablation/README.md: 3e-5, 6e-5, 7e-5, 8e-5)."""
REFERENCE_DEMO_LR = 3e-5
"""``--reference``'s peak learning rate (its committed run, examples/demo/reference/)."""


def demo_lr(args: argparse.Namespace) -> float:
    """``--lr`` when given, else :data:`DEMO_LR` (:data:`REFERENCE_DEMO_LR` with ``--reference``)."""
    if args.lr is not None:
        return float(args.lr)
    return REFERENCE_DEMO_LR if args.reference else DEMO_LR


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The demo's arguments; ``--reference`` resets the alignment settings to the official objective's."""
    args = parser().parse_args(argv)
    if args.reference:
        args.align_layer, args.similarity, args.per_language, args.batching = None, "cosine", False, "mixed"
    if args.center == "batch":  # the legacy spelling of similarity=center
        args.similarity, args.per_language = "center", False
    return args


def trained_align_layer(cfg: Any, requested: int | str | None) -> int | None:
    """The layer stage 1 aligned: ``auto`` is read back from the stage's saved config (the trainer writes its
    choice there); otherwise the requested one."""
    if requested != "auto":
        return requested  # type: ignore[return-value]
    import yaml

    saved = yaml.safe_load((stage_dir(cfg, 1) / "config.yaml").read_text())
    return int(saved["model"]["align_layer"])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alignx demo", description=__doc__.split("::")[0].strip())
    p.add_argument("--model", default="gemma3-270m", help="packaged name, HF directory or hub id (gemma3-270m)")
    p.add_argument("--langs", default="sw,tl,hi", help="languages trained and evaluated against English")
    p.add_argument("--out", default="runs/demo", help="output directory (runs/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-pairs", type=int, default=512, help="train verses per language (512)")
    p.add_argument("--eval-pairs", type=int, default=200, help="held-out verses per language (200: Mark 1:1-6:8)")
    p.add_argument("--translate-pairs", type=int, default=16, help="held-out verses translated per direction (16)")
    p.add_argument("--ppl-pairs", type=int, default=100, help="held-out verses per language for perplexity (100)")
    p.add_argument("--steps", type=int, default=40, help="stage-1 optimizer steps (40)")
    p.add_argument("--stage2-steps", type=int, default=12, help="stage-2 optimizer steps (12)")
    p.add_argument("--batch-size", type=int, default=8, help="global batch size (8)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="micro batch: also the contrastive negatives (8)")
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate (7e-5; 3e-5 with --reference; the paper's 2e-6 is for 2 epochs)",
    )
    p.add_argument(
        "--center",
        choices=("batch", "none"),
        default="none",
        help="objective.center (none = the reference; batch centres the contrastive states on the batch mean)",
    )
    p.add_argument(
        "--reference",
        action="store_true",
        help="the reference objective: cosine similarity, mixed batches, align layer num_layers // 2 (the defaults "
        "below are the measured better settings, docs/alignment.md)",
    )
    p.add_argument(
        "--align-layer",
        type=_layer,
        default="auto",
        help="aligned layer: an integer, or 'auto' = the base model's best middle layer (auto; reference: L // 2)",
    )
    p.add_argument(
        "--similarity",
        choices=tuple(SPACES),
        default="whiten",
        help="objective.similarity: the space of the contrastive cosine (whiten; reference: cosine)",
    )
    p.add_argument(
        "--per-language",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="objective.similarity_per_language: running statistics per language (on; reference: off)",
    )
    p.add_argument(
        "--batching",
        choices=("mixed", "direction"),
        default="direction",
        help="data.batching: one language direction per micro-batch (direction; reference: mixed)",
    )
    p.add_argument("--labels", choices=("all", "response"), default="all", help="data.labels (all = reference)")
    _add_run_arguments(p)
    return p


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Which parts of the demo run: the stages, further overrides, a reused base result, training at all."""
    p.add_argument(
        "--stages",
        choices=("all", "1", "2"),
        default="all",
        help="all (default); 1 = stage 1 and its evaluation only (ablations); 2 = stage 2 from the stage-1 export "
        "already in --out, then both evaluations",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="any further config override of the training run, e.g. --set objective.negatives=global+queue",
    )
    p.add_argument(
        "--base-result",
        default=None,
        help="a base.json of an earlier run on the same data, model, seed and pairs: reused instead of re-evaluating",
    )
    p.add_argument("--skip-train", action="store_true", help="only build the data and evaluate the base model")


def _set_align_layer(path: Path, layer: int) -> None:
    """Highlight ``layer`` in an evaluation result (every layer is measured; this only picks the table's row)."""
    result = json.loads(path.read_text())
    result["align_layer"] = layer
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")


def eval_config(args: argparse.Namespace) -> EvalConfig:
    """The demo's evaluation of every model: held-out Mark, en->x translation, the requested layer highlighted."""
    return EvalConfig(
        langs=demo_langs(args),
        max_pairs=args.eval_pairs,
        translate=args.translate_pairs > 0,
        translate_pairs=args.translate_pairs,
        ppl_pairs=args.ppl_pairs,
        directions=["en-x"],
        align_layer=None if args.align_layer == "auto" else args.align_layer,
    )


class TrainingStopped(RuntimeError):
    """A stage ended with a non-zero status (the demo exits with it)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"training stopped with status {code}")
        self.code = code


def demo_contender(cfg: Config, args: argparse.Namespace, eval_dir: Path) -> Contender:
    """The demo's one recipe: stage 1 and/or stage 2 as ``--stages`` says, its results labelled stage1, stage2."""

    def train() -> Trained:
        parts = {"1": f"stage 1 ({args.steps} steps)", "2": f"stage 2 ({args.stage2_steps} steps)"}
        what = " and ".join(parts.values()) if args.stages == "all" else parts[args.stages]
        print(f"[demo] 3/5 training {what}", flush=True)
        code = run_stages(cfg, args.stages)
        if code != 0:
            raise TrainingStopped(code)
        layer = trained_align_layer(cfg, args.align_layer)
        if layer is not None:  # the tables highlight the layer stage 1 aligned, in every result
            _set_align_layer(eval_dir / "base.json", layer)
        print("[demo] 4/5 evaluating after stage 1 and after stage 2", flush=True)
        stages = (1,) if args.stages == "1" else (1, 2)
        return Trained({s: str(export_dir(cfg, s)) for s in stages}, layer)

    return Contender("alignx", train, {1: "stage1", 2: "stage2"})


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``alignx demo``; returns the exit status."""
    args = parse_args(argv)
    out = Path(args.out)
    data, train_dir, eval_dir = out / "data", out / "train", out / "eval"
    langs = demo_langs(args)
    t_start = time.perf_counter()
    try:
        print(f"[demo] 1/5 data: Bible en + {', '.join(langs)} -> {data}", flush=True)
        summary = build_data(args, data)
        print(format_stats(summary["per_language"]), flush=True)
        units = load_eval_units(langs, data=data)
        cfg = load_config(
            None, {**demo_overrides(args, data, train_dir), **parse_overrides([f"--{item}" for item in args.set])}
        )
    except (SourceError, EvalError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    # The demo's results never carried the load time (timed_load): their reports stay comparable with earlier runs.
    evaluator = Evaluator(units, eval_config(args), eval_dir, cache_dir=cfg.model.cache_dir, timed_load=False)
    base: str | None = args.model
    if args.base_result:
        print(f"[demo] 2/5 base model: reusing {args.base_result}", flush=True)
        eval_dir.mkdir(parents=True, exist_ok=True)
        (eval_dir / "base.json").write_text(Path(args.base_result).read_text())
        base = None
    contenders = [] if args.skip_train else [demo_contender(cfg, args, eval_dir)]
    try:
        run_comparison(evaluator, base, contenders, prefix="[demo] 2/5")
    except TrainingStopped as e:
        print(f"error: {e}; resume with --resume auto", file=sys.stderr)
        return e.code
    paths = write_report(collect_results(eval_dir), eval_dir)
    print(f"[demo] 5/5 done in {(time.perf_counter() - t_start) / 60:.1f} min", flush=True)
    print(f"report: {paths['report']}")
    for name, path in paths.items():
        if name != "report":
            print(f"plot ({name}): {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
