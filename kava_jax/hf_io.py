"""HF safetensors checkpoint directory <-> our decoder params (no torch at run time).

`load_pretrained` reads `config.json` and `model.safetensors` (or a sharded
`model.safetensors.index.json`) with safetensors' numpy API (bf16 tensors arrive as
`ml_dtypes.bfloat16`), checks every tensor name and shape against the config, and builds our
param tree (see `kava_jax.models.transformer`): torch `[out, in]` kernels transposed to
`[in, out]`, heads split out (q `[L,D,N,H]`, k/v `[L,D,K,H]`, o `[L,N,H,D]`), layers stacked
on axis 0. `save_pretrained` is the inverse and writes a directory that
`transformers.AutoModelForCausalLM.from_pretrained` loads. `resize_vocab` grows the vocabulary
for added special tokens.

Tokenizers load in `kava_jax.data.tokenizer`, not here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from kava_jax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig
from kava_jax.models.lora import fold_lora, is_lora_path
from kava_jax.models.transformer import abstract_params

log = logging.getLogger(__name__)

Params = dict[str, Any]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Derived buffers some older exports carry; they are recomputed from the config, so they are skipped (logged).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One HF tensor and where it lives in our tree.

    hf: HF name, `{i}` standing for the layer index when `layered`; hf_shape: torch shape;
    path: our param path (None: a bias we do not model, which must be zero); shape: our shape
    without the layer axis; transpose: torch `[out, in]` vs our `[*in, *out]`.
    """

    hf: str
    hf_shape: tuple[int, ...]
    path: tuple[str, ...] | None
    shape: tuple[int, ...]
    layered: bool = False
    transpose: bool = False

    def to_ours(self, x: np.ndarray) -> np.ndarray:
        return (x.T if self.transpose else x).reshape(self.shape)

    def to_hf(self, y: np.ndarray) -> np.ndarray:
        if self.transpose:
            return np.ascontiguousarray(y.reshape(self.hf_shape[1], self.hf_shape[0]).T)
        return np.ascontiguousarray(y.reshape(self.hf_shape))

    def names(self, num_layers: int) -> list[str]:
        return [self.hf.format(i=i) for i in range(num_layers)] if self.layered else [self.hf]


def _tensor_specs(config: ModelConfig) -> list[_Tensor]:
    """The HF tensors of `config`'s model (lm_head only when untied)."""
    c = config
    d, f, n, k, h, v = c.hidden_size, c.mlp_dim, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size
    pre = "model.layers.{i}."
    specs = [
        _Tensor("model.embed_tokens.weight", (v, d), ("embed", "embedding"), (v, d)),
        _Tensor("model.norm.weight", (d,), ("final_norm", "scale"), (d,)),
        _Tensor(pre + "input_layernorm.weight", (d,), ("layers", "attn_norm", "scale"), (d,), True),
        _Tensor(pre + "post_attention_layernorm.weight", (d,), ("layers", "mlp_norm", "scale"), (d,), True),
    ]
    for name, heads in (("q", n), ("k", k), ("v", k)):
        path = ("layers", "attn", f"{name}_proj")
        specs.append(_Tensor(pre + f"self_attn.{name}_proj.weight", (heads * h, d), path + ("kernel",), (d, heads, h),
                             True, True))
        if c.attention_bias:
            specs.append(_Tensor(pre + f"self_attn.{name}_proj.bias", (heads * h,), path + ("bias",), (heads, h), True))
    specs.append(_Tensor(pre + "self_attn.o_proj.weight", (d, n * h), ("layers", "attn", "o_proj", "kernel"),
                         (n, h, d), True, True))
    if c.attention_bias and c.model_type == "llama":
        # HF Llama's attention_bias also biases o_proj; our decoder has none, so it must be zero.
        specs.append(_Tensor(pre + "self_attn.o_proj.bias", (d,), None, (d,), True))
    for name, (fi, fo) in (("gate", (d, f)), ("up", (d, f)), ("down", (f, d))):
        specs.append(_Tensor(pre + f"mlp.{name}_proj.weight", (fo, fi), ("layers", "mlp", f"{name}_proj", "kernel"),
                             (fi, fo), True, True))
    if not c.tie_word_embeddings:
        specs.append(_Tensor("lm_head.weight", (v, d), ("lm_head", "kernel"), (d, v), transpose=True))
    return specs


