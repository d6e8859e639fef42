# %% [markdown]
# # 10 · Shipping the patch: from adapter to served answer
#
# Chapter 07 chose between the two roads a patch takes to production: link it into the
# binary (merge) or load it at run time (switch). This chapter walks each road to its end,
# the way a release engineer ships a program: build the artifact, put it on disk, start
# the server, send it a request, and check that the answer that comes back is the one the
# code on your desk gives. The artifacts are real: a merged checkpoint that reloads with
# `AutoModelForCausalLM`, a live vLLM server with several adapters, and GGUF files for
# llama.cpp, the format laptops and edge devices run. The patches are the `support` and
# `sql` adapters trained by `benchmarks/ship_adapters.py` (the project's trainer,
# `lora-lab train`, with the settings in `configs/`), shipped in `data/adapters/`.
#
# **Learning goals**
# - save a merged model with its tokenizer and generation config, reload it, and check its
#   greedy answers against the unmerged adapter; know what the pre-merge checklist catches;
# - manage several adapters with PEFT's own API (`load_adapter`, `add_adapter`,
#   `set_adapter`, `disable_adapter`, `delete_adapter`) and check it against `lora_lab`;
# - start a vLLM server with two adapters, query it with the `openai` client and with raw
#   HTTP, load a third adapter while it runs, meet the `max_lora_rank` error, and check
#   its answers token by token;
# - convert the merged model and the adapter to GGUF and compare llama.cpp's answers;
# - read TGI's launch command and client call, and how it differs from vLLM;
# - run the English source's own example (OPT, quotes, q/v targets) in miniature;
# - choose a deployment road from measured numbers and a flowchart.

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
ADAPTERS = None  # None: data/adapters (trained for the bundled model), or
# random stand-ins for another base; your own: {"support": path, "sql":
# path, "sql_qv": path} (train them with `lora-lab train --config ...`)
SEED = 0
N_PROMPTS = 8  # test questions per task
MAX_NEW_TOKENS = 40  # greedy answer length
RUN_VLLM = True  # start a real vLLM server when vLLM is installed
VLLM_TIMEOUT = 400  # seconds to wait for the server to start

# %%
import lora_lab  # first: it keeps known library noise out of outputs

import copy
import json
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from myst_nb import glue
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (AutoModelForCausalLM, AutoTokenizer,
                          GenerationConfig)

from lora_lab import data, shipping
from lora_lab.evaluate import score_sql
from lora_lab.inject import LoRAConfig, add_lora
from lora_lab.nf4 import quantize_model
from lora_lab.paths import DATA_DIR, RESULTS_DIR
from lora_lab.registry import AdapterRegistry

lora_lab.seed_everything(SEED)
torch.set_num_threads(1)  # steadier timings on a shared machine
below = lora_lab.runtime.below  # float-rounding gaps print as "< bound"
WORK = Path(tempfile.mkdtemp(prefix="ch10-"))
print(lora_lab.runtime.describe())

# %% [markdown]
# ## The patches to ship
#
# Two adapters of rank 8 on the attention projections, one per task, and a third of rank 4
# on `q_proj` and `v_proj` only (the English source's targets), kept back to be loaded
# into a running server later. Each folder holds the two files PEFT writes and the
# trainer's `metrics.json`. `adapter_config.json` is the saved `LoraConfig`, the patch
# manifest in the Chinese source's words: it names the base model, the rank, alpha and the
# target layers (the cell prints r and the targets from it), and the loaders below read it
# to know where the weights go.

# %%
base, tok = lora_lab.load_base(BASE_MODEL)
base.eval()
BUNDLED = lora_lab.models.is_bundled(BASE_MODEL)
SHAPES = {"support": (8, ["q_proj", "k_proj", "v_proj", "o_proj"]),
          "sql": (8, ["q_proj", "k_proj", "v_proj", "o_proj"]),
          "sql_qv": (4, ["q_proj", "v_proj"])}
if ADAPTERS is None and BUNDLED:
    ADAPTERS = {n: DATA_DIR / "adapters" / n for n in SHAPES}
elif ADAPTERS is None:  # another base: random adapters (B != 0) stand in
    ADAPTERS = {}
    for i, (name, (r, targets)) in enumerate(SHAPES.items()):
        torch.manual_seed(SEED + i)
        ADAPTERS[name] = WORK / "adapters" / name
        get_peft_model(copy.deepcopy(base), LoraConfig(
            r=r, lora_alpha=2 * r, target_modules=targets,
            init_lora_weights=False)).save_pretrained(ADAPTERS[name])
ADAPTERS = {n: Path(p) for n, p in ADAPTERS.items()}
for name, path in ADAPTERS.items():
    cfg = json.loads((path / "adapter_config.json").read_text())
    metrics = path / "metrics.json"
    accuracy = (f"{json.loads(metrics.read_text())['accuracy']:.2f}"
                if metrics.is_file() else "n/a (untrained)")
    files = sorted(f.name for f in path.iterdir())
    print(f"{name:8} r={cfg['r']} {sorted(cfg['target_modules'])}"
          f" test accuracy {accuracy}"
          f" | {shipping.dir_bytes(path) / 1e3:.0f} kB {files}")

# %% [markdown]
# The test questions the chapter sends through every road, as the chat template renders
# them. Token ids, not text, go to each runtime, so that a difference in an answer is a
# difference in the model, not in tokenization (llama.cpp's tokenizer gets its own check
# below).

# %%
tests = {task: data.load_task(task, "test")[:N_PROMPTS]
         for task in ("support", "sql")}


def chat_prompt(example):
    return tok.apply_chat_template(example["messages"][:1], tokenize=False,
                                   add_generation_prompt=True)


texts = {t: [chat_prompt(ex) for ex in exs] for t, exs in tests.items()}
ids = {t: [tok(x, add_special_tokens=False)["input_ids"] for x in xs]
       for t, xs in texts.items()}
EOS = tok.eos_token_id


def until_eos(row):
    row = list(row)
    return row[: row.index(EOS)] if EOS in row else row


