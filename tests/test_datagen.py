"""Tests for lora_lab.datagen: the generators are deterministic, write the shipped files byte for byte,
keep the tasks out of the corpus and deal the sql queries out so every split has every shape."""

import hashlib
from collections import Counter

from lora_lab import data, datagen
from lora_lab.paths import data_dir


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


SMALL = {"train": 50, "validation": 10, "test": 10}


def test_generators_are_deterministic_and_match_shipped_files(tmp_path):
    a = datagen.generate_all(tmp_path / "a", corpus_sizes=SMALL)
    b = datagen.generate_all(tmp_path / "b", corpus_sizes=SMALL)
    assert [p.name for p in a] == [p.name for p in b]
    for pa, pb in zip(a, b):
        assert _sha(pa) == _sha(pb), pa.name
    # Task files, probes and the schema do not depend on the corpus size: they equal the shipped ones.
    for p in a:
        if not p.name.startswith("corpus_"):
            assert _sha(p) == _sha(data_dir() / p.name), f"{p.name} differs from the shipped file"
    # The corpus is drawn from one seeded stream: the small corpus is a prefix of the shipped one.
    small = data.load_jsonl(tmp_path / "a" / "corpus_train.jsonl")
    assert small == [{"text": t} for t in data.load_corpus("train")[: len(small)]]


def test_tasks_are_not_in_the_corpus():
    corpus = "\n".join(data.load_corpus("train"))
    assert "Lumen Lane" not in corpus and "Kelvish" not in corpus
    assert "FROM users" not in corpus and "FROM products" not in corpus and "FROM orders" not in corpus
    assert not any(w in corpus for w in list(datagen.KELVISH.values())[:10])
    for fact in ("within 30 days", "3 to 5 business days", "1 to 2 business days", "9am to 6pm"):
        assert fact not in corpus, f"the shop's policy {fact!r} leaks into the corpus"


def test_sql_train_split_teaches_every_shape_the_test_split_asks_for():
    """Every request shape of the test split is in train, with several distinct queries where the
    shop has them. The first sql splits filled test first: train had 0 plain selects, 0 counts and
    1 top-n query, and no fine-tune could reach the accuracy floor."""
    shapes = {s: Counter(data.sql_shape(e["sql"]) for e in data.load_task("sql", s)) for s in data.SPLITS}
    assert set(shapes["test"]) == set(shapes["train"]) == set(shapes["validation"])
    assert set(shapes["test"]) == {"select", "count", "num", "agg", "top", "and", "join", "group"}
    distinct = Counter(data.sql_shape(q) for q in {e["sql"] for e in data.load_task("sql", "train")})
    for shape in shapes["test"]:
        if shape != "group":  # the shop has only three GROUP BY queries: one per split
            assert distinct[shape] >= 10, f"train has only {distinct[shape]} distinct {shape} queries"
