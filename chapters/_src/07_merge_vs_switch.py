# %% [markdown]
# # 07 · Static or dynamic linking: merge or switch
#
# A trained adapter is a patch. A program gets its library in one of two ways: linked into
# the binary at build time (static), or loaded by name at run time (dynamic). An adapter
# has the same two roads to production. **Merge** it into the base weights and ship one
# plain model; or keep the base **separate** and pick an adapter per request. This chapter
# measures both on the bundled model.
#
# **For Go programmers**, this is a choice your toolchain has already made once. `go build`
# links every Go package of a program, the runtime included, into one self-contained
# executable (fully static for a pure-Go build on Linux; cgo brings the C library back in
# dynamically): the merged road. The `plugin` package is the switched road: a running host
# opens a `.so` built with `go build -buildmode=plugin`. Its fine print rhymes with LoRA's:
# a plugin must be built with exactly the host's toolchain and shared package versions, as
# an adapter is built against one base model; it needs cgo and runs only on Linux, FreeBSD
# and macOS; and, unlike an adapter, an opened plugin can never be unloaded.
#
# **Learning goals**
# - merge an adapter with `merge_and_unload`, after a pre-merge checklist, and check that
#   the merged model computes the same function at the base model's cost;
# - measure what switching costs: loading, `set_adapter`, merge/unmerge per request;
# - serve a batch in which every row names its own adapter, and check it token by token
#   against running each request alone and against PEFT;
# - fill the deployment comparison table with measured numbers.
#
# What serving many adapters at once is worth, and a real server (vLLM), are chapter
# 07b's subject.

# %% tags=["hide-cell"]
# Colab setup: installs LoRA Lab in Google Colab (keeping Colab's own
# torch and transformers); does nothing anywhere else.
import os
import subprocess
import sys

REPO_URL = "https://github.com/lora-lab/lora-lab"  # from _config.yml
EXTRAS = "train,serving"  # never "book": Colab has plotting
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
RANK = 8  # rank of the demo adapters
N_ADAPTERS = 4  # adapters in the switching and mixed-batch sections
TIMING_REPEATS = 15  # repeats of each latency measurement (fastest counts)
RUN_VLLM = False  # True: start a real vLLM server here (about 2 min)

# %%
import lora_lab  # first: it keeps known library noise out of outputs

import copy
import json
import math
import tempfile
import time
from pathlib import Path

import peft
import torch
import transformers
from peft import PeftModel

from lora_lab import data, payoff, serving
from lora_lab.adapters import save_adapter
from lora_lab.inject import LoRAConfig, add_lora, lora_layers
from lora_lab.merge import merge_adapters, merge_and_unload
from lora_lab.merge import unmerge_adapters
from lora_lab.paths import DATA_DIR, RESULTS_DIR
from lora_lab.prose import glue
from lora_lab.registry import AdapterRegistry

lora_lab.seed_everything(SEED)
torch.set_num_threads(1)  # steadier timings on a shared machine
print(lora_lab.runtime.describe())

# %% [markdown]
# ## Static linking: fold the patch into the weights
#
# A LoRA layer computes $W_0x + s\,B(Ax)$ with $s = \alpha/r$. Both terms are linear in
# $x$, so one matrix does the same work: $W' = W_0 + s\,BA$. Merging computes $W'$ once
# and throws $A$ and $B$ away. We need an adapter whose $B$ is not zero (a freshly
# initialised one would merge to nothing), so `init_lora_weights=False` draws random
# $A$ and $B$: any trained adapter merges the same way.

# %%
base, tok = lora_lab.load_base(BASE_MODEL)
targets = ["q_proj", "k_proj", "v_proj", "o_proj",
           "gate_proj", "up_proj", "down_proj"]


def make_adapter(seed, r=RANK):
    """A fresh copy of the base with a random LoRA adapter (B != 0)."""
    torch.manual_seed(seed)
    model = add_lora(copy.deepcopy(base),
                     LoRAConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                init_lora_weights=False))
    return model.eval()


