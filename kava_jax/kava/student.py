"""The latent student (METHOD §2): prefill, latent unroll with `lax.scan`, answer segment on top.

Shapes: B batch, P = Q+1 student prefix (`question <bot>`, left-padded), M latents, R1 = 1+R answer
block (`<eot>` + prompt + answer + EOS), L layers, D hidden, K KV heads, H head dim.

Modes:
* `jacobi` (PCCoT): pass 0 runs `question <bot> <latent>×M`; the final hidden states at `<bot>` and
  the first M-1 latents, through `prj`, are the initial latent inputs. Each of T passes runs the M
  latent embeddings on top of the `question <bot>` cache and updates
  e ← [e₁, prj(o₁), …, prj(o_{M-1})]. The latent KV of pass T (of pass 0 when T = 0) is the student KV.
* `sequential` (CODI): prefill `question <bot>`; M single-token steps, each feeding prj(last hidden)
  and writing its KV into a fixed-size buffer.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kava_jax.kv import KVCache
from kava_jax.models import ModelConfig, embed_tokens, forward

LATENT_MODES = ("jacobi", "sequential")


# ----------------------------------------------------------------------------------- projection
def init_prj(rng: jax.Array, hidden: int, use_prj: bool = True, dtype=jnp.float32) -> dict:
    """prj = Linear(D,D) → GELU → Linear(D,D) → LayerNorm(D); an empty dict when `use_prj` is False."""
    if not use_prj:
        return {}
    k1, k2 = jax.random.split(rng)
    bound = hidden ** -0.5
    return {
        "w1": jax.random.uniform(k1, (hidden, hidden), dtype, -bound, bound), "b1": jnp.zeros((hidden,), dtype),
        "w2": jax.random.uniform(k2, (hidden, hidden), dtype, -bound, bound), "b2": jnp.zeros((hidden,), dtype),
        "ln_scale": jnp.ones((hidden,), dtype), "ln_bias": jnp.zeros((hidden,), dtype),
    }


def apply_prj(prj: dict, x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """x [..., D] -> [..., D]; identity for an empty dict. LayerNorm statistics in float32."""
    if not prj:
        return x
    dt = x.dtype
    h = jax.nn.gelu(x @ prj["w1"].astype(dt) + prj["b1"].astype(dt), approximate=False)
    h = (h @ prj["w2"].astype(dt) + prj["b2"].astype(dt)).astype(jnp.float32)
    mu = h.mean(-1, keepdims=True)
    var = ((h - mu) ** 2).mean(-1, keepdims=True)
    h = (h - mu) * jax.lax.rsqrt(var + eps) * prj["ln_scale"] + prj["ln_bias"]
    return h.astype(dt)


# ----------------------------------------------------------------------------------- student pass
class StudentOutput(NamedTuple):
    """answer_logits [B,R1,V]; answer_hidden [L+1,B,R1,D]; latent_kv [L,B,M,K,H];
    latent_positions [B,M]; latent_embeds [B,M,D] (the inputs of the last pass)."""

    answer_logits: jax.Array
    answer_hidden: jax.Array
    latent_kv: KVCache
    latent_positions: jax.Array
    latent_embeds: jax.Array


class LatentState(NamedTuple):
    """What the answer segment needs: prefix + latent KV [L,B,P+M,K,H] and its mask [B,P+M]."""

    kv: KVCache
    mask: jax.Array
    latent_kv: KVCache
    latent_positions: jax.Array
    latent_embeds: jax.Array


def _maybe_checkpoint(fn, remat: bool):
    return jax.checkpoint(fn, prevent_cse=False) if remat else fn


def jacobi_latents(params, config: ModelConfig, prefix_ids, prefix_valid, prj, *, num_latents: int,
                   num_iterations: int, latent_id: int, remat_scan: bool = False,
                   dropout_rng: jax.Array | None = None) -> LatentState:
    """Pass 0 + T Jacobi passes (PCCoT rule). prefix_ids/valid [B,P] -> LatentState."""
    b, p = prefix_ids.shape
    m = num_latents
    ones = jnp.ones((b, m), bool)
    ids0 = jnp.concatenate([prefix_ids, jnp.full((b, m), latent_id, prefix_ids.dtype)], axis=1)
    mask = jnp.concatenate([prefix_valid.astype(bool), ones], axis=1)
    rngs = _split_rngs(dropout_rng, num_iterations + 1)
    out0 = forward(params, config, ids0, attention_mask=mask, dropout_rng=rngs[0])
    final0 = out0.hidden_states[-1]
    e0 = apply_prj(prj, final0[:, p - 1:p - 1 + m])  # hidden at <bot> and the first M-1 latents
    prefix_kv = out0.kv.slice(0, p)
    latent_positions = jnp.sum(prefix_valid, axis=1, dtype=jnp.int32)[:, None] + jnp.arange(m, dtype=jnp.int32)

    def one_pass(carry, rng):
        e, _ = carry
        out = forward(params, config, inputs_embeds=e, positions=latent_positions, attention_mask=mask,
                      cache=prefix_kv, dropout_rng=rng)
        o = out.hidden_states[-1]
        e_next = jnp.concatenate([e[:, :1], apply_prj(prj, o[:, :-1])], axis=1)
        return (e_next, out.kv.slice(p, p + m)), e

    carry0 = (e0, out0.kv.slice(p, p + m))
    if num_iterations == 0:
        latent_kv, last_inputs = carry0[1], embed_tokens(params, config, ids0[:, p:])  # pass 0 ran <latent> tokens
    else:
        scan_rngs = None if dropout_rng is None else rngs[1:]
        (_, latent_kv), inputs = jax.lax.scan(_maybe_checkpoint(one_pass, remat_scan), carry0, scan_rngs,
                                              length=num_iterations)
        last_inputs = inputs[-1]
    return LatentState(prefix_kv.concat(latent_kv), mask, latent_kv, latent_positions, last_inputs)


def sequential_latents(params, config: ModelConfig, prefix_ids, prefix_valid, prj, *, num_latents: int,
                       remat_scan: bool = False, dropout_rng: jax.Array | None = None) -> LatentState:
    """CODI scheme: prefill `question <bot>`, then M one-token steps into a fixed KV buffer."""
    b, p = prefix_ids.shape
    m = num_latents
    rngs = _split_rngs(dropout_rng, m + 1)
    out0 = forward(params, config, prefix_ids, attention_mask=prefix_valid.astype(bool), dropout_rng=rngs[0])
    e0 = apply_prj(prj, out0.hidden_states[-1][:, -1])  # [B,D], from <bot>
    n_prefix = jnp.sum(prefix_valid, axis=1, dtype=jnp.int32)
    pad = KVCache.empty(config.num_layers, b, config.num_kv_heads, config.head_dim, m, out0.kv.k.dtype)
    buffer = out0.kv.concat(pad)
    buf_mask = jnp.concatenate([prefix_valid.astype(bool), jnp.zeros((b, m), bool)], axis=1)

    def step(carry, inp):
        e, kv, bmask = carry
        j, rng = inp
        attn_mask = jnp.concatenate([bmask, jnp.ones((b, 1), bool)], axis=1)
        out = forward(params, config, inputs_embeds=e[:, None], positions=(n_prefix + j)[:, None],
                      attention_mask=attn_mask, cache=kv, dropout_rng=rng)
        new = out.kv.slice(p + m, p + m + 1)
        kv = KVCache(jax.lax.dynamic_update_slice_in_dim(kv.k, new.k, p + j, axis=2),
                     jax.lax.dynamic_update_slice_in_dim(kv.v, new.v, p + j, axis=2))
        bmask = jax.lax.dynamic_update_slice_in_dim(bmask, jnp.ones((b, 1), bool), p + j, axis=1)
        return (apply_prj(prj, out.hidden_states[-1][:, 0]), kv, bmask), e

    scan_rngs = None if dropout_rng is None else rngs[1:]
    (_, kv, bmask), inputs = jax.lax.scan(_maybe_checkpoint(step, remat_scan), (e0, buffer, buf_mask),
                                         (jnp.arange(m, dtype=jnp.int32), scan_rngs), length=m)
    latent_positions = n_prefix[:, None] + jnp.arange(m, dtype=jnp.int32)
    return LatentState(kv, bmask, kv.slice(p, p + m), latent_positions, jnp.swapaxes(inputs, 0, 1))


def _split_rngs(rng, n):
    return [None] * n if rng is None else jax.random.split(rng, n)


def latent_state(params, config: ModelConfig, prefix_ids, prefix_valid, prj, *, mode: str, num_latents: int,
                 num_iterations: int, latent_id: int, remat_scan: bool = False,
                 dropout_rng: jax.Array | None = None) -> LatentState:
    """Dispatches on `mode` ∈ {jacobi, sequential}."""
    if mode == "jacobi":
        return jacobi_latents(params, config, prefix_ids, prefix_valid, prj, num_latents=num_latents,
                              num_iterations=num_iterations, latent_id=latent_id, remat_scan=remat_scan,
                              dropout_rng=dropout_rng)
    if mode == "sequential":
        return sequential_latents(params, config, prefix_ids, prefix_valid, prj, num_latents=num_latents,
                                  remat_scan=remat_scan, dropout_rng=dropout_rng)
    raise ValueError(f"latent mode must be one of {LATENT_MODES}, got {mode!r}")


def student_pass(params, config: ModelConfig, batch: dict, prj: dict, *, mode: str, num_latents: int,
                 num_iterations: int, latent_id: int, remat_scan: bool = False,
                 dropout_rng: jax.Array | None = None) -> StudentOutput:
    """Latent unroll, then the answer block [B,R1] on top of `question <bot>` + the final latent KV."""
    rngs = _split_rngs(dropout_rng, 2)
    state = latent_state(params, config, batch["student_prefix_ids"], batch["student_prefix_valid"], prj,
                         mode=mode, num_latents=num_latents, num_iterations=num_iterations, latent_id=latent_id,
                         remat_scan=remat_scan, dropout_rng=rngs[0])
    mask = jnp.concatenate([state.mask, batch["student_answer_valid"].astype(bool)], axis=1)
    out = forward(params, config, batch["student_answer_ids"], attention_mask=mask, cache=state.kv,
                  dropout_rng=rngs[1])
    return StudentOutput(out.logits, out.hidden_states, state.latent_kv, state.latent_positions,
                         state.latent_embeds)


def with_special_rows(params: dict, special_ids: tuple[int, ...], special_embed: jax.Array) -> dict:
    """params with embedding rows `special_ids` replaced by the trainable `special_embed` [n, D]."""
    table = params["embed"]["embedding"]
    table = table.at[jnp.asarray(special_ids)].set(special_embed.astype(table.dtype))
    return {**params, "embed": {**params["embed"], "embedding": table}}


__all__ = ["init_prj", "apply_prj", "StudentOutput", "LatentState", "jacobi_latents", "sequential_latents",
           "latent_state", "student_pass", "with_special_rows", "embed_tokens"]
