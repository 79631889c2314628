"""Checkpointer: sharded save/restore round trip, keep-N, damaged latest step -> warning + previous one,
tree mismatch -> clear error naming the checkpoint directory."""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from kava_jax.kava.objective import ObjectiveConfig, init_trainable
from kava_jax.models import LoraConfig, abstract_params, get_preset
from kava_jax.train.checkpoint import Checkpointer, CheckpointMismatchError
from kava_jax.train.optim import make_optimizer
from kava_jax.train.sharding import make_mesh
from kava_jax.train.state import abstract_train_state, create_train_state, train_state_shardings

TRAIN_CFG = dict(lr=1e-2, schedule="constant", warmup_frac=0.0, weight_decay=0.1, grad_clip=1.0)


def _setup(rank=4):
    mc = get_preset("tiny", vocab_size=40, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                    lora=LoraConfig(rank=rank))
    rng = np.random.default_rng(0)  # numpy values: no init compile needed for these tests
    params = jax.tree.map(lambda a: jnp.asarray(0.02 * rng.standard_normal(a.shape), a.dtype), abstract_params(mc))
    cfg = ObjectiveConfig(model=mc, objective="kava", num_latents=4, num_iterations=1, special_ids=(37, 38, 39),
                          cot_len=8)
    trainable, _ = init_trainable(jax.random.key(1), params, cfg, mode="lora")
    opt = make_optimizer(TRAIN_CFG, 10)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    abstract = abstract_train_state(trainable, opt)
    shardings = train_state_shardings(abstract, mesh, mc)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return trainable, opt, shardings, target


def _state_at(trainable, opt, shardings, k):
    """A distinct, non-trivial state per k (one optimizer update on pseudo-gradients); one jitted call."""
    return _make_state(trainable, opt, shardings)(jnp.float32(k))


_MAKERS = {}


def _make_state(trainable, opt, shardings):
    key = id(shardings)
    if key not in _MAKERS:
        def make(k):
            state = create_train_state(jax.tree.map(lambda x: x + 0.01 * k, trainable), opt,
                                       jax.random.key(k.astype(jnp.int32)))
            grads = jax.tree.map(lambda x: jnp.full_like(x, 0.1) * k, trainable)
            updates, opt_state = opt.update(grads, state.opt_state, state.trainable)
            return state.replace(step=k.astype(jnp.int32), opt_state=opt_state,
                                 trainable=jax.tree.map(jnp.add, state.trainable, updates))

        _MAKERS[key] = jax.jit(make, out_shardings=shardings)
    return _MAKERS[key]


def _assert_same(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def setup():
    return _setup()


def test_round_trip_sharded_and_keep_n(tmp_path, setup):
    trainable, opt, shardings, target = setup
    ck = Checkpointer(tmp_path / "ckpt", keep=2)
    saved = {}
    for k in (1, 2, 3):
        saved[k] = jax.device_get(_state_at(trainable, opt, shardings, k))
        ck.save(k, _state_at(trainable, opt, shardings, k), {"epoch": 0, "position": k}, '{"seed": 7}')
    ck.wait()
    assert ck.steps() == [2, 3]  # keep-N: the oldest step went
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["2", "3"]
    state, data, step = ck.restore_latest(target)
    assert step == 3 and data == {"epoch": 0, "position": 3}
    _assert_same(state, saved[3])
    assert not np.array_equal(np.asarray(saved[3].trainable["special_embed"]),
                              np.asarray(saved[2].trainable["special_embed"]))
    # every leaf comes back with the sharding of the abstract target (8 devices, 2x2x2 mesh)
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(target), strict=True):
        assert isinstance(got.sharding, NamedSharding)
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim)
    assert any(len(set(s.spec) - {None}) for s in jax.tree.leaves(shardings))  # something is really sharded
    assert ck.read_json(3, "config") == {"seed": 7}
    ck.close()


def test_damaged_latest_falls_back_with_warning(tmp_path, setup, caplog):
    trainable, opt, shardings, target = setup
    ck = Checkpointer(tmp_path / "ckpt", keep=3)
    saved = {}
    for k in (1, 2):
        saved[k] = jax.device_get(_state_at(trainable, opt, shardings, k))
        ck.save(k, _state_at(trainable, opt, shardings, k), {"epoch": 0, "position": k}, {"k": k})
    ck.wait()
    data_dir = tmp_path / "ckpt" / "2" / "state" / "d"
    files = list(data_dir.iterdir())
    assert files
    for f in files:  # the array data of the latest step is gone (a partial copy / a disk fault)
        f.unlink()
    with caplog.at_level(logging.WARNING):
        state, data, step = ck.restore_latest(target)
    assert step == 1 and data["position"] == 1
    _assert_same(state, saved[1])
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(tmp_path / "ckpt" / "2") in m and "corrupt" in m for m in warned), warned
    assert ck.steps() == [1]
    assert any(n.startswith("2.corrupt-") for n in os.listdir(tmp_path / "ckpt"))
    # the run can save step 2 again afterwards
    ck.save(2, _state_at(trainable, opt, shardings, 2), {"epoch": 0, "position": 2}, {}, wait=True)
    assert ck.steps() == [1, 2]
    ck.close()


def test_missing_metadata_file_and_all_damaged(tmp_path, setup, caplog):
    trainable, opt, shardings, target = setup
    ck = Checkpointer(tmp_path / "ckpt", keep=3)
    ck.save(5, _state_at(trainable, opt, shardings, 5), {"epoch": 0, "position": 5}, {}, wait=True)
    (tmp_path / "ckpt" / "5" / "state" / "_METADATA").unlink()
    with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match="no readable checkpoint"):
        ck.restore_latest(target)
    assert any("5" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    ck.close()


def test_tree_mismatch_raises_naming_dir(tmp_path, setup):
    trainable, opt, shardings, _ = setup
    ck = Checkpointer(tmp_path / "ckpt", keep=2)
    ck.save(1, _state_at(trainable, opt, shardings, 1), {"epoch": 0, "position": 1}, {}, wait=True)
    _, _, _, other_target = _setup(rank=8)  # a changed LoRA rank
    with pytest.raises(CheckpointMismatchError, match="lora_a") as e:
        ck.restore_latest(other_target)
    assert str(tmp_path / "ckpt" / "1") in str(e.value)
    assert ck.steps() == [1]  # a mismatch is not treated as corruption
    ck.close()


def test_no_checkpoint_and_unfinished_step(tmp_path, setup):
    trainable, opt, shardings, target = setup
    ck = Checkpointer(tmp_path / "ckpt", keep=2)
    assert ck.restore_latest(target) is None
    ck.save(1, _state_at(trainable, opt, shardings, 1), {"epoch": 0, "position": 1}, {}, wait=True)
    ck.close()
    # an interrupted async write leaves orbax's temporary directory: never listed, never restored
    os.rename(tmp_path / "ckpt" / "1", tmp_path / "ckpt" / "1.orbax-checkpoint-tmp-99")
    ck = Checkpointer(tmp_path / "ckpt", keep=2)
    assert ck.restore_latest(target) is None
    ck.close()
