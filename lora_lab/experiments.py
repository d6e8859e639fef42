"""Fine-tune, then score: the one recipe behind the model card and every benchmark's table.

A measurement in this book is always the same three moves: train a prepared model (LoRA injected,
a PEFT model, every weight trainable, a variant) on a task's train split with `lora_lab.train.train`,
then score what it learned (task accuracy on a held-out split) and what it kept (knowledge-probe
accuracy, corpus perplexity). The scripts differ only in how they prepare the model and which
columns they keep, so the recipe lives here once:

    model = add_lora(model, LoRAConfig(r=8, lora_alpha=16))      # or get_peft_model, or full
    row = finetune_and_score(model, tok, "sql", steps=250, lr=3e-3, split="test")
    row["accuracy"], row["final_loss"], row["probe_accuracy"]

The values are unrounded; each table rounds them as it prints them.

Left out: preparing the model (that is what the scripts compare), seeds across runs (call
`runtime.seed_everything` before preparing), and writing results (each script owns its JSON).
References: `lora_lab.train.train` (the loop), `lora_lab.evaluate` (the scores).
"""

from __future__ import annotations

from lora_lab.data import load_task
from lora_lab.evaluate import perplexity, probe_accuracy, task_accuracy
from lora_lab.train import final_loss, train

__all__ = ["finetune", "score", "finetune_and_score"]


def finetune(model, tokenizer, task: str, *, steps: int, lr: float | None = None, batch_size: int = 32,
             seed: int = 0, final_window: int | None = 10, **train_kwargs) -> dict:  # fmt: skip
    """Train `model` (in place) on `task`'s train split; `train.train`'s result plus `final_loss`.

    `final_loss` is the mean of the last `final_window` steps (10, what the tables report; None:
    the last tenth). `train_kwargs` go to `train.train` (optimizer, max_grad_norm, encoded, ...).
    """
    examples = None if "encoded" in train_kwargs else load_task(task, "train")
    train_kwargs.setdefault("progress", False)
    run = train(
        model, tokenizer, examples, steps=steps, lr=lr, batch_size=batch_size, seed=seed, **train_kwargs
    )
    return {**run, "final_loss": final_loss(run["losses"], final_window)}


def score(model, tokenizer, task: str | None, split: str = "test", *, limit: int | None = None,
          probes: bool = True, perplexity_limit: int | None = None, answers: bool = False) -> dict:  # fmt: skip
    """What `model` learned and kept: `accuracy` on `task`'s `split` (if a task is given),
    `probe_accuracy` (if `probes`), corpus-test `perplexity` over `perplexity_limit` documents (if
    given), and the generated `answers` (if asked, e.g. for `evaluate.accuracy_by_shape`)."""
    out = {}
    if task is not None:
        acc, generated = task_accuracy(
            model, tokenizer, task, split, limit=limit, progress=False, return_answers=True
        )
        out["accuracy"] = acc
        if answers:
            out["answers"] = generated
    if probes:
        out["probe_accuracy"] = probe_accuracy(model, tokenizer)
    if perplexity_limit:
        out["perplexity"] = perplexity(model, tokenizer, "test", limit=perplexity_limit)
    return out


def finetune_and_score(model, tokenizer, task: str, *, steps: int, lr: float | None = None, split: str = "test",
                       limit: int | None = None, probes: bool = True, perplexity_limit: int | None = None,
                       answers: bool = False, **finetune_kwargs) -> dict:  # fmt: skip
    """`finetune` then `score`: one row of plain numbers.

    Keys: steps, seconds, tokens, trainable_params, losses, final_loss, accuracy, and, as asked,
    probe_accuracy, perplexity, answers.
    """
    row = finetune(model, tokenizer, task, steps=steps, lr=lr, **finetune_kwargs)
    model.eval()
    return {**row, **score(model, tokenizer, task, split, limit=limit, probes=probes,
                           perplexity_limit=perplexity_limit, answers=answers)}  # fmt: skip
