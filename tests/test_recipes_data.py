"""The recipes' records -> rows -> batches, with the offline test tokenizer: which tokens are pooled, which are
labelled, which rows are dropped and why, the AFP collator, the language-balanced order and the record builders."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from alignx.config import Config
from alignx.data import DataError
from alignx.data.sources import Unit
from alignx.languages import lang_id
from alignx.recipes import afp, clmap
from alignx.testing import test_tokenizer


@pytest.fixture(scope="module")
def tok():
    return test_tokenizer()


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path


def cfg(labels: str = "response", cutoff: int = 128) -> Config:
    c = Config()
    c.data.labels = labels
    c.data.cutoff_len = cutoff
    c.data.eval_size = 0
    return c


AFP_REC = {
    "sent0": "In the beginning was the Word.",
    "sent1": "Hapo mwanzo kulikuwako Neno.",
    "lang0": "en",
    "lang1": "sw",
    "instruction": "Continue the passage with the verse that follows.",
    "input": "Hapo mwanzo kulikuwako Neno.",
    "output": "The same was in the beginning with God.",
    "input_lang": "sw",
    "output_lang": "en",
    "task": "next_verse",
}


def decode(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=False)


# ----------------------------------------------------------------------------------------------------------------
# AFP rows


@pytest.mark.parametrize("pool", ["mean", "last"])
def test_afp_rows_pool_the_text_tokens_and_label_the_answer(tok, tmp_path: Path, pool: str) -> None:
    path = write(tmp_path / "afp.jsonl", [{**AFP_REC, "pool": pool}])
    prep = afp.prepare(cfg(), tok, train_file=path, verbose=False)
    row = prep.train[0]
    text = f"{AFP_REC['instruction']} {AFP_REC['input']} Answer in English: {AFP_REC['output']}"
    assert decode(tok, row["input_ids"]) == tok.bos_token + text + tok.eos_token
    labelled = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
    assert labelled[-1] == tok.eos_token_id  # the answer and EOS count, the prompt does not
    assert decode(tok, labelled[:-1]).strip() == AFP_REC["output"]
    for key, sent in (("pair_a", "sent0"), ("pair_b", "sent1")):
        ids, marks = row[f"{key}_ids"], row[f"{key}_pool"]
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id  # raw text, no prompt
        assert decode(tok, ids[1:-1]) == AFP_REC[sent]
        if pool == "mean":
            assert marks == [0] + [1] * (len(ids) - 2) + [0]  # every text token, no BOS / EOS
        else:
            assert marks == [0] * (len(ids) - 2) + [1, 0]  # the last text token
    assert (row["src_lang"], row["tgt_lang"]) == (lang_id("en"), lang_id("sw"))
    assert row["length"] == len(row["input_ids"]) + len(row["pair_a_ids"]) + len(row["pair_b_ids"])


def test_afp_labels_all_and_no_input_variant(tok, tmp_path: Path) -> None:
    rec = {**AFP_REC, "input": "", "instruction": "Name a book of the Bible."}
    prep = afp.prepare(cfg("all"), tok, train_file=write(tmp_path / "a.jsonl", [rec]), verbose=False)
    row = prep.train[0]
    assert decode(tok, row["input_ids"]).startswith(tok.bos_token + "Name a book of the Bible. Answer in English: ")
    assert row["labels"] == row["input_ids"]


def test_afp_drops_are_counted_by_reason(tok, tmp_path: Path, capsys) -> None:
    recs = [
        AFP_REC,
        {**AFP_REC, "sent1": "  "},
        {**AFP_REC, "pool": "max"},
        {**AFP_REC, "lang1": "xx"},
        {**AFP_REC, "output": ""},
        {k: v for k, v in AFP_REC.items() if k != "sent0"},
        {**AFP_REC, "input": "word " * 200},  # the answer does not survive the cutoff
    ]
    prep = afp.prepare(cfg(cutoff=64), tok, train_file=write(tmp_path / "a.jsonl", recs), verbose=True)
    assert len(prep.train) == 1
    assert {k: v for k, v in prep.drops.items() if v} == {
        "empty_sentence": 1,
        "bad_pool": 1,
        "unknown_language": 1,
        "empty_target": 1,
        "missing_field": 1,
        "response_truncated": 1,
    }
    assert set(prep.drops) == set(afp.DROP_REASONS)
    report = capsys.readouterr().out
    assert "dropped       1 bad_pool" in report and "line 3" in report
    with pytest.raises(DataError, match=r"a\.jsonl:2"):
        afp.prepare(cfg(), tok, train_file=write(tmp_path / "a.jsonl", [AFP_REC, "{not json"]), verbose=False)


def test_afp_collator_stacks_sent0_then_sent1(tok, tmp_path: Path) -> None:
    recs = [AFP_REC, {**AFP_REC, "sent0": "Jesus wept.", "sent1": "Yesu akalia machozi."}]
    prep = afp.prepare(cfg(), tok, train_file=write(tmp_path / "a.jsonl", recs), verbose=False)
    rows = [prep.train[i] for i in range(2)]
    batch = afp.AFPCollator(tok, cfg())(rows)
    assert batch["input_ids"].shape[0] == 2 and batch["pair_input_ids"].shape[0] == 4
    assert batch["pair_input_ids"].shape[1] % 8 == 0
    for i, (r, key) in enumerate([(rows[0], "pair_a"), (rows[1], "pair_a"), (rows[0], "pair_b"), (rows[1], "pair_b")]):
        n = len(r[f"{key}_ids"])
        assert batch["pair_input_ids"][i, :n].tolist() == r[f"{key}_ids"]  # right padded
        assert batch["pair_attention_mask"][i].sum() == n
        assert batch["pair_pool"][i, :n].tolist() == r[f"{key}_pool"] and batch["pair_pool"][i, n:].sum() == 0


# ----------------------------------------------------------------------------------------------------------------
# Cross-lingual mapping rows


MAP_REC = {
    "kind": "map",
    "src_text": "Jesus wept.",
    "tgt_text": "Yesu akalia machozi.",
    "src_lang": "en",
    "tgt_lang": "sw",
}


def test_clmap_mapping_rows_label_the_target_and_mono_rows_everything(tok, tmp_path: Path) -> None:
    recs = [MAP_REC, {"kind": "mono", "text": "Yesu akalia machozi.", "lang": "sw"}]
    path = write(tmp_path / "c.jsonl", recs)
    row, mono = (clmap.prepare(cfg("response"), tok, train_file=path, verbose=False).train[i] for i in range(2))
    text = "English: Jesus wept.\nSwahili: Yesu akalia machozi."
    assert decode(tok, row["input_ids"]) == tok.bos_token + text + tok.eos_token
    labelled = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
    assert decode(tok, labelled[:-1]).strip() == "Yesu akalia machozi." and labelled[-1] == tok.eos_token_id
    spans = row["span_ids"]
    assert decode(tok, [t for t, s in zip(row["input_ids"], spans) if s == 1]).strip() == "Jesus wept."
    assert (row["src_lang"], row["tgt_lang"]) == (lang_id("en"), lang_id("sw"))
    assert mono["labels"] == mono["input_ids"] and set(mono["span_ids"]) == {0}
    assert mono["src_lang"] == mono["tgt_lang"] == lang_id("sw")
    every = clmap.prepare(cfg("all"), tok, train_file=path, verbose=False).train[0]
    assert every["labels"] == every["input_ids"]


def test_clmap_drops_are_counted_by_reason(tok, tmp_path: Path) -> None:
    ok = MAP_REC
    recs = [
        ok,
        {**ok, "tgt_lang": "en"},
        {**ok, "kind": "para"},
        {**ok, "tgt_text": " "},
        {**ok, "tgt_text": "Ya"},  # 1-2 target tokens < min_target_tokens (3)
        {"kind": "mono", "text": "", "lang": "sw"},
        {"kind": "mono", "text": 5, "lang": "sw"},
    ]
    prep = clmap.prepare(cfg(), tok, train_file=write(tmp_path / "c.jsonl", recs), verbose=False)
    assert len(prep.train) == 1
    assert {k: v for k, v in prep.drops.items() if v} == {
        "same_language": 1,
        "bad_kind": 1,
        "empty_target": 1,
        "short_target": 1,
        "empty_source": 1,
        "bad_field_type": 1,
    }


# ----------------------------------------------------------------------------------------------------------------
# Language-balanced batches


def strata_rows(counts: dict[tuple[int, int], int]) -> dict[str, list[int]]:
    src, tgt = [], []
    for (a, b), n in counts.items():
        src += [a] * n
        tgt += [b] * n
    perm = torch.randperm(len(src), generator=torch.Generator().manual_seed(0)).tolist()
    return {"src_lang": [src[i] for i in perm], "tgt_lang": [tgt[i] for i in perm]}


def test_balanced_micro_batches_hold_every_stratum_in_proportion() -> None:
    counts = {(0, 15): 40, (15, 0): 40, (0, 2): 40, (2, 0): 40, (0, 0): 54, (15, 15): 53, (2, 2): 53}  # 4 x 40 map
    ds = strata_rows(counts)
    n = sum(counts.values())
    m = 8
    batches = clmap.balanced_micro_batches(ds, m, world_size=1, rank=0, seed=3, epoch=0)
    assert len(batches) == n // m and all(len(b) == m for b in batches)
    flat = [i for b in batches for i in b]
    assert len(set(flat)) == len(flat)
    for b in batches:
        got = Counter((ds["src_lang"][i], ds["tgt_lang"][i]) for i in b)
        for s, c in counts.items():
            assert abs(got.get(s, 0) - m * c / n) < 1.0 + 1e-9, (b, got)
        mapping = sum(v for (a, bb), v in got.items() if a != bb)
        assert abs(mapping - m * 160 / n) < 1.0 + 1e-9
    # Deterministic in (seed, epoch), different across epochs, and ranks split the same global micro-batches.
    assert batches == clmap.balanced_micro_batches(ds, m, world_size=1, rank=0, seed=3, epoch=0)
    assert batches != clmap.balanced_micro_batches(ds, m, world_size=1, rank=0, seed=3, epoch=1)
    r0 = clmap.balanced_micro_batches(ds, 4, world_size=2, rank=0, seed=3, epoch=0)
    r1 = clmap.balanced_micro_batches(ds, 4, world_size=2, rank=1, seed=3, epoch=0)
    assert [sorted(a + b) for a, b in zip(r0, r1)] == [sorted(b) for b in batches]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        tiny = {"src_lang": [0] * 3, "tgt_lang": [1] * 3}
        clmap.balanced_micro_batches(tiny, 4, world_size=1, rank=0, seed=0, epoch=0)


# ----------------------------------------------------------------------------------------------------------------
# Record builders


def verse(book: int, ch: int, v: int, split: str = "train") -> Unit:
    texts = {lang: f"{lang} {book}:{ch}:{v}" for lang in ("en", "sw", "fr")}
    return Unit(f"bible:{book}.{ch}.{v}", "bible", split, texts, f"B{book} {ch}:{v}", "B")


def test_afp_records_next_verse_pairs_and_cross_probability() -> None:
    units = [verse(1, 1, 1), verse(1, 1, 2), verse(1, 2, 7)]
    context = {u.id: u for u in [*units, verse(1, 1, 3), verse(1, 2, 6)]}
    recs = afp.build_records(units, context=context, cross_probability=1.0, seed=0)
    assert len(recs) == 6  # one per (unit, non-pivot language)
    for r in recs:
        assert r["lang0"] == "en" and r["sent0"].startswith("en ") and r["sent1"].startswith(r["lang1"] + " ")
        assert r["input_lang"] != r["output_lang"] and {r["input_lang"], r["output_lang"]} == {"en", r["lang1"]}
        book, ch, v = (int(x) for x in r["unit"].split(":")[1].split("."))
        step = 1 if r["task"] == "next_verse" else -1
        assert r["input"] == f"{r['input_lang']} {book}:{ch}:{v}"
        assert r["output"] == f"{r['output_lang']} {book}:{ch}:{v + step}"
    assert Counter(r["task"] for r in recs) == {"next_verse": 4, "previous_verse": 2}  # 1.2.7 has no 1.2.8
    same = afp.build_records(units, context=context, cross_probability=0.0, seed=0)
    assert all(r["input_lang"] == r["output_lang"] for r in same)
    catalog = Unit("kolibri:x", "kolibri", "train", {"en": "Save", "sw": "Hifadhi"})
    (rec,) = afp.build_records([catalog], cross_probability=1.0)
    assert rec["task"] == "repeat" and rec["output"] == catalog.texts[rec["output_lang"]]


@pytest.mark.parametrize("ratio", [0.5, 0.25, 1.0])
def test_clmap_records_mix_ratio_directions_and_balance(ratio: float) -> None:
    units = [verse(2, 1, v) for v in range(1, 13)]
    recs = clmap.build_records(units, mix_ratio=ratio, seed=1)
    mapping = [r for r in recs if r["kind"] == "map"]
    mono = [r for r in recs if r["kind"] == "mono"]
    assert Counter((r["src_lang"], r["tgt_lang"]) for r in mapping) == {
        ("en", "sw"): 12, ("sw", "en"): 12, ("en", "fr"): 12, ("fr", "en"): 12,
    }  # fmt: skip
    assert len(mapping) / len(recs) == pytest.approx(ratio, abs=1 / len(recs))
    per_lang = Counter(r["lang"] for r in mono)
    assert max(per_lang.values(), default=0) - min(per_lang.values(), default=0) <= 1
    assert all(r["text"] in units[int(r["text"].split(":")[-1]) - 1].texts.values() for r in mono)
    for r in mapping:
        assert r["src_text"].startswith(r["src_lang"]) and r["tgt_text"].split()[1] == r["src_text"].split()[1]
