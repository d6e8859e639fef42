"""Loading the base model: the bundled tiny Llama by default, any Hub id or local path on request.

`load_base()` returns `(model, tokenizer)` through the real transformers loading code
(`AutoModelForCausalLM.from_pretrained`, `AutoTokenizer.from_pretrained`), so what the book does to the
tiny model it can do, unchanged, to a real checkpoint: set `LORA_LAB_BASE_MODEL` (or pass `name`) to a
Hub id such as `HuggingFaceTB/SmolLM2-135M-Instruct` on a machine with network, e.g. in Colab.

Without network, a Hub id that is not already in the local Hugging Face cache fails at once with an
error that says how to use the bundled default, instead of waiting on connection time-outs.

Left out: `trust_remote_code` (never set: only architectures transformers ships are loaded) and
quantized loading (see `lora_lab.nf4` and chapter 06).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from lora_lab import inject
from lora_lab.paths import TINY_BASE_DIR

__all__ = [
    "load_base",
    "check_base",
    "resolve_base_name",
    "is_bundled",
    "count_parameters",
    "TINY_BASE_DIR",
    "BASE_MODEL_ENV",
]

BASE_MODEL_ENV = "LORA_LAB_BASE_MODEL"


def resolve_base_name(name: str | os.PathLike | None = None) -> str:
    """The model to load: `name` if given, else `$LORA_LAB_BASE_MODEL`, else the bundled tiny base."""
    if name is None:
        name = os.environ.get(BASE_MODEL_ENV) or str(TINY_BASE_DIR)
    return str(name)


def is_bundled(name: str | os.PathLike | None = None) -> bool:
    """True when `name` (or `$LORA_LAB_BASE_MODEL`) resolves to the bundled tiny model.

    Chapters teach on any causal LM; the few asserts about this one model's sizes and cached results
    run only when it is the one loaded.
    """
    return Path(resolve_base_name(name)).resolve() == TINY_BASE_DIR.resolve()


def _hub_reachable(timeout: float = 2.0) -> bool:
    """True if a TCP connection to the Hub endpoint opens within `timeout` seconds."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _in_hub_cache(repo_id: str) -> bool:
    """True if the Hub cache already holds a config.json for `repo_id` (so loading needs no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an id that is not a valid repo id, or an old huggingface_hub
        return False
    return isinstance(found, str)


def _offline_error(name: str, why: str) -> OSError:
    return OSError(
        f"cannot load {name!r}: {why}. It is not a local folder and not in the Hugging Face cache. "
        f"Use the bundled tiny model instead: call load_base() with no argument and unset "
        f"${BASE_MODEL_ENV} (the default is {TINY_BASE_DIR}), or pass a local folder that holds "
        "config.json, model.safetensors and the tokenizer files."
    )


def check_base(name: str | os.PathLike | None = None) -> tuple[str, Path | None]:
    """(model name, local folder or None for a Hub id): everything load_base checks before loading.

    FileNotFoundError for a path that does not exist or a folder without a config.json file; OSError
    for a Hub id that cannot be fetched (offline, not cached). Cheap: nothing is loaded.
    """
    if name is not None and not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"the model must be a folder path or a Hub id (a string), got {name!r}")
    name = resolve_base_name(name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} is a folder but has no config.json file, so it is not a model folder; pass a folder that "
                "holds config.json, model.safetensors and the tokenizer files (save_pretrained writes them)"
            )
        return name, path
    if path.exists():
        raise FileNotFoundError(
            f"{path} is a file, not a model folder; pass the folder that holds it ({path.parent})"
        )
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name.replace("/", ""):
        raise FileNotFoundError(
            f"{name!r} looks like a local path but no such folder exists; pass a folder that holds "
            "config.json and model.safetensors, or a Hub id like 'HuggingFaceTB/SmolLM2-135M'"
        )
    if not _in_hub_cache(name):
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            raise _offline_error(name, "HF_HUB_OFFLINE is set")
        if not _hub_reachable():
            raise _offline_error(name, "the Hugging Face Hub cannot be reached (no network)")
    return name, None


def load_base(
    name: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
):
    """Load a causal language model and its tokenizer; returns `(model, tokenizer)` in eval mode.

    name: a local folder or a Hub id; default `$LORA_LAB_BASE_MODEL`, else the bundled `tiny-base`.
    dtype: default fp32 for the tiny model and on CPU, else `lora_lab.runtime.compute_dtype()`.
    device: default `lora_lab.runtime.device()`.

    The tokenizer pads on the left (what batched generation needs) and always has a pad token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_lab.runtime import compute_dtype
    from lora_lab.runtime import device as pick_device

    name, local_path = check_base(name)
    dev = pick_device(str(device)) if device is not None else pick_device()
    local = local_path is not None
    path = local_path if local else Path(name)
    if dtype is None:
        bundled = local and path.resolve() == TINY_BASE_DIR.resolve()
        dtype = torch.float32 if bundled else compute_dtype(dev)
    kwargs = {"local_files_only": True} if local else {}
    tokenizer = AutoTokenizer.from_pretrained(str(path) if local else name, **kwargs)
    # transformers draws a "Loading weights" progress bar; for a model this small it is only noise
    # (and it would make notebook outputs differ between runs), so it is switched off while loading.
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path) if local else name, dtype=dtype, **kwargs)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.to(dev)
    model.eval()
    return model, tokenizer


def check_generation_length(model, prompt_tokens: int, max_new_tokens) -> None:
    """ValueError unless max_new_tokens is a positive int and prompt + new tokens fit the model's positions.

    Past `max_position_embeddings` a RoPE model does not fail: it silently produces garbage.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and prompt_tokens + max_new_tokens > limit:
        raise ValueError(
            f"a prompt of {prompt_tokens} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
            f"{limit} positions (max_position_embeddings); shorten the prompt or lower max_new_tokens"
        )


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with `requires_grad`): `inject.count_parameters`'s count,
    so a bitsandbytes 4-bit model counts every weight its packed bytes hold, as PEFT does."""
    trainable, total = inject.count_parameters(model)
    return trainable if trainable_only else total
