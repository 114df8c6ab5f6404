"""AFP, "Align aFter Pretraining" (Li, Wang, Zhang, Zong, NAACL 2024; arXiv 2311.08089), as an alignx recipe.

Each training row holds one translation pair ``(s0, s1)`` (``s0`` in the pivot language, English) and one
independently drawn cross-lingual instruction-following text. Per micro-batch of ``B`` rows::

    z0(b), z1(b) = pool_k( LM_body(s0(b)) ), pool_k( LM_body(s1(b)) )      each sentence encoded SEPARATELY, as raw
                                                                          text (no prompt); [B, D] each
    pool_k     = hidden state of decoder block k (``model.align_layer``) averaged over the sentence's text tokens
                 (pool "mean", special tokens excluded) or taken at its last text token (pool "last")
    L_CL       = ctr_scale * mean_b [ -log softmax_j( cos(z0(b), z1(j)) / tau )_b ]      anchors s0, candidates s1
    L_CLM      = token mean of -log p(label) over the instruction text's counted labels (prompt masked: only the
                 answer and EOS count, ``data.labels = "response"``)
    L          = lambda_ctr * L_CL + clm_weight * L_CLM             (AFP: tau 0.05, 1.0 * L_CL + 1.5 * L_CLM)

The candidates come from :meth:`alignx.objective.AlignXObjective.gather_candidates`: the micro-batch with
``objective.negatives = "local"``, all ranks' pairs with ``"global"`` (AFP gathers ``z1`` across GPUs), so this
recipe follows whatever the shared objective supports. The instruction text is

    "{instruction} {input} Answer in {B}: {output}"          ("{instruction} Answer in {B}: {output}" without input)

with the instruction and input in language A and the answer in language B (the English name of B), as AFP's
``generate_sup_data.py``. Differences from the AFP code, all on purpose: texts are not packed into 512-token
blocks (one text per row, padded), the prompt mask comes from character offsets instead of a token-prefix match,
and mean pooling leaves BOS/EOS out (AFP's ``avg`` averages every attended token).

Which tokens are pooled is a property of the records (``"pool"``: ``"mean"`` or ``"last"``; AFP's shipped scripts
use ``last`` at layer 1, i.e. ``model.align_layer: 1``); the pair's pooled tokens are marked in the rows, so the
objective is one span-mean whatever the pooler.

Records (JSONL), written by :func:`build_records`::

    {"sent0": "In the beginning ...", "sent1": "Hapo mwanzo ...", "lang0": "en", "lang1": "sw",
     "instruction": "Continue the passage with the verse that follows.", "input": "...", "output": "...",
     "input_lang": "sw", "output_lang": "en", "task": "next_verse", "pool": "mean"}

Instructions built from Bible verses (there is no multilingual instruction corpus among the sources): the task is
*next verse* — the input is a verse in language A, the answer the verse that follows it (same chapter) in language
B; at the last verse of a chapter it is the *previous verse*. Both are read off the aligned data, neither is a
translation of the input. The instruction sentence itself is English for every language A (the sources hold no
translated instruction templates); with probability ``cross_probability`` (AFP: 0.5) B differs from A.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from alignx.constants import SOURCE_SPAN as SOURCE
from alignx.constants import TARGET_SPAN as TARGET
from alignx.data import (
    LINE_REASONS,
    Collator,
    Segment,
    Tokenized,
    blank_row,
    drop_blank,
    lm_columns,
    preparer,
    register_format,
)
from alignx.decoder import find_decoder_parts, first_output, layer_module
from alignx.dist import all_gather_rows, global_share, is_distributed
from alignx.errors import ConfigError
from alignx.languages import lang_id, lang_name
from alignx.objective import AlignXObjective, NTPInput, kernel_op, lm_loss_sum
from alignx.recipes.base import Recipe

if TYPE_CHECKING:
    from torch import nn

    from alignx.config import Config, ObjectiveConfig
    from alignx.data.sources import Unit

__all__ = [
    "RECIPE",
    "CLM_WEIGHT",
    "DROP_REASONS",
    "AFPCollator",
    "AFPFormat",
    "AFPObjective",
    "build_records",
    "clm_segment",
    "encode_layer",
    "prepare",
]

CLM_WEIGHT = 1.5
"""AFP's ``clm_weight`` (``cl_weight`` is ``objective.lambda_ctr``, 1.0 in ``configs/recipes/afp.yaml``)."""
POOLS = ("mean", "last")
PAIR_COLUMNS = ("pair_a_ids", "pair_a_pool", "pair_b_ids", "pair_b_pool")
NEXT_VERSE = "Continue the passage with the verse that follows."
PREVIOUS_VERSE = "Give the verse that comes just before this one."
REPEAT = "Repeat the following text."

