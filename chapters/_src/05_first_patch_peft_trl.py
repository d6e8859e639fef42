# %% [markdown]
# # 05 · Your first patch with PEFT and TRL
#
# So far LoRA Lab has built every piece of LoRA by hand. Most projects use Hugging Face's
# PEFT library for the adapter and TRL for the training loop. This chapter runs the
# workflow the seed documents teach, written for today's library versions, on the bundled
# model: configure, wrap, train two ways, save, reload, generate. Where the sources' code
# no longer runs, a cell shows the old call failing and the form that works now.
#
# **Learning goals**
# - wrap a model with `LoraConfig` and `get_peft_model` and read
#   `print_trainable_parameters`;
# - train an adapter by continued pretraining (`Trainer`) and by instruction tuning with
#   the loss on the assistant's turns only (TRL's `SFTTrainer`);
# - save, reload and generate, and know which `SFTTrainer` arguments moved;
# - check that a PEFT adapter and a `lora_lab` adapter are the same thing on disk.

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
R, ALPHA = 8, 16  # LoRA rank and alpha (alpha = 2r, chapter 04)
CPT_STEPS = 3  # path 1: continued-pretraining steps
SFT_STEPS = 4  # path 2: instruction-tuning steps
BATCH_SIZE = 4
MAX_LENGTH = 96  # tokens per example
LR = 2e-3

# %%
import lora_lab  # first: it keeps known library noise out of outputs

import contextlib
import io
import tempfile
from pathlib import Path

import datasets
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)
from trl import SFTConfig, SFTTrainer

from lora_lab import adapters, data, models, payoff, sizing, train
from lora_lab.prose import glue

import accelerate
import trl

glue("trl_version", trl.__version__)

datasets.disable_progress_bars()
lora_lab.seed_everything(SEED)
WORK = Path(tempfile.mkdtemp())  # adapters are written here
print(lora_lab.runtime.describe())

# %% [markdown]
# ## Configure and wrap
#
# A `LoraConfig` says where the patch goes and how big it is: rank `r`, the scale
# `lora_alpha` (the update is multiplied by `lora_alpha / r`, {cite}`hu2021lora`), and the
# `target_modules`. `"all-linear"` patches every linear layer except the output head.
# `get_peft_model` freezes the base, inserts the LoRA layers and returns a `PeftModel`.
#
# The Chinese source calls the `LoraConfig` the patch manifest: the list of what to patch
# and how, which `save_pretrained` later writes next to the weights as
# `adapter_config.json`. And `get_peft_model` applies it by monkey-patching: it swaps each
# targeted layer of the live model for a LoRA wrapper around it, so the `base` object
# itself now carries the patch (the second cell below checks it).

# %%
base, tok = models.load_base(BASE_MODEL)
lora_config = LoraConfig(
    r=R,
    lora_alpha=ALPHA,
    lora_dropout=0.0,
    target_modules="all-linear",
    task_type="CAUSAL_LM",
)
model = get_peft_model(base, lora_config)
model.print_trainable_parameters()

# %%
trainable, total = model.get_nb_trainable_parameters()
n_base = sum(p.numel() for p in base.parameters() if not p.requires_grad)
assert total == n_base + trainable
assert trainable == models.count_parameters(model, trainable_only=True)
# patched in place: the object we loaded now holds LoRA layers
assert any(type(m).__module__.startswith("peft.tuners.lora")
           for m in base.modules())
print(f"{trainable / total:.2%} of the weights train")
glue("tiny_millions", total / 1e6, ".1f")
glue("tiny_share", trainable / total, ".1%")

# %% [markdown]
# On a {glue:text}`tiny_millions`-million-parameter model this patch is
# {glue:text}`tiny_share` of the weights. On a
# real model the share is far smaller. `sizing.meta_model` builds Llama-2-7B on PyTorch's
# `meta` device (shapes, no storage), and PEFT counts it like any other model.

