"""The train state: step, trainable tree, its optimizer state and the base RNG; and its shardings.

The frozen base params are not part of the state: they are a separate (never differentiated, never
donated) argument of the step and reload from their HF directory on resume.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from kava_jax.models import ModelConfig
from kava_jax.train import sharding as sh


@struct.dataclass
class TrainState:
    """step int32 []; trainable (see `kava.objective.init_trainable`); opt_state for `trainable` only;
    rng uint32 [2] raw key data (the step folds in `step`, so the state's key never changes)."""

    step: jax.Array
    trainable: Any
    opt_state: Any
    rng: jax.Array


def _raw_key(rng: jax.Array) -> jax.Array:
    rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    if rng.dtype != jnp.uint32 or rng.ndim != 1:
        raise ValueError(f"create_train_state: rng must be a jax.random key, got dtype {rng.dtype} shape {rng.shape}")
    return rng


def create_train_state(trainable: Any, optimizer: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    """A step-0 state: optimizer initialised on `trainable`; `rng` a typed or raw jax.random key."""
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=optimizer.init(trainable),
                      rng=_raw_key(rng))


def abstract_train_state(trainable_abstract: Any, optimizer: optax.GradientTransformation) -> TrainState:
    """ShapeDtypeStructs of `create_train_state` for an abstract (or concrete) trainable tree."""
    return jax.eval_shape(lambda t: create_train_state(t, optimizer, jax.random.key(0)), trainable_abstract)


def train_state_shardings(state_abstract: TrainState, mesh: Mesh, model_config: ModelConfig,
                          rules: Any = None) -> TrainState:
    """TrainState of NamedShardings: trainable leaves from their logical axes, optimizer-state leaves
    following the param they mirror (`sharding.opt_state_shardings`), step and rng replicated."""
    trainable_sh = sh.logical_shardings(sh.trainable_logical_axes(state_abstract.trainable, model_config),
                                        state_abstract.trainable, mesh, rules)
    opt_sh = sh.opt_state_shardings(state_abstract.opt_state, trainable_sh, state_abstract.trainable, mesh)
    rep = sh.replicated(mesh)
    return TrainState(step=rep, trainable=trainable_sh, opt_state=opt_sh, rng=rep)


__all__ = ["TrainState", "create_train_state", "abstract_train_state", "train_state_shardings"]
