"""The Linen decoder (blocks stacked with `nn.scan`) and its pure entry point `forward`.

Param tree (every block param has a leading layer axis L):
    embed/embedding [V,D]; layers/{attn_norm,mlp_norm}/scale [L,D];
    layers/attn/{q,k,v,o}_proj/{kernel,bias,lora_a,lora_b}; layers/mlp/{gate,up,down}_proj/...;
    final_norm/scale [D]; lm_head/kernel [D,V] (untied models only).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from kava_jax.kv import KVCache
from kava_jax.models.config import ModelConfig, rope_inv_freq
from kava_jax.models.layers import MLP, Attention, Projection, RMSNorm

Params = dict[str, Any]

# Activations [B,T,D] stay batch-sharded (constraints are no-ops unless logical axis rules are active,
# as in train.sharding.activation_sharding); without them GSPMD may spread FSDP weight shardings into
# the activations and replicate the batch instead.
ACT = ("batch", None, None)

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class DecoderOutput(NamedTuple):
    """logits [B,T,V] f32; hidden_states [L+1,B,T,D]; kv KVCache [L,B,P+T,K,H];
    queries [L,B,A,N,H] post-RoPE or None; attentions [L,B,N,T,P+T] or None."""

    logits: jax.Array
    hidden_states: jax.Array
    kv: KVCache
    queries: jax.Array | None
    attentions: jax.Array | None


class Block(nn.Module):
    """Pre-norm decoder block; scanned over layers. Carry x [B,T,D]; per-layer prefix k/v [B,P,K,H]."""

    config: ModelConfig
    deterministic: bool = True
    return_attention: bool = False

    @nn.compact
    def __call__(self, x, layer_kv, positions, mask, query_positions, inv_freq):
        c = self.config
        prefix_k, prefix_v = layer_kv
        h = RMSNorm(c.rms_norm_eps, c.weights_dtype, name="attn_norm")(x)
        attn_out, k, v, q, probs = Attention(c, name="attn")(
            h, prefix_k, prefix_v, positions, mask, inv_freq, self.deterministic)
        x = nn.with_logical_constraint(x + attn_out, ACT)
        x = x + MLP(c, name="mlp")(RMSNorm(c.rms_norm_eps, c.weights_dtype, name="mlp_norm")(x),
                                   self.deterministic)
        x = nn.with_logical_constraint(x, ACT)
        q_sel = jnp.take_along_axis(q, query_positions[:, :, None, None], axis=1)  # [B,A,N,H]
        b, kh, g, t, s = probs.shape
        probs = probs.reshape(b, kh * g, t, s) if self.return_attention else None
        return x, (k, v, q_sel, x, probs)


class Decoder(nn.Module):
    """LLaMA / Qwen2 decoder. See `forward` for the calling convention."""

    config: ModelConfig
    deterministic: bool = True
    return_attention: bool = False

    @nn.compact
    def __call__(self, input_ids, inputs_embeds, prefix: KVCache, positions, mask, query_positions):
        c = self.config
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.compute_dtype, param_dtype=c.weights_dtype,
                         embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                     ("vocab", "embed")), name="embed")
        x = embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(c.compute_dtype)
        x = nn.with_logical_constraint(x, ACT)
        block = Block
        if c.remat != "none":
            block = nn.remat(Block, prevent_cse=False, policy=_REMAT_POLICIES[c.remat])
        stack = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=c.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c, self.deterministic, self.return_attention, name="layers")
        inv_freq = rope_inv_freq(c)
        last, (k, v, queries, block_outs, probs) = stack(
            x, (prefix.k, prefix.v), positions, mask, query_positions, inv_freq)
        final = RMSNorm(c.rms_norm_eps, c.weights_dtype, name="final_norm")(last)
        hidden = jnp.concatenate([x[None], block_outs[:-1], final[None]], axis=0)
        if c.tie_word_embeddings:
            logits = embed.attend(final)
        else:
            logits = Projection((c.hidden_size,), (c.vocab_size,), ("embed",), ("vocab",), dtype=c.compute_dtype,
                                param_dtype=c.weights_dtype, name="lm_head")(final)
        logits = nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", None, "vocab"))
        return logits, hidden, KVCache(k, v), queries, probs


def _default_positions(mask_all: jax.Array | None, batch: int, prefix_len: int, new_len: int) -> jax.Array:
    if mask_all is None:
        return jnp.broadcast_to(prefix_len + jnp.arange(new_len, dtype=jnp.int32), (batch, new_len))
    pos = jnp.cumsum(mask_all.astype(jnp.int32), axis=1) - 1
    return jnp.maximum(pos[:, prefix_len:], 0)


def _check_inputs(config, input_ids, inputs_embeds, positions, attention_mask, cache, query_positions):
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("forward: pass exactly one of input_ids [B,T] or inputs_embeds [B,T,D]")
    if input_ids is not None:
        if input_ids.ndim != 2:
            raise ValueError(f"forward: input_ids must be [B,T], got shape {input_ids.shape}")
        b, t = input_ids.shape
    else:
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(f"forward: inputs_embeds must be [B,T,{config.hidden_size}], got {inputs_embeds.shape}")
        b, t = inputs_embeds.shape[:2]
    p = 0
    if cache is not None:
        want = (config.num_layers, b, cache.k.shape[2], config.num_kv_heads, config.head_dim)
        if cache.k.shape != want or cache.v.shape != want:
            raise ValueError(f"forward: cache k/v must be [L,B,P,K,H] = {want}, got {cache.k.shape}/{cache.v.shape}")
        p = cache.k.shape[2]
    if positions is not None and positions.shape != (b, t):
        raise ValueError(f"forward: positions must be [B,T] = {(b, t)}, got {positions.shape}")
    if attention_mask is not None and attention_mask.shape != (b, p + t):
        raise ValueError(f"forward: attention_mask must be [B, prefix+T] = {(b, p + t)}, got {attention_mask.shape}")
    if query_positions is not None and (query_positions.ndim != 2 or query_positions.shape[0] != b):
        raise ValueError(f"forward: query_positions must be [B,A] with B={b}, got {query_positions.shape}")
    return b, t, p


def forward(params: Params, config: ModelConfig, input_ids: jax.Array | None = None, *,
            inputs_embeds: jax.Array | None = None, positions: jax.Array | None = None,
            attention_mask: jax.Array | None = None, cache: KVCache | None = None,
            query_positions: jax.Array | None = None, dropout_rng: jax.Array | None = None,
            return_attention: bool = False) -> DecoderOutput:
    """Runs the decoder over T new positions on top of an optional prefix cache of P positions.

    Args:
      params: the `params` collection (from `init_params` or `hf_io.load_pretrained`).
      input_ids [B,T] int or inputs_embeds [B,T,D]: exactly one.
      positions [B,T]: RoPE positions; default `cumsum(attention_mask) - 1` over prefix + new
        (or P + arange(T) without a mask).
      attention_mask [B,P+T] bool: which keys (prefix and new) are real. Attention is causal in index
        order on top of it, so left/right padding and pad holes are all expressed by this mask.
      cache: prefix KVCache, k/v [L,B,P,K,H] (post-RoPE).
      query_positions [B,A] int: indices into the T new positions whose post-RoPE queries to return.
      dropout_rng: enables LoRA dropout when given.
      return_attention: also return attention probabilities [L,B,N,T,P+T] (for tests/analysis).
    Returns: DecoderOutput with kv covering prefix + new positions ([L,B,P+T,K,H]).
    """
    b, t, p = _check_inputs(config, input_ids, inputs_embeds, positions, attention_mask, cache, query_positions)
    if cache is None:
        cache = KVCache.empty(config.num_layers, b, config.num_kv_heads, config.head_dim, 0, config.compute_dtype)
    if positions is None:
        positions = _default_positions(attention_mask, b, p, t)
    key_valid = jnp.ones((b, p + t), bool) if attention_mask is None else attention_mask.astype(bool)
    causal = jnp.arange(p + t)[None, :] <= (p + jnp.arange(t))[:, None]  # [T,P+T]
    mask = key_valid[:, None, :] & causal[None]
    qpos = jnp.zeros((b, 0), jnp.int32) if query_positions is None else query_positions.astype(jnp.int32)
    model = Decoder(config, deterministic=dropout_rng is None, return_attention=return_attention)
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    logits, hidden, kv, queries, probs = model.apply(
        {"params": params}, input_ids, inputs_embeds, cache, positions, mask, qpos, rngs=rngs)
    return DecoderOutput(logits, hidden, kv, queries if query_positions is not None else None, probs)


def _abstract_boxed(config: ModelConfig):
    model = Decoder(config)
    ids = jnp.zeros((1, 1), jnp.int32)
    cache = KVCache.empty(config.num_layers, 1, config.num_kv_heads, config.head_dim, 0)
    args = (ids, None, cache, jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1, 1), bool), jnp.zeros((1, 0), jnp.int32))
    return model, args


def init_params(config: ModelConfig, rng: jax.Array) -> Params:
    """Random params (normal(0.02) kernels, unit norms, LoRA A uniform / B zeros). Jitted: an op-by-op
    Linen init of the scanned stack is an order of magnitude slower."""
    return _jit_init(config, rng)


@functools.partial(jax.jit, static_argnums=0)
def _jit_init(config: ModelConfig, rng: jax.Array) -> Params:
    model, args = _abstract_boxed(config)
    variables = model.init(rng, *args)
    return nn.meta.unbox(variables["params"])


def abstract_params(config: ModelConfig) -> Params:
    """ShapeDtypeStructs of the params, without allocating them."""
    return jax.eval_shape(lambda r: init_params(config, r), jax.random.key(0))


def param_logical_axes(config: ModelConfig) -> Params:
    """PartitionSpecs of logical axis names (e.g. ('layers', 'embed', 'heads', 'head_dim')) per param."""
    model, args = _abstract_boxed(config)
    boxed = jax.eval_shape(lambda r: model.init(r, *args), jax.random.key(0))
    return nn.get_partition_spec(boxed)["params"]


def embed_tokens(params: Params, config: ModelConfig, ids: jax.Array) -> jax.Array:
    """Token embeddings [..., D] in the compute dtype for ids [...]."""
    return params["embed"]["embedding"][ids].astype(config.compute_dtype)


def lm_logits(params: Params, config: ModelConfig, hidden: jax.Array) -> jax.Array:
    """Logits [..., V] (f32) from final-normed hidden states [..., D] (e.g. to read latent slots)."""
    w = params["embed"]["embedding"].T if config.tie_word_embeddings else params["lm_head"]["kernel"]
    return jnp.einsum("...d,dv->...v", hidden.astype(config.compute_dtype), w.astype(config.compute_dtype)).astype(
        jnp.float32)
