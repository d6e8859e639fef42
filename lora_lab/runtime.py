"""Device, dtype, optimizer and seed choices, made in one place.

Every notebook runs unchanged on a laptop CPU and on a Colab GPU. The choices that
differ between the two live here so a notebook never branches on hardware itself:

- `device()`: CUDA when present, else CPU.
- `compute_dtype()`: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU.
- `optimizer_name()`: `paged_adamw_8bit` on CUDA (bitsandbytes' paged optimizer, as the
  sources recommend), `adamw_torch` on CPU.
- `seed_everything()`: Python, NumPy and torch seeds, and deterministic CPU kernels.
- `quiet_library_noise()`: drops the library log lines that depend on the machine, not on the
  code (run when `lora_lab` is imported; import it before peft, trl or bitsandbytes).
"""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch

__all__ = [
    "device",
    "compute_dtype",
    "optimizer_name",
    "seed_everything",
    "describe",
    "quiet_library_noise",
    "below",
]

# Log lines that say something about the machine, not about the code a reader runs, by logger name.
# bitsandbytes, on a CPU with AVX512-BF16, tries a Hub-hosted kernel at import and logs its absence
# (the book is offline; its portable kernels are used instead).
# vLLM's CPU build finds torch's triton package, which has no CPU backend, and says so at import.
NOISE = {
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    "vllm.triton_utils.importing": ("Triton is installed, but doesn't include CPU backend",),
}
SILENCED: list[str] = []  # what quiet_library_noise() dropped, to look at when in doubt


class _DropKnownNoise(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(self.prefixes):
            SILENCED.append(message)
            return False
        return True


def quiet_library_noise() -> None:
    """Drop the known machine-dependent log lines (`NOISE`) before their library is imported.

    A notebook's stored outputs are compared on other machines (nbval): a line that one CPU prints
    and another does not would fail there. Only the exact messages listed are dropped; anything
    else the libraries log still shows. Idempotent.
    """
    for name, prefixes in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownNoise) for f in logger.filters):
            logger.addFilter(_DropKnownNoise(prefixes))


def device(prefer: str | None = None) -> torch.device:
    """The device to run on: `prefer` if given, else `$LORA_LAB_DEVICE`, else CUDA if present, else CPU."""
    name = prefer or os.environ.get("LORA_LAB_DEVICE")
    if name:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was asked for but CUDA is not available here; use 'cpu'")
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(dev: torch.device | str | None = None) -> torch.dtype:
    """bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU (fast and exact enough there)."""
    dev = torch.device(dev) if dev is not None else device()
    if dev.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def optimizer_name(dev: torch.device | str | None = None) -> str:
    """The transformers `TrainingArguments.optim` value for this device."""
    dev = torch.device(dev) if dev is not None else device()
    return "paged_adamw_8bit" if dev.type == "cuda" else "adamw_torch"


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch, and ask torch for deterministic kernels where it has them."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def below(value: float, bound: float) -> str:
    """Print a rounding-sized gap as "< bound": its digits depend on the CPU's kernels, its bound does not.

    Notebook outputs are compared on other machines, so a gap of 2e-05 here and 3e-05 there must not
    be printed. Assert the tight value; print this. A gap at or above `bound` prints with 2 digits.
    """
    return f"< {bound:.0e}" if value < bound else f"{value:.2g}"


def describe() -> str:
    """One line naming the device, dtype and optimizer a notebook will use."""
    dev = device()
    return f"device={dev.type} dtype={str(compute_dtype(dev)).removeprefix('torch.')} optim={optimizer_name(dev)}"
