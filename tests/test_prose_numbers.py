"""Every number in the prose comes from a cell (issue 17).

The chapters glue the values they compute (`lora_lab.prose.glue`) and their markdown pastes them
({glue:text}`key`); the claims ledger pastes from the chapters. `tools/prose_numbers.py` finds
numbers typed into the prose instead; these tests run it over the committed notebooks, intro.md
and the reference pages.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import prose_numbers as pn  # noqa: E402

from lora_lab import prose  # noqa: E402

MAX_ALLOWED = 40  # the reviewed list stays short: phrases plus setting patterns


@pytest.fixture(scope="module")
def pages():
    return pn.scan()


def test_no_number_is_typed_into_the_prose(pages):
    typed = [f"{p.name}: {n!r} in ...{ctx}..." for p in pages for n, ctx in p.typed]
    assert not typed, (
        "numbers typed into the prose; paste them with lora_lab.prose.glue and {glue:text}`key`"
        " (or, for a quotation of a source, add the phrase to ALLOWED in tools/prose_numbers.py"
        " with a reason):\n" + "\n".join(typed)
    )


def test_every_pasted_value_exists(pages):
    missing = [f"{p.name}: {ref}" for p in pages for ref in p.missing]
    assert not missing, "glue roles with no glued value in the notebook:\n" + "\n".join(missing)


def test_the_ledger_verdicts_paste_every_figure(pages):
    (verdicts,) = [p for p in pages if p.name.endswith("(verdicts)")]
    assert verdicts.pasted > 0 and not verdicts.typed
    quoted = [phrase for _, phrase in verdicts.allowed if phrase in pn.ALLOWED]
    assert not quoted, f"the verdict column quotes nothing: {quoted}"


def test_the_allow_list_is_short_and_every_entry_says_why():
    entries = {**pn.ALLOWED, **pn.ALLOWED_PATTERNS}
    assert len(entries) <= MAX_ALLOWED, f"{len(entries)} allowed literals (max {MAX_ALLOWED})"
    assert all(reason.strip() for reason in entries.values())


def test_chapters_paste_most_of_their_numbers(pages):
    chapters = [p for p in pages if p.name.startswith("chapters/")]
    pasted = sum(p.pasted for p in chapters)
    results = pasted + sum(len(p.typed) for p in chapters)
    assert pasted == results  # every number that is not a setting or a quotation


@pytest.mark.parametrize(
    "text, typed",
    [
        ("The adapter scored 0.915 on 200 items.", ["0.915", "200"]),
        ("It is 3.2x faster, 52× smaller and 12% cheaper.", ["3.2", "52", "12"]),
        ("It scored {glue:text}`acc` against {glue:text}`acc_full`.", []),
        ("Chapter 04 (2023) shows it; see exercise 2 and `r=8` in code.", []),
        ("fp16, Llama-2-7B, GPT-3 and 175B are names.", []),
        ("With r=8 and alpha=16 on 4-bit weights.", []),  # settings as the code writes them
        ('The source says "about 20 MB".', []),  # a reviewed quotation
        ('The source says "about 25 MB".', ["25"]),  # not on the list
        ("$W_0 + BA$ with $d^2$ and $0.5$", ["0.5"]),  # decimals in math count
        ("```python\nx = 12\n```\n", []),  # code
        ("```{admonition} Solution 1\n:class: dropdown\nIt is 12.\n```\n", ["12"]),
        ("**1.** Which? (a) 12 (b) r=8", ["12"]),  # a self-check's number is structure
    ],
)
def test_the_scanner_finds_typed_numbers(text, typed):
    page = pn.Page("example")
    pn.scan_text(page, text, {}, ROOT / "example.md", strict=False)
    assert [n for n, _ in page.typed] == typed


def test_glue_stores_formatted_text_and_works_without_myst_nb(monkeypatch):
    assert prose.glue("x", 0.91500000001, ".3f") == "0.915"
    assert prose.glue("n", 2557632) == "2,557,632"
    with pytest.raises(TypeError):
        prose.glue("f", 0.5)  # a float needs a format: its last digits differ between CPUs
    monkeypatch.setitem(sys.modules, "myst_nb", None)  # as in a bare Colab runtime
    assert prose.glue("word", "beat", zh="胜过") == "beat"
    with pytest.raises(ValueError, match="Chinese"):
        prose.glue("word", "beat")  # pasted into both editions: needs its Chinese
    assert prose.glue("range", "1.5 to 2", "s", zh="1.5 至 2") == "1.5 to 2"  # formatted: as given


def test_a_glued_word_has_its_chinese_twin_and_the_chinese_edition_pastes_it(monkeypatch):
    stored = {}
    fake = types.ModuleType("myst_nb")
    fake.glue = lambda name, text, display: stored.__setitem__(name, text)
    monkeypatch.setitem(sys.modules, "myst_nb", fake)
    prose.glue("verdict", "beat", zh="胜过")
    prose.glue("acc", 0.5, ".2f")
    assert stored == {"verdict": "beat", "verdict_zh": "胜过", "acc": "0.50"}
    pytest.importorskip("sphinx")  # the book's extension (not in make test-latest's environment)
    sys.path.insert(0, str(ROOT / "_ext"))
    try:
        from book_assets import chinese_glue
    finally:
        sys.path.remove(str(ROOT / "_ext"))
    assert chinese_glue(stored) == {"verdict": "胜过", "verdict_zh": "胜过", "acc": "0.50"}


def test_bootstrap_interval_covers_a_small_difference_and_not_a_large_one():
    diff, lo, hi = prose.bootstrap_accuracy_diff(0.84, 0.82, 200)
    assert round(diff, 3) == 0.02 and lo < 0 < hi
    diff, lo, hi = prose.bootstrap_accuracy_diff(0.97, 0.82, 200)
    assert 0 < lo < diff < hi
