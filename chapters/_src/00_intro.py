# %% [markdown]
# # 00 · The billion-parameter binary
#
# A pretrained language model is the biggest binary you will ever be asked to customise:
# billions of numbers, "compiled" by an expensive pretraining run. This chapter sizes that
# binary, sets up the two ways of changing it — recompile (full fine-tuning) or patch
# (LoRA) — and introduces the small model every later chapter patches for real.
#
# **Learning goals**
# - run the book's notebooks three ways: read, Colab GPU, local CPU;
# - count the parameters of a 7-billion-parameter model without downloading it;
# - meet the tiny base model: its size, what it knows, and what it cannot do yet.
#
# **How to run this book.** (1) Read it: every output on these pages came from running the
# notebook as shown. (2) Colab: the rocket icon opens this notebook on a GPU; the first
# (hidden) cell installs LoRA Lab and keeps Colab's torch. (3) Locally and offline:
# `make lab` in a clone; everything runs on a laptop CPU in minutes.
#
# **Who this book is for.** Software engineers who know what a compiler, a linker and a
# shared library are, and need no machine learning beyond that. One of the book's two
# sources was written in Chinese for Go programmers; if that is you, your toolchain already
# holds the book's central choice. `go build` links a program and all its Go packages into
# one self-contained executable, which is what merging an adapter does, and the `plugin`
# package opens a `.so` built with `-buildmode=plugin` in a running program, which is what
# switching adapters does (chapter 07 compares the two). The code is Python; the
# engineering is yours.

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
BASE_MODEL = None  # None = the bundled tiny model; or a Hub id / local path
# On a Colab GPU try "HuggingFaceTB/SmolLM2-360M-Instruct" (Llama family,
# fits a T4); the asserts about the bundled model are then skipped.
SEED = 0

# %%
import lora_lab

lora_lab.seed_everything(SEED)
print(lora_lab.runtime.describe())

# %% [markdown]
# ## The map
#
# The chapters in reading order, drawn from the book's table of contents: first why a patch
# beats a recompile and what is inside one, then how to make one with the standard tools,
# then how to ship it and where it stops working. You are at the highlighted box.

# %%
import json
from pathlib import Path

import yaml

from lora_lab import diagrams

toc = yaml.safe_load(Path("../_toc.yml").read_text())
stems = [Path(c["file"]).name for part in toc["parts"]
         for c in part["chapters"] if c["file"].startswith("chapters/")]


def title_of(stem):
    """('00', 'The billion-parameter binary') from a notebook's heading."""
    cell = json.loads(Path(f"{stem}.ipynb").read_text())["cells"][0]
    heading = "".join(cell["source"]).splitlines()[0]
    number, title = heading.removeprefix("# ").split(" · ", 1)
    return number, title


chapters = [title_of(stem) for stem in stems]
assert chapters[0][0] == "00" and len(chapters) == len(stems)
diagrams.book_map(chapters, here="00")

# %% [markdown]
# ## A 7B model is a config file first
#
# Before any weights exist, a model is a shape. PyTorch's `meta` device holds tensors with
# shapes but no storage, so we can build the whole Llama-2-7B module tree and count every
# parameter in a second, with nothing downloaded. `lora_lab.sizing` does this for the shapes
# shipped in `data/model_shapes/`.

# %%
from lora_lab import sizing
from lora_lab.prose import glue

for name in ("llama-2-7b", "llama-2-13b", "llama-2-70b", "gpt3-175b"):
    n = sizing.count_params(name)
    print(f"{name:12} {n:>16,} parameters  {n * 2 / 1e9:6.1f} GB in fp16")

# %%
# The same count, inline, with transformers alone:
import torch
from transformers import LlamaConfig, LlamaForCausalLM

llama2_7b = LlamaConfig(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    vocab_size=32000,
    tie_word_embeddings=False,
)
with torch.device("meta"):
    model_7b = LlamaForCausalLM(llama2_7b)
n_params = sum(p.numel() for p in model_7b.parameters())
print(f"Llama-2-7B parameters: {n_params:,}")
assert n_params == sizing.count_params("llama-2-7b") == 6_738_415_616
glue("b_7b", n_params / 1e9, ".1f")
glue("gb_7b", n_params * 2 / 1e9, ".1f")

# %% [markdown]
# ## Recompile or patch: the bill at 7B scale
#
# Full fine-tuning keeps, for every parameter, the weight, its gradient and Adam's two
# moments (plus an fp32 master copy when training in bf16): {glue:text}`bytes_per_param`
# bytes per parameter. LoRA
# freezes the base and pays that price only for the adapter. The table below is computed
# from the shapes (weights, gradients and optimizer state; activations excluded since
# they depend on batch and sequence length): it is the seed documents' comparison table
# with numbers instead of adjectives. Chapter 01 measures the same columns on the tiny model.

