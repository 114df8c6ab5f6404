"""info_nce: loss and every gradient against the fp32 oracle, on the Triton kernels (interpreter on CPU, compiled on
CUDA) and on the memory-bounded torch path, over dtypes x awkward shapes; the detached queue; bounded memory; input
validation; backend resolution; the AOT specs."""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import alignx.kernels._common as common
import pytest
import torch
import torch.nn.functional as F
from alignx.kernels.info_nce import info_nce
from alignx.kernels.reference import info_nce_ref
from kernel_utils import assert_close_to_ref
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# The package exports the function ``alignx.kernels.info_nce``, which shadows the module attribute of the same name;
# the module itself is reached through ``sys.modules``.
nce = importlib.import_module("alignx.kernels.info_nce")

HAS_CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["triton", "torch"]
KERNELS = (
    "_info_nce_inv_norm_kernel",
    "_info_nce_fwd_kernel",
    "_info_nce_bwd_ds_kernel",
    "_info_nce_bwd_gemm_kernel",
    "_info_nce_norm_bwd_kernel",
)


# ----------------------------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    B: int
    N: int
    D: int
    M: int | None = None  # num_grad_candidates (None = all)
    normalize: bool = True
    reduction: str = "mean"
    tau: float = 0.1
    chunk_bytes: int | None = 16 << 10  # small: several chunks in the backward (Triton) and in both torch passes
    zero_rows: bool = False  # one all-zero anchor and one all-zero candidate


# The tile is 128 candidates for 16-bit inputs and 64 for fp32; D runs over 64-wide (16-bit) or 32-wide slices.
CASES = {
    "D40_N300_some_queue": Case(5, 300, 40, M=200),
    "B1_sum": Case(1, 37, 24, reduction="sum"),
    "N_much_greater_than_B": Case(3, 700, 20, chunk_bytes=64 << 10),
    "all_queue_M0_none": Case(6, 90, 48, M=0, reduction="none"),
    "no_normalize_sum_tau0.5": Case(7, 50, 33, normalize=False, reduction="sum", tau=0.5),
    "none_D100": Case(9, 130, 100, M=129, reduction="none"),
    "B_gt_N_tau0.05": Case(40, 9, 16, tau=0.05),
    "two_row_blocks": Case(130, 70, 24, M=45, reduction="sum", chunk_bytes=1 << 20),
    "default_chunk": Case(4, 150, 24, chunk_bytes=None),
}
GPU_CASES = {
    "gpu_D4096_queue": Case(300, 5000, 4096, M=3000, chunk_bytes=8 << 20),
    "gpu_D4096_none": Case(64, 1000, 4096, reduction="none"),
    "gpu_D1000_no_normalize": Case(129, 2049, 1000, M=1000, normalize=False, reduction="sum", tau=2.0),
}
ALL_CASES = [pytest.param(c, id=k) for k, c in CASES.items()] + [
    pytest.param(c, id=k, marks=pytest.mark.gpu) for k, c in GPU_CASES.items()
]


def _inputs(case: Case, dtype: torch.dtype, device: torch.device):
    a = torch.randn(case.B, case.D, device=device)
    c = torch.randn(case.N, case.D, device=device)
    if case.zero_rows:
        a[0] = 0
        c[-1] = 0
    pos = torch.randint(0, case.N, (case.B,), device=device)
    return a.to(dtype), c.to(dtype), pos


def _torch_lowp(a, c, pos, case: Case, m: int) -> torch.Tensor:
    """The same loss done by plain torch ops in the low-precision dtype: the yardstick of the fp16/bf16 bounds."""
    cc = torch.cat([c[:m], c[m:].detach()])
    if case.normalize:
        a, cc = F.normalize(a, dim=-1, eps=1e-12), F.normalize(cc, dim=-1, eps=1e-12)
    return F.cross_entropy(a @ cc.t() / case.tau, pos, reduction=case.reduction)


