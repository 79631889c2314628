"""Config files: every paper row x method builds and validates, matches METHOD §5, baselines differ
from their KaVa row only in the objective, `runlocal` shrinks; the train step / loss of the real
backbone sizes trace under jax.eval_shape (nothing is allocated)."""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kava_jax.kava.batch import LayoutSpec, TokenizedExample, build_batch
from kava_jax.kava.objective import init_trainable, kava_loss
from kava_jax.models import abstract_params, get_preset
from kava_jax.sweep import load_module
from kava_jax.train.optim import make_optimizer
from kava_jax.train.state import abstract_train_state
from kava_jax.train.step import make_train_step
from kava_jax.train.validate import objective_config, validate_config

REPO = Path(__file__).resolve().parents[1]
METHODS = ("kava", "cot", "nocot", "codi", "pccot")

# METHOD §5, typed in again here (independent of configs/paper.py):
# file: (preset, dataset, lr, wd, epochs, α₁, α₂, KV loss, layer-wise std, prj, λ)
TABLE = {
    "llama32_1b_gsm8k_aug": ("llama3.2-1b", "aug", 8e-4, 0.1, 10, 10, 1, "smooth_l1", True, True, 0.1),
    "llama32_1b_gsm8k_aug_nl": ("llama3.2-1b", "nl", 8e-4, 0.1, 10, 10, 1, "mse", True, True, 0.1),
    "qwen25_05b_gsm8k_aug": ("qwen2.5-0.5b", "aug", 5e-4, 0.01, 10, 10, 1, "mse", False, True, 0.1),
    "qwen25_05b_gsm8k_aug_nl": ("qwen2.5-0.5b", "nl", 8e-4, 0.1, 10, 10, 1, "mse", True, True, 0.1),
    "llama32_3b_gsm8k_aug": ("llama3.2-3b", "aug", 2e-4, 0.1, 5, 20, 2, "smooth_l1", False, True, 0.1),
    "llama32_3b_gsm8k_aug_nl": ("llama3.2-3b", "nl", 2e-4, 0.1, 5, 20, 2, "smooth_l1", False, False, 0.0),
}
TOKENIZERS = {"llama3.2-1b": "meta-llama/Llama-3.2-1B-Instruct", "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
              "llama3.2-3b": "meta-llama/Llama-3.2-3B-Instruct"}
# METHOD §6 (GSM8k test accuracy) per row: (cot, nocot, codi, pccot, kava)
ACCURACY = {
    "llama32_1b_gsm8k_aug": (61.6, 30.9, 55.6, 53.4, 56.5),
    "llama32_1b_gsm8k_aug_nl": (53.2, 33.1, 49.7, 50.7, 55.7),
    "qwen25_05b_gsm8k_aug": (50.6, None, 37.5, 20.5, 46.9),
    "qwen25_05b_gsm8k_aug_nl": (48.5, None, 20.2, 19.1, 44.4),
    "llama32_3b_gsm8k_aug": (73.2, None, 61.0, 54.7, 65.7),
    "llama32_3b_gsm8k_aug_nl": (68.4, None, 55.9, 47.6, 60.0),
}
_MODULES = {}


def _module(name):
    if name not in _MODULES:
        _MODULES[name] = load_module(REPO / "configs" / f"{name}.py")
    return _MODULES[name]


