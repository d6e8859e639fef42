# %% [markdown]
# # 08 · The LoRA universe: variants of the patch
#
# LoRA opened a field. Within a year of the paper, people shipped "better patch compilers":
# variants that keep the patch $W_0 x + s\,BAx$ but change how $A$ and $B$ start, how fast
# each learns, or how the patch is applied. Think of them as optimisation flags for the
# same linker: the output format stays a LoRA adapter (mostly), the build gets smarter. In
# PEFT most of them are one field of the patch manifest, `LoraConfig` (`use_rslora`,
# `init_lora_weights="pissa"`, `use_dora`): the same `.dll` format, compiled another way.
# The Chinese source reads the field as the path a software technique takes as it matures:
# a clever algorithm (LoRA), an engineering answer to a hardware limit (QLoRA, chapters 06
# and 06b), optimisations of the algorithm itself (LoRA+, OLoRA and the rest, here), and
# finally systems for deploying thousands of patches (S-LoRA, at the end of this chapter).
#
# This chapter writes each variant's idea in a few lines and checks it; chapter 08b trains
# them all with one budget and holds the papers' claims against what they do.
#
# **Learning goals**
# - know what problem each variant answers: rsLoRA, LoRA+, OLoRA, PiSSA, DoRA, CorDA,
#   LoRA-Null, LoftQ;
# - write each one's idea in a few lines and check it against `lora_lab` and PEFT;
# - turn an adapter whose variant rewrote the base back into a plain LoRA adapter;
# - know what S-LoRA and mLoRA add when there are hundreds of adapters to serve or train.

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
# This chapter checks each variant on one small linear layer; BASE_MODEL is
# here for the Parameters convention (chapter 08b trains the real model).
SEED = 0

# %%
import lora_lab  # first: it keeps known library noise out of outputs

import math

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import lora_lab.plot
from lora_lab.dora import add_dora
from lora_lab.inject import LoRAConfig, add_lora
from lora_lab.inject import mark_only_lora_as_trainable
from lora_lab.layers import lora_scaling
from lora_lab.prose import glue
from lora_lab.variants import init_variant, to_plain_lora

lora_lab.seed_everything(SEED)
print(lora_lab.runtime.describe())

# %% [markdown]
# ## A small layer to check every idea on
#
# Each section below writes a variant's idea in a few lines of plain `torch` and asserts
# that it gives the same numbers as `lora_lab` and as PEFT. A model with one linear layer
# is enough for that and runs in milliseconds; chapter 08b's benchmark uses the real
# (tiny) language model. `calib` plays the part of a few calibration batches: inputs
# that use some directions of the input space a lot and others hardly at all, as real
# activations do.

# %%
IN, OUT, R, ALPHA = 64, 48, 4, 8
S = ALPHA / R  # plain LoRA scaling


class Net(nn.Module):
    """One linear layer, always with the same weights: the smallest model
    that LoRA, and PEFT, can patch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(SEED)
        self.proj = nn.Linear(IN, OUT)

    def forward(self, x):
        return self.proj(x)


W = Net().proj.weight.detach().clone()  # [out, in]
gen = torch.Generator().manual_seed(SEED)
x = torch.randn(5, IN, generator=gen)  # [batch, in]
rotation, _ = torch.linalg.qr(torch.randn(IN, IN, generator=gen))
use = torch.logspace(0, -2, IN)  # how much each input direction is used
calib = [(torch.randn(1, 16, IN, generator=gen) * use) @ rotation.T
         for _ in range(8)]  # 8 samples [1, seq, in]


def ours(dora=False, **kwargs):
    """Net with lora_lab's LoRA on `proj`; returns (model, layer)."""
    config = LoRAConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"],
                        **kwargs)
    model = (add_dora if dora else add_lora)(Net(), config)
    return model, model.proj


def peft(**kwargs):
    """Net with PEFT's LoRA on `proj`; returns (model, layer)."""
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"],
                        **kwargs)
    model = get_peft_model(Net(), config)
    return model, model.base_model.model.proj


