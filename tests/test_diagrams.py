"""Tests for lora_lab.diagrams: each diagram draws what its arguments say, reads at a glance (no
two labels overlap, nothing falls off the figure) and stays a small PNG."""

from __future__ import annotations

import io
import itertools

import matplotlib

matplotlib.use("Agg")

import matplotlib.colors as mcolors  # noqa: E402
import pytest  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from lora_lab import diagrams  # noqa: E402
from lora_lab.nf4 import INT4_CODE, NF4_CODE  # noqa: E402
from lora_lab.plot import new_figure  # noqa: E402

ALL_LAYERS = [*diagrams.ATTENTION, *diagrams.MLP]


def by_gid(fig, gid):
    found = [a for a in fig.findobj() if getattr(a, "get_gid", lambda: None)() == gid]
    assert len(found) == 1, f"expected one artist with gid {gid!r}, found {len(found)}"
    return found[0]


def texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def drawn_texts(fig) -> list[Text]:
    """The texts a reader sees: figure and axes texts, titles, legends, and the tick labels and
    axis labels of visible axes whose ticks fall inside the view (hidden ones are not drawn)."""
    found = list(fig.texts)
    for legend in fig.legends:
        found += legend.get_texts()
    for ax in fig.axes:
        found += [*ax.texts, ax.title, ax._left_title, ax._right_title]
        if ax.get_legend():
            found += ax.get_legend().get_texts()
        if not ax.axison:
            continue
        for axis, (lo, hi) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            found.append(axis.label)
            for tick in axis.get_major_ticks():
                if min(lo, hi) <= tick.get_loc() <= max(lo, hi):
                    found.append(tick.label1)
    return [t for t in found if t.get_visible() and t.get_text().strip()]


def color(artist) -> str:
    return mcolors.to_hex(artist.get_facecolor())


EXAMPLES = {
    "lora_shapes": lambda: diagrams.lora_shapes(64, 64, 8, 16),
    "lora_shapes_wide": lambda: diagrams.lora_shapes(48, 160, 2, 4),
    "block": lambda: diagrams.transformer_block(
        {"q, v": ["q_proj", "v_proj"], "all-linear": ALL_LAYERS},
        shapes={"q_proj": (64, 64), "gate_proj": (172, 64), "down_proj": (64, 172)},
    ),
    "merge_vs_switch": lambda: diagrams.merge_vs_switch(
        ["support", "sql", "a2"], {"base": "3 MB", "adapter": "50 kB"}
    ),
    "batched_step": lambda: diagrams.batched_step(["a0", None, "a2", "a1", "a0"]),
    "nf4_levels": lambda: diagrams.nf4_levels(),
}


def layout_problems(fig) -> list[str]:
    """Labels that overlap another label or run off the figure, measured by the Agg renderer."""
    renderer = FigureCanvasAgg(fig).get_renderer()  # the renderer savefig uses
    fig.draw(renderer)  # lays out constrained axes and legends
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in drawn_texts(fig)]
    page, problems = fig.bbox, []
    for text, box in boxes:
        if not (
            page.x0 - 1 <= box.x0
            and box.x1 <= page.x1 + 1
            and page.y0 - 1 <= box.y0
            and box.y1 <= page.y1 + 1
        ):
            problems.append(f"{text!r} runs off the figure")
    for (t1, b1), (t2, b2) in itertools.combinations(boxes, 2):
        if b1.overlaps(b2):
            problems.append(f"labels overlap: {t1!r} and {t2!r}")
    return problems


def test_the_layout_check_sees_overlapping_and_clipped_labels():
    fig, (ax,) = new_figure()
    ax.set_axis_off()
    ax.text(0.5, 0.5, "one label")
    ax.text(0.52, 0.5, "another label")
    ax.text(1.3, 0.5, "off the page")
    assert sorted(layout_problems(fig)) == ["'off the page' runs off the figure",
                                            "labels overlap: 'one label' and 'another label'"]  # fmt: skip


@pytest.mark.parametrize("make", EXAMPLES.values(), ids=EXAMPLES.keys())
def test_no_two_labels_overlap_and_all_stay_on_the_figure(make):
    fig = make()
    assert len(drawn_texts(fig)) >= 5
    assert layout_problems(fig) == []


@pytest.mark.parametrize("make", EXAMPLES.values(), ids=EXAMPLES.keys())
def test_png_is_small_and_white(make):
    buf = io.BytesIO()
    fig = make()
    fig.savefig(buf, format="png")
    assert 5_000 < buf.tell() < 300_000
    assert mcolors.to_hex(fig.get_facecolor()) == "#ffffff"


@pytest.mark.parametrize("d_out, d_in, r", [(64, 64, 8), (48, 160, 2), (128, 32, 32)])
def test_lora_shapes_draws_every_matrix_to_scale(d_out, d_in, r):
    fig = diagrams.lora_shapes(d_out, d_in, r, alpha=2 * r)
    size = {g: (by_gid(fig, g).get_width(), by_gid(fig, g).get_height()) for g in ("W0", "A", "B")}
    assert size == {"W0": (d_in, d_out), "A": (d_in, r), "B": (r, d_out)}
    assert by_gid(fig, "x").get_height() == d_in and by_gid(fig, "h").get_height() == d_out
    title = fig.axes[0].get_title()
    assert f"{r * (d_in + d_out):,} numbers" in title
    assert f"{d_out}×{d_in}" in title
    assert f"{d_out * d_in:,} params" in " ".join(texts(fig))


def test_lora_shapes_rejects_bad_dimensions():
    with pytest.raises(ValueError, match="r=80 is larger"):
        diagrams.lora_shapes(64, 64, 80)
    with pytest.raises(ValueError, match="positive int"):
        diagrams.lora_shapes(0, 64, 8)
    with pytest.raises(ValueError, match="alpha"):
        diagrams.lora_shapes(64, 64, 8, alpha=0)


