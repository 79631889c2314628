"""Decoder building blocks: RMSNorm, RoPE, LoRA-capable projections, GQA attention, SwiGLU.

Shapes: B batch, T new positions, S = prefix + T key positions, D hidden, N query heads,
K KV heads, G = N // K, H head dim, F MLP dim, A gathered query positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kava_jax.models.config import ModelConfig

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """HF rotate-half RoPE. x [B,T,heads,H], positions [B,T] (int or float), inv_freq [H/2]."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B,T,H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    xf = x.astype(jnp.float32)
    return (xf * jnp.cos(angles) + rotate_half(xf) * jnp.sin(angles)).astype(x.dtype)


class RMSNorm(nn.Module):
    """x / rms(x) * scale, computed in float32 (as transformers does), cast back to the input dtype."""

    eps: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale.astype(x.dtype) * xf.astype(x.dtype)


def _lora_a_init(key, shape, dtype):
    # peft: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    fan_in = 1
    for s in shape[:-1]:
        fan_in *= s
    bound = 1.0 / jnp.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class Projection(nn.Module):
    """y = x·W (+ b) (+ LoRA: (alpha/r) · dropout(x)·A·B), W shaped in_shape + out_shape.

    Contracts the last `len(in_shape)` axes of x. Params: `kernel`, optional `bias`, and with LoRA
    `lora_a` [*in_shape, r] (uniform init) and `lora_b` [r, *out_shape] (zeros).
    """

    in_shape: Sequence[int]
    out_shape: Sequence[int]
    in_axes: Sequence[str]
    out_axes: Sequence[str]
    use_bias: bool = False
    lora_rank: int = 0
    lora_scale: float = 0.0
    lora_dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        n_in, n_out = len(self.in_shape), len(self.out_shape)
        letters = "ijklmnop"
        lin, lout = letters[:n_in], letters[n_in:n_in + n_out]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), tuple(self.in_axes) + tuple(self.out_axes)),
            tuple(self.in_shape) + tuple(self.out_shape), self.param_dtype)
        x = x.astype(self.dtype)
        y = jnp.einsum(f"...{lin},{lin}{lout}->...{lout}", x, kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, tuple(self.out_axes)),
                              tuple(self.out_shape), self.param_dtype)
            y = y + bias.astype(self.dtype)
        if self.lora_rank:
            a = self.param("lora_a", nn.with_logical_partitioning(_lora_a_init, tuple(self.in_axes) + ("lora",)),
                           tuple(self.in_shape) + (self.lora_rank,), self.param_dtype)
            b_init = nn.with_logical_partitioning(nn.initializers.zeros, ("lora",) + tuple(self.out_axes))
            b = self.param("lora_b", b_init, (self.lora_rank,) + tuple(self.out_shape), self.param_dtype)
            xd = nn.Dropout(self.lora_dropout)(x, deterministic=deterministic) if self.lora_dropout else x
            low = jnp.einsum(f"...{lin},{lin}r->...r", xd, a.astype(self.dtype))
            y = y + self.lora_scale * jnp.einsum(f"...r,r{lout}->...{lout}", low, b.astype(self.dtype))
        return y


def _projection(config: ModelConfig, target: str, in_shape, out_shape, in_axes, out_axes, bias=False):
    lora = config.lora
    rank = lora.rank if target in lora.targets else 0
    return Projection(in_shape, out_shape, in_axes, out_axes, use_bias=bias, lora_rank=rank,
                      lora_scale=lora.scale, lora_dropout=lora.dropout, dtype=config.compute_dtype,
                      param_dtype=config.weights_dtype, name=f"{target}_proj")


def attention_weights(q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention probabilities, float32.

    q [B,T,N,H], k [B,S,K,H], mask [B,T,S] bool -> probs [B,K,G,T,S].
    Queries are grouped as [B,K,G*T,H] so the contraction is one batched matmul per (b, k).
    """
    b, t, n, h = q.shape
    kh = k.shape[2]
    g = n // kh
    qg = q.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, h)
    kt = k.transpose(0, 2, 1, 3)  # [B,K,S,H]
    logits = jnp.einsum("bkqh,bksh->bkqs", qg, kt, preferred_element_type=jnp.float32)
    logits = logits.reshape(b, kh, g, t, -1) * (h ** -0.5)
    logits = jnp.where(mask[:, None, None], logits, MASK_VALUE)
    return jax.nn.softmax(logits, axis=-1)


class Attention(nn.Module):
    """GQA self-attention over [prefix cache ++ new positions].

    x [B,T,D]; prefix_k/v [B,P,K,H]; positions [B,T]; mask [B,T,P+T] bool (True = may attend).
    Returns (out [B,T,D], k [B,P+T,K,H], v [B,P+T,K,H], q [B,T,N,H] post-RoPE, probs [B,K,G,T,P+T]).
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x, prefix_k, prefix_v, positions, mask, inv_freq, deterministic=True):
        c = self.config
        d, n, kh, h = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        q = _projection(c, "q", (d,), (n, h), ("embed",), ("heads", "head_dim"), c.attention_bias)(x, deterministic)
        k = _projection(c, "k", (d,), (kh, h), ("embed",), ("kv_heads", "head_dim"), c.attention_bias)(
            x, deterministic)
        v = _projection(c, "v", (d,), (kh, h), ("embed",), ("kv_heads", "head_dim"), c.attention_bias)(
            x, deterministic)
        q = nn.with_logical_constraint(apply_rope(q, positions, inv_freq), ("batch", None, "heads", None))
        k = nn.with_logical_constraint(apply_rope(k, positions, inv_freq), ("batch", None, "kv_heads", None))
        v = nn.with_logical_constraint(v, ("batch", None, "kv_heads", None))
        k_all = jnp.concatenate([prefix_k.astype(k.dtype), k], axis=1)
        v_all = jnp.concatenate([prefix_v.astype(v.dtype), v], axis=1)
        probs = attention_weights(q, k_all, mask)  # [B,K,G,T,S]
        out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(v_all.dtype), v_all)
        out = out.reshape(x.shape[0], x.shape[1], n, h)
        out = _projection(c, "o", (n, h), (d,), ("heads", "head_dim"), ("embed",))(out, deterministic)
        return out, k_all, v_all, q, probs


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). x [B,T,D] -> [B,T,D]."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, deterministic=True):
        c = self.config
        gate = _projection(c, "gate", (c.hidden_size,), (c.mlp_dim,), ("embed",), ("mlp",))(x, deterministic)
        up = _projection(c, "up", (c.hidden_size,), (c.mlp_dim,), ("embed",), ("mlp",))(x, deterministic)
        hidden = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", None, "mlp"))
        return _projection(c, "down", (c.mlp_dim,), (c.hidden_size,), ("mlp",), ("embed",))(hidden, deterministic)
