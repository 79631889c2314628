"""Independent tests of the latent student (kava_jax.kava.student, METHOD §2).

The references here are written from METHOD §2 with nothing but the pure decoder `forward`:
* Jacobi: every pass re-runs `question <bot>` + the M latent inputs as ONE sequence (no cache), and
  the answer is checked against one full sequence `question <bot> latents answer` built from
  `inputs_embeds` by hand, so the cache / position plumbing of the code under test is checked too.
* Sequential: step-by-step decoding in a Python loop with a cache that grows by concatenation.
`prj` is re-implemented here (Linear → exact GELU → Linear → LayerNorm).
Tiny model (vocab 64, LoRA r=4 with non-zero B), float32, left-padded questions of different lengths.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kava_jax.kava.batch import LayoutSpec, TokenizedExample, build_batch
from kava_jax.kava.student import apply_prj, init_prj, student_pass, with_special_rows
from kava_jax.kv import KVCache
from kava_jax.models import abstract_params, forward, get_preset, merge_trees, split_lora

PAD, BOS, EOS, BOT, EOT, LATENT = 0, 1, 2, 3, 4, 5
PROMPT = (6, 7, 8)
Q, C, R, M = 6, 8, 6, 4
T_MAIN = 2
CFG = get_preset("tiny", vocab_size=64).with_lora(4)
TOL = dict(rtol=1e-4, atol=2e-5)
# Compiling dominates this file's run time. At these sizes XLA's CPU backend optimisations and fusion
# emitters cost ~3x the compile time for nothing, so every jit here turns them off (same numerics).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                "xla_cpu_use_fusion_emitters": False}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


# ----------------------------------------------------------------------------------------- fixtures
def _examples(seed):
    rng = np.random.default_rng(seed)

    def toks(n):
        return [int(t) for t in rng.integers(10, 64, size=n)]

    # question lengths 4, 0, 2 (+BOS) -> different left padding; CoT 7, 2, 5 kept tokens; answers 2, 1, 2.
    return [
        TokenizedExample(toks(4), [toks(3), toks(4), toks(2)], toks(2)),
        TokenizedExample(toks(0), [toks(2), toks(3)], toks(1)),
        TokenizedExample(toks(2), [toks(1), toks(4), toks(5)], toks(2)),
    ]


SPEC = LayoutSpec(q_len=Q, cot_len=C, answer_len=R, num_latents=M, prompt_ids=PROMPT, bos_id=BOS, eos_id=EOS,
                  pad_id=PAD, bot_id=BOT, eot_id=EOT, latent_id=LATENT)


@pytest.fixture(scope="module")
def batch():
    b, _ = build_batch(_examples(0), SPEC, batch_size=4)  # row 3 is a batch-padding row
    assert len(set(b["question_len"][:3].tolist())) == 3  # really different left padding
    return {k: jnp.asarray(v) for k, v in b.items()}


def _random_params(seed):
    """Decoder params with the shapes of `abstract_params`, drawn with numpy (cheaper than compiling the
    jax.random init): N(0, 0.05) kernels and LoRA factors (B non-zero, so the adapters matter), norms
    near 1."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(s.shape), s.dtype)
        std = 0.3 if "embedding" in name else 0.05
        return jnp.asarray(std * rng.standard_normal(s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract_params(CFG))


def _random_prj(seed):
    rng = np.random.default_rng(seed)
    d = CFG.hidden_size
    w = {"w1": rng.uniform(-1, 1, (d, d)) / np.sqrt(d), "b1": 0.1 * rng.standard_normal(d),
         "w2": rng.uniform(-1, 1, (d, d)) / np.sqrt(d), "b2": 0.1 * rng.standard_normal(d),
         "ln_scale": 1.0 + 0.1 * rng.standard_normal(d), "ln_bias": 0.1 * rng.standard_normal(d)}
    return {k: jnp.asarray(v, jnp.float32) for k, v in w.items()}


@pytest.fixture(scope="module")
def params():
    return _random_params(0)


@pytest.fixture(scope="module")
def prj():
    p = _random_prj(2)
    assert set(p) == set(jax.eval_shape(lambda: init_prj(jax.random.key(0), CFG.hidden_size)))
    return p


# ----------------------------------------------------------------------------------------- references
def ref_prj(p, x):
    """METHOD §2: Linear(D,D) → GELU (exact, erf) → Linear(D,D) → LayerNorm(D), eps 1e-5."""
    h = x @ p["w1"] + p["b1"]
    h = 0.5 * h * (1.0 + jax.scipy.special.erf(h / np.sqrt(2.0)))
    h = h @ p["w2"] + p["b2"]
    mu = h.mean(-1, keepdims=True)
    var = ((h - mu) ** 2).mean(-1, keepdims=True)
    return (h - mu) / jnp.sqrt(var + 1e-5) * p["ln_scale"] + p["ln_bias"]


def _fwd_ids_raw(params, ids, mask):
    out = forward(params, CFG, ids, attention_mask=mask)
    return out.logits, out.hidden_states, out.kv


def _pass0_raw(params, prj, pid, pv):
    """Pass 0 over `question <bot> <latent>xM` (token ids) -> (e⁽⁰⁾ [B,M,D], latent KV of pass 0)."""
    b, p = pid.shape
    ids0 = jnp.concatenate([pid, jnp.full((b, M), LATENT, pid.dtype)], axis=1)
    mask = jnp.concatenate([pv, jnp.ones((b, M), bool)], axis=1)
    _, hid, kv = _fwd_ids_raw(params, ids0, mask)
    final = hid[-1]
    bot_and_first = jnp.concatenate([final[:, p - 1:p], final[:, p:p + M - 1]], axis=1)  # <bot>, latents 1..M-1
    return ref_prj(prj, bot_and_first), KVCache(kv.k[:, :, p:], kv.v[:, :, p:])


def _pass_raw(params, prj, pid, pv, e):
    """One Jacobi pass, run as ONE uncached sequence `question <bot>` ++ e -> (e_next, latent KV)."""
    b, p = pid.shape
    x = jnp.concatenate([params["embed"]["embedding"][pid], e], axis=1)
    mask = jnp.concatenate([pv, jnp.ones((b, M), bool)], axis=1)
    out = forward(params, CFG, inputs_embeds=x, attention_mask=mask)
    o = out.hidden_states[-1][:, p:]
    e_next = jnp.concatenate([e[:, :1], ref_prj(prj, o[:, :M - 1])], axis=1)
    return e_next, KVCache(out.kv.k[:, :, p:], out.kv.v[:, :, p:])


def _answer_raw(params, batch, latent_inputs):
    """ONE sequence `question <bot>` ++ latent inputs ++ answer block, embeddings built by hand."""
    table = params["embed"]["embedding"]
    pid, pv = batch["student_prefix_ids"], batch["student_prefix_valid"]
    b, p = pid.shape
    x = jnp.concatenate([table[pid], latent_inputs, table[batch["student_answer_ids"]]], axis=1)
    mask = jnp.concatenate([pv, jnp.ones((b, M), bool), batch["student_answer_valid"]], axis=1)
    out = forward(params, CFG, inputs_embeds=x, attention_mask=mask)
    return out.logits[:, p + M:], out.hidden_states[:, :, p + M:]


_pass0, _pass, _answer = (jit(f) for f in (_pass0_raw, _pass_raw, _answer_raw))


def ref_jacobi(params, prj, batch, t_iters, traced=False):
    """Literal METHOD §2 with full (uncached) sequences and a Python loop over the passes. Returns
    (answer_logits, answer_hidden, latent_kv, inputs of the last pass). `traced`: called inside a jit."""
    pass0, one_pass, answer = (_pass0_raw, _pass_raw, _answer_raw) if traced else (_pass0, _pass, _answer)
    pid, pv = batch["student_prefix_ids"], batch["student_prefix_valid"]
    e, latent_kv = pass0(params, prj, pid, pv)
    last_inputs = jnp.broadcast_to(params["embed"]["embedding"][LATENT], e.shape)  # pass 0 ran <latent> tokens
    for _ in range(t_iters):
        last_inputs = e
        e, latent_kv = one_pass(params, prj, pid, pv, e)
    logits, hidden = answer(params, batch, last_inputs)
    return logits, hidden, latent_kv, last_inputs


@jit
def ref_sequential(params, prj, batch):
    """CODI scheme by plain decoding: prefill, then M one-token steps with a cache grown by concatenation."""
    pid, pv = batch["student_prefix_ids"], batch["student_prefix_valid"]
    b, p = pid.shape
    _, hid, cache = _fwd_ids_raw(params, pid, pv)
    mask = pv
    e = ref_prj(prj, hid[-1][:, -1])  # from <bot> (the prefix is left-padded, <bot> is last)
    inputs = []
    for _ in range(M):
        mask = jnp.concatenate([mask, jnp.ones((b, 1), bool)], axis=1)
        out = forward(params, CFG, inputs_embeds=e[:, None], attention_mask=mask, cache=cache)
        cache = out.kv  # prefix + new: grows by one position
        inputs.append(e)
        e = ref_prj(prj, out.hidden_states[-1][:, 0])
    mask = jnp.concatenate([mask, batch["student_answer_valid"]], axis=1)
    out = forward(params, CFG, batch["student_answer_ids"], attention_mask=mask, cache=cache)
    return out.logits, out.hidden_states, KVCache(cache.k[:, :, p:], cache.v[:, :, p:]), jnp.stack(inputs, 1)


@jit
def _run_students(params, prj, batch):
    """student_pass in Jacobi mode with T = 0, 1, T_MAIN (keys T0, T1, T2) and in sequential mode (one compile)."""
    kw = dict(num_latents=M, latent_id=LATENT)
    out = {f"T{t}": student_pass(params, CFG, batch, prj, mode="jacobi", num_iterations=t, **kw)
           for t in (0, 1, T_MAIN)}
    out["seq"] = student_pass(params, CFG, batch, prj, mode="sequential", num_iterations=0, **kw)
    return out


def _close(a, b, **kw):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), **{**TOL, **kw})


