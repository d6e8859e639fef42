"""LoRA variants (lora_lab.variants, lora_lab.dora) cross-checked against PEFT on a tiny random Llama.

For each variant PEFT implements, the same base weights (and calibration batches) must give the same
initial A, B, rewritten base weight (and DoRA magnitude), the same forward after a simulated training
step, and the same merged weights. LoRA-Null (not in PEFT) is checked on its defining property.
"""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from conftest import TARGETS, build_tiny, tiny_inputs, to_peft_config
from peft import LoraConfig, PeftModel, get_peft_model
from peft.optimizers import create_loraplus_optimizer as peft_create_loraplus_optimizer
from peft.tuners.lora import layer as peft_layer
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import calib_cov_distribution, preprocess_corda
from peft.utils import loftq_utils

from lora_lab import bnb_cpu
from lora_lab.adapters import load_adapter, save_adapter
from lora_lab.dora import DoRALinear, add_dora, load_dora_adapter, save_dora_adapter
from lora_lab.inject import LoRAConfig, add_lora, lora_layers
from lora_lab.layers import LoRALinear
from lora_lab.merge import merge_and_unload
from lora_lab.nf4 import dequantize_nf4, quantize_nf4
from lora_lab.variants import (
    collect_input_covariances,
    create_loraplus_optimizer,
    init_variant,
    lora_null_init,
    loraplus_param_groups,
    olora_init,
    pissa_init,
    to_plain_lora,
)

R, ALPHA = 4, 8
ATOL = 1e-5  # fp32: the same ops on the same inputs; only summation order may differ


def _config(r=R, alpha=ALPHA, rslora=False, targets=None):
    return LoRAConfig(r=r, lora_alpha=alpha, target_modules=targets or TARGETS["llama"], use_rslora=rslora)


def _ours(config, seed=0):
    return add_lora(build_tiny("llama", seed=seed), config)


def _peft_lora_layers(peft_model) -> dict:
    return {
        name.removeprefix("base_model.model."): module
        for name, module in peft_model.named_modules()
        if isinstance(module, peft_layer.Linear)
    }


