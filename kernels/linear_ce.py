"""Fused linear cross-entropy: the LM head and the summed next-token loss in one op that never holds the logits.

For the counted rows (``labels[i] != ignore_index``; the others are never read, so they may hold NaN)::

    z[i, v]  = logit_scale * <h_i, w_v>                      (the model's logit scaling, 1 for most models)
    s[i, v]  = c * tanh(z[i, v] / c)   with softcap c,  else s = z
    lse[i]   = logsumexp_v s[i, v]          loss_sum = sum_i (lse[i] - s[i, y_i])          count = #counted rows
    P[i, v]  = exp(s[i, v] - lse[i])
    dZ[i, v] = logit_scale * (P[i, v] - [v == y_i]) * (1 - (s[i, v] / c)^2)   (the last factor only with a softcap)
    d h_i    = g * sum_v dZ[i, v] w_v          d w_v = g * sum_i dZ[i, v] h_i          (g: upstream gradient)

Gradients are formed in the forward. The loss is a sum with one scalar upstream gradient ``g``, so the forward can
form ``dZ`` for each row chunk while the chunk's logits are at hand, run both gradient GEMMs on it, and keep only the
fp32 gradients. Backward then multiplies them by ``g`` and nothing else. That is 6NDV FLOPs in all (Liger's choice).
CCE instead stores only the log-sum-exp and recomputes the logits tile by tile in backward: 8NDV FLOPs, for an
upstream gradient per row (``reduction="none"``) and an almost free no-grad forward. Here the per-row gradient is
never needed, and forward-time gradients also suit ZeRO-3: the gathered head weight is read in the forward only, so
the backward gathers nothing. A no-grad call (evaluation) forms no gradients at all: it runs the loss-only pass.
The fp32 gradients exist from the forward on instead of from the backward on, but the LM head is the last layer, so
its gradient would be the first one the backward allocates anyway.

Paths (``backend``): ``"triton"`` (CUDA, or the interpreter in tests), ``"torch"`` (memory-bounded, what runs on
CPU), ``"reference"`` (:func:`alignx.kernels.reference.linear_cross_entropy_ref`, dense fp32 logits). Both fused
paths pick the counted rows first (one host synchronisation for their number), so ignored rows cost no FLOPs and
their values never reach the loss or a gradient. Then, per chunk of rows:

- torch: the fp32 logits chunk (stored transposed, ``[V, rows]``) by one GEMM; log-sum-exp, softmax, minus one-hot
  and the soft-cap derivative in place on that buffer, which becomes ``dZ``; then ``dH[rows] = dZ @ W`` and
  ``dW += dZ^T @ H[rows]`` (fp32 accumulator).
- Triton: ``_lce_fwd_kernel`` runs tensor-core tiles ``[BLOCK_N, BLOCK_V]`` over V with an online log-sum-exp,
  storing the fp32 logits chunk (before the soft-cap); ``_lce_dz_kernel`` turns it into ``dZ`` (bf16/fp16: the
  tensor-core operand of the next two GEMMs); ``_lce_gemm_kernel`` forms ``dH`` (split over V, fp32 atomics) and
  ``dW`` (fp32 accumulator, one program per output tile). Without gradients, ``_lce_fwd_kernel`` alone gives the
  loss and stores nothing.

Options: ``softcap`` (Gemma 2's ``final_logit_softcapping``), ``logit_scale`` (Cohere's ``logit_scale``; Granite's
``logits_scaling`` divides, i.e. ``logit_scale = 1 / logits_scaling``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import cache
from typing import Any

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from alignx.constants import IGNORE_INDEX

from ._common import (
    AOTSpec,
    check_float,
    check_int,
    check_same_device,
    next_power_of_2,
    resolve_backend,
    upcast_in_kernel,
)
from .reference import linear_cross_entropy_ref
from .span_pool import _round_bf16_rtne

__all__ = [
    "CE_CHUNK_ELEMENTS",
    "DEFAULT_CHUNK_BYTES",
    "TRITON_CHUNK_BYTES",
    "aot_specs",
    "cross_entropy_sum",
    "lce_fwd",
    "lce_fwd_with_grads",
    "linear_cross_entropy",
]

DEFAULT_CHUNK_BYTES = 256 << 20
"""Byte budget of the torch path's one fp32 logits chunk (the Triton path's is :data:`TRITON_CHUNK_BYTES`).

Memory of the torch path beyond inputs and gradients: the fp32 chunk ``[V, rows]`` with ``rows = budget / (4 V)``,
a ``[4096, rows]`` fp32 soft-cap scratch (at most 4 MiB), fp32 copies of the counted hidden rows and their gradient
``[n, D]`` (and an fp32 copy of a 16-bit weight on CPU, ``4 V D``). Gemma-3-270M (V = 262,144, D = 640), 2,048
tokens: 256-row chunks of 256 MiB where the dense head writes 2 GiB of fp32 logits, then 2 GiB of log-softmax and
2 GiB of logits gradient. Each chunk also reads ``W`` twice and reads and writes the fp32 ``dW`` once (``16 V D``
bytes) for ``6 rows V D`` FLOPs: 256 rows make that traffic a few per cent of a CPU GEMM's time.
"""

TRITON_CHUNK_BYTES = 1 << 30
"""Byte budget of the Triton path's chunk: fp32 logits + ``dZ`` in the input dtype, ``rows * V * (4 + elt)``.