# %%
GiB = 2**30
rows = {
    m: sizing.memory_estimate("llama-2-7b", m, r=16)
    for m in ("full", "lora", "qlora")
}
adapter_mb = sizing.adapter_file_bytes("llama-2-7b", r=16) / 1e6
print(f"{'Llama-2-7B, r=16, all linear':29}"
      f" {'full':>13} {'LoRA':>13} {'QLoRA':>13}")
print(f"{'trainable parameters':29} "
      + " ".join(f"{rows[m]['trainable']:>13,}" for m in rows))
print(f"{'optimizer state (GiB)':29} "
      + " ".join(f"{rows[m]['optimizer'] / GiB:>13.2f}" for m in rows))
print(f"{'training memory (GiB)':29} "
      + " ".join(f"{rows[m]['total'] / GiB:>13.1f}" for m in rows))
print(f"{'file per task (GB)':29} {n_params * 2 / 1e9:>13.1f}"
      f" {adapter_mb / 1e3:>13.2f} {adapter_mb / 1e3:>13.2f}")
full, lora = rows["full"], rows["lora"]
assert full["optimizer"] / lora["optimizer"] > 100
assert full["total"] / lora["total"] > 7
glue("bytes_per_param", round(full["total"] / n_params))
n_70b = sizing.count_params("llama-2-70b")
glue("n_70b", n_70b)
glue("tb_70b", n_70b * round(full["total"] / n_params) / 1e12, ".1f")

# %% [markdown]
# The same bill as bars. Left, what one training run holds in memory; right, what each task
# ships, on a log scale because the two files differ by a factor of
# {glue:text}`fig_file_ratio`: a whole new binary against a patch.

# %%
from lora_lab import plot

fig, (ax_mem, ax_file) = plot.new_figure(ncols=2, width=4.2, height=3.2)
plot.plot_bars(["full", "LoRA", "QLoRA"],
               [rows[m]["total"] / GiB for m in rows], ax=ax_mem,
               title="training memory, Llama-2-7B", ylabel="GiB")
file_gb = [n_params * 2 / 1e9, adapter_mb / 1e3]
plot.plot_bars(["full model (fp16)", "LoRA adapter"], file_gb, ax=ax_file,
               title="file per task", ylabel="GB (log scale)")
ax_file.set_ylim(file_gb[1] / 3, file_gb[0] * 5)
ax_file.set_yscale("log")
ax_file.yaxis.set_major_formatter("{x:g}")
for ax in (ax_mem, ax_file):
    for label in ax.get_xticklabels():  # short labels: no slant needed
        label.set(rotation=0, ha="center", multialignment="center")
file_ratio = file_gb[0] / file_gb[1]
assert file_ratio > 10
glue("fig_file_ratio", file_ratio, ".0f")
fig

# %% [markdown]
# ## The bundled tiny base model
#
# A {glue:text}`gb_7b` GB download is the wrong first step for learning. LoRA Lab ships its own base model:
# a Llama-architecture `LlamaForCausalLM` pretrained by the project's own script on a
# generated corpus about a small fictional world (towns, people, trades), plus chats and
# SQL over *other* schemas. It loads through the ordinary `from_pretrained` code path, so
# PEFT, TRL, bitsandbytes and vLLM treat it like any Hub model.

# %%
model, tok = lora_lab.load_base(BASE_MODEL)
n_tiny = sum(p.numel() for p in model.parameters())
cfg = model.config
print(type(model).__name__, f"{n_tiny:,} parameters")
print(f"layers={cfg.num_hidden_layers} hidden={cfg.hidden_size}"
      f" heads={cfg.num_attention_heads} vocab={cfg.vocab_size}")
linear_names = sorted({n.split(".")[-1] for n, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear)})
print("linear layers:", linear_names)
BUNDLED = lora_lab.models.is_bundled(BASE_MODEL)  # asserts about this one model
if BUNDLED:  # another model has its own size
    assert 2_000_000 <= n_tiny <= 10_000_000

# %% [markdown]
# It writes fluent text about its world, and it has seen SQL over *other* schemas
# (greedy decoding, so the output is the same on every run):

