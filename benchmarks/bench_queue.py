"""The negatives queue at scale: InfoNCE against 10^5 queued negatives at D = 576, alone and inside a training step.

What is measured (CPU; every number carries the machine's load average). Times: medians with p20/p80 of
``--rounds`` calls after a warm-up, the cases alternating round by round. Memory: in a fresh child process with
``MALLOC_MMAP_THRESHOLD_=65536`` (the CPU method of :mod:`benchmarks.memory`, ``clear_refs``/``VmHWM``), never in the
timed process (that setting turns every large allocation into page faults and would distort the times).

1. ``contrastive``: the contrastive term of ``objective.negatives = "global+queue"``
   (:meth:`alignx.objective.AlignXObjective._global_contrastive`, InfoNCE through ``alignx.kernels.info_nce``) for
   ``--anchors`` anchors against ``anchors + queue`` candidates, forward + backward; the same term without a queue
   (``global``) for comparison. Its *extra* memory (peak beyond what existed before the call, minus the gradients
   it leaves in the anchors) is checked against the stated bound::

       persistent (between steps):  (H + C) * D * s + 16 C     queue rows in the training dtype (s bytes), the live
                                                               room H >= the micro-step's rows, language + step ids
       extra per step (bound):      N * D * s + chunk + 16 MiB  the kernel's candidate gradient [N, D] in the
                                                               candidates' dtype (the queue's rows are zeros), one
                                                               similarity chunk (64 MiB), slack for [B, D]-sized
                                                               temporaries; N = B + C (s = 4 here: fp32 on CPU)

   The queue itself is never copied: the candidates are a view ``[live; queue]`` of its buffer.
2. ``step``: one forward + backward of :class:`alignx.model.AlignXModel` on a SmolLM2-135M-shaped Llama (D = 576,
   30 layers, vocabulary 49,152; random weights built from the config, offline) with the same queue, against the
   same step without a queue: the queue's share of the step time and of its extra memory.

Results are printed and appended to ``benchmarks/results/queue_cpu.csv``; the exit code is 1 when the memory
bound is missed.

Run: ``python -m benchmarks.bench_queue`` (``--tiny`` for a smoke run, ``--help`` for the options).
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .claims import evaluate
from .harness import interleaved
from .memory import MMAP_THRESHOLD, RESULT_TAG, cpu_extra_memory
from .results import REPO, RESULTS_DIR, Row, run_info, say

MiB = 1 << 20
CHUNK_BYTES = 64 * MiB  # alignx.kernels.info_nce's default similarity chunk
SLACK_BYTES = 16 * MiB
SMOLLM2_135M = {  # SmolLM2-135M's architecture (Llama), as in its config.json
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}
CSV_FIELDS = [
    "run_id", "date", "commit", "device", "device_name", "torch", "threads", "load1", "measure", "queue", "dim",
    "anchors", "median_ms", "p20_ms", "p80_ms", "extra_bytes", "bound_bytes", "verdict", "note",
]  # fmt: skip


def _objective(queue: int, dim: int, anchors: int, symmetric: bool = False):
    """A ``global+queue`` objective (or ``global`` when ``queue = 0``) with a full queue of random unit rows."""
    from alignx.config import load_config
    from alignx.objective import AlignXObjective

    over = {"objective.negatives": "global+queue" if queue else "global", "objective.kernel_backend": "torch"}
    if queue:
        over["objective.queue_size"] = queue
    over["objective.symmetric"] = symmetric
    obj = AlignXObjective(load_config(None, over).objective)
    g = torch.Generator().manual_seed(0)
    for q in obj.queues.values():
        q.ensure(dim, torch.float32, torch.device("cpu"), live_rows=anchors)
        for start in range(0, queue, 65536):  # fill in blocks (bounded temporaries)
            rows = torch.nn.functional.normalize(torch.randn(min(65536, queue - start), dim, generator=g), dim=-1)
            q.stage(rows, torch.zeros(rows.shape[0], dtype=torch.long))
            q.commit(0)
    return obj


def contrastive_case(queue: int, dim: int, anchors: int) -> tuple[Callable[[], Any], list[torch.Tensor], Any]:
    """``(run_once, leaves, objective)``: forward + backward of the contrastive term, the queue kept as it is."""
    from alignx.dist import gather_sizes

    obj = _objective(queue, dim, anchors)
    g = torch.Generator().manual_seed(1)
    h_src = torch.randn(anchors, dim, generator=g).requires_grad_(True)
    h_tgt = torch.randn(anchors, dim, generator=g).requires_grad_(True)
    langs = torch.zeros(anchors, 2, dtype=torch.long)
    sizes = gather_sizes([anchors, 0])

    def run_once() -> float:
        loss = obj._global_contrastive(h_src, h_tgt, h_src, h_tgt, langs, sizes, torch.float32)
        loss.backward()
        for q in obj.queues.values():
            q.clear_pending()  # keep the queue as it is between repetitions
        return float(loss.detach())

    return run_once, [h_src, h_tgt], obj


def step_case(queue: int, spec: dict[str, Any], micro: int, seq: int) -> tuple[Callable[[], Any], list, Any]:
    """``(run_once, [], model)``: one AlignXModel forward + backward on a micro-batch of ``micro`` records."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from alignx.config import load_config
    from alignx.data import Collator
    from alignx.model import AlignXModel

    torch.manual_seed(0)
    config = LlamaConfig(**spec, max_position_embeddings=2048)
    lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    over = {
        "objective.negatives": "global+queue" if queue else "global",
        "objective.kernel_backend": "torch",
        "model.attn_implementation": "sdpa",
    }
    if queue:
        over["objective.queue_size"] = queue
    model = AlignXModel(lm, load_config(None, over)).train()
    dim = spec["hidden_size"]
    if queue:
        filled = _objective(queue, dim, micro)
        model.objective.queue = filled.queue  # pre-filled: the step sees a full queue
    g = torch.Generator().manual_seed(2)
    rows = []
    for b in range(micro):
        n = seq - 4 * b  # varied lengths
        src, tgt = n // 3, n // 3
        ids = torch.randint(4, spec["vocab_size"], (n,), generator=g).tolist()
        spans = [0] * (n - src - tgt - 2) + [1] * src + [0] + [2] * tgt + [0]
        rows.append({"input_ids": ids, "labels": ids, "span_ids": spans, "src_lang": b % 2, "tgt_lang": 2})
    batch = Collator(pad_token_id=0, padding_side="right")(rows)

    def run_once() -> float:
        out = model(**batch)
        out["loss"].backward()
        for q in model.objective.queues.values():
            q.clear_pending()
        return float(out["loss"].detach())

    return run_once, [], model