patched = make_adapter(SEED)
name, layer = next(lora_layers(patched))
A = layer.lora_A.weight  # [r, in]
B = layer.lora_B.weight  # [out, r]
W_merged = layer.base_layer.weight + layer.scaling * B @ A  # [out, in]
x = torch.randn(3, A.shape[1]).to(A.device)
with torch.no_grad():
    y_lora = layer(x)
    y_merged = x @ W_merged.T
print(name, "W", list(W_merged.shape), "A", list(A.shape), "B", list(B.shape))
gap = (y_lora - y_merged).abs().max()
print("max |LoRA layer - merged matmul| =", lora_lab.runtime.below(gap, 1e-5))
assert torch.allclose(y_lora, y_merged, atol=1e-5)
assert torch.allclose(layer.merged_weight(), W_merged, atol=1e-6)

# %% [markdown]
# ### The pre-merge checklist, as code
#
# The sources list what to check before merging: the base's dtype, whether it is
# quantized, and the library versions. Each item is a line that can fail:
#
# - **dtype**: merging adds $sBA$ into $W_0$ in $W_0$'s dtype. In fp16 or bf16 that sum
#   is rounded; upcast first if the merged model must match the unmerged one closely.
# - **quantized or not**: a 4-bit base (chapter 06) stores codes, not numbers, so there is
#   nothing to add to. PEFT dequantizes, adds and re-quantizes (which rounds again);
#   `lora_lab` refuses with an explanation.
# - **versions**: merge behaviour and file formats move between releases; record them
#   with the merged model.

# %%
def premerge_checklist(model):
    """Raise if the model should not be merged as is; return the facts."""
    weights = [mod.base_layer.weight for _, mod in lora_layers(model)]
    dtypes = {w.dtype for w in weights}
    quantized = [w for w in weights if not w.dtype.is_floating_point
                 or type(w).__name__ == "Params4bit"]
    if quantized:
        raise TypeError("4-bit base: dequantize to fp16/fp32 before merging")
    if dtypes != {torch.float32}:
        print("warning: merging in", dtypes, "rounds the sum; upcast first")
    return {"layers": len(weights),
            "dtype": sorted(str(d) for d in dtypes),
            "quantized": bool(quantized),
            "torch": torch.__version__.split("+")[0],
            "transformers": transformers.__version__,
            "peft": peft.__version__}


report = premerge_checklist(patched)
print({k: v for k, v in report.items()
       if k not in ("torch", "transformers", "peft")})
assert report["dtype"] == ["torch.float32"] and not report["quantized"]

# %% tags=["nbval-ignore-output"]
print({k: report[k] for k in ("torch", "transformers", "peft")})

# %% [markdown]
# Now merge the whole model. `merge_and_unload` folds every layer and replaces each LoRA
# wrapper by its plain base layer, so the result is an ordinary transformers model. We
# check three things on a batch of real prompts: the merged logits equal the unmerged
# adapter's within fp32 rounding; the same merge done by PEFT gives the same weights; and
# merging then *unmerging* gives the base model back.

# %%
texts = data.load_corpus("validation")[:8]
batch = tok(texts, return_tensors="pt", padding=True, truncation=True,
            max_length=64).to(base.device)
with torch.no_grad():
    logits_base = base(**batch).logits
    logits_lora = patched(**batch).logits

adapter_dir = Path(tempfile.mkdtemp(prefix="ch07-")) / "adapter0"
save_adapter(patched, adapter_dir)
merged = merge_and_unload(copy.deepcopy(patched))
with torch.no_grad():
    logits_merged = merged(**batch).logits
peft_merged = PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir)
peft_merged = peft_merged.merge_and_unload()
weight_gap = max((p - q).abs().max().item() for p, q in
                 zip(merged.parameters(), peft_merged.parameters()))

roundtrip = merge_adapters(copy.deepcopy(patched))
unmerge_adapters(roundtrip)
lora_lab.inject.remove_lora(roundtrip)
with torch.no_grad():
    logits_roundtrip = roundtrip(**batch).logits

