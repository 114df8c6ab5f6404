"""Segments -> token ids with regions: the one tokenisation, truncation, EOS and label rule of every record format.

Spans
-----
A record is rendered to one or more :class:`~alignx.data.prompt.Segment` s: a text with the character ranges of its
source ``x`` and target ``y``. Each text is tokenised once, with the tokenizer's own special tokens (BOS where the
tokenizer adds one) and ``return_offsets_mapping``; every token ``t`` covers the characters ``[a_t, b_t)``. Each
character has a region: 0 prompt, 1 source, 2 target. The region of a token is decided by :func:`token_regions`:

1. Special tokens (BOS, EOS, pad) and tokens with an empty character range are region 0.
2. Count the token's characters per region, **ignoring whitespace characters** when the token has any
   non-whitespace character (a whitespace-only token counts all its characters).
3. The token is in span ``r`` (source or target) iff **strictly more than half** of its counted characters are
   in ``r``; otherwise it is prompt (0). A tie is not a majority.

So a token that straddles a boundary goes to the side holding most of its visible characters: a leading-space
token ``" Hello"`` whose space belongs to the template is source (5 of 5 visible characters); a token ``":\\nThe"``
that merges the end of ``### Input:\\n`` with the first source word is source (3 of 4); a token ``".\\n\\n###"``
that merges the source's final period with the next header is prompt (1 of 4), so that period is not pooled; a
token ``".\\n\\n"`` is source (its only visible character is the period); ``":\\nA"`` (1 of 2) and a whitespace
token ``"\\n "`` whose space starts the source (1 of 2) are prompt. A token that is mostly prompt is never in a
span. Tokens sharing one character range (byte-level pieces of one emoji or of one Devanagari cluster) all get
that character's region. Nothing depends on how a *prefix* of the prompt would tokenise, which differs from the
full tokenisation for many tokenizers (a SentencePiece-style tokenizer that merges ``".\\n\\n###"`` makes the
prefix-count method put the header tokens into the source span).

Sequence layout (reference, method.md section 1.2)
--------------------------------------------------
``tokens = tokenize(text)[:cutoff_len]``; EOS is appended iff the last token is not EOS and
``len(tokens) < cutoff_len`` (a sequence that fills ``cutoff_len`` exactly gets no EOS, as in the reference).
The official code marks target positions ``[output_start, L - 1)``, i.e. it leaves the last sequence token unmarked;
untruncated, that token is EOS, which has no characters and is region 0 here too. **For a truncated target we mark
every surviving target token, including the last one** (the official code leaves that one unmarked; it is a real
target token, and ``min_target_tokens`` counts marked tokens).

Labels: ``"all"`` (reference) copies ``input_ids``; ``"response"`` keeps only target tokens and an appended EOS,
``-100`` elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from alignx.constants import IGNORE_INDEX
from alignx.constants import PROMPT_SPAN as PROMPT
from alignx.constants import SOURCE_SPAN as SOURCE
from alignx.constants import TARGET_SPAN as TARGET
from alignx.data.prompt import Segment
from alignx.data.records import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["SegmentTokenizer", "Tokenized", "labels_for", "lm_columns", "token_regions", "tokenize_segments"]

_PROBE = "Probe: Hello world!\n\n### Input:\n 你好 😀 नमस्ते"


def token_regions(
    text: str,
    source: tuple[int, int],
    target: tuple[int, int],
    offsets: list[tuple[int, int]] | np.ndarray,
    special_mask: list[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Region (0 prompt, 1 source, 2 target) of each token, by strict majority of its visible characters.

    Args:
        text: the rendered text, ``len(text) = C``.
        source, target: character ranges ``[start, end)`` of the source and the target in ``text``.
        offsets: ``[L, 2]`` character range of each token (the tokenizer's ``offset_mapping``).
        special_mask: ``[L]`` 1 for special tokens (region 0 whatever their offsets).

    Returns:
        ``[L]`` int8 regions. With ``n_r(t)`` the number of characters of region ``r`` in token ``t`` (whitespace
        excluded unless the token is only whitespace), ``region(t) = r`` if ``2 n_r(t) > sum_r' n_r'(t)`` for
        ``r`` in {source, target}, else 0; also 0 for special tokens and empty ranges.
    """
    n = len(text)
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts = np.clip(offsets[:, 0], 0, n)
    ends = np.clip(offsets[:, 1], 0, n)
    char_region = np.zeros(n, dtype=np.int8)
    char_region[source[0] : source[1]] = SOURCE
    char_region[target[0] : target[1]] = TARGET
    visible = np.fromiter((not c.isspace() for c in text), dtype=bool, count=n)
    counts = np.zeros((3, len(offsets)), dtype=np.int64)
    counts_all = np.zeros((3, len(offsets)), dtype=np.int64)
    for r in (PROMPT, SOURCE, TARGET):
        in_r = char_region == r
        cum = np.concatenate([[0], np.cumsum(in_r & visible)])
        cum_all = np.concatenate([[0], np.cumsum(in_r)])
        counts[r] = cum[ends] - cum[starts]
        counts_all[r] = cum_all[ends] - cum_all[starts]
    counts = np.where(counts.sum(0, keepdims=True) > 0, counts, counts_all)
    total = counts.sum(0)
    region = np.full(len(offsets), PROMPT, dtype=np.int8)
    region[2 * counts[SOURCE] > total] = SOURCE
    region[2 * counts[TARGET] > total] = TARGET
    region[ends <= starts] = PROMPT
    if special_mask is not None:
        region[np.asarray(special_mask, dtype=bool)] = PROMPT
    return region


