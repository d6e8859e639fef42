# %% [markdown]
# # 06b · QLoRA: patching the compressed binary
#
# Chapter 06 built the compressor: NF4 codes, one absmax per block of
# {glue:text}`block` weights, and double quantization of those scales, byte for byte what
# bitsandbytes stores. This chapter runs the compressed binary and patches it. A 4-bit
# layer decompresses its weight for each matrix multiply and throws it away; an ordinary
# LoRA patch, in 16-bit or 32-bit floats, sits on top; only the patch trains. That is QLoRA
# {cite}`dettmers2023qlora`: the packed `main.exe` is never edited, and the `.dll` beside it
# is all that changes. Its third idea, **paged optimizers** (a GPU memory-management trick),
# is switched on here when the notebook runs on CUDA.
#
# **Learning goals**
# - run a 4-bit linear layer and match bitsandbytes' `Linear4bit`;
# - check whether 7B-13B QLoRA fits a consumer GPU, and on what conditions;
# - train QLoRA two ways (transformers + bitsandbytes + PEFT, and lora_lab's own 4-bit
#   layers) and compare them with 32-bit LoRA;
# - choose how to merge an adapter into a 4-bit base, knowing what each choice costs.

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
TASK = "sql"  # the task the live QLoRA runs learn
LIVE_STEPS = 20  # training steps of each live QLoRA run
LIVE_ITEMS = 16  # test items the live runs are scored on
R, ALPHA, LR, BATCH = 8, 16, 3e-3, 32  # LoRA rank, alpha, learning rate, batch

# %%
import lora_lab  # first: it keeps known library noise out of outputs

import copy
import json
import tempfile
import time
import warnings

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import peft
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import lora_lab.plot
from lora_lab import bnb_cpu, data, evaluate, nf4, sizing, train
from lora_lab.inject import LoRAConfig, add_lora
from lora_lab.paths import RESULTS_DIR
from lora_lab.prose import bootstrap_accuracy_diff, glue

transformers.utils.logging.disable_progress_bar()
lora_lab.seed_everything(SEED)
DEVICE, DTYPE = lora_lab.device(), lora_lab.compute_dtype()
print(lora_lab.runtime.describe())

# %% [markdown]
# ## What chapter 06 built, in one cell
#
# This chapter needs three things from chapter 06, and re-creates them rather than
# depending on it: the base model, the weight of its first MLP up-projection (our specimen
# again), and every linear weight that 4-bit loading quantizes (all but the output head).
# One assert repeats chapter 06's result: `lora_lab.nf4` stores the same bytes as
# bitsandbytes.

# %%
model, tok = lora_lab.load_base(BASE_MODEL)
W = model.model.layers[0].mlp.up_proj.weight.detach().float().cpu()
linear_weights = {
    name: m.weight.detach().float().cpu()
    for name, m in model.named_modules()
    if isinstance(m, nn.Linear) and not name.endswith("lm_head")
}
ll_packed, ll_state = nf4.quantize_nf4(W, double_quant=True)
bnb_packed, bnb_state = bnbF.quantize_4bit(
    W, blocksize=64, quant_type="nf4", compress_statistics=True)
assert torch.equal(ll_packed, bnb_packed)  # chapter 06: same bytes
BLOCK = bnb_state.blocksize
GB = 1e9
scale_rows = {"7B": nf4.llama_weight_memory("7B")}  # chapter 06's table
cached_nf4 = json.loads((RESULTS_DIR / "nf4.json").read_text())
cached_error = cached_nf4["quantization_error_relative_rmse"]
print(f"{len(linear_weights)} linear layers to quantize;"
      f" specimen {tuple(W.shape)} -> {ll_packed.numel():,} bytes")
glue("block", BLOCK)
glue("nf4_error", cached_error["model_weighted_mean"]["nf4"], ".1%")

# %% [markdown]
# ## Step 1: the 4-bit layer
#
# A 4-bit linear layer stores the packed bytes and the state, and in `forward` rebuilds
# the weight, multiplies, and throws the rebuilt weight away: `x @ dequantize(W4).T`, in
# the compute dtype (bf16 on a GPU, fp32 on a CPU). The weight never exists in full
# precision for longer than one matrix multiply: the packed executable is unpacked one
# function at a time, as it is called. `lora_lab.nf4.NF4Linear` is that layer in plain
# torch; bitsandbytes' `Linear4bit` is the same idea with fused kernels on CUDA.

