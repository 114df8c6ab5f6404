"""The AlignX objective against the official formula, term by term, on tiny random models.

The oracle here (:func:`official_terms`) is a plain-torch transcription of how the official AlignX code computes its
loss (``ictnlp/AlignX``, modeling file; notes/method.md §1.5–1.10): filter rows with ``src_tgt_index[:, -4] == 2``
under left padding, run the HF model on the kept rows with ``output_hidden_states=True``, masked-product mean
pooling, the expand-then-``CosineSimilarity`` [n, n, d] similarity with a log-softmax over dim 0 and the 1/2,
the repeated [2B, 2B, 2d] pair tensor through an ``nn.Linear`` SwiGLU MLP, cross-entropy means, weights 0.3 / 0.4.
It shares no code path with ``alignx.objective`` or ``alignx.kernels``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import make_batch
from torch import nn

from alignx.config import Config, ConfigError, ObjectiveConfig
from alignx.model import AlignXModel
from alignx.objective import AlignXObjective, Candidates, lm_loss_sum, shift_span_ids
from alignx.testing import tiny_causal_lm

VOCAB = 256
HIDDEN = 32
LAYERS = 4


# ----------------------------------------------------------------------------------------------------------------
# Fixtures (make_batch, shared with test_similarity.py, is in helpers.py)


# Row 2 has 2 target tokens (dropped by the official filter); row 1 exactly 3 (kept); lengths differ (left padding).
MIXED_ROWS = [(3, 4, 2, 5), (2, 3, 2, 3), (3, 5, 2, 2), (2, 2, 3, 6), (1, 6, 2, 4)]
MIXED_LANGS = [(0, 1), (1, 0), (0, 2), (2, 0), (0, 3)]
SINGLE_ROWS = [(3, 4, 2, 5), (2, 3, 2, 1), (3, 5, 2, 2)]  # one row kept: no contrastive term
SINGLE_LANGS = [(0, 1), (1, 0), (0, 2)]


def response_only(batch: dict) -> dict:
    out = dict(batch)
    out["labels"] = batch["labels"].masked_fill(batch["span_ids"] != 2, -100)
    return out


def make_cfg(**objective) -> Config:
    cfg = Config()
    cfg.objective.kernel_backend = "reference"
    for k, v in objective.items():
        setattr(cfg.objective, k, v)
    return cfg


def make_model(arch: str = "llama", **objective) -> AlignXModel:
    return AlignXModel(tiny_causal_lm(arch, vocab_size=VOCAB, num_layers=LAYERS, hidden=HIDDEN), make_cfg(**objective))


class OfficialLanguageMatchingMLP(nn.Module):
    """The official head's layout: a Llama MLP whose widths are 2d -> h -> 2, SiLU, no bias."""

    def __init__(self, d: int, h: int = 128) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(2 * d, h, bias=False)
        self.up_proj = nn.Linear(2 * d, h, bias=False)
        self.down_proj = nn.Linear(h, 2, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def official_terms(lm, mlp, batch, align_layer, tau=0.1, lambda_ctr=0.3, lambda_lam=0.4) -> dict:
    """The official stage-1 loss, transcribed idiom by idiom (left padding assumed, as the official collator)."""
    index = batch["span_ids"]
    keep = index[:, -4] == 2
    input_ids, attention_mask = batch["input_ids"][keep], batch["attention_mask"][keep]
    labels, index = batch["labels"][keep], index[keep]
    src_lang, tgt_lang = batch["src_lang"][keep], batch["tgt_lang"][keep]
    n = input_ids.shape[0]

    out = lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    logits = out.logits.float()
    ntp = nn.CrossEntropyLoss()(
        logits[..., :-1, :].contiguous().view(-1, logits.shape[-1]), labels[..., 1:].reshape(-1)
    )

    def masked_mean(h, idx, mark):
        m = idx == mark
        return (h * m.unsqueeze(-1)).sum(dim=1) / m.sum(dim=1).unsqueeze(-1)

    if n > 1:
        h = out.hidden_states[align_layer]
        anchor, contrast = masked_mean(h, index, 1), masked_mean(h, index, 2)
        d = anchor.shape[-1]
        sim = nn.CosineSimilarity(dim=-1)(anchor.expand((n, n, d)), contrast.expand((n, n, d)).transpose(0, 1))
        ctr = -nn.LogSoftmax(0)(sim / tau).diag().sum() / n / 2
    else:
        ctr = torch.zeros(())

    hf = out.hidden_states[-1][..., :-1, :]
    idx = index[..., 1:]
    emb = torch.cat([masked_mean(hf, idx, 1), masked_mean(hf, idx, 2)], dim=0)
    lang = torch.cat([src_lang, tgt_lang], dim=0)
    m = emb.shape[0]
    pairs = torch.cat([emb.unsqueeze(1).repeat(1, m, 1), emb.unsqueeze(0).repeat(m, 1, 1)], dim=-1)  # [m, m, 2d]
    pair_logits = mlp(pairs)
    truth = (lang.unsqueeze(1).repeat(1, m) == lang.unsqueeze(0).repeat(m, 1)).long()
    lam = nn.CrossEntropyLoss()(pair_logits.view(-1, 2), truth.view(-1))
    loss = ntp + lambda_ctr * ctr + lambda_lam * lam
    return {"loss": loss, "ntp": ntp, "ctr": ctr, "lam": lam, "keep": keep}


def grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for k, p in module.named_parameters()}