def same(a, b, atol=1e-5):
    return torch.allclose(a, b, atol=atol, rtol=1e-4)


def peft_AB(layer):
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


print("W", tuple(W.shape), "x", tuple(x.shape), "calibration", len(calib),
      "samples of", tuple(calib[0].shape))

# %% [markdown]
# ## rsLoRA: keep the patch's volume when r grows
#
# **Problem.** LoRA scales the patch by $\alpha/r$. The patch $BAx$ is a sum of $r$ rank-1
# terms, so its size grows like $\sqrt r$ while the factor shrinks like $1/r$: at a larger
# rank the same weights produce a *smaller* update, gradients shrink with it, and a higher
# rank stops helping. rsLoRA {cite}`kalajdzievski2023rslora` divides by $\sqrt r$ instead,
# which keeps the update's size independent of $r$. It changes one number; inference cost
# is unchanged.

# %%
def scaling(r, alpha, rslora=False):
    return alpha / math.sqrt(r) if rslora else alpha / r


def patch_size(r, rslora):
    """Size of s * B A x for kaiming A [r, 256] and unit-size B [256, r]."""
    g = torch.Generator().manual_seed(SEED)
    A = (torch.rand(r, 256, generator=g) * 2 - 1) / 16  # U(-1/sqrt(in), ..)
    B = torch.randn(256, r, generator=g)
    xs = torch.randn(64, 256, generator=g)
    return (scaling(r, 16, rslora) * xs @ A.T @ B.T).norm().item()


print(" r   alpha/r  alpha/sqrt(r)   size(alpha/r)  size(rsLoRA)")
for r in (4, 16, 64, 256):
    print(f"{r:>3} {scaling(r, 16):8.3f} {scaling(r, 16, True):11.3f}"
          f" {patch_size(r, False):14.1f} {patch_size(r, True):13.1f}")

# %% [markdown]
# From $r=4$ to $r=256$ the plain patch shrinks about $\sqrt{64}=8$ times; the rsLoRA patch
# keeps its size. And the scaling is the same number in `lora_lab` and in PEFT:

# %%
ratio_plain = patch_size(256, False) / patch_size(4, False)
ratio_rs = patch_size(256, True) / patch_size(4, True)
assert ratio_plain < 0.2 and 0.7 < ratio_rs < 1.4, (ratio_plain, ratio_rs)
for rslora in (False, True):
    _, mine = ours(use_rslora=rslora)
    _, theirs = peft(use_rslora=rslora)
    assert mine.scaling == theirs.scaling["default"]
    assert mine.scaling == scaling(R, ALPHA, rslora) == lora_scaling(
        R, ALPHA, rslora)
print(f"size ratio r=256 / r=4: alpha/r {ratio_plain:.2f},"
      f" rsLoRA {ratio_rs:.2f}")

# %% [markdown]
# The same measurement over more ranks, as a picture: the size of the patch a fixed $A$
# and $B$ of each rank produce, under each scaling rule.

# %%
ranks = [4, 8, 16, 32, 64, 128, 256]
fig, (ax,) = lora_lab.plot.new_figure(width=5.5, height=3.2)
with lora_lab.plot.matplotlib.rc_context(lora_lab.plot.BOOK_STYLE):
    for rs, rule in ((False, "alpha / r (LoRA)"),
                     (True, "alpha / sqrt(r) (rsLoRA)")):
        ax.plot(ranks, [patch_size(r, rs) for r in ranks], marker="o",
                label=rule)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("rank r")
    ax.set_ylabel("size of s * B A x")
    ax.legend()
fig

# %% [markdown]
# ## LoRA+: B learns faster than A
#
# **Problem.** $A$ and $B$ play different parts: $A$ reads the input, $B$ (which starts at
# zero) writes the output. Hayou et al. {cite}`hayou2024loraplus` show that with one
# learning rate for both, feature learning is inefficient when the model is wide, and
# propose $\eta_B = \lambda\,\eta_A$ with $\lambda \gg 1$ (the PEFT docs use 16). It costs
# nothing: it is two optimizer parameter groups.

