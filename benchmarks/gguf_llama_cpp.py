"""GGUF files run by llama.cpp, compared with transformers: the cached result chapter 10 shows.

The `sql` adapter (data/adapters/sql) is merged into the bundled model with PEFT, saved with its
tokenizer, and written as GGUF by `lora_lab.shipping` in three ways: merged f32, merged q8_0, and
base f32 plus the adapter as a GGUF LoRA file. llama.cpp (through llama-cpp-python) answers the
first N sql test questions greedily from token ids, with `shipping.llama_cpp_answers`, the function
the chapter calls live where llama-cpp-python is installed; llama.cpp's tokenizer is checked on the
same prompts. The transformers answers are recorded beside them, with the agreement counts.

llama-cpp-python is not part of the project's environment (it compiles llama.cpp from source when
installed: 4-10 minutes on 2 cores), so install it first:

    pip install llama-cpp-python==0.3.36
    python benchmarks/gguf_llama_cpp.py          # writes data/results/gguf_llama_cpp.json

(or, with a build of the sdist in progress or done: PYTHONPATH=<sdist> LLAMA_CPP_LIB_PATH=<folder with
libllama.so and libggml*.so> python benchmarks/gguf_llama_cpp.py; the JSON records which.)
    python benchmarks/gguf_llama_cpp.py --out /tmp/x.json --prompts 4
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lora_lab.paths import DATA_DIR, RESULTS_DIR, TINY_BASE_DIR  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--prompts", type=int, default=8, help="sql test questions (default 8, as chapter 10)"
    )
    parser.add_argument("--max-tokens", type=int, default=40, help="greedy answer length (chapter 10: 40)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "gguf_llama_cpp.json")
    args = parser.parse_args(argv)

    import llama_cpp
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_lab import shipping
    from lora_lab.data import load_task

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(TINY_BASE_DIR)
    eos = tok.eos_token_id
    texts = [
        tok.apply_chat_template(ex["messages"][:1], tokenize=False, add_generation_prompt=True)
        for ex in load_task("sql", "test")[: args.prompts]
    ]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]

    def until_eos(row):
        return row[: row.index(eos)] if eos in row else row

    def greedy(model):
        answers = []
        for p in prompts:  # one at a time: no padding anywhere
            with torch.no_grad():
                out = model.generate(
                    torch.tensor([p]), do_sample=False, max_new_tokens=args.max_tokens,
                    pad_token_id=tok.pad_token_id, eos_token_id=eos,
                )  # fmt: skip
            answers.append(until_eos(out[0, len(p) :].tolist()))
        return answers

    adapter = DATA_DIR / "adapters" / "sql"
    work = Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    base = AutoModelForCausalLM.from_pretrained(TINY_BASE_DIR).eval()
    unmerged = PeftModel.from_pretrained(base, adapter).eval()
    hf_unmerged = greedy(unmerged)
    merged = unmerged.merge_and_unload()
    merged_dir = work / "merged-sql"
    merged.save_pretrained(merged_dir)
    tok.save_pretrained(merged_dir)
    hf_merged = greedy(AutoModelForCausalLM.from_pretrained(merged_dir).eval())

    files = {
        "merged f32": shipping.write_llama_gguf(merged_dir, work / "merged-f32.gguf"),
        "merged q8_0": shipping.write_llama_gguf(merged_dir, work / "merged-q8_0.gguf", dtype="q8_0"),
        "base + LoRA f32": (
            shipping.write_llama_gguf(TINY_BASE_DIR, work / "base-f32.gguf"),
            shipping.write_lora_gguf(adapter, merged_dir, work / "sql-lora-f32.gguf"),
        ),
    }
    began = time.perf_counter()
    answers = shipping.llama_cpp_answers(files, prompts, args.max_tokens, eos_token_id=eos)
    seconds = time.perf_counter() - began
    cpp_tokens = shipping.llama_cpp_tokenize(files["merged f32"], texts)
    reference = {"merged f32": hf_merged, "merged q8_0": hf_merged, "base + LoRA f32": hf_unmerged}
    agreement = {k: sum(a == b for a, b in zip(v, reference[k])) for k, v in answers.items()}

    def size(spec):
        return sum(Path(p).stat().st_size for p in (spec if isinstance(spec, tuple) else (spec,)))

    result = {
        "what": "greedy answers of llama.cpp on GGUF files written by lora_lab.shipping, vs transformers",
        "adapter": "data/adapters/sql",
        "prompts": prompts,
        "max_tokens": args.max_tokens,
        "answers": answers,
        "transformers_answers": reference,
        "agreement": agreement,
        "llama_cpp_tokens": cpp_tokens,
        "tokenizer_agreement": sum(a == b for a, b in zip(cpp_tokens, prompts)),
        "bytes": {k: size(v) for k, v in files.items()},
        "llama_cpp_seconds": round(seconds, 2),
        "llama_cpp_python": llama_cpp.__version__,
        # how llama.cpp got here: the installed wheel, or llama-cpp-python's own Python package
        # pointed (LLAMA_CPP_LIB_PATH) at the libllama/libggml its sdist's cmake build produced
        "llama_cpp_libraries": "LLAMA_CPP_LIB_PATH"
        if os.environ.get("LLAMA_CPP_LIB_PATH")
        else "installed wheel",
        "gguf": importlib.metadata.version("gguf"),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(
        json.dumps({k: result[k] for k in ("agreement", "tokenizer_agreement", "bytes", "llama_cpp_seconds")})
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