# %%
llama_7b = sizing.meta_model("llama-2-7b")
config_7b = LoraConfig(
    r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"
)
buffer = io.StringIO()
with contextlib.redirect_stdout(buffer):
    get_peft_model(llama_7b, config_7b).print_trainable_parameters()
line_7b = buffer.getvalue().strip()
print(line_7b)
assert line_7b == (
    "trainable params: 39,976,960 || all params: 6,778,392,576"
    " || trainable%: 0.5898"
)
share_7b = float(line_7b.rsplit(" ", 1)[1])
cfg_7b = llama_7b.config
glue("llama_layers", cfg_7b.num_hidden_layers)
glue("llama_width", cfg_7b.hidden_size, "d")
qv_trainable, qv_total = sizing.lora_counts("llama-2-7b", 16,
                                           ["q_proj", "v_proj"])
glue("qv_7b", qv_trainable)
glue("qv_7b_share", qv_trainable / qv_total, ".2%")
glue("qv_7b_total_b", qv_total / 1e9, ".2f")
glue("share_7b", share_7b / 100, ".2%")
glue("trainable_7b", int(line_7b.split()[2].replace(",", "")))

# %% [markdown]
# PEFT prints {glue:text}`trainable_7b` trainable parameters for this setting,
# {glue:text}`share_7b` of the weights. Neither source prints this line: the Chinese source
# prints the same trainable count with a different total and "trainable%: 0.1287", which
# matches no standard configuration (chapter 02 checks it; ledger claim 2).
#
# ## Path 1: continued pretraining with `Trainer`
#
# Continued pretraining feeds plain text and predicts every next token. transformers'
# `DataCollatorForLanguageModeling(mlm=False)` pads a batch and copies `input_ids` into
# `labels` (with padding set to -100, which the loss skips). The optimizer name comes from
# `lora_lab.optimizer_name()`: `paged_adamw_8bit` on a GPU, `adamw_torch` on a CPU.

# %%
corpus = data.load_corpus("train")[: BATCH_SIZE * CPT_STEPS]
text_ds = datasets.Dataset.from_dict({"text": corpus}).map(
    lambda b: tok(b["text"], truncation=True, max_length=MAX_LENGTH),
    batched=True,
    remove_columns=["text"],
)
collator = DataCollatorForLanguageModeling(tok, mlm=False)
batch = collator([text_ds[i] for i in range(BATCH_SIZE)])
pad = batch["attention_mask"] == 0
assert (batch["labels"][pad] == -100).all()
assert torch.equal(batch["labels"][~pad], batch["input_ids"][~pad])
print(f"batch {tuple(batch['input_ids'].shape)}, "
      f"{int(pad.sum())} padded positions ignored by the loss")


# %% tags=["nbval-ignore-output"]
def arguments(cls, out, steps, **extra):
    """The same training arguments for both paths (cls: TrainingArguments
    or SFTConfig)."""
    return cls(
        output_dir=str(WORK / out),
        max_steps=steps,
        per_device_train_batch_size=BATCH_SIZE,
        learning_rate=LR,
        optim=lora_lab.optimizer_name(),
        # bf16 only where the GPU has it: TRL's SFTConfig defaults to bf16=True,
        # which a CPU emulates (5x slower per step, measured on this model)
        bf16=lora_lab.compute_dtype() == torch.bfloat16,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=SEED,
        dataloader_pin_memory=False,
        **extra,
    )


cpt = Trainer(
    model=model,
    args=arguments(TrainingArguments, "cpt", CPT_STEPS),
    train_dataset=text_ds,
    data_collator=collator,
)
_ = cpt.train()  # the Trainer logs each step (timings vary)

# %%
cpt_losses = [h["loss"] for h in cpt.state.log_history if "loss" in h]
assert len(cpt_losses) == CPT_STEPS
assert cpt.args.optim == lora_lab.optimizer_name()
if lora_lab.models.is_bundled(BASE_MODEL):  # it was pretrained on this corpus
    assert max(cpt_losses) < 1.0
