"""Independent tests of the KaVa objectives (kava_jax.kava.objective / teacher, METHOD §1, §3, §4).

* Every objective runs under jit and its loss is the weighted sum of its metric terms (weights chosen
  away from 1 so a missing weight shows); pccot / codi have no KV term; alpha_kv enters linearly.
* The kava metrics equal float64 numpy losses computed here from a plain `forward` over the teacher
  sequence, `student_pass` (tested in test_student.py) and `compress_teacher_kv` (test_compress.py):
  this checks the objective's plumbing (CoT slice, answer-side queries, distillation indices, pre-RoPE).
* Stop-gradient: with teacher_ce_weight = 0 and the teacher pass routed to a separate copy of the
  decoder params, the gradient into that copy is exactly zero (the student's trainables all get one).
* The jitted value_and_grad does not retrace on a second batch of the same shapes; config validation
  names the field; a cot_len that does not match the batch is refused.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kava_jax.kava import objective as objective_lib
from kava_jax.kava.batch import LayoutSpec, TokenizedExample, build_batch
from kava_jax.kava.compress import compress_teacher_kv
from kava_jax.kava.objective import ObjectiveConfig, init_trainable, kava_loss, model_params
from kava_jax.kava.student import student_pass
from kava_jax.models import abstract_params, forward, get_preset, split_lora

PAD, BOS, EOS, BOT, EOT, LATENT = 0, 1, 2, 3, 4, 5
PROMPT = (6, 7, 8)
Q, C, R, M, T = 6, 8, 6, 4, 2
MODEL = get_preset("tiny", vocab_size=64).with_lora(4)
WEIGHTS = dict(student_ce_weight=0.7, teacher_ce_weight=1.3, alpha_codi=2.5, alpha_kv=0.6)
BASE = ObjectiveConfig(model=MODEL, num_latents=M, num_iterations=T, special_ids=(BOT, EOT, LATENT), cot_len=C,
                       **WEIGHTS)
CONFIGS = {
    "kava": BASE,
    "kava_alpha": dataclasses.replace(BASE, alpha_kv=1.7),
    "kava_pre_rope": dataclasses.replace(BASE, pre_rope=True),
    **{name: dataclasses.replace(BASE, objective=name) for name in ("pccot", "codi", "cot", "nocot")},
}
# Compiling dominates the run time; at these sizes XLA's CPU backend optimisations and fusion emitters
# cost ~3x the compile time for nothing, so every jit here turns them off (same numerics).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                "xla_cpu_use_fusion_emitters": False}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)

SPEC = LayoutSpec(q_len=Q, cot_len=C, answer_len=R, num_latents=M, prompt_ids=PROMPT, bos_id=BOS, eos_id=EOS,
                  pad_id=PAD, bot_id=BOT, eot_id=EOT, latent_id=LATENT)


# ----------------------------------------------------------------------------------------- fixtures
def _examples(seed):
    rng = np.random.default_rng(seed)

    def toks(n):
        return [int(t) for t in rng.integers(10, 64, size=n)]

    # different question lengths (left padding), CoT lengths 7 / 2 (< M: empty slots) / 5, answers 2 / 1 / 2
    return [
        TokenizedExample(toks(4), [toks(3), toks(4), toks(2)], toks(2)),
        TokenizedExample(toks(0), [toks(2), toks(3)], toks(1)),
        TokenizedExample(toks(2), [toks(1), toks(4), toks(5)], toks(2)),
    ]


def _batch(seed):
    b, _ = build_batch(_examples(seed), SPEC, batch_size=4)  # row 3: batch padding (example_valid False)
    return {k: jnp.asarray(v) for k, v in b.items()}


def _random_params(seed):
    """Decoder params shaped like `abstract_params`, drawn with numpy (no jax.random init to compile);
    LoRA B non-zero so the adapters matter."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(s.shape), s.dtype)
        return jnp.asarray((0.3 if "embedding" in name else 0.05) * rng.standard_normal(s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract_params(MODEL))


def _random_prj(seed):
    rng = np.random.default_rng(seed)
    d = MODEL.hidden_size
    w = {"w1": rng.uniform(-1, 1, (d, d)) / np.sqrt(d), "b1": 0.1 * rng.standard_normal(d),
         "w2": rng.uniform(-1, 1, (d, d)) / np.sqrt(d), "b2": 0.1 * rng.standard_normal(d),
         "ln_scale": 1.0 + 0.1 * rng.standard_normal(d), "ln_bias": 0.1 * rng.standard_normal(d)}
    return {k: jnp.asarray(v, jnp.float32) for k, v in w.items()}


@pytest.fixture(scope="module")
def batch():
    return _batch(0)


@pytest.fixture(scope="module")
def state():
    """(trainable, frozen) in train.mode 'lora' with random LoRA / prj / special rows."""
    params = _random_params(0)
    base, lora = split_lora(params)
    special = jnp.asarray(0.3 * np.random.default_rng(1).standard_normal((3, MODEL.hidden_size)), jnp.float32)
    return {"lora": lora, "prj": _random_prj(2), "special_embed": special}, base


@jit
def _run_all(trainable, frozen, batch):
    return {name: kava_loss(trainable, frozen, batch, cfg) for name, cfg in CONFIGS.items()}


@pytest.fixture(scope="module")
def results(state, batch):
    return jax.device_get(_run_all(*state, batch))


# ----------------------------------------------------------------------------------------- numpy references
def np_ce(logits, targets, mask):
    x = np.asarray(logits, np.float64)
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    nll = lse - np.take_along_axis(x, np.asarray(targets)[..., None], -1)[..., 0]
    mask = np.asarray(mask, bool)
    return nll[mask].sum() / max(mask.sum(), 1)


def np_smooth_l1(r):
    a = np.abs(r)
    return np.where(a < 1, 0.5 * r * r, a - 0.5)


def np_codi(s, t, example_valid):
    """s, t [L,B,D]; per-layer teacher std over valid rows; smooth-L1; mean over valid (b, d), then layers."""
    s, t = np.asarray(s, np.float64)[:, example_valid], np.asarray(t, np.float64)[:, example_valid]
    sigma = t.std(axis=(1, 2), keepdims=True) + 1e-6
    return np_smooth_l1((s - t) / sigma).mean(axis=(1, 2)).mean()


def np_kv(sk, sv, tk, tv, slot_valid):
    """[L,B,M,K,H] arrays, slot_valid [L,B,K,M]; layer-wise std of the valid teacher elements; mean over valid."""
    mask = np.broadcast_to(np.transpose(np.asarray(slot_valid), (0, 1, 3, 2))[..., None], np.shape(sk))
    total = 0.0
    for s, t in ((sk, tk), (sv, tv)):
        s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
        for layer in range(s.shape[0]):
            m = mask[layer]
            sigma = t[layer][m].std() + 1e-6
            total += np_smooth_l1((s[layer][m] - t[layer][m]) / sigma).sum()
    return 0.5 * total / mask.sum()


def np_unrotate(k, positions, head_dim, theta):
    """Rotate-half RoPE undone: k [L,B,S,K,H] rotated at positions [B,S]."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    ang = np.asarray(positions, np.float64)[..., None] * inv
    ang = np.concatenate([ang, ang], -1)[None, :, :, None, :]
    k = np.asarray(k, np.float64)
    half = head_dim // 2
    rot = np.concatenate([-k[..., half:], k[..., :half]], -1)
    return k * np.cos(ang) - rot * np.sin(ang)


@jit
def _reference_arrays(trainable, frozen, batch):
    """Teacher by a plain forward over the full sequence; student via student_pass; compression targets."""
    params = model_params(trainable, frozen, BASE)
    b = batch["teacher_ids"].shape[0]
    answer_pos = jnp.broadcast_to(Q + C + jnp.arange(R), (b, R))
    out = forward(params, MODEL, batch["teacher_ids"], attention_mask=batch["teacher_valid"],
                  query_positions=answer_pos)
    positions = jnp.cumsum(batch["teacher_valid"], axis=1) - 1
    k, v = out.kv.k[:, :, Q:Q + C], out.kv.v[:, :, Q:Q + C]
    cot_valid, ans_valid = batch["teacher_valid"][:, Q:Q + C], batch["teacher_valid"][:, Q + C:]
    targets = {
        pre: compress_teacher_kv(k, v, out.queries, ans_valid, cot_valid, m=M, lam=BASE.lam, pre_rope=pre,
                                 key_positions=positions[:, Q:Q + C],
                                 inv_freq=1.0 / MODEL.rope_theta ** (jnp.arange(0, MODEL.head_dim, 2) / MODEL.head_dim))
        for pre in (False, True)}
    st = student_pass(params, MODEL, batch, trainable["prj"], mode="jacobi", num_latents=M, num_iterations=T,
                      latent_id=LATENT)
    return dict(t_logits=out.logits, t_hidden=out.hidden_states, s_logits=st.answer_logits,
                s_hidden=st.answer_hidden, s_k=st.latent_kv.k, s_v=st.latent_kv.v, targets=targets)


# ----------------------------------------------------------------------------------------- tests
def test_every_objective_loss_is_its_weighted_terms(results):
    w = WEIGHTS
    for name, (loss, metrics) in results.items():
        assert np.isfinite(loss), name
        assert metrics["loss"] == loss, name
        if name == "nocot":
            assert set(metrics) == {"loss", "ce_nocot"}
            np.testing.assert_allclose(loss, metrics["ce_nocot"], rtol=1e-6)
            continue
        expect = w["teacher_ce_weight"] * metrics["ce_teacher"]
        if name == "cot":
            assert set(metrics) == {"loss", "ce_teacher"}
        else:
            expect += w["student_ce_weight"] * metrics["ce_student"] + w["alpha_codi"] * metrics["codi"]
            assert metrics["codi"] > 0 and metrics["ce_student"] > 0
            if name in ("pccot", "codi"):
                assert "kv" not in metrics, name
            else:
                assert metrics["kv"] > 0
                expect += CONFIGS[name].alpha_kv * metrics["kv"]
        np.testing.assert_allclose(loss, expect, rtol=1e-6, err_msg=name)
    # alpha_kv enters linearly: everything else is unchanged
    (l1, m1), (l2, m2) = results["kava"], results["kava_alpha"]
    np.testing.assert_allclose(l2 - l1, (1.7 - 0.6) * m1["kv"], rtol=1e-5)
    for key in ("ce_teacher", "ce_student", "codi", "kv"):
        assert m1[key] == m2[key], key
    # pccot = kava without the KV term; codi (sequential latents) differs from the Jacobi student
    np.testing.assert_allclose(results["pccot"][0], l1 - 0.6 * m1["kv"], rtol=1e-5)
    assert abs(results["codi"][1]["ce_student"] - m1["ce_student"]) > 1e-4
    # the teacher CE is the same in every teacher-based objective
    for name in ("pccot", "codi", "cot"):
        np.testing.assert_allclose(results[name][1]["ce_teacher"], m1["ce_teacher"], rtol=1e-6)


def test_kava_metrics_match_numpy_reference(state, batch, results):
    ref = jax.device_get(_reference_arrays(*state, batch))
    nb = jax.device_get(batch)
    _, m = results["kava"]
    np.testing.assert_allclose(m["ce_teacher"], np_ce(ref["t_logits"], nb["teacher_targets"],
                                                      nb["teacher_loss_mask"]), rtol=1e-5)
    np.testing.assert_allclose(m["ce_student"], np_ce(ref["s_logits"], nb["student_answer_targets"],
                                                      nb["student_answer_loss_mask"]), rtol=1e-5)
    rows = np.arange(4)
    t_h = ref["t_hidden"][1:, rows, nb["teacher_distill_idx"]]  # block outputs 1..L at ':'
    s_h = ref["s_hidden"][1:, rows, nb["student_distill_idx"]]
    assert (nb["teacher_ids"][rows, nb["teacher_distill_idx"]] == PROMPT[-1]).all()
    np.testing.assert_allclose(m["codi"], np_codi(s_h, t_h, nb["example_valid"]), rtol=1e-4)
    tgt = ref["targets"][False]
    assert not tgt.slot_valid[:, 1, :, 2:].any() and tgt.slot_valid[:, 0].all()  # row 1 has a 2-token CoT
    np.testing.assert_allclose(m["kv"], np_kv(ref["s_k"], ref["s_v"], tgt.k, tgt.v, tgt.slot_valid), rtol=1e-4)
    np.testing.assert_allclose(m["valid_slot_fraction"], tgt.slot_valid.mean(), rtol=1e-6)
    # pre-RoPE ablation: student keys un-rotated at their positions (question <bot> then latents)
    _, mp = results["kava_pre_rope"]
    tgt = ref["targets"][True]
    pos = nb["student_prefix_valid"].sum(1)[:, None] + np.arange(M)
    sk = np_unrotate(ref["s_k"], pos, MODEL.head_dim, MODEL.rope_theta)
    np.testing.assert_allclose(mp["kv"], np_kv(sk, ref["s_v"], tgt.k, tgt.v, tgt.slot_valid), rtol=1e-4)
    assert abs(mp["kv"] - m["kv"]) > 1e-3 * m["kv"]
    for key in ("ce_teacher", "ce_student", "codi"):
        np.testing.assert_allclose(mp[key], m[key], rtol=1e-6)


ROUTED = dataclasses.replace(BASE, teacher_ce_weight=0.0)


@pytest.fixture(scope="module")
def routed_step():
    """A jitted value_and_grad of the real `kava_loss` (config ROUTED: teacher_ce_weight = 0) w.r.t. the
    trainables AND a separate copy of the decoder params that only the teacher pass uses.

    The only change is that `teacher_pass` (the real one) is called with `teacher_params` instead of the
    params kava_loss assembled; the student keeps running on `trainable`. Returns (step, traces)."""
    traces = []
    real = objective_lib.teacher_pass

    def loss(trainable, teacher_params, frozen, batch):
        traces.append(1)
        objective_lib.teacher_pass = lambda params, *a, **kw: real(teacher_params, *a, **kw)
        try:
            return kava_loss(trainable, frozen, batch, ROUTED)
        finally:
            objective_lib.teacher_pass = real

    return jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)), traces


def _perturbed(tree, seed, scale=0.02):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: x + jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype), tree)


def test_teacher_targets_are_stop_gradient(state, batch, results, routed_step):
    step, _ = routed_step
    trainable, frozen = state
    teacher_params = model_params(trainable, frozen, BASE)  # a separate copy with the same values
    (loss, m), (g_student, g_teacher) = jax.device_get(step(trainable, teacher_params, frozen, batch))
    # same function as the plain kava objective when the copies agree (minus the zero-weighted teacher CE)
    ref_loss, ref_m = results["kava"]
    for key in ("ce_teacher", "ce_student", "codi", "kv"):
        np.testing.assert_allclose(m[key], ref_m[key], rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(loss, ref_loss - BASE.teacher_ce_weight * ref_m["ce_teacher"], rtol=1e-5)
    # teacher_ce_weight = 0: nothing reaches the params that produced the teacher targets
    for path, g in jax.tree_util.tree_leaves_with_path(g_teacher):
        assert (g == 0).all(), f"distillation terms leak gradient into the teacher at {jax.tree_util.keystr(path)}"
    # ... while every trainable of the student gets a gradient, each special row included
    for path, g in jax.tree_util.tree_leaves_with_path(g_student):
        assert np.abs(g).max() > 0, jax.tree_util.keystr(path)
    assert (np.abs(g_student["special_embed"]).max(axis=1) > 0).all()  # <bot>, <eot>, <latent>
    # the teacher copy is live (so the zero above is not vacuous): perturbing it moves the distillation
    # targets, not the student CE, and still sends no gradient into it
    (_, m2), (_, g_teacher2) = jax.device_get(step(trainable, _perturbed(teacher_params, 5), frozen, batch))
    assert abs(m2["codi"] - m["codi"]) > 1e-4 * m["codi"] and abs(m2["kv"] - m["kv"]) > 1e-4 * m["kv"]
    assert m2["ce_student"] == m["ce_student"]
    assert all((g == 0).all() for g in jax.tree_util.tree_leaves(g_teacher2))


def test_value_and_grad_does_not_retrace(state, batch, routed_step):
    step, traces = routed_step
    trainable, frozen = state
    teacher_params = model_params(trainable, frozen, BASE)
    (loss1, _), _ = step(trainable, teacher_params, frozen, batch)
    (loss2, _), grads = step(trainable, teacher_params, frozen, _batch(1))  # new data, same bucket shapes
    jax.block_until_ready(grads)
    assert float(loss1) != float(loss2)
    assert len(traces) == 1


@pytest.mark.parametrize("field,value", [
    ("objective", "kava2"), ("num_latents", 0), ("num_iterations", -1), ("latent_mode", "parallel"),
    ("lam", 1.5), ("lam", -0.1), ("compression", "random"), ("kv_loss_type", "huber"),
    ("codi_loss_type", "cosine"), ("kv_reduction", "sum"), ("alpha_kv", -1.0), ("alpha_codi", -0.5),
    ("student_ce_weight", -1.0), ("teacher_ce_weight", -1.0), ("cot_len", 0),
])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"kava\.{field}\b"):
        ObjectiveConfig(model=MODEL, **{field: value})


def test_cot_len_must_match_the_batch(state, batch):
    bad = ObjectiveConfig(model=MODEL, num_latents=M, num_iterations=T, special_ids=(BOT, EOT, LATENT),
                          cot_len=C + 1)
    with pytest.raises(ValueError, match="cot_len"):
        kava_loss(*state, batch, bad)


def test_init_trainable_modes(state):
    params = _random_params(3)
    trainable, frozen = init_trainable(jax.random.key(0), params, BASE, mode="lora")
    assert set(trainable) == {"lora", "prj", "special_embed"}
    assert "lora_a" not in str(jax.tree_util.tree_structure(frozen))
    np.testing.assert_array_equal(trainable["special_embed"],
                                  params["embed"]["embedding"][np.array([BOT, EOT, LATENT])])
    full, frozen_full = init_trainable(jax.random.key(0), params, CONFIGS["cot"], mode="full")
    assert frozen_full == {} and full["prj"] == {} and "params" in full
    with pytest.raises(ValueError, match="train.mode"):
        init_trainable(jax.random.key(0), params, BASE, mode="partial")
