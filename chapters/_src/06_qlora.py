# %% [markdown]
# # 06 · NF4: compressing the binary
#
# LoRA makes the *patch* cheap to train and to ship. It does nothing for the binary being
# patched: the frozen base model still sits in GPU memory as 16-bit floats,
# {glue:text}`bf16_7b_gb` GB for Llama-2-7B before a single activation is stored. QLoRA {cite}`dettmers2023qlora` asks the
# obvious next question — what if `main.exe` itself is too big? — and answers it the way a
# software engineer would: compress the binary (about four bits per weight), never edit the
# compressed file, decompress each piece on the fly when it runs, and apply an ordinary
# LoRA patch, kept in 16-bit or 32-bit floats, on top. Think of a packed executable (UPX
# and friends): small on disk and in memory, unpacked piece by piece as it runs, and you
# never hand-edit the packed bytes.
#
# This chapter is the compressor. It builds QLoRA's two storage ideas from scratch and checks
# them byte for byte against bitsandbytes, the library QLoRA's authors wrote: the **NF4**
# data type and **double quantization** of the scaling constants. Chapter 06b runs the
# compressed binary, patches it, trains the patch and merges it back.
#
# **Learning goals**
# - build NF4 quantization in a dozen lines and match bitsandbytes bit for bit;
# - measure why normal-float levels beat uniform int4 and fp4 on real weights;
# - count bits per parameter with and without double quantization;
# - measure what NF4 saves on the bundled model, and compute it for 7B/13B/65B models.

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
import lora_lab  # first: it keeps known library noise out of outputs

import json
import math

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from lora_lab import nf4, sizing
from lora_lab.paths import RESULTS_DIR
from lora_lab.prose import glue

lora_lab.seed_everything(SEED)
print(lora_lab.runtime.describe())

# %% [markdown]
# ## Step 0: one real weight
#
# Everything below runs on the weights of the bundled base model (or the model named in
# `BASE_MODEL`). The quantization experiments use CPU copies of the weights, so they
# compare with bitsandbytes' CPU code on every machine; training and inference run on
# `DEVICE`. Our first specimen is the MLP up-projection of the first decoder layer.

# %%
model, tok = lora_lab.load_base(BASE_MODEL)
W = model.model.layers[0].mlp.up_proj.weight.detach().float().cpu()
z = ((W - W.mean()) / W.std()).flatten()
print(f"weight {tuple(W.shape)}: {W.numel():,} values, std {W.std():.4f}")
print(f"share within one std: {(z.abs() < 1).float().mean():.3f}"
      " (a normal distribution: 0.683)")
print(f"share beyond three std: {(z.abs() > 3).float().mean():.4f}"
      " (a normal distribution: 0.0027)")

# %% [markdown]
# Trained weights are roughly bell-shaped around zero: most values are small, a few are
# large. A 4-bit code has $2^4$ levels to spend. A *uniform* grid spends them evenly over the
# range, so the many small weights share a handful of levels near zero while levels out in
# the tails sit almost unused.

# %% [markdown]
# ## Step 1: sixteen levels from the normal distribution
#
# NF4 ("4-bit NormalFloat") puts its levels at **quantiles** of the standard normal
# distribution instead: each level stands for an equal share of normally distributed
# values, so each of the {glue:text}`levels` codes gets used about equally often — the
# most information {glue:text}`code_bits` bits can carry for such data. Two details: the
# extreme quantiles of a normal are infinite, so the probability range is clipped at
# `offset` = {glue:text}`offset` (the mean of $1 - \frac{1}{2 \cdot 15}$ and
# $1 - \frac{1}{2 \cdot 16}$); and to give zero an exact code (padding, pruned or zero
# weights stay exactly zero) the levels are asymmetric: {glue:text}`n_pos` positive
# quantiles, {glue:text}`n_neg` negative ones, and zero. Finally everything is scaled so
# the largest level is one.

# %%
def normal_quantile(p):
    """The inverse CDF of N(0, 1)."""
    return 2**0.5 * torch.erfinv(2 * p - 1)


offset = 0.5 * ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16)))
grid9 = torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1]
grid8 = torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1]
levels = torch.cat([normal_quantile(grid9),  # 8 positive
                    -normal_quantile(grid8),  # 7 negative
                    torch.zeros(1, dtype=torch.float64)]).sort().values
levels = (levels / levels.max()).float()
print("offset:", round(offset, 7))
print("NF4 levels:", [round(v, 4) for v in levels.tolist()])

