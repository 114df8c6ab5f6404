"""UI-string catalogs as a second domain: short, modern sentences in low-resource languages.

- ``kolibri`` (MIT, PyPI ``kolibri==0.19.5``): JSON message catalogs ``kolibri/locale/<locale>/LC_MESSAGES/*.json``
  (message id -> string, ~4,100 ids x 35 locales incl. ha, yo, ny, sw). The ``ach_UG`` locale is Crowdin's
  in-context pseudo-language and is skipped. Untranslated messages repeat the English string and are skipped.
- ``django`` (BSD, PyPI ``django``): gettext catalogs ``django/**/locale/<locale>/LC_MESSAGES/django.po``
  (msgid = the English string).

Only *sentence-like* strings are kept (:func:`is_sentence_like`): at least three words and twelve characters, no
placeholders (``{name}``, ``%s``, ``%(name)s``, ``$1``), no markup or escapes, no URLs or file names. Splits are by
a hash of the normalised English text, so one English string (often repeated under several ids) never lands in
two splits: about 5 % dev, 5 % test, the rest train.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections.abc import Sequence
from pathlib import Path

from alignx.data.sources.common import SourceError, Unit, check_langs, drop_heldout_duplicates, normalise_for_dedup
from alignx.languages import normalize_code

INSTALL = {
    "kolibri": "pip install --no-deps kolibri==0.19.5",
    "django": "pip install django",
}
SKIP_LOCALES = {"ach_UG", "ach"}
PREFERRED_LOCALE = {"es": ("es_ES", "es"), "pt": ("pt_BR", "pt"), "zh": ("zh_Hans", "zh_hans", "zh_CN")}

_PLACEHOLDER = re.compile(
    r"\{[^}]*\}|%\(?\w*\)?[sdifr]|%%|\$\d|\$\{|<[^>]+>|&\w+;|\\[nt\\]|https?://|www\.|\w+\.(?:py|json|csv|html|zip)\b"
)
_WORD = re.compile(r"\w+", re.UNICODE)


def is_sentence_like(text: str) -> bool:
    """True for a plain sentence: >= 3 words, >= 12 characters, a letter first, no placeholder/markup/URL."""
    text = text.strip()
    if len(text) < 12 or _PLACEHOLDER.search(text) or "\n" in text:
        return False
    if not text[0].isalpha() and text[0] not in "\"'“‘¿¡":
        return False
    return len(_WORD.findall(text)) >= 3


def split_of_text(english: str) -> str:
    """Deterministic split from the normalised English text: ~5 % dev, ~5 % test, the rest train."""
    h = int(hashlib.sha256(normalise_for_dedup(english).encode("utf-8")).hexdigest()[:8], 16) % 100
    return "test" if h < 5 else "dev" if h < 10 else "train"


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise SourceError(f"the {module} catalog source needs the '{module}' package; run: {INSTALL[module]}")
    return Path(spec.origin).parent


def locale_dirs(root: Path) -> dict[str, Path]:
    """ISO 639 code -> locale directory (``sw_TZ`` -> ``sw``); region variants resolved by
    :data:`PREFERRED_LOCALE`, else the alphabetically first."""
    found: dict[str, list[Path]] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        if d.name in SKIP_LOCALES:
            continue
        try:
            code = normalize_code(d.name)
        except ValueError:
            continue  # a locale outside the language table
        found.setdefault(code, []).append(d)
    out = {}
    for code, dirs in found.items():
        by_name = {d.name: d for d in dirs}
        pick = next((by_name[n] for n in PREFERRED_LOCALE.get(code, ()) if n in by_name), None)
        exact = by_name.get(code)
        out[code] = pick or exact or dirs[0]
    return out


# ---------------------------------------------------------------------------------------------------------------
# kolibri


def kolibri_root(root: str | Path | None = None) -> Path:
    """``kolibri/locale`` of the installed package, or ``root`` (a directory laid out the same way)."""
    return Path(root) if root is not None else _package_dir("kolibri") / "locale"


def read_kolibri_locale(folder: Path) -> dict[str, str]:
    """Message id (``"<file>:<id>"``) -> string, over every JSON catalog of one locale."""
    out: dict[str, str] = {}
    for f in sorted((folder / "LC_MESSAGES").glob("*.json")):
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise SourceError(f"{f}:{e.lineno}: malformed JSON catalog: {e.msg}") from None
        stem = f.name.removesuffix("-messages.json")
        for key, value in data.items():
            if isinstance(value, str):
                out[f"{stem}:{key}"] = value
    return out


def kolibri_units(langs: Sequence[str], root: str | Path | None = None, stats: dict | None = None) -> list[Unit]:
    """N-way aligned kolibri strings for ``langs`` (must include ``en``) as :class:`Unit` s."""
    base = kolibri_root(root)
    dirs = locale_dirs(base)
    check_langs(langs, dirs, what="the kolibri catalogs")
    tables = {lang: read_kolibri_locale(dirs[lang]) for lang in langs}
    return _align("kolibri", langs, tables, stats)


# ---------------------------------------------------------------------------------------------------------------
# django (.po)


def parse_po(path: Path) -> dict[str, str]:
    """msgid -> msgstr of a gettext ``.po`` file (entries separated by blank lines, as gettext writes them).

    Fuzzy, plural, obsolete (``#~``) and untranslated entries are skipped; a ``msgctxt`` is kept in the key as
    ``"<ctxt>\\x04<msgid>"`` (gettext's convention).
    """
    entries: dict[str, str] = {}
    text = path.read_text(encoding="utf-8")
    line_no = 0
    for block in re.split(r"\n[ \t]*\n", text):
        fields: dict[str, list[str]] = {}
        fuzzy = False
        current: list[str] | None = None
        for raw in block.splitlines():
            line_no += 1
            line = raw.strip()
            if not line:
                continue
            if line.startswith("#"):
                fuzzy |= line.startswith("#,") and "fuzzy" in line
                continue
            keyword, _, rest = line.partition(" ")
            if line.startswith('"'):
                if current is None:
                    raise SourceError(f"{path}:{line_no}: continuation string outside an entry")
                current.append(_po_string(line, path, line_no))
            elif keyword in ("msgctxt", "msgid", "msgid_plural", "msgstr") or keyword.startswith("msgstr["):
                current = fields.setdefault(keyword, [])
                current.append(_po_string(rest, path, line_no))
            else:
                raise SourceError(f"{path}:{line_no}: unexpected line in a .po file: {raw!r}")
        line_no += 1  # the blank separator line
        if fuzzy or "msgid_plural" in fields or "msgid" not in fields or "msgstr" not in fields:
            continue
        msgid, msgstr = "".join(fields["msgid"]), "".join(fields["msgstr"])
        if msgid and msgstr:
            ctxt = "".join(fields.get("msgctxt", []))
            entries[f"{ctxt}\x04{msgid}" if ctxt else msgid] = msgstr
    return entries


def _po_string(token: str, path: Path, n: int) -> str:
    token = token.strip()
    if len(token) < 2 or token[0] != '"' or token[-1] != '"':
        raise SourceError(f"{path}:{n}: expected a quoted string, got {token!r}")
    return json.loads(token) if "\\" in token else token[1:-1]


def django_roots(root: str | Path | None = None) -> list[Path]:
    """Every ``locale`` directory of the installed django (core + contrib apps), or ``[root]``."""
    if root is not None:
        return [Path(root)]
    base = _package_dir("django")
    return sorted(p for p in base.rglob("locale") if p.is_dir())


def django_units(langs: Sequence[str], root: str | Path | None = None, stats: dict | None = None) -> list[Unit]:
    """N-way aligned django strings: English msgid -> msgstr per language (``en`` = the msgid itself)."""
    tables: dict[str, dict[str, str]] = {lang: {} for lang in langs if lang != "en"}
    available: set[str] = {"en"}
    for loc_root in django_roots(root):
        app = loc_root.parent.name
        for code, folder in locale_dirs(loc_root).items():
            available.add(code)
            if code not in tables:
                continue
            po = folder / "LC_MESSAGES" / "django.po"
            if po.is_file():
                for msgid, msgstr in parse_po(po).items():
                    tables[code][f"{app}:{msgid}"] = msgstr
    check_langs(langs, available, what="the django catalogs")
    keys = set().union(*(t.keys() for t in tables.values())) if tables else set()
    tables["en"] = {k: k.split(":", 1)[1].split("\x04")[-1] for k in keys}
    return _align("django", langs, tables, stats)


# ---------------------------------------------------------------------------------------------------------------


def _align(source: str, langs: Sequence[str], tables: dict[str, dict[str, str]], stats: dict | None) -> list[Unit]:
    """Units aligned through English: each holds ``en`` and every requested language with a usable translation.

    A catalog rarely covers every language for every id, so units are partial (at least one language besides
    English); the Bible's units, in contrast, are complete.
    """
    if "en" not in tables or "en" not in langs:
        raise SourceError(f"the {source} catalogs are aligned through English: include 'en' in the languages")
    stats = stats if stats is not None else {}
    others = [lang for lang in langs if lang != "en"]
    counts: dict[str, int] = {"ids": 0, "english_not_sentence_like": 0, "no_translation": 0}
    per_lang = {lang: {"missing": 0, "untranslated": 0, "not_sentence_like": 0} for lang in others}
    units = []
    for key in sorted(tables["en"]):
        counts["ids"] += 1
        en = tables["en"][key].strip()
        if not is_sentence_like(en):
            counts["english_not_sentence_like"] += 1
            continue
        texts = {"en": en}
        for lang in others:
            t = tables[lang].get(key, "").strip()
            reason = "missing" if not t else "untranslated" if t == en else None
            if reason is None and not is_sentence_like(t):
                reason = "not_sentence_like"
            if reason:
                per_lang[lang][reason] += 1
            else:
                texts[lang] = t
        if len(texts) < 2:
            counts["no_translation"] += 1
            continue
        group = key.split(":", 1)[0]
        units.append(Unit(f"{source}:{key}", source, split_of_text(en), texts, ref=key, group=group))
    # One English string under several ids: keep its first occurrence (all occurrences share a split).
    seen: set[str] = set()
    unique = []
    for u in units:
        k = normalise_for_dedup(u.texts["en"])
        if k not in seen:
            seen.add(k)
            unique.append(u)
    counts["duplicate"] = len(units) - len(unique)
    kept = drop_heldout_duplicates(unique)
    counts["duplicate_of_heldout"] = len(unique) - len(kept)
    stats.update(counts, per_lang=per_lang)
    return kept
