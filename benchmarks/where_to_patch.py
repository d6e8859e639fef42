"""Where to patch: LoRA on different groups of layers, same rank, same budget, one task.

For each placement (q,v only; attention q,k,v,o; FFN gate,up,down; all linear layers; all
linear layers plus the embedding and the output head), train the bundled base model on the
`sql` task with LoRA r=8, alpha=16 for the same number of steps and data order, then record
test accuracy, knowledge-probe accuracy, trainable parameters and the size of the adapter file
it saves. A full fine-tune (every weight, lr 1e-3) with the same budget is the reference row;
its "adapter" is the whole model.safetensors. lora_lab does not put LoRA on embeddings, so the last row uses PEFT (LoRA on
`embed_tokens` and `lm_head`); PEFT then also saves the full embedding and head weights in the
adapter file by default (`save_embedding_layers="auto"`), and we record the size without them
too. Writes data/results/where_to_patch.json, which chapter 03 plots.

    python benchmarks/where_to_patch.py            # full run (about 25 minutes on one CPU core)
    python benchmarks/where_to_patch.py --quick    # a smoke run in about a minute

On a busy machine the placements can run in separate processes and be merged:

    python benchmarks/where_to_patch.py --only q,v --out part1.json   (one process per group)
    python benchmarks/where_to_patch.py --merge part1.json part2.json ...
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from lora_lab import evaluate, runtime
from lora_lab.adapters import save_adapter
from lora_lab.experiments import finetune_and_score
from lora_lab.inject import LoRAConfig, add_lora, count_parameters
from lora_lab.models import load_base
from lora_lab.paths import RESULTS_DIR
from lora_lab.sizing import LLAMA_ALL

TASK = "sql"
R, ALPHA = 8, 16
STEPS = 250  # the model card's LoRA recipe: 250 steps of 32 examples at lr 3e-3
BATCH = 32
LR = 3e-3
EVAL_LIMIT = 200
SEED = 0
ATTN, FFN = LLAMA_ALL[:4], LLAMA_ALL[4:]  # q, k, v, o and gate, up, down
# Chapter 03's placements, and "full": the reference, full fine-tuning, every weight trains.
PLACEMENTS = {"q,v": ["q_proj", "v_proj"], "attention": ATTN, "ffn": FFN, "all-linear": "all-linear",
              "all-linear+embed+head": [*ATTN, *FFN, "embed_tokens", "lm_head"],
              "full": None}  # fmt: skip
FULL_LR = 1e-3  # full fine-tuning takes a smaller learning rate than LoRA
PEFT_ONLY = {"all-linear+embed+head"}  # lora_lab has no embedding LoRA: PEFT builds these


def make_model(placement: str):
    """Fresh base model with LoRA at `placement` (lora_lab, or PEFT for embeddings)."""
    runtime.seed_everything(SEED)
    model, tok = load_base()
    targets = PLACEMENTS[placement]
    if placement == "full":
        model.requires_grad_(True)
    elif placement in PEFT_ONLY:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets))
    else:
        add_lora(model, LoRAConfig(r=R, lora_alpha=ALPHA, target_modules=targets))
    return model, tok


def adapter_bytes(model, placement: str) -> dict[str, int]:
    """Size of adapter_model.safetensors as saved by default (and, for PEFT, without embeddings)."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        if placement == "full":  # the "adapter" of a full fine-tune is the whole model
            model.save_pretrained(Path(tmp) / "full")
            out["adapter_bytes"] = (Path(tmp) / "full" / "model.safetensors").stat().st_size
        elif placement in PEFT_ONLY:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "Setting save_embedding_layers to True ..."
                model.save_pretrained(Path(tmp) / "default")
                model.save_pretrained(Path(tmp) / "lean", save_embedding_layers=False)
            out["adapter_bytes"] = (Path(tmp) / "default" / "adapter_model.safetensors").stat().st_size
            out["adapter_bytes_lean"] = (Path(tmp) / "lean" / "adapter_model.safetensors").stat().st_size
        else:
            save_adapter(model, Path(tmp) / "a")
            out["adapter_bytes"] = (Path(tmp) / "a" / "adapter_model.safetensors").stat().st_size
    return out


def run_one(placement: str, steps: int, limit: int) -> dict:
    model, tok = make_model(placement)
    trainable, total = count_parameters(model)
    lr = FULL_LR if placement == "full" else LR
    res = finetune_and_score(model, tok, TASK, steps=steps, lr=lr, batch_size=BATCH, seed=SEED, limit=limit)
    row = {
        "placement": placement,
        "targets": PLACEMENTS[placement],
        "library": "peft" if placement in PEFT_ONLY else "torch" if placement == "full" else "lora_lab",
        "lr": lr,
        "trainable_params": trainable,
        "all_params": total,
        "train_seconds": round(res["seconds"], 1),
        "final_loss": round(res["final_loss"], 4),
        "accuracy": round(res["accuracy"], 4),
        "probe_accuracy": round(res["probe_accuracy"], 4),
        **adapter_bytes(model, placement),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps and items: checks the script runs")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy CPU)"
    )
    parser.add_argument("--out", default=str(RESULTS_DIR / "where_to_patch.json"))
    parser.add_argument("--only", default=None, help="placements to run, separated by ';' (default: all)")
    parser.add_argument("--merge", nargs="+", default=None, help="combine partial result files into --out")
    args = parser.parse_args()
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        rows = {row["placement"]: row for part in parts for row in part["rows"]}
        missing = [p for p in PLACEMENTS if p not in rows]
        if missing:
            raise SystemExit(f"the partial files lack placements {missing}; run them with --only")
        out = parts[0] | {
            "command": "python benchmarks/where_to_patch.py (placements in parallel processes, merged)",
            "seconds_total": round(sum(p["seconds_total"] for p in parts), 1),
            "rows": [rows[p] for p in PLACEMENTS],
        }
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.out}")
        return
    placements = list(PLACEMENTS) if args.only is None else args.only.split(";")
    unknown = [p for p in placements if p not in PLACEMENTS]
    if unknown:
        raise SystemExit(f"unknown placements {unknown}; choose from {list(PLACEMENTS)}")
    steps, limit = (5, 10) if args.quick else (STEPS, EVAL_LIMIT)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tok = load_base()
    base_probe = evaluate.probe_accuracy(model, tok)
    rows = [run_one(p, steps, limit) for p in placements]
    out = {
        "command": "python benchmarks/where_to_patch.py" + (" --quick" if args.quick else ""),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "task": TASK,
        "r": R,
        "lora_alpha": ALPHA,
        "steps": steps,
        "batch_size": BATCH,
        "lr": LR,
        "seed": SEED,
        "eval_items": limit,
        "base_probe_accuracy": round(base_probe, 4),
        "seconds_total": round(time.perf_counter() - start, 1),
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
