"""Claims as data: every target of the benchmarks in one table (:data:`CLAIMS`), checked by one function.

A claim names a bench, the rows it reads and a bound. The rows are those of one run: the *numerator* row is the
provider ``num`` at a shape, the *denominator* ``den`` is another provider at the same shape (a ratio measured side
by side), a unit (``unit:<name>``: the bench gives its size in MiB) or nothing (the value itself, e.g. a roofline
fraction). The verdict is PASS or MISS against ``at_most`` / ``at_least``, INFO when the claim has no bound
(context), N/A when a row is missing (with the reason). A time ratio whose p20-p80 range straddles its target is
flagged "not conclusive on this machine now". :func:`evaluate` applies the table to the rows of one bench.

Provider names in the table: ``"a|b"`` reads ``a`` on CPU and ``b`` on CUDA (the torch path of alignx on CPU, its
Triton kernels on CUDA); ``fastest:<prefix>`` is the fastest provider of that name prefix at the shape.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import TYPE_CHECKING, Any

from .results import Row, RunInfo, say

if TYPE_CHECKING:  # pragma: no cover
    from .harness import BenchOptions, Shape

MEM_RESOLUTION_MB = 1.0  # the RSS method reads whole pages and the allocator's small-block heap: ~1 MiB of noise
RATIO_FIELDS = ["run_id", "date", "commit", "device_name", "load1", "claim", "measured", "target", "verdict", "detail"]
OURS = "alignx|alignx-triton"


@dataclass
class Verdict:
    """One claim checked in a run: the measured ratio, the target, PASS / MISS / INFO / N/A and the explanation."""

    claim: str
    measured: float | None
    target: str
    verdict: str
    detail: str = ""


@dataclass(frozen=True)
class Claim:
    """One row of the table. ``text`` may use ``{shape}`` and ``{den}`` (the denominator provider that was read).

    ``shapes``: ``"<tag>"`` the first shape carrying the tag, ``"each:<tag>"`` every such shape, ``""`` the rows of
    any shape (benches with one shape). ``device``: checked only on that device. ``bound_if``: the bound holds only
    when the run sets that flag; otherwise the ratio is reported as context (INFO).
    """

    bench: str
    text: str
    num: str
    attr: str
    den: str | None = None
    at_most: float | None = None
    at_least: float | None = None
    shapes: str = ""
    device: str = ""
    mode: str = "full"
    bound_if: str = ""
    why_if_miss: str = ""
    note: str = ""


def _linear_ce(tag: str, bounded: bool) -> list[Claim]:
    """Gemma-3-270M's head shape carries the targets; V = 128,256 the same ratios as context (no bounds)."""

    def claim(text: str, attr: str, den: str, bound: float | None = None, why: str = "") -> Claim:
        return Claim("linear_ce", "LinearCE {shape}: " + text, OURS, attr, den=den, at_most=bound if bounded else None,
                     shapes=tag, why_if_miss=why)  # fmt: skip

    return [
        claim("extra memory alignx / HF head + cross-entropy", "extra_mem_mb", "hf", 0.125),
        claim("fwd+bwd time alignx / HF head + cross-entropy", "time_ms", "hf", 0.7,
              why="the same 6NDV GEMM FLOPs in both (exact mode); the dense path's extra passes over the [N, V] "
              "logits are the only work to save on a CPU"),
        claim("fwd+bwd time alignx / torch F.linear_cross_entropy at its best policy ({den})", "time_ms",
              "fastest:torch-lce", 1.0),
        claim("fwd+bwd time alignx / alignx today (objective.lm_loss_sum)", "time_ms", "objective"),
    ]  # fmt: skip


