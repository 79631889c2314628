"""Analytic FLOP count of one KaVa train step, chip peaks and MFU.

`train_step_flops(model_config, objective_config, batch_size=, q_len=, answer_len=, train_mode=)`
counts the matrix-multiply FLOPs (2 per multiply-add) of the step that `train.step.make_train_step`
builds: the forward passes of `kava.objective.kava_loss`, their backward, and (separately) what
rematerialisation recomputes. It never asks XLA (`cost_analysis` counts a loop body once); the test
suite checks it against the dot instructions of the optimised, loop-unrolled CPU program.

What is counted. Shapes: B batch rows, L layers, D hidden, N query / K KV heads of dim H, F MLP,
V vocab, r LoRA rank; per token and layer the projections cost
    lin  = 2·(D·N·H [q] + 2·D·K·H [k, v] + N·H·D [o] + 3·D·F [gate, up, down])
    lora = 2·r·(in + out) summed over the LoRA targets (0 in full fine-tuning)
and a pass of t new tokens per row attending to s keys (prefix cache + the t new ones; the model
computes the full masked t×s score matrix, no causal skipping) costs per row
    L·(t·(lin + lora) + 4·N·H·t·s) + (positions whose logits are used)·2·D·V.
Passes (Q question block incl. BOS, C CoT block, R answer block, M latents, T Jacobi iterations):
    teacher            t = Q+C+R, s = Q+C+R, logits at all Q+C+R    (cot, codi, pccot, kava)
    nocot              same shape, the CoT block masked out          (nocot only)
    student prefill    jacobi: t = s = Q+1+M;  sequential: t = s = Q+1       (no logits used)
    Jacobi passes      T times t = M, s = Q+1+M                                  (no logits used)
    sequential steps   M times t = 1, s = Q+1+M+1 (a fixed KV buffer)            (no logits used)
    answer             t = 1+R, s = Q+1+M+1+R, logits at all 1+R
The logits of the latent passes are computed by `forward` but never used; XLA removes them as dead
code, so they are not counted. `prj` (two D×D matmuls per position): jacobi M + T·(M-1) positions,
sequential M+1. Compression (kava only, stop-gradient, forward only): importance 2·L·B·R·N·H·C,
redundancy 4·L·B·C·K·H (factored) or 2·L·B·K·C²·H (kava.redundancy_chunk set); "cosine" drops the
first, "attention" the second, "crop" both. Elementwise work (norms, RoPE, softmax, losses, AdamW)
is not counted: it is memory-bound and < 1 % of the matmul FLOPs for the paper's backbones.

Backward (every pass is differentiated: each feeds a loss term, and with `special_embed` trainable
even the token embeddings depend on trainable parameters, so activation gradients flow through every
layer of every pass):
    frozen base weights (LoRA mode): activation gradient only        -> 1 × forward of `lin`
    trained base weights (full mode): activation + weight gradient   -> 2 × forward of `lin`
    LoRA A and B, prj:                activation + weight gradient   -> 2 × forward
    attention scores and values:      gradients of q, k and v        -> 2 × forward
    LM head: activation gradient, plus the weight gradient when the head is trained (full mode) or
    tied to the embedding table: the table then depends on the trainable `special_embed` rows and
    autodiff forms the full [V, D] table gradient before picking those rows   -> 1 or 2 × forward
So full fine-tuning costs 3 × forward and LoRA 2 × forward of the base + 3 × forward of the adapters
(plus the tied-head weight gradient). `model` = forward + backward is the figure for MFU.

Recompute (`executed` = `model` + `recompute`; for the roofline): model.remat "full" re-runs every
block's forward (projections, LoRA, attention) in the backward of each pass, except the `down`
projection and its LoRA B matmul, whose outputs only feed the residual sum (autodiff prunes them from
the recomputation); "dots" saves every matmul output (no matmul recompute); "dots_no_batch" saves the
projections but not the batched attention matmuls (their forward is recomputed);
kava.remat_latent_scan additionally re-runs each latent pass (Jacobi pass or sequential step, with its
prj) once. These rules match the compiled CPU program exactly (tests/test_plan.py; also checked for
codi, sequential kava and remat_latent_scan with remat none / full).

Tokens per step: B·(Q+C+R), the teacher sequence (the padded form of what `kava-train` logs as
tokens/s, which counts valid teacher tokens).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, NamedTuple

from kava_jax.models import ModelConfig

__all__ = ["ChipSpec", "CHIPS", "Pass", "PartFlops", "StepFlops", "chip_spec", "chip_peak", "mfu",
           "decoder_passes", "train_step_flops", "config_step_flops", "objective_flops_table"]


# ------------------------------------------------------------------------------------------ chips
class ChipSpec(NamedTuple):
    """One TPU chip (ENVIRONMENT.md, TPU figures): bf16 peak FLOP/s, HBM bytes/s, HBM bytes."""

    name: str
    peak_bf16: float
    hbm_bandwidth: float
    hbm_bytes: int


GiB = 2**30
CHIPS: dict[str, ChipSpec] = {
    "v4": ChipSpec("v4", 275e12, 1.2e12, 32 * GiB),
    "v5e": ChipSpec("v5e", 197e12, 0.82e12, 16 * GiB),
    "v5p": ChipSpec("v5p", 459e12, 2.77e12, 95 * GiB),
    "v6e": ChipSpec("v6e", 918e12, 1.64e12, 32 * GiB),
}

# jax `device.device_kind` strings (and the short names) -> CHIPS key.
_KIND_PATTERNS = (
    (r"v5\s*lite|v5litepod|v5e", "v5e"),
    (r"v6\s*lite|v6e|trillium", "v6e"),
    (r"v5p|v5$", "v5p"),
    (r"v4", "v4"),
)


def chip_spec(device_kind: str | None) -> ChipSpec | None:
    """The ChipSpec of a jax device kind ("TPU v5 lite" -> v5e, "TPU v6 lite" -> v6e, "TPU v5" or
    "TPU v5p" -> v5p, "TPU v4" -> v4; the short names work too); None for anything else (CPU, GPU)."""
    if not device_kind:
        return None
    kind = str(device_kind).strip().lower()
    if "tpu" not in kind and kind not in CHIPS:
        return None
    kind = kind.replace("tpu", "").strip()
    for pattern, name in _KIND_PATTERNS:
        if re.search(pattern, kind):
            return CHIPS[name]
    return None


def chip_peak(device_kind: str | None) -> float | None:
    """bf16 peak FLOP/s of one chip of `device_kind` (None when the chip is not a known TPU)."""
    spec = chip_spec(device_kind)
    return None if spec is None else spec.peak_bf16


def mfu(flops_per_step: float, step_seconds: float, device_kind: str | None, n_devices: int) -> float | None:
    """Model FLOPs utilisation: flops_per_step / (step_seconds · n_devices · chip peak).

    flops_per_step: `StepFlops.model` of the global batch; step_seconds: wall time of one step;
    n_devices: chips the step runs on. None when the chip's peak is unknown (e.g. CPU)."""
    peak = chip_peak(device_kind)
    if peak is None:
        return None
    if not step_seconds > 0 or n_devices < 1:
        raise ValueError(f"mfu: step_seconds must be > 0 and n_devices >= 1, got {step_seconds}, {n_devices}")
    return float(flops_per_step) / (float(step_seconds) * int(n_devices) * peak)


