"""Source/target spans from character offsets: exact on tricky text, boundary rules, truncation, labels.

The prefix-count method of the official code is re-implemented here (``_prefix_count_spans``) only to show where
it goes wrong; the library never uses it.
"""

from __future__ import annotations

import unicodedata

import numpy as np
import pytest

from alignx.data import ALPACA, Encoder, Template, normalize_stage1, token_regions
from alignx.data.prompt import instruction_text
from alignx.testing import CORPUS, PARALLEL, test_tokenizer

INSTRUCTION = "Translate the following sentence from {src} to {tgt}."

# (id, source, target): scripts without spaces, leading/trailing/internal whitespace, emoji (skin tone, ZWJ),
# combining marks (Devanagari; Vietnamese in NFD, i.e. base letters + combining code points), RTL, and literal
# special-token strings inside the data (must stay text).
TRICKY = [
    ("zh-ja", "太初有道。", "初めに言があった。"),
    ("ja-zh", "彼女は毎晩本を読みます。", "她每天晚上读一本书。"),
    ("leading-space", " Hello, world!", "  Bonjour tout le monde"),
    ("trailing-space", "She reads a book.   ", "Elle lit un livre.\t"),
    ("internal-ws", "Tab\tand\nnewline  inside", "ligne\n\ndeux"),
    ("emoji", "Thank you 🙏 see you soon 😀👍🏽", "Asante 🙏 tuonane 👨\u200d👩\u200d👧!"),
    ("emoji-only", "😀😀", "🙏👍🏽🙏"),
    ("hindi", "ज्योति अन्धकार में चमकती है।", "The light shines in the darkness."),
    ("vietnamese-nfd", unicodedata.normalize("NFD", "Ánh sáng chiếu trong bóng tối."), "Nuru yang'aa gizani."),
    ("arabic", "النور يضيء في الظلمة.", "La lumière brille dans les ténèbres."),
    ("special-literals", "a </s> literal <s> and <pad>", "x </s> y <unk> z"),
    ("digits-punct", "1:1 In the beginning... (9:1)", "«Au commencement» — 2024!"),
]


def _row(src: str, tgt: str, src_lang: str = "en", tgt_lang: str = "fr") -> dict:
    return normalize_stage1({"src_text": src, "tgt_text": tgt, "src_lang": src_lang, "tgt_lang": tgt_lang})


def _span_tokens(row: dict, span: int) -> list[int]:
    return [i for i, s in zip(row["input_ids"], row["span_ids"]) if s == span]


def _oracle_regions(text: str, source: tuple, target: tuple, offsets, special) -> list[int]:
    """The documented rule, written the slow obvious way (one character at a time)."""
    out = []
    for (a, b), sp in zip(offsets, special):
        if sp or b <= a:
            out.append(0)
            continue
        chars = [p for p in range(a, b) if not text[p].isspace()] or list(range(a, b))
        region = [1 if source[0] <= p < source[1] else 2 if target[0] <= p < target[1] else 0 for p in chars]
        out.append(next((r for r in (1, 2) if 2 * region.count(r) > len(region)), 0))
    return out


def _prefix_count_spans(tok, rendered, full_len: int) -> tuple[list[int], list[int]]:
    """The official code's spans: token counts of prompt prefixes (method.md section 1.3)."""

    def n(s: str) -> int:
        return len(tok(s)["input_ids"])

    start, end, out = (
        n(rendered.text[: rendered.source[0]]),
        n(rendered.text[: rendered.source[1]]),
        n(rendered.text[: rendered.target[0]]),
    )
    return list(range(start, end)), list(range(out, full_len - 1))


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder(test_tokenizer(), instruction=INSTRUCTION, cutoff_len=512, min_target_tokens=1)


@pytest.mark.parametrize("case", TRICKY, ids=[c[0] for c in TRICKY])
def test_spans_exact_on_tricky_text(encoder: Encoder, case: tuple) -> None:
    _, src, tgt = case
    tok = test_tokenizer()
    (row,) = encoder.encode([_row(src, tgt)])
    assert row["drop"] == "", row["drop"]
    ids, spans = row["input_ids"], row["span_ids"]
    assert len(ids) == len(spans) == row["length"]
    # Byte-level BPE with a regex pre-tokenizer keeps "\n" apart, so the spans decode to the texts exactly
    # (up to whitespace at the very edges, which can sit in a token shared with the template).
    assert tok.decode(_span_tokens(row, 1)).strip() == src.strip()
    assert tok.decode(_span_tokens(row, 2)).strip() == tgt.strip()
    # Each span is contiguous; the source precedes the target; BOS and EOS are outside.
    for span in (1, 2):
        pos = [i for i, s in enumerate(spans) if s == span]
        assert pos == list(range(pos[0], pos[-1] + 1))
    assert max(i for i, s in enumerate(spans) if s == 1) < min(i for i, s in enumerate(spans) if s == 2)
    assert ids[0] == tok.bos_token_id and spans[0] == 0
    assert ids[-1] == tok.eos_token_id and spans[-1] == 0
    # Literal "</s>", "<s>", "<pad>" in the data are text, not special tokens.
    specials = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}
    assert not specials & set(ids[1:-1])


