"""``model.align_layer: auto`` (:mod:`alignx.layer_select`): the planted layer of a tiny model is found.

The model: a tiny Llama whose embeddings are one-hot and whose 8 decoder blocks are replaced (instance ``forward``;
the HF hidden-state recorder still sees the blocks) by identities, except block 5, which adds a large vector shared
by a source token and its translation, and block 6, which removes it again. Only ``hidden_states[5]`` aligns
translations; every other layer holds disjoint one-hot means (chance retrieval). The reference middle is 4.
"""

from __future__ import annotations

import pytest
import torch

from alignx.layer_select import choose_align_layer, middle_layers, pick_layer, retrieval_by_layer
from alignx.testing import tiny_causal_lm

V = H = 64
LAYERS, PLANTED = 8, 5
A0, WORDS = 4, 30  # language A: tokens 4..33; language B: tokens 34..63


def planted_model() -> torch.nn.Module:
    lm = tiny_causal_lm("llama", vocab_size=V, num_layers=LAYERS, hidden=H, seed=0)
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(WORDS, generator=g)
    meaning = torch.randn(WORDS, H, generator=g)
    proj = torch.zeros(V, H)
    proj[A0 : A0 + WORDS] = meaning  # word i of A
    proj[A0 + WORDS + perm] = meaning  # its translation in B
    with torch.no_grad():
        lm.model.embed_tokens.weight.copy_(torch.eye(V, H))
    carried: dict[str, torch.Tensor] = {}

    def block(index: int):
        def forward(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if index == PLANTED:
                carried["delta"] = 5.0 * hidden_states @ proj
                return hidden_states + carried["delta"]
            if index == PLANTED + 1:
                return hidden_states - carried["delta"]
            return hidden_states

        return forward

    for i, layer in enumerate(lm.model.layers, start=1):
        layer.forward = block(i)
    lm.perm = perm  # for the records
    return lm


def batches(lm: torch.nn.Module, n: int = 24, micro: int = 8) -> list[dict[str, torch.Tensor]]:
    """Right-padded stage-1 style rows, half A->B, half B->A: BOS, filler, source span, filler, target span, EOS."""
    g = torch.Generator().manual_seed(2)
    rows = []
    for i in range(n):
        words = torch.randint(0, WORDS, (int(torch.randint(4, 8, (1,), generator=g)),), generator=g)
        a, b = A0 + words, A0 + WORDS + lm.perm[words]
        src, tgt, langs = (a, b, (0, 1)) if i % 2 == 0 else (b, a, (1, 0))
        ids = [1, 3, *src.tolist(), 3, *tgt.tolist(), 2]
        spans = [0, 0] + [1] * len(src) + [0] + [2] * len(tgt) + [0]
        rows.append((ids, spans, langs))
    out = []
    for k in range(0, n, micro):
        chunk = rows[k : k + micro]
        t = max(len(r[0]) for r in chunk)
        ids = torch.zeros(len(chunk), t, dtype=torch.long)
        spans, mask = torch.zeros_like(ids), torch.zeros_like(ids)
        for j, (r_ids, r_spans, _) in enumerate(chunk):
            ids[j, : len(r_ids)], spans[j, : len(r_ids)], mask[j, : len(r_ids)] = (
                torch.tensor(r_ids), torch.tensor(r_spans), 1
            )  # fmt: skip
        out.append({
            "input_ids": ids, "attention_mask": mask, "span_ids": spans,
            "src_lang": torch.tensor([r[2][0] for r in chunk]), "tgt_lang": torch.tensor([r[2][1] for r in chunk]),
        })  # fmt: skip
    return out


def test_auto_picks_the_planted_layer() -> None:
    lm = planted_model()
    result = choose_align_layer(lm, batches(lm), LAYERS)
    scores = result["scores"]
    assert result["layer"] == PLANTED != LAYERS // 2
    assert scores[PLANTED] == 1.0
    assert max(s for k, s in enumerate(scores) if k != PLANTED) < 0.5, scores
    assert result["records"] == 24 and result["candidates"] == [2, 3, 4, 5, 6]


def test_pick_layer_stays_in_the_middle_and_breaks_ties_toward_it() -> None:
    scores = torch.zeros(19)
    scores[1] = 0.9  # an early layer is never chosen
    scores[11] = 0.5
    assert pick_layer(scores, 18) == 11
    assert middle_layers(18) == list(range(5, 14))
    assert pick_layer(torch.zeros(19), 18) == 9  # all equal: the reference middle


def test_retrieval_needs_two_rows_per_direction() -> None:
    src = torch.randn(3, 2, 4)
    with pytest.raises(ValueError, match="align_probe_records"):
        retrieval_by_layer(src, src, torch.tensor([0, 1]), torch.tensor([1, 0]))
