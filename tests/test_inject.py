"""add_lora / remove_lora / counting, cross-checked against PEFT's get_peft_model on tiny models."""

from __future__ import annotations

import pytest
import torch
from conftest import TARGETS, build_tiny, copy_lora_into_peft, load_4bit, tiny_inputs, to_peft_config
from peft import get_peft_model

from lora_lab.inject import (
    LoRAConfig,
    add_lora,
    count_parameters,
    lora_layers,
    mark_only_lora_as_trainable,
    print_trainable_parameters,
    remove_lora,
    resolve_target_modules,
    trainable_parameters_line,
)
from lora_lab.layers import LoRALinear


def _snapshot(model):
    """Everything a failed call must leave untouched: weights, requires_grad flags, module types."""
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {k: p.requires_grad for k, p in model.named_parameters()},
        [type(m) for m in model.modules()],
    )


def _assert_unchanged(model, snap):
    weights, grads, types = snap
    now = model.state_dict()
    assert set(now) == set(weights)
    assert all(torch.equal(now[k], v) for k, v in weights.items())
    assert {k: p.requires_grad for k, p in model.named_parameters()} == grads
    assert [type(m) for m in model.modules()] == types
    assert "lora_config" not in model.__dict__


def _targets_variants(kind):
    return [TARGETS[kind], TARGETS[kind][:2], "all-linear", r".*\.0\..*" + TARGETS[kind][0]]


@pytest.mark.parametrize("variant", range(4))
def test_same_layers_counts_and_line_as_peft(tiny_kind, variant, capsys):
    targets = _targets_variants(tiny_kind)[variant]
    config = LoRAConfig(r=4, lora_alpha=8, target_modules=targets)
    ours = add_lora(build_tiny(tiny_kind), config)
    theirs = get_peft_model(build_tiny(tiny_kind), to_peft_config(config))
    ours_names = [n for n, _ in lora_layers(ours)]
    theirs_names = [
        n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A") and n
    ]
    theirs_names = [n for n in theirs_names if not n.endswith(("lora_A", "lora_B"))]
    assert ours_names == theirs_names
    assert "lm_head" not in " ".join(ours_names)  # all-linear leaves the output head alone
    assert count_parameters(ours) == theirs.get_nb_trainable_parameters()
    theirs.print_trainable_parameters()
    peft_line = capsys.readouterr().out.strip()
    print_trainable_parameters(ours)
    assert capsys.readouterr().out.strip() == peft_line == trainable_parameters_line(ours)
    assert peft_line.startswith("trainable params: ")


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_same_seed_same_initial_adapter_as_peft(init):
    config = LoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS["llama"], init_lora_weights=init)
    base1, base2 = build_tiny("llama"), build_tiny("llama")
    torch.manual_seed(7)
    ours = add_lora(base1, config)
    torch.manual_seed(7)
    theirs = get_peft_model(base2, to_peft_config(config))
    theirs_sd = {k.replace(".default.", "."): v for k, v in theirs.named_parameters() if "lora_" in k}
    for name, p in ours.named_parameters():
        if "lora_" in name:
            assert torch.equal(p, theirs_sd["base_model.model." + name]), name


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_and_merge_equal_peft(tiny_kind, rslora):
    """Same A/B values: same logits (1e-6, fp32) before merge, after merge, and the same merged weights."""
    from lora_lab.merge import merge_adapters, merge_and_unload

    config = LoRAConfig(
        r=4, lora_alpha=16, target_modules="all-linear", use_rslora=rslora, init_lora_weights=False
    )
    ours = add_lora(build_tiny(tiny_kind), config)
    theirs = get_peft_model(build_tiny(tiny_kind), to_peft_config(config))
    assert copy_lora_into_peft(ours, theirs) > 0
    ids = tiny_inputs(ours)
    base_logits = build_tiny(tiny_kind)(ids).logits
    with torch.no_grad():
        ours_logits = ours(ids).logits
        assert (ours_logits - base_logits).abs().max() > 1e-3  # the adapter really changes the output
        assert (ours_logits - theirs(ids).logits).abs().max().item() <= 1e-6
        merge_adapters(ours)
        theirs.merge_adapter()
        assert (ours(ids).logits - theirs(ids).logits).abs().max().item() <= 1e-6
        assert (ours(ids).logits - ours_logits).abs().max().item() <= 1e-5
    plain_ours = merge_and_unload(ours)
    plain_theirs = theirs.merge_and_unload()
    sd_ours, sd_theirs = plain_ours.state_dict(), plain_theirs.state_dict()
    assert set(sd_ours) == set(sd_theirs)
    assert all(torch.equal(sd_ours[k], sd_theirs[k]) for k in sd_ours)


