"""The fused LM head (``model.fused_ce``): the NTP term from the final-norm states and the head weight, no logits.

Against HF's own head + the chunked cross-entropy (``model.fused_ce=false``), in fp32: the same terms and the same
gradient of every parameter (1e-5 relative) for Llama, Qwen2 and Gemma 3, padded and packed, ``labels=all`` and
``labels=response``, tied embeddings with Gemma's logit soft-cap, the NTP-only objective of stage 2; models whose
head is not known to be plain fall back to HF's logits with the reason. Under ZeRO-3 on 2 gloo ranks the partitioned
(tied) head weight is gathered for the fused loss's forward and backward: the same losses and weights as ZeRO-0 in
one process.

Run as a script (``deepspeed ... tests/test_fused_head.py --out F``) this file is the 2-rank worker.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from helpers import torch_threads

from alignx.config import Config, load_config
from alignx.data import Collator, PackedCollator
from alignx.model import AlignXModel, FusedLMLoss, fused_head
from alignx.objective import IGNORE_INDEX, TERMS, HeadInputs, lm_loss_sum
from alignx.testing import tiny_causal_lm

VOCAB = 256
RTOL = 1e-5
STEPS = 3


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def _lm(arch: str, **overrides) -> torch.nn.Module:
    return tiny_causal_lm(arch, vocab_size=VOCAB, num_layers=3, hidden=32, **overrides)


def _cfg(fused: bool, **over) -> Config:
    return load_config(None, {"model.fused_ce": fused, "objective.kernel_backend": "auto", **over})


def _records(n: int = 5, seed: int = 3, response: bool = False) -> list[dict]:
    """Rows of different lengths: an instruction (span 0), a source (1), a target (2); labels = next tokens,
    the target only with ``response``."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(n):
        n_ins, n_src, n_tgt = 3 + b % 2, 2 + b % 3, 4 + (b * 2) % 5
        ids = torch.randint(4, VOCAB, (n_ins + n_src + n_tgt,), generator=g).tolist()
        spans = [0] * n_ins + [1] * n_src + [2] * n_tgt
        labels = [t if (not response or s == 2) else IGNORE_INDEX for t, s in zip(ids, spans)]
        rows.append({"input_ids": ids, "labels": labels, "span_ids": spans, "src_lang": b % 3, "tgt_lang": 3})
    return rows


def _run(model: AlignXModel, batch: dict) -> tuple[dict, dict]:
    terms = model(**batch)
    terms["loss"].backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: terms[k].detach() for k in TERMS}, grads


def _assert_same(got: tuple[dict, dict], want: tuple[dict, dict], what: str) -> None:
    (t1, g1), (t0, g0) = got, want
    for key in TERMS:
        torch.testing.assert_close(t1[key].double(), t0[key].double(), rtol=RTOL, atol=1e-7, msg=f"{what} {key}")
    assert g1.keys() == g0.keys() and len(g0) > 0, what
    for name, ref in g0.items():
        scale = float(ref.abs().max()) or 1.0
        err = float((g1[name] - ref).abs().max()) / scale
        assert err <= RTOL, f"{what} {name}: gradient differs by {err:.2e} of its largest entry"


def _pair(lm: torch.nn.Module, batch: dict, **over) -> tuple[tuple[dict, dict], tuple[dict, dict]]:
    """(fused, HF head) terms and gradients of the same model, head init and batch."""
    out = []
    for fused in (True, False):
        torch.manual_seed(1)  # the same language-matching head
        model = AlignXModel(copy.deepcopy(lm), _cfg(fused, **over)).train()
        assert model.fused_ce is fused, model.fused_ce_problem
        out.append(_run(model, batch))
    return out[0], out[1]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("labels", ["all", "response"])
