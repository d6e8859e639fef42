"""Device, dtype, optimizer and seed choices, made in one place.

Every notebook runs unchanged on a laptop CPU and on a Colab GPU. The choices that
differ between the two live here so a notebook never branches on hardware itself:

- `device()`: CUDA when present, else CPU.
- `compute_dtype()`: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU.
- `optimizer_name()`: `paged_adamw_8bit` on CUDA (bitsandbytes' paged optimizer, as the
  sources recommend), `adamw_torch` on CPU.
- `seed_everything()`: Python, NumPy and torch seeds, and deterministic CPU kernels.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

__all__ = ["device", "compute_dtype", "optimizer_name", "seed_everything", "describe"]


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


def describe() -> str:
    """One line naming the device, dtype and optimizer a notebook will use."""
    dev = device()
    return f"device={dev.type} dtype={str(compute_dtype(dev)).removeprefix('torch.')} optim={optimizer_name(dev)}"
