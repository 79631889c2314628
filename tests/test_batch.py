"""Tests of kava_jax.kava.batch against hand-written arrays derived from notes/BATCH_LAYOUT.md."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from kava_jax.kava.batch import (
    BATCH_KEYS,
    LayoutSpec,
    TokenizedExample,
    TruncationStats,
    build_batch,
    describe_batch,
    layout_positions,
)

T, F = True, False
PAD, BOS, EOS, BOT, EOT, LAT = 0, 1, 2, 3, 4, 5
PROMPT = (20, 21)  # ':' = 21

SPEC = LayoutSpec(
    q_len=4, cot_len=5, answer_len=6, num_latents=2, prompt_ids=PROMPT,
    bos_id=BOS, eos_id=EOS, pad_id=PAD, bot_id=BOT, eot_id=EOT, latent_id=LAT,
)

EX0 = TokenizedExample(question_ids=[10, 11], steps=[[30, 31], [32], [33, 34]], answer_ids=[40])
EX1 = TokenizedExample(question_ids=[12, 13, 14], steps=[[35], [36, 37]], answer_ids=[41, 42])

# Written by hand from the layout: Q=4 | C=5 | R=6, S_t = 15.
EXPECTED = {
    "teacher_ids": [
        [0, 1, 10, 11, 30, 31, 32, 0, 0, 20, 21, 40, 2, 0, 0],
        [1, 12, 13, 14, 35, 0, 0, 0, 0, 20, 21, 41, 42, 2, 0],
    ],
    "teacher_valid": [
        [F, T, T, T, T, T, T, F, F, T, T, T, T, F, F],
        [T, T, T, T, T, F, F, F, F, T, T, T, T, T, F],
    ],
    "teacher_targets": [
        [0, 10, 11, 30, 31, 32, 20, 0, 0, 21, 40, 2, 0, 0, 0],
        [12, 13, 14, 35, 20, 0, 0, 0, 0, 21, 41, 42, 2, 0, 0],
    ],
    "teacher_loss_mask": [
        [F, F, F, T, T, T, T, F, F, T, T, T, F, F, F],
        [F, F, F, T, T, F, F, F, F, T, T, T, T, F, F],
    ],
    "teacher_distill_idx": [10, 10],
    "student_prefix_ids": [[0, 1, 10, 11, 3], [1, 12, 13, 14, 3]],
    "student_prefix_valid": [[F, T, T, T, T], [T, T, T, T, T]],
    "student_answer_ids": [[4, 20, 21, 40, 2, 0, 0], [4, 20, 21, 41, 42, 2, 0]],
    "student_answer_valid": [[T, T, T, T, T, F, F], [T, T, T, T, T, T, F]],
    "student_answer_targets": [[20, 21, 40, 2, 0, 0, 0], [20, 21, 41, 42, 2, 0, 0]],
    "student_answer_loss_mask": [[T, T, T, T, F, F, F], [T, T, T, T, T, F, F]],
    "student_distill_idx": [2, 2],
    "nocot_valid": [
        [F, T, T, T, F, F, F, F, F, T, T, T, T, F, F],
        [T, T, T, T, F, F, F, F, F, T, T, T, T, T, F],
    ],
    "nocot_targets": [
        [0, 10, 11, 20, 0, 0, 0, 0, 0, 21, 40, 2, 0, 0, 0],
        [12, 13, 14, 20, 0, 0, 0, 0, 0, 21, 41, 42, 2, 0, 0],
    ],
    "nocot_loss_mask": [
        [F, F, F, T, F, F, F, F, F, T, T, T, F, F, F],
        [F, F, F, T, F, F, F, F, F, T, T, T, T, F, F],
    ],
    "cot_valid": [[T, T, T, F, F], [T, F, F, F, F]],
    "answer_valid": [[T, T, T, T, F, F], [T, T, T, T, T, F]],
    "example_valid": [T, T],
    "question_len": [3, 4],
    "cot_len": [3, 1],
}


def test_every_field_of_hand_made_batch():
    batch, stats = build_batch([EX0, EX1], SPEC)
    assert set(batch) == set(EXPECTED) == set(BATCH_KEYS)
    for key, want in EXPECTED.items():
        want = np.asarray(want)
        got = batch[key]
        assert got.dtype == (np.bool_ if want.dtype == np.bool_ else np.int32), key
        np.testing.assert_array_equal(got, want, err_msg=key)
    assert stats == TruncationStats()
    # Distill token is ':' in both sequences.
    assert batch["teacher_ids"][0, 10] == 21 and batch["student_answer_ids"][1, 2] == 21


def test_padding_rows():
    batch, _ = build_batch([EX0, EX1], SPEC, batch_size=3)
    for key, want in EXPECTED.items():
        np.testing.assert_array_equal(batch[key][:2], np.asarray(want), err_msg=key)
    np.testing.assert_array_equal(batch["example_valid"], [T, T, F])
    for key in ("teacher_loss_mask", "student_answer_loss_mask", "nocot_loss_mask"):
        assert not batch[key][2].any(), key
    # Dummy row keeps BOS and prompt+EOS valid so attention never sees an empty row.
    np.testing.assert_array_equal(batch["teacher_ids"][2], [0, 0, 0, 1, 0, 0, 0, 0, 0, 20, 21, 2, 0, 0, 0])
    np.testing.assert_array_equal(batch["student_prefix_valid"][2], [F, F, F, T, T])
    assert batch["question_len"][2] == 1 and batch["cot_len"][2] == 0
    with pytest.raises(ValueError, match="batch_size=1"):
        build_batch([EX0, EX1], SPEC, batch_size=1)
    with pytest.raises(ValueError, match="at least one row"):
        build_batch([], SPEC)


def test_empty_cot_one_step():
    ex = TokenizedExample(question_ids=[10], steps=[[30, 31, 32]], answer_ids=[40])
    batch, _ = build_batch([ex], SPEC)
    np.testing.assert_array_equal(batch["cot_valid"], [[F, F, F, F, F]])
    np.testing.assert_array_equal(batch["teacher_ids"][0, 4:9], [0, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch["teacher_ids"][0], [0, 0, 1, 10, 0, 0, 0, 0, 0, 20, 21, 40, 2, 0, 0])
    np.testing.assert_array_equal(
        batch["teacher_targets"][0], [0, 0, 10, 20, 0, 0, 0, 0, 0, 21, 40, 2, 0, 0, 0]
    )
    np.testing.assert_array_equal(
        batch["teacher_loss_mask"][0], [F, F, F, T, F, F, F, F, F, T, T, T, F, F, F]
    )
    # With an empty CoT the teacher and the no-CoT arrays coincide.
    np.testing.assert_array_equal(batch["nocot_valid"], batch["teacher_valid"])
    np.testing.assert_array_equal(batch["nocot_targets"], batch["teacher_targets"])
    np.testing.assert_array_equal(batch["nocot_loss_mask"], batch["teacher_loss_mask"])
    assert batch["cot_len"][0] == 0
    # Zero steps also gives an empty CoT.
    b2, _ = build_batch([TokenizedExample([10], [], [40])], SPEC)
    np.testing.assert_array_equal(b2["teacher_ids"], batch["teacher_ids"])


def test_truncation_errors_name_example_part_and_lengths():
    long_q = TokenizedExample(question_ids=[10, 11, 12, 13, 14], steps=[[30]], answer_ids=[40])
    with pytest.raises(ValueError, match=r"example 1: question too long: BOS \+ 5 .* = 6 > q_len=4"):
        build_batch([EX0, long_q], SPEC)
    long_c = TokenizedExample(question_ids=[10], steps=[[30, 31, 32], [33, 34, 35], [36]], answer_ids=[40])
    with pytest.raises(ValueError, match=r"example 0: cot too long: 6 tokens .* > cot_len=5"):
        build_batch([long_c], SPEC)
    long_a = TokenizedExample(question_ids=[10], steps=[[30]], answer_ids=[40, 41, 42, 43])
    with pytest.raises(ValueError, match=r"example 0: answer block too long: .* = 7 tokens > answer_len=6"):
        build_batch([long_a], SPEC)
    with pytest.raises(ValueError, match=r"answer block too long"):
        build_batch([long_a], dataclasses.replace(SPEC, truncate=True))


def test_counted_truncation():
    spec = dataclasses.replace(SPEC, truncate=True)
    long_q = TokenizedExample(question_ids=[10, 11, 12, 13, 14], steps=[[30]], answer_ids=[40])
    long_c = TokenizedExample(question_ids=[10], steps=[[30, 31, 32], [33, 34, 35], [36]], answer_ids=[40])
    batch, stats = build_batch([long_q, long_c, EX0], spec)
    assert stats == TruncationStats(question=1, cot=1, question_tokens_dropped=2, cot_tokens_dropped=1)
    assert stats.total == 2
    # question keeps BOS + its END; CoT keeps its START.
    np.testing.assert_array_equal(batch["teacher_ids"][0, :4], [1, 12, 13, 14])
    np.testing.assert_array_equal(batch["teacher_ids"][1, 4:9], [30, 31, 32, 33, 34])
    np.testing.assert_array_equal(batch["cot_len"], [0, 5, 3])
    assert stats + stats == TruncationStats(2, 2, 4, 2)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="starts with bos_id"):
        build_batch([TokenizedExample([BOS, 10], [[30]], [40])], SPEC)
    with pytest.raises(ValueError, match=r"example 0: steps\[0\]"):
        build_batch([TokenizedExample([10], [["a"], [1]], [40])], SPEC)
    with pytest.raises(ValueError, match="answer_len"):
        dataclasses.replace(SPEC, answer_len=2)
    with pytest.raises(ValueError, match="bot_id"):
        dataclasses.replace(SPEC, eot_id=BOT)


def test_layout_positions_numpy_and_jax():
    valid = np.array([[F, T, T, F, T], [T, T, T, T, T], [F, F, F, F, F]])
    want = np.array([[0, 0, 1, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]])
    got_np = layout_positions(valid)
    assert isinstance(got_np, np.ndarray) and got_np.dtype == np.int32
    np.testing.assert_array_equal(got_np, want)
    got_j = layout_positions(jnp.asarray(valid))
    assert isinstance(got_j, jnp.ndarray) and got_j.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got_j), want)


def test_describe_batch():
    batch, _ = build_batch([EX0, EX1], SPEC)
    s = describe_batch(batch, row=0)
    assert "question_len=3" in s and "21*^" in s and "·" in s
    s2 = describe_batch(batch, row=1, decode=lambda ids: f"t{ids[0]}")
    assert "'t35'" in s2
    with pytest.raises(ValueError, match="row=5"):
        describe_batch(batch, row=5)