def _run(fn, a, c, upstream):
    """Loss, grad anchors, grad candidates of ``fn(a, c)`` with a non-unit upstream gradient."""
    a = a.detach().clone().requires_grad_()
    c = c.detach().clone().requires_grad_()
    loss = fn(a, c)
    if loss.dim() == 0:
        (2 * loss).backward()
    else:
        loss.backward(upstream.to(loss.dtype))
    return loss.detach(), a.grad, c.grad


# ----------------------------------------------------------------------------------------------------------------------
# Forward and gradients against the oracle
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", ALL_CASES)
def test_loss_and_grads_match_reference(case: Case, dtype, backend, device, nan_poison) -> None:
    a, c, pos = _inputs(case, dtype, device)
    m = case.N if case.M is None else case.M
    upstream = torch.rand(case.B, device=device) * 2 - 0.5  # reduction="none": a random, partly negative gradient
    kw = dict(normalize=case.normalize, reduction=case.reduction)

    out = _run(
        lambda x, y: info_nce(x, y, pos, case.tau, **kw, num_grad_candidates=case.M, backend=backend,
                              chunk_bytes=case.chunk_bytes),
        a, c, upstream,
    )  # fmt: skip
    ref = _run(lambda x, y: info_nce_ref(x, y, pos, case.tau, **kw, num_grad_candidates=case.M), a, c, upstream)
    lowp = _run(lambda x, y: _torch_lowp(x, y, pos, case, m), a, c, upstream)

    loss, ga, gc = out
    assert loss.dtype == torch.float32 and loss.shape == ref[0].shape
    assert ga.dtype == dtype and (gc is None or gc.dtype == dtype)
    assert_close_to_ref(loss, ref[0], dtype=dtype, torch_lowp=lowp[0], name="loss")
    assert_close_to_ref(ga, ref[1], dtype=dtype, torch_lowp=lowp[1], name="grad anchors")
    if m == 0:
        assert gc is None, "an all-queue candidate set must give candidates no gradient"
        return
    assert torch.equal(gc[m:], torch.zeros_like(gc[m:])), "queued candidates received a gradient"
    assert_close_to_ref(gc[:m], ref[2][:m], dtype=dtype, torch_lowp=lowp[2][:m], name="grad candidates")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("path", ["fused_one_block", "fused_row_blocks", "recompute"])