print(f"{len(cpt_losses)} steps, loss below 1 throughout")

# %% [markdown]
# The corpus is the text the bundled model was pretrained on, so its loss starts low: this
# path is for teaching a model a new domain's text, and a few steps only show the mechanics.
#
# ## Path 2: instruction tuning with TRL's `SFTTrainer`
#
# Chat data is a list of messages per example. TRL renders them with the tokenizer's chat
# template. With `assistant_only_loss=True` the loss covers only the assistant's turns, which
# needs a template that marks them with `{% generation %}` ... `{% endgeneration %}`. The
# bundled tokenizer's template has those markers. Many templates do not; for those, split
# each chat into a `prompt` (every turn but the last) and a `completion` (the answer), and
# TRL computes the loss on the completion only:

# %%
template = tok.chat_template or ""
MARKED = "{% generation %}" in template and "{% endgeneration %}" in template
sql_rows = data.load_task("sql", "train")[: BATCH_SIZE * SFT_STEPS]
if MARKED:
    chat_ds = datasets.Dataset.from_list([{"messages": r["messages"]}
                                          for r in sql_rows])
    loss_option = {"assistant_only_loss": True}
else:  # no markers: prompt / completion pairs
    chat_ds = datasets.Dataset.from_list(
        [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]}
         for r in sql_rows])
    loss_option = {"completion_only_loss": True}
assert MARKED or not lora_lab.models.is_bundled(BASE_MODEL)
print(tok.apply_chat_template(sql_rows[0]["messages"], tokenize=False))

# %% [markdown]
# `SFTTrainer` takes the base model and the `LoraConfig` and wraps the model itself. The
# tokenizer goes in as `processing_class`, and the sequence length as `SFTConfig`'s
# `max_length`.

# %% tags=["nbval-ignore-output"]
base_sft, _ = models.load_base(BASE_MODEL)
lora_lab.seed_everything(SEED)
sft = SFTTrainer(
    model=base_sft,
    args=arguments(
        SFTConfig,
        "sft",
        SFT_STEPS,
        max_length=MAX_LENGTH,
        **loss_option,
    ),
    train_dataset=chat_ds,
    processing_class=tok,
    peft_config=lora_config,
)
_ = sft.train()

# %% [markdown]
# Check what the loss sees: in a training batch, the tokens whose label is not -100 decode
# to exactly the assistant's answer and its end-of-text token.

# %%
sft_losses = [h["loss"] for h in sft.state.log_history if "loss" in h]
batch = next(iter(sft.get_train_dataloader()))
ids, labels = batch["input_ids"][0], batch["labels"][0]
target = tok.decode(ids[labels != -100])
answers = {r["messages"][1]["content"] + tok.eos_token for r in sql_rows}
if MARKED:  # exactly the answer and its end token
    assert target in answers
else:  # the answer, in whatever the template wraps around it
    assert any(r["messages"][1]["content"] in target for r in sql_rows)
assert isinstance(sft.model, PeftModel)
assert len(sft_losses) == SFT_STEPS
print(f"loss on: {target!r}")
print(f"{(labels != -100).sum().item()} of {labels.numel()} tokens"
      " in this example carry loss")

# %% [markdown]
# Each logged loss is one batch of four different rows, so four of them go up and down
# with the rows. To see whether training helped, score the same rows before and after:
# the answer-only loss on all of the training rows, with the adapter switched off (the
# base model) and on.

# %%
rows = train.collate([train.encode_example(tok, r, MAX_LENGTH)
                      for r in sql_rows], tok.pad_token_id)
rows = {k: v.to(sft.model.device) for k, v in rows.items()}
with torch.no_grad():
    with sft.model.disable_adapter():
        loss_before = sft.model(**rows).loss.item()
    loss_after = sft.model(**rows).loss.item()
