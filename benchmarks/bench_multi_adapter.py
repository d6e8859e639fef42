"""Generation throughput for a stream of requests spread over 1, 4, 16 and 64 LoRA adapters.

Each request is a prompt plus the name of the adapter it wants. Five ways to serve the stream:

    a  peft_set_adapter    PEFT, one request group at a time: set_adapter(name), generate the group
    b  peft_mixed          PEFT, mixed batches: generate(..., adapter_names=[...])
    c  lora_lab_mixed      lora_lab, mixed batches: stacked A/B + one gathered bmm per layer (BGMV)
    d  merge_per_group     lora_lab registry: merge(name), generate the group, unmerge()
    e  merged_single       one adapter merged into a plain model (merge_and_unload), every request
                           served by it: the speed of the base model, the upper bound
    a' peft_set_adapter_sorted   (a) with the whole stream sorted by adapter first: the best case
                           for switching, possible only if a server may hold requests back at will

The stream is served in batches of `--batch` requests in arrival order, as a server takes them
from its queue. (b), (c) and (e) run each batch as one generate call; (a) and (d) split each
batch into groups of requests sharing an adapter and run one call per group.

All methods generate the same number of tokens (greedy, EOS switched off so every request gets
exactly `new_tokens`), with the model's own `generate` and KV cache, in one process, interleaved
over repeats (a, b, c, d, e, a, b, ...) so that drift in machine load hits every method. The
result per method is the median tokens/s over repeats. Tokens are also compared: (a), (b) and (c)
must give the same tokens for every request (recorded as `tokens_equal_to_c`).

Writes data/results/multi_adapter.json. Run:

    python benchmarks/bench_multi_adapter.py            # full run (several minutes on 2 CPU cores)
    python benchmarks/bench_multi_adapter.py --quick    # smoke run, not written unless --out

The model is the bundled data/models/tiny-base when it exists, else a tiny random Llama
(hidden 256, 6 layers); the JSON records which, with batch size, prompt and generation lengths.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lora_lab import serving  # noqa: E402
from lora_lab.paths import RESULTS_DIR, TINY_BASE_DIR, write_json  # noqa: E402
from lora_lab.registry import AdapterRegistry  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = [
    "peft_set_adapter",
    "peft_mixed",
    "lora_lab_mixed",
    "merge_per_group",
    "merged_single",
    "peft_set_adapter_sorted",
]


def build_base():
    """(model, description, vocab for random prompts or a tokenizer); EOS switched off for fixed lengths."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (TINY_BASE_DIR / "model.safetensors").exists():
        model = AutoModelForCausalLM.from_pretrained(TINY_BASE_DIR, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(TINY_BASE_DIR)
        description = "bundled data/models/tiny-base"
    else:
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        )  # fmt: skip
        model, tokenizer = LlamaForCausalLM(config), None
        description = "tiny random Llama (data/models/tiny-base missing)"
    model.generation_config.eos_token_id = None  # every request generates exactly new_tokens
    model.generation_config.pad_token_id = 0
    return model.float().eval(), description, tokenizer


