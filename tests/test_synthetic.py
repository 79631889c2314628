"""Synthetic generator: determinism, difficulty knobs, arithmetic, JSONL round trips, splits."""

import json
import re

import pytest

from kava_jax.data import synthetic
from kava_jax.data.loaders import load_records
from kava_jax.data.records import Record
from kava_jax.data.synthetic import Difficulty, generate, make_synthetic_splits, write_jsonl

EQ = re.compile(r"^<<(\d+)([+\-*])(\d+)=(\d+)>>$")


def _ops(record):
    """Independent re-parse of an equation trace: list of (a, op, b, c) ints."""
    out = []
    for s in record.steps:
        m = EQ.match(s)
        assert m, f"not an equation step: {s!r}"
        out.append((int(m[1]), m[2], int(m[3]), int(m[4])))
    return out


def _check_record(r, d: Difficulty):
    ops = _ops(r)
    assert d.min_steps <= len(ops) <= d.max_steps
    assert d.start_min <= ops[0][0] <= d.start_max
    for j, (a, op, b, c) in enumerate(ops):
        expect = {"+": a + b, "-": a - b, "*": a * b}[op]
        assert c == expect, (r, j)  # arithmetic is right
        assert 1 <= c <= d.max_value
        if op == "*":
            assert d.mul_min <= b <= d.mul_max
        else:
            assert 1 <= b <= d.max_operand
        if j:
            assert a == ops[j - 1][3], "steps must chain"
    assert int(r.answer) == ops[-1][3]  # the last step produces the answer
    # The question states the start value and every operand, in order.
    assert [int(x) for x in re.findall(r"\d+", r.question)] == [ops[0][0]] + [o[2] for o in ops]


def test_deterministic_and_seed_dependent():
    a = generate(40, seed=3)
    assert a == generate(40, seed=3)
    assert a != generate(40, seed=4)
    assert generate(40, seed=3, style="nl") == generate(40, seed=3, style="nl")


@pytest.mark.parametrize(
    "diff",
    [
        Difficulty(),
        Difficulty(min_steps=4, max_steps=4, max_operand=5, max_value=60),
        Difficulty.of({"num_steps": 1, "start_min": 10, "start_max": 12, "mul_max": 2}),
        Difficulty(min_steps=2, max_steps=5, ops=("add", "sub"), max_value=30),
    ],
)
def test_difficulty_knobs_and_arithmetic(diff):
    recs = generate(300, seed=11, difficulty=diff)
    for r in recs:
        _check_record(r, diff)
    lengths = {len(r.steps) for r in recs}
    assert lengths == set(range(diff.min_steps, diff.max_steps + 1))  # the whole range is used
    used = {op for r in recs for (_, op, _, _) in _ops(r)}
    assert used == {{"add": "+", "sub": "-", "mul": "*"}[o] for o in diff.ops}


def test_bad_difficulty_raises():
    with pytest.raises(ValueError, match="min_steps"):
        Difficulty(min_steps=3, max_steps=2)
    with pytest.raises(ValueError, match="ops"):
        Difficulty(ops=("mul", "div"))
    with pytest.raises(ValueError, match="unknown Difficulty"):
        Difficulty.of({"steps": 3})
    with pytest.raises(ValueError, match="style"):
        generate(3, style="latex")


def test_nl_trace_matches_equation_trace():
    eq = generate(200, seed=5, style="equation")
    nl = generate(200, seed=5, style="nl")
    for e, n in zip(eq, nl, strict=True):
        assert e.question == n.question and e.answer == n.answer
        assert len(e.steps) == len(n.steps)
        for (a, _, b, c), sent in zip(_ops(e), n.steps, strict=True):
            assert sent.endswith(".") and ". " not in sent
            assert [int(x) for x in re.findall(r"\d+", sent)] == [a, b, c]


def test_vocabulary_covers_generated_text():
    vocab = set(synthetic.vocabulary())
    for style in ("equation", "nl"):
        for r in generate(300, seed=2, style=style):
            for text in (r.question, *r.steps):
                words = re.findall(r"<<|>>|\d|[A-Za-z]+|\S", text)
                assert [w for w in words if not w.isdigit() and w not in vocab] == [], text
    assert {"The", "answer", "is", ":", "<<", ">>", "=", "+", "-", "*"} <= vocab


@pytest.mark.parametrize("style", ["equation", "nl"])
@pytest.mark.parametrize("schema", ["steps", "cot"])
def test_jsonl_round_trip(tmp_path, style, schema):
    recs = generate(30, seed=8, style=style)
    path = write_jsonl(recs, tmp_path / "x.jsonl", schema=schema)
    first = json.loads(path.read_text().splitlines()[0])
    assert set(first) == {"question", schema, "answer"}
    if schema == "cot":
        assert isinstance(first["cot"], str) and first["cot"] == " ".join(recs[0].steps)
    got, stats = load_records(path)
    assert got == recs and stats.kept == 30 and not stats.dropped
    explicit = {"steps": "steps", "cot": "cot" if style == "equation" else "nl"}[schema]
    assert load_records(path, schema=explicit)[0] == recs


def test_cot_schema_refuses_unsplittable_steps(tmp_path):
    bad = [Record("q?", ["One. Two.", "Three."], "3")]
    with pytest.raises(ValueError, match="round-trip"):
        write_jsonl(bad, tmp_path / "bad.jsonl", schema="cot")


def test_splits_disjoint_deterministic(tmp_path):
    p1 = make_synthetic_splits(tmp_path / "a", seed=1, n_train=300, n_test=50, style="nl")
    p2 = make_synthetic_splits(tmp_path / "b", seed=1, n_train=300, n_test=50, style="nl")
    p3 = make_synthetic_splits(tmp_path / "c", seed=1, n_train=120, n_test=50, style="nl")
    assert p1["train"].read_bytes() == p2["train"].read_bytes()
    assert p1["test"].read_bytes() == p3["test"].read_bytes()  # test split independent of n_train
    train = [json.loads(x) for x in p1["train"].read_text().splitlines()]
    test = [json.loads(x) for x in p1["test"].read_text().splitlines()]
    assert len(train) == 300 and len(test) == 50
    qs_train, qs_test = {r["question"] for r in train}, {r["question"] for r in test}
    assert len(qs_train) == 300 and len(qs_test) == 50 and not qs_train & qs_test
    meta = json.loads(p1["meta"].read_text())
    assert meta["seed"] == 1 and meta["difficulty"]["max_value"] == 999
    recs, _ = load_records(tmp_path / "a", split="test")
    assert [r.question for r in recs] == [r["question"] for r in test]


def test_unique_exhaustion_is_reported():
    tiny = Difficulty(min_steps=1, max_steps=1, start_min=1, start_max=1, max_operand=1, max_value=2, ops=("add",))
    with pytest.raises(ValueError, match="distinct questions"):
        generate(1200, seed=0, difficulty=tiny, unique=True)
