# %% [markdown]
# # 90 · Troubleshooting: eight problems learners hit
#
# The issue trackers of PEFT, TRL, vLLM, Unsloth and of LoRA courses show the same few
# problems again and again. This page reproduces eight of them on the bundled model, one
# cell each: first the error or the symptom, measured, then the fix, with an `assert` that
# it is fixed. Each section names a public issue thread where people hit it, and the
# chapter where it bites.
#
# | # | problem | what you see | where it bites |
# |---|---|---|---|
# | 1 | {ref}`TRL argument renames <trouble-trl>` | `TypeError: unexpected keyword argument` | {ref}`chapter 05 <claim-sfttrainer>` |
# | 2 | {ref}`merging a 4-bit model <trouble-4bit-merge>` | a warning, and a merged model that is not the one you trained | {ref}`chapter 06b <claim-4bit-merge>` |
# | 3 | {ref}`vLLM's max_lora_rank <trouble-vllm-rank>` | `LoRA rank 16 is greater than max_lora_rank 8` | {ref}`chapter 07b <claim-vllm>` |
# | 4 | {ref}`generation that never stops <trouble-eos>` | output runs to `max_new_tokens` | {ref}`chapter 05 <claim-sfttrainer>` |
# | 5 | {ref}`alpha vs alpha/r <trouble-alpha>` | an adapter r times too strong (or weak) | {ref}`chapter 04 <claim-alpha-fixed>` |
# | 6 | {ref}`parameter counts that look wrong <trouble-param-count>` | a 4-bit model counts far fewer weights than it has | {ref}`chapter 02 <claim-print-trainable>` |
# | 7 | {ref}`size mismatch after resizing the vocabulary <trouble-vocab>` | `RuntimeError: size mismatch for ...embed_tokens...` | {ref}`chapter 03 <claim-where-to-patch>` |
# | 8 | {ref}`adapter loaded but not applied <trouble-adapter-inactive>` | outputs identical to before loading | {ref}`chapter 07 <claim-multi-adapter>` |
#
# **Learning goals**
# - recognise each of the eight problems from its error message or its symptom;
# - apply the fix, and check with one line of code that it worked;
# - know which check to run before you ship: a merged model's logits, the stop token, the
#   scaling, the loaded adapter's effect.

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
# Parameters. The symptoms below are sized on the bundled model, so this page
# uses it even where LORA_LAB_BASE_MODEL names another; set BASE_MODEL to try
# yours (some asserts about sizes may then not hold).
BASE_MODEL = None  # None = the bundled tiny model; or a Hub id / path
SEED = 0
R, ALPHA = 8, 16  # LoRA rank and alpha of the demo adapters
MAX_NEW_TOKENS = 48  # generation budget in the stop-token section

# %%
import lora_lab  # first: it keeps known library noise out of outputs

import copy
import dataclasses
import inspect
import json
import re
import tempfile
import warnings
from pathlib import Path

import datasets
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    DataCollatorForLanguageModeling,
    TrainingArguments,
)
from trl import SFTConfig, SFTTrainer

from lora_lab import adapters, bnb_cpu, data, layers, models

datasets.disable_progress_bars()
transformers.utils.logging.disable_progress_bar()
lora_lab.seed_everything(SEED)
WORK = Path(tempfile.mkdtemp())  # adapters are written here
print(lora_lab.runtime.describe())

# %% [markdown]
# A few helpers used throughout: print an exception as its type and first line; a
# "trained-looking" PEFT adapter (PEFT starts $B$ at zero, so a fresh adapter changes
# nothing; here $B$ is drawn at random, as training would leave it); logits on a fixed
# prompt; and `above`, the mirror of `lora_lab.runtime.below`, which prints a large gap as
# "> bound" so that its CPU-dependent digits stay out of the stored output.

# %%
base, tok = models.load_base(BASE_MODEL or models.TINY_BASE_DIR)
DEVICE = base.device
question = data.load_task("support", "test")[0]["messages"][:1]
prompt = tok.apply_chat_template(question, add_generation_prompt=True,
                                 return_tensors="pt", return_dict=True)
prompt = prompt.to(DEVICE)


def show_error(err):
    """Print an exception as 'Type: first line of its message'."""
    print(f"{type(err).__name__}: {str(err).strip().splitlines()[0]}")


def random_adapter(model, seed, r=R, alpha=ALPHA, **extra):
    """A PEFT LoRA adapter on a copy of `model`, with B drawn at random."""
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear",
                        task_type="CAUSAL_LM", **extra)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    torch.manual_seed(seed)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return peft_model.eval()


@torch.no_grad()
def logits(model, batch=prompt):
    return model(**batch).logits.float()


def gap(a, b):
    return (a - b).abs().max().item()


def above(value, bound):
    """Print a gap known to be large as '> bound' (assert the value)."""
    assert value > bound, f"{value} is not above {bound}"
    return f"> {bound:g}"


