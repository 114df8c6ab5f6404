"""What every source returns: N-way aligned units with a split, and the checks they share."""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections.abc import Iterable, Sequence

from alignx.languages import LANGUAGES

SPLITS: tuple[str, ...] = ("train", "dev", "test")


class SourceError(ValueError):
    """A data source cannot provide what was asked (unknown language or version, missing package, bad file)."""


@dataclasses.dataclass
class Unit:
    """One meaning in several languages: a verse, or a UI string and its translations.

    Attributes:
        id: stable identifier, e.g. ``"bible:41.1.1"`` or ``"kolibri:Learn.searchLabel"``.
        source: ``"bible"``, ``"kolibri"``, ``"django"``.
        split: ``"train"``, ``"dev"`` or ``"test"``.
        texts: ISO 639-1 code -> non-empty text. Bible units hold every requested language; catalog units hold
            English and the requested languages that translate the string (at least one).
        ref: human-readable reference (``"Mark 1:1"``) or the message id.
        group: the book (Bible) or catalog file the unit comes from.
    """

    id: str
    source: str
    split: str
    texts: dict[str, str]
    ref: str = ""
    group: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def known_languages() -> dict[str, str]:
    """ISO 639-1 code -> English name, from :mod:`alignx.languages`."""
    return dict(LANGUAGES)


def check_langs(langs: Sequence[str], available: Iterable[str], *, what: str) -> None:
    """Raise :class:`SourceError` for a code that is not ISO 639-1 or that ``what`` does not cover.

    Both messages name the valid choices.
    """
    if not langs:
        raise SourceError(f"no languages given for {what}")
    known = known_languages()
    available = sorted(set(available))
    for lang in langs:
        if lang not in known:
            raise SourceError(f"unknown language code {lang!r}; valid codes: {', '.join(sorted(known))}")
        if lang not in available:
            raise SourceError(f"{what}: no {known[lang]} ({lang!r}) data; it covers: {', '.join(available)}")


def normalise_for_dedup(text: str) -> str:
    """Case-, accent- and punctuation-insensitive key used to find the same sentence twice."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return re.sub(r"[\W_]+", " ", text).strip()


def drop_heldout_duplicates(units: list[Unit]) -> list[Unit]:
    """Remove units of ``train`` (and ``dev``) whose text, in any language, equals a ``test`` (or ``dev``) unit's.

    The Bible repeats itself (Matthew/Mark/Luke, Kings/Chronicles) and UI catalogs repeat strings under several
    ids: without this, a held-out sentence would also be a training sentence.
    """
    seen: dict[str, set[tuple[str, str]]] = {"test": set(), "dev": set()}
    for u in units:
        if u.split in seen:
            seen[u.split].update((lang, normalise_for_dedup(t)) for lang, t in u.texts.items())
    blocked = {"dev": seen["test"], "train": seen["test"] | seen["dev"]}
    kept = []
    for u in units:
        bad = blocked.get(u.split)
        if bad and any((lang, normalise_for_dedup(t)) in bad for lang, t in u.texts.items()):
            continue
        kept.append(u)
    return kept
