"""Comparison helpers shared by the kernel tests."""

from __future__ import annotations

import torch


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.detach().double() - ref.detach().double()).abs().max().item() if x.numel() else 0.0


def assert_close_to_ref(
    out: torch.Tensor,
    ref: torch.Tensor,
    *,
    dtype: torch.dtype,
    torch_lowp: torch.Tensor | None = None,
    atol32: float = 1e-5,
    rtol32: float = 1e-5,
    factor: float = 4.0,
    floor: float = 1e-6,
    name: str = "",
) -> None:
    """fp32: allclose. fp16/bf16: the error against the fp32 oracle is bounded by ``factor`` times torch's own
    low-precision error against it (``torch_lowp``: the same maths done by torch in the low-precision dtype)."""
    assert not torch.isnan(out).any(), f"{name}: NaN in output (an element was not written?)"
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    if dtype == torch.float32 or torch_lowp is None:
        torch.testing.assert_close(out.double(), ref.double(), atol=atol32, rtol=rtol32, msg=lambda m: f"{name}: {m}")
        return
    bound = factor * max_err(torch_lowp, ref) + floor
    err = max_err(out, ref)
    assert err <= bound, f"{name}: {dtype} error {err:.3g} > {factor} x torch's own {max_err(torch_lowp, ref):.3g}"