# %%
def loraplus_groups(model, lr, ratio):
    """A's at lr; B's (and 1-d trainables: DoRA magnitudes) at lr * ratio."""
    a, b = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (b if "lora_B" in name or p.ndim == 1 else a).append(p)
    return [{"params": a, "lr": lr}, {"params": b, "lr": lr * ratio}]


from lora_lab.variants import create_loraplus_optimizer  # noqa: E402
from peft.optimizers import create_loraplus_optimizer as peft_loraplus  # noqa

mine, _ = ours()
theirs, _ = peft()
mark_only_lora_as_trainable(mine)
inline = loraplus_groups(mine, 1e-3, 16)
opt_mine = create_loraplus_optimizer(mine, torch.optim.AdamW, lr=1e-3,
                                     loraplus_lr_ratio=16)
opt_peft = peft_loraplus(theirs, torch.optim.AdamW, lr=1e-3,
                         loraplus_lr_ratio=16)
for opt in (opt_mine, opt_peft):
    print([(g["lr"], [tuple(p.shape) for p in g["params"]])
           for g in opt.param_groups])

# %% [markdown]
# PEFT keeps four groups (A; LoRA on embeddings at a fixed 1e-6; B; B without weight
# decay); with no embedding LoRA and no trainable norms, two of them are empty and the rest
# are exactly the two inline groups:

# %%
lrs = [g["lr"] for g in opt_peft.param_groups]
assert [g["lr"] for g in opt_mine.param_groups] == lrs == [
    1e-3, 1e-6, 1.6e-2, 1.6e-2]
for g_inline, k in zip(inline, (0, 2)):
    for opt in (opt_mine, opt_peft):
        got = opt.param_groups[k]["params"]
        assert [p.shape for p in got] == [p.shape for p in g_inline["params"]]
assert all(p is q for p, q in zip(opt_mine.param_groups[2]["params"],
                                  inline[1]["params"]))
print("LoRA+ groups: inline == lora_lab == PEFT")

# %% [markdown]
# ## OLoRA: start from an orthonormal basis of W
#
# **Problem.** Plain LoRA starts $A$ at random and $B$ at zero, so the first steps are spent
# finding useful directions. OLoRA {cite}`buyukakyuz2024olora` starts from the QR
# decomposition $W = QR$: $B$ is the first $r$ columns of $Q$ (orthonormal), $A$ the first $r$
# rows of $R$. To keep the model's output unchanged at step 0, that piece is taken out of the
# base weight: $W' = W - s\,BA$. The paper reports faster convergence.

# %%
Q, Rq = torch.linalg.qr(W)  # [out, k], [k, in]
B_olora, A_olora = Q[:, :R], Rq[:R]  # [out, r], [r, in]
W_olora = W - S * B_olora @ A_olora  # the rewritten base weight

mine, layer = ours()
init_variant(mine, "olora")
_, theirs = peft(init_lora_weights="olora")
for got in ((layer.lora_A.weight, layer.lora_B.weight), peft_AB(theirs)):
    assert same(got[0], A_olora) and same(got[1], B_olora)
assert same(layer.base_layer.weight, W_olora)
assert same(theirs.base_layer.weight, W_olora)
assert same(mine(x), Net()(x))  # W' + s B A = W: same output at step 0
print("OLoRA: inline == lora_lab == PEFT; output unchanged at step 0")

# %% [markdown]
# ## PiSSA: train the principal components
#
# **Problem.** The same question, answered with the SVD. PiSSA {cite}`meng2024pissa` puts
# the top-$r$ singular directions of $W$ (its *principal* components) into $B$ and $A$ and
# freezes the residual, so training starts on the directions that matter most for the layer.
# The paper reports e.g. 72.9% vs 67.7% on GSM8K for Mistral-7B.

# %%
U, Sv, Vh = torch.linalg.svd(W, full_matrices=False)
root = (Sv[:R] / S).sqrt()  # divide by s so that s * B A = U_r S_r Vh_r
A_pissa = root[:, None] * Vh[:R]  # [r, in]
B_pissa = U[:, :R] * root  # [out, r]
W_pissa = W - S * B_pissa @ A_pissa

