"""Mesh construction, logical-axis rules, train-state shardings, and lowering the LLaMA-3.2-1B KaVa step."""

import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from kava_jax.kava.batch import LayoutSpec, TokenizedExample, build_batch
from kava_jax.kava.objective import ObjectiveConfig, init_trainable
from kava_jax.models import get_preset, init_params, param_logical_axes
from kava_jax.train import optim
from kava_jax.train import sharding as sh
from kava_jax.train.state import abstract_train_state, train_state_shardings
from kava_jax.train.step import lower_train_step, make_train_step

TRAIN_CFG = dict(lr=1e-3, schedule="cosine", warmup_frac=0.1, weight_decay=0.1, grad_clip=1.0)


# --------------------------------------------------------------------------------------- mesh
def test_make_mesh_infers_one_axis_with_auto_types():
    mesh = sh.make_mesh(dict(data=-1, fsdp=2, tensor=2))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
    sub = sh.make_mesh(dict(data=1, fsdp=-1, tensor=1), devices=jax.devices()[:4])
    assert dict(sub.shape) == {"data": 1, "fsdp": 4, "tensor": 1}


def test_make_mesh_accepts_configdict():
    import ml_collections

    cfg = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, rules=()))  # configs/base.py defaults
    mesh = sh.make_mesh(cfg)
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize("cfg, match", [
    (dict(data=2, fsdp=2, tensor=1), r"mesh\.data=2 x mesh\.fsdp=2 x mesh\.tensor=1 = 4 do not match the 8 devices"),
    (dict(data=-1, fsdp=-1, tensor=2), r"mesh\.data and mesh\.fsdp: only one mesh axis may be -1"),
    (dict(data=-1, fsdp=3, tensor=1), r"mesh\.data=-1 cannot be inferred: 8 devices .* mesh\.fsdp=3"),
    (dict(data=0, fsdp=-1, tensor=1), r"mesh\.data: must be >= 1 or -1"),
    (dict(data=2.0, fsdp=-1, tensor=1), r"mesh\.data: must be an int"),
    (dict(data=-1, fsdp=1), r"mesh\.tensor: missing"),
])
def test_make_mesh_errors_name_the_field(cfg, match):
    with pytest.raises(ValueError, match=match):
        sh.make_mesh(cfg)


# -------------------------------------------------------------------------------------- rules
def _mesh222():
    return sh.make_mesh(dict(data=2, fsdp=2, tensor=2))


def test_spec_for_default_rules_and_overrides():
    mesh = _mesh222()
    want = P(None, "fsdp", "tensor", None)
    assert sh.spec_for(("layers", "embed", "heads", "head_dim"), (2, 64, 4, 16), mesh) == want
    assert sh.spec_for(("batch", None), (8, 5), mesh) == P(("data", "fsdp"), None)
    assert sh.spec_for(None, (3, 4), mesh) == P(None, None)
    # extra rules are prepended and win over the defaults
    rules = (("embed", ("fsdp", "tensor")), ("lora", "data"))
    assert sh.spec_for(("embed", "lora"), (64, 4), mesh, rules) == P(("fsdp", "tensor"), "data")
    # a mesh axis is used at most once: the later dim stays replicated
    assert sh.spec_for(("embed", "embed"), (64, 64), mesh) == P("fsdp", None)
    assert sh.spec_for(("vocab", "mlp"), (128, 64), mesh) == P("tensor", None)


def test_spec_for_errors():
    mesh = _mesh222()
    with pytest.raises(ValueError, match=r"w: logical axis 'nonsense' has no sharding rule"):
        sh.spec_for(("nonsense",), (4,), mesh, name="w")
    with pytest.raises(ValueError, match=r"w: logical axes \('embed',\) do not match its rank"):
        sh.spec_for(("embed",), (4, 4), mesh, name="w")
    with pytest.raises(ValueError, match=r"mesh.rules\[0\] \('embed'\): unknown mesh axes \['model'\]"):
        sh.resolve_rules((("embed", "model"),))


