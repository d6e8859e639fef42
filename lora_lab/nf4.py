"""NF4: 4-bit NormalFloat quantization from scratch, bit-exact with bitsandbytes (QLoRA's base layer).

QLoRA keeps the frozen base model in 4 bits and trains a LoRA patch in 16/32 bits on top. This module
builds the 4-bit half in plain torch, one readable step at a time:

1. The code table: 16 levels (`NF4_CODE`), spaced like the quantiles of a normal distribution, because
   trained weights are roughly normal. FP4 (`FP4_CODE`) and a uniform `INT4_CODE` are here to compare.
2. Blockwise absmax scaling: the weight is flattened and cut into blocks of `blocksize` values (64 by
   default); each block is divided by its largest magnitude, so it lands in [-1, 1].
3. Rounding to the nearest level, ties to the lower one (bitsandbytes' rule).
4. Packing: two 4-bit codes per byte, the first value in the HIGH nibble.
5. Double quantization (optional): the fp32 absmax of every block is itself quantized to 8 bits (the
   signed dynamic map of `create_dynamic_map`) in blocks of 256, after subtracting their mean.
   That takes the overhead from 0.5 to about 0.127 bits per parameter.

On top of that: `NF4Linear`, a 4-bit linear layer that holds the packed bytes as buffers and
dequantizes in `forward`; `quantize_model` to swap a model's linear layers for it; memory accounting
measured from the tensors (`model_bytes`, `bits_per_param`), with the storage formula
(`bits_per_param_formula`) and model-scale weight memory (`llama_weight_memory`) from `lora_lab.sizing`,
the one memory calculator; and the three ways of merging a LoRA delta into a quantized base
(`merge_quantized`).

The results equal bitsandbytes 0.50.2's CPU path exactly (packed bytes, absmax, nested absmax and
offset, dequantized values); `tests/test_nf4.py` checks that. Details that matter for bit-exactness,
read from bitsandbytes' source (`backends/default/ops.py`, `backends/cpu/ops.py`, `csrc/cpu_ops.cpp`):

- 4-bit: full blocks are scaled as `x * (1 / absmax)`, but a trailing partial block as `x / absmax`;
  an odd element count is padded with a scaled 0.0 (NF4 code 7) in the last low nibble.
- 8-bit (double quantization): `x * (1 / absmax)` is snapped to a grid of 65536 points in [-1, 1] and
  the code nearest that grid point is read from a table, so the result is not always the nearest
  code. (bitsandbytes' CUDA kernel, `dQuantize`, binary-searches the code for the nearest value;
  `quantize_blockwise_8bit(..., exact=True)` does that; not checked on a GPU here.) A block whose
  absmax is 0 (e.g. a tensor with a single 4-bit block, whose absmax - mean is 0) gets index 0.
- bitsandbytes' `dequantize_4bit` returns a 1-D tensor as [1, n] on CPU; here it keeps its shape.

Left out: CUDA kernels (this is the readable reference, not the fast path), `quant_storage` other than
uint8, saving in bitsandbytes' state-dict format (`NF4State.to_bnb()` hands over to bitsandbytes for that).

References: Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs" (2023), section 3;
bitsandbytes `functional.quantize_4bit` / `dequantize_4bit` / `create_dynamic_map`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lora_lab.layers import lora_delta
from lora_lab.sizing import bits_per_param_formula, weight_memory

__all__ = [
    "NF4_CODE",
    "FP4_CODE",
    "INT4_CODE",
    "VALID_BLOCKSIZES",
    "NESTED_BLOCKSIZE",
    "MERGE_OPTIONS",
    "LLAMA_SHAPES",
    "NF4State",
    "NF4Linear",
    "create_dynamic_map",
    "quantize_4bit",
    "quantize_nf4",
    "quantize_fp4",
    "dequantize_4bit",
    "dequantize_nf4",
    "quantize_blockwise_8bit",
    "dequantize_blockwise_8bit",
    "pack_4bit",
    "unpack_4bit",
    "fake_quantize",
    "quantize_model",
    "is_quantized_layer",
    "model_bytes",
    "bits_per_param",
    "bits_per_param_formula",
    "llama_weight_memory",
    "merge_full_precision",
    "requantize_merge",
    "merge_quantized",
    "merge_quantized_model",
]

# The 16 NF4 levels, sorted. bitsandbytes generates them with create_normal_map(offset=0.9677083,
# use_extra_value=True): 7 negative quantiles, an exact 0 and 8 positive ones, scaled so max |level| = 1.
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)

# FP4 (1 sign, 2 exponent, 1 mantissa bit) in bit-pattern order, NOT sorted: index = the 4-bit code.
# Same construction as bitsandbytes' get_4bit_type("fp4"): the raw values divided by their max |value|.
_FP4_RAW = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]
FP4_CODE = torch.tensor(_FP4_RAW, dtype=torch.float32).div_(12.0)

# Uniform symmetric 4-bit integers with absmax scaling: round(x / absmax * 7) / 7, 15 levels (-7..7).
INT4_CODE = torch.arange(-7, 8, dtype=torch.float32) / 7

VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes.quantize_4bit accepts
NESTED_BLOCKSIZE = 256  # block size of the second (8-bit) quantization of the absmax values
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}


# --------------------------------------------------------------------------------------------------
# The 8-bit dynamic map and blockwise 8-bit quantization (used by double quantization)
# --------------------------------------------------------------------------------------------------


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The 8-bit "dynamic" code of Dettmers (2016), sorted: 256 values in [-1, 1], dense near 0.

    Each value is a power of ten (the "exponent", 1e-6 ... 1) times a fraction in (0.1, 1): level `e`
    has 2**e fractions, the midpoints of an even split of [0.1, 1]. So small magnitudes get many levels
    and large ones few, which suits absmax values that span orders of magnitude. Plus 0 and 1.
    Same arithmetic (fp32 linspace, fp32 midpoints) as `bitsandbytes.functional.create_dynamic_map`,
    so the two are equal bit for bit.
    """
    non_sign_bits = total_bits - 1
    values: list[float] = []

    def add_level(exponent: int, n_fractions: int) -> None:
        boundaries = torch.linspace(0.1, 1, n_fractions + 1, dtype=torch.float32)  # [n_fractions + 1]
        fractions = (boundaries[:-1] + boundaries[1:]) / 2.0  # [n_fractions] midpoints
        scale = 10 ** (-(max_exponent_bits - 1) + exponent)
        values.extend((scale * fractions).tolist())
        if signed:
            values.extend((-scale * fractions).tolist())

    for e in range(max_exponent_bits):
        add_level(e, 2 ** (e + non_sign_bits - max_exponent_bits + (0 if signed else 1)))
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1  # 0 for the default 8-bit signed map
    if extra > 0:
        add_level(max_exponent_bits - 1, extra)
    values += [0.0, 1.0]
    if len(values) != 2**total_bits:
        raise ValueError(
            f"create_dynamic_map({signed=}, {max_exponent_bits=}, {total_bits=}) gives {len(values)} values, "
            f"not {2**total_bits}; use the defaults (signed=True, 7, 8)"
        )
    return torch.tensor(sorted(values), dtype=torch.float32)