def greedy(model, prompts, max_new=MAX_NEW_TOKENS):
    """Greedy answers (token ids, cut at EOS) for token-id prompts."""
    width = max(len(p) for p in prompts)
    pad = tok.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p)
                         for p in prompts])
    dev = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(input_ids=input_ids.to(dev),
                             attention_mask=mask.to(dev), do_sample=False,
                             max_new_tokens=max_new, pad_token_id=pad,
                             eos_token_id=EOS)
    return [until_eos(row[width:].tolist()) for row in out]


print(texts["sql"][0])
print(len(ids["support"]) + len(ids["sql"]), "prompts,",
      max(len(p) for v in ids.values() for p in v), "tokens at most")

# %% [markdown]
# (claim-merged-reload)=
# ## Road 1: static linking, all the way to disk
#
# ### The pre-merge checklist catches three things
#
# `shipping.premerge_checklist` turns chapter 07's checklist into one call that works on
# PEFT and `lora_lab` models alike. It refuses a model with nothing to merge and one whose
# base layers are quantized (their weights are codes, so $W_0 + sBA$ has nothing to add
# to), and it warns about a half-precision base, where the sum is rounded. It records the
# library versions to store beside the checkpoint.

# %%
peft_sql = PeftModel.from_pretrained(copy.deepcopy(base), ADAPTERS["sql"])
report = shipping.premerge_checklist(peft_sql)
print({k: report[k] for k in ("lora_layers", "dtypes", "problems")})

half = PeftModel.from_pretrained(copy.deepcopy(base).to(torch.bfloat16),
                                 ADAPTERS["sql"])
print("bf16 base:", shipping.premerge_checklist(half)["warnings"])

quantized = quantize_model(copy.deepcopy(base))  # lora_lab's NF4, chapter 06
quantized = add_lora(quantized, LoRAConfig(r=8, target_modules=["q_proj"]))
caught = []
for label, model in (("plain base", base), ("4-bit base", quantized)):
    try:
        shipping.premerge_checklist(model)
    except ValueError as err:
        caught.append(label)
        print(f"{label}: {str(err)[:72]}...")
n_layers = base.config.num_hidden_layers
assert report["problems"] == [] and report["lora_layers"] == 4 * n_layers
assert caught == ["plain base", "4-bit base"]

# %% [markdown]
# ### Merge, save, reload
#
# The English source saves the merged model *and* the tokenizer. Both matter: the folder
# is what a server or a colleague loads, and without the tokenizer it cannot turn text
# into ids. `save_pretrained` also writes `generation_config.json` (EOS, padding, default
# length), so `generate` on the reloaded model stops where the original did.

# %%
merged = peft_sql.merge_and_unload()
merged_dir = WORK / "merged-sql"
merged.save_pretrained(merged_dir)
tok.save_pretrained(merged_dir)
print(sorted(f.name for f in merged_dir.iterdir()))

reloaded = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
tok2 = AutoTokenizer.from_pretrained(merged_dir)
gen2 = GenerationConfig.from_pretrained(merged_dir)
assert type(reloaded).__name__ == type(base).__name__
assert tok2("SELECT name")["input_ids"] == tok("SELECT name")["input_ids"]
assert (gen2.eos_token_id, gen2.pad_token_id) == (EOS, tok.pad_token_id)

bare = WORK / "model-only"  # the mistake: weights without the tokenizer
merged.save_pretrained(bare)
try:  # fails, or (for some model types) builds a tokenizer that is not ours
    bare_tok = AutoTokenizer.from_pretrained(bare)
    probe = "SELECT name"
    same = bare_tok(probe)["input_ids"] == tok(probe)["input_ids"]
    outcome = "our tokenizer" if same else "a tokenizer, but not ours"
except (OSError, ValueError, TypeError) as err:
    outcome = type(err).__name__
print("model-only folder:", outcome)
assert outcome != "our tokenizer"

# %% [markdown]
# Now the test that matters: the reloaded merged model and the unmerged adapter answer
# every question with the same greedy tokens. The folder is what gets deployed, so the
# comparison reads it back from disk rather than trusting the object in memory.

# %%
prompts = ids["sql"] + ids["support"]
peft_sql = PeftModel.from_pretrained(copy.deepcopy(base),
                                     ADAPTERS["sql"]).eval()
unmerged_answers = greedy(peft_sql, prompts)
reloaded_answers = greedy(reloaded, prompts)
same = sum(a == b for a, b in zip(unmerged_answers, reloaded_answers))
sql_right = sum(score_sql(tok.decode(a), ex["sql"]) for a, ex in
                zip(reloaded_answers, tests["sql"]))
print(f"merged + reloaded vs unmerged: {same}/{len(prompts)} identical")
print(f"sql answers that return the right rows: {sql_right}/{N_PROMPTS}")
print(repr(tok.decode(reloaded_answers[0])))
glue("merged_same", same, display=False)
glue("merged_n", len(prompts), display=False)
assert same >= len(prompts) - 1  # fp32: a near-tie may flip one token
assert sql_right >= N_PROMPTS // 2 or not BUNDLED  # trained: it works

# %% [markdown]
# What the static road costs on disk: the merged folder is the whole model again, the
# adapter a small fraction of it.

# %%
sizes = {"adapter (sql)": shipping.dir_bytes(ADAPTERS["sql"]),
         "merged folder": shipping.dir_bytes(merged_dir),
         "merged weights": (merged_dir / "model.safetensors").stat().st_size}
for k, v in sizes.items():
    print(f"{k:16} {v / 1e6:8.2f} MB")
ratio = sizes["merged folder"] / sizes["adapter (sql)"]
print(f"merged / adapter: {ratio:.0f}x")
glue("merged_mb", sizes["merged folder"] / 1e6, display=False)
glue("adapter_kb", sizes["adapter (sql)"] / 1e3, display=False)
glue("merged_over_adapter", ratio, display=False)
assert ratio > 10

# %% [markdown]
# (claim-peft-multi-adapter)=
# ## Road 2: dynamic linking, first in one process
#
# ### PEFT's multi-adapter API next to `lora_lab`'s registry
#
# The English source's last section names PEFT's methods for managing several adapters
# on one model. Here they are in use: load two trained adapters, add a fresh one, switch,
# switch the patch off, delete. A fresh adapter starts with $B = 0$, so it must answer
# exactly like the base model until it is trained. `lora_lab.registry.AdapterRegistry`
# does the same with the same verbs; the two must agree token for token. These verbs are
# separation of concerns at work, in the Chinese source's words for LoRA: one base for what
# every task shares, one file per skill, and a skill added, switched or deleted without
# touching the base or the other skills.

