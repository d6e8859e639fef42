"""bitsandbytes on a CPU: two quirks of its native kernels, the rules behind them, and checks for both.

bitsandbytes 0.50.2 picks its CPU kernels when it is imported, from the machine it finds. Two of them
behave differently from its portable torch path, so a QLoRA notebook can give other numbers, or crash,
on another laptop. Both were measured on a 2-core AMD EPYC with AVX512-BF16 (chapter 06 shows them).

1. `dequantize_4bit`, native C++ kernel. Its AVX512 branch (taken when the CPU has AVX512F, by
   the library's own CPUID check, whatever torch's capability says, and when the row length n is a
   multiple of 16) finds the scale of the value at (row, col) of an [m, n] weight as

       absmax[row * (n // blocksize) + col // blocksize]      (native: assumes whole blocks per row)
       absmax[(row * n + col) // blocksize]                   (right: blocks run over the flat tensor)

   The two agree when n is a multiple of the block size, when there is one row, or when the whole
   tensor is one block. Otherwise a block spans two rows and values get another block's scale: a
   (192, 96) weight at blocksize 64 dequantizes with relative error 0.263 instead of 0.093. Its scalar
   branch (no AVX512F, or n not a multiple of 16) is right, and bitsandbytes sends odd n (and, where
   torch's capability is AVX512, blocksizes of 2048 and more) to its portable torch path, also right.
   Quantizing (`quantize_4bit`) is not affected: the bytes and scales are the same on every CPU.
   Real models quantized with the default blocksize 64 are safe: their layer widths (768, 2048, 4096,
   11008, ...) are multiples of 64. A width that is not (or a blocksize above it, e.g. 1024 with
   11008 = 10.75 x 1024) is hit.

2. Repacking for AVX512-BF16 (wherever bitsandbytes' `has_avx512bf16()` is true, whatever torch's
   capability).
   In eval mode, with no gradient, the first forward of `bnb.nn.Linear4bit` rewrites the weight into
   a tiled layout for a fused bf16 kernel (`functional._convert_weight_packed_for_cpu`). That needs
   `out_features % 32 == 0` and `in_features % blocksize == 0` (whole blocks per row, at least one);
   any other layer crashes (e.g. `shape '[32, 0]' is invalid` for in_features 32 at blocksize 64).
   A repacked layer computes in bf16, so its outputs differ from the fp32 path by bf16 rounding.
   `disable_cpu_repacking(model)` keeps every 4-bit layer on the dequantize-then-matmul path it uses
   in training: exact, the same on every CPU, and never crashing.

What a user of 4-bit models on a CPU can do: keep layer widths multiples of the block size (real
models are; `native_dequantize_is_wrong(shape, blocksize)` says which shapes are hit on this machine),
run bitsandbytes inside `with portable_dequantize():` for shapes that are hit, and call
`disable_cpu_repacking` before the first eval-mode forward of a model whose layers break
rule 2, or whose outputs must match other CPUs exactly. `ATEN_CPU_CAPABILITY` does not help: neither
quirk follows torch's capability.

Left out: bitsandbytes' 8-bit kernels (blockwise 8-bit quantization agrees with lora_lab on both CPUs
tried) and its CUDA kernels. Reference: bitsandbytes 0.50.2 `backends/cpu/ops.py`,
`functional._convert_weight_packed_for_cpu`, `nn.Linear4bit.forward`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

__all__ = [
    "native_kernel_has_block_span_bug",
    "cpu_repacking_in_use",
    "block_spans_rows",
    "native_dequantize_is_wrong",
    "dequantize_like_native_kernel",
    "portable_dequantize_4bit",
    "compare_native_dequantize",
    "portable_dequantize",
    "cpu_repacking_supported",
    "disable_cpu_repacking",
]

# bitsandbytes routes these to its portable path even where the native kernel is registered.
_PORTABLE_FROM_BLOCKSIZE = 2048


@functools.lru_cache(maxsize=1)
def native_kernel_has_block_span_bug() -> bool:
    """Does this machine's bitsandbytes `dequantize_4bit` have the block-span bug (quirk 1)? Measured once.

    Dequantizes a probe, a [4, 32] weight at blocksize 64 (two blocks, each spanning two rows), with the
    native kernel and with the portable path. Equal: False. Different exactly as the bug predicts:
    True. Different in any other way: AssertionError, since then neither story holds.
    """
    import bitsandbytes.functional as bnbF

    probe = torch.linspace(-1.0, 1.0, 128).view(4, 32)
    probe[2:] *= 3.0  # the second block gets another scale than the first
    packed, state = bnbF.quantize_4bit(probe, blocksize=64, quant_type="nf4", compress_statistics=False)
    return _classify(bnbF.dequantize_4bit, packed, state, bug_possible=True) == "block-span bug"


def cpu_repacking_in_use() -> bool:
    """True where `Linear4bit` repacks its weight for the bf16 kernel on an eval-mode forward.

    bitsandbytes asks its own library whether the CPU has AVX512-BF16; `ATEN_CPU_CAPABILITY` does not
    change that answer (measured: the layer repacks with the capability forced to "default" too).
    """
    import bitsandbytes.functional as bnbF

    return bool(bnbF.has_avx512bf16())


def block_spans_rows(shape: Sequence[int], blocksize: int) -> bool:
    """Does some 4-bit block of a `shape` tensor start in one row and end in the next?

    Rows are the last dimension. True exactly when the native kernel's scale index differs from the
    right one somewhere: more than one row, rows that are not whole blocks, more than one block.
    """
    n = shape[-1] if len(shape) else 1
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    return rows > 1 and n % blocksize != 0 and rows * n > blocksize


def native_dequantize_is_wrong(shape: Sequence[int], blocksize: int) -> bool:
    """Will `bitsandbytes.functional.dequantize_4bit` on this machine misplace scales for this shape?"""
    n = shape[-1] if len(shape) else 1
    torch_avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
    portable = n % 2 == 1 or (torch_avx512 and blocksize >= _PORTABLE_FROM_BLOCKSIZE)
    scalar = n % 16 != 0  # the native kernel's scalar branch, which is right
    if portable or scalar or not block_spans_rows(shape, blocksize):
        return False
    return native_kernel_has_block_span_bug()


def _unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Packed uint8 bytes -> n codes (high nibble first), as int64 indices."""
    flat = packed.reshape(-1).view(torch.uint8).long()
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)  # [2 * bytes]
    return codes[:n]


