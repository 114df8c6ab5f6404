"""Cross-lingual mapping in continued pre-training (Zheng et al., arXiv 2604.10590), as an alignx recipe.

Continued pre-training on two kinds of rows, in language-balanced batches:

- **mapping** rows: a parallel pair rendered as ``"{Src}: {x}\\n{Tgt}: {y}"`` (English language names), so that
  the model, given the source-language sequence, generates its target-language counterpart; both directions of
  every pair are written (``x -> y`` and ``y -> x``);
- **monolingual** rows: one text alone (BOS, text, EOS), plain next-token prediction.

The objective is next-token prediction over the counted labels of the micro-batch (token mean)::

    L = - (1 / |C|) * sum over counted positions t of log p(token_{t+1} | tokens_<=t)

where mapping rows count their target tokens and EOS (``data.labels = "response"``: ``-log p(y | x)``, the
conditional generation the paper describes) or every token (``"all"``), and monolingual rows count every token.
The paper does not publish its template, whether the source tokens are in the loss, nor its loss weights; the plain
template above and the response-only default are this recipe's choices.

**Mix ratio** (``mix_ratio``, the share of mapping rows among all rows) is fixed when the records are built
(:func:`build_records`); **language balance** is enforced when they are batched: :func:`balanced_micro_batches`
interleaves the strata (one per mapping direction and one per monolingual language) so that every micro-batch holds
each stratum in proportion to its size, within one row. With the records of :func:`build_records` (equal counts per
direction and per language) every micro-batch is balanced across languages and holds the mix ratio.

Records (JSONL)::

    {"kind": "map", "src_text": "Hapo mwanzo ...", "tgt_text": "In the beginning ...",
     "src_lang": "sw", "tgt_lang": "en"}
    {"kind": "mono", "text": "Hapo mwanzo ...", "lang": "sw"}
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from alignx.constants import TARGET_SPAN
from alignx.data import LINE_REASONS, Segment, Tokenized, blank_row, drop_blank, lm_columns, preparer, register_format
from alignx.languages import lang_id, lang_name
from alignx.objective import AlignXObjective
from alignx.recipes.base import Recipe

if TYPE_CHECKING:
    from alignx.config import Config
    from alignx.data.sources import Unit

__all__ = [
    "RECIPE",
    "DROP_REASONS",
    "CLMapFormat",
    "CLMapObjective",
    "balanced_micro_batches",
    "balanced_order",
    "build_records",
    "mapping_segment",
    "prepare",
]

KINDS = ("map", "mono")
DROP_REASONS: dict[str, str] = {
    **LINE_REASONS,
    "missing_field": "a required field is absent or null",
    "bad_field_type": "a text field is not a string or a language field is not a code",
    "bad_kind": "'kind' is not 'map' or 'mono'",
    "unknown_language": "a language code is not in alignx.languages.LANGUAGES",
    "same_language": "a mapping record whose source and target languages are the same",
    "empty_source": "the source (mapping) or the text (monolingual) is empty or whitespace",
    "empty_target": "the target of a mapping record is empty or whitespace",
    "short_target": "fewer than data.min_target_tokens target tokens survive truncation (mapping)",
}
"""Every reason a cross-lingual-mapping record is dropped."""


def mapping_segment(src_text: str, tgt_text: str, src_lang: str, tgt_lang: str) -> Segment:
    """``"{Src}: {x}\\n{Tgt}: {y}"`` with the character ranges of ``x`` (source) and ``y`` (target)."""
    head = f"{lang_name(src_lang)}: "
    mid = f"\n{lang_name(tgt_lang)}: "
    start_y = len(head) + len(src_text) + len(mid)
    return Segment(
        head + src_text + mid + tgt_text, (len(head), len(head) + len(src_text)), (start_y, start_y + len(tgt_text))
    )


def _fields(rec: dict[str, Any], kind: str) -> tuple[dict[str, str], str]:
    """The string fields of a ``kind`` record (``lang`` as both codes of a monolingual one), or a drop reason."""
    keys = ("src_text", "tgt_text", "src_lang", "tgt_lang") if kind == "map" else ("text", "lang")
    out: dict[str, str] = {}
    for key in keys:
        value = rec.get(key)
        if value is None:
            return out, "missing_field"
        if not isinstance(value, str):
            return out, "bad_field_type"
        out[key] = value
    if kind == "mono":
        out["src_lang"] = out["tgt_lang"] = out.pop("lang")
    return {"src_code": out.pop("src_lang"), "tgt_code": out.pop("tgt_lang"), **out}, ""


def _normalize(rec: dict[str, Any], line: int) -> dict[str, Any]:
    """One record as a fixed-schema row with its drop reason ("" = usable); language ids in ``src_lang`` /
    ``tgt_lang``, codes in ``src_code`` / ``tgt_code`` (both the text's language for a monolingual record)."""
    row = blank_row(CLMapFormat.texts, line)
    kind = rec.get("kind")
    if kind is None or kind not in KINDS:
        return {**row, "drop": "missing_field" if kind is None else "bad_kind"}
    fields, drop = _fields(rec, kind)
    if drop:
        return {**row, "drop": drop}
    row.update(kind=kind, **fields)
    try:
        row["src_lang"], row["tgt_lang"] = lang_id(row["src_code"]), lang_id(row["tgt_code"])
    except ValueError:
        return {**row, "drop": "unknown_language"}
    if kind == "mono":
        return drop_blank(row, ((("text",), "empty_source"),))
    if row["src_lang"] == row["tgt_lang"]:
        return {**row, "drop": "same_language"}
    return drop_blank(row, ((("src_text",), "empty_source"), (("tgt_text",), "empty_target")))


@dataclass(frozen=True)
class CLMapFormat:
    """Mapping and monolingual records -> rows: a mapping row is :func:`mapping_segment` (``span_ids`` 1 source,
    2 target; ``labels`` by ``labels``), a monolingual row its text alone (``span_ids`` 0, every token labelled,
    ``src_lang = tgt_lang``). A mapping row with fewer than ``min_target_tokens`` target tokens is dropped."""

    labels: str = "all"
    min_target_tokens: int = 3

    name: ClassVar[str] = "clmap"
    title: ClassVar[str] = "clmap"
    texts: ClassVar[tuple[str, ...]] = ("kind", "src_text", "tgt_text", "text", "src_code", "tgt_code")
    columns: ClassVar[tuple[str, ...]] = ()
    reasons: ClassVar[dict[str, str]] = DROP_REASONS
    deduplicate: ClassVar[bool] = False
    packs: ClassVar[bool] = False

    @classmethod
    def from_config(cls, cfg: Config) -> CLMapFormat:
        """``data.labels`` and ``data.min_target_tokens``."""
        return cls(cfg.data.labels, cfg.data.min_target_tokens)

    def normalize(self, rec: dict[str, Any], line: int) -> dict[str, Any]:
        """The kind, required fields, string types, known and distinct languages, non-empty texts."""
        return _normalize(rec, line)

    def render(self, row: dict[str, Any]) -> tuple[Segment]:
        """The mapping text, or the monolingual text alone."""
        if row["kind"] == "map":
            return (mapping_segment(row["src_text"], row["tgt_text"], row["src_code"], row["tgt_code"]),)
        return (Segment(row["text"]),)

    def build(self, row: dict[str, Any], tokens: Sequence[Tokenized]) -> dict[str, Any] | str:
        """The row, or short_target."""
        (tok,) = tokens
        if row["kind"] == "map" and tok.count(TARGET_SPAN) < self.min_target_tokens:
            return "short_target"
        return lm_columns(tok, self.labels if row["kind"] == "map" else "all")


register_format(CLMapFormat.name, CLMapFormat.from_config)


prepare = preparer(
    CLMapFormat.name, """:func:`alignx.data.prepare` of mapping and monolingual records (:class:`CLMapFormat`)."""
)


# ----------------------------------------------------------------------------------------------------------------
# Language-balanced batches


def balanced_order(strata: Sequence[Any], *, seed: int, epoch: int) -> list[int]:
    """A permutation of ``range(len(strata))`` in which every window holds each stratum in proportion to its size.

    Each stratum's indices are shuffled (``torch.randperm`` seeded ``seed + epoch``), then interleaved by largest
    deficit: position ``p`` takes the stratum ``s`` maximising ``(p + 1) * n_s / n - taken_s`` (ties: the stratum
    seen first). Any window of ``w`` consecutive positions then holds ``w * n_s / n`` rows of ``s`` up to one row.
    """
    groups: dict[Any, list[int]] = {}
    for i, s in enumerate(strata):
        groups.setdefault(s, []).append(i)
    if not groups:
        return []
    gen = torch.Generator().manual_seed(int(seed) + int(epoch))
    keys = list(groups)
    shuffled = [[groups[k][j] for j in torch.randperm(len(groups[k]), generator=gen).tolist()] for k in keys]
    n = len(strata)
    sizes = [len(g) for g in shuffled]
    taken = [0] * len(keys)
    order = []
    for p in range(n):
        deficits = [
            (p + 1) * sizes[s] / n - taken[s] if taken[s] < sizes[s] else float("-inf") for s in range(len(keys))
        ]
        s = max(range(len(keys)), key=deficits.__getitem__)
        order.append(shuffled[s][taken[s]])
        taken[s] += 1
    return order


def balanced_micro_batches(
    dataset: Any,
    micro_batch_size: int,
    *,
    world_size: int,
    rank: int,
    seed: int,
    epoch: int,
    group_by_length: bool = False,
    drop_last: bool = True,
    grad_accum: int = 1,
) -> list[list[int]]:
    """:func:`alignx.data.micro_batches` with a language-balanced order instead of a (length-grouped) shuffle.

    The strata are the ``(src_lang, tgt_lang)`` of the rows: one per mapping direction, one per monolingual language.
    The order is :func:`balanced_order` (a function of the rows and ``seed + epoch`` only); the rest is the shared
    semantics: the epoch keeps ``floor(n / G) * G`` positions (``drop_last``) or pads cyclically, global micro-batch
    ``k`` is positions ``[k m, (k + 1) m)``, rank ``r`` runs ``k = r, r + W, ...``. ``group_by_length`` is ignored
    (balance decides the batches).
    """
    for name, value in (("micro_batch_size", micro_batch_size), ("world_size", world_size), ("grad_accum", grad_accum)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    strata = list(zip(dataset["src_lang"], dataset["tgt_lang"]))
    n = len(strata)
    global_batch = micro_batch_size * world_size * grad_accum
    if n == 0 or (drop_last and n < global_batch):
        raise ValueError(f"{n} records are fewer than one global batch of {global_batch}")
    order = balanced_order(strata, seed=seed, epoch=epoch)
    if drop_last:
        order = order[: (n // global_batch) * global_batch]
    else:
        order = order + order[: (-n) % global_batch]
    m = micro_batch_size
    return [order[k * m : (k + 1) * m] for k in range(rank, len(order) // m, world_size)]


class CLMapObjective(AlignXObjective):
    """Next-token prediction over the counted labels (the module docstring's ``L``): the shared objective's NTP
    term alone, registered under ``objective.kind = "clmap"``."""

    kinds = ("clmap",)


# ----------------------------------------------------------------------------------------------------------------
# Building records from aligned units


def build_records(
    units: Sequence[Unit], *, pivot: str = "en", mix_ratio: float = 0.5, seed: int = 0
) -> list[dict[str, Any]]:
    """Mapping and monolingual records from aligned units, shuffled.

    Mapping: for each unit and each non-pivot language X, ``pivot -> X`` and ``X -> pivot``. Monolingual: each
    language's side of the units, ``round(M (1 - r) / r)`` rows in all for ``M`` mapping rows and ``r = mix_ratio``
    (so mapping rows are the share ``r`` of all rows), split equally over the languages, drawn without replacement
    (cycling through a language's texts only if it has fewer than its share). No text outside the units is used.
    """
    if not 0.0 < mix_ratio <= 1.0:
        raise ValueError(f"mix_ratio must be in (0, 1], got {mix_ratio}")
    rng = random.Random(seed)
    mapping, sides = [], {}
    for unit in units:
        if pivot not in unit.texts:
            continue
        for x, text in unit.texts.items():
            sides.setdefault(x, []).append(text)
            if x == pivot:
                continue
            for src, tgt in ((pivot, x), (x, pivot)):
                mapping.append(
                    {
                        "kind": "map",
                        "src_text": unit.texts[src],
                        "tgt_text": unit.texts[tgt],
                        "src_lang": src,
                        "tgt_lang": tgt,
                    }
                )
    mono = []
    total = round(len(mapping) * (1.0 - mix_ratio) / mix_ratio)
    langs = sorted(sides)
    for i, lang in enumerate(langs):
        share = total // len(langs) + (1 if i < total % len(langs) else 0)
        texts = list(dict.fromkeys(sides[lang]))
        rng.shuffle(texts)
        mono += [{"kind": "mono", "text": texts[j % len(texts)], "lang": lang} for j in range(share)]
    out = mapping + mono
    rng.shuffle(out)
    return out


RECIPE = Recipe(
    "clmap",
    "Cross-lingual mapping CPT (src->tgt both ways) + monolingual NTP, balanced batches, then SFT",
    "Zheng et al. (arXiv 2604.10590)",
    kind="clmap",
    stage1="clmap",
    objective=CLMapObjective,
    prepare=prepare,
    micro_batches=balanced_micro_batches,
    own_batch_order=True,
    unused_terms=("ctr", "lam"),
)