print(f"{SFT_STEPS} steps, loss on the {len(sql_rows)} training rows: "
      f"{loss_before:.2f} before, {loss_after:.2f} after")
assert loss_after < loss_before

# %% [markdown]
# Both paths on one picture. Left, the loss each trainer logged, one batch per step: path 1
# starts low because the model was pretrained on that corpus, and path 2's line moves with
# the rows of each batch. Right, the measure that settles it: the answer-only loss on all of
# path 2's training rows with the adapter off and on.

# %%
from lora_lab import plot

fig, (ax_steps, ax_rows) = plot.new_figure(ncols=2, width=4.2, height=3.2)
plot.plot_loss_curves(
    [{"label": "path 1: Trainer, corpus", "losses": cpt_losses},
     {"label": "path 2: SFTTrainer, sql chats", "losses": sft_losses}],
    ax=ax_steps, title="logged loss, one batch per step")
ax_steps.set_xticks(range(1, max(CPT_STEPS, SFT_STEPS) + 1))
ax_steps.set_ylabel("loss of the step's batch")  # path 1: every token
ax_steps.legend(loc="center right")  # the space between the two lines
plot.plot_bars(["adapter off", "adapter on"], [loss_before, loss_after],
               ax=ax_rows, title="path 2: loss on all its training rows",
               ylabel="loss (answer tokens)")
for label in ax_rows.get_xticklabels():  # short labels: no slant needed
    label.set(rotation=0, ha="center", multialignment="center")
fig

# %% [markdown]
# (claim-sfttrainer)=
# ## What changed since the sources were written
#
# The sources pass these to `SFTTrainer` itself: `max_seq_length=2048` (the Chinese
# source), `tokenizer=tokenizer` and `dataset_text_field="quote"` (the English one). With
# TRL {glue:text}`trl_version` `SFTTrainer` accepts none of the three: the tokenizer is passed as
# `processing_class`, and the text field and the length are settings of `SFTConfig`
# (`dataset_text_field`, and `max_length`, renamed from `max_seq_length`). The old calls
# now fail with a `TypeError`:

# %%
old_keywords = {
    "tokenizer": tok,
    "dataset_text_field": "text",
    "max_seq_length": MAX_LENGTH,
}
for key, value in old_keywords.items():
    try:
        SFTTrainer(model=base_sft, train_dataset=chat_ds, **{key: value})
    except TypeError as err:
        assert key in str(err)
        print(f"SFTTrainer({key}=...): TypeError")
    else:
        raise AssertionError(f"SFTTrainer accepted {key}=")
new = arguments(SFTConfig, "x", 1, dataset_text_field="text",
                max_length=MAX_LENGTH)
assert (new.dataset_text_field, new.max_length) == ("text", MAX_LENGTH)
try:
    SFTConfig(output_dir=str(WORK / "x"), max_seq_length=MAX_LENGTH)
except TypeError:
    print("SFTConfig(max_seq_length=...): TypeError; use max_length")
else:
    raise AssertionError("SFTConfig accepted max_seq_length=")

# %% [markdown]
# (claim-adapter-file)=
# ## Save, reload, generate
#
# `save_pretrained` on a `PeftModel` writes only the adapter: its config and its weights.
# The English source says the weights land in `adapter_model.bin`; current PEFT writes
# `adapter_model.safetensors` (the safe, non-pickle format) by default. That folder is the
# whole patch, the `.dll` beside an unchanged binary: the manifest `adapter_config.json`
# (which base, which layers, r and alpha) and the weights of $A$ and $B$.

