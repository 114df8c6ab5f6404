"""lang_match_loss: loss and every gradient against the fp32 oracle (which builds the [M, M, 2D] pair tensor), on the
Triton kernels (interpreter on CPU, compiled on CUDA) and on the torch path, over dtypes x awkward shapes; the official
head's nn.Linear weights plugged in as they are; banding/chunking; input validation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import alignx.kernels._common as common
import alignx.kernels.lang_match as lm
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from alignx.kernels.lang_match import lang_match_loss
from alignx.kernels.reference import lang_match_loss_ref
from kernel_utils import assert_close_to_ref

HAS_CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["triton", "torch"]
UPSTREAM = 2.5  # non-unit upstream gradient: backward of UPSTREAM * loss
NAMES = ("loss", "d_emb", "d_gate", "d_up", "d_down")


# ----------------------------------------------------------------------------------------------------------------------
# Cases and inputs
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    M: int
    D: int
    H: int
    langs: str = "random"  # "random" (3 languages), "one" (all the same), "distinct" (all different)


CASES = {
    "m1_self_only": Case(1, 8, 24, "one"),
    "m2_distinct": Case(2, 24, 24, "distinct"),
    "m7_d40": Case(7, 40, 24),
    "m37_d24_tiles": Case(37, 24, 24),  # 2 x 2 tiles of 32 pairs with ragged edges
    "m7_h128": Case(7, 16, 128),
    "m9_one_lang": Case(9, 20, 24, "one"),
    "m9_all_distinct": Case(9, 20, 24, "distinct"),
}
# The oracle's pair tensor is M^2 x 2D fp32 (2.1 GB at M = 256, D = 4096), with its gradient and the low-precision
# official idiom alongside: the GPU shapes stay within a 24 GB card.
GPU_CASES = {
    "gpu_m256_d4096_h128": Case(256, 4096, 128),
    "gpu_m33_d4096_h128": Case(33, 4096, 128),
    "gpu_m500_d1000_h24": Case(500, 1000, 24),
}


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """emb, lang, gate_w, up_w, down_w with O(1) pre-activations and logits (so every gradient is exercised)."""
    g = torch.Generator().manual_seed(seed)
    M, D, H = case.M, case.D, case.H
    emb = torch.randn(M, D, generator=g)
    if case.langs == "one":
        lang = torch.zeros(M, dtype=torch.long)
    elif case.langs == "distinct":
        lang = torch.randperm(M, generator=g) + 3
    else:
        lang = torch.randint(0, 3, (M,), generator=g)
    gate = torch.randn(H, 2 * D, generator=g) / math.sqrt(2 * D)
    up = torch.randn(H, 2 * D, generator=g) / math.sqrt(2 * D)
    down = torch.randn(2, H, generator=g) / math.sqrt(H)
    return [emb.to(device, dtype), lang.to(device), *(w.to(device, dtype) for w in (gate, up, down))]


def _grads(loss: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    (UPSTREAM * loss).backward()
    return [loss.detach()] + [t.grad for t in leaves]


def run_op(inputs: list[torch.Tensor], include_self_pairs: bool, backend: str) -> list[torch.Tensor]:
    """loss and the gradients of UPSTREAM * loss w.r.t. emb, gate_w, up_w, down_w through lang_match_loss."""
    emb, lang, *ws = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (emb, *ws)]
    loss = lang_match_loss(leaves[0], lang, *leaves[1:], include_self_pairs=include_self_pairs, backend=backend)
    return _grads(loss, leaves)


def run_oracle(inputs: list[torch.Tensor], include_self_pairs: bool) -> list[torch.Tensor]:
    """The fp32 oracle on fp32 copies of the (possibly low-precision) inputs: exact fp32 gradients."""
    emb, lang, *ws = inputs
    leaves = [t.detach().float().requires_grad_() for t in (emb, *ws)]
    loss = lang_match_loss_ref(leaves[0], lang, *leaves[1:], include_self_pairs=include_self_pairs)
    return _grads(loss, leaves)


# ----------------------------------------------------------------------------------------------------------------------
# The official head, laid out as in the official code (a LlamaMLP over the concatenated pair)
# ----------------------------------------------------------------------------------------------------------------------


class OfficialLanguageMatchingHead(nn.Module):
    """``down_proj(silu(gate_proj(z)) * up_proj(z))``, widths 2d -> h -> 2, no bias, N(0, 0.02) init."""

    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(2 * d, h, bias=False)
        self.up_proj = nn.Linear(2 * d, h, bias=False)
        self.down_proj = nn.Linear(h, 2, bias=False)
        for lin in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(lin.weight, mean=0.0, std=0.02)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(z)) * self.up_proj(z))


def official_loss(head: nn.Module, emb: torch.Tensor, lang: torch.Tensor, include_self_pairs: bool = True):
    """The official idiom in the dtype of its inputs: expand both sides to [M, M, d], concatenate, classify, mean CE."""
    M = emb.shape[0]
    z = torch.cat([emb.unsqueeze(1).expand(M, M, -1), emb.unsqueeze(0).expand(M, M, -1)], dim=-1)
    logits = head(z).view(-1, 2)
    labels = (lang.unsqueeze(1) == lang.unsqueeze(0)).long().view(-1)
    if include_self_pairs:
        return F.cross_entropy(logits, labels)
    keep = ~torch.eye(M, dtype=torch.bool, device=emb.device).view(-1)
    return F.cross_entropy(logits[keep], labels[keep])


def run_torch_lowp(inputs: list[torch.Tensor], include_self_pairs: bool) -> list[torch.Tensor]:
    """Torch's own low-precision error: the official idiom run entirely in the inputs' dtype."""
    emb, lang, gate, up, down = inputs
    head = OfficialLanguageMatchingHead(emb.shape[1], gate.shape[0]).to(device=emb.device, dtype=emb.dtype)
    with torch.no_grad():
        for lin, w in ((head.gate_proj, gate), (head.up_proj, up), (head.down_proj, down)):
            lin.weight.copy_(w)
    leaf = emb.detach().clone().requires_grad_()
    loss = official_loss(head, leaf, lang, include_self_pairs)
    (UPSTREAM * loss).backward()
    return [loss.detach(), leaf.grad, head.gate_proj.weight.grad, head.up_proj.weight.grad, head.down_proj.weight.grad]


def assert_matches(out: list[torch.Tensor], ref: list[torch.Tensor], dtype: torch.dtype, lowp=None, tol=1e-5) -> None:
    """fp32: |err| <= tol * (|ref| + max |ref|) per tensor. fp16/bf16: error <= 4 x torch's own error (``lowp``)."""
    for i, name in enumerate(NAMES):
        scale = ref[i].abs().max().item()
        assert_close_to_ref(
            out[i],
            ref[i],
            dtype=dtype,
            torch_lowp=None if lowp is None else lowp[i],
            atol32=tol * scale + 1e-12,
            rtol32=tol,
            name=name,
        )
        if name != "loss":
            assert out[i].dtype == dtype, f"{name}: dtype {out[i].dtype}, expected {dtype}"