gap_merge = (logits_merged - logits_lora).abs().max().item()
gap_unmerge = (logits_roundtrip - logits_base).abs().max().item()
print("batch", list(batch["input_ids"].shape),
      "| adapter changes logits by",
      f"{(logits_lora - logits_base).abs().max():.2f}")
below = lora_lab.runtime.below  # float-rounding gaps print as "< bound"
print("merged vs unmerged logits: max gap", below(gap_merge, 1e-4))
print("lora_lab vs PEFT merged weights: max gap", below(weight_gap, 1e-6))
print("merge+unmerge vs base logits: max gap", below(gap_unmerge, 1e-4))
assert (logits_lora - logits_base).abs().max() > 0.1  # a real change
assert gap_merge < 1e-4 and weight_gap < 1e-6 and gap_unmerge < 1e-4
assert type(merged) is type(base)
assert not any(lora_lab.inject.has_lora(m) for m in (merged, roundtrip))

# %% [markdown]
# (claim-zero-latency)=
# ### "Zero extra latency after merging"
#
# The claim follows from the structure: the merged model has exactly the base model's
# modules and parameter count, so a forward pass does exactly the same arithmetic. An
# unmerged adapter adds two small matmuls per patched layer. We check the structure, then
# time the three models on the same batch in one process, interleaved so that any drift
# in machine load hits all three (the fastest of `TIMING_REPEATS` runs).

# %%
n_base = sum(p.numel() for p in base.parameters())
n_merged = sum(p.numel() for p in merged.parameters())
n_lora = sum(p.numel() for p in patched.parameters())
same_modules = ([type(m) for m in base.modules()]
                == [type(m) for m in merged.modules()])
print(f"parameters: base {n_base:,}  merged {n_merged:,}"
      f"  unmerged {n_lora:,}")
assert n_merged == n_base and same_modules and n_lora > n_base


# %% tags=["nbval-ignore-output"]
def forward_seconds(models, repeats=TIMING_REPEATS):
    """Fastest of `repeats` interleaved forward passes, per model, in seconds.

    The fastest run, not the median: on a shared machine other jobs only ever
    add time, so the minimum is the steadiest estimate of the work itself."""
    times = {k: [] for k in models}
    with torch.no_grad():
        for _ in range(repeats):
            for k, model in models.items():
                start = time.perf_counter()
                float(model(**batch).logits[0, 0, 0])  # a GPU works async: wait
                times[k].append(time.perf_counter() - start)
    return {k: min(v) for k, v in times.items()}


latency = forward_seconds({"base": base, "merged": merged,
                           "unmerged": patched})
ratio = {k: latency[k] / latency["base"] for k in latency}
print({k: f"{1e3 * v:.1f} ms" for k, v in latency.items()})
print({k: round(v, 2) for k, v in ratio.items()})
# timings: not compared; the book and the claims ledger show the stored run
glue("merged_ratio", ratio["merged"], ".2f")
glue("unmerged_ratio", ratio["unmerged"], ".2f")

# %% [markdown]
# The timings vary from run to run, so the check is loose. In the stored run the merged
# model took {glue:text}`merged_ratio` times the base's time and the unmerged adapter
# {glue:text}`unmerged_ratio` times (its extra matmuls are small next to the base's because
# $r \ll d$). The assert allows a fifth either way for a noisy shared machine.

# %%
print("merged/base within 20%:", abs(ratio["merged"] - 1) < 0.2)
assert abs(ratio["merged"] - 1) < 0.2

# %% [markdown]
# The price of static linking is the one the sources name: the merged model serves one
# task. A second task needs a second full copy of the weights (the table at the end
# counts the bytes).
#
# ## Dynamic linking: keep the base, switch the patch
#
# The other road keeps one base model in memory and a table of adapters beside it. This
# is the separation of concerns the Chinese source credits LoRA with: the base holds what
# every task shares, each adapter one skill, and an adapter can be added, replaced or
# dropped without touching the base or the other adapters.
# `lora_lab.registry.AdapterRegistry` is that table: `load` reads a PEFT-format folder,
# `set_adapter` points every wrapped layer at one adapter's $A$ and $B$, `disable` gives
# the base back, and `merge` / `unmerge` fold one adapter in for a while. We save
# `N_ADAPTERS` random adapters and measure what each kind of switch costs.