mine, layer = ours()
init_variant(mine, "pissa")
_, theirs = peft(init_lora_weights="pissa")
for got in ((layer.lora_A.weight, layer.lora_B.weight), peft_AB(theirs)):
    assert same(got[0], A_pissa) and same(got[1], B_pissa)
assert same(layer.base_layer.weight, W_pissa)
assert same(theirs.base_layer.weight, W_pissa)
print("PiSSA: inline == lora_lab == PEFT")

# %% [markdown]
# ### Shipping a variant that rewrote the base
#
# OLoRA, PiSSA, CorDA and LoRA-Null change the base weight, so their adapter only works on
# the rewritten base. After training, $W' + s\,BA = W + s\,(BA - B_0A_0)$, which is a plain
# LoRA adapter of rank $2r$ on the *original* $W$: $A' = [A; A_0]$, $B' = [B, -B_0]$. That is
# PEFT's `save_pretrained(..., path_initial_model_for_weight_conversion=...)`, and
# `lora_lab.variants.to_plain_lora`:

# %%
with torch.no_grad():  # pretend training moved the adapter
    layer.lora_B.weight += 0.1 * torch.randn(OUT, R, generator=gen)
trained = mine(x)
to_plain_lora(mine)
assert layer.r == 2 * R and same(layer.base_layer.weight, W)
assert same(mine(x), trained)
print(f"plain LoRA of rank {layer.r} on the original W, same outputs")

# %% [markdown]
# ## DoRA: a length and a direction
#
# **Problem.** Each output row of $W$ is a vector: a length times a direction. Full
# fine-tuning changes the two in its own proportions; LoRA's $BA$ can only move them
# together. DoRA {cite}`liu2024dora` trains them apart: a magnitude vector $m$ (one number
# per output row, starting at the row norms of $W$) and LoRA for the direction,
#
# $$W' = m \odot \frac{W + s\,BA}{\lVert W + s\,BA\rVert_{\text{row}}}.$$
#
# The paper reports +3.7 points over LoRA on commonsense reasoning with LLaMA-7B, at the
# cost of $out$ extra parameters per layer and a slower forward pass.

# %%
def dora_forward(x, W, bias, A, B, m, s):
    V = W + s * B @ A  # [out, in]
    W_new = m[:, None] * V / V.norm(dim=1, keepdim=True)
    return x @ W_new.T + bias


mine, layer = ours(dora=True)
assert same(layer.lora_magnitude_vector, W.norm(dim=1))  # m starts at |W|
with torch.no_grad():  # pretend training moved B and m
    layer.lora_B.weight += 0.1 * torch.randn(OUT, R, generator=gen)
    layer.lora_magnitude_vector *= 1 + 0.1 * torch.randn(OUT, generator=gen)
A, B, m = (layer.lora_A.weight, layer.lora_B.weight,
           layer.lora_magnitude_vector)
expected = dora_forward(x, W, Net().proj.bias, A, B, m, S)

theirs_model, theirs = peft(use_dora=True)
with torch.no_grad():
    theirs.lora_A["default"].weight.copy_(A)
    theirs.lora_B["default"].weight.copy_(B)
    theirs.lora_magnitude_vector["default"].weight.copy_(m)
assert same(mine(x), expected) and same(theirs_model(x), expected)
print("DoRA forward: inline == lora_lab == PEFT")

# %% [markdown]
# ## CorDA: let the data orient the patch
#
# **Problem.** PiSSA and OLoRA look only at $W$. But which directions of $W$ matter depends
# on the inputs the layer actually sees. CorDA {cite}`yang2024corda` runs a few calibration
# batches, collects the input covariance $C = \text{mean}(X^\top X)$, and decomposes $WC$
# instead of $W$ (mapping the right factor back with $C^{-1}$). Two modes:
#
# - **IPM** (instruction-previewed): calibrate on the *task*, keep the top-$r$ components:
#   adapt where the task's inputs push hardest;
# - **KPM** (knowledge-preserved): calibrate on what must *not* be forgotten (e.g. world
#   knowledge), keep the bottom-$r$ components: train where that knowledge barely looks.

