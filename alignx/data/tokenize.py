"""Tokenisation with source/target spans from character offsets, truncation, labels and counted drops.

Spans
-----
A record is rendered to text with the character ranges of its source ``x`` and target ``y``
(:meth:`alignx.data.prompt.Template.render`). The whole text is tokenised once, with the tokenizer's own special
tokens (BOS where the tokenizer adds one) and ``return_offsets_mapping``; every token ``t`` covers the characters
``[a_t, b_t)``. Each character has a region: 0 prompt, 1 source, 2 target. The region of a token is decided by
:func:`token_regions`:

1. Special tokens (BOS, EOS, pad) and tokens with an empty character range are region 0.
2. Count the token's characters per region, **ignoring whitespace characters** when the token has any
   non-whitespace character (a whitespace-only token counts all its characters).
3. The token is in span ``r`` (source or target) iff **strictly more than half** of its counted characters are
   in ``r``; otherwise it is prompt (0). A tie is not a majority.

So a token that straddles a boundary goes to the side holding most of its visible characters: a leading-space
token ``" Hello"`` whose space belongs to the template is source (5 of 5 visible characters); a token ``":\nThe"``
that merges the end of ``### Input:\n`` with the first source word is source (3 of 4); a token ``".\n\n###"``
that merges the source's final period with the next header is prompt (1 of 4), so that period is not pooled; a
token ``".\n\n"`` is source (its only visible character is the period); ``":\nA"`` (1 of 2) and a whitespace
token ``"\n "`` whose space starts the source (1 of 2) are prompt. A token that is mostly prompt is never in a
span. Tokens sharing one character range (byte-level pieces of one emoji or of one Devanagari cluster) all get
that character's region. Nothing depends on how a *prefix* of the prompt would tokenise, which differs from the
full tokenisation for many tokenizers (a SentencePiece-style tokenizer that merges ``".\n\n###"`` makes the
prefix-count method put the header tokens into the source span).

Sequence layout (reference, method.md section 1.2)
--------------------------------------------------
``tokens = tokenize(text)[:cutoff_len]``; EOS is appended iff the last token is not EOS and
``len(tokens) < cutoff_len`` (a sequence that fills ``cutoff_len`` exactly gets no EOS, as in the reference).
``span_ids``: 1 on source tokens, 2 on target tokens, 0 elsewhere (BOS, prompt, EOS, padding). The official code
marks target positions ``[output_start, L - 1)``, i.e. it leaves the last sequence token unmarked; untruncated,
that token is EOS, which has no characters and is region 0 here too. **For a truncated target we mark every
surviving target token, including the last one** (the official code leaves that one unmarked; it is a real target
token, and ``min_target_tokens`` counts marked tokens). Stage 2 has no spans (all zeros).

Labels: ``data.labels = "all"`` (reference) copies ``input_ids``; ``"response"`` keeps only target tokens and the
EOS, ``-100`` elsewhere.

Drops (counted, never raised; see :data:`alignx.data.records.DROP_REASONS`), in this order of precedence:
missing_field, bad_field_type, unknown_language, empty_source, empty_target (stage 2 also empty_instruction), then
after tokenisation source_truncated (fewer source tokens survive than the full text has; the target is then gone
too), no_source_tokens, short_target (fewer than ``min_target_tokens`` marked target tokens after truncation);
stage 2: response_truncated. Every kept stage-1 row therefore has >= 1 source token and >= ``min_target_tokens``
target tokens: the pooling never divides by zero.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from alignx.constants import DEFAULT_INSTRUCTION, IGNORE_INDEX, RECIPE_DATA_KINDS
from alignx.constants import PROMPT_SPAN as PROMPT
from alignx.constants import SOURCE_SPAN as SOURCE
from alignx.constants import TARGET_SPAN as TARGET
from alignx.data.prompt import Rendered, Template, instruction_text, load_template
from alignx.data.records import (
    DROP_REASONS,
    LINE_REASONS,
    DataError,
    Duplicates,
    bad_line_row,
    describe_bad_lines,
    has_records,
    normalize_stage1,
    normalize_stage2,
    scan_jsonl,
)
from alignx.languages import lang_code

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

    from alignx.config import Config

__all__ = [
    "Encoder",
    "Prepared",
    "check_bad_lines",
    "format_report",
    "prepare_stage1",
    "prepare_stage2",
    "token_regions",
    "validate_inputs",
]

# Bump when the row layout or the span rule changes: it is part of the datasets cache key.
FORMAT_VERSION = "alignx-data-2"

BAD_LINES_FILE = "bad_lines.jsonl"  # <train.output_dir>/bad_lines.jsonl: every bad line of a refused input
ROW_COLUMNS = ("input_ids", "labels", "span_ids", "src_lang", "tgt_lang", "length")
_PROBE = "Probe: Hello world!\n\n### Input:\n 你好 😀 नमस्ते"


def token_regions(
    text: str,
    source: tuple[int, int],
    target: tuple[int, int],
    offsets: list[tuple[int, int]] | np.ndarray,
    special_mask: list[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Region (0 prompt, 1 source, 2 target) of each token, by strict majority of its visible characters.

    Args:
        text: the rendered text, ``len(text) = C``.
        source, target: character ranges ``[start, end)`` of the source and the target in ``text``.
        offsets: ``[L, 2]`` character range of each token (the tokenizer's ``offset_mapping``).
        special_mask: ``[L]`` 1 for special tokens (region 0 whatever their offsets).

    Returns:
        ``[L]`` int8 regions. With ``n_r(t)`` the number of characters of region ``r`` in token ``t`` (whitespace
        excluded unless the token is only whitespace), ``region(t) = r`` if ``2 n_r(t) > sum_r' n_r'(t)`` for
        ``r`` in {source, target}, else 0; also 0 for special tokens and empty ranges.
    """
    n = len(text)
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts = np.clip(offsets[:, 0], 0, n)
    ends = np.clip(offsets[:, 1], 0, n)
    char_region = np.zeros(n, dtype=np.int8)
    char_region[source[0] : source[1]] = SOURCE
    char_region[target[0] : target[1]] = TARGET
    visible = np.fromiter((not c.isspace() for c in text), dtype=bool, count=n)
    counts = np.zeros((3, len(offsets)), dtype=np.int64)
    counts_all = np.zeros((3, len(offsets)), dtype=np.int64)
    for r in (PROMPT, SOURCE, TARGET):
        in_r = char_region == r
        cum = np.concatenate([[0], np.cumsum(in_r & visible)])
        cum_all = np.concatenate([[0], np.cumsum(in_r)])
        counts[r] = cum[ends] - cum[starts]
        counts_all[r] = cum_all[ends] - cum_all[starts]
    counts = np.where(counts.sum(0, keepdims=True) > 0, counts, counts_all)
    total = counts.sum(0)
    region = np.full(len(offsets), PROMPT, dtype=np.int8)
    region[2 * counts[SOURCE] > total] = SOURCE
    region[2 * counts[TARGET] > total] = TARGET
    region[ends <= starts] = PROMPT
    if special_mask is not None:
        region[np.asarray(special_mask, dtype=bool)] = PROMPT
    return region


