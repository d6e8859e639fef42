"""The r / alpha / rsLoRA / learning-rate explorer of chapter 04: logic first, widgets on top.

The cached sweep (`data/results/sweep_r_alpha.json`, written by `benchmarks/sweep_r_alpha.py`) holds
one run per setting. Moving a slider must redraw at once, so nothing trains: the explorer picks the
cached run nearest to the slider values and plots it. A button trains one fresh short run with the
exact values and adds its curve (a minute on a laptop CPU, seconds on a GPU).

The logic is plain Python and tested headless:

    ex = SweepExplorer.from_file()                  # or SweepExplorer(results_dict)
    view = ex.select(r=16, lora_alpha=16, use_rslora=True, lr=3e-3)
    view["run"]          # the nearest cached run (dict with losses, final_loss, accuracy, ...)
    view["curves"]       # the runs to draw as loss curves: the selection plus fresh runs
    view["family"]       # the runs drawn in the sweep panel (every scaling rule and r, at the same lr)
    ex.figure(view)      # the matplotlib figure for that view (what the widget shows)

`explorer(results)` wraps it in ipywidgets (sliders, a checkbox, a button, an output area) whose
sliders offer only settings the sweep holds: `ex.options(...)` restricts each control to the values
that exist given the ones before it (r, then rsLoRA, then alpha, then lr), and every title names
the run drawn (`run_title`). `sweep_figure(results)` is the same sweep as a plotly figure that runs
in the browser with no kernel (the rendered book): a menu picks a series of runs (one alpha rule at
one learning rate) and a slider steps through the ranks that series has. `SweepFigure(results)`
displays it: HTML for the book (plotly.js served by the book, see `_ext/book_assets.py`), plotly's
own mime type for JupyterLab. `static_explorer_figure(results, settings)` draws the matplotlib panels
for a list of settings.

`train_point` is the one training loop behind every cached curve and every fresh one (the sweep
script calls it too), so a curve trained from the button is comparable with the cache. It also
measures the size of the learned update dW = scaling * B @ A (`update_stats`): chapter 04's
"alpha/r weakens each direction as r grows" and "alpha x2 is not lr x2" are numbers, not words.

Left out: anything the sweep did not cache (the explorer never interpolates between runs;
`select` says which cached run it shows when that is not the exact request).
References: ipywidgets `SelectionSlider`, `Checkbox`, `Button`, `Output`; plotly `layout.sliders`,
`layout.updatemenus` (method "update").
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from lora_lab.layers import lora_scaling
from lora_lab.paths import RESULTS_DIR

__all__ = [
    "SWEEP_FILE",
    "SweepExplorer",
    "alpha_rules",
    "update_stats",
    "flat_update",
    "train_point",
    "train_short_run",
    "run_title",
    "explorer",
    "explore",
    "Explorer",
    "sweep_figure",
    "SweepFigure",
    "static_explorer_figure",
]

SWEEP_FILE = RESULTS_DIR / "sweep_r_alpha.json"


def alpha_rules(r: int, lora_alpha: float, use_rslora: bool, fixed_alphas: tuple = (16,)) -> list[str]:
    """The scaling families a setting belongs to, as the sweep groups its runs.

    "alpha=r" (scaling 1), "alpha=2r" (scaling 2), "alpha=16" (fixed alpha, scaling 16/r) and
    "rsLoRA alpha=16" (scaling 16/sqrt(r)). One run can sit in two families: r=8, alpha=16 is
    both "alpha=2r" and "alpha=16".
    """
    if use_rslora:
        return [f"rsLoRA alpha={lora_alpha:g}"]
    rules = []
    if lora_alpha == r:
        rules.append("alpha=r")
    if lora_alpha == 2 * r:
        rules.append("alpha=2r")
    if lora_alpha in fixed_alphas or not rules:
        rules.append(f"alpha={lora_alpha:g}")
    return rules


def run_title(run: dict) -> str:
    """The name of one run as every explorer title shows it: its own settings, never a request.

    >>> run_title({"r": 64, "lora_alpha": 16, "use_rslora": True, "lr": 0.003})
    'r=64, alpha=16, lr=0.003, rsLoRA: scaling alpha/sqrt(r) = 2'
    """
    rs = bool(run.get("use_rslora", False))
    scaling = lora_scaling(run["r"], run["lora_alpha"], rs)
    rule = "rsLoRA: scaling alpha/sqrt(r)" if rs else "scaling alpha/r"
    return f"r={run['r']}, alpha={run['lora_alpha']:g}, lr={run['lr']:g}, {rule} = {scaling:.3g}"


def _rule_key(rule: str) -> tuple:
    """Order of the scaling families: alpha=r, alpha=2r, fixed alphas (ascending), then rsLoRA."""
    rs = rule.startswith("rsLoRA")
    value = rule.rsplit("=", 1)[1]
    fixed = value not in ("r", "2r")
    return (rs, fixed, float(value) if fixed else ("r", "2r").index(value), rule)


def _log(v: float) -> float:
    return math.log2(v)


class SweepExplorer:
    """Nearest-cached-run lookup over the sweep results, plus fresh runs added by the user.

    `results` is the sweep JSON (a dict with a "runs" list); only runs of group "grid" (the r x alpha
    x lr grid, AdamW) are offered to the sliders.
    """

    def __init__(self, results: dict):
        if not isinstance(results, dict) or not isinstance(results.get("runs"), list):
            raise ValueError("results must be the sweep JSON: a dict with a 'runs' list (see SWEEP_FILE)")
        self.results = results
        self.grid = [run for run in results["runs"] if run.get("group", "grid") == "grid"]
        if not self.grid:
            raise ValueError("the sweep results hold no grid runs; re-run benchmarks/sweep_r_alpha.py")
        self.fresh: list[dict] = []  # runs trained from the widget, newest last

    @classmethod
    def from_file(cls, path: str | Path = SWEEP_FILE) -> SweepExplorer:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist; run `python benchmarks/sweep_r_alpha.py` to write it"
            )
        return cls(json.loads(path.read_text()))

    # -- the values the sliders offer
    def choices(self) -> dict[str, list]:
        """Sorted values present in the grid for each slider: r, lora_alpha, lr (and use_rslora)."""
        return {
            "r": sorted({run["r"] for run in self.grid}),
            "lora_alpha": sorted({run["lora_alpha"] for run in self.grid}),
            "lr": sorted({run["lr"] for run in self.grid}),
            "use_rslora": sorted({bool(run.get("use_rslora", False)) for run in self.grid}),
        }

    def options(
        self, r: int | None = None, use_rslora: bool | None = None, lora_alpha: float | None = None
    ) -> dict:
        """The values each control may offer, given the ones chosen before it (r, rsLoRA, alpha, lr).

        `options()` gives every r; `options(r=32)` the rsLoRA flags the sweep ran at r=32;
        `options(32, True)` the alphas of those runs; `options(32, True, 16)` their learning rates.
        A control after one left as None is not restricted (empty lists mean no such run).
        """
        runs = self.grid
        out = {"r": sorted({x["r"] for x in runs})}
        if r is not None:
            runs = [x for x in runs if x["r"] == r]
        out["use_rslora"] = sorted({bool(x.get("use_rslora", False)) for x in runs})
        if use_rslora is not None:
            runs = [x for x in runs if bool(x.get("use_rslora", False)) == bool(use_rslora)]
        out["lora_alpha"] = sorted({x["lora_alpha"] for x in runs})
        if lora_alpha is not None:
            runs = [x for x in runs if x["lora_alpha"] == lora_alpha]
        out["lr"] = sorted({x["lr"] for x in runs})
        return out

    def run(self, r: int, lora_alpha: float, use_rslora: bool = False, lr: float = 3e-3) -> dict:
        """The grid run with exactly these settings; a clear error naming what exists otherwise."""
        hits = [
            x for x in self.grid
            if (x["r"], x["lora_alpha"], bool(x.get("use_rslora", False)), x["lr"])
            == (r, lora_alpha, bool(use_rslora), lr)
        ]  # fmt: skip
        if not hits:
            opts = self.options(r, use_rslora, lora_alpha)
            raise ValueError(
                f"the sweep has no run r={r}, alpha={lora_alpha:g}, rsLoRA={bool(use_rslora)}, lr={lr:g}; "
                f"it has r in {opts['r']}, then alpha in {opts['lora_alpha']}, lr in {opts['lr']} "
                "(see SweepExplorer.options), or train it with train_short_run"
            )
        return hits[0]

    def series(self) -> list[dict]:
        """The grid cut into series a slider can step through: one alpha rule at one lr, ranks ascending.

        Each is {"name", "rule", "lr", "runs"}; a run sits in every series of its `alpha_rules`
        (r=8, alpha=16 is in "alpha=2r" and in "alpha=16"). Series come lr by lr (the sweep's main
        lr, the one with most runs, first), then rule by rule (alpha=r, alpha=2r, fixed alphas, rsLoRA).
        """
        groups: dict[tuple, list[dict]] = {}
        for run in self.grid:
            rules = run.get("alpha_rules") or alpha_rules(
                run["r"], run["lora_alpha"], run.get("use_rslora", False)
            )
            for rule in rules:
                groups.setdefault((run["lr"], rule), []).append(run)
        lr_count = {}
        for lr, _ in groups:
            lr_count[lr] = lr_count.get(lr, 0) + 1
        keys = sorted(groups, key=lambda k: (-lr_count[k[0]], k[0], _rule_key(k[1])))
        return [
            {"name": f"{rule}, lr={lr:g}", "rule": rule, "lr": lr, "runs": sorted(groups[(lr, rule)], key=lambda x: x["r"])}
            for lr, rule in keys
        ]  # fmt: skip

    def nearest(self, r: int, lora_alpha: float, use_rslora: bool, lr: float) -> dict:
        """The cached run closest to the request: same rsLoRA flag if the grid has it, then the least
        distance in log2(r), log2(alpha) and log2(lr) (each axis counted equally)."""
        if r <= 0 or lora_alpha <= 0 or lr <= 0:
            raise ValueError(
                f"r, lora_alpha and lr must be positive, got r={r}, lora_alpha={lora_alpha}, lr={lr}"
            )
        pool = [
            run for run in self.grid if bool(run.get("use_rslora", False)) == bool(use_rslora)
        ] or self.grid

        def distance(run: dict) -> tuple:
            d = (
                (_log(run["r"]) - _log(r)) ** 2
                + (_log(run["lora_alpha"]) - _log(lora_alpha)) ** 2
                + (_log(run["lr"]) - _log(lr)) ** 2
            )
            return (d, run["r"], run["lora_alpha"], run["lr"])  # ties: the smaller setting, deterministically

        return min(pool, key=distance)

    def family(self, run: dict) -> list[dict]:
        """The grid runs drawn in the sweep panel with `run`: every run at its lr, all scaling rules."""
        return sorted((g for g in self.grid if g["lr"] == run["lr"]), key=lambda g: g["r"])

    def select(self, r: int, lora_alpha: float, use_rslora: bool = False, lr: float = 3e-3) -> dict:
        """Everything the plots show for these slider values (a plain dict, so tests can inspect it)."""
        run = self.nearest(r, lora_alpha, use_rslora, lr)
        requested = {"r": r, "lora_alpha": lora_alpha, "use_rslora": bool(use_rslora), "lr": lr}
        exact = all(
            (run[k] == v if k != "use_rslora" else bool(run.get(k, False)) == v) for k, v in requested.items()
        )
        scaling = lora_scaling(r, lora_alpha, use_rslora)
        note = "" if exact else (
            f"nearest cached run: r={run['r']}, alpha={run['lora_alpha']:g}, "
            f"{'rsLoRA, ' if run.get('use_rslora') else ''}lr={run['lr']:g}"
        )  # fmt: skip
        return {
            "requested": requested,
            "scaling": scaling,
            "run": run,
            "exact": exact,
            "note": note,
            "curves": [run, *self.fresh],
            "family": self.family(run),
        }

    def add_run(self, run: dict) -> None:
        """Add a freshly trained run (a dict with losses / loss_steps) to every later view."""
        if "losses" not in run:
            raise ValueError("a fresh run needs 'losses' (and 'loss_steps'); use train_short_run to make one")
        self.fresh.append(run)

    def figure(self, view: dict, y: str = "final_loss"):
        """Two panels: loss curves (selection + fresh runs) and `y` vs r for the selection's family."""
        from lora_lab.plot import new_figure, plot_loss_curves, plot_sweep

        fig, (ax_curves, ax_sweep) = new_figure(ncols=2, width=5.2, height=3.6)
        plot_loss_curves(view["curves"], ax=ax_curves, title="loss curves", highlight=0)
        plot_sweep(
            view["family"], x="r", y=y, group="alpha_rules", ax=ax_sweep, highlight=view["run"],
            title=f"{y.replace('_', ' ')} vs r at lr={view['run']['lr']:g}",
        )  # fmt: skip
        fresh = len(view["curves"]) - 1
        note = f"   (+ {fresh} fresh run{'s' if fresh > 1 else ''})" if fresh else ""
        fig.suptitle(run_title(view["run"]) + note, fontsize=9)  # the run drawn, never the request
        return fig


