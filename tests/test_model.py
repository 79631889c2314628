"""Decoder behaviour without a PyTorch reference: cache continuation, embeds path, param counts,
LoRA plumbing, input / config validation, remat and LoRA dropout."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from kava_jax.kv import KVCache
from kava_jax.models import (
    LoraConfig,
    ModelConfig,
    RopeScaling,
    abstract_params,
    embed_tokens,
    fold_lora,
    forward,
    get_preset,
    init_params,
    merge_trees,
    split_lora,
)

CFG = ModelConfig(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=96,
                  model_type="llama", rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 64),
                  max_position_embeddings=256)
LORA = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "o", "down"))
B, P, T = 2, 6, 5

# Tiny programs: LLVM -O0 halves the CPU compile time, which dominates these tests.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
_fwd = jax.jit(forward, static_argnames=("config", "return_attention"), compiler_options=FAST_COMPILE)
_init = jax.jit(init_params, static_argnums=0, compiler_options=FAST_COMPILE)


def _rand_ids(seed, shape):
    return jnp.asarray(np.random.RandomState(seed).randint(0, CFG.vocab_size, shape))


def _nonzero_lora_b(params, seed=0):
    """LoRA B leaves set to random values (init is zero, which would hide any LoRA bug)."""
    flat = traverse_util.flatten_dict(params)
    rs = np.random.RandomState(seed)
    for k, v in flat.items():
        if k[-1] == "lora_b":
            flat[k] = jnp.asarray(0.1 * rs.standard_normal(v.shape), v.dtype)
    return traverse_util.unflatten_dict(flat)


@pytest.fixture(scope="module")
def lora_params():
    """init_params of CFG with LORA (B = 0); one init compile serves the base params too."""
    return _init(CFG.replace(lora=LORA), jax.random.key(0))


@pytest.fixture(scope="module")
def params(lora_params):
    """Base params of CFG (the non-LoRA leaves, which are exactly CFG's tree)."""
    base = split_lora(lora_params)[0]
    assert jax.tree_util.tree_structure(base) == jax.tree_util.tree_structure(abstract_params(CFG))
    return base


# ----------------------------------------------------------------------------- cache continuation


def test_segment_on_cache_equals_full_forward(params):
    ids = _rand_ids(0, (B, P + T))
    full = _fwd(params, CFG, ids)
    pre = _fwd(params, CFG, ids[:, :P])
    seg = _fwd(params, CFG, ids[:, P:], cache=pre.kv)
    assert seg.kv.k.shape == (CFG.num_layers, B, P + T, CFG.num_kv_heads, CFG.head_dim)
    np.testing.assert_allclose(seg.logits, full.logits[:, P:], atol=1e-5, rtol=0)
    np.testing.assert_allclose(seg.kv.k, full.kv.k, atol=1e-5, rtol=0)
    np.testing.assert_allclose(seg.kv.v, full.kv.v, atol=1e-5, rtol=0)
    np.testing.assert_allclose(seg.hidden_states, full.hidden_states[:, :, P:], atol=1e-5, rtol=0)


def test_segment_on_padded_prefix_cache(params):
    """Left-padded prefix (row 1 has 2 pad slots); mask covers prefix + segment; valid positions match."""
    ids = _rand_ids(1, (B, P + T))
    mask = np.ones((B, P + T), bool)
    mask[1, :2] = False
    mask = jnp.asarray(mask)
    full = _fwd(params, CFG, ids, attention_mask=mask)
    pre = _fwd(params, CFG, ids[:, :P], attention_mask=mask[:, :P])
    seg = _fwd(params, CFG, ids[:, P:], cache=pre.kv, attention_mask=mask)
    np.testing.assert_allclose(seg.logits, full.logits[:, P:], atol=1e-5, rtol=0)
    valid = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(seg.kv.k)[:, valid], np.asarray(full.kv.k)[:, valid], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(seg.kv.v)[:, valid], np.asarray(full.kv.v)[:, valid], atol=1e-5, rtol=0)


def test_inputs_embeds_equals_input_ids(params):
    ids = _rand_ids(2, (B, T))
    a = _fwd(params, CFG, ids)
    b = _fwd(params, CFG, inputs_embeds=embed_tokens(params, CFG, ids))
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------- param counts


@pytest.mark.parametrize("name,count", [("llama3.2-1b", 1_235_814_400), ("qwen2.5-0.5b", 494_032_768),
                                        ("llama3.2-3b", 3_212_749_824)])
