# %% [markdown]
# # 03 · Where to patch
#
# A patch has to go somewhere. A transformer layer offers several linear layers LoRA can
# wrap, and which ones you pick decides how much the patch can change, how big the file
# gets and how much it costs to train. The sources give the usual map:
#
# - **attention** (`q_proj`, `k_proj`, `v_proj`, `o_proj`): the classic target, and the
#   original paper's choice {cite}`hu2021lora`. These layers decide which earlier tokens
#   each token reads from, so patching them reroutes the flow of information.
# - **feed-forward network** (`gate_proj`, `up_proj`, `down_proj`): where each token's
#   features are transformed; patching it adds capacity to learn task-specific patterns.
#   Current practice often patches both.
# - **embeddings and output head** (`embed_tokens`, `lm_head`): tied to the vocabulary;
#   not recommended by default, because they make the adapter file much larger for little
#   gain.
#
# This chapter measures each choice on the bundled model: task accuracy against trainable
# parameters against adapter file size.
#
# **Learning goals**
# - name the linear layers of a Llama block and choose LoRA targets by name;
# - predict the trainable count of a placement from the layer shapes;
# - read a measured trade-off between accuracy, trainable parameters and file size;
# - see exactly why an embedding or head patch bloats the adapter file.

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
R, ALPHA = 8, 16  # the same rank and scale for every placement
LIVE_PLACEMENT = "ffn"  # placement trained live at the end
LIVE_STEPS = 15  # its training steps (the cached sweep used more)

# %%
import lora_lab  # first: it keeps known library noise out of outputs

import json
import tempfile
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from peft import LoraConfig, get_peft_model

from lora_lab import data, plot, train
from lora_lab.adapters import save_adapter
from lora_lab.inject import LoRAConfig, add_lora, count_parameters
from lora_lab.inject import linear_module_names
from lora_lab.paths import RESULTS_DIR
from lora_lab.prose import bootstrap_accuracy_diff, glue

lora_lab.seed_everything(SEED)
print(lora_lab.runtime.describe())

# %% [markdown]
# ## The candidates
#
# `linear_module_names` lists every layer LoRA could wrap. Here is one block of the bundled
# model, plus the two vocabulary-sized layers at either end.
#
# Targets are chosen by name, the way a preloaded library (`LD_PRELOAD`) overrides a
# program's functions by their symbol names: every layer whose name matches an entry of
# `target_modules` is swapped, on the live model, for a LoRA wrapper around it (chapter 02's
# monkey-patching), and every other layer runs as it was.

# %%
base, tok = lora_lab.load_base(BASE_MODEL)
names = linear_module_names(base)
block = [n for n in names if ".layers.0." in n]
for name in block + ["lm_head"]:
    w = base.get_submodule(name).weight
    print(f"{name:32} weight {tuple(w.shape)}")
emb = base.get_input_embeddings().weight
print(f"{'model.embed_tokens':32} weight {tuple(emb.shape)}")
print(f"{len(base.model.layers)} blocks, "
      f"{count_parameters(base)[1]:,} parameters in all")
glue("vocab", emb.shape[0])
glue("hidden", emb.shape[1])

# %% [markdown]
# Where those layers sit in one block, drawn for two placements: PEFT's default for
# Llama-family models (the query and value projections only) and every linear layer. Grey is
# the binary, left as it shipped; orange marks the layers that get a patch. Each box carries
# its shape, read from the model above (in → out).

# %%
from peft.utils.constants import (
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS)

from lora_lab import diagrams

peft_default = PEFT_DEFAULTS["llama"]
assert peft_default == ["q_proj", "v_proj"]
block_shapes = {n.split(".")[-1]: tuple(base.get_submodule(n).weight.shape)
                for n in block}
diagrams.transformer_block(
    {"PEFT's default for Llama: q, v": peft_default,
     "all-linear": [*diagrams.ATTENTION, *diagrams.MLP]},
    shapes=block_shapes)

# %% [markdown]
# A LoRA patch on a layer with $d_\text{in}$ inputs and $d_\text{out}$ outputs trains
# $r\,(d_\text{in} + d_\text{out})$ numbers. So before training anything we can predict every
# placement's trainable count from the shapes above. The five placements of this chapter:

# %%
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
FFN = ["gate_proj", "up_proj", "down_proj"]
PLACEMENTS = {
    "q,v": ["q_proj", "v_proj"],
    "attention": ATTN,
    "ffn": FFN,
    "all-linear": "all-linear",
    "all-linear+embed+head": [*ATTN, *FFN, "embed_tokens", "lm_head"],
}


def predicted(targets):
    """r * (d_in + d_out) summed over the layers `targets` selects."""
    total = 0
    for name, module in base.named_modules():
        hit = targets == "all-linear" and name in names and name != "lm_head"
        hit = hit or (isinstance(targets, list)
                      and name.split(".")[-1] in targets)
        if hit:
            d_out, d_in = module.weight.shape
            total += R * (d_in + d_out)
    return total


for placement, targets in PLACEMENTS.items():
    print(f"{placement:22} {predicted(targets):>9,} trainable")
gate_out, gate_in = base.model.layers[0].mlp.gate_proj.weight.shape
glue("gate_in", gate_in)
glue("gate_out", gate_out)
glue("gate_per_block", R * (gate_in + gate_out))
glue("gate_total", predicted(["gate_proj"]))
glue("n_qv", predicted(PLACEMENTS["q,v"]))
glue("n_ffn", predicted(PLACEMENTS["ffn"]))
glue("r", R)
glue("live_steps", LIVE_STEPS)

# %% [markdown]
# ## Build each placement and weigh its file
#
# Trainable counts and file sizes do not depend on training, so we can check them right
# away. `lora_lab` builds the first four. It does not do LoRA on embeddings, so the last
# row is PEFT's: it wraps `embed_tokens` in a LoRA embedding layer and `lm_head` in a LoRA
# linear layer.

# %%
def build(placement):
    lora_lab.seed_everything(SEED)
    model, _ = lora_lab.load_base(BASE_MODEL)
    targets = PLACEMENTS[placement]
    if placement == "all-linear+embed+head":
        config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets)
        return get_peft_model(model, config)
    return add_lora(model, LoRAConfig(r=R, lora_alpha=ALPHA,
                                      target_modules=targets))