def _flat(c, prefix=""):
    out = {}
    for k, v in c.items():
        if hasattr(v, "items"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ------------------------------------------------------------------------------- builds + table


@pytest.mark.parametrize("name", sorted(TABLE))
def test_paper_row_matches_method_table(name):
    preset, data, lr, wd, epochs, a1, a2, kv, std, prj, lam = TABLE[name]
    c = _module(name).get_config()
    validate_config(c, num_devices=8)
    assert c.model.preset == preset and c.model.hf_path is None and c.model.init_from is None
    assert c.model.tokenizer == TOKENIZERS[preset]
    assert (c.model.lora_rank, c.model.lora_alpha, c.model.lora_dropout) == (128, 32.0, 0.1)
    assert set(c.model.lora_targets) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert c.model.dtype == "bfloat16" and c.model.param_dtype == "float32"
    assert c.data.source == {"aug": "whynlp/gsm8k-aug", "nl": "whynlp/gsm8k-aug-nl"}[data]
    assert c.data.schema == {"aug": "steps", "nl": "nl"}[data]
    assert c.data.cot_len >= (128 if data == "aug" else 256) and c.data.q_len >= 128
    assert c.train.lr == pytest.approx(lr) and c.train.weight_decay == pytest.approx(wd)
    assert c.train.num_epochs == epochs and c.train.num_steps is None
    assert (c.train.batch_size, c.train.grad_clip, c.train.warmup_frac, c.train.schedule) == (128, 2.0, 0.03, "cosine")
    assert c.train.mode == "lora"
    k = c.kava
    assert k.objective == "kava" and (k.num_latents, k.num_iterations, k.latent_mode) == (24, 3, "jacobi")
    assert (k.alpha_codi, k.alpha_kv) == (a1, a2)
    assert k.kv_loss_type == kv and k.layerwise_std is std and k.use_prj is prj and k.lam == pytest.approx(lam)
    assert k.compression == "rkv" and k.pre_rope is False
    assert "gsm8k" in c.eval.datasets


@pytest.mark.parametrize("name", sorted(TABLE))
def test_row_file_documents_paper_numbers(name):
    mod = _module(name)
    cot, nocot, codi, pccot, kava = ACCURACY[name]
    assert mod.PAPER_ACCURACY == dict(cot=cot, nocot=nocot, codi=codi, pccot=pccot, kava=kava)
    text = (REPO / "configs" / f"{name}.py").read_text()
    for v in (cot, codi, pccot, kava):
        assert str(v) in text
    assert ("UNVERIFIED" in text) is (name != "llama32_1b_gsm8k_aug")
    assert mod.ROW["verified"] is (name == "llama32_1b_gsm8k_aug")


@pytest.mark.parametrize("name", sorted(TABLE))
def test_baselines_differ_only_in_objective(name):
    mod = _module(name)
    kava = _flat(mod.get_config())
    assert kava == _flat(mod.get_config("kava"))
    for method in METHODS[1:]:
        c = mod.get_config(method)
        validate_config(c, num_devices=8)
        flat = _flat(c)
        assert flat.keys() == kava.keys()
        diff = {key for key in kava if flat[key] != kava[key]}
        assert diff == {"kava.objective"} and flat["kava.objective"] == method


@pytest.mark.parametrize("name", sorted(TABLE))
def test_runlocal_shrinks(name):
    mod = _module(name)
    full = mod.get_config("codi")
    small = mod.get_config("codi,runlocal")
    assert mod.get_config("runlocal,codi").to_dict() == small.to_dict()
    validate_config(small, num_devices=1)
    assert small.model.preset == "tiny" and small.model.hf_path is None and small.model.tokenizer == "synthetic"
    assert small.model.dtype == "float32" and small.model.lora_rank < full.model.lora_rank
    assert small.train.batch_size <= 8 and small.train.num_steps == 2
    assert small.data.source == "synthetic" and small.eval.datasets == ("synthetic",)
    assert small.data.trace == ("nl" if name.endswith("_nl") else "equation")
    assert small.kava.objective == "codi"
    for key in ("kv_loss_type", "layerwise_std", "use_prj", "lam", "alpha_codi", "alpha_kv"):
        assert small.kava[key] == full.kava[key]


def test_bad_args_name_the_flag():
    mod = _module("llama32_1b_gsm8k_aug")
    with pytest.raises(ValueError, match="unknown flag 'kaava'"):
        mod.get_config("kaava")
    with pytest.raises(ValueError, match="two methods"):
        mod.get_config("codi,pccot")


def test_base_and_synthetic_configs_build():
    base = load_module(REPO / "configs" / "base.py")
    for arg in (None, "runlocal"):
        validate_config(base.get_config(arg), num_devices=8)
    synthetic = REPO / "configs" / "synthetic.py"  # written by another helper; checked when present
    if synthetic.is_file():
        mod = load_module(synthetic)
        for arg in (None, *getattr(mod, "OBJECTIVES", ())):
            validate_config(mod.get_config(arg), num_devices=8)


# ------------------------------------------------------------------------------- eval_shape


def _abstract_setup(c):
    """(ObjectiveConfig, abstract trainable, abstract frozen, abstract batch) of a run config, built
    from the preset's real sizes with the vocabulary grown by the 3 special tokens."""
    mc = get_preset(c.model.preset, **dict(c.model.overrides))
    vocab = mc.vocab_size + 3
    mc = mc.replace(vocab_size=vocab, dtype=c.model.dtype, param_dtype=c.model.param_dtype,
                    remat=c.model.remat).with_lora(c.model.lora_rank, c.model.lora_alpha, c.model.lora_dropout,
                                                   tuple(c.model.lora_targets))
    special = (vocab - 3, vocab - 2, vocab - 1)
    oc = objective_config(c, mc, special)
    trainable, frozen = jax.eval_shape(lambda p: init_trainable(jax.random.key(0), p, oc, mode=c.train.mode),
                                       abstract_params(mc))
    spec = LayoutSpec(q_len=c.data.q_len, cot_len=c.data.cot_len, answer_len=c.data.answer_len,
                      num_latents=c.kava.num_latents, prompt_ids=(101, 102, 103, 104), bos_id=1, eos_id=2, pad_id=0,
                      bot_id=special[0], eot_id=special[1], latent_id=special[2])
    rows, _ = build_batch([TokenizedExample([5, 6, 7], [[8, 9], [10]], [11])], spec, batch_size=c.train.batch_size)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in rows.items()}
    return oc, mc, trainable, frozen, batch