NF4 = nf4.NF4_CODE
assert abs(offset - 0.9677083) < 1e-7
assert torch.allclose(levels, NF4, atol=1e-6)
assert torch.equal(NF4, bnbF.get_4bit_type("nf4", device="cpu"))
assert (NF4 < 0).sum() == 7 and (NF4 == 0).sum() == 1 and (NF4 > 0).sum() == 8
glue("levels", len(NF4))
glue("code_bits", round(math.log2(len(NF4))))
glue("n_pos", int((NF4 > 0).sum()))
glue("n_neg", int((NF4 < 0).sum()))
glue("offset", offset, ".4f")
glue("entropy_max", math.log2(len(NF4)), ".1f")

# %% [markdown]
# Our sixteen numbers match bitsandbytes' table to within float rounding (it computes them
# with scipy; `lora_lab.nf4.NF4_CODE` hard-codes its exact values). Beside NF4, two other
# 4-bit codes to compare with: uniform **int4** (levels $k/7$, $k = -7 \dots 7$) and
# **fp4**, a tiny floating-point format (a sign bit, two exponent bits, one mantissa bit),
# which is
# bitsandbytes' *default* 4-bit type — transformers' `BitsAndBytesConfig` also defaults to
# `"fp4"`, so QLoRA's NF4 has to be asked for by name.

# %%
CODES = {"nf4": nf4.NF4_CODE, "int4": nf4.INT4_CODE,
         "fp4": nf4.FP4_CODE.sort().values}
fig, ax = plt.subplots(figsize=(7.5, 2.2))
for row, (name, code) in enumerate(CODES.items()):
    ax.plot(code, [row] * len(code), "|", markersize=14, mew=2)
ax.set_yticks(range(len(CODES)), list(CODES))
ax.set_xlabel("level (after scaling a block into [-1, 1])")
ax.set_ylim(-0.6, len(CODES) - 0.4)
fig.tight_layout()
plt.show()

# %% [markdown]
# The sixteen levels drawn under the normal curve they were cut from, with uniform int4's
# levels below for comparison. NF4's levels crowd where the weights are and spread out in
# the tails, so each takes a near-equal share of normally distributed weights
# ({glue:text}`fig_nf4_low` to {glue:text}`fig_nf4_high`); int4's evenly spaced levels
# share them out unevenly ({glue:text}`fig_int4_low` to {glue:text}`fig_int4_high`).

# %%
from lora_lab import diagrams

assert abs(diagrams.NF4_OFFSET - offset) < 1e-7  # the same cut as above
shares = {"nf4": diagrams.level_shares(NF4),
          "int4": diagrams.level_shares(nf4.INT4_CODE)}
spread = {k: max(v) - min(v) for k, v in shares.items()}
assert spread["nf4"] < spread["int4"] / 3  # quantiles: near-equal shares
for k, v in shares.items():
    glue(f"fig_{k}_low", min(v), ".1%")
    glue(f"fig_{k}_high", max(v), ".1%")
diagrams.nf4_levels()

# %% [markdown]
# ## Step 2: blocks, absmax, nearest level, packing
#
# Quantizing a whole matrix with one scale would let a single outlier stretch the grid for
# everyone. So the weight is flattened and cut into **blocks of {glue:text}`block` values**;
# each block is divided by its own largest magnitude (its *absmax*, kept in fp32), which
# puts it in $[-1, 1]$; each value is replaced by the index of the nearest NF4 level; and two 4-bit
# indices are **packed into one byte**, the first value in the high nibble. Dequantizing is
# one table lookup and one multiply: `NF4[code] * absmax[block]`. It is an indexed-colour
# image: a sixteen-entry palette shared by everyone, a 4-bit index per pixel, and a brightness
# per block of pixels.
#
# "Nearest" needs a tie rule. The decision boundaries are the midpoints between adjacent
# levels; `torch.bucketize` returns, for a value exactly on a boundary, the lower level,
# which is what bitsandbytes' kernels do (the CUDA kernel compares with a strict `>`).
# bitsandbytes also scales by multiplying with `1 / absmax` rather than dividing, which
# can differ in the last bit; we do the same.

# %%
def quantize_nf4_inline(w, blocksize=64):
    """NF4 in four steps; w.numel() must be a multiple of blocksize."""
    blocks = w.reshape(-1, blocksize).float()  # [n_blocks, 64]
    absmax = blocks.abs().amax(dim=1)  # [n_blocks] one fp32 scale each
    scaled = blocks * (1 / absmax)[:, None]  # [n_blocks, 64] in [-1, 1]
    midpoints = (NF4[:-1] + NF4[1:]) / 2  # [15] decision boundaries
    codes = torch.bucketize(scaled, midpoints).flatten()  # [n] in 0..15
    packed = (codes[0::2] << 4) | codes[1::2]  # [n / 2] high nibble first
    return packed.to(torch.uint8)[:, None], absmax, codes


