"""Serve many adapters in one batch: each row of the batch names its own adapter.

A server with 16 customers and 16 adapters should not run 16 small batches. Punica and S-LoRA
run one batch for all of them: every linear layer computes the base output once for the whole
batch, then adds each row's own low-rank patch with one gathered batched matmul ("BGMV"):

    A_stack [n_adapters, r, in]     B_stack [n_adapters, out, r]     scale [n_adapters]
    ids     [batch]                 which adapter each row uses (slot 0 = no adapter: zeros)

    y[i] = W0 x[i] + scale[ids[i]] * B_stack[ids[i]] @ (A_stack[ids[i]] @ x[i])

Adapters of lower rank are padded with zero rows/columns up to the largest rank in the batch
(zeros add nothing), and a layer an adapter does not patch gets a zero slot for it. The gather
`A_stack[ids]` happens once per batch (the rows keep their adapters for the whole generation),
with each row's scale folded into its B, so a decoding step adds two batched matmuls per layer.

    from lora_lab import serving
    logits = serving.forward(registry, input_ids, ["support", None, "sql"], attention_mask)
    new_ids = serving.generate(registry, input_ids, ["support", None, "sql"], attention_mask)
    texts = serving.generate_text(registry, tokenizer, prompts, ["support", None, "sql"])
    with serving.mixed_batch(registry, names):   # any other forward or generate call
        model(...)

Generation uses the model's own `generate` (greedy, KV cache, left padding); the per-row
adapter ids stay fixed for the whole generation, since the batch rows never change.

Left out: Punica's fused CUDA kernels and SGMV (segments of rows sharing an adapter), continuous
batching (requests joining and leaving a running batch), sampling, and LoRA dropout (inference only).

References:
- Chen et al., "Punica: Multi-Tenant LoRA Serving" (2023), `punica/ops` `add_lora_bgmv`.
- Sheng et al., "S-LoRA: Serving Thousands of Concurrent LoRA Adapters" (2023).
- PEFT `tuners/lora/layer.py` (`LoraLayer._mixed_batch_forward`, the `adapter_names=` argument).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lora_lab.layers import base_in_out_features
from lora_lab.models import check_generation_length

__all__ = [
    "MultiLoRALinear",
    "AdapterStacks",
    "stack_adapters",
    "mixed_batch",
    "forward",
    "generate",
    "generate_text",
]

RowNames = Sequence[str | None]  # one adapter name per row of a batch (None: the base model)
Mask = torch.Tensor | None  # attention mask [batch, seq] (1 = token, 0 = padding), or None


class MultiLoRALinear(nn.Module):
    """A frozen linear layer plus, for each row of the batch, that row's LoRA patch.

    Two modes, set by `lora_lab.registry.AdapterRegistry` and `mixed_batch`:
    - one adapter for every row (`set_single`): y = base(x) + B (A x) * scaling, two plain matmuls;
    - one adapter per row (`set_stacked`): stacked A/B tensors indexed by per-row ids, two batched
      matmuls (`torch.bmm`) for the whole batch.
    With no adapter set (`clear`) the layer is exactly its base layer.

    The stacks are plain attributes, not parameters or buffers: the model's state dict keeps only
    the base weights (under `...base_layer.weight` while wrapped).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_in_out_features(base_layer)
        self.clear()

    def clear(self) -> None:
        """No patch: forward is base_layer(x)."""
        # Plain attributes, written to __dict__ in one go: nn.Module.__setattr__ looks through the
        # parameters, buffers and submodules on every assignment, and a mixed batch resets every
        # wrapped layer at its start and end.
        vars(self).update(
            lora_A_stack=None,  # [n, r, in]
            lora_B_stack=None,  # [n, out, r]
            scaling=None,  # [n]
            adapter_ids=None,  # [batch] slot per row; None: slot 0 for every row
            rows_A=None,  # [batch, in, r]: each row's A, transposed for bmm
            rows_B=None,  # [batch, r, out]: each row's B * scaling, transposed
        )

    def set_single(
        self, weight_A: torch.Tensor, weight_B: torch.Tensor, scaling: float | torch.Tensor
    ) -> None:
        """One adapter for every row: A [r, in], B [out, r], scaling a float or a [1] tensor on their device.

        `AdapterRegistry` passes one [1] tensor to all its layers: a switch then copies one number to
        a GPU, not one per layer (each copy from the host waits for the GPU).
        """
        self.clear()
        self.lora_A_stack = weight_A[None]  # [1, r, in]
        self.lora_B_stack = weight_B[None]  # [1, out, r]
        if not isinstance(scaling, torch.Tensor):
            scaling = torch.tensor([scaling], dtype=weight_A.dtype, device=weight_A.device)
        self.scaling = scaling  # [1]

    def set_stacked(
        self, stack_A: torch.Tensor, stack_B: torch.Tensor, scaling: torch.Tensor, ids: torch.Tensor
    ) -> None:
        """One adapter per row: stacks [n, r, in] / [n, out, r], scaling [n], ids [batch] (slots).

        The gather (each row picks its adapter's A and B from the stacks) happens here, once per
        batch, not at every forward call: the ids of a batch stay fixed for a whole generation, and
        a decoding step then costs two batched matmuls per layer. Each row's scaling is folded into
        its B, so the patch is added with one fused `baddbmm`.
        """
        # gather: [n, in, r] -> [batch, in, r]; index_select of the transposed view writes the rows
        # contiguously, ready for bmm, in one copy
        rows_A = torch.index_select(stack_A.transpose(1, 2), 0, ids)
        scaled_B = (stack_B * scaling.view(-1, 1, 1)).transpose(1, 2)  # [n, r, out]: B * alpha / r
        rows_B = torch.index_select(scaled_B, 0, ids)  # gather: [batch, r, out]
        vars(self).update(
            lora_A_stack=stack_A,
            lora_B_stack=stack_B,
            scaling=scaling,
            adapter_ids=ids,
            rows_A=rows_A,
            rows_B=rows_B,
        )

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.base_layer
        if type(base) is nn.Linear and not (args or kwargs or base._forward_hooks or base._forward_pre_hooks):
            # a plain linear layer: its matmul without one more module call (a decoding step on a
            # small model is mostly such per-call overhead, see benchmarks/bench_multi_adapter.py)
            result = F.linear(x, base.weight, base.bias)  # [batch, seq, out]: W0 x, once for all rows
        else:
            result = base(x, *args, **kwargs)
        if self.rows_A is not None:  # one adapter per row: the hot path of a mixed batch
            if x.dim() != 3 or x.shape[0] != self.rows_A.shape[0]:
                raise ValueError(
                    f"this mixed batch was set up for {self.rows_A.shape[0]} rows, but the layer got input of "
                    f"shape {list(x.shape)}; give one adapter name per row (beam search and "
                    "num_return_sequences > 1 change the number of rows and are not supported)"
                )
            lora_x = x if x.dtype == self.rows_A.dtype else x.to(self.rows_A.dtype)  # patch in fp32
            # [batch, seq, in] @ [batch, in, r] -> [batch, seq, r]: every row through its own A
            hidden = torch.bmm(lora_x, self.rows_A)
            # result + [batch, seq, r] @ [batch, r, out]: every row through its own scaled B
            if result.dtype == hidden.dtype:
                if not torch.is_grad_enabled():  # serving: add into W0 x where it lies, no copy of it
                    return result.baddbmm_(hidden, self.rows_B)
                return torch.baddbmm(result, hidden, self.rows_B)
            return result + torch.bmm(hidden, self.rows_B).to(result.dtype)
        if self.lora_A_stack is None:
            return result
        # every row uses the same adapter: plain matmuls, as in LoRALinear
        lora_x = x if x.dtype == self.lora_A_stack.dtype else x.to(self.lora_A_stack.dtype)
        update = F.linear(F.linear(lora_x, self.lora_A_stack[0]), self.lora_B_stack[0]) * self.scaling[0]
        return result + update.to(result.dtype)

    def extra_repr(self) -> str:
        n = 0 if self.lora_A_stack is None else self.lora_A_stack.shape[0]
        mode = "off" if n == 0 else ("single" if self.adapter_ids is None else f"stacked ({n} slots)")
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={mode}"


