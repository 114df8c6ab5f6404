"""``alignx plan``: model states against DeepSpeed's estimators, activations against a measured CPU step.

* The paper config (Llama-3-8B, ZeRO-3, bf16) on 8 GPUs: the architecture comes from the known-architecture table
  (no hub here), the parameters are counted on the meta device, and the per-GPU model states agree with
  ``estimate_zero3_model_states_mem_needs`` / ``estimate_zero2_model_states_mem_needs`` within 5 %.
* The tiny CPU config: the activation estimate of one stage-1 step is within 25 % of the measured peak of that step
  (``benchmarks.bench_step.step_memory_job`` in a fresh process: resident-set peak of one forward + backward beyond
  the model, its gradients and the batch, ``MALLOC_MMAP_THRESHOLD_`` so that freed blocks leave the resident set).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest

from alignx.config import load_config
from alignx.plan import (
    activation_terms,
    architecture_of,
    deepspeed_estimate,
    largest_micro_batch,
    model_states,
    plan,
)

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "paper_llama3_8b.yaml"
TINY = REPO / "configs" / "tiny_cpu.yaml"
LLAMA3_8B_PARAMS = 8_030_261_248  # the published count of Meta-Llama-3-8B


def test_paper_config_model_states_agree_with_deepspeed_estimators() -> None:
    p = plan(load_config(PAPER), gpus=8)
    assert p["model"]["params"] == LLAMA3_8B_PARAMS
    assert p["model"]["largest_module"] == 128256 * 4096  # embeddings (untied head of the same size)
    configured = [s for s in p["model_states"] if (s["stage"], s["precision"], s["offload"]) == (3, "bf16", "none")]
    checked = 0
    for st in p["model_states"]:
        if st["deepspeed"] is None:
            continue
        assert abs(st["total"] / st["deepspeed"] - 1) <= 0.05, st
        checked += 1
    assert checked == 5 and configured and configured[0]["deepspeed"] is not None
    # Independent of the plan's own call: DeepSpeed's function on the same count.
    P, L = p["params_planned"], p["model"]["largest_module"]
    assert deepspeed_estimate(P, L, 8, 1, 3, "none") == configured[0]["deepspeed"]
    assert p["settings"][0]["label"] == "as configured" and p["settings"][0]["max_micro_batch"] >= 16


def test_plan_cli_prints_the_tables(capsys: pytest.CaptureFixture[str]) -> None:
    from alignx.cli import main

    assert main(["plan", "--config", str(PAPER), "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    for text in ("Meta-Llama-3-8B", "8,030,261,248", "| ZeRO-3 |", "DeepSpeed estimate", "max micro-batch",
                 "+ optimizer offload", "- activation checkpointing"):  # fmt: skip
        assert text in out, text
    assert main(["plan", "--config", str(PAPER), "--gpus", "0"]) == 2


def test_unknown_model_without_config_is_one_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    from alignx.cli import main

    assert main(["plan", "--config", str(TINY), "--model.name_or_path=nobody/unknown-model"]) == 2
    assert "no config for model 'nobody/unknown-model'" in capsys.readouterr().err


def test_meta_device_count_equals_the_real_tiny_model() -> None:
    from alignx.testing import tiny_causal_lm

    arch = architecture_of("tiny-llama")
    real = tiny_causal_lm("llama")
    assert arch.params == sum(p.numel() for p in real.parameters())
    assert (arch.layers, arch.hidden, arch.heads, arch.kv_heads) == (4, 64, 4, 2)


def test_model_states_scale_as_zero_partitions() -> None:
    P, L = 1_000_000, 1000
    one = model_states(P, L, 1, 2, "bf16")
    eight = model_states(P, L, 8, 2, "bf16")
    assert one.params == eight.params == 2 * P  # ZeRO-2 keeps the 16-bit weights whole
    assert eight.optimizer == 12 * P / 8 and eight.grads == 2 * P / 8
    z3 = model_states(P, L, 8, 3, "bf16")
    assert z3.params == 2 * P / 8 and z3.total == z3.params + z3.grads + z3.optimizer + max(z3.live_module,
                                                                                             z3.step_grads)  # fmt: skip
    off = model_states(P, L, 8, 3, "bf16", "optimizer+param")
    assert off.total == off.live_module == 4 * L and off.cpu > 0


def test_largest_micro_batch_is_the_boundary_of_the_estimate() -> None:
    cfg = load_config(PAPER)
    arch = architecture_of(cfg.model.name_or_path)
    acts = lambda b: activation_terms(arch, cfg, b, world=8)  # noqa: E731
    budget = 40 << 30
    b = largest_micro_batch(budget, acts)
    assert b >= 1 and acts(b).total <= budget < acts(b + 1).total
    assert largest_micro_batch(1, acts) == 0


def test_tiny_activation_estimate_within_25_percent_of_measured_cpu_peak() -> None:
    from helpers import import_benchmarks

    harness = import_benchmarks()
    from benchmarks.bench_step import StepSpec

    micro = 16
    cfg = load_config(TINY, [f"--train.micro_batch_size={micro}", f"--train.global_batch_size={micro}"])
    arch = architecture_of(cfg.model.name_or_path)
    estimate = activation_terms(arch, cfg, micro, attn="sdpa", device="cpu").total
    spec = StepSpec(model="small", hidden=arch.hidden, layers=arch.layers, vocab=arch.vocab, dtype="fp32",
                    batch=micro, seq=cfg.data.cutoff_len, backend=cfg.objective.kernel_backend)  # fmt: skip
    res = harness.run_subprocess_job(
        "benchmarks.bench_step",
        "step_memory_job",
        dict(spec=asdict(spec), objective="alignx", batch=micro, device="cpu", threads=1),
        timeout=600,
        memory_env=True,
        threads=1,
    )
    assert res["status"] == "ok", res
    measured = res["bytes"]
    assert measured > 32 << 20  # well above the method's ~1 MiB resolution
    assert abs(estimate / measured - 1) <= 0.25, (estimate, measured)
