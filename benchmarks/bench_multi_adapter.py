"""Generation throughput for a stream of requests spread over 1, 4, 16 and 64 LoRA adapters.

Each request is a prompt plus the name of the adapter it wants. The ways to serve the stream:

    a  peft_set_adapter    PEFT, one request group at a time: set_adapter(name), generate the group
    b  peft_mixed          PEFT, mixed batches: generate(..., adapter_names=[...])
    c  lora_lab_mixed      lora_lab, mixed batches: stacked A/B + one gathered bmm per layer (BGMV)
    d  merge_per_group     lora_lab registry: merge(name), generate the group, unmerge()
    e  merged_single       one adapter merged into a plain model (merge_and_unload), every request
                           served by it: the speed of the base model, the upper bound
    a' peft_set_adapter_sorted   (a) with the whole stream sorted by adapter first: the best case
                           for switching, possible only if a server may hold requests back at will
    v  vllm                vLLM's offline `LLM` engine (the industrial peer), one `LoRARequest` per
                           prompt, in a child process that the benchmark drives request by request

The stream is served in batches of `--batch` requests in arrival order, as a server takes them
from its queue. (b), (c) and (e) run each batch as one generate call; (a) and (d) split each
batch into groups of requests sharing an adapter and run one call per group; vLLM gets the
whole stream and batches it itself, at most `--batch` sequences at a time (`max_num_seqs`).

Regimes: `--shape tiny` (the bundled model) or `--shape realistic` (Llama-3.2-1B's widths, two
layers, random weights), each over batch sizes (`--batch 16 64`) and adapters in the stream
(`--adapters 1 4 16 64`). For each regime, one decoding step of (b), (c) and (e) is profiled
(torch.profiler, self CPU time per operator) and summarised as milliseconds in base matmuls,
LoRA matmuls, attention, other operators and the framework around them (Python, module calls).

All methods generate the same number of tokens (greedy, EOS switched off so every request gets
exactly `new_tokens`), in one process, interleaved over repeats (a, b, c, ..., v, a, b, ...) so
that drift in machine load hits every method. The result per method is the median tokens/s over
repeats; the time includes each batch's prompt. Tokens are compared with (c)'s for every
request (`tokens_equal_to_c`). vLLM's start-up (import, engine) and its first pass over the
stream (which loads the adapters) are recorded apart from its steady-state throughput. Where
`import vllm` fails (macOS, `PYTHONPATH=tests/no_vllm`) the vLLM rows are skipped with the
reason in the JSON.

Writes data/results/multi_adapter.json (tiny) or multi_adapter_realistic.json. Run:

    python benchmarks/bench_multi_adapter.py --threads 1 --repeats 5            # tiny, ~10 min
    python benchmarks/bench_multi_adapter.py --shape realistic --threads 1 --repeats 2 \\
        --methods peft_set_adapter peft_mixed lora_lab_mixed merged_single --max-switch-adapters 1
    python benchmarks/bench_multi_adapter.py --quick    # smoke run, not written unless --out

The realistic shape defaults to 16-token prompts and 8 new tokens (the tiny one to 32 and 16) to
keep a full run near 15 minutes on one core ((a) only with one adapter there, two repeats);
the JSON records the lengths and repeats used.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
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
SWITCHING = {"peft_set_adapter", "peft_set_adapter_sorted", "merge_per_group"}  # one call per adapter


def machine_info(threads: int) -> dict:
    """CPU model, core count, torch's SIMD capability and thread count, for the result JSON."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
    }


# Llama-3.2-1B's widths (hidden 2048, MLP 8192, 32 query / 8 key-value heads of 64), two layers,
# random weights: the matmuls of a real model, few enough layers to fit a CPU benchmark.
REALISTIC = {
    "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 2, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 512, "tie_word_embeddings": False,
}  # fmt: skip


