"""Greedy decoding for evaluation (METHOD §6, §7): latent (KaVa / PCCoT / CODI), full CoT and no-CoT.

Every decoder is jitted with static shapes. A prompt segment is prefilled in one model call, then a
fixed-size KV buffer of `max_new_tokens - 1` slots is appended and a `lax.while_loop` feeds one
token per step for all rows at once: each step runs `forward` on the [B,1] previous tokens with
cache = the whole buffer and an attention mask of its filled entries, writes the new K/V into the
buffer with `dynamic_update_slice` and takes the argmax. RoPE positions continue per row
(`valid prefix tokens + step`). A row stops independently at EOS: later tokens are `pad_id` and its
count stops; the loop ends when every row is done or `max_new_tokens` tokens were produced.

Layouts (B rows; Q question block, left-padded `pad.. BOS q1..qn`; P = Q + 1; M latents):
* latent:  prefix `question <bot>` [B,P] -> `latent_state` (jacobi: pass 0 over `question <bot>
  <latent>×M` + T Jacobi passes; sequential: prefill `question <bot>` + M one-latent steps) ->
  one call over `[<eot>] + prompt` on top of `question <bot>` + the latent KV (emits answer token 1)
  -> greedy.
* CoT:     prefill the question block (emits token 1) -> greedy over CoT, prompt, answer, EOS.
* no-CoT:  prefill `question ++ prompt` (the No-CoT training sequence is question ++ prompt answer
  EOS, so the prompt is given, not generated) -> greedy answer.

Counting (per row; n = num_generated, the tokens emitted including EOS when emitted):
* forward_passes, as METHOD §6 words it ("one pass per model call"):
    latent jacobi      1 + T + 1 + (n - 1)   (pass 0 over question+<bot>+placeholders, T Jacobi
                                              passes, the <eot>+prompt call that emits the first
                                              answer token, one per further token)
    latent sequential  1 + M + 1 + (n - 1)   (prefill question <bot>, M latent steps, ...)
    CoT                1 + n                 ("1 prefill + one per generated token")
    no-CoT             1 + n                 (same rule as CoT)
  Reading of the CoT rule: METHOD counts the prefill AND one pass per generated token, although in a
  cached decoder the prefill itself emits the first token, so the model is actually called n times
  (CoT / no-CoT) -- one fewer than the count above. We keep METHOD's wording for comparability with
  the paper's "about 65 passes" for CoT; the latent formulas are exact model-call counts.
* kv_positions (KV entries held when the answer starts) and kv_bytes = kv_positions *
  2 (K and V) * L * K_heads * H * itemsize:
    latent   valid question tokens (incl. BOS) + <bot> + M (the <eot>/prompt entries are not counted,
             METHOD §7: "the KV cache holds question + <bot> + M latents only")
    CoT      valid question tokens + generated tokens up to and including the end of the first
             generated occurrence of the prompt " The answer is:" (all n generated tokens when the
             prompt is not found or no prompt_ids are given)
    no-CoT   valid question tokens + len(prompt)
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kava_jax.kava.student import LATENT_MODES, latent_state
from kava_jax.kv import KVCache
from kava_jax.models import ModelConfig, forward

__all__ = ["DecodeResult", "greedy_decode", "latent_generate", "cot_generate", "nocot_generate",
           "latent_forward_passes", "kv_bytes_per_position"]

_INT32_MAX = 2 ** 31 - 1


class DecodeResult(NamedTuple):
    """tokens [B,N] int32 (pad after EOS); num_generated [B] (incl. EOS when emitted);
    forward_passes [B]; kv_positions [B] and kv_bytes [B] (KV held when the answer starts).
    All int32 arrays (see the module docstring for the formulas)."""

    tokens: jax.Array
    num_generated: jax.Array
    forward_passes: jax.Array
    kv_positions: jax.Array
    kv_bytes: jax.Array


def kv_bytes_per_position(config: ModelConfig, dtype=None) -> int:
    """Bytes one KV position of one row holds: 2 (K, V) * L * K_heads * H * itemsize (compute dtype)."""
    itemsize = jnp.dtype(config.compute_dtype if dtype is None else dtype).itemsize
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * itemsize


def latent_forward_passes(mode: str, num_latents: int, num_iterations: int, num_generated):
    """METHOD §6 count for latent decoding: jacobi 1+T+1+(n-1), sequential 1+M+1+(n-1)."""
    if mode not in LATENT_MODES:
        raise ValueError(f"latent mode must be one of {LATENT_MODES}, got {mode!r}")
    pre = 1 + (num_iterations if mode == "jacobi" else num_latents) + 1
    return pre + num_generated - 1


# ----------------------------------------------------------------------------------- the loop
def greedy_decode(params, config: ModelConfig, first_logits: jax.Array, kv: KVCache, kv_mask: jax.Array, *,
                  eos_id: int, pad_id: int, max_new_tokens: int) -> tuple[jax.Array, jax.Array]:
    """Greedy continuation after a prefill.

    first_logits [B,V]: logits of the last prefilled position (its argmax is generated token 1).
    kv [L,B,P0,K,H] and kv_mask [B,P0]: the prefilled cache. Returns (tokens [B,N] int32 with pad
    after EOS, num_generated [B] int32), N = max_new_tokens. Traceable (call under jit).
    """
    b, p0 = kv_mask.shape
    n_slots = max_new_tokens - 1
    pad_kv = KVCache.empty(kv.k.shape[0], b, kv.k.shape[3], kv.k.shape[4], n_slots, kv.k.dtype)
    buf = kv.concat(pad_kv)
    buf_mask = jnp.concatenate([kv_mask.astype(bool), jnp.zeros((b, n_slots), bool)], axis=1)
    start_pos = jnp.sum(kv_mask, axis=1, dtype=jnp.int32)  # RoPE position of generated token 1
    tok0 = jnp.argmax(first_logits, axis=-1).astype(jnp.int32)
    tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok0)
    done = tok0 == eos_id
    count = jnp.ones((b,), jnp.int32)
    ones = jnp.ones((b, 1), bool)

    def cond(state):
        i, _, _, _, done, _, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, prev, tokens, count, done, buf, buf_mask = state
        slot = p0 + i - 1  # buffer slot of the token fed now (generated token i)
        out = forward(params, config, prev[:, None], positions=(start_pos + i - 1)[:, None],
                      attention_mask=jnp.concatenate([buf_mask, ones], axis=1), cache=buf)
        new = out.kv.slice(p0 + n_slots, p0 + n_slots + 1)
        buf = KVCache(jax.lax.dynamic_update_slice_in_dim(buf.k, new.k, slot, axis=2),
                      jax.lax.dynamic_update_slice_in_dim(buf.v, new.v, slot, axis=2))
        buf_mask = jax.lax.dynamic_update_slice_in_dim(buf_mask, ones, slot, axis=1)
        nxt = jnp.argmax(out.logits[:, 0], axis=-1).astype(jnp.int32)
        nxt = jnp.where(done, pad_id, nxt)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], i, axis=1)
        count = count + (~done).astype(jnp.int32)
        done = done | (nxt == eos_id)
        return i + 1, nxt, tokens, count, done, buf, buf_mask

    state = (jnp.int32(1), tok0, tokens, count, done, buf, buf_mask)
    _, _, tokens, count, _, _, _ = jax.lax.while_loop(cond, body, state)
    return tokens, count


def _prompt_end(tokens: jax.Array, count: jax.Array, prompt_ids: jax.Array) -> jax.Array:
    """[B]: generated tokens up to and including the end of the first occurrence of prompt_ids [k]
    inside the first `count` tokens; `count` where there is none."""
    b, n = tokens.shape
    k = prompt_ids.shape[0]
    if k == 0 or k > n:
        return count
    w = n - k + 1
    idx = jnp.arange(w)[:, None] + jnp.arange(k)[None, :]  # [w,k] window indices
    windows = tokens[:, idx]  # [B,w,k]
    match = jnp.all(windows == prompt_ids.astype(jnp.int32), axis=-1)
    match = match & (jnp.arange(w)[None, :] + k <= count[:, None])
    first = jnp.argmax(match, axis=1).astype(jnp.int32)
    return jnp.where(jnp.any(match, axis=1), first + k, count)


def _result(config, tokens, count, passes, kv_positions, dtype, max_positions: int) -> DecodeResult:
    bpp = kv_bytes_per_position(config, dtype)
    if bpp * max_positions > _INT32_MAX:
        raise ValueError(f"kv_bytes would overflow int32: {max_positions} positions x {bpp} bytes per position")
    kv_positions = kv_positions.astype(jnp.int32)
    return DecodeResult(tokens, count, passes.astype(jnp.int32), kv_positions, kv_positions * bpp)


# ----------------------------------------------------------------------------------- jitted cores
@functools.partial(jax.jit, static_argnames=("config", "mode", "num_latents", "num_iterations", "max_new_tokens"))
def _latent_core(params, config, prj, prefix_ids, prefix_valid, ids, *, mode, num_latents, num_iterations,
                 max_new_tokens):
    """ids: dict of int32 arrays latent, eot, eos, pad (scalars) and prompt [k] (traced: no recompiles)."""
    b, p = prefix_ids.shape
    state = latent_state(params, config, prefix_ids.astype(jnp.int32), prefix_valid.astype(bool), prj, mode=mode,
                         num_latents=num_latents, num_iterations=num_iterations, latent_id=ids["latent"])
    seg = jnp.concatenate([ids["eot"][None], ids["prompt"]])
    seg = jnp.broadcast_to(seg, (b, seg.shape[0]))
    mask = jnp.concatenate([state.mask, jnp.ones(seg.shape, bool)], axis=1)
    out = forward(params, config, seg, attention_mask=mask, cache=state.kv)
    tokens, count = greedy_decode(params, config, out.logits[:, -1], out.kv, mask, eos_id=ids["eos"],
                                  pad_id=ids["pad"], max_new_tokens=max_new_tokens)
    passes = latent_forward_passes(mode, num_latents, num_iterations, count)
    kv_pos = jnp.sum(prefix_valid, axis=1, dtype=jnp.int32) + num_latents
    return _result(config, tokens, count, passes, kv_pos, state.kv.k.dtype, p + num_latents)


@functools.partial(jax.jit, static_argnames=("config", "append_prompt", "max_new_tokens"))
def _plain_core(params, config, question_ids, valid, ids, *, append_prompt, max_new_tokens):
    """ids: dict of int32 arrays eos, pad (scalars) and prompt [k]."""
    b, q = question_ids.shape
    k = ids["prompt"].shape[0]
    valid = valid.astype(bool)
    if append_prompt:  # no-CoT: question ++ prompt, answer generated
        seq = jnp.concatenate([question_ids.astype(jnp.int32), jnp.broadcast_to(ids["prompt"], (b, k))], axis=1)
        mask = jnp.concatenate([valid, jnp.ones((b, k), bool)], axis=1)
    else:
        seq, mask = question_ids.astype(jnp.int32), valid
    out = forward(params, config, seq, attention_mask=mask)
    tokens, count = greedy_decode(params, config, out.logits[:, -1], out.kv, mask, eos_id=ids["eos"],
                                  pad_id=ids["pad"], max_new_tokens=max_new_tokens)
    n_question = jnp.sum(valid, axis=1, dtype=jnp.int32)
    if append_prompt:
        kv_pos, max_pos = n_question + k, q + k
    else:
        kv_pos, max_pos = n_question + _prompt_end(tokens, count, ids["prompt"]), q + max_new_tokens
    return _result(config, tokens, count, 1 + count, kv_pos, out.kv.k.dtype, max_pos)


def _id_arrays(prompt_ids: tuple[int, ...], **scalars) -> dict[str, jax.Array]:
    out = {k: jnp.asarray(v, jnp.int32) for k, v in scalars.items()}
    out["prompt"] = jnp.asarray(prompt_ids, jnp.int32).reshape(len(prompt_ids))
    return out


# ----------------------------------------------------------------------------------- checks
def _check_block(name: str, ids, valid, config: ModelConfig):
    if ids.ndim != 2:
        raise ValueError(f"{name} must be [B,S], got shape {ids.shape}")
    if valid.shape != ids.shape:
        raise ValueError(f"{name} valid mask must have the shape of {name} {ids.shape}, got {valid.shape}")
    if isinstance(ids, jax.core.Tracer) or isinstance(valid, jax.core.Tracer):
        return  # value checks only on concrete inputs
    ids_np, valid_np = np.asarray(ids), np.asarray(valid, bool)
    if not valid_np[:, -1].all():
        rows = np.flatnonzero(~valid_np[:, -1]).tolist()
        raise ValueError(f"{name}: the last position must be valid in every row (left padding); rows {rows[:8]}")
    bad = valid_np & ((ids_np < 0) | (ids_np >= config.vocab_size))
    if bad.any():
        where = np.argwhere(bad)[0].tolist()
        raise ValueError(f"{name}: token ids outside [0, {config.vocab_size}) at (row, pos) {where}")


def _check_ids(config: ModelConfig, max_new_tokens: int, **ids):
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    for name, v in ids.items():
        vals = v if isinstance(v, tuple) else (v,)
        for t in vals:
            if not isinstance(t, (int, np.integer)) or not 0 <= t < config.vocab_size:
                raise ValueError(f"{name} must be token id(s) in [0, {config.vocab_size}), got {v!r}")


def _tuple(prompt_ids) -> tuple[int, ...]:
    return tuple(int(t) for t in prompt_ids)


# ----------------------------------------------------------------------------------- public API
def latent_generate(params, config: ModelConfig, prj: dict, prefix_ids: jax.Array, prefix_valid: jax.Array, *,
                    mode: str, num_latents: int, num_iterations: int, latent_id: int, eot_id: int,
                    prompt_ids, eos_id: int, pad_id: int, max_new_tokens: int) -> DecodeResult:
    """Latent decoding: `question <bot>` [B,P] (left-padded, valid [B,P]) -> M latents (jacobi with T
    iterations, or sequential) -> `[<eot>] + prompt` -> greedy answer of up to max_new_tokens tokens.

    params: decoder params with LoRA and special rows merged (`kava.objective.model_params`);
    prj: the latent projection (may be {}). Returns a DecodeResult (module docstring for counts).
    """
    prompt_ids = _tuple(prompt_ids)
    if mode not in LATENT_MODES:
        raise ValueError(f"mode must be one of {LATENT_MODES}, got {mode!r}")
    if num_latents < 1:
        raise ValueError(f"num_latents must be >= 1, got {num_latents}")
    if num_iterations < 0:
        raise ValueError(f"num_iterations must be >= 0, got {num_iterations}")
    _check_block("prefix_ids", prefix_ids, prefix_valid, config)
    _check_ids(config, max_new_tokens, latent_id=latent_id, eot_id=eot_id, eos_id=eos_id, pad_id=pad_id,
               prompt_ids=prompt_ids)
    ids = _id_arrays(prompt_ids, latent=latent_id, eot=eot_id, eos=eos_id, pad=pad_id)
    return _latent_core(params, config, prj, prefix_ids, prefix_valid, ids, mode=mode, num_latents=int(num_latents),
                        num_iterations=int(num_iterations), max_new_tokens=int(max_new_tokens))


def cot_generate(params, config: ModelConfig, question_ids: jax.Array, valid: jax.Array, *, eos_id: int,
                 pad_id: int, max_new_tokens: int, prompt_ids=()) -> DecodeResult:
    """Teacher-format decoding: question block [B,Q] (left-padded, valid [B,Q]) -> greedy CoT +
    " The answer is:" + answer + EOS. prompt_ids (the tokens of " The answer is:") only serve the
    kv_bytes count (KV held when the generated prompt ends); without them all generated tokens count."""
    prompt_ids = _tuple(prompt_ids)
    _check_block("question_ids", question_ids, valid, config)
    _check_ids(config, max_new_tokens, eos_id=eos_id, pad_id=pad_id, prompt_ids=prompt_ids)
    return _plain_core(params, config, question_ids, valid, _id_arrays(prompt_ids, eos=eos_id, pad=pad_id),
                       append_prompt=False, max_new_tokens=int(max_new_tokens))


def nocot_generate(params, config: ModelConfig, question_ids: jax.Array, valid: jax.Array, *, prompt_ids,
                   eos_id: int, pad_id: int, max_new_tokens: int) -> DecodeResult:
    """No-CoT decoding: question block [B,Q] ++ prompt (given) -> greedy answer + EOS."""
    prompt_ids = _tuple(prompt_ids)
    _check_block("question_ids", question_ids, valid, config)
    _check_ids(config, max_new_tokens, eos_id=eos_id, pad_id=pad_id, prompt_ids=prompt_ids)
    return _plain_core(params, config, question_ids, valid, _id_arrays(prompt_ids, eos=eos_id, pad=pad_id),
                       append_prompt=True, max_new_tokens=int(max_new_tokens))
