"""JSONL records: strict reading (a malformed line names its file and line) and per-record validation.

Stage-1 record (one translation pair)::

    {"src_text": "Hapo mwanzo kulikuwako Neno.", "tgt_text": "In the beginning was the Word.",
     "src_lang": "sw", "tgt_lang": "en"}

with an optional ``"instruction"`` that replaces ``data.instruction`` for that record. Stage-2 record::

    {"instruction": "...", "input": "...", "output": "...", "lang": "sw"}

where ``input`` may be empty or absent (the no-input prompt variant is then used).

Reading reports every bad *line* (not UTF-8, malformed JSON, not a JSON object; :data:`LINE_REASONS`) instead of
stopping at the first one, and is lenient about *records*: a record with a missing or non-string field, an unknown
language code, an empty text, or a defect that would bias the objective (:data:`POISON_REASONS`: control
characters, same-language or identical-text pairs, exact duplicates) is kept in the stream with a ``drop`` reason,
so that preprocessing counts it instead of crashing. Whether bad lines stop the run or are skipped and counted is
``data.on_bad_lines`` (:func:`alignx.data.tokenize.check_bad_lines`). A UTF-8 byte-order mark at the start of a file
is accepted. :func:`normalize_stage1` and :func:`normalize_stage2` produce rows with a fixed schema that Arrow can
store whatever the input looked like.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from alignx.languages import lang_id

__all__ = [
    "DROP_REASONS",
    "LINE_REASONS",
    "POISON_REASONS",
    "DataError",
    "Duplicates",
    "STAGE1_FIELDS",
    "STAGE2_FIELDS",
    "iter_jsonl",
    "normalize_stage1",
    "normalize_stage2",
    "blank_row",
    "drop_blank",
    "describe_bad_lines",
    "has_records",
    "read_jsonl",
    "scan_jsonl",
]

STAGE1_FIELDS = ("src_text", "tgt_text", "src_lang", "tgt_lang")
STAGE2_FIELDS = ("instruction", "output", "lang")  # "input" is optional

LINE_REASONS: dict[str, str] = {
    "not_utf8": "the line is not UTF-8",
    "malformed_json": "the line is not valid JSON",
    "not_an_object": "the line is JSON but not an object",
}
"""Lines that hold no record at all: they stop the run (default) or are skipped and counted (data.on_bad_lines)."""

POISON_REASONS: dict[str, str] = {
    "bad_characters": "a text holds NUL, another control character or a lone surrogate (corrupt or binary data, which "
    "tokenizers mangle or reject): dropped",
    "same_language": "src_lang equals tgt_lang: not a translation pair (the language-matching head would learn 'same "
    "language' from a pair meant to cross languages, the prompt asks to translate X into X): dropped",
    "identical_text": "the source and target texts are identical: the contrastive positive is the anchor's own token "
    "sequence (matched without any alignment) and next-token prediction learns to copy: dropped",
    "duplicate": "an exact copy of an earlier record: kept once (a copy in the same micro-batch is a false negative of "
    "the contrastive term; copies over-weight the record and can land on both sides of the held-out split)",
}
"""Records that are valid JSON but would bias the objective: always dropped (or deduplicated), counted, reported."""

DROP_REASONS: dict[str, str] = {
    **LINE_REASONS,
    "missing_field": "a required field is absent or null",
    "bad_field_type": "a text field is not a string or a language field is not a code",
    "unknown_language": "a language code is not in alignx.languages.LANGUAGES",
    "empty_source": "the source text is empty or whitespace",
    "empty_target": "the target (stage 1) or output (stage 2) text is empty or whitespace",
    "empty_instruction": "the stage-2 instruction is empty or whitespace",
    "source_truncated": "truncation at data.cutoff_len cut into the source (its span would be broken)",
    "no_source_tokens": "no token is mostly source text (the source merged into prompt tokens)",
    "short_target": "fewer than data.min_target_tokens target tokens survive truncation",
    "response_truncated": "no token of the stage-2 output survives truncation",
    **POISON_REASONS,
}
"""Every reason a line or record can be dropped, with its meaning (printed in the preprocessing report)."""

# C0 controls but tab, newline and carriage return; DEL and C1; UTF-16 surrogates (only as unpaired \ud800 escapes).
_BAD_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
_BOM = "\ufeff"


class DataError(ValueError):
    """A data problem that must stop the run (malformed file, unusable tokenizer or template)."""


def _parse(raw: bytes, lineno: int) -> tuple[Any, str, str]:
    """(record, problem reason, detail) of one line; the record is None when there is a problem."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, "not_utf8", f"{e.reason} at byte {e.start + 1}"
    if lineno == 1 and line.startswith(_BOM):  # a byte-order mark some editors write; not part of the JSON
        line = line[1:]
    line = line.rstrip("\r\n")  # the error column then counts characters of this line only
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        return None, "malformed_json", f"{e.msg} (column {e.colno})"
    if not isinstance(rec, dict):
        return None, "not_an_object", f"got a JSON {type(rec).__name__}"
    return rec, "", ""


