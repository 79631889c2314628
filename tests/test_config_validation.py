"""validate_config: every bad field raises ValueError whose message starts with that field's name;
the shipped configs pass; objective_config maps the kava section onto ObjectiveConfig."""

from pathlib import Path

import pytest

from kava_jax.models import get_preset
from kava_jax.sweep import load_module
from kava_jax.train.validate import objective_config, validate_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
synthetic = load_module(CONFIGS / "synthetic.py", "kava_test_cfg_synthetic")
base = load_module(CONFIGS / "base.py", "kava_test_cfg_base")


def _cfg(arg="kava,quick"):
    return synthetic.get_config(arg)


def _set(c, path, value):
    *parents, leaf = path.split(".")
    node = c
    for p in parents:
        node = node[p]
    node[leaf] = value


# (overrides, the field the message must name)
BAD = [
    ({"seed": -1}, "seed"),
    ({"model.preset": "gpt-5"}, "model.preset"),
    ({"model.hf_path": "/a", "model.init_from": "/b"}, "model.init_from"),
    ({"model.lora_rank": 0}, "model.lora_rank"),
    ({"model.lora_alpha": 0.0}, "model.lora_alpha"),
    ({"model.lora_dropout": 1.0}, "model.lora_dropout"),
    ({"model.lora_targets": ("q", "qkv")}, "model.lora_targets"),
    ({"model.dtype": "float13"}, "model.dtype"),
    ({"model.param_dtype": "int32"}, "model.param_dtype"),
    ({"model.remat": "some"}, "model.remat"),
    ({"model.overrides.hidden": 3}, "model.overrides.hidden"),
    ({"data.schema": "csv"}, "data.schema"),
    ({"data.trace": "latex"}, "data.trace"),
    ({"data.q_len": 1}, "data.q_len"),
    ({"data.cot_len": 0}, "data.cot_len"),
    ({"data.answer_len": 2}, "data.answer_len"),
    ({"data.max_records": 0}, "data.max_records"),
    ({"data.synthetic.n_train": 0}, "data.synthetic.n_train"),
    ({"data.synthetic.min_steps": 3, "data.synthetic.max_steps": 2}, "data.synthetic.max_steps"),
    ({"kava.objective": "coconut"}, "kava.objective"),
    ({"kava.num_latents": 0}, "kava.num_latents"),
    ({"kava.num_iterations": -1}, "kava.num_iterations"),
    ({"kava.latent_mode": "parallel"}, "kava.latent_mode"),
    ({"kava.lam": 1.5}, "kava.lam"),
    ({"kava.lam": -0.1}, "kava.lam"),
    ({"kava.compression": "zip"}, "kava.compression"),
    ({"kava.kv_loss_type": "huber"}, "kava.kv_loss_type"),
    ({"kava.codi_loss_type": "cosine"}, "kava.codi_loss_type"),
    ({"kava.kv_reduction": "max"}, "kava.kv_reduction"),
    ({"kava.alpha_kv": -1.0}, "kava.alpha_kv"),
    ({"kava.teacher_ce_weight": float("nan")}, "kava.teacher_ce_weight"),
    ({"kava.redundancy_chunk": 0}, "kava.redundancy_chunk"),
    ({"train.mode": "qlora"}, "train.mode"),
    ({"train.batch_size": 0}, "train.batch_size"),
    ({"train.batch_size": 10, "train.grad_accum": 4}, "train.batch_size"),
    ({"train.batch_size": 12}, "train.batch_size"),  # 12 rows over 8 data-parallel devices
    ({"train.batch_size": 16, "train.grad_accum": 4}, "train.batch_size"),  # micro-batch 4 < 8 devices
    ({"train.grad_accum": 0}, "train.grad_accum"),
    ({"train.num_steps": 0}, "train.num_steps"),
    ({"train.num_epochs": 0}, "train.num_epochs"),
    ({"train.lr": 0.0}, "train.lr"),
    ({"train.schedule": "step"}, "train.schedule"),
    ({"train.warmup_frac": 1.0}, "train.warmup_frac"),
    ({"train.b2": 1.0}, "train.b2"),
    ({"train.eps": 0.0}, "train.eps"),
    ({"train.grad_clip": -1.0}, "train.grad_clip"),
    ({"train.log_every": 0}, "train.log_every"),
    ({"train.checkpoint_every": 0}, "train.checkpoint_every"),
    ({"train.keep_checkpoints": 0}, "train.keep_checkpoints"),
    ({"train.eval_every": 0}, "train.eval_every"),
    ({"mesh.data": 0}, "mesh.data"),
    ({"mesh.data": 3}, "mesh: mesh sizes"),  # 3 x 1 x 1 does not cover the 8 devices
    ({"mesh.data": -1, "mesh.fsdp": -1}, "mesh.data"),
    ({"mesh.rules": ("batch",)}, "mesh.rules"),
    ({"eval.batch_size": 0}, "eval.batch_size"),
    ({"eval.limit": 0}, "eval.limit"),
]


@pytest.mark.parametrize("overrides,field", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_each_error_names_its_field(overrides, field):
    c = _cfg()
    for path, value in overrides.items():
        _set(c, path, value)
    with pytest.raises(ValueError) as e:
        validate_config(c, num_devices=8)
    assert str(e.value).startswith(f"config.{field}"), str(e.value)


def test_missing_section_is_named():
    c = _cfg()
    del c["eval"]
    with pytest.raises(ValueError, match=r"^config\.eval: missing"):
        validate_config(c, num_devices=8)


@pytest.mark.parametrize("arg", ["cot", "nocot", "codi", "pccot", "kava", "kava,nl", "cot,nl,quick", "pccot,quick"])
def test_shipped_configs_are_valid(arg):
    validate_config(_cfg(arg), num_devices=8)
    validate_config(_cfg(arg), num_devices=1)


def test_base_config_is_valid_and_full_mode_needs_no_lora():
    validate_config(base.get_config(), num_devices=8)
    c = _cfg("cot,quick")
    c.model.lora_rank = 0  # no LoRA in full fine-tuning
    validate_config(c, num_devices=2)


def test_unknown_arg_flag():
    with pytest.raises(ValueError, match="unknown arg flag 'fast'"):
        _cfg("kava,fast")
    with pytest.raises(ValueError, match="two objectives"):
        _cfg("kava,cot")


def test_objective_config_from_run_config():
    c = _cfg("pccot,nl")
    mc = get_preset("tiny", vocab_size=100)
    obj = objective_config(c, mc, (97, 98, 99))
    assert (obj.objective, obj.num_latents, obj.num_iterations, obj.cot_len) == ("pccot", 8, 3, 40)
    assert obj.special_ids == (97, 98, 99) and obj.model is mc
    assert (obj.alpha_codi, obj.alpha_kv, obj.lam, obj.compression) == (10.0, 1.0, 0.1, "rkv")
    assert obj.redundancy_chunk is None and obj.uses_student and not obj.uses_kv_loss
    with pytest.raises(ValueError, match="outside the model vocabulary"):
        objective_config(c, mc, (97, 98, 100))
    with pytest.raises(ValueError, match="3 distinct ids"):
        objective_config(c, mc, (97, 97, 99))