# %%
up_proj = model.model.layers[0].mlp.up_proj
linear = nn.Linear(up_proj.in_features, up_proj.out_features, bias=False)
linear.weight.data.copy_(W)
q_layer = nf4.NF4Linear.from_linear(linear)  # double quantization on
bnb_layer = bnb.nn.Linear4bit(
    linear.in_features, linear.out_features, bias=False,
    compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
bnb_layer.weight = bnb.nn.Params4bit(
    W.clone(), requires_grad=False, compress_statistics=True,
    quant_type="nf4", blocksize=64)
bnb_layer = bnb_layer.to("cpu")  # Params4bit quantizes when moved
print(q_layer)

gen = torch.Generator().manual_seed(0)
x = torch.randn(4, linear.in_features, generator=gen)
with torch.no_grad():
    y4, y_bnb, y32 = q_layer(x), bnb_layer(x), linear(x)
rel_out = ((y4 - y32).norm() / y32.norm()).item()
print(f"relative output error of the 4-bit layer: {rel_out:.3f}")
assert torch.equal(bnb_layer.weight.data, q_layer.weight)
assert torch.equal(y4, F.linear(x, q_layer.dequantized_weight()))
assert torch.allclose(y4, y_bnb, atol=1e-5)
print(f"bytes: fp32 layer {4 * W.numel():,}, 4-bit layer {q_layer.nbytes():,}")

# %% [markdown]
# Wrap that layer with LoRA and you have QLoRA: the 4-bit base is frozen (its weight is a
# buffer of bytes; there is nothing to train in it), the adapter's `lora_A` and `lora_B`
# are ordinary fp32 (or bf16) parameters, and gradients flow *through* the dequantized
# weight to reach the layers below.

# %% [markdown]
# (claim-qlora-24gb)=
# ## Step 2: does 7B-13B QLoRA fit a consumer GPU?
#
# The Chinese source calls QLoRA the key to fine-tuning 7B-13B models on a consumer GPU
# "with 24 GB" (an RTX 3090 or 4090; the cell below takes {glue:text}`budget_gib` GiB as the
# budget). `sizing.memory_estimate` adds up what is certain from the
# shapes (Llama-2 here, r=16 on all linear layers): NF4 base, the fp32 adapter, its
# gradients and AdamW's two moments. Activations are the part that depends on you. A rough
# count for 16-bit activations of one decoder layer without recomputation is
# $sbh(34 + 5as/h)$ bytes (Korthikanti et al., 2022; $s$ tokens, batch $b$, hidden size
# $h$, $a$ heads); with gradient checkpointing (on by default in
# `prepare_model_for_kbit_training`) only each layer's 16-bit input, $2sbh$ bytes, is kept,
# plus one layer's activations while it is recomputed.

# %%
GiB = 2**30
BUDGET = 24 * GiB  # an RTX 3090/4090 has 24 GiB
S, B = 2048, 1  # tokens per sequence, sequences per step


def activations(name, checkpointing):
    cfg = sizing.shape_config(name)
    h, a, n = (cfg.hidden_size, cfg.num_attention_heads,
               cfg.num_hidden_layers)
    layer = S * B * h * (34 + 5 * a * S / h)
    return n * 2 * S * B * h + layer if checkpointing else n * layer


print(f"{'GiB':12} {'state':>7} {'+ act, ckpt':>12} {'+ act, none':>12}")
fits, totals = {}, {}
for name in ("llama-2-7b", "llama-2-13b", "llama-2-70b"):
    for method in ("lora", "qlora"):
        state = sizing.memory_estimate(name, method, r=16)["total"]
        ckpt = state + activations(name, True)
        none = state + activations(name, False)
        fits[name, method] = (ckpt < BUDGET, none < BUDGET)
        totals[name, method] = (state, ckpt)
        print(f"{name[8:]:4} {method:7} {state / GiB:7.1f}"
              f" {ckpt / GiB:12.1f} {none / GiB:12.1f}")
        key = f"{name[8:]}_{method}"
        glue(f"state_{key}", state / GiB, ".1f")
        glue(f"ckpt_{key}", ckpt / GiB, ".1f")
        glue(f"none_{key}", none / GiB, ".1f")
glue("budget_gib", BUDGET / GiB, ".0f")
glue("seq_tokens", S)
assert fits["llama-2-7b", "qlora"][0] and fits["llama-2-13b", "qlora"][0]
assert not fits["llama-2-13b", "lora"][0]  # 16-bit 13B does not fit
assert not fits["llama-2-13b", "qlora"][1]  # nor does 13B without ckpt
assert not fits["llama-2-7b", "qlora"][1] and fits["llama-2-7b", "lora"][0]
assert not fits["llama-2-70b", "qlora"][0]

# %% [markdown]
# The 7B and 13B rows as a picture, with gradient checkpointing on: what is certain from
# the shapes, the activations of one sequence on top, and the card's edge.

# %%
shown = [k for k in totals if k[0] != "llama-2-70b"]
labels = [f"{name[8:].upper()} {'QLoRA' if method == 'qlora' else 'LoRA'}"
          for name, method in shown]
state_gib = [totals[k][0] / GiB for k in shown]
act_gib = [(totals[k][1] - totals[k][0]) / GiB for k in shown]
fig, (ax,) = lora_lab.plot.new_figure(width=6.5, height=2.8)
with lora_lab.plot.matplotlib.rc_context(lora_lab.plot.BOOK_STYLE):
    ax.barh(labels, state_gib, label="weights, adapter, gradients, AdamW")
    ax.barh(labels, act_gib, left=state_gib,
            label="activations (checkpointed)")
    ax.axvline(BUDGET / GiB, color="black", linestyle="--", linewidth=1)
    ax.text(BUDGET / GiB, -0.6, f" {BUDGET / GiB:.0f} GiB card", va="bottom")
    ax.invert_yaxis()
    ax.set_xlabel("GiB for one training step")
    ax.legend(loc="lower right")
fig

# %% [markdown]
# So the claim holds, with conditions: at one {glue:text}`seq_tokens`-token sequence per
# step, 7B and 13B QLoRA fit in {glue:text}`budget_gib` GiB **with gradient checkpointing**
# ({glue:text}`ckpt_7b_qlora` and {glue:text}`ckpt_13b_qlora` GiB); without it, the
# activations alone overflow the card ({glue:text}`none_7b_qlora` and
# {glue:text}`none_13b_qlora` GiB). 13B in 16-bit LoRA does not fit at all
# ({glue:text}`ckpt_13b_lora` GiB) — that is what QLoRA buys. (7B in 16-bit LoRA does fit
# with checkpointing, at {glue:text}`ckpt_7b_lora` GiB.) Longer sequences or bigger batches
# need gradient accumulation instead, and 70B does not fit even in NF4
# ({glue:text}`ckpt_70b_qlora` GiB).
# The CUDA context, allocator fragmentation and temporary buffers add memory that no
# formula here counts; the paged optimizer is what absorbs short memory spikes on a GPU.
#
# ## Step 3: QLoRA training, two ways
#
# **The production path**: transformers loads the model in 4-bit through bitsandbytes,
# `prepare_model_for_kbit_training` readies it (casts the small unquantized parameters to
# fp32, turns on gradient checkpointing and input gradients), PEFT adds the adapter
# (its `LoraConfig` is the Chinese source's "patch manifest": which layers, what rank,
# what scaling), and
# the Trainer runs with `optim=lora_lab.optimizer_name()` — `paged_adamw_8bit` on a GPU,
# `adamw_torch` on a CPU. On CUDA this uses bitsandbytes' GPU kernels and bf16 compute; here
# its CPU path. Same code either way.

# %%
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, Trainer,
                          TrainingArguments)

