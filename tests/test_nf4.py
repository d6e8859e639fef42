"""Tests for lora_lab.nf4: NF4 quantization bit-exact with bitsandbytes, the 4-bit layer, QLoRA, merging.

Cross-checks run on the CPU against bitsandbytes 0.50.2 (`functional.quantize_4bit`,
`dequantize_4bit`, `create_dynamic_map`, `nn.Linear4bit`), transformers' `BitsAndBytesConfig`
loading and PEFT's LoRA over `Linear4bit`. Dequantized values are compared with bitsandbytes'
portable path on every CPU, and with its native kernel through `bnb_cpu.compare_native_dequantize`,
which accepts only "the same" or exactly the known AVX512 block-span bug (see lora_lab.bnb_cpu).
"""

from __future__ import annotations

import math
import warnings

import bitsandbytes as bnb
import bitsandbytes.functional as bF
import pytest
import torch
from conftest import load_4bit
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lora_lab import bnb_cpu, nf4

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _no_torch_compile():
    # bitsandbytes' pure-torch fallback (odd last dimension) is wrapped in torch.compile, which takes
    # tens of seconds to compile on this machine; eager gives the same numbers.
    with torch._dynamo.config.patch(disable=True):
        yield


def _weights(shape, dtype=torch.float32, seed=0, std=0.02):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * std).to(dtype)


