"""KaVa losses (METHOD.md §4): masked cross-entropy, CODI hidden-state loss, KV-matching loss.

All functions are pure `jnp` over arrays, compute in float32 whatever the input dtype, and are
safe under `jax.jit` / `jax.grad` (string options are static Python values checked at trace time).
Teacher-side targets are wrapped in `jax.lax.stop_gradient` here, so callers may pass them as is.

Shapes (DESIGN.md conventions):
  logits [B, T, V], targets / masks [B, T]
  hidden states at the distillation token [L, B, D]  (block outputs 1..L, i.e. `hidden[1:]`)
  KV [L, B, M, K, H] (layers, batch, slots, KV heads, head dim); slot masks [L, B, K, M]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_TYPES = ("smooth_l1", "l1", "mse")
KV_REDUCTIONS = ("mean", "sum_2m")

__all__ = [
    "LOSS_TYPES",
    "KV_REDUCTIONS",
    "elementwise_distance",
    "masked_cross_entropy",
    "codi_loss",
    "kv_loss",
    "cosine_similarity_metric",
]


def _check_loss_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def _check_shape(name: str, x, shape: tuple[int, ...]) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")


def _check_rank(name: str, x, rank: int, what: str) -> None:
    if x.ndim != rank:
        raise ValueError(f"{name} must have rank {rank} ({what}), got shape {tuple(x.shape)}")


def elementwise_distance(x: jax.Array, y: jax.Array, loss_type: str) -> jax.Array:
    """Element-wise distance d(x, y) in float32, same shape as the inputs.

    smooth_l1 (beta = 1): 0.5 r^2 if |r| < 1 else |r| - 0.5;  l1: |r|;  mse: r^2;  r = x - y.
    """
    _check_loss_type(loss_type)
    r = x.astype(jnp.float32) - y.astype(jnp.float32)
    if loss_type == "l1":
        return jnp.abs(r)
    if loss_type == "mse":
        return jnp.square(r)
    a = jnp.abs(r)
    return jnp.where(a < 1.0, 0.5 * jnp.square(r), a - 0.5)


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Token-mean cross-entropy over the True positions of `mask`.

    Args:
      logits: [B, T, V] (any float dtype; log_softmax is taken in float32).
      targets: [B, T] int token ids. Values at masked-out positions are ignored (they may be
        anything, e.g. the pad id).
      mask: [B, T] bool, True where the loss counts.
    Returns:
      scalar float32: sum of -log p(target) over the mask / number of True positions; 0.0 (no NaN,
      zero gradient) when the mask is empty.
    """
    _check_rank("logits", logits, 3, "[B, T, V]")
    _check_shape("targets", targets, logits.shape[:-1])
    _check_shape("mask", mask, logits.shape[:-1])
    mask = mask.astype(bool)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    safe_targets = jnp.where(mask, targets, 0).astype(jnp.int32)
    tok_logp = jnp.take_along_axis(logp, safe_targets[..., None], axis=-1)[..., 0]
    nll = jnp.where(mask, -tok_logp, 0.0)
    count = jnp.sum(mask).astype(jnp.float32)
    return jnp.sum(nll) / jnp.maximum(count, 1.0)


