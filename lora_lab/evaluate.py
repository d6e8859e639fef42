"""Evaluation: perplexity, knowledge-probe accuracy and task accuracy, each a plain float.

- `perplexity`: exp of the mean next-token loss over documents (a corpus split or a list of texts).
- `probe_accuracy`: share of cloze probes ("Mira Vell lives in" -> "Ostrin") whose greedy
  continuation starts with the answer; the book's measure of forgetting.
- `task_accuracy`: greedy, batched generation (left padding, progress bar) on a task split, scored by
  the task's scorer: `score_sql` (execution accuracy in sqlite3), `score_support` (the answer states
  the right fact), `score_shift` (exact translation).

Left out: sampling-based metrics, BLEU/ROUGE, LLM judges. The tasks are built so that a simple,
exact scorer is the right one.
"""

from __future__ import annotations

import math
import re
import sqlite3
import time
from collections import Counter
from contextlib import contextmanager

import torch

from lora_lab import data
from lora_lab.models import check_generation_length

__all__ = [
    "sql_shape",
    "accuracy_by_shape",
    "perplexity",
    "probe_accuracy",
    "task_accuracy",
    "generate_answers",
    "score_sql",
    "run_sandboxed_sql",
    "score_support",
    "score_shift",
    "score_answer",
    "MAX_NEW_TOKENS",
]

# Enough new tokens for the longest reference answer of each task (plus the end token).
MAX_NEW_TOKENS = {"support": 48, "sql": 64, "shift": 24}


