# %% [markdown]
# # 01 · Recompile or patch?
#
# Picture a pretrained language model as a huge compiled binary, `llama-7b.bin`. Building it
# ("pretraining") burned months of machine time to bake general knowledge into billions of
# numbers. Now you want it to do one specific job: answer questions about your shop's
# database in SQL. How do you change a binary that big?
#
# **Full fine-tuning** is the *recompile*: load every parameter, train all of them on your
# task, and ship a new binary as large as the old one. **LoRA** is the *patch*: leave the
# binary read-only and ship a small module that changes its behaviour at run time, the way
# a `.dll` or `.so` extends a program without relinking it {cite}`hu2021lora`.
#
# This chapter runs both on the same task, with the same model, data and step budget, and
# measures what each costs and what each gets.
#
# **Learning goals**
# - see what a training step has to hold in memory, and which parts LoRA shrinks;
# - measure both methods side by side: trainable parameters, optimizer state, memory,
#   checkpoint size, time per step, task accuracy, and forgetting;
# - scale the same arithmetic to Llama-2-7B and GPT-3 175B, and check the sources' numbers.

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
TASK = "sql"  # the task both methods learn: "sql" or "support"
STEPS = 20  # steps of the live run, the same for both methods
BATCH = 16  # examples per step
LORA_LR = 3e-3  # LoRA takes a larger learning rate than full fine-tuning
FULL_LR = 1e-3
EVAL_ITEMS = 30  # test items each live model is scored on
TIMING_STEPS = 5  # steps timed for seconds-per-step

# %%
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import lora_lab
from lora_lab import data, evaluate, payoff, sizing, train
from lora_lab.adapters import save_adapter
from lora_lab.inject import LoRAConfig, add_lora, count_parameters
from lora_lab.inject import trainable_parameters_line
from lora_lab.merge import merge_and_unload
from lora_lab.paths import DATA_DIR, RESULTS_DIR
from lora_lab.prose import glue

lora_lab.seed_everything(SEED)
print(lora_lab.runtime.describe())

# %% [markdown]
# ## The binary and the two contenders
#
# The bundled base model is small enough to fine-tune fully on a laptop CPU, which is what
# makes a fair side-by-side possible. The *recompile* trains every parameter. The *patch*
# freezes them all and adds LoRA (rank {glue:text}`lora_r`, alpha {glue:text}`lora_alpha`) to
# the four attention projections `q_proj k_proj v_proj o_proj` of every layer: the model
# card's recipe for this model.