def update_stats(model) -> dict:
    """Size of the learned update, summed over every LoRA layer of `model`.

    - `update_norm`: sqrt(sum over layers of ||scaling * B @ A||_F^2), the Frobenius norm of dW;
    - `direction_norm`: the mean over layers and rank directions j of scaling * ||B[:, j]|| * ||A[j, :]||,
      the size of one rank-1 piece of the update (what alpha/r shrinks as r grows);
    - `a_norm`, `b_norm`: root-sum-square of every A and every B (A starts random, B at zero).
    """
    import torch

    from lora_lab.inject import lora_layers
    from lora_lab.layers import lora_delta

    sq_update = sq_a = sq_b = 0.0
    directions = []
    with torch.no_grad():
        for _, layer in lora_layers(model):
            a = layer.lora_A.weight.float()  # [r, in]
            b = layer.lora_B.weight.float()  # [out, r]
            sq_update += float(lora_delta(a, b, layer.scaling).pow(2).sum())  # dW: [out, in]
            directions.append(layer.scaling * b.norm(dim=0) * a.norm(dim=1))  # [r]
            sq_a += float(a.pow(2).sum())
            sq_b += float(b.pow(2).sum())
    return {
        "update_norm": math.sqrt(sq_update),
        "direction_norm": float(torch.cat(directions).mean()) if directions else 0.0,
        "a_norm": math.sqrt(sq_a),
        "b_norm": math.sqrt(sq_b),
    }