# %%
peft_model = PeftModel.from_pretrained(copy.deepcopy(base), ADAPTERS["support"],
                                       adapter_name="support")
peft_model.load_adapter(ADAPTERS["sql"], adapter_name="sql")
peft_model.add_adapter("fresh", LoraConfig(r=8, target_modules=["q_proj",
                                                                "v_proj"]))
print("adapters:", list(peft_model.peft_config))
peft_model.eval()
mixed = ids["support"][:3] + ids["sql"][:3]
theirs = {}
for name in ("support", "sql", "fresh"):
    peft_model.set_adapter(name)
    theirs[name] = greedy(peft_model, mixed)
with peft_model.disable_adapter():
    theirs[None] = greedy(peft_model, mixed)
peft_model.set_adapter("support")  # not the one about to be deleted
peft_model.delete_adapter("fresh")
print("after delete_adapter:", list(peft_model.peft_config),
      "| active:", peft_model.active_adapter)

registry = AdapterRegistry(copy.deepcopy(base).eval())
for name in ("support", "sql"):
    registry.load(name, ADAPTERS[name])
ours = {}
for name in ("support", "sql"):
    registry.set_adapter(name)
    ours[name] = greedy(registry.model, mixed)
registry.disable()
ours[None] = greedy(registry.model, mixed)
registry.delete("sql")
print("registry after delete:", registry.names())
for name in ("support", "sql", None):
    print(f"{str(name):8}", repr(tok.decode(theirs[name][3]))[:62])
assert all(ours[n] == theirs[n] for n in ("support", "sql", None))
assert theirs["fresh"] == theirs[None]  # B = 0: the base model's answers
if BUNDLED:  # trained adapters change the answers
    assert theirs["support"] != theirs["sql"] != theirs[None]

# %% [markdown]
# (claim-vllm-live)=
# ## Road 2, served: vLLM live
#
# Now the same adapters behind a real server. `lora_lab.vllm_server.start` runs vLLM's
# OpenAI-compatible server as a subprocess on 127.0.0.1, waits until it answers, and stops
# it (with every process it spawned) at the end. In a shell the same server is:
#
# ```bash
# VLLM_ALLOW_RUNTIME_LORA_UPDATING=True VLLM_CPU_KVCACHE_SPACE=1 \
# VLLM_ENABLE_V1_MULTIPROCESSING=0 \
# vllm serve data/models/tiny-base --served-model-name base \
#     --host 127.0.0.1 --dtype float32 --max-model-len 512 --max-num-seqs 16 \
#     --distributed-executor-backend uni \
#     --enable-lora --max-lora-rank 8 --max-loras 3 \
#     --lora-modules support=data/adapters/support sql=data/adapters/sql
# ```
#
# **Why start-up takes as long as it does, and the flags that make it fit.** Loading this
# model and warming it up takes vLLM a few seconds. The rest of the start-up is Python
# importing vLLM and torch, once in *each process*. By default the CPU build runs three:
# the API server, the engine core, and a worker that the engine core spawns for the model.
# `--distributed-executor-backend uni` with `VLLM_ENABLE_V1_MULTIPROCESSING=0` keeps the
# model in the engine core's process: one import fewer. `benchmarks/vllm_startup.py`
# started the server both ways, alternating, on the machine this book is built on (two
# cores shared with other jobs, so the load average is recorded too):

# %%
startup = json.loads((RESULTS_DIR / "vllm_startup.json").read_text())
for name, runs in startup["runs"].items():
    print(f"{name:27} start-up {[r['startup_s'] for r in runs]} s,"
          f" {runs[0]['processes']} processes,"
          f" load {[r['load_average_1min_before'] for r in runs]}")
fast, slow = (startup["median_startup_s"][k] for k in
              ("uni executor (2 processes)", "default (3 processes)"))
print(f"median: {slow:.0f} s -> {fast:.0f} s; same answers:",
      startup["same_answers"])
glue("startup_default_s", slow, display=False)
glue("startup_uni_s", fast, display=False)
procs = {k: v[0]["processes"] for k, v in startup["runs"].items()}
assert procs["uni executor (2 processes)"] < procs["default (3 processes)"]
assert startup["same_answers"] and fast < slow

# %% [markdown]
# The other flags keep the server small: `VLLM_CPU_KVCACHE_SPACE=1` sizes the KV cache in
# GiB instead of taking a share of the machine's RAM, `--max-model-len 512` is the model's own
# limit, `--max-num-seqs 16` sizes the batch for this chapter. On a GPU drop
# `--dtype float32` and the CPU variables; `--max-lora-rank` and `--max-loras` stay.

# %% tags=["nbval-ignore-output"]
# says why, where vLLM cannot run
import importlib.util

from lora_lab import vllm_server

have_vllm = importlib.util.find_spec("vllm") is not None
base_name, base_dir = lora_lab.models.check_base(BASE_MODEL)
run_vllm = RUN_VLLM and have_vllm and BUNDLED
why = ("vLLM is not installed here (it ships wheels for Linux only)"
       if not have_vllm else "RUN_VLLM is False or another base model")
print("vLLM cells: run" if run_vllm else f"vLLM cells skipped: {why}")

# %%
# a rank-16 adapter for the max_lora_rank pitfall: the server refuses it
# from its config, before reading a weight, so an untrained one will do
torch.manual_seed(SEED)
rank16_dir = WORK / "rank16"
get_peft_model(copy.deepcopy(base), LoraConfig(
    r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"],
    init_lora_weights=False)).save_pretrained(rank16_dir)

# the reference: PEFT's greedy answers for every (adapter, prompt) pair
reference = {}
peft_all = PeftModel.from_pretrained(copy.deepcopy(base), ADAPTERS["support"],
                                     adapter_name="support").eval()
for name in ("sql", "sql_qv"):
    peft_all.load_adapter(ADAPTERS[name], adapter_name=name)
for name in ("support", "sql", "sql_qv"):
    peft_all.set_adapter(name)
    reference[name] = greedy(peft_all, prompts)
with peft_all.disable_adapter():
    reference["base"] = greedy(peft_all, prompts)