def scan_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any] | None, str, str]]:
    """Every non-blank line of a JSONL file: ``(line number, record, reason, detail)`` (1-based line numbers).

    ``record`` is the JSON object, or None for a bad line, whose ``reason`` (:data:`LINE_REASONS`) and ``detail``
    say what is wrong. Reading goes on after a bad line, so one pass finds all of them.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip() or (lineno == 1 and raw.strip() == _BOM.encode()):
                continue
            rec, reason, detail = _parse(raw, lineno)
            yield lineno, rec, reason, detail


def has_records(path: str | Path) -> bool:
    """Whether the file holds any non-blank line (an empty file is reported before any dataset is built)."""
    with Path(path).open("rb") as f:
        for raw in f:
            if raw.strip().lstrip(_BOM.encode()).strip():
                return True
    return False


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` for each good line of a JSONL file, then raise :class:`DataError` if any line
    was bad: one line naming the first bad ``file:line`` and how many others there are, by reason."""
    bad: list[tuple[int, str, str]] = []
    for lineno, rec, reason, detail in scan_jsonl(path):
        if rec is None:
            bad.append((lineno, reason, detail))
        else:
            yield lineno, rec
    if bad:
        raise DataError(describe_bad_lines(path, bad))


def describe_bad_lines(path: str | Path, bad: list[tuple[int, str, str]]) -> str:
    """``file:line: reason: detail`` of the first bad line, and the counts of all of them (one line)."""
    lineno, reason, detail = bad[0]
    words = {"not_utf8": "not UTF-8", "malformed_json": "malformed JSON", "not_an_object": "expected a JSON object"}
    text = f"{path}:{lineno}: {words.get(reason, reason)}: {detail}"
    if len(bad) > 1:
        counts: dict[str, int] = {}
        for _, r, _ in bad:
            counts[r] = counts.get(r, 0) + 1
        text += f" ({len(bad)} bad lines in all: " + ", ".join(f"{r} {n}" for r, n in counts.items()) + ")"
    return text


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All records of a JSONL file. Bad lines raise :class:`DataError` naming ``file:line`` (after reading them all)."""
    return [rec for _, rec in iter_jsonl(path)]


def blank_row(texts: tuple[str, ...], line: int, drop: str = "", detail: str = "") -> dict[str, Any]:
    """A fixed-schema row with empty ``texts`` and unusable language ids: the row of a line that holds no record
    (``drop`` its reason, so that it is counted like any dropped record), or the base a normaliser fills in."""
    row: dict[str, Any] = dict.fromkeys(texts, "")
    row.update(src_lang=-1, tgt_lang=-1, bad_code="", drop=drop, detail=detail, line=line)
    return row


def drop_blank(row: dict[str, Any], checks: Sequence[tuple[tuple[str, ...], str]]) -> dict[str, Any]:
    """``row`` with ``drop`` set to the reason of the first ``(fields, reason)`` check that finds one of its text
    fields blank (only white space); unchanged when every field has text."""
    for fields, reason in checks:
        if any(not row[f].strip() for f in fields):
            return {**row, "drop": reason}
    return row


class Duplicates:
    """Remembers the first line of every distinct usable record; later exact copies are reported as duplicates.

    A record is its text fields and language ids (whitespace included: only exact copies). 16-byte digests keep the
    memory at ~100 bytes per distinct record.
    """

    def __init__(self, fields: tuple[str, ...]) -> None:
        self.fields = fields
        self.first: dict[bytes, int] = {}

    def check(self, row: dict[str, Any]) -> str:
        """Empty for a first occurrence, else "same as line N"."""
        key = "\x1f".join(str(row[f]) for f in self.fields).encode("utf-8", "surrogatepass")
        digest = hashlib.blake2b(key, digest_size=16).digest()
        first = self.first.setdefault(digest, row["line"])
        return "" if first == row["line"] else f"same as line {first}"


def _text(rec: dict[str, Any], key: str, required: bool = True) -> tuple[str, str]:
    """(value, drop reason) of a text field."""
    value = rec.get(key)
    if value is None:
        return "", ("missing_field" if required else "")
    if not isinstance(value, str):
        return "", "bad_field_type"
    return value, ""


def _lang(rec: dict[str, Any], key: str) -> tuple[int, str, str]:
    """(id, drop reason, offending code) of a language field; id -1 when unusable."""
    value = rec.get(key)
    if value is None:
        return -1, "missing_field", ""
    if not isinstance(value, str):
        return -1, "bad_field_type", ""
    try:
        return lang_id(value), "", ""
    except ValueError:
        return -1, "unknown_language", value


def _first(*reasons: str) -> str:
    return next((r for r in reasons if r), "")


def _bad_characters(rec: dict[str, str]) -> str:
    """Where the first control character or lone surrogate is ("" if none): ``U+0000 in src_text at character 5``."""
    for key, text in rec.items():
        m = _BAD_CHARS.search(text)
        if m:
            return f"U+{ord(m.group()):04X} in {key} at character {m.start() + 1}"
    return ""


def normalize_stage1(rec: dict[str, Any], line: int = 0) -> dict[str, Any]:
    """A stage-1 record as a fixed-schema row with a ``drop`` reason ("" = usable so far).

    Row: ``src_text, tgt_text, instruction`` (str; ``instruction`` "" = use ``data.instruction``), ``src_lang,
    tgt_lang`` (int ids, -1 if unusable), ``bad_code`` (the unknown code, if any), ``drop``, ``detail`` (what the
    drop reason found, "" if nothing to add), ``line``. Precedence of reasons: missing_field / bad_field_type,
    unknown_language, empty_source, empty_target, bad_characters, same_language, identical_text (duplicates are found
    across records, by :class:`Duplicates`).
    """
    src, r_src = _text(rec, "src_text")
    tgt, r_tgt = _text(rec, "tgt_text")
    ins, r_ins = _text(rec, "instruction", required=False)
    sid, r_sl, bad_s = _lang(rec, "src_lang")
    tid, r_tl, bad_t = _lang(rec, "tgt_lang")
    structural = _first(*(r for r in (r_src, r_tgt, r_ins, r_sl, r_tl) if r != "unknown_language"))
    drop = _first(
        structural,
        "unknown_language" if "unknown_language" in (r_sl, r_tl) else "",
        "empty_source" if not src.strip() else "",
        "empty_target" if not tgt.strip() else "",
    )
    detail = ""
    if not drop:
        detail = _bad_characters({"src_text": src, "tgt_text": tgt, "instruction": ins})
        if detail:
            drop, src, tgt, ins = "bad_characters", "", "", ""  # a lone surrogate cannot even be stored (Arrow)
        elif sid == tid:
            drop, detail = "same_language", f"src_lang = tgt_lang = {rec['src_lang']}"
        elif src.strip() == tgt.strip():
            drop = "identical_text"
    return {
        "src_text": src,
        "tgt_text": tgt,
        "instruction": ins,
        "src_lang": sid,
        "tgt_lang": tid,
        "bad_code": bad_s or bad_t,
        "drop": drop,
        "detail": detail,
        "line": line,
    }


def normalize_stage2(rec: dict[str, Any], line: int = 0) -> dict[str, Any]:
    """A stage-2 record as a fixed-schema row with a ``drop`` reason ("" = usable so far).

    Row: ``instruction, input, output`` (str; a missing ``input`` is ""), ``src_lang = tgt_lang`` (the id of
    ``lang``), ``bad_code``, ``drop``, ``detail``, ``line``. Precedence: missing_field / bad_field_type,
    unknown_language, empty_instruction, empty_target (empty output), bad_characters (duplicates: :class:`Duplicates`).
    """
    ins, r_ins = _text(rec, "instruction")
    inp, r_inp = _text(rec, "input", required=False)
    out, r_out = _text(rec, "output")
    lid, r_l, bad = _lang(rec, "lang")
    structural = _first(*(r for r in (r_ins, r_inp, r_out, r_l) if r != "unknown_language"))
    drop = _first(
        structural,
        r_l if r_l == "unknown_language" else "",
        "empty_instruction" if not ins.strip() else "",
        "empty_target" if not out.strip() else "",
    )
    detail = "" if drop else _bad_characters({"instruction": ins, "input": inp, "output": out})
    if detail:
        drop, ins, inp, out = "bad_characters", "", "", ""  # a lone surrogate cannot even be stored (Arrow)
    return {
        "instruction": ins,
        "input": inp,
        "output": out,
        "src_lang": lid,
        "tgt_lang": lid,
        "bad_code": bad,
        "drop": drop,
        "detail": detail,
        "line": line,
    }