def _time(cases: dict[str, Callable[[], Any]], rounds: int) -> dict[str, dict[str, float]]:
    """Median / p20 / p80 of ``rounds`` calls of each case after one warm-up call each, the cases alternating round
    by round (a change of machine load hits all of them alike)."""
    timings = interleaved(cases, rounds)
    return {k: {"median_ms": t.median_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms} for k, t in timings.items()}


def _extra_memory(run_once: Callable[[], Any], fresh_grads: list[torch.Tensor]) -> int:
    """Extra resident memory of one call after a warm-up (:mod:`benchmarks.memory`'s method; needs
    ``MALLOC_MMAP_THRESHOLD_``). ``fresh_grads``: leaves whose gradient the call allocates (dropped first,
    subtracted); parameter gradients made by the warm-up are accumulated in place and count as existing memory."""
    run_once()
    for t in fresh_grads:
        t.grad = None
    gc.collect()
    return cpu_extra_memory(run_once, fresh_grads)[0]


def measure(args: argparse.Namespace, spec: dict[str, Any], *, memory: bool) -> dict[str, dict[str, Any]]:
    """Timings (``memory=False``) or extra memory (``memory=True``, one case alive at a time) of every case."""
    dim = spec["hidden_size"]
    out: dict[str, dict[str, Any]] = {}
    terms = {"contrastive+queue": args.queue, "contrastive": 0}
    steps = {} if args.no_step else {"step+queue": args.queue, "step": 0}
    if memory:
        for label, queue in terms.items():
            run_once, leaves, obj = contrastive_case(queue, dim, args.anchors)
            out[label] = {"extra_bytes": _extra_memory(run_once, leaves)}
            out[label]["persistent"] = sum(q.nbytes() for q in obj.queues.values())
            del run_once, leaves, obj
            gc.collect()
        for label, queue in steps.items():
            run_once, _, model = step_case(queue, spec, args.micro, args.seq)
            out[label] = {"extra_bytes": _extra_memory(run_once, [])}
            del run_once, model
            gc.collect()
        return out
    held = {}
    for label, queue in terms.items():
        run_once, _, obj = contrastive_case(queue, dim, args.anchors)
        held[label] = obj
        out[label] = {"persistent": sum(q.nbytes() for q in obj.queues.values())}
        out[label].update(_time({label: run_once}, args.rounds)[label])
    if steps:
        cases = {label: step_case(queue, spec, args.micro, args.seq)[0] for label, queue in steps.items()}
        for label, timing in _time(cases, args.rounds).items():
            out[label] = timing
    return out


