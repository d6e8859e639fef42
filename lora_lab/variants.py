"""The LoRA universe: rsLoRA, LoRA+, OLoRA, PiSSA, CorDA, LoRA-Null and LoftQ, from scratch.

Plain LoRA starts from A random, B = 0 and trains both with one learning rate. Each variant
changes one of those choices:

| variant   | what changes                                   | rewrites the base weight?        |
|-----------|------------------------------------------------|----------------------------------|
| rsLoRA    | scaling alpha / sqrt(r) instead of alpha / r   | no (`LoRALinear(use_rslora=True)`) |
| LoRA+     | B learns `loraplus_lr_ratio` times faster than A | no (optimizer parameter groups) |
| OLoRA     | A, B from the QR decomposition of W            | yes: W <- W - s B A              |
| PiSSA     | A, B from the top-r singular triplets of W     | yes: W <- W - s B A              |
| CorDA     | A, B from the SVD of W C (C = input covariance); IPM keeps the top r, KPM the bottom r | yes: W <- W - s B A |
| LoRA-Null | A, B from W projected on the null space of the inputs | yes: W <- W - s B A       |
| LoftQ     | W <- NF4(W - B A), B A fitted to the quantization error | yes: W <- dequantized Q |
| DoRA      | a trainable magnitude per output row (see `lora_lab.dora`) | no                       |

Every `*_init` function takes one injected `LoRALinear` (plus calibration statistics where the
method needs them) and initialises it exactly as PEFT 0.21's `LoraLayer.*_init` does; the
`init_variant(model, method, ...)` helper does it for every LoRA layer of a model.

A method that rewrites the base weight leaves the layer's output unchanged at step 0 (W' + s B A = W,
up to float rounding), but the adapter is then tied to the rewritten base W'. Each such layer says
so: `layer.variant` names the method, `layer.base_rewritten` is True, and the initial A0, B0 are kept
as non-persistent buffers `initial_lora_A` / `initial_lora_B`. After training,
`to_plain_lora(model)` turns it into an ordinary LoRA model on the ORIGINAL base weights (PEFT's
`subtract_mutated_init`: A' = [A | A0], B' = [B | -B0], r and alpha doubled, alpha x sqrt(2) with
rsLoRA), which `lora_lab.adapters.save_adapter` writes and PEFT or vLLM load on the original model.
LoftQ cannot be converted that way (W - Q is a full-rank quantization error): its adapter belongs
to its quantized base.

Left out: PEFT's caches and files (CorDA `cache_file`/`covariance_file`), 8-bit LoftQ, per-layer
ranks, EVA, LoRA on embeddings (so LoRA+'s embedding group is always empty), and 4-bit bases
for OLoRA/PiSSA/CorDA (initialise on the fp32/bf16 model, then quantize the residual model).

References:
- Kalajdzievski (2023) rsLoRA, arXiv 2312.03732. Hayou et al. (2024) LoRA+, arXiv 2402.12354.
- Büyükakyüz (2024) OLoRA, arXiv 2406.01775. Meng et al. (2024) PiSSA, arXiv 2404.02948.
- Yang et al. (2024) CorDA, arXiv 2406.05223. LoRA-Null, arXiv 2503.02659 (reference code built on
  CorDA's `build_corda.py --singular_aware`). Li et al. (2023) LoftQ, arXiv 2310.08659.
- PEFT `tuners/lora/layer.py` (`olora_init`, `pissa_init`, `corda_init`, `loftq_init`),
  `tuners/lora/corda.py`, `utils/loftq_utils.py`, `optimizers/loraplus.py`,
  `tuners/lora/model.py` (`subtract_mutated_init`), `peft_model.py` (`save_pretrained`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from lora_lab.inject import lora_layers
from lora_lab.layers import LoRALinear, lora_scaling

__all__ = [
    "REWRITING_METHODS",
    "loraplus_param_groups",
    "create_loraplus_optimizer",
    "olora_init",
    "pissa_init",
    "collect_input_covariances",
    "corda_init",
    "lora_null_init",
    "loftq_init",
    "init_variant",
    "to_plain_lora",
]

# Methods whose init moves part of W into the adapter (and so rewrites the base weight).
REWRITING_METHODS = ("olora", "pissa", "corda-ipm", "corda-kpm", "lora-null", "loftq")


# ============================================================================ LoRA+


def loraplus_param_groups(
    model: nn.Module,
    lr: float,
    loraplus_lr_ratio: float,
    loraplus_weight_decay: float = 0.0,
    loraplus_lr_embedding: float = 1e-6,
) -> list[dict]:
    """The four optimizer parameter groups of LoRA+, in PEFT's order and with PEFT's rules.

    - groupA: every other trainable parameter (the lora_A weights), lr = `lr`;
    - embedding: LoRA on embedding layers, lr = `loraplus_lr_embedding` (always empty here:
      lora_lab has no embedding LoRA, but the group is kept so the layout equals PEFT's);
    - groupB: parameters named `lora_B` OR with one dimension (DoRA magnitudes, biases, norms),
      lr = `lr * loraplus_lr_ratio`, weight decay `loraplus_weight_decay`;
    - groupB_no_decay: the part of groupB inside an `nn.LayerNorm` or named `bias`: same lr,
      weight decay 0.

    Why: with A and B trained at one learning rate, B (which starts at zero) learns too slowly when
    the width is large; Hayou et al. show that eta_B = lambda * eta_A with lambda >> 1 fixes it.
    """
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not loraplus_lr_ratio > 0:
        raise ValueError(
            f"loraplus_lr_ratio must be positive, got {loraplus_lr_ratio!r}; the paper suggests about 16 (2**4)"
        )
    # transformers' get_parameter_names(model, [nn.LayerNorm]) minus names containing "bias"
    in_layernorm = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    groups: dict[str, list[nn.Parameter]] = {
        "groupA": [],
        "embedding": [],
        "groupB": [],
        "groupB_no_decay": [],
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_B" in name or param.ndim == 1:
            decays = id(param) not in in_layernorm and "bias" not in name
            groups["groupB" if decays else "groupB_no_decay"].append(param)
        else:
            groups["groupA"].append(param)
    if not any(groups.values()):
        raise ValueError("the model has no trainable parameters; add_lora(model, config) first")
    return [
        {"params": groups["groupA"], "weight_decay": loraplus_weight_decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": loraplus_weight_decay, "lr": loraplus_lr_embedding},
        {"params": groups["groupB"], "weight_decay": loraplus_weight_decay, "lr": lr * loraplus_lr_ratio},
        {"params": groups["groupB_no_decay"], "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ]


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer],
    *,
    lr: float,
    loraplus_lr_ratio: float,
    **kwargs,
) -> torch.optim.Optimizer:
    """`optimizer_cls` over `loraplus_param_groups(model, ...)`: PEFT's `create_loraplus_optimizer`.

    `loraplus_weight_decay` (default 0.0) and `loraplus_lr_embedding` (default 1e-6) are taken from
    kwargs; every other kwarg goes to the optimizer (e.g. `betas`).
    """
    weight_decay = kwargs.pop("loraplus_weight_decay", 0.0)
    lr_embedding = kwargs.pop("loraplus_lr_embedding", 1e-6)
    groups = loraplus_param_groups(model, lr, loraplus_lr_ratio, weight_decay, lr_embedding)
    return optimizer_cls(groups, lr=lr, **kwargs)


# ============================================================================ shared helpers


def _check_layer(layer: nn.Module, method: str) -> None:
    if not isinstance(layer, LoRALinear):
        raise TypeError(f"{method}_init takes a LoRALinear (from add_lora), got {type(layer).__name__}")
    if layer.merged:
        raise ValueError(f"{method}_init: the layer is merged; unmerge it first")
    if getattr(layer, "variant", None) is not None:
        raise ValueError(
            f"{method}_init: this layer was already initialised with {layer.variant!r}; a second init would "
            "take a second piece out of the already rewritten base weight. Start from a fresh add_lora."
        )
    components = min(layer.in_features, layer.out_features)  # what an SVD / QR of W can give
    if layer.r > components:
        raise ValueError(
            f"{method}: r={layer.r} is larger than the {components} components a [{layer.out_features}, "
            f"{layer.in_features}] weight has; use r <= {components}"
        )
    if method in ("lora_null", "lora-null") and layer.r >= layer.in_features:
        raise ValueError(
            f"LoRA-Null needs r < in_features ({layer.in_features}) to leave a null space; got r={layer.r}"
        )


def _check_float_weight(layer: LoRALinear, method: str) -> None:
    """TypeError unless the base weight is a full-precision float tensor (not 4-bit, not missing)."""
    weight = getattr(layer.base_layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dtype not in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
    ):
        kind = "missing" if weight is None else str(weight.dtype)
        raise TypeError(
            f"{method} needs the full-precision base weight (fp32/fp16/bf16), but it is {kind}. Initialise "
            "on the unquantized model, then quantize the rewritten (residual) model."
        )


def _base_weight(layer: LoRALinear, method: str) -> torch.Tensor:
    """A fp32 copy of the base weight as [out, in] (Conv1D stores it [in, out])."""
    _check_float_weight(layer, method)
    weight = layer.base_layer.weight.detach().to(torch.float32)
    return weight.T if layer.fan_in_fan_out else weight  # [out, in]


def _set_base_weight(layer: LoRALinear, weight: torch.Tensor) -> None:
    """Write an [out, in] fp32 weight back into the base layer, in its own layout and dtype."""
    base = layer.base_layer.weight
    if layer.fan_in_fan_out:
        weight = weight.T
    base.data = weight.to(base.dtype).contiguous()


@torch.no_grad()
def _install(
    layer: LoRALinear, lora_A: torch.Tensor, lora_B: torch.Tensor, residual: torch.Tensor, method: str
):
    """Put the new A [r, in], B [out, r] and base weight [out, in] in place and record the rewrite."""
    layer.lora_A.weight.data = lora_A.contiguous().to(layer.lora_A.weight.dtype)
    layer.lora_B.weight.data = lora_B.contiguous().to(layer.lora_B.weight.dtype)
    _set_base_weight(layer, residual)
    layer.variant = method
    layer.base_rewritten = True
    # A0 and B0, for to_plain_lora after training; non-persistent, so not in the state dict / adapter file
    layer.register_buffer("initial_lora_A", layer.lora_A.weight.detach().clone(), persistent=False)
    layer.register_buffer("initial_lora_B", layer.lora_B.weight.detach().clone(), persistent=False)


def _residual(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """W - s B A, multiplied in PEFT's order ((s * B) @ A) so the numbers agree to the last bit."""
    return weight - scaling * lora_B @ lora_A  # [out, in]


# ============================================================================ OLoRA and PiSSA


@torch.no_grad()
def olora_init(layer: LoRALinear) -> None:
    """OLoRA: W = Q R (QR decomposition); B = Q[:, :r] (orthonormal columns), A = R[:r].

    REWRITES THE BASE WEIGHT: W <- W - s B A, so the output is unchanged at step 0.
    Unlike PiSSA there is no division by the scaling s: s B A is what is taken out of W.
    """
    _check_layer(layer, "olora")
    weight = _base_weight(layer, "OLoRA")  # [out, in]
    Q, R = torch.linalg.qr(weight)  # Q [out, k], R [k, in], k = min(out, in)
    lora_B, lora_A = Q[:, : layer.r], R[: layer.r]  # [out, r], [r, in]
    _install(layer, lora_A, lora_B, _residual(weight, lora_A, lora_B, layer.scaling), "olora")


@torch.no_grad()
def pissa_init(layer: LoRALinear, niter: int | None = None) -> None:
    """PiSSA: train the principal singular components of W, freeze the rest.

    W = U S Vh; with S_r = S[:r] / s:  A = diag(sqrt(S_r)) Vh[:r]  [r, in],  B = U[:, :r] diag(sqrt(S_r))
    [out, r], so s B A is W's best rank-r approximation. `niter=K` uses the randomized
    `torch.svd_lowrank` with K subspace iterations (PEFT's "pissa_niter_K"; draws random numbers,
    so seed first), otherwise the exact SVD.

    REWRITES THE BASE WEIGHT: W <- W - s B A (the residual of the top r components).
    """
    _check_layer(layer, "pissa")
    weight = _base_weight(layer, "PiSSA")  # [out, in]
    r = layer.r
    if niter is None:
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)  # [out, k], [k], [k, in]
        U_r, S_r, Vh_r = U[:, :r], S[:r], Vh[:r]
    else:
        U_r, S_r, V_r = torch.svd_lowrank(weight, r, niter=niter)
        Vh_r = V_r.t()
    S_r = S_r / layer.scaling  # so that s * B A = U_r S_r Vh_r
    lora_A = torch.diag(torch.sqrt(S_r)) @ Vh_r  # [r, in]
    lora_B = U_r @ torch.diag(torch.sqrt(S_r))  # [out, r]
    _install(layer, lora_A, lora_B, _residual(weight, lora_A, lora_B, layer.scaling), "pissa")


