"""JSONL records: strict reading (a malformed line names its file and line) and per-record validation.

Stage-1 record (one translation pair)::

    {"src_text": "Hapo mwanzo kulikuwako Neno.", "tgt_text": "In the beginning was the Word.",
     "src_lang": "sw", "tgt_lang": "en"}

with an optional ``"instruction"`` that replaces ``data.instruction`` for that record. Stage-2 record::

    {"instruction": "...", "input": "...", "output": "...", "lang": "sw"}

where ``input`` may be empty or absent (the no-input prompt variant is then used).

Reading is strict about the *file* (a line that is not a JSON object stops the run with ``file:line``) and lenient
about *records*: a record with a missing or non-string field, an unknown language code or an empty text is kept
in the stream with a ``drop`` reason, so that preprocessing counts it instead of crashing. :func:`normalize_stage1`
and :func:`normalize_stage2` produce rows with a fixed schema (:data:`STAGE1_FEATURES`, :data:`STAGE2_FEATURES`)
that Arrow can store whatever the input looked like.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alignx.languages import lang_id

__all__ = [
    "DROP_REASONS",
    "DataError",
    "STAGE1_FIELDS",
    "STAGE2_FIELDS",
    "iter_jsonl",
    "normalize_stage1",
    "normalize_stage2",
    "read_jsonl",
]

STAGE1_FIELDS = ("src_text", "tgt_text", "src_lang", "tgt_lang")
STAGE2_FIELDS = ("instruction", "output", "lang")  # "input" is optional

DROP_REASONS: dict[str, str] = {
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
}
"""Every reason a record can be dropped, with its meaning (printed in the preprocessing report)."""


class DataError(ValueError):
    """A data problem that must stop the run (malformed file, unusable tokenizer or template)."""


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` for each non-blank line of a JSONL file (1-based line numbers).

    Raises :class:`DataError` naming ``file:line`` for a line that is not valid JSON or not a JSON object, and for
    bytes that are not UTF-8.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            yield lineno, rec


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All records of a JSONL file. A malformed line raises :class:`DataError` with ``file:line``."""
    return [rec for _, rec in iter_jsonl(path)]


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


def normalize_stage1(rec: dict[str, Any], line: int = 0) -> dict[str, Any]:
    """A stage-1 record as a fixed-schema row with a ``drop`` reason ("" = usable so far).

    Row: ``src_text, tgt_text, instruction`` (str; ``instruction`` "" = use ``data.instruction``), ``src_lang,
    tgt_lang`` (int ids, -1 if unusable), ``bad_code`` (the unknown code, if any), ``drop``, ``line``.
    Precedence of reasons: missing_field / bad_field_type, unknown_language, empty_source, empty_target.
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
    return {
        "src_text": src,
        "tgt_text": tgt,
        "instruction": ins,
        "src_lang": sid,
        "tgt_lang": tid,
        "bad_code": bad_s or bad_t,
        "drop": drop,
        "line": line,
    }


def normalize_stage2(rec: dict[str, Any], line: int = 0) -> dict[str, Any]:
    """A stage-2 record as a fixed-schema row with a ``drop`` reason ("" = usable so far).

    Row: ``instruction, input, output`` (str; a missing ``input`` is ""), ``src_lang = tgt_lang`` (the id of
    ``lang``), ``bad_code``, ``drop``, ``line``. Precedence: missing_field / bad_field_type, unknown_language,
    empty_instruction, empty_target (empty output).
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
    return {
        "instruction": ins,
        "input": inp,
        "output": out,
        "src_lang": lid,
        "tgt_lang": lid,
        "bad_code": bad,
        "drop": drop,
        "line": line,
    }
