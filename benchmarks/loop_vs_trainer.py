"""Train the same LoRA twice, with lora_lab's own loop and with PEFT + TRL's SFTTrainer; compare.

    python benchmarks/loop_vs_trainer.py            # sql, 250 steps each (about 2 minutes on CPU)
    python benchmarks/loop_vs_trainer.py --quick    # 20 steps, 40 items: a smoke run, nothing written

Both runs start from the bundled base model with the same seed, see the same data (the task's train
split, chat-formatted, loss on the assistant's answer only), and use the same recipe: r=8, alpha=16 on
q,k,v,o; AdamW with a constant learning rate and no weight decay; gradient norm clipped to 1.0;
batch 32. What differs is everything else: lora_lab's `LoRALinear` and 100-line loop on one side;
PEFT's `LoraModel`, `Trainer`'s data loader, shuffling and optimizer set-up on the other. So the two
adapters are not equal tensor by tensor; the claim is that they are equally good, and interchangeable:

- accuracy on the test split (execution accuracy for `sql`) within `TOLERANCE` of each other;
- the lora_lab adapter, saved in PEFT's format, loads with `PeftModel.from_pretrained` and the PEFT
  adapter loads with `lora_lab.load_adapter`; in both cases the logits equal those of the model that
  trained it (max difference printed) and the accuracy is the same.

Writes `data/results/loop_vs_trainer.json` (chapter 05 prints it).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

TOLERANCE = 0.05  # accuracy points: 10 of the 200 test items
RESULTS = REPO / "data" / "results" / "loop_vs_trainer.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _probe_logits(model, tok, task: str) -> torch.Tensor:
    """Logits of the first 8 test prompts: the fingerprint two loaders must agree on."""
    from lora_lab import data
    from lora_lab.train import collate, encode_example

    rows = data.load_task(task, "test")[:8]
    batch = collate([encode_example(tok, r, 96) for r in rows], tok.pad_token_id)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def train_lora_lab(task: str, steps: int, lr: float, batch_size: int, seed: int, out: Path) -> dict:
    """lora_lab's LoRALinear + lora_lab.train, saved in PEFT's file format."""
    import lora_lab
    from lora_lab.experiments import finetune

    model, tok = lora_lab.load_base(device="cpu")
    lora_lab.seed_everything(seed)
    lora_lab.add_lora(model, lora_lab.LoRAConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    res = finetune(model, tok, task, steps=steps, lr=lr, batch_size=batch_size, seed=seed)
    lora_lab.save_adapter(model, out)
    return {"model": model, "tok": tok, "losses": res["losses"], "seconds": res["seconds"],
            "final_loss": res["final_loss"]}  # fmt: skip


def train_peft_trl(task: str, steps: int, lr: float, batch_size: int, seed: int, out: Path) -> dict:
    """PEFT's LoRA + TRL's SFTTrainer (a transformers Trainer), the sources' workflow."""
    import datasets
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    import lora_lab
    from lora_lab import data

    datasets.disable_progress_bars()
    model, tok = lora_lab.load_base(device="cpu")
    lora_lab.seed_everything(seed)
    rows = [{"messages": r["messages"]} for r in data.load_task(task, "train")]
    args = SFTConfig(
        output_dir=str(out / "trainer"), max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch", assistant_only_loss=True, max_length=96,
        logging_steps=10, save_strategy="no", report_to=[], disable_tqdm=True, seed=seed,
        dataloader_pin_memory=False, use_cpu=not torch.cuda.is_available(),
        # The same recipe as lora_lab's loop: fp32, no gradient checkpointing. TRL's SFTConfig
        # defaults to bf16=True, which on a CPU is emulated: 5x slower per step, measured.
        bf16=False, gradient_checkpointing=False,
    )  # fmt: skip
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tok,
                         peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                target_modules=TARGETS))  # fmt: skip
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    seconds = time.perf_counter() - start
    trainer.model.save_pretrained(out)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    trainer.model.eval()
    return {"model": trainer.model, "tok": tok, "losses": losses, "seconds": seconds}


def compare(task: str = "sql", steps: int = 250, lr: float = 3e-3, batch_size: int = 32, seed: int = 0,
            limit: int | None = None, workdir: Path | None = None) -> dict:  # fmt: skip
    """Both trainings, both evaluations, both cross-loads; returns a dict of plain numbers."""
    from peft import PeftModel

    import lora_lab
    from lora_lab.evaluate import task_accuracy

    work = Path(workdir or tempfile.mkdtemp())
    ours = train_lora_lab(task, steps, lr, batch_size, seed, work / "lora_lab")
    theirs = train_peft_trl(task, steps, lr, batch_size, seed, work / "peft_trl")
    tok = ours["tok"]

    def acc(model) -> float:
        return task_accuracy(model, tok, task, "test", limit=limit, progress=False)

    # lora_lab's file in PEFT, PEFT's file in lora_lab: fresh base models each time.
    base, _ = lora_lab.load_base(device="cpu")
    ours_in_peft = PeftModel.from_pretrained(base, work / "lora_lab").eval()
    base, _ = lora_lab.load_base(device="cpu")
    theirs_in_lora_lab = lora_lab.load_adapter(base, work / "peft_trl").eval()

    def diff(a, b) -> float:
        return float((_probe_logits(a, tok, task) - _probe_logits(b, tok, task)).abs().max())

    rows = {
        "lora_lab loop": {"accuracy": acc(ours["model"]), "seconds": round(ours["seconds"], 1),
                          "final_loss": round(ours["final_loss"], 4)},
        "PEFT + SFTTrainer": {"accuracy": acc(theirs["model"]), "seconds": round(theirs["seconds"], 1),
                              "final_loss": round(theirs["losses"][-1], 4)},
    }  # fmt: skip
    cross = {
        "lora_lab adapter in PEFT": {"accuracy": acc(ours_in_peft),
                                     "max_logit_diff": diff(ours["model"], ours_in_peft)},
        "PEFT adapter in lora_lab": {"accuracy": acc(theirs_in_lora_lab),
                                     "max_logit_diff": diff(theirs["model"], theirs_in_lora_lab)},
    }  # fmt: skip
    gap = abs(rows["lora_lab loop"]["accuracy"] - rows["PEFT + SFTTrainer"]["accuracy"])
    return {
        "task": task,
        "trained": rows,
        "cross_loaded": cross,
        "accuracy_gap": round(gap, 4),
        "tolerance": TOLERANCE,
        "meta": {
            "command": "python benchmarks/loop_vs_trainer.py",
            "steps": steps,
            "lr": lr,
            "batch_size": batch_size,
            "seed": seed,
            "r": 8,
            "lora_alpha": 16,
            "target_modules": TARGETS,
            "eval_items": limit or 200,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "date": datetime.date.today().isoformat(),
        },  # fmt: skip
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="sql", choices=["sql", "support"])
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="20 steps, 40 items, nothing written")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        print(json.dumps(compare(args.task, steps=20, lr=args.lr, limit=40), indent=1))
        return
    result = compare(args.task, steps=args.steps, lr=args.lr)
    print(json.dumps(result, indent=1))
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
