"""Tests for lora_lab.widgets: nearest-run lookup, the explorer's data, the widget, and train_point."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import load_benchmark  # noqa: E402

from lora_lab import widgets  # noqa: E402

R_VALUES = (1, 2, 4, 8, 16, 32, 64)
LRS = (1e-3, 3e-3)


def fake_results() -> dict:
    """A sweep-shaped results dict whose numbers encode the setting (so a test can tell runs apart)."""
    runs = []
    for lr in LRS:
        for r in R_VALUES:
            for alpha, rs in ((r, False), (2 * r, False), (16, False), (16, True)):
                if any(
                    x["r"] == r and x["lora_alpha"] == alpha and x["use_rslora"] == rs and x["lr"] == lr
                    for x in runs
                ):
                    continue
                scaling = alpha / math.sqrt(r) if rs else alpha / r
                final = round(1 / (1 + scaling * lr * 1000), 5)
                runs.append({
                    "group": "grid", "r": r, "lora_alpha": alpha, "use_rslora": rs, "lr": lr,
                    "alpha_rules": widgets.alpha_rules(r, alpha, rs), "scaling": scaling,
                    "loss_steps": [1, 2, 3], "losses": [3.0, 2.0, final], "final_loss": final, "accuracy": 0.5,
                })  # fmt: skip
    runs.append({"group": "alpha_vs_lr", "r": 8, "lora_alpha": 32, "use_rslora": False, "lr": 9e-3,
                 "loss_steps": [1], "losses": [1.0], "final_loss": 1.0})  # fmt: skip
    return {"meta": {"steps": 3, "batch_size": 4, "task": "sql"}, "runs": runs}


def test_alpha_rules_name_every_family_a_setting_belongs_to():
    assert widgets.alpha_rules(8, 16, False) == ["alpha=2r", "alpha=16"]
    assert widgets.alpha_rules(16, 16, False) == ["alpha=r", "alpha=16"]
    assert widgets.alpha_rules(4, 4, False) == ["alpha=r"]
    assert widgets.alpha_rules(4, 3, False) == ["alpha=3"]
    assert widgets.alpha_rules(4, 16, True) == ["rsLoRA alpha=16"]


def test_select_exact_setting_returns_that_run():
    ex = widgets.SweepExplorer(fake_results())
    view = ex.select(r=16, lora_alpha=16, use_rslora=True, lr=3e-3)
    run = view["run"]
    assert (run["r"], run["lora_alpha"], run["use_rslora"], run["lr"]) == (16, 16, True, 3e-3)
    assert view["exact"] and view["note"] == ""
    assert view["scaling"] == pytest.approx(4.0)  # 16 / sqrt(16)
    assert view["curves"] == [run]
    assert {x["lr"] for x in view["family"]} == {3e-3}  # the sweep panel stays at the selected lr
    assert all(x["group"] == "grid" for x in view["family"])


def test_moving_each_slider_changes_the_data_behind_the_plot():
    ex = widgets.SweepExplorer(fake_results())
    before = ex.select(r=8, lora_alpha=16, use_rslora=False, lr=1e-3)
    after_r = ex.select(r=64, lora_alpha=16, use_rslora=False, lr=1e-3)
    after_rs = ex.select(r=64, lora_alpha=16, use_rslora=True, lr=1e-3)
    after_lr = ex.select(r=64, lora_alpha=16, use_rslora=True, lr=3e-3)
    # fixed alpha, bigger r: smaller scaling (alpha/r), so a higher loss in the fake sweep
    assert after_r["run"]["r"] == 64 and after_r["scaling"] == 0.25
    assert after_r["run"]["final_loss"] > before["run"]["final_loss"]
    # rsLoRA at r=64 scales by 16/8 = 2, eight times alpha/r's 0.25
    assert after_rs["run"]["use_rslora"] and after_rs["scaling"] == 2.0
    assert after_rs["run"]["losses"] != after_r["run"]["losses"]
    assert after_lr["run"]["lr"] == 3e-3 and {x["lr"] for x in after_lr["family"]} == {3e-3}


def test_uncached_values_snap_to_the_nearest_run_and_say_so():
    ex = widgets.SweepExplorer(fake_results())
    view = ex.select(r=5, lora_alpha=16, use_rslora=False, lr=2e-3)
    assert view["run"]["r"] == 4  # log2(5) = 2.32 is nearer 2 (r=4) than 3 (r=8)
    assert not view["exact"] and "nearest cached run: r=4" in view["note"]
    assert ex.select(r=1, lora_alpha=1, lr=1.1e-3)["run"]["lr"] == 1e-3


def test_fresh_runs_are_added_to_every_later_view():
    ex = widgets.SweepExplorer(fake_results())
    fresh = {"label": "fresh", "loss_steps": [1, 2], "losses": [2.5, 1.5]}
    ex.add_run(fresh)
    assert ex.select(r=2, lora_alpha=4)["curves"][-1] is fresh
    with pytest.raises(ValueError, match="losses"):
        ex.add_run({"label": "no curve"})


def test_bad_results_and_bad_values_are_refused():
    with pytest.raises(ValueError, match="'runs' list"):
        widgets.SweepExplorer({"meta": {}})
    with pytest.raises(ValueError, match="no grid runs"):
        widgets.SweepExplorer({"runs": [{"group": "alpha_vs_lr"}]})
    with pytest.raises(ValueError, match="must be positive"):
        widgets.SweepExplorer(fake_results()).select(r=0, lora_alpha=16)
    with pytest.raises(FileNotFoundError, match="sweep_r_alpha.py"):
        widgets.SweepExplorer.from_file("/nonexistent/sweep.json")


def test_figure_draws_the_selected_curve_and_its_family():
    ex = widgets.SweepExplorer(fake_results())
    view = ex.select(r=8, lora_alpha=16, lr=3e-3)
    fig = ex.figure(view)
    curves_ax, sweep_ax = fig.axes
    assert list(curves_ax.lines[0].get_ydata()) == view["run"]["losses"]
    labels = {line.get_label() for line in sweep_ax.lines}
    assert {"alpha=r", "alpha=2r", "alpha=16", "rsLoRA alpha=16", "selected"} <= labels
    selected = next(line for line in sweep_ax.lines if line.get_label() == "selected")
    assert list(selected.get_xdata()) == [8] and list(selected.get_ydata()) == [view["run"]["final_loss"]]


def sparse_results() -> dict:
    """Shaped like the real sweep: the second learning rate only at r=4 and r=32, alpha=16."""
    results = fake_results()
    results["runs"] = [
        x for x in results["runs"] if x["lr"] == 3e-3 or (x["r"] in (4, 32) and x["lora_alpha"] == 16)
    ]
    return results


def test_run_title_names_the_run_and_its_scaling():
    assert widgets.run_title({"r": 8, "lora_alpha": 16, "use_rslora": False, "lr": 3e-3}) == (
        "r=8, alpha=16, lr=0.003, scaling alpha/r = 2"
    )
    assert widgets.run_title({"r": 64, "lora_alpha": 16, "use_rslora": True, "lr": 1e-2}) == (
        "r=64, alpha=16, lr=0.01, rsLoRA: scaling alpha/sqrt(r) = 2"
    )


def test_options_offer_only_values_that_exist_given_the_earlier_ones():
    ex = widgets.SweepExplorer(sparse_results())
    assert ex.options()["r"] == list(R_VALUES)
    assert ex.options(64)["use_rslora"] == [False, True]
    assert ex.options(64, False)["lora_alpha"] == [16, 64, 128]
    assert ex.options(64, True)["lora_alpha"] == [16]
    assert ex.options(64, False, 16)["lr"] == [3e-3]  # the other lr exists only at r=4 and r=32
    assert ex.options(32, True, 16)["lr"] == [1e-3, 3e-3]
    assert ex.options(32, False, 64)["lr"] == [3e-3]
    # every combination the options allow is a run, and every run is reachable
    reachable = {
        (r, a, rs, lr)
        for r in ex.options()["r"]
        for rs in ex.options(r)["use_rslora"]
        for a in ex.options(r, rs)["lora_alpha"]
        for lr in ex.options(r, rs, a)["lr"]
    }
    assert reachable == {(x["r"], x["lora_alpha"], x["use_rslora"], x["lr"]) for x in ex.grid}
    assert ex.run(32, 16, True, 1e-3)["lr"] == 1e-3
    with pytest.raises(ValueError, match=r"no run r=64, alpha=16, rsLoRA=False, lr=0.001.*lr in \[0.003\]"):
        ex.run(64, 16, False, 1e-3)


def test_series_step_through_the_ranks_of_one_rule_at_one_lr():
    ex = widgets.SweepExplorer(sparse_results())
    series = ex.series()
    names = [s["name"] for s in series]
    assert names[:4] == [
        "alpha=r, lr=0.003",
        "alpha=2r, lr=0.003",
        "alpha=16, lr=0.003",
        "rsLoRA alpha=16, lr=0.003",
    ]
    assert names[4:] == ["alpha=16, lr=0.001", "rsLoRA alpha=16, lr=0.001"]
    assert [x["r"] for x in series[4]["runs"]] == [4, 32]
    for s in series:
        assert all(s["rule"] in x["alpha_rules"] and x["lr"] == s["lr"] for x in s["runs"])
        assert [x["r"] for x in s["runs"]] == sorted(x["r"] for x in s["runs"])
    # r=8, alpha=16 is both alpha=2r and alpha=16
    assert sum(ex.run(8, 16) in s["runs"] for s in series) == 2


def test_figure_title_names_the_run_drawn_not_the_request():
    ex = widgets.SweepExplorer(fake_results())
    view = ex.select(r=5, lora_alpha=16, lr=2e-3)  # no such run: r=4, lr=3e-3 is drawn
    fig = ex.figure(view)
    assert (
        fig.get_suptitle()
        == widgets.run_title(view["run"])
        == ("r=4, alpha=16, lr=0.003, scaling alpha/r = 4")
    )


def test_widget_offers_only_existing_runs_and_titles_the_one_drawn():
    box = widgets.explorer(sparse_results())
    c = box.controls
    assert box.view["run"]["r"] == 8  # the starting point
    assert list(c["r"].options) == list(R_VALUES)
    assert list(c["lora_alpha"].options) == [8, 16]  # r=8: alpha=r and alpha=16 (= 2r)
    c["r"].value = 32
    assert box.view["run"]["r"] == 32 and box.view["exact"]
    assert [v for _, v in c["lr"].options] == [1e-3, 3e-3]
    c["lr"].value = 1e-3
    c["use_rslora"].value = True
    assert list(c["lora_alpha"].options) == [16]
    assert box.view["run"]["use_rslora"] and box.view["run"]["lr"] == 1e-3
    assert box.view["scaling"] == pytest.approx(16 / math.sqrt(32))
    c["r"].value = 64  # lr=1e-3 does not exist at r=64: the lr moves to the one that does
    assert [v for _, v in c["lr"].options] == [3e-3] and c["lr"].value == 3e-3
    assert (box.view["run"]["r"], box.view["run"]["lr"], box.view["run"]["use_rslora"]) == (64, 3e-3, True)
    c["use_rslora"].value = False
    assert list(c["lora_alpha"].options) == [16, 64, 128]
    c["lora_alpha"].value = 128
    assert box.view["run"]["lora_alpha"] == 128 and box.view["scaling"] == 2.0
    c["r"].value = 2  # alpha=128 does not exist at r=2: the nearest alpha that does (16)
    assert c["lora_alpha"].value == 16 and box.view["run"]["lora_alpha"] == 16
    fig = box.explorer.figure(box.view)
    assert fig.get_suptitle() == widgets.run_title(box.view["run"])


def test_train_button_adds_a_fresh_curve_with_the_slider_values(monkeypatch):
    calls = []

    def fake_train(r, lora_alpha, use_rslora, lr, steps, **kwargs):
        calls.append((r, lora_alpha, use_rslora, lr, steps, kwargs))
        return {"label": "fresh", "group": "fresh", "loss_steps": [1, 2, 3], "losses": [3.0, 1.0, 0.5]}

    monkeypatch.setattr(widgets, "train_short_run", fake_train)
    box = widgets.explorer(fake_results())
    box.controls["r"].value = 4
    box.train_button.click()
    # the sweep's own steps, batch size and task are used, so the new curve is comparable
    assert calls == [(4, 16, False, box.controls["lr"].value, 3, {"task": "sql", "batch_size": 4})]
    assert box.view["curves"][-1]["label"] == "fresh" and len(box.view["curves"]) == 2
    assert not box.train_button.disabled


def test_static_figure_has_two_panels_per_setting():
    fig = widgets.static_explorer_figure(
        fake_results(), [{"r": 4, "lora_alpha": 16}, {"r": 64, "lora_alpha": 16}]
    )
    assert len(fig.axes) == 4
    with pytest.raises(ValueError, match="settings is empty"):
        widgets.static_explorer_figure(fake_results(), [])


# ---------------------------------------------------------------------------- train_point on a tiny model


class _Tok:
    pad_token_id = 0


def _encoded(n=16, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(1, 128, (seq,), generator=g).tolist()
        rows.append((ids, [-100] * (seq // 2) + ids[seq // 2 :]))  # loss on the second half only
    return rows


def _point(model, **kw):
    args = dict(steps=3, batch_size=4, base=(model, _Tok()), encoded=_encoded(), progress=False,
                target_modules=["q_proj", "v_proj"], measure_at=(1,))  # fmt: skip
    return widgets.train_point(**(args | kw))


def test_train_point_is_deterministic_and_leaves_the_base_alone(tiny_llama):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    a = _point(tiny_llama, r=4, lora_alpha=8)
    b = _point(tiny_llama, r=4, lora_alpha=8)
    assert a["losses"] == b["losses"] and a["update_norm"] == b["update_norm"]
    assert all(torch.equal(v, tiny_llama.state_dict()[k]) for k, v in before.items())
    assert a["trainable_params"] == 2 * 2 * 4 * (32 + 32) - 2 * 4 * (32 - 16)  # q: 32->32, v: 32->16 (GQA)
    assert a["update_norm"] > 0 and a["measured"]["1"]["update_norm"] > 0


def test_same_scaling_trains_identically_so_the_sweep_trains_it_once(tiny_llama):
    plain = _point(tiny_llama, r=4, lora_alpha=8)  # 8 / 4 = 2
    rs = _point(tiny_llama, r=4, lora_alpha=4, use_rslora=True)  # 4 / sqrt(4) = 2
    assert plain["losses"] == rs["losses"]


def test_first_step_sizes_under_sgd_and_adam(tiny_llama):
    # Step 1 starts from B = 0, so only B moves and dW = scaling * dB @ A0.
    # SGD: dB = -lr * scaling * grad_W @ A0^T, so dW is proportional to lr * scaling^2:
    #      alpha x2 makes the first step 4x, lr x2 makes it 2x.
    # Adam: the first step is lr * sign(grad) (up to eps), independent of scaling: dW ~ lr * scaling,
    #      so alpha x2 and lr x2 both make it 2x.
    def first(**kw):
        return _point(tiny_llama, r=4, steps=1, **kw)["measured"]["1"]["update_norm"]

    sgd = first(lora_alpha=8, optimizer="sgd", lr=0.1)
    assert first(lora_alpha=16, optimizer="sgd", lr=0.1) / sgd == pytest.approx(4.0, rel=1e-4)
    assert first(lora_alpha=8, optimizer="sgd", lr=0.2) / sgd == pytest.approx(2.0, rel=1e-4)
    adam = first(lora_alpha=8, lr=1e-3)
    assert first(lora_alpha=16, lr=1e-3) / adam == pytest.approx(2.0, rel=1e-3)
    assert first(lora_alpha=8, lr=2e-3) / adam == pytest.approx(2.0, rel=1e-3)


def test_update_stats_of_a_fresh_adapter_is_zero(tiny_llama):
    from lora_lab.inject import LoRAConfig, add_lora

    add_lora(tiny_llama, LoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    stats = widgets.update_stats(tiny_llama)
    assert stats["update_norm"] == 0 and stats["b_norm"] == 0 and stats["a_norm"] > 0


def test_train_point_rejects_bad_settings(tiny_llama):
    with pytest.raises(ValueError, match="steps must be positive"):
        _point(tiny_llama, r=4, lora_alpha=8, steps=0)
    with pytest.raises(ValueError, match="optimizer"):
        _point(tiny_llama, r=4, lora_alpha=8, optimizer="lion")


# ---------------------------------------------------------------------------- the sweep script, quick mode


def test_sweep_grid_trains_each_distinct_setting_once():
    sweep = load_benchmark("sweep_r_alpha")
    specs = sweep.grid_specs((1, 8, 16), 1e-3, [3e-3], [8])
    keys = [(s["r"], s["lora_alpha"], s["use_rslora"], s["lr"]) for s in specs]
    assert len(keys) == len(set(keys))
    assert (16, 16, False, 1e-3) in keys and (8, 16, True, 3e-3) in keys
    assert (
        sweep.steps_to_target([3, 2, 1, 1, 1, 1, 0.5], target=1.2) == 6
    )  # 5-step mean (1.2) first at step 6
    assert sweep.steps_to_target([3, 2], target=0.1) is None


def test_quick_sweep_writes_results_the_explorer_reads(tmp_path, tiny_model_dir):
    sweep = load_benchmark("sweep_r_alpha")
    out = tmp_path / "sweep.json"
    threads = torch.get_num_threads()
    try:  # one thread: a tiny model gains nothing from two, and a busy machine loses a lot
        results = sweep.main(["--quick", "--model", str(tiny_model_dir), "--out", str(out), "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert out.exists() and results["meta"]["quick"] and results["meta"]["torch"] == torch.__version__
    assert "--quick" in results["meta"]["command"]
    runs = results["runs"]
    assert {(x["r"], x["lora_alpha"], x["use_rslora"]) for x in runs} == {
        (2, 2, False), (2, 4, False), (2, 16, False), (2, 16, True),
        (8, 8, False), (8, 16, False), (8, 16, True),
    }  # fmt: skip
    for run in runs:
        assert len(run["losses"]) == 6 and all(math.isfinite(v) for v in run["losses"])
        assert run["update_norm"] > 0 and "3" in run["measured"]
    rows = {row["r"]: row for row in results["experiments"]["rank_scaling"]["rows"]}
    assert rows[8]["alpha/r"]["scaling"] == 2.0 and rows[8]["rsLoRA"]["scaling"] == pytest.approx(
        16 / math.sqrt(8)
    )
    ex = widgets.SweepExplorer.from_file(out)
    assert ex.select(r=8, lora_alpha=16, use_rslora=True, lr=3e-3)["exact"]  # the default main lr
    # --rescore: steps to a new target loss, from the logged curves, without training again
    high = max(v for run in runs for v in run["losses"]) + 1
    rescored = sweep.main(["--rescore", str(out), "--target-loss", str(high)])
    assert all(run["steps_to_target"] == 3 for run in rescored["runs"])  # window 3: first possible at step 3
    assert rescored["meta"]["target_loss"] == high and "--rescore" in rescored["meta"]["steps_to_target_note"]


# ---------------------------------------------------------------------------- the plotly explorer


def _step_title(step):
    return step["args"][1]["title.text"]


def test_sweep_figure_steps_are_exactly_the_cached_runs():
    results = sparse_results()
    ex = widgets.SweepExplorer(results)
    fig = widgets.sweep_figure(results)
    series = ex.series()
    menu = fig.layout.updatemenus[0]
    assert [b.label for b in menu.buttons] == [s["name"] for s in series]
    assert len(fig.layout.sliders) == len(series)
    assert [sl.visible for sl in fig.layout.sliders].count(True) == 1
    by_title = {widgets.run_title(x): x for x in ex.grid}
    for slider, s in zip(fig.layout.sliders, series):
        assert [st.label for st in slider.steps] == [str(x["r"]) for x in s["runs"]]
        for step, run in zip(slider.steps, s["runs"]):
            data = step.args[0]
            assert _step_title(step) == widgets.run_title(run) and _step_title(step) in by_title
            assert list(data["y"][0]) == run["losses"] and list(data["x"][0]) == run["loss_steps"]
            assert list(data["x"][1]) == [run["r"]] and list(data["y"][1]) == [run["final_loss"]]
    # it starts at r=8, alpha=16, lr=3e-3 in the fixed-alpha series, and says so
    assert fig.layout.title.text == "r=8, alpha=16, lr=0.003, scaling alpha/r = 2"
    assert menu.buttons[menu.active].label == "alpha=16, lr=0.003"
    assert list(fig.data[0].y) == ex.run(8, 16)["losses"]
    # choosing a series shows its default run, the lines at its lr only, and its slider only
    chosen = menu.buttons[4]  # alpha=16 at lr=1e-3: r=4 and r=32
    restyle, relayout = chosen.args
    assert relayout["title.text"] == "r=4, alpha=16, lr=0.001, scaling alpha/r = 4"
    assert restyle["visible"] == [True, True] + [s["lr"] == 1e-3 for s in series]
    assert [relayout[f"sliders[{i}].visible"] for i in range(len(series))] == [
        i == 4 for i in range(len(series))
    ]


def test_sweep_figure_html_needs_no_network_and_bundle_forms():
    results = sparse_results()
    page = widgets.SweepFigure(results)
    html = page.html()
    assert html == widgets.SweepFigure(results).html()  # deterministic: nbval compares it
    assert 'class="lora-lab-plotly"' in html and "Plotly.newPlot" in html
    assert "http" not in html and "cdn" not in html.lower()  # plotly.js comes from the page, not here
    assert "</script>" not in html.split("<script", 1)[1][: -len("</script>")]
    bundle = page._repr_mimebundle_()
    assert set(bundle) == {"text/plain", "text/html", "application/vnd.plotly.v1+json"}
    assert bundle["application/vnd.plotly.v1+json"]["layout"]["title"]["text"].startswith("r=8, alpha=16")
    live = widgets.explore(results)
    both = live._repr_mimebundle_()
    assert set(both) == {"text/plain", "text/html", "application/vnd.jupyter.widget-view+json"}
    assert both["text/html"] == html and live.widget.view["run"]["r"] == 8
