"""Pretraining the bundled tiny base model, and measuring what its model card reports.

`python -m lora_lab.pretrain` rebuilds `data/models/tiny-base/` from the generated corpus:

1. trains a byte-level BPE tokenizer (`tokenizers`) on the corpus and wraps it as a transformers fast
   tokenizer with special tokens (`<|endoftext|>` = eos, `<|pad|>`, `<|user|>`, `<|assistant|>`,
   `<|system|>`) and the chat template of `lora_lab.data.CHAT_TEMPLATE`;
2. builds a small `LlamaForCausalLM` (untied lm_head, so "all-linear" LoRA targets visibly leave it out);
3. trains it on the corpus packed into 128-token blocks (AdamW, warm-up then cosine decay, seeded),
   with a progress bar, and saves weights (safetensors), config, generation config, tokenizer and the
   loss curve (`loss_curve.json`, `loss_curve.png`).

The training steps go through the package's one loop (`lora_lab.train.train`) with pretraining's
own optimizer (AdamW, betas 0.9/0.95, weight decay 0.1), schedule (`lr_at`) and block sampler
(`block_rows`). `python -m lora_lab.pretrain --report` measures and writes the model card
(`lora_lab.model_card`).

Left out: everything that makes real pretraining hard (data at scale, mixed precision, sharding).
References: Touvron et al. 2023 (Llama); Sennrich et al. 2016 (BPE).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

import torch

from lora_lab import data
from lora_lab.paths import TINY_BASE_DIR

__all__ = [
    "SPECIAL_TOKENS",
    "VOCAB_SIZE",
    "MODEL_CONFIG",
    "build_tokenizer",
    "build_model",
    "pack",
    "lr_at",
    "block_rows",
    "pretrain",
    "main",
]

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>"]
VOCAB_SIZE = 2048
MODEL_CONFIG = {
    "hidden_size": 192,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 3,
    "num_key_value_heads": 3,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
SEQ_LEN = 128
BATCH_SIZE = 16
STEPS = 3000
PEAK_LR = 3e-3
WARMUP = 100
SEED = 0


def build_tokenizer(texts: list[str]):
    """Train a byte-level BPE tokenizer on `texts`; returns a `PreTrainedTokenizerFast` with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )

    def plain(t: str) -> str:  # special tokens are added whole; keep them out of the merges
        for s in SPECIAL_TOKENS:
            t = t.replace(s, "\n")
        return t

    tok.train_from_iterator((plain(t) for t in texts), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        extra_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
        model_max_length=MODEL_CONFIG["max_position_embeddings"],
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )
    fast.chat_template = data.CHAT_TEMPLATE
    return fast