# ------------------------------------------------------------------------------------------ passes
class Pass(NamedTuple):
    """One decoder pass per batch row: `tokens` new positions attending to `keys` keys, logits used
    at `logits` positions, run `repeat` times (T Jacobi passes, M sequential steps); `latent` marks
    the scanned latent passes (what kava.remat_latent_scan checkpoints)."""

    name: str
    tokens: int
    keys: int
    logits: int
    repeat: int = 1
    latent: bool = False


def decoder_passes(objective: str, *, q_len: int, cot_len: int, answer_len: int, num_latents: int,
                   num_iterations: int, latent_mode: str = "jacobi") -> list[Pass]:
    """The decoder passes of `kava_loss` for one row (see the module docstring); codi runs sequential."""
    for name, v, lo in (("q_len", q_len, 1), ("cot_len", cot_len, 1), ("answer_len", answer_len, 1),
                        ("num_latents", num_latents, 1), ("num_iterations", num_iterations, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"decoder_passes: {name} must be an int >= {lo}, got {v!r}")
    s_t = q_len + cot_len + answer_len
    if objective == "nocot":
        return [Pass("nocot", s_t, s_t, s_t)]
    teacher = Pass("teacher", s_t, s_t, s_t)
    if objective == "cot":
        return [teacher]
    if objective not in ("kava", "pccot", "codi"):
        raise ValueError(f"decoder_passes: objective must be one of kava, pccot, codi, cot, nocot; got {objective!r}")
    p, m, r1 = q_len + 1, num_latents, 1 + answer_len
    mode = "sequential" if objective == "codi" else latent_mode
    if mode == "jacobi":
        latent = [Pass("student_prefill", p + m, p + m, 0)]
        if num_iterations:
            latent.append(Pass("jacobi", m, p + m, 0, repeat=num_iterations, latent=True))
    elif mode == "sequential":
        latent = [Pass("student_prefill", p, p, 0), Pass("sequential", 1, p + m + 1, 0, repeat=m, latent=True)]
    else:
        raise ValueError(f"decoder_passes: latent_mode must be 'jacobi' or 'sequential', got {latent_mode!r}")
    return [teacher, *latent, Pass("answer", r1, p + m + r1, r1)]


# ------------------------------------------------------------------------------------------ counts
@dataclasses.dataclass(frozen=True)
class PartFlops:
    """FLOPs of one part of the step (global batch): forward, backward and remat recompute."""

    forward: float = 0.0
    backward: float = 0.0
    recompute: float = 0.0

    def __add__(self, other: PartFlops) -> PartFlops:
        return PartFlops(self.forward + other.forward, self.backward + other.backward,
                         self.recompute + other.recompute)

    @property
    def model(self) -> float:
        return self.forward + self.backward


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """FLOPs of one train step over the global batch.

    parts: {pass name, "prj", "compression": PartFlops}; tokens: B·(Q+C+R) teacher tokens per step.
    forward / backward / recompute sum the parts; model = forward + backward (for MFU);
    executed = model + recompute (what the chips run, for the roofline)."""

    parts: dict[str, PartFlops]
    tokens: int
    batch_size: int

    @property
    def forward(self) -> float:
        return sum(p.forward for p in self.parts.values())

    @property
    def backward(self) -> float:
        return sum(p.backward for p in self.parts.values())

    @property
    def recompute(self) -> float:
        return sum(p.recompute for p in self.parts.values())

    @property
    def model(self) -> float:
        return self.forward + self.backward

    @property
    def executed(self) -> float:
        return self.model + self.recompute

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "executed": self.executed, "forward": self.forward, "backward": self.backward,
                "recompute": self.recompute, "tokens": self.tokens, "batch_size": self.batch_size,
                "parts": {k: dataclasses.asdict(v) for k, v in self.parts.items()}}


