"""lora_lab.shipping: the pre-merge checklist, GGUF conversion (model and LoRA), llama.cpp runs."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")

from lora_lab import shipping  # noqa: E402
from lora_lab.paths import DATA_DIR, RESULTS_DIR, TINY_BASE_DIR  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random Llama with grouped-query attention (4 heads, 2 KV heads) and the bundled tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(root)
    for name in TOKENIZER_FILES:
        shutil.copy(TINY_BASE_DIR / name, root / name)
    return root, model


def _peft_adapter(model, path, r=4, **extra):
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj"],
                        init_lora_weights=False, **extra)  # fmt: skip
    get_peft_model(copy.deepcopy(model), config).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------- RoPE row order


def _rope_half(x, pos):
    """transformers' Llama RoPE: dimension j pairs with j + d/2 (rotate_half). x [heads, d]."""
    d = x.shape[-1]
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    ang = torch.cat([pos * inv, pos * inv])
    rot = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], dim=-1)
    return x * ang.cos() + rot * ang.sin()


def _rope_pairs(x, pos):
    """llama.cpp's Llama RoPE (normal mode): dimension 2j pairs with 2j + 1."""
    d = x.shape[-1]
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    ang = pos * inv
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * ang.cos() - odd * ang.sin()
    out[..., 1::2] = even * ang.sin() + odd * ang.cos()
    return out


def test_permuted_rows_give_the_same_attention_scores_under_llama_cpp_rope():
    torch.manual_seed(0)
    heads, d, hidden = 3, 8, 12
    wq, wk = torch.randn(heads * d, hidden), torch.randn(heads * d, hidden)
    xq, xk = torch.randn(hidden), torch.randn(hidden)
    for pq, pk in ((0, 0), (5, 2), (17, 9)):
        hf_q = _rope_half((wq @ xq).view(heads, d), pq)
        hf_k = _rope_half((wk @ xk).view(heads, d), pk)
        cpp_q = _rope_pairs((shipping.permute_rope_rows(wq, heads) @ xq).view(heads, d), pq)
        cpp_k = _rope_pairs((shipping.permute_rope_rows(wk, heads) @ xk).view(heads, d), pk)
        assert torch.allclose((hf_q * hf_k).sum(-1), (cpp_q * cpp_k).sum(-1), atol=1e-4)
        # without the permutation the scores differ: the step is needed
        raw_q = _rope_pairs((wq @ xq).view(heads, d), pq)
        raw_k = _rope_pairs((wk @ xk).view(heads, d), pk)
        if pq != pk:
            assert not torch.allclose((hf_q * hf_k).sum(-1), (raw_q * raw_k).sum(-1), atol=1e-3)


def test_unpermute_inverts_permute_for_numpy_and_torch():
    w = np.arange(4 * 6 * 5, dtype=np.float32).reshape(24, 5)
    assert np.array_equal(shipping.unpermute_rope_rows(shipping.permute_rope_rows(w, 4), 4), w)
    assert not np.array_equal(shipping.permute_rope_rows(w, 4), w)
    t = torch.randn(16, 3)
    assert torch.equal(shipping.unpermute_rope_rows(shipping.permute_rope_rows(t, 2), 2), t)
    with pytest.raises(ValueError, match="do not split into 5 heads"):
        shipping.permute_rope_rows(w, 5)


def test_tensor_names_agree_with_the_gguf_package_map():
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
        f"model.layers.1.{k}" for k in shipping.LLAMA_TENSOR_NAMES
    ]
    for hf in names:
        assert shipping.gguf_tensor_name(hf) == name_map.get_name(hf, try_suffixes=(".weight",)), hf
    with pytest.raises(ValueError, match="no GGUF name"):
        shipping.gguf_tensor_name("model.layers.0.self_attn.q_proj.bias")


# ---------------------------------------------------------------------------- model GGUF


def test_model_gguf_round_trip_is_exact_in_f32_and_close_when_quantized(tiny_llama, tmp_path):
    root, model = tiny_llama
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    config = json.loads((root / "config.json").read_text())
    gaps = {}
    for kind in ("f32", "f16", "q8_0"):
        path = shipping.write_llama_gguf(root, tmp_path / f"m-{kind}.gguf", dtype=kind)
        meta, tensors = shipping.read_gguf(path)
        back = shipping.gguf_to_hf_tensors(tensors, config)
        assert set(back) == set(weights)
        gaps[kind] = max(float(np.abs(back[k] - weights[k]).max()) for k in weights)
        assert meta["general.file_type"] == shipping.GGUF_TYPES[kind][1]
        # the 1-D norms stay f32 in every file
        reader = gguf.GGUFReader(path)
        kinds = {t.name: t.tensor_type.name for t in reader.tensors}
        assert kinds["blk.0.attn_norm.weight"] == "F32"
        assert kinds["blk.0.attn_q.weight"] == shipping.GGUF_TYPES[kind][0]
    assert gaps["f32"] == 0.0
    assert 0 < gaps["f16"] < 1e-3 and 0 < gaps["q8_0"] < 2e-2
    sizes = {k: (tmp_path / f"m-{k}.gguf").stat().st_size for k in gaps}
    assert sizes["f32"] > 1.9 * sizes["f16"] > 1.9 * 0.5 * sizes["f32"] and sizes["q8_0"] < 0.6 * sizes["f16"]


