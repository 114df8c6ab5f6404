"""linear_cross_entropy: the summed loss, its count and both gradients against the fp32 oracle, on the Triton kernels
(interpreter on CPU, compiled on CUDA) and on the memory-bounded torch path, over dtypes x awkward shapes (V not a
multiple of any block, N = 1, ignored rows holding NaN, a run of ignored rows longer than a chunk, soft-cap and logit
scaling); no-grad and partial-grad calls; bounded memory; input validation; backend resolution; the AOT specs
(compiled for sm_90a / sm_80 by tests/test_aot.py)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import alignx.kernels._common as common
import pytest
import torch
import torch.nn.functional as F
from alignx.kernels import linear_cross_entropy
from alignx.kernels.reference import linear_cross_entropy_ref
from kernel_utils import assert_close_to_ref
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

lce = importlib.import_module("alignx.kernels.linear_ce")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["triton", "torch"]
KERNELS = ("_lce_fwd_kernel", "_lce_dz_kernel", "_lce_gemm_kernel")
IGNORE = -100


# ----------------------------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    N: int
    D: int
    V: int
    ignored: tuple[int, ...] | str = ()  # row indices with label = ignore_index, or "all"
    poison: bool = False  # NaN / inf in the hidden rows of the ignored positions
    softcap: float | None = None
    scale: float = 1.0
    chunk: int | None = 8  # rows per chunk: several chunks on both paths
    w_std: float = 0.3

    def inputs(self, dtype: torch.dtype, device: torch.device):
        h = torch.randn(self.N, self.D, device=device)
        w = torch.randn(self.V, self.D, device=device) * self.w_std
        y = torch.randint(0, self.V, (self.N,), device=device)
        rows = list(range(self.N)) if self.ignored == "all" else list(self.ignored)
        y[rows] = IGNORE
        if self.poison and rows:
            h[rows[0]] = float("nan")
            h[rows[-1], ::2] = float("inf")
        return h.to(dtype), w.to(dtype), y


# Blocks: vocabulary tiles of 128 (16-bit) / 64 (fp32) columns in the Triton forward, 256 in dZ; D slices of 64 / 32.
CASES = {
    "V203_D40_not_multiples": Case(20, 40, 203, ignored=(3, 11)),
    "N1": Case(1, 24, 70),
    "nan_poisoned_ignored_rows": Case(19, 32, 150, ignored=(0, 5, 6, 18), poison=True),
    "ignored_run_longer_than_a_chunk": Case(30, 24, 90, ignored=tuple(range(4, 17)), poison=True),
    "softcap_and_scale": Case(17, 33, 131, ignored=(2,), softcap=2.0, scale=1.5, w_std=1.0),
    "logit_scale_only": Case(12, 48, 77, scale=0.25, w_std=1.0),
    "softcap_gemma2_30": Case(9, 24, 100, softcap=30.0, w_std=3.0),
    "V_below_one_tile": Case(10, 16, 5),
    "default_chunk": Case(21, 24, 260, ignored=(0,), chunk=None),
    "all_ignored": Case(6, 16, 40, ignored="all", poison=True),
}
GPU_CASES = {
    "gpu_D4096_V32003_softcap": Case(1000, 4096, 32003, ignored=tuple(range(0, 1000, 7)), softcap=30.0, chunk=256),
    "gpu_D640_V262144_gemma": Case(2048, 640, 262144, ignored=tuple(range(100)), poison=True, chunk=None),
    "gpu_D2048_V128256_scale": Case(777, 2048, 128256, scale=0.5, chunk=None),
}
ALL_CASES = [pytest.param(c, id=k) for k, c in CASES.items()] + [
    pytest.param(c, id=k, marks=pytest.mark.gpu) for k, c in GPU_CASES.items()
]


def _torch_lowp(h, w, y, case: Case) -> torch.Tensor:
    """The same loss by plain torch ops in the low-precision dtype (dense head, then cross-entropy): the yardstick of
    the fp16/bf16 bounds."""
    keep = (y != IGNORE).nonzero().squeeze(1)
    z = F.linear(h[keep], w) * case.scale
    if case.softcap is not None:
        z = case.softcap * torch.tanh(z / case.softcap)
    return F.cross_entropy(z, y[keep], reduction="sum")


def _run(fn, h, w, upstream: float = 0.37):
    """(loss, count, grad hidden, grad weight) of ``fn(h, w)`` back-propagated with a non-unit upstream gradient."""
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    out = fn(h, w)
    loss, count = out if isinstance(out, tuple) else (out, None)
    (upstream * loss).backward()
    return loss.detach(), count, h.grad, w.grad


# ----------------------------------------------------------------------------------------------------------------------
# Loss, count and gradients against the oracle
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", ALL_CASES)
def test_loss_and_grads_match_reference(case: Case, dtype, backend, device, nan_poison) -> None:
    h, w, y = case.inputs(dtype, device)
    kw = dict(softcap=case.softcap, logit_scale=case.scale)
    out = _run(lambda a, b: linear_cross_entropy(a, b, y, **kw, chunk_size=case.chunk, backend=backend), h, w)
    ref = _run(lambda a, b: linear_cross_entropy_ref(a, b, y, **kw), h, w)
    lowp = _run(lambda a, b: _torch_lowp(a, b, y, case), h, w)

    loss, count, gh, gw = out
    n = int((y != IGNORE).sum())
    assert count.dtype == torch.int64 and count.dim() == 0 and int(count) == n == int(ref[1])
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert gh.dtype == dtype and gw.dtype == dtype
    ignored = y == IGNORE
    assert torch.equal(gh[ignored], torch.zeros_like(gh[ignored])), "an ignored row received a gradient"
    if n == 0:
        assert loss.item() == 0.0 and torch.equal(gw, torch.zeros_like(gw))
        return
    assert_close_to_ref(loss, ref[0], dtype=dtype, torch_lowp=lowp[0], rtol32=2e-6, name="loss")
    assert_close_to_ref(gh, ref[2], dtype=dtype, torch_lowp=lowp[2], name="grad hidden")
    assert_close_to_ref(gw, ref[3], dtype=dtype, torch_lowp=lowp[3], name="grad weight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_changes_the_loss_and_its_derivative_is_applied(backend, device) -> None:
    """A soft-cap small enough to bind: the result differs from the uncapped loss and matches the capped oracle."""
    case = Case(11, 24, 90, softcap=1.5, w_std=2.0)
    h, w, y = case.inputs(torch.float32, device)
    capped = _run(lambda a, b: linear_cross_entropy(a, b, y, softcap=1.5, backend=backend, chunk_size=4), h, w)
    plain = _run(lambda a, b: linear_cross_entropy(a, b, y, backend=backend), h, w)
    ref = _run(lambda a, b: linear_cross_entropy_ref(a, b, y, softcap=1.5), h, w)
    assert abs(capped[0].item() - plain[0].item()) > 1.0
    for got, want, name in zip((capped[0], capped[2], capped[3]), (ref[0], ref[2], ref[3]), ("loss", "gh", "gw")):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_the_objective_chunked_loss_on_shifted_labels(backend, device) -> None:
    """``[B, T, D]`` hidden states with HF-style labels: the op on the shifted labels equals today's NTP sum
    (:func:`alignx.objective.lm_loss_sum` on the dense logits), loss and gradients within 1e-5."""
    from alignx.objective import lm_loss_sum

    B, T, D, V = 3, 9, 16, 50
    h = torch.randn(B, T, D, device=device)
    w = torch.randn(V, D, device=device) * 0.5
    labels = torch.randint(0, V, (B, T), device=device)
    labels[0, :4] = IGNORE  # a prompt
    labels[2, 6:] = IGNORE  # padding
    shifted = torch.full_like(labels, IGNORE)
    shifted[:, :-1] = labels[:, 1:]
    ours = _run(lambda a, b: linear_cross_entropy(a, b, shifted, backend=backend, chunk_size=5), h, w, 1.0)
    today = _run(lambda a, b: lm_loss_sum(a @ b.t(), labels), h, w, 1.0)
    assert int(ours[1]) == int(today[1])
    for got, want in zip((ours[0], ours[2], ours[3]), (today[0], today[2], today[3])):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_partial_grad(backend, device, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under no_grad no gradient is formed (Triton: the forward kernel alone, soft-cap and scale applied in it); with
    one input requiring grad only that gradient is formed (one GEMM per chunk) and it matches the oracle."""
    case = Case(14, 24, 100, ignored=(1,), w_std=1.0)
    h, w, y = case.inputs(torch.float32, device)
    want = linear_cross_entropy_ref(h, w, y, softcap=3.0, logit_scale=0.5)[0]
    calls = []
    real = lce._torch_fwd

    def spy(*args, **kw):
        calls.append(args[5:7])  # need_hidden, need_weight
        return real(*args, **kw)

    monkeypatch.setattr(lce, "_torch_fwd", spy)
    with torch.no_grad():
        loss, count = linear_cross_entropy(h.requires_grad_(), w, y, softcap=3.0, logit_scale=0.5, backend=backend)
    h.requires_grad_(False)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-5)
    assert int(count) == 13 and not loss.requires_grad
    for needs_h in (True, False):
        hh, ww = h.clone().requires_grad_(needs_h), w.clone().requires_grad_(not needs_h)
        linear_cross_entropy(hh, ww, y, backend=backend, chunk_size=4)[0].backward()
        hr, wr = h.clone().requires_grad_(needs_h), w.clone().requires_grad_(not needs_h)
        linear_cross_entropy_ref(hr, wr, y)[0].backward()
        got, want_g = (hh.grad, hr.grad) if needs_h else (ww.grad, wr.grad)
        assert (ww.grad if needs_h else hh.grad) is None
        torch.testing.assert_close(got, want_g, rtol=1e-5, atol=1e-6)
    if backend == "torch":
        assert calls == [(False, False), (True, False), (False, True)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_shape_and_int32_labels(backend, device) -> None:
    h = torch.randn(2, 7, 16, device=device)
    w = torch.randn(40, 16, device=device)
    y = torch.randint(0, 40, (2, 7), device=device, dtype=torch.int32)
    y[1, 3] = IGNORE
    got = _run(lambda a, b: linear_cross_entropy(a, b, y, backend=backend), h, w)
    ref = _run(lambda a, b: linear_cross_entropy_ref(a.reshape(-1, 16), b, y.reshape(-1)), h, w)
    assert got[2].shape == (2, 7, 16) and int(got[1]) == 13
    for a, b in zip((got[0], got[2], got[3]), (ref[0], ref[2], ref[3])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_weight_gets_both_gradients(backend, device) -> None:
    """Tied embeddings: the head weight is also the embedding table; autograd adds the two gradients."""
    V, D = 30, 16
    emb = torch.randn(V, D, device=device, requires_grad=True)
    ids = torch.randint(0, V, (12,), device=device)
    y = torch.randint(0, V, (12,), device=device)
    linear_cross_entropy(torch.tanh(emb[ids]), emb, y, backend=backend)[0].backward()
    ref = emb.detach().clone().requires_grad_()
    linear_cross_entropy_ref(torch.tanh(ref[ids]), ref, y)[0].backward()
    torch.testing.assert_close(emb.grad, ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward_is_refused(backend, device) -> None:
    h = torch.randn(5, 16, device=device, requires_grad=True)
    w = torch.randn(20, 16, device=device)
    loss, _ = linear_cross_entropy(h, w, torch.randint(0, 20, (5,), device=device), backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_reference_backend_is_the_oracle(device) -> None:
    h, w, y = Case(9, 16, 33, ignored=(2,), softcap=3.0).inputs(torch.float32, device)
    want = linear_cross_entropy_ref(h, w, y, softcap=3.0, logit_scale=0.5)
    got = linear_cross_entropy(h, w, y, softcap=3.0, logit_scale=0.5, backend="reference")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ----------------------------------------------------------------------------------------------------------------------
# Which kernels run; backend resolution
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
        monkeypatch.setattr(lce, name, _Spy(getattr(lce, name), counts, name))
    return counts


@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
def test_triton_kernels_per_chunk(backend, launches, device) -> None:
    """Gradients in the forward: per chunk of counted rows one logits pass, one dZ pass and two GEMMs; the backward
    launches nothing."""
    h, w, y = Case(21, 24, 100, ignored=(0, 1, 2)).inputs(torch.bfloat16, device)
    loss, _ = linear_cross_entropy(h.requires_grad_(), w.requires_grad_(), y, backend=backend, chunk_size=8)
    fwd = dict(launches)
    loss.backward()
    if backend == "torch":
        assert sum(launches.values()) == 0
        return
    assert launches == fwd, "the backward must not launch kernels"
    assert fwd == {"_lce_fwd_kernel": 3, "_lce_dz_kernel": 3, "_lce_gemm_kernel": 6}  # 18 counted rows, 8 per chunk


def test_triton_backend_needs_cuda_or_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    h, w, y = Case(4, 16, 20).inputs(torch.float32, torch.device("cpu"))
    monkeypatch.setattr(common, "interpreter_enabled", lambda: False)
    with pytest.raises(RuntimeError, match="backend='triton' needs CUDA"):
        linear_cross_entropy(h, w, y, backend="triton")
    assert common.resolve_backend("auto", h, w) == "torch"
    torch.testing.assert_close(linear_cross_entropy(h, w, y)[0], linear_cross_entropy_ref(h, w, y)[0])


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_never_materialised(backend, device) -> None:
    """With 16-row chunks no buffer exceeds one chunk of logits (fp32 + dZ on the Triton path) or the gradients,
    while the [N, V] logits are 1 MiB: the same check flags the dense reference."""
    N, D, V, rows = 256, 8, 1024, 16
    h, w, y = Case(N, D, V).inputs(torch.float32, device)
    bound = max(rows * V * 8, 4 * V * D, 4 * N * D)
    assert 4 * N * V >= 8 * bound

    def largest(fn) -> int:
        a, b = h.clone().requires_grad_(), w.clone().requires_grad_()
        with _LargestAllocation((a, b)) as mode:
            fn(a, b)[0].backward()
        return mode.largest

    got = largest(lambda a, b: linear_cross_entropy(a, b, y, backend=backend, chunk_size=rows))
    assert got <= bound, f"{backend}: a {got} B buffer, bound {bound} B"
    assert largest(lambda a, b: linear_cross_entropy_ref(a, b, y)) >= 4 * N * V, "the check must see dense logits"


def test_chunk_arithmetic() -> None:
    assert lce._torch_chunk_rows(262144, lce.DEFAULT_CHUNK_BYTES) == 256  # Gemma 3: 256 rows of 1 MiB
    assert lce._torch_chunk_rows(128256, lce.DEFAULT_CHUNK_BYTES) == 523
    rows = lce._triton_chunk_rows(128256, torch.bfloat16, lce.TRITON_CHUNK_BYTES, 128)
    assert rows == 1280 and rows * 128256 * 6 <= lce.TRITON_CHUNK_BYTES < (rows + 128) * 128256 * 6
    assert lce._triton_chunk_rows(10**7, torch.float32, 1 << 20, 128) == 1  # a budget under one row: one row


# ----------------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------------


def _good(device):
    h, w, y = Case(4, 16, 10).inputs(torch.float32, device)
    return dict(hidden=h, weight=w, labels=y)


BAD = {
    "hidden_int": (lambda k: k.update(hidden=k["hidden"].long()), TypeError, "hidden must be float"),
    "weight_int": (lambda k: k.update(weight=k["weight"].int()), TypeError, "weight must be float"),
    "labels_float": (lambda k: k.update(labels=k["labels"].float()), TypeError, "labels must be an integer"),
    "hidden_1d": (lambda k: k.update(hidden=k["hidden"][0]), ValueError, r"hidden must be \[N, D\]"),
    "weight_3d": (lambda k: k.update(weight=k["weight"][None]), ValueError, "weight must have 2 dimensions"),
    "D_mismatch": (lambda k: k.update(weight=k["weight"][:, :8]), ValueError, "same feature size D"),
    "dtype_mismatch": (lambda k: k.update(weight=k["weight"].half()), TypeError, "one dtype"),
    "device_mismatch": (lambda k: k.update(weight=k["weight"].to("meta")), ValueError, "weight on meta"),
    "labels_length": (lambda k: k.update(labels=k["labels"][:3]), ValueError, "one entry per hidden row"),
    "empty_vocabulary": (lambda k: k.update(weight=k["weight"][:0]), ValueError, "at least one row"),
    "label_too_large": (lambda k: k["labels"].__setitem__(2, 10), IndexError, r"labels\[2\] = 10"),
    "label_negative": (lambda k: k["labels"].__setitem__(1, -5), IndexError, r"labels\[1\] = -5"),
    "softcap_zero": (lambda k: k.update(softcap=0.0), ValueError, "softcap must be finite and > 0"),
    "softcap_str": (lambda k: k.update(softcap="30"), TypeError, "softcap must be None or a positive number"),
    "logit_scale_inf": (lambda k: k.update(logit_scale=float("inf")), ValueError, "logit_scale must be finite"),
    "logit_scale_none": (lambda k: k.update(logit_scale=None), TypeError, "logit_scale must be a positive number"),
    "ignore_index_float": (lambda k: k.update(ignore_index=-100.0), TypeError, "ignore_index must be an int"),
    "chunk_size_zero": (lambda k: k.update(chunk_size=0), ValueError, "chunk_size must be None or a positive int"),
    "backend": (lambda k: k.update(backend="cuda"), ValueError, "backend must be one of"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_names_the_argument(name, device) -> None:
    mutate, exc, message = BAD[name]
    kwargs = _good(device)
    linear_cross_entropy(**kwargs)  # the unmodified call is fine
    mutate(kwargs)
    with pytest.raises(exc, match=message):
        linear_cross_entropy(**kwargs)


def test_custom_ignore_index_and_validate_off(device) -> None:
    h, w, y = Case(6, 16, 12).inputs(torch.float32, device)
    y[2] = 12  # == V: out of the vocabulary unless it is the ignore index
    got = linear_cross_entropy(h, w, y, ignore_index=12)
    want = linear_cross_entropy_ref(h, w, y, ignore_index=12)
    torch.testing.assert_close(got[0], want[0])
    assert int(got[1]) == int(want[1]) == 5
    y[2] = 3
    torch.testing.assert_close(linear_cross_entropy(h, w, y, validate=False)[0], linear_cross_entropy_ref(h, w, y)[0])


# ----------------------------------------------------------------------------------------------------------------------
# AOT specs (compiled and checked for sm_90a / sm_80 by tests/test_aot.py)
# ----------------------------------------------------------------------------------------------------------------------


def test_aot_specs_cover_every_kernel_at_the_launch_config() -> None:
    from alignx.kernels.aot import build_source_args

    specs = lce.aot_specs(4096)
    assert {s.fn for s in specs} == {getattr(lce, k) for k in KERNELS}
    cfg = lce._config(4096, torch.bfloat16)
    group_of = {"_lce_fwd_kernel": "fwd", "_lce_dz_kernel": "dz", "_lce_gemm_kernel": "gemm"}
    for spec in specs:
        build_source_args(spec)  # every argument typed or constexpr, names valid
        group = cfg[group_of[spec.fn.__name__]]
        assert (spec.num_warps, spec.num_stages) == (group["num_warps"], group["num_stages"]), spec.name
        for k, v in group.items():
            if k.startswith("BLOCK_"):
                assert spec.constexprs[k] == v, (spec.name, k)
        assert spec.gemm == (spec.fn.__name__ != "_lce_dz_kernel"), spec.name
        assert spec.constexprs.get("UPCAST", False) is False
    names = {s.name for s in specs}
    assert {"lce_fwd_loss", "lce_fwd_train", "lce_fwd_train_softcap", "lce_gemm_dhidden", "lce_gemm_dweight"} <= names
