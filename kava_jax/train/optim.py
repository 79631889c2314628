"""Optimizer: AdamW with linear warm-up then cosine / linear / constant, global-norm clipping and a
weight-decay mask (the `train` config section).

    chain(clip_by_global_norm(grad_clip), inject_hyperparams(adamw)(learning_rate=schedule))

The learning rate is an injected hyper-parameter, so the optimizer state carries the value used by
the last update (`optax.tree_utils.tree_get(opt_state, "learning_rate")`, logged by the step).
Gradient accumulation is done in the train step itself (lax.scan over micro-batches), not here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax

SCHEDULES = ("cosine", "linear", "constant")

# Leaf names that are never decayed (norm scales, biases, LayerNorm of prj); the whole
# `special_embed` entry (rows of <bot>, <eot>, <latent>) is never decayed either.
NO_DECAY_LEAVES = ("scale", "bias", "b1", "b2", "ln_scale", "ln_bias")
NO_DECAY_ROOTS = ("special_embed",)


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def make_schedule(train_cfg: Any, total_steps: int) -> optax.Schedule:
    """Learning rate at each step: 0 → lr linearly over round(warmup_frac · total_steps) steps, then
    `schedule` (cosine to 0, linear to 0, or constant) over the remaining steps (HF Trainer's shapes)."""
    lr = float(_get(train_cfg, "lr"))
    kind = _get(train_cfg, "schedule", "cosine")
    frac = float(_get(train_cfg, "warmup_frac", 0.0) or 0.0)
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"make_optimizer: total_steps must be an int >= 1, got {total_steps!r}")
    if not lr > 0:
        raise ValueError(f"train.lr: must be > 0, got {lr}")
    if kind not in SCHEDULES:
        raise ValueError(f"train.schedule: must be one of {SCHEDULES}, got {kind!r}")
    if not 0.0 <= frac < 1.0:
        raise ValueError(f"train.warmup_frac: must be in [0, 1), got {frac}")
    warmup = int(round(frac * total_steps))
    rest = max(total_steps - warmup, 1)
    if kind == "cosine":
        main = optax.cosine_decay_schedule(lr, rest, alpha=0.0)
    elif kind == "linear":
        main = optax.linear_schedule(lr, 0.0, rest)
    else:
        main = optax.constant_schedule(lr)
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def decay_mask(params: Any) -> Any:
    """Bool tree (structure of `params`): True where weight decay applies.

    False for norm scales and biases (leaf names in NO_DECAY_LEAVES) and everything under
    `special_embed`; True for kernels, embeddings, LoRA A/B and prj weights.
    """

    def one(path, _):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if names and names[0] in NO_DECAY_ROOTS:
            return False
        return not (names and names[-1] in NO_DECAY_LEAVES)

    return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(train_cfg: Any, total_steps: int) -> optax.GradientTransformation:
    """AdamW (b1, b2, eps, weight_decay from `train_cfg`) on the `make_schedule` learning rate,
    after clipping the global gradient norm to `grad_clip` (None or 0 disables clipping)."""
    schedule = make_schedule(train_cfg, total_steps)
    b1, b2 = float(_get(train_cfg, "b1", 0.9)), float(_get(train_cfg, "b2", 0.999))
    eps = float(_get(train_cfg, "eps", 1e-8))
    wd = float(_get(train_cfg, "weight_decay", 0.0))
    clip = _get(train_cfg, "grad_clip", None)
    for name, v, ok in (("b1", b1, 0 <= b1 < 1), ("b2", b2, 0 <= b2 < 1), ("eps", eps, eps > 0),
                        ("weight_decay", wd, wd >= 0)):
        if not ok:
            raise ValueError(f"train.{name}: invalid value {v}")
    if clip is not None and float(clip) < 0:
        raise ValueError(f"train.grad_clip: must be >= 0 (0 or None disables), got {clip}")

    def adamw(learning_rate):
        return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=wd, mask=decay_mask)

    parts = []
    if clip:
        parts.append(optax.clip_by_global_norm(float(clip)))
    parts.append(optax.inject_hyperparams(adamw)(learning_rate=schedule))
    return optax.chain(*parts)


def current_lr(opt_state: Any) -> jax.Array | None:
    """The learning rate of the last update stored in an optimizer state: the `learning_rate` entry of
    its (single) injected-hyper-parameter state; None when there is none or more than one."""
    found = []

    def visit(x):
        hp = getattr(x, "hyperparams", None)
        if isinstance(hp, dict) and "learning_rate" in hp:
            found.append(hp["learning_rate"])
            return True
        return False

    jax.tree_util.tree_flatten(opt_state, is_leaf=visit)
    return found[0] if len(found) == 1 else None


__all__ = ["SCHEDULES", "make_schedule", "decay_mask", "make_optimizer", "current_lr"]
