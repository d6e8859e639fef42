"""LoRA Lab: LoRA, QLoRA, merging and adapter switching from scratch, checked against PEFT.

The package is flat: one module per topic of the book, each importable on its own.

    runtime    device, dtype, optimizer and seed choices          (chapter 00)
    models     load_base(): the bundled tiny model or any Hub id   (chapter 00)
    data       the generated corpus, probes and task data sets     (chapter 00)
    evaluate   perplexity, probe accuracy, task accuracy           (chapter 01)
    payoff     base vs adapter answers, side by side             (chapters 01, 05, 07)
    layers     LoRALinear: W0 x + (alpha/r) B A x                  (chapter 02)
    inject     LoRAConfig, add_lora, counting trainable params     (chapters 02-03)
    sizing     meta-device parameter and memory calculators        (chapters 01-02)
    train      a small training loop for any model                 (chapters 01-05)
    adapters   PEFT-format save / load                             (chapter 05)
    nf4        NF4 quantization and 4-bit layers (QLoRA)           (chapters 06, 06b)
    bnb_cpu    bitsandbytes' CPU kernel quirks, detected and shown  (chapter 06)
    merge      merge / unmerge / merge_and_unload                  (chapter 07)
    registry   many adapters, LRU on the device (S-LoRA idea)      (chapter 07)
    serving    batched multi-adapter forward and generation        (chapters 07, 07b)
    variants   rsLoRA, LoRA+, OLoRA, PiSSA, CorDA, LoRA-Null, LoftQ (chapter 08)
    dora       DoRA                                                (chapter 08)

    experiments  fine-tune then score: the recipe of the card and benchmarks
    pretrain     the tiny base model, pretrained from scratch      (chapter 00)
    model_card   the tiny base model's measured card               (chapter 00)

The most used entry points are re-exported here.
"""

from lora_lab.runtime import compute_dtype, device, optimizer_name, quiet_library_noise, seed_everything

quiet_library_noise()  # before peft / bitsandbytes are imported: see lora_lab.runtime.NOISE

from lora_lab import runtime  # noqa: E402  (after quiet_library_noise, like everything below)
from lora_lab.adapters import load_adapter, save_adapter  # noqa: E402
from lora_lab.inject import LoRAConfig, add_lora, print_trainable_parameters  # noqa: E402
from lora_lab.layers import LoRALinear  # noqa: E402
from lora_lab.merge import merge_and_unload  # noqa: E402
from lora_lab.models import load_base  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "runtime",
    "device",
    "compute_dtype",
    "optimizer_name",
    "seed_everything",
    "load_base",
    "LoRAConfig",
    "add_lora",
    "print_trainable_parameters",
    "LoRALinear",
    "merge_and_unload",
    "save_adapter",
    "load_adapter",
]
