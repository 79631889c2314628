"""The decoder: config, layers, the scanned Linen model and its pure `forward`."""

from kava_jax.models.config import (
    PRESETS,
    LoraConfig,
    ModelConfig,
    RopeScaling,
    config_from_dict,
    config_to_dict,
    get_preset,
    rope_inv_freq,
)
from kava_jax.models.lora import fold_lora, merge_trees, split_lora
from kava_jax.models.transformer import (
    DecoderOutput,
    abstract_params,
    embed_tokens,
    forward,
    init_params,
    lm_logits,
    param_logical_axes,
)

__all__ = [
    "PRESETS", "LoraConfig", "ModelConfig", "RopeScaling", "config_from_dict", "config_to_dict", "get_preset",
    "rope_inv_freq", "fold_lora", "merge_trees", "split_lora", "DecoderOutput", "abstract_params",
    "embed_tokens", "forward", "init_params", "lm_logits", "param_logical_axes",
]