_DYNAMIC_MAP = create_dynamic_map()


_LUT_SIZE = 65536  # grid points bitsandbytes' CPU kernel snaps [-1, 1] to before looking up the code


def _grid_lookup_table(code: torch.Tensor) -> torch.Tensor:
    """For each of 65536 evenly spaced points in [-1, 1], the index of the nearest code (ties: lower)."""
    grid = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / (_LUT_SIZE - 1)  # [65536]
    midpoints = 0.5 * (code[:-1] + code[1:])  # [255]
    return torch.searchsorted(midpoints, grid, side="left")  # number of midpoints strictly below


def quantize_blockwise_8bit(
    x: torch.Tensor, code: torch.Tensor | None = None, blocksize: int = NESTED_BLOCKSIZE, exact: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization with a sorted 256-value code: returns (indices uint8, absmax fp32).

    Per block: `normed = x * (1 / absmax)`, then a code index for `normed`. By default this copies
    bitsandbytes 0.50.2's CPU kernel (`quantize_cpu_impl`) bit for bit: it does not search the code,
    it snaps `normed` to a grid of 65536 points in [-1, 1] (index = trunc(fma((normed + 1) / 2, 65535,
    0.5))) and reads the code nearest that grid point from a table. Codes closer together than the
    grid step (3e-5; the dynamic map's tiniest levels) can therefore not all be reached: 249 of the
    256 can.
    `exact=True` takes the truly nearest code instead (ties to the lower), the idea of the CUDA
    kernel's binary search.
    A block whose absmax is 0 gets index 0 everywhere.
    """
    code = (_DYNAMIC_MAP if code is None else code.float()).to(x.device)
    flat = x.reshape(-1).float()  # [n]
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    padded = F.pad(flat, (0, n_blocks * blocksize - n))  # [n_blocks * blocksize]; zeros don't change absmax
    absmax = padded.reshape(n_blocks, blocksize).abs().amax(dim=1)  # [n_blocks]
    empty = (absmax == 0).repeat_interleave(blocksize)[:n]  # [n] True in all-zero blocks (0/0 = NaN there)
    normed = flat * (1.0 / absmax).repeat_interleave(blocksize)[:n]  # [n], reciprocal as in the kernel
    normed = torch.where(empty, 0.0, normed)
    if exact:
        midpoints = (code[:-1] + code[1:]) / 2
        idx = torch.bucketize(normed.clamp(-1, 1), midpoints)  # on a midpoint -> the lower code
    else:
        half = (normed.clamp(-1, 1) + 1.0) * 0.5  # [n] fp32, in [0, 1]
        # the compiled kernel fuses `half * 65535 + 0.5` into one FMA (one rounding); in float64 that
        # sum is exact, so rounding it once to fp32 gives the kernel's grid position
        position = (half.double() * (_LUT_SIZE - 1) + 0.5).float().long()  # truncation, like the C cast
        idx = _grid_lookup_table(code.cpu()).to(x.device)[position]
    idx = torch.where(empty, 0, idx)  # an all-zero block gets index 0, as in the kernel
    return idx.to(torch.uint8).reshape(x.shape), absmax


def dequantize_blockwise_8bit(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor | None = None, blocksize: int = NESTED_BLOCKSIZE
) -> torch.Tensor:
    """Inverse of `quantize_blockwise_8bit`: `code[q] * absmax[block]`, in fp32."""
    code = (_DYNAMIC_MAP if code is None else code.float()).to(q.device)
    values = code[q.reshape(-1).long()]  # [n]
    return (values * absmax.repeat_interleave(blocksize)[: values.numel()]).reshape(q.shape)


# --------------------------------------------------------------------------------------------------
# 4-bit quantization state
# --------------------------------------------------------------------------------------------------


@dataclass
class NF4State:
    """What it takes to undo 4-bit quantization (bitsandbytes calls it `QuantState`).

    Without double quantization `absmax` holds one fp32 scale per block. With it, `absmax` holds uint8
    indices into the dynamic map, `nested_absmax` one fp32 scale per 256 blocks, and `offset` the mean
    that was subtracted first: scale = code8[absmax] * nested_absmax[block // 256] + offset.
    """

    absmax: torch.Tensor  # [n_blocks] fp32, or uint8 with double quantization
    shape: torch.Size  # shape of the original tensor
    dtype: torch.dtype  # dtype of the original tensor (dequantize returns it)
    blocksize: int = 64
    quant_type: str = "nf4"
    offset: torch.Tensor | None = None  # [] fp32, double quantization only
    nested_absmax: torch.Tensor | None = None  # [ceil(n_blocks / 256)] fp32, double quantization only
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def code(self) -> torch.Tensor:
        return _CODES[self.quant_type]

    def scales(self) -> torch.Tensor:
        """The fp32 absmax of every block [n_blocks], undoing double quantization if it was used."""
        if not self.double_quant:
            return self.absmax.float()
        return (
            dequantize_blockwise_8bit(self.absmax, self.nested_absmax, blocksize=self.nested_blocksize)
            + self.offset
        )

    def nbytes(self) -> int:
        """Bytes this state holds per tensor (scales, nested scales, offset); the code tables are shared."""
        tensors = [self.absmax, self.offset, self.nested_absmax]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def to_bnb(self):
        """The same state as a `bitsandbytes.functional.QuantState`, to hand to bitsandbytes' kernels."""
        import bitsandbytes.functional as bnbF

        code = bnbF.get_4bit_type(self.quant_type, device=self.absmax.device)
        state2 = None
        if self.double_quant:
            state2 = bnbF.QuantState(
                absmax=self.nested_absmax,
                code=_DYNAMIC_MAP.to(self.absmax.device),
                blocksize=self.nested_blocksize,
                dtype=torch.float32,
            )
        return bnbF.QuantState(
            absmax=self.absmax,
            shape=self.shape,
            code=code,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            dtype=self.dtype,
            offset=self.offset,
            state2=state2,
        )

    @classmethod
    def from_bnb(cls, qs) -> NF4State:
        """Read a bitsandbytes `QuantState` (e.g. `linear4bit.weight.quant_state`)."""
        nested = getattr(qs, "nested", False)
        return cls(
            absmax=qs.absmax,
            shape=torch.Size(qs.shape),
            dtype=qs.dtype,
            blocksize=qs.blocksize,
            quant_type=qs.quant_type,
            offset=qs.offset if nested else None,
            nested_absmax=qs.state2.absmax if nested else None,
            nested_blocksize=qs.state2.blocksize if nested else NESTED_BLOCKSIZE,
        )


# --------------------------------------------------------------------------------------------------
# 4-bit quantization
# --------------------------------------------------------------------------------------------------


def _check_tensor(w, blocksize: int, what: str = "w") -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{what} has dtype {w.dtype}; 4-bit quantization takes float32, float16 or bfloat16 "
            f"(convert it first, e.g. {what}.float())"
        )
    if w.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(w.shape)}); there is nothing to quantize")
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(
            f"blocksize={blocksize!r} is not supported; bitsandbytes accepts {VALID_BLOCKSIZES} (64 is the default)"
        )
    finite = torch.isfinite(w)
    if not finite.all():
        raise ValueError(
            f"{what} has {int((~finite).sum())} NaN/inf value(s); one of them makes its block's absmax inf and turns "
            f"all {blocksize} values of the block into NaN. Find where they come from (a diverged run?), or "
            "replace them (torch.nan_to_num) before quantizing."
        )


