"""The LoRA layer: a frozen linear layer plus a trainable low-rank patch.

`LoRALinear` wraps one linear layer of a pretrained model. The base weight W0 stays
frozen; two small matrices A [r, in] and B [out, r] learn the change, so the layer
computes

    h = W0 x + (alpha / r) * B A x          (alpha / sqrt(r) with rsLoRA)

B starts at zero, so at step 0 the wrapped model gives exactly the base model's output.
Because A and B are ordinary `nn.Linear` children named `lora_A` and `lora_B`, the
state-dict keys read `...q_proj.lora_A.weight`, the names PEFT writes in its adapter
files (after its `base_model.model.` prefix).

It wraps:
- `nn.Linear` (and subclasses such as bitsandbytes' `Linear4bit`),
- transformers' `Conv1D` (GPT-2), which stores its weight as [in, out] ("fan_in_fan_out"),
- any module with `in_features` / `out_features` (e.g. lora_lab's own 4-bit layer).

Left out on purpose: several adapters per layer (see `lora_lab.adapters` / `serving`),
LoRA on embeddings and convolutions, a bias in `lora_B`, and the variants (DoRA, PiSSA...,
see `lora_lab.variants`).

References:
- Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021), eq. 3 and section 4.1.
- Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA" (2023): rsLoRA.
- PEFT `tuners/lora/layer.py` (`LoraLayer.update_layer`, `Linear.forward`, `get_delta_weight`),
  whose numerics this module reproduces.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager

import torch
from torch import nn

__all__ = [
    "LoRALinear",
    "lora_delta",
    "lora_scaling",
    "base_in_out_features",
    "is_conv1d",
    "check_hyperparameters",
]


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: y = base(x) + B(A(dropout(x))) * scaling.

    Args:
        base_layer: the layer to patch (nn.Linear, Conv1D, a 4-bit linear). It is frozen in place.
        r: rank of the update. A is [r, in], B is [out, r].
        lora_alpha: scale numerator; `scaling = lora_alpha / r` (or `/ sqrt(r)` with `use_rslora`).
        lora_dropout: dropout probability on the LoRA branch input only (the base path never sees it).
        use_rslora: use alpha / sqrt(r) instead of alpha / r.
        init_lora_weights: True (PEFT's default: A kaiming-uniform, B = 0), "gaussian" (A ~ N(0, 1/r^2),
            B = 0) or False (both keep nn.Linear's random init, so the layer changes the output at once;
            for tests and debugging).
        fan_in_fan_out: whether the base weight is stored [in, out]. None detects it (True for Conv1D,
            False otherwise); a wrong explicit value is corrected with a warning, as PEFT does.

    The adapter weights are created in fp32 (PEFT's `autocast_adapter_dtype`), on the base layer's
    device: a half-precision base keeps an fp32 patch, which trains stably.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        fan_in_fan_out: bool | None = None,
    ) -> None:
        super().__init__()
        check_hyperparameters(r, lora_alpha, lora_dropout, init_lora_weights)
        if isinstance(base_layer, LoRALinear):
            raise TypeError("this layer already has LoRA; wrap the original layer, not a LoRALinear")
        in_features, out_features = base_in_out_features(base_layer)

        conv1d = is_conv1d(base_layer)
        if fan_in_fan_out is not None and fan_in_fan_out != conv1d:
            warnings.warn(
                f"fan_in_fan_out={fan_in_fan_out} does not fit {type(base_layer).__name__}; "
                f"using fan_in_fan_out={conv1d} (True only for Conv1D, whose weight is [in, out])",
                stacklevel=2,
            )
        self.fan_in_fan_out = conv1d

        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)  # W0 is frozen: only A and B learn
        self.in_features = in_features
        self.out_features = out_features
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False  # True while B A * scaling is folded into the base weight
        self._disabled = False  # True inside `disable_adapter()`: forward is the base layer alone

        # A and B are built on the CPU (or on "meta" for a meta-device model), initialised there,
        # then moved to the base layer's device. That is PEFT's order, so with the same seed both
        # draw the same random numbers.
        base_device, base_dtype = self._base_device_dtype()
        build_device = "meta" if base_device is not None and base_device.type == "meta" else "cpu"
        self.lora_A = nn.Linear(in_features, r, bias=False, device=build_device)  # weight [r, in]
        self.lora_B = nn.Linear(r, out_features, bias=False, device=build_device)  # weight [out, r]
        self.reset_lora_parameters(init_lora_weights)
        if base_device is not None:
            # PEFT first moves the patch to the base dtype, then upcasts fp16/bf16 patches to fp32;
            # for a bf16 base that rounds the initial A to bf16 values, and we do the same.
            dtype = base_dtype if base_dtype is not None and base_dtype.is_floating_point else None
            self.lora_A.to(base_device, dtype=dtype)
            self.lora_B.to(base_device, dtype=dtype)
        for lin in (self.lora_A, self.lora_B):
            if lin.weight.dtype in (torch.float16, torch.bfloat16):
                lin.to(torch.float32)

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """base_layer(x) + lora_B(lora_A(dropout(x))) * scaling, in the base layer's output dtype."""
        result = self.base_layer(x, *args, **kwargs)  # [batch, seq, out]
        if self._disabled or self.merged:
            return result  # the patch is off, or already folded into the base weight
        lora_x = x.to(self.lora_A.weight.dtype)  # the patch computes in its own dtype (fp32)
        scaling = self.scaling
        if isinstance(self.lora_dropout, nn.Dropout) and self.lora_dropout.training:
            lora_x, scaling = drop_inputs(lora_x, self.lora_dropout.p), scaling / (1 - self.lora_dropout.p)
        update = self.lora_B(self.lora_A(lora_x))  # [b, s, in] -> [b, s, r] -> [b, s, out]
        return (result + update * scaling).to(result.dtype)

    @property
    def disabled(self) -> bool:
        """True inside `disable_adapter()`: the layer computes the base layer alone."""
        return self._disabled

    @contextmanager
    def disable_adapter(self):
        """Within the block the layer is its base layer alone (PEFT's `disable_adapter()`).

        A merged patch is taken out of W on entry and folded back in on exit, so the block sees
        the base model and the layer leaves it as it came in.
        """
        was_merged = self.merged
        if was_merged:
            self.unmerge()
        self._disabled = True
        try:
            yield self
        finally:
            self._disabled = False
            if was_merged:
                self.merge()

    # ------------------------------------------------------------------ set-up

    def _base_device_dtype(self) -> tuple[torch.device | None, torch.dtype | None]:
        """Device and dtype of the base weight (a 4-bit weight reports uint8: no float dtype)."""
        weight = getattr(self.base_layer, "weight", None)
        if isinstance(weight, torch.Tensor):
            return weight.device, weight.dtype
        return None, None

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: bool | str = True) -> None:
        """Initialise A and B as PEFT does; B = 0 makes the patched model start equal to the base."""
        if init_lora_weights is False:
            return  # keep nn.Linear's random init for both: a non-zero patch from the start
        if init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            # U(-1/sqrt(in), 1/sqrt(in)): nn.Linear's own default, as in microsoft/LoRA's loralib
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    # ------------------------------------------------------------------ merging

    def delta_weight(self) -> torch.Tensor:
        """The weight change B @ A * scaling, laid out like the base weight ([in, out] for Conv1D)."""
        return lora_delta(self.lora_A.weight, self.lora_B.weight, self.scaling, self.fan_in_fan_out)

    def mergeable_weight(self) -> torch.Tensor:
        """The base weight to merge into; TypeError if it is quantized or missing."""
        weight = getattr(self.base_layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
            kind = "missing" if weight is None else f"stored as {weight.dtype} ({type(weight).__name__})"
            raise TypeError(
                f"cannot merge into {type(self.base_layer).__name__}: its weight is {kind}, not a float tensor. "
                "A quantized (4-bit) base cannot take W + dW in place: dequantize the base model first "
                "(load it in fp32/bf16), or keep the adapter unmerged."
            )
        return weight

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + dW as a new tensor (the base weight is not touched)."""
        weight = self.mergeable_weight()
        return weight + self.delta_weight().to(weight.dtype)

    @torch.no_grad()
    def merge(self, safe: bool = False) -> None:
        """Fold the patch into the base weight: W <- W + B A * scaling. Forward then runs base_layer only.

        safe=True computes W + dW in a copy first and refuses (ValueError, W untouched) if it has
        inf/NaN values: a broken adapter would otherwise silently destroy the base weight.
        """
        if self.merged:
            raise ValueError(
                "this LoRA layer is already merged; call unmerge() first (merging twice adds dW twice)"
            )
        weight = self.mergeable_weight()
        if safe:
            new_weight = weight.clone()
            new_weight += self.delta_weight().to(weight.dtype)
            if not torch.isfinite(new_weight).all():
                raise ValueError(
                    "merging would put NaN/inf values into the base weight, so nothing was changed; "
                    "the adapter weights are broken (check lora_A / lora_B for non-finite values)"
                )
            weight.data = new_weight
        else:
            weight.data += self.delta_weight()  # in place, like PEFT's unsafe merge
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the patch back out: W <- W - B A * scaling (exact up to float rounding)."""
        if not self.merged:
            raise ValueError("this LoRA layer is not merged, so there is nothing to unmerge")
        weight = self.mergeable_weight()
        weight.data -= self.delta_weight().to(weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha}, scaling={self.scaling:.4g}, merged={self.merged}"
        )