def test_fused_head_equals_hf_head(arch: str, layout: str, labels: str) -> None:
    records = _records(response=labels == "response")
    if layout == "packed":
        batch, over = PackedCollator()(records), {"data.packing": True}
    else:
        batch, over = Collator(pad_token_id=0, padding_side="left")(records), {}
    fused, hf = _pair(_lm(arch), batch, **over)
    assert float(fused[0]["ntp"]) > 0
    _assert_same(fused, hf, f"{arch} {layout} labels={labels}")


@pytest.mark.parametrize("kind", ["alignx", "ntp"])
def test_tied_embeddings_and_softcap(kind: str) -> None:
    lm = _lm("gemma3", tie_word_embeddings=True, final_logit_softcapping=30.0)
    lm.tie_weights()
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    with torch.no_grad():  # logits of tens: the cap bites (the blocks' RMSNorms absorb the larger embeddings)
        lm.get_input_embeddings().weight.mul_(60.0)
    batch = Collator(pad_token_id=0, padding_side="left")(_records(seed=4))
    fused, hf = _pair(lm, batch, **{"objective.kind": kind})
    _assert_same(fused, hf, f"tied + softcap, {kind}")
    # Negative control: the same fused model without the cap is far from HF's capped loss.
    model = AlignXModel(copy.deepcopy(lm), _cfg(True, **{"objective.kind": kind}))
    assert model.lm_loss.softcap == 30.0 and model.lm_loss.logit_scale == 1.0
    model.lm_loss.softcap = None
    uncapped = float(model(**batch)["ntp"])
    assert abs(uncapped - float(hf[0]["ntp"])) > 0.1 * float(hf[0]["ntp"])


def test_softcap_and_scale_reach_the_op() -> None:
    """Cohere-style ``* logit_scale`` and Granite-style ``/ logits_scaling`` map to the op's ``logit_scale``."""
    lm = _lm("llama")
    lm.config.model_type = "granite"
    lm.config.logits_scaling = 4.0
    _, loss = fused_head(lm)
    assert loss.logit_scale == 0.25 and loss.softcap is None
    lm.config.model_type = "cohere"
    lm.config.logit_scale = 0.5
    _, loss = fused_head(lm)
    assert loss.logit_scale == 0.5
    # Against the materialised logits with the same maths.
    h = 20 * torch.randn(7, 32)
    y = torch.randint(0, VOCAB, (7,))
    y[2] = IGNORE_INDEX
    w = lm.get_output_embeddings().weight.detach().double()
    got, n = FusedLMLoss(lm.get_output_embeddings(), softcap=1.0, logit_scale=0.5, backend="torch")(h, y)
    z = torch.tanh(0.5 * (h.double() @ w.T))
    want = torch.nn.functional.cross_entropy(z, y, ignore_index=IGNORE_INDEX, reduction="sum")
    assert int(n) == 6
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


def test_unknown_head_falls_back_with_the_reason() -> None:
    lm = _lm("llama")
    lm.config.model_type = "mystery"
    model = AlignXModel(lm, _cfg(True))
    assert not model.fused_ce and "mystery" in model.fused_ce_problem
    model = AlignXModel(_lm("llama"), _cfg(False))
    assert not model.fused_ce and model.fused_ce_problem is None
    biased = _lm("llama")
    biased.lm_head = torch.nn.Linear(32, VOCAB, bias=True)
    assert "bias-free" in fused_head(biased)


def test_no_logits_are_materialised(monkeypatch) -> None:
    """The fused forward never calls HF's LM head; the HF forward does."""
    model = AlignXModel(_lm("qwen2"), _cfg(True))
    calls = []
    model.lm.lm_head.register_forward_hook(lambda *a: calls.append(1))
    batch = Collator(pad_token_id=0, padding_side="left")(_records())
    model(**batch)["loss"].backward()
    assert calls == []
    out = model.run_lm(batch["input_ids"], batch["attention_mask"], fused=True)
    assert isinstance(out.logits, HeadInputs) and out.logits.shape[:2] == batch["input_ids"].shape
    assert model.run_lm(batch["input_ids"], batch["attention_mask"]).logits.shape[-1] == VOCAB and calls == [1]