def test_eval_shape_train_step_verified_row():
    """The whole train step (value_and_grad of kava_loss + AdamW) of LLaMA-3.2-1B / AUG at batch 128."""
    c = _module("llama32_1b_gsm8k_aug").get_config()
    oc, mc, trainable, frozen, batch = _abstract_setup(c)
    assert mc.num_layers == 16 and mc.hidden_size == 2048 and mc.lora.rank == 128
    total = math.ceil(385_620 * c.train.num_epochs / c.train.batch_size)
    opt = make_optimizer(c.train, total)
    state = abstract_train_state(trainable, opt)
    step = make_train_step(oc, opt, c.train.grad_accum)
    new_state, metrics = jax.eval_shape(step, state, frozen, batch)
    same = jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype), state, new_state)
    assert all(jax.tree.leaves(same))
    assert {"loss", "ce_teacher", "ce_student", "codi", "kv", "grad_norm", "lr"} <= set(metrics)
    assert all(m.shape == () and m.dtype == jnp.float32 for m in metrics.values())
    lora = trainable["lora"]
    n_lora = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(lora))
    assert n_lora == mc.num_params(include_lora=True) - mc.num_params()


@pytest.mark.parametrize("name", sorted(set(TABLE) - {"llama32_1b_gsm8k_aug"}))  # that one: the train step above
def test_eval_shape_kava_loss_each_row(name):
    c = _module(name).get_config()
    oc, mc, trainable, frozen, batch = _abstract_setup(c)
    assert mc.num_layers == {"llama3.2-1b": 16, "qwen2.5-0.5b": 24, "llama3.2-3b": 28}[c.model.preset]
    loss, metrics = jax.eval_shape(lambda t, f, b: kava_loss(t, f, b, oc, None), trainable, frozen, batch)
    assert loss.shape == () and loss.dtype == jnp.float32
    assert "kv" in metrics and "codi" in metrics
    prj_leaves = jax.tree.leaves(trainable["prj"])
    assert bool(prj_leaves) is c.kava.use_prj


@pytest.mark.parametrize("method, expected, absent", [
    ("pccot", {"ce_student", "codi"}, {"kv"}),
    ("codi", {"ce_student", "codi"}, {"kv"}),
    ("cot", {"ce_teacher"}, {"ce_student", "kv"}),
    ("nocot", {"ce_nocot"}, {"ce_teacher", "kv"}),
])
def test_eval_shape_baselines(method, expected, absent):
    c = _module("llama32_1b_gsm8k_aug").get_config(method)
    oc, _, trainable, frozen, batch = _abstract_setup(c)
    loss, metrics = jax.eval_shape(lambda t, f, b: kava_loss(t, f, b, oc, None), trainable, frozen, batch)
    assert loss.shape == () and expected <= set(metrics) and not absent & set(metrics)