# --------------------------------------------------------------------------------------------------
# Checks and PEFT-matching details the class relies on


def lora_delta(
    weight_A: torch.Tensor, weight_B: torch.Tensor, scaling: float, fan_in_fan_out: bool = False
) -> torch.Tensor:
    """The update dW = scaling * B @ A of A [r, in] and B [out, r]: [out, in], or [in, out] with
    fan_in_fan_out (Conv1D stores its weight transposed). The one place lora_lab writes it.

    On CPU a half-precision patch is multiplied in fp32 and cast back, as PEFT's `get_delta_weight` does.
    """
    dtype = weight_B.dtype
    upcast = weight_B.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
    if upcast:
        weight_A, weight_B = weight_A.float(), weight_B.float()
    delta = weight_B @ weight_A  # [out, in]
    if fan_in_fan_out:
        delta = delta.T  # Conv1D keeps [in, out]
    delta = delta * scaling
    return delta.to(dtype) if upcast else delta


def drop_inputs(x: torch.Tensor, p: float) -> torch.Tensor:
    """Zero each entry of x with probability p: `nn.Dropout(p)` without its 1 / (1 - p) rescale.

    The caller folds 1 / (1 - p) into the LoRA scaling, a plain number, so the rescale costs no
    pass over x. The mask is a uniform draw compared with p, the same law as `nn.Dropout`'s
    Bernoulli mask: on the CPU `torch.rand` plus a comparison is cheaper than `bernoulli_`, and
    dropout masks were the largest cost a training step adds on top of the matmuls (see
    benchmarks/bench_train_step.py). The masks differ from PEFT's for the same seed; the
    distribution of the update does not.
    """
    keep = torch.rand_like(x).ge_(p)  # [b, s, in]: 1.0 with probability 1 - p, else 0.0, in place
    return x * keep


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """The factor the LoRA branch is multiplied by: alpha / r, or alpha / sqrt(r) with rsLoRA.

    With alpha / r, doubling r halves each direction's step size; rsLoRA's alpha / sqrt(r)
    keeps the update's size stable as r grows (Kalajdzievski 2023).
    """
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' `Conv1D` (GPT-2's linear layer with a transposed weight)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers not installed: there can be no Conv1D either
        return False
    return isinstance(module, Conv1D)


