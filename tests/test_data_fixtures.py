"""The offline fixtures of ``alignx.testing`` that every engineer's tests build on."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest
import torch

from alignx import testing
from alignx.data import normalize_stage1, normalize_stage2, read_jsonl
from alignx.testing import (
    CORPUS,
    test_tokenizer,
    tiny_causal_lm,
    tiny_pretrained,
    write_instructions_jsonl,
    write_pairs_jsonl,
)


def test_tokenizer_is_deterministic_byte_level_and_adds_bos() -> None:
    first = testing._tokenizer_json()
    testing._tokenizer_json.cache_clear()
    assert testing._tokenizer_json() == first  # retrained from scratch: identical
    tok = test_tokenizer()
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert tok.is_fast and len(tok) <= testing.TOKENIZER_VOCAB_SIZE
    texts = CORPUS + ["👨\u200d👩\u200d👧 x", unicodedata.normalize("NFD", "Tiếng Việt"), "  spaces\t\n", "日本語"]
    for text in texts:
        enc = tok(text, return_offsets_mapping=True)
        assert enc["input_ids"][0] == tok.bos_token_id
        assert tok.decode(enc["input_ids"], skip_special_tokens=True) == text  # byte-level: lossless
        assert len(enc["offset_mapping"]) == len(enc["input_ids"])
    assert test_tokenizer() is not test_tokenizer()  # fresh objects: no state leaks between tests


@pytest.mark.parametrize(("arch", "cls"), [("llama", "Llama"), ("qwen2", "Qwen2"), ("gemma3", "Gemma3")])
def test_tiny_causal_lm(arch: str, cls: str) -> None:
    tok = test_tokenizer()
    state = torch.random.get_rng_state()
    model = tiny_causal_lm(arch, num_layers=2, hidden=32, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is not consumed
    assert type(model).__name__ == f"{cls}ForCausalLM"
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == len(tok)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ids = torch.tensor([tok("Habari yako? 你好")["input_ids"]])
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()
    same = tiny_causal_lm(arch, num_layers=2, hidden=32, seed=3)
    other = tiny_causal_lm(arch, num_layers=2, hidden=32, seed=4)
    pairs = list(zip(model.state_dict().values(), same.state_dict().values(), other.state_dict().values()))
    assert all(torch.equal(a, b) for a, b, _ in pairs)
    assert not all(torch.equal(a, c) for a, _, c in pairs)


def test_tiny_pretrained_directories_load_with_auto_classes(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_pretrained("tiny-qwen2", tmp_path)
    assert path.parent == tmp_path and path.name.startswith("tiny-qwen2-")
    stamp = (path / "config.json").stat().st_mtime_ns
    assert tiny_pretrained("tiny-qwen2", tmp_path) == path
    assert (path / "config.json").stat().st_mtime_ns == stamp  # created once
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert tok("hello")["input_ids"] == test_tokenizer()("hello")["input_ids"]
    with pytest.raises(ValueError, match="tiny-llama, tiny-qwen2, tiny-gemma3"):
        tiny_pretrained("tiny-mistral", tmp_path)


def test_synthetic_records_are_valid(tmp_path: Path) -> None:
    pairs = read_jsonl(write_pairs_jsonl(tmp_path / "p.jsonl", 24, langs=("sw", "hi", "zh")))
    assert len(pairs) == 24
    assert all(normalize_stage1(r)["drop"] == "" for r in pairs)
    directions = {(r["src_lang"], r["tgt_lang"]) for r in pairs}
    assert directions == {(a, b) for x in ("sw", "hi", "zh") for a, b in (("en", x), (x, "en"))}
    assert read_jsonl(write_pairs_jsonl(tmp_path / "q.jsonl", 24, langs=("sw", "hi", "zh"))) == pairs  # seeded
    ins = read_jsonl(write_instructions_jsonl(tmp_path / "i.jsonl", 6))
    assert all(normalize_stage2(r)["drop"] == "" for r in ins)
    assert {bool(r["input"]) for r in ins} == {True, False}
    with pytest.raises(ValueError, match="no test sentences"):
        write_pairs_jsonl(tmp_path / "x.jsonl", 2, langs=("xh",))