below = lora_lab.runtime.below
print(f"prompt: {question[0]['content']!r}")

# %% [markdown]
# (trouble-trl)=
# ## 1. TRL argument renames
#
# **Symptom.** A tutorial's training script stops before training starts:
# `TypeError: SFTTrainer.__init__() got an unexpected keyword argument 'tokenizer'` (or
# `'max_seq_length'`, or `'dataset_text_field'`). TRL renamed `tokenizer` to
# `processing_class` (huggingface/trl#2162) and moved the data settings from the trainer
# into `SFTConfig`, where `max_seq_length` is now `max_length`; the Hugging Face course
# was still passing `max_seq_length=` to `SFTTrainer` in 2026 (huggingface/course#1171), and
# Unsloth users met the same error from `SFTConfig` (unslothai/unsloth#10785).
# transformers did the same to `TrainingArguments(evaluation_strategy=...)`, now
# `eval_strategy`. The old calls, against the installed versions:

# %%
rows = data.load_corpus("train")[:4]
text_ds = datasets.Dataset.from_dict({"text": rows})
old_calls = {
    "SFTTrainer(tokenizer=...)": lambda: SFTTrainer(
        model=base, train_dataset=text_ds, tokenizer=tok),
    "SFTTrainer(max_seq_length=...)": lambda: SFTTrainer(
        model=base, train_dataset=text_ds, max_seq_length=64),
    "SFTTrainer(dataset_text_field=...)": lambda: SFTTrainer(
        model=base, train_dataset=text_ds, dataset_text_field="text"),
    "SFTConfig(max_seq_length=...)": lambda: SFTConfig(
        output_dir=str(WORK / "x"), max_seq_length=64),
    "TrainingArguments(evaluation_strategy=...)": lambda: TrainingArguments(
        output_dir=str(WORK / "x"), evaluation_strategy="steps"),
}
failed = 0
for call, attempt in old_calls.items():
    try:
        attempt()
    except TypeError as err:
        failed += 1
        print(f"{call}\n    ", end="")
        show_error(err)
assert failed == len(old_calls)

# %% [markdown]
# **Fix.** Pass the tokenizer as `processing_class`, and the data settings to
# `SFTConfig`. When a tutorial's argument fails, ask the installed version instead of the
# tutorial: the trainer's signature and the config's fields list what it accepts.

# %%
renames = {  # old name and where tutorials pass it -> new name and place
    ("tokenizer", "SFTTrainer"): ("processing_class", "SFTTrainer"),
    ("max_seq_length", "SFTTrainer"): ("max_length", "SFTConfig"),
    ("dataset_text_field", "SFTTrainer"): ("dataset_text_field", "SFTConfig"),
    ("evaluation_strategy", "TrainingArguments"): (
        "eval_strategy", "TrainingArguments"),
}
accepts = {
    "SFTTrainer": set(inspect.signature(SFTTrainer.__init__).parameters),
    "SFTConfig": {f.name for f in dataclasses.fields(SFTConfig)},
    "TrainingArguments": {f.name
                          for f in dataclasses.fields(TrainingArguments)},
}
for (old, old_place), (new, place) in renames.items():
    print(f"{old_place}({old}=...)  ->  {place}({new}=...)")
    assert old not in accepts[old_place] and new in accepts[place]
config = SFTConfig(output_dir=str(WORK / "sft"), max_length=64,
                   dataset_text_field="text", eval_strategy="no",
                   bf16=lora_lab.compute_dtype() == torch.bfloat16,
                   report_to=[], max_steps=1)
trainer = SFTTrainer(model=copy.deepcopy(base), args=config,
                     train_dataset=text_ds, processing_class=tok)
assert trainer.processing_class is tok and trainer.args.max_length == 64
print("SFTTrainer built with the new names")

# %% [markdown]
# (trouble-4bit-merge)=
# ## 2. Merging a 4-bit model
#
# **Symptom.** After QLoRA training you call `merge_and_unload()` on the 4-bit model.
# Older PEFT refused with `ValueError: Cannot merge LORA layers when the model is loaded in
# 8-bit mode` (artidoro/qlora#16); current PEFT merges and warns "Merge lora module to 4-bit
# linear may get different generations due to rounding errors", which users reported as a
# bug (huggingface/peft#2321; the maintainer's answer: there is no way to avoid it). The
# merged layers are still 4-bit: PEFT dequantizes, adds the update and quantizes again,
# and the second rounding moves the model away from the one you trained. Reproduced: the
# bundled model loaded in NF4 (on a CPU, bitsandbytes' fp32 path, see
# {ref}`chapter 06 <claim-bnb-cpu-kernel>`), an adapter on top, merged.

# %%
base_path = models.resolve_base_name(BASE_MODEL or models.TINY_BASE_DIR)
nf4_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)


