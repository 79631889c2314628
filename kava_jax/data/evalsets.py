"""Evaluation sets as `EvalItem(question, answer: float)` lists (METHOD §7).

| name       | local default (under the shared data dir) | question field(s) / answer field(s)          |
|------------|--------------------------------------------|----------------------------------------------|
| gsm8k      | gsm8k/test.jsonl (1,319)                   | question / answer ("... #### N" or a number) |
| gsm_hard   | ood/gsmhardv2.jsonl (1,319)                | input, instruction, question /               |
|            |                                            |   target, response, answer                   |
| svamp      | ood/svamp.jsonl (1,000)                    | input, question_concat, Body + Question /    |
|            |                                            |   target, Answer                             |
| multiarith | ood/mawpsmultiarith.jsonl (600)            | input, question, sQuestion /                 |
|            |                                            |   target, final_ans, lSolutions              |
| synthetic  | none: pass make_synthetic_splits' test JSONL (any load_records schema)                    |

The first field present wins (PAL's format first, then the Hub copies' names).
The shared data dir is $KAVA_DATA_DIR when set, else `<repo>/../shared/data`. Without a local
file the Hub copy is tried (openai/gsm8k "main" test, reasoning-machines/gsm-hard train,
ChilleD/SVAMP test, ChilleD/MultiArith test), which fails fast offline with a DataError.

Answers: a number, or a string read with `parse_answer_number` (handles "#### N", "$", commas);
a free-text answer (e.g. a GSM-Hard "response") falls back to its last number. An item without a
question or a numeric answer raises DataError naming the source and index: evaluation sets are
never silently shortened.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

from kava_jax.data.loaders import iter_rows, load_records
from kava_jax.data.records import DataError, parse_answer_number
from kava_jax.eval.metrics import extract_answer

__all__ = [
    "EVAL_SETS",
    "EvalItem",
    "default_data_dir",
    "load_eval_set",
    "load_gsm8k_test",
    "load_gsm_hard",
    "load_multiarith",
    "load_svamp",
    "load_synthetic_test",
]


@dataclasses.dataclass(frozen=True)
class EvalItem:
    question: str
    answer: float


def default_data_dir() -> Path:
    """$KAVA_DATA_DIR, else <repo root>/../shared/data (may not exist)."""
    env = os.environ.get("KAVA_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _first(row: dict, keys: tuple[str, ...]):
    for k in keys:
        if row.get(k) is not None:
            return k, row[k]
    return None, None


def _answer_value(raw) -> float | None:
    if isinstance(raw, (list, tuple)):  # MAWPS lSolutions: [value]
        raw = raw[0] if len(raw) == 1 else None
    v = parse_answer_number(raw)
    if v is None and isinstance(raw, str):
        v = extract_answer(raw.rsplit("####", 1)[-1])
    return v


def _items(rows, desc: str, question_of: Callable[[dict], str | None], answer_keys: tuple[str, ...],
           limit: int | None) -> list[EvalItem]:
    out = []
    for i, row in enumerate(rows):
        if limit is not None and len(out) >= limit:
            break
        if not isinstance(row, dict):
            raise DataError(f"{desc}: item {i}: not a JSON object ({row!r:.80})")
        q = question_of(row)
        if not isinstance(q, str) or not q.strip():
            raise DataError(f"{desc}: item {i}: no question text (fields {sorted(row)})")
        key, raw = _first(row, answer_keys)
        if key is None:
            raise DataError(f"{desc}: item {i}: no answer field (need one of {answer_keys}; has {sorted(row)})")
        v = _answer_value(raw)
        if v is None:
            raise DataError(f"{desc}: item {i}: answer field {key!r}={str(raw)[:60]!r} is not a number")
        out.append(EvalItem(question=" ".join(q.split()), answer=v))
    return out


def _field(*keys: str) -> Callable[[dict], str | None]:
    def get(row: dict):
        return _first(row, keys)[1]

    return get


def _svamp_question(row: dict) -> str | None:
    q = _first(row, ("input", "question_concat"))[1]
    if q is not None:
        return q
    body, question = row.get("Body"), row.get("Question")
    if not isinstance(question, str):
        return None
    body = body.strip() if isinstance(body, str) else ""
    if body and body[-1] not in ".!?,":
        body += "."  # Hub SVAMP bodies usually lack the final period (PAL's input has it)
    return f"{body} {question.strip()}".strip()


def _rows(source, split: str, hub_config: str | None):
    return iter_rows(source, split=split, hub_config=hub_config)


def load_gsm8k_test(source, *, split: str = "test", hub_config: str | None = None, limit=None) -> list[EvalItem]:
    rows, desc = _rows(source, split, hub_config)
    return _items(rows, desc, _field("question", "input"), ("answer", "target"), limit)


def load_gsm_hard(source, *, split: str = "train", hub_config: str | None = None, limit=None) -> list[EvalItem]:
    rows, desc = _rows(source, split, hub_config)
    return _items(rows, desc, _field("input", "instruction", "question"), ("target", "response", "answer"), limit)


def load_svamp(source, *, split: str = "test", hub_config: str | None = None, limit=None) -> list[EvalItem]:
    rows, desc = _rows(source, split, hub_config)
    return _items(rows, desc, _svamp_question, ("target", "Answer", "answer"), limit)


def load_multiarith(source, *, split: str = "test", hub_config: str | None = None, limit=None) -> list[EvalItem]:
    rows, desc = _rows(source, split, hub_config)
    return _items(
        rows, desc, _field("input", "question", "sQuestion"), ("target", "final_ans", "lSolutions", "answer"), limit
    )


def load_synthetic_test(source, *, split: str = "test", hub_config: str | None = None, limit=None) -> list[EvalItem]:
    """The synthetic test split (any load_records schema); strict: a bad record raises."""
    recs, _ = load_records(source, split=split, strict=True, max_records=limit, hub_config=hub_config)
    return [EvalItem(r.question, r.value) for r in recs]


@dataclasses.dataclass(frozen=True)
class EvalSetSpec:
    loader: Callable[..., list[EvalItem]]
    local: str | None  # path under default_data_dir()
    hub: tuple[str, str | None, str] | None  # (name, config, split)


EVAL_SETS: dict[str, EvalSetSpec] = {
    "gsm8k": EvalSetSpec(load_gsm8k_test, "gsm8k/test.jsonl", ("openai/gsm8k", "main", "test")),
    "gsm_hard": EvalSetSpec(load_gsm_hard, "ood/gsmhardv2.jsonl", ("reasoning-machines/gsm-hard", None, "train")),
    "svamp": EvalSetSpec(load_svamp, "ood/svamp.jsonl", ("ChilleD/SVAMP", None, "test")),
    "multiarith": EvalSetSpec(load_multiarith, "ood/mawpsmultiarith.jsonl", ("ChilleD/MultiArith", None, "test")),
    "synthetic": EvalSetSpec(load_synthetic_test, None, None),
}


def load_eval_set(name: str, source=None, limit: int | None = None, *, split: str | None = None,
                  hub_config: str | None = None) -> list[EvalItem]:
    """Items of eval set `name` (a key of EVAL_SETS) from `source` (file, directory or Hub name) or,
    when source is None, from the local default under default_data_dir(), else the Hub copy.
    limit keeps the first `limit` items. split (and hub_config) default to the Hub copy's when the
    source is that copy's name, else split "test" (a directory's test file; ignored for a file)."""
    if name not in EVAL_SETS:
        raise ValueError(f"unknown eval set {name!r}; known: {sorted(EVAL_SETS)}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    spec = EVAL_SETS[name]
    kw = {"limit": limit}
    if source is None:
        local = default_data_dir() / spec.local if spec.local else None
        if local is not None and local.is_file():
            source = local
        elif spec.hub is not None:
            source, cfg, hub_split = spec.hub
            kw.update(hub_config=hub_config or cfg, split=split or hub_split)
        else:
            raise DataError(f"eval set {name!r} has no default source; pass source= (e.g. the synthetic test JSONL)")
    if "split" not in kw:
        hub_default = spec.hub is not None and str(source) == spec.hub[0]
        kw.update(
            split=split or (spec.hub[2] if hub_default else "test"),
            hub_config=hub_config or (spec.hub[1] if hub_default else None),
        )
    return spec.loader(source, **kw)
