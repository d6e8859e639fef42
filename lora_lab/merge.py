"""Merge LoRA into the base weights ("static linking") and take it back out.

    merge_adapters(model)            # W <- W + B A * scaling in every LoRA layer; forward = base only
    unmerge_adapters(model)          # W <- W - B A * scaling
    model = merge_and_unload(model)  # merge, then drop the LoRA wrappers: a plain transformers model

A merged model runs at exactly the base model's speed and saves with `save_pretrained` like
any checkpoint, but it is one fixed model: switching adapters needs them unmerged
(`lora_lab.adapters` / `serving`).

Every function checks all layers before changing any, so an error leaves the model as it was.
Left out: merging into a quantized (4-bit) base in place (PEFT dequantizes, adds and re-quantizes,
which rounds; here it is refused with an explanation), weighted combinations of several adapters.

References: PEFT `tuners/lora/layer.py` (`Linear.merge`, `unmerge`), `tuners/tuners_utils.py`
(`BaseTuner.merge_and_unload`, `_unload_and_optionally_merge`).
"""

from __future__ import annotations

import torch
from torch import nn

from lora_lab.inject import lora_layers
from lora_lab.layers import LoRALinear

__all__ = ["merge_adapters", "unmerge_adapters", "merge_and_unload"]


def _layers_or_error(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("this model has no LoRA layers; add_lora or load_adapter first")
    return layers


@torch.no_grad()
def _merge_all(layers: list[tuple[str, LoRALinear]], safe: bool) -> None:
    """Merge each layer; with safe=True compute and check every W + dW before assigning any."""
    for _, layer in layers:
        layer.mergeable_weight()  # TypeError for a quantized base, before anything changes
    if not safe:
        for _, layer in layers:
            layer.merge(safe=False)
        return
    new_weights = {}
    for name, layer in layers:
        new_weight = layer.merged_weight()
        if not torch.isfinite(new_weight).all():
            raise ValueError(
                f"merging {name} would put NaN/inf values into its base weight, so no layer was changed; "
                "the adapter is broken (check its lora_A / lora_B weights for non-finite values)"
            )
        new_weights[name] = new_weight
    for name, layer in layers:
        layer.mergeable_weight().data = new_weights[name]
        layer.merged = True


def merge_adapters(model: nn.Module, safe: bool = False) -> nn.Module:
    """Fold every LoRA layer's B A * scaling into its base weight (in place); the wrappers stay.

    safe=True checks that no merged weight has NaN/inf before writing any. Raises ValueError
    if a layer is already merged (merging twice would add the update twice).
    """
    layers = _layers_or_error(model)
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise ValueError(
            f"{len(merged)} LoRA layer(s) are already merged (e.g. {merged[0]}); call unmerge_adapters(model) "
            "first, or merge_and_unload(model) to finish the merge"
        )
    _merge_all(layers, safe)
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Subtract every merged layer's update again, restoring the base weights (up to float rounding)."""
    layers = _layers_or_error(model)
    merged = [(name, layer) for name, layer in layers if layer.merged]
    if not merged:
        raise ValueError("no LoRA layer is merged, so there is nothing to unmerge")
    for _, layer in merged:
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module, safe: bool = True) -> nn.Module:
    """Merge every LoRA layer (layers already merged stay as they are), then replace each
    LoRALinear by its base layer. Returns the model, now a plain transformers model: assign it,
    `model = merge_and_unload(model)`, as with PEFT.

    safe=True (the default here, unlike PEFT's) refuses to write NaN/inf into any weight.
    """
    layers = _layers_or_error(model)
    _merge_all([(n, layer) for n, layer in layers if not layer.merged], safe)
    for name, layer in layers:
        model.set_submodule(name, layer.base_layer)
    if "lora_config" in model.__dict__:
        del model.lora_config
    return model