# ============================================================================ calibration statistics


@torch.no_grad()
def collect_input_covariances(
    model: nn.Module,
    batches: Iterable | Callable[[], None],
    names: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Mean input covariance C = mean_i(X_i^T X_i) [in, in] of every LoRA layer, as PEFT's CorDA builds it.

    `batches` is an iterable of model inputs (a token-id tensor [batch, seq] or a dict of kwargs),
    or a callable that runs the model itself. Forward hooks on each LoRA layer's base layer see its
    input; every SAMPLE X_i [seq, in] is scaled by 1/|max(X_i)| (PEFT's `input / max(input).abs()`),
    then X_i^T X_i is summed and divided by the number of samples. PEFT's hook handles one sample per
    forward call, so feed it batches of 1 to get its numbers; here each row of a batch counts as one
    sample (padding tokens count too: use unpadded batches).

    The layers' outputs must not depend on the adapter yet (B = 0, or an output-preserving init), so
    run this right after add_lora, before any variant init.
    """
    layers = dict(lora_layers(model))
    if not layers:
        raise ValueError("the model has no LoRA layers; add_lora(model, config) first")
    chosen = list(layers) if names is None else list(names)
    unknown = [n for n in chosen if n not in layers]
    if unknown:
        raise ValueError(f"not LoRA layers: {unknown[:3]}; LoRA layers are e.g. {list(layers)[:3]}")
    sums = {n: 0 for n in chosen}
    counts = {n: 0 for n in chosen}

    def make_hook(name: str):
        def hook(module, args, output):
            x = args[0].detach().float()
            x = x.reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() > 2 else x[None]  # [samples, seq, in]
            for sample in x:  # [seq, in]
                sample = sample / torch.max(sample).abs()
                sums[name] = sums[name] + sample.t() @ sample  # [in, in]
                counts[name] += 1

        return hook

    handles = [layers[n].base_layer.register_forward_hook(make_hook(n)) for n in chosen]
    was_training = model.training
    model.eval()
    try:
        if callable(batches):
            batches()
        else:
            for batch in batches:
                model(**batch) if isinstance(batch, dict) else model(batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    empty = [n for n in chosen if counts[n] == 0]
    if empty:
        raise ValueError(
            f"no calibration input reached {empty[:3]}; pass at least one batch that runs the model"
        )
    return {n: sums[n] / counts[n] for n in chosen}


def _check_covariance(layer: LoRALinear, covariance: torch.Tensor, method: str) -> torch.Tensor:
    if not isinstance(covariance, torch.Tensor) or covariance.shape != (layer.in_features, layer.in_features):
        shape = tuple(covariance.shape) if isinstance(covariance, torch.Tensor) else type(covariance).__name__
        raise ValueError(
            f"{method} needs this layer's input covariance [{layer.in_features}, {layer.in_features}], got {shape}; "
            "use collect_input_covariances(model, batches)[layer_name]"
        )
    if not torch.isfinite(covariance).all():
        raise ValueError(f"{method}: the covariance has NaN/inf values; check the calibration batches")
    return covariance.float()


# ============================================================================ CorDA


@torch.no_grad()
def corda_init(layer: LoRALinear, covariance: torch.Tensor, mode: str = "ipm") -> None:
    """CorDA: decompose W C (C = the input covariance) so the adapter is oriented by the data.

    1. Damp C until it is safely invertible: C' = C + d * mean(diag C) * I, d = 0.01, doubled until
       ||C' C'^-1 - I|| < 0.05 (PEFT's loop).
    2. SVD: W C' = U S Vh; the right factors mapped back with C'^-1: V = (Vh C'^-1)^T, so U S V^T = W.
    3. mode "ipm" (instruction-previewed: calibrate on task data) keeps the r LARGEST components, to
       adapt fastest; "kpm" (knowledge-preserved: calibrate on data whose knowledge must survive) keeps
       the r SMALLEST, so training touches what those inputs hardly use.
    4. S_r /= s; A = sqrt(S_r) V_r^T [r, in], B = U_r sqrt(S_r) [out, r].

    REWRITES THE BASE WEIGHT: W <- W - s B A.
    """
    _check_layer(layer, "corda")
    if mode not in ("ipm", "kpm"):
        raise ValueError(
            f"mode must be 'ipm' (instruction-previewed) or 'kpm' (knowledge-preserved), got {mode!r}"
        )
    cov = _check_covariance(layer, covariance, "CorDA")
    weight = _base_weight(layer, "CorDA")  # [out, in]
    eye = torch.eye(cov.shape[0], device=cov.device)
    damp = 0.01
    while True:
        fixed = cov + torch.diag(
            torch.ones(cov.shape[0], device=cov.device) * torch.mean(torch.diag(cov)) * damp
        )
        cov_inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ cov_inv, eye).item() < 0.05:
            break
        damp = damp * 2
    U, S, Vh = torch.linalg.svd(weight @ fixed, full_matrices=False)  # [out, k], [k], [k, in]
    V = (Vh @ cov_inv).transpose(0, 1)  # [in, k]
    r = layer.r
    keep = slice(None, r) if mode == "ipm" else slice(-r, None)
    U_r, S_r, V_r = U[:, keep], S[keep] / layer.scaling, V[:, keep]
    lora_A = V_r.t().mul(S_r.sqrt().view(-1, 1))  # [r, in]
    lora_B = U_r.mul(S_r.sqrt())  # [out, r]
    _install(layer, lora_A, lora_B, _residual(weight, lora_A, lora_B, layer.scaling), f"corda-{mode}")


# ============================================================================ LoRA-Null


@torch.no_grad()
def lora_null_init(layer: LoRALinear, covariance: torch.Tensor) -> None:
    """LoRA-Null: start the adapter in the (approximate) null space of the pretrained inputs.

    What is implemented (the "singular-aware" decomposition of the LoRA-Null reference code, which
    builds on CorDA), with C the input covariance from `collect_input_covariances`:
    1. C = U_C S_C U_C^T; N = U_C[:, -r:] [in, r]: the r input directions the calibration
       activations use least (for rank(X) <= in - r they are an exact null space: X N = 0).
    2. W_null = W N N^T [out, in]: the part of W that acts on those directions (rank <= r).
    3. SVD W_null = U S Vh; S_r = S[:r] / s; A = sqrt(S_r) Vh[:r] [r, in], B = U[:, :r] sqrt(S_r).
    So the rows of A lie in span(N): A x ~ 0 for the pretrained inputs x, and whatever B learns
    barely moves the outputs on them (that is how it preserves knowledge). The paper's v2 also
    freezes A (`layer.lora_A.requires_grad_(False)`), left to the caller.

    Why this and not something else: the paper's text says "initialise LoRA from the null space of
    the input activations"; its reference code does exactly the steps above, with the alpha
    compensation (S_r /= s) added here as in PiSSA/CorDA so any lora_alpha keeps W' + s B A = W.

    REWRITES THE BASE WEIGHT: W <- W - s B A (= W - W_null up to rounding).
    """
    _check_layer(layer, "lora_null")
    cov = _check_covariance(layer, covariance, "LoRA-Null")
    weight = _base_weight(layer, "LoRA-Null")  # [out, in]
    r = layer.r
    U_C, _, _ = torch.linalg.svd(cov)  # columns sorted by decreasing input energy
    null = U_C[:, -r:]  # [in, r]
    weight_null = weight @ (null @ null.t())  # [out, in]
    U, S, Vh = torch.linalg.svd(weight_null, full_matrices=False)
    S_r = S[:r] / layer.scaling
    lora_A = Vh[:r].mul(S_r.sqrt().view(-1, 1))  # [r, in]
    lora_B = U[:, :r].mul(S_r.sqrt())  # [out, r]
    _install(layer, lora_A, lora_B, _residual(weight, lora_A, lora_B, layer.scaling), "lora-null")


# ============================================================================ LoftQ


def _nf4_roundtrip(weight: torch.Tensor, blocksize: int) -> torch.Tensor:
    """dequantize(quantize_nf4(w)): the values a 4-bit NF4 base (no double quantization) holds."""
    from lora_lab.nf4 import dequantize_nf4, quantize_nf4

    packed, state = quantize_nf4(weight, blocksize=blocksize, double_quant=False)
    return dequantize_nf4(packed, state)


@torch.no_grad()
def loftq_init(layer: LoRALinear, num_iter: int = 1, blocksize: int = 64) -> None:
    """LoftQ: choose Q (4-bit) and B A together so that Q + B A is close to W.

    Alternate, `num_iter` times (PEFT's `loftq_utils.loftq_init`):
        Q  = dequantize(NF4(W - B A))          (B A = 0 in the first round)
        B, A = best rank-r fit of W - Q:  U S Vh = svd(W - Q);  B = U[:, :r] sqrt(S_r),  A = sqrt(S_r) Vh[:r]
    NF4 uses lora_lab.nf4 (bit-exact with bitsandbytes' CPU `quantize_4bit`, blocksize 64, no double
    quantization, as PEFT's `Params4bit(..., compress_statistics=False)`).

    REWRITES THE BASE WEIGHT: W <- Q (dequantized; quantizing it to NF4 again gives back exactly Q).
    Like PEFT, the scaling is NOT compensated: Q + s B A approximates W only when s = 1, so use
    lora_alpha = r (PEFT's example uses r = alpha = 16).
    """
    _check_layer(layer, "loftq")
    if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 1:
        raise ValueError(f"num_iter must be a positive integer, got {num_iter!r}; 1 to 5 is typical")
    weight = _base_weight(layer, "LoftQ")  # [out, in]
    r = layer.r
    residual = weight.clone()
    for i in range(num_iter):
        dequantized = _nf4_roundtrip(residual, blocksize)  # Q
        U, S, Vh = torch.linalg.svd(weight - dequantized, full_matrices=False)
        lora_B = U[:, :r] * torch.sqrt(S[:r])  # [out, r]  (L in the paper)
        lora_A = torch.sqrt(S[:r]).view(-1, 1) * Vh[:r]  # [r, in]  (R in the paper)
        if i + 1 < num_iter:
            residual = weight - lora_B @ lora_A
    _install(layer, lora_A, lora_B, dequantized, "loftq")


# ============================================================================ whole model


def init_variant(
    model: nn.Module,
    method: str,
    calibration: Iterable | Callable[[], None] | None = None,
    *,
    niter: int | None = None,
    num_iter: int = 1,
) -> nn.Module:
    """Initialise every LoRA layer of `model` with `method` (one of REWRITING_METHODS), in place.

    CorDA ("corda-ipm", "corda-kpm") and "lora-null" need `calibration` batches (see
    `collect_input_covariances`; all covariances are collected before any layer changes).
    `niter` is PiSSA's randomized-SVD iterations, `num_iter` LoftQ's alternations.
    Returns the model. Every layer then has `variant == method` and `base_rewritten == True`.
    """
    if method not in REWRITING_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(REWRITING_METHODS)}")
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("the model has no LoRA layers; add_lora(model, config) first")
    for _, layer in layers:  # every check before the first layer changes
        _check_layer(layer, method)
        _check_float_weight(layer, method)
    needs_data = method.startswith("corda") or method == "lora-null"
    if needs_data and calibration is None:
        raise ValueError(
            f"{method} needs calibration batches (e.g. a few batches of token ids from your data)"
        )
    covariances = collect_input_covariances(model, calibration) if needs_data else {}
    for name, layer in layers:
        if method == "olora":
            olora_init(layer)
        elif method == "pissa":
            pissa_init(layer, niter=niter)
        elif method.startswith("corda"):
            corda_init(layer, covariances[name], mode=method.split("-")[1])
        elif method == "lora-null":
            lora_null_init(layer, covariances[name])
        else:
            loftq_init(layer, num_iter=num_iter)
    return model


# ============================================================================ back to plain LoRA


@torch.no_grad()
def to_plain_lora(model: nn.Module) -> nn.Module:
    """Turn a (trained) PiSSA / OLoRA / CorDA / LoRA-Null model into plain LoRA on the original base (in place).

    With W = W' + s B0 A0 (the init) and the trained adapter B A on W', the trained model is
    W' + s B A = W + s (B A - B0 A0) = W + s [B | -B0] [A | A0]^T. So each layer gets:
        base weight  W' + s B0 A0        (the original W again, up to float rounding)
        lora_A       [A ; A0]            [2r, in]
        lora_B       [B | -B0]           [out, 2r]
        r, alpha     2r, 2 alpha         (alpha * sqrt(2) with rsLoRA: the scaling stays the same)
    exactly what PEFT writes with `save_pretrained(path_initial_model_for_weight_conversion=...)`.
    The outputs do not change; the adapter now works on the unmodified base model, so
    `adapters.save_adapter` gives a file PEFT and vLLM load on the original checkpoint.
    Raises (changing nothing) for LoftQ (its W - Q is full rank, not an adapter), for merged layers,
    and for layers that were not initialised by a base-rewriting method.
    """
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("the model has no LoRA layers to convert")
    for name, layer in layers:
        method = getattr(layer, "variant", None)
        if method == "loftq":
            raise ValueError(
                f"{name} was initialised with LoftQ: its base is the quantized Q, and W - Q is a full-rank "
                "quantization error that no LoRA adapter can carry. Ship the LoftQ adapter with its base Q "
                "(quantize the model with NF4 and save both)."
            )
        if getattr(layer, "initial_lora_A", None) is None:
            raise ValueError(
                f"{name} has no recorded initial adapter (it was not initialised by olora/pissa/corda/lora-null, "
                "or was already converted); plain LoRA layers need no conversion"
            )
        if layer.merged:
            raise ValueError(f"{name} is merged; unmerge_adapters(model) before converting")
        if type(layer) is not LoRALinear:
            raise TypeError(
                f"{name} is a {type(layer).__name__}; only plain LoRALinear layers can be converted"
            )
    for _, layer in layers:
        A0, B0 = layer.initial_lora_A, layer.initial_lora_B  # [r, in], [out, r]
        weight = _base_weight(layer, "to_plain_lora")  # W' [out, in]
        _set_base_weight(layer, weight + layer.scaling * B0 @ A0)  # back to W
        new_A = torch.cat([layer.lora_A.weight, A0], dim=0)  # [2r, in]
        new_B = torch.cat([layer.lora_B.weight, -B0], dim=1)  # [out, 2r]
        for attr, value in (("lora_A", new_A), ("lora_B", new_B)):
            old = getattr(layer, attr)
            # built on "meta" so no random numbers are drawn, then given the real weight
            new = nn.Linear(value.shape[1], value.shape[0], bias=False, device="meta")
            new.weight = nn.Parameter(value.contiguous(), requires_grad=old.weight.requires_grad)
            setattr(layer, attr, new)
        layer.r = 2 * layer.r
        layer.lora_alpha = layer.lora_alpha * (math.sqrt(2) if layer.use_rslora else 2)
        layer.scaling = lora_scaling(layer.r, layer.lora_alpha, layer.use_rslora)
        del layer.initial_lora_A, layer.initial_lora_B
        layer.variant = None
        layer.base_rewritten = False
    config = getattr(model, "lora_config", None)
    if config is not None:
        first = layers[0][1]
        model.lora_config = dataclasses.replace(
            config, r=first.r, lora_alpha=first.lora_alpha, init_lora_weights=True
        )
    return model