def test_model_gguf_metadata_and_tokenizer(tiny_llama, tmp_path):
    root, _ = tiny_llama
    meta, _ = shipping.read_gguf(shipping.write_llama_gguf(root, tmp_path / "m.gguf", name="tiny"))
    assert meta["general.architecture"] == "llama" and meta["general.name"] == "tiny"
    assert meta["llama.block_count"] == 2 and meta["llama.embedding_length"] == 64
    assert meta["llama.attention.head_count"] == 4 and meta["llama.attention.head_count_kv"] == 2
    assert meta["llama.rope.dimension_count"] == 16 and meta["llama.feed_forward_length"] == 96
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    tok = json.loads((root / "tokenizer.json").read_text())
    assert meta["tokenizer.ggml.tokens.len"] == 2048
    assert meta["tokenizer.ggml.merges.len"] == len(tok["model"]["merges"])
    assert meta["tokenizer.ggml.eos_token_id"] == 0 and meta["tokenizer.ggml.padding_token_id"] == 1
    assert meta["tokenizer.ggml.add_bos_token"] is False  # the HF tokenizer adds no BOS either
    assert "<|assistant|>" in meta["tokenizer.chat_template"]
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert tokens[2] == "<|user|>" and types[2] == gguf.TokenType.CONTROL
    assert types[100] == gguf.TokenType.NORMAL and tokens[100] == next(
        t for t, i in tok["model"]["vocab"].items() if i == 100
    )


def test_model_gguf_refuses_what_it_cannot_convert(tiny_llama, tmp_path):
    root, _ = tiny_llama
    with pytest.raises(ValueError, match="dtype must be one of"):
        shipping.write_llama_gguf(root, tmp_path / "x.gguf", dtype="q4_k")
    no_tok = tmp_path / "no-tok"
    shutil.copytree(root, no_tok)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.save_pretrained"):
        shipping.write_llama_gguf(no_tok, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    other = tmp_path / "opt"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "opt"}))
    with pytest.raises(ValueError, match="Llama only"):
        shipping.write_llama_gguf(other, tmp_path / "x.gguf")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        shipping.write_llama_gguf(tmp_path / "nothing", tmp_path / "x.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a readable GGUF"):
        shipping.read_gguf(bad)


# ---------------------------------------------------------------------------- LoRA GGUF


def test_lora_gguf_holds_a_and_b_in_llama_cpp_order_and_alpha(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    root, model = tiny_llama
    adapter = _peft_adapter(model, tmp_path / "adapter", r=4)
    meta, tensors = shipping.read_gguf(shipping.write_lora_gguf(adapter, root, tmp_path / "lora.gguf"))
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == 8.0
    state = load_file(adapter / "adapter_model.safetensors")
    pre = "base_model.model.model.layers.1.self_attn."
    a_q, b_q = state[pre + "q_proj.lora_A.weight"].numpy(), state[pre + "q_proj.lora_B.weight"].numpy()
    assert np.array_equal(tensors["blk.1.attn_q.weight.lora_a"], a_q)  # [r, in]: unchanged
    assert np.array_equal(tensors["blk.1.attn_q.weight.lora_b"], shipping.permute_rope_rows(b_q, 4))
    b_k = state[pre + "k_proj.lora_B.weight"].numpy()
    assert np.array_equal(tensors["blk.1.attn_k.weight.lora_b"], shipping.permute_rope_rows(b_k, 2))
    b_v = state[pre + "v_proj.lora_B.weight"].numpy()
    assert np.array_equal(tensors["blk.1.attn_v.weight.lora_b"], b_v)  # v is not rotated
    assert len(tensors) == 2 * 3 * 2
    # the permuted delta B A equals the permuted merged delta: merging before or after converting agree
    delta = b_q @ a_q
    assert np.allclose(tensors["blk.1.attn_q.weight.lora_b"] @ a_q, shipping.permute_rope_rows(delta, 4))


def test_lora_gguf_rslora_alpha_and_refusals(tiny_llama, tmp_path):
    root, model = tiny_llama
    rs = _peft_adapter(model, tmp_path / "rs", r=4, use_rslora=True)
    meta, _ = shipping.read_gguf(shipping.write_lora_gguf(rs, root, tmp_path / "rs.gguf"))
    assert math.isclose(
        meta["adapter.lora.alpha"], 8.0 * 2.0, rel_tol=1e-6
    )  # alpha * sqrt(r): scale alpha/sqrt(r)
    dora = _peft_adapter(model, tmp_path / "dora", r=4, use_dora=True)
    with pytest.raises(ValueError, match="use_dora"):
        shipping.write_lora_gguf(dora, root, tmp_path / "dora.gguf")
    with pytest.raises(ValueError, match="'f32' or 'f16'"):
        shipping.write_lora_gguf(rs, root, tmp_path / "x.gguf", dtype="q8_0")


# ---------------------------------------------------------------------------- the checklist


def test_premerge_checklist_passes_a_plain_adapter_and_catches_the_rest(tiny_llama, tmp_path):
    import copy

    from peft import PeftModel

    from lora_lab.inject import LoRAConfig, add_lora
    from lora_lab.nf4 import quantize_model

    root, model = tiny_llama
    adapter = _peft_adapter(model, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), adapter)
    report = shipping.premerge_checklist(peft_model)
    assert report["problems"] == [] and report["warnings"] == []
    assert report["lora_layers"] == 6 and report["dtypes"] == ["torch.float32"]
    assert set(report["versions"]) == {"torch", "transformers", "peft"}

    ours = add_lora(copy.deepcopy(model), LoRAConfig(r=2, target_modules=["v_proj"]))
    assert shipping.premerge_checklist(ours)["lora_layers"] == 2

    half = PeftModel.from_pretrained(copy.deepcopy(model).to(torch.bfloat16), adapter)
    assert "torch.bfloat16" in shipping.premerge_checklist(half)["warnings"][0]

    with pytest.raises(ValueError, match="nothing to merge"):
        shipping.premerge_checklist(model)
    quantized = add_lora(quantize_model(copy.deepcopy(model)), LoRAConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="quantized base layers.*dequantize"):
        shipping.premerge_checklist(quantized)
    assert shipping.premerge_checklist(quantized, strict=False)["quantized_layers"] == 2


