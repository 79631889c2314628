"""`ModelConfig`: the decoder's hyper-parameters, presets, and conversion from/to HF `config.json`."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters on the decoder's linear layers (rank 0 = off).

    Update: W x + (alpha / rank) * B A dropout(x), with B zero-initialised (peft's convention).
    """

    rank: int = 0
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0

    def validate(self) -> None:
        if self.rank < 0:
            raise ValueError(f"lora.rank must be >= 0, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown:
            raise ValueError(f"lora.targets has unknown entries {unknown}; allowed: {list(LORA_TARGETS)}")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling as in HF `rope_parameters` (`default`, `linear`, `llama3`)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A LLaMA / Qwen2 style decoder. Hashable, so it can be a static jit argument."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    model_type: str = "llama"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 131072
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    lora: LoraConfig = LoraConfig()

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"ModelConfig: {msg}")

        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "mlp_dim"):
            need(int(getattr(self, name)) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.model_type in SUPPORTED_MODEL_TYPES,
             f"model_type {self.model_type!r} is not supported; supported: {list(SUPPORTED_MODEL_TYPES)}")
        need(self.num_heads % self.num_kv_heads == 0,
             f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        need(self.head_dim % 2 == 0, f"head_dim must be even for RoPE, got {self.head_dim}")
        need(self.rope_scaling.rope_type in SUPPORTED_ROPE_TYPES,
             f"rope type {self.rope_scaling.rope_type!r} is not supported; supported: {list(SUPPORTED_ROPE_TYPES)}")
        need(self.remat in REMAT_POLICIES, f"remat must be one of {list(REMAT_POLICIES)}, got {self.remat!r}")
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError as e:
                raise ValueError(f"ModelConfig: {name} {getattr(self, name)!r} is not a dtype") from e
        self.lora.validate()

    @property
    def num_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weights_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    def with_lora(self, rank: int, alpha: float = 32.0, dropout: float = 0.0,
                  targets: tuple[str, ...] = LORA_TARGETS) -> ModelConfig:
        return self.replace(lora=LoraConfig(rank, alpha, dropout, tuple(targets)))

    def num_params(self, include_lora: bool = False) -> int:
        """Analytic parameter count of the base model (matches `jax.eval_shape` of `init_params`)."""
        d, f, h = self.hidden_size, self.mlp_dim, self.head_dim
        attn = d * h * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.attention_bias:
            attn += h * (self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * d * f + 2 * d
        total = self.num_layers * per_layer + self.vocab_size * d + d
        if not self.tie_word_embeddings:
            total += self.vocab_size * d
        if include_lora and self.lora.rank:
            total += self.num_layers * sum(
                self.lora.rank * (i + o) for t, (i, o) in self._lora_shapes().items() if t in self.lora.targets)
        return total

    def _lora_shapes(self) -> dict[str, tuple[int, int]]:
        d, f = self.hidden_size, self.mlp_dim
        nh, kh = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"q": (d, nh), "k": (d, kh), "v": (d, kh), "o": (nh, d), "gate": (d, f), "up": (d, f),
                "down": (f, d)}

    # ------------------------------------------------------------------ HF conversion
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], **overrides) -> ModelConfig:
        """Builds a config from a HF `config.json` dict (transformers 4.x or 5.x key layout)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r} in HF config; supported: {list(SUPPORTED_MODEL_TYPES)}")
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size") if k not in hf]
        if missing:
            raise ValueError(f"HF config is missing required keys {missing}")
        if hf.get("use_sliding_window"):
            raise ValueError("HF config sets use_sliding_window=True; sliding-window attention is not supported")
        rope_params = dict(hf.get("rope_parameters") or {})
        legacy = hf.get("rope_scaling") or {}
        rope_params = {**legacy, **rope_params}
        theta = rope_params.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope_params.get("rope_type", rope_params.get("type", "default"))
        scaling = RopeScaling(
            rope_type=rope_type,
            factor=float(rope_params.get("factor", 1.0)),
            low_freq_factor=float(rope_params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope_params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rope_params.get("original_max_position_embeddings", 8192)),
        )
        n_heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        kw = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=n_heads,
            num_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
            mlp_dim=hf["intermediate_size"],
            model_type=model_type,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 131072),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        )
        if hf.get("mlp_bias"):
            raise ValueError("HF config sets mlp_bias=True, which is not supported")
        kw.update(overrides)
        return cls(**kw)

    def to_hf_config(self) -> dict[str, Any]:
        """The HF `config.json` dict for this model (loadable by transformers' AutoConfig)."""
        rope: dict[str, Any] = {"rope_type": self.rope_scaling.rope_type, "rope_theta": self.rope_theta}
        if self.rope_scaling.rope_type == "linear":
            rope["factor"] = self.rope_scaling.factor
        elif self.rope_scaling.rope_type == "llama3":
            rope.update(factor=self.rope_scaling.factor, low_freq_factor=self.rope_scaling.low_freq_factor,
                        high_freq_factor=self.rope_scaling.high_freq_factor,
                        original_max_position_embeddings=self.rope_scaling.original_max_position_embeddings)
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[self.model_type]
        out: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.mlp_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "torch_dtype": self.param_dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
        }
        if self.model_type == "llama":
            out.update(attention_bias=self.attention_bias, mlp_bias=False)
        elif not self.attention_bias:
            raise ValueError("qwen2 models always carry q/k/v biases; attention_bias=False cannot be exported")
        else:
            out.update(use_sliding_window=False, sliding_window=None)
        return out


_LLAMA3_ROPE = RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)

PRESETS: dict[str, ModelConfig] = {
    "llama3.2-1b": ModelConfig(
        vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
        mlp_dim=8192, model_type="llama", rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
        tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128009),
    "llama3.2-3b": ModelConfig(
        vocab_size=128256, hidden_size=3072, num_layers=28, num_heads=24, num_kv_heads=8, head_dim=128,
        mlp_dim=8192, model_type="llama", rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
        tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128009),
    "qwen2.5-0.5b": ModelConfig(
        vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
        mlp_dim=4864, model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1000000.0, attention_bias=True,
        tie_word_embeddings=True, max_position_embeddings=32768, bos_token_id=151643, eos_token_id=151645),
    "tiny": ModelConfig(
        vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
        model_type="llama", rope_theta=10000.0, tie_word_embeddings=True),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """A named preset (`llama3.2-1b`, `llama3.2-3b`, `qwen2.5-0.5b`, `tiny`) with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """JSON-able dict of a config (round-trips with `config_from_dict`)."""
    return dataclasses.asdict(config)


def config_from_dict(d: dict[str, Any]) -> ModelConfig:
    d = dict(d)
    d["rope_scaling"] = RopeScaling(**d.get("rope_scaling", {}))
    lora = dict(d.get("lora", {}))
    if "targets" in lora:
        lora["targets"] = tuple(lora["targets"])
    d["lora"] = LoraConfig(**lora)
    if isinstance(d.get("eos_token_id"), list):
        d["eos_token_id"] = tuple(d["eos_token_id"])
    return ModelConfig(**d)


def rope_inv_freq(config: ModelConfig):
    """Inverse RoPE frequencies [head_dim/2] (float32), with `linear` / `llama3` scaling applied."""
    h = config.head_dim
    inv = 1.0 / (config.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    s = config.rope_scaling
    if s.rope_type == "linear":
        inv = inv / s.factor
    elif s.rope_type == "llama3":
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > low_wavelen, inv / s.factor, inv)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = jnp.where(medium, smoothed, scaled)
    return inv