# ---------------------------------------------------------------------------------------------- reading


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found")
    with open(path, encoding="utf-8") as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e


def _weight_files(path: str) -> dict[str, str]:
    """Tensor name -> safetensors file holding it (single file or sharded index)."""
    single, index = os.path.join(path, WEIGHTS_FILE), os.path.join(path, INDEX_FILE)
    if os.path.isfile(single):
        with safe_open(single, framework="numpy") as fh:
            return {name: single for name in fh.keys()}
    if os.path.isfile(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map' entries")
        out = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(path, shard)
            if not os.path.isfile(shard_path):
                raise FileNotFoundError(f"{shard_path} (a shard listed in {index}) not found")
            with safe_open(shard_path, framework="numpy") as fh:
                held = set(fh.keys())
            for name, file in weight_map.items():
                if file == shard and name in held:
                    out[name] = shard_path
        return out
    raise FileNotFoundError(
        f"no safetensors weights in {path}: expected {single} or {index} (pickled .bin checkpoints are not read)")


def _check_tensors(config: ModelConfig, specs: list[_Tensor], shapes: dict[str, tuple[int, ...]], where: str):
    """Raises one ValueError listing every missing, unexpected and mis-shaped tensor."""
    expected = {name: s.hf_shape for s in specs for name in s.names(config.num_layers)}
    if config.tie_word_embeddings and "lm_head.weight" in shapes:
        expected["lm_head.weight"] = (config.vocab_size, config.hidden_size)  # allowed if equal to the embedding
    ignored = sorted(n for n in shapes if n not in expected and n.endswith(IGNORED_SUFFIXES))
    if ignored:
        log.info("hf_io: skipping %d derived buffers (%s, ...)", len(ignored), ignored[0])
    missing = sorted(n for n in expected if n not in shapes)
    unexpected = sorted(n for n in shapes if n not in expected and n not in ignored)
    bad = sorted(f"{n}: expected {expected[n]}, got {shapes[n]}" for n in expected
                 if n in shapes and tuple(shapes[n]) != tuple(expected[n]))
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    if bad:
        problems.append(f"mis-shaped tensors [{'; '.join(bad)}]")
    if problems:
        raise ValueError(f"checkpoint {where} does not match its config ({config.model_type}, "
                         f"{config.num_layers} layers): " + "; ".join(problems))


def _init_lora(config: ModelConfig, dtype, rng: jax.Array) -> Params:
    """Fresh LoRA leaves: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (as `init_params`), B = 0."""
    flat = traverse_util.flatten_dict(abstract_params(config))
    leaves = sorted((p, s.shape) for p, s in flat.items() if is_lora_path(p))
    a_leaves = [(p, shape) for p, shape in leaves if p[-1] == "lora_a"]
    # One draw for all A leaves (one compile, not one per shape), cut into pieces.
    u = np.asarray(jax.random.uniform(rng, (sum(int(np.prod(s)) for _, s in a_leaves),), jnp.float32, -1.0, 1.0))
    out, start = {}, 0
    for path, shape in a_leaves:  # A [L, *in, r]: fan_in = prod(in)
        size = int(np.prod(shape))
        out[path] = jnp.asarray(u[start:start + size].reshape(shape) / np.sqrt(np.prod(shape[1:-1])), dtype)
        start += size
    for path, shape in leaves:
        if path[-1] == "lora_b":
            out[path] = jnp.zeros(shape, dtype)
    return traverse_util.unflatten_dict(out)


def load_pretrained(path: str | os.PathLike, dtype=jnp.float32, *, config_overrides: dict[str, Any] | None = None,
                    lora_rng: jax.Array | None = None) -> tuple[ModelConfig, Params]:
    """Loads a local HF LLaMA / Qwen2 directory into (ModelConfig, params).

    Args:
      path: directory with `config.json` and `model.safetensors` or `model.safetensors.index.json` + shards.
      dtype: dtype of the returned params (any stored dtype, incl. bf16, is converted); also becomes
        `config.param_dtype` unless `config_overrides` sets it.
      config_overrides: ModelConfig fields to override, e.g. `{"lora": LoraConfig(rank=8), "remat": "full"}`.
      lora_rng: PRNG key for fresh LoRA leaves (required when the resulting config has lora.rank > 0).
    Returns:
      (config, params) with params shaped as `init_params(config, ...)` (LoRA leaves: A uniform, B zeros).
    Raises:
      FileNotFoundError naming a missing file; ValueError for an unsupported model_type or any missing,
      unexpected or mis-shaped tensor (all listed in one message).
    """
    path = os.fspath(path)
    hf = _read_json(os.path.join(path, CONFIG_FILE))
    if hf.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{os.path.join(path, CONFIG_FILE)}: unsupported model_type {hf.get('model_type')!r}; "
                         f"supported: {list(SUPPORTED_MODEL_TYPES)}")
    overrides = {"param_dtype": jnp.dtype(dtype).name, **(config_overrides or {})}
    config = ModelConfig.from_hf_config(hf, **overrides)
    if config.lora.rank and lora_rng is None:
        raise ValueError("load_pretrained: lora_rng is required when config.lora.rank > 0")
    np_dtype = np.dtype(jnp.dtype(dtype))
    files = _weight_files(path)
    specs = _tensor_specs(config)
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(f, framework="numpy")) for f in sorted(set(files.values()))}
        shapes = {n: tuple(handles[f].get_slice(n).get_shape()) for n, f in files.items()}
        _check_tensors(config, specs, shapes, path)

        def read(name: str) -> np.ndarray:
            return handles[files[name]].get_tensor(name)

        flat: dict[tuple[str, ...], jax.Array] = {}
        for spec in specs:
            if spec.path is None:
                nonzero = [n for n in spec.names(config.num_layers) if np.any(read(n))]
                if nonzero:
                    raise ValueError(f"checkpoint {path}: non-zero {nonzero} not supported (no o_proj bias)")
                continue
            if spec.layered:
                arr = np.empty((config.num_layers,) + spec.shape, np_dtype)
                for i, name in enumerate(spec.names(config.num_layers)):
                    arr[i] = spec.to_ours(read(name))
            else:
                arr = spec.to_ours(read(spec.hf)).astype(np_dtype)
            flat[spec.path] = jnp.asarray(arr)
        if config.tie_word_embeddings and "lm_head.weight" in files:
            if not np.array_equal(read("lm_head.weight"), read("model.embed_tokens.weight")):
                raise ValueError(f"checkpoint {path}: tie_word_embeddings is set but lm_head.weight differs from "
                                 "model.embed_tokens.weight")
    params = traverse_util.unflatten_dict(flat)
    if config.lora.rank:
        lora = traverse_util.flatten_dict(_init_lora(config, dtype, lora_rng))
        params = traverse_util.unflatten_dict({**flat, **lora})
    return config, params


