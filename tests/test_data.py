"""Tests for lora_lab.data: the shipped data sets as readers load them (no test item in train, every token
the answers use taught by the corpus), and the loaders' errors."""

import json
import sqlite3

import pytest

from lora_lab import data


@pytest.mark.parametrize("task", data.TASKS)
def test_tasks_have_chat_format_and_no_test_item_in_train(task):
    splits = {s: data.load_task(task, s) for s in data.SPLITS}
    assert len(splits["test"]) == 200 and len(splits["validation"]) == 200 and len(splits["train"]) >= 1000
    key = {"sql": lambda e: e["sql"], "support": lambda e: e["messages"][0]["content"],
           "shift": lambda e: e["messages"][0]["content"]}[task]  # fmt: skip
    train = {key(e) for e in splits["train"]}
    for split in ("validation", "test"):
        assert not train & {key(e) for e in splits[split]}, f"{task} {split} item leaks into train"
        assert len({key(e) for e in splits[split]}) == len(splits[split]), "duplicate items"
    for e in splits["test"]:
        assert [m["role"] for m in e["messages"]] == ["user", "assistant"]


@pytest.fixture(scope="module")
def corpus_tokens():
    """(bundled tokenizer, how often each token id occurs in the training corpus): counted once."""
    from collections import Counter

    from lora_lab.models import load_base

    _, tok = load_base(device="cpu")
    seen = Counter()
    for ids in tok(data.load_corpus("train"), add_special_tokens=False)["input_ids"]:
        seen.update(ids)
    return tok, seen


@pytest.mark.parametrize("task", ["sql", "support"])
def test_corpus_teaches_every_token_the_sql_and_support_answers_use(task, corpus_tokens):
    """A token the base model never had to predict keeps its random output row, and LoRA on the
    attention layers cannot make the model emit it: the first bundled model failed its LoRA floors
    for this reason ("users" was cut into pieces the corpus never used). `shift` is exempt on
    purpose: its made-up words are the point of the limits chapter."""
    from lora_lab.train import encode_example

    tok, seen = corpus_tokens
    answer = set()
    for e in data.load_task(task, "train"):
        answer.update(t for t in encode_example(tok, e, 96)[1] if t != -100)
    rare = sorted(tok.decode([t]) for t in answer if seen[t] < 5)
    assert not rare, f"{task} answers use tokens the corpus (almost) never has: {rare}"


def test_sql_references_run_and_return_rows():
    db = data.shop_database()
    for e in data.load_task("sql", "test"):
        assert db.execute(e["sql"]).fetchall(), e["sql"]


@pytest.mark.parametrize(
    ("sql", "shape"),
    [
        ("SELECT name FROM users WHERE city = 'Tarn';", "select"),
        ("SELECT COUNT(*) FROM orders WHERE status = 'shipped';", "count"),
        ("SELECT name FROM users WHERE age > 40;", "num"),
        ("SELECT name FROM users WHERE city = 'Tarn' AND age < 30;", "and"),
        ("SELECT AVG(price) FROM products WHERE category = 'garden';", "agg"),
        ("SELECT name FROM products ORDER BY price ASC LIMIT 3;", "top"),
        ("SELECT category, COUNT(*) FROM products GROUP BY category;", "group"),
        ("SELECT a.name FROM orders l JOIN users a ON l.user_id = a.id WHERE a.age > 3;", "join"),
    ],
)
def test_sql_shape_names_each_request_shape(sql, shape):
    assert data.sql_shape(sql) == shape


def test_probes_state_facts_of_the_corpus():
    probes = data.load_probes("test")
    assert len(probes) >= 100
    corpus = "\n".join(data.load_corpus("train"))
    for p in probes:
        assert f"{p['prompt']} {p['answer']}" in corpus


def test_load_jsonl_names_file_and_line_of_a_malformed_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"a": 1}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2"):
        data.load_jsonl(p)
    with pytest.raises(FileNotFoundError, match="python -m lora_lab.datagen"):
        data.load_jsonl(tmp_path / "missing.jsonl")


def test_unknown_task_and_split_list_the_valid_ones():
    with pytest.raises(ValueError, match="support, sql, shift"):
        data.load_task("chess", "train")
    with pytest.raises(ValueError, match="train, validation, test"):
        data.load_task("sql", "dev")
    with pytest.raises(ValueError, match="validation, test"):
        data.load_probes("train")


def test_shop_database_is_read_only():
    db = data.shop_database()
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        db.execute("DELETE FROM users")
    assert db.execute("SELECT COUNT(*) FROM users").fetchone()[0] == 40