def assert_same_as_bnb(w, blocksize=64, double_quant=False, quant_type="nf4"):
    """lora_lab and bitsandbytes agree exactly: packed bytes, every state tensor, dequantized values."""
    packed, state = nf4.quantize_4bit(w, blocksize, double_quant, quant_type)
    ref_packed, ref_state = bF.quantize_4bit(
        w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
    )
    assert packed.dtype == torch.uint8 and packed.shape == ref_packed.shape == ((w.numel() + 1) // 2, 1)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(state.absmax, ref_state.absmax)
    assert state.double_quant == ref_state.nested
    if double_quant:
        assert state.absmax.dtype == torch.uint8
        assert torch.equal(state.offset, ref_state.offset)
        assert torch.equal(state.nested_absmax, ref_state.state2.absmax)
        assert state.nested_absmax.dtype == torch.float32
    else:
        assert state.absmax.dtype == torch.float32
    ours = nf4.dequantize_4bit(packed, state)
    assert ours.shape == w.shape and ours.dtype == w.dtype
    # bitsandbytes' portable path returns [1, n] for a 1-D tensor; same values
    assert_same_as_bnb_dequantize(ours, ref_packed, ref_state)
    # and our state handed to bitsandbytes dequantizes the same
    assert_same_as_bnb_dequantize(ours, packed, state.to_bnb())
    return packed, state


def assert_same_as_bnb_dequantize(ours, packed, quant_state):
    """ours == bitsandbytes' portable dequantization; its native kernel is right or has exactly the bug."""
    assert torch.equal(bnb_cpu.portable_dequantize_4bit(packed, quant_state).reshape(ours.shape), ours)
    assert bnb_cpu.compare_native_dequantize(packed, quant_state) in {"exact", "block-span bug"}


# ---------------------------------------------------------------------------- code tables


def test_code_tables_equal_bitsandbytes():
    assert torch.equal(nf4.NF4_CODE, bF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4.FP4_CODE, bF.get_4bit_type("fp4", device="cpu"))
    assert nf4.NF4_CODE.numel() == 16 and bool((nf4.NF4_CODE.diff() > 0).all())  # sorted, distinct
    assert (nf4.NF4_CODE == 0).sum() == 1 and nf4.NF4_CODE[7] == 0  # exact zero, 8 below, 7 above
    assert nf4.INT4_CODE.numel() == 15 and torch.allclose(nf4.INT4_CODE * 7, torch.arange(-7.0, 8.0))


def test_dynamic_map_equals_bitsandbytes():
    ours = nf4.create_dynamic_map()
    assert torch.equal(ours, bF.create_dynamic_map())
    assert ours.numel() == 256 and ours[-1] == 1.0 and (ours == 0).sum() == 1
    assert torch.equal(nf4.create_dynamic_map(signed=False), bF.create_dynamic_map(signed=False))


# ---------------------------------------------------------------------------- quantize / dequantize


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("shape", [(64, 64), (96, 128), (256, 384), (1, 4096), (4096,)])
def test_nf4_bit_exact_with_bitsandbytes(shape, dtype, double_quant):
    assert_same_as_bnb(_weights(shape, dtype, seed=sum(shape)), 64, double_quant)


@pytest.mark.parametrize("blocksize", nf4.VALID_BLOCKSIZES)
def test_every_blocksize_bit_exact(blocksize):
    w = _weights((128, 512), seed=blocksize)
    for double_quant in (False, True):
        assert_same_as_bnb(w, blocksize, double_quant)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_fp4_bit_exact_with_bitsandbytes(dtype, double_quant):
    assert_same_as_bnb(_weights((192, 96), dtype, seed=3), 64, double_quant, quant_type="fp4")


@pytest.mark.parametrize("shape", [(37, 53), (3, 5, 7), (33, 65), (1000,), (5,)])
def test_partial_blocks_and_odd_counts_like_bitsandbytes(shape):
    """n not divisible by the block size: a shorter last block; n odd: a padding nibble (code 7 in NF4)."""
    w = _weights(shape, seed=7)
    for double_quant in (False, True):
        packed, state = assert_same_as_bnb(w, 64, double_quant)
        assert state.absmax.numel() == math.ceil(w.numel() / 64)
    if w.numel() % 2:
        assert packed[-1, 0] & 0xF == 7  # the padding is a scaled 0.0, i.e. NF4's zero code


def test_real_looking_weights(make_tiny):
    """Every linear weight of a tiny Llama, plus heavy-tailed and outlier-laden matrices."""
    model = make_tiny("llama")
    for module in model.modules():
        if isinstance(module, nn.Linear):
            for double_quant in (False, True):
                assert_same_as_bnb(module.weight.detach(), 64, double_quant)
    g = torch.Generator().manual_seed(5)
    heavy = torch.distributions.StudentT(3.0).sample((512, 256)) * 0.02
    outliers = _weights((256, 256), seed=6)
    outliers[torch.rand(outliers.shape, generator=g) < 0.001] = 1.5  # a few huge values, LLM-style
    zeros = _weights((8, 512), seed=8)
    zeros[2:4] = 0.0  # whole blocks of zeros: absmax 0
    for w in (heavy, outliers, zeros, heavy.bfloat16()):
        for double_quant in (False, True):
            assert_same_as_bnb(w, 64, double_quant)


def test_tie_goes_to_the_lower_code():
    """A value exactly on the midpoint between two codes rounds down, as in bitsandbytes."""
    code = nf4.NF4_CODE
    midpoints = (code[:-1] + code[1:]) / 2  # [15]
    # absmax = 1 (each block holds a 1.0), so the scaled value is the midpoint itself
    block = torch.cat([torch.tensor([1.0]), midpoints, torch.zeros(64 - 16)])
    above = torch.cat([torch.tensor([1.0]), torch.nextafter(midpoints, torch.tensor(2.0)), torch.zeros(48)])
    w = torch.stack([block, above])  # [2, 64]
    packed, state = assert_same_as_bnb(w)
    q = nf4.unpack_4bit(packed, w.numel()).reshape(2, 64)
    assert torch.equal(q[0, 1:16], torch.arange(15))  # on the midpoint: the lower code i
    assert torch.equal(q[1, 1:16], torch.arange(1, 16))  # one ulp above: the upper code i + 1


def _scaling_sensitive_blocks(n_blocks=8, blocksize=64):
    """Blocks [absmax, x1, x2, ...] where x * (1/absmax) and x / absmax land on different codes."""
    midpoints = (nf4.NF4_CODE[:-1] + nf4.NF4_CODE[1:]) / 2
    blocks = []
    for a in torch.linspace(0.3, 3.0, 100):
        xs, up, down = [midpoints * a], midpoints * a, midpoints * a
        for _ in range(3):  # a few ulps either side of each midpoint
            up, down = torch.nextafter(up, torch.tensor(9.0)), torch.nextafter(down, torch.tensor(-9.0))
            xs += [up, down]
        xs = torch.cat(xs)
        differ = torch.bucketize(xs * (1 / a), midpoints) != torch.bucketize(xs / a, midpoints)
        if differ.any():
            picked = xs[differ][: blocksize - 1]
            blocks.append(torch.cat([a.reshape(1), picked, torch.zeros(blocksize - 1 - picked.numel())]))
        if len(blocks) == n_blocks:
            return torch.stack(blocks)  # [n_blocks, blocksize]
    raise AssertionError("no scaling-sensitive values found")


def test_full_blocks_multiply_by_reciprocal_partial_block_divides():
    """bitsandbytes scales full blocks by x * (1/absmax) but the trailing partial block by x / absmax."""
    blocks = _scaling_sensitive_blocks()  # [8, 64]: here the two ways give different codes
    assert_same_as_bnb(blocks)  # all full blocks: reciprocal
    tail = blocks[0, :40]  # the same values as a 40-long partial last block: division
    w = torch.cat([_weights((64,), seed=1), tail])
    packed, state = assert_same_as_bnb(w)
    q_tail = nf4.unpack_4bit(packed, w.numel())[64:]
    assert torch.equal(q_tail, torch.bucketize(tail / tail[0], (nf4.NF4_CODE[:-1] + nf4.NF4_CODE[1:]) / 2))
    assert not torch.equal(
        q_tail, torch.bucketize(tail * (1 / tail[0]), (nf4.NF4_CODE[:-1] + nf4.NF4_CODE[1:]) / 2)
    )


def test_packing_order_high_nibble_first():
    codes = torch.tensor([1, 2, 15, 0, 7])
    packed = nf4.pack_4bit(codes)
    assert packed.tolist() == [[0x12], [0xF0], [0x70]]
    assert torch.equal(nf4.unpack_4bit(packed, 5), codes)


def test_double_quant_internals():
    """offset = mean(absmax); absmax - offset in 8-bit blocks of 256; dequantized scales are close."""
    w = _weights((512, 512), seed=11)
    _, plain = nf4.quantize_nf4(w, 64, double_quant=False)
    _, dq = nf4.quantize_nf4(w, 64, double_quant=True)
    assert torch.equal(dq.offset, plain.absmax.mean())
    assert dq.nested_absmax.numel() == math.ceil(plain.absmax.numel() / 256)
    assert torch.equal(dq.nested_absmax, (plain.absmax - dq.offset).reshape(-1, 256).abs().amax(1))
    err = (dq.scales() - plain.absmax).abs() / plain.absmax
    assert err.max() < 0.02  # 8-bit scales: about 1% worst case


def test_8bit_quantization_matches_bitsandbytes_cpu_kernel():
    """Our copy of bnb's CPU 8-bit kernel (65536-point grid + table) equals it; exact nearest differs."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64 * 1024, generator=g)
    ours, absmax = nf4.quantize_blockwise_8bit(x)
    theirs, state = bF.quantize_blockwise(x, blocksize=256)
    assert torch.equal(absmax, state.absmax)
    assert torch.equal(ours, theirs)
    exact, _ = nf4.quantize_blockwise_8bit(x, exact=True)
    assert 0 < (exact != theirs).sum() < 0.01 * x.numel()  # the grid moves a few values to a neighbour
    code = nf4.create_dynamic_map()
    normed = x / absmax.repeat_interleave(256)
    err_exact = (code[exact.long()] - normed).abs()
    err_grid = (code[ours.long()] - normed).abs()
    assert bool((err_exact <= err_grid).all())  # exact is never worse
    assert torch.equal(nf4.dequantize_blockwise_8bit(ours, absmax), bF.dequantize_blockwise(theirs, state))


def test_8bit_grid_boundaries_match_bitsandbytes():
    """Values at the edges of the kernel's 65536-point grid (where its fused multiply-add matters)."""
    g = torch.Generator().manual_seed(4)
    k = torch.randint(0, 65535, (255 * 256,), generator=g).float()
    edge = (k + 0.5) / 65535 * 2 - 1  # [n] just at a grid-cell boundary
    x = torch.stack(
        [edge, torch.nextafter(edge, torch.tensor(2.0)), torch.nextafter(edge, torch.tensor(-2.0))]
    )
    x = torch.cat([x.reshape(-1, 255), torch.ones(3 * 256, 1)], dim=1).reshape(-1)  # absmax 1 per block
    for scale in (1e-3, 1.0, 7.0):
        ours, absmax = nf4.quantize_blockwise_8bit(x * scale)
        theirs, state = bF.quantize_blockwise(x * scale, blocksize=256)
        assert torch.equal(absmax, state.absmax) and torch.equal(ours, theirs)


def test_8bit_cpu_kernel_reaches_249_of_256_codes():
    """The grid loses 7 of the dynamic map's tiny levels near 0; an exact search keeps them all."""
    grid = -1.0 + 2.0 * torch.arange(65536, dtype=torch.float32) / 65535  # every grid point once
    grid = torch.cat([grid, torch.zeros(255 * 258 - grid.numel())]).reshape(258, 255)
    x = torch.cat([torch.ones(258, 1), grid], dim=1).reshape(-1)  # each 256-block: absmax 1
    ours, _ = nf4.quantize_blockwise_8bit(x)
    theirs, _ = bF.quantize_blockwise(x, blocksize=256)
    assert torch.equal(ours, theirs)
    assert ours.unique().numel() == 249
    code = nf4.create_dynamic_map()  # [256]; contains 1.0, so normed == code
    assert torch.equal(nf4.quantize_blockwise_8bit(code, exact=True)[0].long(), torch.arange(256))
    assert torch.equal(nf4.quantize_blockwise_8bit(code)[0], bF.quantize_blockwise(code, blocksize=256)[0])


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(
        st.floats(-1e4, 1e4, allow_nan=False, allow_subnormal=False, width=32), min_size=1, max_size=300
    ),
    blocksize=st.sampled_from([32, 64, 128]),
    double_quant=st.booleans(),
)
def test_property_bit_exact_and_error_bounded(values, blocksize, double_quant):
    """For any float input: same bytes as bitsandbytes, and |w - deq(w)| <= half the widest gap * absmax."""
    w = torch.tensor(values, dtype=torch.float32)
    packed, state = nf4.quantize_4bit(w, blocksize, double_quant)
    ref_packed, ref_state = bF.quantize_4bit(
        w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4"
    )
    assert torch.equal(packed, ref_packed) and torch.equal(state.absmax, ref_state.absmax)
    if not double_quant:
        half_gap = nf4.NF4_CODE.diff().max() / 2  # 0.1385, between 0.723 and 1.0
        absmax = state.absmax.repeat_interleave(blocksize)[: w.numel()]
        err = (nf4.dequantize_4bit(packed, state) - w).abs()
        assert bool((err <= half_gap * absmax * (1 + 1e-6) + 1e-30).all())


