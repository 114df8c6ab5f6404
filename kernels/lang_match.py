"""Language matching (AlignX L_LAM), exact, without the ``[M, M, 2D]`` pair tensor.

For every ordered pair ``(i, j)`` of the ``M`` embeddings ``E`` the official head sees ``z_ij = [E_i ; E_j]`` and
predicts "same language" with ``logits_ij = W_down (silu(W_gate z_ij) * (W_up z_ij))``; the loss is the mean
cross-entropy over the pairs, label ``y_ij = [lang_i == lang_j]``. The first layer is linear and bias-free, so with
``W_gate = [G1 | G2]`` and ``W_up = [U1 | U2]`` (each ``[H, D]``)::

    P = E G1^T,  R = E U1^T,  Q = E G2^T,  T = E U2^T                 (one GEMM: X = E Wcat^T, Wcat = [G1; U1; G2; U2])
    g_ij = silu(P_i + Q_j) * (R_i + T_j)                              [H]
    s_ij = logit1_ij - logit0_ij = <g_ij, dd>,  dd = W_down[1] - W_down[0]
    CE_ij = softplus(s_ij) - y_ij s_ij                                (= logsumexp(logits) - logits[y])

and only the ``H``-wide pair space is ever formed, one bounded tile or row chunk at a time. Backward, with
``delta_ij = w (sigmoid(s_ij) - y_ij)`` (``w`` = upstream grad / number of pairs), ``v_ij = delta_ij silu(a_ij)`` and
``u_ij = delta_ij (R_i + T_j) silu'(a_ij)`` (``a_ij = P_i + Q_j``)::

    dP_i = dd * sum_j u_ij,  dQ_j = dd * sum_i u_ij,  dR_i = dd * sum_j v_ij,  dT_j = dd * sum_i v_ij
    d dd = sum_ij delta_ij g_ij,  d W_down = [-d dd ; d dd]
    dE = dX Wcat,  d Wcat = dX^T E                                     (dX = [dP | dR | dQ | dT], [M, 4H])

Four layers, top to bottom: Triton kernels (``_lang_match_gemm_kernel`` for the three GEMMs, the pairwise
``_lang_match_fwd_kernel`` / ``_lang_match_bwd_kernel``) -> launchers (``lang_match_fwd``, ``lang_match_bwd``) ->
``LangMatchLossFunction`` -> the public ``lang_match_loss``. The torch path (``lang_match_torch``) is
memory-bounded and is what runs on CPU in training; the fp32 oracle is
:func:`alignx.kernels.reference.lang_match_loss_ref`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (
    AOTSpec,
    check_float,
    check_int,
    check_ndim,
    check_same_device,
    resolve_backend,
    upcast_in_kernel,
)
from .reference import lang_match_loss_ref

__all__ = [
    "LangMatchLossFunction",
    "aot_specs",
    "lang_match_bwd",
    "lang_match_fwd",
    "lang_match_loss",
    "lang_match_torch",
]

# The backward reduces over j (for dP, dR) and over i (for dQ, dT) without atomics: each (BI x BJ) tile writes its
# partial row sums [BI, 2H] and column sums [BJ, 2H] to its own slots, and torch finishes with a fixed-order sum, so
# gradients are bitwise reproducible. The price is small: a tile stores 2H (BI + BJ) floats for BI BJ H pair units
# (1 store per 8 units of ~25 flops and an exp), and the buffers are bounded by this many bytes: a band of R rows
# needs 8 H M R (1/BJ + 1/BI) bytes, more rows run as further bands (M = 512, H = 128: 16.8 MB, one band).
_BWD_PARTIAL_BYTES = 64 << 20

# Bytes of the four live [rows, M, H] fp32 temporaries of one row chunk of the torch path (a, sigmoid(a), R_i + T_j
# and one work buffer): 32 MiB is 16 rows at M = 1024, H = 128, and the whole pair space of M <= 128.
_TORCH_CHUNK_BYTES = 16 << 20


# ----------------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _lang_match_gemm_kernel(
    a,  # A [M, K], strides (stride_am, stride_ak)
    b,  # B [K, N], strides (stride_bk, stride_bn)
    c,  # C [M, N], strides (stride_cm, stride_cn)
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # C = A @ B, fp32 accumulator. UPCAST: both operands in fp32 (interpreter, fp32 or mixed-dtype inputs; "ieee",
    # no TF32). Otherwise A is cast to B's dtype in registers (fp32 gradients meet bf16/fp16 weights or embeddings)
    # and the product runs on the tensor cores.
    i_pid = tl.program_id(0)
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(N, BN)
    # grouped order: GROUP_M row tiles in a row share each column tile of B while it is in L2
    n_in_group = GROUP_M * n_n
    i_first_m = (i_pid // n_in_group) * GROUP_M
    size_m = tl.minimum(n_m - i_first_m, GROUP_M)
    i_m = i_first_m + (i_pid % n_in_group) % size_m
    i_n = (i_pid % n_in_group) // size_m

    o_m = i_m * BM + tl.arange(0, BM)  # [BM]
    o_n = i_n * BN + tl.arange(0, BN)  # [BN]
    o_k = tl.arange(0, BK)  # [BK]
    m_m = o_m < M
    m_n = o_n < N
    p_a = a + o_m.to(tl.int64)[:, None] * stride_am + o_k.to(tl.int64)[None, :] * stride_ak  # [BM, BK]
    p_b = b + o_k.to(tl.int64)[:, None] * stride_bk + o_n.to(tl.int64)[None, :] * stride_bn  # [BK, BN]
    b_acc = tl.zeros((BM, BN), dtype=tl.float32)  # [BM, BN]
    for k0 in range(0, K, BK):
        m_k = (k0 + o_k) < K
        b_a = tl.load(p_a, mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BM, BK]
        b_b = tl.load(p_b, mask=m_k[:, None] & m_n[None, :], other=0.0)  # [BK, BN]
        if UPCAST:
            b_a = b_a.to(tl.float32)
            b_b = b_b.to(tl.float32)
        else:
            b_a = b_a.to(b_b.dtype)
        b_acc = tl.dot(b_a, b_b, b_acc, input_precision="ieee")
        p_a += BK * stride_ak
        p_b += BK * stride_bk
    p_c = c + o_m.to(tl.int64)[:, None] * stride_cm + o_n.to(tl.int64)[None, :] * stride_cn  # [BM, BN]
    tl.store(p_c, b_acc.to(c.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _lang_match_logit_diff(
    x, down, o_i, o_j, m_i, m_j, H, stride_x, stride_down, BI: tl.constexpr, BJ: tl.constexpr, BH: tl.constexpr
):
    # s_ij = logit1 - logit0 = sum_h silu(P_ih + Q_jh) * (R_ih + T_jh) * (down[1, h] - down[0, h]), fp32.
    p_xi = x + o_i.to(tl.int64) * stride_x  # [BI] rows of [P | R | Q | T]
    p_xj = x + o_j.to(tl.int64) * stride_x  # [BJ]
    b_s = tl.zeros((BI, BJ), dtype=tl.float32)  # [BI, BJ]
    for h0 in range(0, H, BH):
        o_h = h0 + tl.arange(0, BH)  # [BH]
        m_h = o_h < H
        m_ih = m_i[:, None] & m_h[None, :]
        m_jh = m_j[:, None] & m_h[None, :]
        b_p = tl.load(p_xi[:, None] + o_h[None, :], mask=m_ih, other=0.0)  # [BI, BH]
        b_r = tl.load(p_xi[:, None] + (H + o_h)[None, :], mask=m_ih, other=0.0)  # [BI, BH]
        b_q = tl.load(p_xj[:, None] + (2 * H + o_h)[None, :], mask=m_jh, other=0.0)  # [BJ, BH]
        b_t = tl.load(p_xj[:, None] + (3 * H + o_h)[None, :], mask=m_jh, other=0.0)  # [BJ, BH]
        b_d0 = tl.load(down + o_h, mask=m_h, other=0.0).to(tl.float32)  # [BH]
        b_d1 = tl.load(down + stride_down + o_h, mask=m_h, other=0.0).to(tl.float32)  # [BH]
        b_a = b_p[:, None, :] + b_q[None, :, :]  # [BI, BJ, BH]
        b_g = b_a * tl.sigmoid(b_a) * (b_r[:, None, :] + b_t[None, :, :])  # [BI, BJ, BH]
        b_s += tl.sum(b_g * (b_d1 - b_d0)[None, None, :], axis=2)
    return b_s


@triton.jit
def _lang_match_fwd_kernel(
    x,  # [M, 4H] fp32 projections [P | R | Q | T], row stride stride_x
    lang,  # [M] int64
    down,  # [2, H], row stride stride_down
    part,  # [n_bi * n_bj] fp32: CE summed over each tile's pairs
    M,
    H,
    stride_x,
    stride_down,
    INCLUDE_SELF: tl.constexpr,
    BI: tl.constexpr,
    BJ: tl.constexpr,
    BH: tl.constexpr,
):
    # One program per (BI x BJ) tile of pairs; the H-wide hidden layer is walked BH columns at a time.
    i_i = tl.program_id(0)
    i_j = tl.program_id(1)
    o_i = i_i * BI + tl.arange(0, BI)  # [BI]
    o_j = i_j * BJ + tl.arange(0, BJ)  # [BJ]
    m_i = o_i < M
    m_j = o_j < M
    b_s = _lang_match_logit_diff(x, down, o_i, o_j, m_i, m_j, H, stride_x, stride_down, BI, BJ, BH)  # [BI, BJ]
    b_li = tl.load(lang + o_i, mask=m_i, other=0)  # [BI]
    b_lj = tl.load(lang + o_j, mask=m_j, other=0)  # [BJ]
    b_y = b_li[:, None] == b_lj[None, :]  # [BI, BJ]
    # log(1 + e^s) - y s, stable for any s: max(s, 0) + log(1 + e^-|s|)
    b_ce = tl.maximum(b_s, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(b_s))) - tl.where(b_y, b_s, 0.0)  # [BI, BJ]
    m_pair = m_i[:, None] & m_j[None, :]
    if not INCLUDE_SELF:
        m_pair = m_pair & (o_i[:, None] != o_j[None, :])
    b_ce = tl.where(m_pair, b_ce, 0.0)
    tl.store(part + i_i * tl.num_programs(1) + i_j, tl.sum(tl.sum(b_ce, axis=1), axis=0))


@triton.jit
def _lang_match_bwd_kernel(
    x,  # [M, 4H] fp32 projections [P | R | Q | T], row stride stride_x
    lang,  # [M] int64
    down,  # [2, H], row stride stride_down
    d_row,  # [n_bj, R, 2H] fp32: per column block, sum over its j of [u | v] for the band's rows
    d_col,  # [n_bi, M, 2H] fp32: per row block of the band, sum over its i of [u | v] for every column
    d_dd,  # [n_bi, n_bj, H] fp32: per tile, sum of delta * g
    M,
    H,
    row0,
    R,
    stride_x,
    stride_down,
    INCLUDE_SELF: tl.constexpr,
    BI: tl.constexpr,
    BJ: tl.constexpr,
    BH: tl.constexpr,
):
    # One program per tile of the band of rows [row0, row0 + R). Every program writes its own slots of the partial
    # buffers (no atomics): the column and row reductions are finished by a fixed-order sum, so the gradients are
    # bitwise reproducible. Upstream scale and dd are applied afterwards to the [M, 4H] / [H] results.
    i_i = tl.program_id(0)
    i_j = tl.program_id(1)
    o_li = i_i * BI + tl.arange(0, BI)  # [BI] row within the band
    o_i = row0 + o_li  # [BI]
    o_j = i_j * BJ + tl.arange(0, BJ)  # [BJ]
    m_i = o_li < R
    m_j = o_j < M
    b_s = _lang_match_logit_diff(x, down, o_i, o_j, m_i, m_j, H, stride_x, stride_down, BI, BJ, BH)  # [BI, BJ]
    b_li = tl.load(lang + o_i, mask=m_i, other=0)  # [BI]
    b_lj = tl.load(lang + o_j, mask=m_j, other=0)  # [BJ]
    b_y = (b_li[:, None] == b_lj[None, :]).to(tl.float32)  # [BI, BJ]
    m_pair = m_i[:, None] & m_j[None, :]
    if not INCLUDE_SELF:
        m_pair = m_pair & (o_i[:, None] != o_j[None, :])
    b_delta = tl.where(m_pair, tl.sigmoid(b_s) - b_y, 0.0)  # [BI, BJ] dCE/ds

    p_xi = x + o_i.to(tl.int64) * stride_x  # [BI]
    p_xj = x + o_j.to(tl.int64) * stride_x  # [BJ]
    p_row = d_row + (i_j.to(tl.int64) * R + o_li.to(tl.int64)) * (2 * H)  # [BI]
    p_col = d_col + (i_i.to(tl.int64) * M + o_j.to(tl.int64)) * (2 * H)  # [BJ]
    p_dd = d_dd + (i_i.to(tl.int64) * tl.num_programs(1) + i_j) * H
    for h0 in range(0, H, BH):
        o_h = h0 + tl.arange(0, BH)  # [BH]
        m_h = o_h < H
        m_ih = m_i[:, None] & m_h[None, :]
        m_jh = m_j[:, None] & m_h[None, :]
        b_p = tl.load(p_xi[:, None] + o_h[None, :], mask=m_ih, other=0.0)  # [BI, BH]
        b_r = tl.load(p_xi[:, None] + (H + o_h)[None, :], mask=m_ih, other=0.0)  # [BI, BH]
        b_q = tl.load(p_xj[:, None] + (2 * H + o_h)[None, :], mask=m_jh, other=0.0)  # [BJ, BH]
        b_t = tl.load(p_xj[:, None] + (3 * H + o_h)[None, :], mask=m_jh, other=0.0)  # [BJ, BH]
        b_a = b_p[:, None, :] + b_q[None, :, :]  # [BI, BJ, BH]
        b_sig = tl.sigmoid(b_a)  # [BI, BJ, BH]
        b_silu = b_a * b_sig  # [BI, BJ, BH]
        b_b = b_r[:, None, :] + b_t[None, :, :]  # [BI, BJ, BH]
        b_v = b_delta[:, :, None] * b_silu  # [BI, BJ, BH] delta * silu(a)
        b_u = b_delta[:, :, None] * b_b * (b_sig + b_silu * (1.0 - b_sig))  # [BI, BJ, BH] delta * b * silu'(a)
        tl.store(p_dd + o_h, tl.sum(tl.sum(b_v * b_b, axis=1), axis=0), mask=m_h)
        tl.store(p_row[:, None] + o_h[None, :], tl.sum(b_u, axis=1), mask=m_ih)
        tl.store(p_row[:, None] + (H + o_h)[None, :], tl.sum(b_v, axis=1), mask=m_ih)
        tl.store(p_col[:, None] + o_h[None, :], tl.sum(b_u, axis=0), mask=m_jh)
        tl.store(p_col[:, None] + (H + o_h)[None, :], tl.sum(b_v, axis=0), mask=m_jh)


# ----------------------------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LangMatchConfig:
    """Block sizes of the GEMM and of the two pairwise kernels."""

    gemm_bm: int
    gemm_bn: int
    gemm_bk: int
    gemm_group_m: int
    gemm_num_warps: int
    gemm_num_stages: int
    pair_bi: int
    pair_bj: int
    fwd_bh: int
    bwd_bh: int
    pair_num_warps: int
    pair_num_stages: int


def _config(h: int, dtype: torch.dtype) -> LangMatchConfig:
    """Block sizes for hidden width ``h`` of the head and GEMM operands of ``dtype`` (power-of-two blocks).

    GEMM: 64 x 128 output tiles, K step 64 (32 for fp32), 3 stages, one warpgroup: ``wgmma`` on sm_90a, ``mma.sync``
    on sm_80. Shared memory (bf16 operands, compiled for sm_90a) 73 KiB for the projection, 81 KiB for the backward
    GEMMs whose A tile is the fp32 ``dX`` (converted to bf16 in registers); 109-156 registers, no spills.
    Pairwise: 32 x 32 pairs per program (M = 512: 256 programs), the hidden layer BH columns at a time; the
    ``[BI, BJ, BH]`` fp32 temporaries hold 8 * BH values per thread each. BH = 4 forward (80 registers) and 2
    backward (~6 live temporaries, 168 registers) keep 3-6 programs per SM and nothing spills; a wider BH does the
    same work per pair with fewer programs resident (bwd BH = 4: 240 registers). One sigmoid per pair and hidden unit
    bounds these kernels, not memory: a tile re-reads (BI + BJ) x 2H x 4 B of projections from L1/L2 per H columns.
    ``h`` does not change the blocks (H is a runtime loop bound; BH need not divide it).
    """
    fp32 = dtype == torch.float32
    return LangMatchConfig(
        gemm_bm=64,
        gemm_bn=128,
        gemm_bk=32 if fp32 else 64,
        gemm_group_m=8,
        gemm_num_warps=4,
        gemm_num_stages=3,
        pair_bi=32,
        pair_bj=32,
        fwd_bh=4,
        bwd_bh=2,
        pair_num_warps=4,
        pair_num_stages=2,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------------


def _stack_weights(gate_w: torch.Tensor, up_w: torch.Tensor) -> torch.Tensor:
    """``Wcat = [G1; U1; G2; U2]`` ``[4H, D]`` (contiguous, one dtype), so that ``E Wcat^T = [P | R | Q | T]``."""
    D = gate_w.shape[1] // 2
    dtype = torch.promote_types(gate_w.dtype, up_w.dtype)
    return torch.cat([gate_w[:, :D], up_w[:, :D], gate_w[:, D:], up_w[:, D:]]).to(dtype)


def _split_weight_grad(d_wcat: torch.Tensor, H: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``d Wcat [4H, D]`` -> ``(d gate_w, d up_w)``, each ``[H, 2D]``."""
    d_g1, d_u1, d_g2, d_u2 = d_wcat.split(H)
    return torch.cat([d_g1, d_g2], dim=1), torch.cat([d_u1, d_u2], dim=1)


