"""``model.align_layer: auto`` (:mod:`alignx.layer_select`): the planted layer of a tiny model is found.

Source and target are encoded as separate sentences. The model: a tiny Llama whose embeddings are one-hot and whose
8 decoder blocks are replaced (instance ``forward``;
the HF hidden-state recorder still sees the blocks) by identities, except block 5, which adds a large vector shared
by a source token and its translation, and block 6, which removes it again. Only ``hidden_states[5]`` aligns
translations; every other layer holds disjoint one-hot means (chance retrieval). The reference middle is 4.
"""

from __future__ import annotations

import pytest
import torch

from alignx.layer_select import choose_align_layer, middle_layers, pick_layer, retrieval_by_layer, standalone_batches
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


def records(lm: torch.nn.Module, n: int = 24) -> list[dict]:
    """Tokenised stage-1 style records, half A->B, half B->A: BOS, filler, source span, filler, target span, EOS."""
    g = torch.Generator().manual_seed(2)
    rows = []
    for i in range(n):
        words = torch.randint(0, WORDS, (int(torch.randint(4, 8, (1,), generator=g)),), generator=g)
        a, b = A0 + words, A0 + WORDS + lm.perm[words]
        src, tgt, (sl, tl) = (a, b, (0, 1)) if i % 2 == 0 else (b, a, (1, 0))
        ids = [1, 3, *src.tolist(), 3, *tgt.tolist(), 2]
        spans = [0, 0] + [1] * len(src) + [0] + [2] * len(tgt) + [0]
        rows.append({"input_ids": ids, "span_ids": spans, "src_lang": sl, "tgt_lang": tl})
    return rows


def test_auto_picks_the_planted_layer() -> None:
    lm = planted_model()
    result = choose_align_layer(lm, records(lm), LAYERS, bos_token_id=1)
    scores = result["scores"]
    assert result["layer"] == PLANTED != LAYERS // 2
    assert scores[PLANTED] == 1.0
    assert max(s for k, s in enumerate(scores) if k != PLANTED) < 0.5, scores
    assert result["records"] == 24 and result["candidates"] == [2, 3, 4, 5, 6]


def test_sentences_are_encoded_on_their_own() -> None:
    """The probe never shows a target its source: each side is its own [BOS] + span sequence, BOS not pooled."""
    rows = [{"input_ids": [1, 9, 10, 11, 12, 2], "span_ids": [0, 1, 1, 0, 2, 0], "src_lang": 0, "tgt_lang": 1}]
    (batch,) = standalone_batches(rows, bos_token_id=1)
    assert batch["input_ids"].tolist() == [[1, 9, 10], [1, 12, 0]]
    assert batch["span_ids"].tolist() == [[0, 1, 1], [0, 1, 0]] and batch["side"].tolist() == [0, 1]
    (no_bos,) = standalone_batches(rows, bos_token_id=None)
    assert no_bos["input_ids"].tolist() == [[9, 10], [12, 0]]
    assert no_bos["span_ids"].tolist() == [[0, 1], [1, 0]]  # first token excluded unless it is the only one


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
