"""Fixed-shape KaVa batches from tokenised examples (the contract of notes/BATCH_LAYOUT.md).

Host-side numpy code: it runs once per batch before anything is jitted, so plain Python over the
examples is fine here. Every array is int32 or bool with static bucket sizes
Q (question block), C (CoT block), R (answer block):

  question block [Q]  LEFT-padded:  pad.. BOS q1..qn
  cot block      [C]  RIGHT-padded: step_1 .. step_{k-1} pad..     (the last step is dropped)
  answer block   [R]  RIGHT-padded: prompt.. answer.. EOS pad..

Arrays of `build_batch` (B rows, S_t = Q + C + R):
  teacher_ids, teacher_valid, teacher_targets, teacher_loss_mask      [B, S_t]
  teacher_distill_idx                                                 [B]   = Q + C + len(prompt) - 1
  student_prefix_ids, student_prefix_valid                            [B, Q+1] question block ++ <bot>
  student_answer_ids, student_answer_valid                            [B, 1+R] <eot> ++ answer block
  student_answer_targets, student_answer_loss_mask                    [B, 1+R]
  student_distill_idx                                                 [B]   = len(prompt)
  nocot_valid, nocot_targets, nocot_loss_mask                         [B, S_t] CoT block masked out
  cot_valid [B, C], answer_valid [B, R], example_valid [B],
  question_len [B] (valid question-block tokens incl. BOS), cot_len [B] (valid CoT tokens)

Targets are explicit: at a valid position p the target is the id of the next VALID position
(pad holes are skipped); at invalid positions and at the last valid position it is `pad_id`.
Loss masks: teacher / no-CoT = valid positions from the last question token up to the token before
EOS; student answer = valid positions from <eot> up to the token before EOS.

Padding rows (when `batch_size` exceeds the number of examples) are dummy rows that keep every
sequence non-empty (question block = [BOS], empty CoT, answer block = prompt ++ EOS) so attention
never sees a row without valid keys, with example_valid False and every loss mask False.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "LayoutSpec",
    "TokenizedExample",
    "TruncationStats",
    "build_batch",
    "layout_positions",
    "next_valid_targets",
    "describe_batch",
    "BATCH_KEYS",
]

BATCH_KEYS = (
    "teacher_ids",
    "teacher_valid",
    "teacher_targets",
    "teacher_loss_mask",
    "teacher_distill_idx",
    "student_prefix_ids",
    "student_prefix_valid",
    "student_answer_ids",
    "student_answer_valid",
    "student_answer_targets",
    "student_answer_loss_mask",
    "student_distill_idx",
    "nocot_valid",
    "nocot_targets",
    "nocot_loss_mask",
    "cot_valid",
    "answer_valid",
    "example_valid",
    "question_len",
    "cot_len",
)


@dataclasses.dataclass(frozen=True)
class LayoutSpec:
    """Static bucket sizes and special ids of a batch.

    q_len: Q, question block incl. BOS. cot_len: C. answer_len: R, must hold prompt + answer + EOS.
    num_latents: M (not used by the arrays here; kept so one object describes the whole layout).
    prompt_ids: tokens of " The answer is:" (its last token is the distillation token).
    truncate: False -> an over-long question or CoT raises ValueError; True -> it is truncated
      (question keeps BOS + its END, CoT keeps its START) and counted in TruncationStats.
      The answer block is never truncated.
    """

    q_len: int
    cot_len: int
    answer_len: int
    num_latents: int
    prompt_ids: tuple[int, ...]
    bos_id: int
    eos_id: int
    pad_id: int
    bot_id: int
    eot_id: int
    latent_id: int
    truncate: bool = False

    def __post_init__(self):
        object.__setattr__(self, "prompt_ids", tuple(int(t) for t in self.prompt_ids))
        if self.q_len < 1:
            raise ValueError(f"LayoutSpec.q_len must be >= 1 (room for BOS), got {self.q_len}")
        if self.cot_len < 0:
            raise ValueError(f"LayoutSpec.cot_len must be >= 0, got {self.cot_len}")
        if self.num_latents < 1:
            raise ValueError(f"LayoutSpec.num_latents must be >= 1, got {self.num_latents}")
        if not self.prompt_ids:
            raise ValueError("LayoutSpec.prompt_ids must be non-empty (its last token is the distill token)")
        if self.answer_len < len(self.prompt_ids) + 1:
            raise ValueError(
                f"LayoutSpec.answer_len={self.answer_len} cannot hold the prompt "
                f"({len(self.prompt_ids)} tokens) + EOS"
            )
        for name in ("bos_id", "eos_id", "pad_id", "bot_id", "eot_id", "latent_id"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"LayoutSpec.{name} must be a non-negative int, got {v!r}")
        if any(t < 0 for t in self.prompt_ids):
            raise ValueError(f"LayoutSpec.prompt_ids must be non-negative, got {self.prompt_ids}")
        if len({self.bot_id, self.eot_id, self.latent_id}) != 3:
            raise ValueError(
                f"LayoutSpec.bot_id, eot_id, latent_id must be distinct, got "
                f"{self.bot_id}, {self.eot_id}, {self.latent_id}"
            )

    @property
    def teacher_len(self) -> int:
        return self.q_len + self.cot_len + self.answer_len

    @property
    def teacher_distill_idx(self) -> int:
        return self.q_len + self.cot_len + len(self.prompt_ids) - 1

    @property
    def student_distill_idx(self) -> int:
        return len(self.prompt_ids)


@dataclasses.dataclass
class TokenizedExample:
    """One tokenised record. question_ids WITHOUT BOS (the builder adds it); steps = CoT steps
    (all of them: the builder drops the last); answer_ids WITHOUT prompt and EOS."""

    question_ids: list[int]
    steps: list[list[int]]
    answer_ids: list[int]


@dataclasses.dataclass
class TruncationStats:
    """How many examples had a part truncated (only with LayoutSpec.truncate=True), and how many
    tokens were dropped. Add two with `+` to accumulate over batches."""

    question: int = 0
    cot: int = 0
    question_tokens_dropped: int = 0
    cot_tokens_dropped: int = 0

    @property
    def total(self) -> int:
        return self.question + self.cot

    def __add__(self, other: TruncationStats) -> TruncationStats:
        pairs = zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)
        return TruncationStats(*(a + b for a, b in pairs))


def layout_positions(valid):
    """RoPE positions for a sequence with pad holes: cumsum(valid) - 1 clipped at 0.

    valid: [B, S] bool (numpy or jax array; a jax array in gives a jax array out). Returns int32
    [B, S]; invalid positions get the position of the previous valid one (0 before the first).
    """
    xp = jnp if isinstance(valid, jax.Array) else np
    pos = xp.cumsum(xp.asarray(valid).astype(xp.int32), axis=-1) - 1
    return xp.maximum(pos, 0).astype(xp.int32)


def next_valid_targets(ids: np.ndarray, valid: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Next-valid-token targets.

    ids, valid: [B, S]. Returns (targets int32 [B, S], has_next bool [B, S]); has_next[b, p] is True
    iff p is valid and some later position is valid; targets are that later token's id there and
    pad_id elsewhere.
    """
    ids = np.asarray(ids)
    valid = np.asarray(valid, bool)
    B, S = ids.shape
    idx = np.where(valid, np.arange(S)[None, :], S)
    # nxt[b, p] = min index q > p with valid[b, q], or S.
    suffix_min = np.minimum.accumulate(idx[:, ::-1], axis=1)[:, ::-1]
    nxt = np.concatenate([suffix_min[:, 1:], np.full((B, 1), S)], axis=1)
    has_next = valid & (nxt < S)
    gathered = np.take_along_axis(ids, np.minimum(nxt, S - 1), axis=1)
    targets = np.where(has_next, gathered, pad_id).astype(np.int32)
    return targets, has_next


