"""A minimal training loop for any model whose trainable parameters are already chosen.

The same ~100 lines train a full fine-tune (every parameter trainable), a PEFT model, or a model with
`lora_lab` adapters injected: the loop only ever optimizes the parameters with `requires_grad=True`
(or the `params` it is given). That is the whole point of LoRA seen from the training loop: nothing
changes except which tensors the optimizer holds.

- Chat examples (`{"messages": [...]}`) are rendered with the tokenizer's chat template; with
  `assistant_only_loss=True` the loss covers only the assistant's answer (labels are -100 elsewhere),
  as TRL's `SFTTrainer(assistant_only_loss=True)` does.
- Plain text examples (a string or `{"text": ...}`) train on every token: continued pretraining.

Batches are drawn from a seeded shuffle (`batch_rows`), padded on the right to the longest example in
the batch. The learning rate is constant after an optional linear warm-up (or follows `lr_schedule`);
the gradient norm is clipped to 1.0 by default (transformers' `Trainer` default), which keeps a few
unlucky early steps from wrecking a small model.

This is the package's one training loop. Its arguments reproduce every caller's choices: the command
line (`lora_lab.cli`: `accelerator=` splits each batch over processes), the explorer of chapter 04
(`lora_lab.widgets`: `loss_fn=answer_loss`, no clipping, a `callback` that measures the update),
pretraining (`lora_lab.pretrain`: its own optimizer, schedule and block sampler) and the fine-tune
recipe every benchmark and the model card share (`lora_lab.experiments`). `final_loss` is the one
summary of a loss curve.

Left out: gradient accumulation, mixed precision, schedulers beyond what `lr_schedule` expresses
(chapter 05 shows transformers' Trainer and TRL for those).
"""

from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lora_lab.inject import parameter_count

__all__ = [
    "train",
    "batch_rows",
    "final_loss",
    "model_loss",
    "answer_loss",
    "warmup_schedule",
    "encode_chat",
    "encode_example",
    "encode_examples",
    "collate",
]


def encode_chat(
    tokenizer, example: dict, seq_len: int, assistant_only_loss: bool = True
) -> tuple[list, list]:
    """Token ids and labels for one chat example, truncated to `seq_len` tokens.

    The prompt is everything before the last assistant turn (rendered with `add_generation_prompt`);
    with `assistant_only_loss` its labels are -100 so only the answer (and its end token) is learned.
    """
    messages = example["messages"]
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("a chat example must end with an assistant message (the answer to learn)")
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template does not render the prompt as a prefix of the full chat")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + answer_ids)[:seq_len]
    labels = ([-100] * len(prompt_ids) if assistant_only_loss else list(prompt_ids)) + answer_ids
    return ids, labels[:seq_len]


def encode_example(tokenizer, example, seq_len: int, assistant_only_loss: bool = True) -> tuple[list, list]:
    """Encode a chat example (dict with "messages") or a text example (str or dict with "text")."""
    if isinstance(example, dict) and "messages" in example:
        return encode_chat(tokenizer, example, seq_len, assistant_only_loss)
    text = example["text"] if isinstance(example, dict) else example
    if not isinstance(text, str):
        raise TypeError(
            f"an example must be a str, {{'text': str}} or {{'messages': [...]}}, got {type(example)}"
        )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    ids = ids[:seq_len]
    return ids, list(ids)


def encode_examples(tokenizer, examples: list, seq_len: int, assistant_only_loss: bool = True) -> list:
    """`encode_example` for every example, leaving out those whose whole answer `seq_len` cuts off.

    Such an example has no token to learn (its loss would be 0/0); a warning says how many were left out,
    and a ValueError says what to raise when `seq_len` cuts off every answer.
    """
    encoded = [encode_example(tokenizer, ex, seq_len, assistant_only_loss) for ex in examples]
    kept = [(ids, labels) for ids, labels in encoded if any(t != -100 for t in labels[1:])]
    if not kept:
        raise ValueError(
            f"seq_len={seq_len} cuts off the whole answer of every one of the {len(encoded)} examples (their prompts "
            f"fill all {seq_len} tokens), so there is nothing to learn; raise seq_len (e.g. to {4 * seq_len})"
        )
    if len(kept) < len(encoded):
        warnings.warn(
            f"seq_len={seq_len} cuts off the whole answer of {len(encoded) - len(kept)} of {len(encoded)} examples; "
            "they are left out of training (raise seq_len to keep them)",
            stacklevel=2,
        )
    return kept