bnb_config = BitsAndBytesConfig(
    load_in_4bit=True,
    bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=DTYPE,
)
base_path = lora_lab.models.resolve_base_name(BASE_MODEL)
peft_model = AutoModelForCausalLM.from_pretrained(
    base_path, quantization_config=bnb_config, device_map={"": DEVICE})
# fp32 on every CPU: no bf16 repacking on AVX512-BF16 ones (chapter
# 06, Going deeper)
bnb_cpu.disable_cpu_repacking(peft_model)

# On CPU bitsandbytes runs the kernels lora_lab copies bit for bit; its CUDA
# kernels may round a few 8-bit scales differently, so there compare values.
BIT_EXACT = DEVICE.type == "cpu"


def same_4bit(weight4, packed, state):
    """Does a bitsandbytes 4-bit weight hold lora_lab's (packed, state)?"""
    if BIT_EXACT:
        return (torch.equal(weight4.data.cpu(), packed) and
                torch.equal(weight4.quant_state.absmax.cpu(), state.absmax))
    theirs = bnbF.dequantize_4bit(weight4.data, weight4.quant_state)
    ours = nf4.dequantize_4bit(packed, state).float()
    gap = (theirs.float().cpu().reshape(ours.shape) - ours).norm()
    return (gap / ours.norm()).item() < 1e-2


for name, w in linear_weights.items():  # transformers stored our NF4
    layer = peft_model.get_submodule(name)
    assert type(layer).__name__ == "Linear4bit", name
    assert same_4bit(layer.weight, *nf4.quantize_nf4(w, double_quant=True))
peft_bytes = nf4.model_bytes(peft_model)

peft_model = prepare_model_for_kbit_training(
    peft_model, gradient_checkpointing_kwargs={"use_reentrant": False})
lora_config = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                         target_modules="all-linear", task_type="CAUSAL_LM")
lora_lab.seed_everything(SEED)
peft_model = get_peft_model(peft_model, lora_config)
peft_model.print_trainable_parameters()
print(f"4-bit model as loaded: {peft_bytes / 1e6:.2f} MB")

# %% [markdown]
# Every quantized layer transformers loaded holds exactly the bytes our NF4 produces
# (on a CPU; on a GPU, the same values). Now
# train it for `LIVE_STEPS` steps with the Trainer (the timing and loss log vary from run to
# run; the next cell prints the result).

# %% tags=["nbval-ignore-output"]
train_examples = data.load_task(TASK, "train")
encoded = [dict(zip(("input_ids", "labels"), train.encode_example(tok, ex, 96)))
           for ex in train_examples]


def collate(batch):
    pairs = [(ex["input_ids"], ex["labels"]) for ex in batch]
    return train.collate(pairs, tok.pad_token_id)


args = TrainingArguments(
    output_dir=tempfile.mkdtemp(), max_steps=LIVE_STEPS,
    per_device_train_batch_size=BATCH, learning_rate=LR,
    lr_scheduler_type="constant", max_grad_norm=0.0,
    optim=lora_lab.optimizer_name(),  # paged_adamw_8bit on CUDA
    bf16=DTYPE == torch.bfloat16, fp16=DTYPE == torch.float16,
    logging_steps=5, save_strategy="no",
    report_to="none", disable_tqdm=True, seed=SEED,
    remove_unused_columns=False,
    dataloader_pin_memory=DEVICE.type == "cuda",  # pinning helps GPUs only
)
trainer = Trainer(model=peft_model, args=args, train_dataset=encoded,
                  data_collator=collate)
start = time.perf_counter()
trainer.train()
peft_seconds = time.perf_counter() - start
peft_model.eval()
peft_losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
print(f"{peft_seconds:.1f} s")

# %%
print("PEFT QLoRA loss:", round(peft_losses[0], 2), "->",
      round(peft_losses[-1], 2))
assert peft_losses[-1] < peft_losses[0]

# %% [markdown]
# **The from-scratch path**: `nf4.quantize_model` swaps every linear layer but the head for
# an `NF4Linear`, `add_lora` wraps them, and the book's own training loop trains the
# adapter. Swapping modules in a live model is monkey-patching: the module tree changes at
# run time, the checkpoint on disk does not. And nothing in `train.train` knows the base is
# 4-bit: storage, patch and training loop are separate concerns.

# %% tags=["nbval-ignore-output"]
lora_lab.seed_everything(SEED)
ql_model, _ = lora_lab.load_base(BASE_MODEL)
nf4.quantize_model(ql_model, compute_dtype=DTYPE)  # NF4, block 64, double quant
add_lora(ql_model, LoRAConfig(r=R, lora_alpha=ALPHA,
                              target_modules="all-linear"))
