"""Records -> tokenised examples -> fixed-shape numpy batches, with a resumable, host-sliced iterator.

    records ──tokenize_examples──> ExampleSet (over-long records counted per reason and skipped)
            ──BatchIterator──────> {BATCH_KEYS: np.ndarray [B_local, ...]} (kava.batch.build_batch)
            ──to_global──────────> {BATCH_KEYS: jax.Array [B, ...]} sharded over the mesh

Length budgets (LayoutSpec Q, C, R; BATCH_LAYOUT.md): a record is over-long when
  question: 1 (BOS) + question tokens > Q           reason "too_long_question"
  CoT:      tokens of all steps but the last > C     reason "too_long_cot"
  answer:   prompt + answer tokens + 1 (EOS) > R     reason "too_long_answer"
Over-long records are skipped and counted (RecordStats), or raise DataError naming the record
with `strict=True`. With `spec.truncate` (config.data.truncate) an over-long question / CoT is kept
and truncated by the batch builder instead (counted as truncated); an over-long answer is always
skipped (or raises), never cut.

Order: epoch e visits the examples in `np.random.default_rng([seed, e]).permutation(n)`; batch i of
the epoch is positions [i·B, (i+1)·B) of that order; the last n mod B examples of each epoch's order
are not used that epoch (every epoch reshuffles, so no example is left out for good; the count is in
the summary). So the whole stream is a pure function of (seed, n, B), and the iterator state
{"epoch", "position"} (position = batches already taken in that epoch) restores it exactly.

Multi-host: every host holds the same examples and computes the same global order; host p builds
only its rows of each global batch (`rows`, by default the p-th of process_count equal contiguous
parts, or the range its devices hold in a batch sharding: `host_rows`), and `to_global` assembles
the global arrays with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from kava_jax.data.records import DataError, Record, RecordStats
from kava_jax.kava.batch import LayoutSpec, TokenizedExample, TruncationStats, build_batch

log = logging.getLogger(__name__)

__all__ = [
    "LENGTH_REASONS",
    "BatchIterator",
    "ExampleSet",
    "abstract_batch",
    "epoch_order",
    "host_rows",
    "to_global",
    "tokenize_examples",
]

LENGTH_REASONS = ("too_long_question", "too_long_cot", "too_long_answer")


# ------------------------------------------------------------------------------------ examples
@dataclasses.dataclass
class ExampleSet:
    """Tokenised examples ready for batching, with what happened to every record.

    examples: kept TokenizedExamples (question without BOS, all steps, answer without prompt/EOS).
    stats: RecordStats of the tokenisation (seen / kept / dropped per LENGTH_REASONS).
    truncated: {"question": n, "cot": n} records kept but to be truncated by the builder (spec.truncate).
    lengths: {"question", "cot", "answer"} int arrays [len(examples)]: block lengths of the kept
      examples before truncation (question incl. BOS; CoT without the last step; answer block incl.
      prompt and EOS).
    """

    examples: list[TokenizedExample]
    stats: RecordStats
    truncated: dict[str, int]
    lengths: dict[str, np.ndarray]
    spec: LayoutSpec

    def __len__(self) -> int:
        return len(self.examples)

    def summary(self) -> str:
        """Readable multi-line summary: record counts, drops per reason, truncations, block lengths."""
        s = self.spec
        lines = [self.stats.summary()]
        if any(self.truncated.values()):
            lines.append(f"truncated (data.truncate): question {self.truncated['question']}, "
                         f"cot {self.truncated['cot']}")
        if len(self.examples):
            for name, cap in (("question", s.q_len), ("cot", s.cot_len), ("answer", s.answer_len)):
                v = self.lengths[name]
                lines.append(f"{name:8s} block: mean {v.mean():.1f}, p95 {np.percentile(v, 95):.0f}, "
                             f"max {v.max()} tokens (bucket {cap})")
        return "\n".join(lines)


def _tokenize_all(tokenizer, records: Sequence[Record]) -> list[dict]:
    from kava_jax.data.tokenizer import tokenize_records

    out, _ = tokenize_records(tokenizer, list(records))
    return out


def tokenize_examples(records: Sequence[Record], tokenizer, spec: LayoutSpec, *, strict: bool = False,
                      source: str = "") -> ExampleSet:
    """Tokenise records (kava_jax.data.tokenizer rules) and keep those that fit `spec`'s buckets.

    Over-long records are counted per reason (LENGTH_REASONS) and skipped; with strict=True the
    first one raises DataError naming the source, record index, part and lengths. With
    spec.truncate, over-long questions / CoTs are kept (counted in `truncated`).
    """
    if len(spec.prompt_ids) + 1 > spec.answer_len:
        raise ValueError(f"data.answer_len={spec.answer_len} cannot hold the prompt ({len(spec.prompt_ids)} tokens) "
                         "+ EOS")
    toks = _tokenize_all(tokenizer, records)
    stats = RecordStats(source=source or "tokenize_examples")
    truncated = {"question": 0, "cot": 0}
    kept: list[TokenizedExample] = []
    lens: dict[str, list[int]] = {"question": [], "cot": [], "answer": []}
    n_prompt = len(spec.prompt_ids)
    for i, t in enumerate(toks):
        stats.seen += 1
        q = 1 + len(t["question_ids"])
        c = sum(len(st) for st in t["steps"][:-1])
        a = n_prompt + len(t["answer_ids"]) + 1
        problems = []
        if a > spec.answer_len:
            problems.append(("too_long_answer", f"answer block {a} tokens (prompt {n_prompt} + answer "
                                                f"{a - n_prompt - 1} + EOS) > data.answer_len={spec.answer_len}"))
        if q > spec.q_len and not spec.truncate:
            problems.append(("too_long_question", f"question {q} tokens (incl. BOS) > data.q_len={spec.q_len}"))
        if c > spec.cot_len and not spec.truncate:
            problems.append(("too_long_cot", f"CoT {c} tokens (all steps but the last) > data.cot_len="
                                             f"{spec.cot_len}"))
        if problems:
            if strict:
                detail = "; ".join(f"{r}: {d}" for r, d in problems)
                raise DataError(f"{stats.source}: record {i}: {detail} (data.strict=True; raise the bucket, set "
                                "data.truncate=True, or unset data.strict to skip such records)")
            stats.drop(problems[0][0], i)
            continue
        truncated["question"] += q > spec.q_len
        truncated["cot"] += c > spec.cot_len
        stats.kept += 1
        kept.append(TokenizedExample(t["question_ids"], t["steps"], t["answer_ids"]))
        for k, v in (("question", q), ("cot", c), ("answer", a)):
            lens[k].append(v)
    lengths = {k: np.asarray(v, np.int64) for k, v in lens.items()}
    return ExampleSet(kept, stats, truncated, lengths, spec)


# ------------------------------------------------------------------------------------ iterator
def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The visiting order of epoch `epoch`: a permutation of range(n), a pure function of (seed, epoch, n)."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def abstract_batch(spec: LayoutSpec, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of a batch of `batch_size` rows (what the train step is compiled for)."""
    dummy, _ = build_batch([], spec, batch_size=batch_size)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in dummy.items()}


