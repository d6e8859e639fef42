"""vLLM server start-up on this machine: the CPU build's default processes against the model in the engine.

vLLM's CPU build starts three Python processes by default (API server, engine core, and a worker
the engine core spawns), and each imports torch and vLLM. `--distributed-executor-backend uni` with
`VLLM_ENABLE_V1_MULTIPROCESSING=0` runs the model inside the engine core process: one import fewer.
This script starts the server on the bundled model with the two adapters chapter 10 serves, in
both ways, alternating (a, b, a, b, ...) so that changes in machine load hit both, and records the
seconds until the server answers, the seconds of the phases read from the server's log, the number
of processes that wrote to the server's log, and the system load average. Writes
data/results/vllm_startup.json:

    python benchmarks/vllm_startup.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lora_lab import vllm_server  # noqa: E402
from lora_lab.paths import DATA_DIR, RESULTS_DIR, TINY_BASE_DIR  # noqa: E402

CONFIGS = {
    "default (3 processes)": {"extra_args": ["--max-num-seqs", "16"], "env": {}},
    "uni executor (2 processes)": {
        "extra_args": ["--max-num-seqs", "16", "--distributed-executor-backend", "uni"],
        "env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
    },
}
STAMP = re.compile(r"\((\w+) pid=(\d+)\) \w+ \d\d-\d\d (\d\d:\d\d:\d\d)")


def one_start(config: dict) -> dict:
    adapters = {n: DATA_DIR / "adapters" / n for n in ("support", "sql")}
    log = Path(tempfile.mkstemp(prefix="vllm-startup-", suffix=".log")[1])
    load = os.getloadavg()[0]
    server = vllm_server.start(
        TINY_BASE_DIR, lora_modules=adapters, served_model_name="base", max_lora_rank=8, max_loras=3,
        extra_args=config["extra_args"], env=config["env"], timeout=900, log_path=log,
    )  # fmt: skip
    try:
        answer = server.complete("sql", "SELECT", max_tokens=4)["token_ids"]
    finally:
        server.stop()
    roles, pids = {}, set()
    for role, pid, clock in STAMP.findall(log.read_text(errors="replace")):
        roles.setdefault(role, clock)  # first log line of each process
        pids.add(pid)
    return {
        "startup_s": round(server.startup_s, 1),
        "processes": len(pids),  # distinct process ids in the server's log
        "first_log_line": roles,
        "load_average_1min_before": round(load, 2),
        "answer_tokens": answer,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "vllm_startup.json")
    args = parser.parse_args(argv)
    runs = {name: [] for name in CONFIGS}
    for _ in range(args.repeats):
        for name, config in CONFIGS.items():
            runs[name].append(one_start(config))
            print(name, json.dumps(runs[name][-1]), flush=True)
    import vllm

    result = {
        "what": "seconds from launching vLLM's OpenAI server to its first answer, bundled model + 2 adapters",
        "when": datetime.now().isoformat(timespec="minutes"),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "vllm": vllm.__version__,
        "runs": runs,
        "median_startup_s": {n: statistics.median(r["startup_s"] for r in rs) for n, rs in runs.items()},
        "same_answers": len({tuple(r["answer_tokens"]) for rs in runs.values() for r in rs}) == 1,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["median_startup_s"]), f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
