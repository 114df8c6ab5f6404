"""``model.align_layer: auto``: align the middle layer where the base model's translations are already closest.

The reference aligns block ``num_layers // 2``. The middle layer is not always the most aligned one (Gemma-3-270M:
layer 11 of 18 retrieves translations best, not 9; SPEC §4), and the contrastive term is easiest to train where
parallel sentences are already near each other. Before training, :func:`probe_layers` runs the decoder body (no LM
head) on the source and the target sentence of a few held-out stage-1 records, each encoded on its own as the
evaluation encodes sentences (:func:`standalone_batches`), mean-pools every layer, centres each language on its own
mean over the slice (the evaluation's centring), and measures source->target top-1 retrieval within each language
direction. :func:`pick_layer` takes the best layer in the middle half ``[ceil(L/4), floor(3L/4)]`` (the first
and last blocks are lexical and next-token specific); ties go to the layer nearest the reference middle.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from .constants import SOURCE_SPAN, TARGET_SPAN
from .eval.alignment import decoder_body
from .kernels.reference import span_mean_pool_ref

__all__ = [
    "choose_align_layer",
    "middle_layers",
    "pick_layer",
    "probe_layers",
    "retrieval_by_layer",
    "standalone_batches",
]


def middle_layers(num_layers: int) -> list[int]:
    """The candidate blocks (1-based): ``ceil(L / 4) .. floor(3 L / 4)``, at least the reference middle."""
    lo, hi = max(1, math.ceil(num_layers / 4)), max(1, (3 * num_layers) // 4)
    return list(range(lo, hi + 1)) or [max(1, num_layers // 2)]


def standalone_batches(
    rows: Iterable[Mapping[str, Any]], bos_token_id: int | None, batch_size: int = 16
) -> list[dict[str, Tensor]]:
    """Each record's source and target tokens as two separate sequences, as the evaluation encodes sentences.

    Pooled inside the instruction, the target's states attend to the source it translates, so deep layers "retrieve"
    by copying (measured on Gemma-3-270M: in-context pooling picks layer 13 at 0.90 where standalone retrieval is
    best at layer 11). ``rows`` hold ``input_ids``, ``span_ids``, ``src_lang``, ``tgt_lang`` (tokenised stage-1
    records); each sequence is ``[BOS] + span tokens`` (no BOS if the tokenizer has none), right-padded, with
    ``span_ids`` 1 on the pooled tokens (the BOS is excluded; without a BOS the first token, an attention sink, is
    excluded unless it is the only one). Returns batches of ``batch_size`` records (2x sequences): ``input_ids``,
    ``attention_mask``, ``span_ids`` and ``side`` (0 source, 1 target), ``row`` (record index), ``lang``.
    """
    seqs: list[tuple[list[int], int, int, int]] = []  # (ids, side, row, lang)
    for r, rec in enumerate(rows):
        ids, spans = list(rec["input_ids"]), list(rec["span_ids"])
        for side, (mark, lang) in enumerate(((SOURCE_SPAN, rec["src_lang"]), (TARGET_SPAN, rec["tgt_lang"]))):
            toks = [t for t, s in zip(ids, spans) if s == mark]
            if toks:
                seqs.append((([bos_token_id] if bos_token_id is not None else []) + toks, side, r, int(lang)))
    out = []
    for k in range(0, len(seqs), 2 * batch_size):
        chunk = seqs[k : k + 2 * batch_size]
        t = max(len(c[0]) for c in chunk)
        input_ids = torch.zeros(len(chunk), t, dtype=torch.long)
        mask, span_ids = torch.zeros_like(input_ids), torch.zeros_like(input_ids)
        for j, (ids, _, _, _) in enumerate(chunk):
            input_ids[j, : len(ids)] = torch.tensor(ids)
            mask[j, : len(ids)] = 1
            skip = 1 if (bos_token_id is not None or len(ids) > 1) else 0
            span_ids[j, skip : len(ids)] = 1
        out.append(
            {
                "input_ids": input_ids,
                "attention_mask": mask,
                "span_ids": span_ids,
                "side": torch.tensor([c[1] for c in chunk]),
                "row": torch.tensor([c[2] for c in chunk]),
                "lang": torch.tensor([c[3] for c in chunk]),
            }
        )
    return out


@torch.no_grad()
def probe_layers(lm: torch.nn.Module, batches: Iterable[Mapping[str, Tensor]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pooled source and target sentence vectors of every layer: ``(src [L + 1, N, D], tgt [L + 1, N, D],
    src_lang [N], tgt_lang [N])`` fp32 on the CPU for the N records with both sides, from
    :func:`standalone_batches`. Index 0 = embeddings, ``l`` = block ``l`` (HF ``hidden_states``).

    Under ZeRO-3 every rank must call it with the same batches (the forwards gather the weights).
    """
    body = decoder_body(lm)
    device = next(lm.parameters()).device
    vecs: dict[tuple[int, int], Tensor] = {}
    langs: dict[tuple[int, int], int] = {}
    for batch in batches:
        hs = body(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            output_hidden_states=True,
            use_cache=False,
        ).hidden_states
        stacked = torch.stack([h.float() for h in hs])  # [L + 1, B, T, D]
        n_layers, b, t, d = stacked.shape
        span_ids = batch["span_ids"].to(device)
        means, _ = span_mean_pool_ref(
            stacked.reshape(n_layers * b, t, d), span_ids.repeat(n_layers, 1), 1, out_dtype=torch.float32
        )
        means = means.view(n_layers, b, d).cpu()
        for j, (side, row, lang) in enumerate(zip(*(batch[k].tolist() for k in ("side", "row", "lang")))):
            vecs[(row, side)] = means[:, j]
            langs[(row, side)] = lang
    rows = sorted({r for r, _ in vecs if (r, 0) in vecs and (r, 1) in vecs})
    if not rows:
        raise ValueError("probe_layers got no record with both a source and a target")
    src = torch.stack([vecs[(r, 0)] for r in rows], 1)
    tgt = torch.stack([vecs[(r, 1)] for r in rows], 1)
    return src, tgt, torch.tensor([langs[(r, 0)] for r in rows]), torch.tensor([langs[(r, 1)] for r in rows])