def dequantize_nf4_inline(codes, absmax, shape, blocksize=64):
    return (NF4[codes].reshape(-1, blocksize) * absmax[:, None]).reshape(shape)


midpoints = (NF4[:-1] + NF4[1:]) / 2
tie = midpoints[14]  # exactly halfway between levels 14 and 15
tie_code = torch.bucketize(tie, midpoints).item()
print(f"value {tie.item():.7f} -> code {tie_code}")
print("codes (3, 10) pack into byte",
      hex(((torch.tensor(3) << 4) | torch.tensor(10)).item()))
assert torch.bucketize(tie, midpoints) == 14  # a tie goes to the lower level

# %% [markdown]
# Now the check: our four steps against `lora_lab.nf4.quantize_nf4` and against
# `bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")`, on the real weight —
# packed bytes, block scales and dequantized values.

# %%
packed, absmax, codes = quantize_nf4_inline(W)
W_deq = dequantize_nf4_inline(codes, absmax, W.shape)
ll_packed, ll_state = nf4.quantize_nf4(W)
bnb_packed, bnb_state = bnbF.quantize_4bit(W, blocksize=64, quant_type="nf4")
print(f"{W.numel():,} weights -> {packed.numel():,} bytes"
      f" + {absmax.numel():,} fp32 scales")
print("first two codes:", codes[:2].tolist(), "first byte:",
      hex(packed[0, 0].item()))
assert torch.equal(packed, ll_packed) and torch.equal(packed, bnb_packed)
assert torch.equal(absmax, ll_state.absmax)
assert torch.equal(absmax, bnb_state.absmax)
assert torch.equal(W_deq, nf4.dequantize_nf4(ll_packed, ll_state))
bnb_deq = bnbF.dequantize_4bit(bnb_packed, bnb_state).reshape(W.shape)
assert torch.equal(W_deq, bnb_deq)
BLOCK = bnb_state.blocksize
glue("block", BLOCK)

# %% [markdown]
# Byte for byte equal. The same holds for every linear layer that 4-bit loading quantizes
# (all of them except the output head):

# %%
linear_weights = {
    name: m.weight.detach().float().cpu()
    for name, m in model.named_modules()
    if isinstance(m, nn.Linear) and not name.endswith("lm_head")
}
for name, w in linear_weights.items():
    ours, _, _ = quantize_nf4_inline(w)
    theirs, _ = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(ours, theirs), name
print(f"{len(linear_weights)} layers,"
      f" {sum(w.numel() for w in linear_weights.values()):,} weights:"
      " identical to bitsandbytes")

# %% [markdown]
# ## Step 3: is NF4 better? Measure it
#
# The argument for normal-float levels was that they match the data. Two measurements on
# the real weights. First, how evenly are the {glue:text}`levels` codes used? With equal
# use, the codes carry the full {glue:text}`code_bits` bits of information (entropy
# {glue:text}`entropy_max`); a uniform grid wastes some.

# %%
def code_entropy(w, code, blocksize=64):
    """Entropy (bits) of the code indices a 4-bit code assigns to w."""
    blocks = w.reshape(-1, blocksize)
    scaled = blocks * (1 / blocks.abs().amax(dim=1))[:, None]
    idx = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2)
    p = torch.bincount(idx.flatten(), minlength=len(code)).float()
    p = p[p > 0] / p.sum()
    return -(p * p.log2()).sum().item()


entropy = {name: code_entropy(W, code) for name, code in CODES.items()}
print("bits of information per 4-bit code:",
      {k: round(v, 2) for k, v in entropy.items()})
assert entropy["nf4"] > entropy["int4"] and entropy["nf4"] > entropy["fp4"]

# %% [markdown]
# Second, the error that matters: how far the dequantized weights land from the originals,
# as relative RMSE $\|W - \hat W\| / \|W\|$, over every quantized layer of the model
# (`nf4.fake_quantize` does the blockwise quantize-dequantize round trip with any code
# table). `benchmarks/bench_nf4.py` measured the same on the same model, plus two synthetic
# square matrices (normal, and heavy-tailed Student-t); its cached numbers must agree with
# what we measure here.

