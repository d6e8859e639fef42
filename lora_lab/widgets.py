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

`explorer(results)` wraps it in ipywidgets (sliders, a checkbox, a button, an output area);
`static_explorer_figure(results, settings)` draws the same panels for a list of settings, for the
static book where no kernel runs.

`train_point` is the one training loop behind every cached curve and every fresh one (the sweep
script calls it too), so a curve trained from the button is comparable with the cache. It also
measures the size of the learned update dW = scaling * B @ A (`update_stats`): chapter 04's
"alpha/r weakens each direction as r grows" and "alpha x2 is not lr x2" are numbers, not words.

Left out: anything the sweep did not cache (the explorer never interpolates between runs; it says
which cached run it shows when that is not the exact request).
References: ipywidgets `SelectionSlider`, `Checkbox`, `Button`, `Output`, `interactive_output`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from lora_lab.paths import RESULTS_DIR

__all__ = [
    "SWEEP_FILE",
    "SweepExplorer",
    "alpha_rules",
    "update_stats",
    "flat_update",
    "train_point",
    "train_short_run",
    "explorer",
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
        scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
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
        req = view["requested"]
        fig.suptitle(
            f"r={req['r']}  alpha={req['lora_alpha']:g}  {'rsLoRA' if req['use_rslora'] else 'alpha/r'}  "
            f"lr={req['lr']:g}  ->  scaling={view['scaling']:.3g}"
            + (f"   ({view['note']})" if view["note"] else ""),
            fontsize=9,
        )
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


def explorer(results: dict | None = None, steps: int | None = None, **train_kwargs):
    """The live widget: sliders for r, alpha, learning rate, a rsLoRA checkbox, and a train button.

    Moving a control redraws from the cache at once; the button trains with the exact values (see
    `train_short_run`; steps, batch size, task and target modules default to the sweep's own, so the
    new curve is comparable) and adds the curve. Returns the ipywidgets container: `.controls` holds
    the sliders, `.view` what the figure shows, `.explorer` the `SweepExplorer` behind it.
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
    ch = ex.choices()
    r_slider = w.SelectionSlider(options=ch["r"], value=8 if 8 in ch["r"] else ch["r"][0], description="r")
    alpha_slider = w.SelectionSlider(
        options=ch["lora_alpha"],
        value=16 if 16 in ch["lora_alpha"] else ch["lora_alpha"][0],
        description="alpha",
    )
    lr_slider = w.SelectionSlider(
        options=[(f"{v:g}", v) for v in ch["lr"]], value=ch["lr"][len(ch["lr"]) // 2], description="lr"
    )
    rslora_box = w.Checkbox(value=False, description="rsLoRA (alpha/sqrt(r))")
    button = w.Button(description=f"train {steps} steps", icon="play")
    out = w.Output()
    log = w.Output()

    def redraw(*_):
        view = ex.select(r_slider.value, alpha_slider.value, rslora_box.value, lr_slider.value)
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
                    rslora_box.value,
                    lr_slider.value,
                    steps=steps,
                    **train_kwargs,
                )
                ex.add_run(run)
            redraw()
        finally:
            button.disabled = False

    for control in (r_slider, alpha_slider, lr_slider, rslora_box):
        control.observe(redraw, names="value")
    button.on_click(on_train)
    box = w.VBox([w.HBox([r_slider, alpha_slider]), w.HBox([lr_slider, rslora_box, button]), out, log])
    box.view = None
    box.explorer = ex
    box.controls = {"r": r_slider, "lora_alpha": alpha_slider, "lr": lr_slider, "use_rslora": rslora_box}
    box.redraw = redraw
    box.train_button = button
    redraw()
    return box


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
