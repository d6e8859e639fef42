"""Small fixes to the book's HTML assets, so the rendered book works offline and cleanly.

1. MathJax is served from the book itself instead of a CDN. MathJax 3 ships on PyPI inside
   `django-static-mathjax` (a plain data package, imported as `mathjax`); the parts the book
   uses are copied into `_static/mathjax/` and Sphinx's `mathjax_path` points there.
2. plotly.js is served from the book itself: chapter 04's explorer (`lora_lab.widgets.SweepFigure`)
   is a notebook output holding only a div and its figure's JSON. `plotly.min.js` is copied from
   the plotly Python package into `_static/` once, and loaded only on pages that hold such a div
   (a 4.8 MB file on every page would slow the whole book for one figure).
3. sphinx-thebe (loaded by Jupyter Book) adds its inline configuration script twice, and the
   browser reports "Identifier 'THEBE_JS_URL' has already been declared". Repeated inline
   scripts are dropped from each page.
"""

from __future__ import annotations

import shutil
from pathlib import Path

SKIP = {"sre", "tex-chtml-full.js", "tex-chtml-full-speech.js", "tex-svg-full.js", "node-main.js"}


def _mathjax_source() -> Path:
    import mathjax  # provided by django-static-mathjax

    return Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"


def _copy_mathjax(app, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    target = Path(app.outdir) / "_static" / "mathjax"
    shutil.copytree(_mathjax_source(), target, dirs_exist_ok=True, ignore=lambda _d, names: [n for n in names if n in SKIP])


PLOTLY_MARKER = 'class="lora-lab-plotly"'  # the div lora_lab.widgets.SweepFigure writes
PLOTLY_JS = "plotly.min.js"


def _plotly_source() -> Path:
    import plotly

    return Path(plotly.__file__).parent / "package_data" / PLOTLY_JS


def _copy_plotly(app, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    shutil.copyfile(_plotly_source(), Path(app.outdir) / "_static" / PLOTLY_JS)


def _load_plotly_where_used(app, pagename, templatename, context, doctree) -> None:
    """Add plotly.js (synchronous, in the head) to the pages whose body holds a plotly div."""
    if PLOTLY_MARKER in context.get("body", ""):
        app.add_js_file(PLOTLY_JS)  # during html-page-context: this page only


def _drop_repeated_inline_scripts(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, kept = set(), []
    for script in scripts:
        body = getattr(script, "attributes", {}).get("body") if not isinstance(script, str) else None
        if body:
            if body in seen:
                continue
            seen.add(body)
        kept.append(script)
    context["script_files"] = kept


def setup(app):
    app.config.mathjax_path = "mathjax/tex-mml-chtml.js"
    app.connect("build-finished", _copy_mathjax)
    app.connect("build-finished", _copy_plotly)
    app.connect("html-page-context", _load_plotly_where_used)
    app.connect("html-page-context", _drop_repeated_inline_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