def test_torch_paths(path, dtype, reduction, device, monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch path forms the gradients in the forward when full logits rows fit the budget (mean/sum), in one or
    several blocks of anchors, and recomputes chunk by chunk otherwise; each agrees with the oracle."""
    case = Case(12, 50, 20, M=30, reduction=reduction)
    a, c, pos = _inputs(case, dtype, device)
    c_bytes = 4 * case.N * case.D
    budget = {"fused_one_block": 1 << 20, "fused_row_blocks": c_bytes + 4 * 5 * case.N, "recompute": c_bytes}[path]
    monkeypatch.setattr(nce, "_TORCH_FUSED_MIN_ROWS", 4)
    calls = {"fused": 0, "recompute": 0}
    for name, key in (("_torch_fwd_with_grads", "fused"), ("_torch_fwd", "recompute")):
        real = getattr(nce, name)
        monkeypatch.setattr(nce, name, lambda *x, _r=real, _k=key: calls.__setitem__(_k, calls[_k] + 1) or _r(*x))
    upstream = torch.ones(case.B, device=device)
    kw = dict(reduction=reduction, num_grad_candidates=case.M)
    out = _run(lambda x, y: info_nce(x, y, pos, 0.1, **kw, backend="torch", chunk_bytes=budget), a, c, upstream)
    ref = _run(lambda x, y: info_nce_ref(x, y, pos, 0.1, **kw), a, c, upstream)
    assert calls == {"fused": int(path != "recompute"), "recompute": int(path == "recompute")}
    if path == "fused_row_blocks":
        assert nce._torch_fused_rows(case.B, case.D, case.N, dtype, True, budget) == 5  # 3 blocks of anchors
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-4)
    for got, want, name in zip(out, ref, ("loss", "grad anchors", "grad candidates")):
        torch.testing.assert_close(got.float(), want.float(), **tol, msg=lambda m, n=name: f"{n}: {m}")
    assert torch.equal(out[2][case.M :], torch.zeros_like(out[2][case.M :]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rows_match_reference(backend, device) -> None:
    """An all-zero anchor and candidate: cosine with the 1e-12 norm floor, finite, the reference's gradients."""
    case = Case(6, 40, 24, zero_rows=True, reduction="sum")
    a, c, pos = _inputs(case, torch.float32, device)
    pos[0] = case.N - 1  # the zero anchor's positive is the zero candidate
    upstream = torch.ones(case.B, device=device)
    out = _run(lambda x, y: info_nce(x, y, pos, case.tau, reduction="sum", backend=backend), a, c, upstream)
    ref = _run(lambda x, y: info_nce_ref(x, y, pos, case.tau, reduction="sum"), a, c, upstream)
    for got, want, name in zip(out, ref, ("loss", "grad anchors", "grad candidates")):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda s, n=name: f"{n}: {s}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_live_plus_detached_queue_via_cat(backend, device) -> None:
    """The usual caller: ``torch.cat([live, queue.detach()])``; the gradient flows back to ``live`` only."""
    B, L, Q, D = 6, 20, 150, 40
    live = torch.randn(L, D, device=device, requires_grad=True)
    queue = torch.randn(Q, D, device=device)
    anchors = torch.randn(B, D, device=device, requires_grad=True)
    pos = torch.randint(0, L, (B,), device=device)
    info_nce(anchors, torch.cat([live, queue.detach()]), pos, 0.07, num_grad_candidates=L, backend=backend).backward()

    live_r = live.detach().clone().requires_grad_()
    anchors_r = anchors.detach().clone().requires_grad_()
    info_nce_ref(anchors_r, torch.cat([live_r, queue]), pos, 0.07, num_grad_candidates=L).backward()
    assert queue.grad is None
    torch.testing.assert_close(live.grad, live_r.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(anchors.grad, anchors_r.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_for_one_input_only(backend, device) -> None:
    a, c, pos = _inputs(Case(5, 60, 24), torch.float32, device)
    for needs_a in (True, False):
        x, y = a.clone().requires_grad_(needs_a), c.clone().requires_grad_(not needs_a)
        info_nce(x, y, pos, 0.1, backend=backend).backward()
        xr, yr = a.clone().requires_grad_(needs_a), c.clone().requires_grad_(not needs_a)
        info_nce_ref(xr, yr, pos, 0.1).backward()
        got, want = (x.grad, xr.grad) if needs_a else (y.grad, yr.grad)
        assert (y.grad if needs_a else x.grad) is None
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_forward_splits_over_candidates_agree(num_splits, device) -> None:
    """The Triton forward merges per-split log-sum-exps; any split count gives the reference loss."""
    a, c, pos = _inputs(Case(3, 600, 20), torch.float32, device)
    loss, lse, _, _ = nce.info_nce_fwd(a, c, pos, 0.1, True, num_splits=num_splits)
    ref = info_nce_ref(a, c, pos, 0.1, reduction="none")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    s = F.normalize(a) @ F.normalize(c).t() / 0.1
    torch.testing.assert_close(lse, torch.logsumexp(s, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_anchors(backend, device) -> None:
    """B = 0 (every record of a micro-batch filtered out): 0, never NaN, and backward runs."""
    a = torch.zeros(0, 16, device=device, requires_grad=True)
    c = torch.randn(10, 16, device=device, requires_grad=True)
    pos = torch.zeros(0, dtype=torch.long, device=device)
    for reduction in ("mean", "sum"):
        loss = info_nce(a, c, pos, 0.1, reduction=reduction, backend=backend)
        assert loss.item() == 0.0
        loss.backward()
    assert torch.equal(c.grad, torch.zeros_like(c))
    assert info_nce(a, c, pos, 0.1, reduction="none", backend=backend).shape == (0,)


def test_tensor_temperature_and_validate_off(device) -> None:
    a, c, pos = _inputs(Case(4, 30, 16), torch.float32, device)
    want = info_nce(a, c, pos, 0.25)
    torch.testing.assert_close(info_nce(a, c, pos, torch.tensor(0.25)), want)
    torch.testing.assert_close(info_nce(a, c, pos.int(), 0.25, validate=False), want)


def test_reference_backend_is_the_oracle(device) -> None:
    a, c, pos = _inputs(Case(4, 30, 16), torch.float32, device)
    ref = info_nce_ref(a, c, pos, 0.1, reduction="none", num_grad_candidates=7)
    got = info_nce(a, c, pos, 0.1, reduction="none", num_grad_candidates=7, backend="reference")
    assert torch.equal(got, ref)


# ----------------------------------------------------------------------------------------------------------------------
# The Triton path really runs; backend resolution
# ----------------------------------------------------------------------------------------------------------------------


class _Spy:
    """Counts the launches of a @triton.jit kernel (``kernel[grid](...)``) and forwards them."""

    def __init__(self, kernel, counts: dict[str, int], name: str):
        self.kernel, self.counts, self.name = kernel, counts, name

    def __getitem__(self, grid):
        self.counts[self.name] += 1
        return self.kernel[grid]


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    counts = dict.fromkeys(KERNELS, 0)
    for name in KERNELS:
        monkeypatch.setattr(nce, name, _Spy(getattr(nce, name), counts, name))
    return counts


@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
def test_triton_kernels_run_forward_and_backward(backend, launches, device) -> None:
    a, c, pos = _inputs(Case(5, 300, 24), torch.bfloat16, device)
    a.requires_grad_()
    c.requires_grad_()
    loss = info_nce(a, c, pos, 0.1, num_grad_candidates=200, backend=backend, chunk_bytes=4096)
    fwd = dict(launches)
    loss.backward()
    if backend == "torch":
        assert sum(launches.values()) == 0
        return
    assert fwd["_info_nce_fwd_kernel"] == 1 and fwd["_info_nce_inv_norm_kernel"] == 2
    # 3 chunks of 128 candidates (the grad/queue split at 200 starts a new chunk): dS tiles and the anchors' GEMM
    # for each, the candidates' GEMM and normalisation backward for the 2 grad chunks, and the anchors' at the end.
    assert launches["_info_nce_bwd_ds_kernel"] == 3
    assert launches["_info_nce_bwd_gemm_kernel"] == 3 + 2
    assert launches["_info_nce_norm_bwd_kernel"] == 2 + 1


def test_triton_backend_needs_cuda_or_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    a, c, pos = _inputs(Case(2, 8, 16), torch.float32, torch.device("cpu"))
    monkeypatch.setattr(common, "interpreter_enabled", lambda: False)
    with pytest.raises(RuntimeError, match="backend='triton' needs CUDA"):
        info_nce(a, c, pos, 0.1, backend="triton")
    assert common.resolve_backend("auto", a, c) == "torch"
    torch.testing.assert_close(info_nce(a, c, pos, 0.1), info_nce_ref(a, c, pos, 0.1))


# ----------------------------------------------------------------------------------------------------------------------
# Bounded memory
# ----------------------------------------------------------------------------------------------------------------------


class _LargestAllocation(TorchDispatchMode):
    """Records the largest storage produced by any aten op (forward and backward) that is not an input's."""

    def __init__(self, inputs: tuple[torch.Tensor, ...]):
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in inputs}
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                if t.untyped_storage().data_ptr() not in self.known:
                    self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def _largest_allocation(fn, a, c) -> int:
    a = a.clone().requires_grad_()
    c = c.clone().requires_grad_()
    with _LargestAllocation((a, c)) as mode:
        fn(a, c).backward()
    return mode.largest


@pytest.mark.parametrize(
    "backend,budget",
    [("triton", 32 << 10), ("torch", 32 << 10), ("torch", 96 << 10)],
    ids=["triton", "torch_recompute", "torch_fused"],
)
def test_similarity_matrix_never_materialised(backend, budget, device, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a chunk budget of 32 or 96 KiB no buffer exceeds the budget or the size of the inputs' gradients, while
    the logits matrix is 512 KiB: the same check flags the dense reference."""
    monkeypatch.setattr(nce, "_TORCH_FUSED_MIN_ROWS", 4)  # 96 KiB: blocks of 4 full logits rows
    B, N, D = 64, 2048, 8
    a, c, pos = _inputs(Case(B, N, D), torch.float32, device)
    bound = max(budget + 4 * D * 128, 4 * N * D)  # the Triton backward keeps at least one 128-column tile
    assert 4 * B * N > 4 * bound
    fused = nce._torch_fused_rows(B, D, N, torch.float32, True, budget)
    assert (fused > 0) == (backend == "torch" and budget > 32 << 10)
    got = _largest_allocation(
        lambda x, y: info_nce(x, y, pos, 0.1, num_grad_candidates=1000, backend=backend, chunk_bytes=budget), a, c
    )
    assert got <= bound, f"{backend}: a {got} B buffer, budget {budget} B"
    dense = _largest_allocation(lambda x, y: info_nce_ref(x, y, pos, 0.1, num_grad_candidates=1000), a, c)
    assert dense >= 4 * B * N, "the check must see the dense reference's logits"


def test_torch_tiles_respect_the_budget() -> None:
    for B, D, N, budget in [(16384, 256, 16384, 64 << 20), (512, 4096, 10**6, 64 << 20), (10**6, 64, 4096, 1 << 20)]:
        rows, cols = nce._torch_tiles(B, D, N, budget)
        assert 1 <= rows <= B and 1 <= cols <= N
        assert 4 * cols * (rows + 2 * D) <= budget
    assert nce._torch_tiles(16384, 256, 16384, 64 << 20) == (16384, 992)


# ----------------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------------


def _good(device):
    a, c, pos = _inputs(Case(4, 10, 16), torch.float32, device)
    return dict(anchors=a, candidates=c, positive_index=pos, temperature=0.1)


BAD = {
    "anchors_int": (lambda k: k.update(anchors=k["anchors"].long()), TypeError, "anchors must be float"),
    "candidates_int": (lambda k: k.update(candidates=k["candidates"].int()), TypeError, "candidates must be float"),
    "positive_index_float": (lambda k: k.update(positive_index=k["positive_index"].float()), TypeError,
                             "positive_index must be an integer"),
    "anchors_1d": (lambda k: k.update(anchors=k["anchors"][0]), ValueError, "anchors must have 2 dimensions"),
    "candidates_3d": (lambda k: k.update(candidates=k["candidates"][None]), ValueError,
                      "candidates must have 2 dimensions"),
    "D_mismatch": (lambda k: k.update(candidates=k["candidates"][:, :8]), ValueError, "same feature size D"),
    "dtype_mismatch": (lambda k: k.update(candidates=k["candidates"].half()), TypeError, "one dtype"),
    "device_mismatch": (lambda k: k.update(candidates=k["candidates"].to("meta")), ValueError,
                        "candidates on meta"),
    "positive_index_length": (lambda k: k.update(positive_index=k["positive_index"][:3]), ValueError,
                              "positive_index must have one entry per anchor"),
    "positive_index_2d": (lambda k: k.update(positive_index=k["positive_index"][None]), ValueError,
                          "positive_index must have 1 dimensions"),
    "positive_index_too_large": (lambda k: k["positive_index"].__setitem__(2, 10), IndexError,
                                 r"positive_index\[2\] = 10"),
    "positive_index_negative": (lambda k: k["positive_index"].__setitem__(0, -1), IndexError,
                                r"positive_index\[0\] = -1"),
    "no_candidates": (lambda k: k.update(candidates=k["candidates"][:0]), ValueError, "candidates must have at least"),
    "temperature_zero": (lambda k: k.update(temperature=0.0), ValueError, "temperature must be finite and > 0"),
    "temperature_negative": (lambda k: k.update(temperature=-0.1), ValueError, "temperature must be finite and > 0"),
    "temperature_nan": (lambda k: k.update(temperature=math.nan), ValueError, "temperature must be finite and > 0"),
    "temperature_inf": (lambda k: k.update(temperature=math.inf), ValueError, "temperature must be finite and > 0"),
    "temperature_str": (lambda k: k.update(temperature="0.1"), TypeError, "temperature must be a positive number"),
    "temperature_grad_tensor": (lambda k: k.update(temperature=torch.tensor(0.1, requires_grad=True)), ValueError,
                                "temperature must be a Python number"),
    "reduction": (lambda k: k.update(reduction="avg"), ValueError, "reduction must be one of"),
    "num_grad_candidates_negative": (lambda k: k.update(num_grad_candidates=-1), ValueError,
                                     r"num_grad_candidates must be in 0\.\.10"),
    "num_grad_candidates_too_large": (lambda k: k.update(num_grad_candidates=11), ValueError,
                                      r"num_grad_candidates must be in 0\.\.10"),
    "num_grad_candidates_float": (lambda k: k.update(num_grad_candidates=2.0), TypeError,
                                  "num_grad_candidates must be an int"),
    "normalize_not_bool": (lambda k: k.update(normalize="yes"), TypeError, "normalize must be a bool"),
    "backend": (lambda k: k.update(backend="cuda"), ValueError, "backend must be one of"),
    "chunk_bytes": (lambda k: k.update(chunk_bytes=0), ValueError, "chunk_bytes must be a positive int"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_names_the_argument(name, device) -> None:
    mutate, exc, message = BAD[name]
    kwargs = _good(device)
    info_nce(**kwargs)  # the unmodified call is fine
    mutate(kwargs)
    with pytest.raises(exc, match=message):
        info_nce(**kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# AOT specs (compiled and checked for sm_90a / sm_80 by tests/test_aot.py)
# ----------------------------------------------------------------------------------------------------------------------


def test_aot_specs_cover_every_kernel_at_the_launch_config() -> None:
    from alignx.kernels.aot import build_source_args

    specs = nce.aot_specs(4096)
    assert {s.fn for s in specs} == {getattr(nce, k) for k in KERNELS}
    cfg = nce._config(4096, torch.bfloat16)
    for spec in specs:
        build_source_args(spec)  # every argument typed or constexpr, names valid
        key = {"_info_nce_fwd_kernel": "fwd", "_info_nce_bwd_ds_kernel": "ds", "_info_nce_bwd_gemm_kernel": "gemm"}
        group = cfg[key.get(spec.fn.__name__, "rows")]
        assert (spec.num_warps, spec.num_stages) == (group["num_warps"], group["num_stages"]), spec.name
        for k, v in group.items():
            if k.startswith("BLOCK_"):
                assert spec.constexprs[k] == v, (spec.name, k)
        assert spec.gemm == (spec.fn.__name__ in key), spec.name
        assert spec.constexprs.get("UPCAST", False) is False
    assert cfg["fwd"]["BLOCK_M"] >= 16 and cfg["fwd"]["BLOCK_N"] >= 16 and cfg["fwd"]["BLOCK_K"] >= 16
