"""Find numbers typed into the book's prose; count the pasted ones.

Every number a chapter states should be pasted from the cell that computes it (myst-nb glue,
see `lora_lab.prose`), so a re-run that changes the number changes the sentence. This tool
reads every markdown cell of every chapter notebook, `intro.md` and every page in `reference/`
and lists the numbers that are typed instead.

    python tools/prose_numbers.py          # share of pasted numbers per page; typed ones not allowed
    python tools/prose_numbers.py -v       # also every typed number, allowed or not
    python tools/prose_numbers.py --src    # read chapters/_src (before a build; roles counted unchecked)

What is not a number here (structure, not a result):
- code: inline code, fenced code blocks (the bodies of `{admonition}` fences are prose), integers
  inside math (formula constants and shapes; decimals in math are numbers);
- names: digits inside a word or glued to one (fp16, Llama-2-7B, GPT-3, 175B, q_proj);
- chapter numbers ("chapter 04", "chapters 03-05", the "# 04 ·" heading), exercise and solution
  numbers, list markers ("1. ", "(2)"), self-check question numbers ("**1.**"),
  years (1990-2039);
- links, URLs, cross-references and citations;
- the pasted roles themselves ({glue:text}`key`).

Everything else is a number. It must be pasted, or be an entry of `ALLOWED` below: a short,
reviewed list of phrases that quote the sources' own figures or name a setting visible in the
code. The claims ledger's verdict column (the third column of its tables) allows no phrase:
only settings named as the code names them (`ALLOWED_PATTERNS`).
The ledger's claim column (its second) states what the sources say, in their words: its numbers
are quotations. `reference/timings.md` is written by `tools/nb.py` from the measured run times
and is skipped.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = ROOT / "chapters"
GENERATED = {"reference/timings.md"}  # written by tools/nb.py from measurements
LEDGER = "reference/claims.md"

# Reviewed literals: (phrase as it appears in the prose, why it may be typed). A phrase is
# removed before the scan, so the number is allowed only in that wording.
ALLOWED: dict[str, str] = {
    # the sources' own figures, quoted as such
    '"about 20 MB"': "the Chinese source's adapter size, quoted",
    '"About 20 MB"': "the Chinese source's adapter size, quoted",
    '"<0.1%"': "the Chinese source's trainable share, quoted",
    '"a tiny fraction (<0.1%)"': "the Chinese source's trainable share, quoted",
    '"typically less than 1%"': "the English source's trainable share, quoted",
    '"Less than 1%"': "the English source's trainable share, quoted",
    '"below 0.1%"': "the Chinese source's trainable share, quoted",
    '"trainable%: 0.1287"': "the Chinese source's printout, quoted",
    "the source's 6,778,314,752": "the Chinese source's printout, quoted",
    "the source's 0.1287": "the Chinese source's printout, quoted",
    "A share of 0.1287%": "the Chinese source's printout, quoted",
    "not the 0.1287% the source shows": "the Chinese source's printout, quoted",
    '"more than 250 times"': "the Chinese source, quoted",
    '"approximately 256 times"': "the English source, quoted",
    "7-billion-parameter": "a model-size class, as in 7B",
    '"about 350 GB"': "the Chinese source's GPT-3 copy size, quoted",
    '"35MB"': "the LoRA paper's GPT-3 adapter size, quoted",
    '"10,000 times"': "the LoRA paper's reduction, quoted",
    "at 2 bytes each": "what fp16 is",
    "(the PEFT docs use 16)": "PEFT's documentation, quoted",
    '"with 24 GB"': "the Chinese source's GPU size, quoted",
    "RTX 3090 or 4090": "product names",
    "LoRA on embeddings at a fixed 1e-6": "PEFT's LoRA+ constant, quoted",
    "The paper reports e.g. 72.9% vs 67.7%": "the LoRA+ paper's figures, quoted",
    "The paper reports +3.7 points": "the DoRA paper's figure, quoted",
    "claims up to about 2x faster fine-tuning and 1-2% better results": "the LoRA+ paper's claim",
    "The paper reports 2,000 adapters on one A100-80GB for Llama-7B, and up to 4x the throughput"
    " of vLLM with packed adapters and up to 30x that of PEFT": "the S-LoRA paper's figures",
    '("LoRA rank 16 is greater than max_lora_rank 8.")': "vLLM's error message, quoted",
    '"8x scaling error with default settings"': "an mlx-vlm issue's title, quoted",
    '"LoRA rank 64 is greater than max_lora_rank 16"': "vLLM's error message, quoted",
    # definitions and published configurations
    "4 bytes per fp32": "what fp32 is",
    "each block of 32 weights": "the Q8_0 format's definition (GGUF)",
}

# Settings named the way the code names them (r=8, rank 4, alpha = 16, all 7 projections,
# 4-bit): configuration visible in the code cells, not results.
ALLOWED_PATTERNS: dict[str, str] = {
    r"\b(?:r|alpha|lora_alpha)\s?=\s?\d+": "a LoRA setting as the code writes it",
    r"\b(?:[Rr]ank|ratio)\s\(?\d+\b": "a LoRA setting as the code writes it",
    r"\ball (?:7|seven)\b": "Llama's seven projections, the LLAMA_ALL target list",
    r"(?i)\bscaling (?:of )?\d+\b": "a LoRA setting (alpha / r) as the code writes it",
    r"\bseeds? \d+\b": "a seed's name",
    r"\b\d+-bit\b": "a storage format (4-bit, 8-bit)",
    r"(?<![\w.])-100\b": "the label value the loss skips (transformers' ignore index)",
    r"(?i)\b(?:at|with|plus) 16 adapters\b|\b16 merged models\b|\b16 (?:tasks|adapters)\b": "chapters 07, 07b and 10's setting (16 adapters / tasks in their code)",
}

WORDISH = r"[A-Za-z_\u00b5]"
NUMBER = re.compile(
    r"(?<![\w.\-/])(?<![A-Za-z]-)"  # not inside a name (fp16, Llama-2, v0.3)
    r"[+\-\u2212]?\d[\d,]*(?:\.\d+)?(?:e[+\-\u2212]?\d+)?"
    r"(?:(?=[x\u00d7](?![A-Za-z]))|(?![\w]))"  # 16x and 16× are numbers; 7B, 3d are names
)
STRUCTURE = [
    re.compile(r"\{glue(?::\w+)?\}`[^`]*`"),  # pasted values
    re.compile(r"\{(?:ref|cite|cite:\w+|doc|numref|eq|download|term)\}`[^`]*`"),
    re.compile(r"``[^`]*``|`[^`]*`"),  # inline code
    re.compile(r"\]\([^)]*\)"),  # link targets
    re.compile(r"https?://\S+"),
    re.compile(r"^\(\S+\)=\s*$", re.M),  # MyST targets
    re.compile(r"<!--.*?-->", re.S),
    re.compile(r"(?i)\bchapters?\s+\d\d(?:\s*(?:[\u2013\-,]|and|to|or)\s*\d\d)*"),
    re.compile(
        r"(?i)\b(?:exercises?|solutions?|step|rows?|path|case|road|section)\s+\d+(?:\s*(?:[\u2013\-,]|and)\s*\d+)*"
    ),
    re.compile(r"[\w.\-]+/[\w.\-]+#\d+|(?<![\w&])#\d+"),  # issue and PR references (owner/repo#N, #N)
    re.compile(r"^#+\s+\d+\.\s", re.M),  # numbered section headings ("## 3. vLLM's ...")
    re.compile(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.])"),  # IP addresses (127.0.0.1)
    re.compile(r"(?i)\b(?:claims?|row)\s+#?\d+"),
    re.compile(r"^#+\s+\d\d\s+\u00b7", re.M),  # "# 04 · r and alpha"
    re.compile(r"^\s*(?:\d+\.|\(\d+\))\s", re.M),  # list markers
    re.compile(r"\(\d\)"),  # inline enumerations
    re.compile(r"\*\*\d+\.\*\*"),  # numbered self-check questions ("**1.** ...")
    re.compile(r"(?<![\d.,])(?:199\d|20[0-3]\d)(?![\d.,%])"),  # years
    re.compile(r"^\|\s*#\s*\|.*$|^\|\s*\d+b?\s*\|", re.M),  # ledger row numbers
]
FENCE = re.compile(r"^(`{3,}|~{3,})(.*)$")
MATH = re.compile(r"\$\$.*?\$\$|\$[^$]+?\$", re.S)


@dataclass
class Page:
    name: str
    typed: list[tuple[str, str]] = field(default_factory=list)  # (number, context), not allowed
    allowed: list[tuple[str, str]] = field(default_factory=list)  # typed, on the reviewed list
    pasted: int = 0  # pasted numbers
    pasted_words: int = 0  # pasted words (directions chosen by a cell)
    missing: list[str] = field(default_factory=list)  # glue keys with no stored value

    @property
    def numbers(self) -> int:
        return self.pasted + len(self.typed) + len(self.allowed)


def glue_values(path: Path) -> dict[str, str]:
    """The glued values stored in a notebook's outputs: key -> text."""
    values = {}
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type != "code":
            continue
        for out in cell.get("outputs", []):
            book = out.get("metadata", {}).get("scrapbook")
            if not book:
                continue
            data = out.get("data", {})
            text = data.get(book.get("mime_prefix", "") + "text/plain")
            if text is not None:
                values[book["name"]] = "".join(text) if isinstance(text, list) else text
    return values


