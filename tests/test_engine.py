"""The DeepSpeed engine in one process (gloo, world size 1): ZeRO 0-3 equivalence, real partitioning, the LR schedule,
clipping, checkpoints with client and RNG state, and the Hugging Face export from ZeRO-3 shards.

The model is a tiny Llama (2 layers, d = 32) plus a small head used INSIDE the forward (like the language-matching
head), so ZeRO sees, partitions and clips it, and the export must leave it out. The 2-rank counterpart of these
checks is in ``tests/test_dist.py``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TinyWithHead, batches, one_process_group
from helpers import engine_cfg as make_cfg
from torch import nn

from alignx.config import ConfigError, load_config
from alignx.engine import (
    EXPORT_MANIFEST,
    CheckpointError,
    Engine,
    build_ds_config,
    latest_tag,
    linear_warmup_decay,
    list_checkpoints,
    prune_checkpoints,
)

pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.distributed\.\w+.? is deprecated:FutureWarning")


@pytest.fixture(scope="module", autouse=True)
def dist_group():
    with one_process_group() as info:
        yield info


def run_steps(engine: Engine, data: list[dict], steps: int, start: int = 0) -> tuple[list[float], list[float]]:
    """``steps`` optimizer steps from micro-batch ``start * grad_accum``; returns (losses, grad norms) per step."""
    losses, norms = [], []
    ga = engine.grad_accum
    for s in range(start, start + steps):
        total = 0.0
        for m in range(ga):
            out = engine(data[s * ga + m])
            engine.backward(out["loss"])
            engine.step()
            total += out["loss"].item() / ga
        losses.append(total)
        norms.append(engine.grad_norm)
    return losses, norms


def test_ds_config_is_derived() -> None:
    cfg = make_cfg(2)
    ds = build_ds_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 1  # 8 = 4 x 2 ranks x 1
    assert build_ds_config(cfg, world_size=1)["gradient_accumulation_steps"] == 2
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"]["stage"] == 2
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    off = build_ds_config(make_cfg(2, **{"engine.offload_optimizer": True}), world_size=1)
    assert "torch_adam" not in off["optimizer"]["params"]  # CPUAdam is what offloading is for
    assert off["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert build_ds_config(make_cfg(3, **{"engine.precision": "bf16"}), 1)["bf16"]["enabled"]
    with pytest.raises(ConfigError, match="offload_optimizer needs engine.zero_stage"):
        build_ds_config(make_cfg(0, **{"engine.offload_optimizer": True}), 1)
    with pytest.raises(ConfigError, match="not a multiple"):
        build_ds_config(cfg, world_size=3)
    extra = make_cfg(3, **{"engine.deepspeed": {"zero_optimization": {"overlap_comm": True}, "prescale_gradients": 1}})
    merged = build_ds_config(extra, 1)
    assert merged["zero_optimization"] == {**build_ds_config(make_cfg(3), 1)["zero_optimization"], "overlap_comm": True}
    assert merged["prescale_gradients"] == 1
    with pytest.raises(ConfigError, match=r"engine.deepspeed.zero_optimization.stage is derived.*engine.zero_stage"):
        build_ds_config(make_cfg(3, **{"engine.deepspeed": {"zero_optimization": {"stage": 1}}}), 1)


def test_lr_schedule_formula() -> None:
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = linear_warmup_decay(opt, warmup_steps=2, total_steps=6)
    seen = []
    for _ in range(8):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0])
    opt2 = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=2.0)
    linear_warmup_decay(opt2, warmup_steps=0, total_steps=4)
    assert opt2.param_groups[0]["lr"] == 2.0


def test_zero_stages_give_the_same_losses() -> None:
    """ZeRO 0, 1, 2, 3 (fp32, grad accumulation 2, clipping active, weight decay) agree over 5 steps within 1e-4."""
    data = batches(10, micro=4)
    curves, norms, lrs, weights = {}, {}, {}, {}
    for stage in (0, 1, 2, 3):
        engine = Engine(TinyWithHead(seed=0), make_cfg(stage), total_steps=5)
        lr_seen = []
        losses, gn = [], []
        for s in range(5):
            lr_seen.append(engine.lr)
            step_losses, step_norms = run_steps(engine, data, 1, start=s)
            losses += step_losses
            gn += step_norms
        curves[stage], norms[stage], lrs[stage] = losses, gn, lr_seen
        weights[stage] = engine._gathered_lm_state(engine.module.lm)
        assert engine.global_step == 5
        engine.destroy()
    expected_lr = [3e-3 * f for f in (0.0, 0.5, 1.0, 2 / 3, 1 / 3)]
    for stage in (1, 2, 3):
        np.testing.assert_allclose(curves[stage], curves[0], atol=1e-4, rtol=0, err_msg=f"ZeRO-{stage} losses")
        np.testing.assert_allclose(norms[stage], norms[0], rtol=1e-4, err_msg=f"ZeRO-{stage} grad norms")
        assert lrs[stage] == pytest.approx(expected_lr)
        for key, ref in weights[0].items():
            torch.testing.assert_close(weights[stage][key], ref, atol=1e-5, rtol=0, msg=f"ZeRO-{stage} {key}")
    assert lrs[0] == pytest.approx(expected_lr)
    # The run really trained (lr > 0 from step 1) and clipping was active (norm above max_grad_norm).
    assert curves[0][-1] < curves[0][0]
    assert max(norms[0]) > 0.5
    assert all(np.isfinite(curves[0]))


def test_optimizer_state_is_partitioned() -> None:
    """At ZeRO >= 1 the AdamW state lives on DeepSpeed's flat fp32 partitions, not on the module's parameters; at
    ZeRO-3 the module's parameters themselves are released outside forward. (Halving over 2 ranks: test_dist.py.)"""
    data = batches(2, micro=4)
    for stage in (0, 1, 2, 3):
        engine = Engine(TinyWithHead(), make_cfg(stage), total_steps=1)
        run_steps(engine, data, 1)
        n_params = engine.num_parameters()
        basic_state = engine.ds.basic_optimizer.state
        module_params = {id(p) for p in engine.module.parameters()}
        if stage == 0:
            assert {id(p) for p in basic_state} == module_params
        elif stage in (1, 2):
            flat = engine.ds.optimizer.single_partition_of_fp32_groups
            assert {id(p) for p in basic_state} == {id(p) for p in flat}
            assert not module_params & {id(p) for p in basic_state}
            assert sum(p.numel() for p in flat) >= n_params
        else:
            flat = engine.ds.optimizer.fp32_partitioned_groups_flat
            assert {id(p) for p in basic_state} == {id(p) for p in flat}
            for p in engine.module.parameters():
                assert hasattr(p, "ds_tensor") and p.numel() == 0, "ZeRO-3 parameter not released outside forward"
        # 2 moments per parameter element; padding of the flat partitions adds a few elements at most.
        assert 2 * n_params <= engine.optimizer_state_numel() <= 2 * n_params + 64
        engine.destroy()