def flat_update(model):
    """Every layer's dW = scaling * B @ A, flattened into one vector (to compare two runs' directions)."""
    import torch

    from lora_lab.inject import lora_layers
    from lora_lab.layers import lora_delta

    with torch.no_grad():
        return torch.cat([lora_delta(layer.lora_A.weight, layer.lora_B.weight, layer.scaling).flatten()
                          for _, layer in lora_layers(model)])  # fmt: skip


def _a_drift(model, a_init) -> float:
    """||A - A0|| / ||A0|| over every layer: how far training moved A from its random start."""
    from lora_lab.inject import lora_layers

    num = den = 0.0
    for (_, layer), a0 in zip(lora_layers(model), a_init):
        num += float((layer.lora_A.weight.detach() - a0).pow(2).sum())
        den += float(a0.pow(2).sum())
    return math.sqrt(num / den) if den else 0.0


def train_point(
    r: int,
    lora_alpha: float,
    use_rslora: bool = False,
    lr: float = 3e-3,
    steps: int = 60,
    optimizer: str = "adamw",
    task: str = "sql",
    batch_size: int = 16,
    seq_len: int = 96,
    seed: int = 0,
    target_modules: list[str] | str | None = None,
    base=None,
    encoded=None,
    measure_at: tuple[int, ...] = (),
    log_every: int = 2,
    progress: bool = True,
    keep_model: bool = False,
    keep_snapshots: bool = False,
) -> dict:
    """Train one LoRA adapter for `steps` steps and return a run dict (what the sweep caches).

    The loop is the plainest one there is, so the measurements mean what they say: one seeded
    sampler (the same batches for every setting), loss = mean cross-entropy over assistant tokens,
    AdamW (no weight decay) or plain SGD, no clipping, no schedule. `update_stats` is recorded at the
    steps in `measure_at` and at the end, with `a_drift` = ||A - A0|| / ||A0||; `keep_snapshots` also
    keeps the flat dW (`flat_update`) at those steps, `keep_model` the trained model. `base=(model, tokenizer)` reuses a loaded base model
    (deep-copied, never changed); `encoded` reuses tokenized examples (`lora_lab.train.encode_example`).
    """
    import copy

    from lora_lab.data import load_task
    from lora_lab.inject import LoRAConfig, add_lora, lora_layers
    from lora_lab.models import load_base
    from lora_lab.runtime import seed_everything
    from lora_lab.train import answer_loss, encode_example, train

    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    targets = target_modules or ["q_proj", "k_proj", "v_proj", "o_proj"]
    config = LoRAConfig(r=r, lora_alpha=lora_alpha, use_rslora=use_rslora, target_modules=targets)
    base = base if base is not None else load_base()
    model, tokenizer = copy.deepcopy(base[0]), base[1]
    if encoded is None:
        encoded = [encode_example(tokenizer, ex, seq_len) for ex in load_task(task, "train")]
    seed_everything(seed)  # same A init for the same r, whatever alpha / lr / optimizer
    add_lora(model, config)
    a_init = [layer.lora_A.weight.detach().clone() for _, layer in lora_layers(model)]  # [r, in] each
    measured, snapshots = {}, {}

    def measure(step: int, loss: float) -> bool:
        if not math.isfinite(loss):
            return True  # diverged: keep what we have, the run says so
        if step in measure_at:
            measured[step] = update_stats(model)
            if keep_snapshots:
                snapshots[step] = flat_update(model)
        return False

    res = train(
        model, tokenizer, None, encoded=encoded, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
        optimizer=optimizer, max_grad_norm=None, loss_fn=answer_loss, callback=measure, progress=progress,
        log_every=1, desc=f"r={r} a={lora_alpha:g}{' rs' if use_rslora else ''} lr={lr:g}",
    )  # fmt: skip
    run = _run_record(r, lora_alpha, use_rslora, lr, optimizer, steps, res, log_every, model)
    run["measured"] = {str(k): {n: round(v, 6) for n, v in st.items()} for k, st in measured.items()}
    run.update(
        {k: round(v, 6) for k, v in update_stats(model).items()}, a_drift=round(_a_drift(model, a_init), 6)
    )
    if keep_snapshots:
        snapshots[len(res["losses"])] = flat_update(model)
        run["snapshots"] = snapshots  # step -> flat dW (tensors; dropped before writing JSON)
    if keep_model:
        run["model"] = model
    return run


