"""The training objectives (METHOD §4): `kava_loss(trainable, frozen, batch, config, rng)`.

    L = w_s · CE_student + w_t · CE_teacher + α₁ · L_CODI + α₂ · L_KV

Every term and weight comes from `ObjectiveConfig`, so the baselines are config choices:
* `kava`   Jacobi latents, α₂ > 0 (the paper),
* `pccot`  Jacobi latents, no KV loss (α₂ ignored),
* `codi`   sequential latents (one per step), no KV loss (α₂ ignored),
* `cot`    teacher CE only (the full-CoT baseline, and how a tiny backbone is made),
* `nocot`  CE on question → answer with the CoT block masked out.

Trainable tree: {"lora": LoRA leaves} (train.mode "lora") or {"params": all base params} ("full"),
plus "prj" (possibly empty) and "special_embed" [n_special, D] (rows of <bot>, <eot>, <latent>).
Frozen tree: the base params (without LoRA leaves) in "lora" mode, {} in "full" mode.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from kava_jax.kava import compress as compress_lib
from kava_jax.kava.losses import codi_loss, cosine_similarity_metric, kv_loss, masked_cross_entropy
from kava_jax.kava.student import student_pass, with_special_rows
from kava_jax.kava.teacher import take_positions, teacher_pass
from kava_jax.models import ModelConfig, forward, merge_trees, rope_inv_freq

OBJECTIVES = ("kava", "pccot", "codi", "cot", "nocot")
LATENT_OBJECTIVES = ("kava", "pccot", "codi")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Static (hashable) settings of the objective; built from the `kava` section of a run config."""

    model: ModelConfig
    objective: str = "kava"
    num_latents: int = 24
    num_iterations: int = 3
    latent_mode: str = "jacobi"
    use_prj: bool = True
    special_ids: tuple[int, int, int] = (0, 0, 0)  # (<bot>, <eot>, <latent>)
    cot_len: int = 64
    student_ce_weight: float = 1.0
    teacher_ce_weight: float = 1.0
    alpha_codi: float = 10.0
    alpha_kv: float = 1.0
    codi_loss_type: str = "smooth_l1"
    kv_loss_type: str = "smooth_l1"
    layerwise_std: bool = True
    kv_reduction: str = "mean"
    compression: str = "rkv"
    lam: float = 0.1
    pre_rope: bool = False
    redundancy_chunk: int | None = None
    remat_latent_scan: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def need(cond, field, msg):
            if not cond:
                raise ValueError(f"kava.{field}: {msg}")

        need(self.objective in OBJECTIVES, "objective", f"must be one of {OBJECTIVES}, got {self.objective!r}")
        need(self.num_latents >= 1, "num_latents", f"M must be >= 1, got {self.num_latents}")
        need(self.num_iterations >= 0, "num_iterations", f"T must be >= 0, got {self.num_iterations}")
        need(self.latent_mode in ("jacobi", "sequential"), "latent_mode",
             f"must be 'jacobi' or 'sequential', got {self.latent_mode!r}")
        need(0.0 <= self.lam <= 1.0, "lam", f"λ must be in [0, 1], got {self.lam}")
        need(self.compression in compress_lib.MODES, "compression",
             f"must be one of {compress_lib.MODES}, got {self.compression!r}")
        for f in ("codi_loss_type", "kv_loss_type"):
            need(getattr(self, f) in ("smooth_l1", "l1", "mse"), f,
                 f"must be smooth_l1, l1 or mse, got {getattr(self, f)!r}")
        need(self.kv_reduction in ("mean", "sum_2m"), "kv_reduction",
             f"must be 'mean' or 'sum_2m', got {self.kv_reduction!r}")
        for f in ("student_ce_weight", "teacher_ce_weight", "alpha_codi", "alpha_kv"):
            need(getattr(self, f) >= 0, f, f"must be >= 0, got {getattr(self, f)}")
        need(self.cot_len >= 1, "cot_len", f"must be >= 1, got {self.cot_len}")

    @property
    def uses_student(self) -> bool:
        return self.objective in LATENT_OBJECTIVES

    @property
    def uses_kv_loss(self) -> bool:
        return self.objective == "kava" and self.alpha_kv > 0


def model_params(trainable: dict, frozen: dict, cfg: ObjectiveConfig) -> dict:
    """The decoder params the objective runs: base + LoRA (or full) with the special rows patched in."""
    if "params" in trainable:
        params = trainable["params"]
    else:
        params = merge_trees(frozen, trainable.get("lora", {}))
    if "special_embed" in trainable:
        params = with_special_rows(params, cfg.special_ids, trainable["special_embed"])
    return params


def _latent_kwargs(cfg: ObjectiveConfig) -> dict[str, Any]:
    mode = "sequential" if cfg.objective == "codi" else cfg.latent_mode
    return dict(mode=mode, num_latents=cfg.num_latents, num_iterations=cfg.num_iterations,
                latent_id=cfg.special_ids[2], remat_scan=cfg.remat_latent_scan)


