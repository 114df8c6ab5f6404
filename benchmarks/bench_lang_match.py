"""Language matching: alignx's decomposed classifier against the official AlignX pair-tensor idiom.

The function every provider computes (the AlignX language-matching loss over all ordered pairs, self-pairs
included)::

    loss = mean_{i, j} CE( W_down (silu(W_gate z_ij) * (W_up z_ij)), [lang_i == lang_j] ),   z_ij = [E_i ; E_j]

``E [M, D]`` (``M = 2B``: the pooled sources then the pooled targets), ``W_gate, W_up [H, 2D]``, ``W_down [2, H]``,
H = 128. The rate is in pairs per second (``M^2`` per call). Providers:

- ``reference``: ``alignx.kernels.reference.lang_match_loss_ref`` (fp32, ``expand`` + ``cat`` into ``[M, M, 2D]``);
- ``compile``: ``torch.compile`` of the reference;
- ``official``: the official AlignX code: ``cat([E.unsqueeze(1).repeat(1, M, 1), E.unsqueeze(0).repeat(M, 1, 1)])``
  (two ``[M, M, D]`` repeats and the ``[M, M, 2D]`` pair tensor), the Llama-MLP classifier on it, labels from
  repeated language ids, ``CrossEntropyLoss``;
- ``alignx``: ``alignx.kernels.lang_match_loss`` on the torch path (``W [a; b] = W_1 a + W_2 b``: one ``[M, D] x
  [D, 4H]`` GEMM, pairs combined in the H-wide space, never the pair tensor); ``alignx-triton``: its Triton kernels.

Run: ``python -m benchmarks.bench_lang_match --device cpu`` (``--help`` for the options).
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
HIDDEN = 128


def build(params: dict[str, Any], device: str) -> dict[str, Any]:
    """Seeded inputs: ``emb [M, D]``; English-centric language ids ``[src ; tgt]`` (each pair has English, id 0, on
    one side and one of 9 other languages on the other); the head's weights drawn as initialised, N(0, 0.02^2)."""
    m, d, dtype = params["M"], params["D"], DTYPES[params["dtype"]]
    b = m // 2
    g = seeded(0)
    emb = torch.randn(m, d, generator=g)
    other = torch.randint(1, 10, (b,), generator=g)
    en_first = torch.rand(b, generator=g) < 0.5
    src = torch.where(en_first, torch.zeros_like(other), other)
    tgt = torch.where(en_first, other, torch.zeros_like(other))
    lang = torch.cat([src, tgt])
    w = [torch.randn(shape, generator=g) * 0.02 for shape in ((HIDDEN, 2 * d), (HIDDEN, 2 * d), (2, HIDDEN))]
    t = lambda x: x.to(device=device, dtype=dtype).requires_grad_()
    return {"emb": t(emb), "lang": lang.to(device), "gate_w": t(w[0]), "up_w": t(w[1]), "down_w": t(w[2])}


def work(params: dict[str, Any], mode: str) -> float:
    return float(params["M"] ** 2)


# ----------------------------------------------------------------------------------------------------------------
# Providers


def _reference(x: dict[str, Any], p: dict[str, Any]) -> torch.Tensor:
    from alignx.kernels.reference import lang_match_loss_ref

    return lang_match_loss_ref(x["emb"], x["lang"], x["gate_w"], x["up_w"], x["down_w"])


def _official(x: dict[str, Any], p: dict[str, Any]) -> torch.Tensor:
    # The official modeling file, with its LlamaMLP classifier written out (F.linear = nn.Linear without bias).
    emb, lang = x["emb"], x["lang"]
    m = emb.shape[0]
    pairs = torch.cat([emb.unsqueeze(1).repeat(1, m, 1), emb.unsqueeze(0).repeat(m, 1, 1)], dim=-1)  # [m, m, 2d]
    logits = F.linear(F.silu(F.linear(pairs, x["gate_w"])) * F.linear(pairs, x["up_w"]), x["down_w"])
    truth = (lang.unsqueeze(1).repeat(1, m) == lang.unsqueeze(0).repeat(m, 1)).long()
    return nn.CrossEntropyLoss()(logits.view(-1, 2), truth.view(-1))