DROP_REASONS: dict[str, str] = {
    **LINE_REASONS,
    "missing_field": "a required field is absent or null",
    "bad_field_type": "a text field is not a string or a language field is not a code",
    "unknown_language": "a language code is not in alignx.languages.LANGUAGES",
    "bad_pool": "'pool' is not 'mean' or 'last'",
    "empty_sentence": "sent0 or sent1 is empty or whitespace",
    "empty_instruction": "the instruction is empty or whitespace",
    "empty_target": "the output is empty or whitespace",
    "no_sentence_tokens": "sent0 or sent1 has no text token (cannot be pooled)",
    "response_truncated": "no token of the output survives truncation at data.cutoff_len",
}
"""Every reason an AFP record is dropped (printed in the preprocessing report)."""


# ----------------------------------------------------------------------------------------------------------------
# Records -> rows


def clm_segment(instruction: str, input: str, output: str, answer_lang: str) -> Segment:
    """The AFP instruction text with the character ranges of its input (source) and its answer (target).

    ``"{instruction} {input} Answer in {B}: {output}"``, or without input ``"{instruction} Answer in {B}: {output}"``,
    ``B`` = the English name of ``answer_lang``.
    """
    head = f"{instruction} "
    src = (len(head), len(head) + len(input)) if input else (len(head), len(head))
    prompt = (
        f"{head}{input} Answer in {lang_name(answer_lang)}: "
        if input
        else f"{head}Answer in {lang_name(answer_lang)}: "
    )
    return Segment(prompt + output, src, (len(prompt), len(prompt) + len(output)))


def _normalize(rec: dict[str, Any], line: int) -> dict[str, Any]:
    """One AFP record as a fixed-schema row with its drop reason ("" = usable); language ids: the pair's."""
    row = blank_row(AFPFormat.texts, line)
    for key in ("sent0", "sent1", "instruction", "output", "lang0", "lang1", "output_lang"):
        if rec.get(key) is None:
            return {**row, "drop": "missing_field"}
    for key in ("sent0", "sent1", "instruction", "input", "output", "lang0", "lang1", "input_lang", "output_lang"):
        value = rec.get(key, "")
        if not isinstance("" if value is None else value, str):
            return {**row, "drop": "bad_field_type"}
        row[key] = value or ""
    try:
        row["src_lang"], row["tgt_lang"] = lang_id(row["lang0"]), lang_id(row["lang1"])
        lang_id(row["output_lang"])
        if row["input_lang"]:
            lang_id(row["input_lang"])
    except ValueError:
        return {**row, "drop": "unknown_language", "src_lang": -1, "tgt_lang": -1}
    row["pool"] = rec.get("pool", "mean")
    if row["pool"] not in POOLS:
        return {**row, "drop": "bad_pool", "pool": ""}
    return drop_blank(
        row,
        (
            (("sent0", "sent1"), "empty_sentence"),
            (("instruction",), "empty_instruction"),
            (("output",), "empty_target"),
        ),
    )


def _pool_marks(regions: Any, pool: str) -> list[int]:
    """1 on the tokens that form the pooled vector: every text token (mean) or the last one (last)."""
    marks = (regions == SOURCE).astype("int64")
    if pool == "last" and marks.any():
        last = int(marks.nonzero()[0][-1])
        marks[:] = 0
        marks[last] = 1
    return marks.tolist()


