"""Mixed-adapter batches: each row's output equals that request run alone, and PEFT's adapter_names=.

Cross-checks on the tiny random Llama (always) and on the bundled model (skipped if not built).
"""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftModel

from lora_lab import serving
from lora_lab.paths import TINY_BASE_DIR
from lora_lab.registry import AdapterRegistry

ATOL = 1e-5
NAMES = ["a", "b", None, "c", "b", "a"]  # one adapter name per row; None = base model


def _registry(serving_adapter_dirs, **kwargs):
    registry = AdapterRegistry(build_tiny("llama"), **kwargs)
    for name, path in serving_adapter_dirs.items():
        registry.load(name, path)
    return registry


def _peft(serving_adapter_dirs):
    model = PeftModel.from_pretrained(build_tiny("llama"), serving_adapter_dirs["a"], adapter_name="a")
    for name in ("b", "c"):
        model.load_adapter(serving_adapter_dirs[name], adapter_name=name)
    return model.eval()


def _prompts(n=6, seed=5):
    """Prompts of different lengths (3..8 tokens), left-padded into one batch with a mask."""
    g = torch.Generator().manual_seed(seed)
    lengths = [3 + (i * 3) % 6 for i in range(n)]
    rows = [torch.randint(3, 128, (length,), generator=g) for length in lengths]
    width = max(lengths)
    input_ids = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return rows, input_ids, mask


def _alone_logits(registry, name, row):
    """One request run by itself (batch 1, no padding) with its adapter set the plain way."""
    if name is None:
        registry.disable()
    else:
        registry.set_adapter(name)
    with torch.no_grad():
        return registry.model(input_ids=row[None]).logits[0]


def test_mixed_batch_logits_equal_each_request_alone(serving_adapter_dirs):
    registry = _registry(serving_adapter_dirs)
    rows, input_ids, mask = _prompts()
    mixed = serving.forward(registry, input_ids, NAMES, attention_mask=mask)  # [batch, seq, vocab]
    assert mixed.shape == (len(NAMES), input_ids.shape[1], 128)
    for i, (name, row) in enumerate(zip(NAMES, rows)):
        alone = _alone_logits(registry, name, row)
        torch.testing.assert_close(mixed[i, -len(row) :], alone, atol=ATOL, rtol=0)
    # rows with different adapters really differ: the same prompt under a, b, c and base
    same = rows[0][None].expand(4, -1)
    out = serving.forward(registry, same, ["a", "b", "c", None])
    assert min((out[i] - out[j]).abs().max() for i in range(4) for j in range(i)) > 1e-3


def test_mixed_batch_logits_equal_peft_adapter_names(serving_adapter_dirs):
    registry = _registry(serving_adapter_dirs)
    peft_model = _peft(serving_adapter_dirs)
    _, input_ids, mask = _prompts()
    ours = serving.forward(registry, input_ids, NAMES, attention_mask=mask)
    peft_names = [n or "__base__" for n in NAMES]
    with torch.no_grad():
        theirs = peft_model(input_ids=input_ids, attention_mask=mask, adapter_names=peft_names).logits
    real = mask.bool()  # padded positions are not compared (their values are arbitrary)
    torch.testing.assert_close(ours[real], theirs[real], atol=ATOL, rtol=0)


def test_mixed_generation_is_token_identical_to_alone_and_to_peft(serving_adapter_dirs):
    registry = _registry(serving_adapter_dirs)
    rows, input_ids, mask = _prompts()
    new = serving.generate(registry, input_ids, NAMES, attention_mask=mask, max_new_tokens=10)
    assert new.shape == (len(NAMES), 10)
    for i, (name, row) in enumerate(zip(NAMES, rows)):
        with torch.no_grad():
            if name is None:
                registry.disable()
            else:
                registry.set_adapter(name)
            alone = registry.model.generate(row[None], do_sample=False, max_new_tokens=10, pad_token_id=0)
        assert new[i].tolist() == alone[0, len(row) :].tolist(), f"row {i} ({name})"
    peft_model = _peft(serving_adapter_dirs)
    with torch.no_grad():
        theirs = peft_model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            adapter_names=[n or "__base__" for n in NAMES],
            do_sample=False,
            max_new_tokens=10,
            pad_token_id=0,
        )
    assert new.tolist() == theirs[:, input_ids.shape[1] :].tolist()


def test_active_adapter_is_restored_after_a_mixed_batch(serving_adapter_dirs):
    registry = _registry(serving_adapter_dirs)
    _, input_ids, mask = _prompts()
    registry.set_adapter("c")
    with torch.no_grad():
        before = registry.model(input_ids=input_ids, attention_mask=mask).logits
    serving.forward(registry, input_ids, NAMES, attention_mask=mask)
    with torch.no_grad():
        after = registry.model(input_ids=input_ids, attention_mask=mask).logits
    assert registry.active_adapter == "c"
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_eviction_between_batches_keeps_outputs_correct(serving_adapter_dirs):
    registry = _registry(serving_adapter_dirs)
    sizes = {n: registry.adapter(n).nbytes for n in registry.names()}
    registry.max_device_bytes = sizes["b"] + max(sizes["a"], sizes["c"])  # any two, never all three
    peft_model = _peft(serving_adapter_dirs)
    _, input_ids, mask = _prompts(n=4)
    batches = [["a", "b", "a", None], ["c", "b", None, "b"], ["a", "c", "c", "a"], ["b", None, "a", "b"]]
    for names in batches:
        ours = serving.forward(registry, input_ids, names, attention_mask=mask)
        with torch.no_grad():
            theirs = peft_model(
                input_ids=input_ids, attention_mask=mask, adapter_names=[n or "__base__" for n in names]
            ).logits
        torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=ATOL, rtol=0)
        assert registry.device_bytes() <= registry.max_device_bytes
    assert registry.evictions >= 3 and registry.misses >= 5


