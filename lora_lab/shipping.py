"""Ship a patch: the pre-merge checklist, GGUF files for llama.cpp, and greedy runs with llama.cpp.

A merged checkpoint (`merge_and_unload` + `save_pretrained`) is a plain transformers folder. llama.cpp
(and Ollama, LM Studio and the other tools built on it) reads a different container, GGUF: one file
holding the hyperparameters, the tokenizer and every tensor, under llama.cpp's own names. llama.cpp's
Hugging Face converter script is not on PyPI; the `gguf` package (its writer and reader) is. This
module writes the GGUF file itself for Llama-architecture models, which is short enough to read:

    write_llama_gguf("merged/", "merged-f32.gguf")                    # the merged model
    write_lora_gguf("adapters/sql", "merged/", "sql-lora-f32.gguf")   # an adapter, for --lora
    meta, tensors = read_gguf("merged-f32.gguf")                       # back as numpy arrays
    llama_cpp_greedy("merged-f32.gguf", [[5, 6, 7]], max_tokens=8)    # needs llama-cpp-python

What the conversion does:
- renames every tensor (`model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight`, see
  `LLAMA_TENSOR_NAMES`); the order of dimensions is reversed by the writer (GGML counts the fastest
  dimension first), so a torch [out, in] weight is a GGML [in, out] tensor with the same bytes;
- permutes the rows of q_proj and k_proj (and of their LoRA B): transformers' Llama rotates the two
  HALVES of each head (`rotate_half`: dimension j with j + d/2), llama.cpp's Llama rotates adjacent
  PAIRS (2j with 2j + 1). Reordering the rows of W_q and W_k the same way gives the same dot
  products q·k, so the attention is unchanged (`permute_rope_rows`, checked in the tests);
- copies the byte-level BPE tokenizer (vocabulary, merges, special tokens, chat template);
- stores 2-D weights as F32, F16 or Q8_0 (8-bit blocks of 32 with one scale, `gguf.quants`); the
  1-D norm weights stay F32, as llama.cpp's converter keeps them.

A LoRA adapter becomes a GGUF adapter file (`general.type = adapter`): `blk.N.attn_q.weight.lora_a`
[r, in] and `.lora_b` [out, r] (torch order) plus `adapter.lora.alpha`; llama.cpp scales by
alpha / r, as PEFT does (an rsLoRA adapter is written with alpha * sqrt(r) so the product is PEFT's
alpha / sqrt(r)).

Left out: SentencePiece tokenizers (Llama-1/2's), rope scaling, biases, mixture-of-experts, other
architectures, K-quants and imatrix quantization. For those use llama.cpp's `convert_hf_to_gguf.py`
and `llama-quantize`. DoRA adapters, embedding LoRA and `modules_to_save` are refused.

References: the GGUF specification (ggml repository, `docs/gguf.md`); the `gguf` package's
constants (`Keys`, `MODEL_TENSOR`, `TensorNameMap`); llama.cpp's LoRA adapter loader
(`llama-adapter.cpp`: a [in, r], b [r, out] in GGML order, scale = alpha / rank).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = [
    "dir_bytes",
    "premerge_checklist",
    "LLAMA_TENSOR_NAMES",
    "gguf_tensor_name",
    "permute_rope_rows",
    "unpermute_rope_rows",
    "write_llama_gguf",
    "write_lora_gguf",
    "read_gguf",
    "gguf_to_hf_tensors",
    "GGUF_TYPES",
    "llama_cpp_available",
    "llama_cpp_greedy",
    "llama_cpp_tokenize",
    "llama_cpp_answers",
]

# transformers Llama name (after "model.layers.N.") -> GGUF name (after "blk.N.")
LLAMA_TENSOR_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# name -> (GGML type name, llama.cpp file type); gguf.LlamaFileType values
GGUF_TYPES = {"f32": ("F32", 0), "f16": ("F16", 1), "q8_0": ("Q8_0", 7)}


def dir_bytes(path: str | os.PathLike) -> int:
    """Bytes of all files under `path` (a file: its size)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist")
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---------------------------------------------------------------------------- the pre-merge checklist