def is_number(text: str) -> bool:
    try:
        value = ast.literal_eval(text)
    except (SyntaxError, ValueError):
        value = text
    if isinstance(value, (int, float)):
        return True
    return bool(re.search(r"\d", str(value)))


def strip_code_fences(text: str) -> str:
    """Drop fenced code; keep the body of directive fences ({admonition} and friends)."""
    out, fence = [], None
    for line in text.splitlines():
        m = FENCE.match(line.strip())
        if fence is None and m:
            fence = (m.group(1), m.group(2).strip().startswith("{"))
            continue
        if fence is not None and line.strip() == fence[0]:
            fence = None
            continue
        if fence is None or fence[1]:
            if fence is not None and line.strip().startswith(":"):
                continue  # directive options
            out.append(line)
    return "\n".join(out)


def scan_text(page: Page, text: str, glue: dict[str, dict[str, str]], here: Path, strict: bool) -> None:
    for m in re.finditer(r"\{glue(?::\w+)?\}`([^`]*)`", text):
        ref = m.group(1)
        doc, _, key = ref.rpartition("::")
        key = key.split(":")[0]
        path = (here.parent / doc).resolve() if doc else here
        if str(path) not in glue:
            glue[str(path)] = glue_values(path) if path.suffix == ".ipynb" else {}
        values = glue[str(path)]
        if values is None:  # a source, not yet executed: count the role as a pasted number
            page.pasted += 1
        elif key not in values:
            page.missing.append(ref)
        elif is_number(values[key]):
            page.pasted += 1
        else:
            page.pasted_words += 1
    text = strip_code_fences(text)
    text = MATH.sub(lambda m: " ".join(re.findall(r"\d+\.\d+", m.group(0))), text)
    for pattern in STRUCTURE:
        text = pattern.sub(" ", text)
    text = " ".join(text.split())  # phrases may wrap across lines
    if not strict:  # the ledger's verdicts quote nothing: every figure there is pasted
        for phrase in ALLOWED:
            phrase = " ".join(phrase.split())
            for _ in range(text.count(phrase)):
                for n in NUMBER.findall(phrase):
                    page.allowed.append((n, phrase))
            text = text.replace(phrase, " ")
    for pattern in ALLOWED_PATTERNS:
        for m in re.finditer(pattern, text):
            for n in NUMBER.findall(m.group(0)):
                page.allowed.append((n, m.group(0)))
        text = re.sub(pattern, " ", text)
    for m in NUMBER.finditer(text):
        context = " ".join(text[max(0, m.start() - 40) : m.end() + 25].split())
        page.typed.append((m.group(0), context))


