"""The chapter table in chapters/README.md is the notebooks' own, and no chapter outgrows the limit."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import chapter_table  # noqa: E402


def test_committed_table_matches_the_notebooks():
    assert chapter_table.committed_table() == chapter_table.table(), (
        "chapters/README.md's chapter table is stale: run `python tools/chapter_table.py --write`"
    )


@pytest.mark.parametrize("stem", chapter_table.toc_chapters())
def test_no_chapter_exceeds_the_cell_limit(stem):
    row = chapter_table.chapter_row(stem, {})
    assert row["cells"] <= chapter_table.MAX_CELLS, (
        f"{stem} has {row['cells']} cells (limit {chapter_table.MAX_CELLS}): split it by idea, or move "
        "internals to a 'Going deeper (optional)' section of a shorter chapter (chapters/README.md)"
    )


def test_toc_lists_the_chapters_in_file_order():
    stems = chapter_table.toc_chapters()
    assert stems == sorted(stems), "_toc.yml must list chapters in the order of their numbers (06 < 06b < 07)"


def test_a_title_is_required(tmp_path, monkeypatch):
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("no title here")])
    nbformat.write(nb, tmp_path / "99_x.ipynb")
    monkeypatch.setattr(chapter_table, "CHAPTERS", tmp_path)
    with pytest.raises(ValueError, match="title"):
        chapter_table.chapter_row("99_x", {})