def _masked_std(x: jax.Array, w: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """Population std (ddof 0) of x over `axes`, counting only elements where w (0/1 float) is 1."""
    n = jnp.maximum(jnp.sum(w, axis=axes, keepdims=True), 1.0)
    mean = jnp.sum(x * w, axis=axes, keepdims=True) / n
    var = jnp.sum(jnp.square(x - mean) * w, axis=axes, keepdims=True) / n
    return jnp.sqrt(var)


def codi_loss(
    student_hidden: jax.Array,
    teacher_hidden: jax.Array,
    *,
    loss_type: str = "smooth_l1",
    layerwise_std: bool = True,
    eps: float = 1e-6,
    example_valid: jax.Array | None = None,
) -> jax.Array:
    """CODI hidden-state distillation loss at the distillation token (METHOD §4).

    Args:
      student_hidden: [L, B, D] student hidden states at the ':' token, block outputs 1..L.
      teacher_hidden: [L, B, D] teacher hidden states at the ':' token (stop-gradient applied here).
      loss_type: "smooth_l1" (beta 1, the paper's choice), "l1" or "mse".
      layerwise_std: True -> sigma_l = std over (B, D) of the detached teacher at layer l;
        False -> one sigma = std over (L, B, D) of the detached teacher. Population std (ddof 0).
      eps: added to sigma before dividing.
      example_valid: optional [B] bool; False rows (batch padding) are left out of both the
        distances and the std. Default: all rows valid.
    Returns:
      scalar float32 = mean_l mean_{valid b, d} dist(s / (sigma + eps), t / (sigma + eps)).
      0.0 when no row is valid.
    """
    _check_loss_type(loss_type)
    _check_rank("student_hidden", student_hidden, 3, "[L, B, D]")
    _check_shape("teacher_hidden", teacher_hidden, student_hidden.shape)
    B = student_hidden.shape[1]
    if example_valid is None:
        example_valid = jnp.ones((B,), bool)
    _check_shape("example_valid", example_valid, (B,))
    s = student_hidden.astype(jnp.float32)
    t = jax.lax.stop_gradient(teacher_hidden.astype(jnp.float32))
    valid = jnp.broadcast_to(example_valid.astype(bool)[None, :, None], s.shape)
    w = valid.astype(jnp.float32)
    s = jnp.where(valid, s, 0.0)
    t = jnp.where(valid, t, 0.0)
    axes = (1, 2) if layerwise_std else (0, 1, 2)
    sigma = jax.lax.stop_gradient(_masked_std(t, w, axes)) + eps  # [L,1,1] or [1,1,1]
    d = jnp.where(valid, elementwise_distance(s / sigma, t / sigma, loss_type), 0.0)
    per_layer = jnp.sum(d, axis=(1, 2)) / jnp.maximum(jnp.sum(w, axis=(1, 2)), 1.0)  # [L]
    return jnp.mean(per_layer)


def _slot_mask(slot_valid: jax.Array, kv_shape: tuple[int, ...]) -> jax.Array:
    """[L, B, K, M] slot mask -> bool [L, B, M, K, H] element mask matching KV arrays."""
    L, B, M, K, H = kv_shape
    _check_shape("slot_valid", slot_valid, (L, B, K, M))
    m = jnp.transpose(slot_valid.astype(bool), (0, 1, 3, 2))  # [L, B, M, K]
    return jnp.broadcast_to(m[..., None], kv_shape)


def kv_loss(
    student_k: jax.Array,
    student_v: jax.Array,
    teacher_k: jax.Array,
    teacher_v: jax.Array,
    slot_valid: jax.Array,
    *,
    loss_type: str = "smooth_l1",
    layerwise_std: bool = False,
    reduction: str = "mean",
    eps: float = 1e-6,
) -> jax.Array:
    """KV-matching loss L_KV = ½ (d(K_s, sg K_t) + d(V_s, sg V_t))  (METHOD §4, §9).

    Args:
      student_k, student_v: [L, B, M, K, H] latent-slot KV of the student.
      teacher_k, teacher_v: [L, B, M, K, H] compressed teacher KV (stop-gradient applied here).
      slot_valid: [L, B, K, M] bool (the compression's index layout; transposed inside). False
        slots contribute exactly 0 to the value and receive exactly 0 gradient, whatever the
        arrays hold there (also NaN/inf: they are replaced before any arithmetic).
      loss_type: "smooth_l1" (beta 1), "l1" or "mse", applied element-wise.
      layerwise_std: if True, the residual of layer l is divided by sigma_l + eps, where sigma_l is
        the population std of the detached teacher K (resp. V) of layer l over its valid elements
        (batch, slots, KV heads, head dim); i.e. d(s / (sigma_l + eps), t / (sigma_l + eps)),
        K and V with their own sigma. If False no normalisation.
      reduction:
        "mean":   ½ (sum_valid d_K + sum_valid d_V) / n_valid, n_valid = number of valid elements
                  (valid (l, b, m, k) slots x H). 0.0 when nothing is valid.
        "sum_2m": for each (l, b, k, h) the loss is summed over the (valid) slots and divided by
                  2M (the ½ of K/V averaging times the M slots), then averaged over L, B, K, H:
                  (sum_valid d_K + sum_valid d_V) / (2 · M · L · B · K · H). Masked slots count
                  as zeros in the sum, so this is "mean" scaled by n_valid / (L·B·M·K·H).
      eps: added to sigma when layerwise_std.
    Returns:
      scalar float32; 0.0 for identical student and teacher.
    """
    _check_loss_type(loss_type)
    if reduction not in KV_REDUCTIONS:
        raise ValueError(f"reduction must be one of {KV_REDUCTIONS}, got {reduction!r}")
    _check_rank("student_k", student_k, 5, "[L, B, M, K, H]")
    shape = tuple(student_k.shape)
    for name, x in (("student_v", student_v), ("teacher_k", teacher_k), ("teacher_v", teacher_v)):
        _check_shape(name, x, shape)
    mask = _slot_mask(slot_valid, shape)
    w = mask.astype(jnp.float32)

    def one(s, t):
        s = jnp.where(mask, s.astype(jnp.float32), 0.0)
        t = jax.lax.stop_gradient(jnp.where(mask, t.astype(jnp.float32), 0.0))
        if layerwise_std:
            sigma = jax.lax.stop_gradient(_masked_std(t, w, (1, 2, 3, 4))) + eps  # [L,1,1,1,1]
            s, t = s / sigma, t / sigma
        return jnp.sum(jnp.where(mask, elementwise_distance(s, t, loss_type), 0.0))

    total = one(student_k, teacher_k) + one(student_v, teacher_v)
    if reduction == "mean":
        denom = jnp.maximum(jnp.sum(w), 1.0)
    else:
        L, B, M, K, H = shape
        denom = float(max(L * B * M * K * H, 1))
    return 0.5 * total / denom


def cosine_similarity_metric(
    a: jax.Array, b: jax.Array, mask: jax.Array, *, eps: float = 1e-8
) -> jax.Array:
    """Mean cosine similarity over valid slots (a metric, not a loss).

    Args:
      a, b: [L, B, M, K, H] (e.g. student and compressed teacher K, or V).
      mask: [L, B, K, M] bool slot mask (compression layout).
      eps: lower bound on each vector norm.
    Returns:
      scalar float32 = mean over valid (l, b, m, k) of <a, b> / (max(|a|, eps) · max(|b|, eps)),
      cosine taken over the head dim H; 0.0 when no slot is valid.
    """
    _check_rank("a", a, 5, "[L, B, M, K, H]")
    _check_shape("b", b, a.shape)
    L, B, M, K, H = a.shape
    _check_shape("mask", mask, (L, B, K, M))
    m = jnp.transpose(mask.astype(bool), (0, 1, 3, 2))  # [L, B, M, K]
    a32 = jnp.where(m[..., None], a.astype(jnp.float32), 0.0)
    b32 = jnp.where(m[..., None], b.astype(jnp.float32), 0.0)
    na = jnp.maximum(jnp.linalg.norm(a32, axis=-1), eps)
    nb = jnp.maximum(jnp.linalg.norm(b32, axis=-1), eps)
    cos = jnp.sum(a32 * b32, axis=-1) / (na * nb)
    return jnp.sum(jnp.where(m, cos, 0.0)) / jnp.maximum(jnp.sum(m).astype(jnp.float32), 1.0)
