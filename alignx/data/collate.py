"""Collation of tokenised rows into padded tensors (the reference pads on the left, to a multiple of 8), or into one
packed row (``data.packing``).

With left padding, position ``T - 1`` is the last real token of every row (the official filter relies on it);
right padding is available for models or kernels that prefer it. The span ids are padded with 0 (no span), the
labels with -100 (ignored by the LM loss), the attention mask with 0.

Packing (:class:`PackedCollator`) concatenates the micro-batch's records into one row of ``total = sum_b len_b``
positions: no padding at all, so the model spends no compute on padding (:func:`batch_tokens` counts both).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch

from alignx.constants import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["Collator", "PackedCollator", "batch_tokens"]


def _checked_rows(
    rows: list[dict[str, Any]] | dict[str, list[Any]], who: str
) -> tuple[list[dict[str, Any]], list[int]]:
    """The rows of a list or of a columnar batch (``dataset[indices]``) and their lengths ``[B]``; an empty batch,
    an empty row or a ``labels`` / ``span_ids`` list of another length than ``input_ids`` is an error."""
    if isinstance(rows, dict):
        keys = list(rows)
        rows = [dict(zip(keys, values)) for values in zip(*rows.values())]
    if not rows:
        raise ValueError(f"{who} got an empty list of rows")
    lengths = []
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        if n == 0:
            raise ValueError(f"row {i} has no tokens")
        for key in ("labels", "span_ids"):
            if key in row and len(row[key]) != n:
                raise ValueError(f"row {i}: len({key})={len(row[key])} != len(input_ids)={n}")
        lengths.append(n)
    return rows, lengths


class Collator:
    """``rows -> {input_ids, attention_mask, labels, span_ids: [B, T], src_lang, tgt_lang: [B]}`` (all int64).

    ``T = ceil(max_b len_b / pad_to_multiple_of) * pad_to_multiple_of``. Row ``b`` occupies positions
    ``[T - len_b, T)`` (left padding) or ``[0, len_b)`` (right padding); elsewhere ``input_ids = pad_token_id``,
    ``attention_mask = 0``, ``labels = -100``, ``span_ids = 0``.

    Args:
        tokenizer: gives ``pad_token_id`` (falls back to ``eos_token_id``), unless ``pad_token_id`` is given.
        padding_side: "left" (reference) or "right".
        pad_to_multiple_of: round ``T`` up to a multiple of this (reference: 8); 1 = no rounding.
        return_position_ids: also return ``position_ids [B, T]`` counting real tokens only (0 on padding), so a
            left-padded row gets the same positions as unpadded. The reference does not pass them (RoPE
            attention depends only on relative positions, so the difference is numerical).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None = None,
        padding_side: Literal["left", "right"] = "left",
        pad_to_multiple_of: int = 8,
        *,
        pad_token_id: int | None = None,
        return_position_ids: bool = False,
    ) -> None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive int, got {pad_to_multiple_of!r}")
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_token_id is None:
            raise ValueError("Collator needs a pad_token_id (the tokenizer has neither a pad nor an eos token)")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of
        self.return_position_ids = return_position_ids

    def __call__(self, rows: list[dict[str, Any]] | dict[str, list[Any]]) -> dict[str, torch.Tensor]:
        """Collate a list of rows, or a columnar batch ``{"input_ids": [[...], ...], ...}`` (``dataset[indices]``)."""
        rows, lengths = _checked_rows(rows, "Collator")
        m = self.pad_to_multiple_of
        T = -(-max(lengths) // m) * m
        B = len(rows)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        span_ids = torch.zeros((B, T), dtype=torch.long)
        position_ids = torch.zeros((B, T), dtype=torch.long)
        for b, (row, n) in enumerate(zip(rows, lengths)):
            sl = slice(T - n, T) if self.padding_side == "left" else slice(0, n)
            input_ids[b, sl] = torch.as_tensor(row["input_ids"], dtype=torch.long)
            attention_mask[b, sl] = 1
            labels[b, sl] = torch.as_tensor(row.get("labels", row["input_ids"]), dtype=torch.long)
            if "span_ids" in row:
                span_ids[b, sl] = torch.as_tensor(row["span_ids"], dtype=torch.long)
            position_ids[b, sl] = torch.arange(n)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "span_ids": span_ids,
            "src_lang": torch.as_tensor([int(r.get("src_lang", -1)) for r in rows], dtype=torch.long),
            "tgt_lang": torch.as_tensor([int(r.get("tgt_lang", -1)) for r in rows], dtype=torch.long),
        }
        if self.return_position_ids:
            batch["position_ids"] = position_ids
        return batch


class PackedCollator:
    """``rows -> {input_ids, labels, span_ids, position_ids: [1, total], cu_seqlens [B + 1], src/tgt_lang [B]}``.

    Record ``b`` occupies positions ``[c_b, c_{b+1})`` of the one row, ``c = cu_seqlens`` (int32, ``c_0 = 0``,
    ``c_B = total``), in the order given. ``position_ids`` restart at 0 at every ``c_b`` (RoPE positions as if the
    record were alone); there is no ``attention_mask``: the model keeps records apart from the position-id restarts
    (block-diagonal causal mask) or from ``cu_seqlens`` (FlashAttention varlen), see :mod:`alignx.model`. The label
    of each record's first token is -100, so no record is predicted from the end of the previous one (a record's
    first token is never a target in the padded layout either). ``span_ids`` are the records' own. Nothing is
    padded, so no pad token is needed.
    """

    def __call__(self, rows: list[dict[str, Any]] | dict[str, list[Any]]) -> dict[str, torch.Tensor]:
        rows, lengths = _checked_rows(rows, "PackedCollator")
        ids, labels, spans, positions = [], [], [], []
        for row, n in zip(rows, lengths):
            lab = torch.as_tensor(row.get("labels", row["input_ids"]), dtype=torch.long).clone()
            lab[0] = IGNORE_INDEX
            ids.append(torch.as_tensor(row["input_ids"], dtype=torch.long))
            labels.append(lab)
            spans.append(
                torch.as_tensor(row["span_ids"], dtype=torch.long)
                if "span_ids" in row
                else torch.zeros(n, dtype=torch.long)
            )
            positions.append(torch.arange(n))
        cu_seqlens = torch.zeros(len(rows) + 1, dtype=torch.int32)
        cu_seqlens[1:] = torch.cumsum(torch.tensor(lengths), 0)
        return {
            "input_ids": torch.cat(ids).unsqueeze(0),
            "labels": torch.cat(labels).unsqueeze(0),
            "span_ids": torch.cat(spans).unsqueeze(0),
            "position_ids": torch.cat(positions).unsqueeze(0),
            "cu_seqlens": cu_seqlens,
            "src_lang": torch.as_tensor([int(r.get("src_lang", -1)) for r in rows], dtype=torch.long),
            "tgt_lang": torch.as_tensor([int(r.get("tgt_lang", -1)) for r in rows], dtype=torch.long),
        }


def batch_tokens(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """``(real tokens, positions processed)`` of a collated batch: ``attention_mask.sum()`` and ``B * T`` for a
    padded batch, ``total`` twice for a packed one. ``1 - tokens / positions`` is the padding fraction."""
    positions = int(batch["input_ids"].numel())
    mask = batch.get("attention_mask")
    return (int(mask.sum()) if mask is not None else positions), positions
