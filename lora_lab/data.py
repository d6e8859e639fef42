"""The embedded data sets, as a reader loads them: tasks, corpus, probes, the shop database.

Every file under `data/` is written by `lora_lab.datagen` (`python -m lora_lab.datagen`), seeded and
byte-identical on every run; this module only reads them, checks them and names them:

- `load_task(name, split)`: the fine-tuning tasks (`TASKS`: `support`, `sql`, `shift`), chats of
  `{"messages": [user turn, assistant turn], ...}` plus the fields their scorers need.
- `load_corpus(split)`: the pretraining documents of the tiny base model, as strings.
- `load_probes(split)`: cloze questions on facts the corpus states (`{"prompt", "answer"}`).
- `shop_database()`: the sql task's sqlite3 database, read-only; `sql_shape` names a query's shape.
- `load_chat_jsonl(path)`: YOUR chat data set, every row checked before training starts.
- `CHAT_TEMPLATE` / `render_chat`: the tiny base model's chat format (Jinja and plain Python).

Left out: how the data is made (the fictional world, the generators, the split rules): that is
`lora_lab.datagen`. Nothing is downloaded.
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

from lora_lab.paths import data_dir

__all__ = [
    "TASKS",
    "SPLITS",
    "SHOP_SQL_PATH",
    "SHOP_NAME",
    "CHAT_TEMPLATE",
    "render_chat",
    "load_jsonl",
    "load_chat_jsonl",
    "write_jsonl",
    "load_task",
    "load_corpus",
    "load_probes",
    "shop_database",
    "sql_shape",
]

TASKS = ("support", "sql", "shift")
SPLITS = ("train", "validation", "test")
SHOP_SQL_PATH = data_dir() / "shop.sql"
SHOP_NAME = "Lumen Lane"

# The chat template of the tiny base model (Jinja, as transformers expects). Each turn is
# `<|role|>\n` + content; an assistant turn ends with the end-of-text token, which is where generation
# stops. `{% generation %}` marks the assistant tokens for TRL's `assistant_only_loss`.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ message['content'] + '<|endoftext|>' }}{% endgeneration %}"
    "{%- else -%}"
    "{{ message['content'] + '\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)


def render_chat(messages: list[dict]) -> str:
    """The chat template in plain Python (used to put chats into the pretraining corpus)."""
    out = []
    for m in messages:
        if m["role"] == "assistant":
            out.append(f"<|assistant|>\n{m['content']}<|endoftext|>")
        else:
            out.append(f"<|{m['role']}|>\n{m['content']}\n")
    return "".join(out)


def shop_database(path: str | Path | None = None) -> sqlite3.Connection:
    """An in-memory sqlite3 database built from `data/shop.sql`, set read-only (`PRAGMA query_only`)."""
    path = Path(path) if path is not None else SHOP_SQL_PATH
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run `python -m lora_lab.datagen` to generate it")
    conn = sqlite3.connect(":memory:")
    conn.executescript(path.read_text())
    conn.execute("PRAGMA query_only = ON")
    return conn


# Request shapes of the sql task, told apart by the reference query; the first pattern that matches wins.
SQL_SHAPES = [
    ("join", r" JOIN "), ("group", r"GROUP BY"), ("top", r"ORDER BY"), ("agg", r"\b(AVG|MAX|MIN|SUM)\("),
    ("count", r"COUNT\("), ("and", r" AND "), ("num", r"[<>] \d"),
]  # fmt: skip


def sql_shape(sql: str) -> str:
    """The request shape of a reference query: join, group, top, agg, count, and, num or select."""
    return next((shape for shape, pattern in SQL_SHAPES if re.search(pattern, sql)), "select")


def write_jsonl(path: str | Path, rows: list) -> None:
    """Write one JSON value per line (UTF-8, stable key order), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def load_jsonl(path: str | Path) -> list:
    """Read a JSONL file; a malformed line raises ValueError naming the file and the line number."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; run `python -m lora_lab.datagen` to generate the data sets"
        )
    return [row for _, row in _numbered_rows(path, "regenerate it with `python -m lora_lab.datagen`")]


def _numbered_rows(path: Path, fix: str) -> list[tuple[int, object]]:
    """(line number, parsed row) for every non-blank line; ValueError naming the file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}, line {i}: not valid JSON ({e.msg}); the file is corrupted: {fix}"
                ) from None
    return rows


def load_chat_jsonl(path: str | Path) -> list[dict]:
    """Read YOUR chat data set: JSONL rows of {"messages": [{"role", "content"}, ...]} ending with an
    assistant turn (the answer to learn). Every row is checked first; an error names the file and line."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"train file {path} {what}; pass a JSONL file of chat rows, e.g. "
            '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'
        )
    rows = _numbered_rows(path, "fix or remove that line")
    for i, row in rows:
        problem = _chat_row_problem(row)
        if problem:
            raise ValueError(
                f"{path}, line {i}: {problem}; each row must be "
                '{"messages": [..., {"role": "assistant", "content": "the answer"}]}'
            )
    if not rows:
        raise ValueError(f"{path} holds no rows; give a non-empty chat data set")
    return [row for _, row in rows]


def _chat_row_problem(row) -> str | None:
    """What is wrong with one chat row, or None."""
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list) or not messages:
        return "no non-empty 'messages' list"
    for m in messages:
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            return f"the message {m!r} is not {{'role': str, 'content': str}}"
    if messages[-1]["role"] != "assistant":
        return f"the last message has role {messages[-1]['role']!r}, not 'assistant' (there is no answer to learn)"
    return None


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


def load_task(name: str, split: str = "train") -> list[dict]:
    """The examples of task `name` ("support", "sql" or "shift") in `split` (train/validation/test).

    Each example is `{"messages": [user turn, assistant turn], ...}` plus the fields its scorer needs.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    _check_split(split)
    return load_jsonl(data_dir() / f"{name}_{split}.jsonl")


def load_corpus(split: str = "train") -> list[str]:
    """The pretraining documents of `split` as strings."""
    _check_split(split)
    return [row["text"] for row in load_jsonl(data_dir() / f"corpus_{split}.jsonl")]


def load_probes(split: str = "test") -> list[dict]:
    """Knowledge probes `{"prompt", "answer"}` ("test": every fact of the world; "validation": 40 of them)."""
    if split not in ("validation", "test"):
        raise ValueError(f"unknown probe split {split!r}; valid: validation, test")
    return load_jsonl(data_dir() / f"probes_{split}.jsonl")
