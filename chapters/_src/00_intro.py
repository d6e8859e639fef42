# %% [markdown]
# # 00 · The billion-parameter binary
#
# **Learning goals**
# - run the book's notebooks three ways: read, Colab GPU, local CPU;
# - count the parameters of a 7-billion-parameter model without downloading it;
# - meet the tiny base model that every later chapter patches.

# %% tags=["hide-cell"]
# Colab setup: installs LoRA Lab in Google Colab (keeping Colab's own
# torch build); does nothing anywhere else.
import os
import subprocess
import sys

REPO_URL = "https://github.com/lora-lab/lora-lab"  # from _config.yml
EXTRAS = "train"  # pip extras this chapter needs
HOME = "/content/lora-lab"
if "google.colab" in sys.modules:
    if not os.path.isdir(HOME):
        clone = ["git", "clone", "--depth", "1", REPO_URL, HOME]
        subprocess.run(clone, check=True)
        pip = [sys.executable, "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "-e", f"{HOME}[{EXTRAS}]"], check=True)
    os.chdir(f"{HOME}/chapters")
    sys.path.insert(0, HOME)

# %%
# Parameters: change these to run the chapter on another model or device.
BASE_MODEL = None  # None = the bundled tiny model; or a Hub id / local path
SEED = 0

# %%
import lora_lab

lora_lab.seed_everything(SEED)
print(lora_lab.runtime.describe())

# %% [markdown]
# ## A 7B model is a config file first
#
# Before any weights exist, a model is a shape. `transformers` can build the whole module tree
# on PyTorch's `meta` device, where tensors have shapes but no storage, so we can count every
# parameter of Llama-2-7B on a laptop in a second.

# %%
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
print(f"fp16 weights alone:    {n_params * 2 / 1e9:.1f} GB")
assert n_params == 6_738_415_616