def _lin_per_token(mc: ModelConfig) -> int:
    d, n, k, h, f = mc.hidden_size, mc.num_heads, mc.num_kv_heads, mc.head_dim, mc.mlp_dim
    return 2 * (d * n * h + 2 * d * k * h + n * h * d + 3 * d * f)


def _lora_per_token(mc: ModelConfig) -> int:
    if not mc.lora.rank:
        return 0
    shapes = mc._lora_shapes()
    return 2 * mc.lora.rank * sum(i + o for t, (i, o) in shapes.items() if t in mc.lora.targets)


def _attr(cfg: Any, name: str) -> Any:
    if not hasattr(cfg, name):
        raise ValueError(f"train_step_flops: objective config has no field {name!r}")
    return getattr(cfg, name)


def train_step_flops(model_config: ModelConfig, objective_config: Any, *, batch_size: int, q_len: int,
                     answer_len: int, train_mode: str = "lora") -> StepFlops:
    """Analytic FLOPs of one train step (module docstring) for the global batch `batch_size`.

    model_config: the decoder (its lora.rank must be 0 in full mode, > 0 in LoRA mode, as `kava-train`
    builds it; remat read from it). objective_config: a `kava.objective.ObjectiveConfig` (objective,
    num_latents, num_iterations, latent_mode, cot_len, use_prj, compression, redundancy_chunk,
    remat_latent_scan). q_len / answer_len: the layout's Q and R blocks. train_mode: "lora" | "full".
    """
    mc, oc = model_config, objective_config
    if train_mode not in ("lora", "full"):
        raise ValueError(f"train_step_flops: train_mode must be 'lora' or 'full', got {train_mode!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"train_step_flops: batch_size must be an int >= 1, got {batch_size!r}")
    objective = _attr(oc, "objective")
    m, t_iter = int(_attr(oc, "num_latents")), int(_attr(oc, "num_iterations"))
    c_len = int(_attr(oc, "cot_len"))
    passes = decoder_passes(objective, q_len=q_len, cot_len=c_len, answer_len=answer_len, num_latents=m,
                            num_iterations=t_iter, latent_mode=_attr(oc, "latent_mode"))
    b, n_layers = batch_size, mc.num_layers
    d, n, kh, h, v = mc.hidden_size, mc.num_heads, mc.num_kv_heads, mc.head_dim, mc.vocab_size
    lin, lora = _lin_per_token(mc), _lora_per_token(mc) if train_mode == "lora" else 0
    # Under remat "full" the block's forward is re-run for its backward, minus what no gradient reads:
    # the output of the `down` projection (and of the LoRA B matmul on it) only feeds the residual sum.
    down_unused = 2 * mc.mlp_dim * d + (2 * mc.lora.rank * d if lora and "down" in mc.lora.targets else 0)
    full = train_mode == "full"
    lin_bwd = 2 if full else 1
    head_bwd = 2 if (full or mc.tie_word_embeddings) else 1
    remat = mc.remat
    scan_remat = bool(getattr(oc, "remat_latent_scan", False))
    prj_cost = 4 * d * d if (_attr(oc, "use_prj") and objective in ("kava", "pccot", "codi")) else 0
    prj_positions = {"jacobi": m + t_iter * (m - 1), "sequential": m + 1}

    parts: dict[str, PartFlops] = {}
    for p in passes:
        proj = n_layers * p.tokens * (lin + lora)
        attn = n_layers * 4 * n * h * p.tokens * p.keys
        head = 2 * d * v * p.logits
        fwd = proj + attn + head
        bwd = n_layers * p.tokens * (lin_bwd * lin + 2 * lora) + 2 * attn + head_bwd * head
        rec = {"full": proj - n_layers * p.tokens * down_unused + attn, "dots_no_batch": attn}.get(remat, 0)
        if scan_remat and p.latent:
            rec += proj + attn  # the checkpointed latent pass runs its forward once more (prj added below)
        parts[p.name] = PartFlops(b * p.repeat * fwd, b * p.repeat * bwd, b * p.repeat * rec)

    if prj_cost:
        mode = "sequential" if objective == "codi" else _attr(oc, "latent_mode")
        n_prj = prj_positions[mode]
        rec = 0
        if scan_remat:
            rec = t_iter * (m - 1) if mode == "jacobi" else m
        parts["prj"] = PartFlops(b * n_prj * prj_cost, b * n_prj * 2 * prj_cost, b * rec * prj_cost)

    if objective == "kava" and float(_attr(oc, "alpha_kv")) > 0:
        mode = _attr(oc, "compression")
        imp = 2 * n_layers * answer_len * n * h * c_len
        chunk = getattr(oc, "redundancy_chunk", None)
        red = n_layers * (2 * kh * c_len * c_len * h if chunk else 4 * c_len * kh * h)
        fwd = {"rkv": imp + red, "attention": imp, "cosine": red, "crop": 0}[mode]
        parts["compression"] = PartFlops(float(b * fwd), 0.0, 0.0)

    s_t = q_len + c_len + answer_len
    parts = {k: PartFlops(float(x.forward), float(x.backward), float(x.recompute)) for k, x in parts.items()}
    return StepFlops(parts=parts, tokens=b * s_t, batch_size=b)


def config_step_flops(config: Any, model_config: ModelConfig, objective_config: Any) -> StepFlops:
    """`train_step_flops` for a run config (train.batch_size / train.mode, data.q_len / answer_len)."""
    return train_step_flops(model_config, objective_config, batch_size=int(config.train.batch_size),
                            q_len=int(config.data.q_len), answer_len=int(config.data.answer_len),
                            train_mode=str(config.train.mode))


def objective_flops_table(config: Any, model_config: ModelConfig, objective_config: Any) -> dict[str, StepFlops]:
    """{objective: StepFlops} of the same run config with only kava.objective changed (the baselines)."""
    out = {}
    for obj in ("cot", "nocot", "codi", "pccot", "kava"):
        out[obj] = config_step_flops(config, model_config, dataclasses.replace(objective_config, objective=obj))
    return out
