"""Span mean-pooling: every span of every sequence in one read of the hidden states.

``means[b, s - 1] = (1 / n_bs) * sum_{t : span_ids[b, t] == s} hidden[b, t]``
with ``n_bs = |{t : span_ids[b, t] == s}|`` for ``s = 1..S``; id 0 (and, when not validated, any id outside
``1..S``) belongs to no span. An empty span gives a zero vector and count 0. Backward:
``d hidden[b, t] = d means[b, s - 1] / n_bs`` where ``span_ids[b, t] == s``, and exactly zero everywhere else.

Four layers, top to bottom: Triton kernels (``_span_pool_fwd_kernel``, ``_span_pool_bwd_kernel``) -> launchers
(``span_pool_fwd``, ``span_pool_bwd``) -> ``SpanMeanPoolFunction`` -> the public ``span_mean_pool``. The torch path
(``span_pool_fwd_torch``, ``span_pool_bwd_torch``) is memory-bounded and is what runs on CPU in training; the fp32
oracle is :func:`alignx.kernels.reference.span_mean_pool_ref`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (
    FLOAT_DTYPES,
    AOTSpec,
    check_float,
    check_int,
    check_ndim,
    check_same_device,
    next_power_of_2,
    resolve_backend,
    upcast_in_kernel,
)
from .reference import span_mean_pool_ref

__all__ = [
    "MAX_TRITON_SPANS",
    "SpanMeanPoolFunction",
    "aot_specs",
    "span_mean_pool",
    "span_pool_bwd",
    "span_pool_bwd_torch",
    "span_pool_fwd",
    "span_pool_fwd_torch",
]

# The forward keeps one fp32 accumulator row per span ([S_PAD, BLOCK_D] in registers); beyond this many spans the
# accumulator no longer fits a program's registers at a useful BLOCK_D. Use backend="torch" for more spans.
MAX_TRITON_SPANS = 64

# Bytes of the fp32 staging buffer of the torch path (fp16/bf16 span rows are upcast into it chunk by chunk): large
# enough that the per-chunk op overhead is amortised, small enough to stay a bounded, cache-friendly workspace.
_TORCH_CHUNK_BYTES = 8 << 20


# ----------------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _round_bf16_rtne(x):
    # fp32 -> fp32 holding the nearest-even bf16 value. Only for the interpreter, whose fp32 -> bf16 cast truncates
    # (a GPU rounds to nearest even); the truncating cast of the result is then exact.
    b_bits = x.to(tl.uint32, bitcast=True)
    b_bits = (b_bits + 0x7FFF + ((b_bits >> 16) & 1)) & 0xFFFF0000
    return b_bits.to(tl.float32, bitcast=True)


@triton.jit
def _span_pool_fwd_kernel(
    h,  # [B, T, D] (strides stride_hb, stride_ht, 1) or packed [N, D] (stride_ht, 1)
    ids,  # [B * T] or [N], contiguous
    cu,  # [B + 1] sequence starts when IS_PACKED (any pointer otherwise, unused)
    means,  # [B, S, D], contiguous
    counts,  # [B, S] int64, contiguous
    T,
    D,
    S,
    stride_hb,
    stride_ht,
    IS_PACKED: tl.constexpr,
    S_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # One program per (sequence, D-block): the programs partition hidden, and each walks its sequence's rows once,
    # so every element of a span row is loaded exactly once for all S spans together; rows in no span (prompt,
    # padding) are masked out of the load and never read.
    #
    # All spans at once as a one-hot GEMM: acc[S_PAD, BD] += onehot[S_PAD, BT] @ h[BT, BD]. The one-hot entries are
    # exactly 0/1, so each product is exact and the sum is an fp32 accumulation of the input values; the cost does
    # not depend on S (masked sums would cost one select+add pass over the tile per span) and runs on tensor cores
    # (mma), leaving the load path as the only bottleneck of this memory-bound op. S_PAD >= 16 is tl.dot's minimum.
    i_b = tl.program_id(0)
    i_d = tl.program_id(1)
    if IS_PACKED:
        bos = tl.load(cu + i_b).to(tl.int64)
        eos = tl.load(cu + i_b + 1).to(tl.int64)
    else:
        bos = i_b.to(tl.int64) * T
        eos = bos + T
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    m_d = o_d < D
    o_s = tl.arange(0, S_PAD) + 1  # [S_PAD] span ids 1..S_PAD
    p_h0 = h + i_b.to(tl.int64) * stride_hb  # stride_hb is 0 for packed input

    b_acc = tl.zeros([S_PAD, BLOCK_D], dtype=tl.float32)  # [S_PAD, BD]
    b_cnt = tl.zeros([S_PAD], dtype=tl.int32)  # [S_PAD]
    for t0 in range(bos, eos, BLOCK_T):
        o_r = t0 + tl.arange(0, BLOCK_T).to(tl.int64)  # [BT] flat row of the sequence's tokens
        m_r = o_r < eos
        if IS_PACKED:
            o_hr = o_r
        else:
            o_hr = o_r - bos
        b_id = tl.load(ids + o_r, mask=m_r, other=0)  # [BT]
        m_in = (b_id > 0) & (b_id <= S)  # [BT] rows in a span: the only rows read (padding may hold NaN)
        p_h = p_h0 + o_hr[:, None] * stride_ht + o_d[None, :]
        b_h = tl.load(p_h, mask=m_in[:, None] & m_d[None, :], other=0.0)  # [BT, BD]
        if UPCAST:
            b_h = b_h.to(tl.float32)
        b_oh = b_id[None, :] == o_s[:, None]  # [S_PAD, BT]
        b_acc = tl.dot(b_oh.to(b_h.dtype), b_h, b_acc, input_precision="ieee")
        b_cnt += tl.sum(b_oh.to(tl.int32), axis=1)

    m_s = o_s <= S
    b_mean = b_acc / tl.maximum(b_cnt, 1).to(tl.float32)[:, None]  # [S_PAD, BD]; empty span -> 0 / 1 = 0
    o_row = i_b.to(tl.int64) * S + (o_s - 1)  # [S_PAD] row of means / counts
    p_m = means + o_row[:, None] * D + o_d[None, :]
    if UPCAST and means.dtype.element_ty == tl.bfloat16:
        b_mean = _round_bf16_rtne(b_mean)
    tl.store(p_m, b_mean.to(means.dtype.element_ty), mask=m_s[:, None] & m_d[None, :])
    if i_d == 0:
        tl.store(counts + o_row, b_cnt.to(tl.int64), mask=m_s)


@triton.jit
def _span_pool_bwd_kernel(
    dmeans,  # [B, S, D], contiguous
    ids,  # [N] flat token rows (N = B * T, or the packed length), contiguous
    cu,  # [B + 1] when IS_PACKED (any pointer otherwise, unused)
    counts,  # [B, S] int64
    dh,  # [N, D], contiguous
    N,
    T,
    D,
    S,
    B,
    N_SEARCH,
    IS_PACKED: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # A gather, not a reduction: every (row-block, D-block) tile of dh is written by exactly one program, span
    # rows with dmeans[b, s] / n_bs and all other rows with explicit zeros. Maths in fp32, one rounding at the store.
    i_t = tl.program_id(0)
    i_d = tl.program_id(1)
    o_r = i_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT] flat rows
    m_r = o_r < N
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    m_d = o_d < D
    b_id = tl.load(ids + o_r, mask=m_r, other=0).to(tl.int64)  # [BT]
    if IS_PACKED:
        # sequence of each row: the largest b with cu[b] <= row (empty sequences are skipped by construction);
        # N_SEARCH = ceil(log2(B)) halvings of [0, B - 1], all loads hit the (B + 1)-entry cu_seqlens in L1.
        b_lo = tl.zeros([BLOCK_T], dtype=tl.int32)
        b_hi = tl.zeros([BLOCK_T], dtype=tl.int32) + (B - 1)
        for _ in range(N_SEARCH):
            b_mid = (b_lo + b_hi + 1) // 2
            b_go = tl.load(cu + b_mid).to(tl.int64) <= o_r
            b_lo = tl.where(b_go, b_mid, b_lo)
            b_hi = tl.where(b_go, b_hi, b_mid - 1)
        b_seq = b_lo.to(tl.int64)
    else:
        b_seq = o_r // T
    m_in = m_r & (b_id > 0) & (b_id <= S)  # [BT] rows inside a span
    o_g = tl.where(m_in, b_seq * S + b_id - 1, 0)  # [BT] row of dmeans / counts
    b_cnt = tl.load(counts + o_g, mask=m_in, other=1)  # [BT]
    b_inv = 1.0 / tl.maximum(b_cnt, 1).to(tl.float32)
    p_g = dmeans + o_g[:, None] * D + o_d[None, :]
    b_g = tl.load(p_g, mask=m_in[:, None] & m_d[None, :], other=0.0).to(tl.float32)  # [BT, BD]
    b_dh = b_g * b_inv[:, None]  # [BT, BD], zeros outside spans
    if UPCAST and dh.dtype.element_ty == tl.bfloat16:
        b_dh = _round_bf16_rtne(b_dh)
    p_dh = dh + o_r[:, None] * D + o_d[None, :]
    tl.store(p_dh, b_dh.to(dh.dtype.element_ty), mask=m_r[:, None] & m_d[None, :])


# ----------------------------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpanPoolConfig:
    """Block sizes of both kernels for one (D, dtype, S)."""

    s_pad: int
    fwd_block_t: int
    fwd_block_d: int
    fwd_num_warps: int
    fwd_num_stages: int
    bwd_block_t: int
    bwd_block_d: int
    bwd_num_warps: int
    bwd_num_stages: int


def _config(D: int, dtype: torch.dtype, num_spans: int = 2) -> SpanPoolConfig:
    """Block sizes for hidden width ``D`` of ``dtype`` and ``num_spans`` spans (power-of-two blocks).

    Forward: a [BLOCK_T, BLOCK_D] hidden tile per loop step (64 x 128 bf16 = 16 KiB, 32 x 128 fp32 = 16 KiB), staged
    in shared memory for the mma, and an fp32 accumulator of S_PAD x BLOCK_D (16 x 128 = 16 registers per thread at
    4 warps); BLOCK_D shrinks as S_PAD grows so the accumulator stays <= 32 registers per thread. At D = 4096 bf16
    it compiles for sm_90a to 80-96 registers, ~19 KiB of shared memory and no spills, so 5-6 programs (~90 KiB of tiles
    in flight) fit one SM; a micro-batch of 16 sequences gives 16 x 32 = 512 programs.
    Backward: [16, 256] tiles of dh, one write each, and gathers of dmeans rows that stay in L1/L2.
    """
    s_pad = max(16, next_power_of_2(num_spans))
    d_pow = max(16, next_power_of_2(D))
    fwd_block_d = min(128, d_pow, max(16, 4096 // s_pad))
    fwd_block_t = 32 if dtype == torch.float32 else 64
    return SpanPoolConfig(
        s_pad=s_pad,
        fwd_block_t=fwd_block_t,
        fwd_block_d=fwd_block_d,
        fwd_num_warps=4,
        fwd_num_stages=3,
        bwd_block_t=16,
        bwd_block_d=min(256, d_pow),
        bwd_num_warps=4,
        bwd_num_stages=1,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------------


def _layout(hidden: torch.Tensor, cu_seqlens: torch.Tensor | None) -> tuple[int, int, int]:
    """(number of sequences B, padded length T or 0, number of flat token rows N)."""
    if cu_seqlens is None:
        B, T = hidden.shape[0], hidden.shape[1]
        return B, T, B * T
    return cu_seqlens.numel() - 1, 0, hidden.shape[0]


def span_pool_fwd(
    hidden: torch.Tensor,
    span_ids: torch.Tensor,
    num_spans: int,
    cu_seqlens: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel (no input checks). Returns ``means [B, S, D]`` and ``counts [B, S]`` int64."""
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    span_ids = span_ids.contiguous()
    B, T, _ = _layout(hidden, cu_seqlens)
    D, S = hidden.shape[-1], num_spans
    out_dtype = out_dtype or hidden.dtype
    means = torch.empty((B, S, D), device=hidden.device, dtype=out_dtype)
    counts = torch.empty((B, S), device=hidden.device, dtype=torch.int64)
    if B == 0 or S == 0:
        return means, counts
    if D == 0:  # no D-block program would exist to write the counts
        return span_pool_fwd_torch(hidden, span_ids, S, cu_seqlens, out_dtype)[:2]
    cfg = _config(D, hidden.dtype, S)
    packed = cu_seqlens is not None
    grid = (B, triton.cdiv(D, cfg.fwd_block_d))
    _span_pool_fwd_kernel[grid](
        hidden,
        span_ids,
        cu_seqlens if packed else span_ids,
        means,
        counts,
        T,
        D,
        S,
        0 if packed else hidden.stride(0),
        hidden.stride(-2),
        IS_PACKED=packed,
        S_PAD=cfg.s_pad,
        BLOCK_T=cfg.fwd_block_t,
        BLOCK_D=cfg.fwd_block_d,
        UPCAST=upcast_in_kernel(),
        num_warps=cfg.fwd_num_warps,
        num_stages=cfg.fwd_num_stages,
    )
    return means, counts


