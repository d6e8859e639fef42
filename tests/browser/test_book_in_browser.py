"""The rendered book as a reader meets it, in a real browser (Debian's headless Chromium).

Run by `make browser-test` after `make book` (and by .ci/run). It serves `_build/html` on
127.0.0.1, opens every page, and checks: no console errors or uncaught exceptions, no broken
internal links or images, no code block scrolling sideways, math rendered by MathJax, search
finds a term, every notebook figure keeps an opaque light background in the dark theme.
The Chinese edition (`_build/html/zh_CN`, same checks on every page) is checked too: each page
links to its counterpart in the other language and back, and search finds Chinese words.
Requests that would leave 127.0.0.1 are blocked, so the book must be complete offline.
Screenshots of three pages, and one in the dark theme, go to `_build/screenshots/`.
"""

from __future__ import annotations

import functools
import http.server
import os
import threading
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

import pytest

playwright = pytest.importorskip("playwright.sync_api")

ROOT = Path(__file__).resolve().parents[2]
HTML = ROOT / "_build" / "html"
SHOTS = ROOT / "_build" / "screenshots"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ALL_MATH_RENDERED = (
    "() => [...document.querySelectorAll('.math')].every(e => e.querySelector('mjx-container'))"
)
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


ZH = "zh_CN"  # the Chinese edition's folder inside _build/html (tools/i18n.py build)
SWITCH = "p.lora-lab-language a"


def pages() -> list[str]:
    """Every reader's page of both editions (English first, then zh_CN/...)."""
    # index.html only redirects to the root page (intro.html).
    skip = {"genindex.html", "search.html", "index.html"}
    found = []
    for path in sorted(HTML.rglob("*.html")):
        rel = path.relative_to(HTML).as_posix()
        parts = rel.split("/")
        if {"_static", "_sources", "_images"} & set(parts) or rel.removeprefix(f"{ZH}/") in skip:
            continue
        found.append(rel)
    return found