def test_regions_match_the_character_level_oracle(encoder: Encoder) -> None:
    """The vectorised rule equals the obvious per-character rule on every token of many renderings."""
    rng = np.random.default_rng(0)
    texts = CORPUS + [c[1] for c in TRICKY] + [c[2] for c in TRICKY]
    pads = ["", " ", "  ", "\n", " \n ", "\t"]
    for k in range(120):
        src = pads[rng.integers(len(pads))] + texts[rng.integers(len(texts))] + pads[rng.integers(len(pads))]
        tgt = pads[rng.integers(len(pads))] + texts[rng.integers(len(texts))] + pads[rng.integers(len(pads))]
        rendered = ALPACA.render(f"Instruction {k}.", src, tgt)
        enc = encoder.backend.encode(rendered.text)
        got = token_regions(rendered.text, rendered.source, rendered.target, enc.offsets, enc.special_tokens_mask)
        want = _oracle_regions(rendered.text, rendered.source, rendered.target, enc.offsets, enc.special_tokens_mask)
        assert got.tolist() == want, rendered.text


@pytest.mark.parametrize(
    ("text", "source", "token", "expected"),
    [
        pytest.param("In: Hello", (4, 9), (3, 9), 1, id="leading-space-from-template"),  # " Hello": 5/5 visible
        pytest.param("In:\nThe cat", (4, 11), (2, 7), 1, id="newline-merged-with-first-word"),  # ":\nThe": 3/4
        pytest.param("In:\nA cat", (4, 9), (2, 5), 0, id="tie-is-not-a-majority"),  # ":\nA": 1/2
        pytest.param("cat.\n\n### Out", (0, 4), (3, 9), 0, id="period-merged-with-header"),  # ".\n\n###": 1/4
        pytest.param("cat.\n\n### Out", (0, 4), (3, 6), 1, id="period-with-newlines"),  # ".\n\n": 1/1
        pytest.param("In:\n Hello", (4, 10), (3, 5), 0, id="whitespace-half-prompt"),  # "\n ": 1/2 of all chars
        pytest.param("a  b", (0, 4), (1, 3), 1, id="whitespace-all-source"),
        pytest.param("a  b", (0, 4), (2, 2), 0, id="empty-range"),
    ],
)
def test_boundary_token_rule(text: str, source: tuple, token: tuple, expected: int) -> None:
    """One token straddling a prompt/source boundary: strict majority of its visible characters decides."""
    assert token_regions(text, source, (len(text), len(text)), [token], [0]).tolist() == [expected]


def test_special_tokens_and_target_region() -> None:
    text = "ab|cd"
    regions = token_regions(text, (0, 2), (3, 5), [(0, 0), (0, 2), (2, 3), (3, 5), (0, 0)], [1, 0, 0, 0, 1])
    assert regions.tolist() == [0, 1, 0, 2, 0]
    # A special token keeps region 0 even if it reports a character range.
    assert token_regions(text, (0, 2), (3, 5), [(0, 2)], [1]).tolist() == [0]


# ----------------------------------------------------------------------------------------------------------------
# A SentencePiece-style tokenizer ("▁" metaspace, no split at newlines, NFKC), trained offline: its merges cross the
# template boundaries, so prefix tokenisation is not a prefix of the full tokenisation.


