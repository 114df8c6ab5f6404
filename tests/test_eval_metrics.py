"""Evaluation metrics on hand-made cases: retrieval, cosine gap and centring, the probe, chrF++/BLEU."""

from __future__ import annotations

import pytest
import torch
from helpers import torch_threads

from alignx.eval.alignment import layer_retrieval, retrieval_metrics
from alignx.eval.probe import probe_accuracy
from alignx.eval.translation import bleu_tokenizer, clean_generation, translation_scores


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def test_identical_vectors_retrieve_perfectly():
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(0))
    m = retrieval_metrics(x, x.clone())
    assert m["x2y"] == 1.0 and m["y2x"] == 1.0
    assert m["parallel_cos"] == pytest.approx(1.0)
    assert m["gap"] == pytest.approx(1.0 - m["random_cos"])
    assert m["chance"] == pytest.approx(1 / 50) and m["n"] == 50


def test_random_vectors_retrieve_at_chance():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(400, 64, generator=g), torch.randn(400, 64, generator=g)
    m = retrieval_metrics(x, y)
    assert m["x2y"] < 0.02 and m["y2x"] < 0.02  # chance 0.0025
    assert abs(m["gap"]) < 0.02


def test_retrieval_directions_are_distinct():
    """Two y rows close to x[0]: x->y still finds row 0's partner, y->x of row 1 goes to x[0] (wrong)."""
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    y = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0]])
    m = retrieval_metrics(x, y)
    # x->y: x0 -> y0 ok, x1 -> y1 (0.1 vs 0) ok, x2 -> y2 ok. y->x: y1 -> x0 (0.9 > 0.1) wrong.
    assert m["x2y"] == pytest.approx(1.0)
    assert m["y2x"] == pytest.approx(2 / 3)


def test_centring_removes_a_huge_shared_dimension():
    """SPEC §5: a few huge dimensions make every uncentred cosine ~1; per-language centring recovers the signal."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(100, 32, generator=g)
    x = base + 0.3 * torch.randn(100, 32, generator=g)
    y = base + 0.3 * torch.randn(100, 32, generator=g)
    x[:, 0] += 1000.0 + torch.rand(100, generator=g)
    y[:, 0] += 800.0 + torch.rand(100, generator=g)
    raw = retrieval_metrics(x, y)
    assert raw["random_cos"] > 0.99 and raw["gap"] < 0.01
    centred = retrieval_metrics(x, y, x_mean=x.mean(0), y_mean=y.mean(0))
    assert centred["gap"] > 0.5 and centred["x2y"] > 0.9


def test_layer_retrieval_runs_per_layer():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 20, 8, generator=g)
    y = torch.stack([x[0], torch.randn(20, 8, generator=g), x[2]])
    out = layer_retrieval(x, y, x_means=x.mean(1), y_means=y.mean(1))
    assert out["x2y"][0] == 1.0 and out["x2y"][2] == 1.0 and out["x2y"][1] < 0.5
    assert len(out["gap"]) == 3


def test_retrieval_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        retrieval_metrics(torch.zeros(4, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="at least 2 pairs"):
        retrieval_metrics(torch.zeros(1, 3), torch.zeros(1, 3))


def test_probe_separable_clusters_and_random_labels():
    g = torch.Generator().manual_seed(4)
    centres = torch.randn(3, 20, generator=g) * 3

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 3
        return centres[y] + 0.5 * torch.randn(n, 20, generator=g), y

    xtr, ytr = sample(90)
    xte, yte = sample(60)
    assert probe_accuracy(xtr, ytr, xte, yte) == 1.0
    # Labels that do not depend on the features: near chance (1/2) on a large test set.
    noise_tr, noise_te = torch.randn(200, 20, generator=g), torch.randn(400, 20, generator=g)
    lab_tr, lab_te = torch.randint(0, 2, (200,), generator=g), torch.randint(0, 2, (400,), generator=g)
    acc = probe_accuracy(noise_tr, lab_tr, noise_te, lab_te)
    assert 0.35 < acc < 0.65


def test_probe_bad_input():
    with pytest.raises(ValueError, match="same D"):
        probe_accuracy(torch.zeros(4, 3), torch.zeros(4), torch.zeros(4, 5), torch.zeros(4))
    with pytest.raises(ValueError, match="one label per row"):
        probe_accuracy(torch.zeros(4, 3), torch.zeros(3), torch.zeros(4, 3), torch.zeros(4))


def test_identical_text_scores_100():
    refs = ["Hapo mwanzo Mungu aliziumba mbingu na nchi.", "Mwanzo wa Injili ya Yesu Kristo, Mwana wa Mungu."]
    s = translation_scores(refs, refs, "sw")
    assert s["chrf++"] == pytest.approx(100.0) and s["bleu"] == pytest.approx(100.0)
    assert s["empty"] == 0 and s["n"] == 2 and s["bleu_tokenize"] == "13a"


def test_empty_generation_scores_zero_without_crashing():
    refs = ["In the beginning God created the heavens and the earth.", "The beginning of the gospel."]
    s = translation_scores(["", "   "], refs, "en")
    assert s == {"chrf++": 0.0, "bleu": 0.0, "bleu_tokenize": "13a", "n": 2, "empty": 2}
    half = translation_scores(["", refs[1]], refs, "en")
    assert half["empty"] == 1 and 0.0 < half["chrf++"] < 100.0


def test_partial_match_is_between_and_cjk_uses_char_bleu():
    s = translation_scores(["the cat sat on a mat"], ["the cat sat on the mat"], "en")
    assert 0 < s["chrf++"] < 100 and 0 < s["bleu"] < 100
    assert bleu_tokenizer("zh") == "char" and bleu_tokenizer("hi") == "13a"
    zh = translation_scores(["我要全心称谢你"], ["我要全心称谢你"], "zh")
    assert zh["bleu"] == pytest.approx(100.0) and zh["bleu_tokenize"] == "char"


def test_scores_bad_input():
    with pytest.raises(ValueError, match="2 hypotheses for 1 references"):
        translation_scores(["a", "b"], ["a"], "en")
    with pytest.raises(ValueError, match="no sentences"):
        translation_scores([], [], "en")


@pytest.mark.parametrize(
    "raw, clean",
    [(" Mwanzo wa Injili.\n\n### Instruction:\nTranslate", "Mwanzo wa Injili."), ("abc ### def", "abc"), ("\n", "")],
)
def test_clean_generation(raw, clean):
    assert clean_generation(raw) == clean
