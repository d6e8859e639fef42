"""Compare LoRA variants and full fine-tuning on the bundled model with one training budget.

    python benchmarks/compare_variants.py            # the full run (~25 min on a 2-core CPU)
    python benchmarks/compare_variants.py --quick    # a smoke test (a few minutes)

Every method gets the same budget: the same steps, batch size, sequence length, data order (one
seeded shuffle) and AdamW, on `support` and on `sql`. Methods:

- lora        plain LoRA (A kaiming, B = 0), scaling alpha / r
- rslora      plain LoRA with scaling alpha / sqrt(r)
- loraplus    plain LoRA, B trained `--loraplus-ratio` times faster than A (LoRA+ parameter groups)
- olora, pissa, corda-ipm, corda-kpm, lora-null, loftq   `lora_lab.variants.init_variant`
- dora        `lora_lab.dora.add_dora`
- full        every weight trainable (full fine-tuning)

For each run it records learning (task accuracy on the test split), forgetting (knowledge-probe
accuracy and corpus-test perplexity after training, beside the base model's), trainable
parameters, seconds per step and the loss curve, and writes `data/results/variants.json`.

Calibration data: CorDA-IPM sees task prompts (it "previews the instruction"); CorDA-KPM and
LoRA-Null see pretraining corpus documents (the knowledge to keep). Each sample is fed on its own,
unpadded, so padding never enters a covariance.

Every method goes through `lora_lab.experiments.finetune_and_score` (the package's one loop) with
an optimizer built here: LoRA+'s parameter groups keep their own rates. The runs do not clip
gradients (`max_grad_norm=None`): this script's results were taken without clipping, while
`train.train` clips the norm to 1.0 by default.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing as mp
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
from tqdm.auto import tqdm

import lora_lab
from lora_lab import data, evaluate
from lora_lab.dora import add_dora
from lora_lab.experiments import finetune_and_score, score
from lora_lab.inject import LoRAConfig, add_lora, count_parameters, mark_only_lora_as_trainable
from lora_lab.paths import RESULTS_DIR, write_json
from lora_lab.train import encode_example
from lora_lab.variants import REWRITING_METHODS, init_variant, loraplus_param_groups

METHODS = [
    "lora",
    "rslora",
    "loraplus",
    "olora",
    "pissa",
    "dora",
    "corda-ipm",
    "corda-kpm",
    "lora-null",
    "loftq",
    "full",
]
TASKS = ["support", "sql"]


def calibration_batches(tok, method: str, task: str, n: int, seq_len: int) -> list[torch.Tensor]:
    """`n` unpadded single-sample batches [1, seq]: task prompts for CorDA-IPM, corpus text otherwise."""
    if method == "corda-ipm":
        texts = [
            tok.apply_chat_template(ex["messages"][:-1], add_generation_prompt=True, tokenize=False)
            for ex in data.load_task(task, "train")[:n]
        ]
    else:
        texts = data.load_corpus("train")[:n]
    batches = []
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"][:seq_len]
        batches.append(torch.tensor([ids]))  # [1, seq]
    return batches


def prepare(model, tok, method: str, task: str, args) -> None:
    """Inject and initialise `method` in `model` (in place) and choose its trainable parameters."""
    if method == "full":
        for p in model.parameters():
            p.requires_grad = True
        return
    # LoftQ does not compensate the scaling: Q + s B A approximates W only for s = 1 (alpha = r)
    alpha = args.r if method == "loftq" else args.alpha
    config = LoRAConfig(
        r=args.r, lora_alpha=alpha, target_modules=args.targets, use_rslora=method == "rslora"
    )
    if method == "dora":
        add_dora(model, config)
    else:
        add_lora(model, config)
    if method in REWRITING_METHODS:
        calib = None
        if method.startswith("corda") or method == "lora-null":
            calib = calibration_batches(tok, method, task, args.calib_samples, args.seq_len)
        init_variant(model, method, calibration=calib)
    mark_only_lora_as_trainable(model)


def make_optimizer(model, method: str, lr: float, args) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; LoRA+ splits them into PEFT's four groups."""
    if method == "loraplus":
        groups = loraplus_param_groups(model, lr, args.loraplus_ratio)
        return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def run_one(method: str, task: str, args) -> dict:
    lora_lab.seed_everything(args.seed)
    model, tok = lora_lab.load_base(args.base_model, device="cpu")
    t0 = time.perf_counter()
    prepare(model, tok, method, task, args)
    init_seconds = time.perf_counter() - t0
    lr = args.full_lr if method == "full" else args.lr
    encoded = [encode_example(tok, ex, args.seq_len) for ex in data.load_task(task, "train")]
    res = finetune_and_score(
        model, tok, task, steps=args.steps, batch_size=args.batch_size, seed=args.seed, encoded=encoded,
        optimizer=make_optimizer(model, method, lr, args), max_grad_norm=None, progress=True,
        desc=f"{task}/{method}", limit=args.eval_items, perplexity_limit=args.ppl_docs,
    )  # fmt: skip
    trainable, total = count_parameters(model)
    losses = res["losses"]
    row = {
        "task": task,
        "method": method,
        "lr": lr,
        "trainable_params": trainable,
        "total_params": total,
        "init_seconds": round(init_seconds, 3),
        "seconds_per_step": round(res["seconds"] / args.steps, 4),
        "final_loss": round(res["final_loss"], 4),
        "early_loss": round(sum(losses[: args.early_steps]) / args.early_steps, 4),
        "losses": [round(x, 4) for x in losses],
    }
    row.update({k: round(res[k], 4) for k in ("accuracy", "probe_accuracy", "perplexity")})
    return row


