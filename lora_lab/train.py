"""A minimal training loop for any model whose trainable parameters are already chosen.

The same ~100 lines train a full fine-tune (every parameter trainable), a PEFT model, or a model with
`lora_lab` adapters injected: the loop only ever optimizes the parameters with `requires_grad=True`
(or the `params` it is given). That is the whole point of LoRA seen from the training loop: nothing
changes except which tensors the optimizer holds.

- Chat examples (`{"messages": [...]}`) are rendered with the tokenizer's chat template; with
  `assistant_only_loss=True` the loss covers only the assistant's answer (labels are -100 elsewhere),
  as TRL's `SFTTrainer(assistant_only_loss=True)` does.
- Plain text examples (a string or `{"text": ...}`) train on every token: continued pretraining.

Batches are drawn from a seeded shuffle, padded on the right to the longest example in the batch.
The learning rate is constant after an optional linear warm-up; the gradient norm is clipped to 1.0
(transformers' `Trainer` default), which keeps a few unlucky early steps from wrecking a small model.

Left out: gradient accumulation, mixed precision, schedulers beyond warm-up, distributed training
(chapter 05 shows transformers' Trainer and TRL for those).
"""

from __future__ import annotations

import math
import random
import time
import warnings

import torch

__all__ = ["train", "encode_chat", "encode_example", "encode_examples", "collate", "main"]


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


def train(
    model,
    tokenizer,
    examples: list,
    *,
    steps: int,
    lr: float,
    batch_size: int = 32,
    seq_len: int = 96,
    seed: int = 0,
    optimizer: str = "adamw",
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    max_grad_norm: float | None = 1.0,
    params=None,
    assistant_only_loss: bool = True,
    max_seconds: float | None = None,
    progress: bool = True,
    log_every: int = 25,
) -> dict:
    """Train `model` on `examples` for `steps` optimizer steps; returns a dict of plain numbers.

    Returns `{"losses": [loss per step], "steps": steps done, "seconds": wall time,
    "tokens": tokens seen, "trainable_params": count}`. Stops early after `max_seconds` if given.
    The model is left in eval mode.
    """
    if not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(
            f"lr must be a positive number (e.g. 3e-3 for LoRA, 1e-3 for full fine-tuning), got {lr!r}"
        )
    if batch_size <= 0 or seq_len <= 1:
        raise ValueError(f"batch_size must be > 0 and seq_len > 1, got {batch_size} and {seq_len}")
    if not examples:
        raise ValueError("examples is empty: pass a list of chat or text examples")
    if max_grad_norm is not None and not (max_grad_norm >= 0 and math.isfinite(max_grad_norm)):
        raise ValueError(
            f"max_grad_norm must be a positive number (e.g. 1.0), or 0/None for no clipping, got {max_grad_norm!r}; "
            "a negative norm flips the gradient and trains uphill"
        )
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    if not params:
        raise ValueError(
            "no trainable parameters: mark some with requires_grad=True (e.g. inject LoRA adapters) or pass params"
        )
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; use 'adamw' or 'sgd'")

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = encode_examples(tokenizer, examples, seq_len, assistant_only_loss)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    order: list[int] = []
    dev = next(model.parameters()).device
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="train", leave=False)
    losses: list[float] = []
    tokens = 0
    model.train()
    start = time.perf_counter()
    try:
        for step in range(steps):
            if len(order) < batch_size:  # a fresh seeded shuffle each epoch
                more = list(range(len(encoded)))
                rng.shuffle(more)
                order.extend(more)
            idx, order = order[:batch_size], order[batch_size:]
            batch = {k: v.to(dev) for k, v in collate([encoded[i] for i in idx], pad_id).items()}
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else lr
            loss = model(**batch).loss
            loss.backward()
            if max_grad_norm:  # clip the gradient norm, as transformers' Trainer does by default
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            tokens += int(batch["attention_mask"].sum())
            if bar is not None:
                bar.update(1)
                if step % log_every == 0 or step == steps - 1:
                    bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if max_seconds is not None and time.perf_counter() - start > max_seconds:
                break
    finally:
        if bar is not None:
            bar.close()
        model.eval()
    return {
        "losses": losses,
        "steps": len(losses),
        "seconds": time.perf_counter() - start,
        "tokens": tokens,
        "trainable_params": sum(p.numel() for p in params),
    }


def main(argv: list[str] | None = None) -> int:
    """`python -m lora_lab.train --config configs/sql.yaml`: the same as `lora-lab train --config ...`."""
    import sys

    from lora_lab.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
