"""The AlignX stage-1 objective: next-token prediction + contrastive alignment + language matching.

For a micro-batch of ``B`` translation instructions (one sequence each, ``span_ids`` marking the source tokens with 1
and the target tokens with 2), with ``H^k`` the output of decoder block ``k`` (the align layer) and ``H^N`` the
final-norm output (the input of ``lm_head``)::

    keep(b)  = |{t : span_ids[b, t] = 2}| >= 3  and  |{t : span_ids[b, t] = 1}| >= 1       (B' kept rows)
    L_NTP    = mean over the non-ignored labels of the kept rows of  -log p(label[t + 1] | tokens <= t)   (fp32)
    h_x, h_y = mean of H^k over the source / target tokens                                    ([B', D] each)
    L_CTR    = ctr_scale * mean_b InfoNCE(anchor h_x(b), candidates {h_y(j)}, positive h_y(b), cos / tau)
               (0 when B' <= 1; ``symmetric`` averages the x->y and y->x directions)
    e_x, e_y = mean of H^N over the positions q whose NEXT token (q + 1) is a source / target token
    L_LAM    = mean over all (2B')^2 ordered pairs (i, j) of CE(head([E_i ; E_j]), [lang_i == lang_j]),
               E = [e_x ; e_y], lang = [src_lang ; tgt_lang]
    L        = L_NTP + lambda_ctr * L_CTR + lambda_lam * L_LAM

With the defaults (tau 0.1, ctr_scale 1/2, lambda 0.3 / 0.4, local negatives, self-pairs included) this is the
official AlignX code term by term, including its row filter (``src_tgt_index[:, -4] == 2`` under left padding keeps
exactly the rows with at least 3 marked target tokens). Two departures, both on inputs where the official code
produces NaN or crashes: a row without source tokens is dropped too (the official code divides 0 by 0), and a
micro-batch whose rows are all dropped gives a zero loss that still reaches every parameter (the official code
fails), so that every data-parallel rank runs the same collectives.

The ops come from :mod:`alignx.kernels` (``span_mean_pool``, ``info_nce``, ``lang_match_loss``) with
``backend=objective.kernel_backend``; while a public op is not exported yet, its fp32 reference
(``alignx.kernels.reference.<op>_ref``, same signature without ``backend``) is used, so the formula never changes
with the implementation. Nothing here imports transformers or deepspeed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import ConfigError, ObjectiveConfig

__all__ = [
    "IGNORE_INDEX",
    "SOURCE_SPAN",
    "TARGET_SPAN",
    "AlignXObjective",
    "Candidates",
    "kernel_op",
    "lm_loss_sum",
    "shift_span_ids",
]

IGNORE_INDEX = -100
SOURCE_SPAN = 1
TARGET_SPAN = 2
NUM_SPANS = 2
# Logit elements (B x T x V) handled per chunk of the fp32 cross-entropy: 2^26 fp32 = 256 MiB of temporaries, about
# one 512-token row of a 128k vocabulary.
CE_CHUNK_ELEMENTS = 1 << 26
KINDS = ("alignx", "ntp")
TERMS = ("loss", "ntp", "ctr", "lam", "rows_kept", "rows_dropped")


def kernel_op(name: str) -> Callable[..., Any]:
    """The public ``alignx.kernels.<name>`` op, or its fp32 reference while the op is not exported.

    Either way the returned callable accepts ``backend=`` (ignored by the reference).
    """
    import alignx.kernels as kernels

    op = getattr(kernels, name, None)
    if op is not None:
        return op
    ref = getattr(kernels.reference, f"{name}_ref", None)
    if ref is None:
        raise AttributeError(f"alignx.kernels exports no op {name!r} and has no reference {name}_ref")

    def call_reference(*args: Any, backend: str | None = None, **kwargs: Any) -> Any:
        return ref(*args, **kwargs)

    return call_reference


def shift_span_ids(span_ids: Tensor) -> Tensor:
    """Span ids moved one position to the left: ``out[b, q] = span_ids[b, q + 1]``, ``out[b, T - 1] = 0``.

    Pooling the final-norm states with these ids averages the states that *predict* each span's tokens (position q
    counts iff token q + 1 is in the span), which is how the official language-matching loss reads them.
    """
    out = torch.zeros_like(span_ids)
    out[:, :-1] = span_ids[:, 1:]
    return out


def _ce_sum(logits: Tensor, target: Tensor) -> Tensor:
    """``sum_t [logsumexp(logits[t]) - logits[t, target[t]]]`` over targets != IGNORE_INDEX, in fp32."""
    x = logits.float()
    valid = target != IGNORE_INDEX
    picked = x.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    nll = torch.logsumexp(x, dim=-1) - picked
    # where, not multiply: a non-finite logit at an ignored (padding) position must not leak into the sum.
    return torch.where(valid, nll, torch.zeros_like(nll)).sum()


def lm_loss_sum(logits: Tensor, labels: Tensor, *, chunk_elements: int = CE_CHUNK_ELEMENTS) -> tuple[Tensor, Tensor]:
    """Shifted causal-LM cross-entropy, summed: ``(sum of -log p over the counted tokens, number of tokens)``.

    logits ``[B, T, V]`` (any float dtype), labels ``[B, T]`` with ``IGNORE_INDEX`` for tokens that do not count;
    position t predicts label t + 1. The maths is fp32 on row chunks of at most ``chunk_elements`` logits; for
    half-precision logits each chunk is recomputed in backward instead of keeping its fp32 copy, so the loss costs
    no more than one chunk of fp32 memory on top of the logits themselves.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be [B, T, V] and labels [B, T], got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    b, t, v = logits.shape
    target = labels[:, 1:]
    count = (target != IGNORE_INDEX).sum()
    total = logits.new_zeros((), dtype=torch.float32)
    if t < 2:
        return total + logits.sum().float() * 0.0, count
    recompute = logits.dtype != torch.float32 and logits.requires_grad and torch.is_grad_enabled()
    rows = max(1, chunk_elements // max(1, (t - 1) * v))
    for r0 in range(0, b, rows):
        piece, tgt = logits[r0 : r0 + rows, :-1], target[r0 : r0 + rows]
        total = total + (checkpoint(_ce_sum, piece, tgt, use_reentrant=False) if recompute else _ce_sum(piece, tgt))
    return total, count


class Candidates(NamedTuple):
    """The InfoNCE candidate set of one direction.

    ``embeddings [N, D]``: the candidates; ``positive_index [B']``: the row of each anchor's positive;
    ``num_grad``: only the first ``num_grad`` rows receive gradients (the rest are a detached queue), None = all.
    """

    embeddings: Tensor
    positive_index: Tensor
    num_grad: int | None


class AlignXObjective:
    """``L = L_NTP + lambda_ctr * L_CTR + lambda_lam * L_LAM`` on one micro-batch (see the module docstring).

    ``cfg`` is the ``objective`` config section; ``min_target_tokens`` is the row filter (``data.min_target_tokens``,
    reference 3). ``kind="ntp"`` computes the language-modelling loss alone (stage 2, baselines): no row filter,
    no head, ``ctr = lam = 0``.
    """

    def __init__(self, cfg: ObjectiveConfig, *, min_target_tokens: int = 3) -> None:
        if cfg.kind not in KINDS:
            raise ConfigError(
                f"objective.kind={cfg.kind!r} is not implemented by AlignXObjective (choose from {KINDS})"
            )
        if cfg.negatives != "local":
            raise ConfigError(
                f"objective.negatives={cfg.negatives!r} is not available yet; use 'local' (the micro-batch, reference)"
            )
        if cfg.temperature <= 0:
            raise ConfigError(f"objective.temperature must be > 0, got {cfg.temperature}")
        if min_target_tokens < 1:
            raise ConfigError(f"data.min_target_tokens must be >= 1, got {min_target_tokens}")
        self.cfg = cfg
        self.min_target_tokens = min_target_tokens

    @property
    def uses_head(self) -> bool:
        """Whether this objective needs the language-matching head and the hooked hidden states."""
        return self.cfg.kind == "alignx"

    # ------------------------------------------------------------------------------------------------------------
    # The whole objective

    def __call__(
        self,
        logits: Tensor,
        hidden_align: Tensor | None,
        hidden_final: Tensor | None,
        batch: Mapping[str, Tensor],
        head: nn.Module | None = None,
    ) -> dict[str, Tensor]:
        """All terms of one micro-batch.

        Args:
            logits: ``[B, T, V]`` next-token logits of the language model (any float dtype).
            hidden_align: ``[B, T, D]`` output of decoder block ``align_layer`` (unused for ``kind="ntp"``).
            hidden_final: ``[B, T, D]`` final-norm output, the input of ``lm_head`` (unused for ``kind="ntp"``).
            batch: ``labels [B, T]`` (``-100`` = not counted); for ``kind="alignx"`` also ``span_ids [B, T]``
                (0 other, 1 source, 2 target), ``src_lang [B]``, ``tgt_lang [B]`` (integer language ids).
            head: the language-matching head: ``head(emb [M, D], lang [M], include_self_pairs=, backend=)`` returns
                the mean pair cross-entropy (:class:`alignx.model.LanguageMatchingHead`).

        Returns:
            ``loss`` (the weighted total, what is back-propagated), ``ntp``, ``ctr``, ``lam`` (0-dim fp32, with their
            graphs), ``rows_kept``, ``rows_dropped`` (0-dim int64).
        """
        labels = _need(batch, "labels")
        if labels.shape != logits.shape[:2]:
            raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)}")
        if not self.uses_head:
            return self._ntp_only(logits, labels)
        span_ids = _need(batch, "span_ids")
        src_lang, tgt_lang = _need(batch, "src_lang"), _need(batch, "tgt_lang")
        if span_ids.shape != labels.shape:
            raise ValueError(f"span_ids {tuple(span_ids.shape)} must have the shape of labels {tuple(labels.shape)}")
        if hidden_align is None or hidden_final is None:
            raise ValueError("kind='alignx' needs hidden_align and hidden_final (the hooked hidden states)")
        if head is None:
            raise ValueError("kind='alignx' needs the language-matching head")

        keep = self.keep_rows(span_ids)
        kept = keep.nonzero().squeeze(1)
        n_kept = kept.numel()

        ntp = self.ntp_loss(logits, labels, keep)
        pooled_align = self.pool(hidden_align, span_ids)  # [B, 2, D] fp32
        pooled_final = self.pool(hidden_final, shift_span_ids(span_ids))  # [B, 2, D] fp32
        if n_kept == 0:
            # Every row dropped: a zero that still runs the head, so every rank gathers the same parameters.
            lam = self.language_matching_loss(pooled_final[:, 0], pooled_final[:, 1], src_lang, tgt_lang, head) * 0.0
            ctr = lam.new_zeros(())
        else:
            ctr = self.contrastive_loss(pooled_align[kept, 0], pooled_align[kept, 1])
            lam = self.language_matching_loss(
                pooled_final[kept, 0], pooled_final[kept, 1], src_lang[kept], tgt_lang[kept], head
            )
        loss = ntp + self.cfg.lambda_ctr * ctr + self.cfg.lambda_lam * lam
        return {
            "loss": loss,
            "ntp": ntp,
            "ctr": ctr,
            "lam": lam,
            "rows_kept": torch.tensor(n_kept, device=labels.device),
            "rows_dropped": torch.tensor(labels.shape[0] - n_kept, device=labels.device),
        }

    def _ntp_only(self, logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
        ntp = self.ntp_loss(logits, labels)
        zero = ntp.new_zeros(())
        return {
            "loss": ntp,
            "ntp": ntp,
            "ctr": zero,
            "lam": zero,
            "rows_kept": torch.tensor(labels.shape[0], device=labels.device),
            "rows_dropped": torch.tensor(0, device=labels.device),
        }

    # ------------------------------------------------------------------------------------------------------------
    # The terms

    def keep_rows(self, span_ids: Tensor) -> Tensor:
        """``[B]`` bool: rows with at least ``min_target_tokens`` target tokens and at least one source token.

        Under left padding with the official marks (target tokens up to the second-to-last position), this is the
        official ``src_tgt_index[:, -4] == 2`` for ``min_target_tokens = 3``, independent of the padding side.
        """
        n_tgt = (span_ids == TARGET_SPAN).sum(1)
        n_src = (span_ids == SOURCE_SPAN).sum(1)
        return (n_tgt >= self.min_target_tokens) & (n_src >= 1)

    def ntp_loss(self, logits: Tensor, labels: Tensor, keep: Tensor | None = None) -> Tensor:
        """Token-mean fp32 cross-entropy over the non-ignored labels of the kept rows (all rows if ``keep`` is None).

        Dropped rows are masked out of the labels rather than sliced out of the logits (no copy of the logits); a
        batch without any counted token gives 0, never 0/0.
        """
        if keep is not None:
            labels = labels.masked_fill(~keep.unsqueeze(1), IGNORE_INDEX)
        total, count = lm_loss_sum(logits, labels)
        return total / count.clamp(min=1).float()

    def pool(self, hidden: Tensor, span_ids: Tensor) -> Tensor:
        """``[B, 2, D]`` fp32 means of ``hidden [B, T, D]`` over the source (index 0) and target (index 1) spans."""
        span_mean_pool = kernel_op("span_mean_pool")
        means, _ = span_mean_pool(hidden, span_ids, NUM_SPANS, out_dtype=torch.float32, backend=self.cfg.kernel_backend)
        return means

    def gather_candidates(self, emb: Tensor) -> Candidates:
        """The candidates of the anchors whose positives are the rows of ``emb`` ``[B', D]``.

        The reference uses the local micro-batch: candidates = ``emb``, anchor b's positive = row b, all rows carry
        gradients. This is the seam where cross-rank gathering and a queue of earlier embeddings plug in (the
        formula in :meth:`contrastive_loss` does not change).
        """
        positive = torch.arange(emb.shape[0], device=emb.device)
        return Candidates(emb, positive, None)

    def contrastive_loss(self, h_src: Tensor, h_tgt: Tensor) -> Tensor:
        """``ctr_scale * mean_b InfoNCE`` with cosine / tau, anchors = sources, candidates = targets (``[B', D]`` each).

        ``symmetric`` averages this source->target direction with the target->source one. 0 when ``B' <= 1``
        (a single row has no negative), as in the reference.
        """
        if h_src.shape[0] <= 1:
            return h_src.new_zeros((), dtype=torch.float32)
        loss = self._info_nce(h_src, self.gather_candidates(h_tgt))
        if self.cfg.symmetric:
            loss = 0.5 * (loss + self._info_nce(h_tgt, self.gather_candidates(h_src)))
        return self.cfg.ctr_scale * loss

    def _info_nce(self, anchors: Tensor, cand: Candidates) -> Tensor:
        info_nce = kernel_op("info_nce")
        return info_nce(
            anchors,
            cand.embeddings,
            cand.positive_index,
            self.cfg.temperature,
            num_grad_candidates=cand.num_grad,
            backend=self.cfg.kernel_backend,
        ).float()

    def language_matching_loss(
        self, e_src: Tensor, e_tgt: Tensor, src_lang: Tensor, tgt_lang: Tensor, head: nn.Module
    ) -> Tensor:
        """Mean CE of the head over all ordered pairs of ``E = [e_src ; e_tgt]`` (``[2B', D]``), labels "same language".

        Runs inside ``head``'s own forward, so ZeRO-3 gathers its parameters there.
        """
        emb = torch.cat([e_src, e_tgt], dim=0)
        lang = torch.cat([src_lang, tgt_lang], dim=0)
        loss = head(emb, lang, include_self_pairs=self.cfg.include_self_pairs, backend=self.cfg.kernel_backend)
        return loss.float()


def _need(batch: Mapping[str, Tensor], key: str) -> Tensor:
    value = batch.get(key)
    if value is None:
        raise ValueError(f"the batch has no {key!r} (keys: {sorted(batch)})")
    return value
