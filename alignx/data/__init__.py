"""Training data: JSONL records, prompt rendering with character-offset spans, collation and batch order.

Stage 1 (translation pairs with source/target spans) and stage 2 (instructions)::

    from alignx.data import Collator, micro_batches, prepare_stage1

    prep = prepare_stage1(cfg, tokenizer, train_file="pairs.jsonl")  # prints and returns prep.drops
    collate = Collator(tokenizer, padding_side=cfg.data.padding_side)
    for idx in micro_batches(prep.train["length"], 16, world_size=1, rank=0, seed=42, epoch=0,
                             group_by_length=True):
        batch = collate([prep.train[i] for i in idx])  # input_ids, attention_mask, labels, span_ids: [B, T]

Modules: :mod:`~alignx.data.records` (reading, validation, drop reasons), :mod:`~alignx.data.prompt` (templates),
:mod:`~alignx.data.segments` (spans from offsets, truncation, EOS, labels), :mod:`~alignx.data.formats` (the record
format plug-ins and their registry), :mod:`~alignx.data.tokenize` (the one preparation pipeline, cached with
``datasets``, and the stage-1 / stage-2 formats),
:mod:`~alignx.data.collate` (padded, or packed into one row per micro-batch with ``data.packing``),
:mod:`~alignx.data.sampler` (length-grouped, rank-aware order).
"""

from alignx.data.collate import Collator, PackedCollator, batch_tokens
from alignx.data.formats import FORMATS, RecordFormat, get_format, register_format
from alignx.data.prompt import ALPACA, Segment, Template, instruction_text, load_template
from alignx.data.records import (
    DROP_REASONS,
    LINE_REASONS,
    POISON_REASONS,
    DataError,
    blank_row,
    drop_blank,
    iter_jsonl,
    normalize_stage1,
    normalize_stage2,
    read_jsonl,
    scan_jsonl,
)
from alignx.data.sampler import epoch_order, length_grouped_order, micro_batches, steps_per_epoch
from alignx.data.segments import SegmentTokenizer, Tokenized, labels_for, lm_columns, token_regions, tokenize_segments
from alignx.data.tokenize import (
    Encoder,
    InstructionsFormat,
    PairsFormat,
    Prepared,
    check_bad_lines,
    format_report,
    prepare,
    prepare_stage1,
    prepare_stage2,
    preparer,
    validate_inputs,
)

__all__ = [
    "ALPACA",
    "DROP_REASONS",
    "FORMATS",
    "LINE_REASONS",
    "POISON_REASONS",
    "Collator",
    "DataError",
    "Encoder",
    "InstructionsFormat",
    "PackedCollator",
    "PairsFormat",
    "Prepared",
    "RecordFormat",
    "Segment",
    "SegmentTokenizer",
    "Template",
    "Tokenized",
    "epoch_order",
    "batch_tokens",
    "blank_row",
    "drop_blank",
    "check_bad_lines",
    "format_report",
    "get_format",
    "instruction_text",
    "iter_jsonl",
    "labels_for",
    "length_grouped_order",
    "lm_columns",
    "load_template",
    "micro_batches",
    "normalize_stage1",
    "normalize_stage2",
    "prepare",
    "prepare_stage1",
    "prepare_stage2",
    "preparer",
    "read_jsonl",
    "register_format",
    "scan_jsonl",
    "steps_per_epoch",
    "token_regions",
    "tokenize_segments",
    "validate_inputs",
]
