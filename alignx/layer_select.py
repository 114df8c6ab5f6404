"""``model.align_layer: auto``: align the middle layer where the base model's translations are already closest.

The reference aligns block ``num_layers // 2``. The middle layer is not always the most aligned one (Gemma-3-270M:
layer 11 of 18 retrieves translations best, not 9; SPEC §4), and the contrastive term is easiest to train where
parallel sentences are already near each other. Before training, :func:`probe_layers` runs the decoder body (no LM
head) on a few held-out stage-1 records, mean-pools each record's source and target spans at every layer exactly as
the objective pools them, centres each language on its own mean over the slice (the evaluation's centring), and
measures source->target top-1 retrieval within each language direction. :func:`pick_layer` takes the best layer in
the middle half ``[ceil(L/4), floor(3L/4)]`` (the first and last blocks are lexical and next-token specific);
ties go to the layer nearest the reference middle.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from .eval.alignment import decoder_body
from .kernels.reference import span_mean_pool_ref
from .objective import SOURCE_SPAN, TARGET_SPAN

__all__ = ["middle_layers", "pick_layer", "probe_layers", "retrieval_by_layer"]


def middle_layers(num_layers: int) -> list[int]:
    """The candidate blocks (1-based): ``ceil(L / 4) .. floor(3 L / 4)``, at least the reference middle."""
    lo, hi = max(1, math.ceil(num_layers / 4)), max(1, (3 * num_layers) // 4)
    return list(range(lo, hi + 1)) or [max(1, num_layers // 2)]


@torch.no_grad()
def probe_layers(lm: torch.nn.Module, batches: Iterable[Mapping[str, Tensor]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pooled source and target states of every layer: ``(src [L + 1, N, D], tgt [L + 1, N, D], src_lang [N],
    tgt_lang [N])`` fp32 on the CPU, over the rows of ``batches`` (collated stage-1 batches: ``input_ids``,
    ``attention_mask``, ``span_ids``, ``src_lang``, ``tgt_lang``). Index 0 = embeddings, ``l`` = block ``l``.

    Rows without a source or target token are skipped. Under ZeRO-3 every rank must call it with the same batches.
    """
    body = decoder_body(lm)
    device = next(lm.parameters()).device
    srcs, tgts, src_langs, tgt_langs = [], [], [], []
    for batch in batches:
        span_ids = batch["span_ids"].to(device)
        mask = batch.get("attention_mask")
        hs = body(
            input_ids=batch["input_ids"].to(device),
            attention_mask=None if mask is None else mask.to(device),
            output_hidden_states=True,
            use_cache=False,
        ).hidden_states
        stacked = torch.stack([h.float() for h in hs])  # [L + 1, B, T, D]
        n_layers, b, t, d = stacked.shape
        means, counts = span_mean_pool_ref(
            stacked.reshape(n_layers * b, t, d), span_ids.repeat(n_layers, 1), 2, out_dtype=torch.float32
        )
        means, counts = means.view(n_layers, b, 2, d), counts.view(n_layers, b, 2)[0]
        ok = (counts[:, SOURCE_SPAN - 1] > 0) & (counts[:, TARGET_SPAN - 1] > 0)
        srcs.append(means[:, ok, 0].cpu())
        tgts.append(means[:, ok, 1].cpu())
        src_langs.append(batch["src_lang"][ok.cpu()].long())
        tgt_langs.append(batch["tgt_lang"][ok.cpu()].long())
    if not srcs:
        raise ValueError("probe_layers got no batch")
    return torch.cat(srcs, 1), torch.cat(tgts, 1), torch.cat(src_langs), torch.cat(tgt_langs)


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


def choose_align_layer(lm: torch.nn.Module, batches: Iterable[Mapping[str, Tensor]], num_layers: int) -> dict[str, Any]:
    """Probe, score and pick: ``{"layer": k, "scores": [L + 1 floats], "candidates": [...], "records": N}``."""
    src, tgt, src_lang, tgt_lang = probe_layers(lm, batches)
    scores = retrieval_by_layer(src, tgt, src_lang, tgt_lang)
    return {
        "layer": pick_layer(scores, num_layers),
        "scores": [round(float(s), 4) for s in scores],
        "candidates": middle_layers(num_layers),
        "records": int(src.shape[1]),
    }