def test_non_dividing_dim_is_replicated_and_logged_once(caplog):
    mesh = _mesh222()
    tree = {"odd_weight_xyz": jax.ShapeDtypeStruct((3, 64), jnp.float32),
            "even": jax.ShapeDtypeStruct((4, 64), jnp.float32)}
    specs = {"odd_weight_xyz": P("vocab", "embed"), "even": P("vocab", "embed")}
    with caplog.at_level(logging.INFO, logger="kava_jax.train.sharding"):
        out1 = sh.logical_shardings(specs, tree, mesh)
        out2 = sh.logical_shardings(specs, tree, mesh)
    assert out1["odd_weight_xyz"].spec == P(None, "fsdp") == out2["odd_weight_xyz"].spec
    assert out1["even"].spec == P("tensor", "fsdp")
    msgs = [r.getMessage() for r in caplog.records if "odd_weight_xyz" in r.getMessage()]
    assert len(msgs) == 1 and "does not divide" in msgs[0] and "'vocab'" in msgs[0]


def test_batch_shardings_leading_dim():
    mesh = _mesh222()
    batch = {"ids": jax.ShapeDtypeStruct((8, 5), jnp.int32), "valid": jax.ShapeDtypeStruct((8,), jnp.bool_),
             "odd": jax.ShapeDtypeStruct((6, 2), jnp.int32)}
    out = sh.batch_shardings(batch, mesh)
    assert out["ids"].spec == P(("data", "fsdp"), None)
    assert out["valid"].spec == P(("data", "fsdp"))
    assert out["odd"].spec == P(None, None)  # 6 rows do not divide data x fsdp = 4


def test_activation_sharding_activates_logical_constraints():
    """Inside the context a model-side `nn.with_logical_constraint(x, ("batch", None))` pins the batch dim
    (here onto (data, fsdp)); outside it, the constraint is a no-op."""
    import flax.linen as nn

    mesh = _mesh222()
    x = jax.ShapeDtypeStruct((8, 6), jnp.float32)

    def f():  # a fresh function per trace: jax caches traces per function, and flax rules are not in the key
        return lambda a: nn.with_logical_constraint(a * 2.0, ("batch", None))

    assert sh.rules_list((("batch", "data"),))[0] == ("batch", "data")
    with sh.activation_sharding(mesh):
        inside = jax.jit(f()).lower(x).compile()
    assert inside.output_shardings.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None)), 2)
    with sh.activation_sharding(mesh, rules=(("batch", "tensor"),)):
        override = jax.jit(f()).lower(x).compile()
    assert override.output_shardings.is_equivalent_to(NamedSharding(mesh, P("tensor", None)), 2)
    outside = jax.jit(f()).lower(x).compile()
    assert outside.output_shardings.is_fully_replicated and len(outside.output_shardings.device_set) == 1


# ------------------------------------------------------------------------- train-state shardings
def _tiny_abstract(mode="lora"):
    mc = get_preset("tiny").with_lora(4, 8.0, 0.0)
    oc = ObjectiveConfig(model=mc, num_latents=4, num_iterations=1, special_ids=(120, 121, 122), cot_len=8)
    trainable, frozen = jax.eval_shape(
        lambda k: init_trainable(k, init_params(mc, k), oc, mode=mode), jax.random.key(0))
    return mc, oc, trainable, frozen


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_train_state_shardings_follow_params(mode):
    mesh = _mesh222()
    mc, _, trainable, _ = _tiny_abstract(mode)
    opt = optim.make_optimizer(TRAIN_CFG, 100)
    state = abstract_train_state(trainable, opt)
    shs = train_state_shardings(state, mesh, mc)
    flat = sh.describe_shardings(shs.trainable)
    if mode == "lora":
        assert flat["lora/layers/attn/q_proj/lora_a"] == str(P(None, "fsdp", None))
        assert flat["lora/layers/attn/q_proj/lora_b"] == str(P(None, None, "tensor", None))
        assert flat["lora/layers/attn/o_proj/lora_a"] == str(P(None, "tensor", None, None))
        assert flat["lora/layers/mlp/down_proj/lora_b"] == str(P(None, None, "fsdp"))
    else:
        assert flat["params/embed/embedding"] == str(P("tensor", "fsdp"))
        assert flat["params/layers/mlp/gate_proj/kernel"] == str(P(None, "fsdp", "tensor"))
        assert flat["params/layers/attn_norm/scale"] == str(P(None, None))
    assert flat["special_embed"] == str(P(None, None))
    assert flat["prj/w1"] == str(P("fsdp", None)) and flat["prj/b1"] == str(P(None))
    # every Adam moment leaf has its param's sharding; scalars (counts, lr) are replicated
    params_by_path = {p: s for p, s in flat.items()}
    opt_flat = sh.describe_shardings(shs.opt_state)
    n_moments = 0
    for path, spec in opt_flat.items():
        for moment in ("/mu/", "/nu/"):
            if moment in path:
                n_moments += 1
                assert spec == params_by_path[path.split(moment, 1)[1]], path
    assert n_moments == 2 * len(params_by_path)
    scalar_paths = [p for p in opt_flat if "/mu/" not in p and "/nu/" not in p]
    assert scalar_paths and all(opt_flat[p] == str(P()) for p in scalar_paths)
    assert shs.step.spec == P() and shs.rng.spec == P()


