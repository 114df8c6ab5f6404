"""Every Triton kernel compiles ahead of time for sm_90a and sm_80 without spills, within the SM's shared memory,
with tensor-core instructions in the GEMM-shaped kernels; and the checker is proven able to fail.

The compilation runs in ONE child process started without ``TRITON_INTERPRET`` (this pytest process runs the
interpreter, under which ``@triton.jit`` gives functions ``triton.compile`` rejects), for the kernel modules and the
sample kernels of ``tests/aot_sample_kernels.py`` together. The limits below are written out here, independently of
the checker's own table, and the tests read the raw numbers of its report, not only its verdict.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from alignx.kernels import aot
from alignx.kernels._common import AOTSpec

SAMPLES = str(Path(__file__).with_name("aot_sample_kernels.py"))
ARCHS = ("90a", "80")
D = 4096
# Max shared memory per block with opt-in (CUDA C++ Programming Guide, compute capabilities table).
SMEM_LIMIT = {"sm_90a": 227 * 1024, "sm_80": 163 * 1024}
# Tensor-core instructions of a GEMM main loop: Hopper warpgroup MMA, Ampere warp-level MMA.
TC_PTX = {"sm_90a": "wgmma.mma_async", "sm_80": "mma.sync.aligned"}
# The ops whose kernels are GEMM-shaped (the issue names them): each must flag at least one spec gemm=True.
GEMM_MODULES = ("info_nce", "lang_match", "linear_ce")
Run = tuple[aot.Report, subprocess.CompletedProcess]
NEGATIVE_CONTROLS = {
    "neg_spill": "register spills",
    "neg_smem_overflow": "shared memory",
    "neg_gemm_without_mma": "no tensor-core instructions",
}


@pytest.fixture(scope="module")
def run() -> Run:
    return aot.run_in_subprocess([*aot.KERNEL_MODULES, SAMPLES], ARCHS, d=D, jobs=2, timeout=850)


def _results(report: aot.Report, module: str, arch: str) -> list[aot.Result]:
    return [r for r in report.results if r.module == module and r.arch == arch]


def _problems(r: aot.Result) -> list[str]:
    """The checks of the issue, recomputed from the raw numbers of one result."""
    out = []
    if r.error is not None:
        out.append(f"did not compile: {r.error.splitlines()[0]}")
        return out
    if r.target != r.arch:
        out.append(f"compiled for {r.target}, not {r.arch}")
    if r.spill_stores != 0 or r.spill_loads != 0:
        out.append(f"spills {r.spill_stores} B stores / {r.spill_loads} B loads")
    if r.smem_total is None or r.smem_total > SMEM_LIMIT[r.arch]:
        out.append(f"shared memory {r.smem_total} B > {SMEM_LIMIT[r.arch]} B")
    if r.gemm and not (r.tc_ptx and r.tc_sass):
        out.append(f"no {TC_PTX[r.arch]} (PTX {r.tc_ptx}, SASS {r.tc_sass})")
    return out


@pytest.mark.parametrize("arch", [f"sm_{a}" for a in ARCHS])
@pytest.mark.parametrize("module", aot.KERNEL_MODULES)
def test_kernel_module_compiles_clean(run: Run, module: str, arch: str) -> None:
    report, _ = run
    assert module not in report.module_errors, f"kernel module {module}: {report.module_errors[module]}"
    assert not report.uncovered[module], f"{module}: kernels without an AOT spec: {report.uncovered[module]}"
    results = _results(report, module, arch)
    assert len(results) == len(report.module_specs[module]) > 0, f"{module}: specs not all compiled for {arch}"
    bad = {f"{r.kernel} ({r.num_warps} warps, {r.num_stages} stages)": _problems(r) for r in results}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"{module} on {arch}: {bad}"
    # The checker's verdict agrees with the recomputed checks.
    assert all(r.ok and not r.failures for r in results), [r.failures for r in results if not r.ok]


@pytest.mark.parametrize("module", aot.KERNEL_MODULES)
def test_specs_are_the_launched_binaries(run: Run, module: str) -> None:
    """Every integer argument has its launch value (``extra["int_args"]``), so the compiled binary is the one the
    JIT builds at launch (unit strides become constexprs, multiples of 16 get divisibility hints); without it the
    checked kernel is a different, unspecialised binary."""
    report, _ = run
    assert module not in report.module_errors, f"kernel module {module}: {report.module_errors[module]}"
    vague = {r.kernel: r.specialization["no_launch_value"] for r in report.results if r.module == module}
    vague = {k: v for k, v in vague.items() if v}
    assert not vague, f"{module}: integer arguments without a launch value in extra['int_args']: {vague}"


@pytest.mark.parametrize("module", GEMM_MODULES)
def test_gemm_shaped_ops_use_tensor_cores(run: Run, module: str) -> None:
    report, _ = run
    assert module not in report.module_errors, f"kernel module {module}: {report.module_errors[module]}"
    for arch in SMEM_LIMIT:
        gemms = [r for r in _results(report, module, arch) if r.gemm]
        assert gemms, f"{module}: no spec is flagged gemm=True, its GEMM main loops are not checked for tensor cores"
        assert all(r.tc_ptx and r.tc_ptx > 0 for r in gemms), [(r.kernel, r.tc_ptx) for r in gemms]


@pytest.mark.parametrize("arch", [f"sm_{a}" for a in ARCHS])
def test_positive_controls_pass(run: Run, arch: str) -> None:
    report, _ = run
    by_name = {r.kernel: r for r in _results(report, SAMPLES, arch)}
    gemm, row_sum = by_name["sample_gemm_128x128x64"], by_name["sample_row_sum"]
    for r in (gemm, row_sum):
        assert r.ok and not _problems(r), (r.kernel, r.failures, r.error)
        assert 0 < r.regs <= 255 and r.compile_s > 0
    assert gemm.tc_ptx > 0 and gemm.tc_sass > 0
    assert row_sum.tc_ptx == 0 and row_sum.mma_sync_ptx == 0
    # The launch specialisation of the JIT was reproduced: unit strides are constexprs, 4096 is divisible by 16.
    assert gemm.specialization["equal_to_1"] == ["stride_ak", "stride_bn", "stride_cn"]
    assert "stride_am" in gemm.specialization["divisible_by_16"]


@pytest.mark.parametrize("arch", [f"sm_{a}" for a in ARCHS])
@pytest.mark.parametrize("kernel", list(NEGATIVE_CONTROLS))
def test_negative_controls_fail(run: Run, kernel: str, arch: str) -> None:
    report, proc = run
    (r,) = [r for r in _results(report, SAMPLES, arch) if r.kernel == kernel]
    assert r.error is None, r.error  # it compiled: the failure is the check's, not the compiler's
    assert not r.ok and any(NEGATIVE_CONTROLS[kernel] in f for f in r.failures), r.failures
    assert _problems(r), "the independent recomputation must flag it too"
    assert not report.ok and proc.returncode == 1


def test_every_sample_kernel_is_covered(run: Run) -> None:
    report, _ = run
    assert report.uncovered[SAMPLES] == []
    # A module with a launchable kernel that no spec names is reported.
    specs = aot.load_module(SAMPLES).aot_specs(D)
    assert aot.uncovered_kernels(SAMPLES, [s for s in specs if s.name != "neg_spill"]) == ["_sample_spill_kernel"]


def test_command_line_table_and_exit_code_zero() -> None:
    report, proc = aot.run_in_subprocess([SAMPLES], ("90a",), d=D, jobs=1, kernels=["sample_*"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert report.ok and [r.kernel for r in report.results] == ["sample_gemm_128x128x64", "sample_row_sum"]
    table = aot.format_table(report)
    assert "sample_gemm_128x128x64" in table and "sm_90a" in table and "0 failure(s)" in table


def test_missing_module_or_specs_is_a_failure() -> None:
    with pytest.raises(ModuleNotFoundError):
        aot.module_specs("no_such_kernel_module", D)
    with pytest.raises(AttributeError, match="no aot_specs"):
        aot.module_specs("reference", D)  # a module of the package without specs
    report = aot.Report(archs=["sm_90a"], d=D, module_errors={"x": "missing"})
    assert not report.ok
    assert not aot.Report(archs=["sm_90a"], d=D).ok  # nothing compiled is not a pass


def test_spec_validation_names_the_argument() -> None:
    spec = aot.load_module(SAMPLES).aot_specs(D)[1]  # sample_row_sum
    with pytest.raises(ValueError, match="'stride_x' has no type"):
        aot.build_source_args(AOTSpec(spec.name, spec.fn, {"p_x": "*bf16", "p_y": "*fp32", "D": "i32"}, {"BD": 64}))
    with pytest.raises(ValueError, match="not parameters"):
        aot.build_source_args(AOTSpec(spec.name, spec.fn, dict(spec.signature, typo="i32"), {"BD": 64}))
    with pytest.raises(ValueError, match="arch must be one of"):
        aot.parse_arch("75")
    assert aot.parse_arch("sm_90").sm == aot.parse_arch("90a").sm == "sm_90a"


@pytest.mark.parametrize("value", [1, 0, 16, 4096, 7, 4100])
def test_specialisation_matches_triton_jit(value: int) -> None:
    """An integer argument is specialised exactly as Triton's launcher specialises the same value."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    jit_kind, jit_attr = native_specialize_impl(BaseBackend, value, False, True, True)
    spec = aot.load_module(SAMPLES).aot_specs(D)[1]  # sample_row_sum(p_x, p_y, D, stride_x, BD)
    spec.extra["int_args"] = {"D": value, "stride_x": D}
    signature, constexprs, attrs, _ = aot.build_source_args(spec)
    assert signature["D"] == jit_kind
    if jit_kind == "constexpr":
        assert constexprs["D"] == value
    assert ((2,) in attrs) == (jit_attr == "D")
    assert (0,) in attrs and (1,) in attrs  # pointers from torch's allocator are 16-byte aligned
