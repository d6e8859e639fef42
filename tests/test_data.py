"""Tests for lora_lab.data: deterministic generators, no test item in train, loaders' errors."""

import hashlib
import json
import sqlite3

import pytest

from lora_lab import data


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


SMALL = {"train": 50, "validation": 10, "test": 10}


def test_generators_are_deterministic_and_match_shipped_files(tmp_path):
    a = data.generate_all(tmp_path / "a", corpus_sizes=SMALL)
    b = data.generate_all(tmp_path / "b", corpus_sizes=SMALL)
    assert [p.name for p in a] == [p.name for p in b]
    for pa, pb in zip(a, b):
        assert _sha(pa) == _sha(pb), pa.name
    # Task files, probes and the schema do not depend on the corpus size: they equal the shipped ones.
    for p in a:
        if not p.name.startswith("corpus_"):
            assert _sha(p) == _sha(data.data_dir() / p.name), f"{p.name} differs from the shipped file"
    # The corpus is drawn from one seeded stream: the small corpus is a prefix of the shipped one.
    small = data.load_jsonl(tmp_path / "a" / "corpus_train.jsonl")
    assert small == [{"text": t} for t in data.load_corpus("train")[: len(small)]]


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


def test_tasks_are_not_in_the_corpus():
    corpus = "\n".join(data.load_corpus("train"))
    assert "Lumen Lane" not in corpus and "Kelvish" not in corpus
    assert "FROM users" not in corpus and "FROM products" not in corpus and "FROM orders" not in corpus
    assert not any(w in corpus for w in list(data.KELVISH.values())[:10])
    for fact in ("within 30 days", "3 to 5 business days", "1 to 2 business days", "9am to 6pm"):
        assert fact not in corpus, f"the shop's policy {fact!r} leaks into the corpus"


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


def test_sql_train_split_teaches_every_shape_the_test_split_asks_for():
    """Every request shape of the test split is in train, with several distinct queries where the
    shop has them. The first sql splits filled test first: train had 0 plain selects, 0 counts and
    1 top-n query, and no fine-tune could reach the accuracy floor."""
    from collections import Counter

    shapes = {s: Counter(data.sql_shape(e["sql"]) for e in data.load_task("sql", s)) for s in data.SPLITS}
    assert set(shapes["test"]) == set(shapes["train"]) == set(shapes["validation"])
    assert set(shapes["test"]) == {"select", "count", "num", "agg", "top", "and", "join", "group"}
    distinct = Counter(data.sql_shape(q) for q in {e["sql"] for e in data.load_task("sql", "train")})
    for shape in shapes["test"]:
        if shape != "group":  # the shop has only three GROUP BY queries: one per split
            assert distinct[shape] >= 10, f"train has only {distinct[shape]} distinct {shape} queries"


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
    with pytest.raises(FileNotFoundError, match="lora_lab.data"):
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
