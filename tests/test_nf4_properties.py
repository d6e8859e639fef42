"""NF4 quantization: properties over many shapes, dtypes, block sizes and special values (hypothesis),
and the bad inputs quantization refuses.

Kept apart from tests/test_nf4.py (the bitsandbytes kernel cross-checks). Compared against lora_lab's own
formula and round trips, and against bitsandbytes only where it is portable: `functional.quantize_4bit`
(bytes and absmax) and the torch path `backends.default.ops._dequantize_4bit_compute` (never bnb's
native `dequantize_4bit`, which returns wrong values on AVX512 CPUs for blocks spanning two rows).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_lab import nf4

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = {torch.float32: 3e38, torch.float16: 6e4, torch.bfloat16: 3e38}  # largest value to draw per dtype
SPECIAL = [0.0, -0.0, 1e-45, -1e-38, 1e-30, 1.0, -1.0]  # zeros, subnormals, tiny, exact code ends


@st.composite
def weights(draw, max_numel=700):
    """A tensor of 1-3 dims with ordinary, huge, tiny and zero values, in fp32, fp16 or bf16."""
    shape = draw(
        st.lists(st.integers(1, 12), min_size=1, max_size=3).filter(lambda s: math.prod(s) <= max_numel)
    )
    dtype = draw(st.sampled_from(list(DTYPES)))
    scale = draw(st.sampled_from([1e-30, 1e-3, 1.0, 1e3, DTYPES[dtype] / 4]))
    seed = draw(st.integers(0, 2**16))
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
    for _ in range(draw(st.integers(0, 4))):  # sprinkle special values
        w.view(-1)[draw(st.integers(0, w.numel() - 1))] = draw(st.sampled_from(SPECIAL))
    if draw(st.booleans()):  # a whole block of zeros
        w.view(-1)[: min(64, w.numel())] = 0.0
    return w.to(dtype)


BLOCKSIZES = st.sampled_from(list(nf4.VALID_BLOCKSIZES))


def _half_gap(code: torch.Tensor) -> float:
    """Half the widest gap between neighbouring code levels: the worst rounding error, times absmax."""
    levels = code.sort().values
    return float((levels[1:] - levels[:-1]).max()) / 2


@FAST
@given(w=weights(), blocksize=BLOCKSIZES, quant_type=st.sampled_from(["nf4", "fp4"]))
def test_round_trip_keeps_shape_dtype_and_stays_within_half_a_level(w, blocksize, quant_type):
    packed, state = nf4.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
    n = w.numel()
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 1) // 2
    absmax = state.absmax  # one fp32 scale per block: the largest |w| of the block (partial last block too)
    flat = w.float().reshape(-1)
    blocks = [flat[i : i + blocksize] for i in range(0, n, blocksize)]
    assert absmax.shape == (len(blocks),)
    torch.testing.assert_close(absmax, torch.stack([b.abs().max().clamp(min=1e-38) for b in blocks]))
    back = nf4.dequantize_4bit(packed, state)
    assert back.shape == w.shape and back.dtype == w.dtype
    bound = absmax.repeat_interleave(blocksize)[:n] * _half_gap(state.code) * (1 + 1e-5)
    out_rounding = (
        back.float().abs().reshape(-1)
        * {torch.float32: 0, torch.float16: 2**-10, torch.bfloat16: 2**-7}[w.dtype]
    )
    assert bool(((back.float().reshape(-1) - flat).abs() <= bound + out_rounding + 1e-37).all())


@FAST
@given(w=weights(), blocksize=BLOCKSIZES)
def test_quantizing_the_dequantized_weight_again_changes_nothing(w, blocksize):
    """Dequantized values sit on code levels (the block's largest on +-1): a second pass is exact (fp32)."""
    packed, state = nf4.quantize_nf4(w.float(), blocksize=blocksize)
    again, state2 = nf4.quantize_nf4(nf4.dequantize_4bit(packed, state), blocksize=blocksize)
    assert torch.equal(again, packed)
    torch.testing.assert_close(state2.absmax, state.absmax, rtol=1e-6, atol=0)


@FAST
@given(w=weights(max_numel=300), blocksize=BLOCKSIZES, double_quant=st.booleans())
def test_pack_fake_quantize_and_double_quant_agree_with_the_formula(w, blocksize, double_quant):
    """code[q] * scale[block], with q from the packed bytes; fake_quantize gives the same values."""
    packed, state = nf4.quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    q = nf4.unpack_4bit(packed, w.numel())
    assert torch.equal(nf4.unpack_4bit(nf4.pack_4bit(q), w.numel()), q)
    formula = nf4.NF4_CODE[q] * state.scales().repeat_interleave(blocksize)[: w.numel()]
    torch.testing.assert_close(
        nf4.dequantize_4bit(packed, state, torch.float32).reshape(-1), formula, atol=0, rtol=0
    )
    if not double_quant:
        fake = nf4.fake_quantize(w, nf4.NF4_CODE, blocksize)
        torch.testing.assert_close(fake, nf4.dequantize_4bit(packed, state), atol=0, rtol=0)


@settings(max_examples=20, deadline=None)
@given(w=weights(max_numel=400), blocksize=BLOCKSIZES)
def test_same_bytes_and_scales_as_bitsandbytes_portable_path(w, blocksize):
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    portable_dequantize = getattr(
        _dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute
    )  # no torch.compile

    w = w.float()  # bitsandbytes' CPU quantizer: compare in fp32
    packed, state = nf4.quantize_nf4(w, blocksize=blocksize)
    theirs, their_state = bnb_functional.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    assert torch.equal(packed.reshape(-1), theirs.reshape(-1))
    torch.testing.assert_close(state.absmax, their_state.absmax, atol=0, rtol=0)
    portable = portable_dequantize(
        theirs.reshape(-1), their_state.absmax, their_state.code, blocksize, w.shape, w.dtype
    )
    torch.testing.assert_close(nf4.dequantize_4bit(packed, state), portable, atol=0, rtol=0)


@FAST
@given(
    w=weights(max_numel=300), bad=st.sampled_from([float("nan"), float("inf"), float("-inf")]), data=st.data()
)
def test_any_non_finite_value_is_refused(w, bad, data):
    w = w.clone()
    w.view(-1)[data.draw(st.integers(0, w.numel() - 1))] = bad
    with pytest.raises(ValueError, match="NaN/inf value"):
        nf4.quantize_nf4(w)


# ---------------------------------------------------------------------------- bad input (a table)


def _linear_with(value):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8))
    with torch.no_grad():
        model[1].weight[0, 5] = value
    return model