@pytest.fixture(scope="module")
def server():
    if not (HTML / "index.html").exists():
        pytest.fail("_build/html/index.html is missing: run `make book` first")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(HTML))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: `apt-get install chromium` (make browser-test does it)")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def open_page(browser, url, requests: list | None = None):
    """Open `url` with outside requests blocked; return (page, console errors, failed requests).

    Given a list, every URL the page requests is appended to it (to check where files come from)."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors, failed = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: failed.append(r.url))
    if requests is not None:
        page.on("request", lambda r: requests.append(r.url))
    page.route("**/*", lambda route: route.continue_() if "127.0.0.1" in route.request.url else route.abort())
    page.goto(url, wait_until="load")
    return page, errors, failed


def test_every_page_loads_clean_with_working_links_images_and_math(server, browser):
    problems = []
    all_pages = pages()
    assert "intro.html" in all_pages and len(all_pages) >= 2
    english = [p for p in all_pages if not p.startswith(f"{ZH}/")]
    assert sorted(f"{ZH}/{p}" for p in english) == [p for p in all_pages if p.startswith(f"{ZH}/")], (
        "the Chinese edition must have exactly the English pages: run `make book`"
    )
    for rel in all_pages:
        page, errors, failed = open_page(browser, urljoin(server, rel))
        lang = page.get_attribute("html", "lang")
        if lang != ("zh-CN" if rel.startswith(f"{ZH}/") else "en"):
            problems.append(f"{rel}: html lang={lang!r}")
        switch = page.eval_on_selector_all(SWITCH, "els => els.map(e => e.getAttribute('href'))")
        counterpart = rel.removeprefix(f"{ZH}/") if rel.startswith(f"{ZH}/") else f"{ZH}/{rel}"
        if len(switch) != 1 or ((HTML / rel).parent / switch[0]).resolve() != (HTML / counterpart).resolve():
            problems.append(f"{rel}: language switch {switch} does not lead to {counterpart}")
        local_failed = [u for u in failed if "127.0.0.1" in u]
        if errors:
            problems.append(f"{rel}: console errors {errors[:3]}")
        if local_failed:
            problems.append(f"{rel}: failed requests {local_failed[:3]}")
        for href in page.eval_on_selector_all("a[href]", "els => els.map(e => e.getAttribute('href'))"):
            parsed = urlparse(href)
            if parsed.scheme or href.startswith(("#", "mailto:")) or not parsed.path:
                continue
            target = (HTML / rel).parent / unquote(parsed.path)
            if not target.resolve().exists():
                problems.append(f"{rel}: broken link {href}")
        broken_images = page.eval_on_selector_all(
            "img", "els => els.filter(e => !(e.complete && e.naturalWidth > 0)).map(e => e.src)"
        )
        if broken_images:
            problems.append(f"{rel}: broken images {broken_images[:3]}")
        wide = page.eval_on_selector_all(
            ".cell_input pre",
            "els => els.filter(e => e.scrollWidth > e.clientWidth + 1).length",
        )
        if wide:
            problems.append(f"{rel}: {wide} code cells scroll horizontally")
        if page.locator(".math").count():
            # MathJax typesets progressively; give it time, then require every formula rendered.
            try:
                page.wait_for_function(ALL_MATH_RENDERED, timeout=30_000)
            except playwright.TimeoutError:
                left = page.eval_on_selector_all(
                    ".math", "els => els.filter(e => !e.querySelector('mjx-container')).length"
                )
                problems.append(f"{rel}: {left} formulas left unrendered by MathJax")
        page.close()
    assert not problems, "\n".join(problems)


def test_search_finds_lora(server, browser):
    page, errors, _ = open_page(browser, urljoin(server, "search.html?q=adapter"))
    page.wait_for_selector("#search-results li, ul.search li", timeout=20_000)
    hits = page.locator("ul.search li").count()
    page.close()
    assert hits > 0, "search for 'adapter' found nothing"
    assert not errors, errors


@pytest.mark.parametrize("word", ["微调", "适配器"])
def test_search_finds_chinese_words_in_the_chinese_edition(server, browser, word):
    page, errors, _ = open_page(browser, urljoin(server, f"{ZH}/search.html?q={word}"))
    page.wait_for_selector("#search-results li, ul.search li", timeout=20_000)
    hits = page.locator("ul.search li").count()
    page.close()
    assert hits > 0, f"search for {word!r} in the Chinese edition found nothing"
    assert not errors, errors


def test_language_switch_goes_to_the_counterpart_and_back(server, browser):
    for start in ["chapters/00_intro.html", f"{ZH}/reference/glossary.html"]:
        page, errors, _ = open_page(browser, urljoin(server, start))
        page.click(SWITCH)
        page.wait_for_load_state("load")
        there = urlparse(page.url).path.lstrip("/")
        page.click(SWITCH)
        page.wait_for_load_state("load")
        back = urlparse(page.url).path.lstrip("/")
        page.close()
        assert there == (start.removeprefix(f"{ZH}/") if start.startswith(ZH) else f"{ZH}/{start}")
        assert back == start and not errors, (back, errors)


def test_screenshots_of_three_pages(server, browser):
    SHOTS.mkdir(parents=True, exist_ok=True)
    chapters = [p for p in pages() if p.startswith("chapters/")]
    chosen = ["intro.html", *chapters[:1], *chapters[-1:]][:3] + [f"{ZH}/chapters/00_intro.html"]
    for rel in chosen:
        page, _, _ = open_page(browser, urljoin(server, rel))
        out = SHOTS / (rel.replace("/", "_").removesuffix(".html") + ".png")
        page.screenshot(path=str(out), full_page=False)
        page.close()
        assert out.stat().st_size > 10_000, f"{out} looks empty"


FIGURE_CORNERS = """() => [...document.querySelectorAll('.cell_output img')].map(img => {
  const c = document.createElement('canvas');
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  const g = c.getContext('2d');
  g.drawImage(img, 0, 0);
  const corners = [[0, 0], [c.width - 1, 0], [0, c.height - 1], [c.width - 1, c.height - 1]];
  const px = corners.map(([x, y]) => Array.from(g.getImageData(x, y, 1, 1).data));
  return {src: img.getAttribute('src'), px: px};
})"""


def test_figures_stay_legible_in_the_dark_theme(server, browser):
    """Switch every chapter to the dark theme and check each notebook figure carries its own
    opaque, light background (dark text on a transparent PNG would vanish on a dark page).
    Saves a dark-theme screenshot of the first chapter with figures."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    problems, shot, n_figures = [], None, 0
    for rel in (p for p in pages() if p.startswith("chapters/")):
        page, _, _ = open_page(browser, urljoin(server, rel))
        page.evaluate("() => { document.documentElement.dataset.theme = 'dark'; "
                      "localStorage.setItem('theme', 'dark'); }")  # fmt: skip
        page.wait_for_function("() => [...document.querySelectorAll('.cell_output img')]"
                               ".every(i => i.complete && i.naturalWidth > 0)")  # fmt: skip
        for fig in page.evaluate(FIGURE_CORNERS):
            n_figures += 1
            if any(p[3] != 255 or sum(p[:3]) < 600 for p in fig["px"]):
                problems.append(f"{rel}: {fig['src']} corners {fig['px']} (transparent or dark background)")
        if shot is None and page.locator(".cell_output img").count():
            shot = SHOTS / ("dark_" + rel.replace("/", "_").removesuffix(".html") + ".png")
            page.locator(".cell_output img").first.scroll_into_view_if_needed()
            page.screenshot(path=str(shot), full_page=False)
        page.close()
    assert n_figures > 10, f"only {n_figures} figures found: did the selector change?"
    assert shot is not None and shot.stat().st_size > 10_000
    assert not problems, "\n".join(problems)


