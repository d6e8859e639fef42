"""Tests for lora_lab.train: the loss goes down, only trainable parameters change, bad input errors."""

import pytest
import torch

from lora_lab import data
from lora_lab.train import encode_chat, encode_example, encode_examples, train


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
    ({"steps": 5, "lr": 1e-3, "max_grad_norm": -1.0}, "max_grad_norm must be a positive number.*trains uphill"),
    ({"steps": 5, "lr": 1e-3, "max_grad_norm": float("nan")}, "max_grad_norm must be a positive number"),
    ({"steps": 5, "lr": 1e-3, "seq_len": 4}, "seq_len=4 cuts off the whole answer of every one of the 2 examples"),
], ids=["steps_0", "lr_0", "lr_nan", "optimizer_lion", "max_grad_norm_negative", "max_grad_norm_nan",
        "seq_len_cuts_every_answer"])  # fmt: skip
def test_bad_arguments_raise_clear_errors(base, kwargs, match):
    model, tok = base
    with pytest.raises(ValueError, match=match):
        train(model, tok, data.load_task("sql", "train")[:2], progress=False, **kwargs)


def test_examples_whose_answer_seq_len_cuts_off_are_left_out_with_a_warning(base):
    model, tok = base
    examples = data.load_task("support", "train")[:40]
    prompts = [encode_example(tok, ex, 10_000)[1].count(-100) for ex in examples]  # prompt lengths
    seq_len = sorted(prompts)[len(prompts) // 2]  # cuts off every answer after the longer half's prompts
    with pytest.warns(UserWarning, match=f"seq_len={seq_len} cuts off the whole answer of"):
        kept = encode_examples(tok, examples, seq_len)
    assert 0 < len(kept) < len(examples) and all(any(t != -100 for t in labels[1:]) for _, labels in kept)


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


def test_python_m_lora_lab_train_is_the_cli_train_command():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "-m", "lora_lab.train", "--config", "no/such/config.yaml"],
                         cwd=root, capture_output=True, text=True, env={"PYTHONPATH": str(root), "PATH": ""})  # fmt: skip
    assert run.returncode == 2 and "no/such/config.yaml" in run.stderr


def test_batch_rows_reshuffles_each_epoch_with_its_seed():
    from lora_lab.train import batch_rows

    rows = list(batch_rows(5, 2, 6, seed=3))
    assert [len(r) for r in rows] == [2] * 6
    assert sorted(rows[0] + rows[1] + [rows[2][0]]) == list(range(5))  # the first epoch covers every row
    assert rows == list(batch_rows(5, 2, 6, seed=3)) != list(batch_rows(5, 2, 6, seed=4))


def test_final_loss_is_the_mean_of_the_end_of_the_run():
    from lora_lab.train import final_loss

    assert final_loss([5.0] * 90 + [1.0] * 10) == 1.0  # the last tenth
    assert final_loss([4.0, 2.0, 1.0], window=2) == 1.5
    assert final_loss([3.0]) == 3.0
    with pytest.raises(ValueError, match="no losses"):
        final_loss([])


def test_callback_sees_every_step_and_can_stop_the_run(base):
    model, tok = base
    from lora_lab.inject import LoRAConfig, add_lora, remove_lora

    add_lora(model, LoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    seen = []
    try:
        res = train(model, tok, data.load_task("sql", "train")[:8], steps=5, lr=1e-3, batch_size=4, progress=False,
                    callback=lambda step, loss: seen.append((step, loss)) or step == 3)  # fmt: skip
    finally:
        remove_lora(model)
    assert [s for s, _ in seen] == [1, 2, 3] and res["steps"] == 3 and [x for _, x in seen] == res["losses"]


@pytest.mark.slow
def test_lora_lab_loop_and_peft_trainer_adapters_are_interchangeable(tmp_path):
    """A short run of benchmarks/loop_vs_trainer.py: both adapters train, and each loads in the other
    library with the same logits and the same accuracy (the full 250-step comparison of accuracy is
    the benchmark's job; its results are in data/results/loop_vs_trainer.json)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "loop_vs_trainer.py"
    spec = importlib.util.spec_from_file_location("loop_vs_trainer", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.compare("sql", steps=12, limit=16, workdir=tmp_path)
    for name in ("lora_lab loop", "PEFT + SFTTrainer"):
        assert res["trained"][name]["final_loss"] < 3.0, name
    ours, theirs = res["trained"]["lora_lab loop"], res["trained"]["PEFT + SFTTrainer"]
    cross = res["cross_loaded"]
    assert cross["lora_lab adapter in PEFT"]["max_logit_diff"] < 1e-4
    assert cross["PEFT adapter in lora_lab"]["max_logit_diff"] < 1e-4
    assert cross["lora_lab adapter in PEFT"]["accuracy"] == ours["accuracy"]
    assert cross["PEFT adapter in lora_lab"]["accuracy"] == theirs["accuracy"]
    assert (tmp_path / "lora_lab" / "adapter_model.safetensors").exists()
    assert (tmp_path / "peft_trl" / "adapter_model.safetensors").exists()
