"""Save and load LoRA adapters in PEFT's file format ("shipping the patch").

An adapter is a folder of two files, exactly as PEFT writes them:

    adapter_config.json          r, lora_alpha, target_modules, ... (json, indent=2, sorted keys)
    adapter_model.safetensors    base_model.model.<layer>.lora_A.weight  [r, in]
                                 base_model.model.<layer>.lora_B.weight  [out, r]

so a folder saved here loads with `peft.PeftModel.from_pretrained` (and vLLM's LoRA loader),
and a folder PEFT saved loads here. It holds only the patch: megabytes next to a base model
of gigabytes.

    save_adapter(model, "out/sql-adapter", base_model_name_or_path="data/models/tiny-base")
    model = load_adapter(base_model, "out/sql-adapter")    # injects LoRA if needed, loads A and B
    config, tensors = read_adapter("out/sql-adapter")      # the raw contents, for other tools

Loading checks everything (files, config, every tensor name and shape) before it changes the
model, so an error leaves the model as it was. Pickle files (`adapter_model.bin`) can run code
when loaded: they are refused unless `allow_pickle=True`, and then read with
`torch.load(weights_only=True)`.

Per-layer ranks and alphas (`rank_pattern` / `alpha_pattern`, as PEFT writes them) load and save.

Left out: several adapters per folder or per model (registries and switching build on
`read_adapter`), DoRA magnitudes, embedding LoRA, `modules_to_save`.

References: PEFT `utils/save_and_load.py` (`get_peft_model_state_dict`, `load_peft_weights`),
`config.py` (`PeftConfigMixin.save_pretrained`), `utils/constants.py` (file names);
the safetensors format (https://github.com/huggingface/safetensors).
"""

from __future__ import annotations

import errno
import glob
import json
import os
import secrets
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lora_lab.inject import LoRAConfig, add_lora, has_lora, lora_layers, resolve_target_modules
from lora_lab.layers import base_in_out_features, lora_scaling
from lora_lab.paths import REPO_ROOT

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "PICKLE_WEIGHTS_NAME",
    "PEFT_PREFIX",
    "save_adapter",
    "plan_load",
    "check_file_rank",
    "load_adapter",
    "read_adapter",
    "adapter_state_dict",
    "adapter_config_dict",
    "config_from_dict",
    "split_peft_key",
    "check_lora_tensor",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> your model: two wrappers' attribute names


# ---------------------------------------------------------------------------- names and config


def split_peft_key(key: str) -> tuple[str, str]:
    """`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` -> (`model.layers.0.self_attn.q_proj`, `lora_A`).

    ValueError for a key that is not a plain LoRA A/B weight (DoRA, embeddings, modules_to_save...).
    """
    name = key.removeprefix(PEFT_PREFIX)
    for part in ("lora_A", "lora_B"):
        suffix = f".{part}.weight"
        if name.endswith(suffix) and name != suffix[1:]:
            return name[: -len(suffix)], part
    raise ValueError(
        f"adapter tensor {key!r} is not a LoRA A/B weight; lora_lab loads plain LoRA adapters only "
        "(no DoRA magnitudes, embedding LoRA, biases or modules_to_save)"
    )


def _targets_for_file(model: nn.Module, config: LoRAConfig, layer_names: list[str]) -> list[str] | str:
    """target_modules as written to the file: short names when they select exactly these layers.

    "all-linear" is resolved (as PEFT does) because its meaning depends on the model; a regex is
    kept as it is; a list becomes sorted unique last name parts (e.g. ["q_proj", "v_proj"]) unless
    those would also catch other modules, in which case the full names are written.
    """
    targets = config.target_modules
    if isinstance(targets, str) and targets.lower() != "all-linear":
        return targets
    short = sorted({n.rsplit(".", 1)[-1] for n in layer_names})
    lora_names = set(layer_names)
    # module names as they were before add_lora: drop the insides of each LoRALinear
    names = [n for n, _ in model.named_modules() if n and not any(n.startswith(p + ".") for p in lora_names)]
    caught = {n for n in names if n in short or any(n.endswith("." + t) for t in short)}
    return short if caught == lora_names else sorted(layer_names)


def adapter_config_dict(
    config: LoRAConfig, target_modules: list[str] | str, fan_in_fan_out: bool, base_model_name_or_path=None
) -> dict:
    """The adapter_config.json content: PEFT's keys for a plain LoRA adapter, with PEFT's defaults."""
    return {
        "alpha_pattern": dict(config.alpha_pattern),
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": config.bias,
        "fan_in_fan_out": fan_in_fan_out,
        "inference_mode": True,
        "init_lora_weights": config.init_lora_weights,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": config.lora_alpha,
        "lora_bias": False,
        "lora_dropout": config.lora_dropout,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": config.r,
        "rank_pattern": dict(config.rank_pattern),
        "revision": None,
        "target_modules": target_modules,
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": config.use_rslora,
    }


