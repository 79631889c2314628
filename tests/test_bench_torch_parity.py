"""The PyTorch reference of bench/torch_reference.py computes our loss: pccot and kava on a tiny
config with padded, ragged examples, identical weights (HF round trip) and batch."""

import os
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import torch_reference as tr  # noqa: E402

from kava_jax.kava.batch import LayoutSpec, TokenizedExample, build_batch  # noqa: E402
from kava_jax.kava.objective import ObjectiveConfig, init_trainable  # noqa: E402
from kava_jax.models import ModelConfig, init_params  # noqa: E402

SPECIALS = (61, 62, 63)


def _setup(objective, seed=0):
    mc = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                     mlp_dim=48, tie_word_embeddings=False)
    spec = LayoutSpec(q_len=9, cot_len=12, answer_len=7, num_latents=4, prompt_ids=(3, 4), bos_id=1, eos_id=2,
                      pad_id=0, bot_id=SPECIALS[0], eot_id=SPECIALS[1], latent_id=SPECIALS[2])
    rng = np.random.default_rng(seed)

    def ids(k):
        return rng.integers(5, 60, size=k).tolist()

    # ragged: left-padded questions, right-padded CoTs (one shorter than M), answers of different lengths
    exs = [TokenizedExample(ids(8), [ids(12), ids(2)], ids(4)),
           TokenizedExample(ids(3), [ids(5), ids(2), ids(1)], ids(1)),
           TokenizedExample(ids(6), [ids(2), ids(3)], ids(2))]
    batch, _ = build_batch(exs, spec, batch_size=3)
    oc = ObjectiveConfig(model=mc, objective=objective, num_latents=4, num_iterations=2, special_ids=SPECIALS,
                         cot_len=12)
    key = jax.random.key(seed)
    params = init_params(mc, key)
    # scale up the weights so the losses are far from their random-init plateau
    params = jax.tree.map(lambda x: x * 3.0 if x.ndim > 1 else x, params)
    trainable, frozen = init_trainable(jax.random.fold_in(key, 1), params, oc, mode="full")
    emb = trainable["special_embed"]
    trainable["special_embed"] = emb + 0.1 * jax.random.normal(key, emb.shape)
    batch = jax.tree.map(jax.numpy.asarray, batch)
    return trainable, frozen, oc, batch


@pytest.mark.parametrize("objective", ["pccot", "kava"])
def test_torch_loss_matches_ours(objective):
    trainable, frozen, oc, batch = _setup(objective)
    res = tr.parity(trainable, frozen, oc, batch)
    assert np.isfinite(res["torch"])
    for k in ("ce_teacher", "ce_student", "codi") + (("kv",) if objective == "kava" else ()):
        assert abs(res[f"{k}_jax"] - res[f"{k}_torch"]) <= 1e-4 * max(1.0, abs(res[f"{k}_jax"])), (k, res)
    assert res["rel_diff"] < 1e-5, res
