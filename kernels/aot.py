"""Ahead-of-time GPU compilation checks for every Triton kernel, without a GPU.

Each kernel module lists the kernels it launches, at the configurations its launchers use for a given hidden
size ``d``, as :class:`~._common.AOTSpec` objects returned by ``aot_specs(d)``. This checker compiles every spec
for real NVIDIA targets (``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))``: ttir -> ttgir ->
llir -> ptx -> cubin, no driver needed) and checks, per kernel x architecture:

* **no register spills** — ``spill stores == spill loads == 0`` in the ``ptxas -v`` report of the compile;
* **shared memory within the SM's per-block opt-in limit** — Triton's dynamic shared memory (``metadata.shared``,
  the amount the launcher requests) plus the cubin's static shared memory (``cuobjdump -res-usage``) must be
  ``<= smem_limit`` (sm_90: 227 KiB, sm_80: 163 KiB) — the rule Triton's launcher applies on a GPU, which allows
  ``optin - static`` bytes of dynamic shared memory;
* **the block fits the register file** — registers per thread, allocated in units of 8, times ``32 x num_warps``
  threads ``<= 65536``;
* **tensor cores in GEMM-shaped kernels** (``gemm=True``) — tensor-core instructions in the PTX *and* in the SASS
  (sm_90a: ``wgmma.mma_async`` / ``HGMMA``; sm_80: ``mma.sync`` / ``HMMA``);
* **the right target** — the PTX ``.target`` is the one asked for (``sm_90a``: ``wgmma`` needs the ``a`` variant;
  Triton's NVIDIA backend picks ``sm_90a`` for any capability >= 90, see ``sm_arch_from_capability``).

Sources of truth: spills and the stack frame come from ptxas itself (the ``-v`` log Triton's ``make_cubin``
produces, captured through ``knobs.nvidia.dump_ptxas_log``); registers and static shared memory from
``cuobjdump -res-usage`` on the cubin (cross-checked against ptxas's "Used N registers"); dynamic shared memory from
the compiled kernel's metadata; tensor-core counts from the PTX text and ``cuobjdump -sass``. All tools ship in the
triton wheel (``triton/backends/nvidia/bin``). ``CompiledKernel.n_regs``/``n_spills`` are not used: they are only
filled in when a CUDA driver loads the binary.

Launch-time specialisation is reproduced as Triton's JIT does it: every pointer argument is assumed 16-byte aligned
(``tt.divisibility=16``; true for any tensor from torch's allocator), and for integer arguments whose launch values
are given in ``spec.extra["int_args"]`` (name -> value at the checked ``d``) a value of 1 becomes a constexpr and a
multiple of 16 gets ``tt.divisibility=16``. Without those values a unit stride stays a runtime integer, loads are
not vectorised and the report is pessimistic. ``spec.extra["unaligned"]`` lists pointer arguments not to assume
aligned.

Compilation must run in a process *without* ``TRITON_INTERPRET=1`` (under the interpreter ``@triton.jit`` yields an
``InterpretedFunction`` that ``triton.compile`` rejects): the command line re-executes itself without it, and
:func:`run_in_subprocess` gives tests the same from an interpreter process. Every run compiles from scratch in a
private cache directory, so compile times and ptxas reports are real.

Usage::

    python -m alignx.kernels.aot [--arch 90a 80] [--d 4096] [--json] [--modules span_pool path/to/file.py]
                                 [--kernels 'gemm_*'] [--jobs 2]

prints one row per kernel x arch (registers, spill bytes, shared memory against the limit, tensor-core instruction
counts in PTX / SASS — SASS for ``gemm=True`` specs only — plus any ``mma.sync`` fallback on sm_90a, compile time,
verdict) and exits 1 on any failure, including a kernel module that is missing, has no ``aot_specs``, or defines a
``*_kernel`` that no spec covers.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import importlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ._common import AOTSpec, interpreter_enabled

#: Kernel modules of this package checked by default (relative to ``alignx.kernels``); each must expose
#: ``aot_specs(d: int = 4096) -> list[AOTSpec]``. A missing module or a missing/empty ``aot_specs`` is a failure.
KERNEL_MODULES: tuple[str, ...] = ("span_pool", "info_nce", "lang_match", "linear_ce")

_SELF = f"{__package__}.aot"  # this module's import name, also when run as ``python -m`` (then __name__ is __main__)
REGISTERS_PER_SM = 65536  # 64K 32-bit registers per SM on sm_80 .. sm_100
KIB = 1024


@dataclass(frozen=True)
class Arch:
    """A compilation target and its limits.

    ``smem_limit`` is the maximum shared memory per block with the opt-in attribute
    (``CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN``), in bytes. ``ptx_tc``/``sass_tc`` name the
    tensor-core instructions a GEMM main loop must contain on this target: a PTX opcode prefix and a SASS opcode
    regex, both matched as whole words.
    """

    name: str
    capability: int
    smem_limit: int
    ptx_tc: str
    sass_tc: str

    @property
    def sm(self) -> str:
        return f"sm_{self.name}"

    def count_ptx_tc(self, ptx: str) -> int:
        return len(re.findall(rf"(?<![\w.]){re.escape(self.ptx_tc)}(?![\w])", ptx))

    def count_sass_tc(self, sass: str) -> int:
        return len(re.findall(rf"\b(?:{self.sass_tc})\b", sass))


ARCHS: dict[str, Arch] = {
    "80": Arch("80", 80, 163 * KIB, "mma.sync.aligned", "HMMA"),
    "86": Arch("86", 86, 99 * KIB, "mma.sync.aligned", "HMMA"),
    "89": Arch("89", 89, 99 * KIB, "mma.sync.aligned", "HMMA"),
    "90a": Arch("90a", 90, 227 * KIB, "wgmma.mma_async", "HGMMA"),
    "100a": Arch("100a", 100, 227 * KIB, "tcgen05.mma", r"UTC\w*MMA"),
}
DEFAULT_ARCHS: tuple[str, ...] = ("90a", "80")


def parse_arch(text: str) -> Arch:
    """``"90a"``, ``"90"``, ``"sm_90a"``, ``"sm90"`` -> the sm_90a target (Triton always emits ``sm_90a`` for 90)."""
    key = re.sub(r"^sm_?", "", text.strip().lower())
    if key in ARCHS:
        return ARCHS[key]
    for arch in ARCHS.values():
        if key == str(arch.capability):
            return arch
    raise ValueError(f"arch must be one of {sorted(ARCHS)} (or sm_<cap>), got {text!r}")


@dataclass
class Result:
    """The outcome of one spec compiled for one architecture (sizes in bytes)."""

    module: str
    kernel: str
    arch: str
    num_warps: int = 0
    num_stages: int = 0
    gemm: bool = False
    ok: bool = False
    failures: list[str] = field(default_factory=list)
    target: str | None = None
    regs: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    smem_dynamic: int | None = None
    smem_static: int | None = None
    smem_limit: int = 0
    tc_ptx: int | None = None
    tc_sass: int | None = None
    mma_sync_ptx: int | None = None
    compile_s: float = 0.0
    specialization: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def smem_total(self) -> int | None:
        if self.smem_dynamic is None:
            return None
        return self.smem_dynamic + (self.smem_static or 0)


@dataclass
class Report:
    """All results of one run plus the modules that could not provide specs (name -> error)."""

    archs: list[str]
    d: int
    results: list[Result] = field(default_factory=list)
    module_errors: dict[str, str] = field(default_factory=dict)
    module_specs: dict[str, list[str]] = field(default_factory=dict)
    uncovered: dict[str, list[str]] = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        clean = not self.module_errors and not any(self.uncovered.values())
        return clean and bool(self.results) and all(r.ok for r in self.results)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "archs": self.archs,
            "d": self.d,
            "module_errors": self.module_errors,
            "module_specs": self.module_specs,
            "uncovered": self.uncovered,
            "tools": self.tools,
            "results": [asdict(r) for r in self.results],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Report:
        return cls(
            archs=list(data["archs"]),
            d=int(data["d"]),
            results=[Result(**r) for r in data["results"]],
            module_errors=dict(data["module_errors"]),
            module_specs={k: list(v) for k, v in data["module_specs"].items()},
            uncovered={k: list(v) for k, v in data["uncovered"].items()},
            tools=dict(data["tools"]),
        )


# ----------------------------------------------------------------------------------------------- module loading


_LOADED: dict[str, Any] = {}


def load_module(ref: str) -> Any:
    """Import a kernel module: a name of this package (``"info_nce"``), a dotted name, or a path to a ``.py`` file."""
    if ref in _LOADED:
        return _LOADED[ref]
    if ref.endswith(".py"):
        path = Path(ref).resolve()
        if not path.is_file():
            raise ModuleNotFoundError(f"no kernel module file {ref!r}")
        name = f"_aot_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # triton.jit reads the kernel source through the module
        spec.loader.exec_module(module)
    elif "." in ref:
        module = importlib.import_module(ref)
    else:
        module = importlib.import_module(f".{ref}", __package__)
    _LOADED[ref] = module
    return module


def module_specs(ref: str, d: int) -> list[AOTSpec]:
    """The specs of a module; raises with a clear message when the module or its ``aot_specs`` is missing."""
    module = load_module(ref)
    fn = getattr(module, "aot_specs", None)
    if not callable(fn):
        raise AttributeError(f"kernel module {ref!r} has no aot_specs(d) function")
    specs = list(fn(d))
    if not specs:
        raise ValueError(f"kernel module {ref!r}: aot_specs({d}) returned no spec")
    for spec in specs:
        if not isinstance(spec, AOTSpec):
            raise TypeError(f"kernel module {ref!r}: aot_specs returned {type(spec).__name__}, not AOTSpec")
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"kernel module {ref!r}: duplicate spec names {dupes}")
    return specs


def uncovered_kernels(ref: str, specs: list[AOTSpec]) -> list[str]:
    """Launchable kernels of a module (``@triton.jit`` functions defined there whose name ends in ``_kernel``, the
    package's naming rule for launched kernels; ``@triton.jit`` helpers are compiled inside them) that no spec
    covers."""
    module = load_module(ref)
    covered = {id(s.fn) for s in specs}
    names = []
    for name, obj in vars(module).items():
        fn = getattr(obj, "fn", None)
        if (
            hasattr(obj, "arg_names")
            and getattr(fn, "__module__", None) == module.__name__
            and name.endswith("_kernel")
        ):
            if id(obj) not in covered:
                names.append(name)
    return sorted(names)


# ------------------------------------------------------------------------------------------------- compilation


def build_source_args(spec: AOTSpec) -> tuple[dict[str, str], dict[str, Any], dict[tuple[int, ...], Any], dict]:
    """The ``ASTSource`` arguments of a spec, specialised as Triton's JIT would at launch.

    Returns ``(signature, constexprs, attrs, summary)``: the full signature in parameter order (``"constexpr"`` for
    constexpr arguments), the constexpr values, the ``tt.divisibility`` attributes by argument index, and a summary
    for the report.
    """
    arg_names = list(getattr(spec.fn, "arg_names", []))
    if not arg_names:
        raise TypeError(f"spec {spec.name!r}: fn is not a @triton.jit function (got {type(spec.fn).__name__})")
    unknown = sorted((set(spec.signature) | set(spec.constexprs)) - set(arg_names))
    if unknown:
        raise ValueError(f"spec {spec.name!r}: arguments {unknown} are not parameters of {spec.fn.__name__}")
    both = sorted(set(spec.signature) & set(spec.constexprs))
    if both:
        raise ValueError(f"spec {spec.name!r}: arguments {both} are both in signature and constexprs")
    int_args = dict(spec.extra.get("int_args", {}))
    unaligned = set(spec.extra.get("unaligned", ()))
    bad = sorted((set(int_args) - set(spec.signature)) | (unaligned - set(spec.signature)))
    if bad:
        raise ValueError(f"spec {spec.name!r}: extra names {bad} that are not runtime arguments in signature")
    not_int = sorted(n for n in int_args if spec.signature[n][:1] not in ("i", "u"))
    if not_int:
        raise ValueError(f"spec {spec.name!r}: extra['int_args'] names non-integer arguments {not_int}")

    # The JIT's per-parameter opt-outs (@triton.jit(do_not_specialize=..., do_not_specialize_on_alignment=...)).
    params = list(getattr(spec.fn, "params", []))
    no_spec = {p.name for p in params if getattr(p, "do_not_specialize", False)}
    no_align = {p.name for p in params if getattr(p, "do_not_specialize_on_alignment", False)}

    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = dict(spec.constexprs)
    attrs: dict[tuple[int, ...], Any] = {}
    aligned, divisible, ones, unknown_ints = [], [], [], []
    for index, name in enumerate(arg_names):
        if name in spec.constexprs:
            signature[name] = "constexpr"
            continue
        if name not in spec.signature:
            raise ValueError(f"spec {spec.name!r}: argument {name!r} has no type in signature and no constexpr value")
        ty = signature[name] = spec.signature[name]
        may_align = name not in no_spec and name not in no_align
        if ty.startswith("*"):
            if may_align and name not in unaligned:
                attrs[(index,)] = [["tt.divisibility", 16]]
                aligned.append(name)
        elif name in int_args:
            value = int(int_args[name])
            if name in no_spec:
                continue
            if value == 1:  # the JIT turns an integer equal to 1 into a constexpr
                signature[name] = "constexpr"
                constexprs[name] = 1
                ones.append(name)
            elif may_align and value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
                divisible.append(name)
        elif ty[:1] in ("i", "u") and name not in no_spec:
            unknown_ints.append(name)
    summary = {
        "aligned_pointers": aligned,
        "divisible_by_16": divisible,
        "equal_to_1": ones,
        "no_launch_value": unknown_ints,
    }
    return signature, constexprs, attrs, summary


_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_RES_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_PTX_TARGET = re.compile(r"^\s*\.target\s+(\S+?)\s*(?:,|$)", re.MULTILINE)


def _nvidia_tool(name: str) -> str:
    from triton import knobs

    return getattr(knobs.nvidia, name.replace("-", "_")).path


def tool_versions() -> dict[str, str]:
    """Versions of the tools that produce the numbers (for the report)."""
    import triton

    out = {"triton": triton.__version__}
    for tool in ("ptxas", "ptxas-blackwell", "cuobjdump"):
        try:
            text = subprocess.run([_nvidia_tool(tool), "--version"], capture_output=True, text=True).stdout
            match = re.search(r"release [\d.]+, V[\d.]+", text)
            out[tool] = match.group(0) if match else text.strip().splitlines()[-1]
        except Exception as exc:  # pragma: no cover - a broken wheel
            out[tool] = f"unavailable: {exc}"
    return out


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        proc = subprocess.run([_nvidia_tool("cuobjdump"), *flags, f.name], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"cuobjdump {' '.join(flags)} failed: {proc.stderr.strip()}")
        return proc.stdout
    finally:
        os.unlink(f.name)


def compile_spec(module: str, spec: AOTSpec, arch: Arch) -> Result:
    """Compile one spec for one architecture and measure it; never raises (errors become failures)."""
    res = Result(
        module=module,
        kernel=spec.name,
        arch=arch.sm,
        num_warps=spec.num_warps,
        num_stages=spec.num_stages,
        gemm=spec.gemm,
        smem_limit=arch.smem_limit,
    )
    try:
        _compile_and_measure(spec, arch, res)
    except Exception as exc:
        res.error = f"{type(exc).__name__}: {exc}"[-4000:]
        res.failures.append(f"compilation failed: {res.error.splitlines()[0][:300]}")
    _judge(res, arch)
    return res


def _compile_and_measure(spec: AOTSpec, arch: Arch, res: Result) -> None:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if type(spec.fn).__name__ == "InterpretedFunction":
        raise RuntimeError("kernel was decorated under TRITON_INTERPRET=1; compile in a process without it")
    signature, constexprs, attrs, res.specialization = build_source_args(spec)
    knobs.nvidia.dump_ptxas_log = True  # make_cubin prints the `ptxas -v` report to stdout
    knobs.compilation.always_compile = True
    log = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(
            ASTSource(spec.fn, signature, constexprs, attrs),
            target=GPUTarget("cuda", arch.capability, 32),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
        )
    res.compile_s = time.perf_counter() - t0
    ptxas_log, ptx, cubin = log.getvalue(), kernel.asm["ptx"], kernel.asm["cubin"]

    target = _PTX_TARGET.search(ptx)
    res.target = target.group(1) if target else None
    spill = _PTXAS_SPILL.search(ptxas_log)
    if spill is None:
        raise RuntimeError(f"no spill statistics in the ptxas report:\n{ptxas_log[-2000:]}")
    res.stack, res.spill_stores, res.spill_loads = (int(g) for g in spill.groups())
    usage = _RES_USAGE.search(_cuobjdump(cubin, "-res-usage"))
    if usage is None:
        raise RuntimeError("cuobjdump -res-usage printed no resource line")
    res.regs, res.smem_static = int(usage.group(1)), int(usage.group(3))
    ptxas_regs = _PTXAS_REGS.search(ptxas_log)
    if ptxas_regs is None or int(ptxas_regs.group(1)) != res.regs:
        res.failures.append(f"register counts disagree: ptxas {ptxas_regs and ptxas_regs.group(1)}, cubin {res.regs}")
    res.smem_dynamic = int(kernel.metadata.shared)
    res.tc_ptx = arch.count_ptx_tc(ptx)
    res.mma_sync_ptx = ARCHS["80"].count_ptx_tc(ptx)  # warp-level MMA; on sm_90a the fallback when wgmma is not used
    if spec.gemm:  # disassembly costs ~0.3 s a kernel: only where the count is checked
        res.tc_sass = arch.count_sass_tc(_cuobjdump(cubin, "-sass"))


def _judge(res: Result, arch: Arch) -> None:
    if res.error is None:
        if res.target != arch.sm:
            res.failures.append(f"PTX target {res.target}, expected {arch.sm}")
        if res.spill_stores or res.spill_loads:
            res.failures.append(f"register spills: {res.spill_stores} B stores, {res.spill_loads} B loads")
        if res.smem_total is not None and res.smem_total > arch.smem_limit:
            res.failures.append(
                f"shared memory {res.smem_total / KIB:.1f} KiB > {arch.sm} limit {arch.smem_limit / KIB:.0f} KiB"
            )
        if res.regs is not None and -(-res.regs // 8) * 8 * 32 * res.num_warps > REGISTERS_PER_SM:
            res.failures.append(f"{res.regs} registers x {32 * res.num_warps} threads > {REGISTERS_PER_SM} per SM")
        if res.gemm and not (res.tc_ptx and res.tc_sass):
            fallback = ""
            if res.mma_sync_ptx and arch.ptx_tc != ARCHS["80"].ptx_tc:
                fallback = f"; it uses {res.mma_sync_ptx} mma.sync instead (warp-level MMAv2 fallback)"
            res.failures.append(
                f"gemm=True but no tensor-core instructions ({arch.ptx_tc} in PTX: {res.tc_ptx}, "
                f"{arch.sass_tc} in SASS: {res.tc_sass}){fallback}"
            )
    res.ok = not res.failures


# ------------------------------------------------------------------------------------------------------ driver


def _worker_init(cache_dir: str) -> None:
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the runtime default; silences Triton 3.9's notice


def _job(module: str, index: int, arch_name: str, d: int) -> Result:
    try:
        spec = module_specs(module, d)[index]
    except Exception as exc:  # the specs changed between listing and compiling: report, do not crash the run
        err = f"{type(exc).__name__}: {exc}"
        return Result(module, f"#{index}", ARCHS[arch_name].sm, failures=[f"spec unavailable: {err}"], error=err)
    return compile_spec(module, spec, ARCHS[arch_name])


def run_checks(
    modules: tuple[str, ...] | list[str] = KERNEL_MODULES,
    archs: tuple[str, ...] | list[str] = DEFAULT_ARCHS,
    d: int = 4096,
    jobs: int | None = None,
    progress: bool = True,
    kernels: list[str] | None = None,
) -> Report:
    """Compile every spec of ``modules`` for every arch in this process (which must not run the interpreter).

    ``kernels``: optional shell patterns on spec names (``"info_nce_fwd*"``); default all. ``jobs`` compiler
    processes run in parallel (default: the CPU count).
    """
    if interpreter_enabled():
        raise RuntimeError("TRITON_INTERPRET is set: use run_in_subprocess(), or unset it before importing kernels")
    arch_list = [parse_arch(a) for a in archs]
    report = Report(archs=[a.sm for a in arch_list], d=d, tools=tool_versions())
    work: list[tuple[str, int, str]] = []
    for module in modules:
        try:
            specs = module_specs(module, d)
        except Exception as exc:
            report.module_errors[module] = f"{type(exc).__name__}: {exc}"
            continue
        report.module_specs[module] = [s.name for s in specs]
        report.uncovered[module] = uncovered_kernels(module, specs)
        chosen = [i for i, s in enumerate(specs) if not kernels or any(fnmatch.fnmatch(s.name, k) for k in kernels)]
        work += [(module, i, a.name) for i in chosen for a in arch_list]

    jobs = max(1, min(jobs or os.cpu_count() or 1, len(work) or 1))
    results: list[Result | None] = [None] * len(work)
    cache_dir = tempfile.mkdtemp(prefix="alignx-aot-")
    try:
        if jobs == 1:
            _worker_init(cache_dir)
            bar = _progress(len(work), progress)
            for n, job in enumerate(work):
                results[n] = _job(*job, d)
                bar.update()
        else:
            import multiprocessing as mp

            ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init, initargs=(cache_dir,)) as pool:
                futures = {pool.submit(_job, *job, d): n for n, job in enumerate(work)}
                bar = _progress(len(work), progress)  # after the workers are forked: no tqdm thread in them
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update()
        bar.close()
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    report.results = [r for r in results if r is not None]
    return report


def _progress(total: int, enabled: bool) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency of the package
        enabled = False
    if not enabled:

        class _Null:
            def update(self, n: int = 1) -> None: ...

            def close(self) -> None: ...

        return _Null()
    return tqdm(total=total, desc="AOT compile", unit="kernel", file=sys.stderr)


def clean_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) without ``TRITON_INTERPRET``, for a process that compiles for a GPU."""
    env = dict(os.environ if env is None else env)
    env.pop("TRITON_INTERPRET", None)
    return env


def run_in_subprocess(
    modules: tuple[str, ...] | list[str] = KERNEL_MODULES,
    archs: tuple[str, ...] | list[str] = DEFAULT_ARCHS,
    d: int = 4096,
    jobs: int | None = None,
    timeout: float = 600.0,
    kernels: list[str] | None = None,
) -> tuple[Report, subprocess.CompletedProcess]:
    """Run the checker in a fresh Python process without ``TRITON_INTERPRET`` and parse its JSON report."""
    cmd = [sys.executable, "-m", _SELF, "--json", "--d", str(d), "--arch", *archs, "--modules", *modules]
    if jobs:
        cmd += ["--jobs", str(jobs)]
    if kernels:
        cmd += ["--kernels", *kernels]
    proc = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    try:
        data = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise RuntimeError(
            f"AOT checker produced no JSON (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        ) from exc
    return Report.from_json(data), proc


# ------------------------------------------------------------------------------------------------------ output


def format_table(report: Report) -> str:
    """A fixed-width table: one row per kernel x arch, then the module errors and a one-line verdict."""
    head = ("module", "kernel", "arch", "warps/stages", "regs", "spill st/ld B", "smem KiB / limit", "TC ptx/sass")
    head += ("compile s", "status")
    rows = [head]
    for r in report.results:
        smem = "-" if r.smem_total is None else f"{r.smem_total / KIB:.1f} / {r.smem_limit / KIB:.0f}"
        tc = "-" if r.tc_ptx is None else f"{r.tc_ptx} / {'-' if r.tc_sass is None else r.tc_sass}"
        if r.mma_sync_ptx and r.mma_sync_ptx != r.tc_ptx:
            tc += f" (+{r.mma_sync_ptx} mma.sync)"
        tc += " gemm" if r.gemm else ""
        spills = "-" if r.spill_stores is None else f"{r.spill_stores} / {r.spill_loads}"
        status = "ok" if r.ok else "FAIL: " + "; ".join(r.failures)
        rows.append(
            (r.module, r.kernel, r.arch, f"{r.num_warps}/{r.num_stages}", str(r.regs if r.regs is not None else "-"))
            + (spills, smem, tc, f"{r.compile_s:.2f}", status)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    for module, err in report.module_errors.items():
        lines.append(f"MODULE FAIL {module}: {err}")
    for module in report.module_specs:
        vague = sorted(
            {r.kernel for r in report.results if r.module == module and r.specialization.get("no_launch_value")}
        )
        if vague:
            lines.append(
                f"note {module}: integer arguments without a launch value in extra['int_args'] (compiled "
                f"unspecialised, not as the JIT would at d={report.d}) in {', '.join(vague)}"
            )
    for module, names in report.uncovered.items():
        if names:
            lines.append(f"MODULE FAIL {module}: kernels without an AOT spec: {', '.join(names)}")
    failed = sum(not r.ok for r in report.results) + len(report.module_errors)
    failed += sum(bool(names) for names in report.uncovered.values())
    tools = ", ".join(f"{k} {v}" for k, v in report.tools.items())
    lines.append(f"{len(report.results)} compilations (d={report.d}), {failed} failure(s). Tools: {tools}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: compile, print the table (or JSON), exit 1 on any failure."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m alignx.kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=list(DEFAULT_ARCHS), help=f"targets, from {sorted(ARCHS)}")
    parser.add_argument("--d", type=int, default=4096, help="hidden size passed to aot_specs(d)")
    parser.add_argument("--modules", nargs="+", default=list(KERNEL_MODULES), help="kernel modules or .py files")
    parser.add_argument("--kernels", nargs="+", default=None, help="only specs whose name matches these patterns")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiler processes (default: CPU count)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    args = parser.parse_args(argv)
    for a in args.arch:
        try:
            parse_arch(a)
        except ValueError as exc:
            parser.error(str(exc))
    if args.d <= 0:
        parser.error(f"--d must be positive, got {args.d}")
    if interpreter_enabled():  # @triton.jit already gave InterpretedFunctions: start again without the interpreter
        os.execve(sys.executable, [sys.executable, "-m", _SELF, *argv], clean_env())
    report = run_checks(args.modules, args.arch, args.d, args.jobs, progress=True, kernels=args.kernels)
    print(json.dumps(report.to_json(), indent=1) if args.json else format_table(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