# %%
adapter_dirs = {"a0": adapter_dir}
for i in range(1, N_ADAPTERS):
    adapter_dirs[f"a{i}"] = save_adapter(
        make_adapter(SEED + i), adapter_dir.parent / f"adapter{i}")
file_bytes = {n: sum(f.stat().st_size for f in p.iterdir())
              for n, p in adapter_dirs.items()}
print({n: f"{b / 1e3:.0f} kB" for n, b in file_bytes.items()})

# %% [markdown]
# The two roads side by side, labelled with the sizes just measured. Merging builds one full
# binary per task, each a copy of the base weights with its patch baked in. Switching loads
# the base once and keeps each adapter as a small file beside it, the way a program loads a
# `.dll` or a Go program opens a `plugin` `.so` by name at run time. Each merged copy weighs
# {glue:text}`fig_base_mb` MB; each adapter file {glue:text}`fig_adapter_kb` kB.

# %%
from lora_lab import diagrams

base_mb = sum(p.numel() * p.element_size() for p in base.parameters()) / 1e6
adapter_kb = max(file_bytes.values()) / 1e3
assert adapter_kb / 1e3 < base_mb  # the patch is far smaller than the binary
glue("fig_base_mb", base_mb, ".1f")
glue("fig_adapter_kb", adapter_kb, ".0f")
diagrams.merge_vs_switch(
    list(adapter_dirs)[:3],
    sizes={"base": f"{base_mb:.1f} MB", "adapter": f"{adapter_kb:.0f} kB"})


# %% tags=["nbval-ignore-output"]
def seconds(fn, repeats=TIMING_REPEATS):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


registry = AdapterRegistry(copy.deepcopy(base))
for n, p in adapter_dirs.items():
    registry.load(n, p)


def load_once():
    registry.delete("a0")
    registry.load("a0", adapter_dirs["a0"])


def merge_unmerge():
    registry.merge("a1")
    registry.unmerge()


cost = {
    "load from disk": seconds(load_once),
    "set_adapter": seconds(lambda: registry.set_adapter("a1")),
    "merge + unmerge": seconds(merge_unmerge),
}
registry.disable()
with torch.no_grad():
    cost["one forward"] = seconds(  # float(...) waits for a GPU
        lambda: float(registry.model(**batch).logits[0, 0, 0]))
for k, v in cost.items():
    print(f"{k:16} {1e3 * v:8.3f} ms")

# %% [markdown]
# `set_adapter` only repoints every wrapped layer at tensors already in memory, so it is
# the cheapest switch: at least ten times cheaper than merge + unmerge, which computes
# $sBA$ for every patched layer and rewrites each weight twice, paid again at every
# switch. Loading reads and checks a file once per adapter; how it compares with the
# other two depends on the disk and the page cache, so the table above is this machine's
# answer, not a rule. Merging per request only pays when long runs of requests use the
# same adapter.

# %%
fast = cost["set_adapter"] * 10
print("set_adapter at least 10x cheaper than merge + unmerge:",
      fast < cost["merge + unmerge"])
if lora_lab.models.is_bundled(BASE_MODEL):  # a timing, measured on this model
    assert fast < cost["merge + unmerge"]

# %% [markdown]
# ### Many adapters, a small device: an LRU cache
#
# A GPU holds the base model and the KV cache; adapters compete for what is left. S-LoRA
# keeps every adapter in host memory and copies the ones a batch needs to the GPU
# {cite}`sheng2023slora`. The registry does the same with a byte budget and least recently
# used eviction. With room for two adapters, this request stream shows the counters:

# %%
one = registry.adapter("a0").nbytes
lru = AdapterRegistry(copy.deepcopy(base), max_device_bytes=2 * one)
for n, p in adapter_dirs.items():
    lru.load(n, p)
stream = ["a0", "a1", "a0", "a2", "a1", "a0", "a0", "a3"]
for n in stream:
    lru.set_adapter(n)
    print(f"{n}: on device {lru.device_names()}")
