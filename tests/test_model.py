"""alignx.model: hooks, gradient checkpointing, the language-matching head's layout, loading, bad input."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from alignx.config import Config, ConfigError, ModelConfig
from alignx.model import (
    AlignXModel,
    LanguageMatchingHead,
    ModelLayoutError,
    ModelSource,
    find_decoder_parts,
    load_causal_lm,
    load_tokenizer,
    resolve_attn_implementation,
    resolve_model_source,
)
from alignx.objective import TERMS
from alignx.testing import tiny_causal_lm

VOCAB = 256
HIDDEN = 32
LAYERS = 4
ARCHS = ["llama", "qwen2", "gemma3"]


def make_cfg(**model) -> Config:
    cfg = Config()
    cfg.objective.kernel_backend = "reference"
    for k, v in model.items():
        setattr(cfg.model, k, v)
    return cfg


def make_batch(b: int = 3, t: int = 16, seed: int = 0) -> dict:
    """Left-padded rows (row 0 padded by 4), source at [6, 9), target at [10, 15), EOS unmarked."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, VOCAB, (b, t), generator=g)
    attention_mask = torch.ones(b, t, dtype=torch.long)
    attention_mask[0, :4] = 0
    span_ids = torch.zeros(b, t, dtype=torch.long)
    span_ids[:, 6:9] = 1
    span_ids[:, 10:15] = 2
    span_ids[1, 7:9] = 0  # rows differ
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": input_ids.masked_fill(attention_mask == 0, -100),
        "span_ids": span_ids,
        "src_lang": torch.arange(b) % 2,
        "tgt_lang": torch.full((b,), 2),
    }


def lm_of(arch: str, layers: int = LAYERS) -> nn.Module:
    return tiny_causal_lm(arch, vocab_size=VOCAB, num_layers=layers, hidden=HIDDEN)


# ----------------------------------------------------------------------------------------------------------------
# Hooks


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("align_layer", [None, 1, LAYERS], ids=["middle", "first", "last"])
def test_hooks_equal_output_hidden_states(arch, align_layer) -> None:
    model = AlignXModel(lm_of(arch), make_cfg(align_layer=align_layer))
    assert model.align_layer == (LAYERS // 2 if align_layer is None else align_layer)
    batch = make_batch()
    with torch.no_grad():
        got = model.run_lm(batch["input_ids"], batch["attention_mask"])
        ref = model.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    assert len(ref.hidden_states) == LAYERS + 1
    torch.testing.assert_close(got.hidden_align, ref.hidden_states[model.align_layer], atol=1e-6, rtol=0)
    torch.testing.assert_close(got.hidden_final, ref.hidden_states[-1], atol=1e-6, rtol=0)
    torch.testing.assert_close(got.logits, ref.logits, atol=1e-6, rtol=0)
    # the final-norm state is the lm_head input, and differs from the last block's (pre-norm) output
    torch.testing.assert_close(model.lm.lm_head(got.hidden_final), ref.logits, atol=1e-5, rtol=1e-5)
    if align_layer == LAYERS:  # HF's hidden_states[N] is the normed state, not block N's raw output
        raw = model.lm.model.layers[-1]
        seen = []
        handle = raw.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            model.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        handle.remove()
        assert not torch.allclose(seen[0], got.hidden_align)
    assert model._capture.tensors == {} and not model._capture.active  # nothing kept after the forward


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_same_loss_and_grads(arch) -> None:
    lm = lm_of(arch)
    plain = AlignXModel(copy.deepcopy(lm), make_cfg(gradient_checkpointing=False)).train()
    ckpt = AlignXModel(lm, make_cfg(gradient_checkpointing=True)).train()
    ckpt.lang_head.load_state_dict(plain.lang_head.state_dict())
    inner = [0, 0]  # runs of block 1's MLP forward: recomputed in backward only under checkpointing
    for i, m in enumerate((plain, ckpt)):
        mlp = m.lm.model.layers[0].mlp
        mlp.forward = _counting(mlp.forward, inner, i)

    batch = make_batch()
    captured = ckpt.run_lm(batch["input_ids"], batch["attention_mask"])
    assert captured.hidden_align.requires_grad and captured.hidden_final.requires_grad
    assert captured.hidden_align.grad_fn is not None
    inner[1] = 0

    want, got = plain(**batch), ckpt(**batch)
    want["loss"].backward()
    got["loss"].backward()
    assert inner == [1, 2], f"block-1 MLP forwards (plain, checkpointed): {inner}"
    for term in ("loss", "ntp", "ctr", "lam"):
        torch.testing.assert_close(got[term], want[term], atol=1e-6, rtol=1e-6, msg=term)
        assert want[term].item() > 0
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)


def _counting(fn, counter: list[int], i: int):
    def wrapped(*args, **kwargs):
        counter[i] += 1
        return fn(*args, **kwargs)

    return wrapped


def test_ntp_kind_has_no_head_and_no_hooks() -> None:
    cfg = make_cfg()
    cfg.objective.kind = "ntp"
    model = AlignXModel(lm_of("llama"), cfg)
    assert model.lang_head is None and model._hooks == []
    assert not any(k.startswith("lang_head.") for k in model.state_dict())
    out = model.run_lm(make_batch()["input_ids"])
    assert out.hidden_align is None and out.hidden_final is None