def _positions(batch):
    n = np.asarray(batch["student_prefix_valid"]).sum(1)
    return n[:, None] + np.arange(M)[None]


# ----------------------------------------------------------------------------------------- Jacobi
@pytest.fixture(scope="module")
def students(params, prj, batch):
    return _run_students(params, prj, batch)


def test_apply_prj_matches_reference(prj):
    x = jnp.asarray(2.0 * np.random.default_rng(5).standard_normal((3, 5, CFG.hidden_size)), jnp.float32)
    _close(apply_prj(prj, x), ref_prj(prj, x))
    assert apply_prj({}, x) is x


def test_jacobi_matches_python_loop_reference(params, prj, batch, students):
    got = students[f"T{T_MAIN}"]
    logits, hidden, kv, last_inputs = ref_jacobi(params, prj, batch, T_MAIN)
    _close(got.latent_kv.k, kv.k)
    _close(got.latent_kv.v, kv.v)
    _close(got.latent_embeds, last_inputs)
    np.testing.assert_array_equal(np.asarray(got.latent_positions), _positions(batch))
    # answer segment on the cached prefix + latent KV == one full sequence run
    _close(got.answer_logits, logits)
    _close(got.answer_hidden, hidden)
    assert np.isfinite(np.asarray(got.answer_logits)).all()
    # the test can fail: a pass fewer gives a different latent KV and answer
    _, _, kv1, _ = ref_jacobi(params, prj, batch, T_MAIN - 1)
    assert np.abs(np.asarray(kv1.k) - np.asarray(got.latent_kv.k)).max() > 1e-3