Larger than the torch path's because each chunk reads and writes the fp32 ``dW`` accumulator once: ``8 V D`` bytes
against ``2 rows V D`` FLOPs of its GEMM, an intensity of ``rows / 4`` FLOP/byte, above an H100's ridge (~300) from
about 1,200 rows on. 1 GiB: 1,280 rows of a 128,256 bf16 vocabulary, 640 rows of 262,144 (analytic, not measured).
"""

# fp16 cannot hold the small probabilities of a large softmax (P ~ 1 / V is subnormal beyond V ~ 16k), so the fp16
# dZ chunk holds 2^12 * dZ; the 2^-12 is applied with the upstream gradient.
_FP16_DZ_SCALE = 4096.0

# Vocabulary rows of the soft-cap scratch of the torch path: t = s / c and exp(s - max) coexist only in [4096, rows]
# blocks.
_SOFTCAP_BLOCK = 4096

_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit
def _lce_softcap(z, cap):
    # cap * tanh(z / cap) = cap - 2 cap / (exp(2 z / cap) + 1): exp -> inf gives cap, exp -> 0 gives -cap
    return cap - (2.0 * cap) / (tl.exp(z * (2.0 / cap)) + 1.0)


@triton.jit
def _lce_fwd_kernel(
    h_ptr,
    w_ptr,
    y_ptr,
    z_ptr,
    lse_ptr,
    sy_ptr,
    N,
    V,
    D,
    stride_h,
    stride_w,
    stride_z,
    scale,
    cap,
    tiles_per_split,
    SOFTCAP: tl.constexpr,
    STORE_Z: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    IN_PRECISION: tl.constexpr,
):
    # program (i_n, i_s): rows [i_n*BN, +BN) against the vocabulary tiles of split i_s -> the split's partial
    # lse[i_s, row] (online over its tiles); with STORE_Z the logits z[row, v] (before the soft-cap) into z_ptr.
    # Split 0 also writes s[row, y].
    i_n = tl.program_id(0)
    i_s = tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    m_n = o_n < N
    p_h = h_ptr + o_n.to(tl.int64)[:, None] * stride_h  # [BN, 1]
    if i_s == 0:
        b_y = tl.load(y_ptr + o_n, mask=m_n, other=0)  # [BN] int64
        p_y = w_ptr + b_y[:, None] * stride_w
        b_dot = tl.zeros([BLOCK_N], dtype=tl.float32)  # [BN]
        for k0 in range(0, D, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)
            m_k = m_n[:, None] & (o_k[None, :] < D)
            b_h = tl.load(p_h + o_k[None, :], mask=m_k, other=0.0).to(tl.float32)  # [BN, BK]
            b_wy = tl.load(p_y + o_k[None, :], mask=m_k, other=0.0).to(tl.float32)  # [BN, BK]
            b_dot += tl.sum(b_h * b_wy, axis=1)
        b_sy = b_dot * scale
        if SOFTCAP:
            b_sy = _lce_softcap(b_sy, cap)
        tl.store(sy_ptr + o_n, b_sy, mask=m_n)
    b_max = tl.full([BLOCK_N], float("-inf"), tl.float32)  # [BN] running max
    b_sum = tl.zeros([BLOCK_N], dtype=tl.float32)  # [BN] running sum of exp(s - max)
    v_start = i_s * tiles_per_split * BLOCK_V
    v_end = tl.minimum(V, v_start + tiles_per_split * BLOCK_V)
    for v0 in range(v_start, v_end, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)  # [BV]
        m_v = o_v < V
        p_w = w_ptr + o_v.to(tl.int64)[:, None] * stride_w  # [BV, 1]
        b_acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)  # [BN, BV]
        for k0 in range(0, D, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)
            m_k = o_k < D
            b_h = tl.load(p_h + o_k[None, :], mask=m_n[:, None] & m_k[None, :], other=0.0)  # [BN, BK]
            b_w = tl.load(p_w + o_k[None, :], mask=m_v[:, None] & m_k[None, :], other=0.0)  # [BV, BK]
            if UPCAST:
                b_h = b_h.to(tl.float32)
                b_w = b_w.to(tl.float32)
            b_acc = tl.dot(b_h, tl.trans(b_w), b_acc, input_precision=IN_PRECISION)
        b_s = b_acc * scale  # [BN, BV]
        if STORE_Z:  # before the soft-cap, which _lce_dz_kernel recomputes: fewer live registers here
            p_z = z_ptr + o_n.to(tl.int64)[:, None] * stride_z + o_v[None, :]
            tl.store(p_z, b_s, mask=m_n[:, None] & m_v[None, :])
        if SOFTCAP:
            b_s = _lce_softcap(b_s, cap)
        b_s = tl.where(m_v[None, :], b_s, float("-inf"))
        b_new = tl.maximum(b_max, tl.max(b_s, axis=1))  # [BN] finite: every tile has a valid column
        b_sum = b_sum * tl.exp(b_max - b_new) + tl.sum(tl.exp(b_s - b_new[:, None]), axis=1)
        b_max = b_new
    tl.store(lse_ptr + i_s.to(tl.int64) * N + o_n, b_max + tl.log(b_sum), mask=m_n)


@triton.jit
def _lce_dz_kernel(
    z_ptr,
    lse_ptr,
    y_ptr,
    dz_ptr,
    N,
    V,
    stride_z,
    stride_dz,
    scale,
    cap,
    SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # dZ[n, v] = scale * (exp(s[n, v] - lse[n]) - [v == y_n]) * (1 - (s[n, v] / cap)^2 if SOFTCAP), s = softcap(z)
    i_n = tl.program_id(0)
    i_v = tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    m_n = o_n < N
    o_v = i_v * BLOCK_V + tl.arange(0, BLOCK_V)  # [BV]
    m_nv = m_n[:, None] & (o_v[None, :] < V)
    o_n64 = o_n.to(tl.int64)
    b_s = tl.load(z_ptr + o_n64[:, None] * stride_z + o_v[None, :], mask=m_nv, other=0.0)  # [BN, BV]
    if SOFTCAP:
        b_s = _lce_softcap(b_s, cap)
    b_lse = tl.load(lse_ptr + o_n, mask=m_n, other=0.0)  # [BN]
    b_y = tl.load(y_ptr + o_n, mask=m_n, other=-1)  # [BN]
    b_dz = tl.exp(b_s - b_lse[:, None]) - tl.where(o_v[None, :] == b_y[:, None], 1.0, 0.0)
    if SOFTCAP:
        b_t = b_s / cap
        b_dz = b_dz * (1.0 - b_t * b_t)
    b_dz = b_dz * scale
    if UPCAST and dz_ptr.dtype.element_ty == tl.bfloat16:
        b_dz = _round_bf16_rtne(b_dz)
    p_dz = dz_ptr + o_n64[:, None] * stride_dz + o_v[None, :]
    tl.store(p_dz, b_dz.to(dz_ptr.dtype.element_ty), mask=m_nv)


@triton.jit
def _lce_gemm_kernel(
    l_ptr,
    r_ptr,
    out_ptr,
    M,
    K,
    D,
    stride_l,
    stride_r,
    stride_o,
    k_per_split,
    LHS_T: tl.constexpr,
    ATOMIC: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    IN_PRECISION: tl.constexpr,
):
    # out[m, d] (+)= sum_{k in split i_k} L[m, k] * R[k, d]
    # L[m, k] at l + k*stride_l + m if LHS_T else l + m*stride_l + k
    # ATOMIC: fp32 atomic add (split K over the grid's third axis); ACCUMULATE: load-add-store (one program per tile)
    i_m = tl.program_id(0)
    i_d = tl.program_id(1)
    i_k = tl.program_id(2)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    m_m = o_m < M
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    m_d = o_d < D
    k_start = i_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # [BM, BD]
    for k0 in range(k_start, k_end, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        m_k = o_k < k_end
        if LHS_T:
            p_l = l_ptr + o_k.to(tl.int64)[None, :] * stride_l + o_m[:, None]
        else:
            p_l = l_ptr + o_m.to(tl.int64)[:, None] * stride_l + o_k[None, :]
        b_l = tl.load(p_l, mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BM, BK]
        p_r = r_ptr + o_k.to(tl.int64)[:, None] * stride_r + o_d[None, :]
        b_r = tl.load(p_r, mask=m_k[:, None] & m_d[None, :], other=0.0)  # [BK, BD]
        if UPCAST:
            b_l = b_l.to(tl.float32)
            b_r = b_r.to(tl.float32)
        b_acc = tl.dot(b_l, b_r, b_acc, input_precision=IN_PRECISION)
    p_o = out_ptr + o_m.to(tl.int64)[:, None] * stride_o + o_d[None, :]
    m_o = m_m[:, None] & m_d[None, :]
    if ATOMIC:
        tl.atomic_add(p_o, b_acc, mask=m_o)
    else:
        if ACCUMULATE:
            b_acc += tl.load(p_o, mask=m_o, other=0.0)
        tl.store(p_o, b_acc, mask=m_o)


# ---------------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------------


def _config(d: int, dtype: torch.dtype) -> dict[str, dict[str, int]]:
    """Launch configuration of every kernel for hidden size ``d`` and input ``dtype``.

    Sized for Hopper (checked ahead of time by :func:`aot_specs` for sm_90a and sm_80): 128 x 128 logits tiles over
    64-wide D slices, 3 pipeline stages (96 KiB of shared memory), 8 warps (64 fp32 accumulator registers per
    thread), the same tile for the gradient GEMMs. fp32 inputs halve the vocabulary tile, the D tile of the GEMMs and
    the K slice (3 x TF32 products need the registers) and use 2 stages. ``dZ`` tiles: [16, 256], 4 warps.
    """
    wide = dtype in (torch.float16, torch.bfloat16)
    block_k = max(16, min(64 if wide else 32, next_power_of_2(d)))
    fwd = {"BLOCK_N": 128, "BLOCK_V": 128 if wide else 64, "BLOCK_K": block_k, "num_warps": 8}
    fwd["num_stages"] = 3 if wide else 2
    gemm_d = max(16, min(128 if wide else 64, next_power_of_2(d)))
    gemm = {"BLOCK_M": 128, "BLOCK_D": gemm_d, "BLOCK_K": 64 if wide else 32}
    gemm.update(num_warps=8, num_stages=3 if wide else 2)
    dz = {"BLOCK_N": 16, "BLOCK_V": 256, "num_warps": 4, "num_stages": 1}
    return {"fwd": fwd, "gemm": gemm, "dz": dz}


def _in_precision(dtype: torch.dtype) -> str:
    # fp32 inputs keep fp32 accuracy on tensor cores (3 x TF32); 16-bit inputs ignore the option.
    return "tf32x3" if dtype == torch.float32 else "tf32"


@cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """About two resident programs per SM; a small number under the interpreter (it runs programs one by one)."""
    return 2 * _sm_count(device.index or 0) if device.type == "cuda" else 4


def _splits(blocks: int, tiles: int, device: torch.device) -> tuple[int, int]:
    """(splits, tiles_per_split): split ``tiles`` so that ``blocks * splits`` fills the device, no split empty."""
    want = max(1, min(tiles, -(-_target_programs(device) // max(1, blocks))))
    per = -(-tiles // want)
    return -(-tiles // per), per


def lce_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    z: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward over counted rows only (no input checks): hidden ``[n, D]`` and weight ``[V, D]`` row-contiguous,
    labels ``[n]`` int64 in ``0..V-1`` -> (lse ``[n]``, s_y ``[n]``), fp32; the row losses are ``lse - s_y``.

    With ``z`` (fp32 ``[n, V]``, row-contiguous) the scaled logits ``z`` (before the soft-cap) are stored there too.
    Grid ``(cdiv(n, BLOCK_N), splits)``: each program streams its share of the vocabulary tiles with an online
    log-sum-exp; the ``[splits, n]`` partials are merged with one ``logsumexp``. No host synchronisation.
    """
    n, D = hidden.shape
    V = weight.shape[0]
    cfg = _config(D, hidden.dtype)["fwd"]
    row_blocks = triton.cdiv(n, cfg["BLOCK_N"])
    splits, per = _splits(row_blocks, triton.cdiv(V, cfg["BLOCK_V"]), hidden.device)
    lse = torch.empty(splits, n, device=hidden.device, dtype=torch.float32)
    s_y = torch.empty(n, device=hidden.device, dtype=torch.float32)
    _lce_fwd_kernel[(row_blocks, splits)](
        hidden, weight, labels, z if z is not None else lse, lse, s_y, n, V, D,
        hidden.stride(0), weight.stride(0), z.stride(0) if z is not None else 0, logit_scale, softcap or 1.0, per,
        SOFTCAP=softcap is not None, STORE_Z=z is not None, BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"],
        BLOCK_K=cfg["BLOCK_K"], UPCAST=upcast_in_kernel(), IN_PRECISION=_in_precision(hidden.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return (torch.logsumexp(lse, dim=0) if splits > 1 else lse[0]), s_y


def _gemm(
    lhs: torch.Tensor,
    rhs: torch.Tensor,
    out: torch.Tensor,
    M: int,
    K: int,
    lhs_t: bool,
    atomic: bool,
    accumulate: bool,
    cfg: dict[str, int],
    prec: str,
) -> None:
    """``out[:M] (+)= op(lhs)[M, K] @ rhs[K, D]`` with ``op`` = transpose when ``lhs_t``; ``atomic`` splits K over
    the grid (``out`` must start at zero or hold the partial sum)."""
    D = rhs.shape[1]
    grid_md = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(D, cfg["BLOCK_D"])
    k_splits, per = _splits(grid_md, triton.cdiv(K, cfg["BLOCK_K"]), out.device) if atomic else (1, 0)
    k_per_split = per * cfg["BLOCK_K"] if atomic else K
    _lce_gemm_kernel[(triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(D, cfg["BLOCK_D"]), k_splits)](
        lhs, rhs, out, M, K, D, lhs.stride(0), rhs.stride(0), out.stride(0), k_per_split,
        LHS_T=lhs_t, ATOMIC=atomic, ACCUMULATE=accumulate, BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"],
        BLOCK_K=cfg["BLOCK_K"], UPCAST=upcast_in_kernel(), IN_PRECISION=prec,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip


def _triton_chunk_rows(V: int, dtype: torch.dtype, chunk_bytes: int, block_n: int) -> int:
    # One chunk holds the fp32 logits and dZ in the input dtype: rows * V * (4 + elt) <= chunk_bytes,
    # rows a multiple of BLOCK_N when the budget allows a whole tile of rows.
    rows = chunk_bytes // max(1, V * (4 + dtype.itemsize))
    return max(1, rows // block_n * block_n if rows >= block_n else rows)


def lce_fwd_with_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: float,
    softcap: float | None,
    need_hidden: bool,
    need_weight: bool,
    chunk_rows: int | None = None,
    chunk_bytes: int = TRITON_CHUNK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, float]:
    """Triton loss and gradients over counted rows: hidden ``[n, D]``, weight ``[V, D]`` (row-contiguous, one dtype),
    labels ``[n]`` int64 -> (loss_sum fp32 0-dim, dH fp32 ``[n, D]`` or None, dW fp32 ``[V, D]`` or None, factor):
    the gradients of ``loss_sum`` are ``factor * dH`` and ``factor * dW``.

    Per chunk of ``rows`` rows: ``_lce_fwd_kernel`` stores the fp32 logits ``[rows, V]``, ``_lce_dz_kernel`` writes
    ``dZ`` in the input dtype (the tensor-core operand; fp16 holds ``2^12 dZ``), then ``dH[rows] = dZ @ W`` (split
    over V, fp32 atomics into a zeroed ``dH``) and ``dW (+)= dZ^T @ H[rows]`` (one program per ``dW`` tile, the first
    chunk stores, the next ones load-add-store). 6NDV FLOPs; memory beyond inputs and gradients: the chunk.
    """
    n, D = hidden.shape
    V = weight.shape[0]
    dev, dtype = hidden.device, hidden.dtype
    cfg = _config(D, dtype)
    rows = min(n, chunk_rows or _triton_chunk_rows(V, dtype, chunk_bytes, cfg["fwd"]["BLOCK_N"]))
    dz_scale = _FP16_DZ_SCALE if dtype == torch.float16 else 1.0
    prec = _in_precision(dtype)
    z = torch.empty(rows, V, device=dev, dtype=torch.float32)
    dz = torch.empty(rows, V, device=dev, dtype=dtype)
    grad_h = torch.zeros(n, D, device=dev, dtype=torch.float32) if need_hidden else None
    grad_w = torch.empty(V, D, device=dev, dtype=torch.float32) if need_weight else None
    loss = torch.zeros((), device=dev, dtype=torch.float32)
    d_cfg = cfg["dz"]
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        m = r1 - r0
        y = labels[r0:r1]
        lse, s_y = lce_fwd(hidden[r0:r1], weight, y, logit_scale, softcap, z=z[:m])
        loss += (lse - s_y).sum()
        _lce_dz_kernel[(triton.cdiv(m, d_cfg["BLOCK_N"]), triton.cdiv(V, d_cfg["BLOCK_V"]))](
            z, lse, y, dz, m, V, z.stride(0), dz.stride(0), logit_scale * dz_scale, softcap or 1.0,
            SOFTCAP=softcap is not None, BLOCK_N=d_cfg["BLOCK_N"], BLOCK_V=d_cfg["BLOCK_V"],
            UPCAST=upcast_in_kernel(), num_warps=d_cfg["num_warps"], num_stages=d_cfg["num_stages"],
        )  # fmt: skip
        if need_hidden:  # dH[r0:r1] = dZ @ W: M = rows, K = V
            _gemm(dz, weight, grad_h[r0:r1], m, V, False, True, False, cfg["gemm"], prec)
        if need_weight:  # dW (+)= dZ^T @ H[r0:r1]: M = V, K = rows
            _gemm(dz, hidden[r0:r1], grad_w, V, m, True, False, r0 > 0, cfg["gemm"], prec)
    return loss, grad_h, grad_w, 1.0 / dz_scale


# ---------------------------------------------------------------------------------------------------------------------
# Memory-bounded torch path (CPU; fp32 maths on one [V, rows] logits chunk)
# ---------------------------------------------------------------------------------------------------------------------


def _torch_chunk_rows(V: int, chunk_bytes: int) -> int:
    # One fp32 logits chunk [V, rows]: rows = chunk_bytes / (4 V), e.g. 256 rows of V = 262,144 in 256 MiB.
    return max(1, chunk_bytes // (4 * max(1, V)))


def _torch_chunk_(
    xt: torch.Tensor,
    y: torch.Tensor,
    scale: float,
    softcap: float | None,
    need_grad: bool,
    scratch: torch.Tensor | None,
) -> torch.Tensor:
    """Loss sum of one chunk of raw logits, transposed: ``xt [V, rows]`` (fp32, ``logit_scale`` already applied);
    with ``need_grad`` ``xt`` is overwritten by ``dZ^T`` (see the module docstring), all in place."""
    if softcap is not None:
        xt.div_(softcap).tanh_().mul_(softcap)
    s_y = xt.gather(0, y[None, :]).squeeze(0)  # [rows]
    col_max = xt.amax(0)
    if softcap is None or not need_grad:
        total = xt.sub_(col_max[None, :]).exp_().sum(0)
        lse = col_max.add_(total.log())
        if need_grad:  # dZ = scale * (P - onehot)
            xt.mul_((scale / total)[None, :]).scatter_add_(0, y[None, :], xt.new_full((1, xt.shape[1]), -scale))
        return (lse - s_y).sum()
    # With a soft-cap dZ needs t = s / c next to exp(s - max): blocks of vocabulary rows, exponentials in the scratch.
    total = torch.zeros_like(col_max)
    for v0 in range(0, xt.shape[0], scratch.shape[0]):
        xb = xt[v0 : v0 + scratch.shape[0]]
        e = torch.sub(xb, col_max[None, :], out=scratch[: xb.shape[0], : xb.shape[1]]).exp_()
        total += e.sum(0)
        xb.div_(softcap).square_().neg_().add_(1.0).mul_(e)  # exp(s - max) * (1 - t^2)
    lse = col_max + total.log()
    xt.mul_((scale / total)[None, :])
    t_y = s_y / softcap
    xt.scatter_add_(0, y[None, :], (t_y.square().sub_(1.0).mul_(scale))[None, :])  # - scale * (1 - t_y^2)
    return (lse - s_y).sum()


def _torch_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: float,
    softcap: float | None,
    need_hidden: bool,
    need_weight: bool,
    chunk_rows: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, float]:
    """Torch path with the contract of :func:`lce_fwd_with_grads` (no gradient wanted: the loss only).

    Per chunk: the logits transposed, ``xt = W @ (scale * H[rows])^T`` ``[V, rows]``, into one fp32 buffer;
    :func:`_torch_chunk_` in place; then ``dH[rows] = dZ @ W`` and ``dW (+)= dZ^T @ H[rows]`` (the first chunk writes
    ``dW``, the next ones ``addmm_``). The ``[V, rows]`` layout makes all three GEMMs plain or left-transposed
    products of row-major operands, which MKL runs 10-15 % faster on CPU than the ``[rows, V]`` layout of the dense
    head (measured: 34 vs 29 GFLOP/s for the logits, 31 vs 27 for ``dW``, one core). Every GEMM is fp32 (CPU
    bf16/fp16 GEMMs are emulated and an order of magnitude slower).
    """
    n, D = hidden.shape
    V = weight.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    need_grad = need_hidden or need_weight
    w = weight.float()
    rows = min(n, chunk_rows or _torch_chunk_rows(V, chunk_bytes))
    buf = torch.empty(rows * V, **f32)
    scratch = torch.empty(min(V, _SOFTCAP_BLOCK), rows, **f32) if softcap is not None and need_grad else None
    grad_h = torch.empty(n, D, **f32) if need_hidden else None
    grad_w = torch.empty(V, D, **f32) if need_weight else None
    loss = torch.zeros((), **f32)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        h = hidden[r0:r1].float()
        hs = h * logit_scale if logit_scale != 1.0 else h
        xt = torch.mm(w, hs.t(), out=buf[: V * (r1 - r0)].view(V, r1 - r0))
        loss += _torch_chunk_(xt, labels[r0:r1], logit_scale, softcap, need_grad, scratch)
        if need_hidden:
            torch.mm(xt.t(), w, out=grad_h[r0:r1])
        if need_weight:
            if r0 == 0:
                torch.mm(xt, h, out=grad_w)
            else:
                grad_w.addmm_(xt, h)
    return loss, grad_h, grad_w, 1.0


# ---------------------------------------------------------------------------------------------------------------------
# autograd.Function
# ---------------------------------------------------------------------------------------------------------------------


class _LinearCrossEntropyFunction(torch.autograd.Function):
    """``(loss_sum, count)`` of the counted rows; ``count`` is non-differentiable.

    Saves nothing of the inputs: the forward leaves the fp32 gradients (and the counted rows' index) on ``ctx``, and
    the backward scales them in place by the upstream gradient and hands them over, so they are consumed once.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        ignore_index: int,
        softcap: float | None,
        logit_scale: float,
        chunk_rows: int | None,
        backend: str,
        want_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        N, D = hidden.shape
        rows = (labels != ignore_index).nonzero().squeeze(1)  # the one host synchronisation: the number of rows
        n = rows.numel()
        count = torch.tensor(n, dtype=torch.int64, device=labels.device)
        ctx.mark_non_differentiable(count)
        ctx.set_materialize_grads(False)
        need_h = want_grad and ctx.needs_input_grad[0]
        need_w = want_grad and ctx.needs_input_grad[1]
        ctx.meta = (hidden.shape, hidden.dtype, weight.shape, weight.dtype)
        ctx.grads = None
        if n == 0:  # nothing counted: loss 0, gradients exactly zero
            ctx.grads = (None, None, rows, 1.0, need_h, need_w)
            return torch.zeros((), device=hidden.device, dtype=torch.float32), count
        h = hidden if n == N else hidden.index_select(0, rows)
        y = labels.long() if n == N else labels.index_select(0, rows).long()
        h, y, w = h.contiguous(), y.contiguous(), weight.contiguous()
        if backend == "triton":
            if need_h or need_w:
                loss, gh, gw, factor = lce_fwd_with_grads(h, w, y, logit_scale, softcap, need_h, need_w, chunk_rows)
            else:
                lse, s_y = lce_fwd(h, w, y, logit_scale, softcap)
                loss, gh, gw, factor = (lse - s_y).sum(), None, None, 1.0
        else:
            loss, gh, gw, factor = _torch_fwd(h, w, y, logit_scale, softcap, need_h, need_w, chunk_rows)
        ctx.grads = (gh, gw, rows, factor, need_h, need_w)
        return loss, count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor | None, _grad_count: torch.Tensor | None):
        none = (None,) * 7
        if grad_loss is None:
            return None, None, *none
        if ctx.grads is None:
            raise RuntimeError(
                "linear_cross_entropy forms its gradients in the forward and hands them over in the backward: a "
                "second backward of the same forward (retain_graph=True) is not supported; run the forward again"
            )
        (gh, gw, rows, factor, need_h, need_w), ctx.grads = ctx.grads, None
        h_shape, h_dtype, w_shape, w_dtype = ctx.meta
        g = grad_loss.to(torch.float32) * factor
        grad_h = grad_w = None
        if need_h and gh is not None and rows.numel() == h_shape[0]:
            grad_h = gh.mul_(g).to(h_dtype)
        elif need_h:  # exact zeros on the ignored rows
            grad_h = torch.zeros(h_shape, device=g.device, dtype=h_dtype)
            if gh is not None:
                grad_h.index_copy_(0, rows, gh.mul_(g).to(h_dtype))
        if need_w:
            grad_w = gw.mul_(g).to(w_dtype) if gw is not None else torch.zeros(w_shape, device=g.device, dtype=w_dtype)
        return grad_h, grad_w, *none


# ---------------------------------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------------------------------


def _check_number(name: str, value: float | None, allow_none: bool) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "None or a positive number" if allow_none else "a positive number"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return float(value)


def _check_inputs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int, chunk_size: int | None
) -> None:
    check_float("hidden", hidden)
    check_float("weight", weight)
    check_int("labels", labels)
    check_same_device(hidden=hidden, weight=weight, labels=labels)
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be [N, D] (or [..., D]), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must have 2 dimensions [V, D], got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"hidden and weight must have the same feature size D, got hidden {tuple(hidden.shape)} and weight "
            f"{tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (the vocabulary is empty)")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and weight must have one dtype, got {hidden.dtype} and {weight.dtype}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels must have one entry per hidden row: shape {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}"
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int (rows per chunk), got {chunk_size!r}")


def _check_label_range(labels: torch.Tensor, ignore_index: int, vocab: int) -> None:
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if labels.numel() and bool(bad.any()):  # one host synchronisation
        first = int(bad.nonzero()[0, 0])
        raise IndexError(
            f"labels must be in 0..{vocab - 1} (the vocabulary) or ignore_index = {ignore_index}; "
            f"labels[{first}] = {int(labels[first])} (flat index)"
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    chunk_size: int | None = None,
    backend: str = "auto",
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy of an LM head, without the ``[N, V]`` logits.

    .. math::
        s_{iv} = c \\tanh\\big(\\lambda \\langle h_i, w_v \\rangle / c\\big) \\ (\\text{or } \\lambda
        \\langle h_i, w_v \\rangle), \\qquad
        \\mathrm{loss\\_sum} = \\sum_{i:\\, y_i \\neq \\mathrm{ignore}} \\Big(\\log \\sum_v e^{s_{iv}} - s_{i y_i}\\Big)

    with ``lambda = logit_scale`` and ``c = softcap``; maths and accumulation in fp32 for every input dtype. The
    token mean is ``loss_sum / count``; keeping the sum lets a caller take that mean over several micro-batches or
    ranks. Backward gives ``d hidden`` (exact zeros on ignored rows) and ``d weight``, formed during the forward (see
    the module docstring) and scaled by the upstream gradient.

    Args:
        hidden: ``[N, D]`` float32/float16/bfloat16 (or ``[..., D]``): the final-norm hidden states, the input of the
            LM head.
        weight: ``[V, D]``, same dtype and device: the LM-head weight (the embedding matrix for tied embeddings).
        labels: integer ``[N]`` (or ``[...]``, matching ``hidden``), already shifted: ``labels[i]`` is the token
            predicted at position ``i``, ``ignore_index`` where nothing is counted. Ignored rows are never read:
            they may hold NaN or inf.
        ignore_index: the label of rows that do not count (default -100, as torch and Hugging Face).
        softcap: logit soft-capping ``c`` (``s = c * tanh(z / c)``, Gemma 2's ``final_logit_softcapping``), or None.
        logit_scale: ``lambda > 0`` multiplying the logits before the soft-cap (Cohere's ``logit_scale``; Granite's
            ``logits_scaling`` divides: pass its inverse). Default 1.
        chunk_size: rows per chunk (default: from a byte budget, 256 MiB of fp32 logits on the torch path,
            :data:`DEFAULT_CHUNK_BYTES`, 1 GiB of logits and ``dZ`` on the Triton path, :data:`TRITON_CHUNK_BYTES`);
            one chunk of logits ``[chunk_size, V]`` exists at a time.
        backend: ``"auto"`` (Triton on CUDA or under ``TRITON_INTERPRET=1``, the torch path otherwise), ``"triton"``,
            ``"torch"`` (memory-bounded, runs anywhere) or ``"reference"`` (dense fp32 logits, the test oracle).
        validate: check that every counted label lies in ``0..V-1`` (one host synchronisation); an unchecked label
            outside the vocabulary gives undefined results.

    Returns:
        ``(loss_sum, count)``: the fp32 0-dim sum over the counted rows (0 when none is counted) and the int64 0-dim
        number of counted rows.

    Work and memory: 6NDV FLOPs over the n counted rows (``2nDV`` without gradients); beyond the inputs and the
    gradients, one chunk of logits and O(nD) fp32 rows. The fp32 gradients live from the forward to the backward,
    which consumes them: a second backward of one forward (``retain_graph=True``) raises.
    """
    _check_inputs(hidden, weight, labels, ignore_index, chunk_size)
    softcap = _check_number("softcap", softcap, allow_none=True)
    logit_scale = _check_number("logit_scale", logit_scale, allow_none=False)
    impl = resolve_backend(backend, hidden, weight)
    D = hidden.shape[-1]
    hidden, labels = hidden.reshape(-1, D), labels.reshape(-1)
    if validate:
        _check_label_range(labels, ignore_index, weight.shape[0])
    if impl == "reference":
        return linear_cross_entropy_ref(
            hidden, weight, labels, ignore_index=ignore_index, softcap=softcap, logit_scale=logit_scale
        )
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropyFunction.apply(
        hidden, weight, labels, ignore_index, softcap, logit_scale, chunk_size, impl, want_grad
    )


# ---------------------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation specs
# ---------------------------------------------------------------------------------------------------------------------


def aot_specs(d: int = 4096, dtype: torch.dtype = torch.bfloat16) -> list[AOTSpec]:
    """Every Triton kernel of this op at the configuration the launchers use for ``D = d`` inputs of ``dtype``.

    ``extra["int_args"]`` gives the integer launch values of a representative call, so the checker specialises them
    as the JIT would: 8,192 counted tokens, a Llama-3 vocabulary (V = 128,256, a multiple of 16), the default 1 GiB
    chunk. The logits tile and both gradient GEMMs are GEMM-shaped (``gemm=True``: tensor cores required).
    """
    cfg = _config(d, dtype)
    ty = _TRITON_DTYPES[dtype]
    prec = _in_precision(dtype)
    f, g, z = cfg["fwd"], cfg["gemm"], cfg["dz"]
    n_tok, vocab = 8192, 128256
    rows = _triton_chunk_rows(vocab, dtype, TRITON_CHUNK_BYTES, f["BLOCK_N"])
    fwd_c = dict(BLOCK_N=f["BLOCK_N"], BLOCK_V=f["BLOCK_V"], BLOCK_K=f["BLOCK_K"], UPCAST=False, IN_PRECISION=prec)
    gemm_c = dict(BLOCK_M=g["BLOCK_M"], BLOCK_D=g["BLOCK_D"], BLOCK_K=g["BLOCK_K"], UPCAST=False, IN_PRECISION=prec)
    fwd_sig = {
        "h_ptr": f"*{ty}", "w_ptr": f"*{ty}", "y_ptr": "*i64", "z_ptr": "*fp32", "lse_ptr": "*fp32",
        "sy_ptr": "*fp32", "N": "i32", "V": "i32", "D": "i32", "stride_h": "i32", "stride_w": "i32",
        "stride_z": "i32", "scale": "fp32", "cap": "fp32", "tiles_per_split": "i32",
    }  # fmt: skip
    gemm_sig = {
        "l_ptr": f"*{ty}", "r_ptr": f"*{ty}", "out_ptr": "*fp32", "M": "i32", "K": "i32", "D": "i32",
        "stride_l": "i32", "stride_r": "i32", "stride_o": "i32", "k_per_split": "i32",
    }  # fmt: skip
    fwd_w = dict(num_warps=f["num_warps"], num_stages=f["num_stages"], gemm=True)
    gemm_w = dict(num_warps=g["num_warps"], num_stages=g["num_stages"], gemm=True)
    fwd_ints = {"V": vocab, "D": d, "stride_h": d, "stride_w": d, "tiles_per_split": 64}
    dz_ints = {"N": rows, "V": vocab, "stride_z": vocab, "stride_dz": vocab}
    dh_ints = {"M": rows, "K": vocab, "D": d, "stride_l": vocab, "stride_r": d, "stride_o": d, "k_per_split": 4096}
    dw_ints = {"M": vocab, "K": rows, "D": d, "stride_l": vocab, "stride_r": d, "stride_o": d, "k_per_split": rows}
    dz_sig = {
        "z_ptr": "*fp32", "lse_ptr": "*fp32", "y_ptr": "*i64", "dz_ptr": f"*{ty}", "N": "i32", "V": "i32",
        "stride_z": "i32", "stride_dz": "i32", "scale": "fp32", "cap": "fp32",
    }  # fmt: skip
    specs = []
    for store, softcap in ((False, False), (True, False), (True, True)):
        tag = ("train" if store else "loss") + ("_softcap" if softcap else "")
        ints = {**fwd_ints, "N": rows if store else n_tok, "stride_z": vocab if store else 0}
        specs.append(
            AOTSpec(
                name=f"lce_fwd_{tag}",
                fn=_lce_fwd_kernel,
                signature=dict(fwd_sig),
                constexprs={"SOFTCAP": softcap, "STORE_Z": store, **fwd_c},
                extra={"int_args": ints},
                **fwd_w,
            )
        )
    for softcap in (False, True):
        specs.append(
            AOTSpec(
                name="lce_dz" + ("_softcap" if softcap else ""),
                fn=_lce_dz_kernel,
                signature=dict(dz_sig),
                constexprs={"SOFTCAP": softcap, "BLOCK_N": z["BLOCK_N"], "BLOCK_V": z["BLOCK_V"], "UPCAST": False},
                num_warps=z["num_warps"],
                num_stages=z["num_stages"],
                extra={"int_args": dict(dz_ints)},
            )
        )
    specs.append(
        AOTSpec(
            name="lce_gemm_dhidden",
            fn=_lce_gemm_kernel,
            signature=dict(gemm_sig),
            constexprs={"LHS_T": False, "ATOMIC": True, "ACCUMULATE": False, **gemm_c},
            extra={"int_args": dh_ints},
            **gemm_w,
        )
    )
    specs.append(
        AOTSpec(
            name="lce_gemm_dweight",
            fn=_lce_gemm_kernel,
            signature=dict(gemm_sig),
            constexprs={"LHS_T": True, "ATOMIC": False, "ACCUMULATE": True, **gemm_c},
            extra={"int_args": dw_ints},
            **gemm_w,
        )
    )
    return specs


# ----------------------------------------------------------------------------------------------------------------
# The same loss from logits that already exist (a head the fused op does not know, or a caller that needs them)

CE_CHUNK_ELEMENTS = 1 << 26
"""Logit elements (B x T x V) per chunk of :func:`cross_entropy_sum`: 2^26 fp32 = 256 MiB of temporaries, about one
512-token row of a 128k vocabulary."""


def _chunks(b: int, t: int, v: int, chunk_elements: int) -> Iterator[tuple[slice, slice]]:
    """``(rows, positions)`` slices covering ``[b, t]`` with at most ``chunk_elements`` logits each (about: a row
    longer than the budget is cut along time, at least one position per chunk)."""
    rows = max(1, chunk_elements // max(1, t * v))
    span = t if t * v <= chunk_elements else max(1, chunk_elements // max(1, v))
    for r0 in range(0, b, rows):
        for t0 in range(0, t, span):
            yield slice(r0, r0 + rows), slice(t0, t0 + span)


class _CrossEntropySum(torch.autograd.Function):
    """``sum_(b,t) [logsumexp(logits[b, t]) - logits[b, t, target[b, t]]]`` over ``target != IGNORE_INDEX``.

    fp32 maths on chunks of at most ``chunk_elements`` logits. Forward keeps only the ``[B, T]`` fp32 log-sum-exps;
    backward writes ``g * (softmax - onehot)`` chunk by chunk into ONE gradient of the logits' shape and dtype (0 at
    ignored positions, also where those logits are not finite). Peak memory on top of the logits: that gradient plus
    one fp32 chunk, where autograd through slices and ``logsumexp`` would hold several logits-sized buffers.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, target: torch.Tensor, chunk_elements: int) -> torch.Tensor:
        b, t, v = logits.shape
        lse = torch.empty((b, t), dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for rs, ts in _chunks(b, t, v, chunk_elements):
            x, tgt = logits[rs, ts].float(), target[rs, ts]
            m = torch.logsumexp(x, dim=-1)
            lse[rs, ts] = m
            picked = x.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            # where, not multiply: a non-finite logit at an ignored (padding) position must not leak into the sum.
            total += torch.where(tgt != IGNORE_INDEX, m - picked, torch.zeros_like(m)).sum()
        ctx.save_for_backward(logits, target, lse)
        ctx.chunk_elements = chunk_elements
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, target, lse = ctx.saved_tensors
        b, t, v = logits.shape
        chunks = list(_chunks(b, t, v, ctx.chunk_elements))
        grad: torch.Tensor | None = None
        for rs, ts in chunks:
            tgt = target[rs, ts]
            valid = (tgt != IGNORE_INDEX).unsqueeze(-1)
            # Every op in place on the one fp32 chunk p: softmax, minus one-hot, times g, 0 where not counted.
            p = torch.sub(logits[rs, ts].float(), lse[rs, ts].unsqueeze(-1)).exp_()
            p.scatter_add_(-1, tgt.clamp(min=0).unsqueeze(-1), -valid.to(p.dtype))
            p.mul_(grad_out.float()).masked_fill_(~valid, 0.0)
            if len(chunks) == 1 and p.dtype == logits.dtype:
                return p, None, None  # one fp32 chunk: it is the gradient
            if grad is None:
                grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
            grad[rs, ts] = p
        return grad, None, None


def cross_entropy_sum(
    logits: torch.Tensor, target: torch.Tensor, *, chunk_elements: int = CE_CHUNK_ELEMENTS
) -> torch.Tensor:
    """``sum_(b,t) [logsumexp(logits[b, t]) - logits[b, t, target[b, t]]]`` over ``target != IGNORE_INDEX``: 0-dim fp32.

    ``logits [B, T, V]`` (any float dtype; the maths is fp32 on chunks of at most ``chunk_elements`` logits),
    ``target [B, T]`` int64 (already aligned with the logits: no shift here). The backward writes one gradient of the
    logits' shape and dtype, 0 at ignored positions even where those logits are not finite (:class:`_CrossEntropySum`).
    """
    if logits.dim() != 3 or target.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be [B, T, V] and target [B, T], got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    return _CrossEntropySum.apply(logits, target, chunk_elements)
