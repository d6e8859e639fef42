"""Size real models without downloading them: parameter counts, LoRA counts, memory, file size.

The shapes of well-known models ship as config JSON in `data/model_shapes/` (Llama-2-7B, 13B,
70B, LLaMA-65B, OPT-350m and GPT-3 175B written as a GPT-2-architecture config). A model is built from its
config on PyTorch's "meta" device: every tensor has a shape and a dtype but no storage, so a
70-billion-parameter model "exists" in a second and zero bytes, and the same lora_lab code that
trains the tiny model counts the big one:

    count_params("llama-2-7b")                                   # 6,738,415,616
    lora_trainable("llama-2-7b", r=16, target_modules=LLAMA_ALL) # 39,976,960
    trainable_line("llama-2-7b", 16, LLAMA_ALL)                  # PEFT's printed line
    memory_estimate("llama-2-7b", "qlora", r=16)                 # bytes: weights, grads, Adam, ...
    weight_memory("llama-65b")                                   # weights in fp32, bf16 and NF4
    adapter_file_bytes("llama-2-7b", 16, LLAMA_ALL)              # exact adapter_model.safetensors size

This is lora_lab's one memory calculator: `lora_lab.nf4` measures the bytes of real quantized
tensors and answers its chapter's model-scale questions through the functions here.
Memory estimates count what is certain from the shapes: weights, gradients, optimizer state
(AdamW: two fp32 moments per trainable parameter) and, for mixed-precision full fine-tuning, the
fp32 master copy. Activations depend on batch, sequence length and checkpointing: pass them in.
Left out: CUDA context, allocator fragmentation, temporary buffers, paged optimizers.

References: Hu et al. 2021 (LoRA), Dettmers et al. 2023 (QLoRA: NF4, blocksize 64, double
quantization with 256-block fp32 second-level constants), Rajbhandari et al. 2020 (ZeRO: 16
bytes per parameter for mixed-precision Adam), the safetensors format specification.
"""

from __future__ import annotations

import json
import math
from functools import cache

import torch
from torch import nn

from lora_lab.inject import LoRAConfig, add_lora, count_parameters, lora_layers, trainable_parameters_line
from lora_lab.paths import DATA_DIR

__all__ = [
    "SHAPES_DIR",
    "LLAMA_ALL",
    "available_shapes",
    "shape_config",
    "meta_model",
    "count_params",
    "lora_counts",
    "lora_trainable",
    "trainable_line",
    "quantizable_params",
    "bits_per_param_formula",
    "weight_memory",
    "memory_estimate",
    "safetensors_bytes",
    "adapter_file_bytes",
]

SHAPES_DIR = DATA_DIR / "model_shapes"
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_DTYPE_NAMES = {4: "F32", 2: "BF16", 8: "F64"}  # safetensors dtype tag by bytes per element


def available_shapes() -> list[str]:
    """Names of the shipped model shapes, e.g. ["gpt3-175b", "llama-2-13b", ...]."""
    return sorted(p.stem for p in SHAPES_DIR.glob("*.json"))


def shape_config(name: str):
    """The transformers config of a shipped shape (keys starting with "_" are notes, dropped)."""
    from transformers import AutoConfig

    path = SHAPES_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown model shape {name!r}; shipped shapes: {', '.join(available_shapes())}")
    values = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    values.pop("architectures", None)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def meta_model(name: str) -> nn.Module:
    """The causal LM of a shipped shape, built on the meta device: shapes without memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(shape_config(name))


@cache
def count_params(name: str) -> int:
    """All parameters of a shipped shape (tied embeddings counted once, as PEFT and HF do)."""
    return count_parameters(meta_model(name))[1]


def _as_targets(target_modules):
    return target_modules if isinstance(target_modules, str) else list(target_modules)


def lora_counts(name: str, r: int, target_modules: list[str] | str = "all-linear") -> tuple[int, int]:
    """(trainable, all) parameters after LoRA of rank r on target_modules, counted like PEFT."""
    model = add_lora(
        meta_model(name), LoRAConfig(r=r, lora_alpha=r, target_modules=_as_targets(target_modules))
    )
    return count_parameters(model)


def lora_trainable(name: str, r: int, target_modules: list[str] | str = "all-linear") -> int:
    """Trainable LoRA parameters: sum over targeted layers of r * (in + out)."""
    return lora_counts(name, r, target_modules)[0]


def trainable_line(name: str, r: int, target_modules: list[str] | str = "all-linear") -> str:
    """PEFT's `print_trainable_parameters` line for LoRA on a shipped shape."""
    model = add_lora(
        meta_model(name), LoRAConfig(r=r, lora_alpha=r, target_modules=_as_targets(target_modules))
    )
    return trainable_parameters_line(model)


@cache
def quantizable_params(name: str) -> int:
    """Parameters in the linear layers 4-bit loading quantizes: every nn.Linear except the output head.

    Embeddings, norms, biases and lm_head stay in the compute dtype (transformers' bitsandbytes
    integration skips the output head).
    """
    from lora_lab.inject import output_head_name

    model = meta_model(name)
    head = output_head_name(model)
    total = 0
    for module_name, module in model.named_modules():
        if module_name != head and isinstance(module, nn.Linear):
            total += module.weight.numel()
        elif module_name != head and type(module).__name__ == "Conv1D":
            total += module.weight.numel()  # bnb does not quantize Conv1D; counted as if converted
    return total


