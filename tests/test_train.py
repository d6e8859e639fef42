"""Tests for lora_lab.train: the loss goes down, only trainable parameters change, bad input errors."""

import pytest
import torch

from lora_lab import data
from lora_lab.train import encode_chat, train


@pytest.fixture(scope="module")
def base():
    from lora_lab.models import load_base

    return load_base(device="cpu")


def test_encode_chat_masks_the_prompt(base):
    _, tok = base
    ex = data.load_task("sql", "train")[0]
    ids, labels = encode_chat(tok, ex, seq_len=128)
    assert len(ids) == len(labels)
    learned = [t for t in labels if t != -100]
    assert tok.decode(learned) == ex["messages"][1]["content"] + tok.eos_token
    assert labels[0] == -100
    ids_all, labels_all = encode_chat(tok, ex, seq_len=128, assistant_only_loss=False)
    assert ids_all == ids and labels_all == ids


def test_loss_decreases_and_only_trainable_params_change():
    from tests.conftest import build_tiny

    model = build_tiny("llama")
    from lora_lab.models import load_base

    _, tok = load_base(device="cpu")
    model.resize_token_embeddings(len(tok))
    for name, p in model.named_parameters():  # everything trains except the (frozen) embedding
        p.requires_grad = "embed_tokens" not in name
    frozen = model.model.embed_tokens.weight.clone()
    examples = data.load_task("shift", "train")[:8]
    res = train(model, tok, examples, steps=30, lr=1e-2, batch_size=8, progress=False)
    assert res["steps"] == 30 and len(res["losses"]) == 30 and res["seconds"] > 0
    assert sum(res["losses"][-5:]) / 5 < 0.8 * sum(res["losses"][:5]) / 5
    assert torch.equal(model.model.embed_tokens.weight, frozen)
    assert not model.training


def test_plain_text_examples_train(base):
    from tests.conftest import build_tiny

    _, tok = base
    model = build_tiny("llama")
    model.resize_token_embeddings(len(tok))
    res = train(
        model, tok, data.load_corpus("validation")[:4], steps=3, lr=1e-3, batch_size=2, progress=False
    )
    assert len(res["losses"]) == 3


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 0, "lr": 1e-3}, "steps must be a positive integer"),
    ({"steps": 5, "lr": 0.0}, "lr must be a positive number"),
    ({"steps": 5, "lr": float("nan")}, "lr must be a positive number"),
    ({"steps": 5, "lr": 1e-3, "optimizer": "lion"}, "unknown optimizer"),
])  # fmt: skip
def test_bad_arguments_raise_clear_errors(base, kwargs, match):
    model, tok = base
    with pytest.raises(ValueError, match=match):
        train(model, tok, data.load_task("sql", "train")[:2], progress=False, **kwargs)


def test_no_trainable_parameters_is_an_error(base):
    model, tok = base
    for p in model.parameters():
        p.requires_grad = False
    try:
        with pytest.raises(ValueError, match="no trainable parameters"):
            train(model, tok, data.load_task("sql", "train")[:2], steps=1, lr=1e-3, progress=False)
    finally:
        for p in model.parameters():
            p.requires_grad = True