def _calibration(n=4, seq=12, seed=3):
    """Four unpadded single-sample batches (PEFT's CorDA hook takes one sample per forward call)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (1, seq), generator=g) for _ in range(n)]


def _assert_same_init(ours, theirs, atol=ATOL):
    peft_layers = _peft_lora_layers(theirs)
    ours_layers = dict(lora_layers(ours))
    assert set(ours_layers) == set(peft_layers) and ours_layers
    for name, layer in ours_layers.items():
        p = peft_layers[name]
        torch.testing.assert_close(layer.lora_A.weight, p.lora_A["default"].weight, atol=atol, rtol=1e-5)
        torch.testing.assert_close(layer.lora_B.weight, p.lora_B["default"].weight, atol=atol, rtol=1e-5)
        torch.testing.assert_close(layer.base_layer.weight, p.base_layer.weight, atol=atol, rtol=1e-5)


@torch.no_grad()
def _simulate_training(ours, theirs=None, seed=7):
    """Move every A and B (and DoRA magnitude) by the same random step in both models."""
    g = torch.Generator().manual_seed(seed)
    peft_layers = _peft_lora_layers(theirs) if theirs is not None else {}
    for name, layer in lora_layers(ours):
        for attr in ("lora_A", "lora_B"):
            w = getattr(layer, attr).weight
            w += 0.05 * torch.randn(w.shape, generator=g) * (w.abs().mean() + 0.1)
            if name in peft_layers:
                getattr(peft_layers[name], attr)["default"].weight.copy_(w)
        if isinstance(layer, DoRALinear):
            m = layer.lora_magnitude_vector
            m += 0.05 * torch.randn(m.shape, generator=g)
            if name in peft_layers:
                peft_layers[name].lora_magnitude_vector["default"].weight.copy_(m)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _assert_forward_and_merge_equal(ours, theirs, atol=ATOL):
    ids = tiny_inputs(ours)
    base_logits = _logits(build_tiny("llama"), ids)
    _simulate_training(ours, theirs)
    ours_logits, peft_logits = _logits(ours, ids), _logits(theirs, ids)
    torch.testing.assert_close(ours_logits, peft_logits, atol=atol, rtol=1e-4)
    assert (ours_logits - base_logits).abs().max() > 1e-3  # the adapter really acts
    merged_ours, merged_peft = merge_and_unload(ours), theirs.merge_and_unload()
    sd_peft = merged_peft.state_dict()
    for key, value in merged_ours.state_dict().items():
        torch.testing.assert_close(value, sd_peft[key], atol=atol, rtol=1e-4, msg=key)
    torch.testing.assert_close(_logits(merged_ours, ids), ours_logits, atol=atol, rtol=1e-4)


# ---------------------------------------------------------------------------- rsLoRA


@pytest.mark.parametrize("r", [1, 4, 16])
def test_rslora_scaling_and_forward_equal_peft(r):
    config = _config(r=r, alpha=8, rslora=True, targets=["q_proj", "v_proj"])
    ours = _ours(config)
    theirs = get_peft_model(build_tiny("llama"), to_peft_config(config))
    for name, layer in lora_layers(ours):
        assert layer.scaling == pytest.approx(8 / math.sqrt(r))
        assert layer.scaling == _peft_lora_layers(theirs)[name].scaling["default"]
    _assert_same_init(ours, theirs, atol=0)  # same seed, same kaiming draws
    _assert_forward_and_merge_equal(ours, theirs)


# ---------------------------------------------------------------------------- LoRA+


def _group_names(model, groups, prefix=""):
    names = {id(p): n.removeprefix(prefix).replace(".default", "") for n, p in model.named_parameters()}
    return [sorted(names[id(p)] for p in g["params"]) for g in groups]


@pytest.mark.parametrize("dora", [False, True])
def test_loraplus_groups_and_learning_rates_equal_peft(dora):
    """OPT has LayerNorms and biases: make them trainable too, so every one of PEFT's groups is used."""
    config = LoRAConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj", "fc1"])
    ours = add_lora(build_tiny("opt"), config)
    theirs = get_peft_model(build_tiny("opt"), to_peft_config(config, use_dora=dora))
    if dora:
        from lora_lab.dora import convert_to_dora

        convert_to_dora(ours)
    for model in (ours, theirs):
        for name, p in model.named_parameters():
            if "layer_norm" in name or name.endswith("fc1.base_layer.bias") or name.endswith("fc2.bias"):
                p.requires_grad_(True)
    kwargs = dict(lr=1e-3, loraplus_lr_ratio=16, loraplus_weight_decay=0.01)
    ours_opt = create_loraplus_optimizer(ours, torch.optim.AdamW, betas=(0.9, 0.99), **kwargs)
    peft_opt = peft_create_loraplus_optimizer(theirs, torch.optim.AdamW, betas=(0.9, 0.99), **kwargs)
    assert len(ours_opt.param_groups) == len(peft_opt.param_groups) == 4
    for key in ("lr", "weight_decay", "betas"):
        assert [g[key] for g in ours_opt.param_groups] == [g[key] for g in peft_opt.param_groups]
    ours_names = _group_names(ours, ours_opt.param_groups)
    peft_names = _group_names(theirs, peft_opt.param_groups, prefix="base_model.model.")
    peft_names = [
        [n.replace("lora_magnitude_vector.weight", "lora_magnitude_vector") for n in g] for g in peft_names
    ]
    assert ours_names == peft_names
    assert all(ours_names[i] for i in (0, 2, 3)) and not ours_names[1]  # A, B, B-no-decay used; no embedding
    assert any("lora_B" in n for n in ours_names[2]) and any("layer_norm" in n for n in ours_names[3])
    assert any("lora_magnitude_vector" in n for n in ours_names[2]) == dora
    assert [g["lr"] for g in loraplus_param_groups(ours, 2e-4, 20)] == [2e-4, 1e-6, 2e-4 * 20, 2e-4 * 20]