# %%
prompts = [
    "Letter from Sela Farrow in Morrow to a friend in",
    "-- list the names of the students who live in Ostrin.\n",
]
for prompt in prompts:
    ids = tok(prompt, return_tensors="pt").to(model.device)
    out = model.generate(**ids, max_new_tokens=40, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    print(tok.decode(out[0], skip_special_tokens=True), end="\n\n")

# %% [markdown]
# ## What it knows, and what it cannot do yet
#
# Two kinds of measurement run through the whole book:
#
# - **knowledge probes**: cloze questions about facts stated in the pretraining corpus
#   ("Runa Galt lives in ..."). Their accuracy after fine-tuning tells how much the model
#   *forgot*;
# - **task accuracy** on held-out test sets of the three tasks the book teaches: `support`
#   (a shop's customer-service assistant; the answer must state the right fact), `sql`
#   (questions to SQL over `data/shop.sql`, scored by running both queries in sqlite3) and
#   `shift` (a made-up language).

# %% tags=["nbval-ignore-output"]
from lora_lab import data, evaluate

probe_acc = evaluate.probe_accuracy(model, tok)
zero_shot = {t: evaluate.task_accuracy(model, tok, t, limit=100)
             for t in data.TASKS}

# %%
print(f"probe accuracy: {probe_acc:.2f}")
for task, acc in zero_shot.items():
    print(f"zero-shot {task:8} accuracy: {acc:.2f}")
if BUNDLED:  # the bundled model knows its world and none of the tasks
    assert probe_acc >= 0.80
    assert all(acc <= 0.20 for acc in zero_shot.values())

# %% [markdown]
# The model knows its world (high probe accuracy) and knows the *formats* — it has seen
# chats and SQL — but it cannot do any of the three tasks. That is the situation LoRA is
# for: teach a narrow skill on top of a capable base, ship the skill as a small file.
#
# An example of the `sql` task, and what the base model answers:

# %%
example = data.load_task("sql", "test")[0]
question = example["messages"][0]["content"]
(answer,) = evaluate.generate_answers(model, tok, [example["messages"][:1]],
                                      progress=False)
print("question: ", question)
print("reference:", example["sql"])
print("base says:", answer)
assert not evaluate.score_sql(answer, example["sql"])

# %% [markdown]
# ## Check yourself
#
# **1.** Full fine-tuning with AdamW needs memory for what, per parameter?
# (a) the weight only (b) the weight and its gradient (c) the weight, its gradient and
# Adam's two moments (plus an fp32 master copy in mixed precision) (d) only the activations
#
# ```{admonition} Answer
# :class: dropdown
# (c): that is where {glue:text}`bytes_per_param` bytes per parameter come from; the
# training state, not the weights, dominates the bill.
# ```
#
# **2.** At 7B scale, which part of that bill does LoRA cut?
# (a) the frozen weights, which it stores in fewer bytes (b) the gradients and optimizer
# state, which exist only for the small trainable patch (c) the activations, entirely
# (d) none: LoRA only makes the saved file smaller
#
# ```{admonition} Answer
# :class: dropdown
# (b): the base weights still have to be loaded for the forward pass; gradients and Adam's
# moments are kept only for $A$ and $B$ (the table asserts an optimizer state over a hundred
# times smaller).
# ```
#
# **3.** The bundled model answers its knowledge probes well but none of the three tasks.
# What does it lack?
# (a) knowledge of its world (b) a bigger vocabulary (c) the narrow skill each task needs,
# which is what a LoRA patch adds (d) enough parameters to learn anything
#
# ```{admonition} Answer
# :class: dropdown
# (c): the probes show it knows its world, and it has seen chats and SQL, but its zero-shot
# task accuracy is near zero (both asserted above). A capable base missing one narrow skill
# is the situation LoRA is for.
# ```
#
# ## Summary
#
# - A 7B model is {glue:text}`b_7b` billion parameters: {glue:text}`gb_7b` GB in fp16 before
#   any training state. Full fine-tuning needs about {glue:text}`bytes_per_param` bytes per
#   parameter; LoRA needs that only for the patch.
# - The book's experiments run on a bundled tiny Llama that knows a fictional world and the
#   formats of chat and SQL, but none of the three tasks.
# - Set `LORA_LAB_BASE_MODEL` (or `BASE_MODEL` above) to run everything on a real model.
#
# ## Exercises
#
# 1. How many parameters does Llama-2-70B have, and how much memory would full
#    fine-tuning in bf16 with AdamW need by the bytes-per-parameter rule above?
# 2. Load the tiny model and print `model` to find the names of its linear layers. Which
#    of them would `target_modules=["q_proj", "v_proj"]` patch?
#
# ```{admonition} Solution 1
# :class: dropdown
# `sizing.count_params("llama-2-70b")` gives {glue:text}`n_70b`; times
# {glue:text}`bytes_per_param` bytes is about {glue:text}`tb_70b` TB, or `sizing.memory_estimate("llama-2-70b", "full")["total"]`.
# ```
#
# ```{admonition} Solution 2
# :class: dropdown
# Each decoder layer has `q_proj`, `k_proj`, `v_proj`, `o_proj` (attention) and
# `gate_proj`, `up_proj`, `down_proj` (MLP), plus the `lm_head` output layer. The list
# patches the query and value projections of every layer: two per layer.
# ```
