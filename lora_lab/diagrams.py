"""Diagrams of the book's ideas, drawn from code with matplotlib (no external tools).

Each function returns one `Figure` in the book style (`lora_lab.plot.BOOK_STYLE`) and draws what
its arguments say, so a chapter passes the numbers it measured and the picture cannot drift
from the text:

    fig = lora_shapes(d_out=64, d_in=64, r=8, alpha=16)      # h = W0 x + (alpha/r) B A x, to scale
    fig = transformer_block(["q_proj", "v_proj"])            # where adapters sit in a decoder block
    fig = merge_vs_switch(["support", "sql"])                # static vs dynamic linking
    fig = batched_step(["a0", None, "a2", "a1"])             # one batch, one adapter id per row
    fig = nf4_levels()                                       # NF4's 16 levels on a normal curve
    fig = book_map([("00", "The billion-parameter binary"), ...])   # the chapters in reading order

Every shape a test needs to find carries a `gid` (e.g. the rectangle of A has gid "A"), so
`tests/test_diagrams.py` reads back what was drawn and checks it against the arguments.

Left out: animation, interactive figures (see `lora_lab.widgets`), saving files (`fig.savefig`).
References: Hu et al. 2021 (LoRA, figure 1); Chen et al. 2023 (Punica) and Sheng et al. 2023
(S-LoRA) for the gathered multi-adapter matmul; Dettmers et al. 2023 (QLoRA, NF4).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import matplotlib
import torch
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

from lora_lab.nf4 import INT4_CODE, NF4_CODE
from lora_lab.plot import BOOK_STYLE, COLORS, new_figure

__all__ = [
    "ATTENTION",
    "MLP",
    "NF4_OFFSET",
    "lora_shapes",
    "transformer_block",
    "merge_vs_switch",
    "batched_step",
    "nf4_levels",
    "book_map",
    "level_shares",
]

FROZEN = "#BBBBBB"  # the base model, the "binary": grey
PATCH = COLORS[1]  # LoRA's A and B, the "patch": vermillion
DATA = COLORS[0]  # activations (x, h): blue
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# bitsandbytes' create_normal_map(offset=0.9677083): the probability of the outermost positive level.
NF4_OFFSET = 0.9677083


def _canvas(width: float, height: float) -> tuple[Figure, object]:
    """One blank panel (no axes lines, no grid) for a diagram."""
    fig, (ax,) = new_figure(width=width, height=height)
    ax.set_axis_off()
    return fig, ax


def _box(ax, x, y, w, h, text="", color=FROZEN, gid=None, fontsize=9, round_=True, **kw):
    """A filled box with centred text; returns the patch."""
    style = "round,pad=0,rounding_size=0.02" if round_ else "square,pad=0"
    patch = FancyBboxPatch(
        (x, y), w, h, boxstyle=style, facecolor=color, edgecolor="#333333", linewidth=1.0, **kw
    )
    patch.set_gid(gid)
    ax.add_patch(patch)
    if text:
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize)
    return patch


def _arrow(ax, start, end, color="#333333", style="-|>", **kw):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=10, color=color,
                                 linewidth=1.0, shrinkA=0, shrinkB=0, **kw))  # fmt: skip


# ------------------------------------------------------------------------------------------------
# a. W0 x + (alpha / r) B A x, drawn to scale
# ------------------------------------------------------------------------------------------------


def lora_shapes(d_out: int = 64, d_in: int = 64, r: int = 8, alpha: float = 16) -> Figure:
    """h = W0 x + (alpha/r) B A x with every matrix drawn to scale (one unit per entry).

    W0 is [d_out, d_in] (frozen), A is [r, d_in], B is [d_out, r], x is [d_in] and h is [d_out]:
    the reader sees how thin the patch is next to the weight it patches. The parameter counts
    under each matrix are computed from the arguments.
    """
    for name, v in (("d_out", d_out), ("d_in", d_in), ("r", r)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if r > min(d_in, d_out):
        raise ValueError(f"r={r} is larger than the layer ({d_out}x{d_in}); pick r <= {min(d_in, d_out)}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    tall = max(d_out, d_in)
    gap = 0.12 * tall  # room for the operators between shapes
    vec = max(1, round(0.02 * tall))  # a vector is one column; drawn at least 2% wide to be seen

    # Left to right: h = W0 x + s B A x. Each item: (gid, width, height, colour, name).
    items = [
        ("h", vec, d_out, DATA, "h"), ("=", None, None, None, None),
        ("W0", d_in, d_out, FROZEN, "W₀"), ("x", vec, d_in, DATA, "x"),
        ("+", None, None, None, None), ("s", None, None, None, None),
        ("B", r, d_out, PATCH, "B"), ("A", d_in, r, PATCH, "A"), ("x2", vec, d_in, DATA, "x"),
    ]  # fmt: skip
    fig, ax = _canvas(width=9.0, height=3.4)
    cx, centre = 0.0, 0.0  # shapes are centred on y = 0
    placed = {}
    for gid, w, h, color, name in items:
        if w is None:  # an operator between shapes
            text = {"=": "=", "+": "+", "s": f"×α/r\n= {alpha:g}/{r}"}[gid]
            width = gap * (2.0 if gid == "s" else 1.0)
            ax.text(cx + width / 2, centre, text, ha="center", va="center",
                    fontsize=9 if gid == "s" else 16)  # fmt: skip
            cx += width
            continue
        rect = Rectangle((cx, centre - h / 2), w, h, facecolor=color, edgecolor="#333333", linewidth=1.0)
        rect.set_gid(gid)
        ax.add_patch(rect)
        ax.text(cx + w / 2, centre + h / 2 + 0.04 * tall, name, ha="center", va="bottom", fontsize=11)
        placed[gid] = (cx, w, h)
        cx += w + 0.04 * tall

    counts = {"W0": d_out * d_in, "A": r * d_in, "B": d_out * r}
    notes = {
        "W0": f"{d_out}×{d_in}, frozen\n{counts['W0']:,} params",
        "A": f"{r}×{d_in}\n{counts['A']:,} params",
        "B": f"{d_out}×{r}\n{counts['B']:,}",
    }
    for gid, note in notes.items():
        x0, w, h = placed[gid]
        ax.text(x0 + w / 2, centre - tall / 2 - 0.06 * tall, note, ha="center", va="top", fontsize=8.5)
    trained = counts["A"] + counts["B"]
    ax.set_title(
        f"LoRA trains r·(d_in + d_out) = {trained:,} numbers beside a frozen {d_out}×{d_in} weight "
        f"({counts['W0'] / trained:.3g}× fewer)",
        fontsize=10,
    )
    ax.set_xlim(-0.02 * tall, cx)
    ax.set_ylim(-tall / 2 - 0.3 * tall, tall / 2 + 0.16 * tall)
    ax.set_aspect("equal")
    return fig


# ------------------------------------------------------------------------------------------------
# b. Where the adapters sit in a decoder block
# ------------------------------------------------------------------------------------------------


def _one_block(ax, targets: set[str], shapes: dict | None, title: str) -> None:
    """One Llama-style decoder block, bottom (input) to top (output), targeted layers highlighted."""

    def layer(name, x, y, w=1.5, h=0.75):
        hit = name in targets
        label = name if not shapes or name not in shapes else f"{name}\n{shapes[name][1]}→{shapes[name][0]}"
        _box(ax, x, y, w, h, label, color=PATCH if hit else FROZEN, gid=f"layer:{name}",
             fontsize=8, alpha=1.0)  # fmt: skip
        return x + w / 2, y, y + h

    # residual stream: a vertical line on the left
    ax.plot([0.3, 0.3], [0.0, 9.6], color="#555555", linewidth=1.2)
    _arrow(ax, (0.3, 9.4), (0.3, 9.9))
    ax.text(0.3, -0.1, "hidden states in", ha="left", va="top", fontsize=8)
    ax.text(0.3, 10.0, "out", ha="center", va="bottom", fontsize=8)

    # attention sub-block
    _box(ax, 0.9, 0.8, 6.2, 4.0, "", color="#F4F4F4", gid="group:attention", alpha=1.0)
    ax.text(1.05, 4.6, "self-attention", ha="left", va="top", fontsize=9, style="italic")
    _box(ax, 1.2, 0.95, 5.6, 0.45, "RMSNorm", color="white", fontsize=8)
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        layer(name, 1.2 + i * 1.9, 1.6)
    _box(ax, 2.5, 2.55, 3.0, 0.5, "softmax(QKᵀ/√d)·V", color="white", fontsize=8)
    layer("o_proj", 3.25, 3.25)
    # MLP sub-block
    _box(ax, 0.9, 5.2, 6.2, 4.0, "", color="#F4F4F4", gid="group:mlp", alpha=1.0)
    ax.text(1.05, 9.0, "MLP", ha="left", va="top", fontsize=9, style="italic")
    _box(ax, 1.2, 5.35, 5.6, 0.45, "RMSNorm", color="white", fontsize=8)
    layer("gate_proj", 1.6, 6.0)
    layer("up_proj", 4.9, 6.0)
    _box(ax, 2.6, 6.95, 2.8, 0.5, "SiLU(gate) × up", color="white", fontsize=8)
    layer("down_proj", 3.25, 7.65)
    for y in (4.8, 9.2):  # each sub-block adds its output back to the stream
        ax.text(0.3, y, "+", ha="center", va="center", fontsize=14,
                bbox=dict(boxstyle="circle,pad=0.1", facecolor="white", edgecolor="#555555"))  # fmt: skip
        _arrow(ax, (0.9, y), (0.45, y))
    ax.set_title(title, fontsize=10)
    ax.set_xlim(-0.1, 7.3)
    ax.set_ylim(-0.6, 10.5)


def transformer_block(
    panels: Sequence[str] | dict[str, Sequence[str]] = ("q_proj", "v_proj"),
    shapes: dict[str, tuple[int, int]] | None = None,
) -> Figure:
    """Where LoRA patches sit in one decoder block: the targeted linear layers in colour, the
    frozen rest in grey.

    `panels` is a list of layer names (one panel) or a dict {title: names} (one panel each, side
    by side). `shapes` maps a layer name to its weight's (out, in) shape, printed in its box.
    """
    if not isinstance(panels, dict):
        panels = {"LoRA on " + ", ".join(panels): panels}
    known = set(ATTENTION) | set(MLP)
    for title, names in panels.items():
        if isinstance(names, str):
            raise ValueError(f"panel {title!r}: pass a list of layer names, not the string {names!r}")
        unknown = set(names) - known
        if unknown:
            raise ValueError(
                f"panel {title!r}: unknown layers {sorted(unknown)}; choose from {sorted(known)}"
            )
    fig, axes = new_figure(ncols=len(panels), width=4.0, height=4.6)
    for ax, (title, names) in zip(axes, panels.items()):
        ax.set_axis_off()
        _one_block(ax, set(names), shapes, title)
    handles = [
        Rectangle((0, 0), 1, 1, facecolor=FROZEN, edgecolor="#333333", label="frozen W₀ (the binary)"),
        Rectangle((0, 0), 1, 1, facecolor=PATCH, edgecolor="#333333", label="W₀ + BA (patched)"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=9)
    return fig


# ------------------------------------------------------------------------------------------------
# c. Merge (static linking) vs switch (dynamic linking)
# ------------------------------------------------------------------------------------------------


def merge_vs_switch(tasks: Sequence[str] = ("support", "sql"), sizes: dict[str, str] | None = None) -> Figure:
    """Two ways to ship one base and several adapters, side by side.

    Left, merge = static linking: one full model per task, W0 + BA baked in. Right, switch =
    dynamic linking: one base loaded once and small adapter files swapped in, like .dll files or
    Go `plugin` .so files. `sizes` (optional) labels the boxes with sizes measured elsewhere:
    {"base": "...", "adapter": "..."}; without it the picture stays qualitative.
    """
    tasks = list(tasks)
    if not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"tasks must be a non-empty list of names, got {tasks!r}")
    if len(tasks) > 4:
        raise ValueError(f"{len(tasks)} tasks do not fit; draw at most 4")
    sizes = sizes or {}
    unknown = set(sizes) - {"base", "adapter"}
    if unknown:
        raise ValueError(f"sizes takes the keys 'base' and 'adapter', got {sorted(unknown)}")
    fig, (left, right) = new_figure(ncols=2, width=4.3, height=3.6)
    n = len(tasks)
    row = 3.6 / n
    base_note = f" ({sizes['base']})" if "base" in sizes else ""
    ad_note = f" ({sizes['adapter']})" if "adapter" in sizes else ""

    # merge: one full binary per task
    for i, task in enumerate(tasks):
        y = 3.8 - (i + 1) * row
        _box(left, 0.2, y + 0.1, 3.2, row - 0.25, "", color=FROZEN, gid=f"merged:{task}")
        _box(left, 2.55, y + 0.18, 0.75, row - 0.41, "", color=PATCH)
        left.text(0.35, y + 0.1 + (row - 0.25) / 2, f"model_{task}\nW₀ + BA baked in{base_note}",
                  ha="left", va="center", fontsize=8)  # fmt: skip
    left.set_title("merge = static linking\none full binary per task", fontsize=10)

    # switch: one base, adapters beside it, one active
    _box(right, 0.2, 0.3, 2.2, 3.3, f"base W₀\nloaded once{base_note}", color=FROZEN, gid="base")
    for i, task in enumerate(tasks):
        y = 3.8 - (i + 1) * row
        h = min(0.5, row - 0.3)
        cy = y + row / 2
        _box(right, 3.0, cy - h / 2, 1.4, h, f"{task}.safetensors", color=PATCH if i == 0 else "#F6C9A8",
             gid=f"adapter:{task}", fontsize=7)  # fmt: skip
        if i == 0:
            _arrow(right, (3.0, cy), (2.4, cy), color=PATCH)
    right.text(3.7, 0.15, f"adapters{ad_note}:\nswapped like .dll / Go plugin",
               ha="center", va="center", fontsize=8)  # fmt: skip
    right.set_title("switch = dynamic linking\none base, adapters swapped in", fontsize=10)
    for ax in (left, right):
        ax.set_axis_off()
        ax.set_xlim(0, 4.5)
        ax.set_ylim(-0.3, 3.9)
    return fig


# ------------------------------------------------------------------------------------------------
# d. One batched decode step over many adapters (Punica / S-LoRA)
# ------------------------------------------------------------------------------------------------


def batched_step(adapter_ids: Sequence[str | None]) -> Figure:
    """One layer of one decode step for a batch whose rows each name their adapter (None = base).

    The base matmul X W0ᵀ runs once for all rows; each row's A and B are gathered from stacked
    adapter tensors by its id, and its patch is added to its own row of the output.
    """
    ids = list(adapter_ids)
    if not ids:
        raise ValueError("adapter_ids is empty; pass one adapter name (or None) per row")
    if len(ids) > 12:
        raise ValueError(f"{len(ids)} rows do not fit; draw at most 12")
    names = sorted({i for i in ids if i is not None})
    color_of = {n: COLORS[(k + 2) % len(COLORS)] for k, n in enumerate(names)}
    n = len(ids)
    bank_rows = max(len(names), 1)
    top = max(n * 0.5, 1.5 + 0.55 * bank_rows)
    fig, ax = _canvas(width=9.0, height=1.0 + 0.55 * top)

    def row_y(i):  # centre of row i
        return top - (i + 1) * 0.5 + 0.25

    def bank_y(k):  # centre of the k-th adapter in the bank, below the base box
        return top - 1.45 - 0.55 * k

    # the shared base matmul, and the adapter bank below it
    _box(ax, 4.6, top - 1.0, 2.2, 0.8, "X W₀ᵀ\none matmul, all rows", color=FROZEN, gid="base", fontsize=8)
    for k, name in enumerate(names):
        _box(ax, 4.6, bank_y(k) - 0.2, 2.2, 0.4, f"A[{name}], B[{name}]", color=color_of[name],
             gid=f"bank:{name}", fontsize=7)  # fmt: skip
    for i, name in enumerate(ids):  # the batch, one row per request
        y = row_y(i)
        _box(ax, 0.0, y - 0.19, 1.6, 0.38, "", color=DATA, gid=f"row:{i}", round_=False)
        ax.text(-0.1, y, f"req {i}", ha="right", va="center", fontsize=8)
        _box(ax, 1.7, y - 0.19, 0.9, 0.38, name or "base", color=color_of.get(name, "white"),
             gid=f"id:{i}", fontsize=8)  # fmt: skip
        _box(ax, 8.6, y - 0.19, 1.6, 0.38, "", color=DATA, gid=f"out:{i}", round_=False)
        _arrow(ax, (6.8, top - 0.6), (8.55, y), color="#888888")  # every row gets W0 x
        if name is not None:  # gather: the row's id picks its A and B; its patch joins its row
            k = names.index(name)
            _arrow(ax, (2.6, y), (4.55, bank_y(k)), color=color_of[name], style="-",
                   linestyle=(0, (3, 2)))  # fmt: skip
            _arrow(ax, (6.8, bank_y(k)), (8.55, y - 0.1), color=color_of[name])
    ax.text(0.8, top + 0.1, "X: one row per request", ha="center", va="bottom", fontsize=8)
    ax.text(2.15, top + 0.1, "adapter id", ha="center", va="bottom", fontsize=8)
    ax.text(9.4, top + 0.1, "h = XW₀ᵀ + s·B[id]A[id]x", ha="center", va="bottom", fontsize=8)
    if names:
        ax.text(5.7, bank_y(len(names) - 1) - 0.3, "gathered by id", ha="center", va="top", fontsize=8)
    ax.set_title(f"one batched step: {n} requests, {len(names)} adapters, one base matmul", fontsize=10)
    ax.set_xlim(-0.9, 10.4)
    ax.set_ylim(min(0.0, bank_y(bank_rows - 1) - 0.7), top + 0.5)
    return fig


# ------------------------------------------------------------------------------------------------
# e. NF4's sixteen levels against the normal curve
# ------------------------------------------------------------------------------------------------


def nf4_levels(compare_int4: bool = True) -> Figure:
    """NF4's 16 levels (`lora_lab.nf4.NF4_CODE`) drawn under the normal density they were cut from,
    with uniform int4's levels (`INT4_CODE`) below for comparison.

    NF4 places its positive levels at normal quantiles up to probability `NF4_OFFSET` and
    divides by the largest, so a weight block scaled to [-1, 1] meets a standard normal
    stretched by 1 / z(NF4_OFFSET). The printed shares say how much of that normal falls nearest
    to each level: near-equal for NF4, uneven for int4.
    """
    normal = torch.distributions.Normal(0.0, 1.0)
    z_max = float(normal.icdf(torch.tensor(NF4_OFFSET)))  # the z-score NF4 maps to 1.0
    xs = torch.linspace(-1.15, 1.15, 461)
    density = torch.exp(normal.log_prob(xs * z_max)) * z_max  # density on the [-1, 1] scale
    codes = {"NF4 (16 levels)": NF4_CODE}
    if compare_int4:
        codes["int4, uniform (15 levels)"] = INT4_CODE
    fig, axes = new_figure(nrows=len(codes), width=8.0, height=2.3)
    with matplotlib.rc_context(BOOK_STYLE):
        for ax, (title, code) in zip(axes, codes.items()):
            code_name = title.split()[0].rstrip(",")
            levels = sorted(float(v) for v in code)
            ax.fill_between(xs.tolist(), density.tolist(), color=COLORS[5], alpha=0.25, linewidth=0)
            ax.plot(xs.tolist(), density.tolist(), color=COLORS[5], label="normal weights (scaled)")
            peak = float(density.max())
            heights = [float(torch.exp(normal.log_prob(torch.tensor(v * z_max)))) * z_max for v in levels]
            ax.vlines(levels, 0, heights, color=COLORS[1], linewidth=1.4, label="levels")
            ax.plot(levels, [0] * len(levels), "o", color=COLORS[1], markersize=4, gid=f"levels:{code_name}")
            shares = level_shares(levels, z_max)
            ax.set_title(f"{title}: each level takes {min(shares):.1%} to {max(shares):.1%} of the weights",
                         fontsize=10)  # fmt: skip
            ax.set_xlim(-1.15, 1.15)
            ax.set_ylim(0, peak * 1.15)
            ax.set_yticks([])
            ax.grid(False)
        axes[0].legend(loc="upper left", bbox_to_anchor=(0.0, 1.0))
        axes[-1].set_xlabel("weight / block absmax")
    return fig


def level_shares(levels, z_max: float | None = None) -> list[float]:
    """Share of normally distributed weights that rounds to each of `levels` (sorted here).

    The weights are a standard normal stretched to the [-1, 1] scale by `z_max`, the z-score
    the largest level stands for (default: NF4's, the normal quantile at `NF4_OFFSET`). The
    shares sum to 1; for NF4 they are near-equal, which is what quantile spacing is for.
    """
    normal = torch.distributions.Normal(0.0, 1.0)
    if z_max is None:
        z_max = float(normal.icdf(torch.tensor(NF4_OFFSET)))
    levels = sorted(float(v) for v in levels)
    if len(levels) < 2:
        raise ValueError(f"need at least 2 levels, got {len(levels)}")
    mids = [(a + b) / 2 for a, b in zip(levels, levels[1:])]
    cdf = [0.0] + [float(normal.cdf(torch.tensor(m * z_max))) for m in mids] + [1.0]
    return [b - a for a, b in zip(cdf, cdf[1:])]


# ------------------------------------------------------------------------------------------------
# f. The book's map
# ------------------------------------------------------------------------------------------------


def book_map(chapters: Sequence[tuple[str, str]], here: str | None = None, per_row: int = 4) -> Figure:
    """The chapters in reading order as a path of boxes, `per_row` to a row, the rows snaking so
    each arrow stays short. `chapters` is a list of (number, title), e.g. read from `_toc.yml`;
    `here` (a number) is drawn highlighted.
    """
    chapters = [(str(num), str(title)) for num, title in chapters]
    if not chapters:
        raise ValueError("no chapters given; pass (number, title) pairs in reading order")
    numbers = [num for num, _ in chapters]
    if here is not None and here not in numbers:
        raise ValueError(f"here={here!r} is not one of the chapters {numbers}")
    if per_row < 1:
        raise ValueError(f"per_row must be >= 1, got {per_row}")
    n_rows = -(-len(chapters) // per_row)
    fig, ax = _canvas(width=9.0, height=0.3 + 1.15 * n_rows)
    w, h, gap_x, gap_y = 2.0, 0.8, 0.45, 0.35
    centres = []
    for i, (num, title) in enumerate(chapters):
        row, col = divmod(i, per_row)
        if row % 2:  # snake: odd rows run right to left
            col = per_row - 1 - col
        x, y = col * (w + gap_x), -row * (h + gap_y)
        lines = textwrap.wrap(title, 25)
        if len(lines) > 2:  # two lines fit a box; say that the title goes on
            lines = [lines[0], lines[1] + " …"]
        text = f"{num}\n" + "\n".join(lines)
        _box(
            ax, x, y, w, h, text, color=PATCH if num == here else "#F4F4F4", gid=f"chapter:{num}", fontsize=8
        )
        centres.append((x, y, row))
    for (x0, y0, r0), (x1, y1, r1) in zip(centres, centres[1:]):
        if r0 == r1:  # along the row
            start, end = (x0 + w, y0 + h / 2), (x1, y1 + h / 2)
            if x1 < x0:
                start, end = (x0, y0 + h / 2), (x1 + w, y1 + h / 2)
        else:  # down to the next row
            start, end = (x0 + w / 2, y0), (x1 + w / 2, y1 + h)
        _arrow(ax, start, end)
    ax.set_xlim(-0.1, per_row * (w + gap_x) - gap_x + 0.1)
    ax.set_ylim(-(n_rows - 1) * (h + gap_y) - 0.1, h + 0.1)
    return fig