def test_loraplus_rejects_bad_input():
    with pytest.raises(ValueError, match="loraplus_lr_ratio"):
        loraplus_param_groups(_ours(_config()), 1e-3, 0)
    with pytest.raises(ValueError, match="no trainable"):
        loraplus_param_groups(build_tiny("llama").requires_grad_(False), 1e-3, 16)


# ---------------------------------------------------------------------------- OLoRA, PiSSA


@pytest.mark.parametrize("method", ["olora", "pissa"])
def test_olora_pissa_equal_peft(method):
    config = _config()
    ours = init_variant(_ours(config), method)
    theirs = get_peft_model(build_tiny("llama"), to_peft_config(config, init_lora_weights=method))
    _assert_same_init(ours, theirs)
    for _, layer in lora_layers(ours):
        assert layer.variant == method and layer.base_rewritten
    ids = tiny_inputs(ours)
    # W' + s B A = W: the output is the base model's at step 0
    torch.testing.assert_close(_logits(ours, ids), _logits(build_tiny("llama"), ids), atol=ATOL, rtol=1e-4)
    _assert_forward_and_merge_equal(ours, theirs)


def test_pissa_niter_equal_peft_with_the_same_random_stream():
    """svd_lowrank is randomized: seed both right before the init and call PEFT's own pissa_init."""
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 48)
    ours = LoRALinear(copy.deepcopy(base), r=R, lora_alpha=ALPHA)
    theirs = peft_layer.Linear(
        copy.deepcopy(base), "default", config=LoraConfig(r=R, lora_alpha=ALPHA), r=R, lora_alpha=ALPHA
    )
    torch.manual_seed(11)
    pissa_init(ours, niter=4)
    torch.manual_seed(11)
    theirs.pissa_init("default", "pissa_niter_4")
    torch.testing.assert_close(ours.lora_A.weight, theirs.lora_A["default"].weight, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(ours.lora_B.weight, theirs.lora_B["default"].weight, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(ours.base_layer.weight, theirs.base_layer.weight, atol=ATOL, rtol=1e-5)
    # W' + s B A = W whatever the random subspace
    torch.testing.assert_close(
        ours.base_layer.weight + ours.delta_weight(), base.weight, atol=ATOL, rtol=1e-5
    )


# ---------------------------------------------------------------------------- CorDA


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_equal_peft(mode):
    config = _config()
    batches = _calibration()
    ours = init_variant(_ours(config), f"corda-{mode}", calibration=batches)
    base = build_tiny("llama")
    peft_config = to_peft_config(
        config, init_lora_weights="corda", corda_config=CordaConfig(corda_method=mode)
    )
    preprocess_corda(base, peft_config, run_model=lambda: [base(b) for b in batches])
    theirs = get_peft_model(base, peft_config)
    _assert_same_init(ours, theirs, atol=1e-4)  # damping + inverse + SVD: a little more rounding
    ids = tiny_inputs(ours)
    torch.testing.assert_close(_logits(ours, ids), _logits(build_tiny("llama"), ids), atol=ATOL, rtol=1e-4)
    _assert_forward_and_merge_equal(ours, theirs, atol=1e-4)


def test_covariances_equal_peft_hook_and_batches_count_samples():
    config = _config(targets=["q_proj", "down_proj"])
    batches = _calibration()
    ours = _ours(config)
    covs = collect_input_covariances(ours, batches)
    base = build_tiny("llama")
    peft_config = to_peft_config(
        config, init_lora_weights="corda", corda_config=CordaConfig(corda_method="ipm")
    )
    # PEFT's own covariance step (the first half of preprocess_corda), which keeps C on each module
    calib_cov_distribution(base, peft_config, lambda: [base(b) for b in batches], None, None)
    for name, cov in covs.items():
        torch.testing.assert_close(cov, base.get_submodule(name).covariance_matrix, atol=1e-6, rtol=1e-5)
    # a batch of 4 rows counts as 4 samples: same covariance as 4 single-sample batches
    stacked = collect_input_covariances(_ours(config), [torch.cat(batches)])
    for name in covs:
        torch.testing.assert_close(stacked[name], covs[name], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------- LoftQ


def _peft_loftq_on_cpu():
    """PEFT's `loftq_utils.loftq_init`, unchanged except that it computes on the CPU.

    PEFT hard-codes its compute device to "cuda" (or "xpu"), so on this CPU-only machine the original
    cannot run; its quantization step itself (bitsandbytes `Params4bit`, NF4, blocksize 64) works on CPU.
    """
    source = inspect.getsource(loftq_utils.loftq_init)
    assert source.count('else "cuda"') == 1  # the one line we change; fails loudly if PEFT changes
    namespace = dict(vars(loftq_utils))
    exec(source.replace('else "cuda"', 'else "cpu"').replace("@torch.no_grad()\n", ""), namespace)
    return torch.no_grad()(namespace["loftq_init"])


@pytest.mark.parametrize("num_iter", [1, 3])
def test_loftq_equal_peft(num_iter, monkeypatch):
    monkeypatch.setattr(peft_layer, "loftq_init", _peft_loftq_on_cpu())
    config = _config(r=R, alpha=R)  # alpha = r: LoftQ does not compensate the scaling (as in PEFT)
    ours = init_variant(_ours(config), "loftq", num_iter=num_iter)
    # LoraConfig refuses "loftq" unless scipy is installed (it is not needed on this path and not
    # installed here), so the two fields are set after construction
    peft_config = to_peft_config(config)
    peft_config.init_lora_weights = "loftq"
    peft_config.loftq_config = {"loftq_bits": 4, "loftq_iter": num_iter}
    # PEFT's LoftQ dequantizes with bitsandbytes' native kernel, which is wrong on AVX512 CPUs for
    # this model's 32-wide rows (lora_lab.bnb_cpu): compare with its right, portable answer
    with bnb_cpu.portable_dequantize():
        theirs = get_peft_model(build_tiny("llama"), peft_config)
    _assert_same_init(ours, theirs, atol=1e-5)
    original = dict(build_tiny("llama").named_parameters())
    for name, layer in lora_layers(ours):
        q = layer.base_layer.weight
        # the new base is exactly representable in NF4: quantizing it again changes nothing
        packed, state = quantize_nf4(q)
        torch.testing.assert_close(dequantize_nf4(packed, state), q, atol=1e-6, rtol=0)
        # and Q + B A is closer to W than plain NF4 of W
        w = original[name + ".weight"]
        plain = dequantize_nf4(*quantize_nf4(w))
        assert (q + layer.delta_weight() - w).norm() < (plain - w).norm()
    _assert_forward_and_merge_equal(ours, theirs)


# ---------------------------------------------------------------------------- DoRA


@pytest.mark.parametrize("rslora", [False, True])
def test_dora_equal_peft(rslora):
    config = _config(rslora=rslora)
    ours = add_dora(build_tiny("llama"), config)
    theirs = get_peft_model(build_tiny("llama"), to_peft_config(config, use_dora=True))
    _assert_same_init(ours, theirs, atol=0)
    peft_layers = _peft_lora_layers(theirs)
    for name, layer in lora_layers(ours):
        assert isinstance(layer, DoRALinear)
        m = layer.lora_magnitude_vector
        torch.testing.assert_close(
            m, peft_layers[name].lora_magnitude_vector["default"].weight, atol=0, rtol=0
        )
        torch.testing.assert_close(m, layer.base_layer.weight.norm(dim=1))  # B = 0: the row norms of W
    _assert_forward_and_merge_equal(ours, theirs)


def test_dora_train_mode_dropout_backward_and_unmerge():
    config = LoRAConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
    ours = add_dora(build_tiny("llama"), config)
    theirs = get_peft_model(build_tiny("llama"), to_peft_config(config, use_dora=True))
    _simulate_training(ours, theirs)
    ids = tiny_inputs(ours)
    ours.train(), theirs.train()
    torch.manual_seed(5)
    loss_ours = ours(ids, labels=ids).loss
    torch.manual_seed(5)
    loss_peft = theirs(ids, labels=ids).loss
    torch.testing.assert_close(loss_ours, loss_peft, atol=ATOL, rtol=1e-5)  # same dropout masks, same math
    loss_ours.backward()
    loss_peft.backward()
    peft_layers = _peft_lora_layers(theirs)
    for name, layer in lora_layers(ours):
        p = peft_layers[name]
        torch.testing.assert_close(
            layer.lora_magnitude_vector.grad,
            p.lora_magnitude_vector["default"].weight.grad,
            atol=1e-6,
            rtol=1e-4,
        )
        torch.testing.assert_close(
            layer.lora_B.weight.grad, p.lora_B["default"].weight.grad, atol=1e-6, rtol=1e-4
        )
    ours.eval()
    layer = dict(lora_layers(ours))["model.layers.0.self_attn.q_proj"]
    before = layer.base_layer.weight.clone()
    layer.merge()
    assert not torch.allclose(layer.base_layer.weight, before)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, before, atol=1e-6, rtol=1e-5)


def test_dora_on_gpt2_conv1d_merges_to_its_forward():
    config = LoRAConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS["gpt2"])
    ours = add_dora(build_tiny("gpt2"), config)
    _simulate_training(ours)
    ids = tiny_inputs(ours)
    logits = _logits(ours, ids)
    torch.testing.assert_close(_logits(merge_and_unload(ours), ids), logits, atol=ATOL, rtol=1e-4)


# ---------------------------------------------------------------------------- LoRA-Null


def test_lora_null_directions_are_orthogonal_to_the_inputs():
    """A's rows lie in the r least-used input directions; with fewer tokens than in - r, X A^T = 0."""
    config = _config(r=R)
    ours = _ours(config)
    batches = _calibration(n=2, seq=12)  # 24 tokens: down_proj's 64-dim inputs span <= 24 dims
    covs = collect_input_covariances(ours, batches)
    inputs = {}
    handles = [
        layer.base_layer.register_forward_hook(lambda m, a, o, n=name: inputs.setdefault(n, []).append(a[0]))
        for name, layer in lora_layers(ours)
    ]
    with torch.no_grad():
        for b in batches:
            ours(b)
    for h in handles:
        h.remove()
    ids = tiny_inputs(ours)
    before = _logits(ours, ids)
    init_variant(ours, "lora-null", calibration=batches)
    torch.testing.assert_close(_logits(ours, ids), before, atol=ATOL, rtol=1e-4)  # output kept
    for name, layer in lora_layers(ours):
        assert layer.variant == "lora-null" and layer.base_rewritten
        A = layer.lora_A.weight  # [r, in]
        eigvecs = torch.linalg.svd(covs[name])[0]  # columns by decreasing input energy
        principal = eigvecs[:, : layer.in_features - layer.r]
        # the defining property: every direction of A is orthogonal to the principal span of the inputs
        assert (A @ principal).norm() <= 1e-5 * A.norm()
        x = torch.cat(inputs[name]).reshape(-1, layer.in_features)  # [tokens, in]
        energy = (x @ A.t()).norm() / (x.norm() * A.norm())
        if x.shape[0] <= layer.in_features - layer.r:  # an exact null space exists (down_proj here)
            assert energy < 1e-4
        else:  # the r least-used directions carry a small share of the input energy
            assert energy < 0.3 * math.sqrt(layer.r / layer.in_features)


def test_lora_null_b_changes_nothing_on_calibration_inputs():
    """Where A x = 0, training B cannot change the layer's output on the calibration data."""
    config = _config(targets=["down_proj"])
    ours = _ours(config)
    batches = _calibration(n=2, seq=12)
    cov = collect_input_covariances(ours, batches)
    name, layer = next(iter(lora_layers(ours)))
    seen = []
    handle = layer.base_layer.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    with torch.no_grad():
        ours(batches[0])
    handle.remove()
    x = seen[0]
    with torch.no_grad():
        before = layer(x)
        lora_null_init(layer, cov[name])
        layer.lora_B.weight += torch.randn_like(layer.lora_B.weight)
        torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------- conversion to plain LoRA


@pytest.mark.parametrize(
    "method, rslora",
    [
        ("olora", False),
        ("pissa", False),
        ("pissa", True),
        ("corda-ipm", False),
        ("corda-kpm", True),
        ("lora-null", False),
    ],
)
def test_converted_adapter_loads_in_peft_and_reproduces_outputs(method, rslora, tmp_path):
    config = _config(rslora=rslora)
    ours = init_variant(_ours(config), method, calibration=_calibration())
    _simulate_training(ours)
    ids = tiny_inputs(ours)
    trained = _logits(ours, ids)
    to_plain_lora(ours)
    for _, layer in lora_layers(ours):
        assert layer.r == 2 * R and not layer.base_rewritten
        assert layer.lora_alpha == pytest.approx(ALPHA * (math.sqrt(2) if rslora else 2))
        assert layer.scaling == pytest.approx(ALPHA / (math.sqrt(R) if rslora else R))
    assert ours.lora_config.r == 2 * R and ours.lora_config.init_lora_weights is True
    torch.testing.assert_close(_logits(ours, ids), trained, atol=ATOL, rtol=1e-4)
    # the base weights are the original ones again (up to float rounding)
    original = build_tiny("llama").state_dict()
    for name, layer in lora_layers(ours):
        torch.testing.assert_close(layer.base_layer.weight, original[name + ".weight"], atol=1e-5, rtol=1e-5)
    save_adapter(ours, tmp_path)
    loaded = PeftModel.from_pretrained(build_tiny("llama"), str(tmp_path))
    torch.testing.assert_close(_logits(loaded, ids), trained, atol=1e-4, rtol=1e-4)
    reloaded = load_adapter(build_tiny("llama"), tmp_path)
    torch.testing.assert_close(_logits(reloaded, ids), trained, atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:PiSSA changes the base weights")
def test_conversion_equals_peft_subtract_mutated_init(tmp_path):
    """PEFT's own route: save the initial PiSSA adapter, then save_pretrained(path_initial_model_...)."""
    config = _config()
    ours = init_variant(_ours(config), "pissa")
    theirs = get_peft_model(build_tiny("llama"), to_peft_config(config, init_lora_weights="pissa"))
    init_dir = tmp_path / "pissa_init"
    theirs.peft_config["default"].init_lora_weights = True  # as PEFT's docs do before saving the init
    theirs.save_pretrained(str(init_dir))
    theirs.peft_config["default"].init_lora_weights = "pissa"
    _simulate_training(ours, theirs)
    theirs.save_pretrained(
        str(tmp_path / "converted"), path_initial_model_for_weight_conversion=str(init_dir)
    )
    from safetensors.torch import load_file

    peft_sd = load_file(str(tmp_path / "converted" / "adapter_model.safetensors"))
    to_plain_lora(ours)
    for key, value in ours.state_dict().items():
        if "lora_" in key:
            torch.testing.assert_close(value, peft_sd["base_model.model." + key], atol=ATOL, rtol=1e-5)
    peft_cfg = LoraConfig.from_pretrained(str(tmp_path / "converted"))
    assert (peft_cfg.r, peft_cfg.lora_alpha) == (ours.lora_config.r, ours.lora_config.lora_alpha)


def test_to_plain_lora_refuses_loftq_and_plain_lora_unchanged():
    ours = init_variant(_ours(_config(alpha=R)), "loftq")
    snapshot = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match="LoftQ"):
        to_plain_lora(ours)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, snapshot[k])
    with pytest.raises(ValueError, match="no recorded initial adapter"):
        to_plain_lora(_ours(_config()))


