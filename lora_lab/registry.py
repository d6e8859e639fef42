"""Many adapters, one base model: load by name, switch, and keep the hot ones on the device.

A LoRA adapter is a few megabytes next to a base model of gigabytes, so one server can keep
hundreds of them: the "dynamic linking" side of chapter 07. `AdapterRegistry` is that server's
adapter table:

    registry = AdapterRegistry(model, max_device_bytes=64 * 2**20, max_rank=16)
    registry.load("support", "adapters/support")    # a PEFT-format folder
    registry.load("sql", "adapters/sql")
    registry.set_adapter("sql")                      # model(...) now runs base + sql's patch
    registry.disable()                               # model(...) is the base model again
    registry.merge("support"); ...; registry.unmerge()   # or fold one adapter into W for a while
    registry.delete("sql")

Every adapter lives on the host (CPU RAM). The ones used most recently are also copied to the
compute device, up to `max_device_bytes`; when a new one does not fit, the least recently used is
dropped from the device (it stays on the host and is copied again when next asked for). This is the
memory idea of S-LoRA (adapters in host memory, fetched per batch). `hits`, `misses` and
`evictions` count what the cache did. On a CPU-only machine the "device" is the CPU too, so the
copies cost memory but no transfer; the bookkeeping is the same as on a GPU.

The registry wraps each layer any loaded adapter patches in a `lora_lab.serving.MultiLoRALinear`,
which computes base(x) plus the patch of the adapter chosen for each row of the batch. One adapter
for every row is `set_adapter`; a different adapter per row is `lora_lab.serving.mixed_batch`.

Errors leave the model and the registry as they were: an unknown adapter name (the message lists
the loaded ones), an adapter written for another base model (the message names the layer and both
shapes), a rank above `max_rank`, an adapter larger than the whole device budget.

Per-layer ranks and alphas (`rank_pattern` / `alpha_pattern`) are served as PEFT and vLLM do.

Left out: DoRA and other variants, LoRA on embeddings, `modules_to_save`, S-LoRA's unified paging (one memory pool shared by KV cache and
adapters) and its custom kernels.

References:
- Sheng et al., "S-LoRA: Serving Thousands of Concurrent LoRA Adapters" (2023), sections 4-5.
- PEFT `peft_model.py` (`load_adapter`, `set_adapter`, `delete_adapter`), `tuners/lora/layer.py`
  (`Linear.merge`, `unmerge`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from lora_lab.adapters import (
    check_file_rank,
    check_lora_tensor,
    config_from_dict,
    read_adapter,
    split_peft_key,
)
from lora_lab.layers import LoRALinear, base_in_out_features, is_conv1d, lora_delta, lora_scaling
from lora_lab.serving import AdapterStacks, MultiLoRALinear, stack_adapters

__all__ = ["AdapterRegistry", "HostAdapter", "group_by_layer"]

PARTS = ("lora_A", "lora_B")


@dataclass
class HostAdapter:
    """One loaded adapter, kept in host memory.

    `weights` maps a layer's full module name (e.g. `model.layers.0.self_attn.q_proj`) to its
    (A [r, in], B [out, r]) pair in fp32 on the CPU.
    """

    name: str
    path: str
    r: int  # the largest rank of any layer (r, unless rank_pattern raises some)
    lora_alpha: float
    scaling: float  # lora_alpha / r (or / sqrt(r) with use_rslora): layers without a pattern
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    config: dict
    scalings: dict[str, float] = field(default_factory=dict)  # per layer (rank_pattern / alpha_pattern)

    def layer_scaling(self, layer_name: str) -> float:
        """The scaling of one layer: its own under rank_pattern / alpha_pattern, else `scaling`."""
        return self.scalings.get(layer_name, self.scaling)

    @cached_property  # the weights never change after loading; a mixed batch asks for every adapter
    def nbytes(self) -> int:
        """Bytes the adapter's tensors take (the same on the host and on the device)."""
        return sum(
            a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values()
        )


