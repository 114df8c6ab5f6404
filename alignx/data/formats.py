"""Record formats: the plug-ins of the one preparation pipeline (:func:`alignx.data.tokenize.prepare`).

The pipeline reads a JSONL file, validates every record into a fixed-schema row, renders each usable row to text
segments, tokenises them (:class:`alignx.data.segments.SegmentTokenizer`), caches the rows and reports the drops.
What differs between kinds of records is a :class:`RecordFormat`: which fields a record has and how they are
checked (``normalize``), which texts a row is trained on (``render``) and which columns it becomes (``build``).

======== ====================================================== =====================================
name     records                                                defined in
======== ====================================================== =====================================
stage1   translation pairs, rendered with the prompt template   :class:`alignx.data.tokenize.PairsFormat`
stage2   instructions, rendered with the prompt template        :class:`alignx.data.tokenize.InstructionsFormat`
afp      a separately encoded pair + a cross-lingual instruction :mod:`alignx.recipes.afp`
clmap    cross-lingual mapping and monolingual texts            :mod:`alignx.recipes.clmap`
======== ====================================================== =====================================

A new format is one class and one :func:`register_format` line in its own module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from alignx.data.records import DataError

if TYPE_CHECKING:
    from alignx.config import Config
    from alignx.data.prompt import Segment
    from alignx.data.segments import Tokenized

__all__ = [
    "FORMATS",
    "RECORD_COLUMNS",
    "ROW_COLUMNS",
    "STAT_COLUMNS",
    "RecordFormat",
    "get_format",
    "register_format",
]

ROW_COLUMNS = ("input_ids", "labels", "span_ids", "src_lang", "tgt_lang", "length")
"""The columns of every prepared row (a format adds its own ``columns``)."""
STAT_COLUMNS = ("drop", "n_source", "n_target", "target_truncated")
"""Columns of an encoded row that only the report reads (removed from the prepared rows)."""
RECORD_COLUMNS = ("src_lang", "tgt_lang", "bad_code", "drop", "detail", "line")
"""Columns of every normalised row besides the format's ``texts``: language ids (-1 unusable), the unknown language
code, the drop reason ("" = usable), what the reason found, and the 1-based line of the record."""


class RecordFormat(Protocol):
    """How one kind of JSONL record becomes prepared rows.

    Attributes:
        name: the registry name; part of the cache keys.
        title: how the report names the rows (``"stage 1"``, ``"afp"``).
        texts: the string columns of a normalised row (next to :data:`RECORD_COLUMNS`).
        columns: list-valued row columns besides :data:`ROW_COLUMNS` (empty lists on a dropped row).
        reasons: every drop reason (reason -> meaning), the line reasons of :data:`alignx.data.LINE_REASONS`
            included; a reason that is not here is an error.
        deduplicate: drop exact copies of an earlier usable record (same ``texts`` and language ids).
        packs: whether the rows may be packed (``data.packing``).
    """

    name: str
    title: str
    texts: tuple[str, ...]
    columns: tuple[str, ...]
    reasons: Mapping[str, str]
    deduplicate: bool
    packs: bool

    def normalize(self, rec: dict[str, Any], line: int) -> dict[str, Any]:
        """One JSON record as a row of ``texts`` + :data:`RECORD_COLUMNS` (a function of the record only: the
        validated rows are cached by file and format name)."""
        ...

    def render(self, row: dict[str, Any]) -> Sequence[Segment]:
        """The segments of a usable normalised row: first the text the language model trains on (``input_ids``),
        then any further sequence the row carries (AFP's pair)."""
        ...

    def build(self, row: dict[str, Any], tokens: Sequence[Tokenized]) -> dict[str, Any] | str:
        """The row's columns from its tokenised segments (:func:`alignx.data.segments.lm_columns` plus
        ``columns``), or the reason it is dropped."""
        ...


FORMATS: dict[str, Callable[[Config], RecordFormat]] = {}
"""Format name -> ``(cfg) -> RecordFormat`` (the options a format takes come from the config)."""


def register_format(name: str, factory: Callable[[Config], RecordFormat]) -> None:
    """Make ``name`` a record format; ``factory(cfg)`` builds it with the run's options."""
    if name in FORMATS:
        raise ValueError(f"record format {name!r} is already registered")
    FORMATS[name] = factory


def get_format(name: str, cfg: Config) -> RecordFormat:
    """The record format ``name`` with the options of ``cfg``; an unknown name is an error listing the known ones."""
    if name not in FORMATS:
        raise DataError(f"unknown record format {name!r}; registered formats: {', '.join(FORMATS)}")
    return FORMATS[name](cfg)