def _run_record(r, lora_alpha, use_rslora, lr, optimizer, steps, res: dict, log_every: int, model) -> dict:
    """The sweep's record of one run: its settings, every `log_every`-th loss and the final loss."""
    from lora_lab.inject import count_parameters
    from lora_lab.train import final_loss

    losses = res["losses"]
    keep = [s for s in range(1, len(losses) + 1) if s % log_every == 0 or s == 1 or s == len(losses)]
    tail_loss = final_loss(losses)
    return {
        "label": f"r={r} a={lora_alpha:g}{' rsLoRA' if use_rslora else ''} lr={lr:g}"
        + (" SGD" if optimizer == "sgd" else ""),
        "r": r,
        "lora_alpha": lora_alpha,
        "use_rslora": use_rslora,
        "lr": lr,
        "optimizer": optimizer,
        "scaling": lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r,
        "alpha_rules": alpha_rules(r, lora_alpha, use_rslora),
        "steps": steps,
        "loss_steps": keep,
        "losses": [round(losses[s - 1], 5) for s in keep],
        "final_loss": round(tail_loss, 5) if math.isfinite(tail_loss) else None,
        "diverged": not all(math.isfinite(v) for v in losses),
        "trainable_params": count_parameters(model)[0],
        "seconds": round(res["seconds"], 2),
    }


