"""Evaluation over a list of items (METHOD §7): tokenise, batch at a static size, decode greedily,
extract answers, and report accuracy and efficiency. Library only (the kava-eval CLI builds on it).

Methods (all greedy, see `kava_jax.eval.decode`):
* "latent": `[start] question <bot>` -> M latents (latent_mode "jacobi" with T iterations, or
  "sequential") -> `<eot> " The answer is:"` -> answer, at most `max_answer_tokens` tokens (incl. EOS).
* "nocot": `[start] question " The answer is:"` -> answer, at most `max_answer_tokens` tokens.
* "cot": `[start] question` -> CoT + prompt + answer, at most
  `max_cot_tokens + len(prompt) + max_answer_tokens` tokens (max_cot_tokens is the CoT's own budget).

Question blocks follow BATCH_LAYOUT: `specials.start` + tokens of `question.strip()`, left-padded to
`q_len` (an over-long question raises ValueError naming the item, or with truncate=True keeps BOS +
its last q_len-1 tokens and is counted). The last batch is filled with padding rows (`[start]` only)
so every batch has the same shape and the decoder compiles once; padding rows are dropped from every
statistic.

Answers: the decoded text stops at EOS (special tokens skipped). latent / no-CoT: the last number of
the decoded answer (`metrics.extract_answer`). CoT: the last number of the text after the first
"The answer is:" when that text holds a number, else the last number of the whole text.

Timing: the first batch is run once as a warm-up and its wall time reported as `compile_seconds`
(compile + one batch); `seconds_per_question` is the wall time of the timed pass over all batches
(decode, device transfer, detokenisation, answer extraction) divided by the number of items.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from kava_jax.eval import decode as decode_lib
from kava_jax.eval.metrics import accuracy, answers_match, extract_answer

__all__ = ["METHODS", "ANSWER_MARKER", "EvalResult", "ItemPrediction", "evaluate", "extract_cot_answer",
           "question_blocks"]

METHODS = ("cot", "nocot", "latent")
ANSWER_MARKER = "The answer is:"
_SPECIAL_FIELDS = ("start", "eos", "pad", "bot", "eot", "latent")


@dataclasses.dataclass
class ItemPrediction:
    """One item's outcome: decoded text (up to EOS), extracted number, and its per-row counts."""

    index: int
    question: str
    gold: float
    text: str
    pred: float | None
    correct: bool
    num_generated: int
    forward_passes: int
    kv_bytes: int
    truncated: bool


@dataclasses.dataclass
class EvalResult:
    """accuracy is a fraction in [0, 1]; means are over the items (padding rows excluded)."""

    method: str
    num_items: int
    accuracy: float
    mean_forward_passes: float
    mean_generated_tokens: float
    mean_kv_bytes: float
    seconds_per_question: float
    compile_seconds: float
    total_seconds: float
    num_truncated: int
    settings: dict[str, Any]
    predictions: list[ItemPrediction]

    def summary(self) -> dict[str, Any]:
        """Every field except the per-item predictions (JSON-able)."""
        d = dataclasses.asdict(self)
        d.pop("predictions")
        return d


def extract_cot_answer(text: str) -> float | None:
    """The last number after the first "The answer is:" when there is one, else the last number."""
    head, marker, tail = text.partition(ANSWER_MARKER)
    if marker:
        v = extract_answer(tail)
        if v is not None:
            return v
    return extract_answer(text)


