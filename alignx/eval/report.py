"""Markdown report with before/after tables over several evaluation results (base, stage1, stage2, ...).

Every table has a column per result, in the order base, stage1, stage2, then any other label by creation time;
the last column of the key tables is the change from the first result to the last one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alignx.eval.plots import plot_per_language, plot_probe_by_layer, plot_retrieval_by_layer

ORDER = ("base", "stage1", "stage2")


def collect_results(folder: str | Path) -> list[dict[str, Any]]:
    """Every result JSON in ``folder`` (files with ``retrieval`` and ``label``), in report order."""
    results = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(obj, dict) and "retrieval" in obj and "label" in obj:
            results.append(obj)
    return order_results(results)


def order_results(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """base, stage1, stage2 first, then the rest by creation time."""

    def key(r: dict[str, Any]) -> tuple:
        label = r["label"]
        return (ORDER.index(label) if label in ORDER else len(ORDER), r.get("created", ""), label)

    return sorted(results, key=key)


def _at(r: dict[str, Any], series: Sequence[float], layer: int) -> float | None:
    return series[r["layers"].index(layer)] if layer in r["layers"] else None


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _delta(a: float | None, b: float | None, digits: int = 3, pct: bool = False) -> str:
    if a is None or b is None:
        return "–"
    if pct:
        return "–" if a == 0 else f"{100 * (b - a) / a:+.1f} %"
    return f"{b - a:+.{digits}f}"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def best_layer(r: dict[str, Any]) -> tuple[int, float]:
    """Layer with the highest en→x retrieval averaged over languages, and that value."""
    langs = list(r["retrieval"])
    means = [sum(r["retrieval"][x]["en2x"][i] for x in langs) / len(langs) for i in range(len(r["layers"]))]
    i = max(range(len(means)), key=means.__getitem__)
    return r["layers"][i], means[i]


def render_report(results: Sequence[dict[str, Any]], plots: dict[str, str] | None = None) -> str:
    """The markdown text of the report over ``results`` (already ordered)."""
    if not results:
        raise ValueError("no results to report")
    results = list(results)
    first, last = results[0], results[-1]
    labels = [r["label"] for r in results]
    langs = list(first["retrieval"])
    k = first["align_layer"]
    multi = len(results) > 1
    change = [f"{labels[0]}→{labels[-1]}"] if multi else []
    out = ["# alignx evaluation report", ""]

    out += _table(
        ["result", "model", "created", "split", "held-out range", "pairs per language", "layers"],
        [
            [
                r["label"],
                f"`{r['model']}`",
                r["created"],
                r["split"],
                r.get("eval_range", ""),
                ", ".join(f"{x}: {r['retrieval'][x]['n']}" for x in r["retrieval"]),
                str(r["num_layers"]),
            ]
            for r in results
        ],
    )
    pool = first["pooling"]
    out += [
        "",
        f"Sentence vectors: mean of a layer's hidden states over the sentence's tokens (decoder body only; layer 0 = "
        f"embeddings), special tokens excluded: {'yes' if pool['special_tokens_excluded'] else 'no'}; first token "
        f"excluded: {'yes' if pool['first_token_excluded'] else 'no'} ({pool['reason']}). Centring before cosine: "
        f"{first['centering']}. Retrieval chance = 1/pairs.",
        "",
    ]

    out += [f"## Parallel-sentence retrieval at layer {k} (top-1)", ""]
    rows = []
    for x in langs:
        for direction, name in (("en2x", f"en→{x}"), ("x2en", f"{x}→en")):
            vals = [_at(r, r["retrieval"][x][direction], k) for r in results]
            rows.append([name, *(_fmt(v) for v in vals), *([_delta(vals[0], vals[-1])] if multi else [])])
    out += _table(["direction", *labels, *change], rows)

    out += ["", f"## Parallel-vs-random cosine gap at layer {k} (centred)", ""]
    rows = []
    for x in langs:
        vals = [_at(r, r["retrieval"][x]["gap"], k) for r in results]
        par = [_at(r, r["retrieval"][x]["parallel_cos"], k) for r in results]
        rows.append(
            [
                f"en–{x}",
                *(f"{_fmt(g)} ({_fmt(p, 2)})" for g, p in zip(vals, par)),
                *([_delta(vals[0], vals[-1])] if multi else []),
            ]
        )
    out += ["Gap (mean parallel cosine in parentheses).", ""]
    out += _table(["pair", *labels, *change], rows)

    out += ["", "## en→x retrieval per layer (mean over languages)", ""]
    layers = first["layers"]
    rows = []
    for layer in layers:
        vals = []
        for r in results:
            v = [_at(r, r["retrieval"][x]["en2x"], layer) for x in langs]
            vals.append(None if any(a is None for a in v) else sum(v) / len(v))
        mark = " (highlighted)" if layer == k else ""
        rows.append([f"{layer}{mark}", *(_fmt(v) for v in vals), *([_delta(vals[0], vals[-1])] if multi else [])])
    out += _table(["layer", *labels, *change], rows)
    out += [
        "",
        "Best layer (mean en→x): "
        + "; ".join(f"{r['label']}: layer {best_layer(r)[0]} ({best_layer(r)[1]:.3f})" for r in results),
    ]

    if any(r.get("probe") for r in results):
        pr = next(r for r in results if r.get("probe"))["probe"]
        out += [
            "",
            "## Language-identity probe accuracy per layer",
            "",
            f"Linear probe over {', '.join(pr['langs'])} trained on {pr['train_split']} ({pr['n_train']} "
            f"sentences), tested on {first['split']} ({pr['n_test']}); chance {pr['chance']:.3f}. High = the "
            "layer separates languages; low in the middle layers = languages share the space.",
            "",
        ]
        rows = []
        for layer in layers:
            vals = [_at(r, r["probe"]["accuracy"], layer) if r.get("probe") else None for r in results]
            rows.append([str(layer), *(_fmt(v) for v in vals), *([_delta(vals[0], vals[-1])] if multi else [])])
        out += _table(["layer", *labels, *change], rows)

    if any(r.get("translation") for r in results):
        dirs = list(dict.fromkeys(d for r in results for d in r.get("translation", {})))
        out += ["", "## Translation (greedy, held-out; chrF++ / BLEU)", ""]
        rows = []
        for d in dirs:
            cells, chrf = [], []
            for r in results:
                t = r.get("translation", {}).get(d)
                chrf.append(t["chrf++"] if t else None)
                cells.append(
                    "–"
                    if not t
                    else f"{t['chrf++']:.1f} / {t['bleu']:.1f}" + (f" ({t['empty']} empty)" if t["empty"] else "")
                )
            rows.append([d, *cells, *([_delta(chrf[0], chrf[-1], 1)] if multi else [])])
        out += _table(["direction", *labels, *([f"chrF++ {change[0]}"] if multi else [])], rows)
        tok = {t["bleu_tokenize"] for r in results for t in r.get("translation", {}).values()}
        out += ["", f"sacrebleu: chrF++ (word_order=2); BLEU tokenize={'/'.join(sorted(tok))}."]

    if any(r.get("perplexity") for r in results):
        out += ["", "## Held-out perplexity (per token; bits per character in parentheses)", ""]
        rows = []
        for x in ["en", *langs]:
            vals = [r.get("perplexity", {}).get(x) for r in results]
            cells = ["–" if v is None else f"{v['ppl']:.2f} ({v['bits_per_char']:.3f})" for v in vals]
            a, b = vals[0], vals[-1]
            rows.append([x, *cells, *([_delta(a and a["ppl"], b and b["ppl"], pct=True)] if multi else [])])
        out += _table(["lang", *labels, *([f"ppl {change[0]}"] if multi else [])], rows)

    if last.get("translation"):
        out += ["", f"## Examples ({last['label']})", ""]
        for d, t in last["translation"].items():
            for ex in t.get("examples", [])[:2]:
                out += [
                    f"- **{d}** source: {ex['source']}",
                    f"  - reference: {ex['reference']}",
                    f"  - output: {ex['hypothesis'] or '(empty)'}",
                ]

    if plots:
        out += ["", "## Plots", ""] + [f"![{name}]({file})" for name, file in plots.items()]
    timing = "; ".join(
        f"{r['label']}: " + ", ".join(f"{a} {b:.0f} s" for a, b in r.get("timing", {}).items()) for r in results
    )
    out += ["", f"Timing — {timing}.", ""]
    return "\n".join(out)


def write_report(results: Sequence[dict[str, Any]], out: str | Path) -> dict[str, str]:
    """Write ``report.md`` and the PNG plots for ``results`` into ``out``; returns their paths by name."""
    if not results:
        raise ValueError("no results to report")
    results = order_results(results)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots: dict[str, str] = {}
    plot_retrieval_by_layer(results, out / "retrieval_by_layer.png")
    plots["retrieval by layer"] = "retrieval_by_layer.png"
    if plot_probe_by_layer(results, out / "probe_by_layer.png"):
        plots["language-identity probe"] = "probe_by_layer.png"
    plot_per_language(results, out / "per_language.png")
    plots["per language"] = "per_language.png"
    (out / "report.md").write_text(render_report(results, plots), encoding="utf-8")
    return {"report": str(out / "report.md"), **{k: str(out / v) for k, v in plots.items()}}


def summary_lines(r: dict[str, Any]) -> list[str]:
    """A few console lines: retrieval at the highlighted and best layers, probe, chrF++, perplexity."""
    k = r["align_layer"]
    lines = [f"[{r['label']}] {r['model']} on {r['split']} ({r.get('eval_range', '')})"]
    for x, m in r["retrieval"].items():
        i = r["layers"].index(k) if k in r["layers"] else None
        if i is not None:
            lines.append(
                f"  en→{x} top-1 @ layer {k}: {m['en2x'][i]:.3f}  ({x}→en {m['x2en'][i]:.3f}, gap "
                f"{m['gap'][i]:.3f}, chance {m['chance']:.3f})"
            )
    layer, value = best_layer(r)
    lines.append(f"  best layer (mean en→x): {layer} ({value:.3f})")
    for d, t in r.get("translation", {}).items():
        lines.append(f"  {d}: chrF++ {t['chrf++']:.1f}, BLEU {t['bleu']:.1f} ({t['empty']} empty of {t['n']})")
    for x, p in r.get("perplexity", {}).items():
        lines.append(f"  ppl {x}: {p['ppl']:.2f} ({p['bits_per_char']:.3f} bits/char)")
    return lines