def train_short_run(r: int, lora_alpha: float, use_rslora: bool = False, lr: float = 3e-3, steps: int = 60,
                    **kwargs) -> dict:  # fmt: skip
    """A fresh run for the explorer's button: `train_point` with a progress bar, labelled "fresh"."""
    run = train_point(r, lora_alpha, use_rslora, lr, steps=steps, progress=True, **kwargs)
    run["group"] = "fresh"
    run["label"] = "fresh " + run["label"]
    return run


def _closest(options: list, value) -> object:
    """The option nearest `value` on a log scale (ties: the smaller), or `value` itself if offered."""
    if value in options:
        return value
    return min(options, key=lambda v: (abs(_log(v) - _log(value)), v))


def explorer(results: dict | None = None, steps: int | None = None, **train_kwargs):
    """The live widget: sliders for r, alpha and learning rate, an alpha/r | rsLoRA toggle, a train button.

    Every control offers only settings the sweep ran: the r slider every cached rank; the toggle,
    then the alpha slider, then the lr slider only the values that exist with the controls before
    them (`SweepExplorer.options`). When a choice leaves the current value without a run, the
    control moves to the nearest value that has one. So the plot always shows exactly the run its
    title names. Moving a control redraws from the cache at once; the button retrains the shown
    setting from scratch (see `train_short_run`; steps, batch size, task and target modules default
    to the sweep's own, so the curves are comparable) and adds that fresh curve beside the cached one.
    Returns the ipywidgets container: `.controls` holds the controls, `.view` what the figure shows,
    `.explorer` the `SweepExplorer` behind it.
    """
    import ipywidgets as w
    import matplotlib.pyplot as plt
    from IPython.display import display

    ex = SweepExplorer(results) if results is not None else SweepExplorer.from_file()
    meta = ex.results.get("meta", {})
    steps = steps or meta.get("steps", 60)
    for key in ("task", "batch_size", "seq_len", "seed", "target_modules"):
        if key in meta:
            train_kwargs.setdefault(key, meta[key])
    r_slider, rs_toggle, alpha_slider, lr_slider = _explorer_controls(ex, meta.get("lr", 3e-3))
    button = w.Button(description=f"retrain ({steps} steps)", icon="play")
    out = w.Output()
    log = w.Output()
    busy = []  # non-empty while the controls are being restricted: one redraw at the end

    def restrict(*_):
        busy.append(True)  # no redraw while the options change
        try:
            _restrict_controls(ex, r_slider, rs_toggle, alpha_slider, lr_slider)
        finally:
            busy.pop()
        return redraw()

    def redraw(*_):
        if busy:
            return None
        run = ex.run(r_slider.value, alpha_slider.value, rs_toggle.value, lr_slider.value)
        view = ex.select(run["r"], run["lora_alpha"], bool(run.get("use_rslora", False)), run["lr"])
        box.view = view  # what the figure shows, for tests and for the curious reader
        with out:
            out.clear_output(wait=True)
            fig = ex.figure(view)
            display(fig)
            plt.close(fig)
        return view

    def on_train(_):
        button.disabled = True
        try:
            with log:
                run = train_short_run(
                    r_slider.value,
                    alpha_slider.value,
                    rs_toggle.value,
                    lr_slider.value,
                    steps=steps,
                    **train_kwargs,
                )
                ex.add_run(run)
            redraw()
        finally:
            button.disabled = False

    for control in (r_slider, rs_toggle, alpha_slider):
        control.observe(restrict, names="value")
    lr_slider.observe(redraw, names="value")
    button.on_click(on_train)
    box = w.VBox([w.HBox([r_slider, rs_toggle]), w.HBox([alpha_slider, lr_slider, button]), out, log])
    box.view = None
    box.explorer = ex
    box.controls = {"r": r_slider, "lora_alpha": alpha_slider, "lr": lr_slider, "use_rslora": rs_toggle}
    box.redraw = redraw
    box.train_button = button
    restrict()
    return box