# %%
def relative_error(w, code):
    return ((nf4.fake_quantize(w, code) - w).norm() / w.norm()).item()


n_total = sum(w.numel() for w in linear_weights.values())
errors = {
    name: sum(relative_error(w, code) * w.numel()
              for w in linear_weights.values()) / n_total
    for name, code in CODES.items()
}
bench = json.loads((RESULTS_DIR / "nf4.json").read_text())
cached = bench["quantization_error_relative_rmse"]
print(f"{'relative RMSE':24}" + "".join(f"{k:>8}" for k in CODES))
print(f"{'this model (live)':24}"
      + "".join(f"{errors[k]:>8.4f}" for k in CODES))
for what, row in [("this model (cached)", cached["model_weighted_mean"]),
                  *cached["synthetic"].items()]:
    print(f"{what:24}" + "".join(f"{row[k]:>8.4f}" for k in CODES))
assert errors["nf4"] < errors["int4"] and errors["nf4"] < errors["fp4"]
glue("nf4_error", cached["model_weighted_mean"]["nf4"], ".1%")
lead = {k: 1 - v["nf4"] / v["int4"] for k, v in cached["synthetic"].items()}
assert lead["student_t3"] > lead["normal"] > 0
assert all(v["nf4"] < v["fp4"] for v in cached["synthetic"].values())
if lora_lab.models.is_bundled(BASE_MODEL):  # the cache is the bundled model's
    assert all(abs(errors[k] - cached["model_weighted_mean"][k]) < 1e-6
               for k in CODES)

# %% [markdown]
# NF4 has the lowest error of the three on this model's weights, and on both synthetic
# matrices. Its lead is largest on the heavy-tailed Student-t matrix: there a block's
# absmax is usually set by one outlier, so the other values crowd near zero — exactly
# where NF4 keeps its levels dense and a uniform grid has only a few.
#
# ## Step 4: double quantization
#
# Each block of {glue:text}`block` weights carries one fp32 absmax, one 32-bit number per block,
# i.e. **{glue:text}`overhead_plain` extra bits per parameter** on top of the
# {glue:text}`code_bits`. QLoRA's second idea squeezes those constants too: subtract their
# mean (they are all positive), then quantize them to **8-bit codes in blocks of
# {glue:text}`block8`**, keeping one fp32 scale per block of scales. The 8-bit code is
# bitsandbytes' signed *dynamic* map, {glue:text}`code8_n` values spaced like a
# floating-point format (dense near zero, sparse near $\pm 1$). (The paper calls these "8-bit floats"; what
# bitsandbytes uses is this dynamic map, not an FP8 E4M3 type.)

# %%
code8 = nf4.create_dynamic_map()
assert torch.equal(code8, bnbF.create_dynamic_map())
glue("code8_n", len(code8))
glue("block8", 256)  # quantize_8bit_inline's blocksize, as in bitsandbytes
glue("overhead_plain", 32 / BLOCK, ".1f")


def quantize_8bit_inline(x, blocksize=256):
    """Blockwise absmax + nearest entry of the dynamic map."""
    n = x.numel()
    blocks = F.pad(x, (0, -n % blocksize)).reshape(-1, blocksize)
    scale = blocks.abs().amax(dim=1)  # [n_blocks8] fp32
    scaled = blocks * (1 / scale)[:, None]
    idx = torch.bucketize(scaled, (code8[:-1] + code8[1:]) / 2)
    return idx.flatten()[:n].to(torch.uint8), scale


mean_absmax = absmax.mean()
q8, scale8 = quantize_8bit_inline(absmax - mean_absmax)
exact8, exact_scale8 = nf4.quantize_blockwise_8bit(absmax - mean_absmax,
                                                   exact=True)
assert torch.equal(q8, exact8) and torch.equal(scale8, exact_scale8)
absmax_back = code8[q8.long()] * scale8.repeat_interleave(256)[:len(q8)]
absmax_back = absmax_back + mean_absmax
rel = ((absmax_back - absmax).abs() / absmax).max().item()
print(f"{absmax.numel()} block scales -> {q8.numel()} bytes"
      f" + {scale8.numel()} fp32 scales + 1 fp32 mean")
print(f"largest relative error of a recovered scale: {rel:.4f}")
assert rel < 0.01

# %% [markdown]
# One subtlety for bit-exactness: bitsandbytes' *CPU* kernel does not search for the
# nearest 8-bit code; it snaps each value to a grid of $2^{16}$ points first and reads the
# code nearest that grid point from a table, so for a few tiny values it picks a
# neighbour. `lora_lab.nf4` copies that (its `exact=True` is the true nearest code used
# above), and the whole double-quantized state then equals bitsandbytes':