@dataclass(frozen=True)
class AFPFormat:
    """AFP records (module docstring) -> rows: the instruction text (``input_ids``, ``labels`` by ``labels``,
    ``span_ids`` all 0) and the pair (``pair_a_ids`` / ``pair_b_ids`` with their pooled-token marks ``pair_a_pool`` /
    ``pair_b_pool``); ``src_lang`` and ``tgt_lang`` are the pair's languages; ``length`` counts all three sequences
    (for length grouping)."""

    labels: str = "all"

    name: ClassVar[str] = "afp"
    title: ClassVar[str] = "afp"
    texts: ClassVar[tuple[str, ...]] = (
        "sent0",
        "sent1",
        "instruction",
        "input",
        "output",
        "lang0",
        "lang1",
        "input_lang",
        "output_lang",
        "pool",
    )
    columns: ClassVar[tuple[str, ...]] = PAIR_COLUMNS
    reasons: ClassVar[dict[str, str]] = DROP_REASONS
    deduplicate: ClassVar[bool] = False
    packs: ClassVar[bool] = False

    @classmethod
    def from_config(cls, cfg: Config) -> AFPFormat:
        """``data.labels``."""
        return cls(cfg.data.labels)

    def normalize(self, rec: dict[str, Any], line: int) -> dict[str, Any]:
        """Required fields, string types, known languages, the pooler, non-empty texts (:data:`DROP_REASONS`)."""
        return _normalize(rec, line)

    def render(self, row: dict[str, Any]) -> tuple[Segment, Segment, Segment]:
        """The instruction text (:func:`clm_segment`), then ``sent0`` and ``sent1`` as raw text, each a source."""
        text = clm_segment(row["instruction"], row["input"], row["output"], row["output_lang"])
        return text, Segment(row["sent0"], (0, len(row["sent0"]))), Segment(row["sent1"], (0, len(row["sent1"])))

    def build(self, row: dict[str, Any], tokens: Sequence[Tokenized]) -> dict[str, Any] | str:
        """The row, or no_sentence_tokens / response_truncated."""
        text, a, b = tokens
        if a.count(SOURCE) == 0 or b.count(SOURCE) == 0:
            return "no_sentence_tokens"
        if text.count(TARGET) == 0:
            return "response_truncated"
        out = lm_columns(text, self.labels, spans=False)
        out["length"] += len(a.ids) + len(b.ids)
        out.update(pair_a_ids=a.ids, pair_a_pool=_pool_marks(a.regions, row["pool"]))
        out.update(pair_b_ids=b.ids, pair_b_pool=_pool_marks(b.regions, row["pool"]))
        return out


register_format(AFPFormat.name, AFPFormat.from_config)


prepare = preparer(AFPFormat.name, """:func:`alignx.data.prepare` of AFP records (:class:`AFPFormat`).""")


class AFPCollator:
    """Rows -> the shared batch of the instruction texts plus ``pair_input_ids``, ``pair_attention_mask`` and
    ``pair_pool`` ``[2B, Tp]``: rows ``0..B-1`` are the ``sent0`` s (anchors), rows ``B..2B-1`` the ``sent1`` s.

    The pairs are padded on the right (position ids then need no correction), to a multiple of 8.
    """

    def __init__(self, tokenizer: Any, cfg: Config) -> None:
        self.text = Collator(tokenizer, padding_side=cfg.data.padding_side, pad_to_multiple_of=8)
        self.pairs = Collator(tokenizer, padding_side="right", pad_to_multiple_of=8)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        batch = self.text(rows)
        seqs = [{"input_ids": r["pair_a_ids"], "span_ids": r["pair_a_pool"]} for r in rows]
        seqs += [{"input_ids": r["pair_b_ids"], "span_ids": r["pair_b_pool"]} for r in rows]
        pairs = self.pairs(seqs)
        batch["pair_input_ids"] = pairs["input_ids"]
        batch["pair_attention_mask"] = pairs["attention_mask"]
        batch["pair_pool"] = pairs["span_ids"]
        return batch


def _collator(tokenizer: Any, cfg: Config) -> AFPCollator:
    return AFPCollator(tokenizer, cfg)


# ----------------------------------------------------------------------------------------------------------------
# The objective


def encode_layer(lm: nn.Module, input_ids: Tensor, attention_mask: Tensor, layer: int) -> Tensor:
    """``[B, T, D]`` output of decoder block ``layer`` (1-based, HF ``hidden_states[layer]``; ``layer = N`` is the
    final-norm output) for a separate forward of the decoder body on ``input_ids`` (no LM head: its logits are not
    needed). The state is captured by a forward hook that exists only during this call."""
    module = layer_module(*find_decoder_parts(lm), layer)
    captured: dict[str, Tensor] = {}

    def keep(mod: nn.Module, args: Any, output: Any) -> None:
        captured.setdefault("h", first_output(output))

    body = lm.get_decoder() if callable(getattr(lm, "get_decoder", None)) else None
    handle = module.register_forward_hook(keep)
    try:
        (body if body is not None else lm)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        handle.remove()
    if "h" not in captured:
        raise RuntimeError(f"{type(lm).__name__}: the hook on block {layer} did not fire")
    return captured["h"]