DATA_CLAIM = "Data preparation of the demo's data: time with the bad-input checks / with them bypassed"
QUEUE_CLAIM = "Negatives queue: extra memory of the contrastive term with the queue / its bound"
CLAIMS: list[Claim] = [
    Claim("span_pool", "Span pooling {shape}: fwd+bwd time alignx / masked-product idiom", OURS, "time_ms",
          den="masked-product", at_most=1.0, shapes="each:pool"),
    Claim("span_pool", "Span pooling {shape}: alignx extra memory (beyond d hidden) in [B, T, D] units", OURS,
          "extra_mem_mb", den="unit:[B, T, D]", at_most=0.25, shapes="each:pool"),
    Claim("span_pool", "Span pooling {shape}: masked-product extra memory in [B, T, D] units (context)",
          "masked-product", "extra_mem_mb", den="unit:[B, T, D]", shapes="each:pool"),
    Claim("span_pool", "Span pooling {shape}: alignx-triton fwd+bwd bandwidth / measured copy", "alignx-triton",
          "roofline_frac", at_least=0.85, shapes="gpu-bw", device="cuda"),
    Claim("info_nce", "InfoNCE {shape} (official micro-batch): fwd+bwd time alignx / official idiom", OURS, "time_ms",
          den="official", shapes="official-batch"),
    Claim("info_nce", "InfoNCE {shape}: extra memory alignx / dense reference", OURS, "extra_mem_mb",
          den="reference", at_most=0.1, shapes="mem-16k"),
    Claim("info_nce", "InfoNCE {shape}: fwd+bwd time alignx / dense reference", OURS, "time_ms", den="reference",
          at_most=1.2, shapes="time-16k", why_if_miss="the chunked path recomputes the logits in backward "
          "(8BND vs 6BND FLOPs) and pays per-chunk overheads"),
    Claim("info_nce", "InfoNCE {shape}: fwd+bwd time alignx / dense reference", OURS, "time_ms", den="reference",
          at_most=1.2, shapes="time-8k", why_if_miss="the chunked path recomputes the logits in backward"),
    Claim("info_nce", "InfoNCE {shape}: alignx-triton fwd+bwd rate / measured bf16 GEMM", "alignx-triton",
          "roofline_frac", at_least=0.8, shapes="each:rate-claim", device="cuda"),
    Claim("lang_match", "LangMatch {shape} (official micro-batch): fwd+bwd time official / alignx", "official",
          "time_ms", den=OURS, shapes="official-batch"),
    Claim("lang_match", "LangMatch {shape}: extra memory alignx / official pair tensor", OURS, "extra_mem_mb",
          den="official", at_most=0.01, shapes="each:lam"),
    Claim("lang_match", "LangMatch {shape}: speed-up, fwd+bwd time official / alignx", "official", "time_ms",
          den=OURS, at_least=50, shapes="each:lam"),
    Claim("lang_match", "LangMatch {shape}: same loss and gradients (max rel err of alignx vs the first provider "
          "that ran)", OURS, "max_rel_err", at_most=1e-4, shapes="each:lam"),
    *_linear_ce("gemma", bounded=True),
    *_linear_ce("vocab-128k", bounded=False),
    Claim("step", "Stage-1 step: time alignx objective / NTP only", "alignx", "time_ms", den="ntp", at_most=1.10),
    Claim("step", "Stage-1 step: time alignx / official style", "alignx", "time_ms", den="official", at_most=1.0),
    Claim("step", "Stage-1 step: extra memory alignx / official style", "alignx", "extra_mem_mb", den="official",
          at_most=1.0),
    Claim("step", "Stage-1 step: extra memory alignx / NTP only (context)", "alignx", "extra_mem_mb", den="ntp"),
    Claim("step", "Stage-1 step: time alignx (fused LM head) / alignx with HF's LM head", "alignx", "time_ms",
          den="alignx-hf-head", at_most=0.85, bound_if="real-model"),
    Claim("step", "Stage-1 step: extra memory alignx (fused LM head) / alignx with HF's LM head", "alignx",
          "extra_mem_mb", den="alignx-hf-head", at_most=0.6, bound_if="real-model"),
    Claim("step", "Stage-1 step: largest micro-batch alignx / official style (context)", "alignx", "metric",
          den="official", mode="max-batch"),
    Claim("step", "Stage-1 step: alignx and official-style gradients agree (max rel err)", "official", "max_rel_err",
          at_most=1e-3, note="same weights, same batch"),
    Claim("data_validation", f"{DATA_CLAIM} (issue 16; process CPU time)", "checked", "time_ms", den="bypassed",
          mode="cpu", at_most=1.05, why_if_miss="profile the checks (cProfile / py-spy of prepare_once)"),
    Claim("data_validation", f"{DATA_CLAIM} (wall clock, context: other processes' load included)", "checked",
          "time_ms", den="bypassed", mode="wall"),
    Claim("queue", QUEUE_CLAIM + " (N x D x 4 + chunk + slack)", "contrastive+queue", "extra_mem_mb", den="bound",
          at_most=1.0),
    Claim("memory-method", "Memory method sees a known peak (measured / expected extra bytes)", "measured",
          "extra_mem_mb", den="expected", at_least=0.98, at_most=1.02),
]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Evaluation


def evaluate(
    bench: str,
    rows: Sequence[Row],
    shapes: Sequence[Shape] = (),
    device: str = "cpu",
    *,
    flags: Iterable[str] = (),
    units: dict[str, Callable[[dict[str, Any]], float]] | None = None,
    claims: Sequence[Claim] = CLAIMS,
) -> list[Verdict]:
    """Every claim of ``bench`` on ``rows``, shape by shape (consecutive claims on the same shapes stay together)."""
    mine = [c for c in claims if c.bench == bench and c.device in ("", device)]
    out = []
    for selector, group in groupby(mine, key=lambda c: c.shapes):
        group_claims = list(group)
        for shape in _select(selector, shapes):
            out += [check(c, rows, shape, device, flags=set(flags), units=units or {}) for c in group_claims]
    return out


