"""The Chinese edition stays in step with the English book (tools/i18n.py, locales/zh_CN).

- the catalogs hold exactly the messages of the English sources (a fresh gettext extraction,
  a few seconds): English changed without `python tools/i18n.py update` fails;
- every message is translated and none is fuzzy (lists each one, per file);
- a translation keeps the markup a reader's page depends on: the same glue keys, citations,
  cross-references and link targets, inline code, and the same number of `$` math delimiters;
- the glossary's Chinese terms are used: where a glossary term occurs in the English, its
  Chinese term occurs in the translation (exceptions listed in TERM_EXCEPTIONS).
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import i18n  # noqa: E402
import prose_numbers  # noqa: E402

from lora_lab import prose  # noqa: E402

ROLE = re.compile(r"\{([\w:-]+)\}`([^`]*)`")
CODE = re.compile(r"(?<![`}])`([^`]+)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")
GLOSSARY = ROOT / "reference" / "glossary.md"
# English glossary terms that may appear in a message without their Chinese term: where the
# English word is used in a sense other than the glossary's ("merge" of two dicts, ...).
TERM_EXCEPTIONS: set[tuple[str, str]] = {
    (
        "chapters/05_first_patch_peft_trl",
        "scaling",
    ),  # "Scaling out": more processes, not the alpha / r factor
}


def markup(text: str) -> Counter:
    """What must survive translation: roles (targets only for text<target> roles), code, links."""
    found = Counter()
    for role, body in ROLE.findall(text):
        target = re.search(r"<([^>]+)>$", body)
        found[f"{{{role}}}{target.group(1) if target and role in ('ref', 'doc', 'numref') else body}"] += 1
    found.update(f"`{c}`" for c in CODE.findall(ROLE.sub("", text)))
    found.update(f"({t})" for t in LINK.findall(text))
    found["$"] = text.count("$")
    return found


def glossary_terms() -> list[tuple[str, str]]:
    """(English term, Chinese term) rows of the glossary's table of Chinese terms."""
    rows = re.findall(r"^\|\s*([^|]+?)\s*\|\s*([^|]+?)\s*\|[^|]*\|\s*$", GLOSSARY.read_text(), re.M)
    rows = [(en.strip("*"), zh) for en, zh in rows]
    return [(en, zh) for en, zh in rows if not set(en) <= set("-: ") and en != "English term"]


@pytest.fixture(scope="module")
def catalogs():
    found = i18n.catalogs()
    assert found, "no catalogs in locales/zh_CN/LC_MESSAGES: run `python tools/i18n.py update`"
    return found


def test_catalogs_hold_exactly_the_english_messages(catalogs, tmp_path):
    templates = i18n.extract(tmp_path)
    problems = []
    for doc in sorted(set(templates) | set(catalogs)):
        if doc not in catalogs:
            problems.append(f"{doc}: no catalog")
            continue
        if doc not in templates:
            problems.append(f"{doc}: catalog of a page no longer in the book")
            continue
        # A message with no words (a run time in a table cell) reads the same in both editions:
        # Sphinx shows it as it is, so it may come and go without a catalog update.
        english = {m.id for m in templates[doc] if m.id and i18n.has_words(m.id)}
        held = {m.id for m in catalogs[doc] if m.id and i18n.has_words(m.id)}
        problems += [f"{doc}: new English not in the catalog: {m[:80]!r}" for m in sorted(english - held)]
        problems += [
            f"{doc}: catalog message no longer in the English: {m[:80]!r}" for m in sorted(held - english)
        ]
    assert not problems, "run `python tools/i18n.py update`, then translate:\n" + "\n".join(problems)


def test_every_message_translated_and_none_fuzzy(catalogs):
    todo, lines = 0, []
    for doc, catalog in catalogs.items():
        done, fuzzy, missing = i18n.counts(catalog)
        if fuzzy + missing:
            todo += fuzzy + missing
            lines.append(f"{doc}.po: {fuzzy} fuzzy, {missing} untranslated of {done + fuzzy + missing}")
            for m in catalog:
                if m.id and not i18n.is_translated(m):
                    lines.append(f"    {'fuzzy' if m.fuzzy and m.string else 'untranslated'}: {m.id[:90]!r}")
    assert not todo, f"{todo} messages to translate (python tools/i18n.py status):\n" + "\n".join(lines)


def test_translations_keep_glue_math_references_links_and_code(catalogs):
    problems = []
    for doc, catalog in catalogs.items():
        for m in catalog:
            if m.id and m.string and markup(m.id) != markup(m.string):
                want, got = markup(m.id), markup(m.string)
                problems.append(f"{doc}: {m.id[:60]!r}: missing {dict(want - got)}, extra {dict(got - want)}")
    assert not problems, "\n".join(problems)


