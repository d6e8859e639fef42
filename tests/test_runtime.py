"""lora_lab.runtime: the device / dtype / optimizer choices notebooks rely on."""

from __future__ import annotations

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
