"""InfoNCE over a bounded similarity chunk: fused cosine normalisation, online log-sum-exp, recompute in backward.

Four layers (kernels -> launchers -> autograd.Function -> :func:`info_nce`) plus a memory-bounded torch path that runs
anywhere (the CPU fallback). Neither path ever holds the ``[B, N]`` similarity matrix beyond one bounded chunk.

- Triton: forward streams candidate tiles with an online log-sum-exp (no chunk at all); backward recomputes the logits
  per candidate chunk into a ``W = P - onehot`` chunk and runs two tensor-core GEMMs on it (8BND in total).
- torch, mean/sum with gradients needed and full logits rows for >= 128 anchors within the budget: the gradients are
  formed in the forward, one block of anchors at a time (6BND, the dense cost, without the dense memory).
- torch otherwise (``reduction="none"``, huge N, no gradient): online log-sum-exp over column chunks, recomputed
  chunk by chunk in the backward (8BND).

Notation used throughout (fp32 unless stated)::

    ra[b] = 1 / max(||a_b||, eps)          rc[n] = 1 / max(||c_n||, eps)        (1 when normalize=False)
    s[b, n] = ra[b] * rc[n] * <a_b, c_n> / tau
    lse[b] = logsumexp_n s[b, n]           loss[b] = lse[b] - s[b, pos[b]]
    P[b, n] = exp(s[b, n] - lse[b])        dS[b, n] = g[b] * (P[b, n] - [n == pos[b]])   (g = upstream grad per anchor)

Backward through the normalisation (a_hat = ra * a, dA_hat = sum_n dS[b, n] c_hat_n / tau)::

    da_b = ra[b] * (dA_hat_b - a_hat_b <a_hat_b, dA_hat_b>)      (only dA_hat_b * ra[b] when ||a_b|| <= eps)

and the same for the candidates with the roles swapped. The projection is applied once per row on ``[B, D]`` and
``[M, D]``, never per chunk.
"""

from __future__ import annotations

import math
from functools import cache

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._common import (
    AOTSpec,
    check_float,
    check_int,
    check_ndim,
    check_same_device,
    next_power_of_2,
    resolve_backend,
    upcast_in_kernel,
)
from .reference import info_nce_ref

__all__ = ["info_nce", "info_nce_fwd", "info_nce_bwd", "aot_specs", "DEFAULT_CHUNK_BYTES", "EPS"]

EPS = 1e-12
"""Norm floor of the cosine normalisation: ``x / max(||x||, EPS)``, as ``F.normalize`` and the reference."""

DEFAULT_CHUNK_BYTES = 64 << 20
"""Byte budget of the one similarity chunk (and its companion buffers) that either path keeps at a time."""

# A row counts as clamped (norm <= EPS, no projection term in the backward) when its inverse norm reaches 1/EPS up to
# fp32 rounding; rows with EPS < norm < EPS * (1 + 1e-5) are treated as clamped (an irrelevant band at 1e-12).
_CLAMPED_INV_NORM = (1.0 - 1e-5) / EPS

# fp16 cannot hold the small probabilities of a large softmax (P ~ 1/N is subnormal beyond N ~ 16k), so the fp16
# gradient chunk stores W = 2^12 * (P - onehot); the 2^-12 is folded into the fp32 epilogue.
_FP16_W_SCALE = 4096.0