def test_preset_param_counts(name, count):
    config = get_preset(name)
    shapes = jax.eval_shape(lambda r: init_params(config, r), jax.random.key(0))
    assert sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes)) == count
    assert config.num_params() == count


# ----------------------------------------------------------------------------- LoRA


def test_lora_rank0_has_no_lora_leaves():
    flat = traverse_util.flatten_dict(abstract_params(CFG.replace(lora=LoraConfig(rank=0, targets=("q",)))))
    assert not [k for k in flat if k[-1].startswith("lora")]
    flat = traverse_util.flatten_dict(abstract_params(CFG.replace(lora=LORA)))
    lora = {k: v.shape for k, v in flat.items() if k[-1].startswith("lora")}
    L, D, N, K, H, F, r = 2, 64, 4, 2, 16, 96, 4
    assert lora == {
        ("layers", "attn", "q_proj", "lora_a"): (L, D, r), ("layers", "attn", "q_proj", "lora_b"): (L, r, N, H),
        ("layers", "attn", "v_proj", "lora_a"): (L, D, r), ("layers", "attn", "v_proj", "lora_b"): (L, r, K, H),
        ("layers", "attn", "o_proj", "lora_a"): (L, N, H, r), ("layers", "attn", "o_proj", "lora_b"): (L, r, D),
        ("layers", "mlp", "down_proj", "lora_a"): (L, F, r), ("layers", "mlp", "down_proj", "lora_b"): (L, r, D),
    }
    assert CFG.replace(lora=LORA).num_params(include_lora=True) == CFG.num_params() + sum(
        int(np.prod(s)) for s in lora.values())


def test_split_merge_round_trip(lora_params):
    p = lora_params
    base, lora = split_lora(p)
    assert all(k[-1] in ("lora_a", "lora_b") for k in traverse_util.flatten_dict(lora))
    assert not any(k[-1] in ("lora_a", "lora_b") for k in traverse_util.flatten_dict(base))
    back = merge_trees(base, lora)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(p)
    for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(p), strict=True):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="lora_a present in more than one tree"):
        merge_trees(p, lora)


def test_lora_zero_b_is_base_and_fold_matches(params, lora_params):
    cfg_l = CFG.replace(lora=LORA)
    flat_l = traverse_util.flatten_dict(lora_params)
    assert all(not np.any(v) for k, v in flat_l.items() if k[-1] == "lora_b")
    assert all(np.any(v) for k, v in flat_l.items() if k[-1] == "lora_a")
    ids = _rand_ids(3, (B, T))
    base = _fwd(params, CFG, ids)
    zero_b = _fwd(lora_params, cfg_l, ids)
    np.testing.assert_array_equal(zero_b.logits, base.logits)
    # non-zero B: output changes, and equals the base model with W + scale * A @ B folded in (numpy fold)
    p_nz = _nonzero_lora_b(lora_params)
    nz = _fwd(p_nz, cfg_l, ids)
    assert np.abs(np.asarray(nz.logits) - np.asarray(base.logits)).max() > 1e-3
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(p_nz).items()}
    folded = {}
    for k, v in flat.items():
        if k[-1] == "kernel" and k[:-1] + ("lora_a",) in flat:
            a, b = flat[k[:-1] + ("lora_a",)], flat[k[:-1] + ("lora_b",)]
            v = v.copy()
            for l in range(CFG.num_layers):
                delta = a[l].reshape(-1, LORA.rank) @ b[l].reshape(LORA.rank, -1) * (LORA.alpha / LORA.rank)
                v[l] += delta.reshape(v.shape[1:])
        if k[-1] not in ("lora_a", "lora_b"):
            folded[k] = v
    ref = _fwd(traverse_util.unflatten_dict(folded), CFG, ids)
    np.testing.assert_allclose(nz.logits, ref.logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(_fwd(fold_lora(p_nz, cfg_l), CFG, ids).logits, ref.logits, atol=1e-5, rtol=0)


def test_dropout_rng_only_matters_with_lora_dropout(lora_params):
    """The LoRA tree does not depend on lora.dropout, so one set of params serves both configs."""
    ids = _rand_ids(3, (B, T))
    rng = jax.random.key(7)
    p = _nonzero_lora_b(lora_params)
    cfg_off, cfg_on = CFG.replace(lora=LORA), CFG.replace(lora=dataclasses.replace(LORA, dropout=0.5))
    det = np.asarray(_fwd(p, cfg_off, ids).logits)
    off = np.asarray(_fwd(p, cfg_off, ids, dropout_rng=rng).logits)
    on = np.asarray(_fwd(p, cfg_on, ids, dropout_rng=rng).logits)
    on2 = np.asarray(_fwd(p, cfg_on, ids, dropout_rng=jax.random.key(8)).logits)
    np.testing.assert_array_equal(off, det)  # lora.dropout = 0: the rng changes nothing
    assert np.abs(on - det).max() > 1e-4  # lora.dropout = 0.5: it does, and
    assert np.abs(on2 - on).max() > 1e-4  # different keys give different masks
    np.testing.assert_array_equal(on, np.asarray(_fwd(p, cfg_on, ids, dropout_rng=rng).logits))  # same key, same draw


# ----------------------------------------------------------------------------- remat


def test_remat_full_same_loss_and_grads(params):
    ids = _rand_ids(5, (B, T))

    def loss(p, cfg):
        logits = forward(p, cfg, ids[:, :-1]).logits
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1, compiler_options=FAST_COMPILE)
    l0, g0 = grad(params, CFG)
    l1, g1 = grad(params, CFG.replace(remat="full"))
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
    assert max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(g0)) > 0


