"""Markdown report with before/after tables over several evaluation results (base, stage1, stage2, ...).

Every table has a column per result, in the order base, stage1, stage2, then any other label by creation time;
the last column of the key tables is the change from the first result to the last one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass
class _View:
    """The results of one report (ordered) and what every table shares: labels, languages, highlighted layer."""

    results: list[dict[str, Any]]

    @property
    def first(self) -> dict[str, Any]:
        return self.results[0]

    @property
    def labels(self) -> list[str]:
        return [r["label"] for r in self.results]

    @property
    def langs(self) -> list[str]:
        return list(self.first["retrieval"])

    @property
    def k(self) -> int:
        return self.first["align_layer"]

    @property
    def multi(self) -> bool:
        return len(self.results) > 1

    @property
    def change(self) -> list[str]:
        """The header of the change column (first -> last result), none for a single result."""
        return [f"{self.labels[0]}→{self.labels[-1]}"] if self.multi else []

    def delta(self, vals: Sequence[Any], digits: int = 3, pct: bool = False) -> list[str]:
        """The change cell (first -> last value), none for a single result."""
        return [_delta(vals[0], vals[-1], digits, pct)] if self.multi else []


def _setup_section(v: _View) -> list[str]:
    out = _table(
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
            for r in v.results
        ],
    )
    pool = v.first["pooling"]
    return out + [
        "",
        f"Sentence vectors: mean of a layer's hidden states over the sentence's tokens (decoder body only; layer 0 = "
        f"embeddings), special tokens excluded: {'yes' if pool['special_tokens_excluded'] else 'no'}; first token "
        f"excluded: {'yes' if pool['first_token_excluded'] else 'no'} ({pool['reason']}). Centring before cosine: "
        f"{v.first['centering']}. Retrieval chance = 1/pairs.",
        "",
    ]


def _retrieval_section(v: _View) -> list[str]:
    rows = []
    for x in v.langs:
        for direction, name in (("en2x", f"en→{x}"), ("x2en", f"{x}→en")):
            vals = [_at(r, r["retrieval"][x][direction], v.k) for r in v.results]
            rows.append([name, *(_fmt(a) for a in vals), *v.delta(vals)])
    return [f"## Parallel-sentence retrieval at layer {v.k} (top-1)", ""] + _table(
        ["direction", *v.labels, *v.change], rows
    )


def _gap_section(v: _View) -> list[str]:
    rows = []
    for x in v.langs:
        vals = [_at(r, r["retrieval"][x]["gap"], v.k) for r in v.results]
        par = [_at(r, r["retrieval"][x]["parallel_cos"], v.k) for r in v.results]
        rows.append([f"en–{x}", *(f"{_fmt(g)} ({_fmt(p, 2)})" for g, p in zip(vals, par)), *v.delta(vals)])
    head = ["", f"## Parallel-vs-random cosine gap at layer {v.k} (centred)", ""]
    return head + ["Gap (mean parallel cosine in parentheses).", ""] + _table(["pair", *v.labels, *v.change], rows)


def _layer_section(v: _View) -> list[str]:
    rows = []
    for layer in v.first["layers"]:
        vals = []
        for r in v.results:
            means = [_at(r, r["retrieval"][x]["en2x"], layer) for x in v.langs]
            vals.append(None if any(a is None for a in means) else sum(means) / len(means))
        mark = " (highlighted)" if layer == v.k else ""
        rows.append([f"{layer}{mark}", *(_fmt(a) for a in vals), *v.delta(vals)])
    best = "; ".join(f"{r['label']}: layer {best_layer(r)[0]} ({best_layer(r)[1]:.3f})" for r in v.results)
    return [
        "",
        "## en→x retrieval per layer (mean over languages)",
        "",
        *_table(["layer", *v.labels, *v.change], rows),
        "",
        "Best layer (mean en→x): " + best,
    ]


def _probe_section(v: _View) -> list[str]:
    if not any(r.get("probe") for r in v.results):
        return []
    pr = next(r for r in v.results if r.get("probe"))["probe"]
    out = [
        "",
        "## Language-identity probe accuracy per layer",
        "",
        f"Linear probe over {', '.join(pr['langs'])} trained on {pr['train_split']} ({pr['n_train']} "
        f"sentences), tested on {v.first['split']} ({pr['n_test']}); chance {pr['chance']:.3f}. High = the "
        "layer separates languages; low in the middle layers = languages share the space.",
        "",
    ]
    rows = []
    for layer in v.first["layers"]:
        vals = [_at(r, r["probe"]["accuracy"], layer) if r.get("probe") else None for r in v.results]
        rows.append([str(layer), *(_fmt(a) for a in vals), *v.delta(vals)])
    return out + _table(["layer", *v.labels, *v.change], rows)


def _translation_cell(t: dict[str, Any] | None) -> str:
    if not t:
        return "–"
    return f"{t['chrf++']:.1f} / {t['bleu']:.1f}" + (f" ({t['empty']} empty)" if t["empty"] else "")


def _translation_section(v: _View) -> list[str]:
    if not any(r.get("translation") for r in v.results):
        return []
    rows = []
    for d in dict.fromkeys(d for r in v.results for d in r.get("translation", {})):
        found = [r.get("translation", {}).get(d) for r in v.results]
        chrf = [t["chrf++"] if t else None for t in found]
        rows.append([d, *(_translation_cell(t) for t in found), *v.delta(chrf, 1)])
    tok = {t["bleu_tokenize"] for r in v.results for t in r.get("translation", {}).values()}
    return [
        "",
        "## Translation (greedy, held-out; chrF++ / BLEU)",
        "",
        *_table(["direction", *v.labels, *[f"chrF++ {c}" for c in v.change]], rows),
        "",
        f"sacrebleu: chrF++ (word_order=2); BLEU tokenize={'/'.join(sorted(tok))}.",
    ]


def _perplexity_section(v: _View) -> list[str]:
    if not any(r.get("perplexity") for r in v.results):
        return []
    rows = []
    for x in ["en", *v.langs]:
        vals = [r.get("perplexity", {}).get(x) for r in v.results]
        cells = ["–" if a is None else f"{a['ppl']:.2f} ({a['bits_per_char']:.3f})" for a in vals]
        rows.append([x, *cells, *v.delta([a and a["ppl"] for a in vals], pct=True)])
    head = ["", "## Held-out perplexity (per token; bits per character in parentheses)", ""]
    return head + _table(["lang", *v.labels, *[f"ppl {c}" for c in v.change]], rows)


def _examples_section(v: _View) -> list[str]:
    last = v.results[-1]
    if not last.get("translation"):
        return []
    out = ["", f"## Examples ({last['label']})", ""]
    for d, t in last["translation"].items():
        for ex in t.get("examples", [])[:2]:
            out += [
                f"- **{d}** source: {ex['source']}",
                f"  - reference: {ex['reference']}",
                f"  - output: {ex['hypothesis'] or '(empty)'}",
            ]
    return out


SECTIONS = (
    _setup_section,
    _retrieval_section,
    _gap_section,
    _layer_section,
    _probe_section,
    _translation_section,
    _perplexity_section,
    _examples_section,
)


def render_report(results: Sequence[dict[str, Any]], plots: dict[str, str] | None = None) -> str:
    """The markdown text of the report over ``results`` (already ordered): one section after the other."""
    if not results:
        raise ValueError("no results to report")
    view = _View(list(results))
    out = ["# alignx evaluation report", ""]
    for section in SECTIONS:
        out += section(view)
    if plots:
        out += ["", "## Plots", ""] + [f"![{name}]({file})" for name, file in plots.items()]
    timing = "; ".join(
        f"{r['label']}: " + ", ".join(f"{a} {b:.0f} s" for a, b in r.get("timing", {}).items()) for r in view.results
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
