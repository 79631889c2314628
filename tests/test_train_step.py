"""Train step: sharded == unsharded, loss goes down (lora / full), grad accumulation, optimizer pieces, bf16.

Compiles use quick XLA CPU options (FAST) and tiny shapes: the KaVa step (teacher + Jacobi student +
compression + backward) is a large graph, so every distinct compile costs tens of seconds here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from kava_jax.kava.batch import LayoutSpec, TokenizedExample, build_batch
from kava_jax.kava.objective import ObjectiveConfig, init_trainable
from kava_jax.models import get_preset, init_params
from kava_jax.train import optim
from kava_jax.train import sharding as sh
from kava_jax.train.state import TrainState, abstract_train_state, create_train_state
from kava_jax.train.step import compile_train_step, make_train_step

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
SPECIALS = (120, 121, 122)
SPEC = LayoutSpec(q_len=8, cot_len=8, answer_len=6, num_latents=4, prompt_ids=(10, 11), bos_id=1, eos_id=2,
                  pad_id=0, bot_id=SPECIALS[0], eot_id=SPECIALS[1], latent_id=SPECIALS[2])
# eps 1e-5: Adam's first update is lr·g/(|g|+eps), which turns f32 reduction-order noise in near-zero
# gradients into parameter differences of up to lr·noise/eps (seen: 4e-6 with eps 1e-6); 1e-5 keeps them small.
TRAIN = dict(lr=1e-2, schedule="constant", warmup_frac=0.0, weight_decay=0.1, b1=0.9, b2=0.999, eps=1e-5,
             grad_clip=1.0)


_init_params = jax.jit(init_params, static_argnums=0)  # eager Linen init of the scanned model is slow


def _examples(seed, n, equal_lengths=False):
    rs = np.random.RandomState(seed)

    def toks(k):
        return [int(t) for t in rs.randint(3, 100, size=k)]

    out = []
    for _ in range(n):
        q = 5 if equal_lengths else rs.randint(2, 7)
        steps = [toks(3 if equal_lengths else rs.randint(1, 4)) for _ in range(3)]
        out.append(TokenizedExample(toks(q), steps, toks(2)))
    return out


def _objective(mc, objective="kava"):
    return ObjectiveConfig(model=mc, objective=objective, num_latents=4, num_iterations=1, special_ids=SPECIALS,
                           cot_len=SPEC.cot_len)


def _setup(mc, objective="kava", mode="lora", train=TRAIN, seed=0, equal_lengths=False):
    oc = _objective(mc, objective)
    batch, _ = build_batch(_examples(seed, 8, equal_lengths), SPEC)
    params = _init_params(mc, jax.random.key(0))
    trainable, frozen = init_trainable(jax.random.key(1), params, oc, mode=mode)
    opt = optim.make_optimizer(train, 100)
    state = create_train_state(trainable, opt, jax.random.key(2))
    return oc, opt, state, frozen, batch


def _compile(step, *args):
    return jax.jit(step).lower(*args).compile(FAST)


def _flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


@pytest.fixture(scope="module")
def kava_lora():
    """The tiny KaVa LoRA setup (dropout 0.1) and its unsharded compiled step (shared by two tests)."""
    mc = get_preset("tiny").with_lora(4, 8.0, 0.1)
    oc, opt, state, frozen, batch = _setup(mc)
    step = make_train_step(oc, opt)
    return dict(mc=mc, opt=opt, state=state, frozen=frozen, batch=batch, step=step,
                compiled=_compile(step, state, frozen, batch))


def test_sharded_step_equals_unsharded(kava_lora):
    k = kava_lora
    ref_state, ref_m = k["compiled"](k["state"], k["frozen"], k["batch"])
    mesh = sh.make_mesh(dict(data=2, fsdp=2, tensor=2))
    cs = compile_train_step(k["step"], mesh, k["state"], k["frozen"], k["batch"], compiler_options=FAST)
    assert set(cs.memory) >= {"argument", "output", "temp", "generated_code", "total"}
    assert cs.memory["argument"] > 0
    donated = jax.tree.map(jnp.copy, k["state"])  # the compiled step donates (deletes) its state argument
    args = jax.device_put((donated, k["frozen"], k["batch"]),
                          (cs.shardings.state, cs.shardings.frozen, cs.shardings.batch))
    new_state, m = cs.compiled(*args)

    assert set(m) >= {"loss", "ce_teacher", "ce_student", "codi", "kv", "grad_norm", "lr"}
    for key in ("loss", "ce_teacher", "ce_student", "codi", "kv", "grad_norm"):
        np.testing.assert_allclose(float(m[key]), float(ref_m[key]), rtol=1e-5, atol=1e-5, err_msg=key)
    assert float(m["lr"]) == pytest.approx(1e-2)
    assert int(new_state.step) == 1 and int(ref_state.step) == 1
    got, want = _flat(new_state.trainable), _flat(ref_state.trainable)
    assert got.keys() == want.keys()
    moved = 0
    for path in want:
        np.testing.assert_allclose(np.asarray(got[path]), np.asarray(want[path]), atol=1e-5, rtol=0, err_msg=path)
        moved += not np.allclose(np.asarray(want[path]), np.asarray(_flat(k["state"].trainable)[path]))
    assert moved >= len(want) // 2  # the step really changed the params

    # intended shardings: on the outputs, in the compiled executable and for the batch
    lora = new_state.trainable["lora"]["layers"]
    assert lora["attn"]["q_proj"]["lora_a"].sharding.spec == P(None, "fsdp", None)
    assert lora["attn"]["q_proj"]["lora_b"].sharding.spec == P(None, None, "tensor", None)
    assert lora["mlp"]["down_proj"]["lora_a"].sharding.spec == P(None, "tensor", None)
    assert new_state.trainable["special_embed"].sharding.spec == P(None, None)
    assert cs.shardings.batch["teacher_ids"].spec == P(("data", "fsdp"), None)
    assert cs.shardings.batch["example_valid"].spec == P(("data", "fsdp"))
    (_, _, batch_in), _ = cs.compiled.input_shardings
    assert batch_in["student_prefix_ids"].is_equivalent_to(cs.shardings.batch["student_prefix_ids"], 2)
    assert m["loss"].sharding.is_fully_replicated


def test_lora_loss_goes_down(kava_lora):
    k = kava_lora
    state, losses = k["state"], []
    for _ in range(10):
        state, m = k["compiled"](state, k["frozen"], k["batch"])
        losses.append(float(m["loss"]))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.93 * losses[0] and losses[-1] < losses[0], losses
    assert int(state.step) == 10
    np.testing.assert_array_equal(np.asarray(state.rng), np.asarray(k["state"].rng))


def test_full_mode_loss_goes_down():
    mc = get_preset("tiny")
    oc, opt, state, frozen, batch = _setup(mc, objective="cot", mode="full", train={**TRAIN, "lr": 3e-3})
    assert frozen == {} and "params" in state.trainable
    compiled = _compile(make_train_step(oc, opt), state, frozen, batch)
    losses = []
    for _ in range(10):
        state, m = compiled(state, frozen, batch)
        losses.append(float(m["ce_teacher"]))
    assert losses[-1] < 0.8 * losses[0], losses


def test_grad_accum_equals_full_batch():
    """Micro-batches (rows 0,2,4,6 and 1,3,5,7) have equal valid-token counts, so the averaged
    micro-batch gradients equal the full-batch gradient; the two halves hold different tokens."""
    mc = get_preset("tiny").with_lora(4, 8.0, 0.0)
    oc, opt, state, frozen, batch = _setup(mc, objective="cot", seed=3, equal_lengths=True)
    counts = batch["teacher_loss_mask"].sum(1)
    assert counts[0::2].sum() == counts[1::2].sum() > 0
    assert not np.array_equal(batch["teacher_ids"][0::2], batch["teacher_ids"][1::2])
    out = {}
    for g in (1, 2):
        step = make_train_step(oc, opt, grad_accum=g)
        out[g] = _compile(step, state, frozen, batch)(state, frozen, batch)
    (s1, m1), (s2, m2) = out[1], out[2]
    for key in ("loss", "ce_teacher", "grad_norm"):
        np.testing.assert_allclose(float(m2[key]), float(m1[key]), rtol=1e-5, atol=1e-6, err_msg=key)
    a, b = _flat(s1.trainable), _flat(s2.trainable)
    for path in a:
        np.testing.assert_allclose(np.asarray(b[path]), np.asarray(a[path]), atol=1e-5, rtol=0, err_msg=path)
    assert not np.allclose(np.asarray(a["lora/layers/attn/q_proj/lora_b"]),
                           np.asarray(_flat(state.trainable)["lora/layers/attn/q_proj/lora_b"]))


def test_grad_accum_errors():
    mc = get_preset("tiny").with_lora(4, 8.0, 0.0)
    oc = _objective(mc, "cot")
    opt = optim.make_optimizer(TRAIN, 10)
    with pytest.raises(ValueError, match=r"train.grad_accum must be an int >= 1, got 0"):
        make_train_step(oc, opt, grad_accum=0)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in build_batch(_examples(0, 8), SPEC)[0].items()}
    trainable, frozen = jax.eval_shape(lambda r: init_trainable(r, init_params(mc, r), oc), jax.random.key(0))
    state = abstract_train_state(trainable, opt)
    with pytest.raises(ValueError, match=r"train.grad_accum=3 does not divide the batch size 8"):
        jax.eval_shape(make_train_step(oc, opt, grad_accum=3), state, frozen, batch)


def test_bf16_compute_lowers_with_f32_params_and_losses():
    mc = get_preset("tiny", dtype="bfloat16").with_lora(4, 8.0, 0.1)
    oc = _objective(mc)
    opt = optim.make_optimizer(TRAIN, 10)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in build_batch(_examples(0, 8), SPEC)[0].items()}
    trainable, frozen = jax.eval_shape(lambda r: init_trainable(r, init_params(mc, r), oc), jax.random.key(0))
    state = abstract_train_state(trainable, opt)
    lowered = jax.jit(make_train_step(oc, opt)).lower(state, frozen, batch)
    out_state, metrics = lowered.out_info
    assert {x.dtype for x in jax.tree.leaves(out_state.trainable)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype(jnp.float32)}
    assert all(v.dtype == jnp.float32 and v.shape == () for v in metrics.values())
    assert "bf16" in lowered.as_text()


# ------------------------------------------------------------------------------------ optimizer
def test_weight_decay_mask_tree_and_effect():
    mc = get_preset("tiny", attention_bias=True).with_lora(4, 8.0, 0.0)
    oc = _objective(mc)
    params = _init_params(mc, jax.random.key(0))
    want_false = {"special_embed", "prj/b1", "prj/b2", "prj/ln_scale", "prj/ln_bias"}
    for mode in ("lora", "full"):
        trainable, _ = init_trainable(jax.random.key(1), params, oc, mode=mode)
        mask = _flat(optim.decay_mask(trainable))
        assert mask.keys() == _flat(trainable).keys()
        for path, decayed in mask.items():
            leaf = path.split("/")[-1]
            no_decay = path in want_false or leaf in ("scale", "bias")
            assert decayed == (not no_decay), path
        if mode == "full":
            assert not mask["params/final_norm/scale"] and not mask["params/layers/attn/q_proj/bias"]
            assert mask["params/embed/embedding"] and mask["params/layers/mlp/up_proj/kernel"]
        else:
            assert mask["lora/layers/attn/q_proj/lora_a"] and mask["prj/w1"]
        # with zero gradients AdamW moves only decayed leaves: p <- p (1 - lr·wd)
        lr, wd = 0.1, 0.5
        opt = optim.make_optimizer(dict(lr=lr, schedule="constant", weight_decay=wd, grad_clip=None), 10)

        @jax.jit
        def zero_grad_update(p, opt=opt):
            updates, _ = opt.update(jax.tree.map(jnp.zeros_like, p), opt.init(p), p)
            return jax.tree.map(jnp.add, p, updates)

        new = _flat(zero_grad_update(trainable))
        old = _flat(trainable)
        for path, decayed in mask.items():
            ref = np.asarray(old[path]) * ((1 - lr * wd) if decayed else 1.0)
            np.testing.assert_allclose(np.asarray(new[path]), ref, rtol=1e-6, atol=1e-7, err_msg=path)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_matches_reference(kind):
    total, warm, lr = 100, 10, 2.0
    sched = optim.make_schedule(dict(lr=lr, schedule=kind, warmup_frac=0.1), total)
    s = np.arange(0, total + 1)
    frac = np.clip((s - warm) / (total - warm), 0, 1)
    main = {"cosine": 0.5 * (1 + np.cos(np.pi * frac)), "linear": 1 - frac, "constant": np.ones_like(frac)}[kind]
    ref = lr * np.where(s < warm, s / warm, main)
    got = np.array([float(sched(int(i))) for i in s])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cfg, total, match", [
    (dict(lr=1e-3, schedule="bogus"), 10, r"train.schedule: must be one of"),
    (dict(lr=1e-3, warmup_frac=1.5), 10, r"train.warmup_frac: must be in \[0, 1\)"),
    (dict(lr=0.0), 10, r"train.lr: must be > 0"),
    (dict(lr=1e-3), 0, r"total_steps must be an int >= 1"),
    (dict(lr=1e-3, b2=1.0), 10, r"train.b2: invalid value"),
    (dict(lr=1e-3, grad_clip=-1.0), 10, r"train.grad_clip: must be >= 0"),
])
def test_optimizer_config_errors(cfg, total, match):
    with pytest.raises(ValueError, match=match):
        optim.make_optimizer(cfg, total)


def test_create_train_state_rng_forms():
    tr = {"w": jnp.ones((2,))}
    opt = optim.make_optimizer(dict(lr=1e-3, warmup_frac=0.5), 10)
    typed = create_train_state(tr, opt, jax.random.key(5))
    raw = create_train_state(tr, opt, jax.random.PRNGKey(5))
    assert isinstance(typed, TrainState)
    np.testing.assert_array_equal(np.asarray(typed.rng), np.asarray(raw.rng))
    assert typed.rng.dtype == jnp.uint32 and typed.step.dtype == jnp.int32
    assert float(optim.current_lr(typed.opt_state)) == 0.0  # warm-up starts at 0
    with pytest.raises(ValueError, match="rng must be a jax.random key"):
        create_train_state(tr, opt, jnp.zeros((2,), jnp.int32))
