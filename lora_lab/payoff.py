"""The payoff: the same questions answered by the base model and by trained adapters, side by side.

An accuracy of 0.83 says how often; the answers themselves say what changed. The chapters that train
(01, 05, 07) show a few test questions with each model's greedy answer and its verdict, next to the
score on the whole split from the same generations, so one good row is never the whole story:

    answers, right = answer_split(model, tok, "sql")             # every test question, greedy
    runs_in_shop(answers[1])                                     # a miss that still runs here?
    SideBySide(questions[:4], {"base": base_answers[:4], "LoRA": answers[:4]},
               {"base": base_right[:4], "LoRA": right[:4]})      # prints text, renders HTML

`SideBySide` prints as plain text (one block per question, one line per model) and renders as an
HTML table (question | one column per model) in Jupyter and in the book. Long answers are cut to
`max_chars` with an ellipsis and line breaks shown as a return sign, so the table stays readable.

Left out: sampling (answers are greedy, so a re-run prints the same table), styling beyond a plain
table (the book's theme styles it).
"""

from __future__ import annotations

import html
import sqlite3

from lora_lab import data, evaluate

__all__ = ["answer_split", "runs_in_shop", "SideBySide", "RIGHT", "WRONG"]

RIGHT, WRONG = "\u2713", "\u2717"  # check mark and ballot x: the verdict shown before an answer


def answer_split(model, tokenizer, task: str, split: str = "test", limit: int | None = None, *,
                 max_new_tokens: int | None = None) -> tuple[list[str], list[bool]]:  # fmt: skip
    """Greedy answers of `model` to `task`'s `split` (the first `limit` items) and each one's verdict.

    The verdict is the task's scorer (`evaluate.score_answer`: SQL runs in the sandboxed shop
    database and must return the reference's rows; a support answer must state the key facts).
    Accuracy is `sum(verdicts) / len(verdicts)`, the same number as `evaluate.task_accuracy`.
    """
    examples = data.load_task(task, split)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise ValueError(f"limit must be a positive integer or None for the whole split, got {limit!r}")
        examples = examples[:limit]
    answers = evaluate.generate_answers(
        model, tokenizer, [ex["messages"][:-1] for ex in examples], progress=False,
        max_new_tokens=max_new_tokens or evaluate.MAX_NEW_TOKENS[task],
    )  # fmt: skip
    return answers, [evaluate.score_answer(task, a, ex) for a, ex in zip(answers, examples)]


def runs_in_shop(sql: str) -> bool:
    """True if `sql` runs in the sandboxed shop database (whatever rows it returns).

    Tells a wrong answer that is still SQL for this shop from one that is not: text that is not
    SQL, or SQL naming tables the shop does not have.
    """
    try:
        evaluate.run_sandboxed_sql(sql)
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError, MemoryError):
        return False
    return True


def _short(text: str, max_chars: int) -> str:
    text = text.replace("\n", " \u21b5 ")  # a line break, shown
    return text if len(text) <= max_chars else text[: max_chars - 1].rstrip() + "\u2026"


class SideBySide:
    """A small table: each question with every model's answer and, optionally, its verdict.

    `questions`: the questions (strings). `answers`: {model name: one answer per question}, in
    the order the columns should appear. `verdicts`: {model name: one bool per question}, for any
    of the models (a model without verdicts shows its answers unmarked).
    """

    def __init__(self, questions: list[str], answers: dict[str, list[str]],
                 verdicts: dict[str, list[bool]] | None = None, *, max_chars: int = 100):  # fmt: skip
        questions = list(questions)
        if not questions:
            raise ValueError("no questions: pass at least one question and its answers")
        if not answers:
            raise ValueError("no answers: pass {model name: [one answer per question]}")
        verdicts = dict(verdicts or {})
        for kind, table in (("answers", answers), ("verdicts", verdicts)):
            for name, column in table.items():
                if isinstance(column, str) or len(column) != len(questions):
                    got = "a string" if isinstance(column, str) else f"{len(column)} items"
                    raise ValueError(
                        f"{kind} of {name!r}: need a list of {len(questions)} (one per question), got {got}"
                    )
        unknown = sorted(set(verdicts) - set(answers))
        if unknown:
            raise ValueError(f"verdicts for {unknown} but no answers from them; models: {list(answers)}")
        if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 10:
            raise ValueError(f"max_chars must be an integer >= 10, got {max_chars!r}")
        self.questions = questions
        self.answers = {name: list(column) for name, column in answers.items()}
        self.verdicts = {name: [bool(v) for v in column] for name, column in verdicts.items()}
        self.max_chars = max_chars

    def _mark(self, name: str, i: int) -> str:
        if name not in self.verdicts:
            return ""
        return RIGHT if self.verdicts[name][i] else WRONG

    def __str__(self) -> str:
        width = max(len(name) for name in self.answers)
        lines = []
        for i, question in enumerate(self.questions):
            lines.append(f"Q{i + 1}  {question}")
            for name, column in self.answers.items():
                mark = self._mark(name, i) or " "
                lines.append(f"    {name:<{width}}  {mark} {_short(column[i], self.max_chars)}")
        return "\n".join(lines)

    def __repr__(self) -> str:  # what a notebook prints as text/plain
        return str(self)

    def _repr_html_(self) -> str:
        # wrap long answers inside their cell, whatever the page's theme does with code
        style = "text-align:left; vertical-align:top; white-space:normal; overflow-wrap:anywhere"
        head = "".join(f'<th style="{style}">{html.escape(n)}</th>' for n in ["question", *self.answers])
        rows = []
        for i, question in enumerate(self.questions):
            cells = [f'<td style="{style}; min-width:10em">{html.escape(question)}</td>']
            for name, column in self.answers.items():
                mark = self._mark(name, i)
                if mark:  # green for right, red for wrong
                    color = "#1a7f37" if mark == RIGHT else "#cf222e"
                    mark = f'<span style="color:{color}">{mark}</span> '
                text = html.escape(_short(column[i], self.max_chars))
                cells.append(
                    f'<td style="{style}">{mark}<code style="white-space:pre-wrap">{text}</code></td>'
                )
            rows.append(f"<tr>{''.join(cells)}</tr>")
        return (
            '<table class="lora-lab-payoff" style="font-size:0.85em">'  # five columns must fit a page
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        )
