"""Data preparation, one pipeline for every record format: read -> validate -> render -> tokenise -> cache -> report.

:func:`prepare` takes a :class:`~alignx.data.formats.RecordFormat` (or its registered name) and two JSONL files:

1. **read and validate** (:func:`_load_raw`): every non-blank line becomes a fixed-schema row through the format's
   ``normalize``; a bad line becomes a row with its reason (:data:`alignx.data.records.LINE_REASONS`), a copy of an
   earlier usable record a ``duplicate`` (formats that deduplicate). The rows are cached (``datasets``, keyed by the
   file's path, size and mtime). Bad lines then stop the run or are counted (``data.on_bad_lines``).
2. **render and tokenise** (:class:`Encoder`, a ``datasets.map`` function): the format renders each usable row to
   segments, :class:`alignx.data.segments.SegmentTokenizer` tokenises them (spans, truncation, EOS and labels: the
   rule of :mod:`alignx.data.segments`), the format builds the row's columns or names its drop reason. The rows are
   cached, keyed by the validated rows, the tokenizer, the format and its options.
3. **report** (:func:`format_report`): kept and dropped per reason with example lines, lengths, truncation.

Without an eval file, ``data.eval_size`` rows are held out of the training rows (:func:`_held_out`).

Stage 1 (:class:`PairsFormat`) and stage 2 (:class:`InstructionsFormat`) render with the prompt template
(:mod:`alignx.data.prompt`). Drops (counted, never raised; see :data:`alignx.data.records.DROP_REASONS`), in this
order of precedence: missing_field, bad_field_type, unknown_language, empty_source, empty_target (stage 2 also
empty_instruction), then after tokenisation source_truncated (fewer source tokens survive than the full text has;
the target is then gone too), no_source_tokens, short_target (fewer than ``min_target_tokens`` marked target tokens
after truncation); stage 2: response_truncated. Every kept stage-1 row therefore has >= 1 source token and >=
``min_target_tokens`` target tokens: the pooling never divides by zero. Stage-1 ``span_ids`` are 1 on source tokens,
2 on target tokens, 0 elsewhere (BOS, prompt, EOS, padding); stage 2 has no spans (all zeros).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from alignx.constants import DEFAULT_INSTRUCTION, RECIPE_DATA_KINDS
from alignx.constants import SOURCE_SPAN as SOURCE
from alignx.constants import TARGET_SPAN as TARGET
from alignx.data.formats import ROW_COLUMNS, STAT_COLUMNS, RecordFormat, get_format, register_format
from alignx.data.prompt import Segment, Template, instruction_text, load_template

# The checks are looked up in this module when they run: benchmarks/bench_data_validation.py swaps them here.
from alignx.data.records import (
    DROP_REASONS,
    LINE_REASONS,
    DataError,
    Duplicates,
    blank_row,
    describe_bad_lines,
    has_records,
    normalize_stage1,
    normalize_stage2,
    scan_jsonl,
)
from alignx.data.segments import SegmentTokenizer, Tokenized, lm_columns
from alignx.languages import lang_code

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

    from alignx.config import Config

__all__ = [
    "Encoder",
    "InstructionsFormat",
    "PairsFormat",
    "Prepared",
    "check_bad_lines",
    "format_report",
    "prepare",
    "prepare_stage1",
    "prepare_stage2",
    "preparer",
    "validate_inputs",
]

# Bump when the row layout or the span rule changes: it is part of the datasets cache key.
FORMAT_VERSION = "alignx-data-2"

BAD_LINES_FILE = "bad_lines.jsonl"  # <train.output_dir>/bad_lines.jsonl: every bad line of a refused input


# ----------------------------------------------------------------------------------------------------------------
# The prompt-template formats: stage-1 pairs and stage-2 instructions


@dataclass(frozen=True)
class _TemplateFormat:
    """What the prompt-template formats share: the template, the label mode (``"all"``, the reference, or
    ``"response"``: target tokens and EOS), the reasons of :data:`alignx.data.records.DROP_REASONS`, deduplication
    and packing."""

    template: Template = field(default_factory=lambda: load_template("alpaca"))
    labels: Literal["all", "response"] = "all"

    columns: ClassVar[tuple[str, ...]] = ()
    reasons: ClassVar[dict[str, str]] = DROP_REASONS
    deduplicate: ClassVar[bool] = True
    packs: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.labels not in ("all", "response"):
            raise ValueError(f"labels must be 'all' or 'response', got {self.labels!r}")


@dataclass(frozen=True)
class PairsFormat(_TemplateFormat):
    """Stage-1 translation pairs ``{src_text, tgt_text, src_lang, tgt_lang[, instruction]}``
    (:func:`alignx.data.records.normalize_stage1`), rendered with ``template``: the record's instruction or
    ``instruction`` with the language names, the source as input, the target as output. ``span_ids`` mark the source
    (1) and target (2) tokens; rows with fewer than ``min_target_tokens`` target tokens are dropped."""

    instruction: str = DEFAULT_INSTRUCTION
    min_target_tokens: int = 3

    name: ClassVar[str] = "stage1"
    title: ClassVar[str] = "stage 1"
    texts: ClassVar[tuple[str, ...]] = ("src_text", "tgt_text", "instruction")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_target_tokens < 1:
            raise ValueError(f"need min_target_tokens >= 1, got {self.min_target_tokens}")
        if self.instruction:
            instruction_text(self.instruction, "en", "en")  # fail early on a bad pattern

    @classmethod
    def from_config(cls, cfg: Config) -> PairsFormat:
        """``data.template``, ``data.labels``, ``data.instruction`` and ``data.min_target_tokens``."""
        d = cfg.data
        return cls(load_template(d.template), d.labels, d.instruction, d.min_target_tokens)

    def normalize(self, rec: dict[str, Any], line: int) -> dict[str, Any]:
        """:func:`alignx.data.records.normalize_stage1`."""
        return normalize_stage1(rec, line)

    def render(self, row: dict[str, Any]) -> tuple[Segment]:
        """The prompt with the pair's source as input and its target as output."""
        ins = row.get("instruction") or instruction_text(
            self.instruction, lang_code(row["src_lang"]), lang_code(row["tgt_lang"])
        )
        return (self.template.render(ins, row["src_text"], row["tgt_text"]),)

    def build(self, row: dict[str, Any], tokens: Sequence[Tokenized]) -> dict[str, Any] | str:
        """The row, or source_truncated / no_source_tokens / short_target."""
        (tok,) = tokens
        n_source = tok.count(SOURCE)
        if n_source < tok.full[SOURCE]:
            return "source_truncated"
        if n_source == 0:
            return "no_source_tokens"
        if tok.count(TARGET) < self.min_target_tokens:
            return "short_target"
        return lm_columns(tok, self.labels)