def test_variant_inits_reject_bad_input():
    ours = _ours(_config())
    layer = dict(lora_layers(ours))["model.layers.0.self_attn.q_proj"]
    with pytest.raises(TypeError, match="LoRALinear"):
        pissa_init(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="unknown method"):
        init_variant(ours, "svd")
    with pytest.raises(ValueError, match="calibration"):
        init_variant(ours, "corda-ipm")
    with pytest.raises(ValueError, match="covariance"):
        lora_null_init(layer, torch.eye(3))
    before = layer.base_layer.weight.clone()
    olora_init(layer)
    with pytest.raises(ValueError, match="already initialised"):
        pissa_init(layer)
    assert not torch.equal(layer.base_layer.weight, before)
    assert isinstance(layer, LoRALinear)


# ---------------------------------------------------------------------------- saving DoRA and LoftQ


def test_dora_saves_in_peft_format_and_reloads(tmp_path):
    config = _config()
    ours = add_dora(build_tiny("llama"), config)
    _simulate_training(ours)
    ids = tiny_inputs(ours)
    trained = _logits(ours, ids)
    save_dora_adapter(ours, tmp_path)
    loaded = PeftModel.from_pretrained(build_tiny("llama"), str(tmp_path))
    assert loaded.peft_config["default"].use_dora
    torch.testing.assert_close(_logits(loaded, ids), trained, atol=ATOL, rtol=1e-4)
    reloaded = load_dora_adapter(build_tiny("llama"), tmp_path)
    torch.testing.assert_close(_logits(reloaded, ids), trained, atol=ATOL, rtol=1e-4)
    save_adapter(_ours(config), tmp_path / "plain")
    with pytest.raises(ValueError, match="not a DoRA adapter"):
        load_dora_adapter(build_tiny("llama"), tmp_path / "plain")


