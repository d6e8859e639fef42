"""LoRALinear: shapes, init, forward, merge, and the same numbers as PEFT's lora.Linear."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig
from peft.tuners.lora import layer as peft_layer
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_lab.layers import LoRALinear, lora_scaling


def _linear(in_f=16, out_f=12, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f).to(dtype)


def _peft_linear(base, r, alpha, rslora=False, conv1d=False, dropout=0.0):
    config = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, fan_in_fan_out=conv1d, lora_dropout=dropout)
    return peft_layer.Linear(base, "default", config=config, r=r, lora_alpha=alpha)


def _copy_ab(ours: LoRALinear, peft_mod) -> None:
    with torch.no_grad():
        peft_mod.lora_A["default"].weight.copy_(ours.lora_A.weight)
        peft_mod.lora_B["default"].weight.copy_(ours.lora_B.weight)


def test_shapes_and_scaling():
    layer = LoRALinear(_linear(4096 // 64, 4096 // 128), r=8, lora_alpha=16)
    assert layer.lora_A.weight.shape == (8, 64)  # [r, in]
    assert layer.lora_B.weight.shape == (32, 8)  # [out, r]
    assert layer.scaling == 2.0
    assert LoRALinear(_linear(), r=16, lora_alpha=16, use_rslora=True).scaling == pytest.approx(4.0)
    assert lora_scaling(4, 8, use_rslora=True) == 4.0


def test_parameter_arithmetic_4096():
    """The seed's example: W is 4096 x 4096; r=8 trains 8*4096*2 = 65,536 numbers, 256x fewer."""
    with torch.device("meta"):
        layer = LoRALinear(nn.Linear(4096, 4096, bias=False), r=8, lora_alpha=8)
    trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in layer.parameters() if not p.requires_grad)
    assert trainable == 65_536
    assert frozen // trainable == 256


def test_base_is_frozen_and_lora_trainable():
    layer = LoRALinear(_linear(), r=4, lora_alpha=8)
    assert not any(p.requires_grad for p in layer.base_layer.parameters())
    assert layer.lora_A.weight.requires_grad and layer.lora_B.weight.requires_grad
    assert set(layer.state_dict()) == {
        "base_layer.weight",
        "base_layer.bias",
        "lora_A.weight",
        "lora_B.weight",
    }


def test_default_init_is_kaiming_a_and_zero_b():
    layer = LoRALinear(_linear(in_f=400), r=8, lora_alpha=8)
    bound = 1 / math.sqrt(400)  # kaiming_uniform(a=sqrt(5)) is U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A.weight.abs().max() <= bound
    assert layer.lora_A.weight.abs().max() > 0.9 * bound
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    x = torch.randn(3, 400)
    assert torch.equal(layer(x), layer.base_layer(x))  # B = 0: the patched layer starts as the base


