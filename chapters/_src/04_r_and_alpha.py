# %% [markdown]
# # 04 · The two knobs: r and alpha
#
# Every LoRA config has two numbers: the rank `r`, how many directions the patch may use,
# and `lora_alpha`, how loud the patch is. The update added to a weight is
# `scaling * B @ A` with `scaling = lora_alpha / r` {cite}`hu2021lora`. The sources give
# rules of thumb: set alpha to twice r; raising r at a fixed alpha weakens the patch; think of
# alpha/r as a "meta learning rate"; and use rsLoRA's `alpha / sqrt(r)`
# {cite}`kalajdzievski2023rslora` when r is large. This chapter turns each rule into a
# measurement on the bundled model.
#
# In the patch picture, the Chinese source calls `r` the patch's "complexity" and
# `lora_alpha` its "strength". `r` sets how big the patch is (the adapter file grows with
# it); alpha/r sets how loudly the patch speaks, and costs no bytes at all. A bigger patch
# file is not a louder patch.
#
# **Learning goals**
# - read loss and accuracy against r for the usual alpha rules;
# - see, in numbers, why a fixed alpha makes each direction weaker as r grows, and how
#   rsLoRA keeps the update's size;
# - know when alpha/r behaves like a learning rate (SGD) and when it does not (Adam);
# - explore the sweep live with sliders, and watch a short sweep train.

# %% tags=["hide-cell"]
# Colab setup: installs LoRA Lab in Google Colab (keeping Colab's own
# torch and transformers); does nothing anywhere else.
import os
import subprocess
import sys