# %%
base, tok = lora_lab.load_base(BASE_MODEL)
LORA = LoRAConfig(r=8, lora_alpha=16,
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def make(method):
    """A fresh copy of the base model, set up for `method`."""
    lora_lab.seed_everything(SEED)
    model = copy.deepcopy(base)
    if method == "full":
        model.requires_grad_(True)  # every weight trains
    else:
        add_lora(model, LORA)  # freezes the base, adds trainable A, B
    return model


for method in ("full", "lora"):
    print(f"{method:5}", trainable_parameters_line(make(method)))
glue("lora_r", LORA.r)
glue("lora_alpha", LORA.lora_alpha, "g")

# %% [markdown]
# ## What one training step holds
#
# A training step keeps four kinds of tensors alive:
#
# - the **weights** themselves (all of them, frozen or not: the forward pass needs them);
# - a **gradient** for every *trainable* weight;
# - the **optimizer state**: AdamW keeps two running averages (first and second moment) per
#   trainable weight, in fp32;
# - the **activations** autograd saves during the forward pass to compute the backward pass.
#
# The function below runs one AdamW step and adds up the bytes of the first three kinds,
# reading them from the tensors themselves: the parameters, their `p.grad`, and the
# optimizer's `state` dict. The fourth kind hides inside autograd's graph, where ordinary
# code cannot see it; counting it takes a hook into autograd, so that measurement lives in
# an optional section at the end of the chapter, and its result is quoted below.

# %%
examples = data.load_task(TASK, "train")
pad = tok.pad_token_id
batch = train.collate(
    [train.encode_example(tok, ex, 96) for ex in examples[:BATCH]], pad)
batch = {k: v.to(base.device) for k, v in batch.items()}  # where the model is


def step_bytes(model, lr):
    """Bytes of weights, gradients and AdamW state after one step on `batch`."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    model(**batch).loss.backward()
    opt.step()
    state = [t for s in opt.state.values() for t in s.values()]
    return {
        "weights": sum(p.nbytes for p in model.parameters()),
        "gradients": sum(p.grad.nbytes for p in params),
        "optimizer": sum(t.nbytes for t in state),
    }


memory = {m: step_bytes(make(m), FULL_LR) for m in ("full", "lora")}
print(f"{'bytes':12} {'full':>12} {'lora':>12}")
for kind in memory["full"]:
    print(f"{kind:12} {memory['full'][kind]:>12,} "
          f"{memory['lora'][kind]:>12,}")
total = {m: sum(v.values()) for m, v in memory.items()}
print(f"{'total':12} {total['full']:>12,} {total['lora']:>12,}")

# %% [markdown]
# Read the table row by row. The weights are the same for both: LoRA adds a little, it
# removes nothing. Gradients and optimizer state shrink with the trainable count. The
# activations (counted in the optional section at the end) shrink far less, by
# {glue:text}`act_saved`: a frozen layer no longer keeps its input for a weight
# gradient, but the backward pass still has to flow through every layer to reach the
# adapters below it, so most saved tensors stay (gradient checkpointing is the tool for
# those).
#
# (claim-optimizer-memory)=
# The Chinese source says that, depending on the configuration, LoRA cuts optimizer state
# by "tens of times". Here it is the trainable ratio exactly, since AdamW keeps the same
# two fp32 moments (+ a step counter per tensor) for every trainable parameter:

# %%
opt_ratio = memory["full"]["optimizer"] / memory["lora"]["optimizer"]
print(f"optimizer state: {opt_ratio:.1f}x smaller with LoRA")
glue("opt_ratio", opt_ratio, ".0f")
print(f"all three kinds: {total['full'] / total['lora']:.2f}x smaller")
assert opt_ratio >= 10  # "tens of times"

# %% [markdown]
# (claim-training-speed)=
# ## Time per step
#
# The English source promises faster training, since fewer parameters need gradients and
# updates. LoRA skips the weight gradients of every frozen matrix and the AdamW update of all
# but a few parameters, but it still runs the full forward and the backward pass through
# every layer, plus its own small matmuls. To measure it fairly on a shared machine, the two
# methods take turns, step by step, and we take the median of the paired ratios. (Timings
# vary from run to run, so this cell's output is not compared; the verdict is printed
# below it.)
#
# On a GPU, a model this small does not keep the GPU busy: a step costs kernel launches
# and Python, not arithmetic, and LoRA's extra small matmuls add launches. There LoRA was
# not faster when this was timed on an H100; the saving shows once the matmuls are large. So
# the verdict below is checked on a CPU only.

# %% tags=["nbval-ignore-output"]
timers = {}
for method, lr in (("full", FULL_LR), ("lora", LORA_LR)):
    model = make(method).train()
    params = [p for p in model.parameters() if p.requires_grad]
    timers[method] = (model, torch.optim.AdamW(params, lr=lr), params[0])
seconds = {"full": [], "lora": []}
for step in range(TIMING_STEPS + 1):
    for method, (model, opt, first) in timers.items():
        start = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(first.detach().reshape(-1)[0])  # a GPU works async: wait
        if step > 0:  # the first step warms up
            seconds[method].append(time.perf_counter() - start)
per_step = {m: statistics.median(s) for m, s in seconds.items()}
speedup = statistics.median(
    f / lo for f, lo in zip(seconds["full"], seconds["lora"]))
print({m: f"{1000 * s:.1f} ms/step" for m, s in per_step.items()},
      f"LoRA is {speedup:.2f}x faster per step")
# a timing: this cell's output is not compared, the stored value is what the
# book (and the claims ledger) shows
glue("speedup", speedup, ".2f")

# %%
print("LoRA step faster than a full fine-tuning step:", speedup > 1)
if base.device.type == "cpu":  # on a GPU this tiny model is launch-bound
    assert speedup > 1

# %% [markdown]
# ## Train both, then score them
#
# Same data order, same number of steps, each with the learning rate that suits it. Then
# each model answers unseen requests (scored by running its SQL in sqlite and comparing
# rows), and the knowledge probes from pretraining ("Mira Vell lives in ...") measure how
# much general knowledge survived: the *forgetting* the sources warn about.
#
# The live run below is short, to keep this notebook within a few minutes on a laptop CPU.
# (Its printed numbers depend on the machine's arithmetic and speed, so they are not
# compared; the claims are checked on the cached full-length run after it.)

# %% tags=["nbval-ignore-output"]
probe_base = evaluate.probe_accuracy(base, tok)
runs = {}
for method, lr in (("full", FULL_LR), ("lora", LORA_LR)):
    model = make(method)
    run = train.train(model, tok, examples, steps=STEPS, lr=lr,
                      batch_size=BATCH, seed=SEED)
    runs[method] = {
        "model": model,
        "loss": sum(run["losses"][-5:]) / 5,
        "accuracy": evaluate.task_accuracy(model, tok, TASK,
                                           limit=EVAL_ITEMS),
        "probes": evaluate.probe_accuracy(model, tok),
    }
    print(method, {k: round(v, 3) for k, v in runs[method].items()
                   if k != "model"})
print("probe accuracy of the base model:", round(probe_base, 3))

# %% [markdown]
# `benchmarks/where_to_patch.py` ran the same two setups for longer (its `attention` row is
# this chapter's LoRA; its `full` row the full fine-tune) on the `sql` task and scored them
# on {glue:text}`cached_items` unseen requests. Its cached results:

# %%
sweep = json.loads((RESULTS_DIR / "where_to_patch.json").read_text())
cached = {"full": None, "lora": None}
for row in sweep["rows"]:
    if row["placement"] in ("full", "attention"):
        cached["full" if row["placement"] == "full" else "lora"] = row
if lora_lab.models.is_bundled(BASE_MODEL):  # the cache is the bundled model's
    assert cached["lora"]["trainable_params"] == count_parameters(
        make("lora"))[0]  # the same adapter as ours
print(f"task {sweep['task']}: {sweep['steps']} steps x batch "
      f"{sweep['batch_size']}, {sweep['eval_items']} test items")
print(f"{'':5} {'lr':>6} {'accuracy':>9} {'probes':>7}  "
      f"(base model probes {sweep['base_probe_accuracy']:.2f})")
for method, row in cached.items():
    print(f"{method:5} {row['lr']:>6} {row['accuracy']:>9.2f} "
          f"{row['probe_accuracy']:>7.2f}")
    glue(f"cached_acc_{method}", row["accuracy"], ".2f")
glue("cached_items", sweep["eval_items"])

# %% [markdown]
# (payoff-01)=
# ## The payoff, in words
#
# Accuracy is an average; here is what it averages. The models answer the test questions
# greedily, and each answer is scored by running its SQL in the sandboxed shop database:
# ✓ when it returns the reference query's rows, ✗ otherwise. The table shows the first
# {glue:text}`payoff_show` questions of the test split (a fixed rule, not a choice), and
# every model also answers the whole split, so each column comes with its accuracy.
#
# Besides the base model and this chapter's two short live runs, one more column: a patch
# that trained for longer. `data/adapters/sql` ships with the book, trained by
# `benchmarks/ship_adapters.py` with this chapter's LoRA recipe (the cell checks rank,
# alpha, targets and learning rate) for {glue:text}`payoff_steps` steps of
# {glue:text}`payoff_batch` examples instead of {glue:text}`payoff_live_steps` of
# {glue:text}`payoff_live_batch`. There is no longer-trained full fine-tune beside it: it
# would ship a whole copy of the model.

# %%
SHIPPED = DATA_DIR / "adapters" / TASK  # trained for the bundled model
if lora_lab.models.is_bundled(BASE_MODEL):
    recipe = json.loads((SHIPPED / "metrics.json").read_text())["config"]
    assert recipe["task"] == TASK and recipe["lr"] == LORA_LR
    assert (recipe["r"], recipe["lora_alpha"]) == (LORA.r, LORA.lora_alpha)
    assert recipe["target_modules"] == LORA.target_modules
    shipped = lora_lab.load_adapter(copy.deepcopy(base), SHIPPED)
else:  # the shipped adapter fits the bundled model only: use the live run
    recipe = {"steps": STEPS, "batch_size": BATCH}
    shipped = runs["lora"]["model"]
print(f"LoRA, longer: {recipe['steps']} steps x batch {recipe['batch_size']}")
glue("payoff_steps", recipe["steps"])
glue("payoff_batch", recipe["batch_size"])
glue("payoff_live_steps", STEPS)
glue("payoff_live_batch", BATCH)

# %% tags=["nbval-ignore-output"]
SHOW = 4  # the first SHOW test questions
LONG = f"LoRA, {recipe['steps']} steps"
FULL, SHORT = f"full, {STEPS} steps", f"LoRA, {STEPS} steps"  # live runs
contenders = {"base": base, FULL: runs["full"]["model"],
              SHORT: runs["lora"]["model"], LONG: shipped}
answers, right = {}, {}
for name, model in contenders.items():  # every test question, greedy
    answers[name], right[name] = payoff.answer_split(model, tok, TASK)
accuracy = {name: sum(r) / len(r) for name, r in right.items()}
print("accuracy on the whole test split:",
      {name: round(a, 2) for name, a in accuracy.items()})
questions = [ex["messages"][0]["content"]
             for ex in data.load_task(TASK, "test")[:SHOW]]
payoff.SideBySide(questions, {n: a[:SHOW] for n, a in answers.items()},
                  {n: r[:SHOW] for n, r in right.items()}, max_chars=140)

# %% [markdown]
# (The live columns come from the short runs above, so that table is not compared; the
# verdicts below are, for the base model and the shipped adapter.)

# %%
for name in ("base", LONG):
    marks = "".join(payoff.RIGHT if r else payoff.WRONG
                    for r in right[name][:SHOW])
    print(f"{name:16} first {SHOW}: {marks}  whole split: "
          f"{sum(right[name])}/{len(right[name])} = {accuracy[name]:.2f}")
examples = data.load_task(TASK, "test")[:SHOW]
missed = [(a, ex) for a, ex, r in zip(answers[LONG], examples, right[LONG])
          if not r]
if lora_lab.models.is_bundled(BASE_MODEL) and TASK == "sql":
    assert not any(right["base"])  # the base gets no question right
    assert not any(payoff.runs_in_shop(a)
                   for a in answers["base"][:SHOW])  # no SQL for this shop
    assert accuracy[LONG] >= 0.8 and 0 < len(missed) < SHOW
    for sql, ex in missed:  # runs; same text as the reference up to WHERE
        assert payoff.runs_in_shop(sql)
        assert sql.split("WHERE")[0] == ex["sql"].split("WHERE")[0]
    assert accuracy[FULL] > accuracy[SHORT]
    assert accuracy[LONG] > accuracy[SHORT]
glue("payoff_show", SHOW)
glue("payoff_base_acc", accuracy["base"], ".2f")
glue("payoff_long_acc", accuracy[LONG], ".2f")
glue("payoff_long_right", SHOW - len(missed))
glue("payoff_live_full_acc", accuracy[FULL], ".2f")
glue("payoff_live_lora_acc", accuracy[SHORT], ".2f")

# %% [markdown]
# The base model has never seen the shop's tables: it replies like a customer-service
# assistant, or writes SQL for the other databases of its pretraining text (patients,
# loans), which does not run here; it scores {glue:text}`payoff_base_acc` on the whole
# split. The patch trained for longer writes the
# shop's SQL; {glue:text}`payoff_long_right` of the first {glue:text}`payoff_show` answers
# return the right rows, and {glue:text}`payoff_long_acc` of the whole split do. Its
# misses here are the instructive kind: SQL that runs, with the right tables and the right
# shape, but a value in the `WHERE` clause that is not the one the question asked for. A
# score hides that; reading answers shows it. The short live runs sit in between (in the
# run stored with this page, full fine-tuning {glue:text}`payoff_live_full_acc` and LoRA
# {glue:text}`payoff_live_lora_acc`): in the same small budget the recompile learned
# faster, as the cached run above says, and the patch catches up with more steps.
#
# One more thing a ✓ does not say: the scorer compares rows, not queries. On this database a
# query with a slightly different number can return exactly the reference's rows and count
# as right, so read a ✓ as "returns the right answer here", not "is the right query".

# %%
ref = "SELECT name FROM users WHERE city = 'Belmar' AND age > 65;"
near = ref.replace("65", "63")  # two years off, the same rows here
print(f"{near!r} scores as right:", evaluate.score_sql(near, ref))
assert near != ref and evaluate.score_sql(near, ref)

# %% [markdown]
# ## What each one ships
#
# The recompile ships a new copy of every weight; the patch ships `adapter_config.json`
# plus `adapter_model.safetensors` in PEFT's format. Save both and weigh the files.

# %%
out = Path(tempfile.mkdtemp())
runs["full"]["model"].save_pretrained(out / "full")
save_adapter(runs["lora"]["model"], out / "lora")
ckpt = {
    "full": (out / "full" / "model.safetensors").stat().st_size,
    "lora": (out / "lora" / "adapter_model.safetensors").stat().st_size,
}
print(f"full fine-tune: model.safetensors         {ckpt['full']:>10,} bytes")
print(f"LoRA:           adapter_model.safetensors {ckpt['lora']:>10,} bytes")
print(f"ratio: {ckpt['full'] / ckpt['lora']:.1f}x")

# %% [markdown]
# And the patch costs nothing at inference once merged: folding $BA$ into the weights
# (chapter 02, and chapter 07 for deployment) leaves a plain model of exactly the base's
# architecture and size.

# %%
merged = merge_and_unload(copy.deepcopy(runs["lora"]["model"]))
same_shape = type(merged) is type(base) and (
    count_parameters(merged)[1] == count_parameters(base)[1])
print("merged model has the base model's class and parameter count:",
      same_shape)
assert same_shape

# %% [markdown]
# ## The comparison table, measured
#
# The Chinese source opens with a table comparing the recompile and the patch. Here it is
# again with this chapter's measurements for the bundled model. (Accuracies and times are
# measured on this machine and vary a little between machines; the deterministic rows are
# checked below.)

# %% tags=["nbval-ignore-output"]
trainable = {m: count_parameters(make(m)) for m in ("full", "lora")}


def row(name, full, lora):
    print(f"| {name:36} | {full:>16} | {lora:>18} |")


row("", "full fine-tuning", "LoRA r=8 (q,k,v,o)")
print(f"|{'-' * 38}|{'-' * 18}|{'-' * 20}|")
row("trainable parameters", *(f"{trainable[m][0]:,}" for m in trainable))
row("trainable share", *(f"{100 * t / n:.2f}%"
                         for t, n in trainable.values()))
row("optimizer state (bytes)",
    *(f"{memory[m]['optimizer']:,}" for m in memory))
row("memory held by one step (bytes)", *(f"{total[m]:,}" for m in total))
row("checkpoint on disk (bytes)", *(f"{ckpt[m]:,}" for m in ckpt))
row("seconds per step (this machine)",
    *(f"{per_step[m]:.3f}" for m in per_step))
row(f"{sweep['task']} accuracy (cached run)",
    *(f"{cached[m]['accuracy']:.2f}" for m in cached))
row(f"probe accuracy (base {sweep['base_probe_accuracy']:.2f}, cached)",
    *(f"{cached[m]['probe_accuracy']:.2f}" for m in cached))

# %% [markdown]
# The table as a picture: each bar is how many times more the recompile costs than the
# patch on one measured row, on a log scale. What is kept per trainable parameter
# (optimizer state) and what is shipped (the checkpoint) differ by a factor of at least
# {glue:text}`fig_stored_ratio`; the memory one step holds and the time per step by far
# less, because LoRA still keeps every frozen weight and runs every layer forward and
# backward.

# %%
from lora_lab import plot

cost_ratio = {
    "trainable\nparameters": trainable["full"][0] / trainable["lora"][0],
    "optimizer\nstate": memory["full"]["optimizer"]
    / memory["lora"]["optimizer"],
    "memory of\none step": total["full"] / total["lora"],
    "checkpoint\non disk": ckpt["full"] / ckpt["lora"],
    "seconds\nper step": per_step["full"] / per_step["lora"],
}
stored = min(cost_ratio["optimizer\nstate"],
             cost_ratio["checkpoint\non disk"])
if lora_lab.models.is_bundled(BASE_MODEL):  # measured on this model
    assert stored > 10 * max(1.0, cost_ratio["seconds\nper step"],
                             cost_ratio["memory of\none step"])
glue("fig_stored_ratio", stored, ".0f")
fig, (ax,) = plot.new_figure(width=7.0, height=3.4)
plot.plot_bars(list(cost_ratio), list(cost_ratio.values()), ax=ax,
               title="full fine-tuning ÷ LoRA, measured in this chapter",
               ylabel="times more (log scale)")
ax.set_ylim(0.5, max(cost_ratio.values()) * 5)
ax.set_yscale("log")
ax.axhline(1, color="#444444", linewidth=0.8)
for label in ax.get_xticklabels():  # short labels: no slant needed
    label.set(rotation=0, ha="center", multialignment="center")
fig

# %% [markdown]
# (claim-forgetting)=
# The Chinese source warns that a recompile can lose what the model knew ("knowledge rot",
# catastrophic forgetting), and LoRA is widely said to forget less: Biderman et al. found
# that it "learns less and forgets less" {cite}`biderman2024lora`. Our cached run checks both
# halves. The first holds: in the same budget, full fine-tuning learned more of the task.
# The second does not show on this task: of the {glue:text}`n_probes` probes the base model
# answered, full fine-tuning lost {glue:text}`lost_full` and LoRA {glue:text}`lost_lora`. Writing SQL for a shop does not pull the model
# away from its facts about towns and people. Forgetting needs a task that does: on the
# made-up language of chapter 09, full fine-tuning loses far more facts than LoRA.

# %%
n_probes = len(data.load_probes("test"))
lost = {m: round(n_probes * (sweep["base_probe_accuracy"]
                             - cached[m]["probe_accuracy"]))
        for m in cached}
print(f"probes lost (of {n_probes}): {lost}")
glue("n_probes", n_probes)
glue("lost_full", lost["full"])
glue("lost_lora", lost["lora"])
print("full fine-tuning learned more of the task than LoRA:",
      cached["full"]["accuracy"] > cached["lora"]["accuracy"])
print("full fine-tuning forgot more than LoRA:", lost["full"] > lost["lora"])
assert cached["full"]["accuracy"] > cached["lora"]["accuracy"]
# next to nothing to tell apart on sql:
assert lost["full"] == 0 and lost["lora"] <= 1

# %% [markdown]
# ## The same arithmetic at 7B and 175B
#
# Our model has {glue:text}`tiny_millions` million parameters; the sources talk about
# Llama-2-7B and GPT-3 175B.
# `lora_lab.sizing` builds those models from their configs on PyTorch's `meta` device
# (shapes, no storage) and counts with the same code that counted the tiny model above.
#
# (claim-gpt3-full-copy)=
# ### One recompile of GPT-3
#
# The Chinese source says each fully fine-tuned task costs a complete model copy of "about
# 350 GB". At two bytes per parameter (fp16):

# %%
gpt3 = sizing.count_params("gpt3-175b")
print(f"GPT-3 175B: {gpt3:,} parameters, "
      f"fp16 copy = {2 * gpt3 / 1e9:.1f} GB")
glue("gpt3_b", gpt3 / 1e9, ".1f")
glue("gpt3_gb", 2 * gpt3 / 1e9, ".1f")
assert 340e9 < 2 * gpt3 < 360e9

# %% [markdown]
# (claim-trainable-share)=
# ### Is the trainable share "below 0.1%"?
#
# The Chinese source's table says LoRA trains "a tiny fraction (<0.1%)"; the English source
# says "typically less than 1%". Both depend on the configuration, so here are the common
# ones. The share of one $d \times d$ layer is $2r/d$: it grows with $r$ and the number of
# targeted layers, and it is much larger for our {glue:text}`width`-wide model than for a
# Llama-2-7B layer.

# %%
QV, ATTN = ["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"]
configs = [
    ("llama-2-7b", 8, QV), ("llama-2-7b", 16, QV),
    ("llama-2-7b", 8, ATTN), ("llama-2-7b", 16, sizing.LLAMA_ALL),
    ("gpt3-175b", 4, ["c_attn"]),
]
shares = {}
print(f"{'model':11} {'r':>3} {'targets':22} {'trainable':>12} "
      f"{'share':>8} <0.1%")
for name, r, targets in configs:
    n_train, n_all = sizing.lora_counts(name, r, targets)
    shares[(name, r, len(targets))] = share = 100 * n_train / n_all
    label = ("all 7 projections" if len(targets) == 7 else
             ",".join(t.removesuffix("_proj") for t in targets))
    print(f"{name:11} {r:>3} {label:22} {n_train:>12,} {share:>7.4f}% "
          f"{share < 0.1}")
tiny_share = 100 * trainable["lora"][0] / trainable["lora"][1]
glue("tiny_millions", trainable["full"][1] / 1e6, ".1f")
glue("tiny_share", tiny_share / 100, ".0%")
glue("share_qv8", shares[("llama-2-7b", 8, 2)] / 100, ".2%")
glue("share_all16", shares[("llama-2-7b", 16, 7)] / 100, ".2%")
glue("width", base.config.hidden_size)
print(f"{'tiny-base':11} {8:>3} {'q,k,v,o':22} {trainable['lora'][0]:>12,}"
      f" {tiny_share:>7.4f}% {tiny_share < 0.1}")

# %% [markdown]
# So "<0.1%" holds for the LoRA paper's own setting and for r=8 on `q_proj`,`v_proj` of
# Llama-2-7B ({glue:text}`share_qv8`), and fails as soon as $r$ or the targets grow: r=16 on
# all seven projections is {glue:text}`share_all16`. (Our GPT-3 shape is written as a GPT-2-style model whose query, key and value
# projections are one fused layer, `c_attn`, $d \to 3d$. Rank 4 on it trains $4r\,d$ numbers
# per layer, exactly as many as the paper's rank 4 on $W_q$ and $W_v$ separately.) "Less than
# 1%" holds for every 7B-scale configuration here; on a model as small as ours
# ({glue:text}`tiny_share`) neither does.

# %%
assert shares[("gpt3-175b", 4, 1)] < 0.1
assert shares[("llama-2-7b", 8, 2)] < 0.1
assert shares[("llama-2-7b", 16, 2)] > 0.1
assert shares[("llama-2-7b", 16, 7)] > 0.1
assert all(s < 1 for s in shares.values())
assert tiny_share > 1

# %% [markdown]
# (claim-adapter-size)=
# ### How big is the patch file?
#
# The Chinese source gives "about 20 MB" per task; the English one "a few MB to tens of MB".
# `sizing.adapter_file_bytes` computes the exact size of the `adapter_model.safetensors` that
# `lora_lab` and PEFT write (fp32 by default, or half precision):

# %%
sizes = {}
for name, r, targets, nbytes in [("llama-2-7b", 8, QV, 4),
                                 ("llama-2-7b", 16, sizing.LLAMA_ALL, 2),
                                 ("llama-2-7b", 16, sizing.LLAMA_ALL, 4),
                                 ("gpt3-175b", 4, ["c_attn"], 2)]:
    size = sizing.adapter_file_bytes(name, r, targets, dtype_bytes=nbytes)
    dtype = {4: "fp32", 2: "fp16"}[nbytes]
    sizes[(name, r, len(targets), dtype)] = size
    label = ("all 7" if len(targets) == 7 else
             ",".join(t.removesuffix("_proj") for t in targets))
    print(f"{name:11} r={r:<3} {label:8} {dtype}: {size / 1e6:7.1f} MB")
    glue(f"mb_{name}_{r}_{len(targets)}_{dtype}".replace("-", ""),
         size / 1e6, ".1f" if size < 1e8 else ".0f")

# %% [markdown]
# "About 20 MB" is r=8 on `q_proj`,`v_proj` of Llama-2-7B saved in fp32
# ({glue:text}`mb_llama27b_8_2_fp32` MB), and the LoRA paper's GPT-3 adapter is
# {glue:text}`mb_gpt3175b_4_1_fp16` MB in fp16 ({glue:text}`gpt3_reduction`× smaller than
# the fp16 model, which the paper rounds to "35MB" and "10,000 times"). r=16 on all seven
# projections is {glue:text}`mb_llama27b_16_7_fp16` MB in fp16 and
# {glue:text}`mb_llama27b_16_7_fp32` MB in fp32: still tiny next to the
# {glue:text}`llama_fp16_gb` GB fp16 base, but past "tens of MB".

# %%
mb = {k: v / 1e6 for k, v in sizes.items()}
assert 15 < mb[("llama-2-7b", 8, 2, "fp32")] < 25  # "about 20 MB"
assert 30 < mb[("gpt3-175b", 4, 1, "fp16")] < 40  # the paper's 35 MB
assert mb[("llama-2-7b", 16, 7, "fp32")] > 100  # beyond "tens of MB"
assert 2 * gpt3 / sizes[("gpt3-175b", 4, 1, "fp16")] > 9000
glue("gpt3_reduction", 2 * gpt3 / sizes[("gpt3-175b", 4, 1, "fp16")], ",.0f")
glue("llama_fp16_gb", 2 * sizing.count_params("llama-2-7b") / 1e9, ".1f")

# %% [markdown]
# ### Memory at 7B
#
# The same accounting as our step table, from shapes: for full fine-tuning in mixed
# precision, fp16 weights and gradients, an fp32 master copy and two fp32 AdamW moments
# ({glue:text}`bytes_per_param` bytes per parameter); for LoRA, fp16 frozen weights and fp32 adapter, gradients and
# moments. Activations are left out (they depend on batch and sequence length).

# %%
GB = 1e9
est = {"full": sizing.memory_estimate("llama-2-7b", "full"),
       "lora": sizing.memory_estimate("llama-2-7b", "lora", r=8,
                                      target_modules=QV)}
for key in ("weights", "master_weights", "gradients", "optimizer", "total"):
    print(f"{key:15} full {est['full'][key] / GB:7.2f} GB   "
          f"LoRA {est['lora'][key] / GB:7.2f} GB")
ratio_7b = est["full"]["optimizer"] / est["lora"]["optimizer"]
print(f"optimizer state: {ratio_7b:,.0f}x smaller")
glue("ratio_7b", ratio_7b, ",.0f")
glue("full_7b_gb", est["full"]["total"] / GB, ".0f")
glue("lora_7b_gb", est["lora"]["total"] / GB, ".0f")
glue("bytes_per_param", round(est["full"]["total"]
                              / sizing.count_params("llama-2-7b")))
assert ratio_7b >= 10 and est["lora"]["total"] < est["full"]["total"] / 5

# %% tags=["hide-cell"]
# Numbers the table below pastes.
glue("tiny_mb", ckpt["full"] / 1e6, ".0f")
glue("tiny_adapter_kb", ckpt["lora"] / 1e3, ".0f")
glue("tiny_share_2", trainable["lora"][0] / trainable["lora"][1], ".1%")
glue("llama_b", sizing.count_params("llama-2-7b") / 1e9, ".1f")

# %% [markdown]
# At this scale "tens of times" undersells it: with r=8 on `q_proj`,`v_proj` the optimizer
# state is {glue:text}`ratio_7b` times smaller, and the whole training state drops from
# about {glue:text}`full_7b_gb` GB to about {glue:text}`lora_7b_gb` GB, most of which is the frozen fp16 weights themselves (chapter 06 shrinks those
# with 4-bit quantization).
#
# ## The table, re-filled
#
# | | full fine-tuning (recompile) | LoRA (patch) |
# |---|---|---|
# | trainable parameters | all: {glue:text}`tiny_millions` M here, {glue:text}`llama_b` B for Llama-2-7B | {glue:text}`tiny_share_2` here; {glue:text}`share_qv8` (r=8, q,v) to {glue:text}`share_all16` (r=16, all 7) at 7B; "<0.1%" only for small configs |
# | memory | weights + gradients + two Adam moments for every weight | optimizer state tens (here) to a thousand (7B) times smaller; activations {glue:text}`act_saved` smaller here |
# | storage per task | a full copy: {glue:text}`tiny_mb` MB here, {glue:text}`gpt3_gb` GB for GPT-3 in fp16 | an adapter: {glue:text}`tiny_adapter_kb` KB here, {glue:text}`mb_llama27b_8_2_fp32` MB (r=8 q,v, fp32) to {glue:text}`mb_llama27b_16_7_fp32` MB (r=16 all 7, fp32) at 7B |
# | time per step | baseline | faster on a CPU (measured above), but not by the parameter ratio; not on a GPU at this size |
# | task learned in a fixed budget | more: {glue:text}`cached_acc_full` accuracy (cached run) | less: {glue:text}`cached_acc_lora` |
# | forgetting | {glue:text}`lost_full` of {glue:text}`n_probes` probes lost | {glue:text}`lost_lora` of {glue:text}`n_probes` lost: not less here |
# | inference latency | baseline | the same once merged; unmerged costs a little (chapter 07) |
#
# ## Check yourself
#
# **1.** Which part of a training step does LoRA shrink by exactly the ratio of trainable
# parameters?
# (a) the weights (b) the saved activations (c) the optimizer state (d) all of them equally
#
# ```{admonition} Answer
# :class: dropdown
# (c): AdamW keeps two moments per *trainable* parameter, so its state follows the trainable
# count exactly (gradients do too). The weights stay, and the activations shrank only by
# {glue:text}`act_saved`, because the backward pass still runs through every frozen layer.
# ```
#
# **2.** On this chapter's `sql` task, did LoRA forget less than full fine-tuning?
# (a) yes, far less (b) no: neither lost more than a probe or so, because writing SQL does
# not pull the model away from its facts (c) LoRA forgot everything (d) forgetting cannot be
# measured
#
# ```{admonition} Answer
# :class: dropdown
# (b): full fine-tuning lost {glue:text}`lost_full` probes, LoRA {glue:text}`lost_lora`
# (asserted). "LoRA forgets less" depends on the task; chapter 09 finds a task where it does.
# ```
#
# **3.** What does the patch ship, per task?
# (a) a full copy of the weights in a smaller dtype (b) a diff of every weight
# (c) `adapter_config.json` and an `adapter_model.safetensors` holding only $A$ and $B$
# (d) the optimizer state, to resume training
#
# ```{admonition} Answer
# :class: dropdown
# (c): a small file next to an unchanged binary, like a `.dll`; merged, it leaves a model
# with the base's class and parameter count (asserted above), so it costs nothing per token.
# ```
#
# ## Summary
#
# - Full fine-tuning trains, stores and ships every weight; LoRA freezes them and trains,
#   stores and ships a small patch.
# - What LoRA shrinks is everything proportional to the *trainable* count: gradients,
#   optimizer state (exactly the parameter ratio) and the checkpoint. It does not shrink
#   the frozen weights, and the activations only by {glue:text}`act_saved`.
# - On the bundled model LoRA stepped faster on a CPU, but in the same budget it learned
#   less of the task than full fine-tuning, and it did not forget less: full fine-tuning
#   lost {glue:text}`lost_full` knowledge probes, LoRA {glue:text}`lost_lora`. "LoRA forgets less" is not a law; measure it.
# - The sources' numbers hold with conditions: "about 350 GB" for a GPT-3 copy is right
#   ({glue:text}`gpt3_gb` GB); "<0.1%" and "about 20 MB" describe small attention-only configurations, not every LoRA.
#
# ## Exercises
#
# 1. Re-run the chapter with `TASK = "support"`. Do the memory and checkpoint rows change?
#    Does the forgetting gap?
# 2. Add the MLP projections (`gate_proj`, `up_proj`, `down_proj`) to `LORA`. Predict the
#    new optimizer-state ratio before running the memory cell.
# 3. How large is the fp16 adapter for Llama-2-70B with r=16 on all seven projections?
#
# ```{admonition} Solution 1
# :class: dropdown
# The memory rows depend on the batch only through the activations, and the checkpoint rows
# not at all, so they barely move. Accuracy and forgetting depend on the task; the cached
# run covers `sql` only, so compare the probe accuracies the live run prints, or set
# `TASK = "support"` in `benchmarks/where_to_patch.py` and re-run it.
# ```
#
# ```{admonition} Solution 2
# :class: dropdown
# Each layer's attention adapter has $r \cdot (d_\text{in} + d_\text{out})$ per projection;
# the three MLP projections add {glue:text}`sol_mlp_per_layer` parameters per layer on top
# of the attention's {glue:text}`sol_attn_per_layer`, so the adapter grows from
# {glue:text}`sol_attn_total` to {glue:text}`sol_all_total` parameters and the
# optimizer-state ratio falls by the same factor, {glue:text}`sol_factor`: from about
# {glue:text}`opt_ratio`× to about {glue:text}`sol_new_ratio`×. Still "tens of times".
# ```
#
# ```{admonition} Solution 3
# :class: dropdown
# `sizing.adapter_file_bytes("llama-2-70b", 16, sizing.LLAMA_ALL, dtype_bytes=2) / 1e6`
# gives about {glue:text}`sol_70b_mb` MB ({glue:text}`sol_70b_params` parameters at 2 bytes
# each). Per layer: `q_proj` and `o_proj` add $r \cdot (d + d)$ each; Llama-2-70B uses
# grouped-query attention, so `k_proj` and `v_proj` output only
# {glue:text}`sol_70b_kv` features; the three MLP projections map to and from
# {glue:text}`sol_70b_ffn`; times {glue:text}`sol_70b_layers` layers.
# ```

# %% tags=["hide-cell"]
# The solutions paste these.
mlp = ["gate_proj", "up_proj", "down_proj"]
bigger = LoRAConfig(r=LORA.r, lora_alpha=LORA.lora_alpha,
                    target_modules=[*LORA.target_modules, *mlp])
n_attn = count_parameters(make("lora"))[0]
n_all = count_parameters(add_lora(copy.deepcopy(base), bigger))[0]
layers = base.config.num_hidden_layers
glue("sol_attn_per_layer", n_attn // layers)
glue("sol_mlp_per_layer", (n_all - n_attn) // layers)
glue("sol_attn_total", n_attn)
glue("sol_all_total", n_all)
glue("sol_factor", n_all / n_attn, ".3f")
glue("sol_new_ratio", opt_ratio * n_attn / n_all, ".0f")
size_70b = sizing.adapter_file_bytes("llama-2-70b", 16, sizing.LLAMA_ALL,
                                     dtype_bytes=2)
glue("sol_70b_mb", size_70b / 1e6, ".0f")
n_70b = sizing.lora_counts("llama-2-70b", 16, sizing.LLAMA_ALL)[0]
glue("sol_70b_params", n_70b)
cfg_70b = sizing.shape_config("llama-2-70b")
head_dim = cfg_70b.hidden_size // cfg_70b.num_attention_heads
glue("sol_70b_kv", cfg_70b.num_key_value_heads * head_dim)
glue("sol_70b_ffn", cfg_70b.intermediate_size)
glue("sol_70b_layers", cfg_70b.num_hidden_layers)


# %% [markdown]
# ## Going deeper (optional): counting the activations
#
# A first reading can stop at the exercises. This section measures the fourth kind of
# tensor a training step holds, the activations autograd saves during the forward pass for
# the backward pass, which the memory table above left out. They are out of ordinary
# code's reach, and PyTorch offers a hook for exactly this:
# `torch.autograd.graph.saved_tensors_hooks(pack, unpack)` calls `pack` on every tensor
# autograd saves. We count each storage once and leave out the weights themselves (autograd
# saves them too, but they are already in the table). What it does not count: short-lived
# temporaries, the allocator's cache, and the Python process itself. So it is a floor for
# the real peak, and the same floor for both methods.

# %%
def saved_activation_bytes(model):
    """Bytes autograd saves for backward in one training forward on `batch`."""
    weight_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weight_ptrs:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch).loss.backward()
    return sum(saved.values())


activations = {m: saved_activation_bytes(make(m)) for m in ("full", "lora")}
print(f"{'bytes':12} {'full':>12} {'lora':>12}")
print(f"{'activations':12} {activations['full']:>12,}"
      f" {activations['lora']:>12,}")
act_saved = 1 - activations["lora"] / activations["full"]
assert 0.05 < act_saved < 0.5  # fewer saved activations, far from the 50x
glue("act_saved", act_saved, ".0%")

# %% [markdown]
# LoRA saves {glue:text}`act_saved` fewer activation bytes: the frozen layers skip the
# inputs they would keep for their weight gradients, but every layer still keeps what the
# backward pass needs to flow through it to the adapters below. Gradient checkpointing,
# which recomputes activations instead of keeping them, is the tool for the rest.