@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_init_draws_the_same_numbers_as_peft(init):
    base, twin = _linear(in_f=64, out_f=48), _linear(in_f=64, out_f=48)
    torch.manual_seed(123)
    ours = LoRALinear(base, r=8, lora_alpha=8, init_lora_weights=init)
    torch.manual_seed(123)
    config = LoraConfig(r=8, lora_alpha=8, init_lora_weights=init)
    theirs = peft_layer.Linear(twin, "default", config=config, r=8, lora_alpha=8)
    assert torch.equal(ours.lora_A.weight, theirs.lora_A["default"].weight)
    assert torch.equal(ours.lora_B.weight, theirs.lora_B["default"].weight)
    if init == "gaussian":
        assert ours.lora_A.weight.std().item() == pytest.approx(1 / 8, rel=0.2)


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("conv1d", [False, True])
def test_forward_equals_formula_and_peft(conv1d, rslora):
    torch.manual_seed(0)
    if conv1d:
        base, twin = Conv1D(12, 16), Conv1D(12, 16)  # nf=out, nx=in
        twin.load_state_dict(base.state_dict())
        w = base.weight.T  # Conv1D stores [in, out]
    else:
        base, twin = _linear(), _linear()
        w = base.weight
    ours = LoRALinear(base, r=4, lora_alpha=8, use_rslora=rslora, init_lora_weights=False)
    theirs = _peft_linear(twin, 4, 8, rslora=rslora, conv1d=conv1d)
    _copy_ab(ours, theirs)
    x = torch.randn(2, 5, 16)  # [batch, seq, in]
    s = 8 / math.sqrt(4) if rslora else 8 / 4
    expected = x @ w.T + base.bias + s * (x @ ours.lora_A.weight.T @ ours.lora_B.weight.T)
    torch.testing.assert_close(ours(x), expected, rtol=0, atol=1e-5)
    assert (ours(x) - theirs(x)).abs().max().item() <= 1e-6
    # the delta is laid out like the base weight, and equals PEFT's
    assert ours.delta_weight().shape == base.weight.shape
    torch.testing.assert_close(ours.delta_weight(), theirs.get_delta_weight("default"), rtol=0, atol=0)


def test_bf16_base_keeps_fp32_patch_like_peft():
    base = _linear(dtype=torch.bfloat16)
    twin = _linear(dtype=torch.bfloat16)
    torch.manual_seed(5)
    ours = LoRALinear(base, r=4, lora_alpha=8, init_lora_weights=False)
    assert ours.lora_A.weight.dtype == torch.float32
    theirs = _peft_linear(twin, 4, 8)
    theirs.lora_A["default"].float()
    theirs.lora_B["default"].float()  # what get_peft_model's autocast_adapter_dtype does
    _copy_ab(ours, theirs)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    out = ours(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, theirs(x))


def test_dropout_only_on_the_lora_branch():
    layer = LoRALinear(_linear(), r=4, lora_alpha=8, lora_dropout=0.5).train()
    assert isinstance(layer.lora_dropout, nn.Dropout)
    x = torch.randn(4, 16)
    torch.testing.assert_close(layer(x), layer.base_layer(x))  # B = 0: dropout must not touch the base path
    assert isinstance(LoRALinear(_linear(), r=4, lora_alpha=8).lora_dropout, nn.Identity)


def test_disable_adapter_gives_base_output_and_restores_the_merge():
    layer = LoRALinear(_linear(), r=4, lora_alpha=8, init_lora_weights=False)
    x = torch.randn(4, 16)
    base_out = layer.base_layer(x).clone()
    patched = layer(x)
    assert not torch.allclose(patched, base_out)
    with layer.disable_adapter():
        assert layer.disabled
        torch.testing.assert_close(layer(x), base_out)
    assert not layer.disabled
    torch.testing.assert_close(layer(x), patched)
    layer.merge()
    with layer.disable_adapter():  # a merged patch is taken out for the block, and put back after
        assert not layer.merged
        torch.testing.assert_close(layer(x), base_out, rtol=0, atol=1e-6)
    assert layer.merged
    torch.testing.assert_close(layer(x), patched, rtol=0, atol=1e-5)


@pytest.mark.parametrize("conv1d", [False, True])
def test_merge_matches_unmerged_forward_and_peft(conv1d):
    torch.manual_seed(1)
    base = Conv1D(12, 16) if conv1d else _linear()
    twin = Conv1D(12, 16) if conv1d else _linear()
    twin.load_state_dict(base.state_dict())
    ours = LoRALinear(base, r=4, lora_alpha=8, init_lora_weights=False)
    theirs = _peft_linear(twin, 4, 8, conv1d=conv1d)
    _copy_ab(ours, theirs)
    x = torch.randn(3, 16)
    before = ours(x)
    ours.merge()
    theirs.merge()
    assert ours.merged
    assert torch.equal(ours.base_layer.weight, theirs.base_layer.weight)
    torch.testing.assert_close(ours(x), before, rtol=0, atol=1e-6)
    assert (ours(x) - theirs(x)).abs().max().item() <= 1e-6