def test_loftq_adapter_saves_and_reloads_on_its_quantized_base(tmp_path):
    """A LoftQ adapter is an ordinary LoRA file, but it belongs to the base Q it was fitted with."""
    ours = init_variant(_ours(_config(alpha=R)), "loftq", num_iter=2)
    _simulate_training(ours)
    ids = tiny_inputs(ours)
    trained = _logits(ours, ids)
    save_adapter(ours, tmp_path)
    q_weights = {
        name + ".weight": layer.base_layer.weight.detach().clone() for name, layer in lora_layers(ours)
    }

    def quantized_base():
        model = build_tiny("llama")
        model.load_state_dict(q_weights, strict=False)
        return model

    torch.testing.assert_close(
        _logits(load_adapter(quantized_base(), tmp_path), ids), trained, atol=ATOL, rtol=1e-4
    )
    loaded = PeftModel.from_pretrained(quantized_base(), str(tmp_path))
    torch.testing.assert_close(_logits(loaded, ids), trained, atol=ATOL, rtol=1e-4)
    # on the original (unquantized) base the same file gives another model
    assert (_logits(load_adapter(build_tiny("llama"), tmp_path), ids) - trained).abs().max() > 1e-3


def test_init_variant_checks_every_layer_before_changing_any():
    """q_proj ([32, 32]) could take r=20 but k_proj ([16, 32]) cannot: nothing may change.

    add_lora itself refuses r=20 on k_proj, so k_proj is wrapped by hand to reach init_variant's check.
    """
    ours = _ours(LoRAConfig(r=20, lora_alpha=20, target_modules=["q_proj"]))
    for name in [n for n, _ in ours.named_modules() if n.endswith("k_proj")]:
        ours.set_submodule(name, LoRALinear(ours.get_submodule(name), r=20, lora_alpha=20))
    snapshot = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match="r=20 is larger than the 16 components"):
        init_variant(ours, "pissa")
    for k, v in ours.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    assert all(getattr(layer, "variant", None) is None for _, layer in lora_layers(ours))
