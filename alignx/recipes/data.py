"""What the recipes' data preparations share: strict reading, tokenisation with character-offset regions, counted
drops, the held-out split and the preprocessing report.

A recipe describes its record format with a ``normalize(record) -> (row, drop reason)`` function and its
tokenisation with an ``encode(rows, tok) -> list[(row, drop reason)]`` function; :func:`prepare_records` does
the rest and returns an :class:`alignx.data.Prepared` like :func:`alignx.data.prepare_stage1`, so the trainer,
the collator and the sampler see the usual rows (``input_ids``, ``labels``, ``span_ids``, ``src_lang``,
``tgt_lang``, ``length`` plus the recipe's own columns).

Tokenisation follows :mod:`alignx.data.tokenize` exactly: the whole rendered text is tokenised once with the
tokenizer's special tokens (BOS where it adds one), special-token strings inside the data are plain text, the
sequence is cut at ``data.cutoff_len`` and EOS is appended iff the last token is not EOS and there is room; the
region of each token (0 prompt, 1 source, 2 target) comes from :func:`alignx.data.token_regions` (strict majority
of its visible characters), never from the token count of a prefix.

Recipe records are small (a verse, a UI string), so rows are tokenised in memory at every start (about 10^4
records per second on one core) rather than cached with ``datasets``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from alignx.constants import IGNORE_INDEX
from alignx.constants import PROMPT_SPAN as PROMPT
from alignx.constants import SOURCE_SPAN as SOURCE
from alignx.constants import TARGET_SPAN as TARGET
from alignx.data import DataError, Encoder, Prepared, iter_jsonl, token_regions

if TYPE_CHECKING:
    from alignx.config import Config

__all__ = [
    "Segment",
    "SegmentTokenizer",
    "Tokenized",
    "format_report",
    "labels_for",
    "prepare_records",
    "tokenize_segments",
]


@dataclass(frozen=True)
class Segment:
    """A text to tokenise and the character ranges ``[start, end)`` of its source and target parts."""

    text: str
    source: tuple[int, int] = (0, 0)
    target: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class Tokenized:
    """One tokenised :class:`Segment`.

    ``ids`` (truncated at ``cutoff_len``, EOS appended when there is room), ``regions`` (per id: 0 prompt / special,
    1 source, 2 target), ``full`` (tokens per region before truncation), ``eos_added``.
    """

    ids: list[int]
    regions: np.ndarray
    full: tuple[int, int, int]
    eos_added: bool

    def count(self, region: int) -> int:
        """Tokens of ``region`` that survived truncation."""
        return int((self.regions == region).sum())


class SegmentTokenizer:
    """Tokenises :class:`Segment` s the way :class:`alignx.data.Encoder` does (same backend, same layout)."""

    def __init__(self, tokenizer: Any, cutoff_len: int) -> None:
        self.encoder = Encoder(tokenizer, stage=2, cutoff_len=cutoff_len)
        self.cutoff_len = cutoff_len
        self.eos_id = self.encoder.eos_id

    def __call__(self, segments: Sequence[Segment]) -> list[Tokenized]:
        encodings = self.encoder.backend.encode_batch([s.text for s in segments], add_special_tokens=True)
        out = []
        for seg, enc in zip(segments, encodings):
            region = token_regions(seg.text, seg.source, seg.target, enc.offsets, enc.special_tokens_mask)
            full = (int((region == PROMPT).sum()), int((region == SOURCE).sum()), int((region == TARGET).sum()))
            ids = list(enc.ids[: self.cutoff_len])
            region = region[: self.cutoff_len]
            eos_added = bool(ids) and ids[-1] != self.eos_id and len(ids) < self.cutoff_len
            if eos_added:
                ids.append(self.eos_id)
                region = np.append(region, PROMPT).astype(np.int8)
            out.append(Tokenized(ids, np.asarray(region, dtype=np.int8), full, eos_added))
        return out


def tokenize_segments(tokenizer: Any, segments: Sequence[Segment], cutoff_len: int) -> list[Tokenized]:
    """Tokenise ``segments`` (see :class:`Tokenized`); a convenience for tests and one-off use."""
    return SegmentTokenizer(tokenizer, cutoff_len)(segments)


def labels_for(tok: Tokenized, mode: str) -> list[int]:
    """``"all"``: every token; ``"response"``: target tokens and an appended EOS, ``-100`` elsewhere."""
    if mode == "all":
        return list(tok.ids)
    if mode != "response":
        raise ValueError(f"labels mode must be 'all' or 'response', got {mode!r}")
    keep = tok.regions == TARGET
    if tok.eos_added:
        keep[-1] = True
    return np.where(keep, np.asarray(tok.ids), IGNORE_INDEX).tolist()


# ----------------------------------------------------------------------------------------------------------------
# Preparation


Normalize = Callable[[dict[str, Any]], tuple[dict[str, Any], str]]
Encode = Callable[[list[dict[str, Any]], SegmentTokenizer], list[tuple[dict[str, Any], str]]]


def _note(drops: Counter, examples: dict[str, list[int]], reason: str, line: int) -> None:
    drops[reason] += 1
    if len(examples.setdefault(reason, [])) < 5:
        examples[reason].append(line)


def _encode_file(
    path: Path,
    normalize: Normalize,
    encode: Encode,
    tok: SegmentTokenizer,
    reasons: dict[str, str],
    batch_size: int = 512,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, int], dict[str, Any]]:
    """Kept trainer rows, drops per reason (every reason listed, zeros included) and statistics of one file."""
    from tqdm.auto import tqdm

    drops: Counter = Counter()
    examples: dict[str, list[int]] = {}
    read: list[tuple[int, dict[str, Any]]] = []
    n_records = 0
    for line, rec in iter_jsonl(path):
        n_records += 1
        row, drop = normalize(rec)
        if drop:
            _note(drops, examples, drop, line)
        else:
            read.append((line, row))
    kept: list[dict[str, Any]] = []
    for i in tqdm(range(0, len(read), batch_size), desc=f"tokenising {path.name}", disable=not progress, leave=False):
        chunk = read[i : i + batch_size]
        for (line, _), (row, drop) in zip(chunk, encode([r for _, r in chunk], tok)):
            if drop:
                _note(drops, examples, drop, line)
            else:
                kept.append(row)
    undocumented = sorted(r for r in drops if r not in reasons)
    if undocumented:
        raise ValueError(f"drop reasons {undocumented} are not documented in the recipe's reasons")
    lengths = np.asarray([r["length"] for r in kept], dtype=np.int64)
    stats = {
        "file": str(path),
        "records": n_records,
        "kept": len(kept),
        "dropped": n_records - len(kept),
        "tokens": int(lengths.sum()),
        "mean_length": float(lengths.mean()) if len(lengths) else 0.0,
        "max_length": int(lengths.max()) if len(lengths) else 0,
        "drop_examples": examples,
    }
    return kept, {reason: int(drops.get(reason, 0)) for reason in reasons}, stats


def format_report(name: str, drops: dict[str, int], stats: dict[str, Any], reasons: dict[str, str]) -> str:
    """Kept / dropped per reason (with example line numbers) and lengths, as :func:`alignx.data.format_report`."""
    lines = [
        f"[data] {name}: {stats['records']} records in {stats['file']}, kept {stats['kept']}, dropped "
        f"{stats['dropped']}; mean length {stats['mean_length']:.1f} tokens (max {stats['max_length']})"
    ]
    for reason, count in drops.items():
        if count:
            where = ", ".join(f"line {n}" for n in stats["drop_examples"].get(reason, []))
            lines.append(f"[data]   dropped {count:>7} {reason:<20} {reasons[reason]} (e.g. {where})")
    return "\n".join(lines)


def prepare_records(
    cfg: Config,
    tokenizer: Any,
    *,
    name: str,
    normalize: Normalize,
    encode: Encode,
    reasons: dict[str, str],
    train_file: str | Path,
    eval_file: str | Path | None = None,
    verbose: bool = True,
) -> Prepared:
    """Read, validate and tokenise a recipe's JSONL files into an :class:`alignx.data.Prepared`.

    ``normalize`` checks one record (a drop reason, or "" to keep it); ``encode`` tokenises a list of normalised
    rows and returns, per row, the trainer row (with ``length``) or a drop reason. ``reasons`` documents every drop
    reason (reason -> meaning). Without ``eval_file``, ``data.eval_size`` rows are split off the training rows
    with ``train.seed`` (0 = no evaluation set), as the shared pipeline does.

    Raises:
        DataError: a malformed file (naming ``file:line``), or no usable record.
    """
    from datasets import Dataset

    if cfg.data.packing:
        raise DataError(f"the {name} recipe does not pack records; set data.packing=false")
    show = verbose
    tok = SegmentTokenizer(tokenizer, cfg.data.cutoff_len)
    rows, drops, stats = _encode_file(Path(train_file), normalize, encode, tok, reasons, progress=show)
    if show:
        print(format_report(f"{name} train", drops, stats, reasons), flush=True)
    if not rows:
        raise DataError(f"{train_file}: no usable {name} record ({format_report('train', drops, stats, reasons)})")
    train = Dataset.from_list(rows)
    evald = None
    if eval_file is not None:
        eval_rows, eval_drops, eval_stats = _encode_file(
            Path(eval_file), normalize, encode, tok, reasons, progress=show
        )
        stats["eval_drops"], stats["eval"] = eval_drops, eval_stats
        if show:
            print(format_report(f"{name} eval", eval_drops, eval_stats, reasons), flush=True)
        evald = Dataset.from_list(eval_rows) if eval_rows else None
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