class Encoder:
    """Renders and tokenises normalised rows (a ``datasets.map`` function, picklable for ``num_proc > 1``).

    Args:
        tokenizer: a fast (Rust-backed) HF tokenizer; it is not modified (a private copy of its backend is used,
            with special-token parsing of the *data* switched off, so a literal "</s>" in a record is text).
        stage: 1 (translation pairs, with spans) or 2 (instructions, no spans).
        template: the prompt template.
        instruction: ``data.instruction`` pattern with ``{src}``/``{tgt}`` (stage 1).
        cutoff_len: maximum sequence length in tokens, EOS included.
        min_target_tokens: stage-1 rows with fewer marked target tokens are dropped.
        labels: ``"all"`` (whole sequence, reference) or ``"response"`` (target tokens and EOS only).
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
    ) -> None:
        if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "backend_tokenizer", None) is None:
            raise DataError(f"character-offset spans need a fast tokenizer, got {type(tokenizer).__name__}")
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no eos_token; the prompt format ends every untruncated record with EOS")
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage!r}")
        if labels not in ("all", "response"):
            raise ValueError(f"labels must be 'all' or 'response', got {labels!r}")
        if cutoff_len < 2 or min_target_tokens < 1:
            raise ValueError(f"need cutoff_len >= 2 and min_target_tokens >= 1, got {cutoff_len}, {min_target_tokens}")
        self.stage = stage
        self.template = template or load_template("alpaca")
        self.instruction = instruction
        self.cutoff_len = cutoff_len
        self.min_target_tokens = min_target_tokens
        self.labels = labels
        self.eos_id = int(tokenizer.eos_token_id)
        self.backend_json = tokenizer.backend_tokenizer.to_str()
        self._backend: Any = None
        self._expected_probe = list(tokenizer(_PROBE, add_special_tokens=True)["input_ids"])
        if instruction and stage == 1:
            instruction_text(instruction, "en", "en")  # fail early on a bad pattern

    @property
    def backend(self) -> Any:
        """A private copy of the Rust tokenizer: no truncation, no padding, special-token strings in data are text.

        Built on first use (a 262k-vocabulary tokenizer takes seconds to copy; a cached run never needs it), and
        checked to encode like the HF tokenizer it came from.
        """
        if self._backend is None:
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(self.backend_json)
            backend.no_truncation()
            backend.no_padding()
            got = backend.encode(_PROBE, add_special_tokens=True).ids
            if got != self._expected_probe:
                raise DataError(
                    f"the tokenizer encodes text differently from its backend ({self._expected_probe[:8]}... vs "
                    f"{got[:8]}...); char-offset spans cannot be trusted"
                )
            backend.encode_special_tokens = True
            self._backend = backend
        return self._backend

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_backend": None}

    def fingerprint(self) -> str:
        """Hash of everything that decides the rows (part of the datasets cache key)."""
        h = hashlib.sha256()
        cfg = [FORMAT_VERSION, self.stage, self.template, self.instruction, self.cutoff_len]
        cfg += [self.min_target_tokens, self.labels, self.eos_id]
        h.update(repr(cfg).encode())
        h.update(self.backend_json.encode())
        return h.hexdigest()[:32]

    # -- rendering ---------------------------------------------------------------------------------------------
    def render(self, row: dict[str, Any]) -> Rendered:
        """The text of a normalised row (:func:`alignx.data.records.normalize_stage1` / ``normalize_stage2``)."""
        if self.stage == 1:
            ins = row.get("instruction") or instruction_text(
                self.instruction, lang_code(row["src_lang"]), lang_code(row["tgt_lang"])
            )
            return self.template.render(ins, row["src_text"], row["tgt_text"])
        return self.template.render(row["instruction"], row["input"], row["output"])

    # -- encoding ----------------------------------------------------------------------------------------------
    def encode(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Encode normalised rows; each result has the :data:`ROW_COLUMNS` plus ``drop`` ("" = kept),
        ``n_source``, ``n_target`` and ``target_truncated``. Dropped rows have empty token lists."""
        out: list[dict[str, Any]] = [{} for _ in rows]
        todo = [i for i, r in enumerate(rows) if not r["drop"]]
        rendered = {i: self.render(rows[i]) for i in todo}
        encodings = self.backend.encode_batch([rendered[i].text for i in todo], add_special_tokens=True)
        for i, enc in zip(todo, encodings):
            out[i] = self._row(rendered[i], enc, rows[i])
        for i, r in enumerate(rows):
            if r["drop"]:
                out[i] = self._dropped(r, r["drop"])
        return out

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        """Batched ``datasets.map`` function: columns of normalised rows -> columns of encoded rows."""
        keys = list(batch)
        rows = [dict(zip(keys, values)) for values in zip(*batch.values())]
        encoded = self.encode(rows)
        return {k: [e[k] for e in encoded] for k in (*ROW_COLUMNS, "drop", "n_source", "n_target", "target_truncated")}

    def _dropped(self, row: dict[str, Any], reason: str) -> dict[str, Any]:
        return {
            "input_ids": [],
            "labels": [],
            "span_ids": [],
            "src_lang": int(row["src_lang"]),
            "tgt_lang": int(row["tgt_lang"]),
            "length": 0,
            "drop": reason,
            "n_source": 0,
            "n_target": 0,
            "target_truncated": False,
        }

    def _row(self, rendered: Rendered, enc: Any, row: dict[str, Any]) -> dict[str, Any]:
        region = token_regions(rendered.text, rendered.source, rendered.target, enc.offsets, enc.special_tokens_mask)
        full_src = int((region == SOURCE).sum())
        full_tgt = int((region == TARGET).sum())
        ids = list(enc.ids[: self.cutoff_len])
        region = region[: self.cutoff_len]
        n_src = int((region == SOURCE).sum())
        n_tgt = int((region == TARGET).sum())
        eos_added = ids[-1] != self.eos_id and len(ids) < self.cutoff_len
        if eos_added:
            ids.append(self.eos_id)
            region = np.append(region, PROMPT)
        if self.stage == 1:
            span_ids = region.tolist()
            drop = ""
            if n_src < full_src:
                drop = "source_truncated"
            elif n_src == 0:
                drop = "no_source_tokens"
            elif n_tgt < self.min_target_tokens:
                drop = "short_target"
        else:
            span_ids = [0] * len(ids)
            drop = "response_truncated" if n_tgt == 0 else ""
        if drop:
            return self._dropped(row, drop)
        if self.labels == "all":
            labels = list(ids)
        else:
            keep = region == TARGET
            if eos_added:
                keep[-1] = True
            labels = np.where(keep, np.asarray(ids), IGNORE_INDEX).tolist()
        return {
            "input_ids": ids,
            "labels": labels,
            "span_ids": span_ids,
            "src_lang": int(row["src_lang"]),
            "tgt_lang": int(row["tgt_lang"]),
            "length": len(ids),
            "drop": "",
            "n_source": n_src,
            "n_target": n_tgt,
            "target_truncated": n_tgt < full_tgt,
        }