def file_bytes(model, **kwargs):
    with tempfile.TemporaryDirectory() as tmp:
        if hasattr(model, "peft_config"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.save_pretrained(tmp, **kwargs)
        else:
            save_adapter(model, tmp)
        return (Path(tmp) / "adapter_model.safetensors").stat().st_size


live_sizes = {}
for placement in PLACEMENTS:
    model = build(placement)
    trainable = count_parameters(model)[0]
    assert trainable == predicted(PLACEMENTS[placement])
    live_sizes[placement] = (trainable, file_bytes(model))
    print(f"{placement:22} {trainable:>9,} trainable  "
          f"{live_sizes[placement][1]:>10,} bytes on disk")

# %% [markdown]
# The first four files grow in step with the trainable count: 4 bytes per fp32 number plus
# a small header. The last one jumps. PEFT's `save_pretrained` has an option
# `save_embedding_layers`, `"auto"` by default: when `embed_tokens` or `lm_head` is a
# target, it saves the **whole** embedding and head weights alongside the patch, since a
# patched vocabulary layer usually goes with a resized vocabulary. Those two matrices are
# two vocabulary-by-width matrices ({glue:text}`vocab` × {glue:text}`hidden` each), more than
# the rest of the adapter many times over.
# Saving with `save_embedding_layers=False` leaves them out:

# %%
peft_model = build("all-linear+embed+head")
lean = file_bytes(peft_model, save_embedding_layers=False)
vocab_weights = 2 * emb.numel() * 4
print(f"default save:                 "
      f"{live_sizes['all-linear+embed+head'][1]:>10,} bytes")
print(f"save_embedding_layers=False:  {lean:>10,} bytes")
print(f"embedding + head weights:     {vocab_weights:>10,} bytes")
extra = live_sizes["all-linear+embed+head"][1] - lean
assert abs(extra - vocab_weights) < 1000  # the difference is those weights
LLAMA_VOCAB, LLAMA_WIDTH = 32000, 4096  # Llama-2-7B's published config
llama_vocab_bytes = 2 * LLAMA_VOCAB * LLAMA_WIDTH * 4
glue("llama_vocab", LLAMA_VOCAB, "d")
glue("llama_width", LLAMA_WIDTH, "d")
glue("ci", 95)
glue("llama_vocab_gb", llama_vocab_bytes / 1e9, ".1f")

# %% [markdown]
# On Llama-2-7B the same two matrices are {glue:text}`llama_vocab` × {glue:text}`llama_width`
# numbers each:
# {glue:text}`llama_vocab_gb` GB in fp32 riding along in what should be a megabyte-sized patch.
# The patch has stopped being a patch: it carries a copy of part of the binary.
#
# ## The measured trade-off
#
# `benchmarks/where_to_patch.py` trains each placement on the `sql` task with the same
# rank, learning rate, steps and data order, then scores unseen requests and the
# knowledge probes; as a reference it also fine-tunes every weight with the same budget
# (at its own learning rate; its "adapter file" is the whole model). Its cached results, after
# checking they describe the same adapters we just built (the cached run may leave out the
# slow PEFT placement; the cell says so):

# %%
sweep = json.loads((RESULTS_DIR / "where_to_patch.json").read_text())
rows = {row["placement"]: row for row in sweep["rows"]}
full = rows.pop("full")  # the reference row: full fine-tuning, same budget
for placement, row in rows.items():  # the cache is the bundled model's
    trainable, size = live_sizes[placement]
    if lora_lab.models.is_bundled(BASE_MODEL):
        assert row["trainable_params"] == trainable, placement
        assert row["adapter_bytes"] == size, placement
print("not trained in the cached sweep:",
      ", ".join(p for p in PLACEMENTS if p not in rows) or "none")
print(f"task {sweep['task']}, r={sweep['r']}, alpha={sweep['lora_alpha']}, "
      f"{sweep['steps']} steps x batch {sweep['batch_size']}, "
      f"lr {sweep['lr']}, {sweep['eval_items']} test items")
print(f"{'placement':22} {'trainable':>9} {'file KB':>8} {'accuracy':>8} "
      f"{'probes':>6}")
for placement, row in rows.items():
    print(f"{placement:22} {row['trainable_params']:>9,} "
          f"{row['adapter_bytes'] / 1000:>8.0f} {row['accuracy']:>8.2f} "
          f"{row['probe_accuracy']:>6.2f}")
print(f"{'full fine-tuning':22} {full['trainable_params']:>9,} "
      f"{full['adapter_bytes'] / 1000:>8.0f} {full['accuracy']:>8.2f} "
      f"{full['probe_accuracy']:>6.2f}")
print(f"(base model probe accuracy: {sweep['base_probe_accuracy']:.2f})")
N_ITEMS = sweep["eval_items"]
glue("n_items", N_ITEMS)
for placement, row in [*rows.items(), ("full", full)]:
    key = placement.replace(",", "").replace("+", "_").replace("-", "_")
    glue(f"acc_{key}", row["accuracy"], ".3f")
    glue(f"kb_{key}", row["adapter_bytes"] / 1000, ".0f")
    glue(f"probes_{key}", row["probe_accuracy"], ".2f")

# %%
fig, axes = plot.new_figure(ncols=2, width=4.6, height=3.5)
with plt.rc_context(plot.BOOK_STYLE):
    for i, (placement, row) in enumerate(rows.items()):
        for ax, key in zip(axes, ("trainable_params", "adapter_bytes")):
            ax.scatter(row[key] / 1000, row["accuracy"], s=60,
                       color=plot.COLORS[i], label=placement, zorder=3)
    for ax in axes:
        ax.axhline(full["accuracy"], color="#999999", ls="--", lw=1,
                   label="full fine-tuning")
        ax.set_xscale("log")
    axes[0].set_xlabel("trainable parameters (thousands)")
    axes[1].set_xlabel("adapter file (KB, default save)")
    for ax in axes:
        ax.set_ylabel(f"{sweep['task']} test accuracy")
        ax.set_ylim(0, 1.02)
    axes[0].legend(loc="upper left", ncol=2)
    fig.suptitle(f"LoRA r={sweep['r']}: where the patch goes")
fig

# %% [markdown]
# (claim-where-to-patch)=
# What the sweep says, checked against the sources' map. Each accuracy is measured on
# {glue:text}`n_items` test items, so each carries sampling noise: the cell below bootstraps
# the items ({glue:text}`ci`% intervals) and picks the words.
#
# 1. **Attention is the classic target; all four projections
#    {glue:text}`attn_vs_qv_word` two.** The LoRA paper patched $W_q$ and $W_v$
#    {cite}`hu2021lora`. At the same rank, all four attention projections scored
#    {glue:text}`acc_attention` against {glue:text}`acc_qv` for q,v: a difference of
#    {glue:text}`attn_vs_qv_diff`, with a {glue:text}`ci`% interval of {glue:text}`attn_vs_qv_lo` to
#    {glue:text}`attn_vs_qv_hi` over the test items. {glue:text}`attn_vs_qv_sentence`
# 2. **The FFN adds capacity.** Its three layers are wider, so the same rank trains more
#    numbers there, and patching every linear layer (attention + FFN) learns the task
#    {glue:text}`all_vs_attn_word` attention alone ({glue:text}`acc_all_linear` against
#    {glue:text}`acc_attention`, {glue:text}`ci`% interval of the difference {glue:text}`all_vs_attn_lo`
#    to {glue:text}`all_vs_attn_hi`).
# 3. **Embeddings and the head bloat the file, and cost knowledge.** Adding them adds few
#    trainable numbers but, saved the default way, multiplies the adapter file several times
#    (measured live above, no training needed). On this task they scored
#    {glue:text}`acc_all_linear_embed_head` against all-linear's {glue:text}`acc_all_linear`,
#    and paid in general knowledge: probes {glue:text}`probes_all_linear_embed_head`, the
#    lowest of any placement, by far. The other placements lost at most
#    {glue:text}`others_lost` of the {glue:text}`n_probes` probes.
#
# And the best patches come close to recompiling, without matching it: all-linear LoRA
# scored {glue:text}`acc_all_linear` against full fine-tuning's {glue:text}`acc_full`,
# {glue:text}`full_gap_items` of the {glue:text}`n_items` questions behind ({glue:text}`ci`% interval of
# the gap {glue:text}`full_gap_lo` to {glue:text}`full_gap_hi`: {glue:text}`full_gap_word`),
# training under a twentieth of its numbers. q,v alone stays well below. Chapter 04 shows
# what rank and scale change, and chapter 09 where a small patch stops being enough.

# %%
acc = {p: row["accuracy"] for p, row in rows.items()}
size = {p: row["adapter_bytes"] for p, row in rows.items()}
n = {p: row["trainable_params"] for p, row in rows.items()}
others_probes = min(r["probe_accuracy"] for p, r in rows.items()
                    if p != "all-linear+embed+head")
checks = {
    "attention (4) scores above q,v (2)": acc["attention"] > acc["q,v"],
    "ffn trains more numbers than attention": n["ffn"] > n["attention"],
    "all-linear beats attention": acc["all-linear"] > acc["attention"],
    "embed+head file > 5x all-linear file":
        size["all-linear+embed+head"] > 5 * size["all-linear"],
    "embed+head adds < 50% trainable":
        n["all-linear+embed+head"] < 1.5 * n["all-linear"],
    "embed+head beats all-linear by < 0.1":
        0 < acc["all-linear+embed+head"] - acc["all-linear"] < 0.1,
    "embed+head forgets the most (probes)":
        rows["all-linear+embed+head"]["probe_accuracy"] < others_probes - 0.05,
    "others lose at most 1 of 144 probes": others_probes >= 1 - 1.5 / 144,
    "all-linear within 0.06 of full fine-tuning":
        abs(acc["all-linear"] - full["accuracy"]) <= 0.06,
    "q,v more than 0.1 below full fine-tuning":
        acc["q,v"] < full["accuracy"] - 0.1,
    "all-linear trains < 5% of full's numbers":
        n["all-linear"] < 0.05 * full["trainable_params"],
}
for claim, ok in checks.items():
    print(f"{claim:40} {ok}")
assert all(checks.values())


def versus(key, a, b):
    """Bootstrap acc a - acc b; is the difference clear of zero?"""
    diff, lo, hi = bootstrap_accuracy_diff(a, b, N_ITEMS)
    for name, value in (("diff", diff), ("lo", lo), ("hi", hi)):
        glue(f"{key}_{name}", value, "+.3f")
    clear = lo > 0 or hi < 0
    print(f"{key}: {diff:+.3f}, 95% interval {lo:+.3f} to {hi:+.3f}")
    return diff, clear


diff, clear = versus("attn_vs_qv", acc["attention"], acc["q,v"])
assert diff > 0  # attention scored higher on this run...
glue("attn_vs_qv_word", "beat" if clear else "scored above",
     zh="胜过" if clear else "得分高于")
glue("attn_vs_qv_summary", "a clear difference" if clear
     else "a difference inside the test set's noise",
     zh="差异明确" if clear else "差异在测试集的噪声之内")
glue("attn_vs_qv_sentence", "The interval excludes no difference." if clear
     else "The interval covers zero: on this many items the two placements are "
          "not told apart, and the sources' ordering is not confirmed here.",
     zh="区间不含零：两者确有差异。" if clear
     else "区间包含零：在这么多道题上分不出两种放法的高下，"
          "原文给出的排序在这里没有得到证实。")
diff, clear = versus("all_vs_attn", acc["all-linear"], acc["attention"])
assert diff > 0
glue("all_vs_attn_word", "clearly better than" if clear else "better than",
     zh="明显优于" if clear else "优于")
diff, clear = versus("full_gap", full["accuracy"], acc["all-linear"])
assert diff > 0  # full fine-tuning scored higher: all-linear did not match it
glue("full_gap_items", round(diff * N_ITEMS))
glue("full_gap_word", "a real gap" if clear else "within the noise",
     zh="是真实的差距" if clear else "在噪声之内")
N_PROBES = len(data.load_probes("test"))
glue("n_probes", N_PROBES)
glue("others_lost", round((1 - others_probes) * N_PROBES))
glue("full_vs_all_params",
     full["trainable_params"] / n["all-linear"], ".0f")

# %% [markdown]
# More targets are not free: every placement adds trainable parameters, optimizer state
# and file size, and a bigger patch can also overfit a small data set. Choosing targets is
# an engineering trade-off like choosing $r$ (chapter 04). A reasonable default is what
# this sweep and current practice agree on: all linear layers of the blocks, and neither
# the embedding nor the head unless the vocabulary itself has to change.
#
# ## See one placement train
#
# A short live run of one placement (`LIVE_PLACEMENT`), with fewer steps than the sweep.
# The loss is printed as it trains (that output varies with the machine's speed, so it is
# not compared); the cell after it checks that the patch learned something: the mean loss
# of the last three steps is at least a fifth below that of the first three.

# %% tags=["nbval-ignore-output"]
model = build(LIVE_PLACEMENT)
run = train.train(model, tok, data.load_task(sweep["task"], "train"),
                  steps=LIVE_STEPS, lr=sweep["lr"],
                  batch_size=sweep["batch_size"], seed=SEED)
print(f"{LIVE_PLACEMENT}: loss {run['losses'][0]:.3f} -> "
      f"{run['losses'][-1]:.3f} in {run['seconds']:.1f} s")

# %%
first = sum(run["losses"][:3]) / 3
last = sum(run["losses"][-3:]) / 3
print("loss fell by at least a fifth:", last < 0.8 * first)
if lora_lab.models.is_bundled(BASE_MODEL):  # measured on the bundled model
    assert last < 0.8 * first

# %% [markdown]
# ## Check yourself
#
# **1.** A LoRA patch of rank $r$ goes on a layer with $d_\text{in}$ inputs and
# $d_\text{out}$ outputs. How many numbers does it train?
# (a) $r \cdot d_\text{in} \cdot d_\text{out}$ (b) $r\,(d_\text{in} + d_\text{out})$
# (c) $d_\text{in} + d_\text{out}$ (d) $2r$
#
# ```{admonition} Answer
# :class: dropdown
# (b): $A$ is $r \times d_\text{in}$, $B$ is $d_\text{out} \times r$. The chapter predicted
# every placement's count from the shapes and asserted it against the built models, which is
# why the wider FFN layers cost more at the same rank.
# ```
#
# **2.** You add `embed_tokens` and `lm_head` to the targets and save with PEFT's defaults.
# What happens?
# (a) the trainable count doubles and the file grows a little (b) few extra trainable
# numbers, but a file several times larger, since the whole vocabulary matrices are saved
# too (c) nothing changes (d) the file shrinks
#
# ```{admonition} Answer
# :class: dropdown
# (b): asserted above: under half again as many trainable numbers, more than five times
# the all-linear file, and on this task the most forgotten probes of any placement.
# ```
#
# **3.** Does `target_modules="all-linear"` patch the output head `lm_head`?
# (a) yes, it is a linear layer (b) no: PEFT's "all-linear" leaves out the output layer, and
# `lora_lab` follows it (c) only when the vocabulary is resized (d) only with `modules_to_save`
#
# ```{admonition} Answer
# :class: dropdown
# (b): the predicted count for "all-linear" skips `lm_head`, and it matched the built model
# (asserted). Name `lm_head` explicitly when a task needs it.
# ```
#
# ## Summary
#
# - Targets are chosen by layer name; a patch on a $d_\text{in} \to d_\text{out}$ layer
#   trains $r(d_\text{in} + d_\text{out})$ numbers, so wider layers cost more at the same
#   rank.
# - On the bundled model, at one rank and one budget, more placements scored higher: q,v
#   ({glue:text}`acc_qv`) below all four attention projections ({glue:text}`acc_attention`,
#   {glue:text}`attn_vs_qv_summary`), below every linear layer
#   ({glue:text}`acc_all_linear`). All-linear LoRA came within {glue:text}`full_gap_items`
#   questions of full fine-tuning ({glue:text}`acc_full`) but did not match it
#   ({glue:text}`full_gap_word`), and full fine-tuning trains {glue:text}`full_vs_all_params`
#   times as many numbers.
# - LoRA on the embedding and head adds few trainable numbers but, saved PEFT's default way,
#   ships the full vocabulary matrices in the adapter file: here several times the size of
#   everything else, on Llama-2-7B a gigabyte.
# - After adding tokens, load such an adapter onto a base resized to the same vocabulary: {ref}`troubleshooting <trouble-vocab>`.
#
# ## Exercises
#
# 1. Predict, then check with `count_parameters`, the trainable count of `R` on
#    `gate_proj` alone.
# 2. Train the live cell with `LIVE_PLACEMENT = "q,v"` and the same steps. Is its loss
#    after {glue:text}`live_steps` steps higher or lower than the FFN's?
# 3. Why does "all-linear" leave out `lm_head`, even though it is a linear layer?
#
# ```{admonition} Solution 1
# :class: dropdown
# `gate_proj` maps {glue:text}`gate_in` to {glue:text}`gate_out`, so at r={glue:text}`r`
# each block adds $r \cdot (d_\text{in} + d_\text{out})$ = {glue:text}`gate_per_block` and
# the whole model {glue:text}`gate_total`. Check it with
# `count_parameters(add_lora(lora_lab.load_base()[0], LoRAConfig(r=8,
# target_modules=["gate_proj"])))[0]`.
# ```
#
# ```{admonition} Solution 2
# :class: dropdown
# Set `LIVE_PLACEMENT = "q,v"` in the parameters cell and re-run from there. q,v trains
# {glue:text}`n_qv` numbers against the FFN's {glue:text}`n_ffn` and usually ends the
# {glue:text}`live_steps` steps with a higher loss;
# the cached sweep shows where each placement ends up with more steps.
# ```
#
# ```{admonition} Solution 3
# :class: dropdown
# PEFT defines "all-linear" as every linear layer except the output layer, and `lora_lab`
# follows it: the head is vocabulary-sized (here {glue:text}`vocab` × {glue:text}`hidden`,
# on Llama-2-7B {glue:text}`llama_vocab` × {glue:text}`llama_width`),
# so patching it costs as much as several blocks, and changing the output vocabulary is
# rarely what a task needs. Name `lm_head` explicitly when it is.
# ```
