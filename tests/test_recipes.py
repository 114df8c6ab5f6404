"""The recipes' objectives against plain-torch transcriptions of their formulas, on tiny random models.

Oracles here share no code with ``alignx.objective``, ``alignx.recipes`` or ``alignx.kernels``: the sentence states
come from HF's ``output_hidden_states=True`` (not from a hook), pooling is a masked sum divided by a count, InfoNCE is
``F.normalize`` + a matmul + ``F.cross_entropy``, the LM losses are ``F.cross_entropy`` with ``ignore_index``.

- AFP: ``1.0 * InfoNCE(tau 0.05, anchors sent0, candidates sent1) + 1.5 * CLM`` — value and every gradient, both
  poolers (mean / last), local and global negatives (one process).
- Cross-lingual mapping: token-mean NTP over mapping targets and monolingual texts — value and gradients.
- The objective registry (``objective.kind`` -> class) and the recipe configs.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from alignx.config import Config, ConfigError, load_config
from alignx.model import AlignXModel
from alignx.objective import AlignXObjective
from alignx.recipes import RECIPE_OBJECTIVES, RECIPES, build_objective, data_hooks, get_recipe, recipe_config_path
from alignx.recipes.afp import CLM_WEIGHT, AFPObjective
from alignx.recipes.clmap import CLMapObjective
from alignx.testing import tiny_causal_lm

VOCAB = 256
HIDDEN = 32
LAYERS = 4


def make_cfg(kind: str, **objective) -> Config:
    cfg = Config()
    cfg.objective.kind = kind
    cfg.objective.kernel_backend = "reference"
    for k, v in objective.items():
        setattr(cfg.objective, k, v)
    return cfg


def afp_cfg(**kw) -> Config:
    """configs/recipes/afp.yaml's objective (tau 0.05, cl weight 1, scale 1, one direction), local negatives."""
    base = {"temperature": 0.05, "lambda_ctr": 1.0, "ctr_scale": 1.0, "symmetric": False, "negatives": "local"}
    return make_cfg("afp", **{**base, **kw})


