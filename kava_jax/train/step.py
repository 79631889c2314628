"""The train step and its ahead-of-time sharded compilation.

`make_train_step(obj_cfg, optimizer, grad_accum)` returns a pure
    step(state: TrainState, frozen: params tree, batch: {BATCH_KEYS: [B, ...]}) -> (state, metrics)
that differentiates `kava_loss` with respect to `state.trainable` only, applies the optimizer and
returns scalar float32 metrics: every term of `kava_loss` plus `grad_norm` (before clipping) and `lr`
(the learning rate of this update).

`compile_train_step` jits it with in/out NamedShardings over a ("data", "fsdp", "tensor") mesh,
donates the state, lowers it on abstract arguments (ShapeDtypeStructs; no array is created or moved,
so devices of a TPU topology description work too), compiles once and reports memory per device.
"""

from __future__ import annotations

import logging
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from kava_jax.kava.objective import ObjectiveConfig, kava_loss
from kava_jax.models import ModelConfig
from kava_jax.train import sharding as sh
from kava_jax.train.optim import current_lr
from kava_jax.train.state import TrainState, train_state_shardings

log = logging.getLogger(__name__)


def _leading_dim(batch: dict, grad_accum: int) -> int:
    sizes = {k: (v.shape[0] if v.ndim else None) for k, v in batch.items()}
    dims = set(sizes.values())
    if len(dims) != 1 or None in dims:
        raise ValueError(f"train step: every batch array needs the same leading batch dim, got {sizes}")
    b = dims.pop()
    if b % grad_accum:
        raise ValueError(f"train.grad_accum={grad_accum} does not divide the batch size {b}")
    return b


