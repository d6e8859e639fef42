"""Measure NF4: quantization error (NF4 vs uniform INT4 vs FP4), bits per parameter, model memory.

Writes data/results/nf4.json, which chapter 06 plots. Runs in a few seconds on a CPU:

    python benchmarks/bench_nf4.py            # the bundled model if it exists, else a random tiny Llama
    python benchmarks/bench_nf4.py --model PATH

Quantization error is measured on every linear weight the 4-bit model would quantize (all nn.Linear
but the output head), blockwise with block size 64, as relative RMSE: ||W - deq(q(W))|| / ||W||.
Two synthetic matrices (normal and heavy-tailed Student-t, 1024 x 1024) are measured too, so the
comparison does not depend on one model. Memory is `lora_lab.nf4.model_bytes` (parameters + buffers
as stored) for the same model in fp32, bf16 and NF4 (with and without double quantization).
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lora_lab import nf4  # noqa: E402
from lora_lab.paths import RESULTS_DIR, TINY_BASE_DIR, write_json  # noqa: E402
from lora_lab.pretrain import MODEL_CONFIG, VOCAB_SIZE  # noqa: E402

CODES = {"nf4": nf4.NF4_CODE, "int4": nf4.INT4_CODE, "fp4": nf4.FP4_CODE}


def load_model(path: Path | None):
    """The model to measure and a label saying what it is."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    path = path or (TINY_BASE_DIR if TINY_BASE_DIR.exists() else None)
    if path is not None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        label = Path(path).resolve()
        repo = Path(__file__).resolve().parent.parent
        return model, str(label.relative_to(repo)) if label.is_relative_to(repo) else str(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB_SIZE, **MODEL_CONFIG)  # the bundled model's shape
    return LlamaForCausalLM(config).eval(), "random-init LlamaForCausalLM (bundled model not built yet)"


def relative_rmse(w: torch.Tensor, code: torch.Tensor, blocksize: int = 64) -> float:
    w = w.detach().float()
    return ((nf4.fake_quantize(w, code, blocksize) - w).norm() / w.norm()).item()


def quantization_errors(model: nn.Module) -> dict:
    weights = {
        name: m.weight
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] != "lm_head"
    }
    per_layer = {name: {k: relative_rmse(w, c) for k, c in CODES.items()} for name, w in weights.items()}
    total = sum(w.numel() for w in weights.values())
    mean = {k: sum(per_layer[n][k] * w.numel() for n, w in weights.items()) / total for k in CODES}
    g = torch.Generator().manual_seed(0)
    synthetic = {
        "normal": torch.randn(1024, 1024, generator=g) * 0.02,
        "student_t3": torch.distributions.StudentT(3.0).sample((1024, 1024)) * 0.02,
    }
    return {
        "model_weighted_mean": mean,
        "model_per_layer": per_layer,
        "synthetic": {
            name: {k: relative_rmse(w, c) for k, c in CODES.items()} for name, w in synthetic.items()
        },
    }


def memory(model: nn.Module, load) -> dict:
    fp32 = nf4.model_bytes(model)
    bf16 = nf4.model_bytes(load().to(torch.bfloat16))
    q_dq = nf4.model_bytes(nf4.quantize_model(load(), double_quant=True))
    q_plain = nf4.model_bytes(nf4.quantize_model(load(), double_quant=False))
    return {
        "fp32_bytes": fp32,
        "bf16_bytes": bf16,
        "nf4_dq_bytes": q_dq,
        "nf4_bytes": q_plain,
        "fp32_over_nf4_dq": fp32 / q_dq,
        "bf16_over_nf4_dq": bf16 / q_dq,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the bundled model)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "nf4.json")
    args = parser.parse_args()

    model, source = load_model(args.model)
    results = {
        "source": source,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "blocksize": 64,
        "bits_per_param_measured": {
            "plain": nf4.bits_per_param(64, double_quant=False),
            "double_quant": nf4.bits_per_param(64, double_quant=True),
        },
        "bits_per_param_formula": {
            "plain": nf4.bits_per_param_formula(64, False),
            "double_quant": nf4.bits_per_param_formula(64, True),
        },
        "quantization_error_relative_rmse": quantization_errors(model),
        "model_memory": memory(model, lambda: load_model(args.model)[0]),
        "llama_weight_memory": {name: nf4.llama_weight_memory(name) for name in nf4.LLAMA_SHAPES},
        "llama_weight_memory_no_dq": {
            name: nf4.llama_weight_memory(name, double_quant=False) for name in nf4.LLAMA_SHAPES
        },
    }
    write_json(args.out, results)
    err = results["quantization_error_relative_rmse"]
    print(f"source: {source}")
    print("bits/param measured:", results["bits_per_param_measured"])
    print("relative RMSE, model:", {k: round(v, 4) for k, v in err["model_weighted_mean"].items()})
    for name, values in err["synthetic"].items():
        print(f"relative RMSE, {name}:", {k: round(v, 4) for k, v in values.items()})
    print("memory:", results["model_memory"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