# %%
adapter_dir = WORK / "sql-adapter"
sft.model.save_pretrained(adapter_dir)
files = sorted(p.name for p in adapter_dir.iterdir())
print(files)
assert "adapter_model.safetensors" in files
assert "adapter_model.bin" not in files
assert "adapter_config.json" in files
manifest = LoraConfig.from_pretrained(adapter_dir)  # reads adapter_config.json
assert (manifest.r, manifest.lora_alpha) == (R, ALPHA)
size_kb = (adapter_dir / "adapter_model.safetensors").stat().st_size / 1e3
assert size_kb < 1000
print(f"adapter weights: {size_kb:.0f} kB")

# %% [markdown]
# To use it, load a fresh base model and put the adapter on top with
# `PeftModel.from_pretrained`, then generate as with any transformers model: dynamic
# linking, the unchanged binary loaded first and the patch applied at run time.

# %% tags=["nbval-ignore-output"]
fresh, _ = models.load_base(BASE_MODEL)
patched = PeftModel.from_pretrained(fresh, adapter_dir).eval()
question = data.load_task("sql", "test")[0]["messages"][:1]
prompt = tok.apply_chat_template(question, add_generation_prompt=True,
                                 return_tensors="pt", return_dict=True)
prompt = prompt.to(fresh.device)  # inputs go where the model is
with torch.no_grad():
    out = patched.generate(**prompt, max_new_tokens=40, do_sample=False)
answer = tok.decode(out[0, prompt["input_ids"].shape[1]:],
                    skip_special_tokens=True)
print(question[0]["content"])
print("->", answer)
assert "SELECT" not in answer  # four steps are not enough

# %% [markdown]
# Four steps do not teach the model SQL; chapters 06 and 07 train for real. What matters
# here is that the reloaded adapter is the trained one: its logits equal the trainer's.
# (On a GPU the trainer ran in bf16 mixed precision, and Accelerate leaves that bf16
# autocast wrapped around the trained model's `forward`. `unwrap_model` with
# `keep_fp32_wrapper=False` takes it off, so both models compute in fp32 as on a CPU.)

# %%
trained = sft.accelerator.unwrap_model(sft.model, keep_fp32_wrapper=False)
trained.eval()
with torch.no_grad():
    trained_logits = trained(**prompt).logits
    reloaded_logits = patched(**prompt).logits
assert torch.allclose(trained_logits, reloaded_logits, atol=1e-5)
print("reloaded adapter = trained adapter")

# %% [markdown]
# (payoff-05)=
# ## The payoff: a patch trained for real
#
# A few steps showed the mechanics, not the result. What does a patch answer once it has
# trained? `data/adapters/sql` ships with the book: an adapter for the same task, trained
# by `benchmarks/ship_adapters.py` with LoRA Lab's own loop (`lora-lab train --config
# configs/sql.yaml`, the loop the cross-check below holds against `SFTTrainer`) for
# {glue:text}`payoff_steps` steps of {glue:text}`payoff_batch` examples, with rank
# {glue:text}`payoff_r` on {glue:text}`payoff_targets` rather than this chapter's
# `"all-linear"`. It is a PEFT-format folder like ours, so `PeftModel.from_pretrained`
# loads it, and `disable_adapter()` switches it off to get the base model's answers from
# the same object.

# %%
import json

from lora_lab.paths import DATA_DIR

SHIPPED = DATA_DIR / "adapters" / "sql"  # trained for the bundled model
if models.is_bundled(BASE_MODEL):
    metrics = json.loads((SHIPPED / "metrics.json").read_text())
    recipe = metrics["config"]
    assert recipe["task"] == "sql"
else:  # it fits the bundled model only: this chapter's adapter stands in
    recipe = {"steps": SFT_STEPS, "batch_size": BATCH_SIZE, "r": R,
              "target_modules": ["all-linear"]}
    SHIPPED = adapter_dir
shop_sql = PeftModel.from_pretrained(models.load_base(BASE_MODEL)[0], SHIPPED)
shop_sql.eval()
print({k: recipe[k] for k in ("steps", "batch_size", "r", "target_modules")})
glue("payoff_steps", recipe["steps"])
glue("payoff_batch", recipe["batch_size"])
glue("payoff_r", recipe["r"])
glue("payoff_targets", ", ".join(t.removesuffix("_proj")
                                 for t in recipe["target_modules"]))