class AdapterStacks:
    """The stacked A/B tensors of a set of adapters, for every layer any of them patches.

    `slots[name]` is the adapter's index in the stacks; slot 0 is "no adapter" (all zeros).
    `layers[layer_name] = (A_stack [n, r_max, in], B_stack [n, out, r_max], scaling [n])`, with
    n = number of adapters + 1 and r_max the largest rank among them.
    """

    def __init__(
        self, slots: dict[str | None, int], layers: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    ):
        self.slots = slots
        self.layers = layers

    def ids(self, adapter_names: RowNames, device: torch.device | None = None) -> torch.Tensor:
        """Per-row slot ids [batch] for a list of adapter names (None = base model)."""
        return torch.tensor([self.slots[name] for name in adapter_names], dtype=torch.long, device=device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for triple in self.layers.values() for t in triple)


def _check_names(registry, adapter_names: RowNames) -> list[str]:
    """Validate a per-row list of adapter names; return the distinct adapters it uses."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence) or not len(adapter_names):
        raise TypeError(
            f"adapter_names must be a non-empty list with one adapter name (or None for the base model) per row, "
            f"got {adapter_names!r}"
        )
    unique = [n for n in dict.fromkeys(adapter_names) if n is not None]
    for name in unique:
        registry.adapter(name)  # ValueError listing the loaded adapters if unknown
    return unique


def stack_adapters(registry, adapter_names: RowNames) -> AdapterStacks:
    """Build the stacks for the adapters a batch uses (fetching them to the device, LRU).

    Raises ValueError if the batch uses more different adapters than fit on the device at once.
    """
    unique = _check_names(registry, adapter_names)
    device_weights = registry.fetch_many(unique)  # {name: {layer: (A [r, in], B [out, r])}}
    slots: dict[str | None, int] = {None: 0} | {name: i + 1 for i, name in enumerate(unique)}
    adapters = [registry.adapter(n) for n in unique]
    scaling = torch.tensor([0.0] + [a.scaling for a in adapters], device=registry.device)  # [n]
    r_max = max((registry.adapter(n).r for n in unique), default=1)
    layers = {}
    for layer_name, module in registry.model.named_modules():
        if not isinstance(module, MultiLoRALinear):
            continue
        if not any(layer_name in device_weights[name] for name in unique):
            continue
        # slot 0 and adapters that do not patch this layer get zeros; lower ranks are zero-padded
        zero_A = torch.zeros(r_max, module.in_features, device=registry.device)  # [r_max, in]
        zero_B = torch.zeros(module.out_features, r_max, device=registry.device)  # [out, r_max]
        list_A, list_B = [zero_A], [zero_B]
        for name in unique:
            if layer_name not in device_weights[name]:
                list_A.append(zero_A)
                list_B.append(zero_B)
                continue
            weight_A, weight_B = device_weights[name][layer_name]  # [r, in], [out, r]
            pad = r_max - weight_A.shape[0]
            list_A.append(F.pad(weight_A, (0, 0, 0, pad)) if pad else weight_A)  # [r_max, in]
            list_B.append(F.pad(weight_B, (0, pad)) if pad else weight_B)  # [out, r_max]
        stack_A = torch.stack(list_A)  # [n, r_max, in]
        stack_B = torch.stack(list_B)  # [n, out, r_max]
        own = [a.layer_scaling(layer_name) for a in adapters]  # differs only under rank/alpha patterns
        if own != [a.scaling for a in adapters]:
            layers[layer_name] = (stack_A, stack_B, torch.tensor([0.0, *own], device=registry.device))
        else:
            layers[layer_name] = (stack_A, stack_B, scaling)
    return AdapterStacks(slots, layers)


def mixed_batch(registry, adapter_names: RowNames):
    """Within the block, row i of every forward pass uses adapter `adapter_names[i]` (None: base).

    `registry.mixed_batch(adapter_names)`, as a function beside `forward` and `generate`: the
    registry owns its state (merged adapter, open blocks, active adapter) and restores it on exit.
    """
    return registry.mixed_batch(adapter_names)


def _check_rows(input_ids: torch.Tensor, adapter_names: RowNames) -> None:
    if input_ids.dim() != 2 or input_ids.shape[0] != len(adapter_names):
        raise ValueError(
            f"input_ids has shape {list(input_ids.shape)} but {len(adapter_names)} adapter names were given; "
            "pass input_ids as [batch, seq] with exactly one adapter name (or None) per row"
        )


@torch.no_grad()
def forward(
    registry, input_ids: torch.Tensor, adapter_names: RowNames, attention_mask: Mask = None
) -> torch.Tensor:
    """Logits [batch, seq, vocab] of one forward pass where row i uses adapter_names[i]."""
    _check_names(registry, adapter_names)
    _check_rows(input_ids, adapter_names)
    with mixed_batch(registry, adapter_names):
        return registry.model(input_ids=input_ids, attention_mask=attention_mask).logits


@torch.no_grad()
def generate(
    registry,
    input_ids: torch.Tensor,
    adapter_names: RowNames,
    attention_mask: Mask = None,
    max_new_tokens: int = 16,
    **generate_kwargs,
) -> torch.Tensor:
    """Greedy generation for a mixed batch; returns only the new tokens, [batch, new].

    Pad prompts on the LEFT (the new tokens of every row then start in the same column) and pass
    the attention mask. Uses the model's own `generate` with its KV cache.
    """
    _check_names(registry, adapter_names)
    _check_rows(input_ids, adapter_names)
    check_generation_length(registry.model, input_ids.shape[1], max_new_tokens)  # positive, fits positions
    if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
        raise ValueError(
            "a prompt ends with padding: pad on the left (tokenizer.padding_side = 'left') to generate"
        )
    model = registry.model
    config = getattr(model, "generation_config", None)
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = getattr(config, "eos_token_id", None)
    if isinstance(pad, list):
        pad = pad[0]
    kwargs = {"do_sample": False, "max_new_tokens": max_new_tokens, "pad_token_id": pad}
    kwargs.update(generate_kwargs)
    with mixed_batch(registry, adapter_names):
        # [batch, seq + new]
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return out[:, input_ids.shape[1] :]


def generate_text(
    registry,
    tokenizer,
    prompts: Sequence[str],
    adapter_names: RowNames,
    max_new_tokens: int = 16,
    **generate_kwargs,
) -> list[str]:
    """Tokenize (left padding), generate greedily with per-row adapters, decode the new tokens."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings (one per row), not one string")
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(list(prompts), return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = old_side
    device = registry.device
    new = generate(
        registry,
        batch["input_ids"].to(device),
        adapter_names,
        batch["attention_mask"].to(device),
        max_new_tokens=max_new_tokens,
        **generate_kwargs,
    )
    return tokenizer.batch_decode(new, skip_special_tokens=True)