ql_run = train.train(ql_model, tok, train_examples, steps=LIVE_STEPS, lr=LR,
                     batch_size=BATCH, seed=SEED)
print(f"{ql_run['seconds']:.1f} s")

# %%
ql_losses = ql_run["losses"]
print("lora_lab QLoRA loss:", round(ql_losses[0], 2), "->",
      round(sum(ql_losses[-5:]) / len(ql_losses[-5:]), 2))
print(type(ql_model.model.layers[0].mlp.up_proj.base_layer).__name__,
      "under", type(ql_model.model.layers[0].mlp.up_proj).__name__)
assert sum(ql_losses[-5:]) / len(ql_losses[-5:]) < ql_losses[0]

# %% [markdown]
# Both runs learn. Against what? The same number of steps of plain 32-bit LoRA (the base
# in fp32, same adapter settings, same loop and data order as the from-scratch run), then
# all three scored on `LIVE_ITEMS` test items. Memory is what each model holds
# (`nf4.model_bytes`: base plus adapter). The runs are short so that the chapter stays
# within its time budget; `benchmarks/qlora_train.py` runs the same comparison at full
# length.

# %% tags=["nbval-ignore-output"]
lora_lab.seed_everything(SEED)
lora32, _ = lora_lab.load_base(BASE_MODEL)
add_lora(lora32, LoRAConfig(r=R, lora_alpha=ALPHA,
                            target_modules="all-linear"))
lora_run = train.train(lora32, tok, train_examples, steps=LIVE_STEPS, lr=LR,
                       batch_size=BATCH, seed=SEED)
runs = {"LoRA 32-bit": lora32, "QLoRA lora_lab": ql_model,
        "QLoRA PEFT": peft_model}
live_acc = {name: evaluate.task_accuracy(m, tok, TASK, limit=LIVE_ITEMS,
                                         progress=False)
            for name, m in runs.items()}
print(live_acc)


# %%
def tail(losses):
    return sum(losses[-5:]) / len(losses[-5:])


final_loss = {"LoRA 32-bit": tail(lora_run["losses"]),
              "QLoRA lora_lab": tail(ql_losses),
              "QLoRA PEFT": peft_losses[-1]}  # Trainer logs 5-step means
held = {name: nf4.model_bytes(m) for name, m in runs.items()}
print(f"{LIVE_STEPS} steps, {TASK}, {LIVE_ITEMS} test items")
print(f"{'':16} {'loss (last 5)':>14} {'accuracy':>9} {'model MB':>9}")
for name in runs:
    print(f"{name:16} {final_loss[name]:14.2f} {live_acc[name]:9.2f}"
          f" {held[name] / 1e6:9.2f}")
assert abs(final_loss["QLoRA lora_lab"] / final_loss["LoRA 32-bit"] - 1) < 0.1
assert final_loss["QLoRA PEFT"] < 2 * final_loss["LoRA 32-bit"]
for name in ("QLoRA lora_lab", "QLoRA PEFT"):
    assert held[name] < held["LoRA 32-bit"] / 2

# %% [markdown]
# After the same number of steps, the from-scratch QLoRA run reaches a training loss within
# a tenth of 32-bit LoRA's (the assert above), with the same loop and data order, while the
# model it trains holds less than half the memory. The PEFT run draws its batches in the
# Trainer's order, so after `LIVE_STEPS` steps its loss is a different sample of the same
# curve (here within a factor of two). Twenty
# steps already move the accuracy, but on `LIVE_ITEMS` items one answer is several points:
# the loss is the fair comparison at this length.
#
# At full length, `benchmarks/qlora_train.py` trained all three for {glue:text}`q_steps` steps
# with one
# loop (`train.train`: same data order for all) and scored them on the same test items:

# %%
qlora = json.loads((RESULTS_DIR / "qlora.json").read_text())
rows = {r["method"]: r for r in qlora["rows"]}
print(f"cached: {qlora['task']}, {qlora['steps']} steps,"
      f" {qlora['eval_items']} test items")
print(f"{'method':16} {'accuracy':>9} {'final loss':>11} {'model MB':>9}")
for method, r in rows.items():
    print(f"{method:16} {r['test_accuracy']:9.3f} {r['final_loss']:11.4f}"
          f" {r['model_bytes'] / 1e6:9.2f}")
gap = rows["lora"]["test_accuracy"] - rows["qlora_lora_lab"]["test_accuracy"]
assert abs(gap) <= 0.02
loss_ratio = rows["qlora_lora_lab"]["final_loss"] / rows["lora"]["final_loss"]
assert abs(loss_ratio - 1) < 0.05
assert rows["qlora_lora_lab"]["model_bytes"] < rows["lora"]["model_bytes"] / 2
for key in ("final_loss", "test_accuracy"):
    assert rows["qlora_peft"][key] == rows["qlora_lora_lab"][key]
N_ITEMS = qlora["eval_items"]
glue("q_items", N_ITEMS)
glue("ci", 95)
glue("q_steps", qlora["steps"])
glue("q_acc_lora", rows["lora"]["test_accuracy"], ".3f")
glue("q_acc_qlora", rows["qlora_lora_lab"]["test_accuracy"], ".3f")
glue("q_loss_pct", abs(loss_ratio - 1), ".1%")
glue("q_mem_ratio", rows["qlora_lora_lab"]["model_bytes"]
     / rows["lora"]["model_bytes"], ".2f")
diff, lo, hi = bootstrap_accuracy_diff(rows["qlora_lora_lab"]["test_accuracy"],
                                       rows["lora"]["test_accuracy"], N_ITEMS)
