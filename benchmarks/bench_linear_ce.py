"""Linear cross-entropy: alignx's fused LM head + NTP loss against the dense head, torch's own and today's loss.

The function every provider computes (the summed next-token loss of the counted rows; labels already shifted, the
last position counts nothing, ``response`` shapes count only the second half of the rows)::

    loss = sum_{i : y_i != -100} [ logsumexp_v z[i, v] - z[i, y_i] ],   z = hidden @ weight^T (soft-capped if set)

hidden ``[N, D]``, weight ``[V, D]``, labels ``[N]``; gradients for hidden and weight. The rate counts the dense
work, 6·N·D·V FLOPs per forward + backward (``full``), as a fraction of the GEMM measured in the same run; fused
providers form their gradients in the forward, so only ``fwd`` and ``full`` are timed (a second backward of one
forward is refused by them, as by torch's chunked op). Providers:

- ``hf``: the Hugging Face head and loss, ``F.linear`` (the ``[N, V]`` logits in the input dtype), the soft-cap,
  ``logits.float()`` and ``F.cross_entropy(reduction="sum")``;
- ``objective``: alignx's current NTP loss, :func:`alignx.objective.lm_loss_sum` (fp32 cross-entropy in chunks, one
  logits-sized gradient) on the dense logits of ``F.linear``;
- ``torch-lce-<policy>``: torch's ``F.linear_cross_entropy`` with ``LinearCrossEntropyOptions(acc_policy=<policy>)``
  and its default chunking (``aspect_ratio``: about ``N·D/V`` rows per chunk); ``torch-lce-compact-bigchunk``: the
  compact policy with alignx's chunk rows (``batch_chunk_size``: the same logits memory);
- ``alignx``: ``alignx.kernels.linear_cross_entropy`` on the torch path; ``alignx-triton``: its Triton kernels;
- ``liger`` (``LigerFusedLinearCrossEntropyLoss``), ``cce`` (Cut Cross-Entropy, ``filter_eps=None``: exact):
  GPU only, when installed.

Run: ``python -m benchmarks.bench_linear_ce --device cpu`` (``--help`` for the options).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from alignx.constants import IGNORE_INDEX as IGNORE

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
NATIVE_POLICIES = ("compact", "accurate", "balanced")


def build(params: dict[str, Any], device: str) -> dict[str, Any]:
    """Seeded inputs: hidden ``[N, D]`` ~ N(0, 1), weight ``[V, D]`` ~ N(0, 0.05^2) (logits of std ~0.05·sqrt(D)),
    labels uniform over the vocabulary, -100 at the last position (and on the first half for ``response``)."""
    n, d, v, dtype = params["N"], params["D"], params["V"], DTYPES[params["dtype"]]
    g = seeded(0)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) * 0.05
    labels = torch.randint(0, v, (n,), generator=g)
    labels[-1] = IGNORE
    if params.get("response"):
        labels[: n // 2] = IGNORE
    return {
        "hidden": hidden.to(device=device, dtype=dtype).requires_grad_(),
        "weight": weight.to(device=device, dtype=dtype).requires_grad_(),
        "labels": labels.to(device),
    }


def work(params: dict[str, Any], mode: str) -> float:
    return float(6 * params["N"] * params["D"] * params["V"]) if mode == "full" else 0.0


def chunk_rows(params: dict[str, Any]) -> int:
    """Rows per chunk of alignx's torch path at this shape (its default 256 MiB fp32 chunk)."""
    from alignx.kernels.linear_ce import DEFAULT_CHUNK_BYTES

    return max(1, DEFAULT_CHUNK_BYTES // (4 * params["V"]))


# ----------------------------------------------------------------------------------------------------------------
# Providers


def _softcap(z: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    cap = p.get("softcap")
    return z if cap is None else cap * torch.tanh(z / cap)


def _hf(x: dict[str, Any], p: dict[str, Any]) -> torch.Tensor:
    logits = _softcap(F.linear(x["hidden"], x["weight"]), p)
    return F.cross_entropy(logits.float(), x["labels"], ignore_index=IGNORE, reduction="sum")


def _objective(x: dict[str, Any], p: dict[str, Any]) -> torch.Tensor:
    from alignx.objective import lm_loss_sum

    # lm_loss_sum shifts: the label of position t is labels[t + 1], so prepend one ignored label (the last
    # position counts nothing in every provider).
    labels = torch.cat([x["labels"].new_full((1,), IGNORE), x["labels"][:-1]])
    logits = _softcap(F.linear(x["hidden"], x["weight"]), p)
    return lm_loss_sum(logits[None], labels[None])[0]


def _native(policy: str, big_chunk: bool = False):
    def impl(x: dict[str, Any], p: dict[str, Any]) -> torch.Tensor:
        if big_chunk:
            opts = torch.nn.LinearCrossEntropyOptions(
                acc_policy=policy, chunking_method=None, batch_chunk_size=chunk_rows(p)
            )
        else:
            opts = torch.nn.LinearCrossEntropyOptions(acc_policy=policy, chunking_method="aspect_ratio")
        return F.linear_cross_entropy(
            x["hidden"], x["weight"], x["labels"], reduction="sum", ignore_index=IGNORE, options=opts
        )

    return impl


def _alignx(backend: str):
    def impl(x: dict[str, Any], p: dict[str, Any]) -> torch.Tensor:
        from alignx.kernels import linear_cross_entropy

        loss, _ = linear_cross_entropy(
            x["hidden"], x["weight"], x["labels"], softcap=p.get("softcap"), backend=backend, validate=False
        )
        return loss

    return impl


def _liger(x: dict[str, Any], p: dict[str, Any]) -> torch.Tensor:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum", softcap=p.get("softcap"))
    return loss(x["weight"], x["hidden"], x["labels"])


def _cce(x: dict[str, Any], p: dict[str, Any]) -> torch.Tensor:
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(
        x["hidden"], x["weight"], x["labels"], ignore_index=IGNORE, softcap=p.get("softcap"), reduction="sum",
        filter_eps=None,
    )  # fmt: skip


def _dense_bytes(p: dict[str, Any]) -> int:
    # The [N, V] logits, their fp32 log-softmax, the gradient of the log-softmax and that of the logits.
    return 4 * 4 * p["N"] * p["V"]


def _objective_bytes(p: dict[str, Any]) -> int:
    # The logits and one logits-sized gradient, plus 256 MiB of fp32 chunk temporaries.
    return 2 * 4 * p["N"] * p["V"] + (256 << 20)


def _too_big(estimate) -> Any:
    def skip(ctx: SkipContext) -> str | None:
        need = estimate(ctx.params)
        if need > 0.8 * ctx.available_bytes:
            return f"needs ~{need / GB:.1f} GiB, {ctx.available_bytes / GB:.1f} GiB available"
        return None

    return skip


def _no_softcap(ctx: SkipContext) -> str | None:
    if ctx.params.get("softcap") is not None:
        return "torch's F.linear_cross_entropy has no logit soft-capping"
    return None


def _heavy(estimate) -> Any:
    return lambda ctx: estimate(ctx.params) > 2 * GB


PIP = "pip install -c constraints.txt --no-deps"
PROVIDERS = [
    Provider("hf", _hf, "HF head + loss: F.linear logits, .float(), F.cross_entropy(sum)",
             skip=_too_big(_dense_bytes), heavy=_heavy(_dense_bytes)),
    Provider("objective", _objective, "alignx today: alignx.objective.lm_loss_sum on the dense F.linear logits",
             skip=_too_big(_objective_bytes), heavy=_heavy(_objective_bytes)),
    *(Provider(f"torch-lce-{pol}", _native(pol), f"torch F.linear_cross_entropy, acc_policy={pol!r}, aspect_ratio "
               "chunks", skip=_no_softcap) for pol in NATIVE_POLICIES),
    Provider("torch-lce-compact-bigchunk", _native("compact", big_chunk=True),
             "torch F.linear_cross_entropy, compact, batch_chunk_size = alignx's chunk rows", skip=_no_softcap),
    Provider("alignx", _alignx("torch"), "alignx.kernels.linear_cross_entropy, torch path (256 MiB chunks)"),
    Provider("alignx-triton", _alignx("triton"), "alignx.kernels.linear_cross_entropy, Triton kernels",
             cuda_only=True),
    Provider("liger", _liger, "Liger-Kernel LigerFusedLinearCrossEntropyLoss(reduction='sum')",
             requires=("liger_kernel",), install_hint=f"{PIP} liger-kernel", cuda_only=True),
    Provider("cce", _cce, "Cut Cross-Entropy linear_cross_entropy(filter_eps=None): exact",
             requires=("cut_cross_entropy",), install_hint=f"{PIP} cut-cross-entropy", cuda_only=True),
]  # fmt: skip

MODES = ("fwd", "full")
TINY = Shape(
    "N=32 D=16 V=96 fp32",
    {"N": 32, "D": 16, "V": 96, "dtype": "fp32"},
    modes=MODES,
    tags=("gemma",),
)

BENCH = Bench(
    name="linear_ce",
    module="benchmarks.bench_linear_ce",
    build=build,
    providers=PROVIDERS,
    work=work,
    unit="TFLOP/s",
    scale=1e12,
    roofline="gemm",
    tiny=TINY,
)


def shapes(device: str) -> list[Shape]:
    """CPU: Gemma-3-270M's head at 2,048 tokens (the claims) and a Llama-3 vocabulary at D = 1024, all rows and
    response-only labels; full mode only (a provider call there is tens of seconds). CUDA: bf16, V = 262,144 and
    128,256, D = 640 .. 4096, 8,192 tokens."""
    if device == "cuda":
        return [
            Shape(f"N=8192 D={d} V={v} bf16", {"N": 8192, "D": d, "V": v, "dtype": "bf16"}, modes=MODES,
                  memory_modes=("full",), tags=("gpu",))
            for d, v in ((640, 262144), (2048, 262144), (4096, 128256))
        ]  # fmt: skip
    return [
        Shape("Gemma-3-270M N=2048 D=640 V=262144 fp32", {"N": 2048, "D": 640, "V": 262144, "dtype": "fp32"},
              modes=("full",), tags=("gemma",)),
        Shape("N=512 D=1024 V=128256 fp32", {"N": 512, "D": 1024, "V": 128256, "dtype": "fp32"}, modes=("full",),
              tags=("vocab-128k",)),
        Shape("N=512 D=1024 V=128256 fp32 response", {"N": 512, "D": 1024, "V": 128256, "dtype": "fp32",
                                                       "response": True}, modes=("full",)),
    ]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main(BENCH, shapes, argv, __doc__.splitlines()[0])


__all__ = ["BENCH", "build", "main", "shapes", "work"]

if __name__ == "__main__":
    sys.exit(main())