def test_fake_quantize_and_code_comparison():
    """fake_quantize with NF4 equals dequantize(quantize); on normal weights NF4 beats INT4 and FP4."""
    w = _weights((512, 512), seed=12)
    packed, state = nf4.quantize_nf4(w)
    assert torch.equal(nf4.fake_quantize(w, nf4.NF4_CODE), nf4.dequantize_nf4(packed, state))
    packed4, state4 = nf4.quantize_fp4(w)
    assert torch.equal(nf4.fake_quantize(w, nf4.FP4_CODE), nf4.dequantize_4bit(packed4, state4))
    rmse = {
        name: (nf4.fake_quantize(w, code) - w).pow(2).mean().sqrt().item()
        for name, code in [("nf4", nf4.NF4_CODE), ("int4", nf4.INT4_CODE), ("fp4", nf4.FP4_CODE)]
    }
    assert rmse["nf4"] < rmse["int4"] < rmse["fp4"], rmse


# ---------------------------------------------------------------------------- bits per parameter, memory


def test_bits_per_param_measured_from_storage():
    assert nf4.bits_per_param(64, double_quant=False) == 4.5
    with_dq = nf4.bits_per_param(64, double_quant=True)
    assert abs(with_dq - 4.127) < 1e-3  # 4 + 8/64 + 32/(64*256) = 4.12695..., + the 4-byte offset
    n = 64 * 256 * 16
    assert with_dq == pytest.approx(nf4.bits_per_param_formula(64, True) + 32 / n, abs=1e-12)
    assert nf4.bits_per_param_formula(64, False) - nf4.bits_per_param_formula(64, True) == pytest.approx(
        0.373, abs=1e-3
    )
    # bitsandbytes' own state for the same tensor holds the same bytes
    w = torch.randn(n, generator=torch.Generator().manual_seed(0))
    packed, qs = bF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    bnb_bytes = sum(t.numel() * t.element_size() for t in (packed, qs.absmax, qs.offset, qs.state2.absmax))
    assert 8 * bnb_bytes / n == with_dq