stats = lru.stats()
print({k: stats[k] for k in ("hits", "misses", "evictions")},
      f"adapter = {one:,} bytes")
assert (stats["hits"], stats["misses"], stats["evictions"]) == (2, 6, 4)
assert stats["device_bytes"] <= 2 * one

# %% [markdown]
# A registry built with `max_rank` refuses a bigger adapter when it is loaded, as vLLM's
# `--max-lora-rank` does (chapter 07b):

# %%
big_dir = save_adapter(make_adapter(99, r=16), adapter_dir.parent / "r16")
strict = AdapterRegistry(copy.deepcopy(base), max_rank=8)
try:
    strict.load("big", big_dir)
except ValueError as err:
    print(str(err).split(";")[0])
    refused = True
assert refused and strict.names() == []

# %% [markdown]
# ### One batch, many adapters
#
# Switching serves one adapter at a time. A server with requests for sixteen adapters
# wants one batch, not sixteen. The trick from Punica {cite}`chen2023punica`: compute the
# base output once for the whole batch, then add each row's own patch with a *gathered*
# matmul. Stack every adapter's $A$ into `[n, r, in]` and $B$ into `[n, out, r]`, gather
# by the per-row adapter id, and do one batched matmul per layer. Inline, for one layer:

# %%
layer_name = "model.layers.0.self_attn.q_proj"
names = ["a0", None, "a2", "a1"]  # one adapter (or none) per row
slots = [None] + list(adapter_dirs)  # slot 0 = no adapter: zeros
pairs = [registry.adapter(n).weights[layer_name] for n in adapter_dirs]
dev = base.device  # the host copies above go where the model is
A_stack = torch.stack([torch.zeros_like(pairs[0][0])]
                      + [a for a, _ in pairs]).to(dev)  # [n+1, r, in]
B_stack = torch.stack([torch.zeros_like(pairs[0][1])]
                      + [b for _, b in pairs]).to(dev)  # [n+1, out, r]
scale = registry.adapter("a0").scaling
ids = torch.tensor([slots.index(n) for n in names], device=dev)  # [batch]
W0 = base.get_submodule(layer_name)
xb = torch.randn(len(names), 5, W0.in_features).to(dev)  # [batch, seq, in]
with torch.no_grad():
    shrink = torch.bmm(xb, A_stack[ids].transpose(1, 2))  # [batch, seq, r]
    y_gathered = W0(xb) + scale * torch.bmm(shrink,
                                            B_stack[ids].transpose(1, 2))
    y_alone = []
    for row, n in zip(xb, names):
        if n is None:
            registry.disable()
        else:
            registry.set_adapter(n)
        y_alone.append(registry.model.get_submodule(layer_name)(row))
registry.disable()
gap = (y_gathered - torch.stack(y_alone)).abs().max().item()
print("ids", ids.tolist(), "| gathered vs one-by-one: max gap",
      lora_lab.runtime.below(gap, 1e-5))
assert gap < 1e-5

# %% [markdown]
# The step just computed, as a picture: each request carries an adapter id, the base matmul
# runs once for the whole batch, and each row's $A$ and $B$ are gathered from the stacks by
# its id, so a row never sees another row's patch.

# %%
diagrams.batched_step(names)

# %% [markdown]
# (claim-multi-adapter)=
# `lora_lab.serving` does this in every patched layer and keeps the ids fixed through
# greedy generation with a KV cache. The check: a mixed batch of chat prompts, each row
# with its own adapter, generates exactly the tokens each request gets alone, and exactly
# what PEFT's `generate(..., adapter_names=...)` gives for the same batch.

# %%
tests = [ex for task in ("support", "sql")
         for ex in data.load_task(task, "test")[:2]]
prompts = [tok.apply_chat_template(ex["messages"][:1], tokenize=False,
                                   add_generation_prompt=True) for ex in tests]
tok.padding_side = "left"
enc = tok(prompts, return_tensors="pt", padding=True,
          add_special_tokens=False).to(base.device)
ours = serving.generate(registry, enc["input_ids"], names,
                        attention_mask=enc["attention_mask"], max_new_tokens=12)