def test_dir_bytes(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"y" * 5)
    assert shipping.dir_bytes(tmp_path) == 15 and shipping.dir_bytes(tmp_path / "a") == 10
    with pytest.raises(FileNotFoundError):
        shipping.dir_bytes(tmp_path / "missing")


# ---------------------------------------------------------------------------- llama.cpp


def _chat_prompts(tok, n):
    from lora_lab.data import load_task

    texts = [
        tok.apply_chat_template(ex["messages"][:1], tokenize=False, add_generation_prompt=True)
        for ex in load_task("sql", "test")[:n]
    ]
    return texts, [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _hf_greedy(model, prompts, max_new, eos):
    answers = []
    for p in prompts:
        with torch.no_grad():
            out = model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=max_new, pad_token_id=1,
                                 eos_token_id=eos)  # fmt: skip
        row = out[0, len(p) :].tolist()
        answers.append(row[: row.index(eos)] if eos in row else row)
    return answers


CACHE = RESULTS_DIR / "gguf_llama_cpp.json"


@pytest.mark.skipif(
    not CACHE.exists(), reason="no cached llama.cpp result (run benchmarks/gguf_llama_cpp.py)"
)
def test_cached_llama_cpp_result_matches_todays_model_and_adapter():
    """The cache chapter 10 shows was made from today's bundled model and sql adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = json.loads(CACHE.read_text())
    tok = AutoTokenizer.from_pretrained(TINY_BASE_DIR)
    texts, prompts = _chat_prompts(tok, len(cached["prompts"]))
    assert prompts == cached["prompts"]
    model = AutoModelForCausalLM.from_pretrained(TINY_BASE_DIR).eval()
    model = PeftModel.from_pretrained(model, DATA_DIR / "adapters" / "sql").eval()
    now = _hf_greedy(model, prompts, cached["max_tokens"], tok.eos_token_id)
    assert now == cached["transformers_answers"]["base + LoRA f32"]
    n = len(prompts)
    assert cached["agreement"]["merged f32"] >= n - 1 and cached["agreement"]["base + LoRA f32"] >= n - 1
    assert cached["tokenizer_agreement"] == n


@pytest.mark.skipif(
    not shipping.llama_cpp_available(),
    reason="llama-cpp-python is not installed: it builds llama.cpp from source (about 4-10 min on 2 cores), "
    "too long for every CI run; `pip install llama-cpp-python==0.3.36` to run this test",
)
def test_llama_cpp_answers_like_transformers(tmp_path):
    import copy

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_BASE_DIR)
    texts, prompts = _chat_prompts(tok, 4)
    eos = tok.eos_token_id
    base = AutoModelForCausalLM.from_pretrained(TINY_BASE_DIR).eval()
    adapter = DATA_DIR / "adapters" / "sql"
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), adapter).eval()
    unmerged = _hf_greedy(peft_model, prompts, 24, eos)
    merged_dir = tmp_path / "merged"
    peft_model.merge_and_unload().save_pretrained(merged_dir)
    tok.save_pretrained(merged_dir)
    files = {
        "base": shipping.write_llama_gguf(TINY_BASE_DIR, tmp_path / "base.gguf"),
        "merged": shipping.write_llama_gguf(merged_dir, tmp_path / "merged.gguf"),
        "lora": (
            tmp_path / "base.gguf",
            shipping.write_lora_gguf(adapter, merged_dir, tmp_path / "lora.gguf"),
        ),
    }
    answers = shipping.llama_cpp_answers(files, prompts, 24, eos_token_id=eos)
    assert answers["base"] == _hf_greedy(base, prompts, 24, eos)
    assert answers["merged"] == unmerged and answers["lora"] == unmerged
    assert shipping.llama_cpp_tokenize(files["merged"], texts) == prompts
