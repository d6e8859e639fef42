"""Training-step time of lora_lab vs PEFT on the same model, config, data and starting weights.

One step = forward + backward + AdamW step, in training mode. Both models are built from the
same base weights and get the same A/B values; runs are paired and interleaved in one process
(one lora_lab step, one PEFT step, then the other way round, ...) so drift in machine load hits
both sides. Each repeat gives a ratio of median step times (lora_lab / PEFT); the result is the
median ratio over repeats. Below 1.0 means lora_lab is faster.

Writes data/results/train_step.json. Run:

    python benchmarks/bench_train_step.py                # full run (about two minutes on one CPU core)
    python benchmarks/bench_train_step.py --quick        # a smoke run, not written unless --out

The model is the bundled data/models/tiny-base when it exists, else a tiny random Llama of
similar size (hidden 192, 4 layers, vocab 2048); the JSON records which.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lora_lab.inject import LoRAConfig, add_lora, count_parameters  # noqa: E402
from lora_lab.paths import RESULTS_DIR, TINY_BASE_DIR, write_json  # noqa: E402
from lora_lab.pretrain import MODEL_CONFIG, VOCAB_SIZE  # noqa: E402


def build_base(seed: int = 0):
    """The bundled model if present, else a tiny random Llama; returns (model, description)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if (TINY_BASE_DIR / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(TINY_BASE_DIR, dtype=torch.float32)
        return model, f"bundled {TINY_BASE_DIR.relative_to(TINY_BASE_DIR.parents[2])}"
    config = LlamaConfig(vocab_size=VOCAB_SIZE, **MODEL_CONFIG)  # the bundled model's shape
    return LlamaForCausalLM(config), "tiny random Llama (data/models/tiny-base missing)"


def make_pair(config: LoRAConfig):
    """lora_lab and PEFT models on identical base weights with identical adapter weights."""
    from peft import LoraConfig, get_peft_model

    ours, description = build_base()
    theirs, _ = build_base()
    add_lora(ours, config)
    peft_config = LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        task_type="CAUSAL_LM",
    )
    theirs = get_peft_model(theirs, peft_config)
    theirs_params = {
        k.removeprefix("base_model.model.").replace(".default.", "."): p
        for k, p in theirs.named_parameters()
        if "lora_" in k
    }
    with torch.no_grad():
        for k, p in ours.named_parameters():
            if "lora_" in k:
                theirs_params[k].copy_(p)
    return ours.train(), theirs.train(), description


def make_step(model, batch: torch.Tensor, lr: float):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)

    def step() -> float:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def time_steps(step, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per side per repeat")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads; 1 keeps timings stable on a shared machine"
    )
    parser.add_argument("--quick", action="store_true", help="3 repeats of 3 steps, no file written")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.steps, args.warmup = 3, 3, 1
    out = args.out or (None if args.quick else RESULTS_DIR / "train_step.json")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LoRAConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear")
    ours, theirs, description = make_pair(config)
    vocab = ours.config.vocab_size
    batch = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    steps = {"lora_lab": make_step(ours, batch, 1e-3), "peft": make_step(theirs, batch, 1e-3)}

    for step in steps.values():
        time_steps(step, args.warmup)
    ratios, medians = [], {"lora_lab": [], "peft": []}
    for repeat in range(args.repeats):
        # interleave single steps (A B B A ...) so load changes on a shared machine hit both sides
        times = {"lora_lab": [], "peft": []}
        for i in range(args.steps):
            order = ["lora_lab", "peft"] if (i + repeat) % 2 == 0 else ["peft", "lora_lab"]
            for name in order:
                times[name] += time_steps(steps[name], 1)
        this = {name: statistics.median(values) for name, values in times.items()}
        for name, value in this.items():
            medians[name].append(value)
        ratios.append(this["lora_lab"] / this["peft"])
        print(
            f"repeat {repeat}: lora_lab {this['lora_lab'] * 1e3:.1f} ms  peft {this['peft'] * 1e3:.1f} ms  "
            f"ratio {ratios[-1]:.3f}"
        )

    import peft
    import transformers

    result = {
        "what": "training step (forward + backward + AdamW) time, lora_lab / PEFT, same model and adapter",
        "ratio_median": round(statistics.median(ratios), 4),
        "ratios": [round(r, 4) for r in ratios],
        "lora_lab_step_ms_median": round(statistics.median(medians["lora_lab"]) * 1e3, 2),
        "peft_step_ms_median": round(statistics.median(medians["peft"]) * 1e3, 2),
        "model": description,
        "model_params": count_parameters(ours)[1],
        "trainable_params": count_parameters(ours)[0],
        "batch": args.batch,
        "seq": args.seq,
        "repeats": args.repeats,
        "steps_per_repeat": args.steps,
        "config": config.to_dict(),
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }
    print(f"median ratio lora_lab / PEFT: {result['ratio_median']:.3f} (target <= 1.0)")
    if out is not None:
        print(f"wrote {write_json(out, result)}")
    return result


if __name__ == "__main__":
    main()