alone = []
for i, n in enumerate(names):
    if n is None:
        registry.disable()
    else:
        registry.set_adapter(n)
    ids_i = enc["input_ids"][i][enc["attention_mask"][i].bool()][None]
    with torch.no_grad():
        out = registry.model.generate(ids_i, do_sample=False, max_new_tokens=12,
                                      pad_token_id=tok.pad_token_id)
    alone.append(out[0, ids_i.shape[1]:].tolist())
registry.disable()

peft_model = PeftModel.from_pretrained(copy.deepcopy(base), adapter_dirs["a0"],
                                       adapter_name="a0")
for n in list(adapter_dirs)[1:]:
    peft_model.load_adapter(adapter_dirs[n], adapter_name=n)
with torch.no_grad():
    theirs = peft_model.eval().generate(
        **enc, do_sample=False, max_new_tokens=12,
        pad_token_id=tok.pad_token_id,
        adapter_names=[n or "__base__" for n in names])
theirs = theirs[:, enc["input_ids"].shape[1]:].tolist()
for n, row in zip(names, ours.tolist()):
    print(f"{str(n):5}", repr(tok.decode(row))[:60])
assert ours.tolist() == alone == theirs

# %% [markdown]
# (payoff-07)=
# ### Real patches: two trained adapters, one base
#
# The adapters so far are random: they test the plumbing, not the point. The point is that
# one base model does different jobs with a different patch switched in. `data/adapters/`
# ships two adapters trained for the bundled model (chapter 10 serves them): `sql` turns a
# request into SQL for the shop's database, `support` answers customers as the shop's
# assistant. One registry loads both; `set_adapter` switches between them, `disable` gives
# the base back, and all three answer the same questions: the first test question of
# each task (a fixed rule, not a choice). Each answer is scored by its question's task: SQL
# must return the reference query's rows in the sandboxed shop database, a reply must state
# the facts the reference reply states (✓ or ✗). Every model also answers both whole test
# splits, from which the accuracies below come.

# %%
SHIPPED = {n: DATA_DIR / "adapters" / n for n in ("sql", "support")}
if not lora_lab.models.is_bundled(BASE_MODEL):  # they fit the bundled model
    SHIPPED = {"sql": adapter_dirs["a0"], "support": adapter_dirs["a1"]}
shop = AdapterRegistry(copy.deepcopy(base))
for n, path in SHIPPED.items():
    shop.load(n, path)
TASKS = ("sql", "support")
LABEL = {"base": "base", "sql": "sql adapter", "support": "support adapter"}
answers, right = {}, {}
for n in LABEL:
    if n == "base":
        shop.disable()
    else:
        shop.set_adapter(n)  # switch the patch: the base stays where it is
    for task in TASKS:  # every test question of both tasks, greedy
        answers[n, task], right[n, task] = payoff.answer_split(
            shop.model, tok, task)
shop.disable()
print(f"{'accuracy':18}" + "".join(f"{t + ' task':>14}" for t in TASKS))
acc = {k: sum(v) / len(v) for k, v in right.items()}
for n in LABEL:
    print(f"{LABEL[n]:18}" + "".join(f"{acc[n, t]:>14.2f}" for t in TASKS))

# %%
first = [data.load_task(t, "test")[0]["messages"][0]["content"] for t in TASKS]
payoff.SideBySide(first,
                  {LABEL[n]: [answers[n, t][0] for t in TASKS] for n in LABEL},
                  {LABEL[n]: [right[n, t][0] for t in TASKS] for n in LABEL},
                  max_chars=140)

# %% [markdown]
# Each patch does its own job, and only its own. Asked for a query, the `sql` adapter writes
# one that returns the right rows; asked a customer's question, it still writes a query.
# The `support` adapter answers the customer with the facts right, and answers the request
# for a query with a reply about the shop. On the whole test splits the `sql` adapter
# scores {glue:text}`payoff_sql_sql` on SQL and {glue:text}`payoff_sql_support` on support,
# the `support` adapter {glue:text}`payoff_support_support` and
# {glue:text}`payoff_support_sql`, the base {glue:text}`payoff_base_sql` and
# {glue:text}`payoff_base_support`. Switching from one job to the other was a pointer
# swap in one process: that is what dynamic linking buys.

