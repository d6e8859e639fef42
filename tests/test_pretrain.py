"""Tests for lora_lab.pretrain and the shipped tiny base: config, tokenizer, chat template, model card."""

import json

from conftest import load_benchmark

from lora_lab import data, model_card, pretrain
from lora_lab.paths import TINY_BASE_DIR


def test_shipped_config_is_a_small_untied_llama():
    cfg = json.loads((TINY_BASE_DIR / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["tie_word_embeddings"] is False
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    assert head_dim in (64, 128)
    for k, v in pretrain.MODEL_CONFIG.items():
        assert cfg[k] == v, k
    assert (TINY_BASE_DIR / "model.safetensors").stat().st_size <= 25 * 1024 * 1024
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md",
                 "loss_curve.json", "loss_curve.png", "metrics.json"):  # fmt: skip
        assert (TINY_BASE_DIR / name).exists(), name


def test_tokenizer_special_tokens_and_chat_template():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_BASE_DIR)
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert len(tok) == pretrain.VOCAB_SIZE
    msgs = [
        {"role": "user", "content": "Where does Mira Vell live?"},
        {"role": "assistant", "content": "In Ostrin."},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == data.render_chat(msgs)
    ids = tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    assert ids[-1] == tok.eos_token_id
    for special in ("<|user|>", "<|assistant|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    mask = tok.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)[
        "assistant_masks"
    ]
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "In Ostrin.<|endoftext|>"


def test_build_tokenizer_on_a_small_text_is_deterministic():
    texts = data.load_corpus("validation")[:200]
    a, b = pretrain.build_tokenizer(texts), pretrain.build_tokenizer(texts)
    assert a.get_vocab() == b.get_vocab()
    assert a.chat_template == data.CHAT_TEMPLATE


def test_model_card_reports_the_floors():
    m = json.loads((TINY_BASE_DIR / "metrics.json").read_text())
    card = (TINY_BASE_DIR / "README.md").read_text()
    assert f"{m['parameters']:,}" in card
    assert m["probe_accuracy"] >= 0.8
    assert m["zero_shot"]["sql"] <= 0.2 and m["zero_shot"]["support"] <= 0.2
    lora = {r["task"]: r for r in m["finetune"] if r["method"] == "lora"}
    for task in ("sql", "support"):  # the floor: 85% after at most 2 minutes of training
        assert lora[task]["test_accuracy"] >= 0.85 and lora[task]["train_seconds"] <= 120, task
    assert "| **NO** |" not in card


def test_shape_verdict_separates_shared_misses_from_lora_only_misses():
    def run(method, by_shape):
        return {"task": "sql", "method": method, "by_shape": by_shape}

    metrics = {"finetune": [run("lora", {"join": [9, 15], "num": [72, 90], "agg": [26, 26]}),
                            run("full", {"join": [9, 15], "num": [90, 90], "agg": [26, 26]})]}  # fmt: skip
    text = model_card.shape_verdict(metrics)
    assert "Both fine-tunes miss some `join` requests" in text
    assert "Only LoRA misses `num` requests" in text
    assert "agg" not in text
    assert model_card.shape_verdict({"finetune": metrics["finetune"][:1]}) == ""


def test_lr_schedule_warms_up_then_decays():
    lrs = [pretrain.lr_at(s, 1000, 1.0, 100) for s in range(1000)]
    assert lrs[0] < lrs[50] < lrs[99] == 1.0
    assert lrs[-1] < 0.11 and min(lrs[100:]) >= 0.1 - 1e-9


def test_card_lora_rates_are_the_ones_chosen_on_validation():
    """Each task's LoRA rate comes from benchmarks/card_lora_lr.py's validation sweep, not from test."""
    sweep = load_benchmark("card_lora_lr")
    res = json.loads(sweep.RESULTS.read_text())
    assert res["split"] == "validation" and set(res["tasks"]) == set(data.TASKS) == set(model_card.LORA_LRS)
    for task, entry in res["tasks"].items():
        assert all(r["task"] == task and "test_accuracy" not in r for r in entry["runs"])
        assert sweep.choose(entry["runs"])[0] == entry["chosen_lr"] == model_card.LORA_LRS[task], task
    card_runs = json.loads((TINY_BASE_DIR / "metrics.json").read_text())["finetune"]
    for r in card_runs:
        if r["method"] == "lora":
            assert r["lr"] == model_card.LORA_LRS[r["task"]], r["task"]


def test_choose_takes_the_best_mean_and_breaks_ties_towards_the_smaller_rate():
    runs = [
        {"lr": lr, "validation_accuracy": acc}
        for lr, acc in ((1e-2, 0.875), (5e-3, 0.75), (5e-3, 1.0), (3e-3, 0.5))
    ]
    assert load_benchmark("card_lora_lr").choose(runs) == (5e-3, {3e-3: 0.5, 5e-3: 0.875, 1e-2: 0.875})