def test_llama_weight_memory():
    m7 = nf4.llama_weight_memory("7B", double_quant=False)
    assert m7["params"] == 6_738_415_616
    assert m7["bf16_bytes"] == 2 * m7["params"]
    assert m7["nf4_bytes"] == m7["quantized_params"] * 4.5 / 8 + 2 * (m7["params"] - m7["quantized_params"])
    m65_dq, m65 = nf4.llama_weight_memory("65B"), nf4.llama_weight_memory("65B", double_quant=False)
    saving = m65["nf4_bytes"] - m65_dq["nf4_bytes"]
    assert 2.9e9 < saving < 3.1e9  # "about 3 GB on 65B" (QLoRA section 3)
    assert m65_dq["bf16_bytes"] / m65_dq["nf4_bytes"] > 3.5
    with pytest.raises(ValueError, match="7B"):
        nf4.llama_weight_memory("8B")


# ---------------------------------------------------------------------------- the 4-bit layer


def _bnb_linear4bit(linear: nn.Linear, double_quant=True, compute_dtype=torch.float32):
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=double_quant,
        quant_type="nf4",
    )
    layer.weight = bnb.nn.Params4bit(
        linear.weight.data.clone(),
        requires_grad=False,
        compress_statistics=double_quant,
        quant_type="nf4",
        blocksize=64,
    )
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return layer.to("cpu")  # Params4bit quantizes on the move to a device


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_nf4linear_equals_bnb_linear4bit(compute_dtype):
    torch.manual_seed(0)
    linear = nn.Linear(128, 96)
    ours = nf4.NF4Linear.from_linear(linear, blocksize=64, double_quant=True, compute_dtype=compute_dtype)
    theirs = _bnb_linear4bit(linear, True, compute_dtype)
    # compare the raw bytes before any forward (bnb may repack them for AVX512-BF16 CPUs in eval)
    assert torch.equal(ours.weight, theirs.weight.data)
    assert torch.equal(ours.weight_absmax, theirs.weight.quant_state.absmax)
    assert_same_as_bnb_dequantize(ours.dequantized_weight(), theirs.weight.data, theirs.weight.quant_state)
    assert (ours.in_features, ours.out_features) == (128, 96)
    assert (
        nf4.is_quantized_layer(ours) and nf4.is_quantized_layer(theirs) and not nf4.is_quantized_layer(linear)
    )
    x = torch.randn(3, 5, 128)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
    assert ours(x).dtype == x.dtype
    # memory: packed weight + 8-bit scales + nested scale + offset + fp32 bias
    n = 128 * 96
    assert ours.nbytes() == n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256) + 4 + 4 * 96