def test_glossary_has_a_chinese_term_for_each_entry():
    terms = glossary_terms()
    assert len(terms) >= 10, f"{GLOSSARY}: expected the table 'English term | Chinese term | meaning'"
    assert len({en for en, _ in terms}) == len(terms), "a term is listed twice"


def test_translations_use_the_glossary_terms(catalogs):
    terms = glossary_terms()
    problems = []
    for doc, catalog in catalogs.items():
        if doc == "reference/glossary":
            continue
        for m in catalog:
            if not (m.id and i18n.is_translated(m)):
                continue
            for en, zh in terms:
                pattern = rf"(?<![\w`-]){re.escape(en)}(?![\w`-])"
                if re.search(pattern, m.id, re.I) and zh not in m.string and (doc, en) not in TERM_EXCEPTIONS:
                    problems.append(f"{doc}: {en!r} -> {zh!r} missing in the translation of {m.id[:70]!r}")
    assert not problems, "\n".join(problems)


def test_update_keeps_marks_fuzzy_fills_from_compendium_and_drops(tmp_path, monkeypatch):
    """tools/i18n.py update on a small made-up book (no Sphinx): the four rules of `update`."""
    from babel.messages.catalog import Catalog

    monkeypatch.setattr(i18n, "CATALOGS", tmp_path)
    monkeypatch.setattr(i18n, "ROOT", tmp_path)
    old = Catalog(locale=i18n.LANG)
    old.add("LoRA freezes the base model and trains a small patch.", "LoRA 冻结基础模型，只训练一个小补丁。")
    old.add("Merging adds the update into the weight.", "合并把更新量加进权重。")
    old.add("A sentence that was removed.", "一个被删掉的句子。")
    i18n.po_path("a").write_bytes(i18n.dump(old))
    template_a, template_b = Catalog(), Catalog()
    template_a.add("LoRA freezes the base model and trains a small patch.")  # unchanged
    template_a.add("Merging adds the scaled update into the weight.")  # changed a little
    template_b.add("A sentence that was removed.")  # moved to another page
    template_b.add("Brand new text.")
    i18n.update({"a": template_a, "b": template_b})
    a, b = i18n.load(i18n.po_path("a")), i18n.load(i18n.po_path("b"))
    assert (
        a["LoRA freezes the base model and trains a small patch."].string
        == "LoRA 冻结基础模型，只训练一个小补丁。"
    )
    changed = a["Merging adds the scaled update into the weight."]
    assert changed.fuzzy and changed.string == "合并把更新量加进权重。"
    assert a.get("A sentence that was removed.") is None
    assert b["A sentence that was removed."].string == "一个被删掉的句子。"
    assert i18n.counts(a) == (1, 1, 0) and i18n.counts(b) == (1, 0, 1)


def test_update_fills_wordless_messages_and_number_only_changes(tmp_path, monkeypatch):
    """A run time that changed, or a table cell that is only a number, needs no translator; a
    translation that writes its numbers differently from the English is left for one."""
    from babel.messages.catalog import Catalog

    monkeypatch.setattr(i18n, "CATALOGS", tmp_path)
    monkeypatch.setattr(i18n, "ROOT", tmp_path)
    old = Catalog(locale=i18n.LANG)
    old.add("Total: 784 s over 12 chapters.", "合计：12 个章节共 784 秒。")
    old.add("About 1,000 steps, 2 runs.", "两次运行，每次约 1,000 步。")  # "2" written as a word
    i18n.po_path("t").write_bytes(i18n.dump(old))
    template = Catalog()
    template.add("Total: 812.5 s over 13 chapters.")
    template.add("About 2,000 steps, 3 runs.")
    template.add("77")
    i18n.update({"t": template})
    t = i18n.load(i18n.po_path("t"))
    assert t["Total: 812.5 s over 13 chapters."].string == "合计：13 个章节共 812.5 秒。"
    assert not t["Total: 812.5 s over 13 chapters."].fuzzy
    assert t["77"].string == "77" and not t["77"].fuzzy
    left = t["About 2,000 steps, 3 runs."]
    assert left.fuzzy or not left.string


def test_every_glued_word_has_its_chinese_twin():
    """A glued value with words in it ("beat", "lost none") would sit in English inside the
    Chinese text; each needs a `key_zh` twin (lora_lab.prose.glue(..., zh=...)), which the Chinese
    edition pastes instead (_ext/book_assets.py)."""
    missing = []
    for path in sorted((ROOT / "chapters").glob("*.ipynb")):
        glued = prose_numbers.glue_values(path)
        missing += [
            f"{path.stem}: {key} = {text}"
            for key, text in glued.items()
            if prose.ENGLISH_WORD.search(text) and not key.endswith("_zh") and key + "_zh" not in glued
        ]
    assert not missing, "glued words with no Chinese twin:\n" + "\n".join(missing)