print(f"QLoRA - LoRA accuracy: {diff:+.3f},"
      f" 95% interval {lo:+.3f} to {hi:+.3f} ({N_ITEMS} items)")
glue("q_diff_lo", lo, "+.3f")
glue("q_diff_hi", hi, "+.3f")
no_cost = lo <= 0 <= hi or diff >= 0
glue("q_cost", "with no accuracy cost measurable on this many items"
     if no_cost else "at a measurable cost in accuracy",
     zh="在这么多道题上测不出准确率损失" if no_cost
     else "准确率有可测的损失")

# %% [markdown]
# QLoRA's headline claim holds on this model: at full length it scores
# {glue:text}`q_acc_qlora` against 32-bit LoRA's {glue:text}`q_acc_lora` (the
# {glue:text}`ci`% interval of the difference over the {glue:text}`q_items` test items
# runs from {glue:text}`q_diff_lo` to {glue:text}`q_diff_hi`: no difference this test set
# can see), with a final loss {glue:text}`q_loss_pct` apart, while the model it trains holds
# {glue:text}`q_mem_ratio` times the memory. Every frozen weight carries the
# {glue:text}`nf4_error` relative error measured in chapter 06; the adapter,
# trained on top of the quantized base, learns around it. And given the same loop, the
# two QLoRA paths end with the same loss to four decimals and the same accuracy: PEFT over
# bitsandbytes and lora_lab over `NF4Linear` train the very same numbers.
#
# ## Merging into a 4-bit base: three cases
#
# Chapter 07 merges adapters into a full-precision base: $W \leftarrow W + BA \cdot s$,
# done, zero extra cost at inference. With a 4-bit base the Chinese source distinguishes
# three cases, and each has a price:
#
# 1. **merge into full precision**: dequantize the base, add the delta, keep the result in
#    16-bit or 32-bit floats — exact, but the model is no longer small;
# 2. **keep the adapter unmerged** on the 4-bit base — exact and small, but every forward
#    computes $BAx$ on the side;
# 3. **dequantize, merge, re-quantize** — small and no side computation, but the merged
#    weight is rounded to NF4 again, so the model is no longer exactly what was trained.
#
# In the sources' software terms: case 1 is static linking into an *unpacked* binary (one
# self-contained `main_v2.exe`, no longer small); case 2 is dynamic linking (the packed
# `main.exe` ships as it is and loads the `.dll` at run time, paying a small call on every
# use); case 3 is static linking followed by re-packing with a lossy packer, so what ships
# is not quite what you linked.
#
# lora_lab refuses to choose for you:

# %%
layer = ql_model.model.layers[0].mlp.up_proj
for attempt in (lambda: nf4.merge_quantized(layer),  # no `how`
                lambda: layer.merge()):  # in-place merge into 4-bit bytes
    try:
        attempt()
    except (ValueError, TypeError) as err:
        print(f"{type(err).__name__}: {str(err)[:150]}...")

# %% [markdown]
# (claim-4bit-merge)=
# ### Does merging a `load_in_4bit` model error?
#
# The Chinese source's pre-merge checklist says that if the base was loaded with
# `load_in_4bit=True`, merging directly "will raise an error". With PEFT
# {glue:text}`peft_version` it does not:
# `merge_and_unload` dequantizes each `Linear4bit`, adds the delta, quantizes again
# (case 3), and warns. Run it on a copy of the PEFT model we trained:

# %%
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    peft_merged = copy.deepcopy(peft_model).merge_and_unload()
messages = sorted({str(w.message) for w in caught})
merged_layer = peft_merged.get_submodule("model.layers.0.mlp.up_proj")
print("PEFT", peft.__version__, "merged without an error; it warned:")
for m in messages:
    print("  ", m)
print("merged layer:", type(merged_layer).__name__)
assert any("may get different generations" in m for m in messages)
assert type(merged_layer).__name__ == "Linear4bit"  # still 4-bit: re-quantized
glue("peft_version", peft.__version__)

# %% [markdown]
# So the checklist item is out of date: the merge works, and the warning is the real
# message — the merged 4-bit model is *not* the model you trained. PEFT's re-quantized
# bytes are exactly `nf4.requantize_merge` of the same layer and delta:

# %%
peft_layer = peft_model.base_model.model.model.layers[0].mlp.up_proj
peft_delta = peft_layer.get_delta_weight("default").float().cpu()
ours = nf4.requantize_merge(nf4.NF4Linear.from_linear(linear), peft_delta)
assert same_4bit(merged_layer.weight, ours.weight, ours.quant_state())
print("PEFT's merge == nf4.requantize_merge: identical bytes")

# %% [markdown]
# Now the three cases side by side, on the lora_lab QLoRA model we trained: the largest
# logit difference from the unmerged model on {glue:text}`n_prompts` test prompts, and the
# model's size.
#
# Case 1 is exact up to float rounding, and how much rounding there is depends on the
# compute dtype the unmerged 4-bit model runs in (`DTYPE`). In fp32, on a CPU, the logits
# agree to far better than $10^{-3}$. In bf16, on a GPU, every 4-bit layer rounds its
# input and weight to bf16's precision before the matmul, so a logit of size $L$ can
# move by about $\epsilon L$, where $\epsilon = 2^{-7}$ is bf16's spacing ($2^{-10}$ for
# fp16). The logits here reach about {glue:text}`logit_max`, so on a GPU the gap can reach
# a few tenths. So the check
# allows $10^{-3}$ or $2 \epsilon L_{max}$, whichever is larger, and asks case 3 to move
# the logits by more than that.

