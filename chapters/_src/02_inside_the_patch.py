# %% [markdown]
# # 02 · Inside the patch: W₀x + BAx
#
# Chapter 01 treated the LoRA adapter as a black box: a small file that changes what a big
# model does. Here we open the `.dll` and read it. There is not much inside: two thin
# matrices and one addition. Everything LoRA saves follows from their shapes.
#
# **Learning goals**
# - write a LoRA layer in ten lines and follow one input through it, shape by shape;
# - check that those ten lines compute exactly what `lora_lab` and PEFT compute, and that
#   merging the patch into the weight ($W_0 + sBA$) changes nothing in the output;
# - do the parameter arithmetic yourself (a $d \times d$ layer at rank $r$) and check the
#   trainable count
#   PEFT prints for Llama-2-7B;
# - measure why a low-rank patch is enough: the weight change of a real fine-tune is
#   concentrated in a few directions.

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
D = 4096  # width of the example layer (Llama-2-7B's hidden size)
R = 8  # LoRA rank
ALPHA = 16  # lora_alpha; the patch is scaled by ALPHA / R
TASK = "sql"  # task of the short full fine-tune in the last section
FT_STEPS = 60  # steps of that full fine-tune
FT_BATCH = 16  # its batch size
FT_LR = 1e-3  # its learning rate

# %%
import math
from collections import Counter

import matplotlib.pyplot as plt
import torch
from torch import nn

import lora_lab
from lora_lab import data, plot, sizing, train
from lora_lab.inject import LoRAConfig, add_lora, count_parameters
from lora_lab.inject import trainable_parameters_line
from lora_lab.prose import glue
from lora_lab.layers import LoRALinear

lora_lab.seed_everything(SEED)
print(lora_lab.runtime.describe())

# %% [markdown]
# ## The formula
#
# Fine-tuning wants a new weight $W' = W_0 + \Delta W$, so that a layer computes
#
# $$h = W_0 x + \Delta W x .$$
#
# The first term is the original program, the second the patch. The trouble is that
# $\Delta W$ has the same shape as $W_0$: learning it directly costs as much as full
# fine-tuning. LoRA {cite}`hu2021lora` learns it in factored form instead,
# $\Delta W = s\,BA$, with $A$ of shape $[r, d_\text{in}]$, $B$ of shape
# $[d_\text{out}, r]$, a small rank $r$ and a fixed scale $s = \alpha / r$:
#
# $$h = W_0 x + s\,B(Ax) .$$
#
# $W_0$ is frozen; only $A$ and $B$ train. Here is the whole idea as a PyTorch module.