def test_trainable_logical_axes_match_model_axes():
    mc, _, trainable, frozen = _tiny_abstract("lora")
    axes = sh.trainable_logical_axes(trainable, mc)
    ref = param_logical_axes(mc)
    assert axes["lora"]["layers"]["attn"]["k_proj"]["lora_b"] == ref["layers"]["attn"]["k_proj"]["lora_b"]
    assert tuple(axes["lora"]["layers"]["attn"]["k_proj"]["lora_b"]) == ("layers", "lora", "kv_heads", "head_dim")
    assert sh.params_logical_axes(frozen, mc)["embed"]["embedding"] == P("vocab", "embed")
    with pytest.raises(ValueError, match="unknown trainable entry 'bogus'"):
        sh.trainable_logical_axes({"bogus": {}}, mc)


# ---------------------------------------------------------------- LLaMA-3.2-1B step: lowering only
def test_llama1b_kava_step_lowers_on_8_devices():
    """The real-size step (LoRA r128, M 24, T 3, batch 128, Q 64 C 64 R 16) traces and lowers with the
    intended shardings over a (2, 2, 2) mesh of the 8 fake devices; nothing is allocated or compiled."""
    t0 = time.perf_counter()
    mc = get_preset("llama3.2-1b").with_lora(128, 32.0, 0.1)
    specials = (128002, 128003, 128004)
    oc = ObjectiveConfig(model=mc, num_latents=24, num_iterations=3, special_ids=specials, cot_len=64)
    trainable, frozen = jax.eval_shape(lambda k: init_trainable(k, init_params(mc, k), oc), jax.random.key(0))
    opt = optim.make_optimizer(TRAIN_CFG, 1000)
    state = abstract_train_state(trainable, opt)
    spec = LayoutSpec(q_len=64, cot_len=64, answer_len=16, num_latents=24, prompt_ids=(578, 4320, 374, 25),
                      bos_id=128000, eos_id=128009, pad_id=128001, bot_id=specials[0], eot_id=specials[1],
                      latent_id=specials[2])
    rs = np.random.RandomState(0)
    exs = [TokenizedExample(list(rs.randint(100, 1000, 30)), [list(rs.randint(100, 1000, 10))] * 4,
                            list(rs.randint(100, 1000, 3))) for _ in range(4)]
    batch_np, _ = build_batch(exs, spec, batch_size=128)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch_np.items()}
    mesh = _mesh222()
    lowered, shs = lower_train_step(make_train_step(oc, opt), mesh, state, frozen, batch)
    elapsed = time.perf_counter() - t0
    assert shs.batch["teacher_ids"].spec == P(("data", "fsdp"), None)
    assert shs.frozen["embed"]["embedding"].spec == P("tensor", "fsdp")
    assert shs.frozen["layers"]["mlp"]["down_proj"]["kernel"].spec == P(None, "tensor", "fsdp")
    assert shs.state.trainable["lora"]["layers"]["attn"]["q_proj"]["lora_b"].spec == P(None, None, "tensor", None)
    out_state, out_metrics = lowered.out_info
    assert out_state.trainable["lora"]["layers"]["mlp"]["up_proj"]["lora_a"].shape == (16, 2048, 128)
    assert out_metrics["loss"].dtype == jnp.float32 and out_metrics["kv"].shape == ()
    assert elapsed < 120, f"lowering took {elapsed:.1f} s"


def test_replicated_helper():
    mesh = _mesh222()
    r = sh.replicated(mesh)
    assert isinstance(r, NamedSharding) and r.spec == P() and r.mesh.shape == mesh.shape