def _explorer_controls(ex: SweepExplorer, lr: float) -> tuple:
    """The r slider, alpha/r | rsLoRA toggle, alpha and lr sliders, set to a run near r=8, alpha=16."""
    import ipywidgets as w

    start = ex.nearest(8, 16, False, lr)
    opts = ex.options(start["r"], start.get("use_rslora", False), start["lora_alpha"])
    r_slider = w.SelectionSlider(options=opts["r"], value=start["r"], description="r")
    rs_toggle = w.ToggleButtons(
        options=[("alpha/r", False), ("rsLoRA", True)], value=bool(start.get("use_rslora", False)),
        description="scaling",
    )  # fmt: skip
    alpha_slider = w.SelectionSlider(
        options=opts["lora_alpha"], value=start["lora_alpha"], description="alpha"
    )
    lr_slider = w.SelectionSlider(
        options=[(f"{v:g}", v) for v in opts["lr"]], value=start["lr"], description="lr"
    )
    return r_slider, rs_toggle, alpha_slider, lr_slider


def _restrict_controls(ex: SweepExplorer, r_slider, rs_toggle, alpha_slider, lr_slider) -> None:
    """Offer in each control only the values that exist with the ones before it (r, rsLoRA, alpha,
    lr); a value left without a run moves to the nearest one that has one."""
    flags = ex.options(r_slider.value)["use_rslora"]
    labels = {False: "alpha/r", True: "rsLoRA"}
    rs_value = rs_toggle.value if rs_toggle.value in flags else flags[0]
    rs_toggle.options = [(labels[f], f) for f in flags]
    rs_toggle.value = rs_value
    alphas = ex.options(r_slider.value, rs_toggle.value)["lora_alpha"]
    alpha_value = _closest(alphas, alpha_slider.value)
    alpha_slider.options = alphas
    alpha_slider.value = alpha_value
    lrs = ex.options(r_slider.value, rs_toggle.value, alpha_slider.value)["lr"]
    lr_value = _closest(lrs, lr_slider.value)
    lr_slider.options = [(f"{v:g}", v) for v in lrs]
    lr_slider.value = lr_value


def _default_index(runs: list[dict], r: int = 8) -> int:
    """Where a series' slider starts: the run whose rank is nearest `r` (the chapter's r=8)."""
    return min(range(len(runs)), key=lambda i: (abs(_log(runs[i]["r"]) - _log(r)), runs[i]["r"]))


def _panel_title(run: dict) -> str:
    return f"final loss vs r, series at lr={run['lr']:g}"


def _curve(run: dict) -> tuple[list, list]:
    """x and y of traces 0 and 1: the run's loss curve and its point in the sweep panel."""
    return [run["loss_steps"], [run["r"]]], [run["losses"], [run["final_loss"]]]


def _series_update(series: list[dict], k: int) -> dict:
    """Restyle for choosing series k: its default run's data, the lines of its lr, line k in bold."""
    run = series[k]["runs"][_default_index(series[k]["runs"])]
    (x0, x1), (y0, y1) = _curve(run)
    return {
        "x": [x0, x1, *[[x["r"] for x in s["runs"]] for s in series]],
        "y": [y0, y1, *[[x["final_loss"] for x in s["runs"]] for s in series]],
        "visible": [True, True, *[s["lr"] == series[k]["lr"] for s in series]],
        "line.width": [2, 0, *[3.5 if i == k else 1.5 for i in range(len(series))]],
    }


def _sweep_controls(series: list[dict], first: dict, current: int) -> tuple[list, list]:
    """One slider per series (steps: its runs, by rank) and one menu button per series."""
    sliders, buttons = [], []
    for k, s in enumerate(series):
        steps = []
        for run in s["runs"]:
            (x0, x1), (y0, y1) = _curve(run)
            steps.append({
                "label": str(run["r"]), "method": "update",
                "args": [{"x": [x0, x1], "y": [y0, y1]}, {"title.text": run_title(run)}, [0, 1]],
            })  # fmt: skip
        active = s["runs"].index(first) if k == current else _default_index(s["runs"])
        sliders.append({
            "active": active, "steps": steps, "visible": k == current, "x": 0.0, "len": 1.0, "y": -0.18,
            "yanchor": "top", "pad": {"t": 10}, "currentvalue": {"prefix": f"{s['name']}:  r = "},
        })  # fmt: skip
        default = s["runs"][_default_index(s["runs"])]
        layout = {f"sliders[{i}].visible": i == k for i in range(len(series))}
        layout.update({
            f"sliders[{k}].active": _default_index(s["runs"]), "title.text": run_title(default),
            "annotations[1].text": _panel_title(default),
        })  # fmt: skip
        buttons.append({"label": s["name"], "method": "update", "args": [_series_update(series, k), layout]})
    return sliders, buttons