# %%
class InlineLoRA(nn.Module):
    """h = W0 x + (alpha / r) * B (A x), with W0 frozen."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)  # W0: read-only
        self.A = nn.Parameter(torch.empty(r, base.in_features))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # random
        self.B = nn.Parameter(torch.zeros(base.out_features, r))  # 0
        self.scaling = alpha / r

    def forward(self, x):
        return self.base(x) + (x @ self.A.T) @ self.B.T * self.scaling


# %% [markdown]
# The same formula as a picture, drawn to scale: one square unit per number, for a small
# layer of {glue:text}`fig_d` by {glue:text}`fig_d` with $r$ = {glue:text}`fig_r`. The grey
# block is the binary, frozen; the two orange strips are the whole patch. Even at this toy
# size the patch holds {glue:text}`fig_ratio`x fewer numbers than the weight, and the strips
# get thinner still as the layer grows while $r$ stays put.

# %%
from lora_lab import diagrams

fig_d, fig_r = 64, 8  # small enough that the thin strips stay visible
fig_ratio = fig_d * fig_d / (fig_r * (fig_d + fig_d))
assert fig_ratio == fig_d / (2 * fig_r)  # the ratio grows with d at fixed r
glue("fig_d", fig_d)
glue("fig_r", fig_r)
glue("fig_ratio", fig_ratio, "g")
diagrams.lora_shapes(d_out=fig_d, d_in=fig_d, r=fig_r, alpha=ALPHA)


# %% [markdown]
# ## One input, step by step
#
# Take a layer the size of one attention projection of Llama-2-7B ({glue:text}`d` in,
# {glue:text}`d` out) and a batch of {glue:text}`x_batch` sequences of {glue:text}`x_seq`
# tokens. Follow the data through both paths.

# %%
torch.manual_seed(SEED)
base = nn.Linear(D, D, bias=False)
patched = InlineLoRA(base, R, ALPHA)
x = torch.randn(2, 5, D)  # [batch, seq, d_in]

main_road = base(x)  # W0 x
down = x @ patched.A.T  # A x: 4096 features squeezed into r
up = down @ patched.B.T  # B (A x): back out to 4096
print(f"x        {tuple(x.shape)}")
glue("d", D, "d")
glue("r", R)
glue("x_batch", x.shape[0])
glue("x_seq", x.shape[1])
print(f"W0       {tuple(base.weight.shape)}  ->  W0 x  "
      f"{tuple(main_road.shape)}")
print(f"A        {tuple(patched.A.shape)}     ->  A x   "
      f"{tuple(down.shape)}")
print(f"B        {tuple(patched.B.shape)}     ->  B A x "
      f"{tuple(up.shape)}")
print(f"scaling  alpha / r = {ALPHA} / {R} = {patched.scaling}")

# %% [markdown]
# $A$ is a *down-projection*: it reads all {glue:text}`d` input features and keeps $r$ numbers,
# the few combinations this task's change cares about. $B$ is an *up-projection*: it turns
# those $r$ numbers back into a {glue:text}`d`-wide correction that is added to the main road's output.
#
# $B$ starts at zero, so at step 0 the patch adds exactly nothing: the patched model *is*
# the base model until training moves $B$. That is why a freshly injected adapter never
# breaks a model.

# %%
same_at_init = torch.equal(patched(x), base(x))
print("patched == base before training:", same_at_init)
assert same_at_init

# %% [markdown]
# To compare implementations we need a patch that does something, so give $B$ random values
# (as if it had trained for a while).

# %%
with torch.no_grad():
    patched.B.normal_(std=0.02)
h = patched(x)
print("patched == base now:", torch.equal(h, base(x)))
print(f"relative size of the patch: "
      f"{(h - main_road).norm() / main_road.norm():.3f}")

# %% [markdown]
# ## The same numbers as `lora_lab` and PEFT
#
# `lora_lab.layers.LoRALinear` is the package's version of the same module (it adds
# dropout, rsLoRA, merging and GPT-2's transposed layers). PEFT's LoRA layer is what most
# people train with. Copy our $A$ and $B$ into both and compare outputs.
#
# PEFT puts its layer in place by monkey-patching, the Chinese source's other picture of a
# run-time patch besides the `.dll`: `get_peft_model` finds the attribute named `proj` on the
# live model and replaces it with a LoRA layer that keeps the original `nn.Linear` inside,
# as `base_layer`. No class is edited; the cell below reaches the original through it.

# %%
from peft import LoraConfig, get_peft_model


class OneLayer(nn.Module):  # PEFT patches layers inside a model, by name
    def __init__(self, layer):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


ours = LoRALinear(nn.Linear(D, D, bias=False), r=R, lora_alpha=ALPHA)
theirs = get_peft_model(
    OneLayer(nn.Linear(D, D, bias=False)),
    LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"]),
)
peft_layer = theirs.base_model.model.proj
with torch.no_grad():
    for layer in (ours, peft_layer):
        layer.base_layer.weight.copy_(base.weight)
    ours.lora_A.weight.copy_(patched.A)
    ours.lora_B.weight.copy_(patched.B)
    peft_layer.lora_A["default"].weight.copy_(patched.A)
    peft_layer.lora_B["default"].weight.copy_(patched.B)
    diff_ours = (ours(x) - h).abs().max().item()
    diff_peft = (theirs(x) - h).abs().max().item()
print(f"lora_lab scaling {ours.scaling}, PEFT scaling "
      f"{peft_layer.scaling['default']}")
print("max |inline - lora_lab| < 1e-5:", diff_ours < 1e-5)
print("max |inline - PEFT|     < 1e-5:", diff_peft < 1e-5)
assert diff_ours < 1e-5 and diff_peft < 1e-5

# %% [markdown]
# ## Merging: the patch folded into the weight
#
# Because $W_0x + sB(Ax) = (W_0 + sBA)\,x$, the patch can be folded into the weight once
# training is done: $W' = W_0 + sBA$ is an ordinary {glue:text}`d`×{glue:text}`d` matrix, and
# the layer is a
# plain `nn.Linear` again, with no extra work per token. This is the "static linking" of
# chapter 07. `lora_lab` and PEFT both compute $W'$ the same way.

# %%
with torch.no_grad():
    w_merged = base.weight + patched.scaling * patched.B @ patched.A
    merged = nn.Linear(D, D, bias=False)
    merged.weight.copy_(w_merged)
    diff_merged = (merged(x) - h).abs().max().item()
    ours.merge()
    peft_layer.merge()
    diff_w_ours = (ours.base_layer.weight - w_merged).abs().max().item()
    diff_w_peft = (peft_layer.base_layer.weight - w_merged).abs().max().item()
print("merged layer == patched layer (< 1e-5):", diff_merged < 1e-5)
print("lora_lab merged W == W0 + sBA (< 1e-6):", diff_w_ours < 1e-6)
print("PEFT merged W     == W0 + sBA (< 1e-6):", diff_w_peft < 1e-6)
assert diff_merged < 1e-5 and diff_w_ours < 1e-6 and diff_w_peft < 1e-6

# %% [markdown]
# (claim-65536)=
# ## The parameter arithmetic
#
# Both sources do the same sum for this layer: a {glue:text}`d`×{glue:text}`d` weight has
# {glue:text}`full_n` entries, and at r={glue:text}`r` the patch has $r \cdot d + d \cdot r$ =
# {glue:text}`patch_n`. The Chinese source calls that "more than 250 times" fewer; the
# English one "approximately 256 times".
# Count the real tensors:

# %%
full = base.weight.numel()
n_a = ours.lora_A.weight.numel()
n_b = ours.lora_B.weight.numel()
print(f"W0: {full:,}   A: {n_a:,}   B: {n_b:,}   A+B: {n_a + n_b:,}")
print(f"W0 / (A+B) = {full / (n_a + n_b)}")
assert full == 4096 * 4096 == 16_777_216
assert n_a == n_b == 32_768 and n_a + n_b == 65_536
assert full / (n_a + n_b) == 256  # exactly; "more than 250x" holds too
glue("full_n", full)
glue("patch_n", n_a + n_b)
glue("saving", full / (n_a + n_b), ".0f")

# %% [markdown]
# The ratio is exactly {glue:text}`saving`, because for a square $d \times d$ layer it is
# $d^2 / (2rd) = d / 2r$. Two things follow from the formula. The saving grows with the
# width: a layer of our tiny {glue:text}`tiny_d`-wide model at r=8 saves only
# {glue:text}`saving_tiny`×. And it shrinks linearly as $r$ grows: r=64 on the same
# {glue:text}`d`-wide layer saves {glue:text}`saving_r64`×.

# %%
TINY_D = 192  # the bundled model's width
for d, r in [(D, 8), (D, 64), (TINY_D, 8)]:
    print(f"d={d:<5} r={r:<3} saving = d / 2r = {d / (2 * r):g}x")
glue("tiny_d", TINY_D)
glue("saving_tiny", TINY_D / 16, "g")
glue("saving_r64", D / 128, "g")

# %% [markdown]
# (claim-print-trainable)=
# ## What `print_trainable_parameters` prints for Llama-2-7B
#
# The Chinese source shows PEFT's summary line for r=16 on all seven projections of
# Llama-2-7B (`q_proj k_proj v_proj o_proj gate_proj up_proj down_proj`):
#
# ```text
# trainable params: 39,976,960 || all params: 6,778,314,752 || trainable%: 0.1287
# ```
#
# We can check it without downloading the weights: build Llama-2-7B on PyTorch's `meta` device
# (shapes, no storage) and let both PEFT and `lora_lab` count.

# %%
config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                    target_modules=sizing.LLAMA_ALL, task_type="CAUSAL_LM")
peft_7b = get_peft_model(sizing.meta_model("llama-2-7b"), config)
peft_7b.print_trainable_parameters()
peft_counts = peft_7b.get_nb_trainable_parameters()

ours_7b = add_lora(sizing.meta_model("llama-2-7b"),
                   LoRAConfig(r=16, lora_alpha=32,
                              target_modules=sizing.LLAMA_ALL))
line = trainable_parameters_line(ours_7b)
print(line)
assert peft_counts == count_parameters(ours_7b) == (39_976_960,
                                                     6_778_392_576)
assert line.endswith("trainable%: 0.5898")
n_layers = sizing.shape_config("llama-2-7b").num_hidden_layers
glue("trainable_7b", peft_counts[0])
glue("all_7b", peft_counts[1])
glue("base_7b", peft_counts[1] - peft_counts[0])
glue("per_layer_7b", peft_counts[0] // n_layers)
glue("layers_7b", n_layers)
glue("share_7b", 100 * peft_counts[0] / peft_counts[1], ".4f")

# %% [markdown]
# The trainable count in the source is right: per layer $16 \cdot (d_\text{in} +
# d_\text{out})$ summed over the seven projections is {glue:text}`per_layer_7b`, times
# {glue:text}`layers_7b` layers. Two other numbers are not:
#
# - **all params** is {glue:text}`all_7b` ({glue:text}`base_7b` base + the adapter), not
#   the source's 6,778,314,752, which is {glue:text}`all_short` short;
# - **trainable%** is {glue:text}`share_7b`, not the source's 0.1287. Even the source's own
#   two counts give {glue:text}`seed_share`%. A share of 0.1287% would mean about
#   {glue:text}`implied_m` million trainable parameters; the nearest standard configuration,
#   r=16 on `q_proj` and `v_proj` only, gives {glue:text}`qv_share`%.

# %%
seed_share = 100 * 39_976_960 / 6_778_314_752
qv = sizing.lora_counts("llama-2-7b", 16, ["q_proj", "v_proj"])
print(f"the source's own counts give {seed_share:.4f}%")
print(f"r=16 on q,v: {qv[0]:,} trainable, {100 * qv[0] / qv[1]:.4f}%")
assert round(seed_share, 4) == 0.5898
assert 6_778_392_576 - 6_778_314_752 == 77_824
assert qv[0] == 8_388_608 and round(100 * qv[0] / qv[1], 4) == 0.1243
SOURCE_ALL, SOURCE_SHARE = 6_778_314_752, 0.1287  # the Chinese source's line
glue("all_short", peft_counts[1] - SOURCE_ALL)
glue("seed_share", seed_share, ".4f")
glue("implied_m", SOURCE_SHARE / 100 * SOURCE_ALL / 1e6, ".1f")
glue("qv_share", 100 * qv[0] / qv[1], ".4f")

# %% [markdown]
# ## Why a rank-8 patch is enough: look at a real $\Delta W$
#
# LoRA rests on one bet: the change fine-tuning makes to a weight matrix has a low
# *intrinsic rank* {cite}`hu2021lora`. Aghajanyan et al. found the same thing from another
# side: fine-tuning a pretrained model works even when the update is restricted to a
# random subspace of a few hundred dimensions {cite}`aghajanyan2020intrinsic`.
#
# We can test the bet on our own model. Fine-tune **every** weight of the bundled model on
# the `sql` task for a short while (no LoRA anywhere), then take each weight matrix's change
# $\Delta W = W_\text{after} - W_\text{before}$ and its singular values
# $\sigma_1 \ge \sigma_2 \ge \dots$. The share of the change's energy
# $\|\Delta W\|_F^2 = \sum_i \sigma_i^2$ held by the top $r$ directions says how much of the
# change a rank-$r$ patch could express. (Full fine-tuning on a CPU is not bit-for-bit
# reproducible from run to run: parallel gradient sums round differently, and the training
# run amplifies that. So the next two cells' numbers vary a little between runs and are not
# compared; the verdict cell after the figure is.)

# %% tags=["nbval-ignore-output"]
lora_lab.seed_everything(SEED)
model, tok = lora_lab.load_base(BASE_MODEL)
before = {n: p.detach().clone() for n, p in model.named_parameters()
          if p.ndim == 2 and ".layers." in n}
run = train.train(model, tok, data.load_task(TASK, "train"),
                  steps=FT_STEPS, lr=FT_LR, batch_size=FT_BATCH,
                  seed=SEED)
print(f"{run['trainable_params']:,} trainable, loss "
      f"{run['losses'][0]:.2f} -> {run['losses'][-1]:.2f}")


# %% tags=["nbval-ignore-output"]
def energy_curve(delta):
    """Cumulative share of ||delta||^2 held by the top-k directions."""
    s2 = torch.linalg.svdvals(delta.double()) ** 2
    return (s2.cumsum(0) / s2.sum()).float().cpu()  # on the CPU, for plotting


params = dict(model.named_parameters())
curves = {n: energy_curve(params[n].detach() - w0)
          for n, w0 in before.items()}
gen = torch.Generator().manual_seed(SEED)
random_curves = {n: energy_curve(torch.randn(w0.shape, generator=gen))
                 for n, w0 in before.items()}
kinds = sorted({n.split(".")[-2] for n in curves})
print(f"{len(curves)} weight matrices changed; share of ||dW||^2 "
      f"in the top {R} directions:")
print(f"{'layer type':10} {'shape':>10} {'fine-tune':>10} "
      f"{'random':>7}")
top_r, top_r_random = {}, {}
for kind in kinds:
    names = [n for n in curves if n.split(".")[-2] == kind]
    top_r[kind] = sum(curves[n][R - 1] for n in names) / len(names)
    top_r_random[kind] = sum(random_curves[n][R - 1]
                             for n in names) / len(names)
    shape = "x".join(map(str, before[names[0]].shape))
    print(f"{kind:10} {shape:>10} {top_r[kind]:>10.2f} "
          f"{top_r_random[kind]:>7.2f}")
glue("top_lo", min(top_r.values()), ".2f")
glue("top_hi", max(top_r.values()), ".2f")
glue("rand_lo", min(top_r_random.values()), ".2f")
glue("rand_hi", max(top_r_random.values()), ".2f")

# %%
fig, (ax,) = plot.new_figure(width=6.4, height=3.6)
with plt.rc_context(plot.BOOK_STYLE):
    for i, kind in enumerate(kinds):
        names = [n for n in curves if n.split(".")[-2] == kind]
        mean = sum(curves[n] for n in names) / len(names)
        ks = range(1, len(mean) + 1)
        ax.plot(ks, mean, color=plot.COLORS[i], label=f"dW of {kind}")
    # the dashed line: random matrices of the most common shape (all, here)
    lengths = Counter(len(c) for c in random_curves.values())
    common = lengths.most_common(1)[0][0]
    same = [c for c in random_curves.values() if len(c) == common]
    mean_rand = sum(same) / len(same)
    ax.plot(range(1, len(mean_rand) + 1), mean_rand, "k--",
            label="random matrix, same shape")
    ax.axvline(R, color="#999999", lw=1)
    ax.text(R * 1.1, 0.05, f"r = {R}", color="#555555")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("top-k singular directions")
    ax.set_ylabel("share of ||dW||$^2$")
    ax.set_title(f"Full fine-tune on '{TASK}', {FT_STEPS} steps")
    ax.legend(loc="upper left", ncol=2)
fig

# %% [markdown]
# (claim-low-rank)=
# Reading the figure: a random matrix spreads its energy evenly, so its top
# {glue:text}`r` of {glue:text}`tiny_d` directions hold only a small share (the dashed
# line). The fine-tune's changes rise far
# faster: a handful of directions carry most of what full fine-tuning did to each matrix.
# The claim we check: averaged over all changed matrices, the top-$r$ directions of
# $\Delta W$ hold most of its energy, several times the share of a random matrix (per layer
# type above: {glue:text}`top_lo` to {glue:text}`top_hi`, against {glue:text}`rand_lo` to
# {glue:text}`rand_hi` for random matrices).

# %%
all_top = sum(c[R - 1] for c in curves.values()) / len(curves)
all_rand = sum(c[R - 1] for c in random_curves.values()) / len(curves)
print(f"top-{R} share, mean over {len(curves)} matrices: "
      f"fine-tune > 0.5: {bool(all_top > 0.5)}, "
      f"at least 3x random: {bool(all_top > 3 * all_rand)}")
if lora_lab.models.is_bundled(BASE_MODEL):  # measured on the bundled model
    assert all_top > 0.5 and all_top > 3 * all_rand, (all_top, all_rand)

# %% [markdown]
# This is evidence, not proof. A short fine-tune on one narrow task is the friendly case.
# Chapter 09 trains on a task far from the pretraining data, where a small $r$ stops being
# enough; it measures accuracy against rank there, not the spectrum of the change, so
# whether that change spreads over more directions is left open (exercise: run the cell
# above on chapter 09's `shift` task).
#
# ## Check yourself
#
# **1.** A LoRA layer has just been added to a model, and nothing has trained yet. What does
# the layer output?
# (a) noise, until training fixes it (b) exactly the base layer's output, because $B$ starts
# at zero (c) the base output scaled by $\alpha/r$ (d) zero
#
# ```{admonition} Answer
# :class: dropdown
# (b): $sB(Ax)$ is zero while $B = 0$, so a fresh patch changes nothing (asserted with
# `torch.equal` above). That is why injecting an adapter never breaks a model.
# ```
#
# **2.** How many numbers does a rank-$r$ patch train on a $d \times d$ layer?
# (a) $r \cdot d$ (b) $2rd$ (c) $d^2 / r$ (d) $r^2$
#
# ```{admonition} Answer
# :class: dropdown
# (b): $A$ is $r \times d$ and $B$ is $d \times r$. Against the layer's $d^2$ that is
# $d / 2r$ times fewer: exactly {glue:text}`saving` at $d$ = {glue:text}`d` and r=8
# (asserted), and the saving shrinks as $r$ grows.
# ```
#
# **3.** What does the "low-rank" bet claim about the change $\Delta W$ that fine-tuning
# makes to a weight matrix?
# (a) that it touches only a few entries (b) that most of its energy lies in a few
# directions, so $BA$ with a small $r$ can express most of it (c) that it is small in
# size (d) that it is the same for every task
#
# ```{admonition} Answer
# :class: dropdown
# (b): the bet is about directions, not entries: the top-$r$ directions of a real
# fine-tune's change hold several times the energy share of a random matrix's (asserted in
# the spectrum cells).
# ```
#
# ## Summary
#
# - A LoRA layer computes $W_0x + sB(Ax)$: $A$ squeezes the input to $r$ numbers, $B$
#   expands them back, and $B = 0$ at the start makes the patch a no-op until it trains.
# - Ten inline lines, `lora_lab.layers.LoRALinear` and PEFT's layer give the same outputs;
#   merging $W_0 + sBA$ gives the same outputs with no extra work per token.
# - A $d \times d$ layer at rank $r$ trains $2rd$ instead of $d^2$ numbers: exactly
#   {glue:text}`saving`× fewer at $d$ = {glue:text}`d` and r=8. For Llama-2-7B with r=16 on
#   all seven projections PEFT prints {glue:text}`trainable_7b` trainable of
#   {glue:text}`all_7b`, i.e. **{glue:text}`share_7b`%**, not the 0.1287% the source shows.
# - The weight change of a real full fine-tune is concentrated in a few directions, which
#   is what lets a rank-8 patch stand in for it.
# - A 4-bit model counted with `numel()` seems to have far fewer weights than it has: {ref}`troubleshooting <trouble-param-count>`.
#
# ## Exercises
#
# 1. A layer of Llama-2-7B's MLP, `up_proj`, is {glue:text}`d` → {glue:text}`ffn_7b`. How
#    many parameters does a
#    rank-16 patch add to it, and how many times fewer than the layer's own weight is that?
# 2. Make the inline layer use rsLoRA's scale $\alpha/\sqrt{r}$ and check it against
#    `LoRALinear(..., use_rslora=True)`.
# 3. In the spectrum cell, replace the top-$r$ share by the smallest $k$ whose share reaches
#    nine tenths. Which layer type needs the most directions?
#
# ```{admonition} Solution 1
# :class: dropdown
# $A$ is $[16, d_\text{in}]$ and $B$ is $[d_\text{out}, 16]$: $16 \cdot (d_\text{in} +
# d_\text{out})$ = {glue:text}`up_patch` parameters, against {glue:text}`up_weight` in the
# weight, so {glue:text}`up_saving` times fewer. In code:
# `LoRALinear(nn.Linear(4096, 11008, bias=False, device="meta"), r=16, lora_alpha=32)` and
# count `lora_A.weight.numel() + lora_B.weight.numel()`.
# ```
#
# ```{admonition} Solution 2
# :class: dropdown
# Set `self.scaling = alpha / math.sqrt(r)` in `InlineLoRA.__init__`. Build
# `LoRALinear(nn.Linear(D, D, bias=False), r=R, lora_alpha=ALPHA, use_rslora=True)`, copy
# the base weight, $A$ and $B$ into it as in the comparison cell, and assert
# `(ours(x) - patched(x)).abs().max() < 1e-5`. Both scale by $\alpha/\sqrt{r}$ =
# {glue:text}`rs_scale`.
# ```
#
# ```{admonition} Solution 3
# :class: dropdown
# For each curve `c`, `k90 = int((c < 0.9).sum()) + 1` is the number of directions needed
# to reach nine tenths. Group by `n.split(".")[-2]` as in the table cell and compare the
# means; a random {glue:text}`tiny_d`×{glue:text}`tiny_d` matrix needs well over a hundred.
# ```

# %% tags=["hide-cell"]
# The solutions paste these.
ffn_7b = sizing.shape_config("llama-2-7b").intermediate_size
up = LoRALinear(nn.Linear(D, ffn_7b, bias=False, device="meta"),
                r=16, lora_alpha=32)
up_patch = up.lora_A.weight.numel() + up.lora_B.weight.numel()
glue("ffn_7b", up.base_layer.out_features, "d")
glue("up_patch", up_patch)
glue("up_weight", up.base_layer.weight.numel())
glue("up_saving", up.base_layer.weight.numel() / up_patch, ".1f")
glue("rs_scale", ALPHA / math.sqrt(R), ".2f")