def test_forward_returns_the_contract_terms() -> None:
    model = AlignXModel(lm_of("llama"), make_cfg()).train()
    out = model(**make_batch())
    assert set(out) == set(TERMS)
    assert out["loss"].requires_grad and out["loss"].dim() == 0 and out["loss"].dtype == torch.float32
    for k in ("ntp", "ctr", "lam"):
        assert out[k].dim() == 0 and out[k].dtype == torch.float32 and not out[k].requires_grad, k
    for k in ("rows_kept", "rows_dropped"):
        assert out[k].dim() == 0 and out[k].dtype == torch.int64, k
    assert int(out["rows_kept"]) == 3 and int(out["rows_dropped"]) == 0
    want = out["ntp"] + 0.3 * out["ctr"] + 0.4 * out["lam"]
    torch.testing.assert_close(out["loss"].detach(), want)


# ----------------------------------------------------------------------------------------------------------------
# The head


class OfficialMLP(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(2 * d, h, bias=False)
        self.up_proj = nn.Linear(2 * d, h, bias=False)
        self.down_proj = nn.Linear(h, 2, bias=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(z)) * self.up_proj(z))


def test_head_keeps_official_names_layout_and_init() -> None:
    model = AlignXModel(lm_of("llama"), make_cfg())
    head_keys = {k: v.shape for k, v in model.state_dict().items() if k.startswith("lang_head.")}
    h, d = 128, HIDDEN
    assert head_keys == {
        "lang_head.gate_proj.weight": (h, 2 * d),
        "lang_head.up_proj.weight": (h, 2 * d),
        "lang_head.down_proj.weight": (2, h),
    }
    assert model.hf_state_dict_keys_excluded == ("lang_head.",)
    # everything else is exactly the HF model's own state dict
    rest = {k[len("lm.") :] for k in model.state_dict() if not k.startswith("lang_head.")}
    assert rest == set(model.lm.state_dict())
    big = LanguageMatchingHead(256, 128, init_std=0.02)
    for w in (big.gate_proj.weight, big.up_proj.weight):
        assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001


def test_head_loads_an_official_state_dict() -> None:
    d, h = HIDDEN, 16
    official = OfficialMLP(d, h)
    for p in official.parameters():
        nn.init.normal_(p, std=0.5)
    z = torch.randn(3, 5, 2 * d)
    for state in (
        official.state_dict(),
        {f"language_matching_classifier.{k}": v for k, v in official.state_dict().items()},
    ):
        head = LanguageMatchingHead(d, h)
        if next(iter(state)).startswith("language_matching_classifier."):
            head.load_official_state_dict(state)
        else:
            head.load_state_dict(state, strict=True)
        torch.testing.assert_close(head.pair_logits(z), official(z))
    with pytest.raises(KeyError, match="gate_proj"):
        LanguageMatchingHead(d, h).load_official_state_dict({"up_proj.weight": official.up_proj.weight})


def test_head_loss_is_the_pairwise_formula() -> None:
    torch.manual_seed(1)
    head = LanguageMatchingHead(8, 16, init_std=0.3)
    emb, lang = torch.randn(6, 8), torch.tensor([0, 1, 0, 2, 2, 1])
    z = torch.cat([emb.unsqueeze(1).expand(6, 6, 8), emb.unsqueeze(0).expand(6, 6, 8)], dim=-1)
    truth = (lang[:, None] == lang[None, :]).long()
    want = nn.functional.cross_entropy(head.pair_logits(z).reshape(-1, 2), truth.reshape(-1))
    torch.testing.assert_close(head(emb, lang, backend="reference"), want, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="emb"):
        head(torch.randn(6, 9), lang)


# ----------------------------------------------------------------------------------------------------------------
# Layouts and bad input


class NoLayersLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))


def test_unknown_layout_is_a_clear_error() -> None:
    with pytest.raises(ModelLayoutError, match="NoLayersLM.*decoder blocks"):
        find_decoder_parts(NoLayersLM())
    with pytest.raises(ModelLayoutError, match="NoLayersLM"):
        AlignXModel(NoLayersLM(), make_cfg())


