"""Build, execute and clean the book's notebooks.

Each chapter is written as a jupytext "percent" script in `chapters/_src/NN_topic.py`
(reviewable diffs) and committed as `chapters/NN_topic.ipynb` WITH outputs, which is what
the rendered book shows and what nbval re-checks.

    python tools/nb.py build [NAME ...]   source -> notebook, execute it, clean it
    python tools/nb.py clean [NAME ...]   normalise execution counts, strip volatile metadata

NAME is a chapter stem such as `00_intro` (default: every source). Execution runs in
`chapters/` with the current Python's kernel; each notebook's wall time is recorded in
`data/results/notebook_times.json` (shown on the book's timing page).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = ROOT / "chapters"
SOURCES = CHAPTERS / "_src"
TIMES = ROOT / "data" / "results" / "notebook_times.json"
TIMES_PAGE = ROOT / "reference" / "timings.md"

# Cell metadata worth keeping; everything else (execution timings, collapsed state, ids of
# widgets) changes from run to run and only makes diffs noisy.
KEEP_CELL_METADATA = {"tags"}
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}


def clean(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Normalise cell ids and execution counts, strip timings and widget state; keep outputs and tags.

    Execution counts become 1, 2, 3... in cell order rather than null: nbval refuses to
    compare a cell whose stored count is null, and sequential counts are the same on every
    run, so they add no noise to diffs.
    """
    count = 0
    for index, cell in enumerate(nb.cells):
        cell.id = f"cell-{index:03d}"  # stable ids: jupytext draws random ones on every build
        cell.metadata = {k: v for k, v in cell.metadata.items() if k in KEEP_CELL_METADATA}
        if cell.cell_type == "code":
            count += 1
            cell.execution_count = count
            for out in cell.outputs:
                if "execution_count" in out:
                    out["execution_count"] = count
                # Widget views reference model ids that change every run.
                if "data" in out:
                    out["data"].pop("application/vnd.jupyter.widget-view+json", None)
    nb.metadata = {
        "kernelspec": KERNELSPEC,
        "language_info": {"name": "python"},
    }
    return nb


def source_to_notebook(src: Path) -> nbformat.NotebookNode:
    nb = jupytext.read(src, fmt="py:percent")
    nb.metadata.pop("jupytext", None)
    return nb


def build(name: str) -> float:
    """Turn chapters/_src/NAME.py into chapters/NAME.ipynb, executed and cleaned; return seconds.

    The kernel runs with one thread (OMP_NUM_THREADS=1), as `make test` runs nbval: printed
    floats can depend on how many threads split a reduction.
    """
    os.environ["OMP_NUM_THREADS"] = "1"
    src = SOURCES / f"{name}.py"
    nb = source_to_notebook(src)
    nb.metadata["kernelspec"] = KERNELSPEC
    client = NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(CHAPTERS)}}
    )
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    nbformat.write(clean(nb), CHAPTERS / f"{name}.ipynb")
    return seconds


def record_time(name: str, seconds: float) -> None:
    times = json.loads(TIMES.read_text()) if TIMES.exists() else {}
    times[name] = round(seconds, 1)
    TIMES.parent.mkdir(parents=True, exist_ok=True)
    TIMES.write_text(json.dumps(dict(sorted(times.items())), indent=2) + "\n")
    write_times_page(times)


def write_times_page(times: dict[str, float]) -> None:
    """The book's page listing how long each notebook takes to run top to bottom."""
    rows = "\n".join(
        f"| [{name}](../chapters/{name}.ipynb) | {sec:.0f} |" for name, sec in sorted(times.items())
    )
    TIMES_PAGE.write_text(
        "# Notebook run times\n\n"
        "Wall-clock seconds to execute each chapter top to bottom on the 2-core CPU machine the book is\n"
        "built on (no GPU), as measured by `python tools/nb.py build` when the notebook was\n"
        "last stored. The budget is 180 s per chapter on a quiet machine; a figure above it was taken\n"
        "while other jobs shared the two cores (`make notebooks` on a quiet machine re-measures all of\n"
        "them). A GPU does not make them much faster: on an H100, run cell by cell as scripts, each\n"
        "chapter took 9 to 33 s (2026-11-23), since a model this small cannot keep a GPU busy.\n\n"
        f"| notebook | seconds |\n|---|---|\n{rows}\n| total | {sum(times.values()):.0f} |\n"
    )


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"build", "clean"}:
        print(__doc__)
        return 2
    command, names = argv[0], argv[1:]
    if not names:
        names = sorted(p.stem for p in SOURCES.glob("*.py"))
    for name in names:
        name = Path(name).stem
        if command == "build":
            if not (SOURCES / f"{name}.py").exists():
                print(
                    f"no source chapters/_src/{name}.py; sources are: {sorted(p.stem for p in SOURCES.glob('*.py'))}"
                )
                return 2
            seconds = build(name)
            record_time(name, seconds)
            print(f"built chapters/{name}.ipynb in {seconds:.1f} s")
        else:
            path = CHAPTERS / f"{name}.ipynb"
            nbformat.write(clean(nbformat.read(path, as_version=4)), path)
            print(f"cleaned {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