# %% [markdown]
# Each model answers every question of the test split greedily, and each answer is run in
# the sandboxed shop database: ✓ when it returns the reference query's rows. The table
# shows the first {glue:text}`payoff_show` questions (a fixed rule, not a choice); the
# accuracies below it come from the same generations.

# %%
SHOW = 4  # the first SHOW test questions
with shop_sql.disable_adapter():  # the same model, patch switched off
    base_answers, base_right = payoff.answer_split(shop_sql, tok, "sql")
sql_answers, sql_right = payoff.answer_split(shop_sql, tok, "sql")
questions = [ex["messages"][0]["content"]
             for ex in data.load_task("sql", "test")[:SHOW]]
payoff.SideBySide(
    questions,
    {"base (adapter off)": base_answers[:SHOW],
     "sql adapter": sql_answers[:SHOW]},
    {"base (adapter off)": base_right[:SHOW], "sql adapter": sql_right[:SHOW]},
    max_chars=140)

# %%
accuracy = {"base": sum(base_right) / len(base_right),
            "sql adapter": sum(sql_right) / len(sql_right)}
print(f"whole test split ({len(sql_right)} questions):",
      {k: f"{v:.2f}" for k, v in accuracy.items()})
if models.is_bundled(BASE_MODEL):
    assert not any(base_right)  # the base gets no question right
    assert accuracy["sql adapter"] == metrics["accuracy"]  # as recorded
    assert sum(sql_right[:SHOW]) >= SHOW // 2
    assert not any(payoff.runs_in_shop(a) for a in base_answers[:SHOW])
    for answer, ex, ok in zip(sql_answers, data.load_task("sql", "test"),
                              sql_right[:SHOW]):  # a miss: right up to WHERE
        assert ok or answer.split("WHERE")[0] == ex["sql"].split("WHERE")[0]
glue("payoff_show", SHOW)
glue("payoff_base_acc", accuracy["base"], ".2f")
glue("payoff_sql_acc", accuracy["sql adapter"], ".2f")
glue("payoff_sql_right", sum(sql_right[:SHOW]))

# %% [markdown]
# With the patch off, the model answers as its pretraining taught it: a shop assistant's
# reply, or SQL for another database's tables. With the patch on it writes the shop's SQL:
# {glue:text}`payoff_sql_right` of these {glue:text}`payoff_show` answers return the right
# rows, and {glue:text}`payoff_sql_acc` of the whole split (the base:
# {glue:text}`payoff_base_acc`), the accuracy the trainer recorded in `metrics.json`. The
# misses are worth reading too: the query has the right shape but a wrong value, which a
# score alone would not tell you.

# %% [markdown]
# ## Cross-check: the same file in `lora_lab`
#
# LoRA Lab writes and reads PEFT's format. Load the PEFT-trained adapter into a third
# fresh base model with `lora_lab.adapters.load_adapter`: the logits match PEFT's.

# %%
ours, _ = models.load_base(BASE_MODEL)
adapters.load_adapter(ours, adapter_dir)
with torch.no_grad():
    ours_logits = ours(**prompt).logits
max_diff = (ours_logits - reloaded_logits).abs().max().item()
assert max_diff < 1e-5
with torch.no_grad(), patched.disable_adapter():
    base_logits = patched(**prompt).logits
assert (ours_logits - base_logits).abs().max().item() > 1e-3
print("lora_lab vs PEFT: max |logit difference| < 1e-5;"
      " both differ from the base model")

