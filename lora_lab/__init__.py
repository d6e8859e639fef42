"""LoRA Lab: LoRA, QLoRA, merging and adapter switching from scratch, checked against PEFT.

The package is flat: one module per topic of the book, each importable on its own,
e.g. `from lora_lab import layers`. The most used entry points are re-exported here:

    device(), compute_dtype(), optimizer_name(), seed_everything()   (lora_lab.runtime)
    load_base()                                                      (lora_lab.models)
"""

from lora_lab.runtime import compute_dtype, device, optimizer_name, seed_everything

__all__ = ["device", "compute_dtype", "optimizer_name", "seed_everything", "load_base"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # load_base pulls in transformers; import it only when asked for, so `import lora_lab` stays fast.
    if name == "load_base":
        from lora_lab.models import load_base

        return load_base
    raise AttributeError(f"module 'lora_lab' has no attribute {name!r}")