def make_prompts(tokenizer, n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """n prompts of about `length` tokens: task prompts from the data sets, or random ids."""
    rng = random.Random(seed)
    if tokenizer is not None:
        from lora_lab.data import load_task

        examples = load_task("support", "test") + load_task("sql", "test")
        rng.shuffle(examples)
        texts = [
            tokenizer.apply_chat_template(ex["messages"][:1], tokenize=False, add_generation_prompt=True)
            for ex in examples[:n]
        ]
        return [tokenizer(t, add_special_tokens=False)["input_ids"][-length:] for t in texts]
    return [
        [rng.randrange(3, vocab) for _ in range(length - rng.randrange(0, length // 4))] for _ in range(n)
    ]


def left_pad(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, width] input ids and attention mask, padded on the left."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return input_ids, mask


def save_adapters(model_factory, names: list[str], root: Path, r: int) -> None:
    """Random PEFT adapters (A and B non-zero, B scaled down) on all seven projections, one folder each."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False)
    peft_model = None
    for i, name in enumerate(names):
        torch.manual_seed(1000 + i)
        if peft_model is None:
            peft_model = get_peft_model(model_factory(), config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
    with torch.no_grad():
        for key, param in peft_model.named_parameters():
            if "lora_B" in key:
                param.mul_(0.1)
    peft_model.save_pretrained(root)  # non-default adapters go to root/<name>/


def batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class Setup:
    """Models for every method, built once for a given number of adapters."""

    def __init__(self, model_factory, n_adapters: int, r: int, root: Path):
        from peft import PeftModel

        self.names = [f"a{i:02d}" for i in range(n_adapters)]
        save_adapters(model_factory, self.names, root, r)
        paths = {name: root / name for name in self.names}

        self.peft = PeftModel.from_pretrained(
            model_factory(), paths[self.names[0]], adapter_name=self.names[0]
        )
        for name in self.names[1:]:
            self.peft.load_adapter(paths[name], adapter_name=name)
        self.peft.eval()

        self.registry = AdapterRegistry(model_factory())
        for name in self.names:
            self.registry.load(name, paths[name])

        merged = PeftModel.from_pretrained(model_factory(), paths[self.names[0]])
        self.merged = merged.merge_and_unload().eval()


def run_method(method: str, setup: Setup, requests: list[tuple[int, list[int], str]], batch: int, new: int):
    """Serve the whole stream with one method; returns ({request id: new tokens}, seconds)."""
    gen = {"do_sample": False, "max_new_tokens": new, "pad_token_id": 0}
    out: dict[int, list[int]] = {}

    def groups(window: int):  # each window of arriving requests, split by adapter (first arrival first)
        for chunk in batches(requests, window):
            by_name: dict[str, list] = {}
            for req in chunk:
                by_name.setdefault(req[2], []).append(req)
            yield from by_name.items()

    def record(reqs, tokens):
        for (rid, _, _), row in zip(reqs, tokens.tolist()):
            out[rid] = row

    start = time.perf_counter()
    with torch.no_grad():
        if method in ("peft_set_adapter", "peft_set_adapter_sorted"):
            window = len(requests) if method == "peft_set_adapter_sorted" else batch
            for name, reqs in groups(window):
                setup.peft.set_adapter(name)
                for chunk in batches(reqs, batch):
                    input_ids, mask = left_pad([p for _, p, _ in chunk])
                    tokens = setup.peft.generate(input_ids=input_ids, attention_mask=mask, **gen)
                    record(chunk, tokens[:, input_ids.shape[1] :])
        elif method == "peft_mixed":
            for chunk in batches(requests, batch):
                input_ids, mask = left_pad([p for _, p, _ in chunk])
                names = [n for _, _, n in chunk]
                tokens = setup.peft.generate(
                    input_ids=input_ids, attention_mask=mask, adapter_names=names, **gen
                )
                record(chunk, tokens[:, input_ids.shape[1] :])
        elif method == "lora_lab_mixed":
            for chunk in batches(requests, batch):
                input_ids, mask = left_pad([p for _, p, _ in chunk])
                names = [n for _, _, n in chunk]
                record(chunk, serving.generate(setup.registry, input_ids, names, mask, **gen))
        elif method == "merge_per_group":
            for name, reqs in groups(batch):
                setup.registry.merge(name)
                for chunk in batches(reqs, batch):
                    input_ids, mask = left_pad([p for _, p, _ in chunk])
                    tokens = setup.registry.model.generate(input_ids=input_ids, attention_mask=mask, **gen)
                    record(chunk, tokens[:, input_ids.shape[1] :])
                setup.registry.unmerge()
        elif method == "merged_single":
            for chunk in batches(requests, batch):
                input_ids, mask = left_pad([p for _, p, _ in chunk])
                tokens = setup.merged.generate(input_ids=input_ids, attention_mask=mask, **gen)
                record(chunk, tokens[:, input_ids.shape[1] :])
        else:
            raise ValueError(f"unknown method {method!r}")
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--requests", type=int, default=64, help="requests in the stream")
    parser.add_argument("--batch", type=int, default=16, help="batch size (rows per generate call)")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt length in tokens (at most)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 and 16 adapters, 32 requests, 1 repeat")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.adapters, args.requests, args.repeats = [1, 16], 32, 1
    out_path = args.out or (None if args.quick else RESULTS_DIR / "multi_adapter.json")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base, description, tokenizer = build_base()
    state = {k: v.clone() for k, v in base.state_dict().items()}

    def model_factory():
        model = type(base)(base.config)
        model.load_state_dict(state)
        model.generation_config = base.generation_config
        model.config._attn_implementation = base.config._attn_implementation
        return model.float().eval()

    prompts = make_prompts(tokenizer, args.requests, args.prompt_len, base.config.vocab_size)
    results = []
    for n_adapters in args.adapters:
        with tempfile.TemporaryDirectory(prefix="bench-multi-adapter-") as tmp:
            setup = Setup(model_factory, n_adapters, args.rank, Path(tmp))
            rng = random.Random(n_adapters)
            names = [setup.names[i % n_adapters] for i in range(args.requests)]
            rng.shuffle(names)  # adapters spread evenly over the stream, in random order
            requests = [(i, prompts[i], names[i]) for i in range(args.requests)]
            for method in METHODS:  # warm-up: one small batch each
                run_method(method, setup, requests[:2], 2, 2)
            times = {m: [] for m in METHODS}
            tokens = {}
            for _ in range(args.repeats):
                for method in METHODS:
                    tokens[method], seconds = run_method(method, setup, requests, args.batch, args.new_tokens)
                    times[method].append(seconds)
            total = args.requests * args.new_tokens
            row = {"n_adapters": n_adapters, "methods": {}}
            for method in METHODS:
                median = statistics.median(times[method])
                same = sum(tokens[method][i] == tokens["lora_lab_mixed"][i] for i in range(args.requests))
                row["methods"][method] = {
                    "tokens_per_s": round(total / median, 1),
                    "seconds": [round(t, 3) for t in times[method]],
                    "tokens_equal_to_c": f"{same}/{args.requests}",
                }
            tps = {m: row["methods"][m]["tokens_per_s"] for m in METHODS}
            row["ratios"] = {
                "c_over_a": round(tps["lora_lab_mixed"] / tps["peft_set_adapter"], 2),
                "c_over_a_sorted": round(tps["lora_lab_mixed"] / tps["peft_set_adapter_sorted"], 2),
                "c_over_b": round(tps["lora_lab_mixed"] / tps["peft_mixed"], 2),
                "c_over_e": round(tps["lora_lab_mixed"] / tps["merged_single"], 2),
                "d_over_e": round(tps["merge_per_group"] / tps["merged_single"], 2),
            }
            results.append(row)
            print(
                f"{n_adapters:3d} adapters: "
                + "  ".join(f"{m}={tps[m]:.0f}" for m in METHODS)
                + f"  tok/s | c/a={row['ratios']['c_over_a']} c/b={row['ratios']['c_over_b']} "
                f"c/e={row['ratios']['c_over_e']}",
                flush=True,
            )
            del setup

    result = {
        "benchmark": "multi_adapter_generation_throughput",
        "model": description,
        "methods": {
            "peft_set_adapter": "(a) PEFT set_adapter, one request group at a time (groups within each batch)",
            "peft_mixed": "(b) PEFT adapter_names= mixed batches",
            "lora_lab_mixed": "(c) lora_lab stacked A/B, gathered bmm per layer (BGMV)",
            "merge_per_group": "(d) lora_lab registry merge(name) / generate the group / unmerge()",
            "merged_single": "(e) one adapter merged into a plain model: upper bound",
            "peft_set_adapter_sorted": "(a') as (a), but the whole stream grouped by adapter first (best case)",
        },
        "requests": args.requests,
        "grouping": "the stream is served in batches of batch_size requests in arrival order; (a) and (d) "
        "split each batch into per-adapter groups; (a') groups the whole stream",
        "batch_size": args.batch,
        "prompt_tokens_max": max(len(p) for p in prompts),
        "prompt_tokens_min": min(len(p) for p in prompts),
        "new_tokens": args.new_tokens,
        "rank": args.rank,
        "target_modules": TARGETS,
        "repeats": args.repeats,
        "statistic": "median tokens/s over repeats",
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "results": results,
    }
    if out_path is not None:
        print(f"wrote {write_json(out_path, result)}")
    return result


if __name__ == "__main__":
    main()
