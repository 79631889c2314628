"""The teacher pass: one forward over the full-CoT sequence (BATCH_LAYOUT: question ++ CoT ++ answer).

Returns its CE loss (trainable) and the stop-gradient distillation targets: hidden states at the
distillation token, K/V over the CoT block, and the answer-side queries for importance scores.
Shapes: B batch, Q/C/R block lengths, S_t = Q+C+R, L layers, D hidden, K KV heads, N q heads, H head dim.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kava_jax.kava.compress import importance
from kava_jax.kava.losses import masked_cross_entropy
from kava_jax.kv import KVCache
from kava_jax.models import ModelConfig, forward


class TeacherOutput(NamedTuple):
    """ce scalar; distill_hidden [L,B,D] (block outputs 1..L at the distillation token);
    cot_kv [L,B,C,K,H] post-RoPE; cot_valid [B,C]; cot_positions [B,C];
    answer_queries [L,B,R,N,H] post-RoPE; answer_valid [B,R]; importance [L,B,K,C] (METHOD §3: attention
    of the answer-side queries to the CoT keys). All but `ce` are stop-gradient."""

    ce: jax.Array
    distill_hidden: jax.Array
    cot_kv: KVCache
    cot_valid: jax.Array
    cot_positions: jax.Array
    answer_queries: jax.Array
    answer_valid: jax.Array
    importance: jax.Array


def take_positions(hidden: jax.Array, idx: jax.Array) -> jax.Array:
    """hidden [L,B,T,D], idx [B] -> [L,B,D]: each row's hidden state at its own index."""
    return jnp.take_along_axis(hidden, idx[None, :, None, None], axis=2)[:, :, 0]


def teacher_pass(params, config: ModelConfig, batch: dict, *, cot_len: int,
                 dropout_rng: jax.Array | None = None) -> TeacherOutput:
    """One forward over `teacher_ids` [B,S_t]; `cot_len` is the static C of the layout."""
    ids, valid = batch["teacher_ids"], batch["teacher_valid"].astype(bool)
    b, s = ids.shape
    if "cot_valid" in batch and batch["cot_valid"].shape[1] != cot_len:
        raise ValueError(f"teacher_pass: cot_len={cot_len} (kava.cot_len) does not match the batch's CoT block "
                         f"C={batch['cot_valid'].shape[1]} (cot_valid {tuple(batch['cot_valid'].shape)})")
    q_len = s - cot_len - batch["answer_valid"].shape[1]
    if q_len < 1:
        raise ValueError(f"teacher_pass: teacher_ids [B,S_t]={tuple(ids.shape)} is too short for cot_len={cot_len} "
                         f"+ answer block R={batch['answer_valid'].shape[1]} + a question block")
    r = s - q_len - cot_len
    answer_pos = jnp.broadcast_to(q_len + cot_len + jnp.arange(r, dtype=jnp.int32), (b, r))
    out = forward(params, config, ids, attention_mask=valid, query_positions=answer_pos, dropout_rng=dropout_rng)
    ce = masked_cross_entropy(out.logits, batch["teacher_targets"], batch["teacher_loss_mask"])
    sg = jax.lax.stop_gradient
    positions = jnp.maximum(jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1, 0)
    cot = slice(q_len, q_len + cot_len)
    cot_k, queries = sg(out.kv.k[:, :, cot]), sg(out.queries)
    cot_valid, answer_valid = valid[:, cot], valid[:, q_len + cot_len:]
    return TeacherOutput(
        ce=ce,
        distill_hidden=sg(take_positions(out.hidden_states[1:], batch["teacher_distill_idx"])),
        cot_kv=KVCache(cot_k, sg(out.kv.v[:, :, cot])),
        cot_valid=cot_valid,
        cot_positions=positions[:, cot],
        answer_queries=queries,
        answer_valid=answer_valid,
        importance=importance(queries, cot_k, answer_valid, cot_valid),
    )
