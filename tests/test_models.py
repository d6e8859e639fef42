"""Tests for lora_lab.models.load_base: bundled default, local path, env var, offline Hub id."""

import time

import pytest
import torch

from lora_lab import models
from lora_lab.paths import TINY_BASE_DIR


def test_default_is_the_bundled_tiny_llama(monkeypatch):
    monkeypatch.delenv(models.BASE_MODEL_ENV, raising=False)
    model, tok = models.load_base(device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 2_000_000 <= models.count_parameters(model) <= 10_000_000
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert tok.padding_side == "left" and tok.pad_token is not None
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|user|>\nHi\n<|assistant|>\n"


def test_local_path_and_env_var(monkeypatch):
    model, _ = models.load_base(str(TINY_BASE_DIR), device="cpu", dtype=torch.float32)
    monkeypatch.setenv(models.BASE_MODEL_ENV, str(TINY_BASE_DIR))
    model2, _ = models.load_base(device="cpu")
    assert torch.equal(model.lm_head.weight, model2.lm_head.weight)


def test_missing_local_path_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.load_base(str(tmp_path / "nope"))


@pytest.mark.parametrize("offline_env", ["1", None])
def test_offline_hub_id_fails_fast_and_names_the_default(monkeypatch, offline_env):
    if offline_env is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(models, "_hub_reachable", lambda timeout=2.0: False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline_env)
    t = time.perf_counter()
    with pytest.raises(OSError, match="bundled tiny model") as e:
        models.load_base("some-org/some-model-that-is-not-cached")
    assert time.perf_counter() - t < 5
    assert models.BASE_MODEL_ENV in str(e.value)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda t: t / "missing", FileNotFoundError, "looks like a local path but no such folder"),
        (lambda t: (t / "empty").mkdir() or t / "empty", FileNotFoundError, "has no config.json file"),
        (
            lambda t: (t / "config.json").write_text("{}") and t / "config.json",
            FileNotFoundError,
            "is a file",
        ),
        (lambda t: 42, TypeError, "a folder path or a Hub id"),
    ],
    ids=["missing_folder", "folder_without_config_json", "path_to_config_json", "not_a_string"],
)
def test_bad_model_names_are_refused_before_loading(tmp_path, make, error, match):
    with pytest.raises(error, match=match):
        models.load_base(make(tmp_path))


def test_is_bundled_follows_the_name_and_the_environment(monkeypatch, tmp_path):
    from lora_lab.models import BASE_MODEL_ENV, TINY_BASE_DIR, is_bundled

    monkeypatch.delenv(BASE_MODEL_ENV, raising=False)
    assert is_bundled() and is_bundled(TINY_BASE_DIR) and is_bundled(str(TINY_BASE_DIR) + "/")
    assert not is_bundled(tmp_path) and not is_bundled("HuggingFaceTB/SmolLM2-135M")
    monkeypatch.setenv(BASE_MODEL_ENV, str(tmp_path))
    assert not is_bundled() and is_bundled(TINY_BASE_DIR)


def test_count_parameters_counts_a_4bit_model_in_full(saved_tiny_llama):
    """It counted a bitsandbytes 4-bit model short: a packed [n/2, 1] uint8 weight holds n weights.
    (`inject.count_parameters`, which it counts through, is checked against PEFT in test_inject.)"""
    from conftest import load_4bit
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(saved_tiny_llama)
    assert models.count_parameters(load_4bit(saved_tiny_llama)) == models.count_parameters(full)
    full.requires_grad_(False)
    full.lm_head.requires_grad_(True)
    assert models.count_parameters(full, trainable_only=True) == full.lm_head.weight.numel()