def build_base(shape: str = "tiny"):
    """(model, description, tokenizer or None); EOS switched off so every request has the same length.

    shape "tiny": the bundled data/models/tiny-base (else a tiny random Llama); "realistic": a
    random Llama with the widths of `REALISTIC` and the bundled tokenizer's vocabulary.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    bundled = (TINY_BASE_DIR / "model.safetensors").exists()
    tokenizer = AutoTokenizer.from_pretrained(TINY_BASE_DIR) if bundled else None
    torch.manual_seed(0)
    if shape == "realistic":
        vocab = len(tokenizer) if tokenizer is not None else 2048
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **REALISTIC))
        description = "random Llama, Llama-3.2-1B widths (hidden 2048, MLP 8192, 32/8 heads), 2 layers"
    elif shape != "tiny":
        raise ValueError(f"unknown shape {shape!r}; use 'tiny' or 'realistic'")
    elif bundled:
        model = AutoModelForCausalLM.from_pretrained(TINY_BASE_DIR, dtype=torch.float32)
        description = "bundled data/models/tiny-base"
    else:
        config = LlamaConfig(
            vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        )  # fmt: skip
        model = LlamaForCausalLM(config)
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
    """Models for every method, built once for a given number of adapters (the first n saved ones)."""

    def __init__(self, model_factory, n_adapters: int, adapter_root: Path):
        from peft import PeftModel

        self.names = [f"a{i:02d}" for i in range(n_adapters)]
        paths = {name: adapter_root / name for name in self.names}

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


# --- vLLM: the industrial peer, its offline engine in a child process --------------------------

VLLM_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine runs inside the worker process itself
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache (vllm_server explains why it must be set)
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def vllm_missing() -> str | None:
    """None when vLLM can be imported here, else the one-line reason its rows are skipped."""
    probe = subprocess.run(
        [sys.executable, "-c", "import vllm"], capture_output=True, text=True, env=os.environ.copy()
    )
    if probe.returncode == 0:
        return None
    last = (probe.stderr.strip().splitlines() or ["import failed"])[-1]
    return f"vLLM rows skipped: `import vllm` fails here ({last})"


def vllm_worker(spec_json: str) -> None:
    """Child process: start vLLM's offline `LLM` engine, then serve timing requests from stdin.

    Prints one line `@@{json}` when ready (import and engine start-up seconds), then for every
    stdin line `{"requests": [[prompt ids, adapter index], ...], "new_tokens": n}` runs one
    `LLM.generate` over all of them (greedy, EOS ignored, one `LoRARequest` per prompt; the
    engine batches up to `max_num_seqs` at a time) and prints `@@{"seconds": s, "tokens": [...]}`.
    """
    spec = json.loads(spec_json)
    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    t1 = time.perf_counter()
    llm = LLM(
        model=spec["model"], enable_lora=True, max_loras=spec["max_loras"], max_lora_rank=spec["rank"],
        max_cpu_loras=len(spec["adapters"]), max_num_seqs=spec["batch"], dtype="float32",
        max_model_len=spec["max_model_len"], distributed_executor_backend="uni", seed=0,
    )  # fmt: skip
    t2 = time.perf_counter()
    loras = [LoRARequest(f"a{i:02d}", i + 1, path) for i, path in enumerate(spec["adapters"])]
    print("@@" + json.dumps({"import_s": t1 - t0, "engine_s": t2 - t1}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        params = SamplingParams(temperature=0.0, max_tokens=job["new_tokens"], ignore_eos=True)
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids, _ in job["requests"]]
        which = [loras[i] for _, i in job["requests"]]
        start = time.perf_counter()
        outs = llm.generate(prompts, params, lora_request=which, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        print("@@" + json.dumps({"seconds": seconds, "tokens": tokens}), flush=True)


class VLLMEngine:
    """The parent's handle on one vLLM worker process (one model, one batch size)."""

    def __init__(
        self, model_dir: Path, adapter_dirs: list[Path], batch: int, rank: int, max_len: int, threads: int
    ):
        spec = {
            "model": str(model_dir), "adapters": [str(p) for p in adapter_dirs], "batch": batch,
            "max_loras": min(batch, len(adapter_dirs)), "rank": rank, "max_model_len": max_len,
        }  # fmt: skip
        env = os.environ.copy() | VLLM_ENV | {"OMP_NUM_THREADS": str(threads)}
        if threads == 1:
            env["VLLM_CPU_OMP_THREADS_BIND"] = "0"  # one OpenMP thread, as the PyTorch methods get
        # the worker's log lives as long as the worker; close() removes it
        self.log = tempfile.NamedTemporaryFile("w+", prefix="bench-vllm-", suffix=".log", delete=False)  # noqa: SIM115
        start = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--vllm-worker", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
        )  # fmt: skip
        ready = self._read()
        self.startup = {
            "process_to_ready_s": round(time.perf_counter() - start, 2),
            "import_s": round(ready["import_s"], 2),
            "engine_s": round(ready["engine_s"], 2),
        }

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        self.log.seek(0)
        tail = "".join(self.log.readlines()[-15:])
        raise RuntimeError(f"the vLLM worker stopped; its log ({self.log.name}) ends with:\n{tail}")

    def run(self, requests, names: list[str], new: int) -> tuple[dict[int, list[int]], float]:
        index = {name: int(name[1:]) for name in names}
        job = {"requests": [[p, index[n]] for _, p, n in requests], "new_tokens": new}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        answer = self._read()
        return {rid: row for (rid, _, _), row in zip(requests, answer["tokens"])}, answer["seconds"]

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


