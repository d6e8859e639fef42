"""Numbers for the prose: a chapter's text pastes the values its cells compute.

A chapter cell calls `glue("acc_qv", acc, ".2f")`; the chapter's markdown writes
{glue:text}`acc_qv` and the book shows the formatted value (myst-nb's glue). A re-run that
changes the number changes the sentence; `tools/prose_numbers.py` fails on a number typed into
the prose instead.

The value is stored already formatted, as a string: the stored output is compared by nbval on
other machines, so it must not carry the last, CPU-dependent digits of a float. Without myst-nb
(a reader's Colab runtime installs only what a chapter needs) `glue` stores nothing and just
returns the text.

`bootstrap_accuracy_diff` gives the spread of a difference between two accuracies measured on
the same number of test items, by resampling the items; `seed_spread` summarises a value measured
with several seeds.
"""

from __future__ import annotations

import re

import numpy as np

__all__ = ["glue", "bootstrap_accuracy_diff", "seed_spread"]

# An English word in a glued text ("beat", "lost none"); names and numbers ("INT4", "q_proj",
# "r=16", "1e-05") read the same in both editions and need no translation.
ENGLISH_WORD = re.compile(r"(?<![\w.=-])[a-z]{2,}(?![\w.=-])")


def glue(name: str, value, fmt: str | None = None, *, zh: str | None = None) -> str:
    """Store `value` (formatted with `fmt`) under `name` for the prose; return the text.

    Floats need a format (their last digits differ between CPUs); ints are written with
    thousands separators unless `fmt` says otherwise; strings (words chosen by the code that
    asserts them, such as "beat" or "tied with") are stored as they are, and need their Chinese
    in `zh` (stored as `name + "_zh"`; the Chinese edition pastes it where the text says `name`).
    """
    if fmt is not None:
        text = format(value, fmt)
    elif isinstance(value, str):
        text = value
    elif isinstance(value, (bool, np.bool_)):
        raise TypeError(f"glue {name!r}: store a word, not a bool")
    elif isinstance(value, (int, np.integer)):
        text = f"{int(value):,}"
    else:
        raise TypeError(f"glue {name!r}: give a format for {type(value).__name__} values")
    if ENGLISH_WORD.search(text) and zh is None:
        raise ValueError(
            f"glue {name!r}: the words {text!r} are pasted into both editions; give their "
            'Chinese too: glue(name, value, zh="...")'
        )
    try:
        from myst_nb import glue as myst_glue
    except ImportError:  # no myst-nb (a bare Colab runtime): nothing to paste into
        return text
    myst_glue(name, text, display=False)
    if zh is not None:
        myst_glue(name + "_zh", zh, display=False)
    return text


def bootstrap_accuracy_diff(
    acc_a: float, acc_b: float, n: int, *, draws: int = 10_000, seed: int = 0
) -> tuple[float, float, float]:
    """acc_a - acc_b and its 95% bootstrap interval over `n` test items per model.

    Resamples each model's `n` right/wrong outcomes with replacement (given only the counts,
    that is a binomial draw). The two models are resampled independently, which ignores that
    they answered the same items: the interval is wider than a paired one, never narrower.
    """
    rng = np.random.default_rng(seed)
    hits_a, hits_b = round(acc_a * n), round(acc_b * n)
    a = rng.binomial(n, hits_a / n, draws) / n
    b = rng.binomial(n, hits_b / n, draws) / n
    lo = np.percentile(a - b, 2.5, method="lower")
    hi = np.percentile(a - b, 97.5, method="higher")
    return (hits_a - hits_b) / n, float(lo), float(hi)


def seed_spread(values) -> tuple[float, float, float]:
    """(mean, min, max) of one quantity measured with several seeds."""
    values = [float(v) for v in values]
    return sum(values) / len(values), min(values), max(values)
