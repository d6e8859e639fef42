"""The code the book's readers read stays ruff-clean (lint and format)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["lora_lab", "tests", "benchmarks", "tools"]


def ruff(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or "ruff"
    return subprocess.run([exe, *args, *TARGETS], cwd=ROOT, capture_output=True, text=True)


def test_ruff_check():
    out = ruff("check")
    assert out.returncode == 0, out.stdout[-4000:]


def test_ruff_format():
    out = ruff("format", "--check")
    assert out.returncode == 0, out.stdout[-4000:]
