"""`KVCache`: the per-layer keys and values a decoder call returns or continues from."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class KVCache(NamedTuple):
    """Post-RoPE keys and values, k and v [L, B, S, K, H] (layers, batch, positions, KV heads, head dim)."""

    k: jax.Array
    v: jax.Array

    @property
    def length(self) -> int:
        return self.k.shape[2]

    @classmethod
    def empty(cls, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, length: int = 0,
              dtype=jnp.float32) -> KVCache:
        shape = (num_layers, batch, length, num_kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def slice(self, start: int, stop: int) -> KVCache:
        """Positions [start, stop) of every layer (static bounds)."""
        return KVCache(self.k[:, :, start:stop], self.v[:, :, start:stop])

    def concat(self, other: KVCache) -> KVCache:
        return KVCache(jnp.concatenate([self.k, other.k], axis=2), jnp.concatenate([self.v, other.v], axis=2))

    def nbytes_per_example(self) -> int:
        """Bytes one batch row of this cache holds (k and v)."""
        l, _, s, k, h = self.k.shape
        return 2 * l * s * k * h * self.k.dtype.itemsize