# %%
def covariance(batches):
    """mean over samples of X^T X, each sample scaled by its max (PEFT)."""
    total = 0
    for xb in batches:
        xs = xb[0] / xb[0].max().abs()  # [seq, in]
        total = total + xs.T @ xs
    return total / len(batches)  # [in, in]


def corda(W, C, mode, s):
    eye, damp = torch.eye(len(C)), 0.01
    while True:  # damp C until it is safely invertible (PEFT's loop)
        Cd = C + damp * C.diag().mean() * eye
        C_inv = torch.linalg.inv(Cd)
        if torch.dist(Cd @ C_inv, eye) < 0.05:
            break
        damp *= 2
    U, Sv, Vh = torch.linalg.svd(W @ Cd, full_matrices=False)
    V = (Vh @ C_inv).T  # so that U diag(S) V^T = W
    keep = slice(None, R) if mode == "ipm" else slice(-R, None)
    root = (Sv[keep] / s).sqrt()
    return root[:, None] * V[:, keep].T, U[:, keep] * root  # A, B


C = covariance(calib)
energy = torch.linalg.eigvalsh(C)  # ascending
print("input energy, most vs least used direction:",
      f"{energy[-1]:.2g} vs {energy[0]:.2g}")

# %% [markdown]
# Checked for both modes against `lora_lab` and against PEFT's own pipeline
# (`preprocess_corda` collects the covariance with forward hooks, then `get_peft_model`
# initialises):

# %%
from peft.tuners.lora.config import CordaConfig  # noqa: E402
from peft.tuners.lora.corda import preprocess_corda  # noqa: E402

for mode in ("ipm", "kpm"):
    A_c, B_c = corda(W, C, mode, S)
    mine, layer = ours()
    init_variant(mine, f"corda-{mode}", calibration=calib)
    net = Net()
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"],
                        init_lora_weights="corda",
                        corda_config=CordaConfig(corda_method=mode))
    preprocess_corda(net, config, run_model=lambda: [net(b) for b in calib])
    theirs = get_peft_model(net, config).base_model.model.proj
    for got in ((layer.lora_A.weight, layer.lora_B.weight), peft_AB(theirs)):
        assert same(got[0], A_c, 1e-4) and same(got[1], B_c, 1e-4)
    assert same(layer.base_layer.weight, W - S * B_c @ A_c, 1e-4)
    print(f"CorDA-{mode.upper()}: inline == lora_lab == PEFT")

# %% [markdown]
# ## LoRA-Null: start in the inputs' blind spot
#
# **Problem.** LoRA still forgets. LoRA-Null {cite}`tang2025loranull` initialises the adapter
# from the *null space* of the pretrained inputs: the input directions the calibration
# activations (standing for the model's knowledge) do not use. Then $Ax \approx 0$ for those
# inputs, so whatever $B$ learns hardly changes the outputs the old knowledge depends on.
# It is not in PEFT; `lora_lab` follows the paper's reference code (built on CorDA): take
# the $r$ least-used input directions $N$, project $W$ onto them, and take the SVD of that.

# %%
def lora_null(W, C, s):
    N = torch.linalg.svd(C).U[:, -R:]  # [in, r]: least-used directions
    U, Sv, Vh = torch.linalg.svd(W @ N @ N.T, full_matrices=False)
    root = (Sv[:R] / s).sqrt()
    return root[:, None] * Vh[:R], U[:, :R] * root  # A, B


A_null, B_null = lora_null(W, C, S)
mine, layer = ours()
init_variant(mine, "lora-null", calibration=calib)
assert same(layer.lora_A.weight, A_null) and same(layer.lora_B.weight, B_null)
X = torch.cat([b[0] for b in calib])  # [samples * seq, in]
_, plain = ours()