# %%
dq_packed, dq_state = nf4.quantize_nf4(W, double_quant=True)
ref_packed, ref_state = bnbF.quantize_4bit(
    W, blocksize=64, quant_type="nf4", compress_statistics=True)
grid_idx, _ = nf4.quantize_blockwise_8bit(absmax - mean_absmax)
print("8-bit indices where the CPU grid differs from the nearest code:",
      int((grid_idx != q8).sum()), "of", q8.numel())
assert torch.equal(dq_packed, ref_packed)
assert torch.equal(dq_state.absmax, ref_state.absmax)  # uint8 indices
assert torch.equal(dq_state.offset, ref_state.offset)  # the mean
assert torch.equal(dq_state.nested_absmax, ref_state.state2.absmax)
W_dq = nf4.dequantize_4bit(dq_packed, dq_state)
assert torch.equal(W_dq, bnbF.dequantize_4bit(ref_packed, ref_state))
extra = (W_dq - W).norm() / W.norm() - (W_deq - W).norm() / W.norm()
print(f"extra relative error from double quantization: {extra.item():.6f}")

# %% [markdown]
# (claim-nf4-bits)=
# ### Bits per parameter, with and without double quantization
#
# The QLoRA paper counts the cost of the scales: $32/64$ bits per parameter without
# double quantization; $8/64 + 32/(64 \cdot 256)$ bits with it, a saving of
# {glue:text}`bits_saving` bits per parameter, which the paper turns into gigabytes saved on
# a 65B model. We count the bytes actually stored for
# the real weight (packed codes plus every state tensor) and for a large random tensor
# (`nf4.bits_per_param`), and compare with the formula.

# %%
def stored_bits(packed, state):
    tensors = [packed, state.absmax, state.offset, state.nested_absmax]
    nbytes = sum(t.numel() * t.element_size() for t in tensors
                 if t is not None)
    return 8 * nbytes / state.shape.numel()


measured = {"plain": stored_bits(ll_packed, ll_state),
            "double quant": stored_bits(dq_packed, dq_state)}
large = {"plain": nf4.bits_per_param(64, double_quant=False),
         "double quant": nf4.bits_per_param(64, double_quant=True)}
formula = {"plain": nf4.bits_per_param_formula(64, False),
           "double quant": nf4.bits_per_param_formula(64, True)}
for k in measured:
    print(f"{k:13} this weight {measured[k]:.4f}   4M-value tensor"
          f" {large[k]:.4f}   formula {formula[k]:.4f}")
saving_gb = (formula["plain"] - formula["double quant"]) * 65e9 / 8 / 1e9
print(f"saving: {formula['plain'] - formula['double quant']:.3f} bits/param"
      f" = {saving_gb:.2f} GB on 65B parameters")
assert measured["plain"] == large["plain"] == formula["plain"] == 4.5
assert round(formula["double quant"], 3) == 4.127
for bits in (measured["double quant"], large["double quant"]):
    assert abs(bits - formula["double quant"]) < 1e-3
assert round(saving_gb, 1) == 3.0
glue("bits_plain", measured["plain"], ".1f")
glue("bits_dq", formula["double quant"], ".3f")
glue("bits_saving", formula["plain"] - formula["double quant"], ".3f")
glue("saving_65b_gb", saving_gb, ".1f")

# %% [markdown]
# The claim holds exactly: {glue:text}`bits_plain` bits per parameter plain,
# {glue:text}`bits_dq` with double quantization (a stored tensor adds its fp32 mean on top,
# a few ten-thousandths of a bit here), and the saving is {glue:text}`saving_65b_gb` GB on a
# 65B model.
#
# ## Step 5: the whole binary, compressed
#
# The bundled model in fp32, bf16 and NF4 (every linear layer but the output head; the
# embeddings, norms and `lm_head` stay in the original dtype, as transformers does it),
# counted with `nf4.model_bytes` from the tensors actually held:

# %%
def fresh_base():
    return lora_lab.load_base(BASE_MODEL)[0].cpu()


mem = {
    "fp32": nf4.model_bytes(fresh_base().float()),
    "bf16": nf4.model_bytes(fresh_base().to(torch.bfloat16)),
    "nf4 (+ fp32 rest)": nf4.model_bytes(nf4.quantize_model(fresh_base())),
}
quantized_share = n_total / sum(p.numel() for p in model.parameters())
for k, v in mem.items():
    print(f"{k:18} {v / 1e6:7.2f} MB   fp32 / this = {mem['fp32'] / v:.2f}")
