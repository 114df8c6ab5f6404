"""PNG plots of evaluation results (matplotlib, Agg backend: no display needed).

- ``retrieval_by_layer.png``: en→x top-1 retrieval per layer, one panel per language plus their mean, one line
  per result (base, stage1, stage2, ...), chance level dashed, the highlighted layer dotted;
- ``probe_by_layer.png``: language-identity probe accuracy per layer, one line per result;
- ``per_language.png``: per-language bars at the highlighted layer (en→x retrieval), chrF++ (en→x) and held-out
  bits per character, one bar per result.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _mean(xs: Sequence[Sequence[float]]) -> list[float]:
    return [sum(col) / len(col) for col in zip(*xs)]


def plot_retrieval_by_layer(results: Sequence[dict[str, Any]], path: Path) -> Path:
    """en→x retrieval per layer: a panel per language and one for the mean; a line per result."""
    langs = list(results[0]["retrieval"])
    panels = [*langs, "mean"] if len(langs) > 1 else langs
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), sharey=True, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for r in results:
            curve = (
                _mean([r["retrieval"][x]["en2x"] for x in langs]) if panel == "mean" else r["retrieval"][panel]["en2x"]
            )
            ax.plot(r["layers"], curve, marker="o", markersize=3, label=r["label"])
        chance = results[0]["retrieval"][langs[0] if panel == "mean" else panel]["chance"]
        ax.axhline(chance, color="grey", linestyle="--", linewidth=0.8)
        ax.axvline(results[0]["align_layer"], color="grey", linestyle=":", linewidth=0.8)
        ax.set_title(f"en→{panel}" if panel != "mean" else "mean over languages")
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 retrieval")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_probe_by_layer(results: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Language-identity probe accuracy per layer; None when no result has a probe."""
    have = [r for r in results if r.get("probe")]
    if not have:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for r in have:
        ax.plot(r["layers"], r["probe"]["accuracy"], marker="o", markersize=3, label=r["label"])
    ax.axhline(have[0]["probe"]["chance"], color="grey", linestyle="--", linewidth=0.8, label="chance")
    ax.set_xlabel("layer")
    ax.set_ylabel("probe accuracy")
    ax.set_title("language identity (linear probe)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_per_language(results: Sequence[dict[str, Any]], path: Path) -> Path:
    """Grouped bars per language: retrieval at the highlighted layer, chrF++ en→x, bits per character."""
    langs = list(results[0]["retrieval"])
    metrics: list[tuple[str, Any]] = [
        (
            f"en→x retrieval (layer {results[0]['align_layer']})",
            lambda r, x: (
                r["retrieval"][x]["en2x"][r["layers"].index(r["align_layer"])]
                if r["align_layer"] in r["layers"]
                else float("nan")
            ),
        ),
    ]
    if any(r.get("translation") for r in results):
        metrics.append(("chrF++ en→x", lambda r, x: r.get("translation", {}).get(f"en-{x}", {}).get("chrf++", 0.0)))
    if any(r.get("perplexity") for r in results):
        metrics.append(
            (
                "bits per character (lower is better)",
                lambda r, x: r.get("perplexity", {}).get(x, {}).get("bits_per_char", float("nan")),
            )
        )
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.2), squeeze=False)
    width = 0.8 / len(results)
    for ax, (title, get) in zip(axes[0], metrics):
        show = langs + (["en"] if "bits" in title else [])
        for i, r in enumerate(results):
            xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(show))]
            ax.bar(xs, [get(r, x) for x in show], width=width, label=r["label"])
        ax.set_xticks(range(len(show)), show)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