_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit
def _info_nce_inv_norm_kernel(
    x_ptr,
    r_ptr,
    R,
    D,
    stride_x,
    eps,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # r[i] = 1 / max(||x_i||, eps)
    i_r = tl.program_id(0)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < R
    p_x = x_ptr + o_r.to(tl.int64)[:, None] * stride_x
    b_ss = tl.zeros([BLOCK_R], dtype=tl.float32)  # [BR]
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        b_x = tl.load(p_x + o_d[None, :], mask=m_r[:, None] & (o_d[None, :] < D), other=0.0).to(tl.float32)  # [BR, BD]
        b_ss += tl.sum(b_x * b_x, axis=1)
    tl.store(r_ptr + o_r, 1.0 / tl.maximum(tl.sqrt_rn(b_ss), eps), mask=m_r)


@triton.jit
def _info_nce_tile_logits(
    a_ptr,
    c_ptr,
    ra_ptr,
    rc_ptr,
    o_m,
    m_m,
    o_n,
    m_n,
    D,
    stride_a,
    stride_c,
    inv_tau,
    NORMALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    IN_PRECISION: tl.constexpr,
):
    # s[m, n] = ra[m] * rc[n] * <a_m, c_n> * inv_tau, with -inf in the columns n >= N
    p_a = a_ptr + o_m.to(tl.int64)[:, None] * stride_a
    p_c = c_ptr + o_n.to(tl.int64)[:, None] * stride_c
    b_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # [BM, BN]
    for k0 in range(0, D, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < D
        b_a = tl.load(p_a + o_k[None, :], mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BM, BK]
        b_c = tl.load(p_c + o_k[None, :], mask=m_n[:, None] & m_k[None, :], other=0.0)  # [BN, BK]
        if UPCAST:
            b_a = b_a.to(tl.float32)
            b_c = b_c.to(tl.float32)
        b_acc = tl.dot(b_a, tl.trans(b_c), b_acc, input_precision=IN_PRECISION)
    b_row = tl.full([BLOCK_M], 1.0, tl.float32) * inv_tau  # [BM]
    if NORMALIZE:
        b_row = b_row * tl.load(ra_ptr + o_m, mask=m_m, other=0.0)
        b_rc = tl.load(rc_ptr + o_n, mask=m_n, other=0.0)  # [BN]
        b_s = b_acc * b_row[:, None] * b_rc[None, :]
    else:
        b_s = b_acc * b_row[:, None]
    return tl.where(m_n[None, :], b_s, float("-inf"))  # [BM, BN]


@triton.jit
def _info_nce_fwd_kernel(
    a_ptr,
    c_ptr,
    ra_ptr,
    rc_ptr,
    pos_ptr,
    lse_ptr,
    spos_ptr,
    B,
    N,
    D,
    stride_a,
    stride_c,
    inv_tau,
    tiles_per_split,
    NORMALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    IN_PRECISION: tl.constexpr,
):
    # program (i_m, i_s): rows [i_m*BM, +BM) against the candidate tiles of split i_s -> the split's partial
    # lse[i_s, b]; the programs of split 0 also write the positive logit s[b, pos_b] (a row-wise dot, off the hot loop).
    i_m = tl.program_id(0)
    i_s = tl.program_id(1)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < B
    if i_s == 0:
        b_pos = tl.load(pos_ptr + o_m, mask=m_m, other=0)  # [BM] int64
        p_a = a_ptr + o_m.to(tl.int64)[:, None] * stride_a
        p_p = c_ptr + b_pos[:, None] * stride_c
        b_dot = tl.zeros([BLOCK_M], dtype=tl.float32)  # [BM]
        for k0 in range(0, D, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)
            m_k = m_m[:, None] & (o_k[None, :] < D)
            b_a = tl.load(p_a + o_k[None, :], mask=m_k, other=0.0).to(tl.float32)  # [BM, BK]
            b_p = tl.load(p_p + o_k[None, :], mask=m_k, other=0.0).to(tl.float32)  # [BM, BK]
            b_dot += tl.sum(b_a * b_p, axis=1)
        b_dot = b_dot * inv_tau
        if NORMALIZE:
            b_dot = b_dot * tl.load(ra_ptr + o_m, mask=m_m, other=0.0) * tl.load(rc_ptr + b_pos, mask=m_m, other=0.0)
        tl.store(spos_ptr + o_m, b_dot, mask=m_m)
    b_max = tl.full([BLOCK_M], float("-inf"), tl.float32)  # [BM] running max
    b_sum = tl.zeros([BLOCK_M], dtype=tl.float32)  # [BM] running sum of exp(s - max)
    n_start = i_s * tiles_per_split * BLOCK_N
    n_end = tl.minimum(N, n_start + tiles_per_split * BLOCK_N)
    for n0 in range(n_start, n_end, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        b_s = _info_nce_tile_logits(
            a_ptr, c_ptr, ra_ptr, rc_ptr, o_m, m_m, o_n, m_n, D, stride_a, stride_c, inv_tau,
            NORMALIZE, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, IN_PRECISION,
        )  # fmt: skip
        b_new = tl.maximum(b_max, tl.max(b_s, axis=1))  # [BM] finite: every tile has a valid column
        b_sum = b_sum * tl.exp(b_max - b_new) + tl.sum(tl.exp(b_s - b_new[:, None]), axis=1)
        b_max = b_new
    tl.store(lse_ptr + i_s.to(tl.int64) * B + o_m, b_max + tl.log(b_sum), mask=m_m)


@triton.jit
def _info_nce_bwd_ds_kernel(
    a_ptr,
    c_ptr,
    ra_ptr,
    rc_ptr,
    pos_ptr,
    lse_ptr,
    w_ptr,
    B,
    N,
    n_offset,
    D,
    stride_a,
    stride_c,
    stride_w,
    inv_tau,
    w_scale,
    NORMALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    IN_PRECISION: tl.constexpr,
):
    # W[b, j] = w_scale * (exp(s[b, n] - lse[b]) - [n == pos_b]) for n = n_offset + j < N (S recomputed)
    i_m = tl.program_id(0)
    i_n = tl.program_id(1)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < B
    o_j = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_n = n_offset + o_j
    m_n = o_n < N
    b_s = _info_nce_tile_logits(
        a_ptr, c_ptr, ra_ptr, rc_ptr, o_m, m_m, o_n, m_n, D, stride_a, stride_c, inv_tau,
        NORMALIZE, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, IN_PRECISION,
    )  # fmt: skip
    b_lse = tl.load(lse_ptr + o_m, mask=m_m, other=0.0)  # [BM]
    b_pos = tl.load(pos_ptr + o_m, mask=m_m, other=-1)  # [BM]
    b_p = tl.exp(b_s - b_lse[:, None]) - tl.where(o_n[None, :] == b_pos[:, None], 1.0, 0.0)  # [BM, BN]
    p_w = w_ptr + o_m.to(tl.int64)[:, None] * stride_w + o_j[None, :]
    tl.store(p_w, (b_p * w_scale).to(w_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _info_nce_bwd_gemm_kernel(
    l_ptr,
    v_ptr,
    r_ptr,
    out_ptr,
    M,
    K,
    D,
    stride_l,
    stride_v,
    stride_o,
    LHS_T: tl.constexpr,
    SCALE_V: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    IN_PRECISION: tl.constexpr,
):
    # out[m, d] (+)= sum_k L[m, k] * r[k] * V[k, d];  L[m, k] at l + k*stride_l + m if LHS_T else l + m*stride_l + k
    i_m = tl.program_id(0)
    i_d = tl.program_id(1)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < M
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # [BM, BD]
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        if LHS_T:
            p_l = l_ptr + o_k.to(tl.int64)[None, :] * stride_l + o_m[:, None]
        else:
            p_l = l_ptr + o_m.to(tl.int64)[:, None] * stride_l + o_k[None, :]
        b_l = tl.load(p_l, mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BM, BK]
        p_v = v_ptr + o_k.to(tl.int64)[:, None] * stride_v + o_d[None, :]
        b_v = tl.load(p_v, mask=m_k[:, None] & m_d[None, :], other=0.0)  # [BK, BD]
        if SCALE_V:
            b_r = tl.load(r_ptr + o_k, mask=m_k, other=0.0)  # [BK]
            b_v = b_v.to(tl.float32) * b_r[:, None]
        if UPCAST:
            b_l = b_l.to(tl.float32)
            b_v = b_v.to(tl.float32)
        else:
            b_v = b_v.to(b_l.dtype)
        b_acc = tl.dot(b_l, b_v, b_acc, input_precision=IN_PRECISION)
    p_o = out_ptr + o_m.to(tl.int64)[:, None] * stride_o + o_d[None, :]
    m_o = m_m[:, None] & m_d[None, :]
    if ACCUMULATE:
        b_acc += tl.load(p_o, mask=m_o, other=0.0)
    tl.store(p_o, b_acc, mask=m_o)


@triton.jit
def _info_nce_norm_bwd_kernel(
    x_ptr,
    v_ptr,
    r_ptr,
    g_ptr,
    out_ptr,
    R,
    D,
    stride_x,
    stride_v,
    stride_o,
    scale,
    clamped_inv_norm,
    NORMALIZE: tl.constexpr,
    HAS_G: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # out_i = scale * g_i * r_i * (x_i - r_i^2 <v_i, x_i> v_i)   (projection dropped when r_i >= clamped_inv_norm)
    # out_i = scale * g_i * x_i                                   (NORMALIZE False)
    i_r = tl.program_id(0)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < R
    o_r64 = o_r.to(tl.int64)
    p_x = x_ptr + o_r64[:, None] * stride_x
    p_v = v_ptr + o_r64[:, None] * stride_v
    p_o = out_ptr + o_r64[:, None] * stride_o
    b_mul = tl.full([BLOCK_R], 1.0, tl.float32) * scale  # [BR]
    if HAS_G:
        b_mul = b_mul * tl.load(g_ptr + o_r, mask=m_r, other=0.0)
    if NORMALIZE:
        b_r = tl.load(r_ptr + o_r, mask=m_r, other=0.0)  # [BR]
        b_dot = tl.zeros([BLOCK_R], dtype=tl.float32)  # [BR] <v_i, x_i>
        for d0 in range(0, D, BLOCK_D):
            o_d = d0 + tl.arange(0, BLOCK_D)
            m_x = m_r[:, None] & (o_d[None, :] < D)
            b_x = tl.load(p_x + o_d[None, :], mask=m_x, other=0.0)  # [BR, BD]
            b_v = tl.load(p_v + o_d[None, :], mask=m_x, other=0.0).to(tl.float32)  # [BR, BD]
            b_dot += tl.sum(b_x * b_v, axis=1)
        b_proj = tl.where(b_r < clamped_inv_norm, b_r * b_r * b_dot, 0.0)  # [BR]
        b_mul = b_mul * b_r
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_x = m_r[:, None] & (o_d[None, :] < D)
        b_x = tl.load(p_x + o_d[None, :], mask=m_x, other=0.0)  # [BR, BD]
        if NORMALIZE:
            b_v = tl.load(p_v + o_d[None, :], mask=m_x, other=0.0).to(tl.float32)  # [BR, BD]
            b_x = b_x - b_proj[:, None] * b_v
        tl.store(p_o + o_d[None, :], (b_x * b_mul[:, None]).to(out_ptr.dtype.element_ty), mask=m_x)


# ---------------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------------


def _config(d: int, dtype: torch.dtype) -> dict[str, dict[str, int]]:
    """Launch configuration of every kernel for feature size ``d`` and input ``dtype``.

    Sized for Hopper at D = 4096 bf16 (checked ahead of time by :func:`aot_specs`): 128 x 128 logits tiles over
    64-wide D slices, 3 pipeline stages (96 KiB of shared memory), 8 warps (64 fp32 accumulator registers per thread).
    fp32 inputs halve the K slice, the candidate tile of the logits and the D tile of the gradient GEMMs (3 x TF32
    products need the registers) and use 2 stages.
    """
    wide = dtype in (torch.float16, torch.bfloat16)
    block_k = max(16, min(64 if wide else 32, next_power_of_2(d)))
    tile = {"BLOCK_M": 128, "BLOCK_N": 128 if wide else 64, "BLOCK_K": block_k, "num_warps": 8}
    tile["num_stages"] = 3 if wide else 2
    gemm_d = max(16, min(128 if wide else 64, next_power_of_2(d)))  # fp32 (3 x TF32 products) needs half the tile
    gemm = {"BLOCK_M": 128, "BLOCK_D": gemm_d, "BLOCK_K": 64 if wide else 32}
    gemm.update(num_warps=8, num_stages=3 if wide else 2)
    rows_d = max(16, min(1024, next_power_of_2(d)))  # row kernels: 4096 elements per [BLOCK_R, BLOCK_D] block
    rows = {"BLOCK_R": max(1, min(64, 4096 // rows_d)), "BLOCK_D": rows_d, "num_warps": 4, "num_stages": 1}
    return {"fwd": dict(tile), "ds": dict(tile), "gemm": gemm, "rows": rows}


def _in_precision(dtype: torch.dtype) -> str:
    # fp32 inputs keep fp32 accuracy on tensor cores (3 x TF32); 16-bit inputs ignore the option.
    return "tf32x3" if dtype == torch.float32 else "tf32"


@cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_splits(row_blocks: int, n_tiles: int, device: torch.device) -> tuple[int, int]:
    """(splits, tiles_per_split): split the candidate tiles so that about 2 programs per SM run, none empty."""
    target = 2 * _sm_count(device.index or 0) if device.type == "cuda" else 4
    want = max(1, min(n_tiles, -(-target // row_blocks)))
    per = -(-n_tiles // want)
    return -(-n_tiles // per), per


def _inv_norms(x: torch.Tensor) -> torch.Tensor:
    cfg = _config(x.shape[1], x.dtype)["rows"]
    r = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)
    if x.shape[0] == 0:
        return r
    grid = (triton.cdiv(x.shape[0], cfg["BLOCK_R"]),)
    _info_nce_inv_norm_kernel[grid](
        x, r, x.shape[0], x.shape[1], x.stride(0), EPS,
        BLOCK_R=cfg["BLOCK_R"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
    )  # fmt: skip
    return r


def info_nce_fwd(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    positive_index: torch.Tensor,
    temperature: float,
    normalize: bool = True,
    *,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Triton forward. anchors ``[B, D]``, candidates ``[N, D]`` (row-contiguous, same dtype), positive_index ``[B]``
    int64 -> (loss ``[B]``, lse ``[B]``, ra ``[B]`` or None, rc ``[N]`` or None), all fp32.

    Grid ``(cdiv(B, BLOCK_M), splits)``: each program streams its share of the candidate tiles with an online
    log-sum-exp; the ``[splits, B]`` partials are merged with one ``logsumexp``. Memory beyond the inputs:
    ``4 * (B + N) + 4 * (splits + 1) * B`` bytes. No host synchronisation.
    """
    B, D = anchors.shape
    N = candidates.shape[0]
    dev = anchors.device
    ra = _inv_norms(anchors) if normalize else None
    rc = _inv_norms(candidates) if normalize else None
    if B == 0:
        empty = torch.zeros(0, device=dev, dtype=torch.float32)
        return empty, empty.clone(), ra, rc
    cfg = _config(D, anchors.dtype)["fwd"]
    row_blocks = triton.cdiv(B, cfg["BLOCK_M"])
    n_tiles = triton.cdiv(N, cfg["BLOCK_N"])
    if num_splits is None:
        splits, per = _num_splits(row_blocks, n_tiles, dev)
    else:
        per = -(-n_tiles // max(1, min(num_splits, n_tiles)))
        splits = -(-n_tiles // per)
    lse_part = torch.empty(splits, B, device=dev, dtype=torch.float32)
    spos = torch.empty(B, device=dev, dtype=torch.float32)
    dummy = lse_part
    _info_nce_fwd_kernel[(row_blocks, splits)](
        anchors, candidates, ra if normalize else dummy, rc if normalize else dummy, positive_index,
        lse_part, spos, B, N, D, anchors.stride(0), candidates.stride(0), 1.0 / temperature, per,
        NORMALIZE=normalize, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        UPCAST=upcast_in_kernel(), IN_PRECISION=_in_precision(anchors.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    lse = torch.logsumexp(lse_part, dim=0) if splits > 1 else lse_part[0]
    return lse - spos, lse, ra, rc


def _bwd_chunk_cols(B: int, D: int, elt: int, block_n: int, chunk_bytes: int) -> int:
    # One chunk holds W [B, Nc] (input dtype) and the fp32 candidate gradient rows Y [Nc, D]:
    #   bytes = Nc * (B * elt + 4 * D) <= chunk_bytes,  Nc a multiple of BLOCK_N (at least one tile).
    cols = chunk_bytes // max(1, B * elt + 4 * D)
    return max(block_n, cols // block_n * block_n)


def _chunk_ranges(n_grad: int, n_total: int, cols: int) -> list[tuple[int, int]]:
    # Chunks never straddle the grad / queue boundary, so a chunk either needs dC or does not.
    out = [(s, min(n_grad, s + cols)) for s in range(0, n_grad, cols)]
    return out + [(s, min(n_total, s + cols)) for s in range(n_grad, n_total, cols)]


def info_nce_bwd(
    grad_loss: torch.Tensor,
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    positive_index: torch.Tensor,
    lse: torch.Tensor,
    ra: torch.Tensor | None,
    rc: torch.Tensor | None,
    temperature: float,
    normalize: bool,
    num_grad_candidates: int,
    need_anchors: bool = True,
    need_candidates: bool = True,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Triton backward. grad_loss ``[B]`` (upstream gradient per anchor) -> (grad anchors ``[B, D]``, grad candidates
    ``[N, D]`` with rows ``>= num_grad_candidates`` zero), in the input dtype, None where not needed.

    Per candidate chunk of ``Nc`` columns (``Nc * (B * elt + 4 * D) <= chunk_bytes``):
    ``_info_nce_bwd_ds_kernel`` recomputes the logits tile by tile and stores ``W = kappa * (P - onehot)`` in the
    input dtype (tensor-core operand), then ``X += W @ (rc * C)`` accumulates the anchors' fp32 gradient rows and,
    for grad candidates only, ``Y = W^T @ (g * ra * A)`` gives the chunk's candidate gradient rows, which
    ``_info_nce_norm_bwd_kernel`` turns into the final gradient. Each output tile belongs to one program: no atomics.
    The ``[B, D]`` output is too wide to stay in registers at D = 4096, hence the W chunk rather than a
    flash-attention style register accumulator.
    """
    B, D = anchors.shape
    N = candidates.shape[0]
    M = num_grad_candidates
    dev, dtype = anchors.device, anchors.dtype
    need_candidates = need_candidates and M > 0
    grad_a = torch.empty_like(anchors) if need_anchors else None
    grad_c = torch.empty_like(candidates) if need_candidates else None
    if grad_c is not None and M < N:
        grad_c[M:].zero_()
    if B == 0:
        if grad_c is not None:
            grad_c.zero_()
        return grad_a, grad_c
    g = grad_loss.to(torch.float32).contiguous()  # [B]
    cfg = _config(D, dtype)
    t_cfg, g_cfg, r_cfg = cfg["ds"], cfg["gemm"], cfg["rows"]
    upcast, prec = upcast_in_kernel(), _in_precision(dtype)
    w_scale = _FP16_W_SCALE if dtype == torch.float16 else 1.0
    inv_tau = 1.0 / temperature
    cols = _bwd_chunk_cols(B, D, anchors.element_size(), t_cfg["BLOCK_N"], chunk_bytes)
    n_total = N if need_anchors else M
    cols = min(cols, triton.cdiv(max(n_total, 1), t_cfg["BLOCK_N"]) * t_cfg["BLOCK_N"])
    w = torch.empty(B, cols, device=dev, dtype=dtype)
    x = torch.zeros(B, D, device=dev, dtype=torch.float32) if need_anchors else None
    y = torch.empty(min(cols, M), D, device=dev, dtype=torch.float32) if need_candidates else None
    # dC operand scale per anchor: g_b * ra_b (the upstream gradient enters here, W stays in [-kappa, kappa])
    a_scale = g * ra if normalize else g
    dummy = g
    for n0, n1 in _chunk_ranges(M, n_total, cols):
        width = n1 - n0
        _info_nce_bwd_ds_kernel[(triton.cdiv(B, t_cfg["BLOCK_M"]), triton.cdiv(width, t_cfg["BLOCK_N"]))](
            anchors, candidates, ra if normalize else dummy, rc if normalize else dummy, positive_index, lse, w,
            B, n1, n0, D, anchors.stride(0), candidates.stride(0), w.stride(0), inv_tau, w_scale,
            NORMALIZE=normalize, BLOCK_M=t_cfg["BLOCK_M"], BLOCK_N=t_cfg["BLOCK_N"], BLOCK_K=t_cfg["BLOCK_K"],
            UPCAST=upcast, IN_PRECISION=prec, num_warps=t_cfg["num_warps"], num_stages=t_cfg["num_stages"],
        )  # fmt: skip
        gemm_kw = dict(
            BLOCK_M=g_cfg["BLOCK_M"], BLOCK_D=g_cfg["BLOCK_D"], BLOCK_K=g_cfg["BLOCK_K"], UPCAST=upcast,
            IN_PRECISION=prec, num_warps=g_cfg["num_warps"], num_stages=g_cfg["num_stages"],
        )  # fmt: skip
        d_blocks = triton.cdiv(D, g_cfg["BLOCK_D"])
        if need_anchors:  # X[b] += sum_j W[b, j] * rc[n0 + j] * C[n0 + j]
            _info_nce_bwd_gemm_kernel[(triton.cdiv(B, g_cfg["BLOCK_M"]), d_blocks)](
                w, candidates[n0:n1], rc[n0:n1] if normalize else dummy, x, B, width, D,
                w.stride(0), candidates.stride(0), x.stride(0),
                LHS_T=False, SCALE_V=normalize, ACCUMULATE=True, **gemm_kw,
            )  # fmt: skip
        if need_candidates and n1 <= M:  # Y[j] = sum_b W[b, j] * g_b * ra_b * A[b]
            _info_nce_bwd_gemm_kernel[(triton.cdiv(width, g_cfg["BLOCK_M"]), d_blocks)](
                w, anchors, a_scale, y, width, B, D, w.stride(0), anchors.stride(0), y.stride(0),
                LHS_T=True, SCALE_V=True, ACCUMULATE=False, **gemm_kw,
            )  # fmt: skip
            _norm_bwd(y[:width], candidates[n0:n1], rc[n0:n1] if normalize else None, None,
                      inv_tau / w_scale, grad_c[n0:n1], normalize, r_cfg)  # fmt: skip
    if need_anchors:
        _norm_bwd(x, anchors, ra, g, inv_tau / w_scale, grad_a, normalize, r_cfg)
    return grad_a, grad_c


def _norm_bwd(
    x: torch.Tensor,
    v: torch.Tensor,
    r: torch.Tensor | None,
    g: torch.Tensor | None,
    scale: float,
    out: torch.Tensor,
    normalize: bool,
    cfg: dict[str, int],
) -> None:
    R, D = x.shape
    dummy = x
    _info_nce_norm_bwd_kernel[(triton.cdiv(R, cfg["BLOCK_R"]),)](
        x, v, r if normalize else dummy, g if g is not None else dummy, out, R, D,
        x.stride(0), v.stride(0), out.stride(0), scale, _CLAMPED_INV_NORM,
        NORMALIZE=normalize, HAS_G=g is not None, BLOCK_R=cfg["BLOCK_R"], BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["num_warps"],
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Memory-bounded torch path (CPU fallback; same maths, fp32 throughout)
# ---------------------------------------------------------------------------------------------------------------------

_TORCH_MIN_COLS = 256  # below this many candidate columns per chunk the GEMMs get thin: split the anchors instead


def _torch_tiles(B: int, D: int, N: int, chunk_bytes: int) -> tuple[int, int]:
    """(rows, cols) of one torch chunk.

    Memory of one chunk, all fp32: logits/probabilities ``[rows, cols]`` + normalised candidates ``[cols, D]`` +
    candidate gradient rows ``[cols, D]``: ``4 * cols * (rows + 2 * D) <= chunk_bytes``. All anchors go in one row
    block when that leaves at least ``_TORCH_MIN_COLS`` columns. Example: B = N = 16,384, D = 256, 64 MiB ->
    992 columns, 17 chunks of 64 MiB instead of the 1.07 GB logits matrix.
    """
    cols = chunk_bytes // (4 * (B + 2 * D))
    if cols >= min(N, _TORCH_MIN_COLS):
        return max(1, B), max(1, min(N, cols))
    cols = max(1, min(N, _TORCH_MIN_COLS, chunk_bytes // (4 * (1 + 2 * D))))
    rows = max(1, chunk_bytes // (4 * cols) - 2 * D)
    return max(1, min(B, rows)), cols


def _torch_candidates(
    candidates: torch.Tensor, n0: int, n1: int, rc: torch.Tensor | None, buf: torch.Tensor | None, fresh_norms: bool
) -> torch.Tensor:
    """fp32 (normalised) candidate rows ``[n1 - n0, D]``; writes ``rc[n0:n1]`` when ``fresh_norms``."""
    c = candidates[n0:n1]
    if rc is None:
        return c if c.dtype == torch.float32 else buf[: n1 - n0].copy_(c)
    if fresh_norms:
        norms = torch.linalg.vector_norm(c, dim=1, dtype=torch.float32)
        torch.reciprocal(norms.clamp_min_(EPS), out=rc[n0:n1])
    return torch.mul(c, rc[n0:n1, None], out=buf[: n1 - n0])


def _torch_fwd(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    positive_index: torch.Tensor,
    temperature: float,
    normalize: bool,
    chunk_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Torch forward with the same outputs as :func:`info_nce_fwd`: online log-sum-exp over chunks of columns."""
    B, D = anchors.shape
    N = candidates.shape[0]
    dev = anchors.device
    f32 = dict(device=dev, dtype=torch.float32)
    a = anchors.float()
    ra = torch.linalg.vector_norm(a, dim=1).clamp_min_(EPS).reciprocal_() if normalize else None
    a_s = a * (ra / temperature)[:, None] if normalize else a / temperature  # [B, D] rows of a_hat / tau
    rc = torch.empty(N, **f32) if normalize else None
    rows, cols = _torch_tiles(B, D, N, chunk_bytes)
    s_buf = torch.empty(rows * cols, **f32)
    c_buf = torch.empty(cols, D, **f32) if normalize or candidates.dtype != torch.float32 else None
    run_max = torch.full((B,), float("-inf"), **f32)
    run_sum = torch.zeros(B, **f32)
    for n0 in range(0, N, cols):
        n1 = min(N, n0 + cols)
        c_hat = _torch_candidates(candidates, n0, n1, rc, c_buf, fresh_norms=True)  # [cols, D]
        for b0 in range(0, B, rows):
            b1 = min(B, b0 + rows)
            s = torch.mm(a_s[b0:b1], c_hat.t(), out=s_buf[: (b1 - b0) * (n1 - n0)].view(b1 - b0, n1 - n0))
            new_max = torch.maximum(run_max[b0:b1], s.amax(1))
            scaled = run_sum[b0:b1].mul_(torch.exp(run_max[b0:b1] - new_max))
            scaled.add_(s.sub_(new_max[:, None]).exp_().sum(1))  # in-place exp: no second [rows, cols] buffer
            run_max[b0:b1] = new_max
    lse = run_max.add_(run_sum.log_())
    c_pos = candidates.index_select(0, positive_index).float()  # [B, D]
    if normalize:
        c_pos.mul_(rc.index_select(0, positive_index)[:, None])
    s_pos = torch.linalg.vecdot(a_s, c_pos, dim=1)
    return lse - s_pos, lse, ra, rc


def _torch_norm_bwd(
    x: torch.Tensor, v: torch.Tensor, r: torch.Tensor | None, row_scale: torch.Tensor | float, normalize: bool
) -> torch.Tensor:
    """In place on fp32 ``x``: ``row_scale * r * (x - r^2 <v, x> v)`` (projection dropped for clamped rows)."""
    if normalize:
        vf = v.float()
        coef = r * r * torch.linalg.vecdot(vf, x, dim=1)
        coef = torch.where(r < _CLAMPED_INV_NORM, coef, 0.0)
        x.sub_(vf * coef[:, None])
        row_scale = row_scale * r
    if isinstance(row_scale, torch.Tensor):
        return x.mul_(row_scale[:, None])
    return x.mul_(row_scale)


def _torch_bwd(
    grad_loss: torch.Tensor,
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    positive_index: torch.Tensor,
    lse: torch.Tensor,
    ra: torch.Tensor | None,
    rc: torch.Tensor | None,
    temperature: float,
    normalize: bool,
    num_grad_candidates: int,
    need_anchors: bool = True,
    need_candidates: bool = True,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Torch backward with the contract of :func:`info_nce_bwd`.

    Per chunk: ``P - onehot = exp(addmm(-lse, a_hat / tau, c_hat^T))`` minus the positives (one scatter of B values),
    then ``X += (P - onehot) @ c_hat`` and, for grad candidates, ``Y = (P - onehot)^T @ (g * a_hat)``. Recomputing
    the logits costs 2BND more than keeping them; it is what bounds the memory.
    """
    B, D = anchors.shape
    N = candidates.shape[0]
    M = num_grad_candidates
    dev, dtype = anchors.device, anchors.dtype
    f32 = dict(device=dev, dtype=torch.float32)
    need_candidates = need_candidates and M > 0
    grad_c = torch.empty_like(candidates) if need_candidates else None
    if grad_c is not None and (M < N or B == 0):
        grad_c[M if B else 0 :].zero_()
    g = grad_loss.to(torch.float32)
    a = anchors.float()
    a_s = a * (ra / temperature)[:, None] if normalize else a / temperature  # [B, D]
    a_g = None  # [B, D] rows of g * a_hat: the dC operand
    if need_candidates:
        a_g = a * (g * ra)[:, None] if normalize else a * g[:, None]
    x = torch.zeros(B, D, **f32) if need_anchors else None
    n_total = N if need_anchors else M
    rows, cols = _torch_tiles(B, D, max(n_total, 1), chunk_bytes)
    p_buf = torch.empty(rows * cols, **f32)
    c_buf = torch.empty(cols, D, **f32) if normalize or candidates.dtype != torch.float32 else None
    y_buf = torch.empty(cols, D, **f32) if need_candidates else None
    neg_lse = lse.neg()[:, None]
    for n0, n1 in _chunk_ranges(M, n_total, cols):
        width = n1 - n0
        c_hat = _torch_candidates(candidates, n0, n1, rc, c_buf, fresh_norms=False)  # [width, D]
        grad_rows = need_candidates and n1 <= M
        y = y_buf[:width] if grad_rows and B else None
        for b0 in range(0, B, rows):
            b1 = min(B, b0 + rows)
            p = p_buf[: (b1 - b0) * width].view(b1 - b0, width)
            torch.addmm(neg_lse[b0:b1], a_s[b0:b1], c_hat.t(), out=p).exp_()  # P [rows, width]
            j = positive_index[b0:b1] - n0
            inside = (j >= 0) & (j < width)
            p.scatter_add_(1, j.clamp(0, width - 1)[:, None], inside.to(torch.float32).neg_()[:, None])  # P - onehot
            if x is not None:
                x[b0:b1].addmm_(p, c_hat)
            if y is not None:
                if b0 == 0:
                    torch.mm(p.t(), a_g[b0:b1], out=y)
                else:
                    y.addmm_(p.t(), a_g[b0:b1])
        if y is not None:
            rcc = rc[n0:n1] if normalize else None
            grad_c[n0:n1] = _torch_norm_bwd(y, candidates[n0:n1], rcc, 1.0 / temperature, normalize)
    grad_a = _torch_norm_bwd(x, anchors, ra, g / temperature, normalize).to(dtype) if need_anchors else None
    return grad_a, grad_c


_TORCH_FUSED_MIN_ROWS = 128  # fewer full logits rows per block make thin GEMMs that re-read all candidates


def _torch_fused_rows(B: int, D: int, N: int, dtype: torch.dtype, normalize: bool, chunk_bytes: int) -> int:
    """Anchor rows per block of the gradient-in-forward torch path, 0 when it does not fit the budget.

    Memory: the fp32 normalised candidates ``[N, D]`` (none for fp32 inputs without normalisation) + one block of
    full logits rows ``[rows, N]``: ``4 * N * D + 4 * rows * N <= chunk_bytes``. Example: B = N = 8192, D = 1024,
    64 MiB -> 1024 rows (32 MiB of candidates + 32 MiB of logits, against 256 MiB for the whole logits matrix).
    """
    c_bytes = 0 if dtype == torch.float32 and not normalize else 4 * N * D
    rows = (chunk_bytes - c_bytes) // (4 * max(N, 1))
    return min(B, rows) if B > 0 and rows >= min(B, _TORCH_FUSED_MIN_ROWS) else 0


def _torch_fwd_with_grads(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    positive_index: torch.Tensor,
    temperature: float,
    normalize: bool,
    num_grad_candidates: int,
    need_anchors: bool,
    need_candidates: bool,
    g: float,
    rows: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Torch forward that also forms the gradients for a uniform upstream gradient ``g`` per anchor.

    Blocks of ``rows`` anchors hold their full logits rows, so the softmax is final within the block and
    ``P - onehot`` feeds the two gradient GEMMs at once: 6BND in total instead of 8BND with a recompute. Returns
    (loss ``[B]``, fp32 grad anchors ``[B, D]``, fp32 grad candidates ``[M, D]``) for upstream gradient 1 on the
    reduced loss; the backward only scales them.
    """
    B, D = anchors.shape
    N = candidates.shape[0]
    M = num_grad_candidates
    f32 = dict(device=anchors.device, dtype=torch.float32)
    a = anchors.float()
    if normalize:
        ra = torch.linalg.vector_norm(a, dim=1).clamp_min_(EPS).reciprocal_()
        rc = torch.linalg.vector_norm(candidates, dim=1, dtype=torch.float32).clamp_min_(EPS).reciprocal_()
        c_hat = torch.mul(candidates, rc[:, None])  # [N, D] fp32, counted in the budget
        a_s = a * (ra / temperature)[:, None]  # [B, D] a_hat / tau
    else:
        ra = rc = None
        c_hat = candidates.float()
        a_s = a / temperature
    a_g = None  # [B, D] g * a_hat: the candidates' gradient operand
    if need_candidates:
        a_g = a * (g * ra)[:, None] if normalize else a * g
    loss = torch.empty(B, **f32)
    x = torch.empty(B, D, **f32) if need_anchors else None
    y = torch.zeros(M, D, **f32) if need_candidates else None
    s_buf = torch.empty(rows * N, **f32)
    for b0 in range(0, B, rows):
        b1 = min(B, b0 + rows)
        pos = positive_index[b0:b1, None]
        s = torch.mm(a_s[b0:b1], c_hat.t(), out=s_buf[: (b1 - b0) * N].view(b1 - b0, N))  # [rows, N] logits
        s_pos = s.gather(1, pos).squeeze(1)
        row_max = s.amax(1)
        row_sum = s.sub_(row_max[:, None]).exp_().sum(1)
        torch.sub(row_max.add_(row_sum.log()), s_pos, out=loss[b0:b1])
        s.mul_(row_sum.reciprocal_()[:, None]).scatter_add_(1, pos, s.new_full(pos.shape, -1.0))  # P - onehot
        if x is not None:
            torch.mm(s, c_hat, out=x[b0:b1])
        if y is not None:
            y.addmm_(s[:, :M].t(), a_g[b0:b1])
    grad_a = _torch_norm_bwd(x, anchors, ra, g / temperature, normalize) if need_anchors else None
    grad_c = None
    if need_candidates:
        grad_c = _torch_norm_bwd(y, candidates[:M], rc[:M] if normalize else None, 1.0 / temperature, normalize)
    return loss, grad_a, grad_c


# ---------------------------------------------------------------------------------------------------------------------
# autograd.Function
# ---------------------------------------------------------------------------------------------------------------------


class _InfoNCEFunction(torch.autograd.Function):
    """The reduced InfoNCE loss (fp32: scalar, or ``[B]`` for ``reduction="none"``).

    Saves the inputs, lse ``[B]`` and the inverse norms ``[B]``/``[N]`` for the recompute backward; or, on the torch
    path with a mean/sum reduction whose chunk fits, only the gradients formed in the forward.
    """

    @staticmethod
    def forward(
        ctx,
        anchors: torch.Tensor,
        candidates: torch.Tensor,
        positive_index: torch.Tensor,
        temperature: float,
        normalize: bool,
        num_grad_candidates: int,
        reduction: str,
        backend: str,
        chunk_bytes: int,
    ) -> torch.Tensor:
        B, D = anchors.shape
        N = candidates.shape[0]
        need_a, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1] and num_grad_candidates > 0
        ctx.set_materialize_grads(False)
        ctx.num_grad_candidates, ctx.reduction = num_grad_candidates, reduction
        ctx.anchors_dtype, ctx.candidates_meta = anchors.dtype, (candidates.shape, candidates.dtype, candidates.device)
        rows = 0
        if backend == "torch" and reduction != "none" and (need_a or need_c):
            rows = _torch_fused_rows(B, D, N, anchors.dtype, normalize, chunk_bytes)
        ctx.fused = rows > 0
        if ctx.fused:
            g = 1.0 / B if reduction == "mean" else 1.0
            loss, grad_a, grad_c = _torch_fwd_with_grads(
                anchors, candidates, positive_index, temperature, normalize, num_grad_candidates, need_a, need_c,
                g, rows,
            )  # fmt: skip
            ctx.save_for_backward(grad_a, grad_c)
        else:
            if backend == "triton":
                loss, lse, ra, rc = info_nce_fwd(anchors, candidates, positive_index, temperature, normalize)
            else:
                loss, lse, ra, rc = _torch_fwd(anchors, candidates, positive_index, temperature, normalize, chunk_bytes)
            ctx.save_for_backward(anchors, candidates, positive_index, lse, ra, rc)
            ctx.temperature, ctx.normalize, ctx.backend, ctx.chunk_bytes = temperature, normalize, backend, chunk_bytes
        if reduction == "mean":
            return loss.sum() / max(1, B)  # B = 0 gives 0, not NaN
        return loss.sum() if reduction == "sum" else loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor | None):
        none = (None,) * 7
        if grad_out is None:
            return None, None, *none
        if ctx.fused:
            grad_a, grad_c = ctx.saved_tensors
            scale = grad_out.to(torch.float32)
            if grad_a is not None:
                grad_a = (grad_a * scale).to(ctx.anchors_dtype)
            if grad_c is not None:
                shape, dtype, device = ctx.candidates_meta
                full = torch.empty(shape, dtype=dtype, device=device)
                full[: grad_c.shape[0]] = grad_c * scale
                full[grad_c.shape[0] :].zero_()
                grad_c = full
            return grad_a, grad_c, *none
        anchors, candidates, positive_index, lse, ra, rc = ctx.saved_tensors
        B = anchors.shape[0]
        g = grad_out.to(torch.float32)
        if ctx.reduction != "none":
            g = (g / max(1, B) if ctx.reduction == "mean" else g).expand(B)
        bwd = info_nce_bwd if ctx.backend == "triton" else _torch_bwd
        grad_a, grad_c = bwd(
            g, anchors, candidates, positive_index, lse, ra, rc, ctx.temperature, ctx.normalize,
            ctx.num_grad_candidates, ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.chunk_bytes,
        )  # fmt: skip
        return grad_a, grad_c, *none


# ---------------------------------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------------------------------

_REDUCTIONS = ("mean", "sum", "none")


def _check_temperature(temperature: float | torch.Tensor) -> float:
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1 or temperature.requires_grad:
            raise ValueError("temperature must be a Python number or a one-element tensor without gradient")
        temperature = temperature.item()  # one host synchronisation
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a positive number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    return float(temperature)


def _check_inputs(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    positive_index: torch.Tensor,
    reduction: str,
    num_grad_candidates: int | None,
    chunk_bytes: int | None,
) -> int:
    check_float("anchors", anchors)
    check_float("candidates", candidates)
    check_int("positive_index", positive_index)
    check_ndim("anchors", anchors, 2)
    check_ndim("candidates", candidates, 2)
    check_ndim("positive_index", positive_index, 1)
    check_same_device(anchors=anchors, candidates=candidates, positive_index=positive_index)
    if anchors.shape[1] != candidates.shape[1]:
        raise ValueError(
            f"anchors and candidates must have the same feature size D, got anchors {tuple(anchors.shape)} and "
            f"candidates {tuple(candidates.shape)}"
        )
    if anchors.dtype != candidates.dtype:
        raise TypeError(f"anchors and candidates must have one dtype, got {anchors.dtype} and {candidates.dtype}")
    if positive_index.shape[0] != anchors.shape[0]:
        raise ValueError(
            f"positive_index must have one entry per anchor: shape {tuple(positive_index.shape)} for "
            f"{anchors.shape[0]} anchors"
        )
    N = candidates.shape[0]
    if N == 0:
        raise ValueError("candidates must have at least one row")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if num_grad_candidates is None:
        num_grad_candidates = N
    if isinstance(num_grad_candidates, bool) or not isinstance(num_grad_candidates, int):
        raise TypeError(f"num_grad_candidates must be an int or None, got {type(num_grad_candidates).__name__}")
    if not 0 <= num_grad_candidates <= N:
        raise ValueError(f"num_grad_candidates must be in 0..{N} (the number of candidates), got {num_grad_candidates}")
    if chunk_bytes is not None and (
        isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1
    ):
        raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
    return num_grad_candidates


def _check_positive_range(positive_index: torch.Tensor, n: int) -> None:
    bad = (positive_index < 0) | (positive_index >= n)
    if positive_index.numel() and bool(bad.any()):  # one host synchronisation
        first = int(bad.nonzero()[0, 0])
        raise IndexError(
            f"positive_index must index into the {n} candidates (0..{n - 1}); "
            f"positive_index[{first}] = {int(positive_index[first])}"
        )


def _row_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def info_nce(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    positive_index: torch.Tensor,
    temperature: float,
    *,
    normalize: bool = True,
    reduction: str = "mean",
    num_grad_candidates: int | None = None,
    backend: str = "auto",
    validate: bool = True,
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """InfoNCE of each anchor against all candidates, without the ``[B, N]`` similarity matrix.

    ``s[b, n] = <a_hat_b, c_hat_n> / temperature`` with ``x_hat = x / max(||x||, 1e-12)`` (``normalize=True``,
    cosine similarity) or ``x_hat = x``; ``loss[b] = logsumexp_n s[b, n] - s[b, positive_index[b]]``.

    Args:
        anchors: ``[B, D]`` float32/float16/bfloat16.
        candidates: ``[N, D]``, same dtype and device (local targets, gathered targets, then the queue).
        positive_index: ``[B]`` integer, the candidate row of each anchor's positive.
        temperature: ``tau > 0``.
        normalize: fuse the cosine normalisation (on by default).
        reduction: ``"mean"`` (fp32 scalar), ``"sum"`` (fp32 scalar) or ``"none"`` (fp32 ``[B]``).
        num_grad_candidates: ``M`` in ``0..N`` (default N): only ``candidates[:M]`` receive gradients; the rows
            ``M:`` are a detached queue. With one leaf tensor ``candidates`` that requires grad, ``candidates.grad``
            is ``[N, D]`` with rows ``M:`` exactly zero (no gradient at all when ``M = 0``). The usual caller passes
            ``torch.cat([live, queue.detach()])`` with ``M = len(live)``, and ``live.grad`` receives rows ``:M``.
            Anchors always get their full gradient, through queued candidates too.
        backend: ``"auto"`` (Triton on CUDA or under ``TRITON_INTERPRET=1``, else torch), ``"triton"``, ``"torch"``
            (memory-bounded, runs anywhere) or ``"reference"`` (dense fp32 oracle).
        validate: check that every positive index lies in ``0..N-1``; costs one host synchronisation (a device to
            host copy of one bool). Pass False in a synchronisation-free hot loop once the indices are trusted.
        chunk_bytes: memory budget of the one similarity chunk kept at a time (default 64 MiB); the Triton forward
            needs no chunk at all, its backward and both torch passes use one.

    Returns:
        fp32 loss: scalar for ``"mean"``/``"sum"``, ``[B]`` for ``"none"``. Zero anchors (B = 0) give 0 (never NaN).

    Work: 8BND for forward + backward where the logits are recomputed chunk by chunk, 6BND on the torch path when a
    mean/sum loss forms its gradients in the forward (see the module docstring). Memory beyond inputs and gradients:
    one chunk of at most ``chunk_bytes`` plus O(B + N) fp32 vectors and fp32 ``[B, D]`` / ``[M, D]`` gradient rows.
    """
    num_grad_candidates = _check_inputs(
        anchors, candidates, positive_index, reduction, num_grad_candidates, chunk_bytes
    )
    temperature = _check_temperature(temperature)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    backend = resolve_backend(backend, anchors, candidates)
    if validate:
        _check_positive_range(positive_index, candidates.shape[0])
    if backend == "reference":
        return info_nce_ref(
            anchors, candidates, positive_index, temperature, normalize=normalize, reduction=reduction,
            num_grad_candidates=num_grad_candidates,
        )  # fmt: skip
    return _InfoNCEFunction.apply(
        _row_contiguous(anchors), _row_contiguous(candidates), positive_index.to(torch.int64).contiguous(),
        temperature, normalize, num_grad_candidates, reduction, backend, chunk_bytes or DEFAULT_CHUNK_BYTES,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation specs
# ---------------------------------------------------------------------------------------------------------------------


def aot_specs(d: int = 4096, dtype: torch.dtype = torch.bfloat16) -> list[AOTSpec]:
    """Every Triton kernel of this op at the configuration the launchers use for ``D = d`` inputs of ``dtype``.

    ``extra["int_args"]`` gives the integer launch values of a representative call (B = 512 anchors, N = 65,536
    candidates, the default 64 MiB backward chunk) so the checker specialises them as the JIT would (multiples of 16).
    """
    cfg = _config(d, dtype)
    ty = _TRITON_DTYPES[dtype]
    prec = _in_precision(dtype)
    t, g, r = cfg["fwd"], cfg["gemm"], cfg["rows"]
    n_b, n_c = 512, 65536
    cols = _bwd_chunk_cols(n_b, d, dtype.itemsize, cfg["ds"]["BLOCK_N"], DEFAULT_CHUNK_BYTES)
    tile_c = dict(BLOCK_M=t["BLOCK_M"], BLOCK_N=t["BLOCK_N"], BLOCK_K=t["BLOCK_K"], UPCAST=False, IN_PRECISION=prec)
    gemm_c = dict(BLOCK_M=g["BLOCK_M"], BLOCK_D=g["BLOCK_D"], BLOCK_K=g["BLOCK_K"], UPCAST=False, IN_PRECISION=prec)
    rows_c = dict(BLOCK_R=r["BLOCK_R"], BLOCK_D=r["BLOCK_D"])
    rows_w = dict(num_warps=r["num_warps"], num_stages=r["num_stages"])
    gemm_w = dict(num_warps=g["num_warps"], num_stages=g["num_stages"], gemm=True)
    tile_w = dict(num_warps=t["num_warps"], num_stages=t["num_stages"], gemm=True)
    gemm_sig = {
        "l_ptr": f"*{ty}", "v_ptr": f"*{ty}", "r_ptr": "*fp32", "out_ptr": "*fp32",
        "M": "i32", "K": "i32", "D": "i32", "stride_l": "i32", "stride_v": "i32", "stride_o": "i32",
    }  # fmt: skip
    norm_sig = {
        "x_ptr": "*fp32", "v_ptr": f"*{ty}", "r_ptr": "*fp32", "g_ptr": "*fp32", "out_ptr": f"*{ty}",
        "R": "i32", "D": "i32", "stride_x": "i32", "stride_v": "i32", "stride_o": "i32", "scale": "fp32",
        "clamped_inv_norm": "fp32",
    }  # fmt: skip
    tile_sig = {
        "a_ptr": f"*{ty}", "c_ptr": f"*{ty}", "ra_ptr": "*fp32", "rc_ptr": "*fp32", "pos_ptr": "*i64",
        "B": "i32", "N": "i32", "D": "i32", "stride_a": "i32", "stride_c": "i32", "inv_tau": "fp32",
    }  # fmt: skip
    tile_ints = {"B": n_b, "N": n_c, "D": d, "stride_a": d, "stride_c": d}
    norm_ints = {"R": n_b, "D": d, "stride_x": d, "stride_v": d, "stride_o": d}
    return [
        AOTSpec(
            name="info_nce_inv_norm",
            fn=_info_nce_inv_norm_kernel,
            signature={"x_ptr": f"*{ty}", "r_ptr": "*fp32", "R": "i32", "D": "i32", "stride_x": "i32", "eps": "fp32"},
            constexprs=rows_c,
            extra={"int_args": {"R": n_c, "D": d, "stride_x": d}},
            **rows_w,
        ),
        AOTSpec(
            name="info_nce_fwd",
            fn=_info_nce_fwd_kernel,
            signature={**tile_sig, "lse_ptr": "*fp32", "spos_ptr": "*fp32", "tiles_per_split": "i32"},
            constexprs={"NORMALIZE": True, **tile_c},
            extra={"int_args": {**tile_ints, "tiles_per_split": 8}},
            **tile_w,
        ),
        AOTSpec(
            name="info_nce_bwd_ds",
            fn=_info_nce_bwd_ds_kernel,
            signature={
                **tile_sig,
                "lse_ptr": "*fp32",
                "w_ptr": f"*{ty}",
                "n_offset": "i32",
                "stride_w": "i32",
                "w_scale": "fp32",
            },  # fmt: skip
            constexprs={"NORMALIZE": True, **tile_c},
            extra={"int_args": {**tile_ints, "N": cols, "n_offset": cols, "stride_w": cols}},
            **tile_w,
        ),
        AOTSpec(
            name="info_nce_bwd_gemm_anchors",
            fn=_info_nce_bwd_gemm_kernel,
            signature=dict(gemm_sig),
            constexprs={"LHS_T": False, "SCALE_V": True, "ACCUMULATE": True, **gemm_c},
            extra={"int_args": {"M": n_b, "K": cols, "D": d, "stride_l": cols, "stride_v": d, "stride_o": d}},
            **gemm_w,
        ),
        AOTSpec(
            name="info_nce_bwd_gemm_candidates",
            fn=_info_nce_bwd_gemm_kernel,
            signature=dict(gemm_sig),
            constexprs={"LHS_T": True, "SCALE_V": True, "ACCUMULATE": False, **gemm_c},
            extra={"int_args": {"M": cols, "K": n_b, "D": d, "stride_l": cols, "stride_v": d, "stride_o": d}},
            **gemm_w,
        ),
        AOTSpec(
            name="info_nce_norm_bwd_anchors",
            fn=_info_nce_norm_bwd_kernel,
            signature=dict(norm_sig),
            constexprs={"NORMALIZE": True, "HAS_G": True, **rows_c},
            extra={"int_args": dict(norm_ints)},
            **rows_w,
        ),
        AOTSpec(
            name="info_nce_norm_bwd_candidates",
            fn=_info_nce_norm_bwd_kernel,
            signature=dict(norm_sig),
            constexprs={"NORMALIZE": True, "HAS_G": False, **rows_c},
            extra={"int_args": {**norm_ints, "R": cols}},
            **rows_w,
        ),
    ]