print(f"share of parameters in quantized layers: {quantized_share:.2f}")
glue("quantized_share", quantized_share, ".0%")
glue("nf4_saving_tiny", mem["fp32"] / mem["nf4 (+ fp32 rest)"], ".1f")
assert mem["fp32"] / mem["nf4 (+ fp32 rest)"] > 2

# %% [markdown]
# On the tiny model the embeddings and output head are a large share of all parameters and
# stay unquantized (the quantized layers hold {glue:text}`quantized_share`), so the overall
# saving is {glue:text}`nf4_saving_tiny`x, far from what fp32 against NF4 per weight would
# give. On Llama-2-7B the linear layers are {glue:text}`share_linear_7b` of the
# parameters. `nf4.llama_weight_memory` computes the weight
# memory from the shapes (Llama-1 7B/13B/65B, the paper's models; linear layers in NF4 with
# double quantization, the rest in bf16):

# %%
GB = 1e9
print(f"{'weights only':10} {'params':>8} {'fp32 GB':>9} {'bf16 GB':>9}"
      f" {'NF4 GB':>8}")
scale_rows = {}
for name in ("7B", "13B", "65B"):
    m = nf4.llama_weight_memory(name)
    scale_rows[name] = m
    print(f"{name:10} {m['params'] / 1e9:7.2f}B {m['fp32_bytes'] / GB:9.1f}"
          f" {m['bf16_bytes'] / GB:9.1f} {m['nf4_bytes'] / GB:8.1f}")
big = scale_rows["65B"]
share_7b = scale_rows["7B"]["quantized_params"] / scale_rows["7B"]["params"]
print(f"7B: {share_7b:.1%} of the parameters are in linear layers")
assert 0.95 < share_7b < 0.97
assert big["nf4_bytes"] < 48 * GB < big["bf16_bytes"]
assert 34 < big["nf4_bytes"] / GB < 36
glue("share_linear_7b", share_7b, ".0%")
glue("bf16_65b_gb", big["bf16_bytes"] / GB, ".0f")
glue("nf4_65b_gb", big["nf4_bytes"] / GB, ".0f")
glue("nf4_7b_weights_gb", scale_rows["7B"]["nf4_bytes"] / GB, ".1f")
glue("paper_gpu_gb", 48)  # the QLoRA paper's single GPU
glue("bf16_7b_gb", 2 * sizing.count_params("llama-2-7b") / GB, ".1f")

# %% [markdown]
# This is what let the paper fine-tune a 65B model on one {glue:text}`paper_gpu_gb` GB GPU:
# {glue:text}`bf16_65b_gb` GB of bf16 weights become about {glue:text}`nf4_65b_gb` GB.
# That is the compressed binary. Chapter 06b runs it, patches it and asks whether QLoRA
# training fits a consumer GPU.

# %% [markdown]
# ## Check yourself
#
# **1.** Why does NF4 put its sixteen levels at quantiles of a normal distribution?
# (a) so that dequantizing needs no multiply (b) trained weights are bell-shaped, so each
# level gets used about equally often and the 4-bit codes carry the most information
# (c) so that zero cannot be represented (d) because GPUs have normal-distribution hardware
#
# ```{admonition} Answer
# :class: dropdown
# (b): step 3 measured it, the codes NF4 assigns to a real weight carry more bits of
# information than int4's or fp4's, and its round-trip error is the lowest of the three.
# ```
#
# **2.** One weight in a block of {glue:text}`block` is ten times larger than the rest. What
# does blockwise absmax scaling do with it?
# (a) it clips the outlier to the largest level (b) the outlier sets that block's scale, so
# the block's other weights crowd into the levels near zero, while every other block keeps
# its own scale (c) it rescales the whole matrix (d) it stores the outlier in fp32 beside the
# codes
#
# ```{admonition} Answer
# :class: dropdown
# (b): each block is divided by its own absmax, and one outlier stretches the grid only for
# its own block. That is why NF4's lead over int4 was largest on the heavy-tailed matrix,
# where outliers set most blocks' scale (asserted in step 3).
# ```
#
# **3.** What does double quantization compress?
# (a) the weights, a second time, to two bits (b) the fp32 scale of every block, stored as
# 8-bit codes with one fp32 scale per {glue:text}`block8` of them: {glue:text}`bits_plain`
# → {glue:text}`bits_dq` bits per parameter (c) the adapter (d) the activations
#
# ```{admonition} Answer
# :class: dropdown
# (b): the codes stay 4-bit; what shrinks is the {glue:text}`overhead_plain` bits per
# parameter the block scales cost, counted from the stored bytes in the bits-per-parameter
# section.
# ```