def collate(batch: list[tuple[list, list]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of (ids, labels) to the longest; returns input_ids, attention_mask, labels."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [batch, seq]
    labels = torch.full((len(batch), width), -100, dtype=torch.long)  # [batch, seq]
    mask = torch.zeros((len(batch), width), dtype=torch.long)  # [batch, seq]
    for i, (ids, lab) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def batch_rows(n_examples: int, batch_size: int, steps: int, seed: int) -> Iterator[list[int]]:
    """The row indices of each of `steps` batches: a fresh `random.Random(seed)` shuffle each epoch.

    The one sampler of the package: every process of a multi-process run draws the same global
    batches from it, and the same seed gives every setting of a sweep the same data in the same order.
    """
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:  # a fresh seeded shuffle each epoch
            more = list(range(n_examples))
            rng.shuffle(more)
            order.extend(more)
        rows, order = order[:batch_size], order[batch_size:]
        yield rows


def final_loss(losses: list[float], window: int | None = None) -> float:
    """The mean of the last `window` losses (default: the last tenth of the run, at least one step).

    One noisy step says little; the mean over the end of the run is what a table compares. The
    benchmarks that report "the last 10 steps" pass `window=10`.
    """
    if not losses:
        raise ValueError("no losses: the run did not take a step")
    tail = losses[-(window or max(1, len(losses) // 10)) :]
    return sum(tail) / len(tail)


def model_loss(model, batch: dict) -> torch.Tensor:
    """The model's own loss (transformers shifts the labels and averages over the labelled tokens)."""
    return model(**batch).loss


def answer_loss(model, batch: dict, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of each next token whose label is not -100, computed here from the logits.

    "mean" averages over those tokens (what `model_loss` computes, written out); "sum" adds them up,
    which the multi-process loop divides by the token count of the whole global batch.
    """
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).logits  # [b, seq, vocab]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(),  # [b * (seq - 1), vocab]
        batch["labels"][:, 1:].reshape(-1),  # [b * (seq - 1)]
        reduction=reduction,
    )


def warmup_schedule(warmup_steps: int) -> Callable[[int, float], float] | None:
    """lr at step `step` (from 0) for a base rate: a linear warm-up over `warmup_steps`, then constant."""
    if not warmup_steps:
        return None  # the rate stays the optimizer's own
    return lambda step, base: base * min(1.0, (step + 1) / warmup_steps)


def train(
    model,
    tokenizer,
    examples: list | None,
    *,
    steps: int,
    lr: float | None = None,
    batch_size: int = 32,
    seq_len: int = 96,
    seed: int = 0,
    optimizer: str | torch.optim.Optimizer = "adamw",
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    lr_schedule: Callable[[int, float], float] | None = None,
    max_grad_norm: float | None = 1.0,
    params=None,
    assistant_only_loss: bool = True,
    encoded: list | None = None,
    loss_fn: Callable = model_loss,
    sampler: Callable = batch_rows,
    callback: Callable[[int, float], bool | None] | None = None,
    accelerator=None,
    max_seconds: float | None = None,
    progress: bool = True,
    log_every: int = 25,
    desc: str = "train",
) -> dict:
    """Train `model` on `examples` for `steps` optimizer steps; returns a dict of plain numbers.

    Returns `{"losses": [loss per step], "steps": steps done, "seconds": wall time,
    "tokens": tokens seen, "trainable_params": count}`. The model is left in eval mode.

    - `optimizer`: "adamw" or "sgd" over the trainable parameters at `lr`, or a ready optimizer (its
      parameter groups keep their own rates, as LoRA+ needs); `lr_schedule(step, base_lr)` sets each
      group's rate every step (default: `warmup_schedule(warmup_steps)`).
    - `encoded`: already tokenized (ids, labels) pairs instead of `examples`; `sampler(n, batch_size,
      steps, seed)` yields each batch's rows (default `batch_rows`); `loss_fn(model, batch)`.
    - `callback(step, loss)` runs after every step (from 1); a true return value stops the run, and
      so does `max_seconds`. An exception it raises (e.g. on a non-finite loss) ends the run too.
    - `accelerator` (accelerate's): each process takes rows `[rank::world]` of every global batch and
      the loss is the summed `answer_loss` over the global batch's tokens (see `lora_lab.cli`).
    """
    _check_arguments(steps, lr, optimizer, batch_size, seq_len, examples, encoded, max_grad_norm)
    opt, params = _optimizer(model, optimizer, lr, weight_decay, params)
    if encoded is None:
        encoded = encode_examples(tokenizer, examples, seq_len, assistant_only_loss)
    schedule = lr_schedule or warmup_schedule(warmup_steps)
    base_lrs = [group["lr"] for group in opt.param_groups]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed)
    bar = tqdm(total=steps, desc=desc, leave=False, disable=not progress)
    losses, tokens = [], 0
    model.train()
    start = time.perf_counter()
    try:
        for step, rows in enumerate(sampler(len(encoded), batch_size, steps, seed)):
            for group, base in zip(opt.param_groups, base_lrs if schedule is not None else ()):
                group["lr"] = schedule(step, base)
            loss, n = _step(model, encoded, rows, pad_id, loss_fn, params, max_grad_norm, accelerator)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss)
            tokens += n
            bar.update(1)
            if step % log_every == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{loss:.3f}")
            stop = callback is not None and callback(step + 1, loss)  # the callback runs every step
            if stop or (max_seconds is not None and time.perf_counter() - start > max_seconds):
                break
    finally:
        bar.close()
        model.eval()
    return {
        "losses": losses,
        "steps": len(losses),
        "seconds": time.perf_counter() - start,
        "tokens": tokens,
        "trainable_params": sum(parameter_count(p) for p in params),
    }


def _check_arguments(steps, lr, optimizer, batch_size, seq_len, examples, encoded, max_grad_norm) -> None:
    """ValueError for settings that cannot train, saying what to pass instead."""
    if not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if isinstance(optimizer, str) and not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(
            f"lr must be a positive number (e.g. 3e-3 for LoRA, 1e-3 for full fine-tuning), got {lr!r}"
        )
    if batch_size <= 0 or seq_len <= 1:
        raise ValueError(f"batch_size must be > 0 and seq_len > 1, got {batch_size} and {seq_len}")
    if not examples and not encoded:
        raise ValueError("examples is empty: pass a list of chat or text examples")
    if max_grad_norm is not None and not (max_grad_norm >= 0 and math.isfinite(max_grad_norm)):
        raise ValueError(
            f"max_grad_norm must be a positive number (e.g. 1.0), or 0/None for no clipping, got {max_grad_norm!r}; "
            "a negative norm flips the gradient and trains uphill"
        )


def _optimizer(model, optimizer, lr, weight_decay, params) -> tuple[torch.optim.Optimizer, list]:
    """The optimizer and the parameters it trains (those with requires_grad)."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer, [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    if not params:
        raise ValueError(
            "no trainable parameters: mark some with requires_grad=True (e.g. inject LoRA adapters) or pass params"
        )
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), params
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay), params
    raise ValueError(f"unknown optimizer {optimizer!r}; use 'adamw' or 'sgd'")


def _step(
    model, encoded: list, rows: list[int], pad_id: int, loss_fn, params: list, max_grad_norm, accelerator
):
    """Loss and gradients of one batch (this process's share of it); returns (loss, tokens)."""
    if accelerator is None:
        batch = collate([encoded[i] for i in rows], pad_id)
        batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
        loss = loss_fn(model, batch)
        loss.backward()
        if max_grad_norm:  # clip the gradient norm, as transformers' Trainer does by default
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        return float(loss.detach()), int(batch["attention_mask"].sum())
    # Each process divides its summed token loss by the token count of the whole global batch and
    # multiplies by the number of processes; DDP averages the gradients, so the update equals the
    # one-process update on the whole batch (up to float summation order).
    world, rank = accelerator.num_processes, accelerator.process_index
    n_tokens = sum(sum(t != -100 for t in encoded[i][1][1:]) for i in rows)  # predicted tokens, all processes
    batch = collate([encoded[i] for i in rows[rank::world]], pad_id)
    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
    token_loss = answer_loss(model, batch, reduction="sum")
    accelerator.backward(token_loss * world / n_tokens)
    if max_grad_norm:
        accelerator.clip_grad_norm_(params, max_grad_norm)
    loss = accelerator.reduce(token_loss.detach(), reduction="sum").item() / n_tokens
    return loss, int(batch["attention_mask"].sum())


if __name__ == "__main__":  # `python -m lora_lab.train --config ...` is `lora-lab train --config ...`
    import sys

    from lora_lab.cli import main

    raise SystemExit(main(["train", *sys.argv[1:]]))
