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
3. The two editions link to each other: every page starts with a link to the same page in the
   other language (English at `_build/html/`, Chinese at `_build/html/zh_CN/`, built by
   `tools/i18n.py build`).
4. Chinese search works without a dictionary: Sphinx's own Chinese splitter indexes Chinese
   words only when jieba is installed. Here every run of Chinese characters is indexed as its
   single characters and overlapping pairs, and the search page splits a query the same way
   (pairs must all occur on a page), which finds any word of two or more characters.
5. The Chinese edition translates what Sphinx's gettext does not reach: the captions of the
   table of contents (inserted by sphinx-external-toc after translation) and the book title
   (html_title, from _config.yml), both with the root page's catalog.
6. Glue roles work in translated text: Sphinx parses each translated message as a small
   document of its own, which has no notebook attached, so myst-nb's {glue:text}`key` found no
   data there ("No key ... found in glue data"). While Sphinx's Locale transform runs on a
   notebook, each translated message's document gets that notebook's glue data.
7. Words the code chooses are pasted in the reader's language: a notebook that glues a word
   (`lora_lab.prose.glue("verdict", "beat", zh="胜过")`) also stores `verdict_zh`, and in the
   Chinese edition every {glue:text}`verdict` pastes the value of `verdict_zh`. The catalogs keep
   the English key, so both editions' texts name the same glue.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from sphinx import addnodes
from sphinx.search import languages
from sphinx.search.zh import SearchChinese

SKIP = {"sre", "tex-chtml-full.js", "tex-chtml-full-speech.js", "tex-svg-full.js", "node-main.js"}


def _mathjax_source() -> Path:
    import mathjax  # provided by django-static-mathjax

    return Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"