def _as_ids(i: int, name: str, seq) -> list[int]:
    try:
        out = [int(t) for t in seq]
        ok = all(isinstance(t, (int, np.integer)) for t in seq)
    except (TypeError, ValueError):
        ok = False
    if not ok or any(t < 0 for t in out):
        raise ValueError(f"example {i}: {name} must be a sequence of non-negative ints, got {seq!r}")
    return out


def _blocks(i: int, ex: TokenizedExample, spec: LayoutSpec, stats: TruncationStats):
    """Token lists (question incl. BOS, cot, answer block) of example i after checks/truncation."""
    Q, C, R = spec.q_len, spec.cot_len, spec.answer_len
    q = _as_ids(i, "question_ids", ex.question_ids)
    if q and q[0] == spec.bos_id:
        raise ValueError(f"example {i}: question_ids starts with bos_id={spec.bos_id}; pass it without BOS")
    steps = list(ex.steps)
    kept = steps[:-1]  # METHOD §1: drop the last CoT step
    cot = [t for k, st in enumerate(kept) for t in _as_ids(i, f"steps[{k}]", st)]
    if steps:
        _as_ids(i, f"steps[{len(steps) - 1}]", steps[-1])
    ans = spec.prompt_ids + tuple(_as_ids(i, "answer_ids", ex.answer_ids)) + (spec.eos_id,)

    if len(ans) > R:
        raise ValueError(
            f"example {i}: answer block too long: prompt {len(spec.prompt_ids)} + answer "
            f"{len(ex.answer_ids)} + EOS 1 = {len(ans)} tokens > answer_len={R} "
            "(the answer block is never truncated; raise answer_len)"
        )
    if 1 + len(q) > Q:
        if not spec.truncate:
            raise ValueError(
                f"example {i}: question too long: BOS + {len(q)} question tokens = {1 + len(q)} > "
                f"q_len={Q} (raise q_len or set LayoutSpec.truncate=True to keep its last {Q - 1} tokens)"
            )
        stats.question += 1
        stats.question_tokens_dropped += 1 + len(q) - Q
        q = q[len(q) - (Q - 1):] if Q > 1 else []
    if len(cot) > C:
        if not spec.truncate:
            raise ValueError(
                f"example {i}: cot too long: {len(cot)} tokens in {len(kept)} kept steps (last step "
                f"dropped) > cot_len={C} (raise cot_len or set LayoutSpec.truncate=True to keep the "
                f"first {C} tokens)"
            )
        stats.cot += 1
        stats.cot_tokens_dropped += len(cot) - C
        cot = cot[:C]
    return [spec.bos_id] + q, cot, list(ans)


