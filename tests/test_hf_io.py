"""kava_jax.hf_io: HF safetensors directories <-> params, checked against transformers' PyTorch models."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from kava_jax.hf_io import load_pretrained, resize_vocab, save_pretrained
from kava_jax.models import LoraConfig, embed_tokens, forward, lm_logits

V, D, F, LAYERS, N, K = 100, 64, 96, 2, 4, 2
B, T = 2, 8

# Tiny programs: LLVM -O0 halves the CPU compile time, which dominates these tests.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
_fwd = jax.jit(forward, static_argnames=("config", "return_attention"), compiler_options=FAST_COMPILE)


def build_hf(family: str, seed: int = 0, **extra) -> torch.nn.Module:
    """Tiny random model; norms and biases randomised (HF initialises them to 1 / 0)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=LAYERS, num_attention_heads=N,
                  num_key_value_heads=K, initializer_range=0.1, max_position_embeddings=256)
    if family == "llama":  # untied, GQA, llama3 RoPE
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False, rope_parameters=rope, **extra))
    else:  # tied, q/k/v bias
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True, **extra))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids))).logits.numpy()


def read_tensors(path) -> dict[str, np.ndarray]:
    with safe_open(os.path.join(path, "model.safetensors"), framework="numpy") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def hf_load(path):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


IDS = np.random.RandomState(0).randint(0, V, (B, T))


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def saved(request, tmp_path_factory):
    """(family, HF model, HF-written checkpoint dir)."""
    model = build_hf(request.param)
    path = tmp_path_factory.mktemp(f"hf_{request.param}")
    model.save_pretrained(path)
    return request.param, model, path


# ----------------------------------------------------------------------------- round trips