def right_pad(seqs: list[torch.Tensor], marks: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    t = (max(len(s) for s in seqs) + 7) // 8 * 8
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    mask = torch.zeros_like(ids)
    pool = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
        if marks is not None:
            pool[i, : len(s)] = marks[i]
    return ids, mask, pool


def afp_batch(n: int = 5, pool: str = "mean", seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` rows: an instruction text (left padded, prompt masked) and a pair of sentences (BOS + text + EOS), with
    pool marks on the text tokens (mean) or the last text token (last). Lengths differ per row."""
    g = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for b in range(n):
        prompt, answer = 3 + b % 3, 2 + (b * 2) % 5
        body = torch.randint(4, VOCAB, (prompt + answer,), generator=g)
        seq = torch.cat([torch.tensor([1]), body, torch.tensor([2])])
        lab = seq.clone()
        lab[: 1 + prompt] = -100  # prompt masked; the answer and EOS count
        texts.append(seq)
        labels.append(lab)
    t = (max(len(s) for s in texts) + 7) // 8 * 8
    input_ids = torch.zeros(n, t, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    lab_t = torch.full_like(input_ids, -100)
    for b, (s, lab) in enumerate(zip(texts, labels)):
        input_ids[b, t - len(s) :], attention_mask[b, t - len(s) :], lab_t[b, t - len(s) :] = s, 1, lab
    sents, marks = [], []
    for i in range(2 * n):
        k = 2 + (i * 3) % 6
        sents.append(torch.cat([torch.tensor([1]), torch.randint(4, VOCAB, (k,), generator=g), torch.tensor([2])]))
        m = torch.zeros(k + 2, dtype=torch.long)
        if pool == "mean":
            m[1 : k + 1] = 1
        else:
            m[k] = 1
        marks.append(m)
    pair_ids, pair_mask, pair_pool = right_pad(sents, marks)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": lab_t,
        "span_ids": torch.zeros_like(input_ids),
        "src_lang": torch.zeros(n, dtype=torch.long),
        "tgt_lang": torch.arange(1, n + 1),
        "pair_input_ids": pair_ids,
        "pair_attention_mask": pair_mask,
        "pair_pool": pair_pool,
    }


def afp_oracle(lm, batch: dict, layer: int, tau: float = 0.05, cl_weight: float = 1.0, clm_weight: float = 1.5):
    """AFP's loss the plain way: separate HF forwards with all hidden states, masked means, SimCSE InfoNCE."""
    out = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = out.logits.float()
    clm = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
    )
    h = lm(
        input_ids=batch["pair_input_ids"],
        attention_mask=batch["pair_attention_mask"],
        output_hidden_states=True,
        use_cache=False,
    ).hidden_states[layer]
    m = batch["pair_pool"].unsqueeze(-1).float()
    z = (h.float() * m).sum(1) / m.sum(1)
    n = z.shape[0] // 2
    z0, z1 = F.normalize(z[:n], dim=-1), F.normalize(z[n:], dim=-1)
    cl = F.cross_entropy(z0 @ z1.T / tau, torch.arange(n))
    return cl_weight * cl + clm_weight * clm, cl, clm


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def assert_grads_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rel: float = 1e-5) -> None:
    """Same parameters, and each gradient within ``rel`` of its largest entry (fp32 summation-order noise)."""
    assert got.keys() == want.keys() and len(want) > 0
    for name, w in want.items():
        err = (got[name] - w).abs().max().item()
        assert err <= rel * w.abs().max().item() + 1e-8, f"{name}: max error {err:.3e} (scale {w.abs().max():.3e})"


# ----------------------------------------------------------------------------------------------------------------
# AFP


@pytest.mark.parametrize(
    "pool,layer", [("mean", 2), ("last", 1), ("mean", LAYERS)], ids=["mean-l2", "last-l1", "mean-last-layer"]
)
def test_afp_loss_and_gradients_equal_the_plain_formula(pool: str, layer: int) -> None:
    lm = tiny_causal_lm("llama", vocab_size=VOCAB, num_layers=LAYERS, hidden=HIDDEN, seed=1)
    ref_lm = copy.deepcopy(lm)
    cfg = afp_cfg()
    cfg.model.align_layer = layer
    model = AlignXModel(lm, cfg)
    assert isinstance(model.objective, AFPObjective) and model.lang_head is None
    batch = afp_batch(5, pool)
    out = model(**batch)
    total, cl, clm = afp_oracle(ref_lm, batch, layer)
    torch.testing.assert_close(out["ctr"], cl.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["ntp"], clm.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"].detach(), total.detach(), rtol=1e-5, atol=1e-6)
    assert float(out["lam"]) == 0.0 and int(out["rows_kept"]) == 5
    (2 * out["loss"]).backward()  # a non-unit upstream gradient
    (2 * total).backward()
    assert_grads_close(grads(model.lm), grads(ref_lm))


def test_afp_weights_come_from_the_config_and_the_recipe() -> None:
    lm = tiny_causal_lm("llama", vocab_size=VOCAB, num_layers=LAYERS, hidden=HIDDEN, seed=2)
    batch = afp_batch(4, "mean", seed=3)
    with torch.no_grad():
        base = AlignXModel(copy.deepcopy(lm), afp_cfg())(**batch)
        cfg = afp_cfg(lambda_ctr=0.25, ctr_scale=2.0, temperature=0.2)
        model = AlignXModel(copy.deepcopy(lm), cfg)
        model.objective.clm_weight = 0.5
        out = model(**batch)
        _, cl, clm = afp_oracle(lm, batch, LAYERS // 2, tau=0.2)
    assert CLM_WEIGHT == 1.5
    torch.testing.assert_close(base["loss"], base["ctr"] + 1.5 * base["ntp"])
    torch.testing.assert_close(out["ctr"], 2.0 * cl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], 0.25 * 2.0 * cl + 0.5 * clm, rtol=1e-5, atol=1e-6)


def test_afp_global_negatives_in_one_process_equal_local() -> None:
    import torch.distributed as dist

    from alignx.dist import is_distributed

    created = False
    if not is_distributed():
        import os
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        created = True
    try:
        lm = tiny_causal_lm("llama", vocab_size=VOCAB, num_layers=LAYERS, hidden=HIDDEN, seed=4)
        batch = afp_batch(5, "mean", seed=5)
        local = AlignXModel(copy.deepcopy(lm), afp_cfg())
        glob = AlignXModel(copy.deepcopy(lm), afp_cfg(negatives="global"))
        a, b = local(**batch), glob(**batch)
        for key in ("loss", "ntp", "ctr"):
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
        a["loss"].backward()
        b["loss"].backward()
        assert_grads_close(grads(glob.lm), grads(local.lm))
        assert glob.objective.last_candidates == 5
    finally:
        if created:
            dist.destroy_process_group()


def test_afp_refuses_a_queue_and_packed_batches() -> None:
    with pytest.raises(ConfigError, match="no queue"):
        build_objective(afp_cfg(negatives="global+queue", queue_size=8).objective)
    model = AlignXModel(tiny_causal_lm("llama", vocab_size=VOCAB, num_layers=2, hidden=HIDDEN), afp_cfg())
    batch = afp_batch(2)
    with pytest.raises(ValueError, match="pair_input_ids"):
        model(**{k: v for k, v in batch.items() if k != "pair_input_ids"})
    with pytest.raises(ValueError, match="packed"):
        model(**batch, cu_seqlens=torch.tensor([0, 4]))


# ----------------------------------------------------------------------------------------------------------------
# Cross-lingual mapping


def test_clmap_loss_and_gradients_equal_the_plain_token_mean() -> None:
    lm = tiny_causal_lm("qwen2", vocab_size=VOCAB, num_layers=2, hidden=HIDDEN, seed=6)
    ref_lm = copy.deepcopy(lm)
    model = AlignXModel(lm, make_cfg("clmap"))
    assert isinstance(model.objective, CLMapObjective) and model.lang_head is None
    g = torch.Generator().manual_seed(7)
    rows, labs = [], []
    for src, tgt in [(4, 5), (3, 3), (0, 7), (6, 2)]:  # (0, n): a monolingual row, all tokens count
        seq = torch.cat([torch.tensor([1]), torch.randint(4, VOCAB, (src + tgt + 2,), generator=g), torch.tensor([2])])
        lab = seq.clone()
        if src:
            lab[: 1 + src + 2] = -100  # mapping row: source and the "Tgt:" prompt masked
        rows.append(seq)
        labs.append(lab)
    ids, mask, _ = right_pad(rows)
    labels = torch.full_like(ids, -100)
    for b, lab in enumerate(labs):
        labels[b, : len(lab)] = lab
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    out = model(**batch)
    logits = ref_lm(input_ids=ids, attention_mask=mask).logits.float()
    want = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out["loss"].detach(), want.detach(), rtol=1e-5, atol=1e-6)
    assert float(out["ctr"]) == 0.0 and float(out["lam"]) == 0.0
    out["loss"].backward()
    want.backward()
    assert_grads_close(grads(model.lm), grads(ref_lm))


# ----------------------------------------------------------------------------------------------------------------
# Registry and configs


def test_objective_kind_maps_to_its_class() -> None:
    for kind, cls in (("alignx", AlignXObjective), ("ntp", AlignXObjective), ("afp", AFPObjective)):
        cfg = make_cfg(kind, temperature=0.05)
        assert type(build_objective(cfg.objective)) is cls
    assert type(build_objective(make_cfg("clmap").objective)) is CLMapObjective
    assert set(RECIPE_OBJECTIVES) == {"afp", "clmap"}
    with pytest.raises(ConfigError, match="not implemented by AFPObjective"):
        AFPObjective(make_cfg("alignx").objective)
    assert data_hooks(make_cfg("alignx")) is None and data_hooks(make_cfg("ntp")) is None
    assert data_hooks(make_cfg("afp")).collator is not None
    assert data_hooks(make_cfg("clmap")).micro_batches is not None


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_config_loads_with_its_objective(name: str) -> None:
    recipe = get_recipe(name)
    cfg = load_config(recipe_config_path(name))
    if recipe.kind is not None:
        assert cfg.objective.kind == recipe.kind
    assert cfg.stage2.train_file  # every recipe ends with the same stage 2
    if name == "afp":
        o = cfg.objective
        assert (o.temperature, o.lambda_ctr, o.ctr_scale, o.symmetric, o.negatives) == (0.05, 1.0, 1.0, False, "global")
        assert cfg.data.labels == "response"
    if name == "cpt_sft":
        alignx = load_config(recipe_config_path("alignx"))
        assert cfg.objective.lambda_ctr == cfg.objective.lambda_lam == 0.0
        assert cfg.data.train_file == alignx.data.train_file  # the same stage-1 text
    if name == "sft":
        assert recipe.stage1 is None and recipe.stages == "2"


def test_unknown_recipe_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="valid recipes: alignx, afp, clmap, cpt_sft, sft"):
        get_recipe("dpo")