@dataclass(frozen=True)
class InstructionsFormat(_TemplateFormat):
    """Stage-2 instructions ``{instruction, input, output, lang}`` (:func:`alignx.data.records.normalize_stage2`),
    rendered with ``template`` (its no-input variant when ``input`` is empty); ``span_ids`` all 0, ``src_lang =
    tgt_lang = lang``; a row whose output loses every token to truncation is dropped (response_truncated)."""

    name: ClassVar[str] = "stage2"
    title: ClassVar[str] = "stage 2"
    texts: ClassVar[tuple[str, ...]] = ("instruction", "input", "output")

    @classmethod
    def from_config(cls, cfg: Config) -> InstructionsFormat:
        """``data.template`` and ``stage2.labels``."""
        return cls(load_template(cfg.data.template), cfg.stage2.labels)

    def normalize(self, rec: dict[str, Any], line: int) -> dict[str, Any]:
        """:func:`alignx.data.records.normalize_stage2`."""
        return normalize_stage2(rec, line)

    def render(self, row: dict[str, Any]) -> tuple[Segment]:
        """The prompt with the instruction's input and its output."""
        return (self.template.render(row["instruction"], row["input"], row["output"]),)

    def build(self, row: dict[str, Any], tokens: Sequence[Tokenized]) -> dict[str, Any] | str:
        """The row, or response_truncated."""
        (tok,) = tokens
        if tok.count(TARGET) == 0:
            return "response_truncated"
        return lm_columns(tok, self.labels, spans=False)


register_format(PairsFormat.name, PairsFormat.from_config)
register_format(InstructionsFormat.name, InstructionsFormat.from_config)


# ----------------------------------------------------------------------------------------------------------------
# Rows -> tokens


