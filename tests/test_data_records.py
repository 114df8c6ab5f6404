"""Records and preprocessing: strict JSONL reading, language codes, drop counting, caching, stage 2, templates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignx.config import load_config
from alignx.data import (
    DROP_REASONS,
    LINE_REASONS,
    POISON_REASONS,
    DataError,
    Encoder,
    load_template,
    normalize_stage1,
    normalize_stage2,
    prepare_stage1,
    prepare_stage2,
    read_jsonl,
)
from alignx.data.records import Duplicates
from alignx.languages import LANGUAGES, lang_code, lang_id, lang_name, normalize_code
from alignx.testing import test_tokenizer, write_instructions_jsonl, write_pairs_jsonl

SPEC_LANGS = "en es fr it pt de ar zh ja ru pl ro hi bn tr sw ko fa id vi uk tl ha yo ny zu xh am ig so".split()


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n" for x in lines))
    return path


def _cfg(tmp_path: Path, **overrides) -> object:
    base = {"data.eval_size": 0, "data.cache_dir": str(tmp_path / "cache"), "train.output_dir": str(tmp_path / "run")}
    return load_config(overrides={**base, **overrides})


# ----------------------------------------------------------------------------------------------------------------
# Reading


def test_malformed_json_line_names_file_and_line(tmp_path: Path) -> None:
    good = {"src_text": "a", "tgt_text": "b", "src_lang": "en", "tgt_lang": "sw"}
    path = _write(tmp_path / "bad.jsonl", [good, "", good, '{"src_text": "a", "tgt_text": ', good])
    with pytest.raises(DataError, match=r"bad\.jsonl:4: malformed JSON"):
        read_jsonl(path)
    # The same error surfaces from the cached datasets pipeline, not a datasets traceback.
    with pytest.raises(DataError, match=r"bad\.jsonl:4: malformed JSON"):
        prepare_stage1(_cfg(tmp_path), test_tokenizer(), train_file=path, verbose=False)


def test_every_bad_line_is_found_in_one_pass(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good = {"src_text": "Good morning", "tgt_text": "Habari za asubuhi", "src_lang": "en", "tgt_lang": "sw"}
    more = {**good, "src_text": "Good evening", "tgt_text": "Habari za jioni"}
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf"
        + json.dumps(good).encode()
        + b"\n"  # a byte-order mark: accepted
        + b'{"src_text": "a", "tgt_text": \n'  # cut off: the column is that of this line, 1-based
        + b"\n"
        + b'{"src_text": "caf\xe9"}\n'
        + b"[1, 2]\n"
        + json.dumps(more).encode()
        + b"\n"
    )
    with pytest.raises(DataError) as err:
        read_jsonl(path)
    assert str(err.value) == (
        f"{path}:2: malformed JSON: Expecting value (column 31) (3 bad lines in all: malformed_json 1, not_utf8 1, "
        "not_an_object 1)"
    )
    with pytest.raises(DataError) as err:
        prepare_stage1(_cfg(tmp_path), test_tokenizer(), train_file=path)
    assert "\n" not in str(err.value) and "data.on_bad_lines=skip" in str(err.value)
    out = capsys.readouterr().out
    assert "line 4: invalid continuation byte at byte 18" in out and "line 5: got a JSON list" in out
    prep = prepare_stage1(_cfg(tmp_path, **{"data.on_bad_lines": "skip"}), test_tokenizer(), train_file=path)
    assert len(prep.train) == 2  # the first record (after the byte-order mark) and the last
    assert {k: v for k, v in prep.drops.items() if v} == {"malformed_json": 1, "not_utf8": 1, "not_an_object": 1}


def test_empty_file_is_a_data_error(tmp_path: Path) -> None:
    for content in (b"", b"\n  \n\t\n", b"\xef\xbb\xbf\n"):
        path = tmp_path / "empty.jsonl"
        path.write_bytes(content)
        with pytest.raises(
            DataError, match=r"empty\.jsonl: no records \(the file is empty or holds only blank lines\)"
        ):
            prepare_stage1(_cfg(tmp_path), test_tokenizer(), train_file=path, verbose=False)


def test_records_that_bias_the_objective_are_dropped_with_a_reason() -> None:
    ok = {"src_text": "Good morning", "tgt_text": "Habari za asubuhi", "src_lang": "en", "tgt_lang": "sw"}
    nul = normalize_stage1({**ok, "tgt_text": "Habari\u0000"})
    assert nul["drop"] == "bad_characters" and nul["detail"] == "U+0000 in tgt_text at character 7"
    assert nul["tgt_text"] == ""  # not stored: a lone surrogate could not even be written to Arrow
    assert normalize_stage1({**ok, "src_text": "x\ud800"})["drop"] == "bad_characters"
    assert normalize_stage1({**ok, "src_text": "Tab\tand\nnewline"})["drop"] == ""  # ordinary whitespace
    same = normalize_stage1({**ok, "tgt_lang": "en"})
    assert same["drop"] == "same_language" and same["detail"] == "src_lang = tgt_lang = en"
    assert normalize_stage1({**ok, "tgt_text": " Good morning"})["drop"] == "identical_text"
    assert normalize_stage2({"instruction": "Say \u0007", "output": "x", "lang": "en"})["drop"] == "bad_characters"
    # Earlier reasons win: an empty target is reported as such, not as a same-language pair.
    assert normalize_stage1({**ok, "tgt_text": "", "tgt_lang": "en"})["drop"] == "empty_target"
    dup = Duplicates(("src_text", "tgt_text", "instruction", "src_lang", "tgt_lang"))
    rows = [normalize_stage1(ok, 1), normalize_stage1({**ok, "tgt_lang": "hi"}, 2), normalize_stage1(ok, 7)]
    assert [dup.check(r) for r in rows] == ["", "", "same as line 1"]
    assert set(POISON_REASONS) <= set(DROP_REASONS) and set(LINE_REASONS) <= set(DROP_REASONS)


def test_non_object_and_non_utf8_lines(tmp_path: Path) -> None:
    path = _write(tmp_path / "list.jsonl", ['["not", "an", "object"]'])
    with pytest.raises(DataError, match=r"list\.jsonl:1: expected a JSON object: got a JSON list"):
        read_jsonl(path)
    raw = tmp_path / "latin1.jsonl"
    raw.write_bytes(b'{"src_text": "ok"}\n{"src_text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not UTF-8"):
        read_jsonl(raw)
    with pytest.raises(DataError, match="not found"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_blank_lines_are_skipped_and_line_numbers_stay_true(tmp_path: Path) -> None:
    path = _write(tmp_path / "x.jsonl", ["", {"a": 1}, "   ", {"b": 2}])
    assert read_jsonl(path) == [{"a": 1}, {"b": 2}]


# ----------------------------------------------------------------------------------------------------------------
# Languages


def test_language_table_covers_the_spec_and_ids_are_stable() -> None:
    assert set(SPEC_LANGS) <= set(LANGUAGES)
    ids = [lang_id(c) for c in LANGUAGES]
    assert ids == list(range(len(LANGUAGES)))  # injective, dense
    # Append-only table: these ids are part of saved runs and must never move.
    assert (lang_id("en"), lang_id("sw"), lang_id("hi"), lang_id("tl"), lang_id("ha")) == (0, 15, 12, 21, 22)
    assert all(lang_code(lang_id(c)) == c for c in LANGUAGES)
    assert lang_name("sw") == "Swahili" and lang_name("zh") == "Chinese"


def test_language_code_normalisation() -> None:
    assert normalize_code("SW") == "sw"
    assert normalize_code("pt-BR") == "pt" and normalize_code("zh_Hans") == "zh"
    assert normalize_code("fil") == "tl" and normalize_code("swh") == "sw"
    assert lang_id("pt_BR") == lang_id("pt")


def test_unknown_language_code_error_names_valid_codes() -> None:
    with pytest.raises(ValueError) as err:
        lang_id("xx")
    msg = str(err.value)
    assert "'xx'" in msg and "valid ISO 639 codes" in msg
    assert all(f" {c}," in msg or msg.endswith(f" {c}") for c in ("en", "sw", "hi", "zh"))
    with pytest.raises(ValueError, match="did you mean"):
        lang_id("swx")  # close to a valid code
    with pytest.raises(ValueError, match="must be a string"):
        lang_id(3)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------------
# Normalisation and drop reasons


def test_normalize_stage1_reasons() -> None:
    ok = {"src_text": "a", "tgt_text": "b", "src_lang": "en", "tgt_lang": "sw"}
    assert normalize_stage1(ok)["drop"] == ""
    assert normalize_stage1({**ok, "src_lang": "xx"})["drop"] == "unknown_language"
    assert normalize_stage1({**ok, "src_lang": "xx"})["bad_code"] == "xx"
    assert normalize_stage1({k: v for k, v in ok.items() if k != "tgt_text"})["drop"] == "missing_field"
    assert normalize_stage1({**ok, "tgt_text": None})["drop"] == "missing_field"
    assert normalize_stage1({**ok, "src_text": 5})["drop"] == "bad_field_type"
    assert normalize_stage1({**ok, "tgt_lang": 15})["drop"] == "bad_field_type"
    assert normalize_stage1({**ok, "src_text": " \t"})["drop"] == "empty_source"
    assert normalize_stage1({**ok, "tgt_text": ""})["drop"] == "empty_target"
    # Precedence: a structural problem wins over an unknown code, which wins over emptiness.
    assert normalize_stage1({"src_text": "", "src_lang": "xx", "tgt_lang": "en"})["drop"] == "missing_field"
    assert normalize_stage1({**ok, "src_text": "", "tgt_lang": "xx"})["drop"] == "unknown_language"


def test_normalize_stage2_reasons() -> None:
    ok = {"instruction": "Say hi.", "output": "Hi!", "lang": "en"}
    row = normalize_stage2(ok)
    assert row["drop"] == "" and row["input"] == "" and row["src_lang"] == row["tgt_lang"] == lang_id("en")
    assert normalize_stage2({**ok, "lang": "zz"})["drop"] == "unknown_language"
    assert normalize_stage2({**ok, "instruction": " "})["drop"] == "empty_instruction"
    assert normalize_stage2({**ok, "output": ""})["drop"] == "empty_target"
    assert normalize_stage2({**ok, "input": 3})["drop"] == "bad_field_type"
    assert normalize_stage2({"output": "x", "lang": "en"})["drop"] == "missing_field"


def test_prepare_stage1_counts_every_drop_reason(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good = write_pairs_jsonl(tmp_path / "good.jsonl", 20, seed=1).read_text().splitlines()
    long_src = " ".join(["The children are playing in the garden."] * 40)
    bad = [
        {"src_text": "x y z", "tgt_text": "", "src_lang": "en", "tgt_lang": "sw"},  # empty_target
        {"src_text": "  ", "tgt_text": "Sawa kabisa leo", "src_lang": "en", "tgt_lang": "sw"},  # empty_source
        {"src_text": "Hello there", "tgt_text": "Habari yako", "src_lang": "en", "tgt_lang": "xx"},  # unknown
        {"src_text": "Hello there", "tgt_text": "Habari yako", "src_lang": "en", "tgt_lang": "qq"},  # unknown
        {"src_text": "Hello there", "src_lang": "en", "tgt_lang": "sw"},  # missing_field
        {"src_text": ["list"], "tgt_text": "Habari", "src_lang": "en", "tgt_lang": "sw"},  # bad_field_type
        {"src_text": "Hello there", "tgt_text": "Ok", "src_lang": "en", "tgt_lang": "sw"},  # short_target
        {"src_text": long_src, "tgt_text": "Watoto wanacheza.", "src_lang": "en", "tgt_lang": "sw"},  # truncated
    ]
    path = _write(tmp_path / "mixed.jsonl", good[:10] + bad + good[10:])
    prep = prepare_stage1(_cfg(tmp_path, **{"data.cutoff_len": 256}), test_tokenizer(), train_file=path)
    expected = {reason: 0 for reason in DROP_REASONS}
    expected.update(
        empty_target=1, empty_source=1, unknown_language=2, missing_field=1, bad_field_type=1, short_target=1
    )
    expected.update(source_truncated=1)
    assert prep.drops == expected
    assert len(prep.train) == 20 and prep.eval is None
    assert prep.stats["records"] == 28 and prep.stats["dropped"] == 8
    assert prep.stats["unknown_codes"] == {"xx": 1, "qq": 1}
    assert prep.stats["drop_examples"]["source_truncated"] == [18]  # file line numbers
    out = capsys.readouterr().out
    assert "kept 20, dropped 8" in out and "source_truncated" in out and "'xx' x1" in out and "line 18" in out
    # Every kept row is poolable and matches the contract's columns.
    assert set(prep.train.column_names) == {"input_ids", "labels", "span_ids", "src_lang", "tgt_lang", "length"}
    for row in prep.train:
        assert row["span_ids"].count(1) >= 1 and row["span_ids"].count(2) >= 3
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["span_ids"]) == row["length"] <= 256
        assert {row["src_lang"], row["tgt_lang"]} <= {lang_id("en"), lang_id("sw"), lang_id("hi")}


def test_prepare_is_cached_and_keyed_by_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_pairs_jsonl(tmp_path / "pairs.jsonl", 24)
    tok = test_tokenizer()
    first = prepare_stage1(_cfg(tmp_path), tok, train_file=path, verbose=False)

    def boom(self, batch):  # noqa: ANN001
        raise AssertionError("tokenised again although the cache is valid")

    monkeypatch.setattr(Encoder, "__call__", boom)
    again = prepare_stage1(_cfg(tmp_path), tok, train_file=path, verbose=False)
    assert again.train["input_ids"] == first.train["input_ids"] and again.drops == first.drops
    # A different cutoff, label mode, template or tokenizer is a different cache entry.
    with pytest.raises(AssertionError, match="tokenised again"):
        prepare_stage1(_cfg(tmp_path, **{"data.cutoff_len": 100}), tok, train_file=path, verbose=False)
    with pytest.raises(AssertionError, match="tokenised again"):
        prepare_stage1(_cfg(tmp_path, **{"data.labels": "response"}), tok, train_file=path, verbose=False)
    # So is a changed file.
    write_pairs_jsonl(path, 25)
    with pytest.raises(AssertionError, match="tokenised again"):
        prepare_stage1(_cfg(tmp_path), tok, train_file=path, verbose=False)


def test_eval_split_and_eval_file(tmp_path: Path) -> None:
    path = write_pairs_jsonl(tmp_path / "pairs.jsonl", 30)
    tok = test_tokenizer()
    prep = prepare_stage1(_cfg(tmp_path, **{"data.eval_size": 6}), tok, train_file=path, verbose=False)
    assert len(prep.train) == 24 and len(prep.eval) == 6
    again = prepare_stage1(_cfg(tmp_path, **{"data.eval_size": 6}), tok, train_file=path, verbose=False)
    assert again.eval["input_ids"] == prep.eval["input_ids"]  # seeded split (train.seed)
    with pytest.raises(DataError, match="data.eval_size=30"):
        prepare_stage1(_cfg(tmp_path, **{"data.eval_size": 30}), tok, train_file=path, verbose=False)
    held = write_pairs_jsonl(tmp_path / "held.jsonl", 5, seed=3)
    prep = prepare_stage1(_cfg(tmp_path, **{"data.eval_size": 6}), tok, train_file=path, eval_file=held)
    assert len(prep.train) == 30 and len(prep.eval) == 5 and prep.stats["eval_drops"]["short_target"] == 0


def test_no_usable_record_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "all_bad.jsonl", [{"src_text": "a", "tgt_text": "", "src_lang": "en", "tgt_lang": "sw"}])
    with pytest.raises(DataError, match="no usable record"):
        prepare_stage1(_cfg(tmp_path), test_tokenizer(), train_file=path, verbose=False)


# ----------------------------------------------------------------------------------------------------------------
# Stage 2 and templates


def test_prepare_stage2_no_input_variant_and_response_labels(tmp_path: Path) -> None:
    path = write_instructions_jsonl(tmp_path / "ins.jsonl", 10)
    with path.open("a") as f:
        f.write(json.dumps({"instruction": "Hi", "output": "", "lang": "en"}) + "\n")
    tok = test_tokenizer()
    prep = prepare_stage2(_cfg(tmp_path, **{"stage2.labels": "response"}), tok, train_file=path, verbose=False)
    assert len(prep.train) == 10 and prep.drops["empty_target"] == 1
    records = read_jsonl(path)[:10]
    for row, rec in zip(prep.train, records):
        text = tok.decode(row["input_ids"][1:-1])
        assert ("### Input:" in text) == bool(rec["input"])
        assert text.endswith("### Response:\n" + rec["output"])
        assert set(row["span_ids"]) == {0}
        assert row["src_lang"] == row["tgt_lang"] == lang_id(rec["lang"])
        assert tok.decode([t for t in row["labels"] if t != -100]) == rec["output"] + tok.eos_token


def test_template_file_and_its_errors(tmp_path: Path) -> None:
    assert load_template("alpaca").prompt_input.endswith("\n\n### Input:\n{input}\n\n### Response:\n")
    good = tmp_path / "t.json"
    good.write_text(json.dumps({"description": "x", "prompt_input": "{{lit}} {instruction}: {input} =>"}))
    tpl = load_template(str(good))
    r = tpl.render("Do", "abc", " xyz")
    assert r.text == "{lit} Do: abc => xyz" and r.text[slice(*r.source)] == "abc" and r.text[slice(*r.target)] == " xyz"
    with pytest.raises(DataError, match="no prompt_no_input"):
        tpl.render("Do", "", "x")
    cases = {
        "unknown placeholder {output}": {"prompt_input": "{input} {output}"},
        "placeholder {input} must appear exactly once, found 0": {"prompt_input": "{instruction}"},
        "placeholder {input} must appear exactly once, found 2": {"prompt_input": "{input}{input}"},
        "unknown placeholder {input}": {"prompt_input": "{input}", "prompt_no_input": "{input}"},
        "literal braces": {"prompt_input": "{input} }"},
    }
    for msg, obj in cases.items():
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(obj))
        with pytest.raises(DataError, match=msg.replace("{", r"\{").replace("}", r"\}")):
            load_template(str(bad))
    with pytest.raises(DataError, match="neither 'alpaca' nor an existing JSON file"):
        load_template("alpacca")


def test_bad_instruction_pattern_fails_early() -> None:
    with pytest.raises(DataError, match=r"only \{src\} and \{tgt\}"):
        Encoder(test_tokenizer(), instruction="Translate from {source} to {tgt}.")


def test_slow_tokenizer_or_missing_eos_is_rejected() -> None:
    tok = test_tokenizer()
    tok.eos_token = None
    with pytest.raises(DataError, match="no eos_token"):
        Encoder(tok)