def reach(A):
    """How much of the inputs' energy A picks up, per unit of A."""
    return ((X @ A.T).norm() / (X.norm() * A.norm())).item()


print(f"LoRA-Null A: {reach(A_null):.4f}   plain LoRA A:"
      f" {reach(plain.lora_A.weight):.4f}")

# %% [markdown]
# The LoRA-Null $A$ picks up a small fraction of what a random $A$ picks up from the
# calibration inputs (on this data {glue:text}`null_reach`), which is the property the
# method is built on:

# %%
assert reach(A_null) < 0.05 * reach(plain.lora_A.weight)
glue("null_reach", reach(A_null) / reach(plain.lora_A.weight), ".1%")
assert same(mine(x), Net()(x))  # and the output is unchanged at step 0
print("LoRA-Null: inline == lora_lab; A is nearly blind to the inputs")

# %% [markdown]
# ## LoftQ: quantize and patch together
#
# **Problem.** QLoRA (chapter 06) quantizes $W$ to 4-bit codes and starts LoRA at $BA = 0$, so
# training begins from the quantized model, quantization error included. LoftQ
# {cite}`li2023loftq` picks $Q$ and $BA$ *together* so that $Q + BA \approx W$: alternately
# quantize what the adapter does not cover, then fit the adapter to what quantization lost.
# Below, the NF4 round trip is bitsandbytes' own; `lora_lab` uses its NF4 from chapter 06.
# (PEFT's `loftq_init` hard-codes a CUDA device; `tests/test_variants.py` checks `lora_lab`
# against it on the CPU.) LoftQ does not compensate the scaling, so it uses $\alpha = r$.

# %%
import bitsandbytes.functional as bnbf  # noqa: E402


def nf4(w):  # what a 4-bit NF4 base holds
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    return bnbf.dequantize_4bit(packed, state)


def loftq(W, num_iter=2):
    residual = W
    for _ in range(num_iter):
        Q = nf4(residual)
        U, Sv, Vh = torch.linalg.svd(W - Q, full_matrices=False)
        root = Sv[:R].sqrt()
        A, B = root[:, None] * Vh[:R], U[:, :R] * root
        residual = W - B @ A
    return Q, A, B


Q, A_q, B_q = loftq(W)
mine = add_lora(Net(), LoRAConfig(r=R, lora_alpha=R, target_modules=["proj"]))
init_variant(mine, "loftq", num_iter=2)
layer = mine.proj
assert same(layer.base_layer.weight, Q, 1e-6)
assert same(layer.lora_A.weight, A_q) and same(layer.lora_B.weight, B_q)
err_qlora = (nf4(W) - W).norm().item()
err_loftq = (Q + B_q @ A_q - W).norm().item()
print(f"|W - start| QLoRA: {err_qlora:.3f}   LoftQ: {err_loftq:.3f}")

# %%
assert err_loftq < 0.9 * err_qlora
print("LoftQ: inline (bitsandbytes NF4) == lora_lab; starts closer to W")

# %% [markdown]
# ## S-LoRA and mLoRA: many adapters at once
#
# Every variant above improves *one* patch. The last two names in the sources improve the
# system around thousands of them.
#
# **S-LoRA** {cite}`sheng2023slora` serves many adapters on one GPU. Three ideas: keep all
# adapters in host memory and copy in only those the current batch uses; one memory pool
# ("Unified Paging") for the KV cache and adapter weights of different ranks, so neither
# fragments the GPU's memory; and kernels that run one batch in which every request uses
# its own adapter (heterogeneous batching, after Punica). The paper reports 2,000 adapters
# on one A100-80GB for Llama-7B, and up to 4x the throughput of vLLM with packed adapters
# and up to 30x that of PEFT.
#
# **mLoRA** applies the same sharing to *training*: several LoRA jobs on one base model
# share the frozen base's forward and backward pass in one batch (and pipeline it across
# GPUs), instead of each job holding its own copy of the base.
#
# Chapters 07 and 07b built and timed the heterogeneous batch (`lora_lab.serving`: one gathered
# matmul for the whole batch, against PEFT switching adapters per group of requests). Here
# we check the two facts the S-LoRA and mLoRA designs rest on, on one layer.

