"""span_mean_pool: forward and gradient against the fp32 oracle, on the Triton kernels (interpreter on CPU, compiled on
CUDA) and on the torch path, over dtypes x awkward shapes; input validation; backend resolution."""

from __future__ import annotations

from dataclasses import dataclass

import alignx.kernels._common as common
import alignx.kernels.span_pool as sp
import numpy as np
import pytest
import torch
from alignx.kernels.reference import span_mean_pool_ref, unpack_cu_seqlens
from alignx.kernels.span_pool import span_mean_pool
from kernel_utils import assert_close_to_ref

HAS_CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["triton", "torch"]


# ----------------------------------------------------------------------------------------------------------------------
# Cases: span ids written as runs of (id, length)
# ----------------------------------------------------------------------------------------------------------------------


def _row(*runs: tuple[int, int]) -> list[int]:
    return [sid for sid, n in runs for _ in range(n)]


@dataclass
class Case:
    rows: list[list[int]]  # span ids per sequence
    num_spans: int
    D: int
    packed: bool = False
    cu_dtype: torch.dtype = torch.int32

    def build(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """span_ids ([B, T] padded, or [total] packed) and cu_seqlens (packed only, of cu_dtype)."""
        if self.packed:
            ids = torch.tensor([i for r in self.rows for i in r], dtype=torch.long, device=device)
            lens = torch.tensor([0] + [len(r) for r in self.rows])
            return ids, lens.cumsum(0).to(device=device, dtype=self.cu_dtype)
        T = len(self.rows[0])
        assert all(len(r) == T for r in self.rows)
        return torch.tensor(self.rows, dtype=torch.long, device=device), None

    def hidden_shape(self) -> tuple[int, ...]:
        if self.packed:
            return (sum(len(r) for r in self.rows), self.D)
        return (len(self.rows), len(self.rows[0]), self.D)


def _random_rows(B: int, T: int, S: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, S + 1, (B, T), generator=g).tolist()


CASES = {
    # prompt (0), source (1), gap (0), target (2), right padding (0)
    "right_pad": Case(
        [_row((0, 3), (1, 5), (0, 2), (2, 4), (0, 3)), _row((0, 2), (1, 7), (0, 1), (2, 6), (0, 1))], 2, 32
    ),
    "left_pad": Case([_row((0, 6), (1, 4), (0, 1), (2, 6)), _row((0, 1), (1, 8), (0, 2), (2, 6))], 2, 32),
    "odd_D_T": Case([_row((0, 4), (1, 11), (0, 3), (2, 13), (0, 6)), _row((1, 20), (2, 17))], 2, 40),
    "one_token_spans": Case([_row((0, 2), (1, 1), (0, 3), (2, 1), (0, 2)), _row((1, 1), (2, 1), (0, 7))], 2, 24),
    "empty_span": Case([_row((0, 3), (1, 6), (0, 4)), _row((0, 2), (2, 9), (0, 2))], 2, 24),
    "all_padding_row": Case([_row((0, 2), (1, 5), (2, 5), (0, 1)), _row((0, 13))], 2, 24),
    "B1": Case([_row((0, 5), (1, 9), (0, 2), (2, 7))], 2, 48),
    "many_spans_S5_holes": Case(_random_rows(3, 29, 5, seed=1), 5, 20),
    # several D-blocks with a tail (fwd BLOCK_D 128, bwd 256) and several BLOCK_T iterations per sequence (64)
    "multi_block": Case([_row((0, 7), (1, 70), (0, 3), (2, 60), (0, 10)), _row((0, 40), (1, 50), (2, 60))], 2, 300),
    "packed_empty_seq": Case(
        [_row((0, 2), (1, 5), (2, 4)), [], _row((1, 3), (0, 1), (2, 9), (0, 2)), _row((0, 3), (2, 1)), []],
        2,
        36,
        packed=True,
    ),
    "packed_S5_holes_cu64": Case(_random_rows(4, 17, 5, seed=2), 5, 20, packed=True, cu_dtype=torch.int64),
    # 11 sequences (4 search halvings per row in backward), empty first / middle / last, lengths 1..9
    "packed_11_seqs": Case(
        [[], *(r[: (3 * i) % 10] for i, r in enumerate(_random_rows(9, 9, 2, seed=3), 1)), [], []], 2, 20, packed=True
    ),
}
# D = 4096 (the configuration compiled ahead of time): interpreter-sized, then GPU-sized.
SMALL_4096 = {"D4096": Case([_row((0, 3), (1, 40), (0, 2), (2, 30))], 2, 4096)}
GPU_CASES = {
    "gpu_D4096_B16_T512": Case(
        [_row((0, 31 + b), (1, 200), (0, 9), (2, 210), (0, 62 - b)) for b in range(16)], 2, 4096
    ),
    "gpu_packed_D4096": Case(
        [_row((0, 17 * b), (1, 100 + 13 * b), (2, 90 + 7 * b)) for b in range(12)] + [[]], 2, 4096, packed=True
    ),
}


def _case_params() -> list:
    params = [pytest.param(c, id=name) for name, c in {**CASES, **SMALL_4096}.items()]
    params += [pytest.param(c, id=name, marks=pytest.mark.gpu) for name, c in GPU_CASES.items()]
    return params


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------


class _LaunchSpy:
    """Stands in for a @triton.jit kernel and records each launch, to prove the Triton path ran."""

    def __init__(self, kernel) -> None:
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.fixture
def spies(monkeypatch: pytest.MonkeyPatch) -> dict[str, _LaunchSpy]:
    out = {"fwd": _LaunchSpy(sp._span_pool_fwd_kernel), "bwd": _LaunchSpy(sp._span_pool_bwd_kernel)}
    monkeypatch.setattr(sp, "_span_pool_fwd_kernel", out["fwd"])
    monkeypatch.setattr(sp, "_span_pool_bwd_kernel", out["bwd"])
    return out


def _lowp_means(hidden: torch.Tensor, ids: torch.Tensor, S: int, cu: torch.Tensor | None) -> torch.Tensor:
    """Torch's own low-precision result: the masked-product idiom in the input dtype (the error scale for fp16/bf16)."""
    if cu is not None:
        hidden, ids = unpack_cu_seqlens(hidden, cu, 0), unpack_cu_seqlens(ids, cu, 0)
    outs = []
    for s in range(1, S + 1):
        mask = (ids == s).unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
        outs.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
    return torch.stack(outs, 1)


def _fwd_bwd(fn, hidden: torch.Tensor, upstream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """means, counts and d hidden of ``(2 * <means, upstream>).backward()`` (a non-unit upstream gradient)."""
    leaf = hidden.detach().clone().requires_grad_(True)
    out = fn(leaf)
    means, counts = out if isinstance(out, tuple) else (out, None)
    (2 * (means.float() * upstream).sum()).backward()
    return means.detach(), counts, leaf.grad


# ----------------------------------------------------------------------------------------------------------------------
# Forward and gradient against the fp32 oracle
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", _case_params())
def test_matches_reference(case: Case, dtype: torch.dtype, backend: str, device, nan_poison, spies) -> None:
    ids, cu = case.build(device)
    S = case.num_spans
    hidden = torch.randn(case.hidden_shape(), device=device).to(dtype)
    B = len(case.rows)
    upstream = torch.randn(B, S, case.D, device=device)

    means, counts, grad = _fwd_bwd(
        lambda h: span_mean_pool(h, ids, S, cu_seqlens=cu, backend=backend), hidden, upstream
    )
    ref_means, ref_counts, ref_grad = _fwd_bwd(
        lambda h: span_mean_pool_ref(h, ids, S, cu_seqlens=cu), hidden.float(), upstream
    )
    lowp_means, _, lowp_grad = _fwd_bwd(lambda h: _lowp_means(h, ids, S, cu), hidden, upstream)

    assert means.dtype == dtype and means.shape == (B, S, case.D)
    assert counts.dtype == torch.int64 and torch.equal(counts, ref_counts)
    assert grad.dtype == dtype and grad.shape == hidden.shape
    assert_close_to_ref(means, ref_means, dtype=dtype, torch_lowp=lowp_means, name="means")
    assert_close_to_ref(grad, ref_grad, dtype=dtype, torch_lowp=lowp_grad, name="grad hidden")
    # outside every span the gradient is exactly zero (written by the kernel: torch.empty is NaN-poisoned here)
    assert torch.equal(grad[ids == 0], torch.zeros_like(grad[ids == 0]))
    # empty spans: zero vector, count 0, never NaN
    assert torch.equal(means[counts == 0], torch.zeros_like(means[counts == 0]))
    launched = (len(spies["fwd"].grids), len(spies["bwd"].grids))
    assert launched == ((1, 1) if backend == "triton" else (0, 0)), launched


@pytest.mark.skipif(HAS_CUDA, reason="counts the loads the Triton interpreter executes")
@pytest.mark.parametrize("case", ["multi_block", "left_pad", "packed_11_seqs"])
def test_forward_reads_each_hidden_element_once(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-read claim, observed: the forward kernel loads every element of a span row exactly once and never
    touches a row that is in no span."""
    from triton.runtime import interpreter

    c = CASES[case]
    ids, cu = c.build(torch.device("cpu"))
    hidden = torch.randn(c.hidden_shape()).to(torch.bfloat16)
    size = hidden.element_size()
    lo, hi = hidden.data_ptr(), hidden.data_ptr() + hidden.numel() * size
    hits = np.zeros(hidden.numel(), dtype=np.int64)

    def count(addr: np.ndarray) -> None:
        addr = addr[(addr >= lo) & (addr < hi)].astype(np.int64)
        np.add.at(hits, (addr - lo) // size, 1)

    masked_load, plain_load = (
        interpreter.InterpreterBuilder.create_masked_load,
        interpreter.InterpreterBuilder.create_load,
    )

    def counting_masked_load(self, ptrs, mask, *args):
        count(ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)])
        return masked_load(self, ptrs, mask, *args)

    def counting_load(self, ptr, *args):
        count(np.atleast_1d(ptr.data))
        return plain_load(self, ptr, *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", counting_masked_load)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_load", counting_load)
    span_mean_pool(hidden, ids, c.num_spans, cu_seqlens=cu, backend="triton")
    in_span = (ids > 0).reshape(-1, 1).expand(-1, c.D).reshape(-1).numpy()
    assert (hits[in_span] == 1).all() and (hits[~in_span] == 0).all(), np.unique(hits, return_counts=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("dtype", "out_dtype"),
    [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)],
    ids=["bf16>fp32", "fp32>bf16"],
)
def test_out_dtype(dtype: torch.dtype, out_dtype: torch.dtype, backend: str, device, nan_poison) -> None:
    case = CASES["odd_D_T"]
    ids, _ = case.build(device)
    hidden = torch.randn(case.hidden_shape(), device=device).to(dtype)
    upstream = torch.randn(2, 2, case.D, device=device)
    means, _, grad = _fwd_bwd(
        lambda h: span_mean_pool(h, ids, 2, out_dtype=out_dtype, backend=backend), hidden, upstream
    )
    ref_means, _, ref_grad = _fwd_bwd(lambda h: span_mean_pool_ref(h, ids, 2), hidden.float(), upstream)
    assert means.dtype == out_dtype and grad.dtype == dtype
    # fp32 accumulation: bf16 inputs pooled into fp32 means agree with the fp32 oracle to fp32 rounding
    tol = 1e-5 if out_dtype == torch.float32 else 2**-8
    torch.testing.assert_close(means.float(), ref_means, atol=tol, rtol=tol)
    torch.testing.assert_close(grad.float(), ref_grad, atol=1e-5 if dtype == torch.float32 else 2**-7, rtol=2**-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_non_contiguous_hidden(dtype: torch.dtype, backend: str, device, nan_poison) -> None:
    """A slice that drops the first token (e.g. an attention-sink token) pools through its strides."""
    case = CASES["right_pad"]
    ids, _ = case.build(device)
    full = torch.randn(2, ids.shape[1] + 1, case.D, device=device).to(dtype)
    hidden = full[:, 1:]
    assert not hidden.is_contiguous()
    upstream = torch.randn(2, 2, case.D, device=device)
    means, counts, grad = _fwd_bwd(
        lambda h: span_mean_pool(h[:, 1:], ids, 2, out_dtype=torch.float32, backend=backend), full, upstream
    )
    ref_means, ref_counts, ref_grad = _fwd_bwd(lambda h: span_mean_pool_ref(h[:, 1:], ids, 2), full.float(), upstream)
    assert torch.equal(counts, ref_counts)
    torch.testing.assert_close(means, ref_means, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.float(), ref_grad.to(dtype).float(), atol=1e-6, rtol=0)
    assert torch.equal(grad[:, 0], torch.zeros_like(grad[:, 0]))


@pytest.mark.parametrize("path", ["embedding_bag", "index_add"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", ["left_pad", "many_spans_S5_holes", "packed_empty_seq"])
def test_torch_path_chunks(
    case: str, dtype: torch.dtype, path: str, monkeypatch: pytest.MonkeyPatch, nan_poison
) -> None:
    """Both torch-path summations (CPU gather + embedding_bag, and the sync-free index_add_ used on CUDA), with bf16
    rows staged through the fp32 buffer in many 3-row chunks."""
    c = CASES[case]
    ids, cu = c.build(torch.device("cpu"))
    monkeypatch.setattr(sp, "_TORCH_CHUNK_BYTES", 3 * 4 * c.D)
    if path == "index_add":
        monkeypatch.setattr(
            sp, "_span_sums_cpu", lambda flat, tgt, counts, R: sp._span_sums_index_add([(0, flat)], tgt, R, c.D)
        )
    hidden = torch.randn(c.hidden_shape()).to(dtype)
    means, counts = span_mean_pool(hidden, ids, c.num_spans, cu_seqlens=cu, out_dtype=torch.float32, backend="torch")
    ref_means, ref_counts = span_mean_pool_ref(hidden.float(), ids, c.num_spans, cu_seqlens=cu)
    assert torch.equal(counts, ref_counts)
    torch.testing.assert_close(means, ref_means, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_outside_spans_is_ignored(backend: str, device, nan_poison) -> None:
    """Padding / prompt rows may hold NaN or inf (e.g. fully masked attention rows): they must not leak into means."""
    case = CASES["left_pad"]
    ids, _ = case.build(device)
    clean = torch.randn(case.hidden_shape(), device=device)
    dirty = clean.clone()
    dirty[ids == 0] = float("nan")
    dirty[0, 0] = float("inf")
    means, counts = span_mean_pool(dirty, ids, 2, backend=backend)
    ref_means, ref_counts = span_mean_pool_ref(clean, ids, 2)
    assert torch.equal(counts, ref_counts)
    torch.testing.assert_close(means, ref_means, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_spans_empty(backend: str, device, nan_poison) -> None:
    hidden = torch.randn(2, 7, 24, device=device, requires_grad=True)
    ids = torch.zeros(2, 7, dtype=torch.long, device=device)
    means, counts = span_mean_pool(hidden, ids, 2, backend=backend)
    assert torch.equal(counts, torch.zeros(2, 2, dtype=torch.int64, device=device))
    assert torch.equal(means, torch.zeros_like(means))
    means.sum().backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))


@pytest.mark.parametrize("backend", BACKENDS)
def test_unvalidated_out_of_range_ids_count_for_nothing(backend: str, device) -> None:
    """With validate=False (no host sync) ids outside 1..S are ignored by both paths, like id 0."""
    hidden = torch.randn(2, 9, 20, device=device)
    ids = torch.tensor([[0, 1, 1, 3, 2, 2, -1, 7, 0], [2, 2, 5, 1, 0, 3, 1, 1, 9]], device=device)
    means, counts = span_mean_pool(hidden, ids, 2, backend=backend, validate=False)
    clean = torch.where((ids >= 1) & (ids <= 2), ids, 0)
    ref_means, ref_counts = span_mean_pool_ref(hidden, clean, 2)
    assert torch.equal(counts, ref_counts)
    torch.testing.assert_close(means, ref_means, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_no_hidden_sized_tensor(backend: str, device) -> None:
    """The autograd graph keeps span ids / counts (token- and span-sized), never a [B, T, D] tensor."""
    hidden = torch.randn(2, 17, 64, device=device, requires_grad=True)
    ids = torch.tensor(CASES["right_pad"].rows, device=device)
    saved: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        means, _ = span_mean_pool(hidden, ids, 2, backend=backend)
    assert saved, "nothing saved for backward?"
    assert all(torch.Size(s).numel() < hidden.numel() // 8 for s in saved), saved


def test_backends_agree_and_reference_backend(device) -> None:
    case = CASES["many_spans_S5_holes"]
    ids, _ = case.build(device)
    hidden = torch.randn(case.hidden_shape(), device=device)
    outs = {b: span_mean_pool(hidden, ids, 5, backend=b) for b in ("triton", "torch", "reference")}
    ref = span_mean_pool_ref(hidden, ids, 5)
    assert torch.equal(outs["reference"][0], ref[0]) and torch.equal(outs["reference"][1], ref[1])
    torch.testing.assert_close(outs["triton"][0], outs["torch"][0], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Backend resolution
# ----------------------------------------------------------------------------------------------------------------------


def test_auto_runs_triton_under_interpreter_or_cuda(device, spies) -> None:
    hidden = torch.randn(1, 6, 16, device=device, requires_grad=True)
    ids = torch.tensor([[0, 1, 1, 2, 2, 0]], device=device)
    means, _ = span_mean_pool(hidden, ids, 2)
    means.sum().backward()
    assert len(spies["fwd"].grids) == 1 and len(spies["bwd"].grids) == 1


def test_auto_on_cpu_without_interpreter_runs_torch(monkeypatch: pytest.MonkeyPatch, spies) -> None:
    monkeypatch.setattr(common, "interpreter_enabled", lambda: False)
    hidden = torch.randn(1, 6, 16)
    ids = torch.tensor([[0, 1, 1, 2, 2, 0]])
    means, _ = span_mean_pool(hidden, ids, 2)
    torch.testing.assert_close(means, span_mean_pool_ref(hidden, ids, 2)[0])
    assert spies["fwd"].grids == []
    with pytest.raises(RuntimeError, match="triton"):
        span_mean_pool(hidden, ids, 2, backend="triton")


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument
# ----------------------------------------------------------------------------------------------------------------------


def _good() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(2, 5, 8), torch.tensor([[0, 1, 1, 2, 0], [1, 2, 2, 0, 0]])


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda h, i: (h.long(), i, 2, {}), TypeError, "hidden"),
        (lambda h, i: (h, i.float(), 2, {}), TypeError, "span_ids"),
        (lambda h, i: (h, i[:, :4], 2, {}), ValueError, "span_ids must have shape"),
        (lambda h, i: (h, i.reshape(-1), 2, {}), ValueError, "span_ids must have shape"),
        (lambda h, i: (h[0], i[0], 2, {}), ValueError, "cu_seqlens"),
        (lambda h, i: (h[None], i, 2, {}), ValueError, "hidden must have 3 dimensions"),
        (lambda h, i: (h, i.to("meta"), 2, {}), ValueError, "span_ids on meta"),
        (lambda h, i: (h, i, 1, {}), ValueError, r"span_ids must lie in 0\.\.num_spans"),
        (lambda h, i: (h, i - 1, 2, {}), ValueError, r"span_ids must lie in 0\.\.num_spans"),
        (lambda h, i: (h, i, 0, {}), ValueError, "num_spans"),
        (lambda h, i: (h, i, True, {}), ValueError, "num_spans"),
        (lambda h, i: (h, i, 2, {"out_dtype": torch.int32}), TypeError, "out_dtype"),
        (lambda h, i: (h, i, 2, {"backend": "cuda"}), ValueError, "backend"),
    ],
    ids=[
        "int_hidden",
        "float_span_ids",
        "span_ids_shape",
        "flat_span_ids_padded",
        "packed_without_cu_seqlens",
        "hidden_4d",
        "device_mismatch",
        "span_id_above_num_spans",
        "negative_span_id",
        "zero_num_spans",
        "bool_num_spans",
        "int_out_dtype",
        "unknown_backend",
    ],
)
def test_bad_input(make, exc, match) -> None:
    hidden, ids, S, kw = make(*_good())
    with pytest.raises(exc, match=match):
        span_mean_pool(hidden, ids, S, **kw)


@pytest.mark.parametrize(
    ("cu", "match"),
    [
        ([1, 4, 9], "cu_seqlens must start at 0"),
        ([0, 6, 4, 9], "cu_seqlens must be non-decreasing"),
        ([0, 4, 8], r"cu_seqlens\[-1\] = 8 must equal"),
        ([0, 4, 10], r"cu_seqlens\[-1\] = 10 must equal"),
        ([9], "cu_seqlens must have B \\+ 1 >= 2"),
    ],
    ids=["not_from_0", "decreasing", "short", "long", "one_entry"],
)
def test_bad_cu_seqlens(cu: list[int], match: str) -> None:
    hidden, ids = torch.randn(9, 8), torch.tensor([0, 1, 1, 2, 0, 1, 2, 2, 0])
    with pytest.raises(ValueError, match=match):
        span_mean_pool(hidden, ids, 2, cu_seqlens=torch.tensor(cu, dtype=torch.int32))


def test_bad_cu_seqlens_dtype_and_shape() -> None:
    hidden, ids = torch.randn(9, 8), torch.zeros(9, dtype=torch.long)
    with pytest.raises(TypeError, match="cu_seqlens"):
        span_mean_pool(hidden, ids, 2, cu_seqlens=torch.tensor([0.0, 9.0]))
    with pytest.raises(ValueError, match="cu_seqlens must have 1 dimensions"):
        span_mean_pool(hidden, ids, 2, cu_seqlens=torch.tensor([[0, 9]]))
    with pytest.raises(ValueError, match="packed"):
        span_mean_pool(hidden[None], ids[None], 2, cu_seqlens=torch.tensor([0, 9]))


def test_validate_false_skips_value_checks_only() -> None:
    hidden, ids = _good()
    span_mean_pool(hidden, ids + 5, 2, validate=False)  # values unchecked, no host sync
    with pytest.raises(TypeError, match="hidden"):  # dtype/shape/device checks stay on
        span_mean_pool(hidden.long(), ids, 2, validate=False)


def test_too_many_spans_for_triton() -> None:
    hidden, ids = _good()
    with pytest.raises(ValueError, match="num_spans"):
        span_mean_pool(hidden, ids, sp.MAX_TRITON_SPANS + 1, backend="triton")
    means, _ = span_mean_pool(hidden, ids, sp.MAX_TRITON_SPANS + 1, backend="torch")
    assert means.shape == (2, sp.MAX_TRITON_SPANS + 1, 8)


# ----------------------------------------------------------------------------------------------------------------------
# Launch configuration and AOT specs agree with the launchers
# ----------------------------------------------------------------------------------------------------------------------


def test_config_blocks_are_powers_of_two() -> None:
    for D in (1, 40, 300, 896, 4096, 8192):
        for dtype in DTYPES:
            for S in (1, 2, 5, 16, 33, sp.MAX_TRITON_SPANS):
                cfg = sp._config(D, dtype, S)
                blocks = (cfg.s_pad, cfg.fwd_block_t, cfg.fwd_block_d, cfg.bwd_block_t, cfg.bwd_block_d)
                assert all(b >= 16 and b & (b - 1) == 0 for b in blocks), (D, dtype, S, cfg)
                assert cfg.s_pad >= S
                assert cfg.s_pad * cfg.fwd_block_d <= 4096  # fp32 accumulator <= 32 registers/thread at 4 warps


def test_aot_specs_match_launchers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The specs name every kernel argument, with the constexprs and warps the launchers pass at D = 4096 bf16."""
    specs = {s.name: s for s in sp.aot_specs(4096)}
    assert set(specs) == {
        "span_pool_fwd_padded",
        "span_pool_bwd_padded",
        "span_pool_fwd_packed",
        "span_pool_bwd_packed",
    }
    launches: dict[str, dict] = {}

    class _Record:
        def __init__(self, kind: str) -> None:
            self.kind = kind

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launches[self.kind] = (args, kwargs)

            return run

    monkeypatch.setattr(sp, "_span_pool_fwd_kernel", _Record("fwd"))
    monkeypatch.setattr(sp, "_span_pool_bwd_kernel", _Record("bwd"))
    monkeypatch.setattr(sp, "upcast_in_kernel", lambda: False)  # what a GPU launch passes
    for packed, tag in ((False, "padded"), (True, "packed")):
        hidden = torch.zeros((6, 4096) if packed else (2, 3, 4096), dtype=torch.bfloat16)
        ids = torch.zeros(hidden.shape[:-1], dtype=torch.long)
        cu = torch.tensor([0, 3, 6], dtype=torch.int32) if packed else None
        sp.span_pool_fwd(hidden, ids, 2, cu)
        sp.span_pool_bwd(
            torch.zeros(2, 2, 4096, dtype=torch.bfloat16),
            ids,
            torch.ones(2, 2, dtype=torch.long),
            hidden.shape,
            torch.bfloat16,
            cu,
        )
        for kind in ("fwd", "bwd"):
            spec, (args, kw) = specs[f"span_pool_{kind}_{tag}"], launches[kind]
            assert list(spec.signature) + list(spec.constexprs) == list(spec.fn.arg_names), kind
            assert [_triton_type(a) for a in args] == list(spec.signature.values()), kind
            assert {k: kw[k] for k in spec.constexprs} == spec.constexprs, kind
            assert (kw["num_warps"], kw["num_stages"]) == (spec.num_warps, spec.num_stages), kind
            assert not spec.gemm
            # launch values of the integer arguments (for the JIT-like specialisation of the AOT check)
            int_args = spec.extra["int_args"]
            assert set(int_args) == {n for n, t in spec.signature.items() if t == "i32"}, kind
            launched = dict(zip(spec.signature, args))
            for name in ("D", "S", "stride_ht", "T" if packed else "D"):
                if name in int_args:
                    assert int_args[name] == launched[name], (kind, name)


def _triton_type(arg) -> str:
    if isinstance(arg, torch.Tensor):
        return "*" + {torch.bfloat16: "bf16", torch.int64: "i64", torch.int32: "i32"}[arg.dtype]
    assert isinstance(arg, int) and -(2**31) <= arg < 2**31
    return "i32"