def load_4bit():
    model = AutoModelForCausalLM.from_pretrained(
        base_path, quantization_config=nf4_config, device_map={"": DEVICE})
    bnb_cpu.disable_cpu_repacking(model)  # the same numbers on every CPU
    return model.eval()


qlora = random_adapter(load_4bit(), seed=1)
qlora_dir = WORK / "qlora-adapter"
qlora.save_pretrained(qlora_dir)
trained = logits(qlora)  # the model you trained: 4-bit base + adapter
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    requantized = copy.deepcopy(qlora).merge_and_unload()
print(*sorted({str(w.message) for w in caught}), sep="\n")
layer = requantized.get_submodule("model.layers.0.mlp.up_proj")
print("merged layer:", type(layer).__name__)
print("max |logit change| from merging:",
      above(gap(logits(requantized), trained), 0.5))
assert type(layer).__name__ == "Linear4bit"

# %% [markdown]
# **Fix.** Merge into full-precision weights that equal the 4-bit ones: load the base
# 4-bit as in training, `dequantize()` it (transformers turns every `Linear4bit` back into
# an fp32 `nn.Linear`), then load the adapter and merge. The result computes what you
# trained, up to float rounding, at full-precision size. Merging into the *original*
# full-precision checkpoint, the other common recipe, gives a different model: the adapter
# was trained on top of the quantization error, which that checkpoint does not have.
# ({ref}`Chapter 06b <claim-4bit-merge>` weighs all three choices.)

# %%
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # transformers notes the dtype it used
    transformers.logging.set_verbosity_error()
    dequantized = load_4bit().dequantize()
    transformers.logging.set_verbosity_warning()
merged = PeftModel.from_pretrained(dequantized, qlora_dir).merge_and_unload()
original = PeftModel.from_pretrained(copy.deepcopy(base), qlora_dir)
original = original.merge_and_unload()
layer = merged.get_submodule("model.layers.0.mlp.up_proj")
print("merged layer:", type(layer).__name__, layer.weight.dtype)
print("dequantize, then merge: max |logit change|",
      below(gap(logits(merged), trained), 1e-4))
print("merge into the original checkpoint: max |logit change|",
      above(gap(logits(original), trained), 0.5))
assert isinstance(layer, torch.nn.Linear)
assert layer.weight.dtype == torch.float32
assert gap(logits(merged), trained) < 1e-4

# %% [markdown]
# (trouble-vllm-rank)=
# ## 3. vLLM's `max_lora_rank`
#
# **Symptom.** vLLM starts, then refuses the adapter: `ValueError: LoRA rank 64 is greater
# than max_lora_rank 16.` (vllm-project/vllm#2847; the same error in
# hiyouga/LlamaFactory#9512 and modelscope/ms-swift#4221). vLLM reserves its LoRA
# buffers at start-up for ranks up to `max_lora_rank` (`16` unless you say otherwise), and
# accepts only a fixed list of values for it. Reproduced with vLLM's own classes (no
# server needed): the configuration a server gets from `--max-lora-rank`, and the check
# its workers run on each adapter's `adapter_config.json`. (vLLM runs on Linux;
# elsewhere, on Colab too, this cell says so and skips.)

# %%
rank16_dir = WORK / "rank16-adapter"
random_adapter(base, seed=2, r=16, alpha=32).save_pretrained(rank16_dir)
VLLM_RANKS = [1, 8, 16, 32, 64, 128, 256, 320, 512]  # vllm/config/lora.py

# %% tags=["nbval-ignore-output"]
# vLLM is there on Linux; elsewhere (a Mac, Colab) this cell skips the check
try:
    import typing

    from vllm.config.lora import LoRAConfig as VLLMLoRAConfig
    from vllm.config.lora import MaxLoRARanks
    from vllm.lora.peft_helper import PEFTHelper
except ImportError:
    VLLMLoRAConfig = None
    print("vLLM is not installed here: check skipped (pip install vllm)")
if VLLMLoRAConfig is not None:
    positions = base.config.max_position_embeddings
    helper = PEFTHelper.from_local_dir(str(rank16_dir), positions)
    try:
        helper.validate_legal(VLLMLoRAConfig(max_lora_rank=8))
    except ValueError as err:
        show_error(err)
    try:
        VLLMLoRAConfig(max_lora_rank=12)
    except ValueError as err:
        print(str(err).splitlines()[2].split("[")[0].strip())
    helper.validate_legal(VLLMLoRAConfig(max_lora_rank=16))  # the fix
    print("max_lora_rank=16 accepts the rank-16 adapter")
    assert sorted(typing.get_args(MaxLoRARanks)) == VLLM_RANKS