# %% [markdown]
# ## Summary
#
# - **NF4** puts {glue:text}`levels` levels at quantiles of a normal distribution
#   ({glue:text}`n_neg` negative, zero, {glue:text}`n_pos` positive), scales each block of
#   {glue:text}`block` weights by its absmax, rounds to the nearest level
#   (ties to the lower) and packs two codes per byte, high nibble first. Our dozen lines
#   equal bitsandbytes byte for byte on every layer of the model, and NF4's error on real
#   weights is lower than uniform int4's and fp4's.
# - **Double quantization** stores the block scales as 8-bit codes: {glue:text}`bits_plain`
#   → {glue:text}`bits_dq` bits per parameter, {glue:text}`saving_65b_gb` GB saved on 65B
#   parameters.
# - The compressed binary: {glue:text}`nf4_saving_tiny`x smaller for the bundled model
#   (its embeddings stay unquantized), about {glue:text}`nf4_7b_weights_gb` GB of weights
#   at 7B, and {glue:text}`nf4_65b_gb` GB at 65B, which is what let the paper fine-tune on one
#   {glue:text}`paper_gpu_gb` GB card.
# - Next, chapter 06b: run the compressed binary, patch it with LoRA (QLoRA), train the
#   patch two ways, and merge it back.
#
# ## Exercises
#
# 1. Change `blocksize=64` to `blocksize=256` in `nf4.fake_quantize` for the error table. What
#    happens to NF4's error, and to the bits per parameter (use
#    `nf4.bits_per_param_formula`)?
# 2. NF4 is built for bell-shaped data. Quantize a uniformly distributed matrix
#    (`torch.rand(1024, 1024) * 2 - 1`) with NF4 and with int4 (`nf4.fake_quantize`). Which
#    code wins now, and why?
#
# ```{admonition} Solution 1
# :class: dropdown
# `nf4.fake_quantize(w, nf4.NF4_CODE, blocksize=256)`: each scale now covers four times as
# many weights, so an outlier stretches the grid for more neighbours and the error rises
# ({glue:text}`sol_err64` -> {glue:text}`sol_err256` relative RMSE on this model); the
# scales cost less: `bits_per_param_formula(256)` = {glue:text}`sol_bits256` plain,
# {glue:text}`sol_bits256_dq` with double quantization. It is the trade QLoRA made at
# `blocksize=64`.
# ```
#
# ```{admonition} Solution 2
# :class: dropdown
# {glue:text}`sol_uniform_winner` wins on uniform data (relative RMSE NF4
# {glue:text}`sol_uniform_nf4` against int4 {glue:text}`sol_uniform_int4`): values are
# spread evenly over the block's range, so evenly spaced levels fit them, and NF4's levels,
# dense near zero and sparse near the ends, leave the many large values far from a level.
# A code fits the distribution it was designed for.
# ```

# %% tags=["hide-cell"]
# The solutions paste these.
err = {b: sum(((nf4.fake_quantize(w, NF4, blocksize=b) - w).norm()
               / w.norm()).item() * w.numel()
              for w in linear_weights.values()) / n_total for b in (64, 256)}
glue("sol_err64", err[64], ".3f")
glue("sol_err256", err[256], ".3f")
glue("sol_bits256", nf4.bits_per_param_formula(256, False), ".3f")
glue("sol_bits256_dq", nf4.bits_per_param_formula(256, True), ".3f")
flat = torch.rand(1024, 1024, generator=torch.Generator().manual_seed(SEED))
flat = flat * 2 - 1
uniform = {k: relative_error(flat, CODES[k]) for k in ("nf4", "int4")}
assert uniform["int4"] < uniform["nf4"]  # the solution's claim
glue("sol_uniform_nf4", uniform["nf4"], ".3f")
glue("sol_uniform_int4", uniform["int4"], ".3f")
glue("sol_uniform_winner", min(uniform, key=uniform.get).upper())

