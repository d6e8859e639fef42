"""Tests for lora_lab.cli: config checking, bad input, and one run on one process vs two (torchrun)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_inference_like_peft

from lora_lab import cli
from lora_lab.paths import REPO_ROOT, TINY_BASE_DIR

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))
SMOKE = REPO_ROOT / "configs" / "smoke.yaml"
needs_model = pytest.mark.skipif(not TINY_BASE_DIR.exists(), reason="the bundled model is not built yet")


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------- configs


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = cli.load_config(path)
    assert cfg.steps > 0 and cfg.task in ("support", "sql", "shift")


def test_shipped_configs_exist():
    assert {p.name for p in CONFIGS} >= {"sql.yaml", "support.yaml", "smoke.yaml"}


def test_yaml_numbers_without_a_dot_are_read_as_numbers(tmp_path):
    # PyYAML reads `3e-3` as the string "3e-3" (YAML 1.1 wants a dot); the config accepts it.
    cfg = cli.load_config(write_yaml(tmp_path, "task: sql\nlr: 3e-3\nsteps: 10\n"))
    assert cfg.lr == 0.003 and cfg.steps == 10 and cfg.lora_alpha == 16


# ---------------------------------------------------------------------------- bad input


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown task 'sqll'; valid tasks: support, sql, shift"):
        cli.train_config_from_dict({"task": "sqll"})


def test_mistyped_key_is_named_with_a_suggestion_and_the_valid_keys(tmp_path):
    path = write_yaml(tmp_path, "task: sql\nalpha: 32\n")
    with pytest.raises(ValueError) as err:
        cli.load_config(path)
    msg = str(err.value)
    assert "unknown key 'alpha'" in msg and "Did you mean 'lora_alpha'?" in msg
    assert str(path) in msg and "Valid keys: task, model, r, lora_alpha" in msg


def test_unknown_key_without_a_close_match_still_lists_the_valid_keys():
    with pytest.raises(ValueError, match=r"unknown key 'colour'\. Valid keys: task"):
        cli.train_config_from_dict({"colour": "blue"})


@pytest.mark.parametrize("steps", [0, -5])
def test_steps_must_be_positive(steps):
    with pytest.raises(ValueError, match="steps must be a positive number"):
        cli.train_config_from_dict({"steps": steps})


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"lr": "fast"}, "'lr' must be a number"),
        ({"lr": 0}, "lr must be a positive number"),
        ({"r": 2.5}, "'r' must be a whole number"),
        ({"r": 0}, "r \\(the LoRA rank\\) must be a positive integer"),
        ({"optimizer": "lion"}, "unknown optimizer 'lion'; valid: adamw, sgd"),
        ({"use_rslora": "yes"}, "use_rslora must be true or false"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"max_grad_norm": -1}, "max_grad_norm must be a positive number .* trains uphill"),
        ({"max_grad_norm": 0}, "max_grad_norm must be a positive number"),
        ({"max_grad_norm": "inf"}, "max_grad_norm must be a positive number"),
        (
            {"eval_limit": True},
            "eval_limit must be null \\(all\\), 0 \\(skip\\) or a positive integer, got True",
        ),
        ({"eval_limit": -3}, "eval_limit must be null"),
        ({"model": 42}, "model must be null or a path / name string"),
        ({"train_file": ["a.jsonl"]}, "train_file must be null or a path"),
        ({"lora_alpha": "inf"}, "positive finite number"),
    ],
    ids=lambda v: "-".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else "",
)
def test_bad_values_say_which_key(raw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        cli.train_config_from_dict(raw)


def test_missing_or_invalid_yaml_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="configs/"):
        cli.load_config(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="not valid YAML"):
        cli.load_config(write_yaml(tmp_path, "task: [sql\n"))
    with pytest.raises(TypeError, match="expected a mapping"):
        cli.load_config(write_yaml(tmp_path, "- task\n- sql\n"))


def test_output_folder_with_an_adapter_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="already holds an adapter.*--overwrite"):
        cli.check_output_dir(out)
    assert cli.check_output_dir(out, overwrite=True) == out
    assert cli.check_output_dir(tmp_path / "fresh") == tmp_path / "fresh"
    # through the command line: exit code 2, a message, and the folder untouched
    assert cli.main(["train", "--config", str(SMOKE), "--output", str(out)]) == 2
    assert "already holds an adapter" in capsys.readouterr().err
    assert (out / "adapter_config.json").read_text() == "{}" and len(list(out.iterdir())) == 1


def test_malformed_dataset_line_names_the_file_and_line(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    good = json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
    )
    data.write_text(f"{good}\n{good}\n{{not json\n")
    cfg = write_yaml(tmp_path, f"task: sql\nsteps: 2\ntrain_file: {data}\n")
    assert cli.main(["train", "--config", str(cfg), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{data}, line 3: not valid JSON" in err
    assert not (tmp_path / "out").exists()  # nothing was written


def _user_row(path, last_role="assistant"):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": last_role, "content": "ok"}]}
    return json.dumps(row)


def _setup_train_file(tmp_path, lines):
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    return {"train_file": tmp_path / "train.jsonl"}


# Each case: what to set up in tmp_path (returns extra YAML keys / CLI options), and a message fragment.
# Every one must fail with exit code 2 before a model is loaded, leaving --output uncreated.
BAD_RUNS = {
    "model_missing": (lambda t: {"model": t / "no-such-model"}, "looks like a local path but no such folder"),
    "model_without_config_json": (
        lambda t: {"model": (t / "empty").mkdir() or t / "empty"},
        "has no config.json",
    ),
    "model_is_a_file": (lambda t: {"model": _touch(t / "weights.bin")}, "is a file, not a model folder"),
    "train_rows_without_answer": (
        lambda t: _setup_train_file(t, [_user_row(t), _user_row(t, last_role="user")]),
        r"train.jsonl, line 2: the last message has role 'user', not 'assistant'",
    ),
    "train_row_not_chat": (
        lambda t: _setup_train_file(t, ['{"text": "hello"}']),
        "line 1: no non-empty 'messages'",
    ),
    "train_file_missing": (
        lambda t: {"train_file": t / "nope.jsonl"},
        r"train file .*nope.jsonl does not exist; pass a JSONL",
    ),
    "output_under_a_file": (
        lambda t: {"--output": _touch(t / "file") / "out"},
        "is a file; choose another folder",
    ),
    "config_is_a_folder": (lambda t: {"--config": t}, "is a folder; pass a YAML file"),
}


def _touch(path):
    path.write_text("x")
    return path


@pytest.mark.parametrize("setup, match", list(BAD_RUNS.values()), ids=list(BAD_RUNS))
def test_bad_runs_fail_before_the_model_loads(tmp_path, capsys, monkeypatch, setup, match):
    import lora_lab.models

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was found")

    monkeypatch.setattr(lora_lab.models, "load_base", no_loading)
    extra = setup(tmp_path)
    options = {"--config": None, "--output": tmp_path / "out"} | {
        k: v for k, v in extra.items() if k.startswith("--")
    }
    keys = {k: v for k, v in extra.items() if not k.startswith("--")}
    if options["--config"] is None:
        options["--config"] = write_yaml(
            tmp_path, "task: sql\nsteps: 2\n" + "".join(f"{k}: {v}\n" for k, v in keys.items())
        )
    argv = ["train", *(str(x) for kv in options.items() for x in kv), "--no-progress"]
    assert cli.main(argv) == 2
    assert re.search(match, capsys.readouterr().err), match
    assert not (tmp_path / "out").exists()


def test_output_folder_that_cannot_be_written_fails_before_training(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; the case is covered by output_under_a_file")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(PermissionError, match="cannot be written"):
        cli.check_output_dir(locked / "out")


def test_seq_len_that_cuts_off_every_answer_is_an_error_not_a_division_by_zero(
    tmp_path, tiny_model_dir, capsys
):
    cfg = tiny_config(tmp_path, tiny_model_dir, steps=2)
    cfg.write_text(cfg.read_text().replace("seq_len: 96", "seq_len: 4"))
    assert cli.main(["train", "--config", str(cfg), "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "seq_len=4 cuts off the whole answer of every one" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_main_reports_config_errors_as_exit_code_2(tmp_path, capsys):
    cfg = write_yaml(tmp_path, "task: poetry\n")
    assert cli.main(["train", "--config", str(cfg)]) == 2
    assert "valid tasks: support, sql, shift" in capsys.readouterr().err


# ---------------------------------------------------------------------------- training runs


def tiny_config(tmp_path: Path, model_dir: Path, **extra) -> Path:
    text = (
        SMOKE.read_text()
        .replace("model: null", f"model: {model_dir}")
        .replace("eval_limit: 20", "eval_limit: 4")
    )
    return write_yaml(tmp_path, text + "".join(f"{k}: {v}\n" for k, v in extra.items()))


def test_one_process_run_equals_lora_lab_train(tmp_path, tiny_model_dir):
    """On one process the command line is lora_lab.train.train: same batches, same loss, same numbers."""
    from safetensors.torch import load_file

    from lora_lab.data import load_task
    from lora_lab.inject import LoRAConfig, add_lora
    from lora_lab.models import load_base
    from lora_lab.runtime import seed_everything
    from lora_lab.train import train

    cfg = tiny_config(tmp_path, tiny_model_dir, steps=4)
    cmd = ["train", "--config", str(cfg), "--output", str(tmp_path / "out"), "--no-progress"]
    assert cli.main(cmd) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["num_processes"] == 1 and metrics["loss_steps"] == [1, 2, 3, 4]
    # a second run into the same folder is refused, and allowed with --overwrite (same numbers again)
    assert cli.main(cmd) == 2
    assert cli.main([*cmd, "--overwrite"]) == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["losses"] == metrics["losses"]

    seed_everything(0)
    model, tok = load_base(str(tiny_model_dir))
    add_lora(model, LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    out = train(model, tok, load_task("sql", "train"), steps=4, lr=3e-3, batch_size=8, seq_len=96, seed=0,
                progress=False)  # fmt: skip
    assert metrics["losses"] == pytest.approx(out["losses"], abs=1e-4)
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    ours = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(saved) == len(ours) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    for key, value in saved.items():
        torch_key = key.removeprefix("base_model.model.")
        assert (value - ours[torch_key]).abs().max() < 1e-5, key


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process_on_a_tiny_model(tmp_path, tiny_model_dir):
    """torchrun starts two processes; the Accelerator inside sees them (MULTI_CPU, gloo) and they split
    each batch. Per-step losses agree with the one-process run within 1e-4 (float summation order)."""
    cfg = tiny_config(tmp_path, tiny_model_dir, steps=4)
    assert cli.main(["train", "--config", str(cfg), "--output", str(tmp_path / "one"), "--no-progress"]) == 0
    proc = _torchrun(["train", "--config", str(cfg), "--output", str(tmp_path / "two"), "--no-progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-4)


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    return subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "lora_lab.cli", *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def _accelerate(args: list[str], *flags: str) -> subprocess.CompletedProcess:
    """`accelerate launch FLAGS -m lora_lab.train ARGS` (the same entry point as the CLI's train)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    cmd = [accelerate, "launch", *flags, "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "lora_lab.train", *args[1:]]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


def _train_cmd(out: Path) -> list[str]:
    return ["train", "--config", str(SMOKE), "--output", str(out), "--no-progress"]


@needs_model
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_one_process_and_two_processes_train_the_same_adapter(tmp_path, launcher):
    """The smoke config on one process and on two (DDP, gloo), started by torchrun or by
    `accelerate launch --multi_gpu --num_processes 2` (on a machine without GPUs the processes run on
    the CPU: the trainer's `Accelerator(cpu=True)` makes them MULTI_CPU).

    Every process draws the same global batch and takes half of it; the loss is scaled so that DDP's
    gradient average equals the single-process gradient. So the runs differ only by float summation
    order: per-step losses agree within 2e-3 (absolute), the adapters' tensors within 1e-3 of their
    size, and accuracy within 0.1 (2 of 20 greedy-decoded items).
    """
    from safetensors.torch import load_file

    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main(_train_cmd(one)) == 0
    if launcher == "torchrun":
        proc = _torchrun(_train_cmd(two))
    else:
        proc = _accelerate(_train_cmd(two), "--multi_gpu", "--num_processes", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]

    m1 = json.loads((one / "metrics.json").read_text())
    m2 = json.loads((two / "metrics.json").read_text())
    assert (m1["num_processes"], m2["num_processes"]) == (1, 2)
    assert m1["loss_steps"] == m2["loss_steps"]
    assert max(abs(a - b) for a, b in zip(m1["losses"], m2["losses"])) < 2e-3
    assert m2["losses"][-1] < m2["losses"][0]  # it learned
    assert abs(m1["accuracy"] - m2["accuracy"]) <= 0.1
    w1, w2 = load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    assert w1.keys() == w2.keys()
    for key in w1:
        assert (w1[key] - w2[key]).abs().max() <= 1e-3 * max(1.0, float(w1[key].abs().max())), key


@needs_model
@pytest.mark.slow
def test_saved_adapter_loads_in_peft_and_gives_the_same_logits(tmp_path):
    import torch
    from peft import PeftModel

    from lora_lab.adapters import load_adapter
    from lora_lab.models import load_base

    out = tmp_path / "run"
    assert cli.main(_train_cmd(out)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["r"] == 4 and metrics["trainable_params"] > 0 and metrics["seconds"] > 0
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4

    ours, tok = load_base()
    load_adapter(ours, out)
    theirs = PeftModel.from_pretrained(load_base()[0], out)
    ids = tok("<|user|>\nHow many users live in Ostrin?\n<|assistant|>\n", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids).logits, theirs.eval()(ids).logits, atol=1e-5, rtol=1e-4)


@needs_model
@pytest.mark.slow
def test_accelerate_launch_cpu_flag_starts_only_one_process(tmp_path):
    """A pitfall the book warns about: in accelerate 1.15, `accelerate launch --cpu --num_processes 2`
    on one machine starts ONE process (the --cpu path uses the simple launcher; several CPU processes
    need --multi_gpu, torchrun, or an mpirun hostfile). The metrics file says how many ran."""
    proc = _accelerate(_train_cmd(tmp_path / "cpu"), "--cpu", "--num_processes", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "cpu" / "metrics.json").read_text())["num_processes"] == 1


def test_adapter_trained_with_dropout_loads_for_inference_like_peft(tmp_path, tiny_model_dir):
    """A run with lora_dropout > 0: its saved adapter loads (lora_lab and PEFT) with dropout off."""
    from peft import PeftModel

    from lora_lab.adapters import load_adapter
    from lora_lab.models import load_base

    cfg = tiny_config(tmp_path, tiny_model_dir, steps=2, lora_dropout=0.1)
    assert cli.main(["train", "--config", str(cfg), "--output", str(tmp_path / "out"), "--no-progress"]) == 0
    ours, tok = load_base(str(tiny_model_dir))
    load_adapter(ours.train(), tmp_path / "out")
    theirs = PeftModel.from_pretrained(load_base(str(tiny_model_dir))[0].train(), tmp_path / "out")
    ids = tok("<|user|>\nHow many users live in Ostrin?\n<|assistant|>\n", return_tensors="pt").input_ids
    assert_inference_like_peft(ours, theirs, ids)