def test_t0_is_pause_tokens_and_t1_differs(params, prj, batch, students):
    t0, t1 = students["T0"], students["T1"]
    # T = 0: the latent KV of pass 0 (`question <bot> <latent>xM` run as tokens), i.e. pause tokens
    logits, _, kv0, inputs0 = ref_jacobi(params, prj, batch, 0)
    _close(t0.latent_kv.k, kv0.k)
    _close(t0.latent_kv.v, kv0.v)
    _close(t0.answer_logits, logits)
    _close(t0.latent_embeds, inputs0)  # the inputs of the last (= only) pass: <latent> token embeddings
    logits1, _, kv1, _ = ref_jacobi(params, prj, batch, 1)
    _close(t1.latent_kv.k, kv1.k)
    _close(t1.answer_logits, logits1)
    assert np.abs(np.asarray(t1.latent_kv.k) - np.asarray(t0.latent_kv.k)).max() > 1e-3
    assert np.abs(np.asarray(t1.answer_logits) - np.asarray(t0.answer_logits)).max() > 1e-3


# ----------------------------------------------------------------------------------------- sequential
def test_sequential_matches_growing_cache_decoding(params, prj, batch, students):
    got = students["seq"]
    logits, hidden, kv, inputs = ref_sequential(params, prj, batch)
    _close(got.latent_kv.k, kv.k)
    _close(got.latent_kv.v, kv.v)
    _close(got.latent_embeds, inputs)
    np.testing.assert_array_equal(np.asarray(got.latent_positions), _positions(batch))
    _close(got.answer_logits, logits)
    _close(got.answer_hidden, hidden)
    # METHOD §2: Jacobi with T = M passes reproduces the sequential scheme exactly (slot j is exact
    # after j passes); with T = M-1 the last slot is still stale.
    logits_j, _, kv_j, _ = ref_jacobi(params, prj, batch, M)
    _close(kv_j.k, kv.k)
    _close(logits_j, logits)
    _, _, kv_short, _ = ref_jacobi(params, prj, batch, M - 1)
    assert np.abs(np.asarray(kv_short.k[:, :, -1]) - np.asarray(kv.k[:, :, -1])).max() > 1e-3


