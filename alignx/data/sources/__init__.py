"""Real multilingual data read from installed packages: the verse-aligned Bible and UI-string catalogs.

Every source returns N-way aligned :class:`Unit` s (one meaning, several languages) with a ``train``/``dev``/
``test`` split decided by the source (the Bible by book, the catalogs by a hash of the English string), so the
same sentence never lands in two splits. :func:`load_units` is the single entry point used by
``alignx data build`` and ``alignx eval``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from alignx.data.sources.bible import BIBLE_LANGS, AlignStats, aligned_verses
from alignx.data.sources.catalogs import django_roots, django_units, kolibri_root, kolibri_units, locale_dirs
from alignx.data.sources.common import SPLITS, SourceError, Unit, check_langs

SOURCES: tuple[str, ...] = ("bible", "kolibri", "django")

__all__ = ["SOURCES", "SPLITS", "SourceError", "Unit", "check_langs", "load_units", "source_languages"]


def load_units(
    source: str,
    langs: Sequence[str],
    *,
    versions: dict[str, str] | None = None,
    path: str | Path | None = None,
    stats: dict | None = None,
) -> list[Unit]:
    """Aligned units of one source for ``langs``.

    Args:
        source: one of :data:`SOURCES`.
        langs: ISO 639-1 codes; the catalogs need ``"en"`` among them (they align through English).
        versions: Bible only: language -> version abbreviation overrides.
        path: where to read instead of the installed package (a Bible ``.db``/``.tsv``; a catalog ``locale`` dir).
        stats: filled with what was kept and dropped.

    Raises:
        SourceError: unknown source, language or version (the message lists the valid ones), or a missing
            package (the message gives the ``pip install`` command).
    """
    stats = stats if stats is not None else {}
    if source == "bible":
        st = AlignStats()
        units = aligned_verses(langs, versions=versions, db=path, stats=st)
        stats.update(
            keys=st.keys,
            empty=st.empty,
            psalm_superscription=st.psalm_superscription,
            duplicate_of_heldout=st.duplicate_of_heldout,
        )
        return units
    if versions:
        raise SourceError(f"versions apply to the bible source only, not {source!r}")
    if source == "kolibri":
        return kolibri_units(langs, path, stats)
    if source == "django":
        return django_units(langs, path, stats)
    raise SourceError(f"unknown source {source!r}; valid sources: {', '.join(SOURCES)}")


def source_languages(source: str, path: str | Path | None = None) -> tuple[str, ...]:
    """Languages a source covers: the Bible's 22, or the locales of the installed catalogs (or of ``path``)."""
    if source == "bible":
        return BIBLE_LANGS
    if source == "kolibri":
        return tuple(sorted(locale_dirs(kolibri_root(path))))
    if source == "django":
        return tuple(sorted({"en"}.union(*(locale_dirs(r) for r in django_roots(path)))))
    raise SourceError(f"unknown source {source!r}; valid sources: {', '.join(SOURCES)}")
