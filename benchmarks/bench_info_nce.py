"""InfoNCE: alignx against the dense reference, torch.compile, the official AlignX idiom and the public kernels.

The function every provider computes (mean over anchors, cosine similarity, temperature tau)::

    loss = mean_b [ logsumexp_n s[b, n] - s[b, pos_b] ],   s[b, n] = cos(a_b, c_n) / tau

anchors ``[B, D]``, candidates ``[N, D]``, ``pos_b = b``. Rates use the FLOP convention of SPEC §3: forward
``2·B·N·D``, backward ``6·B·N·D`` (one recompute), fwd+bwd ``8·B·N·D``, as a fraction of the GEMM rate measured in the
same run. Providers:

- ``reference``: ``alignx.kernels.reference.info_nce_ref`` (fp32, the dense ``[B, N]`` logits);
- ``compile``: ``torch.compile`` of the reference;
- ``official``: the official AlignX code's similarity, ``nn.CosineSimilarity`` on ``a.expand(n, n, d)`` and
  ``c.expand(n, n, d).transpose(0, 1)`` (an ``[n, n, d]`` product) and a log-softmax over dim 0 (square only;
  the official ``1/2`` factor is left out so the value equals the others);
- ``alignx``: ``alignx.kernels.info_nce`` on the memory-bounded torch path; ``alignx-triton``: its Triton kernels;
- ``inf_cl`` (``cal_inf_loss``), ``liger`` (``LigerFusedLinearCrossEntropyLoss`` with the normalised candidates as the
  weight and the normalised anchors / tau as the input), ``memeff`` (``MemoryEfficientQwen3Loss`` with margin 2,
  i.e. no false-negative mask): GPU only, when installed.

Run: ``python -m benchmarks.bench_info_nce --device cpu`` (``--help`` for the options).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .harness import (
    DTYPES,
    Bench,
    Provider,
    Shape,
    SkipContext,
    bench_main,
    seeded,
)

GB = 1 << 30


def build(params: dict[str, Any], device: str) -> dict[str, Any]:
    """Seeded inputs: anchors ``[B, D]``, candidates ``[N, D]`` (the first B are the anchors' positives, noisy copies
    of them), positive index ``arange(B)``."""
    b, n, d, dtype = params["B"], params["N"], params["D"], DTYPES[params["dtype"]]
    g = seeded(0)
    anchors = torch.randn(b, d, generator=g)
    candidates = torch.randn(n, d, generator=g)
    candidates[:b] = anchors + 0.5 * candidates[:b]
    return {
        "anchors": anchors.to(device=device, dtype=dtype).requires_grad_(),
        "candidates": candidates.to(device=device, dtype=dtype).requires_grad_(),
        "positive": torch.arange(b, device=device),
    }


def work(params: dict[str, Any], mode: str) -> float:
    flops = {"fwd": 2, "bwd": 6, "full": 8}[mode]
    return float(flops * params["B"] * params["N"] * params["D"])


# ----------------------------------------------------------------------------------------------------------------
# Providers


def _reference(x: dict[str, Any], p: dict[str, Any]) -> torch.Tensor:
    from alignx.kernels.reference import info_nce_ref

    return info_nce_ref(x["anchors"], x["candidates"], x["positive"], p["tau"])


def _official(x: dict[str, Any], p: dict[str, Any]) -> torch.Tensor:
    # The official modeling file: sim[i, j] = cos(anchor_j, contrast_i), log-softmax over the contrasts (dim 0).
    anchor, contrast = x["anchors"], x["candidates"]
    n, d = anchor.shape
    sim = nn.CosineSimilarity(dim=-1)(anchor.expand((n, n, d)), contrast.expand((n, n, d)).transpose(0, 1))
    return -nn.LogSoftmax(0)(sim / p["tau"]).diag().sum() / n


def _alignx(backend: str):
    def impl(x: dict[str, Any], p: dict[str, Any]) -> torch.Tensor:
        from alignx.kernels.info_nce import info_nce

        return info_nce(x["anchors"], x["candidates"], x["positive"], p["tau"], backend=backend, validate=False)

    return impl


def _inf_cl(x: dict[str, Any], p: dict[str, Any]) -> torch.Tensor:
    from inf_cl import cal_inf_loss

    d = x["anchors"].shape[1]
    q = F.normalize(x["anchors"].float(), dim=-1)
    k = F.normalize(x["candidates"].float(), dim=-1)
    return cal_inf_loss(q, k, labels=x["positive"], scale=1.0 / p["tau"], head_dim=256 if d % 256 == 0 else d)


def _liger(x: dict[str, Any], p: dict[str, Any]) -> torch.Tensor:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    q = F.normalize(x["anchors"], dim=-1) / p["tau"]
    k = F.normalize(x["candidates"], dim=-1)
    return LigerFusedLinearCrossEntropyLoss()(k, q, x["positive"])


def _memeff(x: dict[str, Any], p: dict[str, Any]) -> torch.Tensor:
    import memeff

    loss = memeff.MemoryEfficientQwen3Loss(temperature=p["tau"], margin=2.0, normalized_inputs=True, stable=False)
    return loss(F.normalize(x["anchors"], dim=-1), F.normalize(x["candidates"], dim=-1))


def _dense_bytes(p: dict[str, Any]) -> int:
    # fp32 logits, their softmax / gradient and the fp32 copies of the inputs: about 4 [B, N] fp32 buffers.
    return 4 * 4 * p["B"] * p["N"] + 8 * (p["B"] + p["N"]) * p["D"]


def _official_bytes(p: dict[str, Any]) -> int:
    # The [n, n, d] normalised products of CosineSimilarity and their gradients: about 6 of them.
    return 6 * DTYPES[p["dtype"]].itemsize * p["B"] * p["N"] * p["D"]


def _too_big(estimate) -> Any:
    def skip(ctx: SkipContext) -> str | None:
        need = estimate(ctx.params)
        if need > 0.8 * ctx.available_bytes:
            return f"needs ~{need / GB:.1f} GiB, {ctx.available_bytes / GB:.1f} GiB available"
        return None

    return skip


def _official_skip(ctx: SkipContext) -> str | None:
    if ctx.params["B"] != ctx.params["N"]:
        return "the official idiom is square (n anchors against their n targets)"
    return _too_big(_official_bytes)(ctx)


def _heavy(estimate) -> Any:
    return lambda ctx: estimate(ctx.params) > 2 * GB


PIP = "pip install -c constraints.txt --no-deps"
PROVIDERS = [
    Provider("reference", _reference, "fp32 dense reference (alignx.kernels.reference.info_nce_ref)",
             skip=_too_big(_dense_bytes), heavy=_heavy(_dense_bytes)),
    Provider("compile", _reference, "torch.compile of the dense reference", compile=True,
             skip=_too_big(_dense_bytes)),
    Provider("official", _official, "official AlignX: expand-then-CosineSimilarity [n, n, d], log-softmax dim 0",
             skip=_official_skip, heavy=_heavy(_official_bytes)),
    Provider("alignx", _alignx("torch"), "alignx.kernels.info_nce, torch path (chunked, memory-bounded)"),
    Provider("alignx-triton", _alignx("triton"), "alignx.kernels.info_nce, Triton kernels", cuda_only=True),
    Provider("inf_cl", _inf_cl, "Inf-CL cal_inf_loss (fp32 inputs)", requires=("inf_cl",),
             install_hint=f"{PIP} inf-cl", cuda_only=True),
    Provider("liger", _liger, "Liger-Kernel fused linear cross-entropy used as InfoNCE",
             requires=("liger_kernel",), install_hint=f"{PIP} liger-kernel", cuda_only=True),
    Provider("memeff", _memeff, "memeff MemoryEfficientQwen3Loss (margin 2, stable=False)", requires=("memeff",),
             install_hint=f"{PIP} memeff", cuda_only=True,
             skip=lambda ctx: None if ctx.params["B"] == ctx.params["N"] else "memeff pairs row i with row i (B = N)"),
]  # fmt: skip

TINY = Shape(
    "B=N=8 D=16 fp32",
    {"B": 8, "N": 8, "D": 16, "dtype": "fp32", "tau": 0.1},
    tags=("official-batch", "mem-16k", "time-16k", "time-8k", "gpu-rate"),
)

BENCH = Bench(
    name="info_nce",
    module="benchmarks.bench_info_nce",
    build=build,
    providers=PROVIDERS,
    work=work,
    unit="TFLOP/s",
    scale=1e12,
    roofline="gemm",
    tiny=TINY,
)


def shapes(device: str) -> list[Shape]:
    """CPU: the official micro-batch, a medium square batch, and the two sizes of the claims. CUDA: D = 4096 bf16,
    B = N from 4096 to 65,536, and 512 anchors against 10^6 candidates."""
    if device == "cuda":
        out = [
            Shape(f"B=N={n} D=4096 bf16", {"B": n, "N": n, "D": 4096, "dtype": "bf16", "tau": 0.1},
                  memory_modes=("fwd", "full"),
                  tags=(("gpu-rate", "quick") if n == 16384 else ()) + (("rate-claim",) if n >= 16384 else ()))
            for n in (4096, 16384, 65536)
        ]  # fmt: skip
        out.append(Shape("B=512 N=1000000 D=4096 bf16", {"B": 512, "N": 1_000_000, "D": 4096, "dtype": "bf16",
                                                          "tau": 0.1}, memory_modes=("fwd", "full")))  # fmt: skip
        return out
    return [
        Shape("B=N=16 D=2048 fp32", {"B": 16, "N": 16, "D": 2048, "dtype": "fp32", "tau": 0.1},
              tags=("official-batch",)),
        Shape("B=N=128 D=1024 fp32", {"B": 128, "N": 128, "D": 1024, "dtype": "fp32", "tau": 0.1}),
        Shape("B=N=16384 D=256 fp32", {"B": 16384, "N": 16384, "D": 256, "dtype": "fp32", "tau": 0.1},
              modes=("full",), tags=("mem-16k", "time-16k")),
        Shape("B=N=8192 D=1024 fp32", {"B": 8192, "N": 8192, "D": 1024, "dtype": "fp32", "tau": 0.1},
              modes=("full",), tags=("time-8k",)),
    ]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main(BENCH, shapes, argv, __doc__.splitlines()[0])


__all__ = ["BENCH", "build", "main", "shapes", "work"]

if __name__ == "__main__":
    sys.exit(main())