def dequantize_like_native_kernel(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """What the native AVX512 kernel returns: each row's scales indexed as if rows held whole blocks.

    `absmax` is the fp32 scale of every block (after undoing double quantization). Used to assert that a
    difference from the portable path is exactly this one, and nothing else.
    """
    shape = tuple(shape)
    n = shape[-1]
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    values = code.float()[_unpack(packed, rows * n)].view(rows, n)  # [rows, n]
    row = torch.arange(rows).view(-1, 1)
    col = torch.arange(n).view(1, -1)
    scale = absmax.float()[row * (n // blocksize) + col // blocksize]  # [rows, n]
    return (values * scale).to(dtype).reshape(shape)


def _fp32_scales(quant_state) -> torch.Tensor:
    """A bitsandbytes QuantState's per-block fp32 absmax, undoing double quantization as it does."""
    import bitsandbytes.functional as bnbF

    if not quant_state.nested:
        return quant_state.absmax.float()
    return (bnbF.dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset).float()


def _portable_kernel(A, absmax, blocksize, quant_type, shape, dtype) -> torch.Tensor:
    """bitsandbytes' portable `dequantize_4bit` kernel (the op's signature), torch.compile off."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    code = _get_4bit_code(quant_type, A.device)
    with torch._dynamo.config.patch(disable=True):  # same numbers, no compile time
        return _dequantize_4bit_compute(
            A.view(torch.uint8).reshape(-1), absmax, code, blocksize, shape, dtype
        )


def portable_dequantize_4bit(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """bitsandbytes' own portable torch dequantization (`backends/default/ops.py`), on any CPU.

    It is what bitsandbytes runs where the native kernel is not registered.
    """
    qs = quant_state
    return _portable_kernel(packed, _fp32_scales(qs), qs.blocksize, qs.quant_type, qs.shape, qs.dtype)


def compare_native_dequantize(packed: torch.Tensor, quant_state, native: Callable | None = None) -> str:
    """Compare bitsandbytes' `dequantize_4bit` here with its portable path; name what was found.

    Returns "exact" (the same values) or "block-span bug" (different, exactly as
    `dequantize_like_native_kernel` predicts, on a shape `native_dequantize_is_wrong` names).
    Raises AssertionError for any other difference, or for the bug where it was not expected.
    `native` defaults to `bitsandbytes.functional.dequantize_4bit`; tests pass stand-ins.
    """
    import bitsandbytes.functional as bnbF

    expected = native_dequantize_is_wrong(tuple(quant_state.shape), quant_state.blocksize)
    return _classify(native or bnbF.dequantize_4bit, packed, quant_state, bug_possible=expected)


def _classify(native: Callable, packed: torch.Tensor, quant_state, bug_possible: bool) -> str:
    import bitsandbytes.functional as bnbF

    shape = tuple(quant_state.shape)
    theirs = native(packed, quant_state).reshape(shape)
    portable = portable_dequantize_4bit(packed, quant_state).reshape(shape)
    if torch.equal(theirs, portable):
        return "exact"
    code = bnbF.get_4bit_type(quant_state.quant_type, device=packed.device)
    like_bug = dequantize_like_native_kernel(
        packed, _fp32_scales(quant_state), code, quant_state.blocksize, shape, quant_state.dtype
    )
    gap = (theirs.float() - portable.float()).abs().max().item()
    where = f"shape {shape}, blocksize {quant_state.blocksize}"
    if not torch.equal(theirs, like_bug):
        raise AssertionError(
            f"bitsandbytes' dequantize_4bit differs from its portable path by up to {gap:.3g} for {where}, "
            "and not as the known block-span bug does"
        )
    if not bug_possible:
        raise AssertionError(f"the block-span bug showed for {where}, where it was not expected")
    return "block-span bug"


@contextlib.contextmanager
def portable_dequantize() -> Iterator[None]:
    """Inside the block, bitsandbytes dequantizes 4-bit weights with its portable path (quirk 1 fixed).

    The CPU kernel of the op `bitsandbytes::dequantize_4bit` is overridden for the block, so every
    caller gets right values: bitsandbytes' own 4-bit matmul (with or without gradients), PEFT's merge
    and its LoftQ initialisation. On leaving, bitsandbytes' own kernel is back.
    """
    library = torch.library.Library("bitsandbytes", "IMPL")
    with warnings.catch_warnings():  # torch warns once that a kernel is overridden: that is the point
        warnings.simplefilter("ignore")
        library.impl("dequantize_4bit", _portable_kernel, "CPU")
    try:
        yield
    finally:
        library._destroy()  # unregisters ours; the dispatcher falls back to bitsandbytes' kernel


def cpu_repacking_supported(in_features: int, out_features: int, blocksize: int = 64) -> bool:
    """Can bitsandbytes repack an [out, in] 4-bit weight for its AVX512-BF16 kernel (rule 2)?"""
    return out_features % 32 == 0 and in_features >= blocksize and in_features % blocksize == 0


def disable_cpu_repacking(model: nn.Module) -> int:
    """Keep every `bnb.nn.Linear4bit` in `model` on its dequantize-then-matmul path; return how many.

    bitsandbytes reads the layer's `support_avx512bf16_for_cpu` flag before repacking (rule 2 above).
    A layer already repacked is left as it is: call this before the first eval-mode forward.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count