def _sweep_axes(fig, grid_runs: list[dict], ranks: list[int]) -> None:
    """Fixed axis ranges over every run, so moving a control moves the data, not the axes."""
    losses = [v for run in grid_runs for v in run["losses"] if v is not None and v > 0]
    finals = [run["final_loss"] for run in grid_runs if run.get("final_loss") is not None]
    grid = {"showgrid": True, "gridcolor": "#dddddd", "linecolor": "#444444", "zeroline": False}
    fig.update_xaxes(
        title_text="step", range=[0, max(x["loss_steps"][-1] for x in grid_runs) + 1], row=1, col=1, **grid
    )
    fig.update_yaxes(
        title_text="training loss (log)", type="log", row=1, col=1,
        range=[math.log10(min(losses)) - 0.05, math.log10(max(losses)) + 0.05], **grid,
        tickvals=[v for v in (0.1, 0.2, 0.5, 1, 2, 5, 10) if min(losses) / 2 <= v <= max(losses) * 2],
    )  # fmt: skip
    fig.update_xaxes(
        title_text="r (log)", type="log", tickvals=ranks, ticktext=[str(r) for r in ranks], row=1, col=2,
        range=[_log(ranks[0]) * math.log10(2) - 0.1, _log(ranks[-1]) * math.log10(2) + 0.1], **grid,
    )  # fmt: skip
    pad = 0.05 * (max(finals) - min(finals))
    fig.update_yaxes(
        title_text="final loss", range=[min(finals) - pad, max(finals) + pad], row=1, col=2, **grid
    )


def sweep_figure(results: dict, start: tuple = (8, 16, False, 3e-3)):
    """The sweep as a plotly figure that runs in the browser, with no kernel.

    Left panel: the loss curve of the selected run. Right panel: final loss against r for every
    series at the selected run's learning rate, the selected run marked. A menu picks the series
    (one alpha rule at one lr, `SweepExplorer.series`); each series has its own slider whose steps
    are exactly its runs, one per rank, so every position of every control is a run the sweep
    holds. The title is `run_title` of the run drawn. Every step is precomputed (plotly's "update"
    method swaps the data), so the figure is a static file: no Python behind it.
    `start` = (r, alpha, rsLoRA, lr) of the run shown first (the nearest cached one).
    """
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError as err:
        raise ImportError(
            "the sweep figure needs plotly: pip install plotly (pinned in LoRA Lab's 'book' extra)"
        ) from err

    from lora_lab.plot import COLORS

    ex = SweepExplorer(results)
    series = ex.series()
    first = ex.nearest(*start)
    fixed = f"alpha={first['lora_alpha']:g}"
    holding = [i for i, s in enumerate(series) if first in s["runs"]]
    current = next((i for i in holding if series[i]["rule"] == fixed), holding[0])  # the fixed-alpha series
    rules = list(dict.fromkeys(s["rule"] for s in series))

    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss curve of this run", _panel_title(first)))
    (x0, x1), (y0, y1) = _curve(first)
    fig.add_trace(
        go.Scatter(x=x0, y=y0, mode="lines", name="selected run: loss", line={"color": COLORS[0]}), 1, 1
    )
    fig.add_trace(
        go.Scatter(x=x1, y=y1, mode="markers", name="selected run: final loss",
                   marker={"size": 14, "color": "rgba(0,0,0,0)", "line": {"width": 2.5, "color": "#222222"}}),
        1, 2,
    )  # fmt: skip
    start_update = _series_update(series, current)
    for i, s in enumerate(series):
        fig.add_trace(
            go.Scatter(
                x=[x["r"] for x in s["runs"]], y=[x["final_loss"] for x in s["runs"]], mode="lines+markers",
                name=s["name"], visible=start_update["visible"][i + 2],
                line={"color": COLORS[rules.index(s["rule"]) % len(COLORS)], "width": start_update["line.width"][i + 2],
                      "dash": "solid" if s["lr"] == series[0]["lr"] else "dot"},
            ),
            1, 2,
        )  # fmt: skip
    sliders, buttons = _sweep_controls(series, first, current)
    fig.update_layout(
        title={"text": run_title(first), "x": 0.5, "y": 0.97, "font": {"size": 15}},
        template="none", paper_bgcolor="white", plot_bgcolor="white", font={"color": "#222222", "size": 12},
        height=600, margin={"t": 120, "b": 190, "l": 60, "r": 20},
        updatemenus=[{
            "buttons": buttons, "active": current, "direction": "down", "x": 0.17, "xanchor": "left",
            "y": 1.2, "yanchor": "bottom", "showactive": True,
        }],
        sliders=sliders,
        legend={"orientation": "h", "x": 0.0, "y": -0.62, "yanchor": "top", "font": {"size": 11}},
    )  # fmt: skip
    fig.add_annotation(text="series:", x=0.0, y=1.2, xref="paper", yref="paper", xanchor="left", yanchor="bottom",
                       yshift=8, showarrow=False, font={"size": 13})  # fmt: skip
    _sweep_axes(fig, ex.grid, ex.options()["r"])
    return fig


