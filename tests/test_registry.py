"""AdapterRegistry: loading PEFT adapters by name, switching, LRU device cache, merging, bad input.

Every output is cross-checked against PEFT running the same adapter files.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_inference_like_peft, build_tiny, save_peft_adapter, tiny_inputs
from peft import PeftModel

from lora_lab.registry import AdapterRegistry
from lora_lab.serving import MultiLoRALinear

ATOL = 1e-5


def _peft(adapter_dirs, names):
    """A PeftModel on a fresh tiny Llama with the named adapters loaded (eval mode)."""
    first, *rest = names
    model = PeftModel.from_pretrained(build_tiny("llama"), adapter_dirs[first], adapter_name=first)
    for name in rest:
        model.load_adapter(adapter_dirs[name], adapter_name=name)
    return model.eval()


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids).logits


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, snapshot):
    now = model.state_dict()
    return set(now) == set(snapshot) and all(torch.equal(now[k], v) for k, v in snapshot.items())


def test_set_adapter_matches_peft_for_every_adapter(adapter_dirs):
    registry = AdapterRegistry(build_tiny("llama"))
    for name, path in adapter_dirs.items():
        registry.load(name, path)
    peft_model = _peft(adapter_dirs, list(adapter_dirs))
    ids = tiny_inputs(registry.model, batch=3, seq=7)
    for name in adapter_dirs:
        registry.set_adapter(name)
        peft_model.set_adapter(name)
        ours, theirs = _logits(registry.model, ids), _logits(peft_model, ids)
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
        assert registry.active_adapter == name
    # each adapter really changes the output (the comparison above is not base vs base)
    base = _logits(build_tiny("llama"), ids)
    assert (ours - base).abs().max() > 1e-2
    registry.disable()
    torch.testing.assert_close(_logits(registry.model, ids), base, atol=0, rtol=0)


def test_set_adapter_copies_one_scaling_to_the_device(adapter_dirs):
    """All patched layers share one [1] scaling tensor: a switch copies one number to a GPU, not one per layer."""
    registry = AdapterRegistry(build_tiny("llama"))
    registry.load("b", adapter_dirs["b"])
    registry.set_adapter("b")
    layers = [m for m in registry.model.modules() if isinstance(m, MultiLoRALinear) and m.scaling is not None]
    assert len(layers) > 1
    assert all(m.scaling is layers[0].scaling for m in layers)
    assert layers[0].scaling.tolist() == [registry.adapter("b").scaling]


def test_names_delete_and_model_restored(adapter_dirs):
    model = build_tiny("llama")
    keys = set(model.state_dict())
    registry = AdapterRegistry(model)
    registry.load("a", adapter_dirs["a"])
    registry.load("b", adapter_dirs["b"])
    assert registry.names() == ["a", "b"]
    # b patches all 7 projections of both layers
    assert len(registry.layer_names()) == 14
    registry.set_adapter("b")
    registry.delete("b")
    assert registry.names() == ["a"] and registry.active_adapter is None
    assert len(registry.layer_names()) == 4  # a patches q_proj and v_proj only
    registry.delete("a")
    assert registry.names() == [] and registry.layer_names() == []
    assert set(model.state_dict()) == keys  # the original module structure is back
    assert not any(isinstance(m, MultiLoRALinear) for m in model.modules())


def test_unknown_adapter_name_lists_loaded_ones(adapter_dirs):
    registry = AdapterRegistry(build_tiny("llama"))
    registry.load("a", adapter_dirs["a"])
    registry.load("b", adapter_dirs["b"])
    registry.set_adapter("a")
    snapshot = _snapshot(registry.model)
    for call in (registry.set_adapter, registry.delete, registry.merge):
        with pytest.raises(ValueError, match=r"unknown adapter 'x'.*'a', 'b'"):
            call("x")
    assert registry.names() == ["a", "b"] and registry.active_adapter == "a"
    assert _same_state(registry.model, snapshot)


def test_adapter_for_another_base_names_layer_and_shapes(adapter_dirs, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    # same architecture and layer names, but hidden size 48 instead of 32
    torch.manual_seed(0)
    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2,
        )
    )  # fmt: skip
    get_peft_model(
        other, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    ).save_pretrained(tmp_path / "other")
    registry = AdapterRegistry(build_tiny("llama"))
    registry.load("a", adapter_dirs["a"])
    snapshot = _snapshot(registry.model)
    layers_before = registry.layer_names()
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*\[4, 48\].*\[4, 32\]") as err:
        registry.load("other", tmp_path / "other")
    assert "another base model" in str(err.value)
    assert registry.names() == ["a"] and registry.layer_names() == layers_before
    assert _same_state(registry.model, snapshot)


def test_adapter_for_layers_the_model_lacks(tmp_path):
    save_peft_adapter(tmp_path / "opt", kind="opt", r=4, target_modules=["fc1"])
    model = build_tiny("llama")
    snapshot = _snapshot(model)
    registry = AdapterRegistry(model)
    with pytest.raises(ValueError, match=r"fc1.*does not have"):
        registry.load("opt", tmp_path / "opt")
    assert registry.names() == [] and _same_state(model, snapshot)


def test_rank_above_max_rank_is_refused(adapter_dirs):
    registry = AdapterRegistry(build_tiny("llama"), max_rank=4)
    registry.load("a", adapter_dirs["a"])  # r=4: fine
    with pytest.raises(ValueError, match=r"r=8, above this registry's max_rank=4"):
        registry.load("b", adapter_dirs["b"])
    assert registry.names() == ["a"]


def test_bad_arguments_and_duplicates(adapter_dirs, tmp_path):
    with pytest.raises(ValueError, match="max_device_bytes"):
        AdapterRegistry(build_tiny("llama"), max_device_bytes=0)
    with pytest.raises(ValueError, match="max_rank"):
        AdapterRegistry(build_tiny("llama"), max_rank=-1)
    registry = AdapterRegistry(build_tiny("llama"))
    registry.load("a", adapter_dirs["a"])
    with pytest.raises(ValueError, match="already loaded"):
        registry.load("a", adapter_dirs["b"])
    with pytest.raises(ValueError, match="non-empty string"):
        registry.load("", adapter_dirs["b"])
    with pytest.raises(ValueError, match="already belongs to an AdapterRegistry"):
        AdapterRegistry(registry.model)
    with pytest.raises(FileNotFoundError):
        registry.load("missing", tmp_path / "nothing-here")
    assert registry.names() == ["a"]


def test_dora_adapter_is_refused(tmp_path):
    save_peft_adapter(tmp_path / "dora", r=4, target_modules=["q_proj"], use_dora=True)
    registry = AdapterRegistry(build_tiny("llama"))
    with pytest.raises(ValueError, match="use_dora=True"):
        registry.load("dora", tmp_path / "dora")
    assert registry.names() == [] and registry.layer_names() == []


def test_lru_device_cache_counts_and_stays_correct(adapter_dirs):
    registry = AdapterRegistry(build_tiny("llama"))
    for name in ("a", "b", "c"):
        registry.load(name, adapter_dirs[name])
    sizes = {n: registry.adapter(n).nbytes for n in registry.names()}
    # room for b plus the larger of a and c, not for all three
    registry.max_device_bytes = sizes["b"] + max(sizes["a"], sizes["c"])
    peft_model = _peft(adapter_dirs, ["a", "b", "c"])
    ids = tiny_inputs(registry.model, batch=2, seq=6)

    order = ["a", "b", "c", "a", "a", "b", "c", "b"]
    for name in order:
        registry.set_adapter(name)
        peft_model.set_adapter(name)
        torch.testing.assert_close(_logits(registry.model, ids), _logits(peft_model, ids), atol=ATOL, rtol=0)
        assert registry.device_bytes() <= registry.max_device_bytes
        assert registry.device_names()[-1] == name  # the one just used is the most recent
    # a miss, b miss, c miss (evicts a), a miss (evicts b), a hit, b miss (evicts c), c miss (evicts a), b hit
    assert (registry.hits, registry.misses, registry.evictions) == (2, 6, 4)
    assert registry.device_names() == ["c", "b"]
    assert registry.stats()["on_device"] == 2


def test_adapter_larger_than_device_budget(adapter_dirs):
    registry = AdapterRegistry(build_tiny("llama"), max_device_bytes=1000)
    with pytest.raises(ValueError, match="more than the whole device budget"):
        registry.load("b", adapter_dirs["b"])
    assert registry.names() == [] and registry.layer_names() == []


def test_merge_equals_unmerged_and_unmerge_restores_base(adapter_dirs):
    registry = AdapterRegistry(build_tiny("llama"))
    for name in ("a", "b", "rs"):
        registry.load(name, adapter_dirs[name])
    ids = tiny_inputs(registry.model, batch=2, seq=8)
    base_weights = _snapshot(registry.model)
    base = _logits(registry.model, ids)
    peft_model = _peft(adapter_dirs, ["b"])
    for name in ("b", "rs"):
        registry.set_adapter(name)
        unmerged = _logits(registry.model, ids)
        registry.disable()
        registry.merge(name)
        merged = _logits(registry.model, ids)
        torch.testing.assert_close(merged, unmerged, atol=ATOL, rtol=0)
        if name == "b":
            peft_model.merge_adapter()
            torch.testing.assert_close(merged, _logits(peft_model, ids), atol=ATOL, rtol=0)
        with pytest.raises(ValueError, match="unmerge"):
            registry.set_adapter("a")
        with pytest.raises(ValueError, match="unmerge"):
            registry.merge("a")
        with pytest.raises(ValueError, match="unmerge"):
            registry.delete(name)
        registry.unmerge()
        now = registry.model.state_dict()
        worst = max((now[k] - v).abs().max().item() for k, v in base_weights.items())
        assert worst < 1e-6  # W + dW - dW == W up to one float rounding
        torch.testing.assert_close(_logits(registry.model, ids), base, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="nothing to unmerge"):
        registry.unmerge()


def test_adapter_saved_with_dropout_serves_like_peft(dropout_adapter_dir):
    """lora_dropout=0.1 in the file: set_adapter and a mixed batch are deterministic and equal PEFT's."""
    from lora_lab import serving

    registry = AdapterRegistry(build_tiny("llama").train())  # even a model left in train mode
    registry.load("d", dropout_adapter_dir)
    registry.set_adapter("d")
    theirs = PeftModel.from_pretrained(build_tiny("llama").train(), dropout_adapter_dir)
    ids = tiny_inputs(registry.model, batch=2, seq=9)
    assert_inference_like_peft(registry.model, theirs, ids)
    mixed = [serving.forward(registry, ids, ["d", "d"]) for _ in range(2)]
    assert torch.equal(mixed[0], mixed[1])
    torch.testing.assert_close(mixed[0], _logits(theirs, ids), atol=ATOL, rtol=0)