def test_ignored_positions_may_hold_nan() -> None:
    """Hidden states at ignored positions never reach the loss or a gradient."""
    lm = _lm("llama")
    hidden = torch.randn(2, 6, 32, requires_grad=True)
    labels = torch.randint(0, VOCAB, (2, 6))
    labels[:, :3] = IGNORE_INDEX  # positions 0..1 predict ignored labels
    poisoned = hidden.detach().clone()
    poisoned[:, :2] = float("nan")
    poisoned.requires_grad_(True)
    _, loss = fused_head(lm)
    total, count = lm_loss_sum(HeadInputs(poisoned, loss), labels)
    total.backward()
    assert int(count) == 2 * 3 and torch.isfinite(total)  # positions 2..4 predict labels 3..5
    assert torch.isfinite(poisoned.grad).all() and bool((poisoned.grad[:, :2] == 0).all())


# ----------------------------------------------------------------------------------------------------------------
# ZeRO-3, 2 gloo ranks


def _engine_losses(stage: int, world: int, rank: int) -> dict:
    from alignx.engine import Engine

    lm = _lm("gemma3", tie_word_embeddings=True, final_logit_softcapping=30.0)
    lm.tie_weights()
    torch.manual_seed(1)
    cfg = _cfg(
        True,
        **{
            "engine.zero_stage": stage,
            "engine.zero3_param_persistence_threshold": 0,
            "train.global_batch_size": 4,
            "train.micro_batch_size": 2,  # 2 ranks x 1 micro-batch = 1 process x 2 accumulated micro-batches
            "optim.lr": 3e-3,
            "optim.warmup_steps": 1,
        },
    )
    model = AlignXModel(lm, cfg)
    assert model.fused_ce
    engine = Engine(model, cfg, total_steps=STEPS)
    collate = Collator(pad_token_id=0, padding_side="left")
    losses = []
    for step in range(STEPS):
        rows = _records(n=4, seed=10 + step)
        total = 0.0
        for a in range(engine.grad_accum):
            out = engine(collate(rows[a * world + rank :: 2]))
            engine.backward(out["loss"])
            engine.step()
            total += float(out["ntp"]) / engine.grad_accum
        losses.append(total)
    weights = engine._gathered_lm_state(engine.module.lm)
    engine.destroy()
    weights = weights or {}  # rank 0 holds the gathered state
    return {"losses": losses, "weights": {k: v for k, v in weights.items() if "embed" in k or "norm" in k}}


def _worker(argv: list[str]) -> None:
    import torch.distributed as dist
    from helpers import worker_setup

    from alignx.engine import shutdown_distributed

    args, info = worker_setup(argv)
    world, rank = dist.get_world_size(), dist.get_rank()
    result = _engine_losses(3, world, rank)
    ntp = torch.tensor(result["losses"], dtype=torch.float64)
    dist.all_reduce(ntp)
    result["losses"] = (ntp / world).tolist()
    if rank == 0:
        torch.save(result, args.out)
    shutdown_distributed()


@pytest.mark.dist
def test_zero3_two_ranks_gather_the_tied_head(tmp_path: Path) -> None:
    from helpers import process_group_scope, run_deepspeed

    from alignx.engine import init_distributed

    out = tmp_path / "zero3.pt"
    proc = run_deepspeed(Path(__file__), ["--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    two = torch.load(out, weights_only=False)
    with process_group_scope():
        init_distributed(Config())
        one = _engine_losses(0, 1, 0)
    torch.testing.assert_close(two["losses"], one["losses"], atol=1e-5, rtol=0)
    assert one["losses"][-1] != one["losses"][0]  # the weights moved
    assert two["weights"].keys() == one["weights"].keys() and any("embed" in k for k in one["weights"])
    for key, ref in one["weights"].items():
        torch.testing.assert_close(two["weights"][key], ref, atol=1e-5, rtol=0, msg=key)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    _worker(sys.argv[1:])
