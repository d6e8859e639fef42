"""Shared fixtures: tiny random-init Llama, OPT and GPT-2 models built from small configs.

Each fixture builds a fresh model (tests change models in place) with a fixed seed, in fp32
and eval mode, so two calls give identical weights. Other helpers may ADD fixtures at the end
of this file; please do not change the existing ones.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

from lora_lab.paths import TINY_BASE_DIR

# Property-based tests draw the same examples on every run (a CI failure can be re-run and fixed);
# HYPOTHESIS_PROFILE=explore searches new examples, for a session hunting bugs.
settings.register_profile("repeatable", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

# The linear layers each family has, for target_modules in tests.
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # transformers Conv1D: weight stored [in, out]
}
VOCAB = 128


def build_tiny(kind: str, seed: int = 0, **sizes) -> torch.nn.Module:
    """A tiny random-init causal LM of the given family ("llama", "opt", "gpt2", or "tiny-base").

    `sizes` override the Llama / OPT config (e.g. `hidden_size=48` for a wider twin)."""
    from transformers import (
        AutoModelForCausalLM,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        OPTConfig,
        OPTForCausalLM,
    )

    torch.manual_seed(seed)
    shared = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    if kind == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(**shared | dict(intermediate_size=64, num_key_value_heads=2) | sizes)
        )
    elif kind == "opt":
        model = OPTForCausalLM(OPTConfig(**shared | dict(ffn_dim=64, word_embed_proj_dim=32) | sizes))
    elif kind == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        model = GPT2LMHeadModel(config)
    elif kind == "tiny-base":
        if not (TINY_BASE_DIR / "config.json").is_file():
            pytest.skip(f"the bundled model is not built yet ({TINY_BASE_DIR}/config.json is missing)")
        model = AutoModelForCausalLM.from_pretrained(TINY_BASE_DIR, dtype=torch.float32)
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}")
    model.config._attn_implementation = "eager"
    return model.float().eval()


def tiny_inputs(model: torch.nn.Module, batch: int = 2, seq: int = 8, seed: int = 1) -> torch.Tensor:
    """Random token ids [batch, seq] that fit the model's vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(model.config.vocab_size, VOCAB), (batch, seq), generator=g)


@pytest.fixture
def make_tiny():
    """Factory fixture: `make_tiny("llama")` returns a fresh tiny model (same weights every call)."""
    return build_tiny


@pytest.fixture(params=["llama", "opt", "gpt2"])
def tiny_kind(request) -> str:
    """Parametrizes a test over the three tiny model families."""
    return request.param


@pytest.fixture
def tiny_llama():
    return build_tiny("llama")


@pytest.fixture
def tiny_opt():
    return build_tiny("opt")


@pytest.fixture
def tiny_gpt2():
    return build_tiny("gpt2")


# ---------------------------------------------------------------------------- PEFT twins


def to_peft_config(config, **overrides):
    """The PEFT LoraConfig equal to a lora_lab LoRAConfig (task_type CAUSAL_LM)."""
    from peft import LoraConfig

    same = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "init_lora_weights", "bias")
    kwargs = {key: getattr(config, key) for key in same} | {"task_type": "CAUSAL_LM"}
    return LoraConfig(**(kwargs | overrides))


def copy_lora_into_peft(ours: torch.nn.Module, peft_model: torch.nn.Module) -> int:
    """Copy every lora_A / lora_B weight of a lora_lab model into the same layer of a PEFT model.

    Returns the number of tensors copied (and asserts both sides have the same LoRA layers).
    """
    theirs = {
        k.removeprefix("base_model.model.").replace(".default.", "."): p
        for k, p in peft_model.named_parameters()
        if "lora_" in k
    }
    mine = {k: p for k, p in ours.named_parameters() if "lora_" in k}
    assert set(mine) == set(theirs), sorted(set(mine) ^ set(theirs))[:5]
    with torch.no_grad():
        for k, p in mine.items():
            theirs[k].copy_(p)
    return len(mine)


# ---------------------------------------------------------------------------- PEFT-format adapter files
# (added for the registry / serving tests)