# %% [markdown]
# (claim-slora)=
# First, why adapters live in host memory. An r=16 adapter on the four attention
# projections of Llama-7B is about {glue:text}`slora_mb` MB in fp16, so S-LoRA's
# {glue:text}`slora_n` adapters are about {glue:text}`slora_gb` GB: more than an A100-80GB
# has left beside the {glue:text}`llama_fp16_gb` GB of fp16 weights and the KV cache. Only the adapters of the running batch need to be on the GPU.

# %%
adapter_bytes = 32 * 4 * (16 * 4096 + 4096 * 16) * 2  # layers x q,k,v,o x A+B
print(f"one adapter: {adapter_bytes / 1e6:.1f} MB;"
      f" 2,000 adapters: {2000 * adapter_bytes / 1e9:.1f} GB")
assert 2000 * adapter_bytes > 80e9 - 6_738_415_616 * 2
glue("slora_mb", adapter_bytes / 1e6, ".0f")
glue("slora_n", 2000)
glue("slora_gb", 2000 * adapter_bytes / 1e9, ".0f")
glue("llama_fp16_gb", 6_738_415_616 * 2 / 1e9, ".1f")

# %% [markdown]
# Second, the heterogeneous batch. Each row of a batch names its adapter; the layer computes
# $W_0x$ once for all rows and adds each row's own patch with one gathered batched matmul
# (Punica's BGMV). The result equals running each request through its own adapter, and in
# a training step (mLoRA's case) each adapter's gradient comes only from its own rows:

# %%
n_adapters, batch = 3, 6
g = torch.Generator().manual_seed(SEED)
A_stack = torch.randn(n_adapters, R, IN, generator=g, requires_grad=True)
B_stack = torch.randn(n_adapters, OUT, R, generator=g, requires_grad=True)
ids = torch.tensor([0, 2, 1, 0, 2, 2])  # adapter of each row
xb = torch.randn(batch, IN, generator=g)
frozen = Net().proj  # the shared, frozen base layer


def gathered(xb, ids):  # one batched matmul for every row, any adapter
    low = torch.bmm(A_stack[ids], xb[:, :, None])  # [batch, r, 1]
    return frozen(xb) + S * torch.bmm(B_stack[ids], low)[:, :, 0]


one_by_one = torch.stack([frozen(xb[i]) + S * B_stack[k] @ (A_stack[k] @ xb[i])
                          for i, k in enumerate(ids.tolist())])
y = gathered(xb, ids)
assert same(y, one_by_one)
y[ids == 1].sum().backward()  # loss of adapter 1's rows only
assert A_stack.grad[[0, 2]].abs().max() == 0 and A_stack.grad[1].abs().max() > 0
print("mixed batch == one request at a time; gradients stay per adapter")

# %% [markdown]
# ## Check yourself
#
# **1.** PiSSA and OLoRA start the adapter from pieces of $W$ itself. Why does the model's
# output not change at step 0?
# (a) $B$ starts at zero, as in plain LoRA (b) the same piece, $s\,BA$, is subtracted from
# the base weight, so $W' + s\,BA = W$ (c) the scaling $s$ is set to zero (d) it does change,
# and training repairs it
#
# ```{admonition} Answer
# :class: dropdown
# (b): both rewrite the base as $W' = W - s\,B_0A_0$; the OLoRA cell asserts the patched
# model's output equals the unpatched one's.
# ```
#
# **2.** Which variant changes only how fast $A$ and $B$ learn, not where they start or how
# the patch is applied?
# (a) DoRA (b) rsLoRA (c) LoRA+ (d) CorDA
#
# ```{admonition} Answer
# :class: dropdown
# (c): LoRA+ is two optimizer parameter groups, $B$'s learning rate a multiple of $A$'s;
# the adapter and its forward pass are plain LoRA (asserted against PEFT's
# `create_loraplus_optimizer`).
# ```
#
# **3.** Your adapter was trained with PiSSA, and the server that will run it only has the
# original base model. What do you ship?
# (a) nothing can be done: PiSSA adapters need the rewritten base (b) the PiSSA adapter
# as it is (c) a plain LoRA adapter of rank $2r$ on the original $W$, from
# `to_plain_lora` (PEFT: `path_initial_model_for_weight_conversion`) (d) the full
# fine-tuned model
#
# ```{admonition} Answer
# :class: dropdown
# (c): $W' + s\,BA = W + s\,(BA - B_0A_0)$, a rank-$2r$ patch on the original weight; the
# cell after the PiSSA section asserts the converted adapter gives the same outputs.
# ```