REPO_URL = "https://github.com/lora-lab/lora-lab"  # from _config.yml
EXTRAS = "train"  # never "book": Colab has plotting
HOME = "/content/lora-lab"
if "google.colab" in sys.modules:
    if not os.path.isdir(HOME):
        clone = ["git", "clone", "--depth", "1", REPO_URL, HOME]
        subprocess.run(clone, check=True)
        pip = [sys.executable, "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "-e", f"{HOME}[{EXTRAS}]"], check=True)
    os.chdir(f"{HOME}/chapters")
    sys.path.insert(0, HOME)
    from importlib.metadata import version  # what this runtime ended up with
    print({n: version(n) for n in ("transformers", "peft", "trl",
                                   "bitsandbytes", "accelerate")})

# %%
# Parameters: change these to run the chapter on another model or device.
BASE_MODEL = None  # None = the bundled tiny model; or a Hub id / path
# On a Colab GPU try "HuggingFaceTB/SmolLM2-360M-Instruct" (Llama family,
# fits a T4); the asserts about the bundled model are then skipped.
SEED = 0
LIVE_RANKS = (2, 16)  # ranks of the live sweep, at alpha = LIVE_ALPHA
LIVE_ALPHA = 16
LIVE_STEPS = 8  # steps per live run (the cached sweep used 60)
LIVE_EXAMPLES = 64  # training examples the live runs draw from
LIVE_BATCH = 8

# %%
import json

import lora_lab
from lora_lab import data, models, plot, widgets
from lora_lab.paths import RESULTS_DIR
from lora_lab.prose import glue, seed_spread
from lora_lab.train import encode_example

lora_lab.seed_everything(SEED)
sweep = json.loads((RESULTS_DIR / "sweep_r_alpha.json").read_text())
meta = sweep["meta"]
print(lora_lab.runtime.describe())
print(f"cached sweep: {len(sweep['runs'])} runs of {meta['steps']} steps on"
      f" the {meta['task']!r} task, batch {meta['batch_size']}")
glue("sweep_minutes", meta["seconds"] / 60, ".0f")
glue("steps", meta["steps"])
glue("eval_items", int(meta["eval"].split("first ")[1].split()[0]))
glue("early_step", meta["early_step"])

# %% [markdown]
# The sweep comes from `python benchmarks/sweep_r_alpha.py` ({glue:text}`sweep_minutes`
# minutes on one CPU thread when it was cached). Each run trains LoRA on the attention
# projections of the bundled model with the same seed, data order and plain AdamW for
# {glue:text}`steps` steps, and records the loss curve, the final loss, the accuracy on
# {glue:text}`eval_items` validation questions, and the size of the learned update
# `dW = scaling * B @ A`. The main grid was re-run with two more seeds
# (`sweep_r_alpha_seeds.json`, below) to see how much of each difference is noise.

# %%
grid = [x for x in sweep["runs"] if x["group"] == "grid"]


def run(r, alpha, rslora=False, lr=3e-3, runs=grid):
    """The cached grid run with these settings."""
    (hit,) = [x for x in runs if (x["r"], x["lora_alpha"], x["use_rslora"],
                                  x["lr"]) == (r, alpha, rslora, lr)]
    return hit


ranks = sorted({x["r"] for x in grid})
print("r:", ranks)
LR = meta.get("lr", 3e-3)
glue("lr", LR, "g")
extra = json.loads((RESULTS_DIR / "sweep_r_alpha_seeds.json").read_text())


def seed_runs(r, alpha, rslora=False, lr=LR):
    """The run with these settings in every seed that has it (seed 0 first)."""
    hits = [run(r, alpha, rslora, lr)]
    for runs in extra["seeds"].values():
        hits += [x for x in runs if (x["r"], x["lora_alpha"], x["use_rslora"],
                                     x["lr"]) == (r, alpha, rslora, lr)]
    return hits


print("extra seeds:", ", ".join(extra["seeds"]))
seed_ranks = sorted({x["r"] for runs in extra["seeds"].values() for x in runs})
glue("seed_ranks", ", ".join(map(str, seed_ranks)))

# %% [markdown]
# (claim-alpha-2r)=
# ## alpha = 2r against alpha = r, and the fixed alpha
#
# Three alpha rules over the same ranks at learning rate {glue:text}`lr`: alpha = r
# (scaling 1), alpha = 2r (scaling 2) and a fixed alpha = 16. With seed 0, alpha = 2r ends
# with a lower loss than alpha = r at every rank, but at r=64 by only
# {glue:text}`gap64` (final loss {glue:text}`loss64_2r` against {glue:text}`loss64_r`).
# The grid was re-run with {glue:text}`n_seeds_64` seeds at r = {glue:text}`seed_ranks`: alpha = 2r
# ends lower than alpha = r in every seed (compared seed by seed: a seed fixes the data order
# and the initial $A$) at r = {glue:text}`ranks_always`; at r = {glue:text}`ranks_mixed` the
# seeds disagree, the gap is {glue:text}`gap64_range` across seeds, smaller than the
# seed-to-seed spread of the losses themselves (r = {glue:text}`ranks_single` ran with
# seed 0 only). So the rule of thumb {glue:text}`alpha2r_word`.
# With a fixed alpha the loss stops improving past r=16 while alpha = 2r keeps improving a
# little. The differences are small after {glue:text}`steps` steps (hundredths of a nat
# at most).

# %%
by_rule = [x for x in grid if x["lr"] == 3e-3 and not x["use_rslora"]]
fig, axes = plot.new_figure(ncols=2, width=4.6, height=3.3)
plot.plot_sweep(by_rule, x="r", y="final_loss", ax=axes[0],
                title="final loss vs r (lr 3e-3)")
plot.plot_sweep(by_rule, x="r", y="accuracy", ax=axes[1],
                title="accuracy vs r (100 questions)")
fig

# %%
for r in ranks:
    assert run(r, 2 * r)["final_loss"] < run(r, r)["final_loss"]  # seed 0
assert run(16, 16)["final_loss"] > run(16, 32)["final_loss"]
fixed = [run(r, 16)["final_loss"] for r in (16, 32, 64)]
assert max(fixed) - min(fixed) < 0.01
assert run(64, 128)["final_loss"] < min(fixed)
print(f"{'r':>3} {'alpha=r':>8} {'alpha=2r':>9} {'alpha=16':>9}  (final loss)")
for r in ranks:
    print(f"{r:>3} {run(r, r)['final_loss']:>8.3f}"
          f" {run(r, 2 * r)['final_loss']:>9.3f}"
          f" {run(r, 16)['final_loss']:>9.3f}")
glue("gap64", run(64, 64)["final_loss"] - run(64, 128)["final_loss"], ".4f")
glue("loss64_r", run(64, 64)["final_loss"], ".4f")
glue("loss64_2r", run(64, 128)["final_loss"], ".4f")
# Seeds: the gap alpha=r minus alpha=2r per seed (paired: a seed fixes the
# data order and the initial A), beside the spread of the losses themselves.
always, mixed, single = [], [], []
print(f"{'r':>3} {'seeds':>5} {'gap mean':>9} {'gap min..max':>16}"
      f" {'loss spread':>11}")
for r in ranks:
    plain_runs, double_runs = seed_runs(r, r), seed_runs(r, 2 * r)
    gaps = [a["final_loss"] - b["final_loss"]
            for a, b in zip(plain_runs, double_runs)]
    mean, lo, hi = seed_spread(gaps)
    spread = max(x["final_loss"] for x in double_runs) - min(
        x["final_loss"] for x in double_runs)
    if len(gaps) < 3:
        single.append(r)
    else:
        (always if lo > 0 else mixed).append(r)  # lower in every seed
    print(f"{r:>3} {len(gaps):>5} {mean:>9.4f} {lo:>8.4f}..{hi:<7.4f}"
          f" {spread:>11.4f}")
assert len(seed_runs(64, 64)) >= 3
g64 = [a["final_loss"] - b["final_loss"]
       for a, b in zip(seed_runs(64, 64), seed_runs(64, 128))]
glue("gap64_range", f"{min(g64):+.4f} to {max(g64):+.4f}",
     zh=f"{min(g64):+.4f} 至 {max(g64):+.4f}")
glue("n_seeds_64", len(seed_runs(64, 64)))
glue("ranks_always", ", ".join(map(str, always)) or "none of them",
     zh="、".join(map(str, always)) or "一个也没有")
glue("ranks_mixed", ", ".join(map(str, mixed)) or "none",
     zh="、".join(map(str, mixed)) or "没有")
glue("ranks_single", ", ".join(map(str, single)))
glue("alpha2r_word", "holds at every rank tested with seeds" if not mixed
     else "holds at low rank and is within the noise at high rank",
     zh="在所有做过多种子测试的秩上都成立" if not mixed
     else "在低秩时成立，在高秩时落在噪声之内")

# %% [markdown]
# Accuracy on {glue:text}`eval_items` validation questions is a noisier signal than the
# loss: one question is {glue:text}`one_question` percentage points. It rises from
# {glue:text}`worst_acc` at r=1 with alpha=1 to {glue:text}`best_acc` for the best run of
# the grid, which is {glue:text}`best_label` (scaling {glue:text}`best_scaling`). Plain
# r=16 with alpha=16 (scaling 1) scored {glue:text}`r16a16_acc` with final loss
# {glue:text}`r16a16_loss`. Scaling 1 (alpha = r) is the weak setting at every rank up to
# r=8, at most {glue:text}`weak_max` right. With a scaling of 2 or more, every rank from r=4 up
# lands between {glue:text}`scaled_min` and {glue:text}`scaled_max`, with no clear winner
# among them:

# %%
at_3e3 = [x for x in grid if x["lr"] == 3e-3]
best = max(at_3e3, key=lambda x: (x["accuracy"], -x["final_loss"]))
worst = min(at_3e3, key=lambda x: (x["accuracy"], -x["final_loss"]))
assert (worst["r"], worst["lora_alpha"]) == (1, 1)
assert best["accuracy"] - worst["accuracy"] > 0.3
scaled = [x["accuracy"] for x in at_3e3 if x["r"] >= 4  # scaling >= 2:
          and (x["use_rslora"] or x["lora_alpha"] >= 2 * x["r"])]
weak = [x["accuracy"] for x in at_3e3 if x["r"] <= 8
        and x["lora_alpha"] == x["r"]]  # scaling 1
assert 0.6 <= min(scaled) and max(scaled) <= 0.75 and max(weak) < min(scaled)
for name, x in (("best", best), ("worst", worst)):
    rule = " rsLoRA" if x["use_rslora"] else ""
    print(f"{name}: r={x['r']} alpha={x['lora_alpha']}{rule}"
          f" (scaling {x['scaling']:.3g}) accuracy {x['accuracy']:.0%},"
          f" final loss {x['final_loss']:.3f}")
plain16 = run(16, 16)
print(f"plain r=16 alpha=16 (scaling 1): accuracy {plain16['accuracy']:.0%},"
      f" final loss {plain16['final_loss']:.3f}")
n_eval = int(meta["eval"].split("first ")[1].split()[0])
glue("one_question", 100 / n_eval, ".0f")
glue("worst_acc", worst["accuracy"], ".0%")
glue("best_acc", best["accuracy"], ".0%")
glue("best_label", f"r={best['r']} with alpha={best['lora_alpha']}"
     + (" under rsLoRA" if best["use_rslora"] else ""),
     zh=("rsLoRA 下" if best["use_rslora"] else "")
     + f" r={best['r']}、alpha={best['lora_alpha']}")
glue("best_scaling", best["scaling"], ".3g")
glue("r16a16_acc", plain16["accuracy"], ".0%")
glue("r16a16_loss", plain16["final_loss"], ".3f")
glue("weak_max", max(weak), ".0%")
glue("scaled_min", min(scaled), ".0%")
glue("scaled_max", max(scaled), ".0%")

# %% [markdown]
# (claim-alpha-fixed)=
# ## At fixed alpha, more rank means weaker directions
#
# Why does a fixed alpha stall? With `scaling = alpha / r`, doubling r halves the
# multiplier on every direction. The sweep measured `||dW||` after {glue:text}`early_step`
# steps at alpha = 16 and the size of one rank-1 piece of it,
# `scaling * ||B[:, j]|| * ||A[j, :]||` averaged over directions j and layers: as r goes
# from {glue:text}`r_min` to {glue:text}`r_max` the whole update shrinks from
# {glue:text}`update_first` to {glue:text}`update_last` and each direction shrinks
# {glue:text}`direction_ratio`x. More directions, each one quieter: at a fixed alpha, a
# bigger patch ships and says less through each of its directions.

# %%
scaling_exp = sweep["experiments"]["rank_scaling"]
rows = scaling_exp["rows"]
plain = [row["alpha/r"] for row in rows]
update = [p["update_norm_early"] for p in plain]
direction = [p["direction_norm_early"] for p in plain]
assert all(a > b for a, b in zip(update, update[1:]))
assert all(a > b for a, b in zip(direction, direction[1:]))
assert direction[0] / direction[-1] > 50
print(f"{'r':>3} {'scaling':>8} {'||dW||':>7} {'one direction':>14}")
for row, p in zip(rows, plain):
    print(f"{row['r']:>3} {p['scaling']:>8.3g} {p['update_norm_early']:>7.2f}"
          f" {p['direction_norm_early']:>14.3f}")
glue("r_min", rows[0]["r"])
glue("r_max", rows[-1]["r"])
glue("update_first", update[0], ".2f")
glue("update_last", update[-1], ".2f")
glue("direction_ratio", direction[0] / direction[-1], ".0f")

# %% [markdown]
# (claim-rslora)=
# ## rsLoRA keeps the update's size
#
# rsLoRA {cite}`kalajdzievski2023rslora` uses `scaling = alpha / sqrt(r)`. In the same
# measurement, `||dW||` after {glue:text}`early_step` steps stays within
# {glue:text}`rs_low` to {glue:text}`rs_high` times its r=1 value at every rank, while with
# alpha/r it falls to {glue:text}`plain_ratio` times. PEFT turns it on with
# `LoraConfig(use_rslora=True)`; `lora_lab.inject.LoRAConfig` has the same flag.

# %%
rs = [row["rsLoRA"]["update_norm_early"] for row in rows]
assert all(abs(v / rs[0] - 1) < 0.15 for v in rs)
assert update[-1] / update[0] < 1 / 3
print(f"||dW|| at r=64 relative to r=1: alpha/r {update[-1] / update[0]:.2f},"
      f" rsLoRA {rs[-1] / rs[0]:.2f}")
glue("rs_low", min(v / rs[0] for v in rs), ".2f")
glue("rs_high", max(v / rs[0] for v in rs), ".2f")
glue("plain_ratio", update[-1] / update[0], ".2f")
fig, axes = plot.new_figure(ncols=2, width=4.6, height=3.3)
plot.plot_rank_scaling(scaling_exp, "update_norm_early", ax=axes[0])
plot.plot_rank_scaling(scaling_exp, "direction_norm_early", ax=axes[1])
fig

# %% [markdown]
# The final losses follow, by a little: at alpha = 16, rsLoRA's r=64 run ends at
# {glue:text}`rs64_loss` against alpha/r's {glue:text}`plain64_loss`
# ({glue:text}`rs64_seeds`).

# %%
rs64 = rows[-1]["rsLoRA"]["final_loss"]
assert rows[-1]["r"] == 64 and rs64 < plain[-1]["final_loss"]
print(f"r=64, alpha=16: final loss {plain[-1]['final_loss']:.3f} (alpha/r),"
      f" {rs64:.3f} (rsLoRA)")
glue("rs64_loss", rs64, ".3f")
glue("plain64_loss", plain[-1]["final_loss"], ".3f")
pairs = list(zip(seed_runs(64, 16, True), seed_runs(64, 16)))
lower = sum(a["final_loss"] < b["final_loss"] for a, b in pairs)
print(f"rsLoRA lower in {lower} of {len(pairs)} seeds")
glue("rs64_seeds", f"rsLoRA lower in {lower} of {len(pairs)} seeds",
     zh=f"{len(pairs)} 个种子中有 {lower} 个 rsLoRA 更低")

# %% [markdown]
# The other side of the coin: rsLoRA's larger updates at high rank need a smaller learning
# rate. The sweep also ran r=4 and r=32 at alpha = 16 with learning rates
# {glue:text}`extra_lrs` (seed 0 only). At {glue:text}`hot_lr`, rsLoRA at r=32 (scaling
# {glue:text}`hot_rs_scaling`) is knocked off course: it ends at a final loss of
# {glue:text}`hot_rs_loss` with {glue:text}`hot_rs_acc` right, while alpha/r at r=32
# (scaling {glue:text}`hot_plain_scaling`) trains fine ({glue:text}`hot_plain_loss`,
# {glue:text}`hot_plain_acc`).

# %%
print(f"{'r':>3} {'rule':>7} {'lr':>6} {'final loss':>11} {'accuracy':>9}")
for x in sorted((x for x in grid if x["lr"] != 3e-3 or x["r"] in (4, 32)
                 and x["lora_alpha"] == 16),
                key=lambda x: (x["r"], x["use_rslora"], x["lr"])):
    rule = "rsLoRA" if x["use_rslora"] else "alpha/r"
    print(f"{x['r']:>3} {rule:>7} {x['lr']:>6g} {x['final_loss']:>11.3f}"
          f" {x['accuracy']:>9.0%}")
hot_rs, hot_plain = run(32, 16, True, lr=1e-2), run(32, 16, False, lr=1e-2)
assert hot_rs["final_loss"] > 3 * hot_plain["final_loss"]
assert hot_rs["accuracy"] < 0.1
assert hot_plain["final_loss"] < 0.2 and hot_plain["accuracy"] > 0.6
other_lrs = [f"{lr:g}" for lr in sorted({x["lr"] for x in grid} - {LR})]
glue("extra_lrs", " and ".join(other_lrs), zh=" 和 ".join(other_lrs))
glue("hot_lr", hot_rs["lr"], "g")
for name, x in (("hot_rs", hot_rs), ("hot_plain", hot_plain)):
    glue(f"{name}_scaling", x["scaling"], ".2g")
    glue(f"{name}_loss", x["final_loss"], ".2f")
    glue(f"{name}_acc", x["accuracy"], ".0%")

# %% [markdown]
# (claim-alpha-lr)=
# ## Is alpha/r a learning rate?
#
# The source calls alpha/r a "meta learning rate". The sweep tested it: from r=8,
# alpha=16, double alpha, or double or quadruple the learning rate, and compare the size
# of the update after the first step (relative to the unchanged run).
#
# - **Adam**: doubling alpha grows the first update {glue:text}`adam_alpha1`x, the same as
#   doubling the learning rate ({glue:text}`adam_lr1`x). Adam divides each gradient by its own running size, so the step on `B` is about
#   `lr` whatever the gradient's scale; `dW = scaling * B @ A` is then multiplied once by the
#   scaling. Alpha and lr act alike at first, then part ways: after
#   {glue:text}`early_step` steps they are {glue:text}`adam_alpha10`x and
#   {glue:text}`adam_lr10`x.
# - **SGD**: doubling alpha grows the first update {glue:text}`sgd_alpha1`x, like a
#   quadrupled learning rate ({glue:text}`sgd_lr4_1`x). The
#   gradient on `B` is itself proportional to the scaling, and the update is multiplied by
#   the scaling again: scaling squared.

# %%
avl = sweep["experiments"]["alpha_vs_lr"]["optimizers"]
adam, sgd = avl["adamw"]["variants"], avl["sgd"]["variants"]
for ratios, name, factor in ((adam, "alpha x2", 2), (adam, "lr x2", 2),
                              (sgd, "alpha x2", 4), (sgd, "lr x4", 4),
                              (sgd, "lr x2", 2)):
    assert abs(ratios[name]["norm_ratio_step1"] - factor) < 1e-3, name
gap = abs(adam["alpha x2"]["norm_ratio_early"]
          - adam["lr x2"]["norm_ratio_early"])
assert gap > 0.1
print(f"{'':9} {'Adam 1 step':>11} {'10 steps':>9} {'SGD 1 step':>11}"
      f" {'10 steps':>9}")
for name in ("alpha x2", "lr x2", "lr x4"):
    print(f"{name:9} {adam[name]['norm_ratio_step1']:>10.1f}x"
          f" {adam[name]['norm_ratio_early']:>8.2f}x"
          f" {sgd[name]['norm_ratio_step1']:>10.1f}x"
          f" {sgd[name]['norm_ratio_early']:>8.2f}x")
glue("adam_alpha1", adam["alpha x2"]["norm_ratio_step1"], ".1f")
glue("adam_lr1", adam["lr x2"]["norm_ratio_step1"], ".1f")
glue("adam_alpha10", adam["alpha x2"]["norm_ratio_early"], ".2f")
glue("adam_lr10", adam["lr x2"]["norm_ratio_early"], ".2f")
glue("sgd_alpha1", sgd["alpha x2"]["norm_ratio_step1"], ".1f")
glue("sgd_lr4_1", sgd["lr x4"]["norm_ratio_step1"], ".1f")
glue("sgd_alpha10", sgd["alpha x2"]["norm_ratio_early"], ".2f")
glue("sgd_lr4_10", sgd["lr x4"]["norm_ratio_early"], ".2f")

# %%
plot.plot_alpha_vs_lr(sweep, "norm_ratio_step1")

# %% [markdown]
# So under Adam, which nearly everyone uses, alpha/r is a multiplier on the adapter's
# output that starts out like a learning rate but is not one; under SGD it is a squared
# learning rate. Either way it is a knob of the same kind as the learning rate, which is
# why changing r without adjusting alpha (or the learning rate) changes the training.
#
# ## Explore the sweep
#
# The cell below is the explorer, and what it shows depends on where you read it.
#
# - **In the book's web page** (no kernel, no network): a figure drawn by plotly in your
#   browser. Pick a series of runs in the menu (one alpha rule at one learning rate; the sweep has
#   {glue:text}`exp_n_series` of them over {glue:text}`exp_n_runs` cached runs) and drag
#   the slider through the ranks that series ran. The left panel is that run's loss curve;
#   the right one puts its final loss among the other series at the same learning rate.
#   The title names the run drawn: r, alpha, lr and the scaling it gets, alpha/r or
#   rsLoRA's alpha/sqrt(r). Every slider position is a run the sweep trained; nothing
#   between them is made up.
# - **In Jupyter or Colab**: the same cell builds the ipywidgets explorer instead (its
#   plotly figure is `live.figure`). Its controls offer only settings the sweep ran: pick
#   r, then alpha/r or rsLoRA, then alpha, then the learning rate, and each control lists
#   only what exists with the choices before it. A button retrains the shown setting from
#   scratch with the sweep's loop and adds the fresh curve beside the cached one.

# %% tags=["nbval-ignore-output"]
live = widgets.explore(sweep)
live

# %% [markdown]
# Both explorers read the same cache and cannot offer a run it lacks: the page's sliders
# step through exactly the cached runs, and the widget's controls narrow as you choose.
# At r=64 without rsLoRA the alpha slider offers {glue:text}`exp_alphas_64`, and the
# learning rate only {glue:text}`exp_lrs_64`: the other rates were run at r =
# {glue:text}`exp_lr_ranks` only.

# %%
ex = live.widget.explorer
steps = [(s["name"], x) for s in ex.series() for x in s["runs"]]
page = live.figure.figure
sliders = page.layout.sliders
titles = {st.args[1]["title.text"] for sl in sliders for st in sl.steps}
assert len(sliders) == len(ex.series())
assert sum(len(sl.steps) for sl in sliders) == len(steps)
assert titles == {widgets.run_title(x) for x in ex.grid}  # every run, no other
assert page.layout.title.text == widgets.run_title(ex.run(8, 16))
for lr in sorted({x["lr"] for x in ex.grid}):
    names = [s["name"] for s in ex.series() if s["lr"] == lr]
    print(f"lr={lr:g}:", "; ".join(names))
alphas_64 = ex.options(64, False)["lora_alpha"]
lrs_64 = ex.options(64, False, 16)["lr"]
lr_ranks = sorted({x["r"] for x in ex.grid if x["lr"] != LR})
assert lrs_64 == [LR] and len(ex.options(32, False, 16)["lr"]) == 3
glue("exp_n_series", len(ex.series()))
glue("exp_n_runs", len(ex.grid))
glue("exp_alphas_64", ", ".join(f"{a:g}" for a in alphas_64))
glue("exp_lrs_64", ", ".join(f"{v:g}" for v in lrs_64))
glue("exp_lr_ranks", " and ".join(map(str, lr_ranks)),
     zh=" 和 ".join(map(str, lr_ranks)))
print("r=64, alpha/r: alpha in", alphas_64, "| alpha=16: lr in", lrs_64)
print("ranks run at the other learning rates:", lr_ranks)

# %% [markdown]
# The widget's data is plain Python, so it can be checked without a browser: moving the
# r slider from r=8 to r=64 at alpha=16 selects a different cached run with a smaller
# scaling, and the title names that run.

# %% tags=["nbval-ignore-output"]
# (without a browser, each redraw may also print the figure's repr)
controls = live.widget.controls
controls["lr"].value = 3e-3
controls["r"].value = 64
view_64 = live.widget.view
controls["use_rslora"].value = True
view_rs = live.widget.view

# %%
assert view_64["run"]["r"] == 64 and view_64["scaling"] == 16 / 64
assert view_rs["run"]["use_rslora"] and view_rs["scaling"] == 2.0
title_rs = ex.figure(view_rs).get_suptitle()
assert title_rs == widgets.run_title(view_rs["run"])
print(view_64["run"]["label"], "| scaling", view_64["scaling"])
print(view_rs["run"]["label"], "| title:", title_rs)

# %% [markdown]
# The same two panels drawn with matplotlib, for three settings side by side: r=8 with
# alpha=16, r=64 with alpha=16, and r=64 with alpha=16 under rsLoRA.

# %%
widgets.static_explorer_figure(sweep, [
    {"r": 8, "lora_alpha": 16},
    {"r": 64, "lora_alpha": 16},
    {"r": 64, "lora_alpha": 16, "use_rslora": True},
])

# %% [markdown]
# ## A short sweep, live
#
# The cached sweep is slow; here is a small one you can watch: two ranks at alpha = 16, a
# few steps each, with `widgets.train_point` (the same loop the sweep used).

# %% tags=["nbval-ignore-output"]
base = models.load_base(BASE_MODEL)
tok = base[1]
examples = data.load_task(meta["task"], "train")[:LIVE_EXAMPLES]
encoded = [encode_example(tok, ex, meta["seq_len"]) for ex in examples]
live_runs = [
    widgets.train_point(r, LIVE_ALPHA, steps=LIVE_STEPS, base=base,
                        encoded=encoded, batch_size=LIVE_BATCH, seed=SEED,
                        measure_at=(LIVE_STEPS,), log_every=1)
    for r in LIVE_RANKS
]

# %% [markdown]
# The same pattern as the cache, in a few seconds: at fixed alpha the larger rank's update
# is smaller.

# %%
small, large = live_runs
assert small["update_norm"] > large["update_norm"]
for x in live_runs:
    print(f"r={x['r']:>2} alpha={x['lora_alpha']} scaling {x['scaling']:g}:"
          f" ||dW|| {x['update_norm']:.1f}, loss {x['losses'][0]:.1f}"
          f" -> {x['final_loss']:.1f}")

# %% [markdown]
# ## Check yourself
#
# The first question rests on this check of the cached sweep: its runs span every alpha,
# rsLoRA and several learning rates, and the trainable count depends on r alone.

# %%
counts = {}
for entry in sweep["runs"]:
    counts.setdefault(entry["r"], set()).add(entry["trainable_params"])
for r, n in sorted(counts.items()):
    print(f"r={r:<3} trainable parameters {sorted(n)}")
assert all(len(n) == 1 for n in counts.values())  # whatever alpha or rsLoRA
per_rank = {min(n) / r for r, n in counts.items()}
assert len(per_rank) == 1  # and in proportion to r

# %% [markdown]
# **1.** At r=8 you change `lora_alpha=16` to `lora_alpha=32`. How many more parameters train?
# (a) twice as many (b) half as many (c) none: alpha is a fixed multiplier, not a weight
# (d) it depends on the learning rate
#
# ```{admonition} Answer
# :class: dropdown
# (c): `scaling = alpha / r` multiplies $BA$; only $A$ and $B$ train, and their size is set
# by r and the targets (the cell above: one count per rank, whatever alpha or rsLoRA).
# ```
#
# **2.** At a fixed alpha = 16, you go from r=8 to r=64. What happens to each direction of
# the update?
# (a) it grows, since there are more of them (b) it stays the same (c) it gets quieter,
# because the scaling alpha/r falls as r grows (d) it becomes random
#
# ```{admonition} Answer
# :class: dropdown
# (c): the whole update and each of its directions shrank at every step up in rank
# (asserted), which is why a fixed alpha stops paying for more rank. Raise alpha with r
# (alpha = 2r) or use rsLoRA.
# ```
#
# **3.** What does rsLoRA change?
# (a) the number of trainable parameters (b) the scaling, to $\alpha/\sqrt{r}$, so the
# update keeps about the same size as r grows (c) how $A$ is initialised (d) the optimizer
#
# ```{admonition} Answer
# :class: dropdown
# (b): with $\alpha/\sqrt{r}$ the update's size stayed close to its r=1 size at every rank
# (asserted). The flip side: at a high rank it may need a smaller learning rate.
# ```
#
# ## Summary
#
# - `scaling = alpha / r` multiplies the update. On the bundled model alpha = 2r ended
#   below alpha = r in every seed at r = {glue:text}`ranks_always`; at r =
#   {glue:text}`ranks_mixed` the gap is within the seed-to-seed noise.
# - At fixed alpha, raising r shrinks each direction's update ({glue:text}`direction_ratio`x
#   from r={glue:text}`r_min` to r={glue:text}`r_max`): the rank grows, the patch gets no
#   louder.
# - rsLoRA's `alpha / sqrt(r)` keeps the update's size within {glue:text}`rs_low` to
#   {glue:text}`rs_high` times its r=1 size.
# - alpha acts like a learning-rate multiplier: exactly at the first step under Adam, as
#   lr squared under SGD, and only approximately after that.
# - An adapter r times too strong or weak in another tool: {ref}`alpha vs alpha/r <trouble-alpha>` (troubleshooting).
#
# ## Exercises
#
# 1. In the explorer, compare r=4 and r=32 at alpha=16 with and without rsLoRA. Which
#    setting would you choose, and what does the sweep panel say?
# 2. Under SGD, which learning-rate change does alpha x2 match after the first step, and
#    why would the match weaken later?
#
# ```{admonition} Solution 1
# :class: dropdown
# Without rsLoRA, r=32 at alpha=16 has scaling {glue:text}`hot_plain_scaling` and ends at
# about the same loss as r=4 ({glue:text}`sol_r32` vs {glue:text}`sol_r4`): the extra rank
# is wasted. With rsLoRA r=32 keeps a scaling of {glue:text}`hot_rs_scaling` and ends lower
# ({glue:text}`sol_r32_rs`). Choose a larger r only with alpha scaled with it
# (alpha = 2r) or with rsLoRA.
# ```
#
# ```{admonition} Solution 2
# :class: dropdown
# lr x4: the update is scaling squared times lr at the first step
# ({glue:text}`sgd_alpha1`x in the cached table). Later the gradient itself depends on how
# far `A` and `B` have moved, which differs between the two runs, so the ratio drifts
# ({glue:text}`sgd_alpha10`x vs {glue:text}`sgd_lr4_10`x after {glue:text}`early_step`
# steps).
# ```

# %% tags=["hide-cell"]
# The solutions paste the cached sweep's numbers.
glue("sol_r32", run(32, 16)["final_loss"], ".3f")
glue("sol_r4", run(4, 16)["final_loss"], ".3f")
glue("sol_r32_rs", run(32, 16, True)["final_loss"], ".3f")
assert run(32, 16, True)["final_loss"] < min(run(r, 16)["final_loss"]
                                              for r in (4, 32))
