"""Translation quality: greedy generation on held-out parallel sentences, scored with chrF++ and BLEU.

The prompt is the one the model is trained on (Alpaca template, ``data.instruction`` with English language names,
the tokenizer's special tokens as in training), so the base model, the stage-1 model and the stage-2 model are
asked the same question. Generation is greedy and batched with left padding; the number of new tokens is bounded
by the source length (``ceil(ratio * source tokens) + 8``, at most ``max_new_tokens``). The answer is the text
up to the first newline or ``###`` (the template's section marker), stripped.

Scores are corpus-level sacrebleu with tokenizers that work offline only: chrF++ (character n-grams + word
bigrams, ``word_order=2``) and BLEU with ``13a`` (``char`` for languages written without spaces). An empty
hypothesis scores 0 for its sentence; an all-empty corpus scores 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from alignx.constants import DEFAULT_INSTRUCTION
from alignx.data.prompt import ALPACA, instruction_text

NO_SPACE_LANGS = frozenset({"zh", "ja", "ko", "th", "lo", "km", "my", "bo"})


def bleu_tokenizer(lang: str) -> str:
    """sacrebleu tokenizer for a target language: ``char`` without word spaces, else ``13a`` (both offline)."""
    return "char" if lang in NO_SPACE_LANGS else "13a"


def translation_scores(hyps: Sequence[str], refs: Sequence[str], tgt_lang: str) -> dict[str, Any]:
    """Corpus chrF++ and BLEU of ``hyps`` against one reference each (0-100).

    Returns ``chrf++``, ``bleu``, ``bleu_tokenize``, ``n`` and ``empty`` (how many hypotheses were empty).
    """
    import sacrebleu

    if len(hyps) != len(refs):
        raise ValueError(f"got {len(hyps)} hypotheses for {len(refs)} references")
    if not refs:
        raise ValueError("no sentences to score")
    hyps = [h if isinstance(h, str) else "" for h in hyps]
    empty = sum(1 for h in hyps if not h.strip())
    tok = bleu_tokenizer(tgt_lang)
    if empty == len(hyps):
        chrf = bleu = 0.0
    else:
        chrf = sacrebleu.corpus_chrf(hyps, [list(refs)], word_order=2).score
        bleu = sacrebleu.corpus_bleu(hyps, [list(refs)], tokenize=tok).score
    return {"chrf++": float(chrf), "bleu": float(bleu), "bleu_tokenize": tok, "n": len(hyps), "empty": empty}


def translation_prompt(text: str, src_lang: str, tgt_lang: str, instruction: str = DEFAULT_INSTRUCTION) -> str:
    """The training prompt (Alpaca, with input) asking to translate ``text``; the response follows it."""
    return ALPACA.render(instruction_text(instruction, src_lang, tgt_lang), text, "").text


def clean_generation(text: str) -> str:
    """The answer part of a generation: up to the first newline or ``###``, stripped."""
    for stop in ("\n", "###"):
        text = text.split(stop, 1)[0]
    return text.strip()


class _StopAtNewline:
    """Stopping criterion: a sequence is done once its new text holds a newline."""

    def __init__(self, tokenizer: Any, prompt_len: int) -> None:
        self.tokenizer, self.prompt_len = tokenizer, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        new = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        return torch.tensor(["\n" in t for t in new], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate(
    lm: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    source_tokens: Sequence[int],
    batch_size: int = 8,
    max_new_tokens: int = 256,
    ratio: float = 2.0,
    desc: str = "generate",
    progress: bool = True,
) -> list[str]:
    """Greedy continuations of ``prompts`` (cleaned by :func:`clean_generation`), in input order.

    ``source_tokens[i]`` bounds the new tokens of prompt i: ``ceil(ratio * source_tokens[i]) + 8`` (batch max).
    """
    from transformers import StoppingCriteriaList

    if len(prompts) != len(source_tokens):
        raise ValueError("one source length per prompt is needed")
    device = next(lm.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
            idx = order[start : start + batch_size]
            enc = tokenizer([prompts[i] for i in idx], add_special_tokens=True, padding=True, return_tensors="pt")
            limit = min(max_new_tokens, max(math.ceil(ratio * source_tokens[i]) + 8 for i in idx))
            prompt_len = enc["input_ids"].shape[1]
            gen = lm.generate(
                input_ids=enc["input_ids"].to(device),
                attention_mask=enc["attention_mask"].to(device),
                do_sample=False,
                max_new_tokens=limit,
                pad_token_id=pad_id,
                use_cache=True,
                stopping_criteria=StoppingCriteriaList([_StopAtNewline(tokenizer, prompt_len)]),
            )
            texts = tokenizer.batch_decode(gen[:, prompt_len:], skip_special_tokens=True)
            for i, t in zip(idx, texts):
                out[i] = clean_generation(t)
    finally:
        tokenizer.padding_side = side
    return out


def evaluate_translation(
    lm: torch.nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    src_lang: str,
    tgt_lang: str,
    *,
    instruction: str = DEFAULT_INSTRUCTION,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    examples: int = 5,
    progress: bool = True,
) -> dict[str, Any]:
    """Translate the sources of ``pairs`` ``[(source, reference)]`` and score them (see :func:`translation_scores`).

    The result also holds the first ``examples`` triples ``{source, reference, hypothesis}``.
    """
    if not pairs:
        raise ValueError(f"no pairs to translate for {src_lang}->{tgt_lang}")
    sources = [s for s, _ in pairs]
    refs = [r for _, r in pairs]
    prompts = [translation_prompt(s, src_lang, tgt_lang, instruction) for s in sources]
    lengths = [len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in sources]
    hyps = generate(
        lm,
        tokenizer,
        prompts,
        source_tokens=lengths,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        desc=f"translate {src_lang}->{tgt_lang}",
        progress=progress,
    )
    scores = translation_scores(hyps, refs, tgt_lang)
    scores["examples"] = [
        {"source": s, "reference": r, "hypothesis": h} for s, r, h in list(zip(sources, refs, hyps))[:examples]
    ]
    return scores
