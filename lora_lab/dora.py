"""DoRA: weight-decomposed LoRA. A trainable length per output row, LoRA for the direction.

Every row of a weight matrix is a vector: a length (its norm) times a direction. Full fine-tuning
changes both, in its own proportions; LoRA can only add B A, which couples them. DoRA
(Liu et al., 2024) trains them apart:

    W' = m * (W + s B A) / ||W + s B A||          (one norm per output row, m [out] trainable)

`m` starts as the row norms of W (B = 0 then), so W' = W at step 0. In the forward pass the norm is
treated as a constant (detached, paper section 4.3), which saves memory and, per the paper, costs no
accuracy. With k = m / ||W + s B A|| [out], the layer adds to the base output

    (k - 1) * (W x) + k * s * B(A(x))

which is exactly W' x without building W'. Merging does build it (and remembers the norm, so
unmerge can divide it out again).

Names and numerics follow PEFT 0.21 (`tuners/lora/dora.py` `DoraLinearLayer`, `tuners/lora/variants.py`
`DoraLinearVariant`); the magnitude is saved as `...lora_magnitude_vector`, PEFT's key. Left out:
PEFT's optional caching, DoRA on embeddings and convolutions, several adapters per layer.
`save_dora_adapter` / `load_dora_adapter` write and read PEFT's DoRA files (`use_dora: true` plus
one magnitude tensor per layer) on top of `lora_lab.adapters`, which handles plain LoRA only.
Note that vLLM does not serve DoRA adapters: merge them, or serve with PEFT.

Reference: Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation" (ICML 2024), arXiv 2402.09353.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from lora_lab.inject import add_lora, lora_layers
from lora_lab.layers import LoRALinear

__all__ = ["DoRALinear", "convert_to_dora", "add_dora", "save_dora_adapter", "load_dora_adapter"]

MAGNITUDE_SUFFIX = ".lora_magnitude_vector"  # PEFT's key in adapter files (no ".weight")


class DoRALinear(LoRALinear):
    """LoRALinear plus `lora_magnitude_vector` [out]: y = W' x + bias with W' = m (W + s B A) / ||W + s B A||.

    Same arguments as LoRALinear. The magnitude is fp32 and trainable (its name contains "lora_",
    so `mark_only_lora_as_trainable` keeps it trainable, and LoRA+ puts it in the fast group B).
    """

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float, **kwargs) -> None:
        super().__init__(base_layer, r, lora_alpha, **kwargs)
        self.lora_magnitude_vector = nn.Parameter(self._weight_norm().float())  # [out]
        self._merge_weight_norm: torch.Tensor | None = None

    @classmethod
    def from_lora(cls, layer: LoRALinear) -> DoRALinear:
        """A DoRALinear on the same base layer with the same A and B (no random numbers are drawn)."""
        if not isinstance(layer, LoRALinear) or isinstance(layer, DoRALinear):
            raise TypeError(f"from_lora takes a plain LoRALinear, got {type(layer).__name__}")
        if layer.merged:
            raise ValueError("the LoRA layer is merged; unmerge it before converting to DoRA")
        dropout = layer.lora_dropout.p if isinstance(layer.lora_dropout, nn.Dropout) else 0.0
        with torch.random.fork_rng(devices=[]):  # the throwaway init must not shift the global RNG
            dora = cls(
                layer.base_layer,
                r=layer.r,
                lora_alpha=layer.lora_alpha,
                lora_dropout=dropout,
                use_rslora=layer.use_rslora,
                init_lora_weights=False,
            )
        with torch.no_grad():
            dora.lora_A.weight.data = layer.lora_A.weight.detach().clone()
            dora.lora_B.weight.data = layer.lora_B.weight.detach().clone()
            dora.lora_magnitude_vector.data = dora._weight_norm().float()
        dora.lora_A.weight.requires_grad_(layer.lora_A.weight.requires_grad)
        dora.lora_B.weight.requires_grad_(layer.lora_B.weight.requires_grad)
        return dora

    # ------------------------------------------------------------------ pieces

    def _weight_out_in(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The base weight as [out, in] (Conv1D stores [in, out])."""
        weight = self.mergeable_weight()
        weight = weight.T if self.fan_in_fan_out else weight
        return weight if dtype is None else weight.to(dtype)

    def _lora_weight(self) -> torch.Tensor:
        return self.lora_B.weight @ self.lora_A.weight  # [out, in], without the scaling

    def _weight_norm(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """||W + s B A|| per output row [out] (PEFT's `get_weight_norm`)."""
        weight = self._weight_out_in(dtype)
        combined = weight + self.scaling * self._lora_weight().to(weight.dtype)
        return torch.linalg.norm(combined, dim=1).to(weight.dtype)

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """base(x) + (k - 1) * (W x) + k * s * B(A(dropout(x))), k = m / ||W + s B A|| (norm detached)."""
        result = self.base_layer(x, *args, **kwargs)  # [..., out]
        if self.disabled or self.merged:
            return result
        lora_x = x.to(self.lora_A.weight.dtype)
        weight = self._weight_out_in(lora_x.dtype)  # [out, in]
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            bias = getattr(self.base_layer, "bias", None)
            base_out = result if bias is None else result - bias  # W x, [..., out]
        else:
            lora_x = self.lora_dropout(lora_x)  # the dropped-out x feeds both terms
            base_out = F.linear(lora_x, weight)
        with torch.no_grad():
            norm = self._weight_norm(lora_x.dtype)  # [out], a constant for backprop
        k = (self.lora_magnitude_vector / norm).view(1, -1)  # [1, out]
        lora_out = self.lora_B(self.lora_A(lora_x))  # [..., out]
        dora = (k - 1) * base_out + k * lora_out * self.scaling
        return (result + dora).to(result.dtype)

    # ------------------------------------------------------------------ merging

    def _factor(self, norm: torch.Tensor) -> torch.Tensor:
        """m / norm shaped to scale the rows of the stored weight ([out, 1], or [1, out] for Conv1D)."""
        factor = self.lora_magnitude_vector / norm
        return factor.view(1, -1) if self.fan_in_fan_out else factor.view(-1, 1)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """m (W + dW) / ||W + dW|| as a new tensor; remembers the norm for unmerge."""
        weight = self.mergeable_weight()
        combined = weight + self.delta_weight().to(weight.dtype)  # stored layout
        norm = torch.linalg.norm(combined.T if self.fan_in_fan_out else combined, dim=1)  # [out]
        self._merge_weight_norm = norm
        return (self._factor(norm) * combined).to(weight.dtype)

    @torch.no_grad()
    def merge(self, safe: bool = False) -> None:
        """W <- m (W + s B A) / ||W + s B A||; safe=True refuses (W untouched) if that has NaN/inf."""
        if self.merged:
            raise ValueError("this DoRA layer is already merged; call unmerge() first")
        weight = self.mergeable_weight()
        new_weight = self.merged_weight()
        if safe and not torch.isfinite(new_weight).all():
            raise ValueError("merging would put NaN/inf values into the base weight, so nothing was changed")
        weight.data = new_weight
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W' / (m / norm) - s B A, with the norm remembered at merge time."""
        if not self.merged or self._merge_weight_norm is None:
            raise ValueError("this DoRA layer is not merged, so there is nothing to unmerge")
        weight = self.mergeable_weight()
        weight.data = (weight / self._factor(self._merge_weight_norm) - self.delta_weight()).to(weight.dtype)
        self._merge_weight_norm = None
        self.merged = False


def convert_to_dora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear of the model by a DoRALinear with the same A, B (in place; returns model).

    Draws no random numbers, so `add_lora` + `convert_to_dora` gives the same A as PEFT's
    `LoraConfig(use_dora=True)` with the same seed.
    """
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("the model has no LoRA layers; add_lora(model, config) first")
    for name, layer in layers:
        if layer.merged:
            raise ValueError(f"{name} is merged; unmerge_adapters(model) before converting to DoRA")
    for name, layer in layers:
        if not isinstance(layer, DoRALinear):
            model.set_submodule(name, DoRALinear.from_lora(layer))
    return model


def add_dora(model: nn.Module, config) -> nn.Module:
    """`add_lora(model, config)` then `convert_to_dora(model)`: PEFT's `LoraConfig(use_dora=True)`."""
    return convert_to_dora(add_lora(model, config))


# ---------------------------------------------------------------------------- files


def save_dora_adapter(
    model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None
) -> Path:
    """Save a DoRA model as PEFT does: the LoRA files of `adapters.save_adapter`, plus
    `base_model.model.<layer>.lora_magnitude_vector` [out] tensors and `"use_dora": true`.

    `peft.PeftModel.from_pretrained` loads the folder (vLLM does not serve DoRA: merge first).
    """
    from lora_lab.adapters import PEFT_PREFIX, save_adapter

    layers = list(lora_layers(model))
    plain = [n for n, layer in layers if not isinstance(layer, DoRALinear)]
    if not layers or plain:
        raise ValueError(
            f"save_dora_adapter needs a model whose LoRA layers are all DoRALinear (add_dora); "
            f"{plain[0] if plain else 'no LoRA layer'} is not. Use adapters.save_adapter for plain LoRA."
        )

    def magnitudes(_model) -> dict:
        return {
            f"{PEFT_PREFIX}{name}{MAGNITUDE_SUFFIX}": layer.lora_magnitude_vector.detach().cpu().contiguous()
            for name, layer in layers
        }

    # one file, written once and atomically (no second write of what save_adapter wrote)
    return save_adapter(model, path, None, base_model_name_or_path, extra_tensors=magnitudes,
                        extra_config={"use_dora": True})  # fmt: skip


def load_dora_adapter(model: nn.Module, path: str | os.PathLike, is_trainable: bool = False) -> nn.Module:
    """Load a PEFT DoRA adapter folder into a model without LoRA (in place; returns the model).

    Everything is checked (config, every tensor name and shape) before the model is touched.
    """
    from lora_lab.adapters import CONFIG_NAME, PEFT_PREFIX, WEIGHTS_NAME, config_from_dict, plan_load
    from lora_lab.inject import has_lora

    folder = Path(path)
    if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{folder} must hold {CONFIG_NAME} and {WEIGHTS_NAME} (a PEFT DoRA adapter)")
    if has_lora(model):
        raise ValueError("load_dora_adapter loads into a model without LoRA; use a fresh base model")
    config_dict = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    if config_dict.get("use_dora") is not True:
        raise ValueError(f"{folder} is not a DoRA adapter (use_dora is not true); use adapters.load_adapter")
    config = config_from_dict(dict(config_dict, use_dora=False), where=str(folder / CONFIG_NAME))
    tensors = load_file(str(folder / WEIGHTS_NAME))
    magnitudes = {
        k[len(PEFT_PREFIX) : -len(MAGNITUDE_SUFFIX)]: v
        for k, v in tensors.items()
        if k.endswith(MAGNITUDE_SUFFIX)
    }
    plan = plan_load(
        model, config, {k: v for k, v in tensors.items() if not k.endswith(MAGNITUDE_SUFFIX)}, str(folder)
    )
    for name, parts in plan.items():
        out_features = parts["lora_B"].shape[0]
        if name not in magnitudes or tuple(magnitudes[name].shape) != (out_features,):
            got = tuple(magnitudes[name].shape) if name in magnitudes else "missing"
            raise ValueError(
                f"{folder}: {name}{MAGNITUDE_SUFFIX} must have shape ({out_features},), got {got}"
            )
    add_dora(model, config)
    with torch.no_grad():
        for name, layer in lora_layers(model):
            layer.lora_A.weight.copy_(plan[name]["lora_A"])
            layer.lora_B.weight.copy_(plan[name]["lora_B"])
            layer.lora_magnitude_vector.copy_(magnitudes[name])
    for param_name, param in model.named_parameters():
        param.requires_grad = is_trainable and "lora_" in param_name
    if not is_trainable:
        model.eval()  # as PEFT's from_pretrained: dropout off for inference
    return model
