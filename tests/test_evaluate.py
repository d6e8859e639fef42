"""Tests for lora_lab.evaluate: the scorers, and that metrics are plain numbers in range."""

import math
import sqlite3
import time

import pytest

from lora_lab import data, evaluate

REF = "SELECT name FROM users WHERE city = 'Ostrin';"


def test_score_sql_right_wrong_invalid():
    db = data.shop_database()
    assert evaluate.score_sql(REF, REF, db)
    # Same rows, different query and different row order: still right (no ORDER BY in the reference).
    assert evaluate.score_sql(
        "SELECT u.name FROM users u WHERE u.city = 'Ostrin' ORDER BY u.name DESC", REF, db
    )
    assert not evaluate.score_sql("SELECT name FROM users WHERE city = 'Kavos';", REF, db)
    assert not evaluate.score_sql("SELECT name, age FROM users WHERE city = 'Ostrin';", REF, db)
    assert not evaluate.score_sql("SELEC name FROM users", REF, db)
    assert not evaluate.score_sql("SELECT name FROM customers;", REF, db)
    assert not evaluate.score_sql("", REF, db)
    assert not evaluate.score_sql("SELECT 1; SELECT 2;", REF, db)
    assert not evaluate.score_sql("DROP TABLE users;", REF, db)
    assert db.execute("SELECT COUNT(*) FROM users").fetchone()[0] == 40  # still there


def test_score_sql_respects_order_by_and_duplicates():
    db = data.shop_database()
    ref = "SELECT name FROM products ORDER BY price DESC LIMIT 3;"
    assert evaluate.score_sql(ref, ref, db)
    rows = [r[0] for r in db.execute(ref).fetchall()]
    reordered = "SELECT name FROM products WHERE name IN ({}) ORDER BY price ASC;".format(
        ", ".join(f"'{r}'" for r in rows)
    )
    assert not evaluate.score_sql(reordered, ref, db)
    # Multisets: duplicated rows must match in number.
    assert not evaluate.score_sql("SELECT status FROM orders", "SELECT DISTINCT status FROM orders", db)


def test_score_sql_stops_runaway_queries():
    db = data.shop_database()
    t = time.perf_counter()
    bad = "SELECT COUNT(*) FROM orders a, orders b, orders c, orders d"
    assert not evaluate.score_sql(bad, REF, db)
    assert time.perf_counter() - t < 10


# Hostile predictions (a model's output is untrusted input): each scores False, within the time limit,
# and leaves the database, the disk and later scores as they were.
ROWS_OF_BLOBS = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {n}) "
HOSTILE_SQL = {
    "query_only_off": "PRAGMA query_only = OFF",
    "delete": "DELETE FROM orders",
    "drop": "DROP TABLE users",
    "insert": "INSERT INTO users VALUES (999, 'x', 'Ostrin', 1)",
    "temp_table": "CREATE TEMP TABLE t AS SELECT * FROM users",
    "attach": "ATTACH DATABASE '{tmp}/attached.db' AS x",
    "vacuum_into": "VACUUM INTO '{tmp}/copy.db'",
    "pragma_function": "SELECT * FROM pragma_table_info('users')",
    "load_extension": "SELECT load_extension('{tmp}/evil')",
    "zeroblob_1gb": "SELECT zeroblob(1000000000)",
    "recursive_randomblobs": "WITH RECURSIVE c(x, b) AS (SELECT 1, randomblob(900000) UNION ALL "
    "SELECT x + 1, randomblob(900000) FROM c WHERE x < 100000) SELECT count(*) FROM c",
    "sorted_blobs": ROWS_OF_BLOBS.format(n=100000) + "SELECT zeroblob(900000) || x AS b FROM c ORDER BY b",
    "counting_forever": ROWS_OF_BLOBS.format(n=10**12) + "SELECT count(*) FROM c",
    "cross_join": "SELECT COUNT(*) FROM orders a, orders b, orders c, orders d",
    "many_rows": ROWS_OF_BLOBS.format(n=10**9) + "SELECT x FROM c",
    "two_statements": "SELECT 1; DELETE FROM orders",
}


@pytest.mark.parametrize("sql", list(HOSTILE_SQL.values()), ids=list(HOSTILE_SQL))
def test_hostile_sql_scores_false_and_changes_nothing(sql, tmp_path, monkeypatch):
    monkeypatch.setattr(
        evaluate, "SQL_TIME_LIMIT_S", 0.5, raising=False
    )  # keeps the test short; the default is 2 s
    db = data.shop_database()
    before = db.serialize()
    t = time.perf_counter()
    for where in (db, None):  # a database passed in, and the shared default one
        assert not evaluate.score_sql(sql.format(tmp=tmp_path), REF, where)
        assert not evaluate.score_sql(HOSTILE_SQL["delete"], REF, where)  # e.g. after query_only = OFF
    assert time.perf_counter() - t < 4 * 0.5 + 4
    assert db.serialize() == before and list(tmp_path.iterdir()) == []
    # a wrong answer still scores False afterwards (an emptied table would make it "right")
    assert not evaluate.score_sql("SELECT id FROM orders WHERE 0", "SELECT id FROM orders")
    assert evaluate.score_sql(REF, REF)