def _select(selector: str, shapes: Sequence[Shape]) -> list[Shape | None]:
    if not selector:
        return [None]
    tag = selector.removeprefix("each:")
    hits: list[Shape | None] = [s for s in shapes if tag in s.tags]
    return hits if selector.startswith("each:") else hits[:1]


def check(
    claim: Claim,
    rows: Sequence[Row],
    shape: Shape | None,
    device: str,
    *,
    flags: set[str] | frozenset[str] = frozenset(),
    units: dict[str, Callable[[dict[str, Any]], float]] | None = None,
) -> Verdict:
    """One claim at one shape (``None``: rows of any shape)."""
    name = shape.name if shape is not None else None
    bounded = not claim.bound_if or claim.bound_if in flags
    bounds = dict(at_most=claim.at_most if bounded else None, at_least=claim.at_least if bounded else None)
    num = lookup(rows, name, _provider(claim.num, device), claim.mode)
    if claim.den is None:
        v = value_verdict(claim.text.format(shape=name), num, claim.attr, why_if_miss=claim.why_if_miss, **bounds)
    elif claim.den.startswith("unit:"):
        unit = claim.den.removeprefix("unit:")
        size = (units or {})[unit](shape.params if shape is not None else {})
        v = unit_verdict(claim.text.format(shape=name), num, claim.attr, unit, size, **bounds)
    else:
        den = _denominator(rows, name, _provider(claim.den, device), claim.mode)
        text = claim.text.format(shape=name, den=den.provider if den is not None else "none ran")
        v = ratio_verdict(text, num, den, claim.attr, why_if_miss=claim.why_if_miss, **bounds)
    if claim.note:
        v.detail = f"{v.detail}; {claim.note}" if v.detail else claim.note
    return v


def _provider(name: str, device: str) -> str:
    cpu, _, cuda = name.partition("|")
    return cuda if cuda and device == "cuda" else cpu


def _denominator(rows: Sequence[Row], shape: str | None, name: str, mode: str) -> Row | None:
    if not name.startswith("fastest:"):
        return lookup(rows, shape, name, mode)
    prefix = name.removeprefix("fastest:")
    ok = [r for r in rows if (shape is None or r.shape == shape) and r.provider.startswith(prefix) and r.mode == mode]
    ok = [r for r in ok if r.status == "ok" and r.time_ms is not None]
    return min(ok, key=lambda r: r.time_ms) if ok else None


def lookup(rows: Sequence[Row], shape: str | None, provider: str, mode: str = "full") -> Row | None:
    """The row of ``provider`` in ``mode`` at ``shape`` (``None``: at any shape)."""
    for r in rows:
        if (shape is None or r.shape == shape) and r.provider == provider and r.mode == mode:
            return r
    return None


def _target(at_most: float | None, at_least: float | None) -> str:
    if at_most is not None and at_least is not None:
        return f"{at_least:g}..{at_most:g}"
    if at_most is not None:
        return f"<= {at_most:g}"
    return f">= {at_least:g}" if at_least is not None else "-"


def _meets(x: float, at_most: float | None, at_least: float | None) -> bool:
    return (at_most is None or x <= at_most) and (at_least is None or x >= at_least)


def _missing(row: Row | None) -> str | None:
    """Why ``row`` cannot be read (None when it can)."""
    if row is None:
        return "not measured"
    return None if row.status == "ok" else (row.note or row.mem_method or row.status)


def ratio_verdict(
    claim: str,
    num: Row | None,
    den: Row | None,
    attr: str,
    *,
    at_most: float | None = None,
    at_least: float | None = None,
    why_if_miss: str = "",
) -> Verdict:
    """``num.attr / den.attr`` against the bounds; N/A (with the reason) when a side is missing. Memory ratios use
    the extra memory (a denominator below the method's resolution gives N/A). Without a bound: INFO (context)."""
    target = _target(at_most, at_least)
    for side, r in (("numerator", num), ("denominator", den)):
        why = _missing(r) or (None if getattr(r, attr) is not None else (r.note or r.mem_method or r.status))
        if why is not None:
            return Verdict(claim, None, target, "N/A", f"{side} missing: {why}")
    a, b = float(getattr(num, attr)), float(getattr(den, attr))
    if attr == "extra_mem_mb":
        if b < MEM_RESOLUTION_MB:
            return Verdict(claim, None, target, "N/A", f"denominator {b:.3g} MiB is below the memory method's "
                           f"~{MEM_RESOLUTION_MB:g} MiB resolution")  # fmt: skip
        a = max(a, 0.0)  # a reading below zero is noise of the method (a few pages)
    if b <= 0:
        return Verdict(claim, None, target, "N/A", f"denominator {attr} = {b:g} (not positive)")
    ratio = a / b
    detail = f"{num.provider} {a:.4g} / {den.provider} {b:.4g} ({attr})"
    if at_most is None and at_least is None:
        return Verdict(claim, ratio, target, "INFO", detail)
    ok = _meets(ratio, at_most, at_least)
    if attr == "time_ms":
        detail += _not_conclusive(num, den, at_most, at_least)
    if not ok and why_if_miss:
        detail += f"; {why_if_miss}"
    return Verdict(claim, ratio, target, "PASS" if ok else "MISS", detail)