# %% [markdown]
# ## Cross-check: lora_lab's loop against PEFT + `SFTTrainer`
#
# Same file format is one thing; same *quality* is another. The benchmark
# `benchmarks/loop_vs_trainer.py` trains the sql adapter twice from the same base and seed,
# with the same recipe (r=8, alpha=16 on q, k, v, o; AdamW at a constant learning rate;
# gradients clipped; batch {glue:text}`duel_batch`; loss on the answer only):
#
# - with `lora_lab`'s `LoRALinear` and its own short loop (`lora_lab.train`);
# - with PEFT's `LoraConfig` and TRL's `SFTTrainer`, the workflow above.
#
# The two runs shuffle the data differently, so their adapters are not equal tensor by
# tensor. The claim is that they are equally good and interchangeable: test accuracy within
# {glue:text}`duel_tol` ({glue:text}`duel_tol_items` of {glue:text}`duel_items` items), and
# each adapter loads in the *other* library with the same
# logits and the same accuracy. The run takes a few minutes, so the chapter reads its
# saved results; `python benchmarks/loop_vs_trainer.py` reproduces them, and
# `tests/test_train.py` re-runs a short version of it on every `make test`.

# %%
import json

from lora_lab.paths import RESULTS_DIR

duel = json.loads((RESULTS_DIR / "loop_vs_trainer.json").read_text())
print(f"{duel['task']}, {duel['meta']['steps']} steps, "
      f"{duel['meta']['eval_items']} test items")
for name, row in {**duel["trained"], **duel["cross_loaded"]}.items():
    if "max_logit_diff" in row:
        extra = f"max |logit diff| {row['max_logit_diff']:.1e}"
    else:
        extra = f"final loss {row['final_loss']:.3f}"
    print(f"{name:26} accuracy {row['accuracy']:.3f}   {extra}")
trained, cross = duel["trained"], duel["cross_loaded"]
assert duel["accuracy_gap"] <= duel["tolerance"] == 0.05
for name, source in [("lora_lab adapter in PEFT", "lora_lab loop"),
                     ("PEFT adapter in lora_lab", "PEFT + SFTTrainer")]:
    assert cross[name]["accuracy"] == trained[source]["accuracy"]
    assert cross[name]["max_logit_diff"] < 1e-4
glue("duel_batch", duel["meta"]["batch_size"])
glue("duel_items", duel["meta"]["eval_items"])
glue("duel_tol", duel["tolerance"], ".2f")
glue("duel_tol_items", round(duel["tolerance"] * duel["meta"]["eval_items"]))
glue("duel_gap", duel["accuracy_gap"], ".3f")
glue("accelerate_version", accelerate.__version__)

