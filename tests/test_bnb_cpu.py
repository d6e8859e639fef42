"""Tests for lora_lab.bnb_cpu: bitsandbytes' two CPU quirks, their rules, and the detection itself.

The rules are checked on every machine (index arithmetic, stand-in kernels, bitsandbytes' pure-torch
repacking); what this machine's native kernels do is measured and must match one of the two stories.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bF
import pytest
import torch
from torch import nn

from lora_lab import bnb_cpu

SHAPES = [(192, 96), (128, 512), (32, 32), (64, 128), (4, 64), (16, 48), (16, 80), (3, 100), (4, 32)]
BLOCKSIZES = [32, 64, 128, 1024]


def _quantized(shape, blocksize=64, quant_type="nf4", double_quant=False, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    return bF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)


def _cpu_flags() -> set[str] | None:
    info = Path("/proc/cpuinfo")
    if not info.exists():
        return None
    for line in info.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("shape", SHAPES + [(1, 96), (1000,)])
def test_block_spans_rows_is_where_the_two_indices_differ(shape, blocksize):
    n = shape[-1]
    rows = math.prod(shape[:-1])
    row = torch.arange(rows).view(-1, 1)
    col = torch.arange(n).view(1, -1)
    native = row * (n // blocksize) + col // blocksize
    right = (row * n + col) // blocksize
    assert bnb_cpu.block_spans_rows(shape, blocksize) == (not torch.equal(native, right))


def _like_bug(packed, state):
    """A stand-in kernel with exactly the block-span bug."""
    code = bF.get_4bit_type(state.quant_type, device="cpu")
    return bnb_cpu.dequantize_like_native_kernel(
        packed, state.absmax, code, state.blocksize, tuple(state.shape), state.dtype
    )


def test_detection_tells_exact_the_known_bug_and_anything_else_apart(monkeypatch):
    packed, state = _quantized((192, 96))
    portable = bnb_cpu.portable_dequantize_4bit
    # a correct kernel
    assert bnb_cpu.compare_native_dequantize(packed, state, native=portable) == "exact"
    # a kernel with the bug, on a machine whose probe found it
    monkeypatch.setattr(bnb_cpu, "native_kernel_has_block_span_bug", lambda: True)
    assert bnb_cpu.compare_native_dequantize(packed, state, native=_like_bug) == "block-span bug"
    # the same kernel where the probe found no bug: the difference is unexplained
    monkeypatch.setattr(bnb_cpu, "native_kernel_has_block_span_bug", lambda: False)
    with pytest.raises(AssertionError, match="not expected"):
        bnb_cpu.compare_native_dequantize(packed, state, native=_like_bug)
    # any other difference fails whatever the probe said
    monkeypatch.setattr(bnb_cpu, "native_kernel_has_block_span_bug", lambda: True)
    with pytest.raises(AssertionError, match="not as the known block-span bug"):
        bnb_cpu.compare_native_dequantize(packed, state, native=lambda p, s: portable(p, s) * 1.001)
    # on a shape with whole blocks per row the buggy index is the right one
    packed, state = _quantized((64, 128))
    assert bnb_cpu.compare_native_dequantize(packed, state, native=_like_bug) == "exact"


def test_this_machines_kernel_matches_one_story():
    """The probe agrees with the CPU: the bug where AVX512F is, none elsewhere.

    If this fails on an AVX512 machine, bitsandbytes fixed its kernel: delete the workaround in
    tests, and update chapter 06 and the claims ledger (row on bitsandbytes' CPU kernels).
    """
    flags = _cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo here to tell whether the CPU has AVX512F")
    found = bnb_cpu.native_kernel_has_block_span_bug()
    assert found == ("avx512f" in flags), (
        f"probe found the bug: {found}; CPU has avx512f: {'avx512f' in flags}"
    )


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_native_dequantize_is_right_or_has_exactly_the_bug(blocksize, quant_type, double_quant):
    for seed, shape in enumerate(SHAPES):
        for dtype in (torch.float32, torch.bfloat16):
            packed, state = _quantized(shape, blocksize, quant_type, double_quant, dtype, seed)
            found = bnb_cpu.compare_native_dequantize(packed, state)
            expected = bnb_cpu.native_dequantize_is_wrong(shape, blocksize)
            assert found == ("block-span bug" if expected else "exact"), (shape, dtype)


def test_real_model_widths_are_safe_at_blocksize_64():
    widths = [768, 2048, 3072, 4096, 5120, 8192, 11008, 14336]  # GPT-2, Llama, Mistral layer widths
    for n in widths:
        assert not bnb_cpu.block_spans_rows((n, n), 64)
    assert bnb_cpu.block_spans_rows((4096, 11008), 1024)  # 11008 = 10.75 x 1024


@pytest.mark.parametrize("blocksize", [32, 64, 128])
def test_repacking_rule_is_exactly_where_bitsandbytes_can_repack(blocksize):
    """bitsandbytes' own repacking (pure torch, so this runs on any CPU) fails exactly off the rule."""
    for out_features in (16, 32, 48, 64, 96):
        for in_features in (16, 32, 48, 64, 96, 128, 192):
            packed, state = _quantized((out_features, in_features), blocksize)
            try:
                bF._convert_weight_packed_for_cpu(packed.clone(), copy.deepcopy(state))
                repacked = True
            except (AssertionError, RuntimeError):
                repacked = False
            assert repacked == bnb_cpu.cpu_repacking_supported(in_features, out_features, blocksize), (
                out_features,
                in_features,
            )


def _linear4bit(in_features, out_features, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=False)
    layer = bnb.nn.Linear4bit(
        in_features, out_features, bias=False, compute_dtype=torch.float32, quant_type="nf4"
    )
    layer.weight = bnb.nn.Params4bit(
        linear.weight.data.clone(), requires_grad=False, quant_type="nf4", blocksize=64
    )
    return layer.to("cpu")


def test_disable_cpu_repacking_keeps_eval_equal_to_train_on_every_cpu():
    layer = _linear4bit(128, 64)
    assert bnb_cpu.disable_cpu_repacking(nn.Sequential(layer)) == 1
    x = torch.randn(3, 128)
    with torch.no_grad():
        train_out = layer.train()(x)
        eval_out = layer.eval()(x)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(eval_out, train_out)
    with pytest.raises(TypeError, match="nn.Module"):
        bnb_cpu.disable_cpu_repacking("model")


def test_repacked_layer_computes_in_bf16_and_crashes_off_the_rule():
    if not bnb_cpu.cpu_repacking_in_use():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    layer = _linear4bit(128, 64)
    x = torch.randn(3, 128)
    with torch.no_grad():
        train_out = layer.train()(x)
        eval_out = layer.eval()(x)
    assert layer.weight.quant_state.packing_format_for_cpu
    gap = (eval_out - train_out).abs().max().item()
    assert 0 < gap < 2**-7 * 4 * train_out.abs().max().item()  # bf16 rounding, no more
    small = _linear4bit(32, 32).eval()  # in_features below the block size
    with torch.no_grad(), pytest.raises(RuntimeError, match="invalid for input"):
        small(torch.randn(2, 32))


def test_portable_dequantize_is_right_inside_and_undone_after():
    packed, state = _quantized((192, 96))
    right = bnb_cpu.portable_dequantize_4bit(packed, state)
    layer = _linear4bit(96, 192)  # rows of 96: blocks of 64 span rows
    x = torch.randn(2, 96)
    with bnb_cpu.portable_dequantize():
        assert torch.equal(bF.dequantize_4bit(packed, state), right)
        with torch.no_grad():  # bitsandbytes' inference matmul calls the op directly
            inside = layer(x)
    expected = torch.nn.functional.linear(
        x, bnb_cpu.portable_dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    )
    assert torch.equal(inside, expected)
    after = "block-span bug" if bnb_cpu.native_dequantize_is_wrong((192, 96), 64) else "exact"
    assert bnb_cpu.compare_native_dequantize(packed, state) == after


def test_the_reproduction_runs_in_one_command(capsys):
    from conftest import load_benchmark

    load_benchmark("bnb_cpu_quirks").main()
    out = capsys.readouterr().out
    assert "native dequantize_4bit has the block-span bug here" in out
    assert out.count("exact") + out.count("block-span bug") >= 14  # one verdict per (shape, blocksize)
    assert "rule allows" in out
