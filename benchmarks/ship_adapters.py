"""Train the adapters the shipping chapter (10) serves, and store them in data/adapters/.

Chapter 10 takes trained adapters all the way to served answers (merged checkpoint, vLLM, GGUF).
Training them inside the chapter would spend its 3-minute budget, so this script trains them once
with the project's own trainer (`lora_lab.cli.train_from_config`, the loop behind
`lora-lab train --config ...`) and the chapter loads the result:

    support   configs/support.yaml  r=8 on q,k,v,o: the shop's customer-service assistant
    sql       configs/sql.yaml      r=8 on q,k,v,o: questions -> SQL over data/shop.sql
    sql_qv    configs/sql.yaml with the English source's targets (q_proj, v_proj) at r=4:
              the adapter the chapter loads into a running vLLM server

Each folder holds a PEFT-format adapter (adapter_config.json, adapter_model.safetensors) and the
trainer's metrics.json (loss curve, test accuracy, seconds). Run (about 2-6 minutes on 2 CPU cores):

    python benchmarks/ship_adapters.py [--only sql] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lora_lab.cli import load_config, train_from_config  # noqa: E402
from lora_lab.paths import DATA_DIR  # noqa: E402

OUT = DATA_DIR / "adapters"
ADAPTERS = {
    "support": ("support.yaml", {}),
    "sql": ("sql.yaml", {}),
    "sql_qv": ("sql.yaml", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(ADAPTERS), action="append", help="train only these")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    for name in args.only or ADAPTERS:
        config_file, changes = ADAPTERS[name]
        cfg = dataclasses.replace(load_config(ROOT / "configs" / config_file), **changes)
        began = time.perf_counter()
        metrics = train_from_config(cfg, OUT / name, overwrite=True, progress=False)
        seconds = time.perf_counter() - began
        summary = {k: metrics[k] for k in ("accuracy", "final_loss")}
        print(f"{name}: {json.dumps(summary)} in {seconds:.0f} s -> {(OUT / name).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