def test_block_colours_exactly_the_targeted_layers():
    fig = diagrams.transformer_block({"one": ["q_proj", "v_proj"], "two": ["gate_proj"]})
    for ax, targets in zip(fig.axes, (["q_proj", "v_proj"], ["gate_proj"])):
        drawn = {
            a.get_gid().removeprefix("layer:"): color(a)
            for a in ax.patches
            if str(a.get_gid()).startswith("layer:")
        }
        assert set(drawn) == set(ALL_LAYERS)
        assert {n for n, c in drawn.items() if c == mcolors.to_hex(diagrams.PATCH)} == set(targets)
        assert {n for n, c in drawn.items() if c == mcolors.to_hex(diagrams.FROZEN)} == set(ALL_LAYERS) - set(
            targets
        )
    assert [ax.get_title() for ax in fig.axes] == ["one", "two"]


def test_block_prints_the_shapes_it_is_given_and_rejects_unknown_layers():
    fig = diagrams.transformer_block(["q_proj"], shapes={"q_proj": (96, 32)})
    assert "q_proj\n32→96" in texts(fig)
    with pytest.raises(ValueError, match="unknown layers.*'qproj'"):
        diagrams.transformer_block(["qproj"])
    with pytest.raises(ValueError, match="not the string"):
        diagrams.transformer_block({"x": "q_proj"})


def test_merge_vs_switch_draws_one_binary_per_task_and_one_base():
    fig = diagrams.merge_vs_switch(["support", "sql", "x"], sizes={"base": "3.1 MB", "adapter": "9 kB"})
    for task in ("support", "sql", "x"):
        by_gid(fig, f"merged:{task}")
        by_gid(fig, f"adapter:{task}")
    by_gid(fig, "base")
    joined = " ".join(texts(fig))
    assert "3.1 MB" in joined and "9 kB" in joined and "Go plugin" in joined
    assert "MB" not in " ".join(texts(diagrams.merge_vs_switch(["a"])))  # no sizes: qualitative
    with pytest.raises(ValueError, match="keys 'base' and 'adapter'"):
        diagrams.merge_vs_switch(["a"], sizes={"lora": "1 kB"})
    with pytest.raises(ValueError, match="non-empty"):
        diagrams.merge_vs_switch([])


def test_batched_step_colours_each_row_by_its_adapter():
    ids = ["a0", None, "a2", "a1", "a0"]
    fig = diagrams.batched_step(ids)
    for i, name in enumerate(ids):
        by_gid(fig, f"row:{i}")
        by_gid(fig, f"out:{i}")
        tag = by_gid(fig, f"id:{i}")
        if name is None:
            assert color(tag) == "#ffffff"
        else:
            assert color(tag) == color(by_gid(fig, f"bank:{name}"))
    banks = {
        a.get_gid() for a in fig.findobj() if str(getattr(a, "get_gid", lambda: "")()).startswith("bank:")
    }
    assert banks == {"bank:a0", "bank:a1", "bank:a2"}
    assert "5 requests, 3 adapters" in fig.axes[0].get_title()
    with pytest.raises(ValueError, match="empty"):
        diagrams.batched_step([])


def test_nf4_levels_are_the_code_book_and_spread_the_weights_more_evenly_than_int4():
    fig = diagrams.nf4_levels()
    nf4 = by_gid(fig, "levels:NF4")
    int4 = by_gid(fig, "levels:int4")
    assert list(nf4.get_xdata()) == sorted(NF4_CODE.tolist())
    assert list(int4.get_xdata()) == sorted(INT4_CODE.tolist())
    shares = {"nf4": diagrams.level_shares(NF4_CODE), "int4": diagrams.level_shares(INT4_CODE)}
    title = fig.axes[0].get_title()
    assert f"{min(shares['nf4']):.1%} to {max(shares['nf4']):.1%}" in title
    assert all(abs(sum(s) - 1) < 1e-6 for s in shares.values())
    spread = {k: max(s) - min(s) for k, s in shares.items()}
    assert spread["nf4"] < spread["int4"] / 3  # quantile spacing: near-equal shares
    assert len(diagrams.nf4_levels(compare_int4=False).axes) == 1


def test_book_map_draws_every_chapter_in_order_and_highlights_the_reader():
    chapters = [(f"{i:02d}", f"chapter number {i} with a longer title to wrap") for i in range(14)]
    fig = diagrams.book_map(chapters, here="03")
    boxes = [by_gid(fig, f"chapter:{num}") for num, _ in chapters]
    assert [color(b) for b in boxes].count(mcolors.to_hex(diagrams.PATCH)) == 1
    assert color(boxes[3]) == mcolors.to_hex(diagrams.PATCH)
    tops = sorted({round(b.get_y(), 6) for b in boxes})
    assert len(tops) == 4  # 14 chapters, 4 to a row
    row2 = [b.get_x() for b in boxes[4:8]]
    assert row2 == sorted(row2, reverse=True)  # the second row runs right to left
    assert layout_problems(fig) == []
    with pytest.raises(ValueError, match="not one of the chapters"):
        diagrams.book_map(chapters, here="99")
    with pytest.raises(ValueError, match="no chapters"):
        diagrams.book_map([])


def test_level_shares_match_the_normal_it_describes():
    shares = diagrams.level_shares([-1.0, 0.0, 1.0], z_max=1.0)  # cut at -0.5 and +0.5 sigma
    assert shares[1] == pytest.approx(0.3829, abs=1e-4)
    assert shares[0] == pytest.approx(shares[2])
    with pytest.raises(ValueError, match="at least 2 levels"):
        diagrams.level_shares([0.0])
