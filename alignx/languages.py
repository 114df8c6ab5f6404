"""ISO 639-1 language codes, their English names and stable integer ids.

Records name their languages with ISO 639-1 codes (``"sw"``, ``"hi"``); the model's language-matching loss only
compares ids for equality, so any injective mapping works, but it must not change between a run and its resume.
The id of a code is its position in :data:`_TABLE`, a fixed tuple that is only ever appended to: existing ids
never move.

A few common spellings are accepted and normalised by :func:`normalize_code`: upper case (``"SW"``), a region or
script subtag (``"pt-BR"``, ``"zh_Hans"`` -> the base language) and the ISO 639-2/3 codes of :data:`_ALIASES`
(``"fil"`` -> ``"tl"``, ``"swh"`` -> ``"sw"``). Anything else is an error that lists the valid codes.
"""

from __future__ import annotations

import difflib

__all__ = ["LANGUAGES", "lang_code", "lang_id", "lang_name", "normalize_code"]

# Append-only: the id of a code is its index here. Never reorder or delete an entry.
_TABLE: tuple[tuple[str, str], ...] = (
    # The 22 languages of the aligned Bible database (SPEC section 4).
    ("en", "English"),
    ("es", "Spanish"),
    ("fr", "French"),
    ("it", "Italian"),
    ("pt", "Portuguese"),
    ("de", "German"),
    ("ar", "Arabic"),
    ("zh", "Chinese"),
    ("ja", "Japanese"),
    ("ru", "Russian"),
    ("pl", "Polish"),
    ("ro", "Romanian"),
    ("hi", "Hindi"),
    ("bn", "Bengali"),
    ("tr", "Turkish"),
    ("sw", "Swahili"),
    ("ko", "Korean"),
    ("fa", "Persian"),
    ("id", "Indonesian"),
    ("vi", "Vietnamese"),
    ("uk", "Ukrainian"),
    ("tl", "Tagalog"),
    # African languages of the localisation catalogs.
    ("ha", "Hausa"),
    ("yo", "Yoruba"),
    ("ny", "Chichewa"),
    ("zu", "Zulu"),
    ("xh", "Xhosa"),
    ("am", "Amharic"),
    ("ig", "Igbo"),
    ("so", "Somali"),
    ("rw", "Kinyarwanda"),
    ("sn", "Shona"),
    ("st", "Southern Sotho"),
    ("tn", "Tswana"),
    ("ts", "Tsonga"),
    ("lg", "Ganda"),
    ("ln", "Lingala"),
    ("om", "Oromo"),
    ("ti", "Tigrinya"),
    ("wo", "Wolof"),
    ("ff", "Fulah"),
    ("ak", "Akan"),
    ("ee", "Ewe"),
    ("mg", "Malagasy"),
    ("af", "Afrikaans"),
    ("rn", "Kirundi"),
    # Europe.
    ("nl", "Dutch"),
    ("sv", "Swedish"),
    ("da", "Danish"),
    ("no", "Norwegian"),
    ("nb", "Norwegian Bokmal"),
    ("nn", "Norwegian Nynorsk"),
    ("is", "Icelandic"),
    ("fi", "Finnish"),
    ("et", "Estonian"),
    ("lv", "Latvian"),
    ("lt", "Lithuanian"),
    ("cs", "Czech"),
    ("sk", "Slovak"),
    ("sl", "Slovenian"),
    ("hr", "Croatian"),
    ("sr", "Serbian"),
    ("bs", "Bosnian"),
    ("mk", "Macedonian"),
    ("bg", "Bulgarian"),
    ("el", "Greek"),
    ("hu", "Hungarian"),
    ("sq", "Albanian"),
    ("be", "Belarusian"),
    ("ca", "Catalan"),
    ("gl", "Galician"),
    ("eu", "Basque"),
    ("ga", "Irish"),
    ("gd", "Scottish Gaelic"),
    ("cy", "Welsh"),
    ("br", "Breton"),
    ("mt", "Maltese"),
    ("lb", "Luxembourgish"),
    ("fy", "Western Frisian"),
    ("oc", "Occitan"),
    ("co", "Corsican"),
    ("eo", "Esperanto"),
    ("la", "Latin"),
    # Middle East, Caucasus, Central Asia.
    ("he", "Hebrew"),
    ("yi", "Yiddish"),
    ("ku", "Kurdish"),
    ("ps", "Pashto"),
    ("hy", "Armenian"),
    ("ka", "Georgian"),
    ("az", "Azerbaijani"),
    ("kk", "Kazakh"),
    ("ky", "Kyrgyz"),
    ("uz", "Uzbek"),
    ("tk", "Turkmen"),
    ("tg", "Tajik"),
    ("tt", "Tatar"),
    ("ba", "Bashkir"),
    ("ug", "Uyghur"),
    ("mn", "Mongolian"),
    # South Asia.
    ("ur", "Urdu"),
    ("pa", "Punjabi"),
    ("gu", "Gujarati"),
    ("mr", "Marathi"),
    ("ne", "Nepali"),
    ("si", "Sinhala"),
    ("ta", "Tamil"),
    ("te", "Telugu"),
    ("kn", "Kannada"),
    ("ml", "Malayalam"),
    ("or", "Odia"),
    ("as", "Assamese"),
    ("sd", "Sindhi"),
    ("sa", "Sanskrit"),
    ("dv", "Dhivehi"),
    ("bo", "Tibetan"),
    # East and South-East Asia, Pacific.
    ("th", "Thai"),
    ("lo", "Lao"),
    ("km", "Khmer"),
    ("my", "Burmese"),
    ("ms", "Malay"),
    ("jv", "Javanese"),
    ("su", "Sundanese"),
    ("ceb", "Cebuano"),
    ("mi", "Maori"),
    ("sm", "Samoan"),
    ("to", "Tongan"),
    ("haw", "Hawaiian"),
    # Americas.
    ("ht", "Haitian Creole"),
    ("qu", "Quechua"),
    ("gn", "Guarani"),
    ("ay", "Aymara"),
)