# %% [markdown]
# **Fix.** Start the server with `--max-lora-rank` (or `LLM(..., max_lora_rank=...)`) at
# least the largest rank of any adapter it will serve, rounded up to an allowed value.
# Read the ranks from the adapters' own config files, `rank_pattern` included (it gives
# some layers another rank), rather than from memory. A larger setting costs memory for
# every LoRA slot, so do not simply take the maximum.

# %%
def max_lora_rank_for(*adapter_dirs):
    """The smallest vLLM max_lora_rank that serves every adapter given."""
    ranks = []
    for folder in adapter_dirs:
        config = json.loads((Path(folder) / "adapter_config.json").read_text())
        ranks += [config["r"], *config.get("rank_pattern", {}).values()]
    return next(v for v in VLLM_RANKS if v >= max(ranks))


setting = max_lora_rank_for(qlora_dir, rank16_dir)
print(f"vllm serve ... --enable-lora --max-lora-rank {setting}")
assert setting == 16

# %% [markdown]
# (trouble-eos)=
# ## 4. Generation that never stops
#
# **Symptom.** The fine-tuned model answers, then keeps going: it writes the user's next
# question, or repeats itself, until `max_new_tokens` runs out (unslothai/unsloth#416,
# huggingface/trl#734). Generation stops only when the model emits a token that
# `generate` was told to stop on, so three things must line up: the chat template ends
# the assistant's turn with an end token, training puts loss on that token, and
# `generate` stops on that same token. Break the last one, as when a model's generation
# config names a different end token than its chat template writes (Llama-3-style
# templates end a turn with one special token and a document with another):

# %%
end_text = tok.decode([tok.eos_token_id])
wrong_stop = tok.pad_token_id  # stand-in: a token the model never ends with
with torch.no_grad():
    out = base.generate(**prompt, max_new_tokens=MAX_NEW_TOKENS,
                        do_sample=False, eos_token_id=wrong_stop,
                        pad_token_id=tok.pad_token_id)
runaway = out[0, prompt["input_ids"].shape[1]:].tolist()
print(f"{len(runaway)} new tokens (the limit: {MAX_NEW_TOKENS});"
      f" {end_text!r} at position {runaway.index(tok.eos_token_id)},"
      " then more text")
assert len(runaway) == MAX_NEW_TOKENS
assert tok.eos_token_id in runaway[:-1]

# %% [markdown]
# **Fix, at generation time.** Take the stop token from the template itself, not from
# memory: render a short conversation and read which special token closes the
# assistant's turn, then stop on it (set `model.generation_config.eos_token_id` so that
# every later `generate` call and pipeline uses it).

