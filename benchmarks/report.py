"""Turn ``benchmarks/results/<device>.csv`` (and ``<device>_ratios.csv``) into a markdown report and PNG plots.

``python -m benchmarks.report --device cpu`` reports the latest run (``--run-id`` picks another; a script re-run
under the same run id replaces that script's rows) into
``results/<device>.md`` with one plot per bench, ``results/<device>_<bench>.png`` (fwd+bwd time and extra memory per
provider and shape, log scale; for the step: time, memory and the largest micro-batch per objective).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from .results import RESULTS_DIR

BENCHES = ("span_pool", "info_nce", "lang_match", "linear_ce", "step", "data_validation")
TITLES = {
    "span_pool": "Span mean-pooling (GB/s: minimal bytes; roofline = measured copy)",
    "info_nce": "InfoNCE (TFLOP/s: 2/6/8·B·N·D for fwd/bwd/full; roofline = measured GEMM)",
    "lang_match": "Language matching (pairs per second, M² per call)",
    "linear_ce": "Linear cross-entropy: LM head + NTP loss (TFLOP/s: 6·N·D·V per fwd+bwd; roofline = measured GEMM)",
    "step": "Stage-1 training step (forward + backward)",
    "data_validation": "Data preparation of the demo's data with the bad-input checks and with them bypassed "
    "(mode = clock: process CPU time, wall time)",
}


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def latest_run(rows: Sequence[dict[str, str]]) -> str | None:
    ids = sorted({r["run_id"] for r in rows if r.get("run_id")})
    return ids[-1] if ids else None


def _last_wins(rows: Sequence[dict[str, str]], key: tuple[str, ...]) -> list[dict[str, str]]:
    """One row per key, the last one appended (a script re-run under the same ``--run-id`` replaces its rows), in
    the order of first appearance."""
    out: OrderedDict[tuple[str, ...], dict[str, str]] = OrderedDict()
    for r in rows:
        out[tuple(r[f] for f in key)] = r  # an existing key keeps its position, takes the new row
    return list(out.values())


def _num(x: str, fmt: str = "{:.4g}") -> str:
    if x in ("", None):
        return ""
    try:
        return fmt.format(float(x))
    except ValueError:
        return x


def _time(r: dict[str, str]) -> str:
    if not r["time_ms"]:
        return ""
    return f"{_num(r['time_ms'])} ({_num(r['p20_ms'])}–{_num(r['p80_ms'])})"


def bench_table(rows: Sequence[dict[str, str]]) -> list[str]:
    """Markdown lines for one bench: measurements, then skipped / failed providers with their reasons."""
    out = ["| shape | provider | mode | time ms (p20–p80) | n | rate | % roofline | extra MiB | max rel err | load |",
           "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    others: OrderedDict[tuple[str, str], str] = OrderedDict()
    for r in rows:
        if r["shape"] == "roofline":
            continue
        if r["status"] != "ok":
            others.setdefault((r["shape"], r["provider"]), f"{r['status']}: {r['note']}")
            continue
        frac = f"{100 * float(r['roofline_frac']):.1f}" if r["roofline_frac"] else ""
        mem = _num(r["extra_mem_mb"], "{:.1f}") or (f"({r['mem_method']})" if r["mem_method"] else "")
        rate = f"{_num(r['metric'])} {r['unit']}" if r["metric"] else ""
        out.append(f"| {r['shape']} | {r['provider']} | {r['mode']} | {_time(r)} | {r['reps']} | {rate} | {frac} | "
                   f"{mem} | {_num(r['max_rel_err'], '{:.1e}')} | {r['load1']} |")  # fmt: skip
    if others:
        out += ["", "Not measured:", ""]
        out += [f"- {shape} / **{prov}**: {why}" for (shape, prov), why in others.items()]
    return out


def step_table(rows: Sequence[dict[str, str]]) -> list[str]:
    out = ["| model, batch | objective | time ms (p20–p80) | n | tokens/s | extra MiB | load | note |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if r["mode"] != "full":
            continue
        mem = _num(r["extra_mem_mb"], "{:.0f}") or r["mem_method"]
        out.append(f"| {r['shape']} | {r['provider']} | {_time(r)} | {r['reps']} | {_num(r['metric'], '{:.0f}')} | "
                   f"{mem} | {r['load1']} | {r['note']} |")  # fmt: skip
    batch = [r for r in rows if r["mode"] == "max-batch"]
    if batch:
        out += ["", "| search | objective | largest micro-batch | probes (batch: extra memory) |", "|---|---|---|---|"]
        for r in batch:
            note = r["note"].split("; probes ", 1)
            out.append(f"| {r['shape']} | {r['provider']} | {note[0].removeprefix('largest micro-batch ')} | "
                       f"{note[1] if len(note) > 1 else ''} |")  # fmt: skip
    return out


def plot_bench(bench: str, rows: Sequence[dict[str, str]], path: Path) -> bool:
    """Grouped bars per shape: fwd+bwd time and extra memory per provider (log scale). False if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if bench == "step":
        return _plot_step(rows, path, plt)
    ok = [r for r in rows if r["status"] == "ok" and r["mode"] == "full" and r["shape"] != "roofline"]
    if not ok:
        return False
    shapes = list(OrderedDict.fromkeys(r["shape"] for r in ok))
    providers = list(OrderedDict.fromkeys(r["provider"] for r in ok))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    width = 0.8 / max(1, len(providers))
    for ax, key, label in ((axes[0], "time_ms", "fwd+bwd time (ms, log)"), (axes[1], "extra_mem_mb",
                                                                             "extra memory (MiB, log)")):  # fmt: skip
        for i, prov in enumerate(providers):
            xs, ys = [], []
            for j, shape in enumerate(shapes):
                r = next((r for r in ok if r["shape"] == shape and r["provider"] == prov), None)
                if r is not None and r[key] and float(r[key]) > 0:
                    xs.append(j + (i - (len(providers) - 1) / 2) * width)
                    ys.append(float(r[key]))
            ax.bar(xs, ys, width=width, label=prov)
        ax.set_yscale("log")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([s.replace(" D=", "\nD=") for s in shapes], fontsize=8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{bench}: {ok[0]['device_name']}, commit {ok[0]['commit']}, {ok[0]['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _plot_step(rows: Sequence[dict[str, str]], path: Path, plt) -> bool:  # noqa: ANN001 - matplotlib.pyplot
    full = [r for r in rows if r["status"] == "ok" and r["mode"] == "full"]
    if not full:
        return False
    batch = {r["provider"]: float(r["metric"]) for r in rows if r["mode"] == "max-batch" and r["metric"]}
    names = [r["provider"] for r in full]
    panels = [("time_ms", "step time (ms)"), ("extra_mem_mb", "extra memory (MiB)")]
    fig, axes = plt.subplots(1, 3 if batch else 2, figsize=(12, 3.8))
    for ax, (key, label) in zip(axes, panels):
        ax.bar(names, [float(r[key]) if r[key] else 0.0 for r in full], color=["#888", "#2a7", "#c64"][: len(names)])
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    if batch:
        axes[2].bar(list(batch), list(batch.values()), color=["#888", "#2a7", "#c64"][: len(batch)])
        axes[2].set_ylabel("largest micro-batch under the cap")
        axes[2].grid(axis="y", alpha=0.3)
    fig.suptitle(f"step: {full[0]['shape']} — {full[0]['device_name']}, commit {full[0]['commit']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def render(device: str, out_dir: Path, run_id: str | None = None, plots: bool = True, name: str | None = None) -> Path:
    """Write ``<name>.md`` and ``<name>_<bench>.png`` (``name`` defaults to the device) for ``run_id`` (default:
    the latest run in the CSV)."""
    name = name or device
    rows = read_rows(out_dir / f"{device}.csv")
    if not rows:
        raise SystemExit(f"no results in {out_dir / f'{device}.csv'}: run python -m benchmarks.run --device {device}")
    run_id = run_id or latest_run(rows)
    rows = _last_wins([r for r in rows if r["run_id"] == run_id], ("bench", "shape", "provider", "mode"))
    if not rows:
        raise SystemExit(f"run {run_id!r} is not in {out_dir / f'{device}.csv'}")
    ratios = _last_wins([r for r in read_rows(out_dir / f"{device}_ratios.csv") if r["run_id"] == run_id], ("claim",))
    loads = [float(r["load1"]) for r in rows if r["load1"]]
    method = next((r["mem_method"] for r in rows if r["mem_method"].startswith(("rss", "cuda"))), "not measured")
    first = rows[0]
    md = [
        f"# alignx benchmarks — {device}",
        "",
        f"Run `{run_id}` on **{first['device_name']}**, torch {first['torch']}, {first['threads']} threads, commit "
        f"`{first['commit']}`, {first['date']}. Load average (1 min) during the run: "
        f"{min(loads):.2f}–{max(loads):.2f} (a number of a shared machine is only comparable with the numbers next "
        "to it, which is why every claim below is a ratio measured side by side in the same run).",
        "",
        "Scripts measured at (UTC): "
        + "; ".join(
            f"{b} {', '.join(sorted({r['date'][11:16] for r in rows if r['bench'] == b}))}"
            for b in BENCHES
            if any(r["bench"] == b for r in rows)
        )
        + " (a script re-run under the same run id replaces its rows).",
        "",
        "Memory = the extra memory of one call beyond its inputs (and the model) and the gradients it leaves, "
        f"measured as `{method}` (see benchmarks/README.md).",
        "",
        "## Ratios (PASS / MISS against the targets)",
        "",
        "| claim | measured | target | verdict | detail | load |",
        "|---|---|---|---|---|---|",
    ]
    md += [f"| {r['claim']} | {_num(r['measured'])} | {r['target']} | **{r['verdict']}** | {r['detail']} | "
           f"{r['load1']} |" for r in ratios]  # fmt: skip
    for bench in BENCHES:
        brows = [r for r in rows if r["bench"] == bench]
        if not brows:
            continue
        md += ["", f"## {TITLES[bench]}", ""]
        roof = [f"{r['provider']} {_num(r['metric'])} {r['unit']}" for r in brows if r["shape"] == "roofline"]
        if roof:
            md += [f"Roofline measured in this run: {', '.join(roof)}.", ""]
        md += step_table(brows) if bench == "step" else bench_table(brows)
        png = out_dir / f"{name}_{bench}.png"
        if plots and plot_bench(bench, brows, png):
            md += ["", f"![{bench}]({png.name})"]
    path = out_dir / f"{name}.md"
    path.write_text("\n".join(md) + "\n")
    print(f"wrote {path}")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--run-id", default=None, help="default: the latest run in the CSV")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--name", default=None, help="file name stem of the report (default: the device)")
    args = parser.parse_args(argv)
    render(args.device, Path(args.out_dir), args.run_id, plots=not args.no_plots, name=args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