# ----------------------------------------------------------------------------------------------------------------
# Reference mode == the official formula


@pytest.mark.parametrize(
    "arch,rows,langs,labels",
    [
        ("llama", MIXED_ROWS, MIXED_LANGS, "all"),
        ("qwen2", MIXED_ROWS, MIXED_LANGS, "all"),
        ("gemma3", MIXED_ROWS, MIXED_LANGS, "all"),
        ("llama", MIXED_ROWS, MIXED_LANGS, "response"),
        ("llama", SINGLE_ROWS, SINGLE_LANGS, "all"),
    ],
    ids=["llama", "qwen2", "gemma3", "llama-response-labels", "llama-one-row-kept"],
)
def test_reference_equals_official_formula(arch, rows, langs, labels) -> None:
    model = make_model(arch)
    batch = make_batch(rows, langs)
    if labels == "response":
        batch = response_only(batch)
    mlp = OfficialLanguageMatchingMLP(HIDDEN)
    mlp.load_state_dict(model.lang_head.state_dict())  # same names and shapes as the official head

    official = official_terms(model.lm, mlp, batch, model.align_layer)
    official["loss"].backward()
    want_lm, want_head = grads(model.lm), grads(mlp)
    model.zero_grad(set_to_none=True)

    ours = model(**batch)
    ours["loss"].backward()
    for term in ("loss", "ntp", "ctr", "lam"):
        torch.testing.assert_close(ours[term], official[term].detach().float(), atol=1e-5, rtol=1e-5, msg=term)
    n_kept = int(official["keep"].sum())
    assert n_kept < len(rows), "the batch must contain a dropped row"
    assert int(ours["rows_kept"]) == n_kept and int(ours["rows_dropped"]) == len(rows) - n_kept
    assert torch.equal(model.objective.keep_rows(batch["span_ids"]), official["keep"])
    if n_kept == 1:
        assert float(ours["ctr"]) == 0.0 and float(ours["lam"]) > 0
    for name, g in grads(model.lm).items():
        torch.testing.assert_close(g, want_lm[name], atol=1e-5, rtol=1e-4, msg=name)
    for name, g in grads(model.lang_head).items():
        torch.testing.assert_close(g, want_head[name], atol=1e-5, rtol=1e-4, msg=name)


def test_defaults_are_the_reference_settings() -> None:
    cfg = ObjectiveConfig()
    assert (cfg.kind, cfg.temperature, cfg.lambda_ctr, cfg.lambda_lam, cfg.ctr_scale) == ("alignx", 0.1, 0.3, 0.4, 0.5)
    assert (cfg.symmetric, cfg.negatives, cfg.lam_hidden, cfg.lam_init_std) == (False, "local", 128, 0.02)
    assert cfg.include_self_pairs


