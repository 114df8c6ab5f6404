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

Negatives (``objective.negatives``; docs/negatives.md): ``local`` is the reference above, per micro-batch.
``global`` makes the micro-step's batch over all ``W`` data-parallel ranks the unit of every term: the pooled
states of all ranks are gathered with gradients (:mod:`alignx.dist`), each rank's anchors are contrasted with the
targets of all ranks (positives indexed in that global set by rank offset), language matching pairs all ``2N`` pooled
states, and the NTP token mean is over all ranks' tokens; each rank's loss is scaled so that DeepSpeed's average of
the ranks' gradients is exactly the gradient of that global objective (2 ranks give the loss and gradients of one
process holding both micro-batches). ``global+queue`` adds a FIFO of detached targets of earlier steps
(:class:`alignx.dist.NegativeQueue`, filled after each optimizer step) as candidates without gradient.

One code path computes every mode (:meth:`AlignXObjective._alignx_terms`): ``local`` is ``global`` over a group of
this process alone (no collective; each term's local mean is weighted by :func:`alignx.dist.global_share`, exactly
1 there), and the candidate set of each anchor comes from :meth:`AlignXObjective.gather_candidates` (the live rows)
plus the queue when there is one.

Packed batches (``data.packing``): ``batch["cu_seqlens"] [R + 1]`` marks R records concatenated in one row
(``[1, total]`` tensors); the filter, the pooling (``span_mean_pool(..., cu_seqlens=)``), the shift of the
language-matching spans and the NTP masking all work per record, so the terms equal those of the padded batch.

The ops come from :mod:`alignx.kernels` (``span_mean_pool``, ``info_nce``, ``lang_match_loss``) with
``backend=objective.kernel_backend``; each has an fp32 reference (``alignx.kernels.reference.<op>_ref``), so the
formula never changes with the implementation. Nothing here imports transformers or deepspeed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn

from . import kernels
from .constants import IGNORE_INDEX, SOURCE_SPAN, TARGET_SPAN
from .dist import GatherSizes, NegativeQueue, all_gather_rows, gather_sizes, global_share, is_distributed
from .errors import ConfigError
from .similarity import SimilaritySpace, build_space

if TYPE_CHECKING:
    from .config import ObjectiveConfig

__all__ = [
    "IGNORE_INDEX",
    "SOURCE_SPAN",
    "TARGET_SPAN",
    "AlignXObjective",
    "Candidates",
    "HeadInputs",
    "NTPInput",
    "contrastive_diagnostics",
    "kernel_op",
    "lm_loss_sum",
    "record_index",
    "shift_span_ids",
]

NUM_SPANS = 2
# Logit elements (B x T x V) handled per chunk of the fp32 cross-entropy (alignx.kernels.cross_entropy_sum).
CE_CHUNK_ELEMENTS = kernels.CE_CHUNK_ELEMENTS
KINDS = ("alignx", "ntp")
NEGATIVES = ("local", "global", "global+queue")
TERMS = ("loss", "ntp", "ctr", "lam", "rows_kept", "rows_dropped")
DIAG = "diag/"  # prefix of the contrastive term's diagnostics (detached, logged, never back-propagated)
TOP_DIMS = 8  # the "largest few dimensions" whose share of the pooled states' squared norm is logged