# Config features lora_lab cannot reproduce: loading them would give different outputs than PEFT.
_UNSUPPORTED = {
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "modules_to_save": (None, []),
    "layers_to_transform": (None, []),
    "layer_replication": (None, []),
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
    "exclude_modules": (None, []),
}


def config_from_dict(config: dict, where: str = "adapter_config.json") -> LoRAConfig:
    """A LoRAConfig from the content of an adapter_config.json; ValueError for what lora_lab can't load."""
    if not isinstance(config, dict):
        raise ValueError(f"{where} must hold a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"{where} has peft_type={config.get('peft_type')!r}; lora_lab loads LoRA adapters (peft_type 'LORA')"
        )
    for key, allowed in _UNSUPPORTED.items():
        if key in config and config[key] not in allowed:
            raise ValueError(
                f"{where} sets {key}={config[key]!r}, which lora_lab does not support; load this adapter with "
                "PEFT instead"
            )
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise ValueError(
                f"{where} has no {key!r}; an adapter config needs r, lora_alpha and target_modules"
            )
    init = config.get("init_lora_weights", True)
    try:
        return LoRAConfig(
            r=config["r"],
            lora_alpha=config["lora_alpha"],
            lora_dropout=config.get("lora_dropout", 0.0),
            target_modules=config["target_modules"],
            use_rslora=config.get("use_rslora", False),
            init_lora_weights=init if init in (True, False, "gaussian") else True,  # A/B come from the file
            bias=config.get("bias", "none"),
            rank_pattern=config.get("rank_pattern") or {},
            alpha_pattern=config.get("alpha_pattern") or {},
        )
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where} is not a valid LoRA config: {err}") from None


