"""The ablation table: every variant under examples/ablation/<variant>/ against the base model.

    python examples/ablation/summarize.py            # markdown on stdout
    python examples/ablation/summarize.py --write    # also examples/ablation/table.md

Per variant: the layer it aligned, held-out (Mark, 200 verses) en->x top-1 at that layer and at layer 11 for each
language (base -> after stage 1), held-out perplexity (English and each language), and the contrastive term's own
numbers over the last 5 logged steps of stage 1 (in-batch top-1 / chance, InfoNCE / ln N; 1 = chance). The
reference row is the committed reference ``make demo`` stage 1 (examples/demo/reference).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEMO = HERE.parent / "demo" / "reference"
LANGS = ("sw", "tl", "hi")


def at(result: dict, lang: str, layer: int) -> float:
    return result["retrieval"][lang]["en2x"][result["layers"].index(layer)]


def last_steps(path: Path, n: int = 5) -> dict[str, float]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "train/loss" in r][-n:]
    keys = ("train/top1", "train/chance", "train/nce_ratio", "train/pos_sim", "train/neg_sim")
    return {k.removeprefix("train/"): sum(r.get(k, float("nan")) for r in rows) / len(rows) for k in keys}


def row(name: str, result: dict, base: dict, metrics: Path | None) -> str:
    layer = result["align_layer"]
    cells = [name, str(layer)]
    for k in (layer, 11):
        cells.append(" / ".join(f"{at(base, x, k):.3f}→**{at(result, x, k):.3f}**" for x in LANGS))
        mean = sum(at(result, x, k) for x in LANGS) / len(LANGS)
        cells.append(f"{mean:.3f}")
    ppl = result["perplexity"]
    base_en = base["perplexity"]["en"]["ppl"]
    cells.append(f"{ppl['en']['ppl']:.1f} ({100 * (ppl['en']['ppl'] / base_en - 1):+.1f} %)")
    cells.append(" / ".join(f"{ppl[x]['ppl']:.0f}" for x in LANGS))
    m = last_steps(metrics) if metrics is not None and metrics.is_file() else {}
    if m and m["chance"] == m["chance"]:  # not NaN: the run logged the diagnostics
        cells.append(f"{m['top1'] / m['chance']:.1f}× / {m['nce_ratio']:.2f}")
    else:
        cells.append("not logged (ctr 1.04–1.06 = ½ ln 8: chance)" if m else "")
    return "| " + " | ".join(cells) + " |"


def table() -> str:
    base = json.loads((DEMO / "base.json").read_text())
    head = (
        "| variant | aligned layer | en→sw / tl / hi @ aligned | mean | en→sw / tl / hi @ 11 | mean | en ppl (vs base "
        f"{base['perplexity']['en']['ppl']:.1f}) | sw / tl / hi ppl | ctr top-1 vs chance / InfoNCE÷ln N (last 5) |"
    )
    lines = [head, "|" + "---|" * 9]
    lines.append(row("reference (make demo before)", json.loads((DEMO / "stage1.json").read_text()), base,
                     DEMO / "stage1_metrics.jsonl"))  # fmt: skip
    for d in sorted(p for p in HERE.iterdir() if (p / "stage1.json").is_file()):
        lines.append(row(d.name, json.loads((d / "stage1.json").read_text()), base, d / "stage1_metrics.jsonl"))
    return "\n".join(lines) + "\n"


def plot_spread(out: Path) -> None:
    """Positive and negative similarities (mean ± spread) and in-batch top-1 over stage 1, one panel per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [("reference", DEMO / "stage1_metrics.jsonl")]
    runs += [
        (d.name, d / "stage1_metrics.jsonl") for d in sorted(HERE.iterdir()) if (d / "stage1_metrics.jsonl").is_file()
    ]
    runs = [(n, p) for n, p in runs if any("train/pos_sim" in line for line in p.read_text().splitlines())]
    if not runs:
        return
    fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs), 3.4), squeeze=False)
    for ax, (name, path) in zip(axes[0], runs):
        rows = [json.loads(line) for line in path.read_text().splitlines() if "train/loss" in line]
        steps = [r["step"] for r in rows]
        for key, color in (("pos_sim", "tab:green"), ("neg_sim", "tab:red")):
            mean = [r[f"train/{key}"] for r in rows]
            std = [r[f"train/{key}_std"] for r in rows]
            ax.plot(steps, mean, color=color, label=key.replace("_sim", "itives" if key == "pos_sim" else "atives"))
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=color, alpha=0.2)  # fmt: skip
        ax.plot(steps, [r["train/top1"] for r in rows], color="black", linestyle=":", label="in-batch top-1")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylim(-0.3, 1.05)
    axes[0][0].set_ylabel("cosine in the similarity space")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help="also write examples/ablation/table.md and the plot")
    args = p.parse_args()
    text = table()
    print(text)
    if args.write:
        (HERE / "table.md").write_text(text)
        plot_spread(HERE / "similarity_spread.png")


if __name__ == "__main__":
    main()