def test_rank_and_alpha_patterns_serve_and_merge_like_peft(pattern_adapter_dir, adapter_dirs):
    """An adapter with rank_pattern / alpha_pattern: set_adapter and merge equal PEFT's from_pretrained."""
    registry = AdapterRegistry(build_tiny("llama"), max_rank=8)
    registry.load("p", pattern_adapter_dir)
    registry.load("a", adapter_dirs["a"])
    assert registry.adapter("p").r == 8  # the largest rank of any layer
    theirs = PeftModel.from_pretrained(build_tiny("llama"), pattern_adapter_dir).eval()
    ids = tiny_inputs(registry.model, batch=2, seq=7)
    registry.set_adapter("p")
    torch.testing.assert_close(_logits(registry.model, ids), _logits(theirs, ids), atol=ATOL, rtol=0)
    registry.disable()
    registry.merge("p")
    torch.testing.assert_close(_logits(registry.model, ids), _logits(theirs, ids), atol=ATOL, rtol=0)
    registry.unmerge()
    with pytest.raises(ValueError, match="r=8, above this registry's max_rank=4"):
        AdapterRegistry(build_tiny("llama"), max_rank=4).load("p", pattern_adapter_dir)


def _broken_copy(src, dst, **config_changes):
    """A copy of an adapter folder with one NaN in a tensor (no changes) or with config changes."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if config_changes:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps(cfg | config_changes))
    else:
        tensors = load_file(dst / "adapter_model.safetensors")
        tensors[sorted(tensors)[0]][0, 0] = float("nan")
        save_file(tensors, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    return dst


REGISTRY_BAD_ARGS = {
    "max_device_bytes_true": ({"max_device_bytes": True}, "max_device_bytes must be a positive int"),
    "max_device_bytes_float": ({"max_device_bytes": 1e6}, "max_device_bytes must be a positive int"),
    "max_rank_true": ({"max_rank": True}, "max_rank must be a positive int"),
    "max_rank_zero": ({"max_rank": 0}, "max_rank must be a positive int"),
}


@pytest.mark.parametrize("kwargs, match", list(REGISTRY_BAD_ARGS.values()), ids=list(REGISTRY_BAD_ARGS))
def test_bad_registry_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdapterRegistry(build_tiny("llama"), **kwargs)


@pytest.mark.parametrize(
    "changes, match",
    [({}, "1 NaN/inf value"), ({"r": 8, "lora_alpha": 16}, r"rank-4 tensors .* says r=8")],
    ids=["nan_in_a_tensor", "config_r_8_tensors_r_4"],
)
def test_broken_adapter_files_are_refused_by_the_registry(adapter_dirs, tmp_path, changes, match):
    registry = AdapterRegistry(build_tiny("llama"))
    registry.load("a", adapter_dirs["a"])
    snapshot, layers = _snapshot(registry.model), registry.layer_names()
    with pytest.raises(ValueError, match=match):
        registry.load(
            "broken",
            _broken_copy(adapter_dirs["a"], tmp_path / "x", **changes),
        )
    assert (
        registry.names() == ["a"]
        and registry.layer_names() == layers
        and _same_state(registry.model, snapshot)
    )


def test_pickle_only_adapter_names_the_registry_option(adapter_dirs, tmp_path):
    import shutil

    from safetensors.torch import load_file

    shutil.copytree(adapter_dirs["a"], tmp_path / "bin")
    torch.save(
        load_file(tmp_path / "bin" / "adapter_model.safetensors"), tmp_path / "bin" / "adapter_model.bin"
    )
    (tmp_path / "bin" / "adapter_model.safetensors").unlink()
    registry = AdapterRegistry(build_tiny("llama"))
    with pytest.raises(ValueError, match="allow_pickle=True"):
        registry.load("bin", tmp_path / "bin")
    assert registry.names() == []
    registry.load("bin", tmp_path / "bin", allow_pickle=True)  # the option the message names exists
    assert registry.names() == ["bin"]


CHANGES_DURING_A_MIXED_BATCH = {
    "load": lambda reg, dirs: reg.load("c", dirs["c"]),
    "delete": lambda reg, dirs: reg.delete("b"),
    "set_adapter": lambda reg, dirs: reg.set_adapter("b"),
    "disable": lambda reg, dirs: reg.disable(),
    "merge": lambda reg, dirs: reg.merge("a"),
    "unmerge": lambda reg, dirs: reg.unmerge(),
    "another_mixed_batch": lambda reg, dirs: _forward(reg),
}


def _forward(registry):
    from lora_lab import serving

    return serving.forward(registry, tiny_inputs(registry.model, batch=2), ["b", "a"])


@pytest.mark.parametrize(
    "change", list(CHANGES_DURING_A_MIXED_BATCH.values()), ids=list(CHANGES_DURING_A_MIXED_BATCH)
)
def test_registry_changes_inside_a_mixed_batch_are_refused(adapter_dirs, change):
    """Inside `with serving.mixed_batch(...)` the rows are bound to their adapters: changes would
    silently turn every row into the base model, so they raise and leave the batch running."""
    from lora_lab import serving

    registry = AdapterRegistry(build_tiny("llama"))
    registry.load("a", adapter_dirs["a"])
    registry.load("b", adapter_dirs["b"])
    ids = tiny_inputs(registry.model, batch=2)
    expected = serving.forward(registry, ids, ["a", "b"])
    with serving.mixed_batch(registry, ["a", "b"]):
        with pytest.raises(
            RuntimeError, match="inside an open serving.mixed_batch block.*Leave the `with` block"
        ):
            change(registry, adapter_dirs)
        torch.testing.assert_close(_logits(registry.model, ids), expected, atol=0, rtol=0)
    assert registry.names() == ["a", "b"] and registry.open_mixed_batches == 0
    registry.load("c", adapter_dirs["c"])  # fine again after the block