# --- per-op profile of one decoding step ------------------------------------------------------

MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::baddbmm_", "aten::addmm_"}


def classify(name: str, shapes: list, rank: int) -> str:
    """'lora_matmul' (a matmul with the rank in its weight's shape), 'base_matmul', 'attention', 'other'."""
    if name in MATMULS:
        matrices = [s for s in shapes if len(s) >= 2]  # drop the scalars (beta, alpha) of addmm/baddbmm
        weight = matrices[-1] if matrices else []
        return "lora_matmul" if rank in weight[-2:] else "base_matmul"
    if "attention" in name:
        return "attention"
    return "other_ops"


def profile_decode(step, rank: int, steps: int = 3) -> dict:
    """Profile `steps` calls of step() (one decoding step each): milliseconds per step by kind.

    `framework` is profiled wall time not spent inside any aten operator: Python, module calls,
    dispatch, and the profiler's own cost per operator (so it grows with the number of operators);
    `step_ms_unprofiled` is the median of the same steps run without the profiler.
    """
    from torch.profiler import ProfilerActivity, profile

    step()  # warm-up
    plain = []
    for _ in range(steps):  # the same steps without the profiler: its per-op cost inflates wall time
        start = time.perf_counter()
        step()
        plain.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - start) / steps
    kinds = {"base_matmul": 0.0, "lora_matmul": 0.0, "attention": 0.0, "other_ops": 0.0}
    per_op: dict[str, list[float]] = {}
    for event in prof.key_averages(group_by_input_shape=True):
        self_ms = event.self_cpu_time_total / 1e3 / steps
        kinds[classify(event.key, event.input_shapes, rank)] += self_ms
        entry = per_op.setdefault(event.key, [0.0, 0])
        entry[0] += self_ms
        entry[1] += event.count // steps
    ops_ms = sum(kinds.values())
    # the profiler's own bookkeeping inflates wall time a little; shares are of the profiled step
    summary = {
        "step_ms_unprofiled": round(statistics.median(plain) * 1e3, 3),
        "step_ms": round(wall * 1e3, 3),
        **{k: round(v, 3) for k, v in kinds.items()},
    }
    summary["framework"] = round(max(wall * 1e3 - ops_ms, 0.0), 3)
    summary["top_ops"] = [
        {"op": op, "self_ms": round(ms, 3), "calls": calls}
        for op, (ms, calls) in sorted(per_op.items(), key=lambda kv: -kv[1][0])[:8]
    ]
    return summary


def decode_steps(setup: Setup, requests, method: str):
    """A function running one decoding step of the first batch with `method`, and a cleanup."""
    from transformers import DynamicCache

    input_ids, mask = left_pad([p for _, p, _ in requests])
    names = [n for _, _, n in requests]
    context = None
    if method == "peft_mixed":
        model, extra = setup.peft, {"adapter_names": names}
    elif method == "lora_lab_mixed":
        model, extra = setup.registry.model, {}
        context = setup.registry.mixed_batch(names)
        context.__enter__()
    elif method == "merged_single":
        model, extra = setup.merged, {}
    else:
        raise ValueError(f"no decode profile for {method!r}")
    with torch.no_grad():
        cache = DynamicCache()
        out = model(input_ids=input_ids, attention_mask=mask, past_key_values=cache, use_cache=True, **extra)
    state = {"next": out.logits[:, -1:].argmax(-1), "mask": mask}

    @torch.no_grad()
    def step():
        state["mask"] = torch.cat([state["mask"], torch.ones_like(state["next"])], dim=1)
        out = model(
            input_ids=state["next"],
            attention_mask=state["mask"],
            past_key_values=cache,
            use_cache=True,
            **extra,
        )
        state["next"] = out.logits[:, -1:].argmax(-1)

    def done():
        if context is not None:
            context.__exit__(None, None, None)

    return step, done


# --- the benchmark ----------------------------------------------------------------------------

SHAPE_DEFAULTS = {  # prompt tokens (at most) and new tokens per request, per shape
    "tiny": {"prompt_len": 32, "new_tokens": 16},
    "realistic": {"prompt_len": 16, "new_tokens": 8},
}