@torch.no_grad()
def contrastive_diagnostics(
    raw_anchors: Tensor,
    raw_candidates: Tensor,
    anchors: Tensor,
    candidates: Tensor,
    positive: Tensor,
    temperature: float,
    anchor_langs: Tensor | None = None,
    candidate_langs: Tensor | None = None,
) -> dict[str, Tensor]:
    """Why the contrastive term does or does not learn, from states the forward already has (no extra forward).

    ``raw_*`` are the pooled states ``[B, D]`` / ``[N, D]``, ``anchors``/``candidates`` the same rows in the
    similarity space, ``positive [B]`` the candidate row of each anchor. All over the in-batch candidates only
    (never a queue), so the cost is one ``[B, N]`` matrix. Returns 0-dim fp32 tensors keyed ``diag/...``:
    ``top1`` and ``chance`` (1/N) of the in-space cosine, ``nce_ratio`` (in-batch InfoNCE / ln N: 1 = chance),
    ``pos_sim``/``neg_sim`` and their ``_std`` (in-space cosines: their spread shows a collapse),
    ``raw_cos``/``raw_cos_std`` (raw cosines of all pairs), ``raw_top1``, ``top_dims_share`` (share of the raw
    states' squared norm in their largest ``TOP_DIMS`` dimensions) and, with languages, ``same_lang_top`` (share of
    anchors whose nearest candidate is in the anchor's own language: the language-identity shortcut).
    """
    import torch.nn.functional as F

    b, n = anchors.shape[0], candidates.shape[0]
    sim = F.normalize(anchors.float(), dim=-1) @ F.normalize(candidates.float(), dim=-1).T  # [B, N]
    raw = F.normalize(raw_anchors.float(), dim=-1) @ F.normalize(raw_candidates.float(), dim=-1).T
    rows = torch.arange(b, device=sim.device)
    is_pos = torch.zeros_like(sim, dtype=torch.bool)
    is_pos[rows, positive] = True
    pos, neg = sim[is_pos], sim[~is_pos]
    logits = sim / temperature
    nce = (torch.logsumexp(logits, dim=1) - logits[rows, positive]).mean()
    sq = torch.cat([raw_anchors, raw_candidates]).float().pow(2)
    top = sq.topk(min(TOP_DIMS, sq.shape[1]), dim=1).values.sum(1) / sq.sum(1).clamp(min=1e-30)
    out = {
        "top1": (sim.argmax(1) == positive).float().mean(),
        "chance": torch.tensor(1.0 / n),
        "nce_ratio": nce / math.log(n) if n > 1 else torch.tensor(1.0),
        "pos_sim": pos.mean(),
        "pos_sim_std": pos.std(correction=0),
        "neg_sim": neg.mean() if neg.numel() else torch.tensor(0.0),
        "neg_sim_std": neg.std(correction=0) if neg.numel() else torch.tensor(0.0),
        "raw_cos": raw.mean(),
        "raw_cos_std": raw.std(correction=0),
        "raw_top1": (raw.argmax(1) == positive).float().mean(),
        "top_dims_share": top.mean(),
    }
    if anchor_langs is not None and candidate_langs is not None:
        out["same_lang_top"] = (candidate_langs[sim.argmax(1)] == anchor_langs).float().mean()
    return {DIAG + k: v.detach().float().cpu() for k, v in out.items()}


def kernel_op(name: str) -> Callable[..., Any]:
    """The public op ``alignx.kernels.<name>`` (it accepts ``backend=``)."""
    return getattr(kernels, name)


def shift_span_ids(span_ids: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
    """Span ids moved one position to the left: ``out[b, q] = span_ids[b, q + 1]``, ``out[b, T - 1] = 0``.

    Pooling the final-norm states with these ids averages the states that *predict* each span's tokens (position q
    counts iff token q + 1 is in the span), which is how the official language-matching loss reads them. Packed
    (``cu_seqlens [R + 1]``, one row): the last position of every record is 0 too, never the next record's first id.
    """
    out = torch.zeros_like(span_ids)
    out[:, :-1] = span_ids[:, 1:]
    if cu_seqlens is not None:
        ends = cu_seqlens[1:].long()
        ends = ends[ends > cu_seqlens[:-1].long()] - 1  # last position of each non-empty record
        out.view(-1)[ends] = 0
    return out


def record_index(cu_seqlens: Tensor) -> Tensor:
    """``[total]`` int64: the record of every position of a packed row (``cu_seqlens [R + 1]`` offsets)."""
    cu = cu_seqlens.long()
    return torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu.diff())


class HeadInputs(NamedTuple):
    """What the fused NTP loss reads instead of logits: the LM head's input and the head as a loss function.

    ``hidden [B, T, D]``: the final-norm states at every position (the input of ``lm_head``). ``loss(rows [N, D],
    labels [N]) -> (loss_sum, count)``: the summed cross-entropy of the model's head on those rows, without the
    logits (:class:`alignx.model.FusedLMLoss`: ``alignx.kernels.linear_cross_entropy`` with the head weight, tied or
    not, the model's soft-cap and logit scaling). :func:`lm_loss_sum` and everything built on it take either this or
    logits; ``shape``, ``device`` and ``requires_grad`` read like the logits' for the shape checks.
    """

    hidden: Tensor
    loss: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]

    @property
    def shape(self) -> torch.Size:
        return self.hidden.shape

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def requires_grad(self) -> bool:
        return self.hidden.requires_grad