class Encoder:
    """Renders and tokenises normalised rows of one record format (a ``datasets.map`` function, picklable for
    ``num_proc > 1``).

    Args:
        tokenizer: a fast (Rust-backed) HF tokenizer (:class:`alignx.data.segments.SegmentTokenizer`).
        stage: 1 (:class:`PairsFormat`) or 2 (:class:`InstructionsFormat`), built from ``template``,
            ``instruction``, ``min_target_tokens`` and ``labels``; ignored when ``record_format`` is given.
        template: the prompt template (default Alpaca).
        instruction: ``data.instruction`` pattern with ``{src}``/``{tgt}`` (stage 1).
        cutoff_len: maximum sequence length in tokens, EOS included.
        min_target_tokens: stage-1 rows with fewer marked target tokens are dropped.
        labels: ``"all"`` (whole sequence, reference) or ``"response"`` (target tokens and EOS only).
        record_format: any :class:`~alignx.data.formats.RecordFormat`.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        stage: Literal[1, 2] = 1,
        template: Template | None = None,
        instruction: str = DEFAULT_INSTRUCTION,
        cutoff_len: int = 512,
        min_target_tokens: int = 3,
        labels: Literal["all", "response"] = "all",
        record_format: RecordFormat | None = None,
    ) -> None:
        if record_format is None:
            if stage not in (1, 2):
                raise ValueError(f"stage must be 1 or 2, got {stage!r}")
            template = template or load_template("alpaca")
            if stage == 1:
                record_format = PairsFormat(template, labels, instruction, min_target_tokens)
            else:
                record_format = InstructionsFormat(template, labels)
        self.format = record_format
        self.tokens = SegmentTokenizer(tokenizer, cutoff_len)
        self.columns = (*ROW_COLUMNS, *record_format.columns, *STAT_COLUMNS)

    @property
    def backend(self) -> Any:
        """The private copy of the Rust tokenizer (:attr:`alignx.data.segments.SegmentTokenizer.backend`)."""
        return self.tokens.backend

    def fingerprint(self) -> str:
        """Hash of everything that decides the rows (part of the datasets cache key)."""
        h = hashlib.sha256()
        h.update(repr([FORMAT_VERSION, self.format, self.tokens.cutoff_len, self.tokens.eos_id]).encode())
        h.update(self.tokens.backend_json.encode())
        return h.hexdigest()[:32]

    def render(self, row: dict[str, Any]) -> Segment:
        """The text a normalised row trains on (the first of its format's segments)."""
        return self.format.render(row)[0]

    def encode(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Encode normalised rows; each result has :attr:`columns` (``drop`` "" = kept, ``n_source``, ``n_target``,
        ``target_truncated``). Dropped rows have empty token lists."""
        out = [self._dropped(r, r["drop"]) for r in rows]
        todo = [i for i, r in enumerate(rows) if not r["drop"]]
        segments = [self.format.render(rows[i]) for i in todo]
        tokens = iter(self.tokens([s for segs in segments for s in segs]))
        for i, segs in zip(todo, segments):
            built = self.format.build(rows[i], [next(tokens) for _ in segs])
            if isinstance(built, str):
                out[i] = self._dropped(rows[i], built)
            else:
                out[i] = {**self._dropped(rows[i], ""), **built}
        return out

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        """Batched ``datasets.map`` function: columns of normalised rows -> columns of encoded rows."""
        keys = list(batch)
        rows = [dict(zip(keys, values)) for values in zip(*batch.values())]
        encoded = self.encode(rows)
        return {k: [e[k] for e in encoded] for k in self.columns}

    def _dropped(self, row: dict[str, Any], reason: str) -> dict[str, Any]:
        empty: dict[str, Any] = {k: [] for k in ("input_ids", "labels", "span_ids", *self.format.columns)}
        empty.update(src_lang=int(row["src_lang"]), tgt_lang=int(row["tgt_lang"]), length=0, drop=reason)
        empty.update(n_source=0, n_target=0, target_truncated=False)
        return empty


# ----------------------------------------------------------------------------------------------------------------
# Datasets


@dataclass
class Prepared:
    """Tokenised datasets ready for :class:`alignx.data.Collator`.

    ``train`` / ``eval`` rows: ``input_ids``, ``labels`` (-100 ignored), ``span_ids`` (0 other, 1 source, 2 target),
    ``src_lang``, ``tgt_lang`` (language ids), ``length``, plus the format's own columns. ``drops``: reason -> count
    over the training file (every reason of the format, zeros included). ``stats``: record counts, lengths,
    truncation, unknown codes, example line numbers per drop reason, and the eval file's drops.
    """

    train: datasets.Dataset
    eval: datasets.Dataset | None
    drops: dict[str, int]
    stats: dict[str, Any] = field(default_factory=dict)


def _generate(path: str, fmt: RecordFormat, stamp: str) -> Any:
    """Rows of a JSONL file, normalised: the validation pass (the generator behind ``Dataset.from_generator``;
    ``stamp`` keys the cache). A bad line becomes a row with its reason, a copy of an earlier usable record a
    ``duplicate``: everything is counted by the same drop accounting, nothing stops the pass."""
    duplicates = Duplicates((*fmt.texts, "src_lang", "tgt_lang")) if fmt.deduplicate else None
    for line, rec, reason, detail in scan_jsonl(path):
        if rec is None:
            yield blank_row(fmt.texts, line, reason, detail)
            continue
        row = fmt.normalize(rec, line)
        if duplicates is not None and not row["drop"]:
            same = duplicates.check(row)
            if same:
                row["drop"], row["detail"] = "duplicate", same
        yield row


def _features(fmt: RecordFormat) -> Any:
    from datasets import Features, Value

    cols = {k: Value("string") for k in fmt.texts}
    cols.update(src_lang=Value("int32"), tgt_lang=Value("int32"), bad_code=Value("string"))
    cols.update(drop=Value("string"), detail=Value("string"), line=Value("int64"))
    return Features(cols)


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _load_raw(path: Path, fmt: RecordFormat, cache_dir: Path) -> datasets.Dataset:
    from datasets import Dataset
    from datasets.exceptions import DatasetGenerationError

    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if not has_records(path):
        raise DataError(f"{path}: no records (the file is empty or holds only blank lines)")
    stamp = _stamp(path)
    fingerprint = hashlib.sha256(f"{FORMAT_VERSION}|{fmt.name}|{stamp}".encode()).hexdigest()[:32]
    try:
        return Dataset.from_generator(
            _generate,
            features=_features(fmt),
            cache_dir=str(cache_dir),
            gen_kwargs={"path": str(path), "fmt": fmt, "stamp": stamp},
            fingerprint=fingerprint,
        )
    except DatasetGenerationError as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, DataError):
            cause = cause.__cause__
        if cause is not None:
            raise DataError(str(cause)) from None
        raise


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _count_drops(drop_col: list[str], reasons: dict[str, str]) -> dict[str, int]:
    """Rows per drop reason, every reason of ``reasons`` listed (zeros included)."""
    counts = Counter(d for d in drop_col if d)
    undocumented = sorted(r for r in counts if r not in reasons)
    if undocumented:
        raise ValueError(f"drop reasons {undocumented} are not documented in the record format's reasons")
    return {reason: int(counts.get(reason, 0)) for reason in reasons}


def _drop_examples(raw: datasets.Dataset, drop_col: list[str]) -> dict[str, Any]:
    """The first five line numbers per drop reason (``drop_examples``) and what the reason found there
    (``drop_details``: ``"line N: detail"``)."""
    examples: dict[str, list[int]] = {}
    details: dict[str, list[str]] = {}
    dropped = [i for i, d in enumerate(drop_col) if d]
    if dropped:
        lines, texts = _column(raw, "line"), _column(raw, "detail")
        for i in dropped:
            line, d, detail = lines[i], drop_col[i], texts[i]
            if len(examples.setdefault(d, [])) < 5:
                examples[d].append(line)
                details.setdefault(d, []).append(f"line {line}: {detail}" if detail else f"line {line}")
    return {"drop_examples": examples, "drop_details": details}


def _length_stats(kept: datasets.Dataset) -> dict[str, Any]:
    """Token counts of the kept rows: total, mean and max length, mean source and target tokens."""
    if not len(kept):
        return dict(tokens=0, mean_length=0.0, max_length=0, mean_source_tokens=0.0, mean_target_tokens=0.0)
    lengths = np.asarray(_column(kept, "length"), dtype=np.int64)
    return {
        "tokens": int(lengths.sum()),
        "mean_length": float(lengths.mean()),
        "max_length": int(lengths.max()),
        "mean_source_tokens": float(np.mean(_column(kept, "n_source"))),
        "mean_target_tokens": float(np.mean(_column(kept, "n_target"))),
    }


def _encode_file(
    path: Path, raw: datasets.Dataset, encoder: Encoder, num_proc: int, what: str
) -> tuple[datasets.Dataset, dict[str, int], dict[str, Any]]:
    """Tokenise one file's validated rows; returns (kept rows with the format's row columns, drops, stats)."""
    fp = hashlib.sha256(f"{raw._fingerprint}|{encoder.fingerprint()}".encode()).hexdigest()[:32]
    enc = raw.map(
        encoder,
        batched=True,
        batch_size=256,
        num_proc=num_proc if num_proc > 1 and len(raw) >= 2 * num_proc else None,
        remove_columns=raw.column_names,
        new_fingerprint=fp,
        desc=f"tokenising {what} ({path.name})",
    )
    drop_col = _column(enc, "drop")
    drops = _count_drops(drop_col, encoder.format.reasons)
    kept_idx = [i for i, d in enumerate(drop_col) if not d]
    kept = enc.select(kept_idx) if len(kept_idx) < len(enc) else enc
    truncated = _column(enc, "target_truncated")
    stats = {
        "file": str(path),
        "records": len(raw),
        "kept": len(kept),
        "dropped": len(raw) - len(kept),
        "target_truncated": sum(1 for i in kept_idx if truncated[i]),
        **_length_stats(kept),
        "unknown_codes": dict(Counter(c for c in _column(raw, "bad_code") if c)),
        **_drop_examples(raw, drop_col),
    }
    columns = (*ROW_COLUMNS, *encoder.format.columns)
    kept = kept.remove_columns([c for c in kept.column_names if c not in columns])
    return kept, drops, stats


def format_report(
    name: str, drops: dict[str, int], stats: dict[str, Any], reasons: dict[str, str] = DROP_REASONS
) -> str:
    """Human-readable preprocessing summary: kept / dropped per reason (with example lines), truncation."""
    lines = [
        f"[data] {name}: {stats['records']} non-blank lines in {stats['file']}, kept {stats['kept']}, "
        f"dropped {stats['dropped']}; mean length {stats['mean_length']:.1f} tokens (max {stats['max_length']}), "
        f"{stats['target_truncated']} kept with a truncated target"
    ]
    for reason, count in drops.items():
        if count:
            where = "; ".join(stats.get("drop_details", {}).get(reason, []))
            lines.append(f"[data]   dropped {count:>7} {reason:<20} {reasons.get(reason, '')} (e.g. {where})")
    if stats["unknown_codes"]:
        codes = ", ".join(f"{c!r} x{n}" for c, n in sorted(stats["unknown_codes"].items()))
        lines.append(f"[data]   unknown language codes: {codes}")
    return "\n".join(lines)


def _cache_dir(cfg: Config, cache_dir: str | Path | None) -> Path:
    path = Path(cache_dir or cfg.data.cache_dir or Path(cfg.train.output_dir) / "data_cache").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _column(ds: datasets.Dataset, name: str) -> list[Any]:
    """Every value of one column as a list, in one Arrow read. (Iterating or indexing ``ds[name]`` itself goes
    through the datasets formatter row by row: ~0.1 ms a row, seconds for the demo's files.)"""
    return ds[name][:]


def _bad_lines(raw: datasets.Dataset) -> list[tuple[int, str, str]]:
    """``(line, reason, detail)`` of every line of a validated file that holds no record."""
    drops = _column(raw, "drop")
    idx = [i for i, d in enumerate(drops) if d in LINE_REASONS]
    if not idx:
        return []
    lines, details = _column(raw, "line"), _column(raw, "detail")
    return [(lines[i], drops[i], details[i]) for i in idx]


def bad_lines_report(bad: dict[str, list[tuple[int, str, str]]], examples: int = 5) -> str:
    """Console report of the bad lines of every file: counts per reason and the first ``examples`` of each."""
    lines = []
    for path, rows in bad.items():
        counts = Counter(reason for _, reason, _ in rows)
        lines.append(f"[data] {path}: {len(rows)} bad lines (" + ", ".join(f"{r} {n}" for r, n in counts.items()) + ")")
        for reason in counts:
            shown = [f"line {n}: {d}" for n, r, d in rows if r == reason][:examples]
            lines.append(f"[data]   {reason:<15} {LINE_REASONS[reason]}; e.g. " + "; ".join(shown))
    return "\n".join(lines)


def write_bad_lines(bad: dict[str, list[tuple[int, str, str]]], path: Path) -> Path:
    """Every bad line as JSONL ``{file, line, reason, detail}`` (the console shows a few per reason)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for file, rows in bad.items():
            for line, reason, detail in rows:
                f.write(json.dumps({"file": file, "line": line, "reason": reason, "detail": detail}) + "\n")
    return path


def check_bad_lines(
    bad: dict[str, list[tuple[int, str, str]]], policy: str, *, listing: Path | None = None, show: bool = True
) -> None:
    """Apply ``data.on_bad_lines`` to the bad lines found in all input files (file -> lines).

    ``error``: print the report (every file, counts per reason, examples), write every line to ``listing`` and raise
    one-line :class:`DataError`. ``skip``: nothing here — the lines are dropped rows, counted with the other drops.
    """
    bad = {f: rows for f, rows in bad.items() if rows}
    if not bad or policy == "skip":
        return
    where = ""
    if listing is not None and show:
        where = f" and in {write_bad_lines(bad, listing)}"
    if show:
        print(bad_lines_report(bad), flush=True)
    files = "; ".join(describe_bad_lines(f, rows) for f, rows in bad.items())
    listed = f"every one is listed above{where}; " if show else ""
    raise DataError(f"{files}; {listed}fix them, or skip and count them with data.on_bad_lines=skip")


def _stage_files(cfg: Config, stage: int) -> list[Path]:
    files = (cfg.data.train_file, cfg.data.eval_file) if stage == 1 else (cfg.stage2.train_file, cfg.stage2.eval_file)
    return [Path(f) for f in files if f]


def validate_inputs(cfg: Config, stages: tuple[int, ...], cache_dir: str | Path | None = None) -> None:
    """One validation pass over every input file of ``stages`` before any of them trains.

    Reads each file once (the rows are cached: the stages' preparation reuses them), then reports every problem
    at once: files that are empty, and — with ``data.on_bad_lines=error`` — every bad line of every file, then
    raises one-line :class:`DataError`. Files of a recipe with its own record format (``objective.kind`` afp,
    clmap) are read by that recipe instead.
    """
    from filelock import FileLock

    cache = _cache_dir(cfg, cache_dir)
    own_records = cfg.objective.kind in RECIPE_DATA_KINDS  # such a recipe reads its stage-1 files itself
    files = {f: s for s in stages for f in _stage_files(cfg, s) if not (s == 1 and own_records)}
    empty, bad = [], {}
    for path, stage in files.items():
        try:
            with FileLock(str(cache / "alignx-prepare.lock")):
                raw = _load_raw(path, get_format(f"stage{stage}", cfg), cache)
        except DataError as e:
            empty.append(str(e))
            continue
        bad[str(path)] = _bad_lines(raw)
    show = _is_main_process()
    if empty:
        if show and any(bad.values()):
            print(bad_lines_report({f: r for f, r in bad.items() if r}), flush=True)
        raise DataError("; ".join(empty))
    check_bad_lines(bad, cfg.data.on_bad_lines, listing=Path(cfg.train.output_dir) / BAD_LINES_FILE, show=show)


def _no_usable_record(path: str | Path, drops: dict[str, int], stats: dict[str, Any]) -> DataError:
    reasons = ", ".join(f"{r} {n}" for r, n in drops.items() if n)
    return DataError(f"{path}: no usable record ({stats['records']} lines with records or errors; dropped: {reasons})")


def _held_out(cfg: Config, train: datasets.Dataset, train_file: str | Path) -> tuple[datasets.Dataset, Any]:
    """``(train, eval)``: ``data.eval_size`` rows split off the training rows with ``train.seed`` (0: no eval)."""
    if cfg.data.eval_size <= 0:
        return train, None
    if cfg.data.eval_size >= len(train):
        raise DataError(
            f"data.eval_size={cfg.data.eval_size} held-out records would leave no training record "
            f"({len(train)} usable in {train_file}); lower data.eval_size or give an eval file"
        )
    split = train.train_test_split(test_size=cfg.data.eval_size, seed=cfg.train.seed, shuffle=True)
    return split["train"], split["test"]


def _tokenise(
    cfg: Config, encoder: Encoder, lock: str, path: Path, raw: datasets.Dataset, what: str, *, show: bool
) -> tuple[datasets.Dataset, dict[str, int], dict[str, Any]]:
    """:func:`_encode_file` under the cache lock, then its report (printed when ``show``)."""
    from filelock import FileLock

    with FileLock(lock):
        rows, drops, stats = _encode_file(path, raw, encoder, max(1, cfg.data.num_proc), what)
    if show:
        print(format_report(f"{encoder.format.title} {what}", drops, stats, encoder.format.reasons), flush=True)
    return rows, drops, stats


def prepare(
    cfg: Config,
    tokenizer: PreTrainedTokenizerBase,
    record_format: RecordFormat | str,
    *,
    train_file: str | Path,
    eval_file: str | Path | None = None,
    cache_dir: str | Path | None = None,
    verbose: bool = True,
) -> Prepared:
    """Read, validate, render, tokenise and cache the records of ``train_file`` (and ``eval_file``) in
    ``record_format`` (a :class:`~alignx.data.formats.RecordFormat` or its registered name, built from ``cfg``);
    print and return the drops.

    ``eval_file`` None: ``data.eval_size`` usable records are split off the training file with ``train.seed``
    (0 = no evaluation set); an eval file without a usable record gives no evaluation set either. The cache lives in
    ``cache_dir`` or ``data.cache_dir`` or ``<train.output_dir>/data_cache`` and is keyed by the file (path, size,
    mtime), the tokenizer, the format and every option that changes the rows.

    Raises:
        DataError: a missing or empty file, bad lines with ``data.on_bad_lines=error`` (naming ``file:line``), no
            usable training record, or ``data.packing`` for a format that does not pack.
    """
    from filelock import FileLock

    fmt = get_format(record_format, cfg) if isinstance(record_format, str) else record_format
    if cfg.data.packing and not fmt.packs:
        raise DataError(f"the {fmt.title} recipe does not pack records; set data.packing=false")
    encoder = Encoder(tokenizer, cutoff_len=cfg.data.cutoff_len, record_format=fmt)
    cache = _cache_dir(cfg, cache_dir)
    lock = str(cache / "alignx-prepare.lock")
    show = verbose and _is_main_process()
    paths = {"train": Path(train_file)} | ({"eval": Path(eval_file)} if eval_file is not None else {})
    # Ranks that prepare at once: the first validates and tokenises, the others wait and then read its cache.
    with FileLock(lock):
        raws = {what: _load_raw(path, fmt, cache) for what, path in paths.items()}
    check_bad_lines({str(paths[w]): _bad_lines(r) for w, r in raws.items()}, cfg.data.on_bad_lines, show=show)
    train, drops, stats = _tokenise(cfg, encoder, lock, paths["train"], raws["train"], "train", show=show)
    if not len(train):
        raise _no_usable_record(train_file, drops, stats)
    if eval_file is None:
        train, evald = _held_out(cfg, train, train_file)
    else:
        evald, stats["eval_drops"], stats["eval"] = _tokenise(
            cfg, encoder, lock, paths["eval"], raws["eval"], "eval", show=show
        )
        evald = evald if len(evald) else None
    stats["train_rows"] = len(train)
    stats["eval_rows"] = len(evald) if evald is not None else 0
    return Prepared(train=train, eval=evald, drops=drops, stats=stats)


def preparer(record_format: str, doc: str) -> Callable[..., Prepared]:
    """:func:`prepare` bound to the registered format ``record_format`` (docstring ``doc``), with the signature the
    trainer calls and a recipe's data hook gives:
    ``(cfg, tokenizer, *, train_file, eval_file=None, cache_dir=None, verbose=True) -> Prepared``."""

    def prepare_format(
        cfg: Config,
        tokenizer: PreTrainedTokenizerBase,
        *,
        train_file: str | Path,
        eval_file: str | Path | None = None,
        cache_dir: str | Path | None = None,
        verbose: bool = True,
    ) -> Prepared:
        return prepare(
            cfg,
            tokenizer,
            record_format,
            train_file=train_file,
            eval_file=eval_file,
            cache_dir=cache_dir,
            verbose=verbose,
        )

    prepare_format.__doc__ = doc
    return prepare_format


prepare_stage1 = preparer(
    PairsFormat.name,
    """:func:`prepare` of stage-1 pairs (:class:`PairsFormat`: ``data.template``, ``data.instruction``,
    ``data.min_target_tokens``, ``data.labels``).""",
)
prepare_stage2 = preparer(
    InstructionsFormat.name,
    """:func:`prepare` of stage-2 instructions (:class:`InstructionsFormat`: same template and truncation, labels
    from ``stage2.labels``, ``span_ids`` all 0, ``src_lang = tgt_lang = lang``).""",
)
