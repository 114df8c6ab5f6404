"""fp32 torch references of the hot-path ops, written the obvious way.

They are the test oracle, the benchmark baseline and the ``backend="reference"`` path. They materialise what the
fused paths avoid (the one-hot span mask, the dense B x N logits, the [M, M, 2D] pair tensor, the [N, V] LM-head
logits) and are only meant for small and medium shapes. There is no second copy of these formulas anywhere in the
project.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignx.constants import IGNORE_INDEX

__all__ = [
    "span_mean_pool_ref",
    "info_nce_ref",
    "lang_match_loss_ref",
    "linear_cross_entropy_ref",
    "unpack_cu_seqlens",
]


def unpack_cu_seqlens(packed: torch.Tensor, cu_seqlens: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
    """Packed ``[total, ...]`` rows -> padded ``[num_seqs, max_len, ...]`` (right padding with ``fill``)."""
    bounds = cu_seqlens.tolist()
    lens = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    out = packed.new_full((len(lens), max(lens, default=0), *packed.shape[1:]), fill)
    for i, (a, n) in enumerate(zip(bounds[:-1], lens)):
        out[i, :n] = packed[a : a + n]
    return out


def span_mean_pool_ref(
    hidden: torch.Tensor,
    span_ids: torch.Tensor,
    num_spans: int,
    *,
    cu_seqlens: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``hidden`` over each span: ``means[b, s-1] = mean_{t: span_ids[b, t] == s} hidden[b, t]``.

    hidden ``[B, T, D]`` (or packed ``[total, D]`` with ``cu_seqlens [B + 1]`` and span_ids ``[total]``),
    span_ids ``[B, T]`` in ``0..num_spans`` (0 = in no span) -> means ``[B, S, D]`` (``out_dtype``, default the
    dtype of hidden), counts ``[B, S]`` int64. An empty span gives zeros and count 0.
    """
    if cu_seqlens is not None:
        hidden = unpack_cu_seqlens(hidden, cu_seqlens, 0)
        span_ids = unpack_cu_seqlens(span_ids, cu_seqlens, 0)
    h = hidden.float()
    onehot = F.one_hot(span_ids.long(), num_spans + 1)[..., 1:].float()  # [B, T, S]
    sums = torch.einsum("bts,btd->bsd", onehot, h)
    counts = onehot.sum(1)  # [B, S]
    means = sums / counts.clamp(min=1.0).unsqueeze(-1)
    return means.to(out_dtype or hidden.dtype), counts.long()


def info_nce_ref(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    positive_index: torch.Tensor,
    temperature: float,
    *,
    normalize: bool = True,
    reduction: str = "mean",
    num_grad_candidates: int | None = None,
) -> torch.Tensor:
    """InfoNCE: ``loss_b = logsumexp_n(s[b, n]) - s[b, pos_b]`` with ``s = <a_b, c_n> / temperature``.

    anchors ``[B, D]``, candidates ``[N, D]``, positive_index ``[B]`` (index into candidates). With ``normalize`` both
    sides are L2-normalised first (cosine similarity, ``x / max(||x||, 1e-12)``). Only the first
    ``num_grad_candidates`` candidates receive gradients (the rest are a detached queue). Returns the mean, the sum,
    or the ``[B]`` per-anchor losses (``reduction="none"``), in fp32.
    """
    a = anchors.float()
    c = candidates.float()
    if num_grad_candidates is not None:
        c = torch.cat([c[:num_grad_candidates], c[num_grad_candidates:].detach()])
    if normalize:
        a = F.normalize(a, dim=-1, eps=1e-12)
        c = F.normalize(c, dim=-1, eps=1e-12)
    logits = a @ c.t() / temperature  # [B, N]
    loss = torch.logsumexp(logits, dim=1) - logits.gather(1, positive_index.long().view(-1, 1)).squeeze(1)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def lang_match_loss_ref(
    emb: torch.Tensor,
    lang: torch.Tensor,
    gate_w: torch.Tensor,
    up_w: torch.Tensor,
    down_w: torch.Tensor,
    *,
    include_self_pairs: bool = True,
) -> torch.Tensor:
    """Official AlignX language matching, materialising the ``[M, M, 2D]`` pair tensor as the official code does.

    For every ordered pair (i, j) the input is ``z_ij = [E_i ; E_j]`` and the 2-class logits are
    ``down_w @ (silu(gate_w @ z_ij) * (up_w @ z_ij))``; the label is 1 when ``lang_i == lang_j``. Returns the mean
    cross-entropy over all M^2 pairs (over the M^2 - M pairs with i != j when ``include_self_pairs`` is False).
    emb ``[M, D]``, lang ``[M]``, gate_w/up_w ``[H, 2D]``, down_w ``[2, H]``.
    """
    e = emb.float()
    m = e.shape[0]
    left = e.unsqueeze(1).expand(m, m, -1)  # E_i
    right = e.unsqueeze(0).expand(m, m, -1)  # E_j
    z = torch.cat([left, right], dim=-1)  # [M, M, 2D]
    hidden = F.silu(z @ gate_w.float().t()) * (z @ up_w.float().t())  # [M, M, H]
    logits = hidden @ down_w.float().t()  # [M, M, 2]
    labels = (lang.view(-1, 1) == lang.view(1, -1)).long()  # [M, M]
    loss = F.cross_entropy(logits.reshape(-1, 2), labels.reshape(-1), reduction="none").view(m, m)
    if include_self_pairs:
        return loss.mean()
    off_diag = ~torch.eye(m, dtype=torch.bool, device=loss.device)
    return loss[off_diag].mean()


def linear_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy of an LM head, through the dense fp32 logits.

    hidden ``[N, D]``, weight ``[V, D]``, labels ``[N]`` (already shifted: ``labels[i]`` is the token predicted at
    position ``i``; ``ignore_index`` = not counted). Only the counted rows are read (an ignored row may hold NaN)::

        z[i, v] = logit_scale * <hidden[i], weight[v]>,   z <- softcap * tanh(z / softcap)  (when softcap is set)
        loss_sum = sum_{i : labels[i] != ignore_index} (logsumexp_v z[i, v] - z[i, labels[i]])

    Returns ``(loss_sum, count)``: fp32 0-dim and the int64 0-dim number of counted rows.
    """
    counted = (labels != ignore_index).nonzero().squeeze(1)
    z = logit_scale * (hidden.index_select(0, counted).float() @ weight.float().t())  # [n, V]
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    loss_sum = F.cross_entropy(z, labels.index_select(0, counted).long(), reduction="sum")
    return loss_sum, torch.tensor(counted.numel(), dtype=torch.int64, device=labels.device)