NTPInput = Tensor | HeadInputs
"""What the NTP term reads: logits ``[B, K, V]`` of the last K positions, or the fused head's :class:`HeadInputs`."""


def shift_labels(labels: Tensor) -> Tensor:
    """``[B, T]``: the label each position predicts (``labels[:, t + 1]``), ``IGNORE_INDEX`` at the last position."""
    target = torch.full_like(labels, IGNORE_INDEX)
    target[:, :-1] = labels[:, 1:]
    return target


def lm_loss_sum(logits: NTPInput, labels: Tensor, *, chunk_elements: int = CE_CHUNK_ELEMENTS) -> tuple[Tensor, Tensor]:
    """Shifted causal-LM cross-entropy, summed: ``(sum of -log p over the counted tokens, number of tokens)``.

    labels ``[B, T]`` with ``IGNORE_INDEX`` for tokens that do not count; position t predicts label t + 1. logits
    ``[B, K, V]`` (any float dtype) are those of the LAST ``K <= T`` positions (HF ``logits_to_keep=K``; ``K = T``:
    all of them): logits ``j`` belong to position ``T - K + j``. With ``K < T`` the caller guarantees that no label
    at positions ``1 .. T - K`` is counted (:meth:`alignx.model.AlignXModel.forward` picks K so). The maths is fp32 on
    chunks of at most ``chunk_elements`` logits and the backward writes one gradient of the logits' shape
    (:func:`alignx.kernels.cross_entropy_sum`): no logits-sized fp32 copy, slice gradient or softmax is ever held.

    Fused (``logits`` a :class:`HeadInputs` with ``hidden [B, T, D]``): the same sum from the final-norm states and
    the head weight in one op that never holds the logits; only the counted positions reach the head.
    """
    if isinstance(logits, HeadInputs):
        hidden = logits.hidden
        if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
            raise ValueError(
                f"hidden must be [B, T, D] and labels [B, T], got {tuple(hidden.shape)} and {tuple(labels.shape)}"
            )
        return logits.loss(hidden.reshape(-1, hidden.shape[-1]), shift_labels(labels).reshape(-1))
    if logits.dim() != 3 or labels.dim() != 2 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"logits must be [B, K, V] and labels [B, T], got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    b, k, _ = logits.shape
    t = labels.shape[1]
    if not 1 <= k <= t:
        raise ValueError(f"logits cover {k} positions; they must be the last 1..{t} positions of labels [B, {t}]")
    target = torch.full_like(labels[:, t - k :], IGNORE_INDEX)
    target[:, :-1] = labels[:, t - k + 1 :]
    count = (target != IGNORE_INDEX).sum()
    return kernels.cross_entropy_sum(logits, target, chunk_elements=chunk_elements), count


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

    kinds: tuple[str, ...] = KINDS  # the objective.kind values a class implements (recipe subclasses set theirs)

    def __init__(self, cfg: ObjectiveConfig, *, min_target_tokens: int = 3) -> None:
        if cfg.kind not in self.kinds:
            raise ConfigError(
                f"objective.kind={cfg.kind!r} is not implemented by {type(self).__name__} (choose from {self.kinds}; "
                "build_objective() picks the class of every kind)"
            )
        if cfg.negatives not in NEGATIVES:
            raise ConfigError(f"objective.negatives={cfg.negatives!r} is not one of {NEGATIVES}")
        if cfg.temperature <= 0:
            raise ConfigError(f"objective.temperature must be > 0, got {cfg.temperature}")
        if min_target_tokens < 1:
            raise ConfigError(f"data.min_target_tokens must be >= 1, got {min_target_tokens}")
        self.cfg = cfg
        self.min_target_tokens = min_target_tokens
        self._init_negatives()

    @property
    def uses_head(self) -> bool:
        """Whether this objective needs the language-matching head and the hooked hidden states."""
        return self.cfg.kind == "alignx"

    # ------------------------------------------------------------------------------------------------------------
    # The whole objective

    def __call__(
        self,
        logits: NTPInput,
        hidden_align: Tensor | None,
        hidden_final: Tensor | None,
        batch: Mapping[str, Tensor],
        head: nn.Module | None = None,
    ) -> dict[str, Tensor]:
        """All terms of one micro-batch.

        Args:
            logits: ``[B, K, V]`` next-token logits of the language model (any float dtype) at the last ``K <= T``
                positions; ``K < T`` only when no label before them is counted (see :func:`lm_loss_sum`); or the
                fused head's :class:`HeadInputs` (``hidden [B, T, D]``, no logits at all).
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
        if labels.dim() != 2 or labels.shape[0] != logits.shape[0] or logits.shape[1] > labels.shape[1]:
            raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)}")
        if not self.uses_head:
            return self._ntp_only(logits, labels, batch.get("cu_seqlens"))
        span_ids = _need(batch, "span_ids")
        _need(batch, "src_lang"), _need(batch, "tgt_lang")  # checked here, read in _alignx_terms
        if span_ids.shape != labels.shape:
            raise ValueError(f"span_ids {tuple(span_ids.shape)} must have the shape of labels {tuple(labels.shape)}")
        if hidden_align is None or hidden_final is None:
            raise ValueError("kind='alignx' needs hidden_align and hidden_final (the hooked hidden states)")
        if head is None:
            raise ValueError("kind='alignx' needs the language-matching head")

        cu_seqlens = batch.get("cu_seqlens")  # packed: records cu_seqlens[i]:cu_seqlens[i + 1] of the one row
        self.diagnostics = {}
        keep = self.keep_rows(span_ids, cu_seqlens)
        return self._alignx_terms(logits, labels, hidden_align, hidden_final, batch, keep, head)

    def _ntp_only(self, logits: NTPInput, labels: Tensor, cu_seqlens: Tensor | None = None) -> dict[str, Tensor]:
        ntp = self.ntp_loss(logits, labels)
        zero = ntp.new_zeros(())
        n_rows = labels.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        return self._terms(ntp, zero, zero, n_rows, n_rows)

    def _terms(self, ntp: Tensor, ctr: Tensor, lam: Tensor, n_kept: int, n_rows: int) -> dict[str, Tensor]:
        """The result dict of :meth:`__call__`: the weighted total (``ctr = lam = 0`` adds nothing), the counts and
        the contrastive diagnostics (``diag/...``, :func:`contrastive_diagnostics`).

        While a running similarity space warms up, ``ctr`` is reported but weighted 0 (its graph kept, so every rank
        runs the same backward)."""
        weight = self.cfg.lambda_ctr if self.space.trusted else 0.0
        loss = ntp + weight * ctr + self.cfg.lambda_lam * lam
        device = ntp.device
        diag = dict(self.diagnostics)
        if diag:
            diag[DIAG + "trained"] = torch.tensor(1.0 if self.space.trusted else 0.0)
        return diag | {
            "loss": loss,
            "ntp": ntp,
            "ctr": ctr,
            "lam": lam,
            "rows_kept": torch.tensor(n_kept, device=device),
            "rows_dropped": torch.tensor(n_rows - n_kept, device=device),
        }

    # ------------------------------------------------------------------------------------------------------------
    # The terms

    def keep_rows(self, span_ids: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
        """``[B]`` bool: rows with at least ``min_target_tokens`` target tokens and at least one source token.

        Under left padding with the official marks (target tokens up to the second-to-last position), this is the
        official ``src_tgt_index[:, -4] == 2`` for ``min_target_tokens = 3``, independent of the padding side.
        Packed (``cu_seqlens [R + 1]``, ``span_ids [1, total]``): ``[R]``, one entry per record.
        """
        if cu_seqlens is None:
            n_tgt = (span_ids == TARGET_SPAN).sum(1)
            n_src = (span_ids == SOURCE_SPAN).sum(1)
        else:
            rec, flat = record_index(cu_seqlens), span_ids.reshape(-1)
            n_tgt = torch.zeros(cu_seqlens.numel() - 1, dtype=torch.long, device=flat.device)
            n_src = torch.zeros_like(n_tgt).index_add_(0, rec, (flat == SOURCE_SPAN).long())
            n_tgt.index_add_(0, rec, (flat == TARGET_SPAN).long())
        return (n_tgt >= self.min_target_tokens) & (n_src >= 1)

    @staticmethod
    def token_mask(keep: Tensor, labels: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
        """``[B, T]`` bool: the positions of the kept rows (packed: of the kept records) in ``labels``' layout."""
        if cu_seqlens is None:
            return keep.unsqueeze(1).expand_as(labels)
        return keep[record_index(cu_seqlens)].view_as(labels)

    def ntp_loss(
        self, logits: NTPInput, labels: Tensor, keep: Tensor | None = None, cu_seqlens: Tensor | None = None
    ) -> Tensor:
        """Token-mean fp32 cross-entropy over the non-ignored labels of the kept rows (all rows if ``keep`` is None).

        Dropped rows are masked out of the labels rather than sliced out of the logits (no copy of the logits); a
        batch without any counted token gives 0, never 0/0. Packed rows carry -100 on each record's first token (the
        collator's job), so no record is predicted from the one before it.
        """
        total, count = lm_loss_sum(logits, self.masked_labels(labels, keep, cu_seqlens))
        return total / count.clamp(min=1).float()

    def masked_labels(self, labels: Tensor, keep: Tensor | None, cu_seqlens: Tensor | None = None) -> Tensor:
        """``labels [B, T]`` with the positions of dropped rows (``keep [B]`` False) set to ``-100``."""
        if keep is None:
            return labels
        return labels.masked_fill(~self.token_mask(keep, labels, cu_seqlens), IGNORE_INDEX)

    def pool(self, hidden: Tensor, span_ids: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
        """``[B, 2, D]`` fp32 means of ``hidden [B, T, D]`` over the source (index 0) and target (index 1) spans.

        Packed: ``hidden [1, total, D]``, ``span_ids [1, total]`` and ``cu_seqlens [R + 1]`` give ``[R, 2, D]``,
        pooled on the packed layout in one read (``span_mean_pool(..., cu_seqlens=...)``).
        """
        span_mean_pool = kernel_op("span_mean_pool")
        if cu_seqlens is not None:
            hidden, span_ids = hidden.reshape(-1, hidden.shape[-1]), span_ids.reshape(-1)
        means, _ = span_mean_pool(
            hidden,
            span_ids,
            NUM_SPANS,
            cu_seqlens=cu_seqlens,
            out_dtype=torch.float32,
            backend=self.cfg.kernel_backend,
        )
        return means

    def gather_candidates(self, emb: Tensor) -> Candidates:
        """The candidates of the anchors whose positives are the rows of ``emb`` ``[N, D]`` (in the similarity space).

        ``emb`` is the live set: this micro-batch's rows (``negatives='local'``, the reference) or every rank's, in
        rank order (the global modes); anchor b's positive is row b, all rows carry gradients. This is the seam where
        more negatives plug in (the formula in :meth:`_global_contrastive` does not change); the queue of earlier
        steps (``global+queue``) is added after it, on the raw rows, so that one step's statistics map them all.
        """
        positive = torch.arange(emb.shape[0], device=emb.device)
        return Candidates(emb, positive, None)

    def contrastive_loss(
        self, h_src: Tensor, h_tgt: Tensor, src_lang: Tensor | None = None, tgt_lang: Tensor | None = None
    ) -> Tensor:
        """``ctr_scale * mean_b InfoNCE`` with cosine / tau, anchors = sources, candidates = targets (``[B', D]`` each),
        over this micro-batch alone (no collective): :meth:`_global_contrastive` on a group of one.

        The cosine is taken in ``objective.similarity``'s space (:mod:`alignx.similarity`; the reference
        ``cosine`` = the raw states; ``center`` subtracts the mean of ``[h_src; h_tgt]`` with its gradient; the
        running spaces use the statistics of earlier steps, per language with ``src_lang``/``tgt_lang [B']``).
        ``symmetric`` averages this source->target direction with the target->source one. 0 when ``B' <= 1`` (a
        single row has no negative), as in the reference.
        """
        self._stage(h_src, h_tgt, src_lang, tgt_lang)
        langs = None if src_lang is None or tgt_lang is None else torch.stack([src_lang, tgt_lang], 1)
        sizes = gather_sizes([h_src.shape[0]], device=h_src.device, local_only=True)
        return self._global_contrastive(h_src, h_tgt, h_src, h_tgt, langs, sizes, h_src.dtype)

    def _stage(self, h_src: Tensor, h_tgt: Tensor, src_lang: Tensor | None, tgt_lang: Tensor | None) -> None:
        """Stage this training micro-batch's kept pooled states for the running statistics (no-op in eval)."""
        if not (self.space.running and torch.is_grad_enabled()):
            return
        if src_lang is None or tgt_lang is None:
            src_lang = tgt_lang = torch.full((h_src.shape[0],), -1, dtype=torch.long, device=h_src.device)
        self.space.stage(torch.cat([h_src, h_tgt]), torch.cat([src_lang, tgt_lang]), self._micro)
        self._micro += 1

    def _info_nce(self, anchors: Tensor, cand: Candidates, reduction: str = "mean") -> Tensor:
        info_nce = kernel_op("info_nce")
        return info_nce(
            anchors,
            cand.embeddings,
            cand.positive_index,
            self.cfg.temperature,
            reduction=reduction,
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

    # ------------------------------------------------------------------------------------------------------------
    # Negatives across ranks and steps (objective.negatives = global | global+queue)

    def _init_negatives(self) -> None:
        """The data-parallel group and the queues of the global modes (nothing for ``local`` or plain NTP)."""
        self.group: Any = None  # the data-parallel group; None = the default group
        self.queue: NegativeQueue | None = None  # detached targets of earlier steps (x -> y candidates)
        self.source_queue: NegativeQueue | None = None  # detached sources (y -> x candidates, symmetric)
        self.last_candidates = 0  # candidates per anchor in the last forward (logged by the trainer)
        cfg = self.cfg
        if cfg.center not in ("none", "batch"):
            raise ConfigError(f"objective.center must be 'none' or 'batch', got {cfg.center!r}")
        self.space: SimilaritySpace = build_space(cfg)
        self.diagnostics: dict[str, Tensor] = {}  # diag/... of the last forward
        self._micro = 0  # training micro-batches staged in this optimizer step
        if cfg.center == "batch" and cfg.negatives == "global+queue":
            raise ConfigError(
                "objective.center='batch' centres on the current batch, which queued negatives of earlier steps do not "
                "share: use negatives='local' or 'global' with it"
            )
        if cfg.queue_size < 0:
            raise ConfigError(f"objective.queue_size must be >= 0, got {cfg.queue_size}")
        if cfg.negatives == "local" or not self.uses_head:
            return
        if not is_distributed():
            raise ConfigError(
                f"objective.negatives={cfg.negatives!r} gathers over the data-parallel ranks: start the process group "
                "first (alignx.engine.init_distributed; one process is a group of 1), or use negatives='local'"
            )
        if cfg.negatives == "global+queue":
            if cfg.queue_size < 1:
                raise ConfigError("objective.negatives='global+queue' needs objective.queue_size >= 1")
            self.queue = NegativeQueue(cfg.queue_size, name="targets")
            if cfg.symmetric:
                self.source_queue = NegativeQueue(cfg.queue_size, name="sources")

    def _sizes(self, values: list[int], device: torch.device) -> GatherSizes:
        """The micro-step's counts over the candidates' group: this process alone (``local``) or every rank."""
        local = self.cfg.negatives == "local"
        if not (local or is_distributed()):
            raise RuntimeError(f"objective.negatives={self.cfg.negatives!r} needs the process group it was built in")
        return gather_sizes(values, device=device, group=self.group, local_only=local)

    @property
    def queues(self) -> dict[str, NegativeQueue]:
        """The negatives queues by name (empty unless ``negatives='global+queue'``)."""
        return {q.name: q for q in (self.queue, self.source_queue) if q is not None}

    def _alignx_terms(
        self,
        logits: NTPInput,
        labels: Tensor,
        hidden_align: Tensor,
        hidden_final: Tensor,
        batch: Mapping[str, Tensor],
        keep: Tensor,
        head: nn.Module,
    ) -> dict[str, Tensor]:
        """All terms of an AlignX micro-batch, with the micro-step's batch over all ranks as the unit (module docstring,
        :mod:`alignx.dist`); ``negatives='local'`` is the same computation over a group of this process alone.

        With ``W`` ranks, ``N = sum_r N_r`` kept rows and ``K`` counted tokens over all ranks, rank r returns::

            ntp_r = (W / K) * (sum of its token losses)          -> mean_r ntp_r = the global token mean
            ctr_r = (W / N) * (sum over its anchors of InfoNCE)  -> mean_r ctr_r = the global anchor mean
            lam_r = lam over all (2N)^2 pairs of the gathered states (the same value on every rank)

        so DeepSpeed's average of the ranks' gradients (with the summed backward of the gather) is the gradient of
        the global objective, and the trainer's average of the logged terms is its value. The code path does not
        depend on this rank's row count: every rank makes the same collectives, forward and backward.
        """
        span_ids, src_lang, tgt_lang = batch["span_ids"], batch["src_lang"], batch["tgt_lang"]
        cu_seqlens = batch.get("cu_seqlens")
        kept = keep.nonzero().squeeze(1)
        n_kept = kept.numel()
        ntp_sum, n_tokens = lm_loss_sum(logits, self.masked_labels(labels, keep, cu_seqlens))
        pooled_align = self.pool(hidden_align, span_ids, cu_seqlens)  # [B, 2, D] fp32
        pooled_final = self.pool(hidden_final, shift_span_ids(span_ids, cu_seqlens), cu_seqlens)  # [B, 2, D] fp32

        sizes = self._sizes([n_kept, int(n_tokens)], logits.device)
        ntp = ntp_sum / n_tokens.clamp(min=1).float() * global_share(sizes, column=1)
        # One gathered tensor for all four pooled states: a single collective with gradient, so every rank's backward
        # makes exactly one (the same) collective whatever its row count.
        local = torch.cat([pooled_align[kept], pooled_final[kept]], dim=1).flatten(1)  # [N_r, 4D]: x, y, e_x, e_y
        gathered = all_gather_rows(local, sizes, group=self.group)  # [N, 4D], rows in rank order
        langs = all_gather_rows(torch.stack([src_lang[kept], tgt_lang[kept]], 1), sizes, group=self.group)  # [N, 2]
        x_all, y_all, ex_all, ey_all = gathered.split(pooled_align.shape[-1], dim=1)
        # Every rank back-propagates through the gather (its backward is a collective), also with 0 local rows.
        anchor = gathered.sum() * 0.0

        h_src, h_tgt = pooled_align[kept, 0], pooled_align[kept, 1]
        self._stage(h_src, h_tgt, src_lang[kept], tgt_lang[kept])
        ctr = self._global_contrastive(h_src, h_tgt, x_all, y_all, langs, sizes, hidden_align.dtype)
        if sizes.total == 0:
            # No kept row on any rank: a zero that still runs the head (same module sequence on every rank).
            lam = self.language_matching_loss(pooled_final[:, 0], pooled_final[:, 1], src_lang, tgt_lang, head) * 0.0
        else:
            lam = self.language_matching_loss(ex_all, ey_all, langs[:, 0], langs[:, 1], head)
        ctr = ctr + anchor
        return self._terms(ntp, ctr, lam, n_kept, keep.numel())

    def _global_contrastive(
        self,
        h_src: Tensor,
        h_tgt: Tensor,
        x_all: Tensor,
        y_all: Tensor,
        langs: Tensor | None,
        sizes: GatherSizes,
        train_dtype: torch.dtype,
    ) -> Tensor:
        """``ctr_scale * (W / N) * sum over local anchors of InfoNCE`` against ``[gathered; queued]`` candidates: the
        contrastive term of every ``objective.negatives`` mode.

        ``h_src, h_tgt [N_r, D]`` local kept rows; ``x_all, y_all [N, D]`` gathered (this rank's rows at
        ``sizes.offset``); ``langs [N, 2]`` their (source, target) languages. Anchor b's positive is candidate
        ``offset + b``; the first ``N`` candidates (gathered, through :meth:`gather_candidates`) get gradients, the
        queued ones none. With a queue the InfoNCE runs in the training dtype (the queue's), fp32 accumulation.
        Training forwards (grad enabled) stage the gathered rows for :meth:`end_step`. 0 when there is no anchor or
        fewer than 2 candidates (reference). Each direction's anchor mean is weighted by :func:`global_share`
        (exactly 1 on a group of one), so ``negatives='local'`` is the reference's ``ctr_scale * mean``.
        """
        n_total, n_local = sizes.total, h_src.shape[0]
        space, both = self.space, torch.cat([x_all, y_all])  # ``center`` subtracts the gathered batch's mean
        src_all = tgt_all = src_local = tgt_local = None  # no languages: one statistic for every row
        if langs is not None:
            src_all, tgt_all = langs.unbind(1)
            src_local, tgt_local = (
                src_all[sizes.offset : sizes.offset + n_local],
                tgt_all[sizes.offset : sizes.offset + n_local],
            )
        directions = [(h_src, src_local, y_all, self.queue, tgt_all)]
        if self.cfg.symmetric:
            directions.append((h_tgt, tgt_local, x_all, self.source_queue, src_all))
        n_queued = self.queue.size if self.queue is not None else 0
        if self.cfg.negatives != "local":  # logged by the trainer for the global modes
            self.last_candidates = n_total + n_queued
        positive = sizes.offset + torch.arange(n_local, device=h_src.device)
        share = global_share(sizes)
        total = h_src.new_zeros((), dtype=torch.float32)
        for i, (anchors, anchor_langs, live, queue, live_langs) in enumerate(directions):
            if n_total >= 1 and n_total + n_queued > 1:
                z_anchors = space(anchors, anchor_langs, both)
                cand = self._candidates(live, live_langs, queue, both, positive, train_dtype)
                if queue is not None:
                    z_anchors = z_anchors.to(train_dtype)
                if i == 0 and n_local > 0:
                    live_z = cand.embeddings[:n_total]
                    self.diagnostics = contrastive_diagnostics(
                        anchors, live, z_anchors, live_z, positive, self.cfg.temperature, anchor_langs, live_langs
                    )
                if n_local > 0:
                    total = total + self._info_nce(z_anchors, cand) * share
                else:  # no anchor here: a zero with the candidates' graph, as on the other ranks
                    total = total + self._info_nce(z_anchors, cand, reduction="sum")
            if queue is not None and torch.is_grad_enabled():
                queue.stage(live.detach(), live_langs)
        return self.cfg.ctr_scale * (total / len(directions))

    def _candidates(
        self,
        live: Tensor,
        live_langs: Tensor | None,
        queue: NegativeQueue | None,
        both: Tensor,
        positive: Tensor,
        train_dtype: torch.dtype,
    ) -> Candidates:
        """One direction's candidates: the live rows ``[N, D]`` (all ranks') mapped into the similarity space through
        :meth:`gather_candidates`, then the queue's rows of earlier steps (no gradient) if there is a queue.
        ``positive [N_r]``: the candidate of each local anchor."""
        if queue is None:
            cand = self.gather_candidates(self.space(live, live_langs, both))
            if positive.numel() != live.shape[0]:  # the anchors are this rank's rows of the gathered set
                cand = cand._replace(positive_index=cand.positive_index[positive])
            return cand
        # The queue holds raw rows: the whole [live; queued] set is mapped with this step's statistics (a no-op view
        # for the reference cosine). The queued rows get no gradient from the kernel, so with ``center`` the batch
        # mean gets none through them either.
        n_total = live.shape[0]
        queue.ensure(live.shape[1], train_dtype, live.device, live_rows=n_total)
        raw = queue.candidates(live)
        cand_langs = torch.cat([live_langs, queue.slot_langs()])
        return Candidates(self.space(raw, cand_langs, both).to(train_dtype), positive, n_total)

    def end_step(self, step: int = -1) -> int:
        """After an optimizer step (every rank): append the rows staged by its forwards to the queues and to the
        similarity space's running statistics; returns the rows added to the queues."""
        self._micro = 0
        if self.uses_head:
            self.space.end_step(self.group)
        return sum(q.commit(step) for q in self.queues.values())

    def similarity_state(self) -> dict[str, Any] | None:
        """The running statistics of the similarity space for a checkpoint (None for a space without them)."""
        return self.space.state_dict() if self.uses_head else None

    def load_similarity_state(self, state: Mapping[str, Any] | None) -> None:
        """Restore :meth:`similarity_state` exactly (an error if the checkpoint and this run disagree)."""
        if self.uses_head:
            self.space.load_state_dict(state)

    def negatives_state(self) -> dict[str, Any] | None:
        """The queues' state for a checkpoint (None without a queue); identical on every rank."""
        queues = self.queues
        return {name: q.state_dict() for name, q in queues.items()} if queues else None

    def load_negatives_state(self, state: Mapping[str, Any] | None, device: torch.device | str | None = None) -> None:
        """Restore :meth:`negatives_state` exactly; a queue missing from ``state`` (or a state without a queue in
        this run) is an error, never a silent empty queue."""
        queues = self.queues
        names = set(state or {})
        if names != set(queues):
            raise ValueError(
                f"the checkpoint holds negatives queues {sorted(names)}, this run uses {sorted(queues)} "
                f"(objective.negatives={self.cfg.negatives!r}, symmetric={self.cfg.symmetric})"
            )
        for name, q in queues.items():
            q.load_state_dict(state[name], device)


def _need(batch: Mapping[str, Tensor], key: str) -> Tensor:
    value = batch.get(key)
    if value is None:
        raise ValueError(f"the batch has no {key!r} (keys: {sorted(batch)})")
    return value