print("reference answers:", {k: len(v) for k, v in reference.items()})

# %% tags=["nbval-ignore-output"]
served = None
if run_vllm:
    began = time.perf_counter()
    server = vllm_server.start(
        base_dir, lora_modules={"support": ADAPTERS["support"],
                                "sql": ADAPTERS["sql"]},
        served_model_name="base", max_lora_rank=8, max_loras=3,
        extra_args=["--max-num-seqs", "16",
                    "--distributed-executor-backend", "uni"],
        env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, timeout=VLLM_TIMEOUT)
    served = {"startup_s": server.startup_s}
    print(f"vLLM ready after {server.startup_s:.0f} s at {server.url}")
    print("models:", server.models())

# %% [markdown]
# **The `openai` client.** vLLM speaks the OpenAI API, so the official client works as is:
# point `base_url` at the server and pick the adapter with `model`. The API key is not
# checked by a local server; any string will do.

# %% tags=["nbval-ignore-output"]
if run_vllm:
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="not-checked")
    question = tests["sql"][0]["messages"][0]["content"]
    reply = client.completions.create(model="sql", prompt=texts["sql"][0],
                                      max_tokens=MAX_NEW_TOKENS,
                                      temperature=0)
    print("Q:", question)
    print("sql    :", reply.choices[0].text)
    chat = client.chat.completions.create(
        model="support", max_tokens=MAX_NEW_TOKENS, temperature=0,
        messages=tests["support"][0]["messages"][:1])
    print("Q:", tests["support"][0]["messages"][0]["content"])
    print("support:", chat.choices[0].message.content)
    served["openai_sql"] = reply.choices[0].text
    served["openai_chat"] = chat.choices[0].message.content

# %% [markdown]
# **Raw HTTP, as `curl` sends it.** The client is a convenience; the protocol is one JSON
# POST. The cell prints the `curl` command and sends the same bytes with Python's
# standard library.

# %% tags=["nbval-ignore-output"]
if run_vllm:
    payload = {"model": "support", "prompt": texts["support"][1],
               "max_tokens": MAX_NEW_TOKENS, "temperature": 0}
    url = server.url + "/v1/completions"
    print(f"curl {url} -H 'Content-Type: application/json' \\\n"
          f"     -d '{json.dumps(payload)}'")
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.load(response)
    print(json.dumps(answer["choices"][0], indent=1)[:400])
    print("usage:", answer["usage"])
    served["http_text"] = answer["choices"][0]["text"]

# %% [markdown]
# **A third adapter while the server runs.** With
# `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`, `POST /v1/load_lora_adapter` adds an adapter
# without a restart: the base stays loaded and warm. Then the **`max_lora_rank` pitfall**:
# the server sized its LoRA slots at start-up for rank 8, so a rank-16 adapter is refused
# when it is loaded, and the server keeps running without it.

# %% tags=["nbval-ignore-output"]
if run_vllm:
    began = time.perf_counter()
    server.request("POST", "/v1/load_lora_adapter",
                   {"lora_name": "sql_qv",
                    "lora_path": str(ADAPTERS["sql_qv"].resolve())})
    served["load_s"] = time.perf_counter() - began
    print(f"loaded sql_qv in {served['load_s']:.2f} s;"
          f" models: {server.models()}")
    try:
        vllm_server.load_lora_adapter(server, "rank16", rank16_dir)
        served["refused"] = None
    except vllm_server.VLLMError as err:
        served["refused"] = str(err)
        print("refused:", str(err)[:150])
    served["models_after"] = server.models()
    print("still running:", server.running())

# %% [markdown]
# **Do the served answers agree?** Every prompt goes to the server once per adapter (and
# once to the base), as token ids in one batched request per adapter, and the greedy
# tokens are compared with PEFT's. Then the server is stopped.

# %% tags=["nbval-ignore-output"]
if run_vllm:
    served["answers"] = {}
    for name in ("base", "support", "sql", "sql_qv"):
        out = server.request("POST", "/v1/completions", {
            "model": name, "prompt": prompts, "max_tokens": MAX_NEW_TOKENS,
            "temperature": 0, "return_token_ids": True})
        rows = sorted(out["choices"], key=lambda c: c["index"])
        served["answers"][name] = [until_eos(c["token_ids"]) for c in rows]
    server.stop()
    served["stopped"] = not server.running()
    agree = {n: sum(a == b for a, b in zip(served["answers"][n], reference[n]))
             for n in reference}
    print("vLLM vs PEFT, identical answers:", agree, "of", len(prompts))
    for n, a in served["answers"].items():
        print(f"{n:8}", repr(tok.decode(a[0]))[:60])
    glue("vllm_startup_s", served["startup_s"], display=False)
    glue("vllm_load_s", served["load_s"], display=False)
    glue("vllm_agree", sum(agree.values()), display=False)
    glue("vllm_total", len(prompts) * len(agree), display=False)

# %% [markdown]
# The checks, in a cell whose output is the same with or without vLLM (without it, only
# the PEFT reference is shown): the served answers must equal PEFT's in nine cases of ten
# (`agree_all >= 0.9 * total`), token for token (both run fp32; vLLM's CPU kernels add
# in another order, so a rare near-tie could flip a token), each adapter must change the answers, the runtime load
# must have worked, and the rank-16 adapter must have been refused.

# %%
if served is not None:
    total = len(prompts) * len(reference)
    agree_all = sum(a == b for n in reference
                    for a, b in zip(served["answers"][n], reference[n]))
    assert agree_all >= 0.9 * total, (agree_all, total)
    assert "sql_qv" in served["models_after"]
    assert "rank16" not in served["models_after"] and served["stopped"]
    assert "greater than max_lora_rank 8" in served["refused"]
    assert all(served[k] for k in ("openai_sql", "openai_chat", "http_text"))
for n in ("support", "sql", "sql_qv"):
    assert reference[n] != reference["base"] or not BUNDLED
print("PEFT reference, first sql question:")
for n in ("base", "sql", "sql_qv"):
    print(f"  {n:7}", repr(tok.decode(reference[n][0]))[:64])