def _gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, upcast: bool, cfg: LangMatchConfig) -> torch.Tensor:
    """``out = a @ b`` with the Triton GEMM (any strides; ``out`` may be of any float dtype).

    All three GEMMs of the op use it (projection, ``dE = dX Wcat``, ``d Wcat = dX^T E``): the fp32 ``dX`` is
    converted to the operands' bf16/fp16 in registers on its way to the tensor cores (torch would need a separate cast
    pass or an fp32 GEMM), the transposes are strides, and the whole op, backward included, is Triton, which the
    interpreter tests and the ahead-of-time checks cover end to end.
    """
    M, K = a.shape
    N = b.shape[1]
    grid = (triton.cdiv(M, cfg.gemm_bm) * triton.cdiv(N, cfg.gemm_bn),)
    _lang_match_gemm_kernel[grid](
        a,
        b,
        out,
        M,
        N,
        K,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        out.stride(0),
        out.stride(1),
        BM=cfg.gemm_bm,
        BN=cfg.gemm_bn,
        BK=cfg.gemm_bk,
        GROUP_M=cfg.gemm_group_m,
        UPCAST=upcast,
        num_warps=cfg.gemm_num_warps,
        num_stages=cfg.gemm_num_stages,
    )
    return out


def _gemm_mode(emb: torch.Tensor, wcat: torch.Tensor) -> tuple[bool, torch.dtype]:
    """(UPCAST, operand dtype): tensor cores in the common low-precision dtype, exact fp32 otherwise."""
    same = emb.dtype == wcat.dtype
    upcast = upcast_in_kernel() or not same or emb.dtype == torch.float32
    return upcast, (emb.dtype if same else torch.float32)