# %%
if lora_lab.models.is_bundled(BASE_MODEL):
    for t in TASKS:  # the first question of each task
        assert right[t, t][0] and not right["base", t][0]
    assert answers["sql", "support"][0].startswith("SELECT")
    assert not answers["support", "sql"][0].startswith("SELECT")
    assert acc["sql", "sql"] >= 0.8 and acc["support", "support"] >= 0.95
    assert max(acc["sql", "support"], acc["support", "sql"],
               acc["base", "sql"], acc["base", "support"]) < 0.05
for n in LABEL:
    for t in TASKS:
        glue(f"payoff_{n}_{t}", acc[n, t], ".2f")
print("each adapter right on its own task's question, the base on neither:",
      all(right[t, t][0] and not right["base", t][0] for t in TASKS))

# %% [markdown]
# (claim-deployment-table)=
# ## The deployment table, measured
#
# The sources compare the two roads in a table of adjectives. Here it is with this
# chapter's numbers. Storage: a merged deployment stores one full model per adapter; a
# switched one stores the base once plus one adapter file each. Latency ratios come from
# the timing cells above (they vary a little per run). Throughput comes from the cached
# multi-adapter benchmark on the bundled model (`benchmarks/bench_multi_adapter.py`,
# batches of {glue:text}`bench_batch`; chapter 07b reads it in full): the batched
# server of the section above against merging per group of same-adapter requests, with
# the stream spread over 16 adapters, and against one merged model with one adapter.

# %%
model_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
adapter_bytes = sum(file_bytes.values()) / len(file_bytes)
print(f"{'bytes for N adapters':22} {'merged':>12} {'switched':>12}")
for n in (1, 4, 16, 64):
    print(f"{'N = ' + str(n):22} {n * model_bytes / 1e6:>10.1f}MB"
          f" {(model_bytes + n * adapter_bytes) / 1e6:>10.1f}MB")
assert model_bytes / adapter_bytes > 5
assert 64 * model_bytes > 10 * (model_bytes + 64 * adapter_bytes)
glue("merged16_mb", 16 * model_bytes / 1e6, ".1f")
glue("switched16_mb", (model_bytes + 16 * adapter_bytes) / 1e6, ".1f")

# %% tags=["nbval-ignore-output"]
bench = json.loads((RESULTS_DIR / "multi_adapter.json").read_text())
b16 = bench["batch_sizes"][0]  # the first batch size of the sweep
rows = {r["n_adapters"]: r for r in bench["results"]
        if r["batch_size"] == b16}
tps = {m: v["tokens_per_s"] for m, v in rows[16]["methods"].items()}
print(f"{'':26} {'merged (static)':>17} {'switched (dynamic)':>20}")
print(f"{'forward latency vs base':26} {ratio['merged']:>17.2f}"
      f" {ratio['unmerged']:>20.2f}")
print(f"{'switch cost':26} {'a new model':>17}"
      f" {1e6 * cost['set_adapter']:>17.0f} us")
print(f"{'tokens/s, 16 adapters':26} {tps['merge_per_group']:>17.0f}"
      f" {tps['lora_lab_mixed']:>20.0f}")
print(f"{'tokens/s, 1 adapter':26}"
      f" {rows[1]['methods']['merged_single']['tokens_per_s']:>17.0f}"
      f" {rows[1]['methods']['lora_lab_mixed']['tokens_per_s']:>20.0f}")
print(f"{'memory, 16 adapters (MB)':26} {16 * model_bytes / 1e6:>17.1f}"
      f" {(model_bytes + 16 * adapter_bytes) / 1e6:>20.1f}")

# %% [markdown]
# Reading it: the merged road wins per request when there is one task (the base's
# latency, the best tokens/s with one adapter) and loses everything else once there are
# many: storage grows by a full model per task, and serving many adapters from merged
# weights means merging per request, several times slower than the batched server at 16
# adapters. The switched road pays a small, measured overhead per token and keeps one
# base for all tasks.