def _check_positive_int(name: str, value, alternative: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"{name} must be a positive integer{' ' + alternative if alternative else ''}, got {value!r}"
        )


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def perplexity(model, tokenizer, texts_or_split="validation", *, seq_len: int = 128, batch_size: int = 16,
               limit: int | None = None) -> float:  # fmt: skip
    """Perplexity of `model` on a corpus split name or a list of strings (each ends with the eos token)."""
    texts = data.load_corpus(texts_or_split) if isinstance(texts_or_split, str) else list(texts_or_split)
    _check_positive_int("batch_size", batch_size)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2 (a next token to predict), got {seq_len!r}")
    if limit is not None:
        _check_positive_int("limit", limit, "or None for all texts")
        texts = texts[:limit]
    if not texts:
        raise ValueError("no texts to score: pass a non-empty list or a corpus split name")
    from lora_lab.train import collate, encode_example

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for i in range(0, len(texts), batch_size):
        batch = collate([encode_example(tokenizer, t, seq_len) for t in texts[i : i + batch_size]], pad)
        batch = {k: v.to(_device(model)) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, :-1].float()  # [batch, seq-1, vocab]
        labels = batch["labels"][:, 1:]  # [batch, seq-1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += float(loss)
        count += int((labels != -100).sum())
    model.train(was_training)
    return math.exp(total / count)


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list, *, batch_size: int = 32, max_new_tokens: int = 48,
                     progress: bool = True, desc: str = "generate") -> list[str]:  # fmt: skip
    """Greedy completions for `prompts` (strings, or lists of chat messages rendered with the template).

    Batched with left padding; generation stops at the eos token. Returns the decoded new text only.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list (one prompt per item), not one string; wrap it: [prompt]")
    _check_positive_int("batch_size", batch_size)
    texts = [
        p
        if isinstance(p, str)
        else tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    longest = max((len(ids) for ids in encoded), default=0)
    check_generation_length(model, longest, max_new_tokens)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    out: list[str] = []
    starts = range(0, len(texts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, leave=False)
    try:
        for i in starts:
            enc = tokenizer(
                texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            )
            enc = {k: enc[k].to(_device(model)) for k in ("input_ids", "attention_mask")}
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )  # [batch, prompt + new]
            new = gen[:, enc["input_ids"].shape[1] :]
            out.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return out


def probe_accuracy(model, tokenizer, probes: list[dict] | None = None, *, batch_size: int = 64,
                   max_new_tokens: int = 6, progress: bool = False) -> float:  # fmt: skip
    """Share of probes whose greedy continuation starts with the answer (default: the test probes)."""
    probes = data.load_probes("test") if probes is None else probes
    if not probes:
        raise ValueError("no probes to score")
    outs = generate_answers(
        model, tokenizer, [p["prompt"] for p in probes], batch_size=batch_size,
        max_new_tokens=max_new_tokens, progress=progress, desc="probes",
    )  # fmt: skip
    return sum(o.startswith(p["answer"]) for o, p in zip(outs, probes)) / len(probes)


# ---------------------------------------------------------------------------------------------------
# Scorers
# ---------------------------------------------------------------------------------------------------
_ORDER_BY = re.compile(r"\border\s+by\b", re.IGNORECASE)


def _normalize_rows(rows: list) -> list[tuple]:
    return [tuple(round(v, 6) if isinstance(v, float) else v for v in row) for row in rows]


# The sandbox every scored query runs in. A model's SQL is untrusted input: it gets a private copy of
# the database, may only read, and is stopped when it runs too long or builds values or heaps too big.
SQL_TIME_LIMIT_S = 2.0  # wall-clock seconds per query (every reference query runs in milliseconds)
SQL_MAX_VALUE_BYTES = 1_000_000  # longest string or blob a query may build (SQLITE_LIMIT_LENGTH)
SQL_HEAP_BYTES = 64 * 2**20  # extra sqlite heap a query may take (sqlite3_hard_heap_limit64, if reachable)
_READ_ONLY_ACTIONS = frozenset(
    getattr(sqlite3, name)
    for name in ("SQLITE_SELECT", "SQLITE_READ", "SQLITE_FUNCTION", "SQLITE_RECURSIVE")
    if hasattr(sqlite3, name)
)


def _read_only(action: int, *_args) -> int:
    """sqlite authorizer: SELECT, column reads, functions and recursive CTEs; everything else is denied
    (PRAGMA, ATTACH, VACUUM INTO, writes, temp tables), so a query cannot undo the sandbox itself."""
    return sqlite3.SQLITE_OK if action in _READ_ONLY_ACTIONS else sqlite3.SQLITE_DENY


def _sqlite_heap_api():
    """(hard_heap_limit64, memory_used) of the sqlite library Python uses, or None where unreachable."""
    try:
        import _sqlite3
        import ctypes

        lib = ctypes.CDLL(_sqlite3.__file__)
        limit, used = lib.sqlite3_hard_heap_limit64, lib.sqlite3_memory_used
    except (ImportError, OSError, AttributeError):
        return None
    limit.restype, limit.argtypes, used.restype = ctypes.c_int64, [ctypes.c_int64], ctypes.c_int64
    return limit, used


_HEAP_API = _sqlite_heap_api()


@contextmanager
def _heap_limit(extra_bytes: int):
    """Cap sqlite's heap at what it uses now plus `extra_bytes` for the block (then restore the old cap).

    The cap is process-wide in sqlite, so it is only held while one scored query runs.
    """
    if _HEAP_API is None:
        yield
        return
    limit, used = _HEAP_API
    previous = limit(used() + extra_bytes)
    try:
        yield
    finally:
        limit(previous)


def _sandbox(db: sqlite3.Connection) -> sqlite3.Connection:
    """A private in-memory copy of `db` that only reads and cannot attach files or build huge values."""
    conn = sqlite3.connect(":memory:")
    db.backup(conn)
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, SQL_MAX_VALUE_BYTES)
    conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
    conn.execute("PRAGMA temp_store = MEMORY")  # sorts spill into the capped heap, not into temp files
    conn.set_authorizer(_read_only)
    return conn


def run_sandboxed_sql(sql: str, db: sqlite3.Connection | None = None, max_rows: int | None = None) -> list:
    """Rows of one query run in a sandbox: a private read-only copy of `db` (default: the shop database).

    Limits: `SQL_TIME_LIMIT_S` wall-clock seconds, values up to `SQL_MAX_VALUE_BYTES`, at most
    `SQL_HEAP_BYTES` of extra sqlite heap, at most `max_rows` rows fetched (more raise OverflowError).
    Any write, PRAGMA, ATTACH or VACUUM raises sqlite3.DatabaseError; `db` itself is never touched.
    """
    conn = _sandbox(db if db is not None else _shop_db())
    deadline = time.monotonic() + SQL_TIME_LIMIT_S
    conn.set_progress_handler(lambda: time.monotonic() > deadline, 1000)  # non-zero: interrupt
    try:
        with _heap_limit(SQL_HEAP_BYTES):
            cursor = conn.execute(sql)
            rows = cursor.fetchall() if max_rows is None else cursor.fetchmany(max_rows + 1)
    finally:
        conn.close()
    if max_rows is not None and len(rows) > max_rows:
        raise OverflowError(f"the query returned more than {max_rows} rows")
    return rows


def score_sql(pred_sql: str, ref_sql: str, db: sqlite3.Connection | None = None) -> bool:
    """Execution accuracy: True if `pred_sql` returns the same rows as `ref_sql` on the shop database.

    Rows are compared as multisets (order ignored) unless the reference has ORDER BY. SQL that fails
    to run, writes, runs too long, builds too much, or is more than one statement scores False; it
    never raises. Both queries run in `run_sandboxed_sql`'s sandbox, each on a private copy of `db`
    (default: the database built from data/shop.sql), so no query can change what the next one sees.
    """
    if not isinstance(ref_sql, str):
        raise TypeError(f"ref_sql must be a string of SQL, got {type(ref_sql).__name__}")
    try:
        ref = _normalize_rows(run_sandboxed_sql(ref_sql, db))
    except (sqlite3.Error, OverflowError) as e:
        raise ValueError(f"the reference query does not run in the sandbox: {e}: {ref_sql!r}") from None
    if not isinstance(pred_sql, str) or not pred_sql.strip():
        return False
    try:  # a prediction with more rows than the reference is wrong; it is not fetched further
        got = _normalize_rows(run_sandboxed_sql(pred_sql.strip(), db, max_rows=len(ref)))
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError, MemoryError):
        return False
    if _ORDER_BY.search(ref_sql):
        return got == ref
    return Counter(got) == Counter(ref)


_DB: sqlite3.Connection | None = None


def _shop_db() -> sqlite3.Connection:
    global _DB
    if _DB is None:
        _DB = data.shop_database()
    return _DB


def score_support(answer: str, example: dict) -> bool:
    """True if the answer states every key fact of the example (e.g. "$34", "30 days")."""
    return all(k in answer for k in example["keys"])


def score_shift(answer: str, example: dict) -> bool:
    """True if the translation matches exactly (whitespace-normalized)."""
    return " ".join(answer.split()) == example["answer"]


def score_answer(task: str, answer: str, example: dict, db: sqlite3.Connection | None = None) -> bool:
    """Score one generated answer for `task`."""
    if task == "sql":
        return score_sql(answer, example["sql"], db)
    if task == "support":
        return score_support(answer, example)
    if task == "shift":
        return score_shift(answer, example)
    raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(data.TASKS)}")


def task_accuracy(model, tokenizer, task: str, split: str = "test", limit: int | None = None, *,
                  batch_size: int = 32, max_new_tokens: int | None = None, progress: bool = True,
                  return_answers: bool = False):  # fmt: skip
    """Accuracy (a float in [0, 1]) of greedy answers on `task`'s `split`, scored by its scorer.

    With `return_answers=True` returns `(accuracy, answers)` so a notebook can show examples.
    """
    examples = data.load_task(task, split)
    if limit is not None:
        _check_positive_int("limit", limit, "or None for the whole split")
        examples = examples[:limit]
    answers = generate_answers(
        model, tokenizer, [ex["messages"][:-1] for ex in examples], batch_size=batch_size,
        max_new_tokens=max_new_tokens or MAX_NEW_TOKENS[task], progress=progress, desc=f"{task}/{split}",
    )  # fmt: skip
    db = _shop_db() if task == "sql" else None
    acc = sum(score_answer(task, a, ex, db) for a, ex in zip(answers, examples)) / len(examples)
    return (acc, answers) if return_answers else acc


sql_shape = data.sql_shape  # the shapes are the data generator's; kept here for callers of evaluate


def accuracy_by_shape(answers: list[str], split: str = "test") -> dict[str, list[int]]:
    """`{shape: [correct, total]}` for sql answers given in the order of `split`: where a fine-tune fails."""
    examples = data.load_task("sql", split)[: len(answers)]
    db = _shop_db()
    out: dict[str, list[int]] = {}
    for answer, ex in zip(answers, examples):
        row = out.setdefault(sql_shape(ex["sql"]), [0, 0])
        row[0] += int(score_sql(answer, ex["sql"], db))
        row[1] += 1
    return out