# %% [markdown]
# (claim-gguf)=
# ## Another platform: GGUF and llama.cpp
#
# llama.cpp runs models on laptops, phones and CPUs without Python, from one GGUF file
# that holds the hyperparameters, the tokenizer and the tensors. The Chinese source lists
# it, with LoRA adapters in GGUF format, among the runtimes that serve unmerged adapters;
# a merged model goes there the same way. llama.cpp's own converter script is not on
# PyPI, but its file format is: the `gguf` package writes and reads it.
# `lora_lab.shipping.write_llama_gguf` is a short converter for Llama models. It renames
# the tensors, copies the tokenizer, and makes one real change: it
# reorders the rows of `q_proj` and `k_proj`, because transformers' Llama rotates the two
# halves of each head in RoPE while llama.cpp rotates adjacent pairs (the tests check
# that the reordering leaves attention unchanged). Every tensor is read back and compared
# with the merged model's weights.

# %%
import numpy as np

LLAMA = base.config.model_type == "llama"  # what this converter writes
if not LLAMA:
    print(f"{base.config.model_type} model: write_llama_gguf converts Llama"
          " models only (llama.cpp's convert_hf_to_gguf.py does the rest)")
else:
    gguf_dir = WORK / "gguf"
    gguf_files = {kind: shipping.write_llama_gguf(
        merged_dir, gguf_dir / f"merged-sql-{kind}.gguf", dtype=kind)
        for kind in ("f32", "f16", "q8_0")}
    if base_dir is None:  # a Hub model: save the base as a folder first
        base_dir = WORK / "base"
        base.save_pretrained(base_dir)
        tok.save_pretrained(base_dir)
    base_gguf = shipping.write_llama_gguf(base_dir, gguf_dir / "base-f32.gguf")
    lora_gguf = shipping.write_lora_gguf(ADAPTERS["sql"], merged_dir,
                                         gguf_dir / "sql-lora-f32.gguf")
    config = json.loads((merged_dir / "config.json").read_text())
    weights = {k: v.numpy() for k, v in merged.state_dict().items()}
    gaps = {}
    for kind, path in gguf_files.items():
        meta, tensors = shipping.read_gguf(path)
        back = shipping.gguf_to_hf_tensors(tensors, config)
        assert set(back) == set(weights)
        gaps[kind] = max(float(np.abs(back[k] - weights[k]).max())
                         for k in weights)
        print(f"{kind:5} {path.stat().st_size / 1e6:6.2f} MB, {len(tensors)}"
              f" tensors, max |GGUF - merged| = {below(gaps[kind], 1e-6)}")
    lora_meta, lora_tensors = shipping.read_gguf(lora_gguf)
    print(f"LoRA  {lora_gguf.stat().st_size / 1e3:6.0f} kB, {len(lora_tensors)}"
          f" tensors, alpha {lora_meta['adapter.lora.alpha']:.0f},"
          f" type {lora_meta['general.type']}")
    print(meta["general.architecture"], "| context",
          meta["llama.context_length"], "| tokens",
          meta["tokenizer.ggml.tokens.len"])
    assert gaps["f32"] == 0.0 and gaps["f16"] < 1e-2 and gaps["q8_0"] < 5e-2
    sizes.update({f"GGUF {k}": p.stat().st_size for k, p in gguf_files.items()})
    sizes["GGUF LoRA"] = lora_gguf.stat().st_size
    glue("gguf_f32_mb", sizes["GGUF f32"] / 1e6, display=False)
    glue("gguf_q8_mb", sizes["GGUF q8_0"] / 1e6, display=False)

# %% [markdown]
# **Running it.** `llama-cpp-python` compiles llama.cpp from source when it is installed
# (a C++ compiler and cmake; several minutes on two idle cores, far longer on a busy
# machine). The book's environment does not install it, so this chapter shows the
# answers cached by `benchmarks/gguf_llama_cpp.py`, which runs the same function
# (`shipping.llama_cpp_answers`) on the same files, and compares them here with the
# answers transformers gives *now*. Where `llama-cpp-python` is installed, the next cell
# runs llama.cpp live as well.

# %%
hf_answers = {"merged f32": reloaded_answers[:N_PROMPTS],
              "merged q8_0": reloaded_answers[:N_PROMPTS],
              "base + LoRA f32": unmerged_answers[:N_PROMPTS]}
gguf_agree = None
if not BUNDLED:
    print("the cached llama.cpp answers are the bundled model's: skipped")
else:
    cached = json.loads((RESULTS_DIR / "gguf_llama_cpp.json").read_text())
    assert cached["prompts"] == ids["sql"]
    assert cached["max_tokens"] == MAX_NEW_TOKENS
    print(f"llama.cpp {cached['llama_cpp_python']} answers (cached) vs"
          " transformers now, sql questions:")
    gguf_agree = {}
    for label, theirs_cpp in cached["answers"].items():
        gguf_agree[label] = sum(a == b for a, b in zip(theirs_cpp,
                                                        hf_answers[label]))
        print(f"  {label:16} {gguf_agree[label]}/{N_PROMPTS} identical")
    tok_same = sum(a == b for a, b in
                   zip(cached["llama_cpp_tokens"], ids["sql"]))
    print(f"  tokenizer        {tok_same}/{N_PROMPTS} prompts tokenized alike")
    first = cached["answers"]["merged f32"][0]
    print("  first answer:", repr(tok.decode(first)))
    glue("gguf_agree_f32", gguf_agree["merged f32"], display=False)
    glue("gguf_agree_lora", gguf_agree["base + LoRA f32"], display=False)
    glue("gguf_agree_q8", gguf_agree["merged q8_0"], display=False)
    glue("gguf_n", N_PROMPTS, display=False)
    assert gguf_agree["merged f32"] >= N_PROMPTS - 1
    assert gguf_agree["base + LoRA f32"] >= N_PROMPTS - 1
    assert tok_same == N_PROMPTS

# %% tags=["nbval-ignore-output"]
if shipping.llama_cpp_available() and LLAMA:
    live = shipping.llama_cpp_answers(
        {"merged f32": gguf_files["f32"], "merged q8_0": gguf_files["q8_0"],
         "base + LoRA f32": (base_gguf, lora_gguf)},
        ids["sql"], MAX_NEW_TOKENS, eos_token_id=EOS)
    for label, rows in live.items():
        n = sum(a == b for a, b in zip(rows, hf_answers[label]))
        print(f"live llama.cpp {label:16} {n}/{N_PROMPTS} identical")
        assert label == "merged q8_0" or n >= N_PROMPTS - 1
