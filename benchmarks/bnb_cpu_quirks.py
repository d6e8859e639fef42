"""bitsandbytes' CPU quirks on this machine, side by side: one command, no arguments needed.

    python benchmarks/bnb_cpu_quirks.py

1. `dequantize_4bit`: for each shape and blocksize, the native kernel against bitsandbytes' portable
   path and lora_lab, with the relative error of each against the original weight, and which story
   (`lora_lab.bnb_cpu`) the native result fits: "exact" or "block-span bug".
2. Repacking for AVX512-BF16: for each layer shape, whether bitsandbytes' repacking rule allows it,
   and what an eval-mode forward of `bnb.nn.Linear4bit` does here (fp32 path, bf16 path, or crash).

Prints a table; writes nothing. The rules are explained in lora_lab/bnb_cpu.py and chapter 06.
"""

from __future__ import annotations

# ruff: noqa: I001  (lora_lab is imported first on purpose: it quiets bitsandbytes' import-time log line)
import lora_lab  # noqa: F401
import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import torch

from lora_lab import bnb_cpu, nf4

DEQUANT_SHAPES = [(192, 96), (128, 512), (32, 32), (64, 128), (4, 64), (16, 80), (3, 100)]
LAYER_SHAPES = [(64, 128), (192, 512), (32, 32), (48, 128), (64, 96)]  # (out_features, in_features)


def rel_error(approx: torch.Tensor, w: torch.Tensor) -> float:
    return ((approx.reshape(w.shape) - w).norm() / w.norm()).item()


def dequantize_table() -> None:
    print(f"{'shape':>11} {'block':>5} {'native err':>10} {'portable err':>12} {'lora_lab':>8}  native is")
    for shape in DEQUANT_SHAPES:
        for blocksize in (64, 1024):
            w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02
            packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
            native = bnbF.dequantize_4bit(packed, state)
            portable = bnb_cpu.portable_dequantize_4bit(packed, state)
            ours = nf4.dequantize_nf4(*nf4.quantize_nf4(w, blocksize=blocksize))
            same = "same" if torch.equal(ours, portable.reshape(w.shape)) else "DIFFERS"
            story = bnb_cpu.compare_native_dequantize(packed, state)
            print(
                f"{str(shape):>11} {blocksize:>5} {rel_error(native, w):>10.3f} {rel_error(portable, w):>12.3f}"
                f" {same:>8}  {story}"
            )


def repacking_table() -> None:
    print(f"{'out x in':>9} {'rule allows':>11}  eval-mode forward here")
    for out_features, in_features in LAYER_SHAPES:
        torch.manual_seed(0)
        weight = torch.randn(out_features, in_features) * 0.02
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32)
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", blocksize=64)
        layer = layer.to("cpu").eval()
        x = torch.randn(2, in_features)
        with torch.no_grad():
            try:
                layer(x)
                repacked = getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
                outcome = "repacked, computes in bf16" if repacked else "fp32 path (no repacking here)"
            except (RuntimeError, AssertionError) as err:
                outcome = f"crash: {str(err).splitlines()[0][:60]}"
        allowed = bnb_cpu.cpu_repacking_supported(in_features, out_features, 64)
        print(f"{out_features:>4} x {in_features:<4} {str(allowed):>11}  {outcome}")


def main() -> None:
    print(
        f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()},"
        f" bitsandbytes {bnb.__version__}, AVX512-BF16 repacking {bnb_cpu.cpu_repacking_in_use()}"
    )
    print(
        f"native dequantize_4bit has the block-span bug here: {bnb_cpu.native_kernel_has_block_span_bug()}\n"
    )
    dequantize_table()
    print()
    repacking_table()


if __name__ == "__main__":
    main()