LANGUAGES: dict[str, str] = dict(_TABLE)
"""ISO 639 code -> English name, in id order."""

_IDS: dict[str, int] = {code: i for i, (code, _) in enumerate(_TABLE)}

# ISO 639-2/3 codes (and a few legacy spellings) that mean a language of the table.
_ALIASES: dict[str, str] = {
    "eng": "en",
    "spa": "es",
    "fra": "fr",
    "fre": "fr",
    "ita": "it",
    "por": "pt",
    "deu": "de",
    "ger": "de",
    "ara": "ar",
    "arb": "ar",
    "zho": "zh",
    "chi": "zh",
    "cmn": "zh",
    "jpn": "ja",
    "rus": "ru",
    "pol": "pl",
    "ron": "ro",
    "rum": "ro",
    "hin": "hi",
    "ben": "bn",
    "tur": "tr",
    "swa": "sw",
    "swh": "sw",
    "kor": "ko",
    "fas": "fa",
    "per": "fa",
    "pes": "fa",
    "ind": "id",
    "vie": "vi",
    "ukr": "uk",
    "tgl": "tl",
    "fil": "tl",
    "hau": "ha",
    "yor": "yo",
    "nya": "ny",
    "zul": "zu",
    "xho": "xh",
    "amh": "am",
    "ibo": "ig",
    "som": "so",
    "iw": "he",
    "in": "id",
    "ji": "yi",
}


def normalize_code(code: str) -> str:
    """Canonical ISO 639 code of ``code`` (lower case, subtags removed, aliases resolved).

    Raises ``ValueError`` naming the bad code, the closest valid codes and the full list.
    """
    if not isinstance(code, str):
        raise ValueError(f"language code must be a string, got {code!r}")
    key = code.strip().lower().replace("_", "-")
    if key in _IDS:
        return key
    base = key.split("-", 1)[0]
    for candidate in (base, _ALIASES.get(key), _ALIASES.get(base)):
        if candidate in _IDS:
            return candidate
    close = difflib.get_close_matches(base, list(_IDS), n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ValueError(f"unknown language code {code!r}{hint}; valid ISO 639 codes: {', '.join(sorted(_IDS))}")


def lang_id(code: str) -> int:
    """Stable integer id of an ISO 639 code (its index in the append-only table). Unknown -> ``ValueError``."""
    return _IDS[normalize_code(code)]


def lang_name(code: str) -> str:
    """English name of an ISO 639 code, e.g. ``lang_name("sw") == "Swahili"``."""
    return LANGUAGES[normalize_code(code)]


def lang_code(lang: int) -> str:
    """Inverse of :func:`lang_id`."""
    if not isinstance(lang, int) or not 0 <= lang < len(_TABLE):
        raise ValueError(f"language id must be an int in 0..{len(_TABLE) - 1}, got {lang!r}")
    return _TABLE[lang][0]
