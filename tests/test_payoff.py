"""Tests for lora_lab.payoff: answers and verdicts on a split, and the side-by-side table."""

import pytest

import lora_lab
from lora_lab import data, evaluate, payoff


def test_side_by_side_text_and_html():
    table = payoff.SideBySide(
        ["How many users?", "Hours <today>?"],
        {"base": ["Hi!\nWe sell kettles.", "x" * 200], "sql adapter": ["SELECT COUNT(*) FROM users;", "no"]},
        {"sql adapter": [True, False]},
        max_chars=40,
    )
    text = str(table)
    assert repr(table) == text
    lines = text.splitlines()
    assert lines[0] == "Q1  How many users?"
    assert lines[1] == "    base           Hi! \u21b5 We sell kettles."  # no verdict: no mark
    assert lines[2] == f"    sql adapter  {payoff.RIGHT} SELECT COUNT(*) FROM users;"
    assert lines[4].endswith("x" * 39 + "\u2026") and len(lines[4].split()[-1]) == 40
    assert lines[5] == f"    sql adapter  {payoff.WRONG} no"
    page = table._repr_html_()
    assert page.count("<tr>") == 3 and page.count("<th ") == 3
    assert "Hours &lt;today&gt;?" in page and "<today>" not in page  # escaped
    right = f'<span style="color:#1a7f37">{payoff.RIGHT}</span> '
    assert right + '<code style="white-space:pre-wrap">SELECT COUNT(*) FROM users;</code>' in page
    assert page.count(payoff.RIGHT) == 1 and page.count(payoff.WRONG) == 1  # base: no verdicts


@pytest.mark.parametrize(
    "args, message",
    [
        (([], {"base": []}), "no questions"),
        ((["q"], {}), "no answers"),
        ((["q", "r"], {"base": ["a"]}), "need a list of 2"),
        ((["q"], {"base": "a"}), "got a string"),
        ((["q"], {"base": ["a"]}, {"base": [True, False]}), "verdicts of 'base'"),
        ((["q"], {"base": ["a"]}, {"lora": [True]}), "no answers from them"),
    ],
)
def test_side_by_side_refuses_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        payoff.SideBySide(*args)


def test_side_by_side_refuses_tiny_width():
    with pytest.raises(ValueError, match="max_chars"):
        payoff.SideBySide(["q"], {"base": ["a"]}, max_chars=3)


def test_answer_split_matches_task_accuracy():
    model, tok = lora_lab.load_base(None)
    answers, right = payoff.answer_split(model, tok, "support", limit=4, max_new_tokens=8)
    assert len(answers) == len(right) == 4 and all(isinstance(a, str) for a in answers)
    examples = data.load_task("support", "test")[:4]
    assert right == [evaluate.score_support(a, ex) for a, ex in zip(answers, examples)]
    acc = evaluate.task_accuracy(model, tok, "support", limit=4, max_new_tokens=8, progress=False)
    assert acc == sum(right) / 4
    with pytest.raises(ValueError, match="limit"):
        payoff.answer_split(model, tok, "support", limit=0)


def test_runs_in_shop():
    assert payoff.runs_in_shop("SELECT name FROM users WHERE city = 'Nowhere';")  # no rows, still runs
    assert not payoff.runs_in_shop("SELECT name FROM patients;")  # not a table of the shop
    assert not payoff.runs_in_shop("Hi Milo! Our shop is open from 9am to 6pm.")
    assert not payoff.runs_in_shop("DELETE FROM users;")  # the sandbox only reads
