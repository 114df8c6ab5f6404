"""Sample Triton kernels for the ahead-of-time checker: two that must pass and three that must fail.

The positive controls prove the checker accepts a well-formed kernel (a Hopper-shaped bf16 GEMM and a row
reduction); the negative controls prove each of its checks can fail: register spills, shared memory over the
SM's per-block limit, and a GEMM-flagged kernel without tensor-core instructions. Loaded by file path
(``python -m alignx.kernels.aot --modules tests/aot_sample_kernels.py``), like a kernel module.
"""

from __future__ import annotations

import triton
import triton.language as tl
from alignx.kernels._common import AOTSpec


@triton.jit
def _sample_gemm_kernel(
    p_a,
    p_b,
    p_c,
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
):
    # C[M, N] = A[M, K] @ B[K, N]; bf16 operands, fp32 accumulator; M, N, K multiples of the tiles.
    i_m = tl.program_id(0)
    i_n = tl.program_id(1)
    o_m = (i_m * BM + tl.arange(0, BM)).to(tl.int64)  # [BM]
    o_n = (i_n * BN + tl.arange(0, BN)).to(tl.int64)  # [BN]
    o_k = tl.arange(0, BK)  # [BK]
    p_a_blk = p_a + o_m[:, None] * stride_am + o_k[None, :] * stride_ak  # [BM, BK]
    p_b_blk = p_b + o_k[:, None] * stride_bk + o_n[None, :] * stride_bn  # [BK, BN]
    b_acc = tl.zeros((BM, BN), dtype=tl.float32)  # [BM, BN]
    for _ in range(0, K, BK):
        b_acc += tl.dot(tl.load(p_a_blk), tl.load(p_b_blk))
        p_a_blk += BK * stride_ak
        p_b_blk += BK * stride_bk
    tl.store(p_c + o_m[:, None] * stride_cm + o_n[None, :] * stride_cn, b_acc.to(p_c.dtype.element_ty))


@triton.jit
def _sample_row_sum_kernel(p_x, p_y, D, stride_x, BD: tl.constexpr):
    # y[m] = sum_d x[m, d] in fp32.
    i_m = tl.program_id(0).to(tl.int64)
    b_acc = tl.zeros((BD,), dtype=tl.float32)  # [BD]
    for i_d in range(0, D, BD):
        o_d = i_d + tl.arange(0, BD)  # [BD]
        b_acc += tl.load(p_x + i_m * stride_x + o_d, mask=o_d < D, other=0.0).to(tl.float32)
    tl.store(p_y + i_m, tl.sum(b_acc, axis=0))


@triton.jit
def _sample_spill_kernel(p_x, p_y, D, stride_x, BM: tl.constexpr, BD: tl.constexpr):
    # A [BM, BD] fp32 accumulator live across a loop: BM*BD/(32*num_warps) registers per thread by construction.
    i_m = tl.program_id(0).to(tl.int64)
    o_m = i_m * BM + tl.arange(0, BM)  # [BM]
    o_d = tl.arange(0, BD)  # [BD]
    b_acc = tl.zeros((BM, BD), dtype=tl.float32)  # [BM, BD]
    for i_d in range(0, D, BD):
        b_acc = b_acc * 0.5 + tl.load(p_x + o_m[:, None] * stride_x + (i_d + o_d)[None, :]).to(tl.float32)
    tl.store(p_y + o_m[:, None] * BD + o_d[None, :], b_acc)


def _gemm_spec(name: str, bm: int, bn: int, bk: int, num_warps: int, num_stages: int, d: int) -> AOTSpec:
    # A row-major [d, d] @ [d, d]: unit strides along the contiguous dims, the JIT specialises them to 1.
    return AOTSpec(
        name=name,
        fn=_sample_gemm_kernel,
        signature={"p_a": "*bf16", "p_b": "*bf16", "p_c": "*bf16", **{k: "i32" for k in ("M", "N", "K")}}
        | {k: "i32" for k in ("stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_cm", "stride_cn")},
        constexprs={"BM": bm, "BN": bn, "BK": bk},
        num_warps=num_warps,
        num_stages=num_stages,
        gemm=True,
        extra={
            "int_args": {
                "M": d,
                "N": d,
                "K": d,
                "stride_am": d,
                "stride_ak": 1,
                "stride_bk": d,
                "stride_bn": 1,
                "stride_cm": d,
                "stride_cn": 1,
            }
        },
    )


def _row_sum_spec(name: str, gemm: bool, d: int) -> AOTSpec:
    return AOTSpec(
        name=name,
        fn=_sample_row_sum_kernel,
        signature={"p_x": "*bf16", "p_y": "*fp32", "D": "i32", "stride_x": "i32"},
        constexprs={"BD": 1024},
        num_warps=4,
        num_stages=2,
        gemm=gemm,
        extra={"int_args": {"D": d, "stride_x": d}},
    )


def aot_specs(d: int = 4096) -> list[AOTSpec]:
    """Positive controls (``sample_*``) and negative controls (``neg_*``, each expected to fail one check)."""
    return [
        _gemm_spec("sample_gemm_128x128x64", 128, 128, 64, num_warps=8, num_stages=3, d=d),
        _row_sum_spec("sample_row_sum", gemm=False, d=d),
        # A 64 x 128 fp32 accumulator on one warp is 256 live values per thread: more than the 255 registers a
        # thread can address, so ptxas must spill whatever it does.
        AOTSpec(
            name="neg_spill",
            fn=_sample_spill_kernel,
            signature={"p_x": "*bf16", "p_y": "*fp32", "D": "i32", "stride_x": "i32"},
            constexprs={"BM": 64, "BD": 128},
            num_warps=1,
            num_stages=1,
            extra={"int_args": {"D": d, "stride_x": d}},
        ),
        # (128x256 + 256x128) bf16 = 128 KiB per pipeline stage, >= 2 stages in flight: over 227 KiB and 163 KiB.
        _gemm_spec("neg_smem_overflow", 128, 128, 256, num_warps=8, num_stages=4, d=d),
        # A reduction has no tensor-core work: flagged as a GEMM it must be reported.
        _row_sum_spec("neg_gemm_without_mma", gemm=True, d=d),
    ]