def span_pool_bwd(
    grad_means: torch.Tensor,
    span_ids: torch.Tensor,
    counts: torch.Tensor,
    hidden_shape: torch.Size,
    hidden_dtype: torch.dtype,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the backward kernel: a fresh ``grad_hidden`` of ``hidden_shape``, every element written by the kernel."""
    grad_means = grad_means.contiguous()
    span_ids = span_ids.contiguous()
    B, S, D = grad_means.shape
    packed = cu_seqlens is not None
    N = hidden_shape[0] if packed else hidden_shape[0] * hidden_shape[1]
    T = 0 if packed else hidden_shape[1]
    grad_hidden = torch.empty(hidden_shape, device=grad_means.device, dtype=hidden_dtype)
    if N == 0 or D == 0:
        return grad_hidden
    cfg = _config(D, hidden_dtype, S)
    grid = (triton.cdiv(N, cfg.bwd_block_t), triton.cdiv(D, cfg.bwd_block_d))
    _span_pool_bwd_kernel[grid](
        grad_means,
        span_ids,
        cu_seqlens if packed else span_ids,
        counts,
        grad_hidden,
        N,
        T,
        D,
        S,
        B,
        max(B - 1, 0).bit_length(),
        IS_PACKED=packed,
        BLOCK_T=cfg.bwd_block_t,
        BLOCK_D=cfg.bwd_block_d,
        UPCAST=upcast_in_kernel(),
        num_warps=cfg.bwd_num_warps,
        num_stages=cfg.bwd_num_stages,
    )
    return grad_hidden


# ----------------------------------------------------------------------------------------------------------------------
# Torch path (CPU training, and the fallback): memory-bounded, no [B, T, D] temporaries
# ----------------------------------------------------------------------------------------------------------------------


def _span_rows(span_ids: torch.Tensor, num_spans: int, B: int, T: int, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """Accumulator row of every flat token row: ``b * S + s - 1`` inside span ``s`` of sequence ``b``, else the spare
    row ``B * S`` (ids outside ``1..S`` included). A lookup in a ``[B, S + 2]`` table, sync-free (the sequence of a
    packed row comes from ``searchsorted`` on ``cu_seqlens``)."""
    S = num_spans
    lut = torch.full((B, S + 2), B * S, device=span_ids.device, dtype=torch.int64)  # [B, S + 2]
    lut[:, 1 : S + 1] = torch.arange(B * S, device=span_ids.device).view(B, S)
    ids = span_ids.reshape(-1).clamp(0, S + 1).long()  # [N]; out-of-range ids -> column 0 or S + 1 (spare row)
    if cu_seqlens is None:
        return torch.gather(lut, 1, ids.view(B, T)).view(-1)
    rows = torch.arange(ids.numel(), device=ids.device)
    seq = torch.searchsorted(cu_seqlens[1:].long(), rows, right=True)  # [N]
    return lut.view(-1)[seq * (S + 2) + ids]


def _row_blocks(hidden: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """``hidden`` as ``(first flat row, [rows, D] view)`` blocks, without copying a non-contiguous tensor."""
    if hidden.dim() == 2:
        return [(0, hidden)]
    D = hidden.shape[-1]
    try:
        return [(0, hidden.view(-1, D))]
    except RuntimeError:  # e.g. a [:, 1:] slice: one view per sequence
        T = hidden.shape[1]
        return [(b * T, hidden[b]) for b in range(hidden.shape[0])]


def span_pool_fwd_torch(
    hidden: torch.Tensor,
    span_ids: torch.Tensor,
    num_spans: int,
    cu_seqlens: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch forward, memory-bounded: the extra memory is ``O(B * S * D + chunk)``, never ``O(B * T * D)``.

    On CPU only the span rows are touched: they are ordered by accumulator row (a stable argsort of the per-row
    target, ints only) and summed per span by ``F.embedding_bag(mode="sum")``, a fused gather-and-sum. fp32 rows are
    read in place; fp16/bf16 rows are gathered and upcast ``_TORCH_CHUNK_BYTES`` at a time into one reused fp32
    buffer, so every sum is accumulated in fp32. Elsewhere (CUDA, or a hidden that cannot be viewed as rows)
    ``index_add_`` adds every row into an fp32 ``[B * S + 1, D]`` accumulator whose last row collects the rows in no
    span (sync-free).

    Returns ``means [B, S, D]``, ``counts [B, S]`` int64 and the per-row accumulator index (what backward needs).
    """
    B, T, N = _layout(hidden, cu_seqlens)
    D, S = hidden.shape[-1], num_spans
    tgt = _span_rows(span_ids, S, B, T, cu_seqlens)  # [N]
    on_cpu = hidden.device.type == "cpu"
    if on_cpu:
        counts = torch.bincount(tgt, minlength=B * S + 1)  # [B * S + 1]
    else:  # bincount sizes its output from the data on CUDA (a sync)
        counts = torch.zeros(B * S + 1, device=hidden.device, dtype=torch.int64)
        counts.index_add_(0, tgt, torch.ones_like(tgt))
    blocks = _row_blocks(hidden)
    if on_cpu and len(blocks) == 1 and D > 0:
        sums = _span_sums_cpu(blocks[0][1], tgt, counts, B * S)
    else:
        sums = _span_sums_index_add(blocks, tgt, B * S, D)
    counts = counts[: B * S]
    means = sums.div_(counts.clamp(min=1).unsqueeze(1).to(torch.float32))
    return means.view(B, S, D).to(out_dtype or hidden.dtype), counts.view(B, S), tgt


def _span_sums_cpu(flat: torch.Tensor, tgt: torch.Tensor, counts: torch.Tensor, R: int) -> torch.Tensor:
    """fp32 ``[R, D]`` sums of the rows of ``flat [N, D]`` with ``tgt < R``, each span's rows summed in row order."""
    D = flat.shape[1]
    n_in = flat.shape[0] - int(counts[R])  # rows in a span (host read: free on CPU)
    if n_in == 0:
        return torch.zeros(R, D, dtype=torch.float32)
    order = torch.argsort(tgt, stable=True)[:n_in]  # [n_in] span rows grouped by accumulator row
    if flat.dtype == torch.float32:
        offsets = counts[:R].cumsum(0) - counts[:R]  # [R] first position of each span in `order`
        return F.embedding_bag(order, flat, offsets, mode="sum")
    acc = torch.zeros(R, D, dtype=torch.float32)
    tgt_sorted = tgt[order]  # [n_in] non-decreasing
    chunk = max(1, _TORCH_CHUNK_BYTES // (4 * D))
    gathered = torch.empty(min(chunk, n_in), D, dtype=flat.dtype)
    staged = torch.empty(min(chunk, n_in), D, dtype=torch.float32)
    for c0 in range(0, n_in, chunk):
        part, t_part = order[c0 : c0 + chunk], tgt_sorted[c0 : c0 + chunk]
        n = part.numel()
        torch.index_select(flat, 0, part, out=gathered[:n])
        staged[:n].copy_(gathered[:n])  # the upcast, chunk by chunk
        lo, hi = t_part[[0, -1]].tolist()  # the chunk covers accumulator rows lo..hi
        offsets = torch.searchsorted(t_part, torch.arange(lo, hi + 1))
        acc[lo : hi + 1] += F.embedding_bag(torch.arange(n), staged[:n], offsets, mode="sum")
    return acc


def _span_sums_index_add(blocks: list[tuple[int, torch.Tensor]], tgt: torch.Tensor, R: int, D: int) -> torch.Tensor:
    """fp32 ``[R, D]`` sums by ``index_add_`` of every row (spare accumulator row ``R`` for rows in no span)."""
    device = tgt.device
    acc = torch.zeros(R + 1, D, device=device, dtype=torch.float32)
    if D == 0 or tgt.numel() == 0:
        return acc[:R]
    if blocks[0][1].dtype == torch.float32:
        for r0, rows in blocks:
            acc.index_add_(0, tgt[r0 : r0 + rows.shape[0]], rows)
        return acc[:R]
    chunk = max(1, _TORCH_CHUNK_BYTES // (4 * D))
    staged = torch.empty(min(chunk, tgt.numel()), D, device=device, dtype=torch.float32)
    for r0, rows in blocks:
        for c0 in range(0, rows.shape[0], chunk):
            part = rows[c0 : c0 + chunk]
            n = part.shape[0]
            staged[:n].copy_(part)
            acc.index_add_(0, tgt[r0 + c0 : r0 + c0 + n], staged[:n])
    return acc[:R]


def span_pool_bwd_torch(
    grad_means: torch.Tensor,
    tgt: torch.Tensor,
    counts: torch.Tensor,
    hidden_shape: torch.Size,
    hidden_dtype: torch.dtype,
) -> torch.Tensor:
    """Torch backward: one ``index_select`` of the ``[B * S + 1, D]`` table ``[dmeans / n; 0]`` into a fresh
    ``grad_hidden`` (every row written; the zero row serves all tokens in no span). ``dmeans / n`` is formed in fp32
    and rounded once to ``hidden_dtype``, the same single rounding as an fp32 result cast at the end."""
    B, S, D = grad_means.shape
    table = torch.zeros(B * S + 1, D, device=grad_means.device, dtype=hidden_dtype)
    scale = counts.reshape(-1, 1).clamp(min=1).to(torch.float32)
    table[: B * S] = grad_means.reshape(B * S, D).to(torch.float32) / scale
    grad_hidden = torch.empty(hidden_shape, device=grad_means.device, dtype=hidden_dtype)
    torch.index_select(table, 0, tgt, out=grad_hidden.view(-1, D))
    return grad_hidden


# ----------------------------------------------------------------------------------------------------------------------
# autograd.Function
# ----------------------------------------------------------------------------------------------------------------------


class SpanMeanPoolFunction(torch.autograd.Function):
    """Saves the span ids (Triton) or the per-row accumulator index (torch), the counts and ``cu_seqlens``; never
    the hidden states. ``counts`` is non-differentiable."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        span_ids: torch.Tensor,
        num_spans: int,
        cu_seqlens: torch.Tensor | None,
        out_dtype: torch.dtype | None,
        use_triton: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if use_triton:
            means, counts = span_pool_fwd(hidden, span_ids, num_spans, cu_seqlens, out_dtype)
            index = span_ids
        else:
            means, counts, index = span_pool_fwd_torch(hidden, span_ids, num_spans, cu_seqlens, out_dtype)
        ctx.mark_non_differentiable(counts)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(index, counts, cu_seqlens)
        ctx.use_triton = use_triton
        ctx.hidden_shape = hidden.shape
        ctx.hidden_dtype = hidden.dtype
        return means, counts

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_means: torch.Tensor, _grad_counts: torch.Tensor | None):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        index, counts, cu_seqlens = ctx.saved_tensors
        if ctx.use_triton:
            grad_hidden = span_pool_bwd(grad_means, index, counts, ctx.hidden_shape, ctx.hidden_dtype, cu_seqlens)
        else:
            grad_hidden = span_pool_bwd_torch(grad_means, index, counts, ctx.hidden_shape, ctx.hidden_dtype)
        return grad_hidden, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------------


def _check_inputs(
    hidden: torch.Tensor,
    span_ids: torch.Tensor,
    num_spans: int,
    cu_seqlens: torch.Tensor | None,
    out_dtype: torch.dtype | None,
    validate: bool,
) -> None:
    check_float("hidden", hidden)
    check_int("span_ids", span_ids)
    if isinstance(num_spans, bool) or not isinstance(num_spans, int) or num_spans < 1:
        raise ValueError(f"num_spans must be a positive int, got {num_spans!r}")
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be None, torch.float32, torch.float16 or torch.bfloat16, got {out_dtype}")
    if cu_seqlens is None:
        if hidden.dim() == 2:
            raise ValueError(f"hidden has shape {tuple(hidden.shape)}: packed [total_tokens, D] input needs cu_seqlens")
        check_ndim("hidden", hidden, 3)
        if span_ids.shape != hidden.shape[:2]:
            raise ValueError(
                f"span_ids must have shape [B, T] = {tuple(hidden.shape[:2])} to match hidden {tuple(hidden.shape)}, "
                f"got {tuple(span_ids.shape)}"
            )
    else:
        check_int("cu_seqlens", cu_seqlens)
        check_ndim("cu_seqlens", cu_seqlens, 1)
        if cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must have B + 1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
        if hidden.dim() != 2:
            raise ValueError(
                f"with cu_seqlens, hidden must be packed [total_tokens, D], got shape {tuple(hidden.shape)}"
            )
        if span_ids.shape != hidden.shape[:1]:
            raise ValueError(
                f"with cu_seqlens, span_ids must have shape [total_tokens] = {tuple(hidden.shape[:1])}, "
                f"got {tuple(span_ids.shape)}"
            )
    check_same_device(hidden=hidden, span_ids=span_ids, cu_seqlens=cu_seqlens)
    if validate:
        _check_values(hidden, span_ids, num_spans, cu_seqlens)


def _check_values(
    hidden: torch.Tensor, span_ids: torch.Tensor, num_spans: int, cu_seqlens: torch.Tensor | None
) -> None:
    """Value checks that need the data on the host: one synchronisation for all of them."""
    stats = []
    if span_ids.numel():
        stats += [span_ids.min().long(), span_ids.max().long()]
    if cu_seqlens is not None:
        cu = cu_seqlens.long()
        stats += [cu[0], cu[-1], (cu[1:] - cu[:-1]).min()]
    if not stats:
        return
    values = torch.stack(stats).tolist()  # the host sync
    if span_ids.numel():
        lo, hi = values[:2]
        values = values[2:]
        if lo < 0 or hi > num_spans:
            raise ValueError(f"span_ids must lie in 0..num_spans = 0..{num_spans}, found values in {lo}..{hi}")
    if cu_seqlens is not None:
        first, last, min_step = values
        if first != 0:
            raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {first}")
        if min_step < 0:
            raise ValueError("cu_seqlens must be non-decreasing")
        if last != hidden.shape[0]:
            raise ValueError(
                f"cu_seqlens[-1] = {last} must equal the packed length hidden.shape[0] = {hidden.shape[0]}"
            )


def span_mean_pool(
    hidden: torch.Tensor,
    span_ids: torch.Tensor,
    num_spans: int,
    *,
    cu_seqlens: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the hidden states over every span, all spans in one read of ``hidden``.

    .. math::
        n_{b,s} = |\\{t : \\mathrm{ids}_{b,t} = s\\}|, \\qquad
        \\mathrm{means}_{b,s} = \\frac{1}{\\max(n_{b,s}, 1)} \\sum_{t : \\mathrm{ids}_{b,t} = s} h_{b,t}
        \\quad (s = 1..S),

    accumulated in fp32 whatever the input dtype. Backward: ``d h[b, t] = d means[b, s] / n[b, s]`` where
    ``ids[b, t] = s``, exact zeros at every other position (a fresh tensor, fully written). Nothing assumes where the
    padding is (left, right, or holes): a token belongs to span ``s`` only through its id.

    Args:
        hidden: ``[B, T, D]`` float32/float16/bfloat16, or packed ``[total_tokens, D]`` with ``cu_seqlens``.
        span_ids: integer ``[B, T]`` (packed: ``[total_tokens]``) with values in ``0..num_spans``; 0 = in no span.
        num_spans: ``S``, the number of spans per sequence (ids ``1..S``).
        cu_seqlens: packed layout only, ``[B + 1]`` integer offsets of the sequences (``0 = c_0 <= ... <= c_B =
            total_tokens``); empty sequences are allowed and give zero means and zero counts.
        out_dtype: dtype of ``means`` (default ``hidden.dtype``).
        backend: ``"auto"`` (Triton on CUDA or under the Triton interpreter, the torch path otherwise), ``"triton"``,
            ``"torch"`` or ``"reference"`` (the fp32 oracle).
        validate: check the *values* of ``span_ids`` (in ``0..num_spans``) and ``cu_seqlens`` (starts at 0,
            non-decreasing, ends at ``total_tokens``). This costs one device-to-host synchronisation; pass False in a
            hot loop whose inputs are known good. Unvalidated ids outside ``1..num_spans`` count towards no span.
            Shapes, dtypes and devices are always checked (free).

    Returns:
        ``means [B, S, D]`` in ``out_dtype`` (an empty span gives a zero vector, never NaN) and ``counts [B, S]``
        int64, the number of tokens in each span (0 marks an empty span; ``counts > 0`` is the validity mask).
    """
    _check_inputs(hidden, span_ids, num_spans, cu_seqlens, out_dtype, validate)
    impl = resolve_backend(backend, hidden, span_ids)
    if impl == "reference":
        return span_mean_pool_ref(hidden, span_ids, num_spans, cu_seqlens=cu_seqlens, out_dtype=out_dtype)
    if impl == "triton" and num_spans > MAX_TRITON_SPANS:
        raise ValueError(f"num_spans = {num_spans} exceeds the Triton kernel's {MAX_TRITON_SPANS}; use backend='torch'")
    return SpanMeanPoolFunction.apply(hidden, span_ids, num_spans, cu_seqlens, out_dtype, impl == "triton")


# ----------------------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation specs
# ----------------------------------------------------------------------------------------------------------------------


def aot_specs(d: int = 4096) -> list[AOTSpec]:
    """Every kernel of this op at the launch configuration used for ``d``-wide bf16 hidden states, bf16 means, int64
    span ids and counts, int32 ``cu_seqlens`` (packed) and ``num_spans = 2`` (the official source/target spans), for a
    micro-batch of 16 sequences of 512 tokens (padded ``[16, 512, d]``, or packed 8192 tokens).

    ``extra["int_args"]`` gives the integer arguments' launch values, so an ahead-of-time compile specialises them as
    the JIT does (``D`` and the strides are multiples of 16: vectorised, ``cp.async``-pipelined hidden loads). The
    forward reduces with ``tl.dot`` on a 16-row one-hot operand: tensor cores through ``mma.sync`` (16 rows are below
    ``wgmma``'s 64), and the op is memory-bound, not GEMM-shaped, so ``gemm=False``.
    """
    cfg = _config(d, torch.bfloat16, 2)
    B, T = 16, 512
    specs = []
    for packed in (False, True):
        tag = "packed" if packed else "padded"
        specs.append(
            AOTSpec(
                name=f"span_pool_fwd_{tag}",
                fn=_span_pool_fwd_kernel,
                signature={
                    "h": "*bf16",
                    "ids": "*i64",
                    "cu": "*i32" if packed else "*i64",
                    "means": "*bf16",
                    "counts": "*i64",
                    "T": "i32",
                    "D": "i32",
                    "S": "i32",
                    "stride_hb": "i32",
                    "stride_ht": "i32",
                },
                constexprs={
                    "IS_PACKED": packed,
                    "S_PAD": cfg.s_pad,
                    "BLOCK_T": cfg.fwd_block_t,
                    "BLOCK_D": cfg.fwd_block_d,
                    "UPCAST": False,
                },
                num_warps=cfg.fwd_num_warps,
                num_stages=cfg.fwd_num_stages,
                gemm=False,
                extra={
                    "grid": f"({B}, {d // cfg.fwd_block_d})",
                    "int_args": {
                        "T": 0 if packed else T,
                        "D": d,
                        "S": 2,
                        "stride_hb": 0 if packed else T * d,
                        "stride_ht": d,
                    },
                    "tensor_core": "mma.sync (one-hot [S_PAD, BLOCK_T] x [BLOCK_T, BLOCK_D] tl.dot, M = 16: no wgmma)",
                },
            )
        )
        specs.append(
            AOTSpec(
                name=f"span_pool_bwd_{tag}",
                fn=_span_pool_bwd_kernel,
                signature={
                    "dmeans": "*bf16",
                    "ids": "*i64",
                    "cu": "*i32" if packed else "*i64",
                    "counts": "*i64",
                    "dh": "*bf16",
                    "N": "i32",
                    "T": "i32",
                    "D": "i32",
                    "S": "i32",
                    "B": "i32",
                    "N_SEARCH": "i32",
                },
                constexprs={
                    "IS_PACKED": packed,
                    "BLOCK_T": cfg.bwd_block_t,
                    "BLOCK_D": cfg.bwd_block_d,
                    "UPCAST": False,
                },
                num_warps=cfg.bwd_num_warps,
                num_stages=cfg.bwd_num_stages,
                gemm=False,
                extra={
                    "grid": f"({B * T // cfg.bwd_block_t}, {d // cfg.bwd_block_d})",
                    "int_args": {
                        "N": B * T,
                        "T": 0 if packed else T,
                        "D": d,
                        "S": 2,
                        "B": B,
                        "N_SEARCH": (B - 1).bit_length(),
                    },
                },
            )
        )
    return specs
