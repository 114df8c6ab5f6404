"""Held-out perplexity per language (stage 1 must not damage fluency).

Each text is tokenised as in training (the tokenizer's special tokens, e.g. BOS) and scored by teacher forcing:
``NLL = -sum_t log p(x_t | x_<t)`` over every text token after the first position. Reported per language:
``ppl = exp(NLL / tokens)`` and ``bits_per_char = NLL / (ln 2 * characters)`` — the latter does not depend on the
tokenizer, so it compares languages (and models with different tokenizers).

The logits of a 262k vocabulary are large (1 MiB per token in fp32), so batches are sized by a token budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from alignx.constants import IGNORE_INDEX


@torch.no_grad()
def perplexity(
    lm: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_length: int = 256,
    logits_budget_mb: int = 512,
    desc: str = "perplexity",
    progress: bool = True,
) -> dict[str, float]:
    """``ppl``, ``nll_per_token``, ``bits_per_char``, ``tokens``, ``chars`` of ``texts`` under ``lm``."""
    if not texts:
        raise ValueError("no texts to score")
    device = next(lm.parameters()).device
    vocab = lm.get_output_embeddings().weight.shape[0] if lm.get_output_embeddings() is not None else 50_000
    enc = [tokenizer(t, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(enc[i]))
    budget_tokens = max(16, logits_budget_mb * 2**20 // (4 * vocab))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    nll, tokens = 0.0, 0
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and (len(cur) + 1) * len(enc[i]) > budget_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    for idx in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        width = max(len(enc[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):  # right padding: positions start at 0 as in training
            ids[r, : len(enc[i])] = torch.tensor(enc[i])
            mask[r, : len(enc[i])] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = lm(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        nll += loss.item()
        tokens += int((target != IGNORE_INDEX).sum().item())
    if tokens == 0:
        raise ValueError("every text is a single token: nothing to predict")
    chars = sum(len(t) for t in texts)
    return {
        "ppl": math.exp(nll / tokens),
        "nll_per_token": nll / tokens,
        "bits_per_char": nll / (math.log(2) * chars),
        "tokens": tokens,
        "chars": chars,
    }