BAD_QUANTIZE_CALLS = {
    "weight_with_inf": (
        lambda: nf4.quantize_nf4(torch.tensor([1.0, float("inf"), 2.0])),
        ValueError,
        "1 NaN/inf value",
    ),
    "weight_with_nan": (
        lambda: nf4.quantize_fp4(torch.full((70,), float("nan"))),
        ValueError,
        "70 NaN/inf value",
    ),
    "fake_quantize_inf": (
        lambda: nf4.fake_quantize(torch.tensor([float("-inf")]), nf4.NF4_CODE),
        ValueError,
        "nan_to_num",
    ),
    "model_layer_with_inf": (lambda: nf4.quantize_model(_linear_with(float("inf"))), ValueError, "NaN/inf"),
    "compute_dtype_int8": (
        lambda: nf4.quantize_model(_linear_with(0.0), compute_dtype=torch.int8),
        TypeError,
        "not a floating dtype",
    ),
    "compute_dtype_string": (
        lambda: nf4.quantize_model(_linear_with(0.0), compute_dtype="float32"),
        TypeError,
        "torch.bfloat16",
    ),
    "from_linear_int64": (
        lambda: nf4.NF4Linear.from_linear(torch.nn.Linear(64, 8), compute_dtype=torch.int64),
        TypeError,
        "floating dtype",
    ),
}


@pytest.mark.parametrize(
    "call, error, match", list(BAD_QUANTIZE_CALLS.values()), ids=list(BAD_QUANTIZE_CALLS)
)
def test_bad_quantization_input_is_refused(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_refused_quantize_model_leaves_the_model_as_it_was():
    for kwargs, value in (({}, float("inf")), ({"compute_dtype": torch.int8}, 0.0)):
        model = _linear_with(value)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises((ValueError, TypeError)):
            nf4.quantize_model(model, **kwargs)
        assert all(type(m) is torch.nn.Linear for m in model) and model.state_dict().keys() == before.keys()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
