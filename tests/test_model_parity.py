"""Decoder parity with transformers' PyTorch Llama / Qwen2 (tiny random models built here, eager attention).

Compared: logits, every hidden state, per-layer post-RoPE K and V, attention probabilities and
post-RoPE queries at chosen positions, on a plain batch and on a left-padded batch (valid positions).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kava_jax.hf_io import load_pretrained
from kava_jax.models import forward

V, D, F, LAYERS, N, K = 100, 64, 96, 2, 4, 2
B, T = 2, 10
TOL = 1e-5
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

# Tiny programs: LLVM -O0 halves the CPU compile time, which dominates these tests.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
_fwd = jax.jit(forward, static_argnames=("config", "return_attention"), compiler_options=FAST_COMPILE)


def _perturb(model: torch.nn.Module) -> None:
    """HF initialises norms to 1 and biases to 0: randomise them so their mapping is tested."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.2 * torch.randn_like(p))


def build_hf(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=LAYERS, num_attention_heads=N,
                  num_key_value_heads=K, initializer_range=0.1, max_position_embeddings=256)
    if family.startswith("llama"):
        cfg = LlamaConfig(**common, tie_word_embeddings=family == "llama_tied", rope_parameters=dict(LLAMA3_ROPE),
                          rms_norm_eps=1e-5)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = Qwen2Config(**common, tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                               "rope_theta": 1000.0})
        model = Qwen2ForCausalLM(cfg)
    _perturb(model)
    model.set_attn_implementation("eager")
    return model.eval()


@pytest.fixture(scope="module", params=["llama_tied", "llama_untied", "qwen2"])
def models(request, tmp_path_factory):
    hf = build_hf(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    config, params = load_pretrained(path)
    return request.param, hf, config, params


def hf_run(hf, ids, mask):
    """HF forward with hooks on q_proj; returns numpy logits, hidden [L+1,B,T,D], k/v [L,B,S,K,H],
    attentions [L,B,N,T,S], post-RoPE queries [L,B,T,N,H]."""
    ids_t = torch.tensor(ids)
    if mask is None:
        mask_t, pos = None, torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    else:
        mask_t = torch.tensor(mask.astype(np.int64))
        pos = (mask_t.cumsum(-1) - 1).clamp(min=0)
    q_raw = []
    hooks = [layer.self_attn.q_proj.register_forward_hook(lambda m, i, o: q_raw.append(o))
             for layer in hf.model.layers]
    try:
        with torch.no_grad():
            out = hf(ids_t, attention_mask=mask_t, position_ids=pos, output_hidden_states=True,
                     output_attentions=True, use_cache=True)
            cos, sin = hf.model.rotary_emb(out.hidden_states[0], pos)
            hd = hf.model.layers[0].self_attn.head_dim
            queries = []
            for l, q in enumerate(q_raw):
                q = q.view(ids.shape[0], ids.shape[1], -1, hd).transpose(1, 2)  # [B,N,T,H]
                k_cache = out.cache.layers[l].keys
                q_rot, _ = apply_rotary_pos_emb(q, k_cache, cos, sin)
                queries.append(q_rot.transpose(1, 2).numpy())  # [B,T,N,H]
    finally:
        for h in hooks:
            h.remove()
    cache = out.cache
    return dict(
        logits=out.logits.numpy(),
        hidden=np.stack([h.numpy() for h in out.hidden_states]),
        k=np.stack([cache.layers[l].keys.transpose(1, 2).numpy() for l in range(LAYERS)]),
        v=np.stack([cache.layers[l].values.transpose(1, 2).numpy() for l in range(LAYERS)]),
        attn=np.stack([a.numpy() for a in out.attentions]),
        queries=np.stack(queries),
    )


def _maxdiff(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


@pytest.mark.parametrize("padded", [False, True], ids=["plain", "left_padded"])
def test_parity(models, padded):
    family, hf, config, params = models
    assert (config.num_kv_heads, config.num_heads) == (K, N)
    untied = family == "llama_untied"
    assert config.tie_word_embeddings == (not untied) and ("lm_head" in params) == untied
    rs = np.random.RandomState(1)
    ids = rs.randint(0, V, (B, T))
    mask = None
    valid = np.ones((B, T), bool)
    qpos = np.array([[0, 4, T - 1], [2, 6, T - 1]])
    if padded:
        valid[1, :3] = False  # row 1 left-padded by 3
        ids[1, :3] = 0
        mask = valid
        qpos = np.array([[1, 5, T - 1], [3, 7, T - 1]])  # valid positions only
    ref = hf_run(hf, ids, mask)
    out = _fwd(params, config, jnp.asarray(ids), attention_mask=None if mask is None else jnp.asarray(mask),
               query_positions=jnp.asarray(qpos), return_attention=True)

    bi, ti = np.nonzero(valid)  # valid (b, t) pairs
    diffs = {
        "logits": _maxdiff(np.asarray(out.logits)[bi, ti], ref["logits"][bi, ti]),
        "hidden": _maxdiff(np.asarray(out.hidden_states)[:, bi, ti], ref["hidden"][:, bi, ti]),
        "k": _maxdiff(np.asarray(out.kv.k)[:, bi, ti], ref["k"][:, bi, ti]),
        "v": _maxdiff(np.asarray(out.kv.v)[:, bi, ti], ref["v"][:, bi, ti]),
        # query rows at valid positions, every key column (padded keys must get probability 0 in both)
        "attn": _maxdiff(np.asarray(out.attentions)[:, bi, :, ti], ref["attn"][:, bi, :, ti]),
        "queries": _maxdiff(out.queries, np.stack([ref["queries"][:, b, qpos[b]] for b in range(B)], axis=1)),
    }
    print(f"\n{family} {'left_padded' if padded else 'plain'} max abs diffs: "
          + ", ".join(f"{k}={v:.2e}" for k, v in diffs.items()))
    assert out.hidden_states.shape == (LAYERS + 1, B, T, D)
    assert out.attentions.shape == (LAYERS, B, N, T, T)
    assert out.queries.shape == (LAYERS, B, 3, N, config.head_dim)
    for name, d in diffs.items():
        assert d < TOL, f"{family}: {name} differs from transformers by {d}"
    if padded:  # masked keys carry no probability
        assert np.abs(np.asarray(out.attentions)[:, 1, :, 3:, :3]).max() == 0.0
    # the reference is sharp enough that a wrong RoPE / head order would show up
    assert ref["attn"].max() > 0.5


def test_parity_detects_perturbation(models):
    """The comparison can fail: a perturbed k_proj kernel changes K by far more than the tolerance."""
    family, hf, config, params = models
    ids = np.random.RandomState(2).randint(0, V, (1, T))
    ref = hf_run(hf, ids, None)
    bad = jax.tree_util.tree_map(lambda x: x, params)
    bad["layers"]["attn"]["k_proj"]["kernel"] = bad["layers"]["attn"]["k_proj"]["kernel"].at[1, 0, 0, 0].add(0.5)
    out = _fwd(bad, config, jnp.asarray(ids), return_attention=True)
    assert _maxdiff(out.kv.k[0], ref["k"][0]) < TOL  # layer 0 untouched
    assert _maxdiff(out.kv.k[1], ref["k"][1]) > 1e-3
