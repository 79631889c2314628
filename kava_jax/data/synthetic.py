"""Seeded offline generator of GSM8k-style multi-step word problems (the CPU-sized training set).

A problem starts from a value a_0 in [start_min, start_max] and applies k operations
(k in [min_steps, max_steps]), each one of
  add: a + b, b in [1, max_operand], result <= max_value
  sub: a - b, b in [1, max_operand], result >= 1
  mul: a * b, b in [mul_min, mul_max], result <= max_value
chosen uniformly among the operations that are feasible at the current value, then b uniformly.
DEMO_NOTES.md measured that start 1-20, 2-3 operations, b <= 20, x2..x5, results <= 999 is
learnable by a 0.4 M-parameter model on CPU (the defaults here).

Text: 8 names x 8 nouns x 2-3 templates per operation (question sentences and NL steps).

Trace styles (the two GSM8k-AUG shapes):
  "equation": one GSM8k-AUG annotation per operation, e.g. "<<17+10=27>>"  (operators + - *)
  "nl":       one sentence per operation, e.g. "Mia had 17 books and got 10 more, so she has 27."

A record has exactly k steps, one per operation, and the LAST step is the operation that produces
the answer (as in GSM8k-AUG, whose last annotation computes the answer). The batch builder drops
that last step for the teacher (METHOD §1), so the teacher sees steps 1..k-1 and must still do the
final operation itself, exactly as on the real data.

Every random draw is made from `random.Random(seed).random()` (whose stream Python guarantees to
keep), and all template/number choices are drawn whatever the style, so `generate(n, s, "equation")`
and `generate(n, s, "nl")` give the same questions and answers with different traces.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from kava_jax.data.records import DataError, Record

__all__ = [
    "NAMES",
    "NOUNS",
    "STYLES",
    "Difficulty",
    "generate",
    "make_synthetic_splits",
    "split_words",
    "vocabulary",
    "write_jsonl",
]

STYLES = ("equation", "nl")

# (name, subject pronoun, possessive)
NAMES = (
    ("Mia", "she", "her"),
    ("Emma", "she", "her"),
    ("Lily", "she", "her"),
    ("Anna", "she", "her"),
    ("Tom", "he", "his"),
    ("Ben", "he", "his"),
    ("Sam", "he", "his"),
    ("Leo", "he", "his"),
)
NOUNS = ("books", "apples", "marbles", "cards", "stickers", "pencils", "coins", "shells")

_Q_START = ("{name} has {a} {noun}.", "{name} starts with {a} {noun}.", "{name} owns {a} {noun}.")
_Q_OPS = {
    "add": ("{Pro} buys {b} more {noun}.", "{Pro} gets {b} more {noun}.", "{Pro} finds {b} more {noun}."),
    "sub": ("{Pro} gives away {b} {noun}.", "{Pro} loses {b} {noun}.", "{Pro} sells {b} {noun}."),
    "mul": ("Then {pro} has {b} times as many {noun}.", "{Pro} multiplies {pos} {noun} by {b}."),
}
_Q_END = ("How many {noun} does {name} have now?", "How many {noun} does {name} have in the end?")
_NL_STEPS = {
    "add": ("{name} had {a} {noun} and got {b} more, so {pro} has {c}.", "{a} {noun} plus {b} more makes {c}."),
    "sub": ("{name} had {a} {noun} and lost {b}, so {pro} has {c}.", "{a} {noun} minus {b} leaves {c}."),
    "mul": (
        "{name} had {a} {noun} and then {b} times as many, so {pro} has {c}.",
        "{a} {noun} times {b} makes {c}.",
    ),
}
_EQ_SYMBOL = {"add": "+", "sub": "-", "mul": "*"}
EQUATION_TOKENS = ("<<", ">>", "=", "+", "-", "*")

# Word pattern shared with the synthetic tokenizer: "<<", ">>", one digit, a run of letters, or any
# other single non-space character.
WORD_PATTERN = r"<<|>>|\d|[A-Za-z]+|[^\sA-Za-z\d]"
_WORD_RE = re.compile(WORD_PATTERN)


def split_words(text: str) -> list[str]:
    """The synthetic tokenizer's pre-tokenisation in pure Python: whitespace is dropped, numbers
    are split into single digits, "<<"/">>" and every other symbol are one token each."""
    return _WORD_RE.findall(text)


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """Difficulty knobs (defaults = the setting DEMO_NOTES.md found learnable on CPU).

    min_steps/max_steps: number of operations k (= number of CoT steps), uniform in the range.
    max_operand: largest b for + and -. max_value: largest intermediate/final value.
    start_min/start_max: range of the start value. mul_min/mul_max: range of b for x.
    ops: which operations may appear ("add", "sub", "mul").
    """

    min_steps: int = 2
    max_steps: int = 3
    max_operand: int = 20
    max_value: int = 999
    start_min: int = 1
    start_max: int = 20
    mul_min: int = 2
    mul_max: int = 5
    ops: tuple[str, ...] = ("add", "sub", "mul")

    def __post_init__(self):
        object.__setattr__(self, "ops", tuple(self.ops))
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name != "ops" and (not isinstance(v, int) or isinstance(v, bool)):
                raise ValueError(f"Difficulty.{f.name} must be an int, got {v!r}")
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"Difficulty needs 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if self.max_operand < 1:
            raise ValueError(f"Difficulty.max_operand must be >= 1, got {self.max_operand}")
        if not 1 <= self.start_min <= self.start_max <= self.max_value:
            raise ValueError(
                f"Difficulty needs 1 <= start_min <= start_max <= max_value, got "
                f"{self.start_min}, {self.start_max}, {self.max_value}"
            )
        if not 2 <= self.mul_min <= self.mul_max:
            raise ValueError(f"Difficulty needs 2 <= mul_min <= mul_max, got {self.mul_min}, {self.mul_max}")
        bad = [o for o in self.ops if o not in _EQ_SYMBOL]
        if not self.ops or bad:
            raise ValueError(f"Difficulty.ops must be a non-empty subset of {tuple(_EQ_SYMBOL)}, got {self.ops}")
        if "add" not in self.ops and "sub" not in self.ops:
            raise ValueError("Difficulty.ops needs 'add' or 'sub' (with 'mul' alone values run past max_value)")
        if self.max_value < 2:
            raise ValueError(f"Difficulty.max_value must be >= 2, got {self.max_value}")

    @classmethod
    def of(cls, difficulty: Difficulty | dict | None) -> Difficulty:
        """Difficulty from None (defaults), a Difficulty, or a dict of fields; a dict may give
        `num_steps` (= min_steps = max_steps)."""
        if difficulty is None:
            return cls()
        if isinstance(difficulty, cls):
            return difficulty
        if isinstance(difficulty, dict):
            d = dict(difficulty)
            if "num_steps" in d:
                k = d.pop("num_steps")
                d.setdefault("min_steps", k)
                d.setdefault("max_steps", k)
            names = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(d) - names)
            if unknown:
                raise ValueError(f"unknown Difficulty field(s) {unknown}; known: {sorted(names)} + num_steps")
            return cls(**d)
        raise ValueError(f"difficulty must be None, a Difficulty or a dict, got {type(difficulty).__name__}")


def _randint(rng: random.Random, lo: int, hi: int) -> int:
    """Uniform int in [lo, hi] from rng.random() only (a stream Python keeps across versions)."""
    return lo + min(int(rng.random() * (hi - lo + 1)), hi - lo)


def _pick(rng: random.Random, seq: Sequence):
    return seq[_randint(rng, 0, len(seq) - 1)]


def _feasible(v: int, d: Difficulty) -> dict[str, tuple[int, int]]:
    """Operation -> inclusive b range that keeps the result in [1, max_value]."""
    out = {}
    if "add" in d.ops and min(d.max_operand, d.max_value - v) >= 1:
        out["add"] = (1, min(d.max_operand, d.max_value - v))
    if "sub" in d.ops and min(d.max_operand, v - 1) >= 1:
        out["sub"] = (1, min(d.max_operand, v - 1))
    if "mul" in d.ops and min(d.mul_max, d.max_value // v) >= d.mul_min:
        out["mul"] = (d.mul_min, min(d.mul_max, d.max_value // v))
    return out


def _apply(op: str, a: int, b: int) -> int:
    return a + b if op == "add" else a - b if op == "sub" else a * b


def _one(rng: random.Random, d: Difficulty, style: str) -> Record:
    name, pro, pos = _pick(rng, NAMES)
    noun = _pick(rng, NOUNS)
    fill = {"name": name, "noun": noun, "pro": pro, "Pro": pro.capitalize(), "pos": pos}
    k = _randint(rng, d.min_steps, d.max_steps)
    a = _randint(rng, d.start_min, d.start_max)
    sentences = [_pick(rng, _Q_START).format(a=a, **fill)]
    steps = []
    for _ in range(k):
        feasible = _feasible(a, d)
        if not feasible:  # unreachable with add or sub enabled and max_value >= 2
            raise DataError(f"{d} cannot continue from value {a}")
        op = _pick(rng, sorted(feasible))
        b = _randint(rng, *feasible[op])
        c = _apply(op, a, b)
        sentences.append(_pick(rng, _Q_OPS[op]).format(b=b, **fill))
        nl = _pick(rng, _NL_STEPS[op]).format(a=a, b=b, c=c, **fill)
        steps.append(f"<<{a}{_EQ_SYMBOL[op]}{b}={c}>>" if style == "equation" else nl)
        a = c
    sentences.append(_pick(rng, _Q_END).format(**fill))
    return Record(question=" ".join(sentences), steps=steps, answer=str(a))


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")


def generate(
    n: int,
    seed: int = 0,
    style: str = "equation",
    difficulty: Difficulty | dict | None = None,
    *,
    unique: bool = False,
) -> list[Record]:
    """n synthetic records, deterministic in (seed, style, difficulty).

    unique=True skips problems whose question text was already generated (DataError if the
    problem space is too small to give n distinct questions).
    """
    _check_style(style)
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    d = Difficulty.of(difficulty)
    rng = random.Random(seed)
    if not unique:
        return [_one(rng, d, style) for _ in range(n)]
    out, seen, tries = [], set(), 0
    budget = 20 * n + 1000
    while len(out) < n:
        tries += 1
        if tries > budget:
            raise DataError(f"only {len(out)} distinct questions after {budget} draws with {d}; ask for fewer")
        r = _one(rng, d, style)
        if r.question not in seen:
            seen.add(r.question)
            out.append(r)
    return out


def vocabulary() -> list[str]:
    """Every word / symbol the generator (and the prompt " The answer is:") can emit, digits
    excluded, sorted. Derived from the templates, names and nouns, so it never depends on a sample."""
    texts = [_Q_START, _Q_END, *_Q_OPS.values(), *_NL_STEPS.values()]
    words = set(EQUATION_TOKENS)
    for group in texts:
        for t in group:
            words.update(split_words(re.sub(r"\{[^}]*\}", " ", t)))
    for name, pro, pos in NAMES:
        words.update((name, pro, pro.capitalize(), pos))
    words.update(NOUNS)
    words.update(split_words("The answer is:"))
    return sorted(w for w in words if not w.isdigit())


def _cot_string(steps: Sequence[str], index: int) -> str:
    """Steps joined by one space; raises if a step would not survive the loader's split
    (equation steps: one "<<...>>" each; sentences: end with "." and contain no ". ")."""
    for j, s in enumerate(steps):
        eq = s.startswith("<<") and s.endswith(">>") and s.count("<<") == 1
        if not eq and (not s.endswith(".") or ". " in s):
            raise DataError(
                f"record {index} step {j} {s!r} would not round-trip through the 'cot' schema "
                "(sentences must end with '.' and contain no '. ')"
            )
    return " ".join(steps)


def write_jsonl(records: Iterable[Record], path: str | Path, schema: str = "steps") -> Path:
    """Write records as JSON lines.

    schema "steps": {"question", "steps": [...], "answer"}  (GSM8k-AUG).
    schema "cot":   {"question", "cot": "<step> <step> ...", "answer"}  (the string variant; the
                    steps joined by one space: "<<a>> <<b>>" or "Sentence one. Sentence two.",
                    which the loaders split back exactly).
    """
    if schema not in ("steps", "cot"):
        raise ValueError(f"schema must be 'steps' or 'cot', got {schema!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i, r in enumerate(records):
            if schema == "steps":
                obj = {"question": r.question, "steps": list(r.steps), "answer": r.answer}
            else:
                obj = {"question": r.question, "cot": _cot_string(r.steps, i), "answer": r.answer}
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
    return path


def make_synthetic_splits(
    out_dir: str | Path,
    seed: int = 0,
    n_train: int = 20000,
    n_test: int = 500,
    style: str = "equation",
    difficulty: Difficulty | dict | None = None,
    schema: str = "steps",
) -> dict[str, Path]:
    """Write out_dir/train.jsonl and out_dir/test.jsonl (+ meta.json with the settings).

    One seeded stream of distinct questions: the first n_test go to test, the next n_train to
    train, so the splits are disjoint (no question text in both) and the test split does not
    depend on n_train. Returns {"train": path, "test": path, "meta": path}.
    """
    d = Difficulty.of(difficulty)
    recs = generate(n_test + n_train, seed, style, d, unique=True)
    out_dir = Path(out_dir)
    paths = {
        "test": write_jsonl(recs[:n_test], out_dir / "test.jsonl", schema),
        "train": write_jsonl(recs[n_test:], out_dir / "train.jsonl", schema),
    }
    meta = {
        "generator": "kava_jax.data.synthetic",
        "seed": seed,
        "style": style,
        "schema": schema,
        "n_train": n_train,
        "n_test": n_test,
        "difficulty": dataclasses.asdict(d),
    }
    paths["meta"] = out_dir / "meta.json"
    paths["meta"].write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return paths