# ----------------------------------------------------------------------------------------------------------------------
# Loss and gradients against the oracle
# ----------------------------------------------------------------------------------------------------------------------


def _case_params():
    params = [pytest.param(c, id=k) for k, c in CASES.items()]
    params += [pytest.param(c, id=k, marks=pytest.mark.gpu) for k, c in GPU_CASES.items()]
    return params


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("include_self_pairs", [True, False], ids=["self", "noself"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", _case_params())
def test_matches_reference(case, dtype, include_self_pairs, backend, device, nan_poison):
    if case.M == 1 and not include_self_pairs:
        pytest.skip("no pair i != j with M = 1 (a ValueError, see test_bad_inputs)")
    inputs = make_inputs(case, dtype, device)
    out = run_op(inputs, include_self_pairs, backend)
    ref = run_oracle(inputs, include_self_pairs)
    lowp = None if dtype == torch.float32 else run_torch_lowp(inputs, include_self_pairs)
    assert out[0].dtype == torch.float32 and out[0].dim() == 0
    # fp32 on a GPU: sums of up to M^2 pair terms in another order than the oracle's.
    tol = 1e-5 if case.M <= 64 else 5e-5
    assert_matches(out, ref, dtype, lowp, tol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_down_weight_is_log2(backend, device):
    """Independent of the oracle: down_w = 0 gives logits 0, so every pair costs log 2, d down = the mean of
    (1/2 - y, y - 1/2) (x) g, and no gradient reaches emb, gate_w or up_w."""
    emb, lang, gate, up, down = make_inputs(CASES["m7_d40"], torch.float32, device)
    leaves = [t.clone().requires_grad_() for t in (emb, gate, up, torch.zeros_like(down))]
    loss = lang_match_loss(leaves[0], lang, *leaves[1:], backend=backend)
    loss.backward()
    assert abs(loss.item() - math.log(2.0)) < 1e-6
    for t in leaves[:3]:
        assert torch.count_nonzero(t.grad) == 0
    assert torch.allclose(leaves[3].grad[0], -leaves[3].grad[1])
    assert leaves[3].grad.abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------------------------
# The Triton path really runs; banding, chunking, determinism
# ----------------------------------------------------------------------------------------------------------------------


class _Spy:
    """Stands in for a @triton.jit kernel and counts launches (``kernel[grid](...)``)."""

    def __init__(self, fn):
        self.fn, self.launches = fn, 0

    def __getitem__(self, grid):
        launch = self.fn[grid]

        def run(*args, **kwargs):
            self.launches += 1
            return launch(*args, **kwargs)

        return run


def _spy_kernels(monkeypatch) -> dict[str, _Spy]:
    spies = {}
    for name in ("_lang_match_gemm_kernel", "_lang_match_fwd_kernel", "_lang_match_bwd_kernel"):
        spies[name] = _Spy(getattr(lm, name))
        monkeypatch.setattr(lm, name, spies[name])
    return spies


@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
def test_which_path_runs(backend, device, monkeypatch):
    """auto/triton launch the kernels (forward GEMM + pairwise, backward pairwise + 2 GEMMs); torch launches none."""
    spies = _spy_kernels(monkeypatch)
    inputs = make_inputs(CASES["m7_d40"], torch.float32, device)
    out = run_op(inputs, True, backend)
    assert_matches(out, run_oracle(inputs, True), torch.float32)
    counts = {k: s.launches for k, s in spies.items()}
    if backend == "torch":
        assert counts == dict.fromkeys(counts, 0)
    else:
        assert counts == {"_lang_match_gemm_kernel": 3, "_lang_match_fwd_kernel": 1, "_lang_match_bwd_kernel": 1}


@pytest.mark.parametrize("include_self_pairs", [True, False], ids=["self", "noself"])
def test_triton_backward_in_bands(include_self_pairs, device, monkeypatch):
    """A tiny partial-buffer budget splits the backward into row bands (one launch each): same result."""
    spies = _spy_kernels(monkeypatch)
    monkeypatch.setattr(lm, "_BWD_PARTIAL_BYTES", 1)
    case = Case(70, 12, 24) if device.type == "cpu" else Case(300, 256, 128)
    inputs = make_inputs(case, torch.float32, device, seed=3)
    out = run_op(inputs, include_self_pairs, "triton")
    assert spies["_lang_match_bwd_kernel"].launches == math.ceil(case.M / lm._config(case.H, torch.float32).pair_bi)
    assert_matches(out, run_oracle(inputs, include_self_pairs), torch.float32)


@pytest.mark.parametrize("rows", [1, 3])
def test_torch_path_in_row_chunks(rows, monkeypatch):
    """Row chunks of 1 and 3 rows (3 does not divide M): same loss and gradients."""
    monkeypatch.setattr(lm, "_TORCH_CHUNK_BYTES", 16 * 11 * 24 * rows)
    case = Case(11, 12, 24)
    assert lm._chunk_rows(case.M, case.H, lm._TORCH_CHUNK_BYTES) == rows
    for include_self_pairs in (True, False):
        inputs = make_inputs(case, torch.float32, torch.device("cpu"), seed=4)
        out = run_op(inputs, include_self_pairs, "torch")
        assert_matches(out, run_oracle(inputs, include_self_pairs), torch.float32)


def test_triton_deterministic(device):
    """No atomics: two runs give bitwise-identical loss and gradients."""
    case = CASES["m37_d24_tiles"] if device.type == "cpu" else GPU_CASES["gpu_m256_d4096_h128"]
    inputs = make_inputs(case, torch.bfloat16, device)
    a = run_op(inputs, True, "triton")
    b = run_op(inputs, True, "triton")
    for name, x, y in zip(NAMES, a, b):
        assert torch.equal(x, y), name


# ----------------------------------------------------------------------------------------------------------------------
# Plugging in the official head; partial gradients; no-grad; mixed dtypes
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_official_head_weights_plug_in(backend, device):
    """nn.Linear(2d, h) gate_proj / up_proj and nn.Linear(h, 2) down_proj weights go in as they are; loss and the
    .grad of the module's parameters equal the official pair-tensor code's."""
    B, d, h = 5, 24, 128
    torch.manual_seed(1)
    head = OfficialLanguageMatchingHead(d, h).to(device)
    e_x, e_y = torch.randn(B, d, device=device), torch.randn(B, d, device=device)
    src, tgt = torch.tensor([0, 0, 1, 2, 0], device=device), torch.tensor([1, 2, 0, 0, 0], device=device)
    emb_ref = torch.cat([e_x, e_y]).requires_grad_()
    lang = torch.cat([src, tgt])
    loss_ref = official_loss(head, emb_ref, lang)
    loss_ref.backward()
    ref = [loss_ref.detach(), emb_ref.grad] + [p.grad.clone() for p in (head.gate_proj.weight, head.up_proj.weight)]
    ref.append(head.down_proj.weight.grad.clone())
    head.zero_grad(set_to_none=True)

    emb = torch.cat([e_x, e_y]).requires_grad_()
    loss = lang_match_loss(
        emb, lang, head.gate_proj.weight, head.up_proj.weight, head.down_proj.weight, backend=backend
    )
    loss.backward()
    out = [loss.detach(), emb.grad, head.gate_proj.weight.grad, head.up_proj.weight.grad, head.down_proj.weight.grad]
    assert_matches(out, ref, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_requires_grad_and_no_grad(backend, device):
    """Only the weights require grad (frozen embeddings), only emb, and no grad at all: same values as the oracle."""
    inputs = make_inputs(CASES["m7_d40"], torch.float32, device)
    ref = run_oracle(inputs, True)
    emb, lang, gate, up, down = inputs
    ws = [w.clone().requires_grad_() for w in (gate, up, down)]
    loss = lang_match_loss(emb, lang, *ws, backend=backend)
    (UPSTREAM * loss).backward()
    for name, w, r in zip(NAMES[2:], ws, ref[2:]):
        assert_close_to_ref(w.grad, r, dtype=torch.float32, atol32=1e-5 * r.abs().max().item(), name=name)
    leaf = emb.clone().requires_grad_()
    (UPSTREAM * lang_match_loss(leaf, lang, gate, up, down, backend=backend)).backward()
    assert_close_to_ref(leaf.grad, ref[1], dtype=torch.float32, atol32=1e-5 * ref[1].abs().max().item(), name="d_emb")
    with torch.no_grad():
        loss = lang_match_loss(emb.requires_grad_(), lang, gate, up, down, backend=backend)
    assert not loss.requires_grad
    assert abs(loss.item() - ref[0].item()) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes(backend, device):
    """bf16 embeddings with fp32 head weights (autocast-style): the maths stays fp32, gradients come back in each
    input's dtype (bf16 for emb: one rounding, <= 2^-8 relative)."""
    emb, lang, gate, up, down = make_inputs(CASES["m7_d40"], torch.float32, device)
    inputs = [emb.bfloat16(), lang, gate, up, down]
    out = run_op(inputs, True, backend)
    ref = run_oracle(inputs, True)
    assert out[1].dtype == torch.bfloat16 and all(t.dtype == torch.float32 for t in out[2:])
    torch.testing.assert_close(out[1].float(), ref[1], atol=2**-8 * ref[1].abs().max().item(), rtol=2**-8)
    for i in (0, 2, 3, 4):
        assert_close_to_ref(out[i], ref[i], dtype=torch.float32, atol32=1e-5 * ref[i].abs().max().item())


def test_reference_backend(device):
    inputs = make_inputs(CASES["m7_d40"], torch.float32, device)
    emb, lang, *ws = inputs
    assert torch.equal(lang_match_loss(emb, lang, *ws, backend="reference"), lang_match_loss_ref(emb, lang, *ws))


# ----------------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------------


def _bad(**changes):
    def build(device):
        emb, lang, gate, up, down = make_inputs(Case(4, 6, 8), torch.float32, device)
        args = {"emb": emb, "lang": lang, "gate_w": gate, "up_w": up, "down_w": down}
        kwargs = {}
        for key, fn in changes.items():
            if key in args:
                args[key] = fn(args[key])
            else:
                kwargs[key] = fn
        return args, kwargs

    return build


BAD_INPUTS = {
    "emb_int": (_bad(emb=lambda t: t.long()), TypeError, "emb"),
    "emb_3d": (_bad(emb=lambda t: t[None]), ValueError, "emb"),
    "emb_no_rows": (_bad(emb=lambda t: t[:0], lang=lambda t: t[:0]), ValueError, "emb"),
    "lang_float": (_bad(lang=lambda t: t.float()), TypeError, "lang"),
    "lang_2d": (_bad(lang=lambda t: t[None]), ValueError, "lang"),
    "lang_wrong_length": (_bad(lang=lambda t: t[:3]), ValueError, "lang"),
    "gate_not_2d_wide": (_bad(gate_w=lambda t: t[:, :6]), ValueError, "gate_w"),
    "gate_int": (_bad(gate_w=lambda t: t.int()), TypeError, "gate_w"),
    "up_other_shape": (_bad(up_w=lambda t: t[:5]), ValueError, "up_w"),
    "down_three_rows": (_bad(down_w=lambda t: torch.cat([t, t[:1]])), ValueError, "down_w"),
    "down_other_h": (_bad(down_w=lambda t: t[:, :5]), ValueError, "down_w"),
    "down_other_device": (_bad(down_w=lambda t: t.to("meta")), ValueError, "device"),
    "noself_single_row": (
        _bad(emb=lambda t: t[:1], lang=lambda t: t[:1], include_self_pairs=False),
        ValueError,
        "include_self_pairs",
    ),
    "unknown_backend": (_bad(backend="cuda"), ValueError, "backend"),
}


@pytest.mark.parametrize("build,exc,match", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs(build, exc, match, device):
    args, kwargs = build(device)
    with pytest.raises(exc, match=match):
        lang_match_loss(**args, **kwargs)


def test_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    """backend="triton" never falls back silently; "auto" picks the torch path on CPU without the interpreter."""
    monkeypatch.setattr(common, "interpreter_enabled", lambda: False)
    emb, lang, *ws = make_inputs(Case(4, 6, 8), torch.float32, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="triton"):
        lang_match_loss(emb, lang, *ws, backend="triton")
    spies = _spy_kernels(monkeypatch)
    lang_match_loss(emb, lang, *ws, backend="auto")
    assert all(s.launches == 0 for s in spies.values())