def question_blocks(token_lists: Sequence[Sequence[int]], *, q_len: int, start_id: int, pad_id: int,
                    truncate: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-padded question blocks `pad.. start q1..qn`: (ids int32 [N,q_len], valid bool [N,q_len],
    truncated bool [N]). Over-long questions raise ValueError unless truncate (keeps the end)."""
    if q_len < 1:
        raise ValueError(f"q_len must be >= 1 (room for the start token), got {q_len}")
    n = len(token_lists)
    ids = np.full((n, q_len), pad_id, np.int32)
    valid = np.zeros((n, q_len), bool)
    truncated = np.zeros((n,), bool)
    for i, toks in enumerate(token_lists):  # host-side, once per item
        toks = list(toks)
        if 1 + len(toks) > q_len:
            if not truncate:
                raise ValueError(f"item {i}: question has {len(toks)} tokens + start token > q_len={q_len} "
                                 "(raise q_len or pass truncate=True)")
            truncated[i] = True
            toks = toks[len(toks) - (q_len - 1):] if q_len > 1 else []
        row = [start_id, *toks]
        ids[i, q_len - len(row):] = row
        valid[i, q_len - len(row):] = True
    return ids, valid, truncated


def _specials(specials) -> dict[str, int]:
    out = {}
    for f in _SPECIAL_FIELDS:
        v = specials.get(f) if isinstance(specials, dict) else getattr(specials, f, None)
        if v is None:
            raise ValueError(f"specials.{f} is missing (need {_SPECIAL_FIELDS}, e.g. data.tokenizer.SpecialTokens)")
        out[f] = int(v)
    return out


def _item_fields(items) -> tuple[list[str], list[float]]:
    questions, golds = [], []
    for i, it in enumerate(items):
        q = it.get("question") if isinstance(it, dict) else getattr(it, "question", None)
        a = it.get("answer") if isinstance(it, dict) else getattr(it, "answer", None)
        if not isinstance(q, str):
            raise ValueError(f"item {i}: needs a string `question`, got {type(q).__name__}")
        try:
            golds.append(float(a))
        except (TypeError, ValueError):
            raise ValueError(f"item {i}: `answer` must be a number, got {a!r}") from None
        questions.append(q)
    return questions, golds


def evaluate(method: str, params, model_config, prj, tokenizer, specials, items, *, q_len: int,
             latent_mode: str = "jacobi", num_latents: int = 24, num_iterations: int = 3,
             prompt_ids: Sequence[int] | None = None, truncate: bool = False, batch_size: int = 16,
             max_answer_tokens: int = 16, max_cot_tokens: int = 128, progress: bool = True) -> EvalResult:
    """Greedy evaluation of `method` ∈ METHODS on `items` (objects or dicts with `question` str and
    numeric `answer`, e.g. data.evalsets.EvalItem).

    params: decoder params with LoRA / special rows merged (`kava.objective.model_params`); prj: the
    latent projection ({} when off; ignored unless method == "latent"); tokenizer: a transformers
    tokenizer; specials: data.tokenizer.SpecialTokens (start, eos, pad, bot, eot, latent);
    prompt_ids: tokens of " The answer is:" (default: data.tokenizer.prompt_ids(tokenizer)).
    Returns an EvalResult with per-item predictions.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_answer_tokens < 1 or max_cot_tokens < 0:
        raise ValueError(f"max_answer_tokens must be >= 1 and max_cot_tokens >= 0, got "
                         f"{max_answer_tokens}, {max_cot_tokens}")
    sp = _specials(specials)
    questions, golds = _item_fields(items)
    if not questions:
        raise ValueError("evaluate: no items")
    if prompt_ids is None:
        from kava_jax.data.tokenizer import prompt_ids as tokenizer_prompt_ids
        prompt_ids = tokenizer_prompt_ids(tokenizer)
    prompt_ids = tuple(int(t) for t in prompt_ids)

    tokens = tokenizer([q.strip() for q in questions], add_special_tokens=False)["input_ids"]
    q_ids, q_valid, truncated = question_blocks(tokens, q_len=q_len, start_id=sp["start"], pad_id=sp["pad"],
                                                truncate=truncate)
    n = len(questions)
    n_batches = -(-n // batch_size)
    fill = n_batches * batch_size - n
    if fill:  # padding rows: just the start token
        pad_ids, pad_valid, _ = question_blocks([[]] * fill, q_len=q_len, start_id=sp["start"], pad_id=sp["pad"])
        q_ids, q_valid = np.concatenate([q_ids, pad_ids]), np.concatenate([q_valid, pad_valid])

    if method == "latent":
        bot = np.full((q_ids.shape[0], 1), sp["bot"], np.int32)
        q_ids, q_valid = np.concatenate([q_ids, bot], 1), np.concatenate([q_valid, np.ones_like(bot, bool)], 1)

        def run(ids, valid):
            return decode_lib.latent_generate(
                params, model_config, prj, ids, valid, mode=latent_mode, num_latents=num_latents,
                num_iterations=num_iterations, latent_id=sp["latent"], eot_id=sp["eot"], prompt_ids=prompt_ids,
                eos_id=sp["eos"], pad_id=sp["pad"], max_new_tokens=max_answer_tokens)
    elif method == "nocot":
        def run(ids, valid):
            return decode_lib.nocot_generate(params, model_config, ids, valid, prompt_ids=prompt_ids,
                                             eos_id=sp["eos"], pad_id=sp["pad"], max_new_tokens=max_answer_tokens)
    else:
        cot_budget = max_cot_tokens + len(prompt_ids) + max_answer_tokens

        def run(ids, valid):
            return decode_lib.cot_generate(params, model_config, ids, valid, prompt_ids=prompt_ids,
                                           eos_id=sp["eos"], pad_id=sp["pad"], max_new_tokens=cot_budget)

    t0 = time.perf_counter()
    _fetch(run(q_ids[:batch_size], q_valid[:batch_size]))  # warm-up: compile + one batch
    compile_seconds = time.perf_counter() - t0

    extract = extract_cot_answer if method == "cot" else extract_answer
    preds: list[ItemPrediction] = []
    bar = _progress_bar(n, method, progress)
    t0 = time.perf_counter()
    for bi in range(n_batches):
        lo = bi * batch_size
        res = _fetch(run(q_ids[lo:lo + batch_size], q_valid[lo:lo + batch_size]))
        for r in range(min(batch_size, n - lo)):  # host-side detokenisation of the real rows
            i = lo + r
            cnt = int(res["num_generated"][r])
            gen = [int(t) for t in res["tokens"][r, :cnt]]
            if gen and gen[-1] == sp["eos"]:
                gen = gen[:-1]
            text = tokenizer.decode(gen, skip_special_tokens=True)
            pred = extract(text)
            preds.append(ItemPrediction(
                index=i, question=questions[i], gold=golds[i], text=text, pred=pred,
                correct=answers_match(pred, golds[i]), num_generated=cnt,
                forward_passes=int(res["forward_passes"][r]), kv_bytes=int(res["kv_bytes"][r]),
                truncated=bool(truncated[i])))
        bar.update(min(batch_size, n - lo))
    total = time.perf_counter() - t0
    bar.close()

    settings = dict(q_len=q_len, batch_size=batch_size, max_answer_tokens=max_answer_tokens,
                    prompt_ids=list(prompt_ids))
    if method == "latent":
        settings.update(latent_mode=latent_mode, num_latents=num_latents, num_iterations=num_iterations)
    if method == "cot":
        settings.update(max_cot_tokens=max_cot_tokens, max_new_tokens=cot_budget)
    return EvalResult(
        method=method, num_items=n, accuracy=accuracy([p.pred for p in preds], golds),
        mean_forward_passes=float(np.mean([p.forward_passes for p in preds])),
        mean_generated_tokens=float(np.mean([p.num_generated for p in preds])),
        mean_kv_bytes=float(np.mean([p.kv_bytes for p in preds])),
        seconds_per_question=total / n, compile_seconds=compile_seconds, total_seconds=total,
        num_truncated=int(truncated.sum()), settings=settings, predictions=preds)


def _fetch(res: decode_lib.DecodeResult) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in res._asdict().items()}


def _progress_bar(total: int, method: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"eval {method}", unit="q", disable=not enabled)
