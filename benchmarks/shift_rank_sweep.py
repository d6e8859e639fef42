"""How far does raising the rank go on `shift`, the task far from pretraining? (chapter 09)

    python benchmarks/shift_rank_sweep.py           # 7 runs of 250 steps (about 8 minutes on one CPU core)
    python benchmarks/shift_rank_sweep.py --quick   # 10 steps, 20 items: a smoke run, nothing written

`shift` is translation into Kelvish, a made-up language whose words the base model has never been
trained to predict. The model card's measurement shows LoRA r=8 on q,k,v,o learning none of it while
full fine-tuning learns nearly all. This sweep asks what closes the gap: more rank on every linear
layer (r = 1, 4, 16, 64, alpha = 2r), or a small rank plus a trainable output head (`lm_head` in
PEFT's `modules_to_save`: the new words need output rows the frozen head does not have). Each run
uses PEFT, the same seed, data order, 250 steps, batch 32, lr 3e-3 (full fine-tuning: 1e-3), and
records test accuracy (200 items), knowledge probes kept, trainable parameters and the final loss.

Writes `data/results/shift_ranks.json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

RESULTS = REPO / "data" / "results" / "shift_ranks.json"
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
# name -> (LoraConfig keyword arguments, or None for full fine-tuning)
RUNS = {
    "r=8 q,k,v,o": {"r": 8, "lora_alpha": 16, "target_modules": ATTN},
    "r=1 all-linear": {"r": 1, "lora_alpha": 2, "target_modules": "all-linear"},
    "r=4 all-linear": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
    "r=16 all-linear": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
    "r=64 all-linear": {"r": 64, "lora_alpha": 128, "target_modules": "all-linear"},
    "r=8 q,k,v,o + lm_head": {"r": 8, "lora_alpha": 16, "target_modules": ATTN, "modules_to_save": ["lm_head"]},
    "full fine-tuning": None,
}  # fmt: skip


def one_run(name: str, steps: int, limit: int | None, seed: int = 0) -> dict:
    from peft import LoraConfig, get_peft_model

    from lora_lab import runtime
    from lora_lab.experiments import finetune_and_score
    from lora_lab.models import load_base

    runtime.seed_everything(seed)
    model, tok = load_base(device="cpu")
    settings = RUNS[name]
    if settings is not None:
        model = get_peft_model(model, LoraConfig(lora_dropout=0.0, **settings))
    lr = 3e-3 if settings is not None else 1e-3
    res = finetune_and_score(model, tok, "shift", steps=steps, lr=lr, batch_size=32, seed=seed, limit=limit)
    return {
        "name": name,
        "settings": settings,
        "lr": lr,
        "trainable_params": res["trainable_params"],
        "final_loss": round(res["final_loss"], 4),
        "train_seconds": round(res["seconds"], 1),
        "accuracy": res["accuracy"],
        "probe_accuracy": round(res["probe_accuracy"], 4),
    }


def main(argv: list[str] | None = None) -> None:
    from tqdm.auto import tqdm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="10 steps, 20 items, nothing written")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps, limit = (10, 20) if args.quick else (args.steps, None)
    start = time.perf_counter()
    rows = []
    for name in tqdm(RUNS, desc="shift ranks"):
        rows.append(one_run(name, steps, limit))
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "task": "shift",
        "runs": rows,
        "meta": {
            "command": "python benchmarks/shift_rank_sweep.py",
            "steps": steps,
            "batch_size": 32,
            "eval_items": limit or 200,
            "seed": 0,
            "threads": args.threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "date": datetime.date.today().isoformat(),
            "seconds": round(time.perf_counter() - start, 1),
        },  # fmt: skip
    }
    if not args.quick:
        RESULTS.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