@dataclass(frozen=True)
class Tokenized:
    """One tokenised :class:`~alignx.data.prompt.Segment`.

    ``ids`` ``[L]`` (truncated at ``cutoff_len``, EOS appended when there is room), ``regions`` ``[L]`` int8 (per id:
    0 prompt / special, 1 source, 2 target), ``full`` (tokens per region before truncation), ``eos_added``.
    """

    ids: list[int]
    regions: np.ndarray
    full: tuple[int, int, int]
    eos_added: bool

    def count(self, region: int) -> int:
        """Tokens of ``region`` that survived truncation."""
        return int((self.regions == region).sum())


class SegmentTokenizer:
    """Tokenises segments with the layout of the module docstring (picklable, for ``datasets.map`` workers).

    Args:
        tokenizer: a fast (Rust-backed) HF tokenizer; it is not modified (a private copy of its backend is used,
            with special-token parsing of the *data* switched off, so a literal "</s>" in a record is text).
        cutoff_len: maximum sequence length in tokens, EOS included.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, cutoff_len: int) -> None:
        if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "backend_tokenizer", None) is None:
            raise DataError(f"character-offset spans need a fast tokenizer, got {type(tokenizer).__name__}")
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no eos_token; the prompt format ends every untruncated record with EOS")
        if cutoff_len < 2:
            raise ValueError(f"need cutoff_len >= 2, got {cutoff_len}")
        self.cutoff_len = cutoff_len
        self.eos_id = int(tokenizer.eos_token_id)
        self.backend_json = tokenizer.backend_tokenizer.to_str()
        self._backend: Any = None
        self._expected_probe = list(tokenizer(_PROBE, add_special_tokens=True)["input_ids"])

    @property
    def backend(self) -> Any:
        """A private copy of the Rust tokenizer: no truncation, no padding, special-token strings in data are text.

        Built on first use (a 262k-vocabulary tokenizer takes seconds to copy; a cached run never needs it), and
        checked to encode like the HF tokenizer it came from.
        """
        if self._backend is None:
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(self.backend_json)
            backend.no_truncation()
            backend.no_padding()
            got = backend.encode(_PROBE, add_special_tokens=True).ids
            if got != self._expected_probe:
                raise DataError(
                    f"the tokenizer encodes text differently from its backend ({self._expected_probe[:8]}... vs "
                    f"{got[:8]}...); char-offset spans cannot be trusted"
                )
            backend.encode_special_tokens = True
            self._backend = backend
        return self._backend

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_backend": None}

    def __call__(self, segments: Sequence[Segment]) -> list[Tokenized]:
        """Tokenise ``segments`` in one batch (see :class:`Tokenized`)."""
        encodings = self.backend.encode_batch([s.text for s in segments], add_special_tokens=True)
        return [self._layout(seg, enc) for seg, enc in zip(segments, encodings)]

    def _layout(self, seg: Segment, enc: Any) -> Tokenized:
        """Regions of the full encoding, then the cut at ``cutoff_len`` and the EOS rule."""
        region = token_regions(seg.text, seg.source, seg.target, enc.offsets, enc.special_tokens_mask)
        full = (int((region == PROMPT).sum()), int((region == SOURCE).sum()), int((region == TARGET).sum()))
        ids = list(enc.ids[: self.cutoff_len])
        region = region[: self.cutoff_len]
        eos_added = bool(ids) and ids[-1] != self.eos_id and len(ids) < self.cutoff_len
        if eos_added:
            ids.append(self.eos_id)
            region = np.append(region, PROMPT).astype(np.int8)
        return Tokenized(ids, np.asarray(region, dtype=np.int8), full, eos_added)


def tokenize_segments(
    tokenizer: PreTrainedTokenizerBase, segments: Sequence[Segment], cutoff_len: int
) -> list[Tokenized]:
    """Tokenise ``segments`` (see :class:`Tokenized`); a convenience for tests and one-off use."""
    return SegmentTokenizer(tokenizer, cutoff_len)(segments)


def labels_for(tok: Tokenized, mode: str) -> list[int]:
    """``[L]`` labels: ``"all"``, every token; ``"response"``, target tokens and an appended EOS, ``-100`` elsewhere."""
    if mode == "all":
        return list(tok.ids)
    if mode != "response":
        raise ValueError(f"labels mode must be 'all' or 'response', got {mode!r}")
    keep = tok.regions == TARGET
    if tok.eos_added:
        keep[-1] = True
    return np.where(keep, np.asarray(tok.ids), IGNORE_INDEX).tolist()


def lm_columns(tok: Tokenized, labels: str, *, spans: bool = True) -> dict[str, Any]:
    """The language-model columns of one tokenised text, each ``[L]`` but the counts: ``input_ids``, ``labels``
    (:func:`labels_for`), ``span_ids`` (the regions, or all 0 without ``spans``), ``length``, ``n_source`` and
    ``n_target`` (surviving source / target tokens) and ``target_truncated``."""
    n_target = tok.count(TARGET)
    return {
        "input_ids": tok.ids,
        "labels": labels_for(tok, labels),
        "span_ids": tok.regions.tolist() if spans else [0] * len(tok.ids),
        "length": len(tok.ids),
        "n_source": tok.count(SOURCE),
        "n_target": n_target,
        "target_truncated": n_target < tok.full[TARGET],
    }