def host_rows(sharding: jax.sharding.Sharding, global_batch_size: int, ndim: int = 1) -> tuple[int, int]:
    """[lo, hi): the rows of a global batch array that this process's devices hold under `sharding`
    (the slice the host must build). Raises if they are not one contiguous range."""
    shape = (global_batch_size,) + (1,) * (ndim - 1)
    spans = set()
    for idx in sharding.addressable_devices_indices_map(shape).values():
        s = idx[0] if idx else slice(None)
        lo, hi, _ = s.indices(global_batch_size)
        spans.add((lo, hi))
    spans = sorted(spans)
    lo, hi = spans[0][0], spans[0][1]
    for a, b in spans[1:]:
        if a > hi:
            raise ValueError(f"host_rows: this process's batch rows {spans} are not contiguous; "
                             "use a mesh whose batch axes keep each host's devices together")
        hi = max(hi, b)
    return lo, hi


class BatchIterator:
    """Endless iterator of fixed-shape numpy batches over epochs of shuffled examples.

    Args:
      examples: the kept examples (ExampleSet or a list of TokenizedExample), identical on every host.
      spec: LayoutSpec of the batches.
      global_batch_size: B, rows of the global batch.
      seed: shuffling seed (config.seed).
      process_index, process_count: this host among the hosts (default: jax's); host p builds
        rows [p·B/P, (p+1)·B/P) unless `rows` says otherwise.
      rows: explicit [lo, hi) rows of each global batch this host builds (see `host_rows`).
      state: an iterator state from `state()` to resume from.
    Each `next()` returns {BATCH_KEYS: np.ndarray [hi - lo, ...]}; `truncation` accumulates the
    builder's TruncationStats.
    """

    def __init__(self, examples: ExampleSet | Sequence[TokenizedExample], spec: LayoutSpec, global_batch_size: int,
                 *, seed: int, process_index: int | None = None, process_count: int | None = None,
                 rows: tuple[int, int] | None = None, state: Mapping[str, Any] | None = None):
        self.examples = list(examples.examples if isinstance(examples, ExampleSet) else examples)
        self.spec = spec
        self.batch_size = int(global_batch_size)
        self.seed = int(seed)
        n = len(self.examples)
        if self.batch_size < 1:
            raise ValueError(f"train.batch_size must be >= 1, got {self.batch_size}")
        if n < self.batch_size:
            raise ValueError(f"only {n} usable training examples, fewer than train.batch_size={self.batch_size} "
                             "(batches are never padded with repeats; use more data or a smaller batch)")
        self.steps_per_epoch = n // self.batch_size
        self.unused_per_epoch = n - self.steps_per_epoch * self.batch_size
        pi = jax.process_index() if process_index is None else int(process_index)
        pc = jax.process_count() if process_count is None else int(process_count)
        if rows is None:
            if self.batch_size % pc:
                raise ValueError(f"train.batch_size={self.batch_size} is not divisible by the {pc} hosts")
            per = self.batch_size // pc
            rows = (pi * per, (pi + 1) * per)
        lo, hi = (int(r) for r in rows)
        if not 0 <= lo < hi <= self.batch_size:
            raise ValueError(f"rows {rows} is not a non-empty range inside the global batch of {self.batch_size}")
        self.rows = (lo, hi)
        self.epoch = 0
        self.position = 0
        self.truncation = TruncationStats()
        self._order_epoch = -1
        self._order = np.zeros(0, np.int64)
        if state is not None:
            self.restore(state)

    # -------------------------------------------------------------------------- state
    def state(self) -> dict[str, int]:
        """JSON-able position: {"epoch", "position"} plus what must match on restore
        ({"seed", "num_examples", "global_batch_size"})."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_examples": len(self.examples), "global_batch_size": self.batch_size}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where `state` (from `state()`) stopped. Raises ValueError if the data,
        seed or batch size differ from the saved ones (the stream would not be the same)."""
        for key, mine in (("seed", self.seed), ("num_examples", len(self.examples)),
                          ("global_batch_size", self.batch_size)):
            if key in state and int(state[key]) != mine:
                raise ValueError(f"data iterator state has {key}={state[key]} but this run has {mine}; the "
                                 "saved data order cannot be resumed (did the data or config change?)")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.steps_per_epoch:
            raise ValueError(f"data iterator state epoch={epoch} position={position} is out of range "
                             f"(steps per epoch: {self.steps_per_epoch})")
        self.epoch, self.position = epoch, position

    # -------------------------------------------------------------------------- batches
    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            self._order = epoch_order(self.seed, self.epoch, len(self.examples))
            self._order_epoch = self.epoch
        return self._order

    def global_indices(self) -> np.ndarray:
        """Example indices [B] of the next global batch (does not advance)."""
        if self.position >= self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position * self.batch_size
        return self._epoch_order()[start:start + self.batch_size]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        idx = self.global_indices()
        lo, hi = self.rows
        batch, stats = build_batch([self.examples[i] for i in idx[lo:hi]], self.spec)
        self.truncation = self.truncation + stats
        self.position += 1
        return batch

    def abstract(self) -> dict[str, jax.ShapeDtypeStruct]:
        """ShapeDtypeStructs of the GLOBAL batch."""
        return abstract_batch(self.spec, self.batch_size)


def to_global(batch: Mapping[str, np.ndarray], shardings: Mapping[str, jax.sharding.Sharding],
              global_batch_size: int | None = None) -> dict[str, jax.Array]:
    """Global jax.Arrays from this host's rows of a batch.

    batch: {key: [B_local, ...]} (this host's rows); shardings: {key: Sharding} of the global arrays;
    global_batch_size: B (default: B_local x process_count).
    """
    missing = [k for k in batch if k not in shardings]
    if missing:
        raise ValueError(f"to_global: no sharding for batch keys {missing}")
    out = {}
    for k, v in batch.items():
        b = v.shape[0] * jax.process_count() if global_batch_size is None else int(global_batch_size)
        out[k] = jax.make_array_from_process_local_data(shardings[k], np.asarray(v), (b,) + tuple(v.shape[1:]))
    return out

