"""One stage-1 training step (forward + backward) on the same model and batch, three ways.

- ``ntp``: :class:`alignx.model.AlignXModel` with ``objective.kind = "ntp"`` (language modelling only);
- ``alignx``: ``AlignXModel`` with the AlignX objective (hooks on the align layer and the final norm, the
  ``alignx.kernels`` ops as :func:`alignx.objective.kernel_op` resolves them — printed, so that a run shows which
  implementation it timed);
- ``alignx-hf-head``: the same with ``model.fused_ce = false``: HF's LM head writes the logits and the chunked
  fp32 cross-entropy reads them (the step before the fused linear cross-entropy);
- ``official``: the same objective written as the official AlignX code computes it (:class:`OfficialStage1`): the
  row filter ``span_ids[:, -4] == 2``, ``output_hidden_states=True``, the fp32 logits copy and HF's shifted
  cross-entropy, masked-product pooling, the expand-then-``CosineSimilarity`` ``[n, n, d]`` InfoNCE with the ``1/2``,
  the repeated ``[2B, 2B, 2d]`` pair tensor through an ``nn.Linear`` SwiGLU classifier.

Reported per objective: step time (median, p20, p80; on CPU the objectives are interleaved round by round so that a
change of machine load hits all three alike), the extra memory of one step beyond the model, its gradients
(allocated by a warm-up step) and the batch (the method of :mod:`benchmarks.memory`), and the largest micro-batch
whose step fits under a memory cap (doubling then bisection, every probe a fresh measurement). The ``alignx`` and
``official`` losses and gradients are compared (they must be the same function).

The CPU default model is a random-initialised Llama-architecture model built from a config
(:func:`alignx.testing.tiny_causal_lm`: d = 256, 8 layers, vocabulary 8192), micro-batch 16 x 128 tokens (the
official micro-batch, shorter rows), a step cap of 1 GiB extra memory for the search;
``--model gemma3-270m`` uses the real Gemma 3 270M (``alignx.models.resolve_pretrained``; the CUDA default, bf16,
16 x 512).

Run: ``python -m benchmarks.bench_step --device cpu`` (``--help`` for the options).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from alignx.constants import IGNORE_INDEX

from .claims import Verdict, append_verdicts, evaluate, print_verdicts
from .harness import DTYPES, BenchOptions, Timing, TimingPolicy, interleaved, seeded, time_callable
from .memory import METHOD_CPU, cpu_extra_memory, cuda_extra_memory, run_subprocess_job
from .results import RESULTS_DIR, Row, RunInfo, append_csv, run_info, say

OBJECTIVES = ("ntp", "alignx", "alignx-hf-head", "official")
GB = 1 << 30


# ----------------------------------------------------------------------------------------------------------------
# Model and batch


@dataclass
class StepSpec:
    """The model and batch of one step: ``model`` is ``"small"`` (built from a config: ``hidden``, ``layers``,
    ``vocab``) or a name :func:`alignx.model.load_causal_lm` resolves (e.g. ``gemma3-270m``); ``dtype`` of the
    weights; micro-batch ``batch`` x ``seq`` tokens; ``backend`` of the alignx ops."""

    model: str = "small"
    hidden: int = 256
    layers: int = 8
    vocab: int = 8192
    dtype: str = "fp32"
    batch: int = 16
    seq: int = 128
    backend: str = "torch"

    def describe(self) -> str:
        if self.model == "small":
            name = f"llama d={self.hidden} L={self.layers} V={self.vocab}"
        else:
            name = self.model
        return f"{name} {self.dtype} {self.batch}x{self.seq}"


def build_lm(spec: StepSpec, device: str) -> nn.Module:
    """The causal LM of ``spec`` on ``device`` (seeded), in training mode, KV cache off."""
    if spec.model == "small":
        from alignx.testing import tiny_causal_lm

        lm = tiny_causal_lm("llama", vocab_size=spec.vocab, num_layers=spec.layers, hidden=spec.hidden, seed=0)
        lm = lm.to(dtype=DTYPES[spec.dtype])
    else:
        from alignx.config import ModelConfig
        from alignx.model import load_causal_lm

        lm = load_causal_lm(ModelConfig(name_or_path=spec.model, dtype=spec.dtype, attn_implementation="sdpa"))
    lm.config.use_cache = False
    return lm.to(device).train()


def vocab_size(lm: nn.Module) -> int:
    return int(lm.get_output_embeddings().weight.shape[0])


def make_batch(batch: int, seq: int, vocab: int, device: str, seed: int = 0) -> dict[str, Tensor]:
    """A left-padded stage-1 micro-batch marked as the official collator marks it (see
    :func:`benchmarks.bench_span_pool.official_layout`): random tokens, labels = tokens (whole sequence),
    English-centric language pairs."""
    from .bench_span_pool import official_layout

    g = seeded(seed)
    span_ids, mask = official_layout(batch, seq, g)
    tokens = torch.randint(4, vocab, (batch, seq), generator=g)
    input_ids = tokens.masked_fill(mask == 0, 0)
    labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
    other = torch.randint(1, 10, (batch,), generator=g)
    en_first = torch.rand(batch, generator=g) < 0.5
    src = torch.where(en_first, torch.zeros_like(other), other)
    tgt = torch.where(en_first, other, torch.zeros_like(other))
    out = {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "span_ids": span_ids,
           "src_lang": src, "tgt_lang": tgt}  # fmt: skip
    return {k: v.to(device) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------------------------
# The official-style objective


class OfficialLanguageMatchingMLP(nn.Module):
    """The official classifier: a Llama MLP ``down(silu(gate(z)) * up(z))``, widths 2d -> h -> 2, no bias."""

    def __init__(self, d: int, h: int = 128) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(2 * d, h, bias=False)
        self.up_proj = nn.Linear(2 * d, h, bias=False)
        self.down_proj = nn.Linear(h, 2, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class OfficialStage1(nn.Module):
    """The official AlignX stage-1 loss, idiom by idiom (notes/method.md §1.5–1.10), on an HF causal LM.

    ``L = CE(fp32 logits) + 0.3 * (-LogSoftmax_0(cos / tau).diag().sum() / n / 2) + 0.4 * CE(pairs)``.
    """

    def __init__(self, lm: nn.Module, head: OfficialLanguageMatchingMLP, align_layer: int, tau: float = 0.1,
                 lambda_ctr: float = 0.3, lambda_lam: float = 0.4) -> None:  # fmt: skip
        super().__init__()
        self.lm, self.head = lm, head
        self.align_layer, self.tau, self.lambda_ctr, self.lambda_lam = align_layer, tau, lambda_ctr, lambda_lam

    @staticmethod
    def masked_mean(h: Tensor, idx: Tensor, mark: int) -> Tensor:
        m = idx == mark
        return (h * m.unsqueeze(-1)).sum(dim=1) / m.sum(dim=1).unsqueeze(-1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, span_ids: Tensor,
                src_lang: Tensor, tgt_lang: Tensor) -> dict[str, Tensor]:  # fmt: skip
        keep = span_ids[:, -4] == 2
        input_ids, attention_mask, labels, index = input_ids[keep], attention_mask[keep], labels[keep], span_ids[keep]
        src_lang, tgt_lang = src_lang[keep], tgt_lang[keep]
        n = input_ids.shape[0]
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
        logits = out.logits.float()
        ntp = nn.CrossEntropyLoss()(logits[..., :-1, :].contiguous().view(-1, logits.shape[-1]),
                                    labels[..., 1:].reshape(-1))  # fmt: skip
        if n > 1:
            h = out.hidden_states[self.align_layer]
            anchor, contrast = self.masked_mean(h, index, 1), self.masked_mean(h, index, 2)
            d = anchor.shape[-1]
            sim = nn.CosineSimilarity(dim=-1)(anchor.expand((n, n, d)), contrast.expand((n, n, d)).transpose(0, 1))
            ctr = -nn.LogSoftmax(0)(sim / self.tau).diag().sum() / n / 2
        else:
            ctr = logits.new_zeros(())
        hf = out.hidden_states[-1][..., :-1, :]
        idx = index[..., 1:]
        emb = torch.cat([self.masked_mean(hf, idx, 1), self.masked_mean(hf, idx, 2)], dim=0)
        lang = torch.cat([src_lang, tgt_lang], dim=0)
        m = emb.shape[0]
        pairs = torch.cat([emb.unsqueeze(1).repeat(1, m, 1), emb.unsqueeze(0).repeat(m, 1, 1)], dim=-1)
        pair_logits = self.head(pairs)
        truth = (lang.unsqueeze(1).repeat(1, m) == lang.unsqueeze(0).repeat(m, 1)).long()
        lam = nn.CrossEntropyLoss()(pair_logits.view(-1, 2), truth.view(-1))
        loss = ntp + self.lambda_ctr * ctr + self.lambda_lam * lam
        return {"loss": loss, "ntp": ntp.detach(), "ctr": ctr.detach(), "lam": lam.detach()}


# ----------------------------------------------------------------------------------------------------------------
# Steps


def _config(kind: str, backend: str, fused: bool = True) -> Any:
    from alignx.config import Config

    cfg = Config()
    cfg.objective.kind = kind
    cfg.objective.kernel_backend = backend
    cfg.model.fused_ce = fused
    return cfg


def build_models(spec: StepSpec, device: str, objectives: Sequence[str] = OBJECTIVES) -> dict[str, nn.Module]:
    """One LM shared by the wrappers of ``objectives``; the alignx and official heads start from the same weights."""
    from alignx.model import AlignXModel, LanguageMatchingHead, find_decoder_parts

    lm = build_lm(spec, device)
    models: dict[str, nn.Module] = {}
    if "ntp" in objectives:
        models["ntp"] = AlignXModel(lm, _config("ntp", spec.backend))
    d = int(lm.config.get_text_config().hidden_size)
    if "alignx" in objectives:
        torch.manual_seed(1)
        models["alignx"] = AlignXModel(lm, _config("alignx", spec.backend))
    if "alignx-hf-head" in objectives:
        torch.manual_seed(1)
        models["alignx-hf-head"] = AlignXModel(lm, _config("alignx", spec.backend, fused=False))
    if "official" in objectives:
        torch.manual_seed(1)  # the same draw as AlignXModel's head
        head = LanguageMatchingHead(d, 128, 0.02)
        mlp = OfficialLanguageMatchingMLP(d, 128)
        mlp.load_state_dict(head.state_dict())
        mlp = mlp.to(device=device, dtype=next(lm.parameters()).dtype)
        align_layer = _config("alignx", spec.backend).model.resolved_align_layer(len(find_decoder_parts(lm)[0]))
        models["official"] = OfficialStage1(lm, mlp, align_layer)
    return models


def make_step(model: nn.Module, batch: dict[str, Tensor]) -> Callable[[], Tensor]:
    """One training step without the optimiser: zero the gradients (kept allocated), forward, backward."""

    def step() -> Tensor:
        model.zero_grad(set_to_none=False)
        out = model(**batch)
        out["loss"].backward()
        return out["loss"].detach()

    return step


def grads_of(model: nn.Module) -> dict[str, Tensor]:
    """Gradients by parameter name, with the official head's names mapped to the alignx head's."""
    out = {}
    for name, p in model.named_parameters():
        official_head = isinstance(model, OfficialStage1) and name.startswith("head.")
        key = "lang_" + name if official_head else name
        out[key] = (p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().cpu().clone()
    return out


def op_resolution() -> dict[str, str]:
    """How :func:`alignx.objective.kernel_op` resolves each op now (the alignx objective calls exactly this)."""
    import types

    from alignx.objective import kernel_op

    out = {}
    for name in ("span_mean_pool", "info_nce", "lang_match_loss"):
        try:
            op = kernel_op(name)
        except Exception as e:  # reported, not hidden
            out[name] = f"error: {e}"
            continue
        if isinstance(op, types.ModuleType):
            out[name] = f"BROKEN: alignx.kernels.{name} is a module, not the op"
        else:
            out[name] = f"{op.__module__}.{op.__name__}"
    return out


def step_memory_job(spec: dict[str, Any], objective: str, batch: int, device: str, threads: int) -> dict[str, Any]:
    """Extra memory of one step of ``objective`` at micro-batch ``batch`` (run in a fresh process on CPU).

    A warm-up step at micro-batch 2 allocates the parameter gradients (and initialises the libraries); the measured
    step then reuses them, so the result is activations and temporaries only.
    """
    if threads > 0:
        torch.set_num_threads(threads)
    s = StepSpec(**spec)
    try:
        model = build_models(s, device, (objective,))[objective]
        vocab = vocab_size(model.lm)
        make_step(model, make_batch(2, s.seq, vocab, device, seed=1))()
        gc.collect()
        step = make_step(model, make_batch(batch, s.seq, vocab, device))
        measure = cpu_extra_memory if device == "cpu" else cuda_extra_memory
        extra, method = measure(step, [])
        return {"status": "ok", "bytes": int(extra), "method": method}
    except Exception as e:
        text = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
        low = text.lower()
        return {"status": "oom" if ("out of memory" in low or "can't allocate" in low) else "error", "note": text}


def largest_fitting(fits: Callable[[int], bool], start: int, limit: int) -> tuple[int, bool]:
    """Largest ``b`` in ``1..limit`` with ``fits(b)``, assuming ``fits`` is monotone (True up to some size).

    Doubles from ``start`` (halves when ``start`` does not fit), then bisects until the bracket is within 1/8 of the
    lower end. Returns ``(b, exact)``: ``exact`` is False when ``b`` is only a lower bound (the bracket was cut at
    1/8, or ``limit`` fits). ``b = 0`` when not even 1 fits.
    """
    lo, hi = 0, None
    b = max(1, min(start, limit))
    if fits(b):
        lo = b
        while lo < limit:
            b = min(2 * lo, limit)
            if fits(b):
                lo = b
            else:
                hi = b
                break
        if hi is None:
            return lo, False
    else:
        hi = b
        while b > 1:
            b //= 2
            if fits(b):
                lo = b
                break
            hi = b
        if lo == 0:
            return 0, True
    while hi - lo > max(1, lo // 8):
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi - lo <= 1


# ----------------------------------------------------------------------------------------------------------------
# The run


def time_steps(steps: dict[str, Callable[[], Tensor]], device: str, rounds: int) -> dict[str, Timing]:
    """Step times. CPU: one warm-up each, then ``rounds`` rounds of one step per objective (interleaved)."""
    if device == "cuda":
        return {k: time_callable(fn, device) for k, fn in steps.items()}
    return interleaved(steps, rounds)


def run(spec: StepSpec, device: str, threads: int, out_dir: Any, info: RunInfo, *, rounds: int, memory: bool,
        cap_bytes: int, max_batch: int, search: bool, write_csv: bool) -> tuple[list[Row], list[Verdict]]:  # fmt: skip
    """Time, memory and max micro-batch of the three objectives; rows for the CSV and the verdicts."""
    ops = op_resolution()
    say(f"[step] {spec.describe()} on {device}; alignx ops: " + "; ".join(f"{k} -> {v}" for k, v in ops.items()))
    models = build_models(spec, device)
    vocab = vocab_size(next(iter(models.values())).lm)
    batch = make_batch(spec.batch, spec.seq, vocab, device)
    steps = {k: make_step(m, batch) for k, m in models.items()}

    losses, err = same_function(steps, models)
    say(f"[step] loss alignx {losses['alignx']:.6f}, official {losses['official']:.6f}; max rel grad err {err:.2e}")

    times = time_steps(steps, device, rounds)
    del steps, models, batch
    gc.collect()

    cache: dict[tuple[str, int], dict[str, Any]] = {}

    def probe(k: str, b: int) -> dict[str, Any]:
        if (k, b) not in cache:
            cache[(k, b)] = _probe(spec, k, b, device, threads)
        return cache[(k, b)]

    tokens = spec.batch * spec.seq
    shape = spec.describe()
    rows: list[Row] = []
    ops_note = "ops: " + ", ".join(f"{k}={v}" for k, v in ops.items())
    for k in OBJECTIVES:
        t = times[k]
        note = ops_note if k == "alignx" else ""
        if k == "official":
            note = f"loss {losses['official']:.6f} vs alignx {losses['alignx']:.6f}"
        row = info.row(bench="step", shape=shape, provider=k, mode="full", status="ok", time_ms=t.median_ms,
                       p20_ms=t.p20_ms, p80_ms=t.p80_ms, reps=t.n, metric=tokens / (t.median_ms * 1e-3),
                       unit="tokens/s", max_rel_err=err if k == "official" else None, note=note)  # fmt: skip
        if memory:
            res = probe(k, spec.batch)
            if res["status"] == "ok":
                row.extra_mem_mb, row.mem_method = res["bytes"] / 2**20, res["method"]
            else:
                row.mem_method = f"{res['status']}: {res.get('note', '')}"
        rows.append(row)
        mem = f"{row.extra_mem_mb:.0f} MiB" if row.extra_mem_mb is not None else row.mem_method
        say(f"[step] {k}: {t.median_ms:.1f} ms (p20 {t.p20_ms:.1f}, p80 {t.p80_ms:.1f}, n={t.n}), "
            f"{row.metric:.0f} tokens/s, extra memory {mem}, load {row.load1}")  # fmt: skip

    if search and memory:
        rows += [max_batch_row(k, shape, probe, info, spec.batch, cap_bytes, max_batch) for k in OBJECTIVES]
    if write_csv:
        append_csv(out_dir / f"{device}.csv", rows)
    return rows, verdicts(rows, head_claims=spec.model != "small")


def same_function(steps: dict[str, Callable[[], Tensor]], models: dict[str, Any]) -> tuple[dict[str, float], float]:
    """The alignx objective and the official-style one on the same weights and batch: their losses and the max
    relative error of the alignx gradients against the official ones."""
    losses, grads = {}, {}
    for k in ("alignx", "official"):
        losses[k] = float(steps[k]())
        grads[k] = grads_of(models[k])
    err = max(float((grads["alignx"][n] - g).abs().max()) / max(float(g.abs().max()), 1e-30)
              for n, g in grads["official"].items())  # fmt: skip
    return losses, err


def max_batch_row(
    k: str,
    shape: str,
    probe: Callable[[str, int], dict[str, Any]],
    info: RunInfo,
    start: int,
    cap_bytes: int,
    max_batch: int,
) -> Row:
    """The largest micro-batch of objective ``k`` whose step stays under ``cap_bytes`` of extra memory."""
    probes: dict[int, dict[str, Any]] = {}

    def fits(b: int) -> bool:
        res = probes[b] = probe(k, b)
        return res["status"] == "ok" and res["bytes"] <= cap_bytes

    best, exact = largest_fitting(fits, start, max_batch)
    probed = ", ".join(f"{b}:{_fmt_probe(r)}" for b, r in sorted(probes.items()))
    rel = "=" if exact else ">="
    say(f"[step] {k}: largest micro-batch under {cap_bytes / GB:.2f} GiB extra: {rel}{best} ({probed})")
    return info.row(bench="step", shape=f"{shape} cap={cap_bytes / GB:.2f}GiB", provider=k, mode="max-batch",
                    status="ok", metric=float(best), unit="rows",
                    note=f"largest micro-batch {rel} {best} under the cap; probes {probed}",
                    mem_method=METHOD_CPU if info.device == "cpu" else "cuda allocator")  # fmt: skip


def _fmt_probe(r: dict[str, Any]) -> str:
    return f"{r['bytes'] / 2**20:.0f}MiB" if r["status"] == "ok" else r["status"]


def _probe(spec: StepSpec, objective: str, batch: int, device: str, threads: int) -> dict[str, Any]:
    kwargs = dict(spec=asdict(spec), objective=objective, batch=batch, device=device, threads=threads)
    if device == "cpu":
        return run_subprocess_job("benchmarks.bench_step", "step_memory_job", kwargs, timeout=1800, memory_env=True,
                                  threads=threads)  # fmt: skip
    res = step_memory_job(**kwargs)
    gc.collect()
    torch.cuda.empty_cache()
    return res


def verdicts(rows: Sequence[Row], head_claims: bool = False) -> list[Verdict]:
    """The step's claims (:data:`benchmarks.claims.CLAIMS`, bench ``step``). With ``head_claims`` (a real model, whose
    vocabulary makes the LM head the step's largest matmul) the fused LM head's bounds apply."""
    return evaluate("step", rows, flags=("real-model",) if head_claims else ())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", type=type(RESULTS_DIR), default=RESULTS_DIR)
    parser.add_argument("--run-id", default=None)
    parser.add_argument("--model", default=None, help="'small' (built from a config) or e.g. gemma3-270m")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds on CPU")
    parser.add_argument("--mem-cap-gb", type=float, default=None, help="cap on a step's extra memory (GiB)")
    parser.add_argument("--max-batch", type=int, default=512)
    parser.add_argument("--no-search", action="store_true", help="skip the largest-micro-batch search")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="tiny model and batch (smoke test)")
    parser.add_argument("--no-csv", action="store_true")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    spec = StepSpec(
        model=args.model or ("gemma3-270m" if cuda else "small"),
        hidden=args.hidden, layers=args.layers, vocab=args.vocab,
        dtype=args.dtype or ("bf16" if cuda else "fp32"),
        batch=args.batch, seq=args.seq or (512 if cuda else 128),
        backend="auto" if cuda else "torch",
    )  # fmt: skip
    if args.tiny:
        spec = StepSpec(model="small", hidden=32, layers=2, vocab=128, dtype="fp32", batch=4, seq=32,
                        backend=spec.backend)  # fmt: skip
        args.max_batch = min(args.max_batch, 16)
    if args.mem_cap_gb is not None:
        cap = int(args.mem_cap_gb * GB)
    elif cuda:
        cap = int(0.9 * (torch.cuda.get_device_properties(0).total_memory - torch.cuda.memory_allocated()))
    else:
        cap = 1 * GB
    info = run_info(args.device, args.threads, args.run_id)
    say(f"== step on {info.device_name}, torch {info.torch}, {args.threads} threads, commit {info.commit}, "
        f"load average {os.getloadavg()[0]:.2f} ==")  # fmt: skip
    _, vs = run(spec, args.device, args.threads, args.out_dir, info, rounds=args.rounds, memory=not args.no_memory,
                cap_bytes=cap, max_batch=args.max_batch, search=not args.no_search,
                write_csv=not args.no_csv)  # fmt: skip
    print_verdicts("step", vs)
    append_verdicts(BenchOptions(device=args.device, out_dir=args.out_dir, write_csv=not args.no_csv), info, vs)
    return 0


__all__ = [
    "OBJECTIVES",
    "OfficialLanguageMatchingMLP",
    "OfficialStage1",
    "StepSpec",
    "TimingPolicy",
    "build_models",
    "largest_fitting",
    "main",
    "make_batch",
    "make_step",
    "op_resolution",
    "step_memory_job",
]

if __name__ == "__main__":
    sys.exit(main())