def retrieval_by_layer(src: Tensor, tgt: Tensor, src_lang: Tensor, tgt_lang: Tensor) -> Tensor:
    """``[L + 1]`` source->target top-1 retrieval, averaged over the rows of every direction with >= 2 rows.

    Every language is centred on the mean of all its pooled states (sources and targets) in the slice first; each
    anchor's candidates are the targets of its own direction (``chance = 1 / rows of the direction``).
    """
    n_layers = src.shape[0]
    langs = torch.cat([src_lang, tgt_lang])
    acc = torch.zeros(n_layers, dtype=torch.float64)
    counted = 0
    for layer in range(n_layers):
        rows = torch.cat([src[layer], tgt[layer]]).double()
        for lang in langs.unique():
            sel = langs == lang
            rows[sel] -= rows[sel].mean(0)
        x, y = rows[: src.shape[1]], rows[src.shape[1] :]
        hits, total = 0.0, 0
        for s, t in {(int(a), int(b)) for a, b in zip(src_lang, tgt_lang)}:
            sel = (src_lang == s) & (tgt_lang == t)
            if int(sel.sum()) < 2:
                continue
            xs = torch.nn.functional.normalize(x[sel], dim=-1)
            ys = torch.nn.functional.normalize(y[sel], dim=-1)
            hits += float((xs @ ys.T).argmax(1).eq(torch.arange(xs.shape[0])).sum())
            total += xs.shape[0]
        acc[layer] = hits / max(total, 1)
        counted = total
    if counted == 0:
        raise ValueError("no language direction has 2 or more probe records: raise model.align_probe_records")
    return acc


def pick_layer(scores: Tensor, num_layers: int) -> int:
    """The best of :func:`middle_layers` by ``scores [L + 1]`` (index = layer); ties -> nearest ``L // 2``."""
    middle = num_layers // 2
    return max(middle_layers(num_layers), key=lambda k: (float(scores[k]), -abs(k - middle)))


def choose_align_layer(
    lm: torch.nn.Module, rows: Iterable[Mapping[str, Any]], num_layers: int, bos_token_id: int | None
) -> dict[str, Any]:
    """Probe, score and pick over tokenised stage-1 ``rows``: ``{"layer": k, "scores": [L + 1 floats],
    "candidates": [...], "records": N}``."""
    src, tgt, src_lang, tgt_lang = probe_layers(lm, standalone_batches(rows, bos_token_id))
    scores = retrieval_by_layer(src, tgt, src_lang, tgt_lang)
    return {
        "layer": pick_layer(scores, num_layers),
        "scores": [round(float(s), 4) for s in scores],
        "candidates": middle_layers(num_layers),
        "records": int(src.shape[1]),
    }
