"""QLoRA vs 32-bit LoRA on the bundled model, and what merging into a 4-bit base does to accuracy.

Writes data/results/qlora.json, which chapter 06 shows. Three fine-tunes of the same base on the same
task, with the same LoRA settings (r=8, alpha=16, every linear layer but the output head), the same
training loop (`lora_lab.train.train`: same data order, steps, batch and learning rate):

- `lora`: the base in fp32 (the compute dtype on CPU), lora_lab adapters;
- `qlora_lora_lab`: the base quantized by `lora_lab.nf4.quantize_model` (NF4, block 64, double
  quantization), lora_lab adapters on top of its NF4Linear layers;
- `qlora_peft`: the base loaded by transformers with `BitsAndBytesConfig(load_in_4bit=True, nf4,
  double quant)`, `peft.prepare_model_for_kbit_training`, PEFT `get_peft_model`.

Each is scored by task accuracy on the test split. Then the adapters over a 4-bit base are merged the
three ways the chapter discusses ("full_precision", "requantize", and PEFT's own `merge_and_unload`,
which re-quantizes), and the merged models are scored again, with the largest logit difference to the
unmerged model on a batch of test prompts.

    python benchmarks/qlora_train.py                 # defaults: task sql, 250 steps, 200 test items
    python benchmarks/qlora_train.py --steps 50 --items 40 --out /tmp/q.json   # a quick smoke run

On this 2-core CPU the default run takes several minutes; memory figures are `nf4.model_bytes`
(parameters and buffers as stored), not process peaks.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lora_lab import data, evaluate, experiments, nf4, runtime  # noqa: E402
from lora_lab.inject import LoRAConfig, add_lora  # noqa: E402
from lora_lab.models import load_base  # noqa: E402
from lora_lab.paths import RESULTS_DIR, TINY_BASE_DIR, write_json  # noqa: E402

R, ALPHA, LR, BATCH = 8, 16, 3e-3, 32


def load_4bit_peft(path):
    """The production path: transformers 4-bit loading + prepare_model_for_kbit_training + PEFT."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dev = runtime.device()
    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=runtime.compute_dtype(dev),
    )
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config, device_map={"": dev})
    model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(
        r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


@torch.no_grad()
def logits(model, batch):
    return model(**batch).logits.float()


def run(method: str, path: Path, task: str, steps: int, items: int, seed: int) -> tuple:
    runtime.seed_everything(seed)
    if method == "qlora_peft":
        _, tok = load_base(path)
        model = load_4bit_peft(path)
    else:
        model, tok = load_base(path)
        if method == "qlora_lora_lab":
            nf4.quantize_model(model, compute_dtype=runtime.compute_dtype())
        add_lora(model, LoRAConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear"))
    res = experiments.finetune_and_score(
        model, tok, task, steps=steps, lr=LR, batch_size=BATCH, seed=seed, limit=items, probes=False
    )
    acc = res["accuracy"]
    row = {
        "method": method,
        "test_accuracy": acc,
        "trainable_params": res["trainable_params"],
        "model_bytes": nf4.model_bytes(model),
        "train_seconds": round(res["seconds"], 1),
        "final_loss": round(res["final_loss"], 4),
    }
    print(row, flush=True)
    return model, tok, row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=TINY_BASE_DIR)
    parser.add_argument("--task", default="sql", choices=data.TASKS)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "qlora.json")
    args = parser.parse_args()

    _, tok = load_base(args.model)
    prompts = [ex["messages"][:-1] for ex in data.load_task(args.task, "test")[:16]]
    texts = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    probe = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    probe = {k: v.to(runtime.device()) for k, v in probe.items()}

    start = time.perf_counter()
    rows, merges = [], []
    for method in ("lora", "qlora_lora_lab", "qlora_peft"):
        model, tok, row = run(method, args.model, args.task, args.steps, args.items, args.seed)
        rows.append(row)
        if method == "lora":
            continue
        unmerged = logits(model, probe)
        if method == "qlora_lora_lab":
            variants = {
                how: nf4.merge_quantized_model(copy.deepcopy(model), how)
                for how in ("full_precision", "requantize")
            }
        else:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                variants = {"peft_merge_and_unload": copy.deepcopy(model).merge_and_unload()}
            warned = sorted({str(w.message) for w in caught if "rounding" in str(w.message)})
        for how, merged in variants.items():
            merges.append(
                {
                    "method": method,
                    "merge": how,
                    "test_accuracy": evaluate.task_accuracy(
                        merged, tok, args.task, limit=args.items, progress=False
                    ),
                    "max_logit_diff": (logits(merged, probe) - unmerged).abs().max().item(),
                    "model_bytes": nf4.model_bytes(merged),
                    **({"warnings": warned} if method == "qlora_peft" else {}),
                }
            )
            print(merges[-1], flush=True)
    results = {
        "what": "QLoRA vs 32-bit LoRA (same loop, data order, steps), and merging into a 4-bit base",
        "model": "data/models/tiny-base"
        if args.model.resolve() == TINY_BASE_DIR.resolve()
        else str(args.model),
        "task": args.task,
        "steps": args.steps,
        "batch_size": BATCH,
        "lr": LR,
        "lora": {"r": R, "lora_alpha": ALPHA, "target_modules": "all-linear"},
        "eval_items": args.items,
        "seed": args.seed,
        "device": runtime.describe(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "seconds": round(time.perf_counter() - start, 1),
        "rows": rows,
        "merges": merges,
    }
    write_json(args.out, results)
    print(f"wrote {args.out} in {results['seconds']} s")


if __name__ == "__main__":
    main()
