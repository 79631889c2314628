"""Answer extraction and accuracy (METHOD §7: strip commas, take the last number, numeric compare).

extract_answer("The answer is: 1,234.")  -> 1234.0
extract_answer("so -3.5 degrees")        -> -3.5
extract_answer("no idea")                -> None

Rules: commas between digits are removed ("1,234,567" -> 1234567; "1, 2" stays two numbers);
"$" signs are removed; a number is an optional "-" (only when not glued to a preceding digit or
letter, so "10-3" reads as 10 and 3) followed by digits with an optional decimal part ("3.5",
".5"); a trailing period is not part of the number ("18." -> 18). The LAST number wins.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

__all__ = ["accuracy", "answers_match", "extract_answer"]

_COMMA_RE = re.compile(r"(?<=\d),(?=\d)")
_NUM_RE = re.compile(r"(?<![0-9A-Za-z.])-?(?:\d+(?:\.\d+)?|\.\d+)|(?<=[0-9A-Za-z])(?:\d+(?:\.\d+)?|\.\d+)")


def extract_answer(text: str | None) -> float | None:
    """The last number in text as a float, or None when there is none (see module docstring)."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise ValueError(f"extract_answer expects a string, got {type(text).__name__}")
    s = _COMMA_RE.sub("", text).replace("$", "")
    found = _NUM_RE.findall(s)
    if not found:
        return None
    v = float(found[-1])
    return v if math.isfinite(v) else None


def answers_match(pred: float | None, gold: float, tol: float = 1e-4) -> bool:
    """|pred - gold| <= tol (absolute: 18.001 is not 18); a missing prediction (None) never
    matches. Numbers read from the same digits parse to the same float, so large GSM-Hard answers
    compare exactly."""
    if pred is None:
        return False
    return abs(float(pred) - float(gold)) <= tol


def accuracy(preds: Sequence[float | str | None], golds: Sequence[float], tol: float = 1e-4) -> float:
    """Fraction (0..1) of predictions matching their gold answers. A prediction may be a number,
    None, or the decoded text (its answer is then taken with extract_answer)."""
    if len(preds) != len(golds):
        raise ValueError(f"accuracy: {len(preds)} predictions but {len(golds)} gold answers")
    if not golds:
        raise ValueError("accuracy: no examples")
    hits = 0
    for p, g in zip(preds, golds, strict=True):
        if isinstance(p, str):
            p = extract_answer(p)
        hits += answers_match(p, g, tol)
    return hits / len(golds)