# %%
prompts = [ex["messages"][:-1] for ex in data.load_task(TASK, "test")[:16]]
texts = [tok.apply_chat_template(p, add_generation_prompt=True,
                                 tokenize=False) for p in prompts]
probe = tok(texts, return_tensors="pt", padding=True,
            add_special_tokens=False).to(DEVICE)


@torch.no_grad()
def logits(m):
    return m(**probe).logits.float()


reference = logits(ql_model)
cases = {
    "1 full precision": nf4.merge_quantized_model(copy.deepcopy(ql_model),
                                                  "full_precision"),
    "2 unmerged": ql_model,
    "3 re-quantized": nf4.merge_quantized_model(copy.deepcopy(ql_model),
                                                "requantize"),
}
diff = {k: (logits(m) - reference).abs().max().item() for k, m in cases.items()}
size = {k: nf4.model_bytes(m) for k, m in cases.items()}
top1 = {k: (logits(m).argmax(-1) == reference.argmax(-1)).float().mean().item()
        for k, m in cases.items()}
eps = torch.finfo(DTYPE).eps  # fp32 2**-23, bf16 2**-7, fp16 2**-10
rounding = max(1e-3, 2 * eps * reference.abs().max().item())
# a gap within float rounding prints as "< rounding": its digits depend on
# the CPU's kernels
shown = {k: lora_lab.runtime.below(d, rounding) for k, d in diff.items()}
print(f"{'case':18} {'max logit diff':>15} {'same top-1':>11} {'MB':>7}")
for k in cases:
    print(f"{k:18} {shown[k]:>15} {top1[k]:>11.3f} {size[k] / 1e6:>7.2f}")
assert diff["1 full precision"] < rounding  # exact up to float rounding
assert diff["3 re-quantized"] > rounding  # more than rounding can explain
glue("n_prompts", len(prompts))
glue("logit_max", 5 * round(reference.abs().max().item() / 5))

# %% [markdown]
# (claim-dequant-merge-memory)=
# **Case 1 costs memory.** The source warns that dequantizing the 4-bit base to merge
# "greatly increases deployment size and memory". Measured here, and computed for a 7B
# model (merged in bf16 vs NF4 base + a 40M-parameter fp32 adapter):

# %%
ratio_tiny = size["1 full precision"] / size["2 unmerged"]
adapter_7b = 4 * sizing.lora_trainable("llama-2-7b", r=16)
nf4_7b = scale_rows["7B"]["nf4_bytes"] + adapter_7b
ratio_7b = scale_rows["7B"]["bf16_bytes"] / nf4_7b
print(f"tiny model: merged fp32 / 4-bit + adapter = {ratio_tiny:.2f}x")
print(f"7B: merged bf16 {scale_rows['7B']['bf16_bytes'] / GB:.1f} GB"
      f" / NF4 + adapter {nf4_7b / GB:.1f} GB = {ratio_7b:.1f}x")
assert ratio_tiny > 2 and ratio_7b > 3
assert 39e6 < adapter_7b / 4 < 41e6  # the "40M-parameter" adapter
glue("merge_ratio_tiny", ratio_tiny, ".2f")
glue("merged_7b_gb", scale_rows["7B"]["bf16_bytes"] / GB, ".1f")
glue("nf4_7b_gb", nf4_7b / GB, ".1f")
glue("merge_ratio_7b", ratio_7b, ".1f")

# %% [markdown]
# (claim-unmerged-4bit)=
# **Case 2 costs a little compute.** The source says an unmerged adapter on a 4-bit base
# adds a "small" latency: the side path $B(Ax)$ per layer. Counted in multiply-adds per
# token it is $r(d_{in} + d_{out})$ against $d_{in} d_{out}$ for the base; and timed
# (forward pass over the {glue:text}`n_prompts` prompts, unmerged vs the re-quantized model, which has the same
# 4-bit base and no side path; the timing varies run to run):

# %%
lora_layers = [m for m in ql_model.modules() if hasattr(m, "lora_A")]
extra_macs = sum(R * (m.base_layer.in_features + m.base_layer.out_features)
                 for m in lora_layers)
base_macs = sum(m.base_layer.in_features * m.base_layer.out_features
                for m in lora_layers)
print(f"adapter multiply-adds per token: {extra_macs / base_macs:.1%}"
      " of the quantized layers'")
assert extra_macs / base_macs < 0.15
glue("extra_macs", extra_macs / base_macs, ".1%")

# %% tags=["nbval-ignore-output"]
def forward_seconds(m, repeats=5):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        float(logits(m)[0, 0, 0])  # a GPU works async: wait for the result
        best = min(best, time.perf_counter() - start)
    return best


ratios = [forward_seconds(cases["2 unmerged"])
          / forward_seconds(cases["3 re-quantized"]) for _ in range(3)]
print("unmerged / merged forward time:", [round(r, 2) for r in ratios])
# timings: not compared; the book and the claims ledger show the stored run
glue("unmerged_ratio_lo", min(ratios), ".2f")
glue("unmerged_ratio_hi", max(ratios), ".2f")

# %% [markdown]
# On this tiny CPU model the measured ratio is noisy (the three repeats above,
# {glue:text}`unmerged_ratio_lo` to {glue:text}`unmerged_ratio_hi` in the stored run, show
# the spread), so we report it rather than assert it; at 7B scale on a GPU, the adapter's share of the arithmetic is
# the small percentage counted above.
#
# **Case 3 costs accuracy — maybe.** Why does re-quantizing move the logits so much more
# than float rounding? Look at the sizes: the adapter's change to one weight is tiny next
# to the gap between two NF4 levels, so re-quantizing either ignores it or jumps a whole
# level. For the layer we checked above:

# %%
base4 = layer.base_layer
delta = layer.delta_weight().detach().float()  # [out, in]
merged4 = nf4.requantize_merge(base4, delta)
n = base4.in_features * base4.out_features
codes_before = nf4.unpack_4bit(base4.weight.cpu(), n)
codes_after = nf4.unpack_4bit(merged4.weight.cpu(), n)
scales = base4.quant_state().scales().cpu().repeat_interleave(64)[:n]
spacing = scales * 2 / 15  # average gap between NF4 levels, per weight
before = base4.dequantized_weight(torch.float32).cpu()
applied = merged4.dequantized_weight(torch.float32).cpu() - before
err = ((applied - delta.cpu()).norm() / delta.norm()).item()
ratio_step = (delta.cpu().abs().flatten() / spacing).median().item()
changed = (codes_before != codes_after).float().mean().item()
print(f"median |delta| / NF4 level spacing: {ratio_step:.2f}")
print(f"4-bit codes changed by the merge: {changed:.1%}")
print(f"|(change re-quantizing applied) - delta| / |delta|: {err:.2f}")
if lora_lab.models.is_bundled(BASE_MODEL):  # measured on the bundled model
    assert ratio_step < 0.5 and changed < 0.5 and err > 0.3

# %% [markdown]
# Most weights keep their 4-bit code: their change is smaller than half a level, so it
# rounds away. The rest cross a boundary and jump a whole level, far more than the
# adapter asked for. The merged weight carries
# the adapter's change only roughly: the rounding error is of the same order as the change
# itself. Whether that costs task accuracy depends on how
# large and how redundant the change is. Scored on the same test items:

# %% tags=["nbval-ignore-output"]
live_requant = evaluate.task_accuracy(cases["3 re-quantized"], tok, TASK,
                                      limit=LIVE_ITEMS, progress=False)

# %%
print(f"task accuracy on {LIVE_ITEMS} items: unmerged"
      f" {live_acc['QLoRA lora_lab']:.2f}, re-quantized {live_requant:.2f}")

# %% [markdown]
# The benchmark merged its full-length adapters the same ways (and with PEFT's own
# `merge_and_unload`) and scored them on the same {glue:text}`q_items` items:

# %%
print(f"{'cached':34} {'accuracy':>9} {'max logit diff':>15}")
print(f"{'qlora_lora_lab unmerged':34}"
      f" {rows['qlora_lora_lab']['test_accuracy']:9.3f} {0:15.1e}")
for r in qlora["merges"]:
    print(f"{r['method'] + ' ' + r['merge']:34} {r['test_accuracy']:9.3f}"
          f" {r['max_logit_diff']:15.1e}")
merges = {(r["method"], r["merge"]): r for r in qlora["merges"]}
unmerged_acc = rows["qlora_lora_lab"]["test_accuracy"]
assert merges["qlora_lora_lab", "full_precision"]["max_logit_diff"] < 1e-3
assert merges["qlora_lora_lab", "requantize"]["max_logit_diff"] > 1
items_lost = [round((unmerged_acc - r["test_accuracy"]) * N_ITEMS)
              for r in qlora["merges"]
              if r["merge"] != "full_precision"]
assert max(abs(x) for x in items_lost) <= 2  # items
worst = max(items_lost)
print("test items lost by re-quantized merges:", items_lost)
glue("requant_lost", "lost none" if worst <= 0 else f"lost at most {worst}",
     zh="一道也没有丢" if worst <= 0 else f"最多丢了 {worst} 道")
glue("requant_logit", min(r["max_logit_diff"] for r in qlora["merges"]
                          if r["merge"] != "full_precision"), ".1f")

# %% [markdown]
# Here the re-quantized models moved their logits by {glue:text}`requant_logit` or
# more yet {glue:text}`requant_lost` of the {glue:text}`q_items` test items: the rounding
# changed scores but rarely which answer won. That
# is luck you can measure, not a guarantee — what PEFT's warning means is that you cannot
# know without measuring. Evaluate a re-quantized model before you ship it, or ship case 1
# or case 2.
#
# ### A pre-merge checklist, as code
#
# The source's checklist — base dtype, PEFT version, quantized or not, upcast first —
# becomes a few lines that print the facts and the options:

# %%
def merge_plan(m):
    quantized = [n for n, mod in m.named_modules()
                 if nf4.is_quantized_layer(mod)]
    floats = {p.dtype for p in m.parameters() if p.is_floating_point()}
    print("PEFT", peft.__version__, "| float dtypes:",
          sorted(str(d).removeprefix("torch.") for d in floats))
    if not quantized:
        print("full-precision base: merge_and_unload is exact")
        return
    print(f"{len(quantized)} 4-bit layers: choose how to merge:")
    for how, what in nf4.MERGE_OPTIONS.items():
        print(f"  {how:15} {what}")


merge_plan(ql_model)