def ledger_columns(text: str) -> tuple[str, str, str]:
    """Split the ledger into its verdict column (strict), its claim column (the sources' own
    words, quoted) and everything else."""
    verdicts, claims, rest = [], [], []
    for line in text.splitlines():
        cells = line.split(" | ")
        if line.startswith("|") and len(cells) >= 4 and not set(line) <= set("|- "):
            verdicts.append(cells[2])
            claims.append(cells[1])
            rest.append(" | ".join(cells[:1] + cells[3:]))
        else:
            rest.append(line)
    return "\n".join(verdicts), "\n".join(claims), "\n".join(rest)


def scan(sources: bool = False) -> list[Page]:
    pages, glue = [], {}
    paths = sorted((CHAPTERS / "_src").glob("*.py")) if sources else sorted(CHAPTERS.glob("*.ipynb"))
    for path in paths:
        page = Page(f"chapters/{path.name}")
        if sources:
            import jupytext

            nb = jupytext.read(path, fmt="py:percent")
            glue[str(path)] = None
        else:
            nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "markdown":
                scan_text(page, cell.source, glue, path, strict=False)
        pages.append(page)
    for path in [ROOT / "intro.md", *sorted((ROOT / "reference").glob("*.md"))]:
        name = str(path.relative_to(ROOT))
        if name in GENERATED:
            continue
        text = path.read_text()
        if name == LEDGER:
            verdicts, claims, rest = ledger_columns(text)
            page = Page(f"{name} (verdicts)")
            scan_text(page, verdicts, glue, path, strict=True)
            pages.append(page)
            page = Page(f"{name} (claims: the sources, quoted)")
            for number in NUMBER.findall(claims):
                page.allowed.append((number, "the ledger's claim column quotes the sources"))
            pages.append(page)
            page = Page(f"{name} (the rest)")
            scan_text(page, rest, glue, path, strict=False)
            pages.append(page)
        else:
            page = Page(name)
            scan_text(page, text, glue, path, strict=False)
            pages.append(page)
    return pages