def test_sandbox_caps_values_heap_and_rows(monkeypatch):
    monkeypatch.setattr(evaluate, "SQL_TIME_LIMIT_S", 0.5)
    with pytest.raises(sqlite3.DataError, match="too big"):  # SQLITE_LIMIT_LENGTH: no 1 GB value
        evaluate.run_sandboxed_sql("SELECT zeroblob(1000000000)")
    if evaluate._HEAP_API is not None:  # the heap cap stops a sort of many big values at once
        with pytest.raises(MemoryError):
            evaluate.run_sandboxed_sql(HOSTILE_SQL["sorted_blobs"])
    with pytest.raises(sqlite3.OperationalError, match="interrupted"):  # the wall-clock limit
        evaluate.run_sandboxed_sql(HOSTILE_SQL["counting_forever"])
    with pytest.raises(OverflowError, match="more than 3 rows"):
        evaluate.run_sandboxed_sql("SELECT id FROM orders", max_rows=3)
    assert len(evaluate.run_sandboxed_sql(ROWS_OF_BLOBS.format(n=50) + "SELECT x FROM c")) == 50  # CTEs work


def test_score_support_and_shift():
    ex = {"keys": ["$34"]}
    assert evaluate.score_support("Hi Mira! The copper kettle costs $34.", ex)
    assert not evaluate.score_support("Hi Mira! The copper kettle costs $43.", ex)
    assert evaluate.score_shift(" ka  mo ", {"answer": "ka mo"})
    assert not evaluate.score_shift("ka", {"answer": "ka mo"})
    with pytest.raises(ValueError, match="valid tasks"):
        evaluate.score_answer("chess", "x", {})


def test_every_reference_answer_scores_right():
    db = data.shop_database()
    for task in data.TASKS:
        for e in data.load_task(task, "test"):
            assert evaluate.score_answer(task, e["messages"][-1]["content"], e, db), (task, e)


@pytest.fixture(scope="module")
def base():
    from lora_lab.models import load_base

    return load_base(device="cpu")


def test_metrics_are_plain_numbers_in_range(base):
    model, tok = base
    ppl = evaluate.perplexity(model, tok, "validation", limit=16)
    assert isinstance(ppl, float) and math.isfinite(ppl) and 1.0 < ppl < 100.0
    acc = evaluate.probe_accuracy(model, tok, data.load_probes("test")[:16])
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0
    for task in data.TASKS:
        acc = evaluate.task_accuracy(model, tok, task, "test", limit=8, progress=False)
        assert isinstance(acc, float) and 0.0 <= acc <= 1.0


def test_generation_is_batched_and_deterministic(base):
    model, tok = base
    prompts = [p["prompt"] for p in data.load_probes("test")[:6]]
    one = [evaluate.generate_answers(model, tok, [p], max_new_tokens=5, progress=False)[0] for p in prompts]
    batched = evaluate.generate_answers(model, tok, prompts, batch_size=6, max_new_tokens=5, progress=False)
    assert one == batched
    assert tok.padding_side == "left"


def _short_model():
    """The test suite's tiny Llama (64 positions): generation is refused before it runs, so its
    vocabulary never has to match the tokenizer's."""
    from conftest import build_tiny

    return build_tiny("llama")


def _answers(prompts, **kwargs):
    """A call of generate_answers with these prompts and arguments, for the table below."""
    return lambda model, tok: evaluate.generate_answers(model, tok, prompts, progress=False, **kwargs)


BAD_EVALUATIONS = {
    "task_accuracy_limit_0": (lambda m, t: evaluate.task_accuracy(m, t, "sql", limit=0), "limit must be a positive integer"),
    "task_accuracy_limit_true": (lambda m, t: evaluate.task_accuracy(m, t, "sql", limit=True), "limit must be a positive"),
    "prompt_longer_than_positions": (_answers(["word " * 80], max_new_tokens=4), r"prompt of \d+ tokens plus max_new_tokens=4 exceeds the model's 64 positions"),
    "prompt_plus_new_tokens_too_long": (_answers(["word " * 30], max_new_tokens=48), "exceeds the model's 64 positions.*lower max_new_tokens"),
    "max_new_tokens_0": (_answers(["hi"], max_new_tokens=0), "max_new_tokens must be"),
    "batch_size_0": (_answers(["hi"], batch_size=0), "batch_size must be a positive"),
    "one_string_as_prompts": (_answers("hi"), "not one string"),
    "perplexity_seq_len_1": (lambda m, t: evaluate.perplexity(m, t, ["a b"], seq_len=1), "seq_len must be an integer >= 2"),
    "perplexity_limit_0": (lambda m, t: evaluate.perplexity(m, t, ["a b"], limit=0), "limit must be a positive"),
}  # fmt: skip


@pytest.mark.parametrize("call, match", list(BAD_EVALUATIONS.values()), ids=list(BAD_EVALUATIONS))
def test_bad_evaluation_arguments_are_refused_before_generating(base, call, match):
    _, tok = base
    with pytest.raises((ValueError, TypeError), match=match):
        call(_short_model(), tok)
    assert tok.padding_side == "left"
