"""The evaluation pipeline end to end on a tiny random model and the committed Bible fixture: pooling, perplexity
and generation checked against direct computations, then the JSON result, the markdown report and the plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import torch_threads

from alignx.config import EvalConfig
from alignx.eval.alignment import encode_layers, resolve_pooling
from alignx.eval.cli import main
from alignx.eval.data import EvalError, load_eval_units, parse_layers
from alignx.eval.perplexity import perplexity
from alignx.eval.pipeline import evaluate
from alignx.eval.report import collect_results, render_report, write_report
from alignx.eval.translation import generate
from alignx.testing import test_tokenizer as make_tokenizer
from alignx.testing import tiny_causal_lm, tiny_model_dir

BIBLE = Path(__file__).parent / "fixtures" / "bible" / "verses.tsv"
TEXTS = ["In the beginning was the Word.", "Au commencement était la Parole, et la Parole était avec Dieu.", "Ok"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def lm():
    return tiny_causal_lm("llama", num_layers=3, hidden=32, seed=0)


@pytest.fixture
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def units():
    return load_eval_units(["fr", "ru"], bible_db=BIBLE)


def test_pooling_matches_a_direct_mean_over_text_tokens(lm, tok):
    pooling = resolve_pooling(tok)
    assert pooling.first_token_excluded and "BOS" in pooling.reason  # the test tokenizer adds <s>
    got = encode_layers(lm, tok, TEXTS, pooling=pooling, batch_size=2, progress=False)
    assert got.shape == (4, 3, 32)  # embeddings + 3 blocks
    for i, text in enumerate(TEXTS):
        ids = tok(text, return_tensors="pt").input_ids
        assert ids[0, 0].item() == tok.bos_token_id
        with torch.no_grad():
            hs = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
        for layer in range(4):
            torch.testing.assert_close(got[layer, i], hs[layer][0, 1:].mean(0), rtol=1e-4, atol=1e-5)


def test_first_token_excluded_without_bos(lm, tok):
    """A tokenizer that adds no BOS: auto leaves the first text token (attention sink) out, 'no' keeps it."""
    from tokenizers import processors

    tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    assert tok("a b").input_ids[0] != tok.bos_token_id
    auto, keep = resolve_pooling(tok, "auto"), resolve_pooling(tok, "no")
    assert auto.first_token_excluded and "sink" in auto.reason and not keep.first_token_excluded
    a = encode_layers(lm, tok, TEXTS[:2], pooling=auto, progress=False)
    k = encode_layers(lm, tok, TEXTS[:2], pooling=keep, progress=False)
    ids = tok(TEXTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        h = lm.model(input_ids=ids, output_hidden_states=True).hidden_states[2][0]
    torch.testing.assert_close(a[2, 0], h[1:].mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(k[2, 0], h.mean(0), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="exclude_first"):
        resolve_pooling(tok, "maybe")


def test_perplexity_equals_the_model_loss(lm, tok):
    got = perplexity(lm, tok, TEXTS[:2], logits_budget_mb=1, progress=False)  # tiny budget: one text per batch
    nll, n = 0.0, 0
    for text in TEXTS[:2]:
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            loss = lm(input_ids=ids, labels=ids).loss.item()
        nll += loss * (ids.shape[1] - 1)
        n += ids.shape[1] - 1
    assert got["tokens"] == n
    assert got["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert got["bits_per_char"] == pytest.approx(nll / math.log(2) / sum(map(len, TEXTS[:2])), rel=1e-4)


def test_batched_left_padded_generation_equals_one_by_one(lm, tok):
    prompts = ["Translate: In the beginning", "Translate: Au commencement était la Parole, et la Parole"]
    lengths = [3, 3]
    batched = generate(lm, tok, prompts, source_tokens=lengths, batch_size=2, max_new_tokens=6, progress=False)
    single = [
        generate(lm, tok, [p], source_tokens=[3], batch_size=1, max_new_tokens=6, progress=False)[0] for p in prompts
    ]
    assert batched == single
    assert tok.padding_side == "left"  # restored


def test_evaluate_report_and_plots(lm, tok, units, tmp_path):
    cfg = EvalConfig(langs=["fr", "ru"], max_pairs=6, max_new_tokens=4, translate_pairs=3, directions=["en-x"])
    base = evaluate(lm, tok, units, cfg, label="base", model_name="tiny", progress=False)
    assert base["num_layers"] == 3 and base["layers"] == [0, 1, 2, 3] and base["align_layer"] == 1
    assert base["eval_range"] == "Mark 1:1 .. Mark 1:6" and base["reference_split"] == "dev"
    for lang in ("fr", "ru"):
        r = base["retrieval"][lang]
        assert r["n"] == 6 and len(r["en2x"]) == 4 and all(0.0 <= v <= 1.0 for v in r["en2x"] + r["x2en"])
    assert len(base["probe"]["accuracy"]) == 4 and base["probe"]["langs"] == ["en", "fr", "ru"]
    assert set(base["perplexity"]) == {"en", "fr", "ru"} and set(base["translation"]) == {"en-fr", "en-ru"}
    assert base["translation"]["en-fr"]["n"] == 3 and len(base["translation"]["en-fr"]["examples"]) == 3

    # A second model (different weights) stands for "after training"; the report compares both.
    other = tiny_causal_lm("llama", num_layers=3, hidden=32, seed=1)
    cfg = EvalConfig(langs=["fr", "ru"], max_pairs=6, translate=False)
    after = evaluate(other, tok, units, cfg, label="stage1", model_name="tiny-1", progress=False)
    for r in (after, base):
        (tmp_path / f"{r['label']}.json").write_text(json.dumps(r))
    (tmp_path / "unrelated.json").write_text("{}")
    results = collect_results(tmp_path)
    assert [r["label"] for r in results] == ["base", "stage1"]
    paths = write_report(results, tmp_path)
    text = Path(paths["report"]).read_text()
    assert "| direction | base | stage1 | base→stage1 |" in text
    assert "## Language-identity probe accuracy per layer" in text and "## Held-out perplexity" in text
    assert "first token excluded: yes" in text
    k = base["layers"].index(1)
    expected = after["retrieval"]["fr"]["en2x"][k] - base["retrieval"]["fr"]["en2x"][k]
    assert f"| en→fr | {base['retrieval']['fr']['en2x'][k]:.3f} |" in text and f"{expected:+.3f}" in text
    for name in ("retrieval_by_layer.png", "probe_by_layer.png", "per_language.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_evaluate_bad_input(lm, tok, units):
    with pytest.raises(EvalError, match="unknown split 'val'"):
        evaluate(lm, tok, units, EvalConfig(langs=["fr"], split="val"), progress=False)
    with pytest.raises(EvalError, match="besides English"):
        evaluate(lm, tok, units, EvalConfig(langs=["en"]), progress=False)
    with pytest.raises(EvalError, match="directions"):
        evaluate(lm, tok, units, EvalConfig(langs=["fr"], directions=["fr-de"]), progress=False)
    with pytest.raises(EvalError, match=r"layers must be in 0\.\.3"):
        parse_layers("1,7", 3)
    assert parse_layers("all", 2) == [0, 1, 2] and parse_layers("2,0", 3) == [0, 2]
    with pytest.raises(ValueError, match="no results"):
        render_report([])


def test_cli_on_a_model_directory(tmp_path, capsys):
    model = tiny_model_dir("llama", tmp_path / "model", num_layers=2, hidden=32)
    out = tmp_path / "eval"
    args = ["--model", str(model), "--langs", "fr", "--bible-db", str(BIBLE), "--out", str(out), "--max-pairs", "4",
            "--translate-pairs", "2", "--directions", "en-x", "--max-new-tokens", "3", "--label", "base",
            "--no-progress"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "en→fr top-1 @ layer 1" in printed and "report:" in printed
    result = json.loads((out / "base.json").read_text())
    assert result["retrieval"]["fr"]["n"] == 4 and result["timing"]["load_s"] >= 0
    assert (out / "report.md").is_file()
    # Report-only mode from result files.
    assert main(["--report", str(out / "base.json"), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.md").is_file()
    # Bad input: unknown language code, and a language the Bible fixture lacks.
    assert main(["--model", str(model), "--langs", "xx", "--bible-db", str(BIBLE), "--out", str(out)]) == 2
    assert "unknown language code 'xx'" in capsys.readouterr().err
    assert main(["--model", str(model), "--langs", "sw", "--bible-db", str(BIBLE), "--out", str(out)]) == 2
    assert "no verses of SUV1997 (sw)" in capsys.readouterr().err