# %% [markdown]
# (claim-bnb-cpu-kernel)=
# ## Going deeper (optional): bitsandbytes' CPU kernel
#
# A first reading can stop at the exercises. This section is for readers who run 4-bit
# models on a CPU, or who wonder why the book trusts its byte-for-byte checks: it shows
# a bug in one of bitsandbytes' CPU kernels, and why none of the checks above depend on it.
#
# ### A bug in bitsandbytes' CPU kernel, and why the checks above still hold
#
# Every check so far compares values, so it matters which kernel computed them. bitsandbytes
# {glue:text}`bnb_version` ships a C++ `dequantize_4bit` for CPUs. Its AVX512 branch (taken on
# CPUs with AVX512F, for rows whose length `n` has `n % 16 == 0`) assumes every row holds whole
# blocks: it reads the scale of row `i`, column `j` from block `i * (n // 64) + j // 64`
# instead of `(i * n + j) // 64`. Where a block spans two rows, values get another block's
# scale. bitsandbytes' own portable torch path, and `lora_lab.nf4`, are right. Quantizing is
# not affected: the bytes and scales are the same on every CPU.
#
# `lora_lab.bnb_cpu` writes the rule down and checks it. Here is the damage on a
# {glue:text}`odd_shape` weight, whose rows are not whole blocks, computed both ways on any
# machine (relative error {glue:text}`odd_err_avx` instead of {glue:text}`odd_err_right`):

# %%
from lora_lab import bnb_cpu

odd = torch.randn(192, 96, generator=torch.Generator().manual_seed(0)) * 0.02
odd_packed, odd_state = bnbF.quantize_4bit(odd, blocksize=64, quant_type="nf4")
right = bnb_cpu.portable_dequantize_4bit(odd_packed, odd_state)
like_avx512 = bnb_cpu.dequantize_like_native_kernel(
    odd_packed, odd_state.absmax, nf4.NF4_CODE, 64, odd.shape)
assert torch.equal(right, nf4.dequantize_nf4(*nf4.quantize_nf4(odd)))


def rel_error(approx):
    return ((approx - odd).norm() / odd.norm()).item()


print(f"relative error, portable path and lora_lab: {rel_error(right):.3f}")
print("relative error, the AVX512 kernel's scales: "
      f"{rel_error(like_avx512):.3f}")
assert rel_error(like_avx512) > 2 * rel_error(right)
glue("odd_err_right", rel_error(right), ".3f")
glue("odd_err_avx", rel_error(like_avx512), ".3f")
glue("odd_shape", "×".join(map(str, odd.shape)))
glue("odd_block", 64)
glue("bnb_version", bnb.__version__)
rows_here = {w.shape[1] for w in linear_weights.values()}  # in_features
widths = {"this model": {*W.shape, *rows_here}, "Llama-2-7B": {4096, 11008}}
for name, ws in widths.items():
    hit = [n for n in sorted(ws) if bnb_cpu.block_spans_rows((8, n), 64)]
    print(f"{name}: row lengths {sorted(ws)}, hit at blocksize 64: {hit}")
    assert not hit
assert bnb_cpu.block_spans_rows((4096, 11008), 1024)  # 11008 = 10.75 x 1024
llama_widths = list(map(str, sorted(widths["Llama-2-7B"])))
glue("llama_rows", " and ".join(llama_widths), zh=" 和 ".join(llama_widths))
# this machine's kernel: right, or wrong in exactly that way (else fails)
kernel_here = bnb_cpu.compare_native_dequantize(odd_packed, odd_state)

# %% tags=["nbval-ignore-output"]
print("bitsandbytes' dequantize_4bit on this machine:", kernel_here)

# %% [markdown]
# So a real model is safe at the default blocksize of {glue:text}`block`: its row lengths
# (Llama-2-7B's {glue:text}`llama_rows`) are whole multiples of it, as are this book's
# model's. It is hit when a row is not (a tiny test model, an odd vocabulary) or with a
# larger blocksize (Llama-2-7B's MLP width is not a multiple of `blocksize=1024`). On such a model, wrap bitsandbytes in `with
# bnb_cpu.portable_dequantize():`, which routes its dequantization to the portable path.
# `benchmarks/bnb_cpu_quirks.py` prints both kernels side by side on your machine.
#
# A second quirk, on CPUs with AVX512-BF16: in eval mode without gradients, bitsandbytes'
# `Linear4bit` rewrites its weight on the first forward for a fused bf16 kernel. That needs
# `out_features % 32 == 0` and `in_features % blocksize == 0` (any other layer crashes), and
# the layer then computes in bf16, so its outputs differ from the fp32 path other CPUs take.
# Where chapter 06b loads a model with bitsandbytes, `bnb_cpu.disable_cpu_repacking`
# keeps it on the fp32 path, so every CPU prints the same numbers.
