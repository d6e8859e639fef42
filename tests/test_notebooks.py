"""Notebook hygiene: what `make test` checks about the committed chapters besides nbval.

- every chapter in _toc.yml exists, and every chapter notebook is in _toc.yml;
- each notebook matches its jupytext source in chapters/_src (no drift);
- every code cell that prints or displays has been executed, and no cell holds an error;
- execution counts run 1..n in cell order, volatile metadata is stripped (`make clean-nb` fixes that);
- no absolute path of the machine that ran it, no output image over 300 KB;
- code lines fit the page (80 characters), so nothing scrolls sideways;
- the Colab setup cell comes first and uses _config.yml's repository URL;
- nbval compares at least 60% of the output-bearing code cells.
"""

from __future__ import annotations

import base64
import re
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import nb as nbtool  # noqa: E402

CHAPTERS = ROOT / "chapters"
NOTEBOOKS = sorted(CHAPTERS.glob("*.ipynb"))
IGNORE_TAGS = {"nbval-ignore-output", "nbval-skip", "raises-exception"}
MAX_LINE = 80  # what the book's code column shows without a horizontal scrollbar
MACHINE_PATHS = re.compile(r"/work/|/root/|/home/\w+/|\.venv/lib")


def toc_files() -> set[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = set()

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                files.add(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(toc)
    return files


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]


def test_toc_and_chapters_agree():
    listed = {f for f in toc_files() if f.startswith("chapters/")}
    present = {f"chapters/{p.stem}" for p in NOTEBOOKS}
    assert listed - present == set(), f"in _toc.yml but missing: {sorted(listed - present)}"
    assert present - listed == set(), f"notebooks missing from _toc.yml: {sorted(present - listed)}"
    for f in toc_files() - listed:
        assert any((ROOT / f).with_suffix(s).exists() for s in (".md", ".ipynb")), (
            f"{f} in _toc.yml does not exist"
        )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_matches_its_source(path):
    src = CHAPTERS / "_src" / f"{path.stem}.py"
    assert src.exists(), f"{path.name} has no source {src.relative_to(ROOT)}"
    built = [(c.cell_type, c.source) for c in nbtool.source_to_notebook(src).cells]
    stored = [(c.cell_type, c.source) for c in nbformat.read(path, as_version=4).cells]
    assert built == stored, f"{path.name} differs from its source: run `python tools/nb.py build {path.stem}`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_executed_clean_and_portable(path):
    nb = nbformat.read(path, as_version=4)
    assert set(nb.metadata) <= {"kernelspec", "language_info"}, (
        "volatile notebook metadata: run `make clean-nb`"
    )
    count = 0
    for i, cell in enumerate(nb.cells):
        assert set(cell.metadata) <= {"tags"}, (
            f"cell {i}: volatile metadata {set(cell.metadata)}: `make clean-nb`"
        )
        if cell.cell_type != "code":
            continue
        count += 1
        assert cell.execution_count == count, (
            f"cell {i}: execution count {cell.execution_count}: `make clean-nb`"
        )
        prints = re.search(r"^\s*(print|display)\(|plt\.show\(\)|\.show\(\)", cell.source, re.M)
        colab_only = cell.source.startswith("# Colab setup")  # prints versions in Colab alone
        if prints and not colab_only:
            assert cell.outputs, f"cell {i} prints but has no output: was the notebook executed?"
        for out in cell.outputs:
            assert out.output_type != "error", (
                f"cell {i} holds an error: {out.get('ename')}: {out.get('evalue')}"
            )
            text = nbformat.writes(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(outputs=[out])]))
            found = MACHINE_PATHS.search(text)
            assert not found, f"cell {i} output shows a path of this machine: {found.group(0)!r}"
            for mime, data in out.get("data", {}).items():
                if mime.startswith("image/") and mime != "image/svg+xml":
                    size = len(base64.b64decode(data))
                    assert size <= 300_000, f"cell {i}: {mime} output is {size // 1000} KB (limit 300 KB)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_setup_and_parameters_cells_come_first(path):
    cells = code_cells(nbformat.read(path, as_version=4))
    repo_url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    setup, params = cells[0].source, cells[1].source
    assert setup.startswith("# Colab setup"), "the first code cell must be the Colab setup cell"
    assert f'REPO_URL = "{repo_url}"' in setup, (
        f"setup cell must clone {repo_url} (_config.yml repository.url)"
    )
    assert '"google.colab" in sys.modules' in setup, "the setup cell must do nothing outside Colab"
    code = "\n".join(line for line in setup.splitlines() if not line.lstrip().startswith("#"))
    assert "torch" not in code, "the setup cell must never install or reinstall torch"
    extras = re.search(r'^EXTRAS = "([a-z,]*)"', setup, re.M).group(1).split(",")
    assert "book" not in extras, "Colab needs no book-building extra (jupyter-book, jupyterlab)"
    assert params.startswith("# Parameters"), "the second code cell must be the parameters cell"