# %% [markdown]
# ## Scaling out
#
# The same run from the command line: `lora_lab.cli` reads a YAML file (task, model, LoRA
# settings, steps), shows progress, and writes a PEFT-format adapter and a metrics JSON.
#
# ```bash
# python -m lora_lab.train --config configs/smoke.yaml   # or: lora-lab train --config ...
# ```
#
# It runs unchanged on several processes. With more hardware, the usual launch lines are:
#
# ```bash
# # several processes / GPUs on one machine (data parallel)
# torchrun --nproc_per_node 2 -m lora_lab.train --config configs/sql.yaml
# accelerate launch --multi_gpu --num_processes 2 -m lora_lab.train \
#     --config configs/sql.yaml
# # a Trainer / SFTTrainer script, sharded with FSDP or DeepSpeed ZeRO
# accelerate launch --use_fsdp --num_processes 8 train_sft.py
# accelerate launch --use_deepspeed --zero_stage 3 --num_processes 8 train_sft.py
# ```
#
# LoRA keeps each process's optimizer state small, so plain data parallelism is usually
# enough; FSDP or DeepSpeed is for when the frozen base model itself does not fit on one GPU.
#
# One trap when you try this on a laptop: `accelerate launch --cpu --num_processes 2` starts
# **one** process in accelerate {glue:text}`accelerate_version` (its `--cpu` path runs the script directly; several CPU
# processes need an MPI host file). The second line above works on a machine without GPUs:
# the trainer builds `Accelerator(cpu=True)`, so the two processes talk over gloo. The
# trainer's `metrics.json` records `num_processes`, and `tests/test_cli.py` checks both
# launch lines: two processes give the same per-step losses as one, within a tolerance
# that test sets.
#
# ## Check yourself
#
# **1.** What does `get_peft_model(base, lora_config)` do to the `base` object?
# (a) nothing: it works on a copy (b) it swaps the targeted layers, in place, for LoRA
# wrappers around them and freezes the base weights (c) it retrains every weight
# (d) it converts the model to 4-bit
#
# ```{admonition} Answer
# :class: dropdown
# (b): PEFT monkey-patches the live model (asserted above: `base` itself now holds PEFT's LoRA
# layers). Load a fresh base when you need the unpatched one, as this chapter does.
# ```
#
# **2.** What does `save_pretrained` on a `PeftModel` write?
# (a) a full copy of the patched model (b) the patch manifest `adapter_config.json` and
# `adapter_model.safetensors` with $A$ and $B$ (c) `adapter_model.bin` only (d) the
# optimizer state
#
# ```{admonition} Answer
# :class: dropdown
# (b): the folder is the whole patch, under a megabyte here (asserted, with the manifest's
# r and alpha read back); the base model is loaded separately.
# ```
#
# **3.** With `assistant_only_loss=True`, which tokens of a chat carry the loss?
# (a) every token (b) the user's question only (c) the assistant's answer and its
# end-of-text token (d) the role markers
#
# ```{admonition} Answer
# :class: dropdown
# (c): the batch check above decodes the labels that are not -100 to exactly the answer and
# its end-of-text token. The adapter learns to answer, not to ask.
# ```
#
# ## Summary
#
# - `LoraConfig` + `get_peft_model` patch a model; `print_trainable_parameters` shows the
#   share that trains: {glue:text}`share_7b` for Llama-2-7B at r=16 on every linear layer.
# - Path 1, continued pretraining: `Trainer` with `DataCollatorForLanguageModeling(mlm=False)`.
#   Path 2, instruction tuning: `SFTTrainer` with `SFTConfig(assistant_only_loss=True)`,
#   which needs a chat template with generation markers.
# - The tokenizer is `processing_class`; `dataset_text_field` and `max_length` (formerly
#   `max_seq_length`) live in `SFTConfig`.
# - `save_pretrained` writes `adapter_config.json` and `adapter_model.safetensors`;
#   `PeftModel.from_pretrained` and `lora_lab.adapters.load_adapter` read it to identical
#   logits.
# - When this breaks: {ref}`TRL renames <trouble-trl>`, {ref}`generation that never stops <trouble-eos>`, {ref}`odd parameter counts <trouble-param-count>`, {ref}`an adapter that loads but does nothing <trouble-adapter-inactive>`.
#
# ## Exercises
#
# 1. Use `target_modules=["q_proj", "v_proj"]` instead of `"all-linear"` for the 7B model.
#    What share of the weights trains now?
# 2. Train path 2 with `assistant_only_loss=False`. How many tokens of the first example
#    carry loss now, and why might that hurt a chat model?
#
# ```{admonition} Solution 1
# :class: dropdown
# Each of the {glue:text}`llama_layers` layers gets two rank-16 patches of
# $r \cdot (d + d)$ weights ($d$ = {glue:text}`llama_width`): {glue:text}`qv_7b` trainable
# parameters, {glue:text}`qv_7b_share` of the {glue:text}`qv_7b_total_b` billion. Change `config_7b` and re-run the
# cell to see PEFT print it.
# ```
#
# ```{admonition} Solution 2
# :class: dropdown
# Every non-padding token, the user's question and the role markers included, now carries
# loss. The adapter then also learns to write questions, which spends capacity on text the
# model is never asked to produce.
# ```