def _copy_mathjax(app, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    target = Path(app.outdir) / "_static" / "mathjax"
    shutil.copytree(
        _mathjax_source(),
        target,
        dirs_exist_ok=True,
        ignore=lambda _d, names: [n for n in names if n in SKIP],
    )


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


ZH = "zh_CN"  # the Chinese edition's language and its folder under the English one
# The link (a <p> before the page's first heading) is styled in _static/lora-lab.css.
SWITCH = '<p class="lora-lab-language"><a class="reference internal" hreflang="{lang}" href="{href}">{label}</a></p>\n'
CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")


def _is_chinese(app) -> bool:
    return (app.config.language or "").startswith("zh")


def _language_switch(app, pagename, templatename, context, doctree) -> None:
    """Prepend to the page body a link to the same page in the other edition."""
    if "body" not in context:
        return
    up = "../" * pagename.count("/")
    if _is_chinese(app):
        link = SWITCH.format(lang="en", href=f"../{up}{pagename}.html", label="English")
    else:
        link = SWITCH.format(lang="zh-CN", href=f"{up}{ZH}/{pagename}.html", label="中文")
    context["body"] = link + context["body"]


def _catalog(app, docname: str):
    """The gettext catalog of one page in this build's language (a no-op one in English)."""
    from sphinx import locale
    from sphinx.util.i18n import docname_to_domain

    dirs = [str(Path(app.srcdir) / d) for d in app.config.locale_dirs]
    domain = docname_to_domain(docname, app.config.gettext_compact)
    catalog, _ = locale.init(dirs, app.config.language, domain)
    return catalog


def _translate_title(app) -> None:
    if _is_chinese(app) and app.config.html_title:
        app.config.html_title = _catalog(app, app.config.root_doc).gettext(app.config.html_title)


def _translate_toc_captions(app, doctree) -> None:
    if not _is_chinese(app):
        return
    catalog = None
    for node in doctree.findall(addnodes.toctree):
        if node.get("caption"):
            catalog = catalog or _catalog(app, app.env.docname)
            node["caption"] = node["rawcaption"] = catalog.gettext(node["caption"])


def cjk_terms(text: str) -> list[str]:
    """Single characters and overlapping pairs of every run of Chinese characters in `text`."""
    terms = []
    for run in CJK.findall(text):
        terms.extend(run)
        terms.extend(run[i : i + 2] for i in range(len(run) - 1))
    return terms


class SearchChineseNgrams(SearchChinese):
    """Sphinx's Chinese search language with character n-grams in place of jieba."""

    # Written without "<", ">" or "&", which the page template would escape.
    js_splitter_code = r"""
function splitQuery(query) {
  const cjk = /[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+/g;
  const terms = [];
  for (const run of query.match(cjk) || []) {
    if (run.length === 1) terms.push(run);
    for (let i = 1; i !== run.length; i++) terms.push(run.slice(i - 1, i + 1));
  }
  const rest = query.replace(cjk, " ").split(/[^\p{Letter}\p{Number}_]+/u);
  return terms.concat(rest.filter(function (term) { return term.length; }));
}
"""

    def split(self, input: str) -> list[str]:
        latin = [term.strip() for term in self.latin1_letters.findall(input)]
        self.latin_terms.extend(latin)
        return cjk_terms(input) + latin

    def word_filter(self, stemmed_word: str) -> bool:
        return len(stemmed_word) > 1 or bool(CJK.fullmatch(stemmed_word))


_last_renderer = {}  # myst-nb's renderer of the notebook read last (holds its glue), its docname


def _glue_in_translations() -> None:
    """Give each translated message's document the glue data of the notebook it comes from.

    myst-nb keeps a notebook's renderer (and so its glue data) on the document only while the
    notebook is parsed; Sphinx translates afterwards. The renderer of the notebook read last is
    kept here and attached to the documents of its translated messages.
    """
    import myst_nb.sphinx_ as nb_sphinx

    if getattr(nb_sphinx.Parser.parse, "lora_lab", False):
        return
    parse, load_renderer = nb_sphinx.Parser.parse, nb_sphinx.load_renderer

    def recording_load_renderer(name):
        cls = load_renderer(name)

        def make(mdit_renderer, *args, **kwargs):
            renderer = cls(mdit_renderer, *args, **kwargs)
            _last_renderer["renderer"] = renderer
            return renderer

        return make

    def parser_parse(self, inputstring, document):
        docname = document.settings.env.docname
        if not document.current_source.endswith("<translated>"):
            _last_renderer.clear()
            result = parse(self, inputstring, document)
            _last_renderer["docname"] = docname
            return result
        if _last_renderer.get("docname") == docname and "renderer" in _last_renderer:
            document["nb_renderer"] = _last_renderer["renderer"]
        try:
            return parse(self, inputstring, document)
        finally:  # as myst-nb does: the renderer must not be pickled with the doctree
            document.attributes.pop("nb_renderer", None)

    parser_parse.lora_lab = True
    nb_sphinx.Parser.parse, nb_sphinx.load_renderer = parser_parse, recording_load_renderer


ZH_SUFFIX = "_zh"  # lora_lab.prose.glue(..., zh=...) stores the Chinese word under key + "_zh"


def chinese_glue(glue_data: dict) -> dict:
    """The glue data with each key that has a Chinese twin (`key_zh`) holding the twin's value."""
    return {
        key: glue_data.get(key + ZH_SUFFIX, value) if not key.endswith(ZH_SUFFIX) else value
        for key, value in glue_data.items()
    }


def _paste_chinese_words(app, config) -> None:
    """In the Chinese edition, read every notebook's glue data through `chinese_glue`."""
    if not (config.language or "").startswith("zh"):
        return
    import myst_nb.core.execute.base as nb_execute

    extract = nb_execute.extract_glue_data
    if getattr(extract, "lora_lab", False):
        return

    def extract_chinese(*args, **kwargs):
        return chinese_glue(extract(*args, **kwargs))

    extract_chinese.lora_lab = True
    nb_execute.extract_glue_data = extract_chinese


def setup(app):
    _glue_in_translations()
    app.connect("config-inited", _paste_chinese_words)
    languages["zh"] = SearchChineseNgrams
    app.connect("html-page-context", _language_switch)
    app.connect("builder-inited", _translate_title)
    app.connect("doctree-read", _translate_toc_captions)
    app.config.mathjax_path = "mathjax/tex-mml-chtml.js"
    app.connect("build-finished", _copy_mathjax)
    app.connect("build-finished", _copy_plotly)
    app.connect("html-page-context", _load_plotly_where_used)
    app.connect("html-page-context", _drop_repeated_inline_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