def build_batch(
    examples: Sequence[TokenizedExample], spec: LayoutSpec, *, batch_size: int | None = None
) -> tuple[dict[str, np.ndarray], TruncationStats]:
    """Build the fixed-shape batch of BATCH_LAYOUT.md (see the module docstring for every array).

    Args:
      examples: tokenised examples (question without BOS, all CoT steps, answer without prompt/EOS).
      spec: bucket sizes and special ids.
      batch_size: number of rows B (default len(examples)); extra rows are dummy padding rows with
        example_valid False and all loss masks False.
    Returns:
      (batch dict of numpy arrays keyed by BATCH_KEYS, TruncationStats of this batch).
    Raises:
      ValueError naming the example index, part and lengths for an over-long part (unless
      spec.truncate allows it; never for the answer block) and for malformed ids.
    """
    n = len(examples)
    B = n if batch_size is None else int(batch_size)
    if B < 1:
        raise ValueError(f"build_batch needs at least one row: got {n} examples, batch_size={batch_size}")
    if n > B:
        raise ValueError(f"build_batch got {n} examples for batch_size={B}")
    Q, C, R = spec.q_len, spec.cot_len, spec.answer_len
    pad = spec.pad_id
    stats = TruncationStats()

    q_ids = np.full((B, Q), pad, np.int32)
    q_valid = np.zeros((B, Q), bool)
    c_ids = np.full((B, C), pad, np.int32)
    c_valid = np.zeros((B, C), bool)
    a_ids = np.full((B, R), pad, np.int32)
    a_valid = np.zeros((B, R), bool)
    example_valid = np.arange(B) < n

    for b in range(B):
        if b < n:
            q, cot, ans = _blocks(b, examples[b], spec, stats)
        else:
            q, cot, ans = [spec.bos_id], [], [*spec.prompt_ids, spec.eos_id]
        q_ids[b, Q - len(q):] = q
        q_valid[b, Q - len(q):] = True
        c_ids[b, : len(cot)] = cot
        c_valid[b, : len(cot)] = True
        a_ids[b, : len(ans)] = ans
        a_valid[b, : len(ans)] = True

    rows = example_valid[:, None]
    after_question = (np.arange(Q + C + R) >= Q - 1)[None, :]

    teacher_ids = np.concatenate([q_ids, c_ids, a_ids], axis=1)
    teacher_valid = np.concatenate([q_valid, c_valid, a_valid], axis=1)
    teacher_targets, t_next = next_valid_targets(teacher_ids, teacher_valid, pad)

    nocot_valid = np.concatenate([q_valid, np.zeros_like(c_valid), a_valid], axis=1)
    nocot_targets, n_next = next_valid_targets(teacher_ids, nocot_valid, pad)

    s_ans_ids = np.concatenate([np.full((B, 1), spec.eot_id, np.int32), a_ids], axis=1)
    s_ans_valid = np.concatenate([np.ones((B, 1), bool), a_valid], axis=1)
    s_ans_targets, s_next = next_valid_targets(s_ans_ids, s_ans_valid, pad)

    batch = {
        "teacher_ids": teacher_ids,
        "teacher_valid": teacher_valid,
        "teacher_targets": teacher_targets,
        "teacher_loss_mask": t_next & after_question & rows,
        "teacher_distill_idx": np.full((B,), spec.teacher_distill_idx, np.int32),
        "student_prefix_ids": np.concatenate([q_ids, np.full((B, 1), spec.bot_id, np.int32)], axis=1),
        "student_prefix_valid": np.concatenate([q_valid, np.ones((B, 1), bool)], axis=1),
        "student_answer_ids": s_ans_ids,
        "student_answer_valid": s_ans_valid,
        "student_answer_targets": s_ans_targets,
        "student_answer_loss_mask": s_next & rows,
        "student_distill_idx": np.full((B,), spec.student_distill_idx, np.int32),
        "nocot_valid": nocot_valid,
        "nocot_targets": nocot_targets,
        "nocot_loss_mask": n_next & after_question & rows,
        "cot_valid": c_valid,
        "answer_valid": a_valid,
        "example_valid": example_valid,
        "question_len": q_valid.sum(axis=1).astype(np.int32),
        "cot_len": c_valid.sum(axis=1).astype(np.int32),
    }
    assert tuple(batch) == BATCH_KEYS
    return batch, stats


