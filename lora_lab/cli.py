"""The command-line trainer: one YAML file in, a PEFT-format adapter and a metrics file out.

    python -m lora_lab.train --config configs/sql.yaml [--output DIR] [--overwrite]
    python -m lora_lab.cli train --config configs/sql.yaml       # the same
    lora-lab train --config configs/sql.yaml                     # the same, as a console script

    # several processes on one machine (DDP over gloo on CPU, NCCL on GPUs):
    torchrun --nproc_per_node 2 -m lora_lab.cli train --config configs/sql.yaml
    accelerate launch --multi_gpu --num_processes 4 -m lora_lab.cli train --config configs/sql.yaml
    # (also on a CPU-only machine; `accelerate launch --cpu --num_processes N` starts ONE process)

The YAML file holds flat keys (see `TrainConfig` for each one and its default):

    task: sql                # support | sql | shift
    model: null              # null = the bundled tiny model; or a Hub id / local path
    r: 8
    lora_alpha: 16
    target_modules: [q_proj, k_proj, v_proj, o_proj]
    steps: 200
    lr: 3.0e-3
    eval_limit: 100

The loop runs inside an `accelerate.Accelerator`, so the same file runs on one process or many:
every process draws the SAME global batch from the same seeded sampler and takes its share of the
rows (`rows[rank::world]`). Each process divides its summed token loss by the token count of the
whole global batch and multiplies by the number of processes; DDP averages the gradients, so the
update equals the single-process update on the whole batch (up to float summation order). On one
process the run is the same as `lora_lab.train.train` with the same settings (same sampler, same
encoding, same loss). Only the main process evaluates and writes files.

On this CPU-only machine `accelerate launch --cpu --num_processes 2` starts one process (accelerate's
multi-CPU launcher wants mpirun); `torchrun --nproc_per_node 2` starts two, and the Accelerator inside
finds them (`DistributedType.MULTI_CPU`, gloo) because it is created with `cpu=True` when there is no
GPU (without it accelerate ignores torchrun's variables on a CPU). On GPUs use `accelerate launch --multi_gpu`.

Left out: gradient accumulation, mixed precision switches, resuming, FSDP/DeepSpeed settings (give them
to `accelerate launch` / `accelerate config`; nothing in the loop depends on them).

References: accelerate `Accelerator` (`prepare`, `backward`, `reduce`, `unwrap_model`); PyTorch
`DistributedDataParallel`; PEFT adapter format (`adapter_config.json`, `adapter_model.safetensors`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "TrainConfig",
    "CONFIG_KEYS",
    "load_config",
    "train_config_from_dict",
    "check_output_dir",
    "train_from_config",
    "main",
]

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


@dataclass
class TrainConfig:
    """Everything one training run needs; each field is one YAML key."""

    task: str = "sql"  # the task to train and score on: support | sql | shift
    model: str | None = None  # None: the bundled tiny model (or $LORA_LAB_BASE_MODEL); else a Hub id / path
    r: int = 8  # LoRA rank
    lora_alpha: float = 16  # scaling = lora_alpha / r (or / sqrt(r) with use_rslora)
    lora_dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    use_rslora: bool = False
    steps: int = 200  # optimizer steps
    lr: float = 3e-3
    batch_size: int = 32  # GLOBAL batch: split over the processes
    seq_len: int = 96  # longer chats are cut
    seed: int = 0
    optimizer: str = "adamw"  # adamw | sgd
    weight_decay: float = 0.0
    max_grad_norm: float | None = None  # clip the gradient norm to this; None: no clipping (as train())
    eval_limit: int | None = 100  # test items to score; None: all, 0: skip evaluation
    eval_split: str = "test"
    train_file: str | None = None  # JSONL of {"messages": [...]} rows to train on instead of the task
    log_every: int = 5  # keep every n-th loss in metrics.json (all are averaged into final_loss)


CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))
_INT_KEYS = {"r", "steps", "batch_size", "seq_len", "seed", "log_every"}
_FLOAT_KEYS = {"lora_alpha", "lora_dropout", "lr", "weight_decay", "max_grad_norm"}
OPTIMIZERS = ("adamw", "sgd")


# ---------------------------------------------------------------------------- config


def _as_number(key: str, value, kind: type):
    """YAML reads `3e-3` (no dot) as a string: accept numeric strings, reject everything else clearly."""
    if isinstance(value, bool):
        raise TypeError(f"config key {key!r} must be a number, got {value!r}")
    if kind is int:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError(f"config key {key!r} must be a whole number, got {value!r}")
    if isinstance(value, (int, float)):
        return value  # an int stays an int (lora_alpha: 16 is written back as 16)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise TypeError(f"config key {key!r} must be a number (e.g. 3.0e-3), got {value!r}")


def train_config_from_dict(raw: dict, source: str = "config") -> TrainConfig:
    """Check a dict of YAML keys and build a TrainConfig; every error says which key and what to write."""
    from lora_lab.data import SPLITS, TASKS

    if not isinstance(raw, dict):
        raise TypeError(
            f"{source}: expected a mapping of keys (task: sql, r: 8, ...), got {type(raw).__name__}"
        )
    unknown = [k for k in raw if k not in CONFIG_KEYS]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), CONFIG_KEYS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{source}: unknown key {key!r}.{hint} Valid keys: {', '.join(CONFIG_KEYS)}")
    values = {}
    for key, value in raw.items():
        if value is not None and key in _INT_KEYS:
            value = _as_number(key, value, int)
        elif value is not None and key in _FLOAT_KEYS:
            value = _as_number(key, value, float)
        values[key] = value
    cfg = TrainConfig(**values)

    if cfg.task not in TASKS:
        raise ValueError(f"{source}: unknown task {cfg.task!r}; valid tasks: {', '.join(TASKS)}")
    if cfg.eval_split not in SPLITS:
        raise ValueError(f"{source}: unknown eval_split {cfg.eval_split!r}; valid: {', '.join(SPLITS)}")
    if cfg.steps is None or cfg.steps <= 0:
        raise ValueError(f"{source}: steps must be a positive number of optimizer steps, got {cfg.steps!r}")
    for key in ("batch_size", "seq_len", "log_every"):
        if getattr(cfg, key) is None or getattr(cfg, key) <= 0:
            raise ValueError(f"{source}: {key} must be a positive integer, got {getattr(cfg, key)!r}")
    if cfg.lr is None or not cfg.lr > 0 or not math.isfinite(cfg.lr):
        raise ValueError(f"{source}: lr must be a positive number (e.g. 3.0e-3), got {cfg.lr!r}")
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"{source}: unknown optimizer {cfg.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    if cfg.eval_limit is not None and (
        isinstance(cfg.eval_limit, bool) or not isinstance(cfg.eval_limit, int) or cfg.eval_limit < 0
    ):
        raise ValueError(
            f"{source}: eval_limit must be null (all), 0 (skip) or a positive integer, got {cfg.eval_limit!r}"
        )
    if cfg.max_grad_norm is not None and not (cfg.max_grad_norm > 0 and math.isfinite(cfg.max_grad_norm)):
        raise ValueError(
            f"{source}: max_grad_norm must be a positive number (e.g. 1.0) or null for no clipping, got "
            f"{cfg.max_grad_norm!r}; a negative norm flips the gradient and trains uphill"
        )
    for key in ("model", "train_file"):
        value = getattr(cfg, key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise TypeError(f"{source}: {key} must be null or a path / name string, got {value!r}")
    if not isinstance(cfg.use_rslora, bool):
        raise TypeError(f"{source}: use_rslora must be true or false, got {cfg.use_rslora!r}")
    _lora_config(cfg)  # r, alpha, dropout and target_modules are checked by LoRAConfig itself
    return cfg


def load_config(path: str | Path) -> TrainConfig:
    """Read and check a YAML config file (see `TrainConfig` for the keys)."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist; see configs/*.yaml for examples")
    if not path.is_file():
        raise IsADirectoryError(f"--config {path} is a folder; pass a YAML file in it, e.g. configs/sql.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from None
    return train_config_from_dict(raw, source=str(path))


def _lora_config(cfg: TrainConfig):
    from lora_lab.inject import LoRAConfig

    return LoRAConfig(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        use_rslora=cfg.use_rslora,
    )


def check_output_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse a folder that already holds an adapter unless `overwrite`, or that cannot be written
    (checked by creating and removing a file where the folder is or will be); nothing is kept here."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"output {path} exists and is a file; pass a folder with --output")
    _check_writable(path)
    found = [name for name in ADAPTER_FILES if (path / name).exists()]
    if found and not overwrite:
        raise FileExistsError(
            f"{path} already holds an adapter ({', '.join(found)}); pass --overwrite to replace it, "
            "or choose another folder with --output"
        )
    return path


def _check_writable(path: Path) -> None:
    """PermissionError/NotADirectoryError now, rather than after training, if `path` cannot be written."""
    import tempfile

    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(
            f"--output {path} cannot be created: {existing} is a file; choose another folder"
        )
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise PermissionError(
            f"--output {path} cannot be written ({existing}: {err.strerror or err}); choose a folder you can write to"
        ) from None


# ---------------------------------------------------------------------------- training


def train_from_config(
    cfg: TrainConfig, output: str | Path, overwrite: bool = False, progress: bool = True
) -> dict | None:
    """Train one adapter as `cfg` says, save it and `metrics.json` into `output`; return the metrics.

    Runs under any number of processes (see the module docstring). Processes other than the main
    one return None.
    """
    from lora_lab.data import load_chat_jsonl, load_task
    from lora_lab.models import check_base

    # Check the cheap things first, on every process, before loading anything heavy.
    output = check_output_dir(output, overwrite)
    examples = load_chat_jsonl(cfg.train_file) if cfg.train_file else load_task(cfg.task, "train")
    if not examples:
        raise ValueError(f"no training examples in {cfg.train_file or cfg.task}; give a non-empty data set")
    check_base(cfg.model)  # a missing folder, one without config.json, an unreachable Hub id

    import torch
    from accelerate import Accelerator

    from lora_lab.inject import add_lora, count_parameters
    from lora_lab.models import load_base
    from lora_lab.runtime import device, seed_everything
    from lora_lab.train import encode_examples, train

    # accelerate only looks for CPU processes (torchrun's WORLD_SIZE, gloo) when told cpu=True;
    # on a GPU machine it finds the GPUs itself.
    accelerator = Accelerator(cpu=device().type == "cpu")
    world = accelerator.num_processes
    if cfg.batch_size % world:
        raise ValueError(
            f"batch_size={cfg.batch_size} does not split over {world} processes; use a multiple of {world}"
        )

    seed_everything(cfg.seed)  # same seed everywhere: same A init (DDP broadcasts rank 0's anyway)
    model, tokenizer = load_base(cfg.model)
    encoded = encode_examples(tokenizer, examples, cfg.seq_len)  # (ids, labels) per example with an answer
    model = add_lora(model, _lora_config(cfg))
    trainable, total = count_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer_class = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.SGD
    optimizer = optimizer_class(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    run = train(
        model, tokenizer, None, encoded=encoded, steps=cfg.steps, batch_size=cfg.batch_size, seed=cfg.seed,
        optimizer=optimizer, max_grad_norm=cfg.max_grad_norm, accelerator=accelerator,
        callback=lambda step, loss: _stop_on_nan(step, loss, cfg.lr), log_every=1,
        progress=progress and accelerator.is_main_process, desc=f"train {cfg.task} r={cfg.r}",
    )  # fmt: skip
    metrics = None
    if accelerator.is_main_process:
        metrics = _finish(cfg, accelerator.unwrap_model(model), tokenizer, run, output, world)
        metrics.update(trainable_params=trainable, total_params=total, torch=torch.__version__)
        (output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print(
            f"saved adapter to {output} | final loss {metrics['final_loss']:.4f} | accuracy "
            f"{metrics['accuracy'] if metrics['accuracy'] is None else round(metrics['accuracy'], 4)} | "
            f"{metrics['seconds']:.1f} s on {world} process(es)"
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def _stop_on_nan(step: int, loss: float, lr: float) -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss became {loss} at step {step}; lower lr (now {lr})")


def _finish(cfg: TrainConfig, model, tokenizer, run: dict, output: Path, world: int) -> dict:
    """Score the trained model, save the adapter; returns the metrics (main process only)."""
    from lora_lab.adapters import save_adapter
    from lora_lab.evaluate import task_accuracy
    from lora_lab.train import final_loss

    accuracy = None
    if cfg.eval_limit != 0:
        accuracy = task_accuracy(model, tokenizer, cfg.task, split=cfg.eval_split, limit=cfg.eval_limit)
    losses = run["losses"]
    steps_kept = [s for s in range(1, cfg.steps + 1) if s % cfg.log_every == 0 or s == 1 or s == cfg.steps]
    output.mkdir(parents=True, exist_ok=True)
    save_adapter(model, output, _lora_config(cfg))
    return {
        "config": dataclasses.asdict(cfg),
        "num_processes": world,
        "loss_steps": steps_kept,
        "losses": [round(losses[s - 1], 5) for s in steps_kept],
        "final_loss": round(final_loss(losses), 5),
        "accuracy": accuracy,
        "seconds": round(run["seconds"], 2),
    }


# ---------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lora-lab", description="LoRA Lab command-line tools.")
    sub = ap.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a LoRA adapter from a YAML config")
    tr.add_argument("--config", required=True, help="YAML file, e.g. configs/sql.yaml")
    tr.add_argument(
        "--output", default=None, help="folder for the adapter and metrics.json (default: runs/<config>)"
    )
    tr.add_argument("--overwrite", action="store_true", help="replace an adapter already in --output")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m lora_lab.cli` and the `lora-lab` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config)
        output = Path(args.output) if args.output else Path("runs") / Path(args.config).stem
        train_from_config(cfg, output, overwrite=args.overwrite, progress=not args.no_progress)
    except (
        ValueError,
        TypeError,
        OSError,
        FloatingPointError,
    ) as err:  # OSError: files, folders, offline Hub
        print(f"lora-lab: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
