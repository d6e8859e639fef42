"""The Chinese edition's catalogs: extract, update, report, build (Sphinx gettext + Babel).

The book is written once, in English; the Chinese edition is the same Sphinx project built a
second time with `language = "zh_CN"`, its prose replaced message by message from the gettext
catalogs in `locales/zh_CN/LC_MESSAGES/<document>.po` (one per page, `gettext_compact = False`).
Code cells and their outputs are never in the catalogs, so both editions show the same notebooks.

    python tools/i18n.py update   # English changed: extract messages, update every .po
    python tools/i18n.py status   # translated / fuzzy / untranslated per file
    python tools/i18n.py build    # the Chinese edition into _build/html/zh_CN (-W -n)

`update` keeps every translation whose English is unchanged, marks a message fuzzy when its
English changed a little (Babel's close-match search: the old translation is kept for review, and
the build ignores it until the fuzzy flag is removed), and fills a new message with the
translation of the identical English anywhere in the catalogs (a compendium), so a paragraph
moved to another page keeps its translation; a message with no words, or whose English changed
only in its numbers, is filled without a translator (see `fill`). Messages no longer in the English are dropped.

Everything here is pure Python (Sphinx and Babel, already needed by the book), so no GNU gettext
tools are required. Run with the project's Python from the repository root.
"""

from __future__ import annotations

import argparse
import datetime
import io
import re
import sys
import tempfile
from pathlib import Path

from babel.messages.catalog import Catalog
from babel.messages.pofile import read_po, write_po

ROOT = Path(__file__).resolve().parents[1]
LANG = "zh_CN"
LOCALES = ROOT / "locales"
CATALOGS = LOCALES / LANG / "LC_MESSAGES"
HTML_ZH = ROOT / "_build" / "html" / LANG
# Fixed dates in the headers, so an update that changes no message changes no file.
STAMP = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)

# Catalog settings shared by extraction and the Chinese build: one catalog per page, no
# source locations or uuids in the files (they would churn on every edit).
GETTEXT = {
    "gettext_compact": False,
    "gettext_location": False,
    "gettext_uuid": False,
    "gettext_auto_build": True,
}


def _sphinx(builder: str, outdir: Path, doctrees: Path, overrides: dict, strict: bool) -> int:
    """Run Jupyter Book's Sphinx (the same configuration as `jupyter-book build .`)."""
    from jupyter_book.sphinx import build_sphinx

    conf = {
        "external_toc_path": (ROOT / "_toc.yml").as_posix(),
        "latex_individualpages": False,
        "nitpicky": True,
        **GETTEXT,
        **overrides,
    }
    result = build_sphinx(
        ROOT,
        outdir,
        noconfig=True,
        path_config=str(ROOT / "_config.yml"),
        confoverrides=conf,
        doctreedir=doctrees,
        builder=builder,
        warningiserror=strict,
        keep_going=strict,
        quiet=True,
    )
    if result != 0:
        raise SystemExit(f"sphinx {builder} build failed: {result}")
    return 0


def extract(outdir: Path) -> dict[str, Catalog]:
    """Message templates of every page, keyed by document name (`chapters/00_intro`)."""
    _sphinx("gettext", outdir, outdir / ".doctrees", {}, strict=True)
    templates = {}
    for pot in sorted(outdir.rglob("*.pot")):
        doc = pot.relative_to(outdir).with_suffix("").as_posix()
        with pot.open("rb") as f:
            templates[doc] = read_po(f)
    if not templates:
        raise SystemExit(f"no .pot files written to {outdir}")
    return templates


def po_path(doc: str) -> Path:
    return CATALOGS / f"{doc}.po"


def load(path: Path) -> Catalog:
    with path.open("rb") as f:
        return read_po(f, locale=LANG)


def catalogs() -> dict[str, Catalog]:
    """Every committed catalog, keyed by document name."""
    return {
        p.relative_to(CATALOGS).with_suffix("").as_posix(): load(p) for p in sorted(CATALOGS.rglob("*.po"))
    }


def is_translated(message) -> bool:
    return bool(message.id) and bool(message.string) and not message.fuzzy


def dump(catalog: Catalog) -> bytes:
    catalog.creation_date = STAMP
    catalog.revision_date = STAMP
    catalog.project, catalog.version = "LoRA Lab", "1"
    catalog.fuzzy = False
    buf = io.BytesIO()
    write_po(buf, catalog, width=0, omit_header=False, ignore_obsolete=True, include_lineno=False)
    return buf.getvalue()


