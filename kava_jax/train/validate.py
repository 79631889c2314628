"""Run-config validation (before anything is built or compiled) and the ObjectiveConfig it implies.

`validate_config(config, num_devices=None)` checks every section of a run config (configs/base.py)
and raises one ValueError per problem, each message starting with the dotted field name, e.g.
"config.kava.lam: must be in [0, 1], got 1.5". `objective_config(config, model_config, special_ids)`
turns the `kava` section (plus data.cot_len) into the static `ObjectiveConfig` of the train step.

Nothing here touches devices unless the mesh check needs the device count (`num_devices=None` asks
`jax.device_count()`, so call it after `jax.distributed.initialize()` on multi-host runs).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from kava_jax.kava import compress as compress_lib
from kava_jax.kava.objective import OBJECTIVES, ObjectiveConfig
from kava_jax.models import PRESETS, ModelConfig
from kava_jax.models.config import LORA_TARGETS, REMAT_POLICIES

__all__ = [
    "LATENT_MODES",
    "LOSS_TYPES",
    "SCHEMAS",
    "SCHEDULES",
    "TRACES",
    "TRAIN_MODES",
    "data_parallel_size",
    "objective_config",
    "validate_config",
]

TRAIN_MODES = ("lora", "full")
SCHEDULES = ("cosine", "linear", "constant")
LOSS_TYPES = ("smooth_l1", "l1", "mse")
LATENT_MODES = ("jacobi", "sequential")
KV_REDUCTIONS = ("mean", "sum_2m")
SCHEMAS = ("auto", "steps", "cot", "nl", "gsm8k")
TRACES = ("equation", "nl")
SECTIONS = ("model", "data", "kava", "train", "mesh", "eval")


class _Checker:
    """Collects nothing: raises at the first failed check, naming the field."""

    def __init__(self, config: Any):
        self.config = config

    def get(self, path: str) -> Any:
        node = self.config
        for part in path.split("."):
            if isinstance(node, Mapping) or hasattr(node, "keys"):
                if part not in node:
                    raise ValueError(f"config.{path}: missing (every run config starts from configs/base.py)")
                node = node[part]
            else:
                raise ValueError(f"config.{path}: missing (its parent is not a section)")
        return node

    @staticmethod
    def fail(path: str, msg: str):
        raise ValueError(f"config.{path}: {msg}")

    def int_(self, path: str, lo: int | None = None, *, optional: bool = False) -> int | None:
        v = self.get(path)
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            self.fail(path, f"must be an int{' or None' if optional else ''}, got {v!r}")
        if lo is not None and v < lo:
            self.fail(path, f"must be >= {lo}, got {v}")
        return int(v)

    def num(self, path: str, lo: float | None = None, hi: float | None = None, *, lo_open=False, hi_open=False,
            optional: bool = False) -> float | None:
        v = self.get(path)
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
            self.fail(path, f"must be a finite number{' or None' if optional else ''}, got {v!r}")
        v = float(v)
        bad_lo = lo is not None and (v <= lo if lo_open else v < lo)
        bad_hi = hi is not None and (v >= hi if hi_open else v > hi)
        if bad_lo or bad_hi:
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            rng = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
            self.fail(path, f"must be in {rng}, got {v}")
        return v

    def choice(self, path: str, options) -> str:
        v = self.get(path)
        if v not in options:
            self.fail(path, f"must be one of {tuple(options)}, got {v!r}")
        return v

    def bool_(self, path: str) -> bool:
        v = self.get(path)
        if not isinstance(v, bool):
            self.fail(path, f"must be True or False, got {v!r}")
        return v

    def str_(self, path: str, *, optional: bool = False) -> str | None:
        v = self.get(path)
        if v is None and optional:
            return None
        if not isinstance(v, str) or not v.strip():
            self.fail(path, f"must be a non-empty string{' or None' if optional else ''}, got {v!r}")
        return v


def data_parallel_size(mesh_cfg: Any, num_devices: int) -> int:
    """data * fsdp of the mesh the config asks for (the number of batch shards)."""
    from kava_jax.train.sharding import mesh_shape

    data, fsdp, _ = mesh_shape(mesh_cfg, num_devices)
    return data * fsdp


def validate_config(config: Any, num_devices: int | None = None) -> None:
    """Raises ValueError("config.<field>: ...") for the first invalid field of a run config.

    Checks types and ranges of every field, known choices (objective, loss types, compression,
    schedule, train.mode, remat, latent mode, data schema/trace), that the model source is
    unambiguous, LoRA settings when train.mode == "lora", and that train.batch_size is divisible by
    train.grad_accum x (mesh data x fsdp) so each micro-batch splits evenly over the batch shards.
    num_devices: devices the mesh must cover (None: jax.device_count()).
    """
    c = _Checker(config)
    for section in SECTIONS:
        c.get(section)
    c.int_("seed", 0)
    c.bool_("distributed")

    # ------------------------------------------------------------------ model
    hf_path = c.str_("model.hf_path", optional=True)
    init_from = c.str_("model.init_from", optional=True)
    if hf_path and init_from:
        c.fail("model.init_from", f"set either model.hf_path or model.init_from, not both (got {hf_path!r} and "
                                  f"{init_from!r})")
    if not hf_path and not init_from:
        c.choice("model.preset", sorted(PRESETS))
    c.str_("model.tokenizer")
    overrides = c.get("model.overrides")
    if overrides is not None:
        fields = set(ModelConfig.__dataclass_fields__) - {"lora"}
        for key in overrides.keys():
            if key not in fields:
                c.fail(f"model.overrides.{key}", f"is not a ModelConfig field; known: {sorted(fields)}")
    mode = c.choice("train.mode", TRAIN_MODES)
    rank = c.int_("model.lora_rank", 0)
    if mode == "lora" and rank < 1:
        c.fail("model.lora_rank", f"must be > 0 when train.mode == 'lora', got {rank}")
    c.num("model.lora_alpha", 0.0, lo_open=True)
    c.num("model.lora_dropout", 0.0, 1.0, hi_open=True)
    targets = c.get("model.lora_targets")
    if isinstance(targets, str) or not all(t in LORA_TARGETS for t in targets) or not len(targets):
        c.fail("model.lora_targets", f"must be a non-empty tuple from {LORA_TARGETS}, got {targets!r}")
    for f in ("dtype", "param_dtype"):
        v = c.get(f"model.{f}")
        try:
            jnp.dtype(v)
        except TypeError:
            c.fail(f"model.{f}", f"is not a dtype name, got {v!r}")
        if not jnp.issubdtype(jnp.dtype(v), jnp.floating):
            c.fail(f"model.{f}", f"must be a floating dtype, got {v!r}")
    c.choice("model.remat", REMAT_POLICIES)

    # ------------------------------------------------------------------ data
    c.str_("data.source")
    c.choice("data.schema", SCHEMAS)
    c.choice("data.trace", TRACES)
    c.str_("data.split")
    c.int_("data.max_records", 1, optional=True)
    c.bool_("data.strict")
    c.bool_("data.truncate")
    c.int_("data.q_len", 2)
    c.int_("data.cot_len", 1)
    c.int_("data.answer_len", 3)
    if c.get("data.source") == "synthetic":
        c.int_("data.synthetic.n_train", 1)
        c.int_("data.synthetic.n_test", 0)
        lo = c.int_("data.synthetic.min_steps", 1)
        hi = c.int_("data.synthetic.max_steps", 1)
        if hi < lo:
            c.fail("data.synthetic.max_steps", f"must be >= data.synthetic.min_steps={lo}, got {hi}")
        c.int_("data.synthetic.max_operand", 1)
        c.int_("data.synthetic.max_value", 2)
        c.int_("data.synthetic.seed", 0)

    # ------------------------------------------------------------------ kava
    c.choice("kava.objective", OBJECTIVES)
    c.int_("kava.num_latents", 1)
    c.int_("kava.num_iterations", 0)
    c.choice("kava.latent_mode", LATENT_MODES)
    c.bool_("kava.use_prj")
    for f in ("student_ce_weight", "teacher_ce_weight", "alpha_codi", "alpha_kv"):
        c.num(f"kava.{f}", 0.0)
    c.choice("kava.codi_loss_type", LOSS_TYPES)
    c.choice("kava.kv_loss_type", LOSS_TYPES)
    c.bool_("kava.layerwise_std")
    c.choice("kava.kv_reduction", KV_REDUCTIONS)
    c.choice("kava.compression", compress_lib.MODES)
    c.num("kava.lam", 0.0, 1.0)
    c.bool_("kava.pre_rope")
    c.int_("kava.redundancy_chunk", 1, optional=True)
    c.bool_("kava.remat_latent_scan")

    # ------------------------------------------------------------------ train
    batch = c.int_("train.batch_size", 1)
    c.int_("train.num_epochs", 1)
    c.int_("train.num_steps", 1, optional=True)
    c.num("train.lr", 0.0, lo_open=True)
    c.choice("train.schedule", SCHEDULES)
    c.num("train.warmup_frac", 0.0, 1.0, hi_open=True)
    c.num("train.weight_decay", 0.0)
    c.num("train.b1", 0.0, 1.0, hi_open=True)
    c.num("train.b2", 0.0, 1.0, hi_open=True)
    c.num("train.eps", 0.0, lo_open=True)
    c.num("train.grad_clip", 0.0, optional=True)
    accum = c.int_("train.grad_accum", 1)
    c.int_("train.log_every", 1)
    c.int_("train.checkpoint_every", 1)
    c.int_("train.keep_checkpoints", 1)
    c.int_("train.eval_every", 1, optional=True)
    if batch % accum:
        c.fail("train.batch_size", f"{batch} is not divisible by train.grad_accum={accum}")

    # ------------------------------------------------------------------ mesh
    for f in ("data", "fsdp", "tensor"):
        v = c.get(f"mesh.{f}")
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or (v != -1 and v < 1):
            c.fail(f"mesh.{f}", f"must be an int >= 1 or -1 (inferred), got {v!r}")
    rules = c.get("mesh.rules")
    if isinstance(rules, str) or not all(not isinstance(r, str) and len(r) == 2 for r in rules):
        c.fail("mesh.rules", f"must be a tuple of (logical_name, mesh_axes) pairs, got {rules!r}")
    if num_devices is None:
        import jax

        num_devices = jax.device_count()
    try:
        dp = data_parallel_size(c.get("mesh"), num_devices)
    except ValueError as e:
        msg = str(e)
        raise ValueError(f"config.{msg}" if msg.startswith("mesh.") else f"config.mesh: {msg}") from None
    if (batch // accum) % dp or batch % accum:
        c.fail("train.batch_size", f"{batch} must be divisible by train.grad_accum ({accum}) x the data-parallel "
                                   f"size mesh.data x mesh.fsdp ({dp}) = {accum * dp}, so every micro-batch "
                                   "splits evenly over the batch shards")

    # ------------------------------------------------------------------ eval
    c.int_("eval.batch_size", 1)
    c.int_("eval.max_answer_tokens", 1)
    c.int_("eval.max_cot_tokens", 1)
    c.int_("eval.limit", 1, optional=True)


def objective_config(config: Any, model_config: ModelConfig, special_ids: tuple[int, int, int]) -> ObjectiveConfig:
    """The static ObjectiveConfig of a run: the `kava` section, data.cot_len (C) and the model.

    special_ids: (<bot>, <eot>, <latent>) token ids.
    """
    k = config.kava
    ids = tuple(int(i) for i in special_ids)
    if len(ids) != 3 or len(set(ids)) != 3 or min(ids) < 0:
        raise ValueError(f"objective_config: special_ids must be 3 distinct ids (<bot>, <eot>, <latent>), got {ids}")
    if max(ids) >= model_config.vocab_size:
        raise ValueError(f"objective_config: special id {max(ids)} is outside the model vocabulary "
                         f"(vocab_size {model_config.vocab_size})")
    chunk = k.redundancy_chunk
    try:
        return ObjectiveConfig(
            model=model_config,
            objective=k.objective,
            num_latents=int(k.num_latents),
            num_iterations=int(k.num_iterations),
            latent_mode=k.latent_mode,
            use_prj=bool(k.use_prj),
            special_ids=ids,
            cot_len=int(config.data.cot_len),
            student_ce_weight=float(k.student_ce_weight),
            teacher_ce_weight=float(k.teacher_ce_weight),
            alpha_codi=float(k.alpha_codi),
            alpha_kv=float(k.alpha_kv),
            codi_loss_type=k.codi_loss_type,
            kv_loss_type=k.kv_loss_type,
            layerwise_std=bool(k.layerwise_std),
            kv_reduction=k.kv_reduction,
            compression=k.compression,
            lam=float(k.lam),
            pre_rope=bool(k.pre_rope),
            redundancy_chunk=None if chunk is None else int(chunk),
            remat_latent_scan=bool(k.remat_latent_scan),
        )
    except ValueError as e:  # ObjectiveConfig names its field as "kava.<field>: ..."
        raise ValueError(f"config.{e}") from None