class AFPObjective(AlignXObjective):
    """``L = lambda_ctr * L_CL + clm_weight * L_CLM`` (module docstring). Terms: ``ntp`` = L_CLM, ``ctr`` = L_CL,
    ``lam`` = 0; ``rows_kept`` = pairs in the contrastive term.

    The temperature, ``ctr_scale``, ``symmetric`` and the negatives come from the ``objective`` section (AFP:
    tau 0.05, scale 1, one direction); the pooled layer is ``model.align_layer``.
    """

    kinds = ("afp",)

    def __init__(self, cfg: ObjectiveConfig, *, min_target_tokens: int = 3, clm_weight: float = CLM_WEIGHT) -> None:
        if cfg.negatives not in ("local", "global"):
            raise ConfigError(
                f"objective.negatives={cfg.negatives!r}: the afp recipe contrasts within the micro-batch ('local') or "
                "across all ranks ('global', as AFP); it keeps no queue"
            )
        if cfg.negatives == "global" and not is_distributed():
            raise ConfigError(
                "objective.negatives='global' gathers over the data-parallel ranks: start the process group first "
                "(alignx.engine.init_distributed; one process is a group of 1), or use negatives='local'"
            )
        super().__init__(cfg, min_target_tokens=min_target_tokens)
        if clm_weight < 0:
            raise ValueError(f"clm_weight must be >= 0, got {clm_weight}")
        self.clm_weight = clm_weight

    @property
    def uses_head(self) -> bool:
        return False

    def pool_marked(self, hidden: Tensor, marks: Tensor) -> tuple[Tensor, Tensor]:
        """fp32 mean of ``hidden [N, T, D]`` where ``marks [N, T]`` is 1 -> ``(means [N, D], counts [N])``."""
        span_mean_pool = kernel_op("span_mean_pool")
        means, counts = span_mean_pool(
            hidden, marks.long(), 1, out_dtype=torch.float32, backend=self.cfg.kernel_backend
        )
        return means[:, 0], counts[:, 0]

    def terms(self, clm_logits: NTPInput, labels: Tensor, pair_hidden: Tensor, pair_pool: Tensor) -> dict[str, Tensor]:
        """All terms from the instruction texts' logits ``[B, T, V]`` / labels ``[B, T]`` and the pair sentences'
        layer-k states ``[2B, Tp, D]`` with their pooled-token marks ``[2B, Tp]`` (first half ``sent0``)."""
        if pair_hidden.shape[0] % 2 or pair_pool.shape != pair_hidden.shape[:2]:
            raise ValueError(
                f"pair states must be [2B, Tp, D] with marks [2B, Tp], got {tuple(pair_hidden.shape)} and "
                f"{tuple(pair_pool.shape)}"
            )
        pooled, counts = self.pool_marked(pair_hidden, pair_pool)
        b = pair_hidden.shape[0] // 2
        valid = (counts[:b] > 0) & (counts[b:] > 0)
        kept = valid.nonzero().squeeze(1)
        z0, z1 = pooled[:b][kept], pooled[b:][kept]
        clm, ctr = self._clm_and_contrastive(clm_logits, labels, z0, z1)
        # Every pooled state stays in the graph, so every rank's backward reaches the same parameters.
        ctr = ctr + pooled.sum() * 0.0
        loss = self.cfg.lambda_ctr * ctr + self.clm_weight * clm
        zero = clm.new_zeros(())
        return {
            "loss": loss,
            "ntp": clm,
            "ctr": ctr,
            "lam": zero,
            "rows_kept": torch.tensor(int(kept.numel()), device=labels.device),
            "rows_dropped": torch.tensor(b - int(kept.numel()), device=labels.device),
        }

    def _clm_and_contrastive(self, logits: NTPInput, labels: Tensor, z0: Tensor, z1: Tensor) -> tuple[Tensor, Tensor]:
        """``(L_CLM, L_CL)`` with the micro-step's batch over all ``W`` ranks as the unit (AFP's all-gather;
        ``negatives='local'``: this process alone), through the objective's one contrastive path.

        With ``N`` kept pairs and ``K`` counted tokens over all ranks, this rank's terms average, over the ranks, to
        the global token mean and the global anchor mean of ``InfoNCE(z0(b), {z1 of all ranks})``
        (:func:`alignx.dist.global_share`); the gathered ``z1`` carry gradients back to their ranks. Every rank
        makes the same collectives whatever its row count.
        """
        clm_sum, n_tokens = lm_loss_sum(logits, labels)
        sizes = self._sizes([z0.shape[0], int(n_tokens)], labels.device)
        clm = clm_sum / n_tokens.clamp(min=1).float() * global_share(sizes, column=1)
        gathered = all_gather_rows(torch.cat([z0, z1], dim=1), sizes, group=self.group)  # [N, 2D], rank order
        x_all, y_all = gathered.split(z0.shape[1], dim=1)
        self._stage(z0, z1, None, None)
        ctr = self._global_contrastive(z0, z1, x_all, y_all, None, sizes, z0.dtype)
        return clm, ctr + gathered.sum() * 0.0

    def forward_model(
        self,
        model: Any,
        input_ids: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor | None,
        batch: Mapping[str, Tensor | None],
    ) -> dict[str, Tensor]:
        """Run ``model`` (an :class:`alignx.model.AlignXModel`): the instruction texts through the whole LM, the
        pair sentences (``pair_input_ids``, ``pair_attention_mask``, ``pair_pool``) through the decoder body up to
        the captured block ``model.align_layer``; returns :meth:`terms`."""
        if batch.get("cu_seqlens") is not None:
            raise ValueError("the afp recipe does not run on packed batches; set data.packing=false")
        for key in ("labels", "pair_input_ids", "pair_attention_mask", "pair_pool"):
            if batch.get(key) is None:
                raise ValueError(f"an AFP batch needs {key!r} (rows prepared by alignx.recipes.afp)")
        logits = model.run_lm(input_ids, attention_mask, position_ids, fused=model.fused_ce).logits
        hidden = encode_layer(model.lm, batch["pair_input_ids"], batch["pair_attention_mask"], model.align_layer)
        if logits.requires_grad and not hidden.requires_grad:
            raise RuntimeError("the pair sentences' hidden states carry no gradient although the logits do")
        return self.terms(logits, batch["labels"], hidden, batch["pair_pool"])