def test_batch_with_more_adapters_than_the_device_holds(serving_adapter_dirs):
    registry = _registry(serving_adapter_dirs)
    registry.set_adapter("a")
    registry.max_device_bytes = registry.adapter("b").nbytes + registry.adapter("a").nbytes
    _, input_ids, mask = _prompts(n=3)
    with pytest.raises(ValueError, match=r"3 different adapters.*split the batch"):
        serving.forward(registry, input_ids, ["a", "b", "c"], attention_mask=mask)
    assert registry.active_adapter == "a"


def test_bad_batches_are_refused(serving_adapter_dirs):
    registry = _registry(serving_adapter_dirs)
    _, input_ids, mask = _prompts(n=3)
    with pytest.raises(ValueError, match=r"unknown adapter 'zzz'.*'a', 'b', 'c'"):
        serving.forward(registry, input_ids, ["a", "zzz", None], attention_mask=mask)
    with pytest.raises(ValueError, match="one adapter name"):
        serving.forward(registry, input_ids, ["a", "b"], attention_mask=mask)
    with pytest.raises(TypeError, match="one adapter name"):
        serving.forward(registry, input_ids, "a", attention_mask=mask)
    with pytest.raises(ValueError, match="pad on the left"):
        serving.generate(registry, input_ids, ["a", "b", "c"], attention_mask=mask.flip(1))
    with pytest.raises(ValueError, match="set up for 3 rows"), serving.mixed_batch(registry, ["a", "b", "c"]):
        registry.model(input_ids=input_ids[:2])
    registry.merge("a")
    with pytest.raises(ValueError, match="unmerge"):
        serving.forward(registry, input_ids, ["a", "b", None])


@pytest.mark.skipif(not (TINY_BASE_DIR / "model.safetensors").exists(), reason="bundled model not built yet")
def test_bundled_model_mixed_generation(tmp_path):
    from peft import LoraConfig, get_peft_model

    from lora_lab.data import load_task
    from lora_lab.models import load_base

    model, tokenizer = load_base()
    dirs = {}
    for seed, (name, targets) in enumerate({"q": ["q_proj", "v_proj"], "all": "all-linear"}.items()):
        torch.manual_seed(seed)
        config = LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)
        peft_model = get_peft_model(model, config, adapter_name=name)
        peft_model.save_pretrained(tmp_path, selected_adapters=[name])  # -> tmp_path/<name>/
        dirs[name] = tmp_path / name
        model = peft_model.unload()
    registry = AdapterRegistry(model)
    for name, path in dirs.items():
        registry.load(name, path)
    prompts = [
        tokenizer.apply_chat_template(ex["messages"][:1], tokenize=False, add_generation_prompt=True)
        for ex in load_task("support", "test")[:4]
    ]
    names = ["q", "all", None, "q"]
    mixed = serving.generate_text(registry, tokenizer, prompts, names, max_new_tokens=12)
    for prompt, name, text in zip(prompts, names, mixed):
        assert text == serving.generate_text(registry, tokenizer, [prompt], [name], max_new_tokens=12)[0]
    assert len(set(mixed[:3])) == 3  # q, all and base answer differently


def test_mixed_batch_with_rank_and_alpha_patterns_equals_each_request_alone(
    serving_adapter_dirs, pattern_adapter_dir
):
    registry = _registry(serving_adapter_dirs)
    registry.load("p", pattern_adapter_dir)
    names = ["p", "a", None, "p", "c"]
    rows, input_ids, mask = _prompts(n=len(names))
    mixed = serving.forward(registry, input_ids, names, attention_mask=mask)
    for i, (name, row) in enumerate(zip(names, rows)):
        alone = _alone_logits(registry, name, row)
        torch.testing.assert_close(mixed[i, -len(row) :], alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "width, max_new_tokens, match",
    [
        (60, 10, "prompt of 60 tokens plus max_new_tokens=10 exceeds the model's 64 positions"),
        (8, True, "max_new_tokens must be a positive integer"),
        (8, 0, "max_new_tokens must be a positive integer"),
    ],
    ids=["longer_than_positions", "max_new_tokens_true", "max_new_tokens_0"],
)
def test_generation_that_cannot_fit_is_refused(serving_adapter_dirs, width, max_new_tokens, match):
    registry = _registry(serving_adapter_dirs)
    ids = torch.randint(3, 128, (3, width), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=match):
        serving.generate(registry, ids, ["a", None, "b"], max_new_tokens=max_new_tokens)
    assert registry.open_mixed_batches == 0


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    names=st.lists(st.sampled_from(["a", "b", "c", None]), min_size=1, max_size=5), seed=st.integers(0, 100)
)
def test_any_mixed_batch_equals_its_requests_one_by_one(serving_adapter_dirs, names, seed):
    """Property: whatever adapter each row asks for, a mixed batch gives every row the logits it gets alone."""
    registry = _registry(serving_adapter_dirs)
    rows, input_ids, mask = _prompts(n=len(names), seed=seed)
    mixed = serving.forward(registry, input_ids, names, attention_mask=mask)
    for i, (name, row) in enumerate(zip(names, rows)):
        torch.testing.assert_close(
            mixed[i, -len(row) :], _alone_logits(registry, name, row), atol=ATOL, rtol=0
        )