# ---------------------------------------------------------------------------- saving


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{PEFT key: tensor} for every LoRA layer: the tensors an adapter file holds (contiguous, on CPU)."""
    tensors = {}
    for name, layer in lora_layers(model):
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().cpu().contiguous()
    return tensors


# A save writes the whole adapter into a hidden sibling folder, then swaps it in with one rename, so
# the folder is always entirely the old adapter or entirely the new one, even after a SIGKILL.
STAGING_MARK = ".lora-lab-saving-"  # .<folder>.lora-lab-saving-<pid>-<hex>: a save in progress
OLD_MARK = ".lora-lab-old-"  # .<folder>.lora-lab-old-<pid>-<hex>: the old folder while it is swapped out
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME)


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk (folders cannot be opened on some systems: skipped there)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _rename_exchange():
    """Linux renameat2(RENAME_EXCHANGE) (swaps two paths in one step), or None where it is missing."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError, ImportError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int

    def exchange(a: Path, b: Path) -> bool:
        at_fdcwd, rename_exchange = -100, 2
        if function(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # this file system cannot swap
            return False
        raise OSError(err, os.strerror(err), str(b))

    return exchange


_EXCHANGE = _rename_exchange()


def _sibling(folder: Path, mark: str) -> Path:
    return folder.parent / f".{folder.name}{mark}{os.getpid()}-{secrets.token_hex(4)}"


def _owner_alive(name: str, mark: str) -> bool:
    """Whether the process that made a staging/old folder (pid in its name) still runs."""
    try:
        pid = int(name.split(mark, 1)[1].split("-", 1)[0])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except (PermissionError, OSError):
        return True
    return pid != os.getpid()


def _clean_leftovers(folder: Path) -> None:
    """Remove what interrupted saves into `folder` left behind (their process is gone).

    An old folder that was swapped out but never replaced (only without renameat2) goes back.
    """
    prefix = f".{folder.name}"
    for path in sorted(folder.parent.glob(f"{glob.escape(prefix)}.lora-lab-*")):
        mark = STAGING_MARK if STAGING_MARK in path.name else OLD_MARK
        if mark not in path.name or _owner_alive(path.name, mark):
            continue
        if mark == OLD_MARK and not folder.exists():
            os.rename(path, folder)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # a hard link: no bytes copied
    except OSError:
        shutil.copy2(src, dst)


def _write_adapter_folder(folder: Path, tensors: dict[str, torch.Tensor], content: dict) -> Path:
    """Write an adapter folder so that it changes as one unit (see STAGING_MARK); returns the folder.

    Files in an existing folder other than the adapter's own (a README, metrics.json, subfolders)
    are carried over as hard links. On Linux the swap is one renameat2(RENAME_EXCHANGE); elsewhere
    two renames, where an interruption between them leaves the old folder under OLD_MARK, put back
    by the next save.
    """
    folder = folder.resolve() if folder.is_symlink() else folder
    if Path.cwd().resolve().is_relative_to(folder.resolve()):
        raise ValueError(
            f"cannot save into {folder}: it is (or holds) the current working directory, and a save replaces "
            "the whole folder; save into a subfolder such as ./adapter"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(folder)
    staging = _sibling(folder, STAGING_MARK)
    try:
        if folder.is_dir():
            shutil.copytree(folder, staging, symlinks=True, copy_function=_link_or_copy,
                            ignore=lambda d, names: ADAPTER_FILES if Path(d) == folder else ())  # fmt: skip
        else:
            staging.mkdir()
        save_file(tensors, staging / WEIGHTS_NAME, metadata={"format": "pt"})
        text = json.dumps(content, indent=2, sort_keys=True)  # byte for byte how PEFT writes it
        (staging / CONFIG_NAME).write_text(text, encoding="utf-8")
        for path in (staging / WEIGHTS_NAME, staging / CONFIG_NAME, staging):
            _fsync(path)
        if not folder.exists():
            os.rename(staging, folder)
        elif _EXCHANGE is not None and _EXCHANGE(staging, folder):
            pass  # staging now holds the old folder
        else:
            old = _sibling(folder, OLD_MARK)
            os.rename(folder, old)
            os.rename(staging, folder)
            os.rename(old, staging)
        _fsync(folder.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _portable_model_path(name_or_path: str | None) -> str | None:
    """A base model inside this repository is named relative to it (`data/models/tiny-base`), not by
    this machine's absolute path, so a saved adapter reads the same on every machine."""
    if name_or_path is None:
        return None
    try:
        return Path(name_or_path).resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:  # a Hub id or a folder elsewhere: kept as given
        return name_or_path


def _adapter_files(
    model: nn.Module, config: LoRAConfig | None, base_model_name_or_path: str | None
) -> tuple[dict[str, torch.Tensor], dict]:
    """Check a model for saving; return (tensors, adapter_config.json content)."""
    config = config if config is not None else getattr(model, "lora_config", None)
    if not isinstance(config, LoRAConfig):
        raise ValueError("no LoRAConfig given and the model has none (add_lora stores it); pass config=...")
    config.validate()
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("this model has no LoRA layers to save; add_lora or load_adapter first")
    merged = [n for n, layer in layers if layer.merged]
    if merged:
        raise ValueError(
            f"LoRA layer {merged[0]} is merged into its base weight; unmerge_adapters(model) before saving "
            "(the saved A and B would otherwise be applied twice when loaded)"
        )
    wrong = [
        (n, layer.r, layer.lora_alpha, config.rank_alpha_for(n))
        for n, layer in layers
        if (layer.r, layer.lora_alpha) != config.rank_alpha_for(n)
    ]
    if wrong:
        n, r, alpha, (want_r, want_alpha) = wrong[0]
        raise ValueError(
            f"layer {n} has r={r}, lora_alpha={alpha} but the config says r={want_r}, "
            f"lora_alpha={want_alpha} for it; pass the config the model was built with (with its "
            "rank_pattern / alpha_pattern)"
        )
    if base_model_name_or_path is None:
        base_model_name_or_path = _portable_model_path(getattr(model, "name_or_path", None) or None)
    content = adapter_config_dict(
        config,
        _targets_for_file(model, config, [n for n, _ in layers]),
        fan_in_fan_out=any(layer.fan_in_fan_out for _, layer in layers),
        base_model_name_or_path=str(base_model_name_or_path) if base_model_name_or_path is not None else None,
    )
    return adapter_state_dict(model), content


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    config: LoRAConfig | None = None,
    base_model_name_or_path: str | None = None,
    *,
    extra_tensors=None,
    extra_config: dict | None = None,
) -> Path:
    """Write the model's LoRA weights and config to `path/` in PEFT's format; returns the folder.

    config defaults to the one add_lora stored (`model.lora_config`). base_model_name_or_path
    defaults to `model.name_or_path` as PEFT does (None if the model has none). The folder changes
    as one unit: an interrupted save leaves it entirely old or entirely new, never mixed.
    `extra_tensors(model)` (a dict of file keys to tensors) and `extra_config` add what a variant
    stores beside A and B (DoRA's magnitude vectors and `"use_dora": true`, see `lora_lab.dora`).
    """
    folder = _save_target(path)
    tensors, content = _adapter_files(model, config, base_model_name_or_path)
    tensors.update(extra_tensors(model) if extra_tensors is not None else {})
    content.update(extra_config or {})
    return _write_adapter_folder(folder, tensors, content)


def _save_target(path: str | os.PathLike) -> Path:
    """The folder to save into; FileExistsError if a file is in the way."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder; an adapter is saved as a folder")
    return folder


# ---------------------------------------------------------------------------- reading and loading


def _adapter_folder(path) -> Path:
    """The adapter folder `path` names, or a FileNotFoundError/ValueError that says what to pass."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a folder path (str or Path), got {type(path).__name__}")
    folder = Path(path)
    if folder.is_file():
        hint = (
            f"pass the folder that holds it: {folder.parent}"
            if folder.name in ADAPTER_FILES
            else f"pass the folder that holds {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
        raise FileNotFoundError(f"{folder} is a file, but an adapter is a folder; {hint}")
    if STAGING_MARK in folder.name or OLD_MARK in folder.name:
        raise ValueError(
            f"{folder} is a temporary folder of an interrupted save_adapter, not an adapter; load the folder "
            "it was saving to (the next save into that folder removes this one)"
        )
    if not folder.is_dir():
        raise FileNotFoundError(
            f"adapter folder {folder} does not exist (expected {CONFIG_NAME} and {WEIGHTS_NAME})"
        )
    return folder


def read_adapter(path: str | os.PathLike, allow_pickle: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, {PEFT key: tensor}) of an adapter folder, checked but not applied to any model.

    Prefers adapter_model.safetensors; falls back to adapter_model.bin only with allow_pickle=True.
    Raises FileNotFoundError for missing files and ValueError for truncated or corrupted ones.
    """
    folder = _adapter_folder(path)
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{config_file} is missing; an adapter folder needs {CONFIG_NAME} next to its weights"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{config_file} is not valid JSON ({err}); the file is truncated or corrupted, save it again"
        ) from None
    config_from_dict(config, where=str(config_file))  # fail early on a config lora_lab cannot use

    weights_file, pickle_file = folder / WEIGHTS_NAME, folder / PICKLE_WEIGHTS_NAME
    if weights_file.is_file():
        try:
            tensors = load_file(weights_file)
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise ValueError(
                f"{weights_file} could not be read ({err}); the file is truncated or corrupted, save it again"
            ) from None
    elif pickle_file.is_file():
        if not allow_pickle:
            raise ValueError(
                f"{folder} holds only {PICKLE_WEIGHTS_NAME}, a pickle file, which can run arbitrary code when "
                "loaded. If you trust it, pass allow_pickle=True (it is then read with torch.load(weights_only=True)), "
                "or convert it to safetensors."
            )
        try:
            tensors = torch.load(pickle_file, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for bad pickles
            raise ValueError(
                f"{pickle_file} could not be read safely ({err}); it is corrupted or not plain tensors"
            ) from None
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise ValueError(f"{pickle_file} does not hold a dict of tensors")
    else:
        raise FileNotFoundError(
            f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}; the adapter weights are missing"
        )
    for key in tensors:
        split_peft_key(key)
    return config, tensors


def check_lora_tensor(tensor: torch.Tensor, name: str, where: str) -> None:
    """ValueError unless `tensor` is a float tensor of finite values (one check for every loading path).

    A NaN or inf in A or B turns every logit NaN; it comes from a diverged run or a damaged file.
    """
    if not tensor.dtype.is_floating_point:
        raise ValueError(
            f"{name} in {where} is {tensor.dtype}, not a float tensor; the file is not a LoRA adapter"
        )
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(
            f"{name} in {where} has {bad} NaN/inf value(s): the adapter is broken (a diverged training run or "
            "a damaged file). Retrain it with a lower learning rate, or load an earlier checkpoint."
        )


def check_file_rank(pair: dict[str, torch.Tensor], name: str, r: int, where: str) -> None:
    """ValueError when A and B agree on a rank that is not the config's: config and weights don't belong together."""
    weight_A, weight_B = pair["lora_A"], pair["lora_B"]
    if weight_A.dim() != 2 or weight_B.dim() != 2:
        raise ValueError(
            f"{name} in {where}: lora_A and lora_B must be 2-D ([r, in] and [out, r]), got shapes "
            f"{list(weight_A.shape)} and {list(weight_B.shape)}; the file is not a LoRA adapter"
        )
    file_r = weight_A.shape[0]
    if file_r == weight_B.shape[1] and file_r != r:
        raise ValueError(
            f"the adapter in {where} has rank-{file_r} tensors for {name} but its adapter_config.json says "
            f"r={r} there: the config does not belong to these weights. Save the adapter again, or fix r / "
            "rank_pattern in adapter_config.json."
        )


def plan_load(
    model: nn.Module, config: LoRAConfig, tensors: dict[str, torch.Tensor], where: str
) -> dict[str, dict]:
    """Check every tensor against the model; return {layer name: {"lora_A": t, "lora_B": t}}."""
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, part = split_peft_key(key)
        by_layer.setdefault(name, {})[part] = tensor
    injected = dict(lora_layers(model))
    if injected:
        targets = list(injected)
    else:
        try:
            targets = resolve_target_modules(model, config.target_modules)
        except (ValueError, TypeError) as err:
            raise ValueError(f"the adapter in {where} does not fit this model: {err}") from None
    missing = [n for n in targets if set(by_layer.get(n, {})) != {"lora_A", "lora_B"}]
    extra = [n for n in by_layer if n not in targets]
    if extra:
        raise ValueError(
            f"the adapter in {where} has weights for {extra[0]!r}, which is not a LoRA target in this model "
            f"({len(extra)} such layer(s)); is it an adapter for another base model?"
        )
    if missing:
        raise ValueError(
            f"the adapter in {where} lacks lora_A/lora_B weights for {missing[0]!r} ({len(missing)} layer(s) "
            "missing); the file is incomplete or was saved for other target_modules"
        )
    for name in targets:
        r = config.rank_alpha_for(name)[0]
        check_file_rank(by_layer[name], name, r, where)
        if name in injected:  # already has LoRA: the file must fit the existing A and B
            layer = injected[name]
            if layer.r != r:
                raise ValueError(
                    f"the adapter in {where} has r={r} for {name} but this model's LoRA layer there has "
                    f"r={layer.r}; remove_lora(model) first to load an adapter of another rank"
                )
            in_f, out_f = layer.in_features, layer.out_features
            expected = {
                "lora_A": tuple(layer.lora_A.weight.shape),
                "lora_B": tuple(layer.lora_B.weight.shape),
            }
        else:
            in_f, out_f = base_in_out_features(model.get_submodule(name))
            expected = {"lora_A": (r, in_f), "lora_B": (out_f, r)}
        for part, shape in expected.items():
            got = tuple(by_layer[name][part].shape)
            if got != shape:
                raise ValueError(
                    f"the adapter in {where} does not fit this model: {name}.{part} has shape {list(got)} in the "
                    f"file but this model needs {list(shape)} (in={in_f}, out={out_f}, r={shape[0] if part == 'lora_A' else shape[1]}). "
                    "The adapter was trained for another base model."
                )
            check_lora_tensor(by_layer[name][part], f"{name}.{part}", where)
    return by_layer


def load_adapter(
    model: nn.Module, path: str | os.PathLike, allow_pickle: bool = False, is_trainable: bool = False
) -> nn.Module:
    """Load a PEFT-format adapter into `model` (in place) and return it.

    A model without LoRA gets LoRA layers per the adapter's config first; a model that already has
    LoRA layers (same layers, same shapes) gets its A and B overwritten. As with PEFT's
    `from_pretrained`, the loaded adapter is frozen and the model is put in eval mode (so LoRA
    dropout is off and two identical forwards agree) unless is_trainable=True.
    Every check runs before the model is touched: on any error the model is unchanged.
    """
    where = str(path)
    config_dict, tensors = read_adapter(path, allow_pickle=allow_pickle)
    config = config_from_dict(config_dict, where=where)
    if has_lora(model):
        merged = [n for n, layer in lora_layers(model) if layer.merged]
        if merged:
            raise ValueError(
                f"LoRA layer {merged[0]} is merged; unmerge_adapters(model) before loading new weights"
            )
    plan = plan_load(model, config, tensors, where)

    if not has_lora(model):
        add_lora(model, config)
    else:
        model.lora_config = config
    with torch.no_grad():
        for name, layer in lora_layers(model):
            layer.lora_A.weight.copy_(plan[name]["lora_A"])
            layer.lora_B.weight.copy_(plan[name]["lora_B"])
            layer.lora_alpha, layer.use_rslora = config.rank_alpha_for(name)[1], config.use_rslora
            layer.scaling = lora_scaling(layer.r, layer.lora_alpha, config.use_rslora)
    for param_name, param in model.named_parameters():
        param.requires_grad = is_trainable and "lora_" in param_name
    if not is_trainable:
        model.eval()  # as PEFT's from_pretrained: LoRA dropout (and any other dropout) off for inference
    return model