def test_nf4linear_keeps_fp32_scales_when_cast_and_state_dict_round_trips():
    torch.manual_seed(1)
    linear = nn.Linear(64, 64)
    layer = nf4.NF4Linear.from_linear(linear)
    before = layer.dequantized_weight()
    layer.to(torch.bfloat16)
    assert layer.weight_absmax.dtype == torch.uint8 and layer.weight_nested_absmax.dtype == torch.float32
    assert layer.weight_offset.dtype == torch.float32 and layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.dequantized_weight(), before)
    state_dict = layer.state_dict()
    assert set(state_dict) == {"weight", "weight_absmax", "weight_nested_absmax", "weight_offset", "bias"}
    fresh = nf4.NF4Linear.from_linear(nn.Linear(64, 64))
    fresh.load_state_dict(state_dict)
    assert torch.equal(fresh.dequantized_weight(), before)
    with pytest.raises(TypeError, match="nn.Linear"):
        nf4.NF4Linear.from_linear(nn.Conv1d(4, 4, 1))


def test_quantize_model_and_memory(make_tiny):
    model = make_tiny("llama")
    fp32_bytes = nf4.model_bytes(model)
    bf16_bytes = nf4.model_bytes(make_tiny("llama").to(torch.bfloat16))
    assert bf16_bytes * 2 == fp32_bytes
    x = torch.randint(0, 128, (2, 8))
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    nf4.quantize_model(model)
    assert all(isinstance(model.get_submodule(n), nf4.NF4Linear) for n in linears)
    assert type(model.lm_head) is nn.Linear  # the output head stays in full precision
    q_bytes = nf4.model_bytes(model)
    expected = fp32_bytes - sum(
        4 * m.in_features * m.out_features - m.nbytes() + 4 * (m.bias is not None) * m.out_features
        for m in model.modules()
        if isinstance(m, nf4.NF4Linear)
    )
    assert q_bytes == expected < fp32_bytes
    with torch.no_grad():
        assert torch.isfinite(model(x).logits).all()

    only_qv = nf4.quantize_model(make_tiny("llama"), target_modules=["q_proj", "v_proj"], double_quant=False)
    kinds = {n.rsplit(".", 1)[-1] for n, m in only_qv.named_modules() if isinstance(m, nf4.NF4Linear)}
    assert kinds == {"q_proj", "v_proj"}


