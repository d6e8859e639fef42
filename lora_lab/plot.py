"""Plot helpers for the notebooks: loss curves and r / alpha sweep plots.

Every figure is drawn inside one fixed style (`BOOK_STYLE`): white figure and axes background,
dark text, a fixed colour cycle, so a figure reads the same in Jupyter's light and dark themes,
in Colab and in the rendered book (a dark theme shows it as a white card). Nothing here depends
on matplotlib's global state: each function opens a `matplotlib.rc_context`.

    fig = plot_loss_curves([run_a, run_b])                      # loss vs step, one line per run
    fig = plot_sweep(results["runs"], x="r", y="final_loss")    # one line per alpha rule
    fig = plot_rank_scaling(results["experiments"]["rank_scaling"])   # ||dW|| vs r, alpha/r vs rsLoRA
    fig = plot_alpha_vs_lr(results)                             # alpha x2 vs lr x2, AdamW and SGD

A "run" is a dict as written by `benchmarks/sweep_r_alpha.py` (and `lora_lab.widgets`): at least
`loss_steps` and `losses` (a subsampled loss curve) and a `label`, or the fields a label is made of
(`r`, `lora_alpha`, `use_rslora`, `lr`).

Left out: interactive backends (see `lora_lab.widgets`), saving files (use `fig.savefig`).
References: matplotlib `rc_context`, `Axes.plot`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import matplotlib
import matplotlib.pyplot as plt
import matplotlib.ticker
from matplotlib.axes import Axes
from matplotlib.figure import Figure

__all__ = [
    "BOOK_STYLE",
    "COLORS",
    "new_figure",
    "run_label",
    "smooth",
    "plot_loss_curves",
    "plot_sweep",
    "plot_bars",
    "plot_rank_scaling",
    "plot_alpha_vs_lr",
]

# Colour-blind-safe cycle (Okabe-Ito), dark enough on white.
COLORS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#999999"]

BOOK_STYLE = {
    "figure.facecolor": "white",
    "axes.facecolor": "white",
    "savefig.facecolor": "white",
    "figure.edgecolor": "white",
    "text.color": "#222222",
    "axes.labelcolor": "#222222",
    "axes.edgecolor": "#444444",
    "xtick.color": "#222222",
    "ytick.color": "#222222",
    "axes.grid": True,
    "grid.color": "#dddddd",
    "grid.linewidth": 0.8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": matplotlib.cycler(color=COLORS),
    "font.size": 10,
    "axes.titlesize": 11,
    "legend.fontsize": 8,
    "legend.facecolor": "white",
    "legend.edgecolor": "#cccccc",
    "legend.framealpha": 0.9,
    "lines.linewidth": 1.6,
    "figure.dpi": 100,
}


def new_figure(
    ncols: int = 1, nrows: int = 1, width: float = 6.0, height: float = 3.6
) -> tuple[Figure, list]:
    """A figure in the book style with `nrows * ncols` axes (returned as a flat list).

    `width` and `height` are per panel, in inches.
    """
    with matplotlib.rc_context(BOOK_STYLE):
        fig, axes = plt.subplots(
            nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, layout="constrained"
        )
    fig.patch.set_facecolor("white")
    plt.close(fig)  # the caller shows it (a notebook displays a returned Figure once)
    return fig, list(axes.flat)


def run_label(run: dict) -> str:
    """A short label: `r=8 a=16 rsLoRA lr=3e-03` (or the run's own `label`)."""
    if run.get("label"):
        return str(run["label"])
    parts = []
    if "r" in run:
        parts.append(f"r={run['r']}")
    if "lora_alpha" in run:
        parts.append(f"a={run['lora_alpha']:g}")
    if run.get("use_rslora"):
        parts.append("rsLoRA")
    if "lr" in run:
        parts.append(f"lr={run['lr']:.0e}")
    if run.get("optimizer") and run["optimizer"] != "adamw":
        parts.append(run["optimizer"])
    return " ".join(parts) or "run"


def smooth(values: Sequence[float], window: int = 5) -> list[float]:
    """Trailing moving average over `window` points (the first points average what exists so far)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _figure_for(ax) -> tuple[Figure, Axes]:
    """The figure `ax` belongs to, or a new one-panel figure when `ax` is None."""
    if ax is None:
        fig, (ax,) = new_figure()
        return fig, ax
    return ax.figure, ax


def _style_axes(ax) -> None:
    # rc_context applies at creation time; set what the axes keep explicitly, so later drawing
    # outside the context (e.g. a widget redraw) keeps the style.
    ax.set_facecolor("white")
    ax.grid(True, color="#dddddd", linewidth=0.8)


def plot_loss_curves(
    runs: Iterable[dict],
    ax=None,
    title: str = "training loss",
    logy: bool = False,
    highlight: int | None = None,
) -> Figure:
    """Loss vs step, one line per run (from `loss_steps` / `losses`). Returns the figure.

    `highlight` draws that run (by position) thicker, the others thinner.
    """
    runs = list(runs)
    fig, ax = _figure_for(ax)
    with matplotlib.rc_context(BOOK_STYLE):
        _style_axes(ax)
        for i, run in enumerate(runs):
            if "losses" not in run:
                raise ValueError(f"run {run_label(run)!r} has no 'losses'; pass runs from the sweep results")
            steps = run.get("loss_steps") or list(range(1, len(run["losses"]) + 1))
            width = 2.6 if highlight == i else (1.0 if highlight is not None else 1.6)
            ax.plot(
                steps, run["losses"], label=run_label(run), linewidth=width, color=COLORS[i % len(COLORS)]
            )
        ax.set_xlabel("step")
        ax.set_ylabel("loss (assistant tokens)")
        if logy:
            ax.set_yscale("log")
        ax.set_title(title)
        if runs:
            ax.legend(loc="upper right")
    return fig


def plot_sweep(
    runs: Iterable[dict],
    x: str = "r",
    y: str = "final_loss",
    group: str = "alpha_rules",
    ax=None,
    title: str | None = None,
    logx: bool = True,
    highlight: dict | None = None,
) -> Figure:
    """One line per value of `group` (e.g. the alpha rule), `y` against `x` (e.g. final loss vs r).

    A run whose `group` value is a list is drawn in each of those groups (r=8, alpha=16 is both
    "alpha=2r" and "alpha=16").

    `highlight` (a run dict) is marked with a ring, so a widget can show which point is selected.
    """
    runs = [r for r in runs if r.get(y) is not None]
    fig, ax = _figure_for(ax)
    groups: dict = {}
    for run in runs:
        names = run.get(group, "")
        for name in names if isinstance(names, list) else [names]:  # a run may belong to several groups
            groups.setdefault(name, []).append(run)
    with matplotlib.rc_context(BOOK_STYLE):
        _style_axes(ax)
        for i, (name, members) in enumerate(groups.items()):
            members = sorted(members, key=lambda r: r[x])
            ax.plot(
                [m[x] for m in members],
                [m[y] for m in members],
                marker="o",
                markersize=4,
                label=str(name),
                color=COLORS[i % len(COLORS)],
            )
        if highlight is not None and highlight.get(y) is not None:
            ax.plot(
                [highlight[x]], [highlight[y]], marker="o", markersize=13, markerfacecolor="none",
                markeredgecolor="#222222", markeredgewidth=1.5, linestyle="none", label="selected",
            )  # fmt: skip
        if logx:
            ax.set_xscale("log", base=2)
            xs = sorted({r[x] for r in runs})
            if xs:
                ax.set_xticks(xs, [f"{v:g}" for v in xs])
        ax.set_xlabel(x)
        ax.set_ylabel(y.replace("_", " "))
        ax.set_title(title or f"{y.replace('_', ' ')} vs {x}")
        if groups:
            ax.legend()
    return fig


def plot_bars(
    labels: Sequence[str], values: Sequence[float], ax=None, title: str = "", ylabel: str = ""
) -> Figure:
    """A plain bar chart with the value printed on each bar (for small side-by-side comparisons)."""
    if len(labels) != len(values):
        raise ValueError(f"got {len(labels)} labels for {len(values)} values; pass one label per value")
    fig, ax = _figure_for(ax)
    with matplotlib.rc_context(BOOK_STYLE):
        _style_axes(ax)
        bars = ax.bar(range(len(values)), values, color=[COLORS[i % len(COLORS)] for i in range(len(values))])
        ax.set_xticks(range(len(values)), labels, rotation=20, ha="right")
        for bar, v in zip(bars, values):
            ax.annotate(
                f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom"
            )
        top = max([v for v in values if v == v] + [0])  # (NaN-safe) room above the tallest label
        if top > 0:
            ax.set_ylim(0, top * 1.15)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(False, axis="x")
    return fig


def plot_rank_scaling(experiment: dict, key: str = "update_norm_early", ax=None) -> Figure:
    """The size of the learned update against r at fixed alpha: alpha/r against rsLoRA's alpha/sqrt(r).

    `experiment` is `results["experiments"]["rank_scaling"]` of the sweep; `key` one of its measures
    (`update_norm_early`, `direction_norm_early`, `update_norm_end`, `direction_norm_end`).
    """
    fig, ax = _figure_for(ax)
    rows = experiment["rows"]
    with matplotlib.rc_context(BOOK_STYLE):
        _style_axes(ax)
        for i, name in enumerate(("alpha/r", "rsLoRA")):
            pts = [
                (row["r"], row[name][key]) for row in rows if name in row and row[name].get(key) is not None
            ]
            if pts:
                label = f"{name}: scaling = {experiment['alpha']}/" + (
                    "r" if name == "alpha/r" else "sqrt(r)"
                )
                ax.plot(*zip(*pts), marker="o", markersize=4, label=label, color=COLORS[i])
        rs = [row["r"] for row in rows]
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        # Label 1, 2, 3 and 5 of each decade and leave the other ticks bare: labelling every
        # minor tick stacks the labels on top of each other when the data span two decades.
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(rs, [str(r) for r in rs])
        ax.set_xlabel("r")
        what = "||dW||" if key.startswith("update") else "one direction's size"
        when = f"after {experiment['early_step']} steps" if key.endswith("early") else "at the end"
        ax.set_ylabel(f"{what} {when}")
        ax.set_title(f"update size vs r at alpha={experiment['alpha']}, lr={experiment['lr']:g}")
        ax.legend()
    return fig


def plot_alpha_vs_lr(results: dict, ratio_key: str = "norm_ratio_step1") -> Figure:
    """alpha x2 against lr x2 / lr x4: loss curves (top) and ||dW|| relative to the base run (bottom),
    one column per optimizer (AdamW, SGD). `ratio_key`: `norm_ratio_step1`, `norm_ratio_early` or
    `norm_ratio_end`."""
    exp = results["experiments"]["alpha_vs_lr"]["optimizers"]
    early = results["experiments"]["alpha_vs_lr"].get("early_step")
    when = {"norm_ratio_step1": "after 1 step", "norm_ratio_early": f"after {early} steps"}.get(
        ratio_key, "at the end"
    )
    opts = [o for o in ("adamw", "sgd") if o in exp]
    if not opts:
        raise ValueError(
            "the results hold no alpha_vs_lr experiment; run the sweep without --skip-alpha-vs-lr"
        )
    fig, axes = new_figure(ncols=len(opts), nrows=2, width=5.0, height=3.2)
    order = ["base", "alpha x2", "lr x2", "lr x4"]
    for j, opt in enumerate(opts):
        runs = [r for r in results["runs"] if r.get("group") == "alpha_vs_lr" and r.get("optimizer") == opt]
        runs.sort(key=lambda r: order.index(r["variant"]) if r.get("variant") in order else len(order))
        plot_loss_curves(runs, ax=axes[j], title=f"{opt}: loss")
        variants = exp[opt]["variants"]
        names = [n for n in order if n in variants]
        plot_bars(
            names, [variants[n][ratio_key] for n in names], ax=axes[len(opts) + j],
            title=f"{opt}: ||dW|| / base run, {when}", ylabel="ratio",
        )  # fmt: skip
    return fig