# ---------------------------------------------------------------------------------------------- writing


def _check_params(config: ModelConfig, params: Params, what: str) -> None:
    """Raises ValueError listing leaves missing from / extra in / mis-shaped against `config`'s tree."""
    want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract_params(config)).items()}
    got = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(params).items()}
    missing = sorted("/".join(k) for k in want if k not in got)
    extra = sorted("/".join(k) for k in got if k not in want)
    bad = sorted(f"{'/'.join(k)}: expected {want[k]}, got {got[k]}" for k in want if k in got and got[k] != want[k])
    if missing or extra or bad:
        raise ValueError(f"{what}: params do not match the config: missing {missing}, unexpected {extra}, "
                         f"mis-shaped {bad}")


def save_pretrained(path: str | os.PathLike, config: ModelConfig, params: Params, *, merge_lora: bool = True,
                    dtype=None) -> None:
    """Writes `config.json` + `model.safetensors` (torch layout) loadable by transformers.

    Args:
      path: output directory (created if needed; existing files of the same name are overwritten).
      config, params: the model; params must match `config` exactly (incl. LoRA leaves iff lora.rank > 0).
      merge_lora: fold LoRA updates into the kernels (W + alpha/r · A·B). A plain HF model cannot hold
        LoRA, so merge_lora=False with LoRA leaves raises (no peft adapter is written).
      dtype: dtype of the stored tensors (default: each param's own dtype).
    """
    path = os.fspath(path)
    _check_params(config, params, "save_pretrained")
    if any(is_lora_path(k) for k in traverse_util.flatten_dict(params)):
        if not merge_lora:
            raise ValueError("save_pretrained: params hold LoRA leaves and merge_lora=False, but a plain HF "
                             "checkpoint cannot store LoRA adapters; pass merge_lora=True to fold them")
        params = fold_lora(params, config)
    base_config = config.replace(lora=dataclasses.replace(config.lora, rank=0))
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
    cast: Callable[[np.ndarray], np.ndarray] = (
        (lambda x: x) if dtype is None else (lambda x: x.astype(np.dtype(jnp.dtype(dtype)))))
    tensors: dict[str, np.ndarray] = {}
    for spec in _tensor_specs(base_config):
        for i, name in enumerate(spec.names(config.num_layers)):
            if spec.path is None:
                ref = flat[("layers", "attn", "o_proj", "kernel")]
                tensors[name] = cast(np.zeros(spec.hf_shape, ref.dtype))
            else:
                value = flat[spec.path][i] if spec.layered else flat[spec.path]
                tensors[name] = cast(spec.to_hf(value))
    hf = base_config.to_hf_config()
    hf["torch_dtype"] = np.dtype(next(iter(tensors.values())).dtype).name
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_FILE), "w", encoding="utf-8") as fh:
        json.dump(hf, fh, indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------- vocab


def resize_vocab(params: Params, config: ModelConfig, new_vocab_size: int, rng: jax.Array,
                 noise_scale: float = 1e-2) -> tuple[Params, ModelConfig]:
    """Grows the vocabulary to `new_vocab_size` (e.g. for added special tokens); old rows are unchanged.

    New embedding rows (and, when untied, new lm_head columns) are the mean of the existing
    ones plus Gaussian noise with per-dimension std `noise_scale * std(existing)`, so new tokens start
    near the average token without being identical. Returns (params, config with vocab_size updated).
    embed/embedding [V,D] -> [V',D]; lm_head/kernel [D,V] -> [D,V'].
    """
    v = config.vocab_size
    if new_vocab_size < v:
        raise ValueError(f"resize_vocab: new_vocab_size {new_vocab_size} < current vocab_size {v} (shrinking is "
                         "not supported)")
    if params["embed"]["embedding"].shape[0] != v:
        raise ValueError(f"resize_vocab: embed/embedding has {params['embed']['embedding'].shape[0]} rows but "
                         f"config.vocab_size is {v}")
    if new_vocab_size == v:
        return params, config
    extra = new_vocab_size - v

    def grow_rows(w: jax.Array, key: jax.Array) -> jax.Array:  # w [V, D] -> [V', D]
        wf = w.astype(jnp.float32)
        mean, std = wf.mean(axis=0), wf.std(axis=0)
        new = mean + noise_scale * std * jax.random.normal(key, (extra, w.shape[1]), jnp.float32)
        return jnp.concatenate([w, new.astype(w.dtype)], axis=0)

    k_embed, k_head = jax.random.split(rng)
    params = dict(params)
    params["embed"] = {**params["embed"], "embedding": grow_rows(params["embed"]["embedding"], k_embed)}
    if not config.tie_word_embeddings:
        params["lm_head"] = {**params["lm_head"], "kernel": grow_rows(params["lm_head"]["kernel"].T, k_head).T}
    return params, config.replace(vocab_size=new_vocab_size)
