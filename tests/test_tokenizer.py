"""Tokenizers: the synthetic word-level tokenizer, load_tokenizer on small BPE tokenizers, and the
spacing rules of tokenize_record."""

import json
import re

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from kava_jax.data.records import Record
from kava_jax.data.synthetic import generate
from kava_jax.data.tokenizer import (
    KAVA_SPECIAL_TOKENS,
    build_synthetic_tokenizer,
    load_tokenizer,
    prompt_ids,
    tokenize_record,
    tokenize_records,
)


@pytest.fixture(scope="module")
def syn_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("syntok")
    build_synthetic_tokenizer(save_dir=d)
    return d


@pytest.fixture(scope="module")
def syn(syn_dir):
    return AutoTokenizer.from_pretrained(str(syn_dir), local_files_only=True, trust_remote_code=False)


def _enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_synthetic_round_trip_no_unk(syn):
    unk = syn.convert_tokens_to_ids("<unk>")
    for style in ("equation", "nl"):
        for r in generate(150, seed=4, style=style):
            full = f"{r.question} {' '.join(r.steps)} The answer is: {r.answer}"
            for text in (r.question, *r.steps, full):
                ids = _enc(syn, text)
                assert unk not in ids, text
                assert syn.decode(ids) == text


def test_synthetic_digits_split_and_specials(syn, syn_dir):
    toks = syn.convert_ids_to_tokens(_enc(syn, "Mia has 1207 books. <<17*3=51>>"))
    assert toks == ["Mia", "has", "1", "2", "0", "7", "books", ".", "<<", "1", "7", "*", "3", "=", "5", "1", ">>"]
    vocab = syn.get_vocab()
    assert [vocab[t] for t in ("<pad>", "<bos>", "<eos>", "<unk>")] == [0, 1, 2, 3]
    assert all(len(d) == 1 for d in vocab if d.isdigit())
    ids = set()
    for t in ("<pad>", "<bos>", "<eos>", "<unk>", *KAVA_SPECIAL_TOKENS):
        one = _enc(syn, t)
        assert len(one) == 1 and syn.convert_ids_to_tokens(one) == [t]
        ids.add(one[0])
    assert len(ids) == 7
    assert _enc(syn, "Mia <bot> has") == [vocab["Mia"], vocab["<bot>"], vocab["has"]]
    assert syn("Mia has 3")["input_ids"] == _enc(syn, "Mia has 3")  # no automatic BOS/EOS
    assert syn.decode(_enc(syn, "Mia <latent> has"), skip_special_tokens=True) == "Mia has"
    # Deterministic: a second build has the same vocabulary and tokenizer.json.
    again = build_synthetic_tokenizer()
    assert again.get_vocab() == vocab
    assert json.loads((syn_dir / "tokenizer.json").read_text())["model"]["vocab"] == json.loads(
        again.backend_tokenizer.to_str())["model"]["vocab"]


def test_load_tokenizer_on_synthetic(syn_dir, syn):
    tok, sp, vsize = load_tokenizer(syn_dir)
    v = syn.get_vocab()
    assert (sp.bos, sp.start, sp.eos, sp.pad) == (v["<bos>"], v["<bos>"], v["<eos>"], v["<pad>"])
    assert (sp.bot, sp.eot, sp.latent) == (v["<bot>"], v["<eot>"], v["<latent>"])
    assert vsize == len(v) == len(tok)  # nothing new had to be added


def test_tokenize_record_synthetic_reference(syn):
    vocab = syn.get_vocab()
    rec = generate(1, seed=9, style="nl")[0]

    def ref(text):  # independent word-level reference
        return [vocab[w] for w in re.findall(r"<<|>>|\d|[A-Za-z]+|\S", text)]

    ex = tokenize_record(syn, rec)
    assert set(ex) == {"question_ids", "steps", "answer_ids"}
    assert ex["question_ids"] == ref(rec.question) and vocab["<bos>"] not in ex["question_ids"]
    assert ex["steps"] == [ref(s) for s in rec.steps]
    assert ex["answer_ids"] == ref(rec.answer)
    p = prompt_ids(syn)
    assert syn.convert_ids_to_tokens(p) == ["The", "answer", "is", ":"]


def _bpe_dir(tmp_path, *, bos, eos, pad, extra=()):
    """A tiny byte-level BPE tokenizer (GPT-2 style pre-tokeniser) trained here, saved to tmp_path."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = [t for t in (bos, eos, pad, *extra) if t]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [f"{r.question} {' '.join(r.steps)} The answer is: {r.answer}" for r in generate(200, seed=1, style="nl")]
    tk.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos, pad_token=pad)
    fast.save_pretrained(str(tmp_path))
    return tmp_path, len(fast)


def test_load_tokenizer_adds_specials_to_bpe(tmp_path):
    path, n0 = _bpe_dir(tmp_path, bos="<s>", eos="</s>", pad=None)
    tok, sp, vsize = load_tokenizer(str(path))
    assert vsize == len(tok) == n0 + 3
    assert sorted([sp.bot, sp.eot, sp.latent]) == [n0, n0 + 1, n0 + 2]
    assert sp.bos == tok.convert_tokens_to_ids("<s>") == sp.start
    assert sp.pad == sp.eos == tok.convert_tokens_to_ids("</s>")  # pad falls back to eos
    for t in KAVA_SPECIAL_TOKENS:
        assert _enc(tok, t) == [tok.convert_tokens_to_ids(t)]
        assert t in tok.convert_ids_to_tokens(_enc(tok, f"x {t} y"))  # never split inside text
    # Spacing rule: the pieces concatenate to the tokenisation of the joined text.
    p = prompt_ids(tok)
    for r in generate(40, seed=7, style="nl") + generate(40, seed=7, style="equation") + [
        Record("Weng earns $12 an hour. How much?", ["Weng earns 12/60 = $0.2 per minute.", "0.2 x 50 = $10."], "10")
    ]:
        ex = tokenize_record(tok, r)
        joined = f"{r.question} {' '.join(r.steps)} The answer is: {r.answer}"
        flat = ex["question_ids"] + [t for s in ex["steps"] for t in s] + p + ex["answer_ids"]
        assert flat == _enc(tok, joined)
        assert tok.decode(flat) == joined


def test_load_tokenizer_without_bos_qwen_style(tmp_path):
    path, _ = _bpe_dir(tmp_path, bos=None, eos="<|im_end|>", pad=None, extra=("<|endoftext|>",))
    tok, sp, _ = load_tokenizer(path)
    assert sp.bos is None
    assert sp.start == tok.convert_tokens_to_ids("<|endoftext|>")
    assert sp.eos == sp.pad == tok.convert_tokens_to_ids("<|im_end|>")


def test_load_tokenizer_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="'nope-org/nope-tok': not a local directory"):
        load_tokenizer("nope-org/nope-tok")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no loadable tokenizer"):
        load_tokenizer(tmp_path / "empty")


def test_tokenize_records_counts_too_long(syn):
    recs = generate(60, seed=3, style="equation")
    exs, stats = tokenize_records(syn, recs, max_cot_len=14, chunk=16)
    # independent count: teacher CoT = all steps but the last, one token per char except "<<"/">>"
    cot = [sum(len(s) - 2 for s in r.steps[:-1]) for r in recs]
    keep = [i for i, c in enumerate(cot) if c <= 14]
    assert 0 < len(keep) < len(recs)
    assert stats.kept == len(exs) == len(keep) and stats.dropped["too_long"] == len(recs) - len(keep)
    assert exs == [tokenize_record(syn, recs[i]) for i in keep]