def measure_base(tasks: list[str], args) -> dict:
    """The base model before any training: probes, perplexity and each task's accuracy."""
    lora_lab.seed_everything(args.seed)
    model, tok = lora_lab.load_base(args.base_model, device="cpu")
    base = {k: round(v, 4) for k, v in score(model, tok, None, perplexity_limit=args.ppl_docs).items()}
    base["accuracy"] = {
        task: round(
            evaluate.task_accuracy(model, tok, task, "test", limit=args.eval_items, progress=False), 4
        )
        for task in tasks
    }
    return base


def write(args, methods, tasks, base, rows, start, argv, final: bool) -> None:
    """Write the results JSON (also after each run, `"complete": false`, so a cut-short run keeps its rows)."""
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "methods", "tasks")}
    result = {
        "command": "python "
        + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "device": "cpu",
        "threads": args.threads or torch.get_num_threads(),
        "settings": settings,
        "methods": methods,
        "tasks": tasks,
        "base": base,
        "rows": rows,
        "complete": final,
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    out = write_json(args.out, result, indent=1)
    if final:
        print(f"wrote {out} in {result['total_seconds']:.0f} s")


def _init_worker(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke test: few steps, few items, few methods")
    ap.add_argument("--base-model", default=None, help="default: the bundled tiny model")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=96)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--targets", default="all-linear")
    ap.add_argument("--lr", type=float, default=3e-3, help="LoRA learning rate (A's, for LoRA+)")
    ap.add_argument("--full-lr", type=float, default=1e-3, help="full fine-tuning learning rate")
    ap.add_argument("--loraplus-ratio", type=float, default=16.0, help="LoRA+ lr_B / lr_A")
    ap.add_argument("--calib-samples", type=int, default=64, help="calibration samples (CorDA, LoRA-Null)")
    ap.add_argument("--eval-items", type=int, default=200, help="test items scored per task")
    ap.add_argument("--ppl-docs", type=int, default=200, help="corpus-test documents for perplexity")
    ap.add_argument("--early-steps", type=int, default=20, help="steps averaged for the early loss")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads per run (default: torch's)")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (separate processes)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "variants.json"))
    quick = "--quick" in (sys.argv[1:] if argv is None else argv)
    if quick:  # smaller defaults; anything given on the command line still wins
        ap.set_defaults(
            steps=10, eval_items=16, ppl_docs=32, early_steps=5, calib_samples=8,
            methods="lora,loraplus,pissa,corda-kpm,lora-null,loftq,dora,full",
            out=str(RESULTS_DIR / "variants_quick.json"),
        )  # fmt: skip
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    tasks = args.tasks.split(",")

    start = time.perf_counter()
    jobs = [(method, task) for method in methods for task in tasks]  # both tasks of a method together
    with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(args.threads,)) as pool:  # fmt: skip
        base_future = pool.submit(measure_base, tasks, args)
        futures = {pool.submit(run_one, method, task, args): (method, task) for method, task in jobs}
        done = {}
        for future in tqdm(as_completed(futures), total=len(futures), desc="runs"):
            row = future.result()
            done[futures[future]] = row
            print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
            partial = [done[job] for job in jobs if job in done]
            base_now = base_future.result() if base_future.done() else None
            write(args, methods, tasks, base_now, partial, start, argv, final=False)
        base = base_future.result()
    rows = [done[job] for job in jobs]  # in a fixed order, whatever order the workers finished in
    print(f"base: {base}", flush=True)

    write(args, methods, tasks, base, rows, start, argv, final=True)
    if any(math.isnan(r["final_loss"]) for r in rows):
        print("warning: some runs diverged (NaN loss)")


if __name__ == "__main__":
    main()