class SweepFigure:
    """Displays `sweep_figure(results)` in the rendered book and in JupyterLab, small either way.

    The output carries three forms, and each front end picks the one it can show:
    - "text/html": a div and a short script calling `Plotly.newPlot`. The book serves plotly.js
      itself (the `book_assets` Sphinx extension copies it from the plotly package and loads it on
      pages holding such a div), so the page works offline; plotly.js (4.8 MB) is never pasted into
      the notebook. Where no plotly.js is loaded (Colab, classic front ends) the div says how to
      see the figure instead of failing.
    - "application/vnd.plotly.v1+json": the figure's JSON, drawn by JupyterLab's plotly renderer
      (installed with plotly) and VS Code.
    - "text/plain": one line naming what the figure holds.
    """

    DIV_ID = "lora-lab-sweep-explorer"

    def __init__(self, results: dict, **kwargs):
        self.figure = sweep_figure(results, **kwargs)
        self.n_series = len(self.figure.layout.updatemenus[0].buttons)
        self.n_runs = len(SweepExplorer(results).grid)

    def config(self) -> dict:
        return {"displayModeBar": False, "responsive": True}

    def html(self) -> str:
        import plotly.io as pio

        body = pio.to_json({"data": self.figure.data, "layout": self.figure.layout, "config": self.config()},
                           validate=False, engine="json")  # fmt: skip
        body = body.replace("</", "<\\/")  # no "</script>" inside the script
        missing = (
            "This interactive figure needs plotly.js, which the rendered book serves. Here, run "
            "widgets.sweep_figure(sweep).show() (plotly's own renderer) or use the explorer above."
        )
        return (
            f'<div class="lora-lab-plotly" id="{self.DIV_ID}" style="width:100%;min-height:600px"></div>\n'
            '<script type="text/javascript">\n'
            "(function () {\n"
            f'  var el = document.getElementById("{self.DIV_ID}");\n'
            f"  var fig = {body};\n"
            "  if (window.Plotly) { Plotly.newPlot(el, fig.data, fig.layout, fig.config); }\n"
            f'  else {{ el.style.minHeight = "0"; el.textContent = {json.dumps(missing)}; }}\n'
            "})();\n"
            "</script>"
        )

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        import plotly.io as pio

        spec = json.loads(pio.to_json(self.figure, validate=False, engine="json"))
        spec["config"] = self.config()
        return {
            "text/plain": f"<SweepFigure: {self.n_runs} cached runs in {self.n_series} series (plotly)>",
            "text/html": self.html(),
            "application/vnd.plotly.v1+json": spec,
        }


class Explorer:
    """Both explorers as one notebook output: ipywidgets under a kernel, plotly in the rendered page.

    `explore(results)` builds it; `.widget` is the ipywidgets explorer (`explorer`), `.figure` the
    plotly one (`SweepFigure`). Its output bundle holds the widget's view and the figure's HTML:
    Jupyter and Colab draw the widget (their widget renderer outranks HTML); the book shows the
    HTML, because `tools/nb.py` strips widget views from committed notebooks (their model ids
    change every run and no kernel backs them in a page). `.figure` displays the plotly figure
    alone, e.g. in JupyterLab.
    """

    def __init__(self, widget, figure: SweepFigure):
        self.widget = widget
        self.figure = figure

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        bundle = self.figure._repr_mimebundle_()
        bundle.pop("application/vnd.plotly.v1+json")  # one figure per output: the widget in a kernel
        view = self.widget._repr_mimebundle_()
        bundle.update({k: v for k, v in view.items() if k != "text/plain"})
        return bundle


def explore(results: dict | None = None, **kwargs) -> Explorer:
    """The chapter's explorer cell: `explorer(results, **kwargs)` and `SweepFigure(results)` in one output."""
    widget = explorer(results, **kwargs)
    return Explorer(widget, SweepFigure(widget.explorer.results))


def static_explorer_figure(results: dict, settings: list[dict], y: str = "final_loss"):
    """The explorer's two panels for several settings, stacked in one figure (for the static book).

    `settings` are dicts of `select` arguments, e.g. `[{"r": 8, "lora_alpha": 16}, {"r": 64, ...}]`.
    """
    from lora_lab.plot import new_figure, plot_loss_curves, plot_sweep

    if not settings:
        raise ValueError("settings is empty; pass at least one dict like {'r': 8, 'lora_alpha': 16}")
    ex = SweepExplorer(results)
    fig, axes = new_figure(ncols=2, nrows=len(settings), width=5.2, height=3.3)
    for i, setting in enumerate(settings):
        view = ex.select(**setting)
        req = view["requested"]
        head = f"r={req['r']} alpha={req['lora_alpha']:g}{' rsLoRA' if req['use_rslora'] else ''} lr={req['lr']:g}"
        plot_loss_curves(view["curves"], ax=axes[2 * i], title=f"{head}: loss", highlight=0)
        plot_sweep(view["family"], x="r", y=y, group="alpha_rules", ax=axes[2 * i + 1], highlight=view["run"],
                   title=f"{y.replace('_', ' ')} vs r (lr={view['run']['lr']:g})")  # fmt: skip
    return fig