def test_targets_follow_peft_matching_rules(tiny_llama):
    names = resolve_target_modules(tiny_llama, ["q_proj"])
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert resolve_target_modules(tiny_llama, r"model\.layers\.1\.self_attn\.(q|v)_proj") == [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    # a regex must match the whole name: "q_proj" alone as a string matches nothing
    with pytest.raises(ValueError, match="matched no layer"):
        resolve_target_modules(tiny_llama, "q_proj")
    # an exact full name in a list also works
    assert resolve_target_modules(tiny_llama, ["model.layers.0.mlp.up_proj"]) == [
        "model.layers.0.mlp.up_proj"
    ]


def test_gpt2_conv1d_layers_are_wrapped_with_fan_in_fan_out(tiny_gpt2):
    add_lora(tiny_gpt2, LoRAConfig(r=2, lora_alpha=4, target_modules=["c_attn"]))
    (name, layer), *_ = lora_layers(tiny_gpt2)
    assert name == "transformer.h.0.attn.c_attn"
    assert layer.fan_in_fan_out
    assert (layer.in_features, layer.out_features) == (32, 96)


def test_only_lora_is_trainable_and_remove_restores(tiny_opt):
    ids = tiny_inputs(tiny_opt)
    before = tiny_opt(ids).logits
    originals = {n: tiny_opt.get_submodule(n) for n in resolve_target_modules(tiny_opt, ["q_proj", "fc1"])}
    add_lora(
        tiny_opt, LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "fc1"], init_lora_weights=False)
    )
    trainable = [n for n, p in tiny_opt.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(originals)
    assert (tiny_opt(ids).logits - before).abs().max() > 1e-4
    from lora_lab.merge import merge_adapters

    merge_adapters(tiny_opt)
    remove_lora(tiny_opt)  # a merged layer is unmerged before it is removed
    assert not list(lora_layers(tiny_opt))
    assert all(tiny_opt.get_submodule(n) is m for n, m in originals.items())
    torch.testing.assert_close(tiny_opt(ids).logits, before, rtol=0, atol=1e-5)
    assert "lora_config" not in tiny_opt.__dict__


def test_mark_only_lora_as_trainable(tiny_llama):
    add_lora(tiny_llama, LoRAConfig(target_modules=["v_proj"]))
    tiny_llama.requires_grad_(True)
    mark_only_lora_as_trainable(tiny_llama)
    # 2 layers x (A [8, 32] + B [16, 8]): v_proj maps hidden 32 to 2 kv heads x 8 = 16
    assert count_parameters(tiny_llama)[0] == 2 * (8 * 32 + 16 * 8)


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"r": 0}, ValueError, "positive integer"),
        ({"r": -4}, ValueError, "positive integer"),
        ({"lora_alpha": 0}, ValueError, "lora_alpha must be a positive"),
        ({"lora_alpha": -8}, ValueError, "lora_alpha must be a positive"),
        ({"lora_dropout": 1.0}, ValueError, r"\[0, 1\)"),
        ({"lora_dropout": -0.5}, ValueError, r"\[0, 1\)"),
        ({"target_modules": []}, ValueError, "non-empty list"),
        ({"target_modules": "("}, ValueError, "not a valid regular expression"),
        ({"target_modules": 5}, TypeError, "target_modules"),
        ({"bias": "all"}, ValueError, "bias='none'"),
        ({"lora_alpha": float("inf")}, ValueError, "positive finite number"),
        ({"lora_alpha": float("nan")}, ValueError, "positive finite number"),
        ({"lora_dropout": float("nan")}, ValueError, r"\[0, 1\)"),
        ({"rank_pattern": {"q_proj": 0}}, ValueError, r"rank_pattern\['q_proj'\]: r \(the LoRA rank\)"),
        ({"rank_pattern": {"q_proj": 2.5}}, ValueError, r"rank_pattern\['q_proj'\]"),
        ({"rank_pattern": {"(": 2}}, ValueError, "not a valid regular expression"),
        ({"rank_pattern": ["q_proj"]}, TypeError, "rank_pattern must be a dict"),
        ({"alpha_pattern": {"v_proj": float("inf")}}, ValueError, r"alpha_pattern\['v_proj'\]: lora_alpha"),
        ({"alpha_pattern": {"": 4}}, ValueError, "module name patterns"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else "",
)
def test_bad_config_is_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        LoRAConfig(**kwargs)


def test_config_mutated_to_bad_value_is_refused_by_add_lora(tiny_llama):
    config = LoRAConfig(target_modules=["q_proj"])
    config.r = 0
    snap = _snapshot(tiny_llama)
    with pytest.raises(ValueError, match="positive integer"):
        add_lora(tiny_llama, config)
    _assert_unchanged(tiny_llama, snap)