def _lora_wrappers(model: nn.Module):
    """(name, wrapper) for every LoRA-wrapped layer, lora_lab's or PEFT's (both have `base_layer`)."""
    for name, module in model.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
            yield name, module


def _is_quantized(layer: nn.Module) -> bool:
    weight = getattr(layer, "weight", None)
    kind = type(weight).__name__
    if kind in ("Params4bit", "Int8Params"):  # bitsandbytes
        return True
    if type(layer).__name__ in ("NF4Linear", "Linear4bit", "Linear8bitLt"):
        return True
    return weight is not None and not weight.dtype.is_floating_point


def premerge_checklist(model: nn.Module, strict: bool = True) -> dict:
    """Check a model with LoRA layers (lora_lab's or PEFT's) before `merge_and_unload`.

    Returns {"lora_layers", "dtypes", "quantized_layers", "versions", "problems", "warnings"}:
    - problems (ValueError when strict): no LoRA layer to merge; a quantized base layer (4-bit or
      8-bit: its weight holds codes, so W0 + sBA cannot be added in place: dequantize first, and
      expect a bigger checkpoint);
    - warnings: a base in fp16/bf16 (the sum is rounded to that precision: upcast with
      `model.float()` first if the merged model must match closely); mixed dtypes.
    `versions` records torch, transformers and peft: store them with the merged checkpoint.
    """
    import transformers

    layers = list(_lora_wrappers(model))
    dtypes = sorted({str(m.base_layer.weight.dtype) for _, m in layers if hasattr(m.base_layer, "weight")})
    quantized = [n for n, m in layers if _is_quantized(m.base_layer)]
    problems, warnings = [], []
    if not layers:
        problems.append("no LoRA layer found: there is nothing to merge (load the adapter first)")
    if quantized:
        problems.append(
            f"{len(quantized)} quantized base layers (first: {quantized[0]}): dequantize the base to "
            "fp16/fp32 and load the adapter on it before merging; the merged model is then full size"
        )
    half = [d for d in dtypes if d in ("torch.float16", "torch.bfloat16")]
    if half:
        warnings.append(f"base weights in {', '.join(half)}: W0 + sBA is rounded to it; upcast first")
    if len(dtypes) > 1:
        warnings.append(f"mixed base dtypes {dtypes}")
    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    report = {
        "lora_layers": len(layers),
        "dtypes": dtypes,
        "quantized_layers": len(quantized),
        "versions": {
            "torch": torch.__version__.split("+")[0],
            "transformers": transformers.__version__,
            "peft": peft_version,
        },
        "problems": problems,
        "warnings": warnings,
    }
    if strict and problems:
        raise ValueError("do not merge yet: " + "; ".join(problems))
    return report


# ---------------------------------------------------------------------------- names and RoPE order


def gguf_tensor_name(hf_name: str) -> str:
    """The GGUF name of a transformers Llama tensor; ValueError for one this converter does not map."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    match = _LAYER.match(hf_name)
    if match and match.group(2) in LLAMA_TENSOR_NAMES:
        return f"blk.{match.group(1)}.{LLAMA_TENSOR_NAMES[match.group(2)]}"
    raise ValueError(
        f"tensor {hf_name!r} has no GGUF name here (this converter maps a plain Llama: "
        f"{sorted(_GLOBAL_NAMES)} and model.layers.N.{{{', '.join(LLAMA_TENSOR_NAMES)}}}); "
        "for other architectures use llama.cpp's convert_hf_to_gguf.py"
    )


def permute_rope_rows(weight, n_heads: int):
    """Reorder the output rows of a q/k projection from half-split RoPE order to adjacent pairs.

    weight: [n_heads * head_dim, ...] (numpy or torch). Within each head, rows (j, j + d/2) become
    rows (2j, 2j + 1).
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows do not split into {n_heads} heads of even size")
    half = rows // n_heads // 2
    out = weight.reshape(n_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2)
    return out.reshape(weight.shape)


def unpermute_rope_rows(weight, n_heads: int):
    """The inverse of `permute_rope_rows`."""
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows do not split into {n_heads} heads of even size")
    half = rows // n_heads // 2
    out = weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2)
    return out.reshape(weight.shape)


