r"""Put LoRA into a model: choose layers by name, swap in `LoRALinear`, freeze the rest, count.

    config = LoRAConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    add_lora(model, config)              # in place; returns the model for convenience
    print_trainable_parameters(model)    # the line PEFT prints, digit for digit
    remove_lora(model)                   # back to the plain base layers (no merge)

Choosing layers follows PEFT's rules (`check_target_module_exists`):
- a list of names matches a module whose full name equals one of them or ends with `.<name>`;
- a single string is a regular expression that must match the full module name (`re.fullmatch`);
- `"all-linear"` is every `nn.Linear` / `Conv1D` except the model's output head (`lm_head`).

Per-layer ranks and alphas follow PEFT's `rank_pattern` / `alpha_pattern`: {pattern: value}, where
a pattern matches a module whose full name ends with it as a regex (`(.*\.)?(pattern)$`), the first
matching pattern winning, e.g. `rank_pattern={"v_proj": 16}` or `{"layers\.0\.self_attn\.q_proj": 2}`.

Left out: several named adapters in one model (see `lora_lab.adapters`), `modules_to_save`,
trainable biases (`bias="all"`) and `layers_to_transform`.

References: PEFT `tuners/tuners_utils.py` (`check_target_module_exists`,
`_maybe_include_all_linear_layers`), `peft_model.py` (`get_nb_trainable_parameters`,
`print_trainable_parameters`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field

from torch import nn

from lora_lab.layers import LoRALinear, base_in_out_features, check_hyperparameters, is_conv1d

__all__ = [
    "LoRAConfig",
    "output_head_name",
    "add_lora",
    "remove_lora",
    "mark_only_lora_as_trainable",
    "lora_layers",
    "has_lora",
    "disable_adapter",
    "linear_module_names",
    "resolve_target_modules",
    "parameter_count",
    "count_parameters",
    "trainable_parameters_line",
    "print_trainable_parameters",
]

ALL_LINEAR = "all-linear"


@dataclass
class LoRAConfig:
    """The settings of one LoRA adapter (PEFT's `LoraConfig`, cut to what this book uses)."""

    r: int = 8  # rank of the update: A is [r, in], B is [out, r]
    lora_alpha: float = 8  # scaling = lora_alpha / r (or / sqrt(r) with use_rslora)
    lora_dropout: float = 0.0  # dropout on the LoRA branch input only
    target_modules: list[str] | str = field(
        default_factory=lambda: ["q_proj", "v_proj"]
    )  # PEFT's Llama default
    use_rslora: bool = False  # alpha / sqrt(r) instead of alpha / r
    init_lora_weights: bool | str = True  # True (kaiming A, B = 0), "gaussian", or False (debug)
    bias: str = "none"  # only "none": biases stay frozen, as in PEFT's default
    rank_pattern: dict = field(default_factory=dict)  # {regex: r} for some layers (PEFT's rank_pattern)
    alpha_pattern: dict = field(default_factory=dict)  # {regex: lora_alpha} for some layers

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple | set | frozenset):
            self.target_modules = sorted(self.target_modules)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError/TypeError for settings that cannot work (called again by add_lora)."""
        check_hyperparameters(self.r, self.lora_alpha, self.lora_dropout, self.init_lora_weights)
        targets = self.target_modules
        if isinstance(targets, str):
            if not targets:
                raise ValueError('target_modules is an empty string; pass names like ["q_proj", "v_proj"]')
            if targets.lower() != ALL_LINEAR:
                try:
                    re.compile(targets)
                except re.error as err:
                    raise ValueError(
                        f"target_modules {targets!r} is not a valid regular expression: {err}"
                    ) from None
        elif isinstance(targets, list):
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ValueError(
                    f"target_modules must be a non-empty list of module names, a regex or 'all-linear'; "
                    f"got {targets!r}"
                )
        else:
            raise TypeError(
                f"target_modules must be a list of names, a regex string or 'all-linear'; got {type(targets).__name__}"
            )
        if not isinstance(self.use_rslora, bool):
            raise TypeError(f"use_rslora must be True or False, got {self.use_rslora!r}")
        if self.bias != "none":
            raise ValueError(
                f"bias={self.bias!r} is not supported by lora_lab (biases stay frozen); use bias='none'"
            )
        for key in ("rank_pattern", "alpha_pattern"):
            _check_pattern(key, getattr(self, key), self)

    def rank_alpha_for(self, name: str) -> tuple[int, float]:
        r"""(r, lora_alpha) of the layer with full name `name`: a matching pattern's value, else r / lora_alpha.

        Matching is PEFT's `get_pattern_key`: the first pattern p with re.match(rf"(.*\.)?({p})$", name).
        """
        return _pattern_value(self.rank_pattern, name, self.r), _pattern_value(
            self.alpha_pattern, name, self.lora_alpha
        )

    def to_dict(self) -> dict:
        return asdict(self)


def _pattern_value(pattern: dict, name: str, default):
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _check_pattern(key: str, pattern, config: LoRAConfig) -> None:
    """rank_pattern / alpha_pattern: a dict of regex -> r (or alpha), each value valid on its own."""
    if not isinstance(pattern, dict):
        raise TypeError(
            f"{key} must be a dict of {{module name pattern: value}}, got {type(pattern).__name__}"
        )
    for pat, value in pattern.items():
        if not isinstance(pat, str) or not pat:
            raise ValueError(f"{key} has the key {pat!r}; keys are module name patterns such as 'v_proj'")
        try:
            re.compile(pat)
        except re.error as err:
            raise ValueError(f"{key} key {pat!r} is not a valid regular expression: {err}") from None
        r, alpha = (value, config.lora_alpha) if key == "rank_pattern" else (config.r, value)
        try:
            check_hyperparameters(r, alpha, config.lora_dropout, config.init_lora_weights)
        except ValueError as err:
            raise ValueError(f"{key}[{pat!r}]: {err}") from None


# ---------------------------------------------------------------------------- finding layers


def _is_linear_like(module: nn.Module) -> bool:
    """A layer LoRALinear can wrap: nn.Linear (incl. bnb Linear4bit), Conv1D, or in/out_features."""
    if isinstance(module, LoRALinear):
        return False
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return True
    return hasattr(module, "in_features") and hasattr(module, "out_features") and hasattr(module, "weight")


def _inside_lora(name: str, lora_names: set[str]) -> bool:
    return any(name.startswith(prefix + ".") for prefix in lora_names)


def linear_module_names(model: nn.Module) -> list[str]:
    """Full names of every layer LoRA could wrap (not counting the insides of LoRA layers)."""
    lora_names = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    return [
        n for n, m in model.named_modules() if _is_linear_like(m) and n and not _inside_lora(n, lora_names)
    ]


def output_head_name(model: nn.Module) -> str | None:
    """Name of the output head (lm_head) that "all-linear" leaves out, as PEFT does."""
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def _matches(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith("." + t) for t in targets)


def resolve_target_modules(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    """Full names of the layers `target_modules` selects, in model order.

    Raises ValueError if nothing matches (listing the linear layers that exist) and TypeError
    if a match is not a linear layer (e.g. a whole attention block).
    """
    candidates = linear_module_names(model)
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        head = output_head_name(model)
        names = [n for n in candidates if n != head]
    else:
        lora_names = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
        names = []
        for name, module in model.named_modules():
            if not name or not _matches(name, target_modules) or _inside_lora(name, lora_names):
                continue
            if not _is_linear_like(module):
                raise TypeError(
                    f"target_modules {target_modules!r} matched {name!r}, a {type(module).__name__}; LoRA here "
                    "wraps linear layers only. Name the linear layers inside it instead."
                )
            names.append(name)
    if not names:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        example = f" (e.g. {candidates[0]!r})" if candidates else ""
        raise ValueError(
            f"target_modules {target_modules!r} matched no layer of {type(model).__name__}. "
            f"Its linear layers are named: {', '.join(suffixes) or 'none'}{example}. "
            "Pass some of these names, a regex matching full names, or 'all-linear'."
        )
    return names


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(full name, layer) for every LoRALinear in the model."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def has_lora(model: nn.Module) -> bool:
    return any(True for _ in lora_layers(model))


# ---------------------------------------------------------------------------- add / remove


@contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every LoRA layer of `model` is its base layer alone: the base model, as
    PEFT's `with model.disable_adapter():` gives it. Merged layers are unmerged for the block."""
    with ExitStack() as stack:
        for _, layer in lora_layers(model):
            stack.enter_context(layer.disable_adapter())
        yield model


