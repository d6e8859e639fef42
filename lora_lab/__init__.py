"""LoRA Lab: LoRA, QLoRA, merging and adapter switching from scratch, checked against PEFT.

The package is flat: one module per topic of the book, each importable on its own.

    runtime    device, dtype, optimizer and seed choices          (chapter 00)
    models     load_base(): the bundled tiny model or any Hub id   (chapter 00)
    data       the generated corpus, probes and task data sets     (chapter 00)
    evaluate   perplexity, probe accuracy, task accuracy           (chapter 01)
    layers     LoRALinear: W0 x + (alpha/r) B A x                  (chapter 02)
    inject     LoRAConfig, add_lora, counting trainable params     (chapters 02-03)
    sizing     meta-device parameter and memory calculators        (chapters 01-02)
    train      a small training loop for any model                 (chapters 01-05)
    adapters   PEFT-format save / load                             (chapter 05)
    nf4        NF4 quantization and 4-bit layers (QLoRA)           (chapter 06)
    bnb_cpu    bitsandbytes' CPU kernel quirks, detected and shown  (chapter 06)
    merge      merge / unmerge / merge_and_unload                  (chapter 07)
    registry   many adapters, LRU on the device (S-LoRA idea)      (chapter 07)
    serving    batched multi-adapter forward and generation        (chapter 07)
    variants   rsLoRA, LoRA+, OLoRA, PiSSA, CorDA, LoRA-Null, LoftQ (chapter 08)
    dora       DoRA                                                (chapter 08)

The most used entry points are re-exported here, imported on first use so that
`import lora_lab` stays fast.
"""

from importlib import import_module

from lora_lab.runtime import compute_dtype, device, optimizer_name, quiet_library_noise, seed_everything

quiet_library_noise()  # before peft / bitsandbytes are imported: see lora_lab.runtime.NOISE

__version__ = "0.1.0"

# name -> module that defines it (loaded lazily by __getattr__)
_LAZY = {
    "load_base": "lora_lab.models",
    "LoRAConfig": "lora_lab.inject",
    "add_lora": "lora_lab.inject",
    "print_trainable_parameters": "lora_lab.inject",
    "LoRALinear": "lora_lab.layers",
    "merge_and_unload": "lora_lab.merge",
    "save_adapter": "lora_lab.adapters",
    "load_adapter": "lora_lab.adapters",
}

__all__ = ["device", "compute_dtype", "optimizer_name", "seed_everything", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lora_lab' has no attribute {name!r}")