def _rope_heads(hf_name: str, config: dict) -> int | None:
    """Heads to permute over for q/k weights (and their LoRA B), None for every other tensor."""
    if hf_name.endswith("self_attn.q_proj.weight"):
        return config["num_attention_heads"]
    if hf_name.endswith("self_attn.k_proj.weight"):
        return config.get("num_key_value_heads") or config["num_attention_heads"]
    return None


# ---------------------------------------------------------------------------- the model


def _read_config(model_dir: Path) -> dict:
    file = model_dir / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json; pass a saved transformers model folder")
    config = json.loads(file.read_text())
    if config.get("model_type") != "llama":
        raise ValueError(
            f"{model_dir} holds a {config.get('model_type')!r} model; this converter writes Llama only "
            "(use llama.cpp's convert_hf_to_gguf.py for others)"
        )
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ValueError(f"{model_dir}: biases in attention/MLP are not supported by this converter")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{model_dir}: rope scaling {rope.get('rope_type')!r} is not supported here")
    return config


def _rope_theta(config: dict) -> float:
    rope = config.get("rope_parameters") or {}
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def _read_state(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if single.is_file():
        return load_file(single)
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for f in files:
            state.update(load_file(model_dir / f))
        return state
    raise FileNotFoundError(
        f"{model_dir} has no model.safetensors (or index); save the model with save_pretrained "
        "(safetensors is the default; pickle .bin checkpoints are not read here)"
    )


def _add_tokenizer(writer, model_dir: Path, config: dict) -> None:
    """Byte-level BPE (GPT-2 style) from tokenizer.json into the GGUF header."""
    import gguf

    file = model_dir / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"{model_dir} has no tokenizer.json: save the tokenizer with the model "
            "(tokenizer.save_pretrained(folder)); a GGUF file carries its own tokenizer"
        )
    tok = json.loads(file.read_text())
    model = tok.get("model", {})
    pre = json.dumps(tok.get("pre_tokenizer"))
    if model.get("type") != "BPE" or "ByteLevel" not in pre:
        raise ValueError(
            f"{file}: only byte-level BPE tokenizers (GPT-2 style) are converted here, not "
            f"{model.get('type')!r}; SentencePiece models need llama.cpp's converter"
        )
    vocab = dict(model["vocab"])
    added = {t["id"]: t for t in tok.get("added_tokens", [])}
    for i, t in added.items():
        vocab[t["content"]] = i
    size = max(config["vocab_size"], max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        if i in added:
            types[i] = gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED
        else:
            types[i] = gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # the GPT-2 split regex, as the ByteLevel pre-tokenizer uses
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    tcfg_file = model_dir / "tokenizer_config.json"
    tcfg = json.loads(tcfg_file.read_text()) if tcfg_file.is_file() else {}
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id)):
        value = config.get(f"{key}_token_id")
        if value is None and isinstance(tcfg.get(f"{key}_token"), str):
            value = vocab.get(tcfg[f"{key}_token"])
        if value is not None:
            add(int(value))
    pad = config.get("pad_token_id")
    if pad is None and isinstance(tcfg.get("pad_token"), str):
        pad = vocab.get(tcfg["pad_token"])
    if pad is not None:
        writer.add_pad_token_id(int(pad))
    single = json.dumps((tok.get("post_processor") or {}).get("single", []))
    writer.add_add_bos_token(
        '"SpecialToken"' in single
    )  # the HF tokenizer adds BOS only if its template does
    template = model_dir / "chat_template.jinja"
    if template.is_file():
        writer.add_chat_template(template.read_text())
    elif isinstance(tcfg.get("chat_template"), str):
        writer.add_chat_template(tcfg["chat_template"])


def _encode(array: np.ndarray, kind: str):
    """(data, raw_dtype) for the writer: 1-D tensors stay F32; Q8_0 needs rows that split in 32s."""
    import gguf

    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim == 1 or kind == "f32":
        return array, None
    if kind == "f16" or array.shape[-1] % 32:
        return array.astype(np.float16), None
    return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0


