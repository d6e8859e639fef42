"""Tests for lora_lab.plot: the book style, loss curves, sweep plots, bar charts."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.colors as mcolors  # noqa: E402
import pytest  # noqa: E402

from lora_lab import plot  # noqa: E402


def _run(r, alpha, rules, final, lr=1e-3):
    return {"r": r, "lora_alpha": alpha, "lr": lr, "alpha_rules": rules, "final_loss": final,
            "loss_steps": [1, 2, 3], "losses": [3.0, 2.0, final]}  # fmt: skip


def test_new_figure_is_white_whatever_the_global_style():
    with matplotlib.style.context("dark_background"):  # a reader's dark theme
        fig, axes = plot.new_figure(ncols=2)
    assert len(axes) == 2
    assert mcolors.to_hex(fig.get_facecolor()) == "#ffffff"
    assert all(mcolors.to_hex(ax.get_facecolor()) == "#ffffff" for ax in axes)


def test_loss_curves_draw_one_line_per_run_with_its_data():
    runs = [_run(2, 4, ["alpha=2r"], 1.5), _run(8, 16, ["alpha=2r", "alpha=16"], 1.0)]
    fig = plot.plot_loss_curves(runs, highlight=1)
    ax = fig.axes[0]
    assert len(ax.lines) == 2
    assert list(ax.lines[1].get_ydata()) == [3.0, 2.0, 1.0]
    assert ax.lines[1].get_linewidth() > ax.lines[0].get_linewidth()  # the highlighted run is thicker
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["r=2 a=4 lr=1e-03", "r=8 a=16 lr=1e-03"]


def test_loss_curves_reject_a_run_without_losses():
    with pytest.raises(ValueError, match="no 'losses'"):
        plot.plot_loss_curves([{"r": 2}])


def test_sweep_puts_a_run_in_every_group_it_belongs_to():
    runs = [
        _run(4, 8, ["alpha=2r"], 1.2),
        _run(8, 16, ["alpha=2r", "alpha=16"], 1.0),
        _run(16, 16, ["alpha=r", "alpha=16"], 0.9),
    ]
    fig = plot.plot_sweep(runs, x="r", y="final_loss", group="alpha_rules", highlight=runs[1])
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.lines}
    assert list(lines["alpha=2r"].get_xdata()) == [4, 8]
    assert list(lines["alpha=16"].get_xdata()) == [8, 16]
    assert list(lines["alpha=16"].get_ydata()) == [1.0, 0.9]
    assert list(lines["selected"].get_xdata()) == [8]
    assert ax.get_xscale() == "log"


def test_sweep_skips_runs_without_the_metric():
    runs = [_run(4, 8, ["alpha=2r"], 1.2), dict(_run(8, 16, ["alpha=2r"], 1.0), accuracy=None)]
    runs[0]["accuracy"] = 0.5
    fig = plot.plot_sweep(runs, y="accuracy")
    assert list(fig.axes[0].lines[0].get_xdata()) == [4]


def test_bars_label_values_and_check_lengths():
    fig = plot.plot_bars(["a", "b"], [1.0, 2.5])
    assert [t.get_text() for t in fig.axes[0].texts] == ["1", "2.5"]
    with pytest.raises(ValueError, match="2 labels for 3 values"):
        plot.plot_bars(["a", "b"], [1, 2, 3])


def test_smooth_is_a_trailing_mean():
    assert plot.smooth([1, 2, 3, 4], window=2) == [1.0, 1.5, 2.5, 3.5]
    with pytest.raises(ValueError):
        plot.smooth([1.0], window=0)


def test_rank_scaling_plot_draws_both_rules_against_r():
    exp = {"alpha": 16, "lr": 1e-3, "early_step": 10, "rows": [
        {"r": r, "alpha/r": {"update_norm_early": 1 / r**0.5}, "rsLoRA": {"update_norm_early": 1.0}} for r in (1, 4, 16)
    ]}  # fmt: skip
    ax = plot.plot_rank_scaling(exp).axes[0]
    assert [line.get_label() for line in ax.lines] == [
        "alpha/r: scaling = 16/r",
        "rsLoRA: scaling = 16/sqrt(r)",
    ]
    assert list(ax.lines[0].get_ydata()) == [1.0, 0.5, 0.25] and list(ax.lines[1].get_xdata()) == [1, 4, 16]


def test_alpha_vs_lr_plot_has_curves_and_ratio_bars_per_optimizer():
    variants = {
        n: {"norm_ratio_step1": v}
        for n, v in (("base", 1.0), ("alpha x2", 4.0), ("lr x2", 2.0), ("lr x4", 4.0))
    }
    runs = [dict(_run(8, 16, [], 1.0), group="alpha_vs_lr", optimizer=o, variant=n, label=f"{o} {n}")
            for o in ("adamw", "sgd") for n in variants]  # fmt: skip
    results = {"runs": runs, "experiments": {"alpha_vs_lr": {"early_step": 5, "optimizers": {
        "adamw": {"variants": variants}, "sgd": {"variants": variants}}}}}  # fmt: skip
    fig = plot.plot_alpha_vs_lr(results)
    assert len(fig.axes) == 4
    assert len(fig.axes[0].lines) == 4 and [t.get_text() for t in fig.axes[3].texts] == ["1", "4", "2", "4"]
    with pytest.raises(ValueError, match="no alpha_vs_lr"):
        plot.plot_alpha_vs_lr({"runs": [], "experiments": {"alpha_vs_lr": {"optimizers": {}}}})


def test_rank_scaling_tick_labels_do_not_overlap_over_two_decades():
    """Chapter 04's "one direction's size" panel spans 0.04 to 3: its y labels once piled up."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    rows = [{"r": r, "alpha/r": {"direction_norm_early": 2.8 / r}, "rsLoRA": {"direction_norm_early": 2.8 / r**0.5}}
            for r in (1, 2, 4, 8, 16, 32, 64)]  # fmt: skip
    fig = plot.plot_rank_scaling(
        {"rows": rows, "alpha": 16, "lr": 3e-3, "early_step": 10}, "direction_norm_early"
    )
    ax = fig.axes[0]
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    lo, hi = ax.get_ylim()
    labels = [
        t.label1
        for axis_ticks in (ax.yaxis.get_major_ticks(), ax.yaxis.get_minor_ticks())
        for t in axis_ticks
        if lo <= t.get_loc() <= hi and t.label1.get_visible() and t.label1.get_text()
    ]
    assert len(labels) >= 4  # still readable: several values labelled
    boxes = [label.get_window_extent(renderer) for label in labels]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b), "y tick labels overlap"