def _num_pairs(M: int, include_self_pairs: bool) -> int:
    return M * M if include_self_pairs else M * (M - 1)


def lang_match_fwd(
    emb: torch.Tensor,
    lang: torch.Tensor,
    gate_w: torch.Tensor,
    up_w: torch.Tensor,
    down_w: torch.Tensor,
    include_self_pairs: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the projection GEMM and the pairwise forward kernel (no input checks).

    Returns the mean loss (fp32, 0-dim) and the projections ``X = [P | R | Q | T]`` ``[M, 4H]`` fp32 (what the
    backward needs besides the inputs).
    """
    M = emb.shape[0]
    H = gate_w.shape[0]
    wcat = _stack_weights(gate_w, up_w)  # [4H, D]
    upcast, dtype = _gemm_mode(emb, wcat)
    cfg = _config(H, dtype)
    x = torch.empty((M, 4 * H), device=emb.device, dtype=torch.float32)
    _gemm(emb, wcat.t(), x, upcast, cfg)
    lang = lang.to(torch.int64).contiguous()
    down_w = down_w.contiguous()
    grid = (triton.cdiv(M, cfg.pair_bi), triton.cdiv(M, cfg.pair_bj))
    part = torch.empty(grid[0] * grid[1], device=emb.device, dtype=torch.float32)
    _lang_match_fwd_kernel[grid](
        x,
        lang,
        down_w,
        part,
        M,
        H,
        x.stride(0),
        down_w.stride(0),
        INCLUDE_SELF=include_self_pairs,
        BI=cfg.pair_bi,
        BJ=cfg.pair_bj,
        BH=cfg.fwd_bh,
        num_warps=cfg.pair_num_warps,
        num_stages=cfg.pair_num_stages,
    )
    return part.sum() / _num_pairs(M, include_self_pairs), x


def _band_rows(M: int, H: int, cfg: LangMatchConfig, budget: int) -> int:
    """Rows per backward band: the largest multiple of BI whose partial buffers fit ``budget`` bytes."""
    n_bj = triton.cdiv(M, cfg.pair_bj)
    per_row = 8 * H * (n_bj + M / cfg.pair_bi)  # [n_bj, R, 2H] + [R / BI, M, 2H] fp32
    rows = int(budget // per_row) // cfg.pair_bi * cfg.pair_bi
    return min(max(rows, cfg.pair_bi), triton.cdiv(M, cfg.pair_bi) * cfg.pair_bi)


def lang_match_bwd(
    grad_loss: torch.Tensor,
    emb: torch.Tensor,
    lang: torch.Tensor,
    gate_w: torch.Tensor,
    up_w: torch.Tensor,
    down_w: torch.Tensor,
    x: torch.Tensor,
    include_self_pairs: bool = True,
    needs: tuple[bool, bool, bool, bool] = (True, True, True, True),
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Launch the pairwise backward kernel band by band, then the two gradient GEMMs.

    ``grad_loss`` is the upstream gradient of the mean loss (a 0-dim tensor, read on the device: no host sync).
    ``needs`` says which of ``(d emb, d gate_w, d up_w, d down_w)`` to form. Returns them (None where not needed).
    """
    M = emb.shape[0]
    H = gate_w.shape[0]
    wcat = _stack_weights(gate_w, up_w)
    upcast, dtype = _gemm_mode(emb, wcat)
    cfg = _config(H, dtype)
    lang = lang.to(torch.int64).contiguous()
    down_w = down_w.contiguous()
    dev = emb.device

    dx = torch.zeros((M, 4 * H), device=dev, dtype=torch.float32)  # [dP | dR | dQ | dT] / dd, unscaled
    d_dd = torch.zeros(H, device=dev, dtype=torch.float32)
    n_bj = triton.cdiv(M, cfg.pair_bj)
    band = _band_rows(M, H, cfg, _BWD_PARTIAL_BYTES)
    for row0 in range(0, M, band):
        R = min(band, M - row0)
        n_bi = triton.cdiv(R, cfg.pair_bi)
        d_row = torch.empty((n_bj, R, 2 * H), device=dev, dtype=torch.float32)
        d_col = torch.empty((n_bi, M, 2 * H), device=dev, dtype=torch.float32)
        d_dd_part = torch.empty((n_bi, n_bj, H), device=dev, dtype=torch.float32)
        _lang_match_bwd_kernel[(n_bi, n_bj)](
            x,
            lang,
            down_w,
            d_row,
            d_col,
            d_dd_part,
            M,
            H,
            row0,
            R,
            x.stride(0),
            down_w.stride(0),
            INCLUDE_SELF=include_self_pairs,
            BI=cfg.pair_bi,
            BJ=cfg.pair_bj,
            BH=cfg.bwd_bh,
            num_warps=cfg.pair_num_warps,
            num_stages=cfg.pair_num_stages,
        )
        dx[row0 : row0 + R, : 2 * H] = d_row.sum(0)
        dx[:, 2 * H :] += d_col.sum(0)
        d_dd += d_dd_part.sum((0, 1))

    scale = grad_loss.to(torch.float32) / _num_pairs(M, include_self_pairs)
    dd = down_w[1].float() - down_w[0].float()  # [H]
    dx.mul_(dd.repeat(4)).mul_(scale)
    d_dd.mul_(scale)
    d_emb = d_gate = d_up = d_down = None
    if needs[0]:
        d_emb = _gemm(dx, wcat, torch.empty_like(emb, memory_format=torch.contiguous_format), upcast, cfg)
    if needs[1] or needs[2]:
        d_wcat = _gemm(dx.t(), emb, torch.empty((4 * H, emb.shape[1]), device=dev, dtype=torch.float32), upcast, cfg)
        d_gate, d_up = _split_weight_grad(d_wcat, H)
        d_gate, d_up = d_gate.to(gate_w.dtype), d_up.to(up_w.dtype)
    if needs[3]:
        d_down = torch.stack([-d_dd, d_dd]).to(down_w.dtype)
    return d_emb, d_gate, d_up, d_down


# ----------------------------------------------------------------------------------------------------------------------
# Torch path (CPU training, and the fallback): row chunks of the H-wide pair space, gradients formed on the way
# ----------------------------------------------------------------------------------------------------------------------


def _chunk_rows(M: int, H: int, budget: int) -> int:
    return max(1, min(M, budget // (4 * 4 * M * H)))


def lang_match_torch(
    x: torch.Tensor,
    lang: torch.Tensor,
    down_w: torch.Tensor,
    include_self_pairs: bool = True,
    need_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The pairwise part in plain torch, fp32, ``_TORCH_CHUNK_BYTES`` of ``[rows, M, H]`` temporaries at a time.

    x ``[M, 4H]`` fp32 projections ``[P | R | Q | T]``, lang ``[M]``, down_w ``[2, H]``. Returns the mean loss and,
    with ``need_grad``, its gradients ``dX [M, 4H]`` and ``d down_w [2, H]`` (fp32), formed in the same pass as the
    loss: each chunk's logits are complete (all of H at once), so nothing is recomputed in backward and the
    autograd.Function only scales them by the upstream gradient (the loss is a scalar).
    """
    M, H = x.shape[0], x.shape[1] // 4
    P, R, Q, T = x.split(H, dim=1)
    dd = down_w[1].float() - down_w[0].float()  # [H]
    lang = lang.reshape(-1)
    n_pairs = _num_pairs(M, include_self_pairs)
    loss = x.new_zeros(())
    if need_grad:
        dx = x.new_zeros((M, 4 * H))
        dP, dR, dQ, dT = dx.split(H, dim=1)
        d_dd = x.new_zeros(H)
    rows = _chunk_rows(M, H, _TORCH_CHUNK_BYTES)
    for i0 in range(0, M, rows):
        i1 = min(M, i0 + rows)
        a = P[i0:i1, None, :] + Q[None, :, :]  # [c, M, H]
        sig = torch.sigmoid(a)
        a.mul_(sig)  # silu(a)
        b = R[i0:i1, None, :] + T[None, :, :]  # [c, M, H]
        g = a * b  # [c, M, H]
        s = g @ dd  # [c, M]
        y = (lang[i0:i1, None] == lang[None, :]).to(torch.float32)  # [c, M]
        keep = None
        if not include_self_pairs:
            keep = torch.arange(i0, i1, device=x.device)[:, None] != torch.arange(M, device=x.device)[None, :]
        ce = F.softplus(s) - y * s
        loss = loss + (ce.sum() if keep is None else ce[keep].sum())
        if not need_grad:
            continue
        delta = torch.sigmoid(s) - y  # [c, M]
        if keep is not None:
            delta = delta * keep
        d_dd += (delta.reshape(1, -1) @ g.reshape(-1, H)).reshape(H)
        # u = delta * b * silu'(a), silu'(a) = sig + silu * (1 - sig); g is reused as the work buffer
        torch.mul(a, sig, out=g)
        torch.sub(a, g, out=g)
        g.add_(sig).mul_(b).mul_(delta[..., None])
        dP[i0:i1] = g.sum(1)
        dQ += g.sum(0)
        a.mul_(delta[..., None])  # v = delta * silu(a)
        dR[i0:i1] = a.sum(1)
        dT += a.sum(0)
        del a, sig, b, g
    loss = loss / n_pairs
    if not need_grad:
        return loss, None, None
    dx.mul_(dd.repeat(4) / n_pairs)
    d_dd /= n_pairs
    return loss, dx, torch.stack([-d_dd, d_dd])


# ----------------------------------------------------------------------------------------------------------------------
# autograd.Function
# ----------------------------------------------------------------------------------------------------------------------


class LangMatchLossFunction(torch.autograd.Function):
    """Triton: saves the inputs and the ``[M, 4H]`` fp32 projections; backward recomputes the pair space tile by
    tile. Torch: the gradients of the loss w.r.t. the projections and ``down_w`` are formed in forward (``[M, 4H]``
    and ``[2, H]``), so backward only scales them and runs the two GEMMs. Never saves anything pair-sized."""

    @staticmethod
    def forward(
        ctx,
        emb: torch.Tensor,
        lang: torch.Tensor,
        gate_w: torch.Tensor,
        up_w: torch.Tensor,
        down_w: torch.Tensor,
        include_self_pairs: bool,
        use_triton: bool,
    ) -> torch.Tensor:
        ctx.use_triton = use_triton
        ctx.include_self_pairs = include_self_pairs
        ctx.dtypes = (emb.dtype, gate_w.dtype, up_w.dtype, down_w.dtype)
        if use_triton:
            loss, x = lang_match_fwd(emb, lang, gate_w, up_w, down_w, include_self_pairs)
            ctx.save_for_backward(emb, lang, gate_w, up_w, down_w, x)
            return loss
        x = emb.float() @ _stack_weights(gate_w, up_w).float().t()  # [M, 4H]
        loss, dx, d_down = lang_match_torch(x, lang, down_w, include_self_pairs, need_grad=True)
        ctx.save_for_backward(emb, gate_w, up_w, dx, d_down)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3], ctx.needs_input_grad[4])
        if ctx.use_triton:
            emb, lang, gate_w, up_w, down_w, x = ctx.saved_tensors
            d_emb, d_gate, d_up, d_down = lang_match_bwd(
                grad_loss, emb, lang, gate_w, up_w, down_w, x, ctx.include_self_pairs, needs
            )
            return d_emb, None, d_gate, d_up, d_down, None, None
        emb, gate_w, up_w, dx, d_down = ctx.saved_tensors
        H = gate_w.shape[0]
        dx = dx * grad_loss.to(torch.float32)
        d_emb = d_gate = d_up = None
        if needs[0]:
            d_emb = (dx @ _stack_weights(gate_w, up_w).float()).to(ctx.dtypes[0])
        if needs[1] or needs[2]:
            d_gate, d_up = _split_weight_grad(dx.t() @ emb.float(), H)
            d_gate, d_up = d_gate.to(ctx.dtypes[1]), d_up.to(ctx.dtypes[2])
        d_down = (d_down * grad_loss.to(torch.float32)).to(ctx.dtypes[3]) if needs[3] else None
        return d_emb, None, d_gate, d_up, d_down, None, None


# ----------------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------------


def _check_inputs(
    emb: torch.Tensor,
    lang: torch.Tensor,
    gate_w: torch.Tensor,
    up_w: torch.Tensor,
    down_w: torch.Tensor,
    include_self_pairs: bool,
) -> None:
    check_float("emb", emb)
    check_int("lang", lang)
    check_float("gate_w", gate_w)
    check_float("up_w", up_w)
    check_float("down_w", down_w)
    check_ndim("emb", emb, 2)
    check_ndim("lang", lang, 1)
    check_ndim("gate_w", gate_w, 2)
    check_ndim("up_w", up_w, 2)
    check_ndim("down_w", down_w, 2)
    M, D = emb.shape
    if M == 0:
        raise ValueError("emb has no rows (M = 0): the language-matching loss needs at least one embedding")
    if D == 0:
        raise ValueError(f"emb must have a non-empty feature dimension, got shape {tuple(emb.shape)}")
    if lang.shape[0] != M:
        raise ValueError(f"lang must have one label per row of emb (shape [{M}]), got shape {tuple(lang.shape)}")
    H = gate_w.shape[0]
    if H == 0 or gate_w.shape[1] != 2 * D:
        raise ValueError(f"gate_w must have shape [H, 2D] = [H, {2 * D}] with H >= 1, got {tuple(gate_w.shape)}")
    if up_w.shape != gate_w.shape:
        raise ValueError(f"up_w must have the shape of gate_w {tuple(gate_w.shape)}, got {tuple(up_w.shape)}")
    if down_w.shape != (2, H):
        raise ValueError(f"down_w must have shape [2, H] = [2, {H}], got {tuple(down_w.shape)}")
    if not include_self_pairs and M < 2:
        raise ValueError(f"include_self_pairs=False needs at least 2 rows in emb (no pair i != j), got M = {M}")
    check_same_device(emb=emb, lang=lang, gate_w=gate_w, up_w=up_w, down_w=down_w)


def lang_match_loss(
    emb: torch.Tensor,
    lang: torch.Tensor,
    gate_w: torch.Tensor,
    up_w: torch.Tensor,
    down_w: torch.Tensor,
    *,
    include_self_pairs: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """AlignX language-matching loss over all ordered pairs, exactly, in O(M * H) memory.

    ``loss = mean_{(i, j)} CE(W_down (silu(W_gate z_ij) * (W_up z_ij)), y_ij)`` with ``z_ij = [E_i ; E_j]`` and
    ``y_ij = [lang_i == lang_j]``, over all ``M^2`` ordered pairs (``M^2 - M`` pairs ``i != j`` when
    ``include_self_pairs`` is False). Computed through ``W [a; b] = W_1 a + W_2 b``: one ``[M, D] x [D, 4H]`` GEMM,
    then the pairs in the ``H``-wide hidden space, tile by tile; the ``[M, M, 2D]`` input of the official code never
    exists.

    Args:
        emb: ``[M, D]`` float embeddings (the official code stacks ``[e_x; e_y]``, ``M = 2B``).
        lang: ``[M]`` integer language ids.
        gate_w, up_w: ``[H, 2D]`` first-layer weights (``nn.Linear(2D, H, bias=False).weight``), columns ``:D`` act
            on ``E_i`` and ``D:`` on ``E_j``.
        down_w: ``[2, H]`` (``nn.Linear(H, 2, bias=False).weight``): logit 0 = "different", 1 = "same language".
        include_self_pairs: include the ``M`` pairs ``(i, i)`` (the official code does).
        backend: ``"auto"`` (Triton on CUDA or under the interpreter, torch otherwise), ``"triton"``, ``"torch"``,
            ``"reference"`` (the fp32 oracle that materialises the pair tensor).

    Returns:
        The mean cross-entropy, an fp32 0-dim tensor, differentiable w.r.t. ``emb``, ``gate_w``, ``up_w`` and
        ``down_w`` (fp32 accumulation; gradients in the dtype of each input).
    """
    _check_inputs(emb, lang, gate_w, up_w, down_w, include_self_pairs)
    backend = resolve_backend(backend, emb, gate_w, up_w, down_w)
    if backend == "reference":
        return lang_match_loss_ref(emb, lang, gate_w, up_w, down_w, include_self_pairs=include_self_pairs)
    use_triton = backend == "triton"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (emb, gate_w, up_w, down_w)):
        return LangMatchLossFunction.apply(emb, lang, gate_w, up_w, down_w, include_self_pairs, use_triton)
    if use_triton:
        return lang_match_fwd(emb, lang, gate_w, up_w, down_w, include_self_pairs)[0]
    x = emb.float() @ _stack_weights(gate_w, up_w).float().t()
    return lang_match_torch(x, lang, down_w, include_self_pairs, need_grad=False)[0]


# ----------------------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation specs
# ----------------------------------------------------------------------------------------------------------------------


def aot_specs(d: int = 4096) -> list[AOTSpec]:
    """Every kernel at the configuration the launchers use for ``D = d``, ``H = 128``, bf16 (``M = 512``)."""
    h, m = 128, 512
    cfg = _config(h, torch.bfloat16)
    gemm_consts = {
        "BM": cfg.gemm_bm,
        "BN": cfg.gemm_bn,
        "BK": cfg.gemm_bk,
        "GROUP_M": cfg.gemm_group_m,
        "UPCAST": False,
    }
    strides = ("stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_cm", "stride_cn")

    def gemm(name: str, a: str, b: str, c: str, mnk: tuple[int, int, int], st: tuple[int, ...]) -> AOTSpec:
        return AOTSpec(
            name=name,
            fn=_lang_match_gemm_kernel,
            signature={"a": a, "b": b, "c": c, "M": "i32", "N": "i32", "K": "i32"} | {s: "i32" for s in strides},
            constexprs=dict(gemm_consts),
            num_warps=cfg.gemm_num_warps,
            num_stages=cfg.gemm_num_stages,
            gemm=True,
            extra={"int_args": dict(zip(("M", "N", "K"), mnk)) | dict(zip(strides, st))},
        )

    pair_sig = {"x": "*fp32", "lang": "*i64", "down": "*bf16", "M": "i32", "H": "i32"}
    pair_ints = {"M": m, "H": h, "stride_x": 4 * h, "stride_down": h}
    pair_consts = {"INCLUDE_SELF": True, "BI": cfg.pair_bi, "BJ": cfg.pair_bj}
    return [
        # X [M, 4H] = E [M, D] @ Wcat^T (Wcat [4H, D] row-major)
        gemm("gemm_proj", "*bf16", "*bf16", "*fp32", (m, 4 * h, d), (d, 1, 1, d, 4 * h, 1)),
        # dE [M, D] = dX [M, 4H] (fp32) @ Wcat [4H, D]
        gemm("gemm_d_emb", "*fp32", "*bf16", "*bf16", (m, d, 4 * h), (4 * h, 1, d, 1, d, 1)),
        # dWcat [4H, D] = dX^T (fp32, strided view) @ E [M, D]
        gemm("gemm_d_weight", "*fp32", "*bf16", "*fp32", (4 * h, d, m), (1, 4 * h, d, 1, d, 1)),
        AOTSpec(
            name="pair_fwd",
            fn=_lang_match_fwd_kernel,
            signature=pair_sig | {"part": "*fp32", "stride_x": "i32", "stride_down": "i32"},
            constexprs=pair_consts | {"BH": cfg.fwd_bh},
            num_warps=cfg.pair_num_warps,
            num_stages=cfg.pair_num_stages,
            extra={"int_args": pair_ints},
        ),
        AOTSpec(
            name="pair_bwd",
            fn=_lang_match_bwd_kernel,
            signature=pair_sig
            | {"d_row": "*fp32", "d_col": "*fp32", "d_dd": "*fp32", "row0": "i32", "R": "i32"}
            | {"stride_x": "i32", "stride_down": "i32"},
            constexprs=pair_consts | {"BH": cfg.bwd_bh},
            num_warps=cfg.pair_num_warps,
            num_stages=cfg.pair_num_stages,
            extra={"int_args": pair_ints | {"row0": 0, "R": m}},
        ),
    ]