def write_llama_gguf(
    model_dir: str | os.PathLike, path: str | os.PathLike, dtype: str = "f32", name: str | None = None
) -> Path:
    """Write the Llama model saved in `model_dir` (config, safetensors, tokenizer) as one GGUF file.

    dtype: "f32" (exact), "f16" or "q8_0" for the 2-D weights. Returns the path written. The folder
    must hold tokenizer.json: a GGUF file carries its tokenizer.
    """
    import gguf

    if dtype not in GGUF_TYPES:
        raise ValueError(f"dtype must be one of {sorted(GGUF_TYPES)}, got {dtype!r}")
    model_dir, path = Path(model_dir), Path(path)
    config = _read_config(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} has no tokenizer.json: save the tokenizer with the model "
            "(tokenizer.save_pretrained(folder)); a GGUF file carries its own tokenizer"
        )
    state = _read_state(model_dir)
    tensors = {}
    for hf_name, value in state.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from rope_theta
        heads = _rope_heads(hf_name, config)
        array = value.float().numpy()
        if heads is not None:
            array = permute_rope_rows(array, heads)
        tensors[gguf_tensor_name(hf_name)] = array
    if config.get("tie_word_embeddings"):
        tensors.pop("output.weight", None)  # llama.cpp reuses token_embd

    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(name or model_dir.name)
    writer.add_file_type(GGUF_TYPES[dtype][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    _add_tokenizer(writer, model_dir, config)
    for gguf_name, array in tensors.items():
        data, raw = _encode(array, dtype)
        writer.add_tensor(gguf_name, data, raw_dtype=raw)
    _write(writer)
    return path


def _write(writer) -> None:
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


# ---------------------------------------------------------------------------- the adapter


def write_lora_gguf(
    adapter_dir: str | os.PathLike, model_dir: str | os.PathLike, path: str | os.PathLike, dtype: str = "f32"
) -> Path:
    """Write a PEFT-format LoRA adapter for the Llama in `model_dir` as a llama.cpp LoRA GGUF file.

    llama.cpp applies it at load time or per context (`--lora file.gguf`, llama-cpp-python's
    `Llama(..., lora_path=...)`), over the unmerged base GGUF. dtype: "f32" or "f16".
    """
    import gguf

    from lora_lab.adapters import read_adapter, split_peft_key

    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype for an adapter must be 'f32' or 'f16', got {dtype!r}")
    config = _read_config(Path(model_dir))
    adapter_config, state = read_adapter(adapter_dir)
    for key in ("use_dora", "modules_to_save"):
        if adapter_config.get(key):
            raise ValueError(f"{adapter_dir}: {key} is set; llama.cpp's LoRA format holds plain A and B only")
    if adapter_config.get("bias", "none") != "none":
        raise ValueError(
            f"{adapter_dir}: trained biases (bias={adapter_config['bias']!r}) do not fit the format"
        )
    if adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern"):
        raise ValueError(f"{adapter_dir}: per-layer ranks or alphas are not supported by this writer")
    r, alpha = int(adapter_config["r"]), float(adapter_config["lora_alpha"])
    if adapter_config.get("use_rslora"):
        alpha *= math.sqrt(r)  # llama.cpp scales by alpha / r; rsLoRA by alpha / sqrt(r)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(Path(adapter_dir).name)
    for key in sorted(state):
        layer, part = split_peft_key(key)
        hf_name = layer + ".weight"
        array = state[key].float().numpy()  # A [r, in], B [out, r]
        heads = _rope_heads(hf_name, config)
        if part == "lora_B" and heads is not None:
            array = permute_rope_rows(array, heads)  # B's rows are the projection's output rows
        suffix = ".lora_a" if part == "lora_A" else ".lora_b"
        array = np.ascontiguousarray(array, dtype=np.float16 if dtype == "f16" else np.float32)
        writer.add_tensor(gguf_tensor_name(hf_name) + suffix, array)
    _write(writer)
    return path


# ---------------------------------------------------------------------------- reading back


def read_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata, {name: float32 array in torch order}) of a GGUF file; quantized tensors dequantized.

    Array-valued metadata (token lists, merges) is left out of the dict except its length
    (`<key>.len`); scalars and strings are kept.
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as err:
        raise ValueError(f"{path} is not a readable GGUF file ({err})") from None
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
            meta[key + ".len"] = len(field.data)
        else:
            meta[key] = field.contents()
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))  # GGML order -> torch order
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = np.asarray(values, dtype=np.float32).reshape(shape)
    return meta, tensors