def _memory_in_child(argv: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Run the memory measurements in a fresh process with ``MALLOC_MMAP_THRESHOLD_`` (glibc returns freed blocks,
    so the resident set tracks live memory; the same setting would slow the timed runs down with page faults)."""
    rendezvous = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # the child is its own group
    env = {k: v for k, v in os.environ.items() if k not in rendezvous}
    env["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
    cmd = [sys.executable, "-m", "benchmarks.bench_queue", *argv, "--memory-child"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    raise RuntimeError(f"the memory run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def _fmt_mib(n: int) -> str:
    return "n/a" if n < 0 else f"{n / MiB:,.1f} MiB"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue", type=int, default=100_000, help="queued negatives C")
    parser.add_argument("--anchors", type=int, default=16, help="anchors of the contrastive term (global batch)")
    parser.add_argument("--micro", type=int, default=8, help="records per micro-batch of the step")
    parser.add_argument("--seq", type=int, default=64, help="tokens of the longest record of the step")
    parser.add_argument("--layers", type=int, default=SMOLLM2_135M["num_hidden_layers"])
    parser.add_argument("--rounds", type=int, default=5, help="timed repetitions per case")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-step", action="store_true", help="only the contrastive term")
    parser.add_argument("--tiny", action="store_true", help="small queue and model (smoke run)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-csv", action="store_true")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(raw)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    spec = dict(SMOLLM2_135M, num_hidden_layers=args.layers)
    if args.tiny:
        args.queue, args.anchors, args.micro, args.seq, args.rounds = 2000, 8, 2, 24, 1
        spec.update(num_hidden_layers=2, vocab_size=512)
    dim = spec["hidden_size"]

    from alignx.config import Config
    from alignx.engine import init_distributed, shutdown_distributed

    init_distributed(Config())  # the global modes gather over the process group (here: rank 0 of 1)
    if args.memory_child:
        print(RESULT_TAG + json.dumps(measure(args, spec, memory=True)), flush=True)
        shutdown_distributed()
        return 0
    info = run_info("cpu", args.threads)
    load_before = os.getloadavg()[0]
    n = args.anchors + args.queue
    bound = n * dim * 4 + CHUNK_BYTES + SLACK_BYTES
    say(
        f"[queue] C = {args.queue:,} queued negatives, D = {dim}, {args.anchors} anchors -> N = {n:,} candidates; "
        f"load average {load_before:.2f}, {args.threads} threads, {info.device_name}"
    )
    res = measure(args, spec, memory=False)
    shutdown_distributed()
    mem = {} if args.no_memory else _memory_in_child(raw)
    for label, r in res.items():
        r.update(measure=label, extra_bytes=mem.get(label, {}).get("extra_bytes", -1))
        r.update(queue=0 if label in ("contrastive", "step") else args.queue)
        r.update(anchors=args.micro if label.startswith("step") else args.anchors)
    q_res = res["contrastive+queue"]
    verdict = _verdict(q_res["extra_bytes"], bound)
    q_res.update(bound_bytes=bound, verdict=verdict)
    say(
        f"[queue] contrastive fwd+bwd: {q_res['median_ms']:.1f} ms with the queue (p20 {q_res['p20_ms']:.1f}, "
        f"p80 {q_res['p80_ms']:.1f}) vs {res['contrastive']['median_ms']:.2f} ms without; extra memory "
        f"{_fmt_mib(q_res['extra_bytes'])} <= bound {_fmt_mib(bound)} (N x D x 4 + chunk + slack): {verdict}; "
        f"queue held between steps {_fmt_mib(q_res['persistent'])} (C x D x 4 = {_fmt_mib(args.queue * dim * 4)})"
    )
    if not args.no_step:
        _say_step(args, spec, res)
    say(f"[queue] load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    if not args.no_csv:
        _append_csv(args.out_dir / "queue_cpu.csv", info, dim, list(res.values()))
    return 0 if verdict != "MISS" else 1


def _verdict(extra_bytes: int, bound: int) -> str:
    """The queue's claim (:data:`benchmarks.claims.CLAIMS`): PASS / MISS, ``n/a`` when the memory was not measured."""
    measured = extra_bytes >= 0
    rows = [Row(provider="contrastive+queue", mode="full", status="ok" if measured else "n/a",
                extra_mem_mb=extra_bytes / MiB if measured else None),
            Row(provider="bound", mode="full", status="ok", extra_mem_mb=bound / MiB)]  # fmt: skip
    [v] = evaluate("queue", rows)
    return v.verdict if v.verdict in ("PASS", "MISS") else "n/a"


def _say_step(args: argparse.Namespace, spec: dict[str, Any], res: dict[str, dict[str, Any]]) -> None:
    """The step with and without the queue: the queue's share of the step time and memory (noted in the row)."""
    dim = spec["hidden_size"]
    with_q, without, q_res = res["step+queue"], res["step"], res["contrastive+queue"]
    share = (with_q["median_ms"] - without["median_ms"]) / with_q["median_ms"]
    term_share = q_res["median_ms"] / with_q["median_ms"]
    with_q["note"] = f"step difference {share:+.1%}; contrastive term alone {term_share:.1%} of the step"
    say(
        f"[queue] step ({spec['num_hidden_layers']} layers, D = {dim}, {args.micro} records <= {args.seq} tokens, "
        f"{args.rounds} interleaved rounds): {with_q['median_ms']:.0f} ms with the queue (p20 "
        f"{with_q['p20_ms']:.0f}, p80 {with_q['p80_ms']:.0f}) vs {without['median_ms']:.0f} ms without (p20 "
        f"{without['p20_ms']:.0f}, p80 {without['p80_ms']:.0f}): difference {share:+.1%} of the step; the "
        f"contrastive term with {args.queue:,} negatives measured alone is {term_share:.1%} of the step; step "
        f"extra memory {_fmt_mib(with_q['extra_bytes'])} vs {_fmt_mib(without['extra_bytes'])}"
    )


def _append_csv(path: Path, info: Any, dim: int, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow(
                {
                    "run_id": info.run_id, "date": info.date, "commit": info.commit, "device": "cpu",
                    "device_name": info.device_name, "torch": info.torch, "threads": info.threads,
                    "load1": round(os.getloadavg()[0], 2), "dim": dim, "bound_bytes": r.get("bound_bytes", ""),
                    "verdict": r.get("verdict", ""), "note": r.get("note", ""),
                    **{k: r[k] for k in ("measure", "queue", "anchors", "extra_bytes")},
                    **{k: f"{r[k]:.3f}" for k in ("median_ms", "p20_ms", "p80_ms")},
                }
            )  # fmt: skip
    say(f"[queue] rows appended to {path}")


if __name__ == "__main__":
    sys.exit(main())