# ----------------------------------------------------------------------------------------------------------------
# Datasets


@dataclass
class Prepared:
    """Tokenised datasets ready for :class:`alignx.data.Collator`.

    ``train`` / ``eval`` rows: ``input_ids``, ``labels`` (-100 ignored), ``span_ids`` (0 other, 1 source, 2 target),
    ``src_lang``, ``tgt_lang`` (language ids), ``length``. ``drops``: reason -> count over the training file
    (every reason of :data:`alignx.data.records.DROP_REASONS`, zeros included). ``stats``: record counts, lengths,
    truncation, unknown codes, example line numbers per drop reason, and the eval file's drops.
    """

    train: datasets.Dataset
    eval: datasets.Dataset | None
    drops: dict[str, int]
    stats: dict[str, Any] = field(default_factory=dict)


_TEXTS = {1: ("src_text", "tgt_text", "instruction"), 2: ("instruction", "input", "output")}


def _generate(path: str, stage: int, stamp: str) -> Any:
    """Rows of a JSONL file, normalised: the validation pass (the generator behind ``Dataset.from_generator``;
    ``stamp`` keys the cache). A bad line becomes a row with its reason, a copy of an earlier usable record a
    ``duplicate``: everything is counted by the same drop accounting, nothing stops the pass."""
    norm = normalize_stage1 if stage == 1 else normalize_stage2
    duplicates = Duplicates((*_TEXTS[stage], "src_lang", "tgt_lang"))
    for line, rec, reason, detail in scan_jsonl(path):
        if rec is None:
            yield bad_line_row(stage, line, reason, detail)
            continue
        row = norm(rec, line)
        if not row["drop"]:
            same = duplicates.check(row)
            if same:
                row["drop"], row["detail"] = "duplicate", same
        yield row