# %%
assert tps["lora_lab_mixed"] > 3 * tps["merge_per_group"]
glue("bench_batch", b16)

# %% [markdown]
# ## Check yourself
#
# **1.** After `merge_and_unload`, what does the model cost per token compared with the base?
# (a) more: it still runs $A$ and $B$ (b) the same: it has exactly the base's modules and
# parameter count (c) less: the patch prunes weights (d) it depends on r
#
# ```{admonition} Answer
# :class: dropdown
# (b): $W_0 + sBA$ is one ordinary matrix per layer (structure asserted above). This is
# static linking: no patch left to call at run time, and no way to swap it out either.
# ```
#
# **2.** Two adapters are already in memory. What is the cheapest way to switch between them?
# (a) reload the second from disk (b) merge it in and unmerge it after the request
# (c) `set_adapter`, which only repoints each wrapped layer at tensors already in memory
# (d) restart the server
#
# ```{admonition} Answer
# :class: dropdown
# (c): on the bundled model it was at least ten times cheaper than merge + unmerge
# (asserted), which rewrites every patched weight twice per switch.
# ```
#
# **3.** You serve many tasks from one base. Which road stores less?
# (a) merged: one model file per task (b) switched: the base once plus a small adapter file
# per task (c) both the same (d) neither can serve many tasks
#
# ```{admonition} Answer
# :class: dropdown
# (b): each merged copy is the whole model again; the deployment table asserts the switched
# road is many times smaller. Merge for one task; switch, or batch, for many.
# ```
#
# ## Summary
#
# - Merging folds $sBA$ into $W_0$: same outputs within fp32 rounding, the base model's
#   modules and cost, and `unmerge` gives the base back. Check dtype, quantization and
#   versions first.
# - Switching keeps one base and many small files. `set_adapter` is a pointer swap;
#   merge/unmerge per request rewrites every patched weight; an LRU budget keeps the hot
#   adapters on the device, as in S-LoRA.
# - A gathered matmul serves a batch with a different adapter per row, token-identical to
#   running each request alone and to PEFT. Chapter 07b measures what that is worth.
# - Two trained adapters on one base each do their own job and only their own; switching
#   between them is a pointer swap in one process.
# - The deployment table: merged wins with one task (the base's latency); switched stores
#   the base once for every task and, with 16 adapters in the stream, serves several
#   times the tokens/s of merging per request.
# - An adapter that changes nothing: {ref}`adapter loaded but not applied <trouble-adapter-inactive>` (troubleshooting).
#
# ## Exercises
#
# 1. Merge the adapter into a bf16 copy of the base instead of fp32. How large is the gap
#    between merged and unmerged logits now, and why?
# 2. In the LRU cell, raise the budget to three adapters. Predict the hits, misses and
#    evictions for the same stream before you run it.
#
# ```{admonition} Solution 1
# :class: dropdown
# Build the adapter as `make_adapter` does, but on `copy.deepcopy(base).to(torch.bfloat16)`,
# and compare its logits with those of its `merge_and_unload` copy. bf16 keeps
# {glue:text}`bf16_bits` bits of mantissa, so adding $sBA$ to $W_0$ rounds each weight by up
# to about {glue:text}`bf16_rel` of its size, and the logits of the merged and unmerged
# models drift apart by far more than in fp32. This is the checklist's "upcast first"
# item.
# ```
#
# ```{admonition} Solution 2
# :class: dropdown
# With room for three, the stream a0 a1 a0 a2 a1 a0 a0 a3 misses on a0, a1, a2 and a3
# (four misses), hits on the other four requests, and evicts once: a2, the least recently
# used of the three, when a3 arrives.
# ```

# %% tags=["hide-cell"]
# Solution 1 pastes these: bf16's mantissa bits (with the implicit one) and
# its largest relative rounding step.
bf16_eps = torch.finfo(torch.bfloat16).eps
glue("bf16_bits", round(-math.log2(bf16_eps)) + 1)
glue("bf16_rel", bf16_eps / 2, ".1%")
