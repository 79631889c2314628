"""Tokenizers: the offline synthetic word-level tokenizer, loading HF tokenizers with KaVa's special
tokens, and tokenising records into the pieces the batch builder needs (BATCH_LAYOUT.md).

Spacing rules (one convention for every tokenizer, documented here once):
  question_ids : tokens of `question.strip()`, no leading space, WITHOUT BOS (the builder adds it)
  steps[j]     : tokens of " " + step.strip()      (one leading space per step)
  prompt_ids   : tokens of " The answer is:"       (last token ":" is the distillation token)
  answer_ids   : tokens of " " + answer            (no prompt, no EOS)
Each piece starts with exactly one space and none ends with one, so for the usual byte-level BPE
pre-tokenisers (GPT-2 / Llama-3 / Qwen2 regexes, which start a new pre-token at every " word")
concatenating the pieces gives the same ids as tokenising the joined text
"question step_1 ... step_k The answer is: answer" in one call (tested). The synthetic tokenizer
ignores whitespace, so the rule is trivially consistent there too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from kava_jax.data import synthetic
from kava_jax.data.records import Record, RecordStats

__all__ = [
    "KAVA_SPECIAL_TOKENS",
    "PROMPT",
    "SpecialTokens",
    "TokenizerBundle",
    "build_synthetic_tokenizer",
    "load_tokenizer",
    "prompt_ids",
    "special_tokens",
    "tokenize_record",
    "tokenize_records",
]

PROMPT = " The answer is:"
KAVA_SPECIAL_TOKENS = ("<bot>", "<eot>", "<latent>")
SYNTHETIC_BASE_SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0..3 in this order


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special tokens the KaVa layouts use.

    bos: the tokenizer's own BOS id, or None when it has none (Qwen2/2.5 tokenizers).
    start: the id to put in the layout's BOS slot: `bos` when there is one; otherwise the
      tokenizer's "<|endoftext|>" (Qwen's document separator in pre-training, the natural start of
      a document for that model); otherwise `eos`. The batch builder should use `start`.
    eos, pad (= eos when the tokenizer had no pad token), bot, eot, latent.
    """

    bos: int | None
    start: int
    eos: int
    pad: int
    bot: int
    eot: int
    latent: int


class TokenizerBundle(NamedTuple):
    """What `load_tokenizer` returns: the tokenizer (with <bot>/<eot>/<latent> and a pad token),
    its special ids, and its vocabulary size len(tokenizer) after the additions (the embedding
    table needs at least this many rows)."""

    tokenizer: object
    specials: SpecialTokens
    vocab_size: int


def _words_from(records_or_vocab) -> list[str]:
    if records_or_vocab is None:
        return []
    words = set()
    for item in records_or_vocab:
        if isinstance(item, Record):
            for text in (item.question, *item.steps, item.answer):
                words.update(synthetic.split_words(text))
        elif isinstance(item, str):
            words.add(item)
        else:
            raise ValueError(
                f"build_synthetic_tokenizer: records_or_vocab items must be Record or str, got {type(item).__name__}"
            )
    return sorted(w for w in words if not w.isdigit())