def kava_loss(trainable: dict, frozen: dict, batch: dict, cfg: ObjectiveConfig,
              rng: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Scalar loss and a dict of scalar metrics for one batch (BATCH_LAYOUT arrays).

    `rng` enables LoRA dropout; None runs deterministically.
    """
    params = model_params(trainable, frozen, cfg)
    mc = cfg.model
    rngs = [None, None] if rng is None else list(jax.random.split(rng, 2))
    metrics: dict[str, jax.Array] = {}

    if cfg.objective == "nocot":
        out = forward(params, mc, batch["teacher_ids"], attention_mask=batch["nocot_valid"].astype(bool),
                      dropout_rng=rngs[0])
        ce = masked_cross_entropy(out.logits, batch["nocot_targets"], batch["nocot_loss_mask"])
        return ce, {"loss": ce, "ce_nocot": ce}

    teacher = teacher_pass(params, mc, batch, cot_len=cfg.cot_len, dropout_rng=rngs[0])
    metrics["ce_teacher"] = teacher.ce
    loss = cfg.teacher_ce_weight * teacher.ce
    if not cfg.uses_student:
        metrics["loss"] = loss
        return loss, metrics

    student = student_pass(params, mc, batch, trainable.get("prj", {}), dropout_rng=rngs[1], **_latent_kwargs(cfg))
    ce_s = masked_cross_entropy(student.answer_logits, batch["student_answer_targets"],
                                batch["student_answer_loss_mask"])
    s_hidden = take_positions(student.answer_hidden[1:], batch["student_distill_idx"])
    codi = codi_loss(s_hidden, teacher.distill_hidden, loss_type=cfg.codi_loss_type,
                     layerwise_std=cfg.layerwise_std, example_valid=batch.get("example_valid"))
    loss = loss + cfg.student_ce_weight * ce_s + cfg.alpha_codi * codi
    metrics.update(ce_student=ce_s, codi=codi,
                   teacher_hidden_std=jnp.std(teacher.distill_hidden.astype(jnp.float32)))

    if cfg.uses_kv_loss:
        target = compress_lib.compress_teacher_kv(
            teacher.cot_kv.k, teacher.cot_kv.v, teacher.answer_queries, teacher.answer_valid, teacher.cot_valid,
            m=cfg.num_latents, lam=cfg.lam, mode=cfg.compression, pre_rope=cfg.pre_rope,
            key_positions=teacher.cot_positions, inv_freq=rope_inv_freq(mc), chunk_size=cfg.redundancy_chunk)
        student_k = student.latent_kv.k
        if cfg.pre_rope:
            pos = student.latent_positions
            student_k = compress_lib.unrotate_keys(student_k, pos, rope_inv_freq(mc))
        kvl = kv_loss(student_k, student.latent_kv.v, target.k, target.v, target.slot_valid,
                      loss_type=cfg.kv_loss_type, layerwise_std=cfg.layerwise_std, reduction=cfg.kv_reduction)
        loss = loss + cfg.alpha_kv * kvl
        metrics.update(
            kv=kvl,
            valid_slot_fraction=jnp.mean(target.slot_valid.astype(jnp.float32)),
            teacher_k_std=jnp.std(target.k.astype(jnp.float32)),
            teacher_v_std=jnp.std(target.v.astype(jnp.float32)),
            cos_k=cosine_similarity_metric(student_k, target.k, target.slot_valid),
            cos_v=cosine_similarity_metric(student.latent_kv.v, target.v, target.slot_valid),
        )
    metrics["loss"] = loss
    return loss, metrics


def init_trainable(rng: jax.Array, params: dict, cfg: ObjectiveConfig, *, mode: str = "lora") -> tuple[dict, dict]:
    """Splits decoder params into (trainable, frozen) and adds `prj` and `special_embed`.

    mode "lora": trainable = LoRA leaves (params must have been initialised with lora.rank > 0);
    mode "full": trainable = all params. Special rows start from the current embedding rows.
    """
    from kava_jax.kava.student import init_prj
    from kava_jax.models import split_lora

    if mode not in ("lora", "full"):
        raise ValueError(f"train.mode must be 'lora' or 'full', got {mode!r}")
    base, lora = split_lora(params)
    if mode == "lora":
        if not lora and cfg.model.lora.rank == 0:
            raise ValueError("train.mode='lora' needs model.lora_rank > 0 (the model has no LoRA params)")
        trainable, frozen = {"lora": lora}, base
    else:
        trainable, frozen = {"params": params}, {}
    trainable["special_embed"] = params["embed"]["embedding"][jnp.asarray(cfg.special_ids)]
    trainable["prj"] = init_prj(rng, cfg.model.hidden_size, cfg.use_prj and cfg.uses_student,
                                dtype=cfg.model.weights_dtype)
    return trainable, frozen