def test_merge_twice_and_unmerge_unmerged_raise():
    layer = LoRALinear(_linear(), r=4, lora_alpha=8, init_lora_weights=False)
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge()
    layer.merge()
    w = layer.base_layer.weight.clone()
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, w)


def test_safe_merge_refuses_non_finite_and_leaves_weight():
    layer = LoRALinear(_linear(), r=4, lora_alpha=8, init_lora_weights=False)
    with torch.no_grad():
        layer.lora_B.weight[0, 0] = float("inf")
    w = layer.base_layer.weight.clone()
    with pytest.raises(ValueError, match="NaN/inf"):
        layer.merge(safe=True)
    assert torch.equal(layer.base_layer.weight, w)
    assert not layer.merged


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"r": 0}, "positive integer"),
        ({"r": -2}, "positive integer"),
        ({"r": 2.5}, "positive integer"),
        ({"lora_alpha": 0}, "lora_alpha must be a positive"),
        ({"lora_alpha": -1.0}, "lora_alpha must be a positive"),
        ({"lora_dropout": 1.0}, r"\[0, 1\)"),
        ({"lora_dropout": -0.1}, r"\[0, 1\)"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    base = _linear()
    w = base.weight.clone()
    args = {"r": 4, "lora_alpha": 8} | kwargs
    with pytest.raises(ValueError, match=match):
        LoRALinear(base, **args)
    assert torch.equal(base.weight, w)
    assert base.weight.requires_grad  # not frozen: nothing was changed


def test_refuses_non_linear_and_double_wrap():
    with pytest.raises(TypeError, match="in_features"):
        LoRALinear(nn.LayerNorm(8), r=2, lora_alpha=2)
    layer = LoRALinear(_linear(), r=2, lora_alpha=2)
    with pytest.raises(TypeError, match="already has LoRA"):
        LoRALinear(layer, r=2, lora_alpha=2)


def test_wrong_fan_in_fan_out_is_corrected_with_warning():
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        layer = LoRALinear(_linear(), r=2, lora_alpha=2, fan_in_fan_out=True)
    assert layer.fan_in_fan_out is False


def test_bnb_linear4bit_base_matches_peft_and_refuses_merge():
    bnb = pytest.importorskip("bitsandbytes")
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    def quantized():
        torch.manual_seed(0)
        dense = nn.Linear(64, 32)
        q = bnb.nn.Linear4bit(64, 32, bias=True, compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
        q.bias = nn.Parameter(dense.bias.data.clone())
        return q.to("cpu")

    ours = LoRALinear(quantized(), r=4, lora_alpha=8, init_lora_weights=False)
    assert ours.lora_A.weight.dtype == torch.float32
    theirs = PeftLinear4bit(quantized(), "default", config=LoraConfig(r=4, lora_alpha=8), r=4, lora_alpha=8)
    _copy_ab(ours, theirs)
    x = torch.randn(3, 64)
    assert (ours(x) - theirs(x)).abs().max().item() <= 1e-6
    with pytest.raises(TypeError, match="quantized"):
        ours.merge()
    assert not ours.merged


@settings(max_examples=25, deadline=None)
@given(
    in_f=st.integers(1, 24),
    out_f=st.integers(1, 24),
    r=st.integers(1, 8),
    alpha=st.floats(0.5, 64),
    conv1d=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_merge_then_unmerge_restores_w(in_f, out_f, r, alpha, conv1d, seed):
    torch.manual_seed(seed)
    base = Conv1D(out_f, in_f) if conv1d else nn.Linear(in_f, out_f)
    w0 = base.weight.detach().clone()
    layer = LoRALinear(base, r=r, lora_alpha=alpha, init_lora_weights=False)
    x = torch.randn(2, in_f)
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-5)
