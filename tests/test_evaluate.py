"""evaluate(): tokenising, static batching with padding rows, text decoding, answer extraction and
statistics, checked against the decoders called directly on blocks built here and against gold
answers chosen from what the random model outputs (accuracy 1 on the achievable items, then 0)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kava_jax.data.tokenizer import build_synthetic_tokenizer, prompt_ids, special_tokens
from kava_jax.eval import decode
from kava_jax.eval.evaluate import EvalResult, evaluate, extract_cot_answer, question_blocks
from kava_jax.eval.metrics import extract_answer
from kava_jax.models import abstract_params, get_preset

QUESTIONS = [
    "Tom has 3 apples. How many apples does he have?",
    "Mia buys 12 books and gives 5 away. How many books does she have?",
    "Ben finds 7 shells.",
    "Anna has 4 coins and gets 9 more. How many coins?",
    "Leo sells 20 cards.",
]
Q_LEN, BS = 18, 2


class Item:
    def __init__(self, question, answer):
        self.question, self.answer = question, answer


@functools.cache
def _setup():
    tok = build_synthetic_tokenizer()
    sp = special_tokens(tok)
    cfg = get_preset("tiny", vocab_size=len(tok), tie_word_embeddings=False)
    rng = np.random.default_rng(3)

    def fill(path, a):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return jnp.asarray(np.ones(a.shape, a.dtype))
        x = rng.normal(0.0, 0.06, a.shape).astype(a.dtype)
        if "lm_head" in name:  # only digits and EOS can win the argmax: answers are numbers
            keep = np.zeros(a.shape[-1], bool)
            keep[tok.convert_tokens_to_ids(list("0123456789"))] = True
            keep[sp.eos] = True
            x = np.where(keep, rng.normal(0.0, 0.5, a.shape), 0.0).astype(a.dtype)
        return jnp.asarray(x)

    params = jax.tree_util.tree_map_with_path(fill, abstract_params(cfg))
    return tok, sp, cfg, params, {}


def _expected(method, tok, sp, cfg, params, prompt, **kw):
    """Texts, predictions and per-item counts from the decoders called directly, batch by batch."""
    ids = tok([q.strip() for q in QUESTIONS], add_special_tokens=False)["input_ids"]
    rows = [[sp.start, *t] for t in ids] + [[sp.start]] * (-len(ids) % BS)
    block = np.full((len(rows), Q_LEN), sp.pad, np.int32)
    for i, r in enumerate(rows):
        block[i, Q_LEN - len(r):] = r
    valid = block != sp.pad
    out = []
    for lo in range(0, len(rows), BS):
        qi, qv = block[lo:lo + BS], valid[lo:lo + BS]
        if method == "latent":
            qi = np.concatenate([qi, np.full((BS, 1), sp.bot, np.int32)], 1)
            qv = np.concatenate([qv, np.ones((BS, 1), bool)], 1)
            res = decode.latent_generate(params, cfg, {}, qi, qv, mode="jacobi", num_latents=2, num_iterations=1,
                                         latent_id=sp.latent, eot_id=sp.eot, prompt_ids=prompt, eos_id=sp.eos,
                                         pad_id=sp.pad, max_new_tokens=kw["max_answer_tokens"])
        elif method == "nocot":
            res = decode.nocot_generate(params, cfg, qi, qv, prompt_ids=prompt, eos_id=sp.eos, pad_id=sp.pad,
                                        max_new_tokens=kw["max_answer_tokens"])
        else:
            res = decode.cot_generate(params, cfg, qi, qv, prompt_ids=prompt, eos_id=sp.eos, pad_id=sp.pad,
                                      max_new_tokens=kw["max_cot_tokens"] + len(prompt) + kw["max_answer_tokens"])
        for r in range(BS):
            if lo + r >= len(QUESTIONS):
                continue
            n = int(res.num_generated[r])
            gen = [int(t) for t in res.tokens[r, :n] if int(t) != sp.eos]
            text = tok.decode(gen, skip_special_tokens=True)
            pred = extract_cot_answer(text) if method == "cot" else extract_answer(text)
            out.append((text, pred, n, int(res.forward_passes[r]), int(res.kv_bytes[r])))
    return out


@pytest.mark.parametrize("method", ["latent", "nocot", "cot"])
def test_evaluate_matches_direct_decoding_and_scores_accuracy(method):
    tok, sp, cfg, params, prj = _setup()
    prompt = prompt_ids(tok)
    kw = dict(max_answer_tokens=3, max_cot_tokens=2)
    common = dict(q_len=Q_LEN, latent_mode="jacobi", num_latents=2, num_iterations=1, batch_size=BS, **kw)

    first = evaluate(method, params, cfg, prj, tok, sp, [Item(q, 0.5) for q in QUESTIONS],
                     progress=method == "latent", **common)
    assert isinstance(first, EvalResult) and first.num_items == len(QUESTIONS)
    want = _expected(method, tok, sp, cfg, params, prompt, **kw)
    got = [(p.text, p.pred, p.num_generated, p.forward_passes, p.kv_bytes) for p in first.predictions]
    assert got == want
    assert [p.index for p in first.predictions] == list(range(len(QUESTIONS)))
    assert first.accuracy == 0.0  # no integer output equals 0.5
    assert first.mean_generated_tokens == pytest.approx(np.mean([w[2] for w in want]))
    assert first.mean_forward_passes == pytest.approx(np.mean([w[3] for w in want]))
    assert first.mean_kv_bytes == pytest.approx(np.mean([w[4] for w in want]))
    assert first.compile_seconds > 0 and first.seconds_per_question > 0 and first.num_truncated == 0
    preds = [w[1] for w in want]
    assert sum(p is not None for p in preds) >= 3, f"random model gave too few numbers: {want}"

    # gold = what the model outputs -> every item with a number is right; shifted gold -> none is
    golds = [p if p is not None else 0.5 for p in preds]
    hit = evaluate(method, params, cfg, prj, tok, sp, [Item(q, g) for q, g in zip(QUESTIONS, golds, strict=True)],
                   progress=False, **common)
    assert hit.accuracy == pytest.approx(sum(p is not None for p in preds) / len(preds))
    assert [p.correct for p in hit.predictions] == [p is not None for p in preds]
    miss = evaluate(method, params, cfg, prj, tok, sp,
                    [{"question": q, "answer": 2 * g + 1} for q, g in zip(QUESTIONS, golds, strict=True)],
                    progress=False, **common)
    assert miss.accuracy == 0.0
    assert "predictions" not in miss.summary() and miss.summary()["method"] == method


def test_extract_cot_answer():
    assert extract_cot_answer("<<3+4=7>> The answer is: 12") == 12.0
    assert extract_cot_answer("<<3+4=7>> The answer is: 1,250 apples") == 1250.0
    assert extract_cot_answer("<<3+4=7>> so 9") == 9.0  # no marker: last number
    assert extract_cot_answer("8 The answer is: none") == 8.0  # marker without number: last number
    assert extract_cot_answer("no numbers") is None


def test_question_blocks_and_bad_input():
    ids, valid, trunc = question_blocks([[5, 6], [7, 8, 9, 10]], q_len=4, start_id=1, pad_id=0, truncate=True)
    np.testing.assert_array_equal(ids, [[0, 1, 5, 6], [1, 8, 9, 10]])
    np.testing.assert_array_equal(valid, [[False, True, True, True], [True] * 4])
    np.testing.assert_array_equal(trunc, [False, True])
    with pytest.raises(ValueError, match="item 1: question has 4 tokens"):
        question_blocks([[5], [7, 8, 9, 10]], q_len=4, start_id=1, pad_id=0)

    tok, sp, cfg, params, prj = _setup()
    items = [Item(QUESTIONS[0], 1.0)]
    with pytest.raises(ValueError, match="method"):
        evaluate("pccot", params, cfg, prj, tok, sp, items, q_len=Q_LEN)
    with pytest.raises(ValueError, match="item 0: question"):
        evaluate("nocot", params, cfg, prj, tok, sp, items, q_len=4)
    with pytest.raises(ValueError, match="answer"):
        evaluate("nocot", params, cfg, prj, tok, sp, [Item("Tom has 3", "three")], q_len=Q_LEN)
    with pytest.raises(ValueError, match="specials.bot"):
        evaluate("latent", params, cfg, prj, tok, {"start": 1, "eos": 2, "pad": 0}, items, q_len=Q_LEN)