NOISY_LIBRARIES = re.compile(r"^\s*(import|from) (peft|trl|bitsandbytes|transformers|datasets|accelerate)\b")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_lora_lab_is_imported_before_the_libraries_it_quiets(path):
    """lora_lab filters machine-dependent log lines (runtime.NOISE) only for libraries imported after it."""
    lines = [
        line
        for cell in code_cells(nbformat.read(path, as_version=4))[1:]
        for line in cell.source.splitlines()
    ]
    first_lora_lab = next((i for i, line in enumerate(lines) if re.match(r"^import lora_lab\b", line)), None)
    first_library = next((i for i, line in enumerate(lines) if NOISY_LIBRARIES.match(line)), None)
    if first_library is not None:
        assert first_lora_lab is not None and first_lora_lab < first_library, (
            f"{path.name}: put `import lora_lab` before `{lines[first_library].strip()}`"
        )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_code_fits_the_page_without_horizontal_scrolling(path):
    for i, cell in enumerate(code_cells(nbformat.read(path, as_version=4))):
        for line in cell.source.splitlines():
            assert len(line) <= MAX_LINE, (
                f"code cell {i}: line of {len(line)} chars (max {MAX_LINE}): {line!r}"
            )


def test_nbval_compares_at_least_60_percent_of_output_cells():
    compared = total = 0
    for path in NOTEBOOKS:
        for cell in code_cells(nbformat.read(path, as_version=4)):
            if not cell.outputs:
                continue
            total += 1
            compared += not (IGNORE_TAGS & set(cell.metadata.get("tags", [])))
    assert total, "no executed notebook found"
    share = compared / total
    print(f"nbval compares {compared} of {total} output-bearing code cells ({share:.0%})")
    assert share >= 0.60, f"nbval compares only {share:.0%} of output-bearing cells (need >= 60%)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_chapter_shows_at_least_one_figure(path):
    nb = nbformat.read(path, as_version=4)
    images = [
        mime
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        for mime in out.get("data", {})
        if mime.startswith("image/")
    ]
    assert images, f"{path.name} shows no figure: plot something the chapter measured"


DIAGRAM_CALL = re.compile(r"\bdiagrams\.(\w+)\(")


def test_the_book_draws_at_least_five_diagrams():
    """Counts the distinct lora_lab.diagrams functions called in the chapters' sources, and
    checks each call's cell drew an image in the built notebook."""
    import lora_lab.diagrams

    drawn = set()
    for path in NOTEBOOKS:
        for cell in code_cells(nbformat.read(path, as_version=4)):
            calls = set(DIAGRAM_CALL.findall(cell.source)) & set(lora_lab.diagrams.__all__)
            if not calls:
                continue
            assert any("image/png" in out.get("data", {}) for out in cell.outputs), (
                f"{path.name}: the cell calling diagrams.{sorted(calls)} shows no image"
            )
            drawn |= calls
    assert len(drawn) >= 5, f"the chapters draw {len(drawn)} diagrams ({sorted(drawn)}); the book wants five"