def main(argv: list[str]) -> int:
    verbose = "-v" in argv
    pages = scan(sources="--src" in argv)
    chapters = [p for p in pages if p.name.startswith("chapters/")]
    print(f"{'page':45} {'pasted':>6} {'allowed':>7} {'typed':>5} {'share':>6} {'words':>5}")
    for page in pages:
        share = page.pasted / page.numbers if page.numbers else 1.0
        print(
            f"{page.name:45} {page.pasted:6} {len(page.allowed):7} {len(page.typed):5} "
            f"{share:6.0%} {page.pasted_words:5}"
        )
        for number, context in page.typed:
            print(f"    typed {number!r}: ...{context}...")
        if verbose:
            for number, phrase in page.allowed:
                print(f"    allowed {number!r}: {phrase!r}")
        for ref in page.missing:
            print(f"    no glued value for {ref!r}")
    pasted = sum(p.pasted for p in chapters)
    total = sum(p.numbers for p in chapters)
    print(f"chapters: {pasted} of {total} numbers pasted ({pasted / max(total, 1):.1%})")
    patterns = [re.compile(p) for p in ALLOWED_PATTERNS]
    settings = sum(
        any(p.fullmatch(phrase) for p in patterns) for page in chapters for _, phrase in page.allowed
    )
    quotes = sum(len(p.allowed) for p in chapters) - settings
    print(
        f"  not counting {settings} settings named as in the code (r=8, 4-bit, ...):"
        f" {pasted} of {total - settings} ({pasted / max(total - settings, 1):.1%});"
        f" not counting the {quotes} quotations either: {pasted} of {total - settings - quotes}"
        f" ({pasted / max(total - settings - quotes, 1):.1%})"
    )
    return 1 if any(p.typed or p.missing for p in pages) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