else:
    print("llama-cpp-python is not installed here (or the model is not a"
          " Llama): live run skipped (pip install llama-cpp-python builds"
          " llama.cpp from source)")

# %% [markdown]
# f32 GGUF holds exactly the merged weights, and llama.cpp's greedy answers equal
# transformers' on this model. Q8_0 stores each block of 32 weights as 8-bit integers and
# one scale: a third of the f32 file, at the price of weights off by up to half a
# quantization step (the read-back gap above). On these questions it kept
# {glue:text}`gguf_agree_q8` of {glue:text}`gguf_n` answers; rounding shows first in long answers and near
# ties, so check a quantized file this way before shipping it.
# The LoRA GGUF file runs the *unmerged* road inside llama.cpp: base file plus adapter
# file, as `llama-cli -m base.gguf --lora sql-lora.gguf`.
#
# (claim-tgi)=
# ## TGI: the other server the sources name (shown, not run here)
#
# Hugging Face's Text Generation Inference ships as a container image for GPUs, so it
# does not run on this CPU machine. The equivalent of the vLLM server above:
#
# ```bash
# docker run --gpus all --shm-size 1g -p 127.0.0.1:8080:80 \
#     -v $PWD/data:/data ghcr.io/huggingface/text-generation-inference:latest \
#     --model-id /data/models/tiny-base \
#     --lora-adapters support=/data/adapters/support,sql=/data/adapters/sql \
#     --usage-stats off
# ```
#
# and a request picks the adapter with a field of the request body, not a header:
#
# ```bash
# curl 127.0.0.1:8080/generate -H 'Content-Type: application/json' \
#     -d '{"inputs": "<|user|>\nHow many users are there?\n<|assistant|>\n",
#          "parameters": {"adapter_id": "sql", "max_new_tokens": 40}}'
# ```
#
# What differs from vLLM, for a user:
# - **adapters are fixed at start-up** (`--lora-adapters` / `LORA_ADAPTERS`); TGI's
#   documentation shows no endpoint to load one into a running server, where vLLM has
#   `/v1/load_lora_adapter`;
# - **the adapter is chosen by `parameters.adapter_id`** on TGI's own `/generate` route
#   (the English source says "request headers"; its documentation shows a body field),
#   by `model` on vLLM's OpenAI routes;
# - **it binds 0.0.0.0 and reports usage statistics by default**: publish the port on
#   127.0.0.1 only and pass `--usage-stats off`;
# - it is a Docker image with GPU kernels, where vLLM is also a `pip install` (and has a
#   CPU build, which is why this book can run it).
#
# (claim-opt-miniature)=
# ## The English source's example, in miniature
#
# The English source trains `facebook/opt-350m` on a data set of quotes with LoRA on
# `q_proj` and `v_proj`. Neither the model nor the data can be downloaded here, so both
# are built locally at the same shape in miniature: an OPT model (the same architecture,
# with biases, learned positions and ReLU) with a few layers and random weights, the
# bundled tokenizer, and a "quotes" set made of the dialogue lines of the book's corpus.
# The configuration is the source's, word for word; its training arguments are written in
# today's TRL API (`SFTConfig` holds `dataset_text_field`, the tokenizer is the
# `processing_class`).

# %%
import datasets
from transformers import OPTConfig, OPTForCausalLM
from trl import SFTConfig, SFTTrainer

from lora_lab import sizing

lines = [q for t in data.load_corpus("validation")  # what characters say
         for q in t.split('"')[1::2] if 20 <= len(q) <= 90]
quotes = datasets.Dataset.from_list(
    [{"quote": q} for q in sorted(set(lines))[::4][:24]])
print(len(quotes), "quotes, e.g.", quotes[0]["quote"])
torch.manual_seed(SEED)
opt = OPTForCausalLM(OPTConfig(
    vocab_size=len(tok), hidden_size=64, ffn_dim=256, num_hidden_layers=2,
    num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=128,
    pad_token_id=tok.pad_token_id, bos_token_id=EOS, eos_token_id=EOS))
opt_dir = WORK / "opt-mini"  # stands in for "facebook/opt-350m"
opt.save_pretrained(opt_dir)

lora_config = LoraConfig(  # the English source's configuration
    r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"],
    lora_dropout=0.05, bias="none", task_type="CAUSAL_LM")
training_args = SFTConfig(  # its TrainingArguments, in today's TRL API
    output_dir=str(WORK / "lora_finetuned_model"), num_train_epochs=3,
    per_device_train_batch_size=4, logging_steps=50, learning_rate=2e-4,
    dataset_text_field="quote", max_length=64,
    # what this machine needs: no bf16 on a CPU, no logging service
    bf16=lora_lab.compute_dtype() == torch.bfloat16, report_to=[],
    optim=lora_lab.optimizer_name(), save_strategy="no", disable_tqdm=True,
    dataloader_pin_memory=False,
    seed=SEED)

# %% tags=["nbval-ignore-output"]
trainer = SFTTrainer(model=opt, processing_class=tok, args=training_args,
                     train_dataset=quotes, peft_config=lora_config)
trainer.model.print_trainable_parameters()
result = trainer.train()
trainer.save_model()
print(f"{result.global_step} steps, loss {result.training_loss:.3f}")

# %% [markdown]
# The same steps as the source: the adapter is saved (as `adapter_model.safetensors`
# today, not `.bin`), loaded onto a fresh base with `PeftModel.from_pretrained`, and
# used to generate from the source's own prompt. A random tiny OPT has nothing to say, so
# the check is on the plumbing: the reloaded adapter gives the trained model's output.

# %%
out_dir = Path(training_args.output_dir)
print(sorted(f.name for f in out_dir.iterdir() if f.is_file()))
base_model = AutoModelForCausalLM.from_pretrained(opt_dir)
model_with_lora = PeftModel.from_pretrained(base_model, out_dir).eval()
prompt = "The best way to predict the future is to"
inputs = tok(prompt, return_tensors="pt")
with torch.no_grad():
    a = trainer.model.eval().generate(**inputs, max_new_tokens=8,
                                      do_sample=False)
    b = model_with_lora.generate(**inputs, max_new_tokens=8, do_sample=False)
