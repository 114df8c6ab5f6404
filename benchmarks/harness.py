"""The shared benchmark harness: providers, modes, timing, the job runner and the command line of every op script.

Vocabulary:

- A :class:`Bench` is one op (``span_pool``, ``info_nce``, ...): how to build its inputs for a :class:`Shape`, its
  :class:`Provider` s (implementations of the *same* function), the work per call (bytes, FLOPs or pairs) and the
  roofline it is compared with.
- Modes: ``fwd`` (forward with autograd recording, as in training), ``bwd`` (backward of a recorded forward, with
  ``retain_graph``) and ``full`` (forward + backward). A non-scalar output is back-propagated with one seeded
  random upstream gradient, the same for every provider.
- Time (:func:`time_callable`): median with the 20th and 80th percentiles. CUDA: ``triton.testing.do_bench``. CPU:
  ``torch.utils.benchmark.Timer.blocked_autorange`` (its warm-up, block size and samples) for calls that fit the
  budget many times over; for longer calls a bounded rule Timer does not have, because its warm-up and blocks
  would multiply a call of seconds: a timed warm-up, then ``min_reps`` to ``max_reps`` samples within the budget; a
  first call longer than ``SLOW_S`` counts as a sample, one longer than ``VERY_SLOW_S`` is the only one.
  ``torch.compile`` providers always get an uncounted warm-up (it compiles). The sample count is recorded.
- Memory (:mod:`benchmarks.memory`), measured apart from time, in a fresh process on CPU.
- Roofline: a GEMM and a copy timed in the same run on the same device.
- Claims (:mod:`benchmarks.claims`): the targets, one table, checked on the rows of the run.

Every (shape, provider) runs as a *job*; jobs of heavy providers (``torch.compile``, or a provider whose estimated
memory is large) run in a subprocess with a time limit, so that a compile that does not finish, or an allocation
the machine cannot hold, is recorded as skipped / out of memory instead of stopping the run. The first provider of a
shape that succeeds is the *base*: its output and gradients are saved and every other provider's are compared with
them (``max_rel_err`` = the largest ``max|x - base| / max|base|`` over the output and the gradients).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import os
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.benchmark import Measurement, Timer

from .claims import append_verdicts, evaluate, print_verdicts
from .memory import available_bytes, cpu_extra_memory, cuda_extra_memory, is_oom, run_subprocess_job, short_error
from .results import RESULTS_DIR, Row, RunInfo, append_csv, run_info, say

MODES = ("fwd", "bwd", "full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

SLOW_S = 1.0
VERY_SLOW_S = 15.0


# ----------------------------------------------------------------------------------------------------------------
# What is benchmarked


@dataclass(frozen=True)
class Shape:
    """One input size of a bench: ``name`` (shown in tables), ``params`` (JSON-serialisable, read by the bench's
    builder), the modes timed, the modes whose memory is measured, and ``tags`` naming the claims checked on it."""

    name: str
    params: dict[str, Any]
    modes: tuple[str, ...] = MODES
    memory_modes: tuple[str, ...] = ("full",)
    tags: tuple[str, ...] = ()


@dataclass
class SkipContext:
    """What a provider may look at to decide that it cannot run: the device, the shape's parameters, and the bytes
    of memory available now (``MemAvailable`` on CPU, the device's total memory on CUDA)."""

    device: str
    params: dict[str, Any]
    available_bytes: int


@dataclass
class Provider:
    """One implementation of a bench's function.

    ``impl(inputs, params) -> Tensor`` returns the differentiable output (a scalar loss or a tensor). ``compile``
    wraps ``impl`` in ``torch.compile`` (runs isolated, with a time limit). ``requires`` names modules that must be
    importable (public anchors that may not be installed); ``cuda_only`` marks Triton/CUDA-only providers.
    ``skip(ctx)`` returns a reason not to run at this shape (e.g. an estimated allocation larger than the machine), or
    None. ``heavy(ctx)`` asks for an isolated subprocess (a large allocation must not kill the run).
    """

    name: str
    impl: Callable[[dict[str, torch.Tensor], dict[str, Any]], torch.Tensor]
    description: str
    compile: bool = False
    requires: tuple[str, ...] = ()
    install_hint: str = ""
    cuda_only: bool = False
    skip: Callable[[SkipContext], str | None] | None = None
    heavy: Callable[[SkipContext], bool] | None = None

    def skip_reason(self, ctx: SkipContext) -> str | None:
        for module in self.requires:
            if importlib.util.find_spec(module) is None:
                hint = f" ({self.install_hint})" if self.install_hint else ""
                return f"{module} is not installed{hint}"
        if self.cuda_only and ctx.device != "cuda":
            return "Triton/CUDA kernels: needs a CUDA device (the Triton CPU interpreter is a test tool, not a bench)"
        return self.skip(ctx) if self.skip is not None else None

    def is_heavy(self, ctx: SkipContext) -> bool:
        return self.compile or (self.heavy is not None and self.heavy(ctx))

    def callable(self) -> Callable[[dict[str, torch.Tensor], dict[str, Any]], torch.Tensor]:
        if not self.compile:
            return self.impl
        # Buffer donation forbids backward(retain_graph=True), which the bwd mode needs (it re-runs one backward).
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False
        return torch.compile(self.impl, dynamic=False)


@dataclass
class Bench:
    """One op: inputs, providers, work per call and its unit, the roofline it is compared with.

    ``build(params, device) -> dict`` returns the inputs (tensors with ``requires_grad`` set on the ones that get
    gradients, plus any other values), seeded so that every provider sees the same data. ``work(params, mode)`` is
    the amount behind the rate: bytes (unit ``GB/s``, scale 1e9), FLOPs (``TFLOP/s``, 1e12) or pairs (``Mpairs/s``,
    1e6). ``roofline`` is ``"gemm"``, ``"copy"`` or None. ``tiny`` is a shape small enough for warm-ups and tests.
    ``units``: the sizes (MiB, from the shape's parameters) that claims measure memory in (``unit:<name>``).
    """

    name: str
    module: str
    build: Callable[[dict[str, Any], str], dict[str, Any]]
    providers: list[Provider]
    work: Callable[[dict[str, Any], str], float]
    unit: str
    scale: float
    roofline: str | None
    tiny: Shape
    units: dict[str, Callable[[dict[str, Any]], float]] = field(default_factory=dict)

    def provider(self, name: str) -> Provider:
        for p in self.providers:
            if p.name == name:
                return p
        raise KeyError(f"bench {self.name!r} has no provider {name!r} (have {[p.name for p in self.providers]})")


# ----------------------------------------------------------------------------------------------------------------
# Timing


@dataclass
class Timing:
    """Median, 20th and 80th percentile in milliseconds over ``n`` samples (``n = 0``: do_bench chose)."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    n: int

    @classmethod
    def of(cls, m: Measurement) -> Timing:
        """A ``torch.utils.benchmark`` measurement: its samples are blocks of ``number_per_run`` calls (per call)."""
        return quantiles([t * 1e3 for t in m.times])


def quantiles(samples_ms: Sequence[float]) -> Timing:
    """Median, p20 and p80 of ``samples_ms`` (``torch.quantile``'s linear interpolation, as ``Measurement`` does)."""
    if not samples_ms:
        raise ValueError("quantiles needs at least one sample")
    q = torch.tensor(samples_ms, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return Timing(*q.tolist(), len(samples_ms))


@dataclass
class TimingPolicy:
    """CPU repetition policy: a ``budget_s`` of time; calls that fit it more than ``max_reps`` times go to
    ``Timer.blocked_autorange(min_run_time=budget_s)``, longer ones get ``min_reps`` to ``max_reps`` samples."""

    min_reps: int = 3
    max_reps: int = 25
    budget_s: float = 2.0


def seconds(fn: Callable[[], Any]) -> float:
    """Wall time of one call (the timed warm-up, and one call of an interleaved round)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_callable(
    fn: Callable[[], Any],
    device: str,
    *,
    policy: TimingPolicy | None = None,
    force_warmup: bool = False,
    grad_to_none: Sequence[torch.Tensor] | None = None,
) -> Timing:
    """Time ``fn``: ``do_bench`` on CUDA, ``Timer.blocked_autorange`` or the bounded rule on CPU (module docstring)."""
    if device == "cuda":
        from triton.testing import do_bench

        med, p20, p80 = do_bench(fn, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
        return Timing(float(med), float(p20), float(p80), 0)
    policy = policy or TimingPolicy()
    first = seconds(fn)
    if first * policy.max_reps < policy.budget_s:
        timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        return Timing.of(timer.blocked_autorange(min_run_time=policy.budget_s))
    samples: list[float] = []
    min_reps = policy.min_reps
    if not force_warmup and first >= SLOW_S:
        samples.append(first * 1e3)
        min_reps = 1 if first >= VERY_SLOW_S else 2
    start = time.perf_counter()
    while len(samples) < policy.max_reps and (len(samples) < min_reps or time.perf_counter() - start < policy.budget_s):
        samples.append(seconds(fn) * 1e3)
    return quantiles(samples)


def interleaved(cases: dict[str, Callable[[], Any]], rounds: int) -> dict[str, Timing]:
    """One warm-up call each, then ``rounds`` rounds of one call per case, the cases alternating, so that a change
    of machine load hits all of them alike (side by side; ``torch.utils.benchmark`` times one statement at a time)."""
    for fn in cases.values():
        fn()
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for k, fn in cases.items():
            samples[k].append(seconds(fn) * 1e3)
    return {k: quantiles(v) for k, v in samples.items()}


# ----------------------------------------------------------------------------------------------------------------
# Modes


def leaves_of(inputs: dict[str, Any]) -> list[torch.Tensor]:
    """The input tensors that receive gradients."""
    return [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]


def upstream_grad(out: torch.Tensor) -> torch.Tensor | None:
    """The upstream gradient of an output: None for a scalar (i.e. 1), else a seeded N(0, 1) tensor in the output's
    dtype, identical for every provider of the same shape."""
    if out.dim() == 0:
        return None
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1234), dtype=torch.float32)
    return g.to(device=out.device, dtype=out.dtype)


class Runner:
    """Closures for the three modes over one provider and one set of inputs.

    ``full()`` clears the leaves' gradients, runs forward and backward, and keeps the last output (``last``) so that
    the output and the gradients of the final timed call can be compared between providers without an extra call.
    """

    def __init__(self, fn: Callable[[dict, dict], torch.Tensor], inputs: dict[str, Any], params: dict[str, Any]):
        self.fn, self.inputs, self.params = fn, inputs, params
        self.leaves = leaves_of(inputs)
        self.last: torch.Tensor | None = None
        self._grad: dict[tuple, torch.Tensor | None] = {}

    def _g(self, out: torch.Tensor) -> torch.Tensor | None:
        key = (tuple(out.shape), out.dtype, str(out.device))
        if key not in self._grad:
            self._grad[key] = upstream_grad(out)
        return self._grad[key]

    def clear_grads(self) -> None:
        for t in self.leaves:
            t.grad = None

    def fwd(self) -> torch.Tensor:
        return self.fn(self.inputs, self.params)

    def full(self) -> None:
        self.clear_grads()
        out = self.fn(self.inputs, self.params)
        out.backward(self._g(out))
        self.last = out.detach()

    def bwd_closure(self) -> Callable[[], None]:
        """Run the forward once (untimed) and return a closure that back-propagates it again (retain_graph)."""
        out = self.fn(self.inputs, self.params)
        g = self._g(out)

        def bwd() -> None:
            self.clear_grads()
            out.backward(g, retain_graph=True)

        return bwd

    def outputs(self) -> list[torch.Tensor]:
        """The last full call's output and the leaves' gradients (fp32, on CPU), for comparison."""
        if self.last is None:
            raise RuntimeError("outputs() needs a full() call first")
        outs = [self.last.float().cpu()]
        outs += [(t.grad if t.grad is not None else torch.zeros_like(t)).float().cpu() for t in self.leaves]
        return outs


def max_rel_err(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    """``max_i max|got_i - want_i| / max|want_i|`` over paired tensors (shapes must match)."""
    if len(got) != len(want):
        raise ValueError(f"cannot compare {len(got)} tensors with {len(want)}")
    worst = 0.0
    for g, w in zip(got, want):
        if g.shape != w.shape:
            raise ValueError(f"shape mismatch {tuple(g.shape)} vs {tuple(w.shape)}")
        denom = max(float(w.abs().max()) if w.numel() else 0.0, 1e-30)
        diff = float((g - w).abs().max()) if w.numel() else 0.0
        worst = max(worst, diff / denom)
    return worst


# ----------------------------------------------------------------------------------------------------------------
# Jobs (in this process or in a fresh subprocess)


def load_bench(module: str) -> Bench:
    return importlib.import_module(module).BENCH


def _set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def time_job(
    bench_module: str,
    params: dict[str, Any],
    provider: str,
    device: str,
    threads: int,
    modes: Sequence[str],
    ref_file: str,
    is_base: bool,
    policy: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Time one provider at one shape in every mode; save (base) or compare the outputs and gradients.

    Returns ``{"status": "ok", "modes": {mode: Timing-dict}, "err": float | None}``, or ``{"status": "oom" |
    "error", "note": ...}``.
    """
    _set_threads(threads)
    bench = load_bench(bench_module)
    prov = bench.provider(provider)
    pol = TimingPolicy(**(policy or {}))
    try:
        fn = prov.callable()
        inputs = bench.build(params, device)
        runner = Runner(fn, inputs, params)
        timings: dict[str, Any] = {}
        for mode in ("full",) + tuple(m for m in modes if m != "full"):
            if mode == "full":
                t = time_callable(runner.full, device, policy=pol, force_warmup=prov.compile, grad_to_none=None)
                outs = runner.outputs()
                err = None
                if is_base:
                    torch.save(outs, ref_file)
                elif os.path.exists(ref_file):
                    err = max_rel_err(outs, torch.load(ref_file))
                del outs
            elif mode == "fwd":
                with torch.enable_grad():
                    t = time_callable(runner.fwd, device, policy=pol, force_warmup=prov.compile)
            elif mode == "bwd":
                runner.clear_grads()
                bwd = runner.bwd_closure()
                t = time_callable(bwd, device, policy=pol, force_warmup=prov.compile, grad_to_none=runner.leaves)
                del bwd
            else:
                raise ValueError(f"unknown mode {mode!r} (choose from {MODES})")
            if mode in modes:
                timings[mode] = asdict(t)
        return {"status": "ok", "modes": timings, "err": err}
    except Exception as e:  # recorded, never silently dropped: the row carries the message
        if is_oom(e):
            return {"status": "oom", "note": short_error(e)}
        return {"status": "error", "note": short_error(e), "trace": traceback.format_exc(limit=4)}


def memory_job(
    bench_module: str, params: dict[str, Any], provider: str, device: str, threads: int, mode: str
) -> dict[str, Any]:
    """Extra memory of one call of ``provider`` in ``mode`` at ``params`` (run in a fresh process on CPU)."""
    _set_threads(threads)
    bench = load_bench(bench_module)
    prov = bench.provider(provider)
    try:
        fn = prov.callable()
        # Warm-up on a tiny shape (library initialisation), or at the real shape for torch.compile (compilation).
        warm = params if prov.compile else bench.tiny.params
        w = Runner(fn, bench.build(warm, device), warm)
        w.full()
        del w
        gc.collect()
        inputs = bench.build(params, device)
        runner = Runner(fn, inputs, params)
        measure = cpu_extra_memory if device == "cpu" else cuda_extra_memory
        if mode == "full":
            extra, method = measure(runner.full, runner.leaves)
        elif mode == "fwd":
            extra, method = measure(runner.fwd, runner.leaves)
        elif mode == "bwd":
            bwd = runner.bwd_closure()
            extra, method = measure(bwd, runner.leaves)
        else:
            raise ValueError(f"unknown mode {mode!r}")
        if extra < 0 and method.startswith("unavailable"):
            return {"status": "error", "note": method}
        return {"status": "ok", "bytes": int(extra), "method": method}
    except Exception as e:
        if is_oom(e):
            return {"status": "oom", "note": short_error(e)}
        return {"status": "error", "note": short_error(e), "trace": traceback.format_exc(limit=4)}


# ----------------------------------------------------------------------------------------------------------------
# Roofline


def _copy_bytes(n_bytes: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    n = n_bytes // 4
    return torch.empty(n, device=device).fill_(1.0), torch.empty(n, device=device)


def measure_roofline(
    device: str, dtypes: Iterable[str], policy: TimingPolicy | None = None, *, small: bool = False
) -> dict[str, float]:
    """The machine's measured ceilings, timed now: ``gemm-<dtype>`` (TFLOP/s of an n x n x n matmul; n = 2048 on
    CPU, 8192 on CUDA) and ``copy`` (GB/s of a ``copy_`` counting read + write; 256 MiB on CPU, 2 GiB on CUDA).
    ``small`` shrinks both for smoke tests (n = 256, 8 MiB)."""
    out: dict[str, float] = {}
    n = 8192 if device == "cuda" else (256 if small else 2048)
    for dt in sorted(set(dtypes)):
        a = torch.randn(n, n, device=device).to(DTYPES[dt])
        b = torch.randn(n, n, device=device).to(DTYPES[dt])
        t = time_callable(partial(torch.matmul, a, b), device, policy=policy, force_warmup=True)
        out[f"gemm-{dt}"] = 2 * n**3 / (t.median_ms * 1e-3) / 1e12
    nbytes = (2 << 30) if device == "cuda" else ((8 << 20) if small else (256 << 20))
    src, dst = _copy_bytes(nbytes, device)
    t = time_callable(partial(dst.copy_, src), device, policy=policy, force_warmup=True)
    out["copy"] = 2 * nbytes / (t.median_ms * 1e-3) / 1e9
    return out


# ----------------------------------------------------------------------------------------------------------------
# Orchestration of one bench


@dataclass
class BenchOptions:
    """Knobs shared by every bench script (see :func:`add_common_args`)."""

    device: str = "cpu"
    threads: int = 2
    out_dir: Path = RESULTS_DIR
    run_id: str | None = None
    memory: bool = True
    providers: tuple[str, ...] = ()
    tiny: bool = False
    quick: bool = False
    skip_compile: bool = False
    compile_timeout: float = 600.0
    job_timeout: float = 1800.0
    write_csv: bool = True
    policy: TimingPolicy = field(default_factory=TimingPolicy)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (0 = torch's default)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where <device>.csv is appended")
    parser.add_argument("--run-id", default=None, help="tag shared by the rows of one benchmarks.run")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    parser.add_argument("--providers", default="", help="comma-separated provider names to run (default all)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes only (smoke test of the scripts)")
    parser.add_argument("--quick", action="store_true", help="one shape per op: those tagged 'quick', else the first")
    parser.add_argument("--skip-compile", action="store_true", help="report torch.compile providers as skipped")
    parser.add_argument("--compile-timeout", type=float, default=600.0, help="seconds for a torch.compile job")
    parser.add_argument("--job-timeout", type=float, default=1800.0, help="seconds for any other isolated job")
    parser.add_argument("--no-csv", action="store_true", help="print only, append nothing to the results")


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    return BenchOptions(
        device=args.device,
        threads=args.threads,
        out_dir=args.out_dir,
        run_id=args.run_id,
        memory=not args.no_memory,
        providers=tuple(p for p in args.providers.split(",") if p),
        tiny=args.tiny,
        quick=args.quick,
        skip_compile=args.skip_compile,
        compile_timeout=args.compile_timeout,
        job_timeout=args.job_timeout,
        write_csv=not args.no_csv,
        policy=TimingPolicy(budget_s=0.02, min_reps=2, max_reps=5) if args.tiny else TimingPolicy(),
    )


def run_bench(bench: Bench, shapes: Sequence[Shape], opts: BenchOptions, info: RunInfo) -> list[Row]:
    """Every provider of ``bench`` at every shape: timing rows (one per mode), memory, errors against the base,
    rates and roofline fractions, plus the roofline rows themselves. Rows are appended to the CSV as they come."""
    from tqdm import tqdm

    csv_path = opts.out_dir / f"{opts.device}.csv"
    rows: list[Row] = []

    def emit(new: list[Row]) -> None:
        rows.extend(new)
        if opts.write_csv:
            append_csv(csv_path, new)

    dtypes = {s.params.get("dtype", "fp32") for s in shapes}
    gemm_dtypes = dtypes if bench.roofline == "gemm" else ()
    roof = measure_roofline(opts.device, gemm_dtypes, policy=opts.policy, small=opts.tiny)
    roof_rows = []
    for key, value in roof.items():
        unit = "GB/s" if key == "copy" else "TFLOP/s"
        roof_rows.append(info.row(bench=bench.name, shape="roofline", provider=key, mode="-", status="ok",
                                  metric=value, unit=unit, note="measured in this run"))  # fmt: skip
        say(f"[{bench.name}] roofline {key}: {value:.3g} {unit}")
    emit(roof_rows)

    wanted = [p for p in bench.providers if not opts.providers or p.name in opts.providers]
    cases = [(s, p) for s in shapes for p in wanted]
    bar = tqdm(total=len(cases), desc=bench.name, unit="case", file=sys.stderr, dynamic_ncols=True, disable=None)
    with tempfile.TemporaryDirectory(prefix=f"alignx-bench-{bench.name}-") as tmp:
        base: dict[str, str] = {}
        for shape, prov in cases:
            bar.set_postfix_str(f"{shape.name} | {prov.name}")
            emit(_run_case(bench, shape, prov, opts, info, roof, Path(tmp), base))
            bar.update(1)
    bar.close()
    return rows


def _run_case(
    bench: Bench,
    shape: Shape,
    prov: Provider,
    opts: BenchOptions,
    info: RunInfo,
    roof: dict[str, float],
    tmp: Path,
    base: dict[str, str],
) -> list[Row]:
    ctx = SkipContext(opts.device, shape.params, available_bytes(opts.device))
    reason = prov.skip_reason(ctx)
    if reason is None and prov.compile and opts.skip_compile:
        reason = "torch.compile providers switched off (--skip-compile)"
    common = dict(bench=bench.name, shape=shape.name, provider=prov.name)
    if reason is not None:
        say(f"[{bench.name}] {shape.name} | {prov.name}: skipped ({reason})")
        return [info.row(**common, mode=m, status="skipped", note=reason) for m in shape.modes]

    ref_file = str(tmp / (re.sub(r"[^A-Za-z0-9]+", "_", shape.name) + ".pt"))
    is_base = shape.name not in base
    kwargs = dict(bench_module=bench.module, params=shape.params, provider=prov.name, device=opts.device,
                  threads=opts.threads, modes=list(shape.modes), ref_file=ref_file, is_base=is_base,
                  policy=asdict(opts.policy))  # fmt: skip
    if prov.is_heavy(ctx):
        timeout = opts.compile_timeout if prov.compile else opts.job_timeout
        res = run_subprocess_job("benchmarks.harness", "time_job", kwargs, timeout=timeout, memory_env=False,
                                 threads=opts.threads)  # fmt: skip
        if res["status"] == "timeout" and prov.compile:
            res["status"], res["note"] = "skipped", f"torch.compile job {res['note']} (bounded time)"
    else:
        res = time_job(**kwargs)
        gc.collect()
    if res["status"] != "ok":
        note = res.get("note", "")
        say(f"[{bench.name}] {shape.name} | {prov.name}: {res['status']} ({note})")
        if res.get("trace"):
            say(res["trace"])
        return [info.row(**common, mode=m, status=res["status"], note=note) for m in shape.modes]
    if is_base:
        base[shape.name] = prov.name
    rows = [_timed_row(bench, shape, prov.name, mode, res, roof, info, base) for mode in shape.modes]
    for row in rows:
        if opts.memory and row.mode in shape.memory_modes:
            _add_memory(row, bench, shape, prov, opts, ctx)
        say(_describe(row))
    return rows


def _timed_row(
    bench: Bench,
    shape: Shape,
    prov: str,
    mode: str,
    res: dict[str, Any],
    roof: dict[str, float],
    info: RunInfo,
    base: dict[str, str],
) -> Row:
    """The row of one mode of a timed job: time, rate, roofline fraction, and (full mode) the error vs the base."""
    t = Timing(**res["modes"][mode])
    work = bench.work(shape.params, mode)
    metric = work / (t.median_ms * 1e-3) / bench.scale if work else None
    frac = None
    if metric is not None and bench.roofline == "gemm":
        frac = metric / roof[f"gemm-{shape.params.get('dtype', 'fp32')}"]
    elif metric is not None and bench.roofline == "copy":
        frac = metric * bench.scale / 1e9 / roof["copy"]
    is_base = base[shape.name] == prov
    note = "" if is_base or mode != "full" else f"err vs {base[shape.name]}"
    return info.row(bench=bench.name, shape=shape.name, provider=prov, mode=mode, status="ok", time_ms=t.median_ms,
                    p20_ms=t.p20_ms, p80_ms=t.p80_ms, reps=t.n, metric=metric, unit=bench.unit, roofline_frac=frac,
                    max_rel_err=None if is_base or mode != "full" else res.get("err"), note=note)  # fmt: skip


def _add_memory(row: Row, bench: Bench, shape: Shape, prov: Provider, opts: BenchOptions, ctx: SkipContext) -> None:
    kwargs = dict(bench_module=bench.module, params=shape.params, provider=prov.name, device=opts.device,
                  threads=opts.threads, mode=row.mode)  # fmt: skip
    if opts.device == "cpu":
        timeout = opts.compile_timeout if prov.compile else opts.job_timeout
        res = run_subprocess_job("benchmarks.harness", "memory_job", kwargs, timeout=timeout, memory_env=True,
                                 threads=opts.threads)  # fmt: skip
    else:
        res = memory_job(**kwargs)
        gc.collect()
    if res["status"] == "ok":
        row.extra_mem_mb = res["bytes"] / 2**20
        row.mem_method = res["method"]
    else:
        row.mem_method = f"{res['status']}: {res.get('note', '')}"


def _describe(r: Row) -> str:
    parts = [f"[{r.bench}] {r.shape} | {r.provider} | {r.mode}: {r.time_ms:.4g} ms (p20 {r.p20_ms:.4g}, p80 "
             f"{r.p80_ms:.4g}, n={r.reps})"]  # fmt: skip
    if r.metric is not None:
        parts.append(f"{r.metric:.4g} {r.unit}")
    if r.roofline_frac is not None:
        parts.append(f"{100 * r.roofline_frac:.1f}% of roofline")
    if r.extra_mem_mb is not None:
        parts.append(f"extra mem {r.extra_mem_mb:.1f} MiB")
    elif r.mem_method:
        parts.append(f"memory: {r.mem_method}")
    if r.max_rel_err is not None:
        parts.append(f"max rel err {r.max_rel_err:.2e}")
    parts.append(f"load {r.load1}")
    return "  ".join(parts)


def quick_shapes(shapes: Sequence[Shape]) -> list[Shape]:
    """The short sweep (``--quick``, ``make gpu-check``): the shapes tagged ``quick``, else the first one."""
    return [s for s in shapes if "quick" in s.tags] or list(shapes[:1])


def seeded(seed: int) -> torch.Generator:
    """A CPU generator with a fixed seed (inputs are drawn on CPU, then moved: identical on every device)."""
    return torch.Generator().manual_seed(seed)


def bench_main(
    bench: Bench, shapes_for: Callable[[str], list[Shape]], argv: Sequence[str] | None, description: str
) -> int:
    """The command line of every op script: parse the common options, run, check the bench's claims
    (:data:`benchmarks.claims.CLAIMS`) on the rows, print and append the verdicts."""
    parser = argparse.ArgumentParser(description=description)
    add_common_args(parser)
    args = parser.parse_args(argv)
    opts = options_from_args(args)
    _set_threads(opts.threads)
    info = run_info(opts.device, opts.threads, opts.run_id)
    shapes = [bench.tiny] if opts.tiny else shapes_for(opts.device)
    if opts.quick and not opts.tiny:
        shapes = quick_shapes(shapes)
    say(f"== {bench.name} on {info.device_name}, torch {info.torch}, {opts.threads} threads, commit {info.commit}, "
        f"load average {os.getloadavg()[0]:.2f} ==")  # fmt: skip
    rows = run_bench(bench, shapes, opts, info)
    verdicts = evaluate(bench.name, rows, shapes, opts.device, units=bench.units)
    print_verdicts(bench.name, verdicts)
    append_verdicts(opts, info, verdicts)
    return 0