def describe_batch(
    batch: dict[str, np.ndarray], row: int = 0, decode: Callable[[list[int]], str] | None = None
) -> str:
    """Human-readable view of one row, for debugging.

    Each token is shown as decode([id]) (repr) or its id; pad holes as '·'; a trailing '*' marks a
    position inside the CE loss mask and '^' the distillation token.
    """
    B = batch["teacher_ids"].shape[0]
    if not 0 <= row < B:
        raise ValueError(f"describe_batch: row={row} out of range for batch of {B}")
    Q = batch["student_prefix_ids"].shape[1] - 1
    C = batch["cot_valid"].shape[1]

    def tok(i: int) -> str:
        return repr(decode([int(i)])) if decode is not None else str(int(i))

    def render(ids, valid, loss=None, mark=-1) -> str:
        out = []
        for p, (i, v) in enumerate(zip(ids, valid, strict=True)):
            s = tok(i) if v else "·"
            if loss is not None and loss[p]:
                s += "*"
            if p == mark:
                s += "^"
            out.append(s)
        return " ".join(out)

    ids, valid, loss = (batch[k][row] for k in ("teacher_ids", "teacher_valid", "teacher_loss_mask"))
    td = int(batch["teacher_distill_idx"][row])
    sd = int(batch["student_distill_idx"][row])
    lines = [
        f"row {row}: example_valid={bool(batch['example_valid'][row])} "
        f"question_len={int(batch['question_len'][row])} cot_len={int(batch['cot_len'][row])} "
        f"teacher_distill_idx={td} student_distill_idx={sd}",
        "  teacher question: " + render(ids[:Q], valid[:Q], loss[:Q]),
        "  teacher cot     : " + render(ids[Q:Q + C], valid[Q:Q + C], loss[Q:Q + C]),
        "  teacher answer  : " + render(ids[Q + C:], valid[Q + C:], loss[Q + C:], td - Q - C),
        "  student prefix  : " + render(batch["student_prefix_ids"][row], batch["student_prefix_valid"][row])
        + " + <latent> slots",
        "  student answer  : " + render(
            batch["student_answer_ids"][row], batch["student_answer_valid"][row],
            batch["student_answer_loss_mask"][row], sd,
        ),
    ]
    return "\n".join(lines)