print(f"{result.global_step} steps of batch 4 (3 epochs of"
      f" {len(quotes)} quotes); reloaded adapter gives the same tokens:",
      torch.equal(a, b))
assert result.global_step == 3 * len(quotes) // 4
assert (out_dir / "adapter_model.safetensors").is_file()
assert torch.equal(a, b)

# %% [markdown]
# And the real thing, counted without downloading it: the source's configuration on the
# true shape of opt-350m (built on PyTorch's meta device from its public config).

# %%
print(sizing.trainable_line("opt-350m", 16, ["q_proj", "v_proj"]))
trainable, total = sizing.lora_counts("opt-350m", 16, ["q_proj", "v_proj"])
glue("opt_trainable", f"{trainable:,}", display=False)
glue("opt_share", 100 * trainable / total, display=False)
assert trainable == 24 * 2 * 16 * (1024 + 1024)  # 24 layers, q and v, r=16

# %% [markdown]
# To run the source's example for real on a GPU (Colab), change only the data and the
# model, and let `lora_lab` pick the precision and optimizer:
#
# ```python
# model_id = "facebook/opt-350m"
# model = AutoModelForCausalLM.from_pretrained(model_id)
# tokenizer = AutoTokenizer.from_pretrained(model_id)
# dataset = load_dataset("Abirate/english_quotes", split="train")
# training_args = SFTConfig(
#     output_dir="./lora_finetuned_model", num_train_epochs=3,
#     per_device_train_batch_size=4, logging_steps=50, learning_rate=2e-4,
#     dataset_text_field="quote",
#     bf16=lora_lab.compute_dtype() == torch.bfloat16,
#     fp16=lora_lab.compute_dtype() == torch.float16,
#     optim=lora_lab.optimizer_name())  # paged_adamw_8bit on a GPU
# trainer = SFTTrainer(model=model, processing_class=tokenizer,
#                      args=training_args, train_dataset=dataset,
#                      peft_config=lora_config)
# ```
#
# (claim-deployment-decision)=
# ## The decision, measured
#
# The English source compares the roads in a table of adjectives. Here is the table again,
# filled with what this book measured: this chapter's sizes, agreement counts and vLLM
# timings, and chapter 07b's throughput benchmark (`data/results/multi_adapter.json`, 16
# adapters in the request stream).

# %%
bench = json.loads((RESULTS_DIR / "multi_adapter.json").read_text())
at16 = next(r for r in bench["results"] if r["n_adapters"] == 16)["methods"]
at1 = next(r for r in bench["results"] if r["n_adapters"] == 1)["methods"]
base_mb = shipping.dir_bytes(merged_dir) / 1e6
adapter_mb = sizes["adapter (sql)"] / 1e6
rows = {
    "disk, 16 tasks (MB)": [16 * base_mb, base_mb + 16 * adapter_mb,
                            base_mb + 16 * adapter_mb,
                            base_mb + 16 * adapter_mb,
                            16 * sizes["GGUF q8_0"] / 1e6 if LLAMA else None],
    "tokens/s, 1 task": [at1["merged_single"]["tokens_per_s"],
                         at1["peft_set_adapter"]["tokens_per_s"],
                         at1["lora_lab_mixed"]["tokens_per_s"], None, None],
    "tokens/s, 16 tasks": [at16["merge_per_group"]["tokens_per_s"],
                           at16["peft_set_adapter"]["tokens_per_s"],
                           at16["lora_lab_mixed"]["tokens_per_s"], None, None],
}
cols = ["merged", "PEFT switch", "batched", "vLLM", "GGUF q8_0"]
print(f"{'':22}" + "".join(f"{c:>12}" for c in cols))
for label, values in rows.items():
    print(f"{label:22}" + "".join(
        f"{'-':>12}" if v is None else f"{v:>12.0f}" for v in values))
q8_agree = (f"{gguf_agree['merged q8_0']}/{N_PROMPTS}" if gguf_agree
            else "-")
agreement = [f"{same}/{len(prompts)}", "(ref.)", "(ref.)", "see above",
             q8_agree]
print(f"{'answers = reference':22}" + "".join(f"{a:>12}" for a in agreement))
disk, tps = rows["disk, 16 tasks (MB)"], rows["tokens/s, 16 tasks"]
glue("disk16_merged", disk[0], display=False)
glue("disk16_switched", disk[1], display=False)
glue("tps16_gain", tps[2] / tps[1], display=False)
assert disk[0] > 5 * disk[1] and tps[2] > 3 * tps[1]

# %% [markdown]
# Reading it, row by row:
# - **Disk**: one merged model per task grows with the tasks; the switched roads (PEFT,
#   the batched server, vLLM) store one base and small files. A q8_0 GGUF cuts each copy
#   to about a third, but a merged deployment is still a copy per task.
# - **Speed**: with one task the merged model is the fastest; with sixteen, batching
#   different adapters into one step (the batched server here, vLLM's kernels on a GPU)
#   wins by several times over switching one adapter at a time. vLLM's tokens/s on this
#   CPU are not comparable with the in-process numbers (its CPU build targets large
#   machines), so the cell is left empty rather than filled with a misleading number.
# - **Agreement**: every road gave the reference's answers on these questions (vLLM: see
#   its cell above); the 8-bit GGUF is the only road whose weights differ, and here its
#   answers did not.
# - **Operations**: vLLM loaded a new adapter into the running server in
#   {glue:text}`vllm_load_s:.2f` s, after a start-up of {glue:text}`vllm_startup_s:.0f` s;
#   a merged model needs a new deployment per task; TGI loads its adapters at start-up
#   only.
#
# The same choice as a flowchart:

