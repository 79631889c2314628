"""Teacher KV-cache compression (KaVa, R-KV style): pick M of the teacher's CoT entries per layer/KV head.

Shapes: L layers, B batch, S CoT positions, K KV heads, N query heads (GQA: query head ``n`` belongs
to KV group ``n // (N // K)``, as HF ``repeat_kv``), A answer-side queries, H head dim, M kept slots.

For every layer ``l``, batch item ``b``, KV head ``k`` and CoT position ``i`` (METHOD.md §3):

* Importance ``I[i] = mean_a softmax_i(max_{n in group k} q_{a,n}·k_i / sqrt(H))``: post-RoPE logits,
  max-pooled over the query heads of the KV group, softmax over the valid CoT keys only, mean over
  the valid answer-side queries (all in float32). Invalid keys, and rows without a valid query, score 0.
* Redundancy ``R[i] = softmax_i(-mean_j C[i,j])`` with ``C[i,j] = k̂_i·k̂_j`` over unit-normalised
  valid keys (``j`` and ``i`` both run over valid keys only; the diagonal is included). A key unlike
  the others scores high. Invalid keys score 0.
* Score ``S = lam·I + (1-lam)·R`` (``mode="rkv"``, lam = 0.1 by default); ``"attention"`` uses I only,
  ``"cosine"`` R only, ``"crop"`` keeps the first M valid CoT tokens.
* Keep the top M valid positions per (l, b, k), ties broken toward the lower position, then sort the
  kept indices by position so slot j holds the j-th surviving CoT token in time. With fewer than M
  valid positions all are kept and the remaining slots are masked (``slot_valid`` False, index 0).
* The same indices select K and V: for each (l, b, k), ``k_out[l,b,j,k] = k[l,b,idx[l,b,k,j],k]`` and
  ``v_out[l,b,j,k] = v[l,b,idx[l,b,k,j],k]``.

Keys are matched post-RoPE (as cached). ``pre_rope=True`` (ablation) un-rotates the keys before the
redundancy score and before gathering; importance always uses the post-RoPE keys as given.
Everything returned by :func:`compress_teacher_kv` is ``stop_gradient``-ed: these are training targets.
All functions are pure, vectorised over layers/batch/heads and jit-friendly (``m``, ``mode``,
``pre_rope``, ``chunk_size`` must be static).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

MODES = ("rkv", "attention", "cosine", "crop")
_NORM_EPS = 1e-12


class CompressedKV(NamedTuple):
    """Compressed teacher KV (all fields stop-gradient).

    k, v: [L, B, M, K, H] kept keys/values (input dtype), slot j = j-th kept CoT token in time.
    idx: [L, B, K, M] int32 CoT positions of the kept entries (0 in empty slots).
    slot_valid: [L, B, K, M] bool, False for empty slots (CoT shorter than M).
    scores: [L, B, K, S] float32 eviction scores used for the selection (0 at invalid positions).
    """

    k: jax.Array
    v: jax.Array
    idx: jax.Array
    slot_valid: jax.Array
    scores: jax.Array


# ----------------------------------------------------------------------------- input checks


def _check_ndim(name: str, x, ndim: int, layout: str) -> None:
    if not hasattr(x, "shape"):
        raise ValueError(f"{name}: expected an array {layout}, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dims {layout}, got shape {tuple(x.shape)}")


def _check_bool(name: str, x) -> None:
    if x.dtype != jnp.bool_:
        raise ValueError(f"{name}: expected a bool mask, got dtype {x.dtype}")


def _check_keys(keys, key_valid, name: str = "keys") -> None:
    _check_ndim(name, keys, 5, "[L, B, S, K, H]")
    _check_ndim("key_valid", key_valid, 2, "[B, S]")
    _check_bool("key_valid", key_valid)
    _, b, s, _, _ = keys.shape
    if tuple(key_valid.shape) != (b, s):
        raise ValueError(
            f"key_valid: expected shape (B, S) = {(b, s)} to match {name} {tuple(keys.shape)}, "
            f"got {tuple(key_valid.shape)}"
        )


def _check_queries(queries, query_valid, keys) -> None:
    _check_ndim("queries", queries, 5, "[L, B, A, N, H]")
    _check_ndim("query_valid", query_valid, 2, "[B, A]")
    _check_bool("query_valid", query_valid)
    l, b, a, n, h = queries.shape
    lk, bk, _, k, hk = keys.shape
    if (l, b, h) != (lk, bk, hk):
        raise ValueError(
            f"queries: shape {tuple(queries.shape)} [L, B, A, N, H] does not match keys "
            f"{tuple(keys.shape)} [L, B, S, K, H] in L, B or H"
        )
    if n % k != 0:
        raise ValueError(f"queries: number of query heads N={n} is not a multiple of KV heads K={k}")
    if tuple(query_valid.shape) != (b, a):
        raise ValueError(f"query_valid: expected shape (B, A) = {(b, a)}, got {tuple(query_valid.shape)}")


def _check_static_int(name: str, x, minimum: int) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise ValueError(f"{name}: expected a static Python int >= {minimum}, got {x!r}")
    if x < minimum:
        raise ValueError(f"{name}: expected >= {minimum}, got {x}")
    return int(x)


# ----------------------------------------------------------------------------- helpers


def _masked_softmax(x: jax.Array, valid: jax.Array, axis: int = -1) -> jax.Array:
    """Softmax of float32 ``x`` over ``axis`` restricted to ``valid``; 0 elsewhere, 0 if none valid."""
    x = jnp.where(valid, x, -jnp.inf)
    mx = jnp.max(x, axis=axis, keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    e = jnp.where(valid, jnp.exp(x - mx), 0.0)
    den = jnp.sum(e, axis=axis, keepdims=True)
    return e / jnp.where(den > 0, den, 1.0)


def _unit(keys: jax.Array) -> jax.Array:
    """Unit-normalise the last axis in float32; an all-zero vector stays zero."""
    x = keys.astype(jnp.float32)
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * lax.rsqrt(jnp.maximum(sq, _NORM_EPS**2))


# ----------------------------------------------------------------------------- scores


def importance(
    queries: jax.Array, keys: jax.Array, query_valid: jax.Array, key_valid: jax.Array
) -> jax.Array:
    """Attention paid by the answer-side queries to the CoT keys, per KV head.

    Args:
      queries: [L, B, A, N, H] post-RoPE answer-side queries.
      keys: [L, B, S, K, H] post-RoPE CoT keys.
      query_valid: [B, A] bool, which queries are real.
      key_valid: [B, S] bool, which CoT positions are real.
    Returns:
      [L, B, K, S] float32: per layer, ``mean_a softmax_s(max_{n in group} q·k / sqrt(H))`` with the
      softmax over valid keys and the mean over valid queries. Invalid keys get 0; a batch row
      without any valid query gets 0 everywhere.
    """
    _check_keys(keys, key_valid)
    _check_queries(queries, query_valid, keys)
    l, b, a, n, h = queries.shape
    k = keys.shape[3]
    q = queries.reshape(l, b, a, k, n // k, h)  # head n -> (group n // G, member n % G)
    logits = jnp.einsum("lbakgh,lbskh->lbkgas", q, keys, preferred_element_type=jnp.float32)
    logits = jnp.max(logits, axis=3) * (1.0 / math.sqrt(h))  # [L, B, K, A, S]
    probs = _masked_softmax(logits, key_valid[None, :, None, None, :])
    qv = query_valid.astype(jnp.float32)[None, :, None, :, None]  # [1, B, 1, A, 1]
    count = jnp.sum(query_valid, axis=-1).astype(jnp.float32)[None, :, None, None]  # [1, B, 1, 1]
    return jnp.sum(probs * qv, axis=3) / jnp.maximum(count, 1.0)


def _row_sim_sums_dense(kn: jax.Array, valid_f: jax.Array) -> jax.Array:
    """sum_j valid_j C[i, j] for all rows i: kn [L,B,S,K,H], valid_f [B,S] -> [L,B,K,S]."""
    c = jnp.einsum("lbikh,lbjkh->lbkij", kn, kn)  # [L, B, K, S, S]
    return jnp.sum(c * valid_f[None, :, None, None, :], axis=-1)


def _row_sim_sums_chunked(kn: jax.Array, valid_f: jax.Array, chunk: int) -> jax.Array:
    """Same as the dense version, with the [S, S] similarity built ``chunk`` query rows at a time."""
    l, b, s, k, h = kn.shape
    n_chunks = -(-s // chunk)
    rows = jnp.pad(kn, ((0, 0), (0, 0), (0, n_chunks * chunk - s), (0, 0), (0, 0)))
    rows = jnp.moveaxis(rows.reshape(l, b, n_chunks, chunk, k, h), 2, 0)  # [C, L, B, chunk, K, H]

    def one_chunk(r):
        c = jnp.einsum("lbikh,lbjkh->lbkij", r, kn)  # [L, B, K, chunk, S]
        return jnp.sum(c * valid_f[None, :, None, None, :], axis=-1)  # [L, B, K, chunk]

    out = lax.map(one_chunk, rows)  # [C, L, B, K, chunk]
    out = jnp.moveaxis(out, 0, 3).reshape(l, b, k, n_chunks * chunk)
    return out[..., :s]


def _row_sim_sums_factored(kn: jax.Array, valid_f: jax.Array) -> jax.Array:
    """sum_j valid_j k̂_i·k̂_j = k̂_i · (sum_j valid_j k̂_j): exact, O(S·H) per head, no [S, S] matrix."""
    total = jnp.einsum("lbjkh,bj->lbkh", kn, valid_f)
    return jnp.einsum("lbikh,lbkh->lbki", kn, total)


def redundancy(keys: jax.Array, key_valid: jax.Array, *, chunk_size: int | None = None,
               method: str = "factored") -> jax.Array:
    """Redundancy score of each CoT key against the other valid keys of its (layer, KV head).

    Args:
      keys: [L, B, S, K, H] CoT keys.
      key_valid: [B, S] bool.
      chunk_size: static int or None. With ``method="matrix"``, the [S, S] cosine-similarity matrix
        is built in blocks of ``chunk_size`` rows with ``lax.map`` (memory O(chunk·S) per head instead
        of O(S²)); the result equals the dense one up to float rounding.
      method: "factored" (default): since the mean over j is linear, mean_j k̂_i·k̂_j = k̂_i·mean_j k̂_j,
        which is exact and costs O(S·H) per head, so long CoTs need no chunking. "matrix": builds the
        explicit similarity matrix (dense, or chunked with ``chunk_size``) — the literal formula, kept
        as a reference and for benchmarks.
    Returns:
      [L, B, K, S] float32 ``softmax_i(-mean_j k̂_i·k̂_j)`` over valid i and j; 0 at invalid positions.
    """
    _check_keys(keys, key_valid)
    kn = _unit(keys)
    valid_f = key_valid.astype(jnp.float32)
    if method not in ("factored", "matrix"):
        raise ValueError(f"method: expected 'factored' or 'matrix', got {method!r}")
    if method == "factored":
        sums = _row_sim_sums_factored(kn, valid_f)
    elif chunk_size is None:
        sums = _row_sim_sums_dense(kn, valid_f)
    else:
        sums = _row_sim_sums_chunked(kn, valid_f, _check_static_int("chunk_size", chunk_size, 1))
    count = jnp.maximum(jnp.sum(valid_f, axis=-1), 1.0)[None, :, None, None]  # [1, B, 1, 1]
    return _masked_softmax(-sums / count, key_valid[None, :, None, :])


# ----------------------------------------------------------------------------- selection


_NAN_KEY = jnp.iinfo(jnp.int32).min + 1  # below every number, above padding
_INVALID_KEY = jnp.iinfo(jnp.int32).min


def _rank_key(scores: jax.Array) -> jax.Array:
    """int32 keys ordered like the float32 scores (-0.0 == 0.0); NaN maps to `_NAN_KEY`."""
    x = scores.astype(jnp.float32) + 0.0  # + 0.0 maps -0.0 to 0.0
    bits = lax.bitcast_convert_type(x, jnp.int32)
    key = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)
    return jnp.where(jnp.isnan(x), jnp.int32(_NAN_KEY), key)


def select(scores: jax.Array, key_valid: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
    """Top-``m`` valid positions per (layer, batch, KV head), returned sorted by position.

    Ties in score are broken toward the lower position; NaN scores rank below every number. Invalid
    positions are never chosen. One `lax.top_k` over order-preserving int32 keys, then a sort of the
    M kept indices.

    Args:
      scores: [L, B, K, S] float.
      key_valid: [B, S] bool.
      m: static int >= 1 (may exceed S).
    Returns:
      idx: [L, B, K, M] int32 kept positions, ascending; slots past the number of valid positions
        hold 0 (safe to gather) and have ``slot_valid`` False.
      slot_valid: [L, B, K, M] bool, True exactly for the first ``min(m, #valid)`` slots.
    """
    m = _check_static_int("m", m, 1)
    _check_ndim("scores", scores, 4, "[L, B, K, S]")
    _check_ndim("key_valid", key_valid, 2, "[B, S]")
    _check_bool("key_valid", key_valid)
    l, b, k, s = scores.shape
    if tuple(key_valid.shape) != (b, s):
        raise ValueError(
            f"key_valid: expected shape (B, S) = {(b, s)} to match scores {tuple(scores.shape)}, "
            f"got {tuple(key_valid.shape)}"
        )
    s_pad = max(s, m)
    valid = jnp.broadcast_to(key_valid[None, :, None, :], (l, b, k, s))
    key = _rank_key(scores)
    if s_pad > s:
        pad = ((0, 0), (0, 0), (0, 0), (0, s_pad - s))
        valid = jnp.pad(valid, pad, constant_values=False)
        key = jnp.pad(key, pad)
    key = jnp.where(valid, key, _INVALID_KEY)
    # lax.top_k returns equal keys lower index first (the documented tie-break), without a full sort.
    _, top = lax.top_k(key, m)  # best first; invalid positions (if any) come last
    n_valid = jnp.sum(valid, axis=-1, keepdims=True)  # [L, B, K, 1]
    rank = jnp.arange(m, dtype=jnp.int32)
    top = jnp.where(rank < n_valid, top, s_pad)  # empty slots sort last
    top = jnp.sort(top, axis=-1)
    slot_valid = top < s_pad
    return jnp.where(slot_valid, top, 0).astype(jnp.int32), slot_valid


def gather(x: jax.Array, idx: jax.Array) -> jax.Array:
    """Gather kept positions per (layer, batch, KV head).

    Args:
      x: [L, B, S, K, H] keys or values.
      idx: [L, B, K, M] int positions in [0, S).
    Returns:
      [L, B, M, K, H] with ``out[l,b,j,k] = x[l,b,idx[l,b,k,j],k]``.
    """
    _check_ndim("x", x, 5, "[L, B, S, K, H]")
    _check_ndim("idx", idx, 4, "[L, B, K, M]")
    l, b, _, k, _ = x.shape
    if tuple(idx.shape[:3]) != (l, b, k):
        raise ValueError(f"idx: shape {tuple(idx.shape)} [L, B, K, M] does not match x {tuple(x.shape)}")
    ind = jnp.swapaxes(idx, 2, 3)[..., None]  # [L, B, M, K, 1]
    return jnp.take_along_axis(x, ind, axis=2, mode="clip")


# ----------------------------------------------------------------------------- RoPE


def unrotate_keys(k: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Undo HF rotate-half RoPE: rotate each key by minus its angle.

    Forward RoPE is ``x*cos + rotate_half(x)*sin`` with ``angle = positions[..., None] * inv_freq``
    concatenated twice along the last axis and ``rotate_half(x) = concat(-x2, x1)``; the inverse is
    ``k*cos - rotate_half(k)*sin``.

    Args:
      k: [L, B, S, K, H] post-RoPE keys.
      positions: [B, S] int or float absolute positions the keys were rotated at.
      inv_freq: [H/2] float inverse frequencies.
    Returns:
      [L, B, S, K, H] pre-RoPE keys in k's dtype (computed in float32).
    """
    _check_ndim("k", k, 5, "[L, B, S, K, H]")
    _check_ndim("positions", positions, 2, "[B, S]")
    _check_ndim("inv_freq", inv_freq, 1, "[H/2]")
    _, b, s, _, h = k.shape
    if h % 2:
        raise ValueError(f"k: head dim H={h} must be even for RoPE")
    if tuple(positions.shape) != (b, s):
        raise ValueError(f"positions: expected shape (B, S) = {(b, s)}, got {tuple(positions.shape)}")
    if tuple(inv_freq.shape) != (h // 2,):
        raise ValueError(f"inv_freq: expected shape (H/2,) = {(h // 2,)}, got {tuple(inv_freq.shape)}")
    ang = positions.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)  # [B, S, H/2]
    ang = jnp.concatenate([ang, ang], axis=-1)[None, :, :, None, :]  # [1, B, S, 1, H]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    x = k.astype(jnp.float32)
    x1, x2 = x[..., : h // 2], x[..., h // 2 :]
    rot = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos - rot * sin).astype(k.dtype)


# ----------------------------------------------------------------------------- entry point


def compress_teacher_kv(
    k: jax.Array,
    v: jax.Array,
    queries: jax.Array | None,
    query_valid: jax.Array | None,
    key_valid: jax.Array,
    *,
    m: int,
    lam: float = 0.1,
    mode: str = "rkv",
    pre_rope: bool = False,
    key_positions: jax.Array | None = None,
    inv_freq: jax.Array | None = None,
    chunk_size: int | None = None,
) -> CompressedKV:
    """Compress the teacher's CoT KV cache to ``m`` entries per (layer, KV head).

    Args:
      k, v: [L, B, S, K, H] teacher keys (post-RoPE) and values at the CoT positions.
      queries: [L, B, A, N, H] post-RoPE answer-side queries (may be None for "cosine"/"crop").
      query_valid: [B, A] bool (may be None for "cosine"/"crop").
      key_valid: [B, S] bool, real CoT positions.
      m: static number of kept slots (>= 1).
      lam: weight of importance in ``lam*I + (1-lam)*R`` (mode "rkv" only), in [0, 1].
      mode: "rkv", "attention" (I only), "cosine" (R only) or "crop" (first m valid positions).
      pre_rope: un-rotate the keys (needs ``key_positions`` [B, S] and ``inv_freq`` [H/2]) before the
        redundancy score and the gather; importance always uses ``k`` as given (post-RoPE).
      chunk_size: None (default) computes redundancy in the exact factored O(S·H) form; an int builds
        the explicit similarity matrix in row chunks of that size (the literal formula).
    Returns:
      CompressedKV(k, v [L,B,M,K,H], idx, slot_valid [L,B,K,M], scores [L,B,K,S] f32), all
      stop-gradient. For "crop" the scores are ``S - position`` at valid positions (0 elsewhere).
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    m = _check_static_int("m", m, 1)
    if not isinstance(lam, jax.core.Tracer):
        lam_f = float(lam)
        if not 0.0 <= lam_f <= 1.0:
            raise ValueError(f"lam: expected 0 <= lam <= 1, got {lam}")
    if chunk_size is not None:
        _check_static_int("chunk_size", chunk_size, 1)
    _check_keys(k, key_valid, name="k")
    _check_ndim("v", v, 5, "[L, B, S, K, H]")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v: shape {tuple(v.shape)} does not match k {tuple(k.shape)}")
    if mode in ("rkv", "attention"):
        if queries is None or query_valid is None:
            raise ValueError(f"queries/query_valid: required for mode={mode!r}")
        _check_queries(queries, query_valid, k)

    k_sel = k
    if pre_rope:
        if key_positions is None or inv_freq is None:
            raise ValueError("pre_rope=True needs key_positions [B, S] and inv_freq [H/2]")
        k_sel = unrotate_keys(k, key_positions, inv_freq)

    red_method = "factored" if chunk_size is None else "matrix"
    l, b, s, kh, _ = k.shape
    if mode == "crop":
        pos = jnp.arange(s, dtype=jnp.float32)
        crop = jnp.where(key_valid, float(s) - pos, 0.0)  # [B, S]
        scores = jnp.broadcast_to(crop[None, :, None, :], (l, b, kh, s))
    elif mode == "cosine":
        scores = redundancy(k_sel, key_valid, chunk_size=chunk_size, method=red_method)
    elif mode == "attention":
        scores = importance(queries, k, query_valid, key_valid)
    else:
        imp = importance(queries, k, query_valid, key_valid)
        red = redundancy(k_sel, key_valid, chunk_size=chunk_size, method=red_method)
        scores = lam * imp + (1.0 - lam) * red

    idx, slot_valid = select(scores, key_valid, m)
    out = CompressedKV(
        k=gather(k_sel, idx),
        v=gather(v, idx),
        idx=idx,
        slot_valid=slot_valid,
        scores=scores.astype(jnp.float32),
    )
    return jax.tree_util.tree_map(lax.stop_gradient, out)