def save_peft_adapter(path, kind="llama", r=4, lora_alpha=8, target_modules=None, seed=0, **overrides):
    """Write a PEFT-format adapter folder for `build_tiny(kind)` with random, non-zero A and B.

    `init_lora_weights=False` keeps nn.Linear's random init for both A and B, so the adapter changes
    the model's output; `seed` makes each adapter different and reproducible. Returns `path`.
    """
    from peft import LoraConfig, get_peft_model

    model = build_tiny(kind)
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=target_modules or TARGETS[kind],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
        **overrides,
    )
    torch.manual_seed(seed)
    get_peft_model(model, config).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------- a saved tiny model folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-init tiny Llama with a small BPE tokenizer and the book's chat template, saved as a folder.

    Lets the command line and the sweep be tested end to end (config -> training -> PEFT adapter) in
    seconds, with no bundled model needed. Added by the issue-5 helper (tests/test_cli.py, test_widgets.py).
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lora_lab.data import CHAT_TEMPLATE, load_task

    texts = [m["content"] for ex in load_task("sql", "train")[:300] for m in ex["messages"]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>"]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    path = tmp_path_factory.mktemp("tiny-model")
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def saved_tiny_llama(tmp_path_factory):
    """`build_tiny("llama")` saved as a folder, for transformers' own loading paths (4-bit included)."""
    path = tmp_path_factory.mktemp("tiny_llama")
    build_tiny("llama").save_pretrained(path)
    return path


def load_4bit(path, dtype=torch.float32):
    """A model folder loaded in 4 bits through transformers' `BitsAndBytesConfig` (NF4, double
    quantization) on CPU, kept off bitsandbytes' AVX512-BF16 repacking (`bnb_cpu.disable_cpu_repacking`)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lora_lab.bnb_cpu import disable_cpu_repacking

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, dtype=dtype, device_map="cpu"
    )
    disable_cpu_repacking(model)
    return model


def load_benchmark(name: str):
    """`benchmarks/<name>.py` as a module, for tests of its helpers (benchmarks/ is not a package)."""
    import importlib.util

    from lora_lab.paths import REPO_ROOT

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------- adapters trained with dropout
# (added for issue 15: loading for inference must switch LoRA dropout off, as PEFT's from_pretrained does)


@pytest.fixture(scope="session")
def dropout_adapter_dir(tmp_path_factory):
    """A PEFT adapter for the tiny Llama saved with lora_dropout=0.1 (as most real adapters are)."""
    path = tmp_path_factory.mktemp("dropout-adapter")
    return save_peft_adapter(path, r=4, lora_alpha=8, seed=5, lora_dropout=0.1)


def assert_inference_like_peft(model, peft_model, ids) -> None:
    """Two identical forwards of `model` agree exactly (dropout off) and equal PEFT's output."""
    with torch.no_grad():
        first, second = model(input_ids=ids).logits, model(input_ids=ids).logits
        theirs = peft_model(input_ids=ids).logits
    assert torch.equal(first, second), f"two identical forwards differ by {(first - second).abs().max():.3g}"
    torch.testing.assert_close(first, theirs, atol=1e-5, rtol=0)


# Per-layer ranks and alphas as PEFT writes them (rank_pattern / alpha_pattern): v_proj at r=2, the
# second layer's q_proj at r=8, q_proj and down_proj with their own alphas; everything else r=4, alpha=8.
PATTERNS = {
    "rank_pattern": {"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 8},
    "alpha_pattern": {"q_proj": 32, "down_proj": 4},
}


@pytest.fixture(scope="session")
def pattern_adapter_dir(tmp_path_factory):
    """A PEFT adapter for the tiny Llama on all seven projections with rank_pattern and alpha_pattern."""
    path = tmp_path_factory.mktemp("pattern-adapter")
    return save_peft_adapter(path, r=4, lora_alpha=8, seed=6, **PATTERNS)


# ---------------------------------------------------------------------------- hypothesis strategies
# (added for issue 15: property tests of adapters, merging and mixed batches on the tiny Llama)


def lora_configs():
    """Plain LoRA settings for the tiny Llama: ranks, alphas, rsLoRA, target subsets, a rank pattern."""
    from hypothesis import strategies as st

    from lora_lab.inject import LoRAConfig

    @st.composite
    def build(draw):
        targets = draw(st.lists(st.sampled_from(TARGETS["llama"]), min_size=1, max_size=4, unique=True))
        use_rslora = draw(st.booleans())
        pattern = {} if use_rslora else draw(st.sampled_from([{}, {targets[0]: 2}]))  # PEFT: not with rsLoRA
        return LoRAConfig(
            r=draw(st.sampled_from([1, 2, 4, 8])),
            lora_alpha=draw(st.sampled_from([0.5, 1, 8, 16.0, 64])),
            lora_dropout=draw(st.sampled_from([0.0, 0.1])),
            target_modules=targets,
            use_rslora=use_rslora,
            init_lora_weights=False,
            rank_pattern=pattern,
        )

    return build()


def save_adapter_set(root, seed: int, c_spec: dict, rs: bool = True) -> dict:
    """PEFT adapters "a", "b", "c" (and an rsLoRA "rs") for the tiny Llama, seeds `seed`, `seed + 1`, ...:
    different ranks, alphas and targets; `c_spec` sets adapter c's r, lora_alpha and target_modules."""
    dirs = {
        "a": save_peft_adapter(root / "a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=seed),
        "b": save_peft_adapter(
            root / "b", r=8, lora_alpha=16, target_modules=TARGETS["llama"], seed=seed + 1
        ),
        "c": save_peft_adapter(root / "c", seed=seed + 2, **c_spec),
    }
    if rs:
        dirs["rs"] = save_peft_adapter(
            root / "rs",
            r=8,
            lora_alpha=8,
            target_modules=["o_proj", "up_proj"],
            seed=seed + 3,
            use_rslora=True,
        )
    return dirs


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    """Four PEFT adapters for the registry tests (one of them rsLoRA)."""
    c_spec = dict(r=2, lora_alpha=4, target_modules=["k_proj", "down_proj"])
    return save_adapter_set(tmp_path_factory.mktemp("adapters"), 1, c_spec)


@pytest.fixture(scope="module")
def serving_adapter_dirs(tmp_path_factory):
    """Three PEFT adapters for the serving tests (seeds whose greedy answers run to the last token)."""
    c_spec = dict(r=2, lora_alpha=2, target_modules=["o_proj", "gate_proj"])
    return save_adapter_set(tmp_path_factory.mktemp("serving_adapters"), 11, c_spec, rs=False)
