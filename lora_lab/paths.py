"""Where LoRA Lab keeps its files.

Everything the book runs on lives in the repository's `data/` folder: the tiny base
model, the generated data sets and the cached benchmark results. A reader who
installed the package somewhere else can point `LORA_LAB_DATA` at a copy of it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["REPO_ROOT", "DATA_DIR", "TINY_BASE_DIR", "RESULTS_DIR", "data_dir", "write_json"]

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """The data folder: `$LORA_LAB_DATA` if set, else `<repo>/data`."""
    return Path(os.environ.get("LORA_LAB_DATA", REPO_ROOT / "data"))


DATA_DIR = data_dir()
TINY_BASE_DIR = DATA_DIR / "models" / "tiny-base"
RESULTS_DIR = DATA_DIR / "results"


def write_json(path: str | Path, data, indent: int = 2) -> Path:
    """Write `data` as JSON (one trailing newline) to `path`, creating its folder; returns the path.

    How every benchmark writes its cached results in `RESULTS_DIR`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent) + "\n")
    return path