def build_model(tokenizer, seed: int = SEED):
    """A freshly initialised `LlamaForCausalLM` of `MODEL_CONFIG` size for `tokenizer`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_CONFIG,
    )
    return LlamaForCausalLM(config)


def pack(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """Concatenate documents (each followed by eos) and cut into [n_blocks, seq_len] blocks."""
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)  # [blocks, seq]


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Pretraining's rate at `step` (from 0): linear warm-up to `peak`, then cosine decay to peak / 10."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def block_rows(n_blocks: int, batch_size: int, steps: int, seed: int):
    """Pretraining's sampler: a seeded `torch.randperm` of the blocks, a fresh one when a batch no
    longer fits (the bundled model was trained with it; `train.batch_rows` is everyone else's)."""
    gen = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(n_blocks, generator=gen), 0
    for _ in range(steps):
        if pos + batch_size > len(order):
            order, pos = torch.randperm(n_blocks, generator=gen), 0
        yield order[pos : pos + batch_size].tolist()
        pos += batch_size


def block_loss(model, batch: dict) -> torch.Tensor:
    """Next-token loss of full blocks (no padding, so no attention mask)."""
    return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss


def pretrain(
    out_dir: str | Path = TINY_BASE_DIR,
    steps: int = STEPS,
    seed: int = SEED,
    threads: int = 1,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 0,
) -> dict:
    """Train tokenizer and model from scratch on the corpus and save them in `out_dir`. Deterministic."""
    from lora_lab.evaluate import perplexity
    from lora_lab.runtime import seed_everything
    from lora_lab.train import train

    torch.set_num_threads(threads)
    seed_everything(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = data.load_corpus("train")
    tokenizer = build_tokenizer(texts)
    model = build_model(tokenizer, seed)
    blocks = pack(tokenizer, texts, SEQ_LEN)  # [n_blocks, seq]
    val_texts = data.load_corpus("validation")[:200]
    opt = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, betas=(0.9, 0.95), weight_decay=0.1)
    curve: dict = {"step": [], "loss": [], "val_step": [], "val_loss": []}

    def validate_and_checkpoint(done: int, loss: float) -> None:
        if done % 200 == 0 or done == steps:
            curve["val_step"].append(done - 1)
            curve["val_loss"].append(
                round(math.log(perplexity(model, tokenizer, val_texts, seq_len=SEQ_LEN)), 4)
            )
            model.train()
        if checkpoint_dir is not None and checkpoint_every and done % checkpoint_every == 0:
            model.save_pretrained(Path(checkpoint_dir) / f"step{done}")
            tokenizer.save_pretrained(Path(checkpoint_dir) / f"step{done}")

    run = train(
        model, tokenizer, None, encoded=[(ids, ids) for ids in blocks.tolist()], steps=steps,
        batch_size=BATCH_SIZE, seed=seed, optimizer=opt, lr_schedule=lambda step, peak: lr_at(step, steps, peak, WARMUP),
        max_grad_norm=1.0, loss_fn=block_loss, sampler=block_rows, callback=validate_and_checkpoint,
        log_every=10, desc="pretrain",
    )  # fmt: skip
    curve["step"] = list(range(run["steps"]))
    curve["loss"] = [round(loss, 4) for loss in run["losses"]]
    model.generation_config.do_sample = False
    model.generation_config.max_new_tokens = 64
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    (out / "model.safetensors").chmod(0o644)  # safetensors writes 0600; the file is meant to be shared
    tokenizer.save_pretrained(out)
    info = {
        "steps": steps,
        "seconds": round(run["seconds"], 1),
        "tokens_seen": steps * BATCH_SIZE * SEQ_LEN,
        "corpus_tokens": int(blocks.numel()),
        "batch_size": BATCH_SIZE,
        "seq_len": SEQ_LEN,
        "peak_lr": PEAK_LR,
        "threads": threads,
        "final_train_loss": curve["loss"][-1],
        "final_val_loss": curve["val_loss"][-1],
    }
    curve["info"] = info
    (out / "loss_curve.json").write_text(json.dumps(curve) + "\n")
    _plot_curve(curve, out / "loss_curve.png")
    return info


def _plot_curve(curve: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    k = 20
    smooth = [sum(curve["loss"][max(0, i - k) : i + 1]) / len(curve["loss"][max(0, i - k) : i + 1])
              for i in range(len(curve["loss"]))]  # fmt: skip
    ax.plot(curve["step"], smooth, label="train (moving average)")
    ax.plot(curve["val_step"], curve["val_loss"], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("tiny-base pretraining")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """`python -m lora_lab.pretrain`: pretrain the tiny base model (`--report`: see `lora_lab.model_card`)."""
    ap = argparse.ArgumentParser(description="Pretrain LoRA Lab's tiny base model.")
    ap.add_argument("--out", default=str(TINY_BASE_DIR), help="model folder (default: data/models/tiny-base)")
    ap.add_argument("--steps", type=int, default=STEPS, help="pretraining steps")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy CPU)")
    ap.add_argument("--checkpoint-dir", default=None, help="also save checkpoints here")
    ap.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints")
    args = ap.parse_args(argv)
    random.seed(SEED)
    info = pretrain(
        args.out,
        steps=args.steps,
        threads=args.threads,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
    )
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    if "--report" in sys.argv:  # the model card's measurements: `python -m lora_lab.model_card`
        from lora_lab.model_card import main as card_main

        card_main([a for a in sys.argv[1:] if a != "--report"])
    else:
        main()