def build_synthetic_tokenizer(records_or_vocab: Iterable[Record] | Iterable[str] | None = None,
                              save_dir: str | Path | None = None):
    """The word-level tokenizer of the synthetic task, built in code (offline, deterministic).

    Vocabulary (ids in this order): <pad> <bos> <eos> <unk>, the digits 0-9, then the sorted words and
    symbols of `synthetic.vocabulary()` (every word the generator's templates, names and nouns can
    emit, the equation symbols << >> = + - *, and the prompt "The answer is:"), plus any further
    words found in `records_or_vocab` (Records, or word strings); then the added special tokens
    <bot> <eot> <latent>. Pre-tokenisation drops whitespace, splits numbers into single digits and
    makes "<<", ">>" and every other symbol one token. No BOS/EOS is added by `tokenizer(text)`.

    Decoding joins tokens with single spaces and then removes the spaces between digits, after "<<",
    before ">>", around = + - * and before . , ? ! : ; -- so decode(encode(x)) == x for generator text
    (and canonical spacing for any other text).

    Returns a transformers fast tokenizer; with save_dir it is also saved there (save_pretrained),
    reloadable with AutoTokenizer.from_pretrained(save_dir, local_files_only=True).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for tok in (*SYNTHETIC_BASE_SPECIALS, *"0123456789", *synthetic.vocabulary(), *_words_from(records_or_vocab)):
        vocab.setdefault(tok, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(synthetic.WORD_PATTERN), behavior="isolated")]
    )
    backend.decoder = decoders.Sequence(
        [
            decoders.WordPiece(prefix="##", cleanup=False),  # joins tokens with one space
            decoders.Fuse(),
            decoders.Replace(Regex(r"(?<=\d) (?=\d)"), ""),
            decoders.Replace(Regex(r"(?<=<<) | (?=>>)"), ""),
            decoders.Replace(Regex(r" (?=[=+*\-])|(?<=[=+*\-]) "), ""),
            decoders.Replace(Regex(r" (?=[.,?!:;])"), ""),
        ]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
    tok.add_special_tokens({"extra_special_tokens": list(KAVA_SPECIAL_TOKENS)}, replace_extra_special_tokens=False)
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(save_dir))
    return tok


def _looks_like_path(s: str) -> bool:
    return s.startswith(("/", "./", "../", "~")) or s.endswith((".json", ".model"))


def special_tokens(tokenizer) -> SpecialTokens:
    """SpecialTokens of a tokenizer that already has <bot>/<eot>/<latent>, an eos and a pad."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in KAVA_SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"tokenizer lacks {missing}; load it with load_tokenizer() to add them")
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos token (eos_token is None); set one before use")
    bos = tokenizer.bos_token_id
    start = bos if bos is not None else vocab.get("<|endoftext|>", tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return SpecialTokens(
        bos=bos,
        start=int(start),
        eos=int(tokenizer.eos_token_id),
        pad=int(pad),
        bot=int(vocab["<bot>"]),
        eot=int(vocab["<eot>"]),
        latent=int(vocab["<latent>"]),
    )


def load_tokenizer(path_or_hub_id: str | Path, *, local_files_only: bool = True) -> TokenizerBundle:
    """AutoTokenizer (trust_remote_code=False) plus KaVa's special tokens.

    Adds "<bot>", "<eot>", "<latent>" as special tokens when missing (new ids at the end of the
    vocabulary) and sets pad = eos when the tokenizer has no pad token. Raises FileNotFoundError
    naming the path when it is neither a local tokenizer directory nor (with local_files_only) in the
    local Hugging Face cache.
    """
    from transformers import AutoTokenizer

    name = str(path_or_hub_id)
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise FileNotFoundError(f"tokenizer path {name!r} is a file; pass the directory holding tokenizer.json")
        name = str(p)
    elif _looks_like_path(name):
        raise FileNotFoundError(f"tokenizer directory {name!r} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=local_files_only, trust_remote_code=False)
    except (OSError, ValueError) as e:
        if p.exists():
            why = "the directory holds no loadable tokenizer files"
        elif local_files_only:
            why = "not a local directory and not in the local Hugging Face cache (local_files_only=True)"
        else:
            why = "could not be fetched from the Hugging Face Hub"
        raise FileNotFoundError(f"could not load tokenizer {name!r}: {why} ({type(e).__name__}: {e})") from e
    tok.add_special_tokens({"extra_special_tokens": list(KAVA_SPECIAL_TOKENS)}, replace_extra_special_tokens=False)
    if tok.eos_token is None:
        raise ValueError(f"tokenizer {name!r} has no eos token; KaVa needs one to end answers")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return TokenizerBundle(tok, special_tokens(tok), len(tok))


def _encode_many(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def prompt_ids(tokenizer) -> list[int]:
    """Tokens of " The answer is:" (no BOS/EOS); its last token is the distillation token."""
    return _encode_many(tokenizer, [PROMPT])[0]


def _pieces(record: Record) -> list[str]:
    return [record.question.strip(), *(" " + s.strip() for s in record.steps), " " + record.answer.strip()]


def _assemble(ids: list[list[int]], num_steps: int) -> dict:
    return {"question_ids": ids[0], "steps": ids[1 : 1 + num_steps], "answer_ids": ids[1 + num_steps]}


def tokenize_record(tokenizer, record: Record) -> dict:
    """{"question_ids": [...], "steps": [[...], ...], "answer_ids": [...]} (plain int lists) under the
    module's spacing rules: question without BOS, every step with one leading space, answer " N"."""
    return _assemble(_encode_many(tokenizer, _pieces(record)), len(record.steps))


def tokenize_records(
    tokenizer,
    records: Sequence[Record],
    *,
    max_question_len: int | None = None,
    max_cot_len: int | None = None,
    max_answer_len: int | None = None,
    chunk: int = 4096,
) -> tuple[list[dict], RecordStats]:
    """tokenize_record over many records (batched calls), dropping over-budget ones as "too_long".

    Budgets, when given: question tokens (without BOS) <= max_question_len; CoT tokens of the steps
    the teacher keeps (all but the last, METHOD §1) <= max_cot_len; answer tokens <= max_answer_len.
    Returns (kept examples, RecordStats) -- nothing is dropped silently.
    """
    stats = RecordStats(source="tokenize_records")
    out: list[dict] = []
    for lo in range(0, len(records), chunk):
        part = records[lo : lo + chunk]
        flat = _encode_many(tokenizer, [p for r in part for p in _pieces(r)])
        pos = 0
        for j, r in enumerate(part):
            n = len(r.steps) + 2
            ex = _assemble(flat[pos : pos + n], len(r.steps))
            pos += n
            stats.seen += 1
            cot = sum(len(s) for s in ex["steps"][:-1])
            if (
                (max_question_len is not None and len(ex["question_ids"]) > max_question_len)
                or (max_cot_len is not None and cot > max_cot_len)
                or (max_answer_len is not None and len(ex["answer_ids"]) > max_answer_len)
            ):
                stats.drop("too_long", lo + j)
                continue
            stats.kept += 1
            out.append(ex)
    return out, stats