def _alignx(backend: str):
    def impl(x: dict[str, Any], p: dict[str, Any]) -> torch.Tensor:
        from alignx.kernels.lang_match import lang_match_loss

        return lang_match_loss(x["emb"], x["lang"], x["gate_w"], x["up_w"], x["down_w"], backend=backend)

    return impl


def _pair_bytes(factor: float):
    def estimate(p: dict[str, Any]) -> float:
        return factor * DTYPES[p["dtype"]].itemsize * p["M"] ** 2 * p["D"]

    return estimate


_OFFICIAL_BYTES = _pair_bytes(6)  # two [M, M, D] repeats, the [M, M, 2D] pairs, and their gradients
_REF_BYTES = _pair_bytes(4)  # the [M, M, 2D] concatenation and its gradient


def _skip(estimate, *, dense: bool):
    def skip(ctx: SkipContext) -> str | None:
        if dense and not ctx.params.get("dense", True):
            return ("same [M, M, 2D] pair-tensor formula as the official idiom, which is the one timed at this size "
                    "(keeps make bench within its time budget)")  # fmt: skip
        need = estimate(ctx.params)
        if need > 0.8 * ctx.available_bytes:
            return f"needs ~{need / GB:.1f} GiB for the pair tensor, {ctx.available_bytes / GB:.1f} GiB available"
        return None

    return skip


PROVIDERS = [
    Provider("reference", _reference, "fp32 reference: expand + cat into [M, M, 2D]",
             skip=_skip(_REF_BYTES, dense=True), heavy=lambda c: _REF_BYTES(c.params) > 2 * GB),
    Provider("compile", _reference, "torch.compile of the reference", compile=True,
             skip=_skip(_REF_BYTES, dense=True)),
    Provider("official", _official, "official AlignX: repeated [M, M, 2D] pair tensor through the MLP",
             skip=_skip(_OFFICIAL_BYTES, dense=False), heavy=lambda c: _OFFICIAL_BYTES(c.params) > 2 * GB),
    Provider("alignx", _alignx("torch"), "alignx.kernels.lang_match_loss, torch path (decomposed, O(M·H))"),
    Provider("alignx-triton", _alignx("triton"), "alignx.kernels.lang_match_loss, Triton kernels", cuda_only=True),
]  # fmt: skip

TINY = Shape("M=8 D=16 fp32", {"M": 8, "D": 16, "dtype": "fp32"}, tags=("official-batch", "lam"))

BENCH = Bench(
    name="lang_match",
    module="benchmarks.bench_lang_match",
    build=build,
    providers=PROVIDERS,
    work=work,
    unit="Mpairs/s",
    scale=1e6,
    roofline=None,
    tiny=TINY,
)


def shapes(device: str) -> list[Shape]:
    """CPU: the official micro-batch (2B = 32), 2B = 128, and the claim's 2B = 512 at D = 2048, with 2B = 256 next
    to it (the official idiom's ~3 GiB fit a busy machine when its ~12 GiB at 512 do not; the claim's ratios only grow
    with M). CUDA: D = 4096 bf16 at 2B = 32, 512 and 4096."""
    if device == "cuda":
        return [
            Shape(f"M={m} D=4096 bf16", {"M": m, "D": 4096, "dtype": "bf16"}, memory_modes=("fwd", "full"))
            for m in (32, 512, 4096)
        ]
    return [
        Shape("M=32 D=2048 fp32", {"M": 32, "D": 2048, "dtype": "fp32"}, tags=("official-batch",)),
        Shape("M=128 D=2048 fp32", {"M": 128, "D": 2048, "dtype": "fp32"}),
        Shape("M=256 D=2048 fp32", {"M": 256, "D": 2048, "dtype": "fp32", "dense": False}, modes=("full",),
              tags=("lam",)),
        Shape("M=512 D=2048 fp32", {"M": 512, "D": 2048, "dtype": "fp32", "dense": False}, modes=("full",),
              tags=("lam",)),
    ]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main(BENCH, shapes, argv, __doc__.splitlines()[0])


__all__ = ["BENCH", "build", "main", "shapes", "work"]

if __name__ == "__main__":
    sys.exit(main())
