"""Separating, merging and folding LoRA params. LoRA leaves are the ones named `lora_a` / `lora_b`."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import traverse_util

from kava_jax.models.config import ModelConfig

LORA_LEAVES = ("lora_a", "lora_b")


def is_lora_path(path: tuple[str, ...]) -> bool:
    return path[-1] in LORA_LEAVES


def split_lora(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(base, lora): two nested dicts whose union is `params`; lora holds only `lora_a`/`lora_b`."""
    flat = traverse_util.flatten_dict(params)
    base = {k: v for k, v in flat.items() if not is_lora_path(k)}
    lora = {k: v for k, v in flat.items() if is_lora_path(k)}
    return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(lora)


def merge_trees(*trees: dict[str, Any]) -> dict[str, Any]:
    """Union of nested dicts with disjoint leaves (raises on a leaf present twice)."""
    out: dict[tuple, Any] = {}
    for tree in trees:
        for k, v in traverse_util.flatten_dict(tree).items():
            if k in out:
                raise ValueError(f"merge_trees: leaf {'/'.join(k)} present in more than one tree")
            out[k] = v
    return traverse_util.unflatten_dict(out)


def fold_lora(params: dict[str, Any], config: ModelConfig) -> dict[str, Any]:
    """Params with each LoRA update folded into its kernel (W + alpha/r · A·B) and the LoRA leaves removed."""
    flat = traverse_util.flatten_dict(params)
    out = {}
    for k, v in flat.items():
        if is_lora_path(k):
            continue
        if k[-1] == "kernel" and k[:-1] + ("lora_a",) in flat:
            a, b = flat[k[:-1] + ("lora_a",)], flat[k[:-1] + ("lora_b",)]
            # a [L, *in, r], b [L, r, *out], kernel [L, *in, *out]
            a2 = a.reshape(a.shape[0], -1, a.shape[-1]).astype(jnp.float32)
            b2 = b.reshape(b.shape[0], b.shape[1], -1).astype(jnp.float32)
            delta = jnp.einsum("lir,lro->lio", a2, b2).reshape(v.shape) * config.lora.scale
            v = (v.astype(jnp.float32) + delta).astype(v.dtype)
        out[k] = v
    return traverse_util.unflatten_dict(out)