# %%
turn = [{"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}]
rendered = tok.apply_chat_template(turn, tokenize=True, return_dict=True)
specials = [t for t in rendered["input_ids"] if t in tok.all_special_ids]
end_of_turn = specials[-1]  # the last special token: what closes the turn
with torch.no_grad():
    out = base.generate(**prompt, max_new_tokens=MAX_NEW_TOKENS,
                        do_sample=False, eos_token_id=end_of_turn,
                        pad_token_id=tok.pad_token_id)
answer = out[0, prompt["input_ids"].shape[1]:].tolist()
print(f"the template ends a turn with {tok.decode([end_of_turn])!r};"
      f" stopping on it: {len(answer)} new tokens")
assert answer[-1] == end_of_turn and len(answer) < MAX_NEW_TOKENS

# %% [markdown]
# **Fix, at training time.** The model must see loss on the end token, or it never learns
# to emit it. The classic way to lose it: a tokenizer without a pad token, the common
# workaround `tokenizer.pad_token = tokenizer.eos_token`, and transformers'
# `DataCollatorForLanguageModeling`, which masks every token equal to the pad token in
# the labels, so every real end token is masked too (huggingface/transformers#23530,
# huggingface/trl#976). Count the end tokens that carry loss in a batch, both ways:

# %%
texts = [tok.apply_chat_template(r["messages"], tokenize=False)  # end: eos
         for r in data.load_task("sql", "train")[:4]]
pad_is_eos = copy.deepcopy(tok)
pad_is_eos.pad_token = pad_is_eos.eos_token


def end_tokens_with_loss(tokenizer):
    """(end tokens in the real text, how many of them carry loss)."""
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    batch = collator([tokenizer(t) for t in texts])
    ends = (batch["input_ids"] == tok.eos_token_id) & (
        batch["attention_mask"] == 1)
    return int(ends.sum()), int((batch["labels"][ends] != -100).sum())


broken, fixed = end_tokens_with_loss(pad_is_eos), end_tokens_with_loss(tok)
print(f"pad = eos:         {broken[1]} of {broken[0]} end tokens carry loss")
print(f"pad = {tok.pad_token!r}: {fixed[1]} of {fixed[0]} end tokens"
      " carry loss")
assert broken[1] == 0 and fixed[1] == fixed[0] > 0

# %% [markdown]
# So give the tokenizer a pad token of its own (the bundled one has `<|pad|>`; many
# models ship a spare reserved token), or build the labels yourself from the attention
# mask. TRL's `SFTTrainer` with `assistant_only_loss=True` and a template that appends the
# end token keeps it in the loss ({ref}`chapter 05 <claim-sfttrainer>` checks this).
#
# (trouble-alpha)=
# ## 5. alpha vs alpha/r
#
# **Symptom.** An adapter behaves much stronger (or weaker) in one framework than in
# another, or a from-scratch implementation needs a learning rate r times smaller than
# PEFT's. The LoRA update is $\frac{\alpha}{r} BAx$ ({cite}`hu2021lora`; rsLoRA uses
# $\alpha/\sqrt{r}$). Implementations that multiply by $\alpha$ alone exist: a reader
# reported the missing rank in a popular from-scratch book (rasbt/LLMs-from-scratch#821;
# its PR #1080 later moved the code to alpha/rank), and mlx-vlm's trainer had it too
# ("8x scaling error with default settings", Blaizzy/mlx-vlm#845). The same $A$ and $B$,
# scaled both ways, in one layer:

# %%
patched = random_adapter(base, seed=3)
q_proj = "base_model.model.model.layers.0.self_attn.q_proj"
layer = patched.get_submodule(q_proj)
A = layer.lora_A["default"].weight  # [r, in]
B = layer.lora_B["default"].weight  # [out, r]
x = torch.randn(4, A.shape[1], generator=torch.Generator().manual_seed(0))
x = x.to(DEVICE)
with torch.no_grad():
    peft_update = layer(x) - layer.base_layer(x)
    alpha_only = ALPHA * (x @ A.T @ B.T)  # the "missing /r" version
ratio = (alpha_only.norm() / peft_update.norm()).item()
print(f"PEFT scaling: {layer.scaling['default']} = alpha/r = {ALPHA}/{R}")
print(f"alpha-only update / PEFT update: {ratio:.3f} (= r)")
for module in patched.modules():  # the whole model with alpha-only scaling
    if isinstance(module, LoraLayer):
        module.set_scale("default", R)  # scaling = R * alpha / r = alpha
alpha_only_logits = logits(patched)
for module in patched.modules():
    if isinstance(module, LoraLayer):
        module.set_scale("default", 1)  # back to alpha / r
print("whole model, alpha-only vs alpha/r: max |logit gap|",
      above(gap(alpha_only_logits, logits(patched)), 1.0))
assert abs(ratio - R) < 1e-3

# %% [markdown]
# **Fix.** Know which convention each tool uses, and convert when you move an adapter:
# PEFT, vLLM and `lora_lab` scale by $\alpha/r$ (by $\alpha/\sqrt{r}$ with
# `use_rslora=True`). To load an adapter trained with alpha-only scaling into PEFT, write
# `lora_alpha` = $\alpha \cdot r$ into its config; the same $A$ and $B$ then give the
# same outputs. And remember that at a fixed $\alpha$, raising $r$ shrinks the scale
# ({ref}`chapter 04 <claim-alpha-fixed>`).

# %%
for r in (8, 16, 64):
    print(f"r={r:3}  alpha/r={layers.lora_scaling(r, ALPHA):.4f}"
          f"  alpha/sqrt(r)={layers.lora_scaling(r, ALPHA, True):.4f}")
assert layers.lora_scaling(R, ALPHA) == layer.scaling["default"]
converted = LoraConfig(r=R, lora_alpha=ALPHA * R, target_modules="all-linear")
ported = get_peft_model(copy.deepcopy(base), converted)
ported.load_state_dict(patched.state_dict())  # the same A and B
ported_layer = ported.get_submodule(q_proj)
with torch.no_grad():
    ported_update = ported_layer(x) - ported_layer.base_layer(x)
print(f"lora_alpha = {ALPHA} x {R} = {ALPHA * R}: update matches the"
      " alpha-only one:", below(gap(ported_update, alpha_only), 1e-4))
assert gap(ported_update, alpha_only) < 1e-4
assert gap(logits(ported.eval()), alpha_only_logits) < 1e-3

# %% [markdown]
# The three conventions against the rank, at the same $\alpha$: the alpha-only scale stays
# flat while $\alpha/r$ falls, so the gap between them is $r$ itself and grows with every
# doubling of the rank. An adapter moved between the two conventions without converting is
# off by exactly that factor.

# %%
import matplotlib.ticker

from lora_lab import plot

ranks = [1, 2, 4, 8, 16, 32, 64]
conventions = {
    "alpha alone (the bug)": [float(ALPHA)] * len(ranks),
    "alpha / sqrt(r) (rsLoRA)": [layers.lora_scaling(r, ALPHA, True)
                                 for r in ranks],
    "alpha / r (PEFT, vLLM, lora_lab)": [layers.lora_scaling(r, ALPHA)
                                         for r in ranks],
}
gaps = [a / b for a, b in zip(conventions["alpha alone (the bug)"],
                              conventions["alpha / r (PEFT, vLLM, lora_lab)"])]
assert all(abs(g - r) < 1e-9 for g, r in zip(gaps, ranks))
fig, (ax,) = plot.new_figure(width=6.0, height=3.4)
for label, scale in conventions.items():
    ax.plot(ranks, scale, marker="o", markersize=4, label=label)
ax.set_xscale("log", base=2)
ax.set_yscale("log", base=2)
ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
ax.set_xticks(ranks, [str(r) for r in ranks])
ax.set_xlabel("r")
ax.set_ylabel("scale applied to BAx")
ax.set_title(f"the patch's scale at alpha = {ALPHA}")
ax.legend(loc="lower left")
fig

# %% [markdown]
# (trouble-param-count)=
# ## 6. Trainable-parameter counts that look wrong
#
# **Symptom.** Counting the parameters of a 4-bit model gives far fewer than the model
# has, and `print_trainable_parameters` disagrees with your own arithmetic. Two causes.
# First, bitsandbytes stores two 4-bit values per byte in a `uint8` tensor of half the
# length, so `p.numel()` counts each packed weight matrix at half its size; old PEFT
# versions and notebooks printed those halved totals (huggingface/peft#1020, fixed by
# PEFT PR #733; artidoro/qlora#260). Second, PEFT's `trainable%` divides by all
# parameters *including* the adapter's. The 4-bit model from section 2, counted naively:

# %%
fp32_total = sum(p.numel() for p in base.parameters())
naive_total = sum(p.numel() for p in qlora.parameters())
packed = qlora.get_submodule("base_model.model.model.layers.0.mlp.up_proj")
packed = packed.base_layer.weight
print(f"up_proj weight as stored: {tuple(packed.shape)} {packed.dtype}"
      f" ({type(packed).__name__}),"
      f" holding {packed.quant_state.shape.numel():,} weights")
trainable = sum(p.numel() for p in qlora.parameters() if p.requires_grad)
print(f"naive count of the 4-bit model + adapter: {naive_total:,}")
print(f"the fp32 model alone has {fp32_total:,}")
assert naive_total - trainable < fp32_total
assert packed.numel() * 2 == packed.quant_state.shape.numel()

# %% [markdown]
# **Fix.** Count a packed 4-bit weight as twice its `numel()` (as PEFT does since v0.5.0,
# and transformers' `num_parameters()`), or count on the full-precision model. And read
# `trainable%` as a share of base plus adapter.

# %%
def count_parameters(model):
    """(trainable, all), counting packed 4-bit weights at their real size."""
    all_params = trainable = 0
    for p in model.parameters():
        n = p.numel()
        if type(p).__name__ == "Params4bit":
            n *= 2 * p.element_size()  # two 4-bit values per byte of storage
        all_params += n
        trainable += n if p.requires_grad else 0
    return trainable, all_params


ours = count_parameters(qlora)
peft_count = qlora.get_nb_trainable_parameters()
print(f"trainable {ours[0]:,} of {ours[1]:,}:"
      f" {100 * ours[0] / ours[1]:.4f}% (PEFT's trainable%),"
      f" {100 * ours[0] / fp32_total:.4f}% of the base alone")
assert ours == peft_count and ours[1] == fp32_total + ours[0]
assert qlora.get_base_model().num_parameters() == ours[1]  # transformers

# %% [markdown]
# The same two effects explain most of the puzzling `print_trainable_parameters` lines in
# tutorials: {ref}`chapter 05 <claim-sfttrainer>` counts Llama-2-7B exactly (its trainable
# share at r=16 on every linear layer), and the {doc}`claims ledger <../reference/claims>` lists
# the figures that do not add up.
#
# (trouble-vocab)=
# ## 7. Size mismatch after resizing the vocabulary
#
# **Symptom.** Training added tokens (new special tokens, a chat format: TRL's
# `setup_chat_format` does both, huggingface/peft#1932) and resized the embeddings.
# Loading the adapter onto a fresh base fails:
# `RuntimeError: Error(s) in loading state_dict ... size mismatch for ...embed_tokens...`
# (huggingface/peft#2415, "size mismatch for lm_head when finetune QWEN2.5"; the same in
# axolotl-ai-cloud/axolotl#2277). Because the vocabulary changed, PEFT saves the whole
# embedding and output layers with the adapter, at the new size:

# %%
tok_new = copy.deepcopy(tok)
tok_new.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
grown = copy.deepcopy(base)
grown.resize_token_embeddings(len(tok_new), mean_resizing=False)
vocab_config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear",
                          modules_to_save=["embed_tokens", "lm_head"],
                          task_type="CAUSAL_LM")
vocab_model = get_peft_model(grown, vocab_config).eval()
vocab_dir = WORK / "vocab-adapter"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    vocab_model.save_pretrained(vocab_dir)
print(*sorted({str(w.message) for w in caught}), sep="\n")
saved = load_file(vocab_dir / "adapter_model.safetensors")
embed_key = "base_model.model.model.embed_tokens.weight"
print(f"{len(tok)} -> {len(tok_new)} tokens; saved {embed_key}:"
      f" {list(saved[embed_key].shape)}")
try:
    PeftModel.from_pretrained(copy.deepcopy(base), vocab_dir)
    mismatch = False
except RuntimeError as err:
    mismatch = True
    show_error(err)
    line = str(err).splitlines()[1].strip()
    shapes = re.findall(r"torch.Size\((\[[^\]]*\])\)", line)
    print(" ", line.split(": copying")[0])
    print(f"  checkpoint {shapes[0]}, model {shapes[1]}")
assert mismatch

# %% [markdown]
# **Fix.** Load the tokenizer saved with the adapter, resize the fresh base to its length,
# then load the adapter. (`ignore_mismatched_sizes=True` is not a fix: it skips the
# mismatched tensors and leaves the new tokens untrained.)

# %%
fresh = copy.deepcopy(base)
fresh.resize_token_embeddings(len(tok_new), mean_resizing=False)
reloaded = PeftModel.from_pretrained(fresh, vocab_dir).eval()
new_id = tok_new.convert_tokens_to_ids("<|tool|>")
probe = {"input_ids": torch.tensor([[new_id, *prompt["input_ids"][0]]]
                                   ).to(DEVICE)}
print("embedding rows:", reloaded.get_input_embeddings().weight.shape[0],
      "| reloaded vs trained logits:",
      below(gap(logits(reloaded, probe), logits(vocab_model, probe)), 1e-5))
assert gap(logits(reloaded, probe), logits(vocab_model, probe)) < 1e-5

# %% [markdown]
# (trouble-adapter-inactive)=
# ## 8. Adapter loaded but not applied
#
# **Symptom.** The adapter loads without an error, yet the outputs are exactly what they
# were before. Two common ways. (a) `load_adapter` adds an adapter but does not switch to
# it: the active adapter is still the first one (huggingface/peft#515 reports the
# symptom; loading and switching several adapters trips people up, huggingface/peft#1574,
# and PEFT's troubleshooting guide gained a section on using several adapters, PR #2763).
# (b) The file's tensor names do not match the model's layers (another base model, a
# renamed module, a different `adapter_name`); PEFT only *warns* "Found missing adapter
# keys", leaves those layers at their initial $B = 0$, and the model computes the base
# model (huggingface/peft#2566, #2699).

# %%
support_dir, sql_dir = WORK / "support", WORK / "sql"
random_adapter(base, seed=4).save_pretrained(support_dir)
random_adapter(base, seed=5).save_pretrained(sql_dir)
model = PeftModel.from_pretrained(copy.deepcopy(base), support_dir).eval()
before = logits(model)
model.load_adapter(sql_dir, adapter_name="sql")
print(f"(a) after load_adapter('sql'): active adapter {model.active_adapter!r},"
      " outputs changed by", gap(logits(model), before))
assert model.active_adapter == "default" and gap(logits(model), before) == 0

state = load_file(sql_dir / "adapter_model.safetensors")
renamed = WORK / "renamed"
renamed.mkdir()
(renamed / "adapter_config.json").write_text(
    (sql_dir / "adapter_config.json").read_text())
save_file({k.replace(".model.layers.", ".model.blocks."): v
           for k, v in state.items()},
          renamed / "adapter_model.safetensors", metadata={"format": "pt"})
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    silent = PeftModel.from_pretrained(copy.deepcopy(base), renamed).eval()
missing = [str(w.message) for w in caught
           if "missing adapter" in str(w.message)]
print(f"(b) PEFT warns: {missing[0].split(':')[0]}"
      f" ({missing[0].count('lora_')} of them)")
print("(b) loaded adapter vs base model: max |logit gap|",
      gap(logits(silent), logits(base)))
assert gap(logits(silent), logits(base)) == 0

# %% [markdown]
# **Fix.** (a) Activate what you loaded: `set_adapter(name)` (or load with
# `PeftModel.from_pretrained` when there is only one). (b) Treat the missing-keys warning
# as an error, or load with a loader that refuses (`lora_lab.adapters.load_adapter` names
# the layer it cannot place). In both cases the check that catches it is one line: the
# outputs with the adapter must differ from the outputs with it switched off.

# %%
model.set_adapter("sql")
alone = PeftModel.from_pretrained(copy.deepcopy(base), sql_dir).eval()
print(f"(a) after set_adapter('sql'): active {model.active_adapter!r}; same"
      " logits as the sql adapter alone:",
      below(gap(logits(model), logits(alone)), 1e-5))
assert gap(logits(model), logits(alone)) < 1e-5


def adapter_changes_outputs(peft_model):
    """The one-line check: does the active adapter change the logits?"""
    with peft_model.disable_adapter():
        off = logits(peft_model)
    return gap(logits(peft_model), off) > 0


with warnings.catch_warnings():  # a missing-keys warning stops the load
    warnings.filterwarnings("error", message="Found missing adapter keys")
    try:
        PeftModel.from_pretrained(copy.deepcopy(base), renamed)
    except UserWarning as err:
        print("(b) as an error: UserWarning:", str(err).split(":")[0])
try:
    adapters.load_adapter(copy.deepcopy(base), renamed)
except ValueError as err:
    print("(b) lora_lab refuses: ValueError: the adapter ... has")
    print("   ", str(err).split(" has ", 1)[1].split(";")[0])
print("adapter changes outputs: sql", adapter_changes_outputs(model),
      "| renamed file", adapter_changes_outputs(silent))
assert adapter_changes_outputs(model) and not adapter_changes_outputs(silent)

# %% [markdown]
# ## Check yourself
#
# **1.** An adapter loads without an error, and you suspect it does nothing. What is the
# one-line check?
# (a) the file size (b) the outputs with the adapter on must differ from the outputs with it
# switched off (c) the trainable count (d) the training loss
#
# ```{admonition} Answer
# :class: dropdown
# (b): an adapter that was loaded but not activated, or whose tensor names missed every
# layer, computes exactly the base model (asserted in section 8). Only the outputs show it.
# ```
#
# **2.** The same adapter is r times too strong in one tool. What is the likely cause?
# (a) a different dtype (b) one tool scales the update by $\alpha/r$, the other by $\alpha$
# alone (c) a different tokenizer (d) dropout left on
#
# ```{admonition} Answer
# :class: dropdown
# (b): convert when you move it; writing `lora_alpha` as $\alpha \cdot r$ into PEFT's config
# reproduces the alpha-only update (asserted in section 5).
# ```
#
# **3.** You trained QLoRA on a 4-bit base and want one full-precision merged model that
# computes what you trained. Which base do you merge into?
# (a) the 4-bit model itself (b) the original full-precision checkpoint (c) the 4-bit base
# after `dequantize()`, which equals the weights the adapter was trained on (d) any base of
# the same shape
#
# ```{admonition} Answer
# :class: dropdown
# (c): the adapter was trained on top of the quantization error, so only the dequantized
# weights match it (asserted in section 2). Merging into the 4-bit model rounds a second
# time; the original checkpoint lacks the error the adapter learned around.
# ```
#
# ## Summary
#
# | # | symptom | fix | the check |
# |---|---|---|---|
# | 1 | `TypeError: unexpected keyword argument` | `processing_class`; data settings in `SFTConfig` (`max_length`) | the installed signature |
# | 2 | 4-bit merge warns; merged model differs | `dequantize()`, then merge | merged logits = unmerged 4-bit logits |
# | 3 | `LoRA rank 16 is greater than max_lora_rank 8` | `--max-lora-rank` ≥ every adapter's `r` and `rank_pattern` | read the ranks from `adapter_config.json` |
# | 4 | output runs to `max_new_tokens` | stop on the template's end-of-turn token; pad ≠ eos | end tokens carry loss; `generate` stops |
# | 5 | adapter r times too strong or weak | know $\alpha/r$ vs $\alpha$; convert `lora_alpha` | same update in both tools |
# | 6 | 4-bit model counts too few weights; odd `trainable%` | count each packed byte as two weights; share of base + adapter | equals the fp32 count |
# | 7 | `size mismatch for ...embed_tokens...` | resize the fresh base to the saved tokenizer first | logits equal the trained model's |
# | 8 | outputs unchanged after loading | `set_adapter`; treat missing keys as an error | adapter on ≠ adapter off |
#
# ## Exercises
#
# 1. In section 4, set `pad_is_eos.padding_side = "right"` and count again. Does the
#    number of end tokens that carry loss change? Why?
# 2. In section 3, add `rank_pattern={"q_proj": 64}` to the rank-16 adapter's config.
#    What does `max_lora_rank_for` return, and would vLLM's default (`max_lora_rank=16`) accept it?
#
# ```{admonition} Solution 1
# :class: dropdown
# No: none of them carries loss. The collator masks by *value* (every token equal to the pad token), not
# by position, so the real end tokens are masked wherever the padding goes. Only a pad
# token different from the end token, or labels built from the attention mask, keep them.
# ```
#
# ```{admonition} Solution 2
# :class: dropdown
# Rank 64: the largest rank in the file is the pattern's. vLLM's `validate_legal` takes the
# maximum over `r` and `rank_pattern` too, so a server at the default (`16`) refuses it with
# "LoRA rank 64 is greater than max_lora_rank 16".
# ```