def test_checkpoint_roundtrip_restores_everything(tmp_path: Path) -> None:
    """Save at step 3, continue 2 steps; a fresh engine (other init) loaded from the checkpoint repeats them exactly,
    with the same lr, the client state and the RNG state of the moment of the save."""
    data = batches(10, micro=4)
    for stage in (1, 3):
        cfg = make_cfg(stage)
        engine = Engine(TinyWithHead(seed=0), cfg, total_steps=5)
        run_steps(engine, data, 3)
        random.seed(123)
        np.random.seed(123)
        torch.manual_seed(123)
        engine.save_checkpoint(tmp_path / f"z{stage}", "step_3", {"step": 3, "epoch": 0})
        after_save = (random.random(), np.random.rand(), torch.rand(1).item())
        expected, _ = run_steps(engine, data, 2, start=3)
        lr_expected = engine.lr
        engine.destroy()

        fresh = Engine(TinyWithHead(seed=7), cfg, total_steps=5)
        client = fresh.load_checkpoint(tmp_path / f"z{stage}")
        assert client["step"] == 3 and client["epoch"] == 0
        assert fresh.global_step == 3
        assert (random.random(), np.random.rand(), torch.rand(1).item()) == after_save
        got, _ = run_steps(fresh, data, 2, start=3)
        np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0, err_msg=f"ZeRO-{stage} resumed losses")
        assert fresh.lr == pytest.approx(lr_expected)
        fresh.destroy()
    assert latest_tag(tmp_path / "z3") == "step_3"
    # A checkpoint of 2 ranks (2 RNG states) cannot feed ZeRO shards to 1 rank: refused before DeepSpeed loads.
    (tmp_path / "z3" / "step_3" / "rng_state_rank1.pt").write_bytes(b"")
    other = Engine(TinyWithHead(), make_cfg(3), total_steps=5)
    with pytest.raises(CheckpointError, match="written by 2 ranks"):
        other.load_checkpoint(tmp_path / "z3")
    other.destroy()


