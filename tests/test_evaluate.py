"""Tests for lora_lab.evaluate: the scorers, and that metrics are plain numbers in range."""

import math
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