def _check_compute_dtype(compute_dtype) -> None:
    """compute_dtype must be None (the weight's dtype) or a floating dtype: an int matmul gives zeros."""
    if compute_dtype is not None and (
        not isinstance(compute_dtype, torch.dtype) or not compute_dtype.is_floating_point
    ):
        raise TypeError(
            f"compute_dtype={compute_dtype!r} is not a floating dtype; the layer computes x @ W.T in it. "
            "Pass torch.float32, torch.bfloat16 or torch.float16 (or None for the weight's own dtype)."
        )


def _blockwise_scale(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut `flat` (fp32) into blocks; return (values scaled into [-1, 1], absmax per block)."""
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = flat[:full].reshape(-1, blocksize)  # [n_full_blocks, blocksize]
    absmax = blocks.abs().amax(dim=1)  # [n_full_blocks]
    # multiply by the reciprocal (bitsandbytes does); clamp avoids 1/0 for an all-zero block
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1).reshape(-1)
    if rem:  # a trailing partial block: bitsandbytes divides here, and stores the clamped absmax
        tail_absmax = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax.unsqueeze(0)])
        scaled = torch.cat([scaled, (flat[full:] / tail_absmax).clamp(-1, 1)])
    return scaled, absmax


def _nearest_4bit(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code for every value; a value exactly on a midpoint goes to the lower code."""
    order = torch.argsort(code)  # identity for NF4 (already sorted); FP4 is in bit-pattern order
    sorted_code = code[order]
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2  # [15]
    position = torch.bucketize(scaled, midpoints)  # right=False: midpoints[i-1] < x <= midpoints[i]
    return order[position]  # back to the code's own index


def pack_4bit(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes two per byte, the first in the HIGH nibble: [n] -> [(n + 1) // 2, 1] uint8."""
    q = q.reshape(-1).to(torch.uint8)
    if q.numel() % 2:
        q = F.pad(q, (0, 1))  # an odd count gets a zero code at the end
    return ((q[0::2] << 4) | q[1::2]).unsqueeze(1)


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_4bit`: [(n + 1) // 2, 1] uint8 -> [n] int64 codes."""
    packed = packed.reshape(-1).to(torch.uint8)
    q = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)  # high nibble first
    return q[:n].long()


def quantize_4bit(
    w: torch.Tensor, blocksize: int = 64, double_quant: bool = False, quant_type: str = "nf4"
) -> tuple[torch.Tensor, NF4State]:
    """Quantize `w` to 4 bits: returns (packed uint8 [(n + 1) // 2, 1], NF4State).

    Equal, byte for byte, to `bitsandbytes.functional.quantize_4bit(w, blocksize=blocksize,
    compress_statistics=double_quant, quant_type=quant_type)` on CPU. Any shape works: the tensor is
    flattened in row-major order; a count not divisible by `blocksize` gets a shorter last block.
    """
    _check_tensor(w, blocksize)
    if quant_type not in _CODES:
        raise ValueError(f"quant_type={quant_type!r} is unknown; use 'nf4' or 'fp4'")
    flat = w.detach().reshape(-1).float()  # [n]
    scaled, absmax = _blockwise_scale(flat, blocksize)  # [n], [n_blocks]
    if scaled.numel() % 2:  # an odd count: bitsandbytes pads the SCALED values with a 0.0 (NF4 code 7)
        scaled = F.pad(scaled, (0, 1))
    q = _nearest_4bit(scaled, _CODES[quant_type].to(flat.device))  # [n (+1)] in 0..15
    packed = pack_4bit(q)  # [(n + 1) // 2, 1]
    state = NF4State(absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize, quant_type=quant_type)
    if double_quant:
        offset = absmax.mean()  # [] centre the scales (they are all positive) ...
        q_absmax, nested_absmax = quantize_blockwise_8bit(absmax - offset)  # ... then 8 bits each
        state.absmax, state.offset, state.nested_absmax = q_absmax, offset, nested_absmax
    return packed, state


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False):
    """`quantize_4bit` with the NF4 code (QLoRA's choice)."""
    return quantize_4bit(w, blocksize=blocksize, double_quant=double_quant, quant_type="nf4")


def quantize_fp4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False):
    """`quantize_4bit` with the FP4 code (bitsandbytes' default quant_type), for comparison."""
    return quantize_4bit(w, blocksize=blocksize, double_quant=double_quant, quant_type="fp4")


def dequantize_4bit(packed: torch.Tensor, state: NF4State, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Undo `quantize_4bit`: `code[q] * absmax[block]` in fp32, cast to `dtype` (default: `state.dtype`).

    Equal to `bitsandbytes.functional.dequantize_4bit(packed, state.to_bnb())` on CPU.
    """
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError("packed must be the uint8 tensor returned by quantize_4bit")
    n = math.prod(state.shape)
    if packed.numel() != (n + 1) // 2:
        raise ValueError(
            f"packed has {packed.numel()} bytes but the state's shape {tuple(state.shape)} needs {(n + 1) // 2}; "
            "pass the state that quantize_4bit returned with these bytes"
        )
    q = unpack_4bit(packed, n)  # [n]
    values = state.code.to(packed.device)[q]  # [n] fp32 levels in [-1, 1]
    scales = state.scales().repeat_interleave(state.blocksize)[:n]  # [n] fp32
    return (values * scales).to(dtype or state.dtype).reshape(state.shape)


dequantize_nf4 = dequantize_4bit


def fake_quantize(w: torch.Tensor, code: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Quantize and dequantize `w` with any code table (NF4, FP4, INT4, ...): the values a 4-bit model sees.

    Blockwise absmax scaling and nearest level, like `quantize_4bit`, but without packing, so that
    code tables can be compared on the same weights (e.g. NF4 vs uniform INT4 vs FP4 error).
    """
    _check_tensor(w, blocksize)
    code = code.float().to(w.device)
    flat = w.detach().reshape(-1).float()
    scaled, absmax = _blockwise_scale(flat, blocksize)
    values = code[_nearest_4bit(scaled, code)]
    return (values * absmax.repeat_interleave(blocksize)[: flat.numel()]).to(w.dtype).reshape(w.shape)


# --------------------------------------------------------------------------------------------------
# The 4-bit linear layer
# --------------------------------------------------------------------------------------------------


class NF4Linear(nn.Module):
    """A linear layer whose weight is stored in 4 bits and dequantized on the fly in `forward`.

    Buffers (so `.to(device)` and `state_dict()` carry them; none of them is trainable):
    `weight` (packed uint8 [(out*in + 1) // 2, 1], as bitsandbytes' `Linear4bit.weight`),
    `weight_absmax`, and with double quantization `weight_nested_absmax` and `weight_offset`.
    `bias` stays in full precision (a frozen parameter). `forward(x)` computes
    `x @ dequantize(W).T + b` in `compute_dtype`, as bitsandbytes' CPU `Linear4bit` does.
    Wrap it with LoRA (`lora_lab.layers.LoRALinear`) and you have QLoRA.
    """

    def __init__(
        self,
        packed: torch.Tensor,
        state: NF4State,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        _check_compute_dtype(compute_dtype)
        if len(state.shape) != 2:
            raise ValueError(
                f"NF4Linear needs a 2-D weight [out, in]; the state has shape {tuple(state.shape)}"
            )
        self.out_features, self.in_features = state.shape
        self.blocksize = state.blocksize
        self.quant_type = state.quant_type
        self.weight_dtype = state.dtype  # dtype of the weight before quantization
        self.compute_dtype = compute_dtype or state.dtype
        self.nested_blocksize = state.nested_blocksize
        self.register_buffer("weight", packed)
        self.register_buffer("weight_absmax", state.absmax)
        self.register_buffer("weight_nested_absmax", state.nested_absmax)
        self.register_buffer("weight_offset", state.offset)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        quant_type: str = "nf4",
    ) -> NF4Linear:
        """Quantize an `nn.Linear`'s weight (the linear itself is left as it was)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"NF4Linear.from_linear takes an nn.Linear, got {type(linear).__name__}")
        packed, state = quantize_4bit(linear.weight, blocksize, double_quant, quant_type)
        return cls(packed, state, linear.bias, compute_dtype)

    @property
    def double_quant(self) -> bool:
        return self.weight_nested_absmax is not None

    def quant_state(self) -> NF4State:
        """The NF4State of the stored weight (views of this layer's buffers)."""
        return NF4State(
            absmax=self.weight_absmax,
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.weight_dtype,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            offset=self.weight_offset,
            nested_absmax=self.weight_nested_absmax,
            nested_blocksize=self.nested_blocksize,
        )

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight the layer computes with: [out, in], in `dtype` (default: the original dtype)."""
        return dequantize_4bit(self.weight, self.quant_state(), dtype)

    def _apply(self, fn, recurse=True):
        """Move like any module, but keep the fp32 scales fp32 when the model is cast (e.g. `.half()`).

        bitsandbytes keeps them outside the module's buffers for the same reason: rounding the
        scales to 16 bits would change every dequantized weight.
        """
        fp32 = {k: v for k, v in self._buffers.items() if v is not None and v.dtype == torch.float32}
        super()._apply(fn, recurse)
        for name, original in fp32.items():
            self._buffers[name] = original.to(self._buffers[name].device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        w = self.dequantized_weight(self.compute_dtype)  # [out, in], rebuilt every call, never stored
        bias = self.bias.to(self.compute_dtype) if self.bias is not None else None
        return F.linear(x.to(self.compute_dtype), w, bias).to(x.dtype)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain nn.Linear holding the dequantized weight (what "merge into full precision" starts from)."""
        dtype = dtype or self.weight_dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear = linear.to(device=self.weight.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dequantized_weight(dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def nbytes(self) -> int:
        """Bytes this layer holds: packed weight, scales and bias."""
        return sum(t.numel() * t.element_size() for t in list(self.buffers()) + list(self.parameters()))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
            f"compute_dtype={self.compute_dtype}"
        )


def is_quantized_layer(module: nn.Module) -> bool:
    """True for a 4-bit layer: lora_lab's NF4Linear or bitsandbytes' Linear4bit."""
    if isinstance(module, NF4Linear):
        return True
    return type(module).__name__ in {"Linear4bit", "LinearNF4", "LinearFP4"} and hasattr(
        module.weight, "quant_state"
    )


def quantize_model(
    model: nn.Module,
    target_modules: list[str] | str | None = None,
    skip_modules: tuple[str, ...] = ("lm_head",),
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    quant_type: str = "nf4",
) -> nn.Module:
    """Replace the model's nn.Linear layers with NF4Linear, in place; returns the model.

    `target_modules`: None or "all-linear" for every nn.Linear, or a list of names matched against the
    last part of the module path (PEFT style: ["q_proj", "v_proj"]) or the full path. Layers named in
    `skip_modules` stay in full precision (the output head by default, as transformers does).
    Everything is checked before anything changes, so on an error the model is as it was.
    """
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"blocksize={blocksize!r} is not supported; use one of {VALID_BLOCKSIZES}")
    if quant_type not in _CODES:
        raise ValueError(f"quant_type={quant_type!r} is unknown; use 'nf4' or 'fp4'")
    _check_compute_dtype(compute_dtype)
    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [target_modules]
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}

    def wanted(name: str) -> bool:
        last = name.rsplit(".", 1)[-1]
        if last in skip_modules or name in skip_modules:
            return False
        return target_modules in (None, "all-linear") or last in target_modules or name in target_modules

    chosen = [name for name in linears if wanted(name)]
    if not chosen:
        candidates = sorted({name.rsplit(".", 1)[-1] for name in linears})
        raise ValueError(
            f"target_modules={target_modules!r} matches no nn.Linear layer of this model (skipping {skip_modules}); "
            f"candidates: {candidates}"
        )
    for name, m in linears.items():
        if name in chosen and m.weight.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"layer {name} has weight dtype {m.weight.dtype}; only float layers can be quantized"
            )
    new_layers = {
        name: NF4Linear.from_linear(linears[name], blocksize, double_quant, compute_dtype, quant_type)
        for name in chosen
    }
    for name, layer in new_layers.items():
        model.set_submodule(name, layer)
    return model


# --------------------------------------------------------------------------------------------------
# Memory accounting
# --------------------------------------------------------------------------------------------------


def model_bytes(model: nn.Module) -> int:
    """Bytes held by a model's parameters and buffers, counting packed 4-bit storage as it really is.

    Shared (tied) tensors count once. For bitsandbytes' `Linear4bit`, whose scales live in
    `weight.quant_state` rather than in buffers, the state's tensors are added too (absmax, offset,
    nested absmax and the two code tables it keeps per layer).
    """
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if t is None or id(t) in seen:
            return
        seen.add(id(t))
        total += t.numel() * t.element_size()

    for t in list(model.parameters()) + list(model.buffers()):
        add(t)
        qs = getattr(t, "quant_state", None)
        if qs is not None:
            for extra in (qs.absmax, qs.offset, qs.code):
                add(extra)
            if getattr(qs, "state2", None) is not None:
                add(qs.state2.absmax)
                add(qs.state2.code)
    return total


def bits_per_param(blocksize: int = 64, double_quant: bool = False, n_nested_blocks: int = 16) -> float:
    """Bits per parameter MEASURED from the storage of a real quantized tensor.

    Quantizes a random tensor of `blocksize * 256 * n_nested_blocks` values and counts the bytes of
    the packed weight plus its state (scales, nested scales, offset). Expect 4.5 without double
    quantization and about 4.127 with it at blocksize 64 (the 4-byte offset adds 32/n on top).
    """
    n = blocksize * NESTED_BLOCKSIZE * n_nested_blocks
    w = torch.randn(n, generator=torch.Generator().manual_seed(0))
    packed, state = quantize_4bit(w, blocksize=blocksize, double_quant=double_quant)
    return 8 * (packed.numel() * packed.element_size() + state.nbytes()) / n


# The QLoRA paper's models (Llama-1 7B, 13B, 65B) by the shipped shape they have: Llama-2 7B and 13B
# have Llama-1's shapes (only the context differs).
LLAMA_SHAPES = {"7B": "llama-2-7b", "13B": "llama-2-13b", "65B": "llama-65b"}


def llama_weight_memory(shape: str, blocksize: int = 64, double_quant: bool = True) -> dict[str, float]:
    """Weight memory of the QLoRA paper's Llama `shape` (a key of LLAMA_SHAPES): `sizing.weight_memory`.

    Returns the parameter count and bytes in fp32, bf16, and NF4 the way QLoRA/transformers do it: the
    seven projections of every block in 4 bits (at `bits_per_param_formula`), embeddings, lm_head and
    norms in bf16.
    """
    if shape not in LLAMA_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; use one of {list(LLAMA_SHAPES)}")
    return weight_memory(LLAMA_SHAPES[shape], blocksize, double_quant)


# --------------------------------------------------------------------------------------------------
# Merging a LoRA delta into a quantized base
# --------------------------------------------------------------------------------------------------

MERGE_OPTIONS = {
    "full_precision": "dequantize the base, add the delta, keep the result in 16/32 bits (exact, bigger)",
    "requantize": "dequantize, add the delta, quantize again to 4 bits (small, but rounding changes outputs)",
    "unmerged": "keep the adapter beside the 4-bit base (exact, small, a little slower per token)",
}


def merge_full_precision(base: NF4Linear, delta: torch.Tensor, dtype: torch.dtype | None = None) -> nn.Linear:
    """Case 1: W = dequantize(W4) + delta, returned as a full-precision nn.Linear (the base is untouched)."""
    _check_delta(base, delta)
    linear = base.to_linear(dtype or base.weight_dtype)
    with torch.no_grad():
        linear.weight.add_(delta.to(linear.weight.dtype))
    return linear


def requantize_merge(base: NF4Linear, delta: torch.Tensor) -> NF4Linear:
    """Case 3: quantize(dequantize(W4) + delta) with the base's settings: a new 4-bit layer.

    What PEFT does when merging into a bitsandbytes 4-bit layer. The merged weight is rounded again,
    so outputs differ slightly from base + adapter (PEFT warns "may get different generations").
    """
    _check_delta(base, delta)
    merged = (base.dequantized_weight(torch.float32) + delta.float()).to(base.weight_dtype)  # [out, in]
    packed, state = quantize_4bit(merged, base.blocksize, base.double_quant, base.quant_type)
    return NF4Linear(packed, state, base.bias, base.compute_dtype)


def _check_delta(base: nn.Module, delta: torch.Tensor) -> None:
    if not isinstance(base, NF4Linear):
        raise TypeError(f"expected an NF4Linear base layer, got {type(base).__name__}")
    if tuple(delta.shape) != (base.out_features, base.in_features):
        raise ValueError(
            f"delta has shape {tuple(delta.shape)} but the base weight is "
            f"[{base.out_features}, {base.in_features}]; the adapter was made for another layer"
        )


def _lora_delta(layer: nn.Module) -> torch.Tensor:
    """delta W = scaling * B @ A of a LoRA layer: lora_lab's LoRALinear, or PEFT's (active adapter)."""
    if callable(getattr(layer, "delta_weight", None)):  # lora_lab.layers.LoRALinear
        return layer.delta_weight()
    if callable(getattr(layer, "get_delta_weight", None)):  # PEFT: one entry per adapter name
        return layer.get_delta_weight(layer.active_adapters[0])
    return lora_delta(layer.lora_A.weight.float(), layer.lora_B.weight.float(), layer.scaling)  # [out, in]


def _options_text() -> str:
    return "; ".join(f"how={k!r}: {v}" for k, v in MERGE_OPTIONS.items())


def merge_quantized(lora_layer: nn.Module, how: str | None = None) -> nn.Module:
    """Merge a LoRA layer whose base is an NF4Linear; `how` must be one of MERGE_OPTIONS.

    There is no single right answer for a 4-bit base, so the caller has to choose:
    "full_precision" -> nn.Linear, "requantize" -> NF4Linear, "unmerged" -> the LoRA layer unchanged.
    The LoRA layer itself is never modified; put the returned module where it was.
    """
    if how not in MERGE_OPTIONS:
        raise ValueError(
            f"merging into a 4-bit base layer needs a choice of how (got {how!r}). Options: {_options_text()}"
        )
    base = getattr(lora_layer, "base_layer", None)
    if not isinstance(base, NF4Linear):
        raise TypeError(
            f"merge_quantized expects a LoRA layer over an NF4Linear (.base_layer), got base {type(base).__name__}; "
            "for a full-precision base use lora_lab.merge.merge_and_unload"
        )
    if how == "unmerged":
        return lora_layer
    delta = _lora_delta(lora_layer)
    if how == "full_precision":
        return merge_full_precision(base, delta)
    return requantize_merge(base, delta)


def merge_quantized_model(model: nn.Module, how: str | None = None) -> nn.Module:
    """`merge_quantized` on every LoRA layer of a model over NF4Linear bases, in place; returns the model.

    Each LoRA layer is replaced by the merged module ("full_precision": nn.Linear, "requantize":
    NF4Linear); "unmerged" leaves the model as it is. Everything is checked before anything changes.
    """
    if how not in MERGE_OPTIONS:
        raise ValueError(
            f"merging into a 4-bit base model needs a choice of how (got {how!r}). Options: {_options_text()}"
        )
    layers = {
        name: m
        for name, m in model.named_modules()
        if hasattr(m, "base_layer") and hasattr(m, "lora_A") and not isinstance(m.lora_A, nn.ModuleDict)
    }
    if not layers:
        raise ValueError("this model has no lora_lab LoRA layers; add_lora (over quantize_model) first")
    not_quantized = [name for name, m in layers.items() if not isinstance(m.base_layer, NF4Linear)]
    if not_quantized:
        raise TypeError(
            f"{len(not_quantized)} LoRA layer(s) have a full-precision base (e.g. {not_quantized[0]}); "
            "merge those with lora_lab.merge.merge_and_unload"
        )
    if how == "unmerged":
        return model
    merged = {name: merge_quantized(m, how) for name, m in layers.items()}
    for name, new in merged.items():
        model.set_submodule(name, new)
    return model
