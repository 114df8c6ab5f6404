"""Shared plumbing of the kernel ops: backend choice, interpreter detection, input checks, AOT specs.

Imports torch and triton only (never ``alignx``, transformers or deepspeed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

BACKENDS = ("auto", "triton", "torch", "reference")


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton is a hard dependency, but stay importable without it
        return False
    return True


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Map ``backend`` to the implementation that runs.

    ``"auto"`` is Triton when the tensors live on CUDA or the Triton interpreter is on, and the memory-bounded
    torch path otherwise. ``"triton"`` on CPU tensors without the interpreter is an error, never a silent fallback.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = any(t.is_cuda for t in tensors)
    if backend == "auto":
        return "triton" if (on_cuda or interpreter_enabled()) and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package")
        if not (on_cuda or interpreter_enabled()):
            raise RuntimeError("backend='triton' needs CUDA tensors or TRITON_INTERPRET=1 (CPU interpreter)")
    return backend


def upcast_in_kernel() -> bool:
    """Whether a kernel must cast bf16 blocks to fp32 before any maths.

    The Triton interpreter does bf16 maths on raw uint16 bit patterns (silently wrong), so under the interpreter
    every load is cast to fp32 first; on a GPU bf16 operands go to ``tl.dot`` as they are (tensor cores).
    """
    return interpreter_enabled()


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_int(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")


def check_ndim(name: str, t: torch.Tensor, ndim: int | tuple[int, ...]) -> None:
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if t.dim() not in dims:
        want = " or ".join(str(d) for d in dims)
        raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(t.shape)}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device: {listing}")


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


@dataclass
class AOTSpec:
    """One Triton kernel at one launch configuration, for ahead-of-time compilation checks (no GPU needed).

    ``signature`` maps every non-constexpr argument to its Triton type (``"*bf16"``, ``"*fp32"``, ``"i32"``,
    ``"fp32"``, ...); ``constexprs`` maps every ``tl.constexpr`` argument to the value the launcher uses.
    ``gemm`` marks GEMM-shaped kernels whose main loop must use tensor-core instructions (``wgmma`` on sm_90a).
    """

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 2
    gemm: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
