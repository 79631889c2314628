"""The common record schema of every training set, answer-number parsing and drop accounting.

Every loader (GSM8k-AUG, GSM8k-AUG-NL, original GSM8k, the synthetic generator) produces
`Record(question, steps, answer)`:

  question : the problem text, stripped, non-empty.
  steps    : the chain of thought as a list of steps (equation annotations like "<<16-3-4=9>>" or
             natural-language sentences). ALL steps are kept here; the batch builder drops the last
             one for the teacher (METHOD §1).
  answer   : the canonical answer string (see `format_number`): "18", "0.5", "-3"; never "#### 18",
             never thousands separators.

Records that cannot be used are never silently lost: loaders count them per reason in a
`RecordStats` (or raise `DataError` in strict mode).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter

__all__ = [
    "DROP_REASONS",
    "DataError",
    "Record",
    "RecordStats",
    "format_number",
    "parse_answer_number",
]


class DataError(ValueError):
    """Bad or unusable input data (a file, a record, a field). The message names the culprit."""


DROP_REASONS = (
    "missing_field",  # a required field is absent or null
    "bad_type",  # a field has the wrong type (e.g. a number where text is expected)
    "empty_question",  # the question is empty after stripping
    "non_numeric_answer",  # the answer does not parse as one number
    "empty_cot",  # no CoT step could be extracted
    "too_long",  # over a token budget (counted by the tokeniser helpers)
)


@dataclasses.dataclass(frozen=True)
class Record:
    """One problem: question text, CoT steps (all of them), canonical answer string."""

    question: str
    steps: list[str]
    answer: str

    @property
    def value(self) -> float:
        """The answer as a float (raises DataError if the answer string is not a number)."""
        v = parse_answer_number(self.answer)
        if v is None:
            raise DataError(f"Record answer {self.answer!r} is not a number")
        return v

    def to_dict(self) -> dict:
        return {"question": self.question, "steps": list(self.steps), "answer": self.answer}


_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d)")


def parse_answer_number(text) -> float | None:
    """Parse a record's answer field as ONE number, or None.

    Accepts numbers (int/float, not bool) and strings like "18", "#### 18", "1,000", "$5",
    "-3", "3.50", "18." (a trailing period), " 7 ", "50%". For a string, the text after the last
    "####" is used when present; then "$", "%" and commas between digits are removed and the rest
    must be exactly one number ("5 apples", "1/2", "" and "eighteen" give None). NaN/inf give None.
    """
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        v = float(text)
        return v if math.isfinite(v) else None
    if not isinstance(text, str):
        return None
    s = text.rsplit("####", 1)[-1] if "####" in text else text
    s = _THOUSANDS_RE.sub("", s.strip())
    s = s.replace("$", "").replace("%", "").strip()
    if not s or _NUMBER_RE.fullmatch(s) is None:
        return None
    v = float(s)
    return v if math.isfinite(v) else None


def format_number(value: float) -> str:
    """Canonical answer string: integral values without a decimal point ("18", "-3"), others in
    the shortest round-trip form ("0.5", "2.25")."""
    v = float(value)
    if not math.isfinite(v):
        raise DataError(f"answer {value!r} is not a finite number")
    if v.is_integer():
        return str(int(v))
    return repr(v)


@dataclasses.dataclass
class RecordStats:
    """Counts of records read / kept / dropped per reason, with the first few indices per reason.

    `seen` counts every raw record looked at; `kept` those turned into a Record. `dropped[reason]`
    counts the rest (reasons: DROP_REASONS, others are allowed). `examples[reason]` lists up to
    `max_examples` raw record indices for debugging.
    """

    source: str = ""
    seen: int = 0
    kept: int = 0
    dropped: Counter = dataclasses.field(default_factory=Counter)
    examples: dict = dataclasses.field(default_factory=dict)
    max_examples: int = 5

    def drop(self, reason: str, index: int) -> None:
        self.dropped[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(index)

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def merge(self, other: RecordStats) -> RecordStats:
        """A new RecordStats with both counts added (sources joined with '+')."""
        out = RecordStats(
            source="+".join(s for s in (self.source, other.source) if s),
            seen=self.seen + other.seen,
            kept=self.kept + other.kept,
            dropped=self.dropped + other.dropped,
            max_examples=self.max_examples,
        )
        for st in (self, other):
            for reason, idx in st.examples.items():
                ex = out.examples.setdefault(reason, [])
                ex.extend(idx[: max(0, out.max_examples - len(ex))])
        return out

    def summary(self) -> str:
        """One readable line, e.g. 'gsm8k/train.jsonl: kept 98 of 100 records; dropped 2
        (missing_field 1 [e.g. #4], empty_cot 1 [e.g. #17])'."""
        head = f"{self.source}: " if self.source else ""
        line = f"{head}kept {self.kept} of {self.seen} records"
        if not self.dropped:
            return line + "; dropped 0"
        parts = []
        for reason, n in sorted(self.dropped.items(), key=lambda kv: (-kv[1], kv[0])):
            ex = ", ".join(f"#{i}" for i in self.examples.get(reason, []))
            parts.append(f"{reason} {n}" + (f" [e.g. {ex}]" if ex else ""))
        return f"{line}; dropped {self.num_dropped} ({', '.join(parts)})"

    def __str__(self) -> str:
        return self.summary()