def _not_conclusive(num: Row, den: Row, at_most: float | None, at_least: float | None) -> str:
    """The flag of a time ratio whose p20-p80 range (numerator p20 / denominator p80 ... p80 / p20) straddles a
    bound: on a shared machine the verdict could go either way."""
    if None in (num.p20_ms, num.p80_ms, den.p20_ms, den.p80_ms):
        return ""
    lo, hi = num.p20_ms / den.p80_ms, num.p80_ms / den.p20_ms
    if not any(b is not None and lo <= b <= hi for b in (at_most, at_least)):
        return ""
    return (f"; the p20-p80 ratio range {lo:.3g}-{hi:.3g} straddles the target (load "
            f"{max(num.load1, den.load1):.1f}): not conclusive on this machine now")  # fmt: skip


def value_verdict(
    claim: str,
    row: Row | None,
    attr: str,
    *,
    at_most: float | None = None,
    at_least: float | None = None,
    why_if_miss: str = "",
) -> Verdict:
    """``row.attr`` itself against a bound (e.g. a roofline fraction, an error against the base provider)."""
    target = _target(at_most, at_least)
    if attr == "max_rel_err" and row is not None and row.status == "ok" and not row.note:
        return Verdict(claim, None, target, "N/A", "no other provider ran at this shape")  # the base provider
    if row is None or row.status != "ok" or getattr(row, attr) is None:
        return Verdict(claim, None, target, "N/A", "not measured" if row is None else (row.note or row.status))
    x = float(getattr(row, attr))
    ok = _meets(x, at_most, at_least)
    detail = f"{row.provider} {attr} = {x:.4g}"
    if not ok and why_if_miss:
        detail += f"; {why_if_miss}"
    return Verdict(claim, x, target, "PASS" if ok else "MISS", detail)


def unit_verdict(
    claim: str,
    row: Row | None,
    attr: str,
    unit: str,
    unit_mb: float,
    *,
    at_most: float | None = None,
    at_least: float | None = None,
) -> Verdict:
    """Extra memory in units of a known size (e.g. one ``[B, T, D]`` tensor: a single such temporary reads >= 1)."""
    target = _target(at_most, at_least)
    if row is None or row.status != "ok" or getattr(row, attr) is None:
        return Verdict(claim, None, target, "N/A", "not measured" if row is None else (row.mem_method or row.note))
    x = float(getattr(row, attr))
    units = max(x, 0.0) / unit_mb  # below zero: noise of the method
    detail = f"{row.provider} extra {x:.1f} MiB vs one {unit} = {unit_mb:.1f} MiB"
    if at_most is None and at_least is None:
        return Verdict(claim, units, target, "INFO", detail)
    return Verdict(claim, units, target, "PASS" if _meets(units, at_most, at_least) else "MISS", detail)


# ----------------------------------------------------------------------------------------------------------------
# Output


def print_verdicts(title: str, verdicts: Sequence[Verdict]) -> None:
    say(f"\n== {title}: ratios measured side by side in this run ==")
    for v in verdicts:
        measured = "n/a" if v.measured is None else f"{v.measured:.4g}"
        say(f"  [{v.verdict:4}] {v.claim}: measured {measured} (target {v.target})  {v.detail}")


def append_verdicts(opts: BenchOptions, info: RunInfo, verdicts: Sequence[Verdict]) -> None:
    """Append the verdicts to ``<out_dir>/<device>_ratios.csv`` (nothing with ``write_csv`` off)."""
    if not opts.write_csv or not verdicts:
        return
    path = opts.out_dir / f"{opts.device}_ratios.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    load = round(os.getloadavg()[0], 2)
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RATIO_FIELDS)
        if new:
            w.writeheader()
        for v in verdicts:
            w.writerow({"run_id": info.run_id, "date": info.date, "commit": info.commit,
                        "device_name": info.device_name, "load1": load, "claim": v.claim,
                        "measured": "" if v.measured is None else f"{v.measured:.6g}", "target": v.target,
                        "verdict": v.verdict, "detail": v.detail})  # fmt: skip