def gguf_to_hf_tensors(tensors: dict[str, np.ndarray], config: dict) -> dict[str, np.ndarray]:
    """Map GGUF model tensors back to transformers names and undo the q/k row permutation."""
    names = {v: k for k, v in _GLOBAL_NAMES.items()}
    for i in range(config["num_hidden_layers"]):
        for hf, gg in LLAMA_TENSOR_NAMES.items():
            names[f"blk.{i}.{gg}"] = f"model.layers.{i}.{hf}"
    out = {}
    for name, array in tensors.items():
        if name not in names:
            raise ValueError(f"GGUF tensor {name!r} is not a Llama tensor this module knows")
        hf_name = names[name]
        heads = _rope_heads(hf_name, config)
        out[hf_name] = array if heads is None else unpermute_rope_rows(array, heads)
    return out


# ---------------------------------------------------------------------------- llama.cpp


def llama_cpp_available() -> bool:
    """True when llama-cpp-python imports here (it builds llama.cpp from source when installed)."""
    return importlib.util.find_spec("llama_cpp") is not None


def _llama(model_path, lora_path=None, n_ctx: int = 512, threads: int = 1):
    if not llama_cpp_available():
        raise ImportError(
            "llama-cpp-python is not installed: `pip install llama-cpp-python` builds llama.cpp from "
            "source (a C++ compiler and cmake are needed; several minutes on 2 cores)"
        )
    from llama_cpp import Llama

    kwargs = {"lora_path": str(lora_path)} if lora_path else {}
    return Llama(
        model_path=str(model_path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
        seed=0, verbose=False, **kwargs,
    )  # fmt: skip


def llama_cpp_tokenize(model_path: str | os.PathLike, texts: Sequence[str]) -> list[list[int]]:
    """llama.cpp's token ids for `texts` (special tokens parsed, no BOS added)."""
    llm = _llama(model_path)
    return [llm.tokenize(t.encode(), add_bos=False, special=True) for t in texts]


def llama_cpp_greedy(
    model_path: str | os.PathLike,
    prompts: Sequence[Sequence[int]],
    max_tokens: int = 16,
    lora_path: str | os.PathLike | None = None,
    eos_token_id: int | None = None,
    n_ctx: int = 512,
) -> list[list[int]]:
    """Greedy continuations (token ids, without the EOS) of token-id prompts with llama.cpp.

    The prompts go in as ids, so llama.cpp's tokenizer is not involved (compare it separately with
    `llama_cpp_tokenize`). `lora_path`: a GGUF adapter applied on top of the model.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    llm = _llama(model_path, lora_path, n_ctx=n_ctx)
    eos = llm.token_eos() if eos_token_id is None else eos_token_id
    outputs = []
    for prompt in prompts:
        out = []
        for token in llm.generate(
            [int(t) for t in prompt], temp=0.0, top_k=1, repeat_penalty=1.0, reset=True
        ):
            if token == eos:
                break
            out.append(int(token))
            if len(out) >= max_tokens:
                break
        outputs.append(out)
    return outputs


def llama_cpp_answers(
    gguf_files: dict[str, str | os.PathLike | tuple],
    prompt_ids: Sequence[Sequence[int]],
    max_tokens: int = 16,
    eos_token_id: int | None = None,
) -> dict[str, list[list[int]]]:
    """Greedy token ids from llama.cpp for several GGUF files: {label: [ids per prompt]}.

    `gguf_files` maps a label to a model file, or to (model file, LoRA GGUF file). One function for
    the chapter (live, when llama-cpp-python is installed) and `benchmarks/gguf_llama_cpp.py` (which
    caches the same result in data/results/gguf_llama_cpp.json).
    """
    answers = {}
    for label, spec in gguf_files.items():
        model, lora = spec if isinstance(spec, tuple) else (spec, None)
        answers[label] = llama_cpp_greedy(
            model, prompt_ids, max_tokens, lora_path=lora, eos_token_id=eos_token_id
        )
    return answers