def test_latest_and_pruning(tmp_path: Path) -> None:
    for s in (2, 4, 6, 8):
        (tmp_path / f"step_{s}").mkdir()
    (tmp_path / "latest").write_text("step_6")
    assert latest_tag(tmp_path) == "step_6"
    removed = prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in removed] == ["step_2", "step_4"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_6", "step_8"]
    (tmp_path / "latest").write_text("step_9")  # names a directory that is not there: no complete checkpoint
    assert latest_tag(tmp_path) is None


def test_export_gathers_zero3_shards_and_drops_the_head(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    data = batches(6, micro=4)
    trained = {}
    for stage in (0, 3):
        engine = Engine(TinyWithHead(seed=0), make_cfg(stage), total_steps=3)
        run_steps(engine, data, 3)
        out = engine.export_hf(tmp_path / f"export{stage}", meta={"stage": 1, "step": 3})
        trained[stage] = AutoModelForCausalLM.from_pretrained(out).state_dict()
        ref_keys = set(TinyWithHead().lm.state_dict())
        assert set(trained[stage]) == ref_keys
        manifest = json.loads((out / EXPORT_MANIFEST).read_text())
        assert manifest["complete"] and manifest["excluded_prefixes"] == ["lang_head."]
        assert manifest["step"] == 3
        for name, size in manifest["files"].items():
            assert (out / name).stat().st_size == size
        assert not (tmp_path / f"export{stage}.partial").exists()
        engine.destroy()
    initial = TinyWithHead(seed=0).lm.state_dict()
    moved = 0
    for key, ref in trained[0].items():
        torch.testing.assert_close(trained[3][key], ref, atol=1e-5, rtol=0, msg=key)
        moved += not torch.equal(ref, initial[key])
    assert moved > len(initial) // 2, "the export holds the initial weights, not the trained ones"


def test_bf16_zero2_trains_finite() -> None:
    engine = Engine(TinyWithHead(seed=0), make_cfg(2, **{"engine.precision": "bf16"}), total_steps=3)
    losses, norms = run_steps(engine, batches(6, micro=4), 3)
    assert next(engine.module.parameters()).dtype == torch.bfloat16
    assert all(np.isfinite(losses)) and all(n is not None and np.isfinite(n) for n in norms)
    engine.destroy()


def test_partitioned_loading_builds_zero3_shards_and_exports_them_whole(tmp_path: Path) -> None:
    """Under ``partitioned_loading`` (ZeRO-3) ``from_pretrained`` returns released shards; the export gathers the
    loaded weights back bit for bit; outside the context a load is a plain model again."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from alignx.engine import partitioned_loading
    from alignx.testing import tiny_pretrained

    src = tiny_pretrained("tiny-llama")
    cfg = make_cfg(3)
    with partitioned_loading(cfg, world_size=1):
        assert is_deepspeed_zero3_enabled()
        lm = AutoModelForCausalLM.from_pretrained(src)
    assert not is_deepspeed_zero3_enabled()
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in lm.parameters())
    wrapper = nn.Module()
    wrapper.lm = lm
    engine = Engine(wrapper, cfg, total_steps=1)
    out = engine.export_hf(tmp_path / "export")
    engine.destroy()
    plain = AutoModelForCausalLM.from_pretrained(src).state_dict()
    exported = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert set(exported) == set(plain)
    for key, ref in plain.items():
        assert torch.equal(exported[key], ref), key


def test_paper_config_is_the_reference_recipe() -> None:
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "paper_llama3_8b.yaml")
    ds = build_ds_config(cfg, world_size=8)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        128,
        16,
        1,
    )
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] and ds["gradient_clipping"] == 1.0
    adam = ds["optimizer"]["params"]
    assert (adam["lr"], adam["betas"], adam["eps"], adam["weight_decay"]) == (2e-6, [0.9, 0.999], 1e-8, 0.0)
    assert (cfg.optim.warmup_steps, cfg.train.epochs, cfg.data.cutoff_len, cfg.model.align_layer) == (100, 2, 512, 16)
    assert (cfg.objective.temperature, cfg.objective.lambda_ctr, cfg.objective.lambda_lam) == (0.1, 0.3, 0.4)
    assert cfg.data.eval_size == 2000 and cfg.train.eval_every == 200 and cfg.objective.negatives == "local"
