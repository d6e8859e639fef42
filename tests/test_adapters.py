"""Adapter files: lora_lab <-> PEFT in both directions, same keys and config, and bad files."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import (
    PATTERNS,
    TARGETS,
    assert_inference_like_peft,
    build_tiny,
    copy_lora_into_peft,
    lora_configs,
    tiny_inputs,
    to_peft_config,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from safetensors import safe_open

from lora_lab.adapters import (
    CONFIG_NAME,
    PICKLE_WEIGHTS_NAME,
    WEIGHTS_NAME,
    load_adapter,
    read_adapter,
    save_adapter,
    split_peft_key,
)
from lora_lab.inject import LoRAConfig, add_lora, lora_layers
from lora_lab.merge import merge_adapters
from lora_lab.paths import REPO_ROOT


def _trained(kind="llama", **kwargs):
    """A tiny model with a non-zero adapter (init_lora_weights=False: random A and B)."""
    args = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS[kind], "init_lora_weights": False} | kwargs
    config = LoRAConfig(**args)
    torch.manual_seed(3)
    return add_lora(build_tiny(kind), config), config


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _files_digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _model_digest(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [type(m) for m in model.modules()],
        {k: p.requires_grad for k, p in model.named_parameters()},
    )


def _assert_same_model(model, digest):
    sd, types, grads = digest
    now = model.state_dict()
    assert set(now) == set(sd) and all(torch.equal(now[k], v) for k, v in sd.items())
    assert [type(m) for m in model.modules()] == types
    assert {k: p.requires_grad for k, p in model.named_parameters()} == grads


@pytest.mark.parametrize("extra", [{}, {"use_rslora": True, "target_modules": "all-linear"}])
def test_lora_lab_adapter_loads_in_peft_with_identical_outputs(tiny_kind, extra, tmp_path):
    ours, config = _trained(tiny_kind, **extra)
    save_adapter(ours, tmp_path, base_model_name_or_path="tiny")
    ids = tiny_inputs(ours)
    theirs = PeftModel.from_pretrained(build_tiny(tiny_kind), tmp_path).eval()
    assert torch.equal(_logits(ours, ids), _logits(theirs, ids))
    # and back into lora_lab
    again = load_adapter(build_tiny(tiny_kind), tmp_path)
    assert torch.equal(_logits(again, ids), _logits(ours, ids))


def test_peft_adapter_loads_in_lora_lab_with_identical_outputs(tiny_kind, tmp_path):
    config = LoRAConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(11)
    theirs = get_peft_model(build_tiny(tiny_kind), to_peft_config(config)).eval()
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(build_tiny(tiny_kind), tmp_path)
    ids = tiny_inputs(ours)
    assert torch.equal(_logits(ours, ids), _logits(theirs, ids))
    assert not any(p.requires_grad for p in ours.parameters())  # frozen, as PEFT loads it
    assert load_adapter(build_tiny(tiny_kind), tmp_path, is_trainable=True).lora_config.r == 4


def test_same_file_keys_metadata_and_config_as_peft(tiny_kind, tmp_path):
    ours, config = _trained(tiny_kind, lora_dropout=0.05)
    theirs = get_peft_model(build_tiny(tiny_kind), to_peft_config(config))
    copy_lora_into_peft(ours, theirs)
    save_adapter(ours, tmp_path / "ours", base_model_name_or_path="tiny")
    theirs.save_pretrained(tmp_path / "peft")
    files = {}
    for who in ("ours", "peft"):
        with safe_open(tmp_path / who / WEIGHTS_NAME, "pt") as f:
            files[who] = (f.metadata(), {k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    assert files["ours"][0] == files["peft"][0] == {"format": "pt"}
    assert set(files["ours"][1]) == set(files["peft"][1])
    assert all(torch.equal(files["ours"][1][k], files["peft"][1][k]) for k in files["ours"][1])
    ours_cfg = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    peft_cfg = json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())
    for key, value in ours_cfg.items():
        if key == "target_modules":
            assert sorted(value) == sorted(peft_cfg[key])
        elif key != "base_model_name_or_path":
            assert value == peft_cfg[key], key
    text = (tmp_path / "ours" / CONFIG_NAME).read_text()
    assert text == json.dumps(ours_cfg, indent=2, sort_keys=True)  # PEFT's layout


def test_all_linear_is_written_as_names(tmp_path):
    ours, _ = _trained("gpt2", target_modules="all-linear")
    save_adapter(ours, tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["target_modules"] == ["c_attn", "c_fc", "c_proj"]
    assert cfg["fan_in_fan_out"] is True
    config, tensors = read_adapter(tmp_path)
    assert config["r"] == 4 and len(tensors) == 2 * 8
    assert split_peft_key(next(iter(tensors)))[1] in ("lora_A", "lora_B")


def test_load_into_a_model_that_already_has_the_layers(tmp_path):
    ours, _ = _trained("opt")
    save_adapter(ours, tmp_path)
    other, _ = _trained("opt", lora_alpha=32)  # same layers and rank, different alpha
    with torch.no_grad():
        for _, layer in lora_layers(other):
            layer.lora_A.weight.zero_()
    load_adapter(other, tmp_path)
    ids = tiny_inputs(ours)
    assert torch.equal(_logits(other, ids), _logits(ours, ids))


def test_pickle_bin_is_refused_unless_opted_in(tmp_path):
    ours, _ = _trained("llama")
    save_adapter(ours, tmp_path)
    tensors = read_adapter(tmp_path)[1]
    (tmp_path / WEIGHTS_NAME).unlink()
    torch.save(tensors, tmp_path / PICKLE_WEIGHTS_NAME)
    base = build_tiny("llama")
    digest = _model_digest(base)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load_adapter(base, tmp_path)
    _assert_same_model(base, digest)
    loaded = load_adapter(base, tmp_path, allow_pickle=True)
    ids = tiny_inputs(ours)
    assert torch.equal(_logits(loaded, ids), _logits(ours, ids))


def test_pickle_with_code_is_refused_even_when_opted_in(tmp_path):
    ours, _ = _trained("llama")
    save_adapter(ours, tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    torch.save({"x": shutil.rmtree}, tmp_path / PICKLE_WEIGHTS_NAME)  # a callable, not a tensor
    with pytest.raises(ValueError, match="could not be read safely"):
        read_adapter(tmp_path, allow_pickle=True)


def test_adapter_for_another_base_names_layer_and_shapes(tmp_path):
    ours, _ = _trained("llama")
    save_adapter(ours, tmp_path)
    before = _files_digest(tmp_path)
    wider = build_tiny("llama", hidden_size=48)
    digest = _model_digest(wider)
    with pytest.raises(
        ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.lora_A has shape \[4, 32\]"
    ) as info:
        load_adapter(wider, tmp_path)
    assert "[4, 48]" in str(info.value)
    _assert_same_model(wider, digest)
    assert _files_digest(tmp_path) == before


def test_adapter_with_other_targets_is_refused(tmp_path):
    ours, _ = _trained("llama", target_modules=["q_proj", "v_proj"])
    save_adapter(ours, tmp_path)
    model, _ = _trained("llama", target_modules=["q_proj"])
    digest = _model_digest(model)
    with pytest.raises(ValueError, match="not a LoRA target in this model"):
        load_adapter(model, tmp_path)
    _assert_same_model(model, digest)
    gpt2 = build_tiny("gpt2")
    digest = _model_digest(gpt2)
    with pytest.raises(ValueError, match="does not fit this model"):
        load_adapter(gpt2, tmp_path)
    _assert_same_model(gpt2, digest)


def _corrupt_truncate(folder):
    data = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])


def _corrupt_garbage(folder):
    (folder / WEIGHTS_NAME).write_bytes(b"\xff" * 64)


def _corrupt_header(folder):
    data = bytearray((folder / WEIGHTS_NAME).read_bytes())
    data[8:20] = b"not json!!!!"
    (folder / WEIGHTS_NAME).write_bytes(bytes(data))


def _corrupt_json(folder):
    text = (folder / CONFIG_NAME).read_text()
    (folder / CONFIG_NAME).write_text(text[: len(text) // 2])


def _json_not_lora(folder):
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps(cfg | {"peft_type": "IA3"}))


def _json_dora(folder):
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps(cfg | {"use_dora": True}))


def _json_bad_r(folder):
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps(cfg | {"r": 0}))


def _missing_weights(folder):
    (folder / WEIGHTS_NAME).unlink()


def _missing_config(folder):
    (folder / CONFIG_NAME).unlink()


def _missing_tensor(folder):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / WEIGHTS_NAME)
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "damage, error, match",
    [
        (_corrupt_truncate, ValueError, "truncated or corrupted"),
        (_corrupt_garbage, ValueError, "truncated or corrupted"),
        (_corrupt_header, ValueError, "truncated or corrupted"),
        (_corrupt_json, ValueError, "not valid JSON"),
        (_json_not_lora, ValueError, "peft_type"),
        (_json_dora, ValueError, "use_dora"),
        (_json_bad_r, ValueError, "positive integer"),
        (_missing_weights, FileNotFoundError, "weights are missing"),
        (_missing_config, FileNotFoundError, "adapter_config.json is missing"),
        (_missing_tensor, ValueError, "lacks lora_A/lora_B"),
    ],
)
def test_bad_adapter_files_give_clear_errors_and_change_nothing(damage, error, match, tmp_path):
    ours, _ = _trained("llama")
    save_adapter(ours, tmp_path)
    damage(tmp_path)
    files = _files_digest(tmp_path)
    _assert_refused_without_change(tmp_path, error, match)
    assert _files_digest(tmp_path) == files


def _assert_refused_without_change(path, error, match):
    """load_adapter(path) raises `error` for a fresh base and for a model with LoRA, changing neither."""
    for model in (build_tiny("llama"), _trained("llama")[0]):
        digest = _model_digest(model)
        with pytest.raises(error, match=match):
            load_adapter(model, path)
        _assert_same_model(model, digest)


def _edit_config(folder, **changes):
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps(cfg | changes))
    return folder


def _edit_first_tensor(folder, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / WEIGHTS_NAME)
    key = sorted(tensors)[0]
    tensors[key] = edit(tensors[key].clone())
    save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    return folder


def _set_one(value):
    def edit(t):
        t.view(-1)[3] = value
        return t

    return edit


def _staging_copy(folder):
    staging = folder.parent / f".{folder.name}.lora-lab-saving-1-abcd"
    shutil.copytree(folder, staging)
    return staging


# (what to do to a saved adapter folder -> the path to load, expected error, message fragment)
BAD_ADAPTER_PATHS = {
    "nan_in_a_tensor": (
        lambda f: _edit_first_tensor(f, _set_one(float("nan"))),
        ValueError,
        "1 NaN/inf value",
    ),
    "inf_in_a_tensor": (lambda f: _edit_first_tensor(f, _set_one(float("inf"))), ValueError, "diverged"),
    "int_tensor": (lambda f: _edit_first_tensor(f, lambda t: t.long()), ValueError, "not a float tensor"),
    "3d_tensor": (lambda f: _edit_first_tensor(f, lambda t: t[None]), ValueError, "must be 2-D"),
    "config_r_8_tensors_r_4": (
        lambda f: _edit_config(f, r=8, lora_alpha=16),
        ValueError,
        r"rank-4 tensors .* says r=8",
    ),
    "alpha_inf": (lambda f: _edit_config(f, lora_alpha=float("inf")), ValueError, "positive finite number"),
    "rank_pattern_zero": (
        lambda f: _edit_config(f, rank_pattern={"q_proj": 0}),
        ValueError,
        r"rank_pattern\['q_proj'\]",
    ),
    "rank_pattern_list": (
        lambda f: _edit_config(f, rank_pattern=["q_proj"]),
        ValueError,
        "rank_pattern must be a dict",
    ),
    "path_to_weights_file": (
        lambda f: f / WEIGHTS_NAME,
        FileNotFoundError,
        "is a file.*pass the folder that holds it",
    ),
    "path_to_config_file": (
        lambda f: f / CONFIG_NAME,
        FileNotFoundError,
        "is a file.*pass the folder that holds it",
    ),
    "leftover_of_a_killed_save": (_staging_copy, ValueError, "interrupted save_adapter"),
    "path_is_none": (lambda f: None, TypeError, "must be a folder path"),
}


@pytest.mark.parametrize(
    "damage, error, match", list(BAD_ADAPTER_PATHS.values()), ids=list(BAD_ADAPTER_PATHS)
)
def test_bad_adapter_paths_and_values_are_refused_and_change_nothing(damage, error, match, tmp_path):
    folder = tmp_path / "adapter"
    save_adapter(_trained("llama")[0], folder)
    path = damage(folder)
    files = _files_digest(folder)
    _assert_refused_without_change(path, error, match)
    assert _files_digest(folder) == files


def test_save_into_the_working_directory_is_refused(tmp_path, monkeypatch):
    """A save replaces the whole folder; the folder the process runs in cannot be swapped away."""
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="current working directory.*save into a subfolder"):
        save_adapter(_trained("llama")[0], ".")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(build_tiny("llama"), tmp_path / "nope")


def test_save_refuses_merged_model_file_path_and_plain_model(tmp_path):
    ours, _ = _trained("llama")
    merge_adapters(ours)
    with pytest.raises(ValueError, match="unmerge_adapters"):
        save_adapter(ours, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    ours, _ = _trained("llama")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        save_adapter(ours, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"
    with pytest.raises(ValueError, match="no LoRAConfig"):
        save_adapter(build_tiny("llama"), tmp_path / "b")


def test_bundled_model_round_trip_with_peft(tmp_path):
    base = build_tiny("tiny-base")  # skips if data/models/tiny-base is not there yet
    config = LoRAConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(0)
    ours = add_lora(base, config)
    save_adapter(ours, tmp_path)
    theirs = PeftModel.from_pretrained(build_tiny("tiny-base"), tmp_path).eval()
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    assert (_logits(ours, ids) - _logits(theirs, ids)).abs().max().item() <= 1e-6
    # The bundled base is named relative to the repository, not by this machine's path.
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == "data/models/tiny-base"


def test_committed_adapters_name_no_machine_path():
    for config_file in sorted((REPO_ROOT / "data" / "adapters").glob("*/adapter_config.json")):
        name = json.loads(config_file.read_text())["base_model_name_or_path"]
        assert not Path(name).is_absolute(), f"{config_file} names the base by an absolute path: {name}"


@pytest.mark.parametrize("start", ["fresh-eval", "fresh-train", "has-lora"])
def test_adapter_saved_with_dropout_loads_for_inference_like_peft(dropout_adapter_dir, start):
    """lora_dropout=0.1 in the file: loading for inference is deterministic and equals from_pretrained."""
    model = _trained("llama", lora_dropout=0.1)[0] if start == "has-lora" else build_tiny("llama")
    model.train(start != "fresh-eval")
    ours = load_adapter(model, dropout_adapter_dir)
    assert not ours.training and not any(m.training for m in ours.modules())
    theirs = PeftModel.from_pretrained(build_tiny("llama").train(), dropout_adapter_dir)
    assert_inference_like_peft(ours, theirs, tiny_inputs(ours, batch=3, seq=12))


def _save_forever(models, folder):
    """Child process: save the two adapters into one folder in turn until killed."""
    while True:
        for model in models:
            save_adapter(model, folder)


def test_a_save_killed_at_any_moment_leaves_the_old_or_the_new_adapter(tmp_path):
    """Real SIGKILLs during a save loop: the folder is always one whole adapter, never a mix."""
    import multiprocessing
    import os
    import random
    import signal
    import time

    models = [_trained("llama")[0], _trained("llama", lora_alpha=32, r=2)[0]]
    references = []
    for i, model in enumerate(models):
        save_adapter(model, tmp_path / f"ref{i}")
        references.append(_files_digest(tmp_path / f"ref{i}"))
    folder = tmp_path / "adapter"
    save_adapter(models[0], folder)
    (folder / "README.md").write_text("kept")  # a file of the user's: carried over by every save
    rng, seen, kills, interrupted, deadline = random.Random(0), [], 0, 0, time.monotonic() + 5
    while kills < 30 and time.monotonic() < deadline:
        kills += 1
        child = multiprocessing.get_context("fork").Process(target=_save_forever, args=(models, folder))
        child.start()
        time.sleep(rng.uniform(0.02, 0.15))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        digest = _files_digest(folder)
        assert digest.pop("README.md") == hashlib.sha256(b"kept").hexdigest()
        assert digest in references, sorted(digest)
        seen.append(references.index(digest))
        loaded = load_adapter(build_tiny("llama"), folder)
        assert loaded.lora_config.lora_alpha == (8, 32)[references.index(digest)]
        leftovers = list(tmp_path.glob(".adapter.lora-lab-*"))  # what the kill left beside it
        interrupted += bool(leftovers)
        for leftover in leftovers:
            with pytest.raises(ValueError, match="interrupted save_adapter"):
                read_adapter(leftover)
    print(f"{kills} kills: {seen.count(0)} old, {seen.count(1)} new, {interrupted} during a save")
    assert set(seen) == {0, 1}  # the kills did land during saves
    save_adapter(models[1], folder)  # the next save removes what killed saves left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "ref0", "ref1"]


@pytest.mark.parametrize("use_rslora", [False, True])
def test_rank_and_alpha_patterns_round_trip_with_peft(tmp_path, use_rslora):
    """PEFT writes rank_pattern / alpha_pattern -> lora_lab loads it equal to from_pretrained -> lora_lab
    saves it -> PEFT loads that equal again, with the same patterns in adapter_config.json."""
    torch.manual_seed(7)
    peft_config = to_peft_config(
        LoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS["llama"], init_lora_weights=False),
        use_rslora=use_rslora,
        **PATTERNS,
    )
    get_peft_model(build_tiny("llama"), peft_config).save_pretrained(tmp_path / "peft")
    ours = load_adapter(build_tiny("llama"), tmp_path / "peft")
    layers = dict(lora_layers(ours))
    assert (
        layers["model.layers.0.self_attn.v_proj"].r == 2 and layers["model.layers.1.self_attn.q_proj"].r == 8
    )
    assert layers["model.layers.0.self_attn.q_proj"].lora_alpha == 32
    ids = tiny_inputs(ours, batch=2, seq=10)
    theirs = PeftModel.from_pretrained(build_tiny("llama"), tmp_path / "peft")
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=1e-6, rtol=0)
    save_adapter(ours, tmp_path / "ours")
    back = PeftModel.from_pretrained(build_tiny("llama"), tmp_path / "ours")
    torch.testing.assert_close(_logits(back, ids), _logits(theirs, ids), atol=1e-6, rtol=0)
    written = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    assert {k: written[k] for k in PATTERNS} == PATTERNS


def test_add_lora_with_patterns_saves_what_peft_builds(tmp_path):
    """add_lora with rank_pattern / alpha_pattern builds the layers PEFT builds; the saved file loads in PEFT."""
    config = LoRAConfig(
        r=4, lora_alpha=8, target_modules=TARGETS["llama"], init_lora_weights=False, **PATTERNS
    )
    torch.manual_seed(8)
    ours = add_lora(build_tiny("llama"), config)
    theirs = get_peft_model(build_tiny("llama"), to_peft_config(config, **PATTERNS))
    assert copy_lora_into_peft(ours, theirs) == 2 * 14  # same names and shapes everywhere
    save_adapter(ours, tmp_path)
    ids = tiny_inputs(ours)
    loaded = PeftModel.from_pretrained(build_tiny("llama"), tmp_path)
    torch.testing.assert_close(_logits(loaded, ids), _logits(theirs.eval(), ids), atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(ours, ids), _logits(loaded, ids), atol=1e-6, rtol=0)


@settings(max_examples=10, deadline=None)
@given(config=lora_configs(), seed=st.integers(0, 1000))
def test_save_then_load_gives_back_the_same_adapter(config, seed):
    """Property: any adapter saved and loaded into a fresh base has the same tensors, ranks, scalings and
    logits (eval mode, so dropout never matters)."""
    import tempfile

    torch.manual_seed(seed)
    ours = add_lora(build_tiny("llama"), config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(ours, tmp)
        loaded = load_adapter(build_tiny("llama"), tmp)
    mine, theirs = dict(lora_layers(ours)), dict(lora_layers(loaded))
    assert mine.keys() == theirs.keys()
    for name, layer in mine.items():
        other = theirs[name]
        assert (other.r, other.scaling) == (layer.r, layer.scaling)
        assert torch.equal(other.lora_A.weight, layer.lora_A.weight) and torch.equal(
            other.lora_B.weight, layer.lora_B.weight
        )
    ids = tiny_inputs(ours)
    assert torch.equal(_logits(loaded, ids), _logits(ours, ids))