# %% [markdown]
# ## Check yourself
#
# **1.** In a QLoRA layer's forward pass, what happens to the 4-bit weight?
# (a) it is dequantized once at load time and kept in 16-bit floats (b) it is dequantized
# into the compute dtype for this one matrix multiply and thrown away; the stored weight
# stays 4-bit (c) the input is quantized to 4-bit instead (d) the adapter is folded into it
#
# ```{admonition} Answer
# :class: dropdown
# (b): step 1 asserted that the 4-bit layer's output is exactly `x` times its dequantized
# weight, and the layer holds only the packed bytes and scales.
# ```
#
# **2.** Which numbers does QLoRA training change?
# (a) the 4-bit codes (b) the block scales (c) only the adapter's `lora_A` and `lora_B`, kept
# in 16-bit or 32-bit floats (d) every weight, in 4-bit
#
# ```{admonition} Answer
# :class: dropdown
# (c): the 4-bit base is a buffer of bytes, not a parameter; the cell below checks that
# every trainable parameter of the lora_lab QLoRA model is an adapter matrix.
# ```
#
# **3.** You trained a QLoRA adapter and must ship a model that computes exactly what you
# trained, as small as possible. Which merge?
# (a) re-quantize the merged weight to NF4 (b) dequantize and merge into full precision
# (c) keep the adapter unmerged on the 4-bit base (d) PEFT's `merge_and_unload` on the
# `load_in_4bit` model
#
# ```{admonition} Answer
# :class: dropdown
# (c): dynamic linking. Case 1 is exact too, but {glue:text}`merge_ratio_tiny` times larger
# here; (a) and (d) are the same re-quantized merge, which moved the logits by more than
# float rounding can explain (asserted in the merging section).
# ```

# %%
# The facts the answers state.
trainable = [n for n, p in ql_model.named_parameters() if p.requires_grad]
assert trainable and all(".lora_A." in n or ".lora_B." in n
                         for n in trainable)
base4 = ql_model.model.layers[0].mlp.up_proj.base_layer
assert base4.weight.dtype == torch.uint8  # packed codes, a buffer
assert not any(p is base4.weight for p in ql_model.parameters())
print(f"{len(trainable)} trainable tensors, all adapter matrices")

# %% [markdown]
# ## Summary
#
# - A **4-bit layer** keeps its weight packed and dequantizes it for each matrix multiply;
#   `NF4Linear` and bitsandbytes' `Linear4bit` hold the same bytes and compute the same
#   outputs. Wrapped with LoRA, that is QLoRA: only the adapter trains.
# - 7B-13B QLoRA fits a {glue:text}`budget_gib` GiB GPU **with gradient checkpointing** at
#   moderate sequence lengths; 13B in 16-bit LoRA does not.
# - QLoRA through transformers + bitsandbytes + PEFT and through lora_lab's own
#   `NF4Linear` train from identical 4-bit weights — the same numbers, given the same loop
#   — and hold {glue:text}`q_mem_ratio` times the memory of 32-bit LoRA,
#   {glue:text}`q_cost` ({glue:text}`q_acc_qlora` against {glue:text}`q_acc_lora`).
# - Merging into a 4-bit base is a choice: full precision (static linking, exact, big),
#   unmerged (dynamic linking, exact, small, a little extra compute) or re-quantized (small,
#   but rounded: PEFT merges a `load_in_4bit` model without an error and warns that
#   generations may differ).
# - Merging or counting a 4-bit model: {ref}`merging a 4-bit model <trouble-4bit-merge>` and {ref}`parameter counts <trouble-param-count>` (troubleshooting).
#
# ## Exercises
#
# 1. Quantize the bundled model with `quant_type="fp4"` in `nf4.quantize_model` and run the
#    lora_lab QLoRA cell again. Does the adapter make up for the worse base?
# 2. Compute the weight memory of a 70B Llama-2 in NF4 with and without double
#    quantization (`sizing.memory_estimate(..., double_quant=False)`). On which GPU sizes
#    does double quantization's saving decide whether it fits?
#
# ```{admonition} Solution 1
# :class: dropdown
# `nf4.quantize_model(ql_model, quant_type="fp4", compute_dtype=DTYPE)` before `add_lora`.
# The base starts worse (its relative error is in chapter 06's table). Compare the two runs'
# final losses to see how much of that the adapter absorbs while it learns the task;
# LoftQ (chapter 08) goes further and initialises the adapter to cancel the quantization
# error before training starts.
# ```
#
# ```{admonition} Solution 2
# :class: dropdown
# `sizing.memory_estimate("llama-2-70b", "qlora", r=16)` with and without
# `double_quant=False`: weights of about {glue:text}`sol_w_dq` GB against
# {glue:text}`sol_w_plain` GB; with the adapter's gradients and AdamW state,
# {glue:text}`sol_t_dq` GiB against {glue:text}`sol_t_plain` GiB. {glue:text}`sol_cards`
# ```

# %% tags=["hide-cell"]
# The solutions paste these.
est = {dq: sizing.memory_estimate("llama-2-70b", "qlora", r=16,
                                  double_quant=dq) for dq in (True, False)}
glue("sol_w_dq", est[True]["weights"] / GB, ".1f")
glue("sol_w_plain", est[False]["weights"] / GB, ".1f")
glue("sol_t_dq", est[True]["total"] / GiB, ".1f")
glue("sol_t_plain", est[False]["total"] / GiB, ".1f")
CARDS_GIB = (24, 32, 40, 48)  # common GPU memory sizes
left = {dq: {c: c - est[dq]["total"] / GiB for c in CARDS_GIB}
        for dq in (True, False)}
small = [c for c in CARDS_GIB if left[True][c] < 0]
card = min(c for c in CARDS_GIB if left[True][c] >= 0)
glue("sol_cards",
     f"Neither fits {' or '.join(map(str, small))} GiB; on a {card} GiB card"
     f" double quantization leaves {left[True][card]:.1f} GiB for activations"
     f" against {max(left[False][card], 0):.1f} GiB without it.",
     zh=f"两者都放不进 {' 或 '.join(map(str, small))} GiB；在 {card} GiB 的卡上，"
     f"双重量化给激活留下 {left[True][card]:.1f} GiB，"
     f"不用则只剩 {max(left[False][card], 0):.1f} GiB。")