def save_model_dir(model, tokenizer, root: Path) -> Path:
    """The base model (and the bundled tokenizer) in HF format, for vLLM."""
    path = root / "model"
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def ratio(x: float | None, y: float | None) -> float | None:
    return None if not x or not y else round(x / y, 2)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPE_DEFAULTS), default="tiny")
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 64], help="batch sizes (rows per call)")
    parser.add_argument("--requests", type=int, default=64, help="requests in the stream")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens at most (per shape)")
    parser.add_argument("--new-tokens", type=int, default=None, help="new tokens per request (per shape)")
    parser.add_argument("--methods", nargs="+", default=None, help="a subset of the methods")
    parser.add_argument(
        "--max-switch-adapters",
        type=int,
        default=None,
        help="skip (a), (a'), (d) above this many adapters (they run one call per adapter)",
    )
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-vllm", action="store_true", help="leave out the vLLM rows")
    parser.add_argument(
        "--quick", action="store_true", help="1 and 16 adapters, batch 16, 32 requests, 1 repeat"
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--vllm-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.vllm_worker is not None:
        vllm_worker(args.vllm_worker)
        return {}
    if args.quick:
        args.adapters, args.batch, args.requests, args.repeats = [1, 16], [16], 32, 1
    defaults = SHAPE_DEFAULTS[args.shape]
    prompt_len = args.prompt_len or defaults["prompt_len"]
    new_tokens = args.new_tokens or defaults["new_tokens"]
    methods = args.methods or METHODS
    file_name = "multi_adapter.json" if args.shape == "tiny" else f"multi_adapter_{args.shape}.json"
    out_path = args.out or (None if args.quick else RESULTS_DIR / file_name)

    torch.set_num_threads(args.threads)
    base, description, tokenizer = build_base(args.shape)
    state = {k: v.clone() for k, v in base.state_dict().items()}

    def model_factory():
        model = type(base)(base.config)
        model.load_state_dict(state)
        model.generation_config = base.generation_config
        model.config._attn_implementation = base.config._attn_implementation
        return model.float().eval()

    skip_vllm = "vLLM rows left out (--no-vllm)" if args.no_vllm else vllm_missing()
    if skip_vllm:
        print(skip_vllm, flush=True)
    prompts = make_prompts(tokenizer, args.requests, prompt_len, base.config.vocab_size)
    all_names = [f"a{i:02d}" for i in range(max(args.adapters))]
    results, vllm_startup = [], []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-multi-adapter-") as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        save_adapters(model_factory, all_names, root / "adapters", args.rank)  # a00, a01, ...: fixed per name
        model_dir = None if skip_vllm else save_model_dir(model_factory(), tokenizer, root)
        for batch in args.batch:
            engine = None
            if not skip_vllm:
                adapter_dirs = [root / "adapters" / n for n in all_names]
                engine = VLLMEngine(
                    model_dir, adapter_dirs, batch, args.rank, prompt_len + new_tokens + 8, args.threads
                )
                vllm_startup.append({"batch_size": batch, **engine.startup})
                print(f"vLLM engine (batch {batch}) ready: {engine.startup}", flush=True)
            try:
                for n_adapters in args.adapters:
                    row = run_regime(
                        args, model_factory, root, n_adapters, batch, prompts, new_tokens, methods, engine
                    )
                    results.append(row)
            finally:
                if engine is not None:
                    engine.close()

    result = {
        "benchmark": "multi_adapter_generation_throughput",
        "shape": args.shape,
        "model": description,
        "model_config": {
            k: getattr(base.config, k)
            for k in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "vocab_size",
            )
        },  # fmt: skip
        "methods": {
            "peft_set_adapter": "(a) PEFT set_adapter, one request group at a time (groups within each batch)",
            "peft_mixed": "(b) PEFT adapter_names= mixed batches",
            "lora_lab_mixed": "(c) lora_lab stacked A/B, gathered bmm per layer (BGMV)",
            "merge_per_group": "(d) lora_lab registry merge(name) / generate the group / unmerge()",
            "merged_single": "(e) one adapter merged into a plain model: upper bound",
            "peft_set_adapter_sorted": "(a') as (a), but the whole stream grouped by adapter first (best case)",
            "vllm": "(v) vLLM offline LLM engine, one LoRARequest per prompt, max_num_seqs = batch size",
        },
        "requests": args.requests,
        "grouping": "the stream is served in batches of batch_size requests in arrival order; (a) and (d) "
        "split each batch into per-adapter groups; (a') groups the whole stream; vLLM gets the whole stream "
        "at once and batches it itself, at most batch_size sequences at a time",
        "batch_sizes": args.batch,
        "prompt_tokens_max": max(len(p) for p in prompts),
        "prompt_tokens_min": min(len(p) for p in prompts),
        "new_tokens": new_tokens,
        "rank": args.rank,
        "target_modules": TARGETS,
        "repeats": args.repeats,
        "statistic": "median tokens/s over repeats (new tokens; prompt processing included in the time)",
        "matmul_ops": sorted(MATMULS),  # the operators the profile counts as matmuls
        "vllm_skipped": skip_vllm,
        "vllm_startup": vllm_startup,
        **machine_info(args.threads),
        "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "results": results,
    }
    if out_path is not None:
        print(f"wrote {write_json(out_path, result)}")
    return result