def test_other_layouts_are_found() -> None:
    from transformers import AutoModelForCausalLM, GPT2Config, OPTConfig

    gpt2 = AutoModelForCausalLM.from_config(
        GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)
    )
    layers, norm = find_decoder_parts(gpt2)
    assert layers is gpt2.transformer.h and norm is gpt2.transformer.ln_f
    opt_cfg = OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2)
    opt = AutoModelForCausalLM.from_config(opt_cfg)  # blocks and norm under model.decoder
    layers, norm = find_decoder_parts(opt)
    assert layers is opt.model.decoder.layers and norm is opt.model.decoder.final_layer_norm
    model = AlignXModel(gpt2.eval(), make_cfg())  # the hooks work there too (eval: no dropout)
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        got = model.run_lm(ids)
        ref = gpt2(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(got.hidden_align, ref.hidden_states[1])
    torch.testing.assert_close(got.hidden_final, ref.hidden_states[-1])


@pytest.mark.parametrize("layer", [0, LAYERS + 1, -1])
def test_align_layer_out_of_range_is_a_config_error(layer) -> None:
    with pytest.raises(ConfigError, match="align_layer"):
        AlignXModel(lm_of("llama"), make_cfg(align_layer=layer))


# ----------------------------------------------------------------------------------------------------------------
# Loading


def _save_dirs_without_pad(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate("hello world habari dunia".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    assert fast.pad_token is None
    fast.save_pretrained(tmp_path / "tok")
    lm_of("qwen2", layers=2).save_pretrained(tmp_path / "lm")
    return tmp_path / "tok", tmp_path / "lm"


def test_load_from_a_local_hf_directory(tmp_path) -> None:
    tok_dir, lm_dir = _save_dirs_without_pad(tmp_path)
    path = str(lm_dir)
    tok = load_tokenizer(ModelConfig(name_or_path=path, tokenizer=str(tok_dir)))
    assert tok.is_fast and tok.pad_token == "</s>" and tok.pad_token_id == 1  # EOS doubles as pad
    lm = load_causal_lm(ModelConfig(name_or_path=path, dtype="bf16"))
    assert type(lm).__name__ == "Qwen2ForCausalLM"
    assert all(p.dtype == torch.bfloat16 for p in lm.parameters())
    assert lm.config._attn_implementation == "sdpa" and lm.config.use_cache is False
    model = AlignXModel(lm, make_cfg())
    assert model.lang_head.gate_proj.weight.dtype == torch.bfloat16  # the head follows the model's dtype
    out = model(**make_batch())
    assert torch.isfinite(out["loss"]).item()


def test_tiny_names_resolve_through_the_cache(tmp_path) -> None:
    cfg = ModelConfig(name_or_path="tiny-gemma3", cache_dir=str(tmp_path))
    lm = load_causal_lm(cfg)
    tok = load_tokenizer(cfg)
    where = Path(resolve_model_source("tiny-gemma3", str(tmp_path)).path)
    assert type(lm).__name__ == "Gemma3ForCausalLM"
    assert tmp_path in where.parents and (where / "config.json").is_file()  # created in the configured cache
    assert tok.pad_token_id is not None and len(tok) <= lm.config.vocab_size


def test_packaged_names_go_through_alignx_models(monkeypatch, tmp_path) -> None:
    import alignx.models

    calls = []
    monkeypatch.setattr(alignx.models, "resolve_pretrained", lambda name, cache: calls.append((name, cache)) or "/x")
    assert resolve_model_source("gemma3-270m", str(tmp_path)) == ModelSource("/x", None)
    assert calls == [("gemma3-270m", str(tmp_path))]
    assert resolve_model_source("some/hub-id") == ModelSource("some/hub-id", None)  # passed through untouched
    assert calls == [("gemma3-270m", str(tmp_path))]


def test_attn_implementation_choice() -> None:
    want = "flash_attention_2" if torch.cuda.is_available() and _has_flash_attn() else "sdpa"
    assert resolve_attn_implementation("auto", torch.bfloat16) == want
    assert resolve_attn_implementation("auto", torch.float32) == "sdpa"  # FlashAttention has no fp32 kernels
    assert resolve_attn_implementation("eager", torch.float32) == "eager"


def _has_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return True


# ----------------------------------------------------------------------------------------------------------------
# Trimmed logits (model.trim_logits): the LM head runs from the first counted prediction only


@pytest.mark.parametrize("arch", ARCHS)
def test_trim_logits_same_terms_and_gradients(arch, monkeypatch) -> None:
    torch.manual_seed(0)
    lm = lm_of(arch)
    batch = make_batch(b=4)
    labels = batch["labels"].clone()
    labels[:, :10] = -100  # the response: positions 10.. (predicted from 9..); row 3 counts from 12 only
    labels[3, :12] = -100
    batch["labels"] = labels
    assert AlignXModel.logits_to_keep(labels) == 16 - 9
    assert AlignXModel.logits_to_keep(torch.full((2, 5), -100)) == 1
    assert AlignXModel.logits_to_keep(torch.zeros(2, 5, dtype=torch.long)) == 0  # all

    results = {}
    for trim in (False, True):
        torch.manual_seed(1)  # the same language-matching head
        model = AlignXModel(copy.deepcopy(lm), make_cfg(trim_logits=trim, fused_ce=False))
        assert model.trim_logits is trim
        widths = []
        run_lm = model.run_lm

        def spy(*args, _run=run_lm, _w=widths, **kwargs):
            out = _run(*args, **kwargs)
            _w.append(out.logits.shape[1])
            return out

        monkeypatch.setattr(model, "run_lm", spy)
        terms = model(**batch)
        terms["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[trim] = (terms, grads, widths[0])
    (t0, g0, w0), (t1, g1, w1) = results[False], results[True]
    assert (w0, w1) == (16, 7)
    for k in TERMS:
        torch.testing.assert_close(t1[k], t0[k], atol=1e-6, rtol=1e-6)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-5, msg=n)