# ----------------------------------------------------------------------------------------------------------------
# Building records from aligned units


def _next_id(unit_id: str, step: int) -> str | None:
    """``bible:43.1.5`` -> ``bible:43.1.6`` (step 1) or ``bible:43.1.4`` (step -1); None for other ids."""
    head, _, key = unit_id.partition(":")
    parts = key.split(".")
    if head != "bible" or len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    verse = int(parts[2]) + step
    return f"bible:{parts[0]}.{parts[1]}.{verse}" if verse >= 1 else None


def build_records(
    units: Sequence[Unit],
    *,
    context: Mapping[str, Unit] | None = None,
    pivot: str = "en",
    cross_probability: float = 0.5,
    pool: str = "mean",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """AFP records from aligned units: one per (unit, non-pivot language X).

    The pair is ``(pivot text, X text)`` (pivot first, as AFP: ``reverse_prob = 0``). The instruction text draws A
    uniformly from {pivot, X} and B = the other language with probability ``cross_probability``, else B = A. Its
    task is the next verse of the same chapter (``context`` maps unit ids to units of the same split, e.g. every
    Bible verse of the train books), the previous verse at a chapter's end, and — for units without neighbours
    (catalog strings) — repeating the text (for A != B that is translation; the record's ``task`` says which).
    """
    if not 0.0 <= cross_probability <= 1.0:
        raise ValueError(f"cross_probability must be in [0, 1], got {cross_probability}")
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    rng = random.Random(seed)
    context = context or {}
    out = []
    for unit in units:
        if pivot not in unit.texts:
            continue
        for x in unit.texts:
            if x == pivot:
                continue
            a = rng.choice((pivot, x))
            b = ({pivot, x} - {a}).pop() if rng.random() < cross_probability else a
            task, instruction, answer_unit = "repeat", REPEAT, unit
            for step, name, text in ((1, "next_verse", NEXT_VERSE), (-1, "previous_verse", PREVIOUS_VERSE)):
                other = context.get(_next_id(unit.id, step) or "")
                if other is not None and a in other.texts and b in other.texts:
                    task, instruction, answer_unit = name, text, other
                    break
            out.append(
                {
                    "sent0": unit.texts[pivot],
                    "sent1": unit.texts[x],
                    "lang0": pivot,
                    "lang1": x,
                    "instruction": instruction,
                    "input": unit.texts[a],
                    "output": answer_unit.texts[b],
                    "input_lang": a,
                    "output_lang": b,
                    "task": task,
                    "pool": pool,
                    "unit": unit.id,
                }
            )
    rng.shuffle(out)
    return out


RECIPE = Recipe(
    "afp",
    "AFP: InfoNCE on separately encoded pairs (tau 0.05) + 1.5 x CLM on cross-lingual instructions, then SFT",
    "Li et al., NAACL 2024 (arXiv 2311.08089)",
    kind="afp",
    stage1="afp",
    objective=AFPObjective,
    prepare=prepare,
    collator=_collator,
    extra_columns=PAIR_COLUMNS,
    unused_terms=("lam",),
)