def base_in_out_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a layer LoRA can wrap; TypeError for anything else."""
    if is_conv1d(module):
        in_features, out_features = module.weight.shape  # Conv1D stores W as [in, out]
        return int(in_features), int(out_features)
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    raise TypeError(
        f"LoRALinear can wrap nn.Linear, transformers' Conv1D or a layer with in_features/out_features; "
        f"got {type(module).__name__}. Target linear layers only (e.g. q_proj, v_proj)."
    )


def check_hyperparameters(r, lora_alpha, lora_dropout, init_lora_weights) -> None:
    """Reject impossible settings with a message that says what to pass instead."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(
            f"r (the LoRA rank) must be a positive integer, got {r!r}; typical values are 4 to 64"
        )
    if (
        isinstance(lora_alpha, bool)
        or not isinstance(lora_alpha, (int, float))
        or not lora_alpha > 0
        or not math.isfinite(lora_alpha)
    ):
        raise ValueError(
            f"lora_alpha must be a positive finite number, got {lora_alpha!r}; a common choice is "
            "lora_alpha = r or 2*r"
        )
    if (
        isinstance(lora_dropout, bool)
        or not isinstance(lora_dropout, (int, float))
        or not 0 <= lora_dropout < 1
    ):
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}; use 0.0 for no dropout")
    if init_lora_weights not in (True, False, "gaussian"):
        raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")