def run_regime(args, model_factory, root, n_adapters, batch, prompts, new_tokens, methods, engine) -> dict:
    """Time every method on one stream (n_adapters adapters, batches of `batch`); profile a decode step."""
    setup = Setup(model_factory, n_adapters, root / "adapters")
    rng = random.Random(n_adapters)
    names = [setup.names[i % n_adapters] for i in range(args.requests)]
    rng.shuffle(names)  # adapters spread evenly over the stream, in random order
    requests = [(i, prompts[i], names[i]) for i in range(args.requests)]
    active = [
        m for m in methods
        if not (args.max_switch_adapters and n_adapters > args.max_switch_adapters and m in SWITCHING)
    ]  # fmt: skip
    if engine is not None:
        active.append("vllm")

    def serve(method, reqs, size, new):
        if method == "vllm":
            return engine.run(reqs, setup.names, new)
        return run_method(method, setup, reqs, size, new)

    first_pass = {}
    for method in active:  # warm-up: the whole stream once for vLLM (loads its adapters), a small batch else
        if method == "vllm":
            first_pass["vllm"] = round(serve(method, requests, batch, new_tokens)[1], 3)
        else:
            serve(method, requests[:2], 2, 2)
    times = {m: [] for m in active}
    tokens = {}
    for _ in range(args.repeats):
        for method in active:
            tokens[method], seconds = serve(method, requests, batch, new_tokens)
            times[method].append(seconds)
    total = args.requests * new_tokens
    distinct = [len(set(n for _, _, n in chunk)) for chunk in batches(requests, batch)]
    row = {
        "n_adapters": n_adapters,
        "batch_size": batch,
        "adapters_per_batch_mean": round(statistics.mean(distinct), 2),
        "methods": {},
        "skipped": sorted(set(methods) - set(active)),
    }
    for method in active:
        median = statistics.median(times[method])
        same = sum(tokens[method][i] == tokens["lora_lab_mixed"][i] for i in range(args.requests))
        row["methods"][method] = {
            "tokens_per_s": round(total / median, 1),
            "seconds": [round(t, 3) for t in times[method]],
            "tokens_equal_to_c": f"{same}/{args.requests}",
        }
    if "vllm" in first_pass:
        row["methods"]["vllm"]["first_pass_s"] = first_pass["vllm"]  # includes loading its adapters
    tps = {m: row["methods"][m]["tokens_per_s"] for m in active}
    c = tps.get("lora_lab_mixed")
    row["ratios"] = {
        "c_over_a": ratio(c, tps.get("peft_set_adapter")),
        "c_over_a_sorted": ratio(c, tps.get("peft_set_adapter_sorted")),
        "c_over_b": ratio(c, tps.get("peft_mixed")),
        "c_over_e": ratio(c, tps.get("merged_single")),
        "b_over_e": ratio(tps.get("peft_mixed"), tps.get("merged_single")),
        "d_over_e": ratio(tps.get("merge_per_group"), tps.get("merged_single")),
        "c_over_vllm": ratio(c, tps.get("vllm")),
    }
    first = requests[:batch]
    row["decode_step_profile"] = {}
    for method in ("peft_mixed", "lora_lab_mixed", "merged_single"):
        step, done = decode_steps(setup, first, method)
        try:
            row["decode_step_profile"][method] = profile_decode(step, args.rank)
        finally:
            done()
    print(
        f"batch {batch:3d}, {n_adapters:3d} adapters: "
        + "  ".join(f"{m}={tps[m]:.0f}" for m in active)
        + f"  tok/s | c/b={row['ratios']['c_over_b']} c/e={row['ratios']['c_over_e']} "
        f"c/v={row['ratios']['c_over_vllm']}",
        flush=True,
    )
    return row


if __name__ == "__main__":
    main()
