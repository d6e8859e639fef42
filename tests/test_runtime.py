"""lora_lab.runtime: the device / dtype / optimizer choices notebooks rely on."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from lora_lab import runtime


def test_cpu_choices_when_no_gpu(monkeypatch):
    monkeypatch.delenv("LORA_LAB_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.device().type == "cpu"
    assert runtime.compute_dtype() == torch.float32
    assert runtime.optimizer_name() == "adamw_torch"
    assert runtime.describe() == "device=cpu dtype=float32 optim=adamw_torch"


def test_gpu_choices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert runtime.compute_dtype("cuda") == torch.bfloat16
    assert runtime.optimizer_name("cuda") == "paged_adamw_8bit"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert runtime.compute_dtype("cuda") == torch.float16


def test_asking_for_cuda_without_it_says_what_to_do(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="use 'cpu'"):
        runtime.device("cuda")


def test_seed_everything_makes_torch_repeatable():
    runtime.seed_everything(3)
    a = torch.randn(4)
    runtime.seed_everything(3)
    assert torch.equal(a, torch.randn(4))


def test_known_library_noise_is_dropped_and_kept_aside():
    runtime.quiet_library_noise()
    runtime.quiet_library_noise()  # idempotent: one filter per logger
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(logger.filters) == 1
    before = len(runtime.SILENCED)
    noise = "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'"
    record = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, noise, (), None)
    assert not logger.filters[0].filter(record)
    assert runtime.SILENCED[before:] == [noise]
    other = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, "something new", (), None)
    assert logger.filters[0].filter(other)  # anything else still shows


def test_importing_the_stack_after_lora_lab_prints_nothing():
    """What a chapter's import cell does, in a fresh interpreter: no stderr on any CPU."""
    code = "import lora_lab, peft, trl, bitsandbytes, transformers"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and done.stdout == ""


def test_below_prints_the_bound_for_rounding_sized_gaps():
    assert runtime.below(2.3e-05, 1e-3) == runtime.below(1.7e-05, 1e-3) == "< 1e-03"
    assert runtime.below(2.07, 1e-3) == "2.1"