# ----------------------------------------------------------------------------- errors


def test_forward_bad_inputs(params):
    ids = _rand_ids(6, (B, T))
    emb = embed_tokens(params, CFG, ids)
    cases = [
        (dict(input_ids=ids, inputs_embeds=emb), "exactly one of input_ids"),
        (dict(), "exactly one of input_ids"),
        (dict(input_ids=ids[0]), r"input_ids must be \[B,T\]"),
        (dict(inputs_embeds=emb[..., :32]), r"inputs_embeds must be \[B,T,64\]"),
        (dict(input_ids=ids, attention_mask=jnp.ones((B, T + 1), bool)), r"attention_mask must be \[B, prefix\+T\]"),
        (dict(input_ids=ids, positions=jnp.zeros((B, T + 2), jnp.int32)), r"positions must be \[B,T\]"),
        (dict(input_ids=ids, cache=KVCache.empty(CFG.num_layers + 1, B, CFG.num_kv_heads, CFG.head_dim, 3)),
         r"cache k/v must be \[L,B,P,K,H\]"),
        (dict(input_ids=ids, cache=KVCache.empty(CFG.num_layers, B, CFG.num_kv_heads, 8, 3)),
         r"cache k/v must be \[L,B,P,K,H\]"),
        (dict(input_ids=ids, cache=KVCache.empty(CFG.num_layers, B, CFG.num_kv_heads, CFG.head_dim, 3),
              attention_mask=jnp.ones((B, T), bool)), r"attention_mask must be \[B, prefix\+T\] = \(2, 8\)"),
        (dict(input_ids=ids, query_positions=jnp.zeros((B + 1, 2), jnp.int32)), r"query_positions must be \[B,A\]"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(ValueError, match=msg):
            forward(params, CFG, **kwargs)


@pytest.mark.parametrize("change,msg", [
    (dict(num_heads=6, num_kv_heads=4), r"num_heads \(6\) must be a multiple of num_kv_heads \(4\)"),
    (dict(model_type="gpt2"), "model_type 'gpt2' is not supported"),
    (dict(rope_scaling=RopeScaling("yarn")), "rope type 'yarn' is not supported"),
    (dict(head_dim=15), "head_dim must be even"),
    (dict(remat="sometimes"), "remat must be one of"),
    (dict(lora=LoraConfig(rank=2, targets=("qkv",))), r"lora.targets has unknown entries \['qkv'\]"),
    (dict(lora=LoraConfig(rank=2, dropout=1.0)), r"lora.dropout must be in \[0, 1\)"),
])
def test_config_validation(change, msg):
    with pytest.raises(ValueError, match=msg):
        CFG.replace(**change)


def test_from_hf_config_errors():
    hf = {**CFG.to_hf_config()}
    assert ModelConfig.from_hf_config(hf) == CFG
    with pytest.raises(ValueError, match="unsupported model_type 'mistral'"):
        ModelConfig.from_hf_config({**hf, "model_type": "mistral"})
    with pytest.raises(ValueError, match=r"missing required keys \['intermediate_size'\]"):
        ModelConfig.from_hf_config({k: v for k, v in hf.items() if k != "intermediate_size"})
    with pytest.raises(ValueError, match="rope type 'dynamic' is not supported"):
        ModelConfig.from_hf_config({**hf, "rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4}})