# A number as the pages write it: 784, 0.125, 65,536.
NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def has_words(text: str) -> bool:
    """Whether a message has anything to translate (letters), unlike "77" or "| 0.5 |"."""
    return re.search(r"[A-Za-z]", text) is not None


def fill(message, compendium: dict[str, str], by_shape: dict[str, tuple[str, str]]) -> bool:
    """Translate a new or fuzzy message from what is already known; True if it was filled.

    Three cases need no translator: the same English translated elsewhere (a moved paragraph);
    a message with no words (a number or a symbol in a table: kept as it is); and English that
    changed only in its numbers (a run time on the timings page), when the old translation
    writes exactly the old numbers (in any order): each is replaced by its new value.
    """
    if message.id in compendium:
        message.string = compendium[message.id]
    elif not has_words(message.id):
        message.string = message.id
    elif NUMBER.sub("#", message.id) in by_shape:
        old_id, old_string = by_shape[NUMBER.sub("#", message.id)]
        old_numbers = NUMBER.findall(old_id)
        renumber = dict(zip(old_numbers, NUMBER.findall(message.id)))
        # Each old number must name one place, and the translation must write exactly those.
        if len(renumber) != len(old_numbers) or sorted(NUMBER.findall(old_string)) != sorted(old_numbers):
            return False
        message.string = NUMBER.sub(lambda m: renumber[m.group(0)], old_string)
    else:
        return False
    message.flags.discard("fuzzy")
    return True


def update(templates: dict[str, Catalog]) -> list[str]:
    """Bring every .po in line with `templates`; return one summary line per changed file."""
    existing = catalogs()
    compendium, by_shape = {}, {}
    for catalog in existing.values():
        for message in list(catalog) + list(catalog.obsolete.values()):
            if is_translated(message):
                compendium.setdefault(message.id, message.string)
                by_shape.setdefault(NUMBER.sub("#", message.id), (message.id, message.string))
    changed = []
    for doc, template in templates.items():
        catalog = existing.get(doc) or Catalog(locale=LANG, domain=doc)
        catalog.update(template, no_fuzzy_matching=False)
        reused = 0
        for message in catalog:
            if message.id and (not message.string or message.fuzzy):
                reused += fill(message, compendium, by_shape)
        path = po_path(doc)
        data = dump(catalog)
        if not path.exists() or path.read_bytes() != data:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            changed.append(f"{path.relative_to(ROOT)}: updated ({reused} filled from other catalogs)")
    for doc in set(existing) - set(templates):
        po_path(doc).unlink()
        changed.append(f"{po_path(doc).relative_to(ROOT)}: removed (page no longer in the book)")
    return changed


def counts(catalog: Catalog) -> tuple[int, int, int]:
    """(translated, fuzzy, untranslated) messages of one catalog."""
    messages = [m for m in catalog if m.id]
    fuzzy = sum(1 for m in messages if m.fuzzy and m.string)
    done = sum(1 for m in messages if is_translated(m))
    return done, fuzzy, len(messages) - done - fuzzy


def status() -> int:
    """Print per-file counts; return the number of messages not yet done."""
    total = [0, 0, 0]
    print(f"{'catalog':45s} {'translated':>10s} {'fuzzy':>6s} {'untranslated':>12s}")
    for doc, catalog in catalogs().items():
        row = counts(catalog)
        total = [a + b for a, b in zip(total, row)]
        mark = "" if row[1] + row[2] == 0 else "  <- to do"
        print(f"{doc + '.po':45s} {row[0]:10d} {row[1]:6d} {row[2]:12d}{mark}")
    print(f"{'total':45s} {total[0]:10d} {total[1]:6d} {total[2]:12d}")
    return total[1] + total[2]


def build() -> None:
    """The Chinese edition, with the English build's strictness, into _build/html/zh_CN."""
    overrides = {"language": LANG, "locale_dirs": [LOCALES.as_posix()]}
    _sphinx("html", HTML_ZH, ROOT / "_build" / f".doctrees-{LANG}", overrides, strict=True)
    print(f"Chinese edition written to {HTML_ZH.relative_to(ROOT)}/index.html")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["update", "status", "build"])
    args = parser.parse_args(argv)
    if args.command == "update":
        with tempfile.TemporaryDirectory() as tmp:
            lines = update(extract(Path(tmp)))
        print("\n".join(lines) or "catalogs already up to date")
        status()
    elif args.command == "status":
        status()
    else:
        build()
    return 0


if __name__ == "__main__":
    sys.exit(main())