@pytest.mark.parametrize(
    "config, match",
    [
        (
            LoRAConfig(r=1000, target_modules=["q_proj"]),
            r"r=1000 is larger than layer model\.layers\.0\.self_attn\.q_proj",
        ),
        (LoRAConfig(r=17, target_modules=["k_proj"]), r"\[16, 32\], so B A has rank at most 16.*Use r <= 16"),
        (LoRAConfig(r=4, target_modules=["q_proj", "k_proj"], rank_pattern={"k_proj": 32}), "r=32 is larger"),
    ],
    ids=["r_1000_on_32x32", "r_17_on_16x32", "rank_pattern_too_big"],
)
def test_rank_larger_than_the_layer_is_refused(tiny_llama, config, match):
    snap = _snapshot(tiny_llama)
    with pytest.raises(ValueError, match=match):
        add_lora(tiny_llama, config)
    _assert_unchanged(tiny_llama, snap)


def test_targets_matching_nothing_list_the_candidates(tiny_kind):
    model = build_tiny(tiny_kind)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="matched no layer") as info:
        add_lora(model, LoRAConfig(target_modules=["query", "value"]))
    for name in TARGETS[tiny_kind]:
        assert name in str(info.value)
    _assert_unchanged(model, snap)


def test_target_that_is_not_linear_is_refused(tiny_llama):
    snap = _snapshot(tiny_llama)
    with pytest.raises(TypeError, match="linear layers only"):
        add_lora(tiny_llama, LoRAConfig(target_modules=["self_attn"]))
    _assert_unchanged(tiny_llama, snap)


def test_injecting_twice_is_refused(tiny_llama):
    add_lora(tiny_llama, LoRAConfig(target_modules=["q_proj"]))
    weights = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(tiny_llama, LoRAConfig(target_modules=["v_proj"]))
    assert set(tiny_llama.state_dict()) == set(weights)
    assert len(list(lora_layers(tiny_llama))) == 2
    assert not isinstance(tiny_llama.get_submodule("model.layers.0.self_attn.v_proj"), LoRALinear)


def test_remove_without_lora_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="no LoRA layers"):
        remove_lora(tiny_llama)


def test_bundled_model_forward_counts_and_merge_equal_peft(capsys):
    from lora_lab.merge import merge_and_unload

    base = build_tiny("tiny-base")  # skips while data/models/tiny-base is not built
    config = LoRAConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    ours = add_lora(base, config)
    theirs = get_peft_model(build_tiny("tiny-base"), to_peft_config(config))
    copy_lora_into_peft(ours, theirs)
    theirs.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == trainable_parameters_line(ours)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids).logits - theirs(ids).logits).abs().max().item() <= 1e-6
    sd_ours, sd_theirs = merge_and_unload(ours).state_dict(), theirs.merge_and_unload().state_dict()
    assert all(torch.equal(sd_ours[k], sd_theirs[k]) for k in sd_ours)


def test_count_parameters_counts_lora_lab_nf4_weights_as_the_weights_they_stand_for():
    from lora_lab import nf4

    model = nf4.quantize_model(torch.nn.Sequential(torch.nn.Linear(128, 64)))
    assert count_parameters(model) == (0, 128 * 64 + 64)  # packed weight (as 8,192 weights) + bias
    add_lora(model, LoRAConfig(r=4, lora_alpha=4, target_modules=["0"]))
    mark_only_lora_as_trainable(model)
    assert count_parameters(model) == (4 * 128 + 64 * 4, 128 * 64 + 64 + 4 * 128 + 64 * 4)


def test_count_parameters_counts_bitsandbytes_4bit_weights_as_peft_does(saved_tiny_llama):
    """A bitsandbytes `Params4bit` of shape [n/2, 1] (uint8) holds n weights: counted as n, as PEFT's
    `get_nb_trainable_parameters` does, so the 4-bit model has as many parameters as the fp32 one."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    quantized = load_4bit(saved_tiny_llama)
    full = count_parameters(AutoModelForCausalLM.from_pretrained(saved_tiny_llama))[1]
    assert count_parameters(quantized)[1] == full
    assert sum(p.numel() for p in quantized.parameters()) < full  # numel() alone counts packed bytes
    theirs = get_peft_model(
        quantized, to_peft_config(LoRAConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    )
    assert count_parameters(theirs) == theirs.get_nb_trainable_parameters()
    assert count_parameters(theirs)[0] > 0


def test_disable_adapter_gives_the_base_model_for_the_block(tiny_kind):
    from lora_lab.inject import disable_adapter

    model = build_tiny(tiny_kind)
    ids = torch.randint(0, 100, (2, 6))
    with torch.no_grad():
        base = model(ids).logits
        add_lora(model, LoRAConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
        patched = model(ids).logits
        with disable_adapter(model):
            torch.testing.assert_close(model(ids).logits, base)
        torch.testing.assert_close(model(ids).logits, patched)