# ----------------------------------------------------------------------------------------- gradients
def _assemble(trainable, base):
    params = merge_trees(base, trainable["lora"])
    return with_special_rows(params, (BOT, EOT, LATENT), trainable["special_embed"])


def _probe(batch):
    rng = np.random.default_rng(7)
    lat = (CFG.num_layers, 4, M, CFG.num_kv_heads, CFG.head_dim)
    return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((4, 1 + R, CFG.vocab_size), lat, lat))


def _functional(logits, kv, probe):
    return jnp.sum(logits * probe[0]) + jnp.sum(kv.k * probe[1]) + jnp.sum(kv.v * probe[2])


@jit
def _grad_code(trainable, base, batch, probe):
    """Gradient of the probe functional through `student_pass` (Jacobi, T = T_MAIN)."""
    def f(tr):
        out = student_pass(_assemble(tr, base), CFG, batch, tr["prj"], mode="jacobi", num_latents=M,
                           num_iterations=T_MAIN, latent_id=LATENT)
        return _functional(out.answer_logits, out.latent_kv, probe)

    return jax.grad(f)(trainable)


@functools.partial(jit, static_argnames=("t_iters",))
def _grad_ref(trainable, base, batch, probe, t_iters):
    def f(tr):
        logits, _, kv, _ = ref_jacobi(_assemble(tr, base), tr["prj"], batch, t_iters, traced=True)
        return _functional(logits, kv, probe)

    return jax.grad(f)(trainable)


def test_gradients_flow_through_all_passes(params, prj, batch, students):
    base, lora = split_lora(params)
    special = params["embed"]["embedding"][jnp.asarray([BOT, EOT, LATENT])]
    trainable = {"lora": lora, "prj": prj, "special_embed": special}
    probe = _probe(batch)
    g = _grad_code(trainable, base, batch, probe)
    g_ref = _grad_ref(trainable, base, batch, probe, T_MAIN)
    # every leaf gets a gradient equal to the one through the uncached Python-loop reference (a detach
    # anywhere between passes would drop terms from the code's gradient)
    flat_ref = [x for _, x in jax.tree_util.tree_leaves_with_path(g_ref)]
    for (path, a), r in zip(jax.tree_util.tree_leaves_with_path(g), flat_ref, strict=True):
        a, r = np.asarray(a), np.asarray(r)
        assert np.abs(a).max() > 0, f"zero gradient at {jax.tree_util.keystr(path)}"
        np.testing.assert_allclose(a, r, rtol=2e-3, atol=1e-5 * np.abs(r).max(),
                                   err_msg=jax.tree_util.keystr(path))
    # each special row (<bot>, <eot>, <latent>) gets its own gradient
    assert (np.abs(np.asarray(g["special_embed"])).max(axis=1) > 0).all()
    # prj's gradient depends on T: central finite differences along a random prj direction, with the
    # already compiled student at T = 1 and T = T_MAIN; the latter matches <grad, u>, the former does not.
    rng = np.random.default_rng(11)
    u = {k: jnp.asarray(rng.standard_normal(v.shape), jnp.float32) for k, v in prj.items()}
    eps = 1e-3

    def fd(t_iters):
        vals = []
        for sign in (1.0, -1.0):
            p = {k: prj[k] + sign * eps * u[k] for k in prj}
            out = _run_students(params, p, batch)[f"T{t_iters}"]
            vals.append(float(_functional(out.answer_logits, out.latent_kv, probe)))
        return (vals[0] - vals[1]) / (2 * eps)

    directional = sum(float(jnp.vdot(g["prj"][k], u[k])) for k in prj)
    fd_main, fd_one = fd(T_MAIN), fd(1)
    np.testing.assert_allclose(fd_main, directional, rtol=2e-2)
    assert abs(fd_one - fd_main) > 0.2 * abs(fd_main)