def add_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Wrap every layer `config.target_modules` selects in a LoRALinear and freeze all else (in place).

    Everything is checked before the first layer is swapped, so an error leaves the model as it was.
    Returns the same model object. The config is kept as `model.lora_config`.
    """
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a lora_lab LoRAConfig, got {type(config).__name__}")
    config.validate()
    if has_lora(model):
        raise ValueError(
            "this model already has LoRA layers; call remove_lora(model) (or merge_and_unload) before "
            "adding a new adapter, or load weights into the existing one with load_adapter"
        )
    names = resolve_target_modules(model, config.target_modules)
    for name in names:
        _check_rank_fits(name, model.get_submodule(name), config.rank_alpha_for(name)[0])
    new_layers = {}
    for name in names:
        r, lora_alpha = config.rank_alpha_for(name)
        new_layers[name] = LoRALinear(
            model.get_submodule(name),
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=config.lora_dropout,
            use_rslora=config.use_rslora,
            init_lora_weights=config.init_lora_weights,
        )
    for name, layer in new_layers.items():
        model.set_submodule(name, layer)
    model.lora_config = config
    mark_only_lora_as_trainable(model)
    return model


def _check_rank_fits(name: str, module: nn.Module, r: int) -> None:
    """ValueError if r exceeds what the layer can use: B A has rank at most min(in, out)."""
    in_features, out_features = base_in_out_features(module)
    if r > min(in_features, out_features):
        raise ValueError(
            f"r={r} is larger than layer {name} can use: it is [{out_features}, {in_features}], so B A has rank at "
            f"most {min(in_features, out_features)} and the extra rank only costs memory. "
            f"Use r <= {min(in_features, out_features)} (or a rank_pattern entry for this layer)."
        )


def remove_lora(model: nn.Module) -> nn.Module:
    """Put every original layer back, without merging (a merged layer is unmerged first).

    Base parameters stay frozen, as after PEFT's `unload()`; call `model.requires_grad_(True)`
    to train the whole model again.
    """
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("this model has no LoRA layers to remove")
    for _, layer in layers:
        if layer.merged:
            layer.mergeable_weight()  # fail before changing anything if one cannot be unmerged
    for name, layer in layers:
        if layer.merged:
            layer.unmerge()
        model.set_submodule(name, layer.base_layer)
    if "lora_config" in model.__dict__:
        del model.lora_config
    return model


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    """requires_grad = True for LoRA's A and B, False for everything else (PEFT's bias="none")."""
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name


# ---------------------------------------------------------------------------- counting


def parameter_count(param: nn.Parameter) -> int:
    """How many weights one parameter holds, as PEFT's `get_nb_trainable_parameters` counts them.

    bitsandbytes stores 4-bit weights as `Params4bit` packing two values per byte (a [n/2, 1] uint8
    tensor holds n weights), so its `numel()` is half the real count: PEFT multiplies by
    2 * element_size, and so do we.
    """
    if param.__class__.__name__ == "Params4bit":
        return param.numel() * 2 * param.element_size()
    return param.numel()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, counted exactly as PEFT's `get_nb_trainable_parameters`.

    The one parameter counter of lora_lab (`models.count_parameters`, `sizing.count_params` and
    `train.train` count through it). A bitsandbytes 4-bit weight counts as the weights it packs
    (`parameter_count`). Shared (tied) parameters count once, as `named_parameters()` yields them once.
    lora_lab's own `NF4Linear` keeps its packed weight as a buffer, not a parameter; it counts as
    the in_features * out_features weights it stands for (frozen), so a QLoRA model built with
    lora_lab reports the same totals as one built with bitsandbytes and PEFT.
    """
    trainable = total = 0
    for _, param in model.named_parameters():
        n = parameter_count(param)
        total += n
        if param.requires_grad:
            trainable += n
    for module in model.modules():
        if module.__class__.__name__ == "NF4Linear":
            total += module.in_features * module.out_features
    return trainable, total


def trainable_parameters_line(model: nn.Module) -> str:
    """PEFT's line: `trainable params: 65,536 || all params: 16,842,752 || trainable%: 0.3891`."""
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def print_trainable_parameters(model: nn.Module) -> None:
    """Print `trainable_parameters_line(model)`, as PEFT's `print_trainable_parameters` does."""
    print(trainable_parameters_line(model))
