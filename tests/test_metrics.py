"""Answer extraction and accuracy on a table of tricky strings."""

import pytest

from kava_jax.eval.metrics import accuracy, answers_match, extract_answer

TABLE = [
    ("The answer is: 18", 18.0),
    (" 18", 18.0),
    ("The answer is: 1,234,567.", 1234567.0),
    ("It costs $1,000.50 in total.", 1000.5),
    ("so -3 degrees", -3.0),
    ("= -0.25", -0.25),
    ("$-5", -5.0),
    ("-$5", -5.0),
    ("(-7)", -7.0),
    ("10-3", 3.0),  # a hyphen glued to a digit is not a minus sign
    ("x-2", 2.0),
    ("3.5 then 42.", 42.0),
    ("answer 18.", 18.0),
    ("he has .5 left", 0.5),
    ("1, 2, 3", 3.0),
    ("12 apples and 7 pears", 7.0),
    ("50%", 50.0),
    ("<<17+10=27>> The answer is: 27<eos>", 27.0),
    ("room 4B", 4.0),
    ("007", 7.0),
    ("no number here", None),
    ("", None),
    ("-", None),
    ("$.", None),
]


@pytest.mark.parametrize("text,want", TABLE)
def test_extract_answer(text, want):
    got = extract_answer(text)
    if want is None:
        assert got is None
    else:
        assert got == pytest.approx(want, abs=0, rel=1e-12)


def test_extract_answer_none_and_type():
    assert extract_answer(None) is None
    with pytest.raises(ValueError, match="string"):
        extract_answer(18)


def test_answers_match():
    assert answers_match(18.0, 18)
    assert answers_match(18.00005, 18)
    assert not answers_match(18.001, 18)
    assert answers_match(extract_answer("-9,867,630"), -9867630.0)
    assert not answers_match(-9867631.0, -9867630.0)  # absolute tolerance, also for big answers
    assert answers_match(2.5, 2.5001, tol=1e-3)
    assert not answers_match(None, 0.0)
    assert answers_match(0.0, 0.0) and not answers_match(-1.0, 1.0)


def test_accuracy():
    preds = ["The answer is: 1,000", 5.0, None, "no idea", "-2", 3.00001]
    golds = [1000.0, 5.0, 1.0, 0.0, -2.0, 3.0]
    assert accuracy(preds, golds) == pytest.approx(4 / 6)
    assert accuracy([1.0], [1.0]) == 1.0
    with pytest.raises(ValueError, match="2 predictions but 1"):
        accuracy([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="no examples"):
        accuracy([], [])