def _sentencepiece_bpe():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    pairs = [("en", "sw"), ("hi", "en"), ("zh", "ja"), ("vi", "fr"), ("ar", "es"), ("sw", "en"), ("fr", "hi")]
    rendered = [
        ALPACA.render(instruction_text(INSTRUCTION, a, b), PARALLEL[a][i], PARALLEL[b][i])
        for i in range(12)
        for a, b in pairs
    ]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=900, min_frequency=2, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False
    )
    tok.train_from_iterator(CORPUS + [r.text for r in rendered[::3]], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    return hf, rendered


def test_sentencepiece_style_tokenizer_prefix_method_is_wrong_offsets_are_right() -> None:
    tok, rendered = _sentencepiece_bpe()
    assert "▁" in "".join(tok.convert_ids_to_tokens(tok("a b")["input_ids"]))
    enc = Encoder(tok, instruction=INSTRUCTION, cutoff_len=512, min_target_tokens=1)
    prefix_wrong = header_in_span = 0
    for r in rendered:
        e = enc.backend.encode(r.text)
        regions = token_regions(r.text, r.source, r.target, e.offsets, e.special_tokens_mask)
        assert regions.tolist() == _oracle_regions(r.text, r.source, r.target, e.offsets, e.special_tokens_mask)
        ours_src = [i for i, g in enumerate(regions) if g == 1]
        ours_tgt = [i for i, g in enumerate(regions) if g == 2]
        # Ours: every token in a span has most of its visible characters there, and every visible source/target
        # character outside the span sits in a token that is mostly prompt.
        for lo, hi, ours in ((*r.source, ours_src), (*r.target, ours_tgt)):
            covered = {p for i in ours for p in range(*e.offsets[i])}
            for p in range(lo, hi):
                if r.text[p].isspace() or p in covered:
                    continue
                owner = next(i for i, (a, b) in enumerate(e.offsets) if a <= p < b)
                assert regions[owner] == 0
            decoded = tok.decode([e.ids[i] for i in ours])
            assert "###" not in decoded and "Response" not in decoded
        # The official prefix-count method on the same text: where it differs, it holds tokens that are not mostly
        # source (e.g. ".\n\n###", the source's final period merged with the next header) and misses tokens that are.
        ref_src, ref_tgt = _prefix_count_spans(tok, r, len(e.ids) + 1)
        for ref, ours, span in ((ref_src, ours_src, 1), (ref_tgt, ours_tgt, 2)):
            if ref == ours:
                continue
            prefix_wrong += 1
            assert all(regions[i] != span for i in set(ref) - set(ours))
            assert all(regions[i] == span for i in set(ours) - set(ref))
            header_in_span += "###" in tok.decode([e.ids[i] for i in ref])
    # Deterministic: this tokenizer merges ".\n\n###" (and ":\nT") for most of these records.
    assert prefix_wrong >= len(rendered) // 2, prefix_wrong
    assert header_in_span >= len(rendered) // 2, header_in_span


def test_token_merging_newline_with_first_source_word() -> None:
    """A hand-built BPE whose merges make ":\\nThe" one token: the prefix method starts the source one token
    late (the span decodes to "cat sat"), ours includes the straddling token (3 of 4 visible characters)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    tpl = Template("In:\n{input}\nOut:\n", name="tiny")
    r = tpl.render("", "The cat sat", "Le chat")
    alphabet = sorted(set(r.text) | {"<s>", "</s>", "<pad>"})
    merges = [(":", "\n"), (":\n", "T"), (":\nT", "h"), (":\nTh", "e")]
    vocab = {t: i for i, t in enumerate(alphabet + ["".join(m) for m in merges])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.decoder = decoders.Fuse()  # no pre-tokenizer: merges may cross "\n", as in SentencePiece models
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokens = tok.convert_ids_to_tokens(tok(r.text)["input_ids"])
    assert ":\nThe" in tokens and ":\n" in tok.convert_ids_to_tokens(tok(r.text[: r.source[0]])["input_ids"])
    e = tok.backend_tokenizer.encode(r.text)
    regions = token_regions(r.text, r.source, r.target, e.offsets, e.special_tokens_mask)
    ours = [e.ids[i] for i, g in enumerate(regions) if g == 1]
    ref_src, _ = _prefix_count_spans(tok, r, len(e.ids) + 1)
    assert tok.decode([e.ids[i] for i in ref_src]) == " cat sat"  # "The" lost
    assert tok.decode(ours) == ":\nThe cat sat"  # the straddling token is mostly source


# ----------------------------------------------------------------------------------------------------------------
# Truncation, EOS, drops, labels


def _encode(src: str, tgt: str, **kw) -> dict:
    enc = Encoder(test_tokenizer(), instruction=INSTRUCTION, **kw)
    (row,) = enc.encode([_row(src, tgt)])
    return row


def _full_length(src: str, tgt: str) -> int:
    return _encode(src, tgt, cutoff_len=4096)["length"]


SRC, TGT = "The children are playing in the garden.", "Watoto wanacheza bustanini leo na kesho pia."


def test_untruncated_record_ends_with_eos_and_marks_every_target_token() -> None:
    tok = test_tokenizer()
    row = _encode(SRC, TGT, cutoff_len=512)
    assert row["input_ids"][-1] == tok.eos_token_id
    assert row["span_ids"][-1] == 0 and row["span_ids"][-2] == 2
    assert tok.decode(_span_tokens(row, 2)) == TGT
    assert row["labels"] == row["input_ids"]  # reference: labels over the whole sequence


def test_exact_fit_gets_no_eos_and_truncated_target_keeps_its_last_token_marked() -> None:
    tok = test_tokenizer()
    n = _full_length(SRC, TGT)  # includes the EOS
    exact = _encode(SRC, TGT, cutoff_len=n - 1)  # the text alone fills cutoff_len: no EOS (reference rule)
    assert exact["length"] == n - 1 and exact["input_ids"][-1] != tok.eos_token_id
    assert exact["span_ids"][-1] == 2 and tok.decode(_span_tokens(exact, 2)) == TGT
    cut = _encode(SRC, TGT, cutoff_len=n - 4, min_target_tokens=3)  # three target tokens cut off
    assert cut["drop"] == "" and cut["target_truncated"] and cut["length"] == n - 4
    assert cut["span_ids"][-1] == 2  # the last surviving target token is marked (documented choice)
    assert cut["n_target"] == exact["n_target"] - 3
    assert TGT.startswith(tok.decode(_span_tokens(cut, 2)))


def test_drops_by_reason_after_truncation() -> None:
    n = _full_length(SRC, TGT)
    n_tgt = _encode(SRC, TGT, cutoff_len=4096)["n_target"]
    first_tgt = n - 1 - n_tgt  # position of the first target token
    # Source intact, target cut to 2 tokens: short_target (min 3); with 2 allowed it is kept.
    assert _encode(SRC, TGT, cutoff_len=first_tgt + 2)["drop"] == "short_target"
    assert _encode(SRC, TGT, cutoff_len=first_tgt + 2, min_target_tokens=2)["drop"] == ""
    # Source cut (target gone too): source_truncated, whatever min_target_tokens is.
    n_src = _encode(SRC, TGT, cutoff_len=4096)["n_source"]
    row = _encode(SRC, TGT, cutoff_len=first_tgt - 10 - n_src // 2)
    assert row["drop"] == "source_truncated" and row["input_ids"] == [] and row["span_ids"] == []
    # A genuinely short target.
    assert _encode(SRC, "Ok", cutoff_len=512)["drop"] == "short_target"
    # Normalisation-level reasons pass through untouched.
    assert _encode(" \n", TGT)["drop"] == "empty_source"
    assert _encode(SRC, "")["drop"] == "empty_target"


def test_every_kept_row_can_be_pooled() -> None:
    """>= 1 source token and >= min_target_tokens target tokens in every kept row, over many cutoffs."""
    for cutoff in range(8, _full_length(SRC, TGT) + 2):
        row = _encode(SRC, TGT, cutoff_len=cutoff)
        if row["drop"]:
            continue
        assert row["length"] <= cutoff
        assert row["span_ids"].count(1) >= 1 and row["span_ids"].count(2) >= 3


def test_response_only_labels() -> None:
    tok = test_tokenizer()
    row = _encode(SRC, TGT, cutoff_len=512, labels="response")
    labelled = [i for i, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
    assert labelled == _span_tokens(row, 2) + [tok.eos_token_id]
    assert all(lab in (-100, i) for i, lab in zip(row["input_ids"], row["labels"]))


def test_custom_template_and_per_record_instruction() -> None:
    tpl = Template("Q: {instruction}\nSRC: {input}\nTGT:", name="qa")
    enc = Encoder(test_tokenizer(), template=tpl, instruction=INSTRUCTION)
    rec = normalize_stage1({"src_text": SRC, "tgt_text": " " + TGT, "src_lang": "en", "tgt_lang": "sw"})
    rendered = enc.render(rec)
    assert rendered.text == f"Q: Translate the following sentence from English to Swahili.\nSRC: {SRC}\nTGT: {TGT}"
    (row,) = enc.encode([rec])
    tok = test_tokenizer()
    assert tok.decode(_span_tokens(row, 1)) == SRC and tok.decode(_span_tokens(row, 2)) == " " + TGT
    rec["instruction"] = "Say it in Swahili:"
    assert enc.render(rec).text.startswith("Q: Say it in Swahili:\nSRC: ")
