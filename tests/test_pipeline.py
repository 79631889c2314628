"""data.pipeline: length accounting, deterministic shuffling, exact resume, host slicing, global arrays,
and every record schema from local files through to batches."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from kava_jax.data import synthetic
from kava_jax.data.loaders import load_records
from kava_jax.data.pipeline import BatchIterator, abstract_batch, host_rows, to_global, tokenize_examples
from kava_jax.data.records import DataError, Record
from kava_jax.data.tokenizer import build_synthetic_tokenizer, prompt_ids, special_tokens
from kava_jax.kava.batch import BATCH_KEYS, LayoutSpec
from kava_jax.train.sharding import batch_shardings, make_mesh

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"
WORD = re.compile(r"<<|>>|\d|[A-Za-z]+|[^\sA-Za-z\d]")  # reference word-level split of the synthetic tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_synthetic_tokenizer()


def _spec(tok, q=48, c=24, r=8, truncate=False):
    sp = special_tokens(tok)
    return LayoutSpec(q_len=q, cot_len=c, answer_len=r, num_latents=4, prompt_ids=tuple(prompt_ids(tok)),
                      bos_id=sp.start, eos_id=sp.eos, pad_id=sp.pad, bot_id=sp.bot, eot_id=sp.eot,
                      latent_id=sp.latent, truncate=truncate)


@pytest.fixture(scope="module")
def examples(tok):
    recs = synthetic.generate(50, seed=3, style="equation", difficulty={"num_steps": 3}, unique=True)
    ex = tokenize_examples(recs, tok, _spec(tok))
    assert len(ex) == 50
    return ex


def _row_ids(batch, ex_index):
    """Example index of every valid row, recovered from the question tokens (questions are unique)."""
    out = []
    for row in range(batch["teacher_ids"].shape[0]):
        q = batch["student_prefix_ids"][row, :-1][batch["student_prefix_valid"][row, :-1]]
        out.append(ex_index[tuple(int(t) for t in q[1:])])  # drop BOS
    return out


@pytest.fixture(scope="module")
def ex_index(examples):
    return {tuple(e.question_ids): i for i, e in enumerate(examples.examples)}


# ------------------------------------------------------------------------------------ lengths
def _rec(n_words, n_steps, answer):
    return Record(question="Mia has " + " ".join(["books"] * n_words), steps=["<<1+2=3>>"] * n_steps, answer=answer)


def test_over_long_records_counted_per_reason(tok):
    spec = _spec(tok, q=8, c=14, r=8)
    assert len(spec.prompt_ids) == len(WORD.findall("The answer is:")) == 4
    recs = [_rec(3, 3, "12"), _rec(6, 3, "12"), _rec(3, 4, "12"), _rec(3, 3, "12345"), _rec(2, 2, "7")]
    # reference lengths: question 1 + 2 + k; CoT 7 tokens per kept step; answer block 4 + digits + 1
    assert [1 + len(WORD.findall(r.question)) for r in recs] == [6, 9, 6, 6, 5]
    ex = tokenize_examples(recs, tok, spec, source="mini")
    assert ex.stats.seen == 5 and ex.stats.kept == 2
    assert dict(ex.stats.dropped) == {"too_long_question": 1, "too_long_cot": 1, "too_long_answer": 1}
    assert ex.stats.examples == {"too_long_question": [1], "too_long_cot": [2], "too_long_answer": [3]}
    assert [e.answer_ids for e in ex.examples] == [tok(" 12", add_special_tokens=False)["input_ids"],
                                                   tok(" 7", add_special_tokens=False)["input_ids"]]
    assert list(ex.lengths["cot"]) == [14, 7] and list(ex.lengths["answer"]) == [7, 6]
    assert "too_long_cot 1" in ex.summary() and "bucket 14" in ex.summary()

    msg = r"mini: record 1: too_long_question: question 9 tokens \(incl. BOS\) > data.q_len=8"
    with pytest.raises(DataError, match=msg):
        tokenize_examples(recs, tok, spec, strict=True, source="mini")

    # truncate mode keeps over-long questions / CoTs (counted) but never cuts an answer
    tspec = _spec(tok, q=8, c=14, r=8, truncate=True)
    ex = tokenize_examples(recs, tok, tspec)
    assert ex.stats.kept == 4 and dict(ex.stats.dropped) == {"too_long_answer": 1}
    assert ex.truncated == {"question": 1, "cot": 1}
    it = BatchIterator(ex, tspec, 4, seed=0, process_index=0, process_count=1)
    batch = next(it)
    assert batch["question_len"].max() == 8 and batch["cot_len"].max() == 14
    assert it.truncation.question == 1 and it.truncation.cot == 1


# ------------------------------------------------------------------------------------ order
def _take(it, n):
    return [next(it) for _ in range(n)]


def test_deterministic_shuffling(examples, tok, ex_index):
    spec, B, n = _spec(tok), 8, 50
    a = _take(BatchIterator(examples, spec, B, seed=5, process_index=0, process_count=1), 12)
    b = _take(BatchIterator(examples, spec, B, seed=5, process_index=0, process_count=1), 12)
    c = _take(BatchIterator(examples, spec, B, seed=6, process_index=0, process_count=1), 12)
    for x, y in zip(a, b, strict=True):
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(x[k], y[k])
    rows_a = [_row_ids(x, ex_index) for x in a]
    rows_c = [_row_ids(x, ex_index) for x in c]
    assert rows_a != rows_c
    # 6 batches per epoch (50 // 8); the order of epoch e is default_rng([seed, e]).permutation(n)
    for epoch in (0, 1):
        want = np.random.default_rng([5, epoch]).permutation(n)[:48].reshape(6, 8)
        got = np.asarray(rows_a[6 * epoch:6 * epoch + 6])
        np.testing.assert_array_equal(got, want)
        assert len(set(got.ravel())) == 48  # no example twice within an epoch
    assert rows_a[:6] != rows_a[6:]  # epochs reshuffle


def test_state_restore_resumes_exactly(examples, tok):
    spec = _spec(tok)
    it = BatchIterator(examples, spec, 8, seed=1, process_index=0, process_count=1)
    _take(it, 7)  # crosses the epoch boundary (6 batches per epoch)
    state = json.loads(json.dumps(it.state()))
    assert state["epoch"] == 1 and state["position"] == 1
    rest = _take(it, 9)
    resumed = BatchIterator(examples, spec, 8, seed=1, process_index=0, process_count=1, state=state)
    again = _take(resumed, 9)
    for x, y in zip(rest, again, strict=True):
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(x[k], y[k])
    assert resumed.state() == it.state()
    with pytest.raises(ValueError, match="seed=1 but this run has 2"):
        BatchIterator(examples, spec, 8, seed=2, process_index=0, process_count=1, state=state)
    with pytest.raises(ValueError, match="global_batch_size"):
        BatchIterator(examples, spec, 10, seed=1, process_index=0, process_count=1, state=state)


def test_two_hosts_cover_global_batch_once(examples, tok, ex_index):
    spec, B = _spec(tok), 8
    glob = BatchIterator(examples, spec, B, seed=9, process_index=0, process_count=1)
    hosts = [BatchIterator(examples, spec, B, seed=9, process_index=p, process_count=2) for p in (0, 1)]
    assert [h.rows for h in hosts] == [(0, 4), (4, 8)]
    seen = []
    for _ in range(7):
        g = next(glob)
        parts = [next(h) for h in hosts]
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), g[k])
        seen.append(sorted(_row_ids(parts[0], ex_index) + _row_ids(parts[1], ex_index)))
    for s in seen:
        assert len(set(s)) == B  # each example of the global batch built by exactly one host
    with pytest.raises(ValueError, match="not divisible by the 3 hosts"):
        BatchIterator(examples, spec, B, seed=9, process_index=0, process_count=3)


def test_to_global_and_host_rows(examples, tok):
    spec, B = _spec(tok), 16
    mesh = make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
    shardings = batch_shardings(abstract_batch(spec, B), mesh)
    assert host_rows(shardings["teacher_ids"], B) == (0, B)  # one process holds every row
    batch = next(BatchIterator(examples, spec, B, seed=0, process_index=0, process_count=1))
    g = to_global(batch, shardings)
    assert set(g) == set(BATCH_KEYS)
    for k in BATCH_KEYS:
        np.testing.assert_array_equal(np.asarray(g[k]), batch[k])
        assert g[k].shape == batch[k].shape and g[k].dtype == batch[k].dtype
    shard_rows = {s.data.shape[0] for s in g["teacher_ids"].addressable_shards}
    assert shard_rows == {2} and len(g["teacher_ids"].sharding.device_set) == 8
    abstract = abstract_batch(spec, B)
    assert {k: (v.shape, v.dtype) for k, v in abstract.items()} == {k: (v.shape, v.dtype) for k, v in batch.items()}
    with pytest.raises(ValueError, match="fewer than train.batch_size=64"):
        BatchIterator(examples, spec, 64, seed=0, process_index=0, process_count=1)


# ------------------------------------------------------------------------------------ schemas
def _write(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_every_schema_from_local_files(tmp_path, tok):
    recs = synthetic.generate(12, seed=4, style="equation", difficulty={"num_steps": 3}, unique=True)
    nl = synthetic.generate(12, seed=4, style="nl", difficulty={"num_steps": 3}, unique=True)
    files = {
        "steps": _write(tmp_path / "steps.jsonl", [r.to_dict() for r in recs]),
        "cot": _write(tmp_path / "cot.jsonl", [{"question": r.question, "cot": " ".join(r.steps),
                                                "answer": f"#### {r.answer}"} for r in recs]),
        "nl": _write(tmp_path / "nl.jsonl", [{"question": r.question, "cot": " ".join(r.steps), "answer": r.answer}
                                             for r in nl]),
    }
    if GSM8K.is_file():  # the real GSM8k schema from ../shared/data (absent in a clone elsewhere)
        files["gsm8k"] = _write(tmp_path / "gsm8k.jsonl", [json.loads(x) for x in
                                                           GSM8K.read_text(encoding="utf-8").splitlines()[:12]])
    spec = _spec(tok, q=128, c=96, r=12)
    for schema, path in files.items():
        for s in (schema, "auto"):
            records, stats = load_records(str(path), schema=s, trace="equation")
            assert stats.kept == 12, (schema, stats.summary())
            ex = tokenize_examples(records, tok, spec, source=str(path))
            assert ex.stats.kept == 12, (schema, ex.summary())
            it = BatchIterator(ex, spec, 4, seed=0, process_index=0, process_count=1)
            batch = next(it)
            order = np.random.default_rng([0, 0]).permutation(12)[:4]
            for row, i in enumerate(order):
                ans = batch["student_answer_ids"][row][batch["student_answer_valid"][row]]
                want = [spec.eot_id, *spec.prompt_ids, *tok(" " + records[i].answer,
                                                            add_special_tokens=False)["input_ids"], spec.eos_id]
                assert ans.tolist() == want, (schema, row)
                assert batch["cot_len"][row] == sum(len(WORD.findall(st)) for st in records[i].steps[:-1])