def group_by_layer(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group a PEFT adapter state dict by layer: {module name: {"lora_A": [r, in], "lora_B": [out, r]}}.

    Key names are split by `lora_lab.adapters.split_peft_key` (ValueError for anything that is not
    a plain LoRA A/B weight); a layer with only one of A and B is an incomplete file.
    """
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        module, part = split_peft_key(key)  # ("model.layers.0.self_attn.q_proj", "lora_A")
        layers.setdefault(module, {})[part] = tensor
    for module, pair in layers.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"adapter layer {module!r} has only {next(iter(pair))}: the file is incomplete")
    return layers


class AdapterRegistry:
    """Load many PEFT-format LoRA adapters for one base model; switch, evict and merge them by name.

    Args:
        model: a plain base model (transformers or any nn.Module); the registry wraps the layers
            the adapters patch, in place. A model that already has lora_lab or PEFT LoRA layers is
            refused: merge or remove those first.
        max_device_bytes: how many bytes of adapter weights may sit on the compute device at once;
            None for no limit.
        max_rank: the largest rank `load` accepts (like vLLM's `--max-lora-rank`); None for any.
    """

    def __init__(self, model: nn.Module, max_device_bytes: int | None = None, max_rank: int | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
        if any(isinstance(m, LoRALinear) or type(m).__name__ == "LoraModel" for m in model.modules()):
            raise TypeError(
                "this model already has LoRA layers; give the registry the plain base model "
                "(merge_and_unload or remove_lora first, or PeftModel.unload())"
            )
        if any(isinstance(m, MultiLoRALinear) for m in model.modules()):
            raise ValueError("this model already belongs to an AdapterRegistry; use that registry")
        for key, value in (("max_device_bytes", max_device_bytes), ("max_rank", max_rank)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(
                    f"{key} must be a positive int (e.g. 64 * 2**20 bytes, rank 16) or None for no limit, "
                    f"got {value!r}"
                )
        self.model = model
        self.max_device_bytes = max_device_bytes
        self.max_rank = max_rank
        param = next(model.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        self._host: dict[str, HostAdapter] = {}  # every loaded adapter, in load order
        # name -> {layer: (A, B)} on the device; order = least recently used first
        self._on_device: OrderedDict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self.active_adapter: str | None = None  # the adapter set_adapter chose (None: base model)
        self.merged_adapter: str | None = None  # the adapter folded into the base weights, if any
        self.hits = 0  # adapter already on the device when asked for
        self.misses = 0  # adapter had to be copied from the host
        self.evictions = 0  # adapters dropped from the device to make room
        self.open_mixed_batches = 0  # > 0 while a serving.mixed_batch block runs on this registry

    # ------------------------------------------------------------------ inspection

    def names(self) -> list[str]:
        """Names of the loaded adapters, in load order."""
        return list(self._host)

    def device_names(self) -> list[str]:
        """Names of the adapters now on the device, least recently used first."""
        return list(self._on_device)

    def device_bytes(self) -> int:
        """Bytes of adapter weights now on the device."""
        return sum(self._host[n].nbytes for n in self._on_device)

    def adapter(self, name: str) -> HostAdapter:
        """The host copy of one adapter; ValueError listing the loaded ones if `name` is unknown."""
        self._check_known(name)
        return self._host[name]

    def layer_names(self) -> list[str]:
        """Full names of the layers wrapped by the registry (the union of all adapters' targets)."""
        return [n for n, m in self.model.named_modules() if isinstance(m, MultiLoRALinear)]

    def stats(self) -> dict:
        """Cache counters and sizes, e.g. for a notebook table."""
        return {
            "loaded": len(self._host),
            "on_device": len(self._on_device),
            "device_bytes": self.device_bytes(),
            "max_device_bytes": self.max_device_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
        }

    def __repr__(self) -> str:
        return (
            f"AdapterRegistry(adapters={self.names()}, active={self.active_adapter!r}, "
            f"on_device={self.device_names()}, hits={self.hits}, misses={self.misses}, evictions={self.evictions})"
        )

    def _check_known(self, name) -> None:
        if name not in self._host:
            loaded = ", ".join(repr(n) for n in self._host) or "none"
            raise ValueError(
                f"unknown adapter {name!r}; loaded adapters: {loaded}. Load it with registry.load()"
            )

    def _check_no_mixed_batch(self, action: str) -> None:
        """Refuse changes while a mixed batch runs: its rows are bound to the stacks it was built with."""
        if self.open_mixed_batches:
            raise RuntimeError(
                f"cannot {action} inside an open serving.mixed_batch block: the batch's rows are bound to the "
                "adapters it started with, and every row would silently fall back to the base model. "
                "Leave the `with` block first."
            )

    def _check_not_merged(self, action: str) -> None:
        if self.merged_adapter is not None:
            raise ValueError(
                f"adapter {self.merged_adapter!r} is merged into the base weights; call registry.unmerge() "
                f"before {action}"
            )

    # ------------------------------------------------------------------ loading

    def load(self, name: str, path: str | Path, allow_pickle: bool = False) -> HostAdapter:
        """Read a PEFT-format adapter folder (adapter_config.json + adapter_model.safetensors) as `name`.

        Every layer is checked against the base model before anything changes. The adapter goes to
        host memory only; it is copied to the device when first used. A folder with only a pickle
        (`adapter_model.bin`) is refused unless allow_pickle=True, as in `adapters.load_adapter`.
        """
        self._check_no_mixed_batch(f"load adapter {name!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
        if name in self._host:
            raise ValueError(
                f"an adapter named {name!r} is already loaded; delete it first or pick another name"
            )
        config, state_dict = read_adapter(path, allow_pickle=allow_pickle)
        adapter = self._build_host_adapter(name, str(path), config, state_dict)
        if self.max_device_bytes is not None and adapter.nbytes > self.max_device_bytes:
            raise ValueError(
                f"adapter {name!r} takes {adapter.nbytes:,d} bytes, more than the whole device budget "
                f"max_device_bytes={self.max_device_bytes:,d}; raise max_device_bytes"
            )
        # All checks passed: wrap the layers this adapter patches (if not wrapped yet), then record it.
        for layer_name in adapter.weights:
            module = self.model.get_submodule(layer_name)
            if not isinstance(module, MultiLoRALinear):
                self.model.set_submodule(layer_name, MultiLoRALinear(module))
        self._host[name] = adapter
        self._apply_active()  # a newly wrapped layer must follow the active adapter too
        return adapter

    def _build_host_adapter(self, name: str, path: str, config: dict, state_dict: dict) -> HostAdapter:
        """Validate a PEFT config + state dict against the model and turn it into a HostAdapter."""
        where = f"adapter {name!r} at {path}"
        lora_config = config_from_dict(config, where=where)  # r, alpha, rsLoRA, rank/alpha patterns
        layers = group_by_layer(state_dict)
        if not layers:
            raise ValueError(f"{where} has no lora_A/lora_B weights")
        weights, scalings = {}, {}
        for layer_name, pair in sorted(layers.items()):
            r, lora_alpha = lora_config.rank_alpha_for(layer_name)
            self._check_layer(name, where, layer_name, pair, r)
            scalings[layer_name] = lora_scaling(r, lora_alpha, lora_config.use_rslora)
            # fp32 on the host, as PEFT upcasts adapter weights (autocast_adapter_dtype)
            weights[layer_name] = tuple(pair[p].detach().to("cpu", torch.float32).contiguous() for p in PARTS)
        r_max = max(a.shape[0] for a, _ in weights.values())
        if self.max_rank is not None and r_max > self.max_rank:
            raise ValueError(
                f"adapter {name!r} has rank r={r_max}, above this registry's max_rank={self.max_rank}; create the "
                f"registry with max_rank>={r_max}, or use an adapter trained with r<={self.max_rank}"
            )
        scaling = lora_scaling(lora_config.r, lora_config.lora_alpha, lora_config.use_rslora)
        return HostAdapter(
            name, path, r_max, lora_config.lora_alpha, scaling, weights, dict(config), scalings
        )

    def _check_layer(self, name: str, where: str, layer_name: str, pair: dict, r: int) -> None:
        """ValueError unless the file's A [r, in] and B [out, r] fit this model's layer `layer_name`."""
        try:
            module = self.model.get_submodule(layer_name)
        except AttributeError:
            raise ValueError(
                f"adapter {name!r} patches layer {layer_name!r}, which {type(self.model).__name__} does not "
                "have: the adapter was trained for another base model (or another architecture)"
            ) from None
        if isinstance(module, MultiLoRALinear):
            module = module.base_layer
        try:
            in_features, out_features = base_in_out_features(module)
        except TypeError:
            raise ValueError(
                f"adapter {name!r} patches {layer_name!r}, a {type(module).__name__}, not a linear layer; "
                "the adapter was trained for another base model"
            ) from None
        check_file_rank(pair, layer_name, r, where)
        weight_A, weight_B = pair["lora_A"], pair["lora_B"]  # [r, in], [out, r]
        if weight_A.shape != (r, in_features) or weight_B.shape != (out_features, r):
            raise ValueError(
                f"adapter {name!r} does not fit layer {layer_name!r}: the adapter has lora_A "
                f"{list(weight_A.shape)} and lora_B {list(weight_B.shape)}, the model's layer needs lora_A "
                f"[{r}, {in_features}] and lora_B [{out_features}, {r}] (in={in_features}, out={out_features}). "
                "The adapter was trained for another base model."
            )
        for part in PARTS:
            check_lora_tensor(pair[part], f"{layer_name}.{part}", where)

    def delete(self, name: str) -> None:
        """Forget an adapter (host and device copies). If it was active, the model falls back to the base.

        Layers no remaining adapter patches get their original module back, so deleting every
        adapter returns the model to exactly its original structure.
        """
        self._check_no_mixed_batch(f"delete adapter {name!r}")
        self._check_known(name)
        if self.merged_adapter == name:
            raise ValueError(
                f"adapter {name!r} is merged into the base weights; call registry.unmerge() before deleting it"
            )
        del self._host[name]
        self._on_device.pop(name, None)
        if self.active_adapter == name:
            self.active_adapter = None
        still_used = {layer for a in self._host.values() for layer in a.weights}
        for layer_name in self.layer_names():
            if layer_name not in still_used:
                self.model.set_submodule(layer_name, self.model.get_submodule(layer_name).base_layer)
        self._apply_active()

    # ------------------------------------------------------------------ the device cache (LRU)

    def fetch(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The adapter's {layer: (A, B)} on the device, copying it from the host if needed (LRU)."""
        self._check_known(name)
        if name in self._on_device:
            self.hits += 1
            self._on_device.move_to_end(name)  # now the most recently used
            return self._on_device[name]
        self.misses += 1
        self._make_room(self._host[name].nbytes)
        device_copy = {
            layer: (a.to(self.device, copy=True), b.to(self.device, copy=True))
            for layer, (a, b) in self._host[name].weights.items()
        }
        self._on_device[name] = device_copy
        return device_copy

    def fetch_many(self, names: list[str]) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Bring several adapters to the device at once (for one batch); all must fit together."""
        unique = list(dict.fromkeys(names))
        for name in unique:
            self._check_known(name)
        need = sum(self._host[n].nbytes for n in unique)
        if self.max_device_bytes is not None and need > self.max_device_bytes:
            raise ValueError(
                f"this batch uses {len(unique)} different adapters needing {need:,d} bytes on the device, but "
                f"max_device_bytes={self.max_device_bytes:,d}; split the batch into groups that use fewer "
                "adapters, or raise max_device_bytes"
            )
        for name in unique:  # mark the ones already there as recent first, so fetching the rest keeps them
            if name in self._on_device:
                self._on_device.move_to_end(name)
        return {name: self.fetch(name) for name in unique}

    def _make_room(self, nbytes: int) -> None:
        if self.max_device_bytes is None:
            return
        while self._on_device and self.device_bytes() + nbytes > self.max_device_bytes:
            self._on_device.popitem(last=False)  # drop the least recently used adapter from the device
            self.evictions += 1

    # ------------------------------------------------------------------ switching

    def set_adapter(self, name: str) -> None:
        """Make `name` the adapter every row of every batch uses (PEFT's `set_adapter`)."""
        self._check_no_mixed_batch("set_adapter")
        self._check_known(name)
        self._check_not_merged("set_adapter")
        self.fetch(name)
        self.active_adapter = name
        self._apply_active()

    def disable(self) -> None:
        """Run the plain base model (no adapter); `set_adapter` switches one on again."""
        self._check_no_mixed_batch("disable the adapters")
        self._check_not_merged("disable() (unmerge() alone gives the base model back)")
        self.active_adapter = None
        self._apply_active()

    def _apply_active(self) -> None:
        """Point every wrapped layer at the active adapter's device weights (or at nothing)."""
        if self.active_adapter is None or self.merged_adapter is not None:
            for _, layer in self._wrapped():
                layer.clear()
            return
        weights = self._on_device.get(self.active_adapter) or self.fetch(self.active_adapter)
        adapter = self._host[self.active_adapter]
        # one [1] fp32 tensor for all layers (layers multiply by its element, keeping their own dtype):
        # a switch copies one number to the device, not one per layer
        shared = {adapter.scaling: torch.tensor([adapter.scaling], dtype=torch.float32, device=self.device)}
        for layer_name, layer in self._wrapped():
            if layer_name in weights:
                weight_A, weight_B = weights[layer_name]
                value = adapter.layer_scaling(layer_name)  # differs only under rank/alpha patterns
                if value not in shared:
                    shared[value] = torch.tensor([value], dtype=torch.float32, device=self.device)
                layer.set_single(weight_A, weight_B, shared[value])
            else:
                layer.clear()  # this adapter does not patch this layer

    @contextmanager
    def mixed_batch(self, adapter_names: Sequence[str | None]) -> Iterator[AdapterStacks]:
        """Within the block, row i of every forward pass uses adapter `adapter_names[i]` (None: base).

        The adapter set by `set_adapter` (if any) is restored on exit. Inside the block the registry
        refuses changes (load, delete, set_adapter, disable, merge, unmerge, another mixed batch)
        with a RuntimeError: they would silently switch the batch's rows to other weights.
        """
        self._check_not_merged("running a mixed batch")
        self._check_no_mixed_batch("start a mixed batch")  # nested blocks would undo each other
        stacks = stack_adapters(self, adapter_names)
        ids = stacks.ids(adapter_names, device=self.device)  # [batch]
        self.open_mixed_batches += 1  # load / delete / set_adapter / merge are refused until the end
        try:
            for layer_name, module in self._wrapped():
                if layer_name in stacks.layers:
                    module.set_stacked(*stacks.layers[layer_name], ids)
                else:
                    module.clear()  # no adapter of this batch patches this layer
            yield stacks
        finally:
            self.open_mixed_batches -= 1
            self._apply_active()

    def _wrapped(self) -> list[tuple[str, MultiLoRALinear]]:
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, MultiLoRALinear)]

    # ------------------------------------------------------------------ merging

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Fold one adapter into the base weights (W <- W + B A * scaling); forward is then base-only.

        The fastest way to run one adapter (no extra matmuls), but the model now serves only it.
        Every merged weight is computed and checked for NaN/inf before any is written.
        """
        self._check_no_mixed_batch(f"merge {name!r}")
        self._check_known(name)
        self._check_not_merged(f"merging {name!r} (one merged adapter at a time)")
        new_weights = {}
        for layer_name, weight in self._base_weights(name).items():
            new_weight = weight + self._delta(name, layer_name, weight)
            if not torch.isfinite(new_weight).all():
                raise ValueError(f"merging {name!r} would put NaN/inf into {layer_name}; nothing was changed")
            new_weights[layer_name] = new_weight
        for layer_name, weight in self._base_weights(name).items():
            weight.data = new_weights[layer_name]
        self.merged_adapter = name
        self._apply_active()  # merged: no layer adds a patch on top

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged adapter again (W <- W - B A * scaling; exact up to float rounding)."""
        self._check_no_mixed_batch("unmerge")
        if self.merged_adapter is None:
            raise ValueError("no adapter is merged, so there is nothing to unmerge")
        name = self.merged_adapter
        for layer_name, weight in self._base_weights(name).items():
            weight.data -= self._delta(name, layer_name, weight)
        self.merged_adapter = None
        self._apply_active()

    def _base_weights(self, name: str) -> dict[str, torch.Tensor]:
        weights = {}
        for layer_name in self._host[name].weights:
            base = self.model.get_submodule(layer_name).base_layer
            weight = getattr(base, "weight", None)
            if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
                raise TypeError(
                    f"cannot merge into {layer_name}: its weight is not a float tensor (a quantized layer?); "
                    "load the base model in fp32/bf16 to merge, or serve the adapter unmerged"
                )
            weights[layer_name] = weight
        return weights

    def _delta(self, name: str, layer_name: str, weight: torch.Tensor) -> torch.Tensor:
        """B @ A * scaling in the base weight's layout, device and dtype."""
        adapter = self._host[name]
        weight_A, weight_B = adapter.weights[layer_name]  # [r, in], [out, r]
        conv1d = is_conv1d(self.model.get_submodule(layer_name).base_layer)  # Conv1D stores [in, out]
        delta = lora_delta(weight_A, weight_B, adapter.layer_scaling(layer_name), fan_in_fan_out=conv1d)
        return delta.to(weight.device, weight.dtype)