def test_save_pretrained_round_trip(saved, tmp_path):
    family, model, path = saved
    config, params = load_pretrained(path)
    assert config.tie_word_embeddings == (family == "qwen2") and ("lm_head" in params) == (family == "llama")
    assert params["layers"]["attn"]["q_proj"]["kernel"].shape == (LAYERS, D, N, D // N)
    ref = hf_logits(model, IDS)
    np.testing.assert_allclose(_fwd(params, config, jnp.asarray(IDS)).logits, ref, atol=1e-5, rtol=0)
    save_pretrained(tmp_path, config, params)
    # same tensor names and exactly the same values as transformers' own export
    ours, theirs = read_tensors(tmp_path), read_tensors(path)
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    np.testing.assert_array_equal(hf_logits(hf_load(tmp_path), IDS), ref)


def test_lora_merged_export_matches_unmerged(saved, tmp_path):
    family, model, path = saved
    lora = LoraConfig(rank=4, alpha=16.0)
    with pytest.raises(ValueError, match="lora_rng is required"):
        load_pretrained(path, config_overrides={"lora": lora})
    config, params = load_pretrained(path, config_overrides={"lora": lora}, lora_rng=jax.random.key(0))
    flat = traverse_util.flatten_dict(params)
    a = flat[("layers", "mlp", "down_proj", "lora_a")]
    assert a.shape == (LAYERS, F, 4) and 0 < float(jnp.abs(a).max()) <= F ** -0.5
    assert not any(np.any(v) for k, v in flat.items() if k[-1] == "lora_b")
    rs = np.random.RandomState(1)
    for k, v in flat.items():
        if k[-1] == "lora_b":
            flat[k] = jnp.asarray(0.05 * rs.standard_normal(v.shape), jnp.float32)
    params = traverse_util.unflatten_dict(flat)
    ours = np.asarray(_fwd(params, config, jnp.asarray(IDS)).logits)
    base = hf_logits(model, IDS)
    assert np.abs(ours - base).max() > 1e-2  # the adapters matter
    with pytest.raises(ValueError, match="merge_lora=False"):
        save_pretrained(tmp_path / "nomerge", config, params, merge_lora=False)
    save_pretrained(tmp_path, config, params)
    exported = json.loads((tmp_path / "config.json").read_text())
    assert exported["model_type"] == family
    np.testing.assert_allclose(hf_logits(hf_load(tmp_path), IDS), ours, atol=1e-5, rtol=0)


def test_sharded_checkpoint(saved, tmp_path):
    _, _, path = saved
    tensors = read_tensors(path)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(tmp_path / file), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
             "weight_map": {n: f for f, part in shards.items() for n in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(path / "config.json", tmp_path / "config.json")
    _, want = load_pretrained(path)
    _, got = load_pretrained(tmp_path)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_array_equal(x, y)
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_pretrained(tmp_path)


def test_bf16_checkpoint(tmp_path):
    model = build_hf("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="numpy") as fh:
        assert fh.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    config, params = load_pretrained(tmp_path / "bf16")  # -> float32
    q = params["layers"]["attn"]["q_proj"]["kernel"]
    assert q.dtype == jnp.float32 and config.param_dtype == "float32"
    np.testing.assert_array_equal(q[1], sd["model.layers.1.self_attn.q_proj.weight"].T.reshape(D, N, D // N))
    np.testing.assert_array_equal(params["lm_head"]["kernel"], sd["lm_head.weight"].T)
    np.testing.assert_array_equal(params["layers"]["mlp_norm"]["scale"][0],
                                  sd["model.layers.0.post_attention_layernorm.weight"])
    config16, params16 = load_pretrained(tmp_path / "bf16", dtype=jnp.bfloat16)
    assert config16.param_dtype == "bfloat16"
    assert {x.dtype for x in jax.tree_util.tree_leaves(params16)} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(params16["embed"]["embedding"].astype(jnp.float32), params["embed"]["embedding"])
    # bf16 export of f32 params: BF16 tensors that transformers loads
    save_pretrained(tmp_path / "out", config, params, dtype=jnp.bfloat16)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="numpy") as fh:
        assert fh.get_tensor("model.norm.weight").dtype == ml_dtypes.bfloat16
    reloaded = hf_load(tmp_path / "out")
    assert reloaded.dtype == torch.bfloat16
    np.testing.assert_array_equal(reloaded.model.layers[1].mlp.down_proj.weight.detach().float().numpy(),
                                  sd["model.layers.1.mlp.down_proj.weight"])


def test_llama_attention_bias(tmp_path):
    """HF Llama's attention_bias also biases o_proj, which our decoder lacks: zero is accepted, else an error."""
    model = build_hf("llama", attention_bias=True)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.bias.zero_()
    model.save_pretrained(tmp_path / "zero")
    config, params = load_pretrained(tmp_path / "zero")
    assert config.attention_bias and "bias" in params["layers"]["attn"]["q_proj"]
    np.testing.assert_allclose(_fwd(params, config, jnp.asarray(IDS)).logits, hf_logits(model, IDS), atol=1e-5,
                               rtol=0)
    save_pretrained(tmp_path / "out", config, params)
    np.testing.assert_array_equal(hf_logits(hf_load(tmp_path / "out"), IDS), hf_logits(model, IDS))
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.bias[3] = 0.5
    model.save_pretrained(tmp_path / "nonzero")
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.o_proj.bias"):
        load_pretrained(tmp_path / "nonzero")


# ----------------------------------------------------------------------------- bad checkpoints


def _broken(src, dst, *, tensors=None, config=None, drop=()):
    """Copy of checkpoint `src` at `dst` with tensors / config.json edited by the given functions."""
    os.makedirs(dst)
    t = read_tensors(src)
    c = json.loads((src / "config.json").read_text())
    if tensors:
        tensors(t)
    if config:
        config(c)
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(c))
    for name in drop:
        os.remove(dst / name)
    return dst


def _set(d, key, value):
    d[key] = value


BAD = {
    "no_config": (dict(drop=("config.json",)), FileNotFoundError, r"config\.json not found"),
    "no_weights": (dict(drop=("model.safetensors",)), FileNotFoundError,
                   r"no safetensors weights in .*model\.safetensors"),
    "missing_tensor": (dict(tensors=lambda t: t.pop("model.layers.1.mlp.up_proj.weight")), ValueError,
                       r"missing tensors \['model\.layers\.1\.mlp\.up_proj\.weight'\]"),
    "missing_lm_head": (dict(tensors=lambda t: t.pop("lm_head.weight")), ValueError,
                        r"missing tensors \['lm_head\.weight'\]"),
    "extra_tensor": (dict(tensors=lambda t: _set(t, "model.layers.0.self_attn.extra.weight", np.zeros(3, np.float32))),
                     ValueError, r"unexpected tensors \['model\.layers\.0\.self_attn\.extra\.weight'\]"),
    "misshaped": (dict(tensors=lambda t: _set(t, "model.layers.0.self_attn.k_proj.weight",
                                              np.zeros((16, D), np.float32))), ValueError,
                  r"model\.layers\.0\.self_attn\.k_proj\.weight: expected \(32, 64\), got \(16, 64\)"),
    "too_few_layers": (dict(config=lambda c: _set(c, "num_hidden_layers", 1)), ValueError,
                       r"unexpected tensors \['model\.layers\.1\.input_layernorm\.weight'"),
    "model_type": (dict(config=lambda c: _set(c, "model_type", "gpt2")), ValueError,
                   r"unsupported model_type 'gpt2'"),
    "tied_but_different": (dict(config=lambda c: _set(c, "tie_word_embeddings", True)), ValueError,
                           r"lm_head\.weight differs from model\.embed_tokens\.weight"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoints(case, tmp_path, tmp_path_factory):
    src = tmp_path_factory.getbasetemp() / "bad_src"
    if not src.exists():
        build_hf("llama").save_pretrained(src)  # untied: has lm_head.weight
    edits, exc, msg = BAD[case]
    with pytest.raises(exc, match=msg):
        load_pretrained(_broken(src, tmp_path / case, **edits))


def test_tolerated_extras(tmp_path, tmp_path_factory):
    """A tied config may carry lm_head.weight equal to the embedding; rotary inv_freq buffers are skipped."""
    src = tmp_path_factory.getbasetemp() / "bad_src"
    if not src.exists():
        build_hf("llama").save_pretrained(src)

    def edit(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)

    path = _broken(src, tmp_path / "ok", tensors=edit, config=lambda c: _set(c, "tie_word_embeddings", True))
    config, params = load_pretrained(path)
    assert config.tie_word_embeddings and "lm_head" not in params
    np.testing.assert_array_equal(params["embed"]["embedding"], read_tensors(src)["model.embed_tokens.weight"])


def test_two_problems_in_one_message(saved, tmp_path):
    family, _, path = saved

    def edit(t):
        t.pop("model.norm.weight")
        t["model.layers.1.mlp.down_proj.weight"] = np.zeros((D, F + 1), np.float32)

    with pytest.raises(ValueError, match=r"missing tensors \['model\.norm\.weight'\].*down_proj\.weight: "
                                         r"expected \(64, 96\), got \(64, 97\)"):
        load_pretrained(_broken(path, tmp_path / "two", tensors=edit))


def test_save_pretrained_rejects_mismatched_params(saved, tmp_path):
    _, _, path = saved
    config, params = load_pretrained(path)
    bad = jax.tree_util.tree_map(lambda x: x, params)
    bad["final_norm"]["scale"] = jnp.ones((D + 1,))
    with pytest.raises(ValueError, match=r"final_norm/scale: expected \(64,\), got \(65,\)"):
        save_pretrained(tmp_path, config, bad)
    del bad["final_norm"]
    with pytest.raises(ValueError, match=r"missing \['final_norm/scale'\]"):
        save_pretrained(tmp_path, config, bad)
    assert not (tmp_path / "model.safetensors").exists()


# ----------------------------------------------------------------------------- vocab resize


def test_resize_vocab_keeps_old_logits(saved):
    family, _, path = saved
    config, params = load_pretrained(path)
    new, cfg2 = resize_vocab(params, config, V + 3, jax.random.key(0))
    assert cfg2.vocab_size == V + 3 and config.vocab_size == V
    emb, emb2 = np.asarray(params["embed"]["embedding"]), np.asarray(new["embed"]["embedding"])
    assert emb2.shape == (V + 3, D)
    np.testing.assert_array_equal(emb2[:V], emb)
    # new rows: near the mean row, distinct from each other
    assert np.abs(emb2[V:] - emb.mean(0)).max() < 0.05 * emb.std(0).max() + 1e-7
    assert np.abs(emb2[V] - emb2[V + 1]).max() > 0
    if family == "llama":  # untied: lm_head columns grow too
        assert new["lm_head"]["kernel"].shape == (D, V + 3)
        np.testing.assert_array_equal(new["lm_head"]["kernel"][:, :V], params["lm_head"]["kernel"])
    old = np.asarray(_fwd(params, config, jnp.asarray(IDS)).logits)
    out = np.asarray(_fwd(new, cfg2, jnp.asarray(IDS)).logits)
    assert out.shape == (B, T, V + 3)
    np.testing.assert_allclose(out[..., :V], old, atol=1e-5, rtol=0)
    # a new token is a valid input; its logits come from the grown matrix
    h = jnp.ones((1, D))
    np.testing.assert_allclose(lm_logits(new, cfg2, h)[0, V:], np.ones(D) @ (
        emb2[V:].T if cfg2.tie_word_embeddings else np.asarray(new["lm_head"]["kernel"])[:, V:]), rtol=1e-5)
    np.testing.assert_array_equal(embed_tokens(new, cfg2, jnp.array([V + 2]))[0], emb2[V + 2])
    assert resize_vocab(params, config, V, jax.random.key(0)) == (params, config)
    with pytest.raises(ValueError, match="shrinking is not supported"):
        resize_vocab(params, config, V - 1, jax.random.key(0))