EXPLORER = "#lora-lab-sweep-explorer"  # the div lora_lab.widgets.SweepFigure writes
PLOTTED = f"() => ({{title: document.querySelector('{EXPLORER} .gtitle').textContent, " \
    f"y: Array.from(document.querySelector('{EXPLORER}').data[0].y)}})"  # fmt: skip


def test_chapter_04_explorer_works_offline_and_its_controls_change_the_plot(server, browser):
    """Chapter 04's r/alpha explorer is plotly, drawn in the page with no kernel. It must load
    plotly.js from the book itself (every request stays on 127.0.0.1), and a real click on its
    slider, then on its series menu, must change the run plotted: the loss curve and the title."""
    rel = next((p for p in pages() if p.endswith("04_r_and_alpha.html")), None)
    assert rel, "chapter 04 is not in the build"
    requests = []
    page, errors, _ = open_page(browser, urljoin(server, rel), requests)
    page.wait_for_selector(f"{EXPLORER} .slider-container", timeout=30_000)
    outside = [u for u in requests if urlparse(u).hostname != "127.0.0.1" and not u.startswith("data:")]
    assert not outside, f"requests leaving the machine: {outside[:5]}"
    assert any(urlparse(u).path.endswith("/_static/plotly.min.js") for u in requests), (
        "no plotly.js from the book"
    )

    before = page.evaluate(PLOTTED)
    assert before["title"].startswith("r=") and len(before["y"]) > 2
    page.locator(EXPLORER).scroll_into_view_if_needed()
    labels = page.locator(f"{EXPLORER} .slider-labels text, {EXPLORER} .slider-label")
    last_r = labels.last.text_content().strip()
    rail = page.locator(f"{EXPLORER} .slider-rail-touch-rect").bounding_box()
    page.mouse.click(rail["x"] + rail["width"] - 2, rail["y"] + rail["height"] / 2)  # the last step
    page.wait_for_function(f"() => document.querySelector('{EXPLORER} .gtitle').textContent "
                           f"!== {before['title']!r}", timeout=10_000)  # fmt: skip
    after = page.evaluate(PLOTTED)
    assert after["title"].startswith(f"r={last_r},"), (before["title"], after["title"], last_r)
    assert after["y"] != before["y"], "the slider changed the title but not the plotted loss curve"
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.locator(EXPLORER).screenshot(path=str(SHOTS / "chapter04_explorer.png"))

    page.locator(f"{EXPLORER} .updatemenu-header-group").click()
    items = page.locator(f"{EXPLORER} .updatemenu-item-text")
    assert items.count() >= 2
    choice = items.last.text_content().strip()  # e.g. "rsLoRA alpha=16, lr=0.01"
    items.last.click()
    page.wait_for_function(f"() => document.querySelector('{EXPLORER} .gtitle').textContent "
                           f"!== {after['title']!r}", timeout=10_000)  # fmt: skip
    menu = page.evaluate(PLOTTED)
    assert f"lr={choice.split('lr=')[1]}," in menu["title"] and menu["y"] != after["y"]
    assert ("rsLoRA" in menu["title"]) == choice.startswith("rsLoRA")
    page.close()
    assert not errors, errors


DIAGRAM_IMAGES = r"""() => [...document.querySelectorAll('div.cell')]
  .filter(c => /diagrams\.\w+\(/.test((c.querySelector('.cell_input') || {}).textContent || ''))
  .map(c => {
    const call = c.querySelector('.cell_input').textContent.match(/diagrams\.(\w+)\(/)[1];
    const imgs = [...c.querySelectorAll('.cell_output img')];
    return {call: call, widths: imgs.map(i => i.complete ? i.naturalWidth : 0)};
  })"""


def test_diagrams_load_on_their_pages(server, browser):
    """Every cell that calls lora_lab.diagrams shows its picture, loaded (naturalWidth > 0),
    and the book draws at least five different diagrams."""
    problems, drawn = [], set()
    for rel in (p for p in pages() if p.startswith("chapters/")):
        page, _, _ = open_page(browser, urljoin(server, rel))
        page.wait_for_load_state("load")
        for cell in page.evaluate(DIAGRAM_IMAGES):
            if not cell["widths"] or min(cell["widths"]) <= 0:
                problems.append(f"{rel}: diagrams.{cell['call']} shows no loaded image {cell['widths']}")
            else:
                drawn.add(cell["call"])
        page.close()
    assert not problems, "\n".join(problems)
    assert len(drawn) >= 5, f"only {len(drawn)} diagrams in the book: {sorted(drawn)}"