def make_train_step(obj_cfg: ObjectiveConfig, optimizer: optax.GradientTransformation, grad_accum: int = 1):
    """The train step for `obj_cfg` (static) and `optimizer`.

    grad_accum > 1 splits the batch [B, ...] into G = grad_accum micro-batches of B/G rows and runs
    them with `lax.scan`, averaging gradients and metrics. Micro-batch g holds rows g, g+G, g+2G, ...
    (strided, so every micro-batch stays spread over the devices that share the batch dim). Each
    micro-batch loss is normalised within the micro-batch (as optax.MultiSteps / HF Trainer do), so
    the update equals the full-batch one whenever those normalisers match (equal valid-token and
    slot counts per micro-batch, no batch-statistic terms such as the CODI σ).

    LoRA dropout (model.lora.dropout > 0) draws from fold_in(state.rng, state.step) (split per
    micro-batch); with dropout 0 the loss is deterministic.

    The returned function carries `.obj_cfg`, `.optimizer` and `.grad_accum` for `compile_train_step`.
    """
    if isinstance(grad_accum, bool) or not isinstance(grad_accum, int) or grad_accum < 1:
        raise ValueError(f"train.grad_accum must be an int >= 1, got {grad_accum!r}")
    mc = obj_cfg.model
    use_dropout = mc.lora.rank > 0 and mc.lora.dropout > 0

    def loss_fn(trainable, frozen, batch, rng):
        return kava_loss(trainable, frozen, batch, obj_cfg, rng)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, frozen: Any, batch: dict) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state.rng, state.step) if use_dropout else None
        if grad_accum == 1:
            (_, metrics), grads = grad_fn(state.trainable, frozen, batch, rng)
        else:
            g = grad_accum
            b = _leading_dim(batch, g)
            # [B, ...] -> [B/G, G, ...] -> [G, B/G, ...]: micro-batch i = rows i, i+G, ...
            micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(b // g, g, *x.shape[1:]), 0, 1), batch)
            rngs = None if rng is None else jax.random.split(rng, g)

            def body(acc, xs):
                mb, r = xs
                (_, m), gr = grad_fn(state.trainable, frozen, mb, r)
                return jax.tree.map(jnp.add, acc, gr), m

            zeros = jax.tree.map(jnp.zeros_like, state.trainable)
            grads, stacked = jax.lax.scan(body, zeros, (micro, rngs))
            grads = jax.tree.map(lambda x: x / g, grads)
            metrics = jax.tree.map(lambda x: jnp.mean(x, axis=0), stacked)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        lr = current_lr(opt_state)
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        metrics["grad_norm"] = grad_norm.astype(jnp.float32)
        metrics["lr"] = jnp.asarray(jnp.nan if lr is None else lr, jnp.float32)
        new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
        return new_state, metrics

    step.obj_cfg = obj_cfg
    step.optimizer = optimizer
    step.grad_accum = grad_accum
    return step


# ------------------------------------------------------------------------------------ compile
class StepShardings(NamedTuple):
    """NamedSharding trees of the step's arguments and outputs (metrics: one replicated sharding)."""

    state: TrainState
    frozen: Any
    batch: Any
    metrics: NamedSharding


class CompiledStep(NamedTuple):
    """compiled(state, frozen, batch) -> (state, metrics); shardings to place the inputs with;
    memory: bytes per device (`memory_stats`); seconds: {"lower", "compile"}."""

    compiled: Any
    shardings: StepShardings
    memory: dict[str, int]
    seconds: dict[str, float]


def step_shardings(step_fn, mesh: Mesh, state_abstract: TrainState, frozen_abstract: Any, batch_abstract: Any,
                   rules: Any = None, *, model_config: ModelConfig | None = None) -> StepShardings:
    """Shardings of every step argument from the logical rules (model config from `step_fn.obj_cfg`)."""
    mc = model_config if model_config is not None else getattr(getattr(step_fn, "obj_cfg", None), "model", None)
    if mc is None:
        raise ValueError("step_shardings: pass model_config= (step_fn has no .obj_cfg from make_train_step)")
    state_sh = train_state_shardings(state_abstract, mesh, mc, rules)
    frozen_sh = sh.logical_shardings(sh.params_logical_axes(frozen_abstract, mc), frozen_abstract, mesh, rules)
    batch_sh = sh.batch_shardings(batch_abstract, mesh, rules)
    return StepShardings(state_sh, frozen_sh, batch_sh, sh.replicated(mesh))


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def lower_train_step(step_fn, mesh: Mesh, state_abstract: TrainState, frozen_abstract: Any, batch_abstract: Any,
                     rules: Any = None, *, model_config: ModelConfig | None = None,
                     shardings: StepShardings | None = None) -> tuple[jax.stages.Lowered, StepShardings]:
    """jax.jit(step_fn, in/out shardings, donate the state).lower(...) on abstract arguments, traced
    inside `sharding.activation_sharding(mesh, rules)` (activates the model's logical constraints).

    The abstract trees may hold ShapeDtypeStructs or arrays (only shape and dtype are read).
    """
    if shardings is None:
        shardings = step_shardings(step_fn, mesh, state_abstract, frozen_abstract, batch_abstract, rules,
                                   model_config=model_config)
    # A fresh wrapper per call: jax caches traces per function and flax's logical rules (activated in
    # `activation_sharding`) are not part of that cache key.
    def sharded_step(state, frozen, batch):
        return step_fn(state, frozen, batch)

    jitted = jax.jit(sharded_step, in_shardings=(shardings.state, shardings.frozen, shardings.batch),
                     out_shardings=(shardings.state, shardings.metrics), donate_argnums=(0,))
    args = (_abstract(state_abstract, shardings.state), _abstract(frozen_abstract, shardings.frozen),
            _abstract(batch_abstract, shardings.batch))
    with sh.activation_sharding(mesh, rules):
        lowered = jitted.lower(*args)
    return lowered, shardings


def memory_stats(compiled: Any) -> dict[str, int]:
    """Per-device bytes of a compiled step: argument, output, alias (donated), temp, generated code,
    and total = argument + output - alias + temp. Empty when the backend reports nothing."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {name: int(getattr(m, f"{name}_size_in_bytes", 0) or 0)
           for name in ("argument", "output", "alias", "temp", "generated_code")}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def _fmt(n: int) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def compile_train_step(step_fn, mesh: Mesh, state_abstract: TrainState, frozen_abstract: Any, batch_abstract: Any,
                       rules: Any = None, *, model_config: ModelConfig | None = None,
                       shardings: StepShardings | None = None,
                       compiler_options: dict[str, Any] | None = None) -> CompiledStep:
    """Lowers and compiles the sharded step once; logs and returns its per-device memory analysis.

    Returns CompiledStep(compiled, shardings, memory, seconds). Call `compiled(state, frozen, batch)`
    with arrays placed as `shardings.state / .frozen / .batch`; the state argument is donated.
    `compiler_options` go to XLA (e.g. {"xla_backend_optimization_level": 0} for quick CPU compiles).
    """
    t0 = time.perf_counter()
    lowered, shardings = lower_train_step(step_fn, mesh, state_abstract, frozen_abstract, batch_abstract, rules,
                                          model_config=model_config, shardings=shardings)
    t1 = time.perf_counter()
    compiled = lowered.compile(compiler_options)
    t2 = time.perf_counter()
    memory = memory_stats(compiled)
    seconds = {"lower": t1 - t0, "compile": t2 - t1}
    log.info("train step compiled on mesh %s in %.1f s (lower %.1f s); per device: %s", dict(mesh.shape),
             t2 - t0, t1 - t0, ", ".join(f"{k} {_fmt(v)}" for k, v in memory.items()) or "no memory analysis")
    return CompiledStep(compiled, shardings, memory, seconds)


__all__ = ["make_train_step", "StepShardings", "CompiledStep", "step_shardings", "lower_train_step",
           "memory_stats", "compile_train_step"]