def test_quantize_model_bad_input_leaves_model_unchanged(make_tiny):
    model = make_tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="candidates.*q_proj"):
        nf4.quantize_model(model, target_modules=["query"])
    with pytest.raises(ValueError, match="blocksize"):
        nf4.quantize_model(model, blocksize=48)
    with pytest.raises(ValueError, match="quant_type"):
        nf4.quantize_model(model, quant_type="int4")
    assert not any(isinstance(m, nf4.NF4Linear) for m in model.modules())
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_model_bytes_counts_bnb_quant_state():
    torch.manual_seed(0)
    linear = nn.Linear(256, 128, bias=False)
    ours = nf4.NF4Linear.from_linear(linear)
    theirs = _bnb_linear4bit(linear)
    qs = theirs.weight.quant_state
    code_tables = qs.code.numel() * 4 + qs.state2.code.numel() * 4  # bnb keeps both maps per layer
    assert nf4.model_bytes(theirs) == nf4.model_bytes(ours) + code_tables
    assert nf4.model_bytes(ours) == ours.nbytes()


# ---------------------------------------------------------------------------- transformers loading


def _load_full(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_transformers_bitsandbytes_config_gives_the_same_weights(saved_tiny_llama, dtype):
    quantized = load_4bit(saved_tiny_llama, dtype)
    ours = nf4.quantize_model(_load_full(saved_tiny_llama, dtype), double_quant=True, compute_dtype=dtype)
    checked = 0
    for name, module in quantized.named_modules():  # raw buffers first, before any forward
        if type(module).__name__ != "Linear4bit":
            continue
        mine = ours.get_submodule(name)
        qs = module.weight.quant_state
        assert qs.quant_type == "nf4" and qs.blocksize == 64 and qs.nested and qs.dtype == dtype
        assert torch.equal(mine.weight, module.weight.data)
        assert torch.equal(mine.weight_absmax, qs.absmax)
        assert torch.equal(mine.weight_nested_absmax, qs.state2.absmax)
        assert torch.equal(mine.weight_offset, qs.offset)
        assert_same_as_bnb_dequantize(mine.dequantized_weight(), module.weight.data, qs)
        from_bnb = nf4.NF4State.from_bnb(qs)
        assert torch.equal(nf4.dequantize_nf4(module.weight.data, from_bnb), mine.dequantized_weight())
        checked += 1
    assert checked == 14  # 7 projections x 2 blocks; lm_head is not quantized by either
    # bitsandbytes' fp32 path (no bf16 repacking), with its dequantization right on every CPU
    assert bnb_cpu.disable_cpu_repacking(quantized) == 14
    x = torch.randint(0, 128, (2, 8))
    with torch.no_grad(), bnb_cpu.portable_dequantize():
        assert torch.equal(ours(x).logits, quantized(x).logits)


# ---------------------------------------------------------------------------- QLoRA


def test_qlora_lora_lab_over_nf4linear_equals_peft_over_bnb(saved_tiny_llama):
    """LoRA over our NF4Linear == PEFT's LoRA over bnb's Linear4bit (same adapter), and it trains."""
    from conftest import copy_lora_into_peft, to_peft_config
    from peft import get_peft_model

    from lora_lab.inject import LoRAConfig, add_lora
    from lora_lab.layers import LoRALinear

    config = LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    ours = add_lora(nf4.quantize_model(_load_full(saved_tiny_llama)), config)
    torch.manual_seed(3)
    for module in ours.modules():
        if isinstance(module, LoRALinear):
            nn.init.normal_(module.lora_B.weight, std=0.1)  # a non-zero patch
    theirs = get_peft_model(load_4bit(saved_tiny_llama), to_peft_config(config))
    bnb_cpu.disable_cpu_repacking(theirs)  # in_features 32 < blocksize 64: repacking would crash
    peft_layer = theirs.base_model.model.model.layers[0].self_attn.q_proj
    assert type(peft_layer).__module__ == "peft.tuners.lora.bnb" and type(peft_layer).__name__ == "Linear4bit"
    assert copy_lora_into_peft(ours, theirs) == 12
    x = torch.randint(0, 128, (2, 8))
    with torch.no_grad(), bnb_cpu.portable_dequantize():
        assert torch.allclose(ours(x).logits, theirs(x).logits, atol=1e-6, rtol=0)
    # backward: gradients reach every lora_A / lora_B and nothing else
    ours.train()
    ours(x, labels=x).loss.backward()
    with_grad = {n for n, p in ours.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in ours.named_parameters() if "lora_" in n} and len(with_grad) == 12
    assert all(not b.requires_grad for b in ours.buffers())


# ---------------------------------------------------------------------------- merging with a 4-bit base


class _TinyLoRA(nn.Module):
    """A minimal LoRA wrapper (PEFT names) to test merging without lora_lab.layers."""

    def __init__(self, base, r=4, alpha=8, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        with torch.no_grad():
            self.lora_A.weight.copy_(torch.randn(r, base.in_features, generator=g) * 0.1)
            self.lora_B.weight.copy_(torch.randn(base.out_features, r, generator=g) * 0.1)
        self.scaling = alpha / r

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling


def _lora_layers():
    """The same LoRA over an NF4Linear: lora_lab's LoRALinear and the minimal wrapper."""
    from lora_lab.layers import LoRALinear

    torch.manual_seed(0)
    base = nf4.NF4Linear.from_linear(nn.Linear(128, 64))
    tiny = _TinyLoRA(base)
    ours = LoRALinear(base, r=4, lora_alpha=8)
    ours.lora_A.load_state_dict(tiny.lora_A.state_dict())
    ours.lora_B.load_state_dict(tiny.lora_B.state_dict())
    return [ours, tiny]


@pytest.mark.parametrize("which", ["LoRALinear", "minimal"])
def test_three_ways_to_merge(which):
    layer = _lora_layers()[0 if which == "LoRALinear" else 1]
    base = layer.base_layer
    base_bytes = base.weight.clone()
    x = torch.randn(4, 128)
    with torch.no_grad():
        unmerged = layer(x)
        full = nf4.merge_quantized(layer, how="full_precision")
        requant = nf4.merge_quantized(layer, how="requantize")
        assert nf4.merge_quantized(layer, how="unmerged") is layer
        assert type(full) is nn.Linear and isinstance(requant, nf4.NF4Linear)
        assert torch.allclose(full(x), unmerged, atol=1e-5)  # exact up to fp32 rounding
        rounding = (requant(x) - unmerged).abs().max().item()
        assert 1e-4 < rounding < 0.1 * unmerged.abs().max().item()  # re-quantizing moves the outputs
        assert requant.nbytes() == base.nbytes()  # but stays as small as the base
    assert torch.equal(base.weight, base_bytes)  # the 4-bit base itself never changed


def test_requantize_merge_equals_peft_merge_into_linear4bit():
    """PEFT merges into bnb's Linear4bit by dequantize + add + quantize: our requantize_merge, byte for byte."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    linear = nn.Linear(128, 96)
    model = nn.Sequential()
    model.add_module("proj", _bnb_linear4bit(linear))
    model.is_loaded_in_4bit = True  # what transformers sets; PEFT then picks its bnb LoRA layer
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    layer = peft_model.base_model.model.proj
    nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    delta = layer.get_delta_weight("default")
    ours = nf4.requantize_merge(nf4.NF4Linear.from_linear(linear), delta)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer.merge()
    assert any("different generations" in str(w.message) for w in caught)
    merged = layer.base_layer.weight
    assert torch.equal(ours.weight, merged.data)
    assert torch.equal(ours.weight_absmax, merged.quant_state.absmax)
    assert torch.equal(ours.weight_nested_absmax, merged.quant_state.state2.absmax)


def test_merging_without_choosing_is_refused():
    layer = _lora_layers()[0]
    before = layer.base_layer.weight.clone()
    with pytest.raises(ValueError, match="full_precision.*requantize.*unmerged"):
        nf4.merge_quantized(layer)
    with pytest.raises(ValueError, match="Options"):
        nf4.merge_quantized(layer, how="fp16")
    with pytest.raises(TypeError):  # lora_lab's in-place merge refuses a 4-bit base
        layer.merge()
    assert torch.equal(layer.base_layer.weight, before) and not layer.merged
    with pytest.raises(TypeError, match="NF4Linear"):
        nf4.merge_quantized(_TinyLoRA(nn.Linear(8, 8)), how="requantize")
    with pytest.raises(ValueError, match="another layer"):
        nf4.requantize_merge(layer.base_layer, torch.zeros(128, 64))


def test_merge_quantized_model(make_tiny):
    from lora_lab.inject import LoRAConfig, add_lora
    from lora_lab.layers import LoRALinear

    model = add_lora(
        nf4.quantize_model(make_tiny("llama")),
        LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    for module in model.modules():
        if isinstance(module, LoRALinear):
            nn.init.normal_(module.lora_B.weight, std=0.1)
    x = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        reference = model(x).logits
    with pytest.raises(ValueError, match="Options"):
        nf4.merge_quantized_model(model)
    assert nf4.merge_quantized_model(model, how="unmerged") is model
    nf4.merge_quantized_model(model, how="requantize")
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert isinstance(model.model.layers[0].self_attn.q_proj, nf4.NF4Linear)
    with torch.no_grad():
        after = model(x).logits
    assert 0 < (after - reference).abs().max() < 0.5


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("blocksize", [0, 16, 48, 100, 8192])
def test_bad_blocksize_refused_like_bitsandbytes(blocksize):
    w = _weights((64, 64))
    with pytest.raises(ValueError, match="blocksize"):
        nf4.quantize_nf4(w, blocksize=blocksize)
    with pytest.raises(ValueError):
        bF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")


def test_bad_input_is_refused():
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        nf4.quantize_nf4(torch.arange(64))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        nf4.quantize_nf4(torch.zeros(64, dtype=torch.float64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        nf4.quantize_nf4([0.1] * 64)
    with pytest.raises(ValueError, match="empty"):
        nf4.quantize_nf4(torch.zeros(0, 64))
    with pytest.raises(ValueError, match="nf4' or 'fp4"):
        nf4.quantize_4bit(_weights((64,)), quant_type="int4")
    packed, state = nf4.quantize_nf4(_weights((64, 64)))
    with pytest.raises(ValueError, match="bytes"):
        nf4.dequantize_nf4(packed[:10], state)
    with pytest.raises(TypeError, match="uint8"):
        nf4.dequantize_nf4(packed.float(), state)