def _features(stage: int) -> Any:
    from datasets import Features, Value

    cols = {k: Value("string") for k in _TEXTS[stage]}
    cols.update(src_lang=Value("int32"), tgt_lang=Value("int32"), bad_code=Value("string"))
    cols.update(drop=Value("string"), detail=Value("string"), line=Value("int64"))
    return Features(cols)


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _load_raw(path: Path, stage: int, cache_dir: Path) -> datasets.Dataset:
    from datasets import Dataset
    from datasets.exceptions import DatasetGenerationError

    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if not has_records(path):
        raise DataError(f"{path}: no records (the file is empty or holds only blank lines)")
    stamp = _stamp(path)
    fingerprint = hashlib.sha256(f"{FORMAT_VERSION}|{stage}|{stamp}".encode()).hexdigest()[:32]
    try:
        return Dataset.from_generator(
            _generate,
            features=_features(stage),
            cache_dir=str(cache_dir),
            gen_kwargs={"path": str(path), "stage": stage, "stamp": stamp},
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


def _encode_file(
    path: Path, raw: datasets.Dataset, encoder: Encoder, num_proc: int, what: str
) -> tuple[datasets.Dataset, dict[str, int], dict[str, Any]]:
    """Tokenise one file's validated rows; returns (kept rows with ROW_COLUMNS, drops, stats)."""
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
    drops = {reason: 0 for reason in DROP_REASONS}
    drops.update(Counter(d for d in drop_col if d))
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
    unknown = Counter(c for c in _column(raw, "bad_code") if c)
    kept_idx = [i for i, d in enumerate(drop_col) if not d]
    kept = enc.select(kept_idx) if len(kept_idx) < len(enc) else enc
    truncated = _column(enc, "target_truncated")
    n_tr = sum(1 for i in kept_idx if truncated[i])
    lengths = np.asarray(_column(kept, "length"), dtype=np.int64) if len(kept) else np.zeros(0, dtype=np.int64)
    stats = {
        "file": str(path),
        "records": len(raw),
        "kept": len(kept),
        "dropped": len(raw) - len(kept),
        "target_truncated": n_tr,
        "tokens": int(lengths.sum()),
        "mean_length": float(lengths.mean()) if len(lengths) else 0.0,
        "max_length": int(lengths.max()) if len(lengths) else 0,
        "mean_source_tokens": float(np.mean(_column(kept, "n_source"))) if len(kept) else 0.0,
        "mean_target_tokens": float(np.mean(_column(kept, "n_target"))) if len(kept) else 0.0,
        "unknown_codes": dict(unknown),
        "drop_examples": examples,
        "drop_details": details,
    }
    kept = kept.remove_columns([c for c in kept.column_names if c not in ROW_COLUMNS])
    return kept, drops, stats


def format_report(name: str, drops: dict[str, int], stats: dict[str, Any]) -> str:
    """Human-readable preprocessing summary: kept / dropped per reason (with example lines), truncation."""
    lines = [
        f"[data] {name}: {stats['records']} non-blank lines in {stats['file']}, kept {stats['kept']}, "
        f"dropped {stats['dropped']}; mean length {stats['mean_length']:.1f} tokens (max {stats['max_length']}), "
        f"{stats['target_truncated']} kept with a truncated target"
    ]
    for reason, count in drops.items():
        if count:
            where = "; ".join(stats.get("drop_details", {}).get(reason, []))
            lines.append(f"[data]   dropped {count:>7} {reason:<20} {DROP_REASONS.get(reason, '')} (e.g. {where})")
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
                raw = _load_raw(path, stage, cache)
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


def _prepare(
    cfg: Config,
    encoder: Encoder,
    train_file: str | Path,
    eval_file: str | Path | None,
    cache_dir: str | Path | None,
    verbose: bool,
) -> Prepared:
    from filelock import FileLock

    cache = _cache_dir(cfg, cache_dir)
    num_proc = max(1, cfg.data.num_proc)
    show = verbose and _is_main_process()
    paths = {"train": Path(train_file)} | ({"eval": Path(eval_file)} if eval_file is not None else {})
    # Ranks that prepare at once: the first validates and tokenises, the others wait and then read its cache.
    with FileLock(str(cache / "alignx-prepare.lock")):
        raws = {what: _load_raw(path, encoder.stage, cache) for what, path in paths.items()}
    check_bad_lines({str(paths[w]): _bad_lines(r) for w, r in raws.items()}, cfg.data.on_bad_lines, show=show)
    with FileLock(str(cache / "alignx-prepare.lock")):
        train, drops, stats = _encode_file(paths["train"], raws["train"], encoder, num_proc, "train")
    if show:
        print(format_report(f"stage {encoder.stage} train", drops, stats), flush=True)
    if not len(train):
        raise _no_usable_record(train_file, drops, stats)
    evald = None
    if eval_file is not None:
        with FileLock(str(cache / "alignx-prepare.lock")):
            evald, eval_drops, eval_stats = _encode_file(paths["eval"], raws["eval"], encoder, num_proc, "eval")
        stats["eval_drops"], stats["eval"] = eval_drops, eval_stats
        if show:
            print(format_report(f"stage {encoder.stage} eval", eval_drops, eval_stats), flush=True)
    elif cfg.data.eval_size > 0:
        if cfg.data.eval_size >= len(train):
            raise DataError(
                f"data.eval_size={cfg.data.eval_size} held-out records would leave no training record "
                f"({len(train)} usable in {train_file}); lower data.eval_size or give an eval file"
            )
        split = train.train_test_split(test_size=cfg.data.eval_size, seed=cfg.train.seed, shuffle=True)
        train, evald = split["train"], split["test"]
    stats["train_rows"] = len(train)
    stats["eval_rows"] = len(evald) if evald is not None else 0
    return Prepared(train=train, eval=evald, drops=drops, stats=stats)


def prepare_stage1(
    cfg: Config,
    tokenizer: PreTrainedTokenizerBase,
    *,
    train_file: str | Path,
    eval_file: str | Path | None = None,
    cache_dir: str | Path | None = None,
    verbose: bool = True,
) -> Prepared:
    """Read, validate, render and tokenise stage-1 pairs (cached with HF ``datasets``); print and return drops.

    ``eval_file`` None: ``data.eval_size`` usable records are split off the training file with ``train.seed``
    (0 = no evaluation set). The cache lives in ``cache_dir`` or ``data.cache_dir`` or
    ``<train.output_dir>/data_cache`` and is keyed by the file (path, size, mtime), the tokenizer, the template
    and every data option that changes the rows.
    """
    encoder = Encoder(
        tokenizer,
        stage=1,
        template=load_template(cfg.data.template),
        instruction=cfg.data.instruction,
        cutoff_len=cfg.data.cutoff_len,
        min_target_tokens=cfg.data.min_target_tokens,
        labels=cfg.data.labels,
    )
    return _prepare(cfg, encoder, train_file, eval_file, cache_dir, verbose)


def prepare_stage2(
    cfg: Config,
    tokenizer: PreTrainedTokenizerBase,
    *,
    train_file: str | Path,
    eval_file: str | Path | None = None,
    cache_dir: str | Path | None = None,
    verbose: bool = True,
) -> Prepared:
    """Stage-2 instructions ``{instruction, input, output, lang}``: same template (no-input variant when ``input``
    is empty), same truncation, labels from ``stage2.labels``, ``span_ids`` all 0, ``src_lang = tgt_lang = lang``."""
    encoder = Encoder(
        tokenizer,
        stage=2,
        template=load_template(cfg.data.template),
        cutoff_len=cfg.data.cutoff_len,
        labels=cfg.stage2.labels,
    )
    return _prepare(cfg, encoder, train_file, eval_file, cache_dir, verbose)