# %%
fig, ax = plt.subplots(figsize=(7.2, 4.2))
ax.set_axis_off()
boxes = {
    "start": (0.5, 0.93, "an adapter is trained"),
    "q1": (0.5, 0.74, "one task, or many?"),
    "q2": (0.22, 0.52, "where does it run?"),
    "q3": (0.78, 0.52, "many requests at once?"),
    "merged": (0.1, 0.22, "merge_and_unload\n+ save_pretrained\n(transformers, "
               "vLLM, TGI)"),
    "gguf": (0.36, 0.22, "merge, convert\nto GGUF\n(llama.cpp, CPU)"),
    "switch": (0.64, 0.22,
               "one process:\nPEFT set_adapter /\nlora_lab registry"),
    "serve": (0.9, 0.22, "a server:\nvLLM (runtime load)\nor TGI (fixed set)"),
}
for key, (x, y, text) in boxes.items():
    leaf = key in ("merged", "gguf", "switch", "serve")
    ax.text(x, y, text, ha="center", va="center", fontsize=8,
            bbox={"boxstyle": "round,pad=0.4",
                  "fc": "#dbeafe" if leaf else "#f3f4f6", "ec": "#374151"})
edges = [("start", "q1", ""), ("q1", "q2", "one"), ("q1", "q3", "many"),
         ("q2", "merged", "GPU server"), ("q2", "gguf", "laptop / edge"),
         ("q3", "switch", "few, in-app"), ("q3", "serve", "many, high load")]
for a, b, label in edges:
    (x0, y0, _), (x1, y1, _) = boxes[a], boxes[b]
    ax.annotate("", xy=(x1, y1 + 0.07), xytext=(x0, y0 - 0.05),
                arrowprops={"arrowstyle": "->", "color": "#374151"})
    side = 0.05 * ((x1 > x0) - (x1 < x0))  # beside the arrow, not on it
    ax.text((x0 + x1) / 2 + side, (y0 + y1) / 2 + 0.01, label, fontsize=7,
            ha="center", color="#1d4ed8")
ax.set_xlim(0, 1)
ax.set_ylim(0.08, 1)
ax.set_title("Shipping a LoRA adapter: which road", fontsize=10)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Check yourself
#
# **1.** You `add_adapter` a fresh LoRA adapter and, before training it, switch to it. What
# does the model answer?
# (a) noise (b) exactly what the base model answers, because a fresh adapter's $B$ is zero
# (c) what the last adapter answered (d) nothing: it refuses until trained
#
# ```{admonition} Answer
# :class: dropdown
# (b): asserted token for token in the multi-adapter cell. A fresh patch is a no-op until
# training moves $B$.
# ```
#
# **2.** A colleague will serve your merged model from the folder you save. What must the
# folder hold besides the weights and the model config?
# (a) nothing else (b) the tokenizer and the generation config, so the server can turn text
# into ids and stop where the original stopped (c) the adapter file (d) the optimizer state
#
# ```{admonition} Answer
# :class: dropdown
# (b): the reload cell asserts both: the reloaded tokenizer gives the same ids, and the
# generation config keeps the end-of-text and padding tokens.
# ```
#
# **3.** You have sixteen tasks. Which road uses less disk and serves more tokens per second?
# (a) one merged model per task (b) one base plus an adapter per task, served in mixed
# batches (c) both the same (d) it depends only on the rank
#
# ```{admonition} Answer
# :class: dropdown
# (b): the decision table asserts over five times less disk and over three times the
# tokens/s of switching one adapter at a time. Merging pays off when there is one task.
# ```
#
# ## Summary
#
# - A merged checkpoint is a folder: weights, config, **tokenizer** and generation
#   config. Reloaded from disk it gave the unmerged adapter's greedy answers on
#   {glue:text}`merged_same` of {glue:text}`merged_n` questions, at
#   {glue:text}`merged_over_adapter:.0f` times the adapter's size. Run the pre-merge
#   checklist first: it refuses quantized bases and warns about half precision.
# - PEFT's `load_adapter` / `add_adapter` / `set_adapter` / `disable_adapter` /
#   `delete_adapter` and `lora_lab`'s registry give identical answers; a fresh adapter
#   equals the base until trained.
# - vLLM serves the base and every adapter by name through the OpenAI API (client or raw
#   HTTP), loads adapters at run time and refuses ranks above `--max-lora-rank`;
#   {glue:text}`vllm_agree` of its {glue:text}`vllm_total` answers matched PEFT's token for
#   token. Its start-up is mostly Python imports, one per process: run the model in the
#   engine process to save one.
# - GGUF is one file with tokenizer and tensors. Converting means renaming, reordering the
#   q/k rows for llama.cpp's RoPE, and choosing a precision; f32 reproduces transformers'
#   answers, q8_0 is a third of the size: check its answers the same way.
# - TGI: adapters fixed at start, `adapter_id` in the request body, a GPU container.
#
# ## Exercises
#
# 1. Save the merged model in bf16 (`merged.to(torch.bfloat16).save_pretrained(...)`) and
#    reload it. How big is the folder, and how many greedy answers still match?
# 2. Start the vLLM server without `--distributed-executor-backend uni` and
#    `VLLM_ENABLE_V1_MULTIPROCESSING=0`. Count the Python processes it starts
#    (`ps --ppid`), and time the start-up against this chapter's.
# 3. Write the merged model as GGUF `f16` and compare llama.cpp's (or, without it, the
#    read-back weights') gap with f32 and q8_0. Which tensors does `write_llama_gguf`
#    keep in f32 whatever you ask for, and why?
#
# ```{admonition} Solution 1
# :class: dropdown
# The weights file halves (bf16 stores two bytes per weight); the tokenizer files do not
# change. Rounding every weight to bf16 moves the logits a little, so
# answers can flip wherever two tokens were nearly tied; count them with `greedy` as the
# merged-reload cell does. It is the checklist's "half precision" warning, seen from the
# other side.
# ```
#
# ```{admonition} Solution 2
# :class: dropdown
# With the defaults the CPU build runs the API server, the engine core and one worker:
# three Python processes, each importing torch and vLLM. The two flags put the model in
# the engine core: two processes. The saving is one process's imports, so it is largest
# on a slow or busy machine (see `data/results/vllm_startup.json` for this book's runs and
# the load they ran under) and smaller on an idle one.
# ```
#
# ```{admonition} Solution 3
# :class: dropdown
# f16 gives a read-back gap well below q8_0's and a file half the size of f32 (the GGUF
# cell prints all three). The one-dimensional norm weights stay f32 in every file: they hold a few
# hundred numbers per layer and scale every activation, so rounding them would save
# almost nothing; llama.cpp's own converter keeps them in f32 as well.
# ```