# ----------------------------------------------------------------------------------------------------------------
# Options and kinds


def _hand_pooled(lm, batch, layer):
    out = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    h = out.hidden_states[layer]
    src, tgt = (batch["span_ids"] == 1).float(), (batch["span_ids"] == 2).float()
    return (src.unsqueeze(-1) * h).sum(1) / src.sum(1, keepdim=True), (tgt.unsqueeze(-1) * h).sum(1) / tgt.sum(
        1, keepdim=True
    )


def test_symmetric_equals_hand_formula() -> None:
    rows, langs = [(3, 4, 2, 5), (2, 3, 2, 3), (2, 2, 3, 6), (1, 6, 2, 4)], MIXED_LANGS[:4]
    batch = make_batch(rows, langs, seed=1)
    one_way = make_model(symmetric=False)
    sym = copy.deepcopy(one_way)  # same weights and head
    sym.objective.cfg.symmetric = True
    with torch.no_grad():
        got, base = sym(**batch), one_way(**batch)
        hx, hy = _hand_pooled(sym.lm, batch, sym.align_layer)
    s = F.normalize(hx, dim=-1) @ F.normalize(hy, dim=-1).t() / 0.1  # s[i, j] = cos(x_i, y_j) / tau
    target = torch.arange(len(rows))
    want = 0.5 * 0.5 * (F.cross_entropy(s, target) + F.cross_entropy(s.t(), target))
    torch.testing.assert_close(got["ctr"], want, atol=1e-5, rtol=1e-5)
    assert abs(float(got["ctr"] - base["ctr"])) > 1e-4, "the symmetric option must change the contrastive term"
    torch.testing.assert_close(got["ntp"], base["ntp"])
    torch.testing.assert_close(got["lam"], base["lam"])


def test_ntp_kind_is_the_hf_loss_without_filter_or_head() -> None:
    model = make_model(kind="ntp")
    assert model.lang_head is None
    for batch in (make_batch(MIXED_ROWS, MIXED_LANGS), response_only(make_batch(MIXED_ROWS, MIXED_LANGS))):
        out = model(batch["input_ids"], batch["attention_mask"], batch["labels"])  # no spans, no languages
        hf = model.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        torch.testing.assert_close(out["loss"], hf.loss, atol=1e-5, rtol=1e-5)
        assert float(out["ctr"]) == 0.0 and float(out["lam"]) == 0.0
        assert int(out["rows_kept"]) == len(MIXED_ROWS) and int(out["rows_dropped"]) == 0


def test_gradients_reach_the_head_and_the_lm_at_the_hooked_points() -> None:
    model = make_model()
    batch = make_batch(MIXED_ROWS, MIXED_LANGS)
    out = model.run_lm(batch["input_ids"], batch["attention_mask"])
    terms = model.objective(out.logits, out.hidden_align, out.hidden_final, batch, model.lang_head)
    layers = model.lm.model.layers
    k = model.align_layer

    terms["ctr"].backward(retain_graph=True)  # layer-k states: blocks 1..k only, never the head
    for i, layer in enumerate(layers):
        g = sum(p.grad.abs().sum() for p in layer.parameters() if p.grad is not None)
        assert (g > 0) == (i < k), f"block {i + 1}: contrastive gradient {g} (align layer {k})"
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.lang_head.parameters())
    model.zero_grad(set_to_none=True)

    terms["lam"].backward(retain_graph=True)  # final-norm states: the head, the final norm and every block
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.lang_head.parameters())
    assert model.lm.model.norm.weight.grad.abs().sum() > 0
    assert all(any(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters()) for layer in layers)
    assert model.lm.lm_head.weight.grad is None  # lm_head comes after the final norm
    model.zero_grad(set_to_none=True)

    terms["loss"].backward()
    assert model.lm.lm_head.weight.grad.abs().sum() > 0
    assert model.lm.model.embed_tokens.weight.grad.abs().sum() > 0