def bits_per_param_formula(blocksize: int = 64, double_quant: bool = False) -> float:
    """Storage per weight in NF4, in bits: 4 bits, plus one absmax constant per block.

    Without double quantization the absmax is fp32: 32 / 64 = 0.5 extra bits per weight. With it,
    the absmax values are themselves 8-bit with one fp32 constant per 256 of them (the nested block
    size, `nf4.NESTED_BLOCKSIZE`): 8 / 64 + 32 / (64 * 256) = 0.127 bits (QLoRA paper, section 3).
    The one NF4 storage formula of lora_lab (`nf4.bits_per_param` measures it on a real tensor).
    """
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * 256)
    return 4 + 32 / blocksize


def weight_memory(name: str, blocksize: int = 64, double_quant: bool = True) -> dict:
    """Weight memory (bytes, weights only: no activations, optimizer state or KV cache) of a shipped shape.

    Returns the parameter count, the parameters 4-bit loading quantizes (`quantizable_params`) and the
    bytes in fp32, bf16, and NF4 the way QLoRA/transformers store it: those linear layers at
    `bits_per_param_formula` bits, everything else (embeddings, lm_head, norms) in bf16.
    """
    params, linear = count_params(name), quantizable_params(name)
    bits = bits_per_param_formula(blocksize, double_quant)
    return {
        "params": params,
        "quantized_params": linear,
        "fp32_bytes": 4 * params,
        "bf16_bytes": 2 * params,
        "nf4_bytes": linear * bits / 8 + 2 * (params - linear),
        "bits_per_param": bits,
    }


def memory_estimate(
    name: str,
    method: str,
    r: int = 16,
    target_modules: list[str] | str = "all-linear",
    weight_bytes: int = 2,
    activation_bytes: int = 0,
    adam_bytes_per_param: int = 8,
    master_weights: bool | None = None,
    double_quant: bool = True,
) -> dict:
    """Training memory in bytes for "full", "lora" or "qlora" fine-tuning of a shipped shape.

    Returns {"method", "params", "trainable", "weights", "master_weights", "gradients", "optimizer",
    "activations", "total"} (all byte counts are ints).

    - full:  all weights in `weight_bytes` (2 = bf16/fp16), gradients the same size, AdamW's two
             fp32 moments (8 bytes) per parameter, and with weight_bytes < 4 an fp32 master copy
             (master_weights; default on): 2 + 2 + 8 + 4 = 16 bytes per parameter.
    - lora:  frozen base in `weight_bytes`; the adapter is fp32 (as PEFT keeps it) with fp32
             gradients and AdamW moments: 4 + 4 + 8 = 16 bytes per trainable parameter.
    - qlora: as lora, but the base linear layers are NF4 (`bits_per_param_formula`, blocksize 64).
    activation_bytes: pass your own figure (it depends on batch, sequence and checkpointing).
    """
    if method not in ("full", "lora", "qlora"):
        raise ValueError(f"method must be 'full', 'lora' or 'qlora', got {method!r}")
    if weight_bytes not in (1, 2, 4) or activation_bytes < 0:
        raise ValueError("weight_bytes must be 1, 2 or 4 and activation_bytes >= 0")
    params = count_params(name)
    if method == "full":
        trainable = params
        weights = params * weight_bytes
        use_master = weight_bytes < 4 if master_weights is None else master_weights
        master = params * 4 if use_master else 0
        gradients = params * weight_bytes
    else:
        trainable = lora_trainable(name, r, target_modules)
        master = 0
        if method == "lora":
            weights = params * weight_bytes + trainable * 4
        else:
            quantized = quantizable_params(name)
            nf4_bytes = quantized * bits_per_param_formula(64, double_quant) / 8
            base = nf4_bytes + (params - quantized) * weight_bytes
            weights = math.ceil(base) + trainable * 4
        gradients = trainable * 4
    optimizer = trainable * adam_bytes_per_param
    total = weights + master + gradients + optimizer + activation_bytes
    return {
        "method": method,
        "params": params,
        "trainable": trainable,
        "weights": int(weights),
        "master_weights": int(master),
        "gradients": int(gradients),
        "optimizer": int(optimizer),
        "activations": int(activation_bytes),
        "total": int(total),
    }


def safetensors_bytes(shapes: dict[str, tuple[int, ...]], dtype_bytes: int = 4, metadata=None) -> int:
    """Exact size of a safetensors file holding tensors of these shapes (one dtype).

    Layout: 8-byte header length, a compact JSON header (metadata first, then tensors sorted by
    name, each with dtype, shape and byte offsets), padded with spaces to a multiple of 8, then
    the raw data.
    """
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for key in sorted(shapes):
        size = math.prod(shapes[key]) * dtype_bytes
        header[key] = {
            "dtype": _DTYPE_NAMES[dtype_bytes],
            "shape": list(shapes[key]),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    padded = len(text) + (-len(text)) % 8
    return 8 + padded + offset


def adapter_file_bytes(
    name: str, r: int, target_modules: list[str] | str = "all-linear", dtype_bytes: int = 4
) -> int:
    """Bytes of the adapter_model.safetensors that save_adapter (and PEFT) would write.

    dtype_bytes=4 is fp32 (what PEFT saves by default), 2 is bf16/fp16.
    """
    model = add_lora(
        meta_model(name), LoRAConfig(r=r, lora_alpha=r, target_modules=_as_targets(target_modules))
    )
    shapes = {}
    for layer_name, layer in lora_layers(model):
        shapes[f"base_model.model.{layer_name}.lora_A.weight"] = tuple(layer.lora_A.weight.shape)
        shapes[f"base_model.model.{layer_name}.lora_B.weight"] = tuple(layer.lora_B.weight.shape)
    return safetensors_bytes(shapes, dtype_bytes, metadata={"format": "pt"})
