"""Span mean-pooling: alignx against the masked-product idiom, the one-hot reference and the fused torch built-ins.

The function every provider computes (two spans per sequence, ids 1 = source, 2 = target, 0 = other, left padding
as the official collator)::

    means[b, s - 1] = mean_{t : span_ids[b, t] = s} hidden[b, t]          hidden [B, T, D] -> means [B, 2, D]

The bandwidth counts the minimal bytes: forward reads ``hidden`` and the ids and writes the means; backward reads
the means' gradient and writes ``d hidden`` (``B·T·D`` elements, zeros outside the spans); fwd+bwd is the sum. It is
reported as a fraction of the copy bandwidth measured in the same run. Providers:

- ``reference``: ``alignx.kernels.reference.span_mean_pool_ref`` (fp32 one-hot ``[B, T, S]`` and an einsum);
- ``compile``: ``torch.compile`` of the reference;
- ``masked-product``: the official AlignX pooling, ``(h * (ids == s).unsqueeze(-1)).sum(1) / (ids == s).sum(1)``
  per span (a ``[B, T, D]`` product for each span, in the dtype of ``h``);
- ``alignx``: ``alignx.kernels.span_mean_pool`` on the torch path (all spans in one pass); ``alignx-triton``: its
  Triton kernels;
- ``segment_reduce``: ``torch.segment_reduce(h.view(B*T, D), "mean", lengths=runs)`` over the runs of equal
  (row, id) keys (needs each span contiguous, as in the official layout);
- ``embedding_bag``: ``F.embedding_bag(positions, h.view(B*T, D), offsets, mode="mean")`` with one bag per
  (row, span) (any token set).

Run: ``python -m benchmarks.bench_span_pool --device cpu`` (``--help`` for the options).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

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
NUM_SPANS = 2


def official_layout(batch: int, seq: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Span ids and attention mask ``[B, T]`` laid out as the official collator does: left padding (mask 0), then
    BOS, instruction tokens (0), the source (1), the response header (0), the target (2) and EOS (0); real lengths
    between T/2 and T."""
    ids = torch.zeros(batch, seq, dtype=torch.long)
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for b in range(batch):
        length = int(torch.randint(seq // 2, seq + 1, (1,), generator=generator))
        start = seq - length
        prefix = 1 + max(1, int(0.15 * length))
        src = max(1, int(0.35 * length))
        mid = max(1, int(0.05 * length))
        s0 = start + prefix
        t0 = s0 + src + mid
        ids[b, s0 : s0 + src] = 1
        ids[b, t0 : seq - 1] = 2
        mask[b, start:] = 1
    return ids, mask


def build(params: dict[str, Any], device: str) -> dict[str, Any]:
    """Seeded ``hidden [B, T, D]`` (requires grad) and official-layout ``span_ids [B, T]``."""
    b, t, d, dtype = params["B"], params["T"], params["D"], DTYPES[params["dtype"]]
    g = seeded(0)
    hidden = torch.randn(b, t, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    return {"hidden": hidden, "span_ids": official_layout(b, t, g)[0].to(device)}


def work(params: dict[str, Any], mode: str) -> float:
    b, t, d, e = params["B"], params["T"], params["D"], DTYPES[params["dtype"]].itemsize
    fwd = b * t * d * e + b * t * 8 + b * NUM_SPANS * d * 4
    bwd = b * NUM_SPANS * d * 4 + b * t * d * e + b * t * 8
    return float({"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode])


def hidden_bytes(params: dict[str, Any]) -> int:
    return params["B"] * params["T"] * params["D"] * DTYPES[params["dtype"]].itemsize


# ----------------------------------------------------------------------------------------------------------------
# Providers


def _reference(x: dict[str, Any], p: dict[str, Any]) -> torch.Tensor:
    from alignx.kernels.reference import span_mean_pool_ref

    return span_mean_pool_ref(x["hidden"], x["span_ids"], NUM_SPANS, out_dtype=torch.float32)[0]


def _masked_product(x: dict[str, Any], p: dict[str, Any]) -> torch.Tensor:
    # The official modeling file's pooling, once per span.
    h, idx = x["hidden"], x["span_ids"]

    def masked_mean(mark: int) -> torch.Tensor:
        m = idx == mark
        return (h * m.unsqueeze(-1)).sum(dim=1) / m.sum(dim=1).unsqueeze(-1)

    return torch.stack([masked_mean(s) for s in range(1, NUM_SPANS + 1)], dim=1)


def _alignx(backend: str):
    def impl(x: dict[str, Any], p: dict[str, Any]) -> torch.Tensor:
        from alignx.kernels.span_pool import span_mean_pool

        means, _ = span_mean_pool(
            x["hidden"], x["span_ids"], NUM_SPANS, out_dtype=torch.float32, backend=backend, validate=False
        )
        return means

    return impl


def _keys(idx: torch.Tensor) -> torch.Tensor:
    b, t = idx.shape
    rows = torch.arange(b, device=idx.device).unsqueeze(1)
    return (rows * (NUM_SPANS + 1) + idx).reshape(-1)  # [B*T]: (row, span id) -> one integer


def _segment_reduce(x: dict[str, Any], p: dict[str, Any]) -> torch.Tensor:
    h, idx = x["hidden"], x["span_ids"]
    b, t, d = h.shape
    keys, lengths = torch.unique_consecutive(_keys(idx), return_counts=True)
    seg = torch.segment_reduce(h.reshape(b * t, d), "mean", lengths=lengths)  # one row per run
    span = keys % (NUM_SPANS + 1)
    keep = span > 0
    out = h.new_zeros(b * NUM_SPANS, d)
    slot = (keys[keep] // (NUM_SPANS + 1)) * NUM_SPANS + span[keep] - 1
    return out.index_copy(0, slot, seg[keep]).view(b, NUM_SPANS, d)


def _embedding_bag(x: dict[str, Any], p: dict[str, Any]) -> torch.Tensor:
    h, idx = x["hidden"], x["span_ids"]
    b, t, d = h.shape
    flat = idx.reshape(-1)
    pos = flat.nonzero().squeeze(1)
    slot = (pos // t) * NUM_SPANS + flat[pos] - 1  # bag of each span token, (row, span) order
    order = torch.sort(slot, stable=True).indices
    counts = torch.bincount(slot, minlength=b * NUM_SPANS)
    offsets = torch.cumsum(counts, 0) - counts
    out = F.embedding_bag(pos[order], h.reshape(b * t, d), offsets, mode="mean")
    return out.view(b, NUM_SPANS, d)


def _too_big(factor: float):
    def skip(ctx: SkipContext) -> str | None:
        need = factor * hidden_bytes(ctx.params)
        if need > 0.8 * ctx.available_bytes:
            return f"needs ~{need / GB:.1f} GiB, {ctx.available_bytes / GB:.1f} GiB available"
        return None

    return skip


PROVIDERS = [
    Provider("reference", _reference, "fp32 one-hot einsum reference (alignx.kernels.reference)",
             skip=_too_big(6), heavy=lambda c: 6 * hidden_bytes(c.params) > 2 * GB),
    Provider("compile", _reference, "torch.compile of the reference", compile=True, skip=_too_big(6)),
    Provider("masked-product", _masked_product, "official AlignX / sentence-transformers masked product per span",
             skip=_too_big(6), heavy=lambda c: 6 * hidden_bytes(c.params) > 2 * GB),
    Provider("alignx", _alignx("torch"), "alignx.kernels.span_mean_pool, torch path (one pass, all spans)"),
    Provider("alignx-triton", _alignx("triton"), "alignx.kernels.span_mean_pool, Triton kernels", cuda_only=True),
    Provider("segment_reduce", _segment_reduce, "torch.segment_reduce mean over (row, span) runs"),
    Provider("embedding_bag", _embedding_bag, "F.embedding_bag(mode='mean'), one bag per (row, span)"),
]  # fmt: skip

TINY = Shape("B=4 T=32 D=16 fp32", {"B": 4, "T": 32, "D": 16, "dtype": "fp32"}, tags=("pool",))

BENCH = Bench(
    name="span_pool",
    module="benchmarks.bench_span_pool",
    build=build,
    providers=PROVIDERS,
    work=work,
    unit="GB/s",
    scale=1e9,
    roofline="copy",
    tiny=TINY,
    units={"[B, T, D]": lambda p: hidden_bytes(p) / 2**20},  # claims: extra memory in units of one hidden tensor
)


def shapes(device: str) -> list[Shape]:
    """CPU: the official micro-batch (16 x 512) at D = 2048 fp32, and 64 x 256 at D = 1024 bf16. CUDA: D = 4096
    bf16, one micro-batch of 64 x 512 and 4096 spans of ~128 tokens (2048 x 256)."""
    if device == "cuda":
        return [
            Shape("B=64 T=512 D=4096 bf16", {"B": 64, "T": 512, "D": 4096, "dtype": "bf16"},
                  memory_modes=("fwd", "full"), tags=("pool",)),
            Shape("B=2048 T=256 D=4096 bf16", {"B": 2048, "T": 256, "D": 4096, "dtype": "bf16"},
                  memory_modes=("fwd", "full"), tags=("pool", "gpu-bw", "quick")),
        ]  # fmt: skip
    return [
        Shape("B=16 T=512 D=2048 fp32", {"B": 16, "T": 512, "D": 2048, "dtype": "fp32"}, tags=("pool",)),
        Shape("B=64 T=256 D=1024 bf16", {"B": 64, "T": 256, "D": 1024, "dtype": "bf16"}, tags=("pool",)),
    ]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main(BENCH, shapes, argv, __doc__.splitlines()[0])


__all__ = ["BENCH", "build", "main", "official_layout", "shapes", "work"]

if __name__ == "__main__":
    sys.exit(main())