# %% [markdown]
# ## Summary
#
# - Every variant keeps LoRA's patch $W_0x + s\,BAx$ and changes one choice: the scaling
#   (rsLoRA), the learning rates (LoRA+), where $A$ and $B$ start (OLoRA, PiSSA, CorDA,
#   LoRA-Null, LoftQ), or how the patch is applied (DoRA). Each fits in a few lines, and
#   each gave the same numbers as `lora_lab` (and PEFT, where PEFT has it).
# - The initialisations that start from pieces of $W$ rewrite the base weight; the adapter
#   can be turned back into a plain LoRA adapter of twice the rank for serving anywhere
#   (LoftQ's cannot: its base is the quantized one).
# - Serving and training many adapters is a systems problem: keep adapters out of GPU
#   memory until a batch needs them, batch requests for different adapters together, and
#   share the frozen base between training jobs (S-LoRA, mLoRA).
# - Whether any of this learns more or forgets less is a question for a benchmark with one
#   budget: chapter 08b.
#
# ## Exercises
#
# 1. MiLoRA makes the opposite choice to PiSSA: the *smallest* $r$ singular directions.
#    Change `Sv[:R]`, `Vh[:R]` and `U[:, :R]` in the PiSSA cell to the last $R$ and check
#    that the output is still unchanged at step 0. Why does it have to be?
# 2. Compute the DoRA magnitude vector for a model whose adapter has already been trained
#    and merged into $W$. What is $m$ then, and what does DoRA's forward reduce to while
#    $B = 0$?
# 3. How many r=16 adapters on the four attention projections of Llama-7B fit into what an
#    A100-80GB has left beside the fp16 weights (ignore the KV cache)?
#
# ```{admonition} Solution 1
# :class: dropdown
# Replace the slices with `Sv[-R:]`, `Vh[-R:]` and `U[:, -R:]`. The base is rewritten as
# $W - s\,BA$ with the same $B$ and $A$ the adapter starts from, so $W' + s\,BA = W$ for any
# choice of directions; what changes is only which directions training starts on (the
# least used ones, which MiLoRA argues disturbs less of what the model knows).
# ```
#
# ```{admonition} Solution 2
# :class: dropdown
# $m$ starts at the row norms of the (merged) $W$, and while $B = 0$ the direction
# $V = W$, so $W' = \lVert W\rVert_{\text{row}} \odot W / \lVert W\rVert_{\text{row}} = W$:
# DoRA starts from exactly the model it patches, like plain LoRA (the DoRA cell asserts
# $m = \lVert W\rVert_{\text{row}}$ at the start).
# ```
#
# ```{admonition} Solution 3
# :class: dropdown
# An adapter is about {glue:text}`slora_mb` MB in fp16 and the GPU has about
# {glue:text}`sol_left_gb` GB left beside the weights, so about {glue:text}`sol_fit_n`
# adapters: S-LoRA's {glue:text}`slora_n` do not fit, before a single token of KV cache.
# ```

# %% tags=["hide-cell"]
# The solutions paste these.
left = 80e9 - 6_738_415_616 * 2  # A100-80GB minus Llama-7B's fp16 weights
glue("sol_left_gb", left / 1e9, ".1f")
glue("sol_fit_n", int(left // adapter_bytes))
assert int(left // adapter_bytes) < 2000
