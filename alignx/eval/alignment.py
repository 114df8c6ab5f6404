"""Representation alignment at every layer: mean-pooled sentence vectors, retrieval and the cosine gap.

A sentence's vector at layer ``l`` is the mean of the layer-``l`` hidden states over its tokens (HF convention:
``hidden_states[0]`` = embeddings, ``hidden_states[l]`` = output of decoder block ``l``, the last one after the
final norm), computed by the decoder body only — the LM head (262k x 640 for Gemma 3) is never run.
Which tokens enter the mean matters (SPEC §5):

- special tokens (BOS, EOS, padding) are excluded;
- a model whose tokenizer adds no BOS (SmolLM2) dumps a huge activation on the first token (an attention sink)
  that dominates the mean and tracks length; ``exclude_first="auto"`` leaves that first token out too. The
  result records whether the first position was excluded.

Before cosine, every language's vectors are centred on that language's mean (estimated on a separate split):
these models carry a few huge dimensions that make all uncentred cosines ≈ 0.99.

Retrieval: with centred, L2-normalised ``X [N, D]`` (language x) and ``Y [N, D]`` (English) where row i of each
is the same verse, ``S = X Yᵀ``; x→en top-1 accuracy = mean_i [argmax_j S_ij = i], en→x = mean_j
[argmax_i S_ij = j] (chance 1/N). The cosine gap = mean_i S_ii − mean_{i≠j} S_ij.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from alignx.kernels.reference import span_mean_pool_ref


@dataclasses.dataclass(frozen=True)
class Pooling:
    """Which tokens the sentence means cover (recorded in every result)."""

    special_tokens_excluded: bool
    first_token_excluded: bool
    reason: str  # why the first position is (not) excluded

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def decoder_body(lm: torch.nn.Module) -> torch.nn.Module:
    """The transformer body of an HF causal LM (embeddings + blocks + final norm, no LM head)."""
    body = getattr(lm, "base_model", None)
    if body is None or body is lm:
        get = getattr(lm, "get_decoder", None)
        body = get() if callable(get) else None
    if body is None or body is lm:
        raise ValueError(f"{type(lm).__name__}: cannot find the decoder body (base_model / get_decoder())")
    return body


def resolve_pooling(tokenizer: Any, exclude_first: str = "auto") -> Pooling:
    """``exclude_first``: ``"auto"`` (exclude the first token when the tokenizer adds no BOS), ``"yes"``, ``"no"``."""
    if exclude_first not in ("auto", "yes", "no"):
        raise ValueError(f"exclude_first must be 'auto', 'yes' or 'no', got {exclude_first!r}")
    probe = tokenizer("a b", add_special_tokens=True, return_special_tokens_mask=True)
    starts_special = bool(probe["special_tokens_mask"][0]) if probe["input_ids"] else False
    if starts_special:
        return Pooling(True, True, "the first token is the BOS special token")
    if exclude_first == "auto":
        return Pooling(True, True, "no BOS: the first text token is an attention sink")
    return Pooling(True, exclude_first == "yes", f"exclude_first={exclude_first}")


@torch.no_grad()
def encode_layers(
    lm: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    pooling: Pooling,
    batch_size: int = 16,
    max_length: int = 256,
    desc: str = "encode",
    progress: bool = True,
) -> torch.Tensor:
    """Mean-pooled hidden states of every layer: ``[L + 1, N, D]`` fp32 (``L`` decoder blocks, index 0 =
    embeddings), row ``n`` = ``texts[n]``.

    Texts are batched by length (right padding, so positions start at 0 as in training) and the order restored.
    A text whose every token is excluded falls back to the mean over all its non-padding tokens.
    """
    if not texts:
        raise ValueError("no texts to encode")
    body = decoder_body(lm)
    device = next(lm.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: torch.Tensor | None = None
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
            idx = order[start : start + batch_size]
            enc = tokenizer(
                [texts[i] for i in idx],
                add_special_tokens=True,
                return_special_tokens_mask=True,
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            attn = enc["attention_mask"].to(device)
            keep = attn.bool() & ~enc["special_tokens_mask"].to(device).bool()
            if pooling.first_token_excluded:
                keep[:, 0] = False
            empty = keep.sum(1) == 0
            keep[empty] = attn.bool()[empty]
            hs = body(
                input_ids=enc["input_ids"].to(device), attention_mask=attn, output_hidden_states=True, use_cache=False
            ).hidden_states
            stacked = torch.stack([h.float() for h in hs])  # [L+1, B, T, D]
            n_layers, b, t, d = stacked.shape
            means, _ = span_mean_pool_ref(
                stacked.reshape(n_layers * b, t, d), keep.long().repeat(n_layers, 1), 1, out_dtype=torch.float32
            )
            means = means.reshape(n_layers, b, d)
            if out is None:
                out = torch.empty(n_layers, len(texts), d)
            out[:, idx] = means.cpu()
    finally:
        tokenizer.padding_side = side
    assert out is not None
    return out


def center(x: torch.Tensor, mean: torch.Tensor | None) -> torch.Tensor:
    """``x - mean`` (broadcast over rows), or ``x`` when ``mean`` is None."""
    return x if mean is None else x - mean


def retrieval_metrics(
    x: torch.Tensor, y: torch.Tensor, *, x_mean: torch.Tensor | None = None, y_mean: torch.Tensor | None = None
) -> dict[str, float]:
    """Top-1 retrieval both ways and the cosine gap of parallel rows ``x [N, D]``, ``y [N, D]`` (row i ↔ row i).

    Args:
        x, y: sentence vectors of language x and of the pivot (English); ``N >= 2``.
        x_mean, y_mean: ``[D]`` per-language means subtracted before cosine (None = no centring).

    Returns:
        ``x2y``, ``y2x`` (top-1 accuracy), ``parallel_cos`` (mean diagonal cosine), ``random_cos`` (mean
        off-diagonal cosine), ``gap`` (their difference), ``chance`` (1/N), ``n``.
    """
    if x.dim() != 2 or x.shape != y.shape:
        raise ValueError(f"x and y must both be [N, D] with the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"retrieval needs at least 2 pairs, got {n}")
    xs = torch.nn.functional.normalize(center(x.double(), x_mean), dim=-1)
    ys = torch.nn.functional.normalize(center(y.double(), y_mean), dim=-1)
    sim = xs @ ys.T  # [N, N]
    target = torch.arange(n)
    diag = sim.diagonal()
    off = (sim.sum() - diag.sum()) / (n * n - n)
    return {
        "x2y": (sim.argmax(1) == target).double().mean().item(),
        "y2x": (sim.argmax(0) == target).double().mean().item(),
        "parallel_cos": diag.mean().item(),
        "random_cos": off.item(),
        "gap": (diag.mean() - off).item(),
        "chance": 1.0 / n,
        "n": n,
    }


def layer_retrieval(
    x_layers: torch.Tensor,
    y_layers: torch.Tensor,
    *,
    x_means: torch.Tensor | None = None,
    y_means: torch.Tensor | None = None,
) -> dict[str, list[float]]:
    """:func:`retrieval_metrics` at every layer: inputs ``[L+1, N, D]`` (means ``[L+1, D]``) -> lists over layers."""
    out: dict[str, list[float]] = {}
    for layer in range(x_layers.shape[0]):
        m = retrieval_metrics(
            x_layers[layer],
            y_layers[layer],
            x_mean=None if x_means is None else x_means[layer],
            y_mean=None if y_means is None else y_means[layer],
        )
        for k, v in m.items():
            if k not in ("chance", "n"):
                out.setdefault(k, []).append(v)
    return out