def test_all_rows_dropped_gives_zero_loss_touching_every_parameter() -> None:
    model = make_model()
    batch = make_batch([(3, 4, 2, 2), (2, 3, 2, 1)], [(0, 1), (1, 0)])
    out = model(**batch)
    assert out["loss"].item() == 0.0 and torch.isfinite(out["loss"]).item()
    assert int(out["rows_kept"]) == 0 and int(out["rows_dropped"]) == 2
    out["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient (ZeRO would see a different graph on this rank)"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() == 0, name


def test_row_without_source_is_dropped_not_nan() -> None:
    model = make_model()
    batch = make_batch([(3, 4, 2, 5), (2, 0, 2, 4), (2, 3, 2, 4)], [(0, 1), (1, 0), (0, 2)])
    out = model(**batch)
    assert int(out["rows_dropped"]) == 1
    assert all(torch.isfinite(out[k]) for k in ("loss", "ntp", "ctr", "lam"))


def test_batch_centred_contrastive() -> None:
    """center='batch': the InfoNCE of the states minus the mean of all sources and targets; it sees through a huge
    shared direction that leaves the uncentred cosine at chance."""
    torch.manual_seed(5)
    h_src, h_tgt = torch.randn(6, 16), torch.randn(6, 16)
    h_tgt = h_src + 0.3 * h_tgt  # parallel rows are close
    shared = torch.zeros(16)
    shared[0] = 1e4  # a massive activation on every state
    cfg = make_cfg().objective
    plain = AlignXObjective(cfg)
    cfg_c = make_cfg().objective
    cfg_c.center = "batch"
    centred = AlignXObjective(cfg_c)
    mean = torch.cat([h_src, h_tgt]).mean(0)
    want = 0.5 * F.cross_entropy(F.normalize(h_src - mean, dim=-1) @ F.normalize(h_tgt - mean, dim=-1).t() / 0.1,
                                 torch.arange(6))  # fmt: skip
    torch.testing.assert_close(centred.contrastive_loss(h_src, h_tgt), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(centred.contrastive_loss(h_src + shared, h_tgt + shared), want, atol=1e-4, rtol=1e-4)
    chance = 0.5 * math.log(6)
    assert abs(float(plain.contrastive_loss(h_src + shared, h_tgt + shared)) - chance) < 1e-3
    assert float(want) < chance - 0.5
    cfg_q = make_cfg().objective
    cfg_q.center, cfg_q.negatives = "batch", "global+queue"
    with pytest.raises(ConfigError, match="center='batch'"):
        AlignXObjective(cfg_q)


def test_contrastive_candidates_come_from_the_seam() -> None:
    """A subclass that adds detached extra negatives changes only the candidate set, not the formula."""
    torch.manual_seed(3)
    h_src, h_tgt, extra = torch.randn(4, 16), torch.randn(4, 16), torch.randn(5, 16)

    class WithQueue(AlignXObjective):
        def gather_candidates(self, emb: torch.Tensor) -> Candidates:
            base = super().gather_candidates(emb)
            return Candidates(torch.cat([base.embeddings, extra]), base.positive_index, emb.shape[0])

    cfg = make_cfg().objective
    for objective, cands in ((AlignXObjective(cfg), h_tgt), (WithQueue(cfg), torch.cat([h_tgt, extra]))):
        got = objective.contrastive_loss(h_src, h_tgt)
        logits = F.normalize(h_src, dim=-1) @ F.normalize(cands, dim=-1).t() / 0.1
        torch.testing.assert_close(got, 0.5 * F.cross_entropy(logits, torch.arange(4)), atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Pieces and bad input


def _ce_want(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    v = logits.shape[-1]
    return F.cross_entropy(logits.float()[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1), reduction="sum")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [6 * 11, 3 * 11, 1 << 20])  # one row per chunk; rows cut along time; one chunk
def test_shift_span_ids_and_lm_loss_sum(dtype, chunk) -> None:
    span = torch.tensor([[0, 1, 1, 0, 2, 2, 2, 0]])
    assert shift_span_ids(span).tolist() == [[1, 1, 0, 2, 2, 2, 0, 0]]
    logits = torch.randn(3, 7, 11, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :4] = -100
    labels[2] = -100
    total, count = lm_loss_sum(logits, labels, chunk_elements=chunk)
    want = _ce_want(logits, labels)
    torch.testing.assert_close(total, want, atol=1e-4, rtol=1e-5)
    assert int(count) == int((labels[:, 1:] != -100).sum())
    up = torch.tensor(2.5)  # a non-unit upstream gradient
    (g,) = torch.autograd.grad(total, logits, up)
    (g_want,) = torch.autograd.grad(want, logits, up)
    assert g.dtype == dtype and g.shape == logits.shape
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(g.float(), g_want.float(), atol=tol, rtol=tol)
    assert (g[2] == 0).all() and (g[:, -1] == 0).all()  # nothing counted: zero gradient


def test_lm_loss_sum_tail_logits_and_nonfinite_padding() -> None:
    """Logits of the last K positions only (HF logits_to_keep) give the loss and gradient of the full logits, and a
    non-finite logit at an ignored position leaks into neither."""
    torch.manual_seed(0)
    full = torch.randn(2, 9, 13, dtype=torch.float64).float().requires_grad_(True)
    labels = torch.randint(0, 13, (2, 9))
    labels[:, :5] = -100  # counted labels from position 5: predicted by positions 4.. -> K = 9 - 4 = 5
    total, count = lm_loss_sum(full, labels)
    (g_full,) = torch.autograd.grad(total, full)
    tail = full.detach()[:, 4:].clone().requires_grad_(True)
    total_k, count_k = lm_loss_sum(tail, labels, chunk_elements=13)
    (g_tail,) = torch.autograd.grad(total_k, tail)
    torch.testing.assert_close(total_k, total)
    assert int(count_k) == int(count) == 8
    torch.testing.assert_close(g_tail, g_full[:, 4:])
    assert (g_full[:, :4] == 0).all()
    poisoned = full.detach().clone()
    poisoned[:, :3] = float("nan")
    poisoned[0, 1, 2] = float("inf")
    poisoned.requires_grad_(True)
    total_p, _ = lm_loss_sum(poisoned, labels)
    (g_p,) = torch.autograd.grad(total_p, poisoned)
    torch.testing.assert_close(total_p, total)
    assert torch.isfinite(g_p).all()
    with pytest.raises(ValueError, match="last 1..9 positions"):
        lm_loss_sum(torch.randn(2, 10, 13), labels)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("kind", "afp", "objective.kind"),
        ("temperature", 0.0, "tau|temp"),
    ],
)
def test_unavailable_options_are_config_errors(field, value, match) -> None:
    cfg = ObjectiveConfig()
    setattr(cfg, field, value)
    with pytest.raises(ConfigError, match=match):
        AlignXObjective(cfg)


def test_missing_batch_keys_are_named() -> None:
    model = make_model()
    batch = make_batch(MIXED_ROWS, MIXED_LANGS)
    with pytest.raises(ValueError, match="span_ids"):
        model(batch["input_ids"], batch["attention_mask"], batch["labels"])


# ----------------------------------------------------------------------------------------------------------------
# The objective does not change with the implementation of the ops


def _exported_ops() -> list[str]:
    import alignx.kernels as kernels

    return [n for n in ("span_mean_pool", "info_nce", "lang_match_loss") if hasattr(kernels, n)]


@pytest.mark.skipif(not _exported_ops(), reason="alignx.kernels exports none of the fused ops yet")
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_fast_ops_give_the_reference_objective(backend) -> None:
    ref = make_model()
    fast = copy.deepcopy(ref)
    fast.objective.cfg.kernel_backend = backend
    batch = make_batch(MIXED_ROWS, MIXED_LANGS)
    want, got = ref(**batch), fast(**batch)
    want["loss"].backward()
    got["loss"].backward()
    for term in ("loss", "ntp", "ctr", "lam"):
        torch.testing.assert_close(got[term], want[term], atol=1e-5, rtol=1e-5, msg=term)
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
