"""kava_jax.sweep and configs/sweeps: expansion, overrides, run names, CLI flags round-trip."""

import copy
import re
from pathlib import Path

import ml_collections
import pytest
from absl import flags
from ml_collections import config_dict, config_flags

from kava_jax import sweep as sw

REPO = Path(__file__).resolve().parents[1]
SWEEPS = {  # file -> (expected number of runs, keys every run sets)
    "eviction": (5, {"kava.compression"}),
    "kv_loss": (9, {"kava.kv_loss_type", "kava.alpha_kv"}),
    "latents": (9, {"kava.num_latents", "kava.num_iterations"}),
    "seeds": (3, {"seed"}),
}


def _load_sweep(name):
    return sw.load_module(REPO / "configs" / "sweeps" / f"{name}.py")


def _base(config_file="configs/llama32_1b_gsm8k_aug.py", arg=None):
    return sw.load_module(REPO / config_file).get_config(arg)


def _parse_flags(config_file: str, flag_list: list[str]) -> ml_collections.ConfigDict:
    """What kava-train would get: ml_collections config_flags parsing of --config=FILE plus flag_list."""
    argv = ["kava-train", f"--config={config_file}", *flag_list]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", default=None, flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


# ------------------------------------------------------------------------------- sweep files


@pytest.mark.parametrize("name", sorted(SWEEPS))
def test_sweep_files_expand_to_distinct_valid_runs(name):
    count, keys = SWEEPS[name]
    mod = _load_sweep(name)
    base = _base(mod.CONFIG)
    runs = sw.expand(mod.get_sweep())
    assert len(runs) == count
    names = [sw.run_name(r) for r in runs]
    assert len(set(names)) == count
    assert all(re.fullmatch(r"[A-Za-z0-9.=+_-]+", n) for n in names)
    assert len({repr(sorted(r.items())) for r in runs}) == count
    for r in runs:
        assert keys <= set(r)
        cfg = sw.apply_overrides(base, r)
        for k, v in r.items():
            node = cfg
            for part in k.split("."):
                node = node[part]
            assert node == v


def test_eviction_sweep_contents():
    runs = sw.expand(_load_sweep("eviction").get_sweep())
    rkv = sorted(r["kava.lam"] for r in runs if r["kava.compression"] == "rkv")
    assert rkv == [0.0, 0.1, 0.5, 1.0]  # λ = 0 cosine-only ... λ = 1 attention-only
    assert [r for r in runs if r["kava.compression"] == "crop"] == [{"kava.compression": "crop"}]


def test_grid_sweeps_are_full_products():
    kv = sw.expand(_load_sweep("kv_loss").get_sweep())
    assert {(r["kava.kv_loss_type"], r["kava.alpha_kv"]) for r in kv} == {
        (t, a) for t in ("l1", "smooth_l1", "mse") for a in (0.5, 1.0, 2.0)}
    lat = sw.expand(_load_sweep("latents").get_sweep())
    assert {(r["kava.num_latents"], r["kava.num_iterations"]) for r in lat} == {
        (m, t) for m in (12, 24, 36) for t in (1, 3, 5)}
    assert all(isinstance(r["kava.num_latents"], int) for r in lat)


def test_sweep_args():
    assert [r["seed"] for r in sw.expand(_load_sweep("seeds").get_sweep("n=5"))] == [0, 1, 2, 3, 4]
    assert len(sw.expand(_load_sweep("eviction").get_sweep("lams=0:1"))) == 3
    assert len(sw.expand(_load_sweep("latents").get_sweep("m=24,t=3"))) == 1
    with pytest.raises(ValueError, match="unknown arg 'bogus'"):
        _load_sweep("seeds").get_sweep("bogus=1")
    with pytest.raises(ValueError, match="arg 'n'"):
        _load_sweep("seeds").get_sweep("n=three")


# ------------------------------------------------------------------------------- combinators


def test_product_zip_chain_axis():
    a = sw.axis("x", [1, 2])
    b = sw.axis("y.z", ["u", "v", "w"])
    assert sw.product(a, b) == [
        {"x": 1, "y.z": "u"}, {"x": 1, "y.z": "v"}, {"x": 1, "y.z": "w"},
        {"x": 2, "y.z": "u"}, {"x": 2, "y.z": "v"}, {"x": 2, "y.z": "w"}]
    assert sw.zip_(a, sw.axis("y", [True, False])) == [{"x": 1, "y": True}, {"x": 2, "y": False}]
    assert sw.chain(a, [{"q": None}]) == [{"x": 1}, {"x": 2}, {"q": None}]
    assert sw.product() == [{}]
    with pytest.raises(ValueError, match="set by more than one axis"):
        sw.product(a, sw.axis("x", [3]))
    with pytest.raises(ValueError, match="equal lengths"):
        sw.zip_(a, b)
    with pytest.raises(ValueError, match="list of override dicts"):
        sw.product({"x": 1})


def test_expand_rejects_bad_sweeps():
    with pytest.raises(ValueError, match="identical"):
        sw.expand([{"seed": 1}, {"seed": 1}])
    with pytest.raises(ValueError, match="no runs"):
        sw.expand([])
    with pytest.raises(ValueError, match="bad config key"):
        sw.expand([{"kava..lam": 1}])
    with pytest.raises(ValueError, match="use a tuple"):
        sw.expand([{"model.lora_targets": ["q", "k"]}])
    with pytest.raises(ValueError, match="unsupported value type"):
        sw.expand([{"seed": object()}])
    assert sw.expand({"seed": 3}) == [{"seed": 3}]


# ------------------------------------------------------------------------------- overrides


def test_apply_overrides_sets_copies_and_checks():
    base = _base()
    out = sw.apply_overrides(base, {"kava.lam": 0, "train.num_steps": 7, "model.lora_targets": ("q",),
                                    "model.hf_path": "/models/x"})
    assert out.kava.lam == 0.0 and isinstance(out.kava.lam, float)
    assert out.train.num_steps == 7 and out.model.lora_targets == ("q",) and out.model.hf_path == "/models/x"
    assert base.kava.lam == 0.1 and base.train.num_steps is None and base.model.hf_path is None  # untouched
    with pytest.raises(KeyError, match=r"unknown config key 'kava\.lamb'.*did you mean 'kava\.lam'"):
        sw.apply_overrides(base, {"kava.lamb": 0.5})
    with pytest.raises(KeyError, match="unknown config key 'nope.x'"):
        sw.apply_overrides(base, {"nope.x": 1})
    with pytest.raises(KeyError, match="kava.lam is a float, not a section"):
        sw.apply_overrides(base, {"kava.lam.x": 1})
    with pytest.raises(ValueError, match="config key 'kava.num_latents'"):
        sw.apply_overrides(base, {"kava.num_latents": "many"})


def test_make_overridable_types_none_leaves():
    c = ml_collections.ConfigDict({"a": None, "b": {"c": None, "d": 1}})
    sw.make_overridable(c)
    assert c.get_type("a") is object and c.b.get_type("c") is object and c.b.get_type("d") is int
    c.a = 5
    c.a = "text"  # untyped: any value
    assert c.a == "text"


# ------------------------------------------------------------------------------- run names


def test_run_name_is_stable_short_and_distinct():
    a = sw.run_name({"kava.lam": 0.1, "kava.compression": "rkv"})
    assert a == sw.run_name({"kava.lam": 0.1, "kava.compression": "rkv"})
    assert a.startswith("lam=0.1_compression=rkv-")
    # same leaf names, different full keys or values -> different names (digest of the full dict)
    assert sw.run_name({"model.dtype": "bfloat16"}) != sw.run_name({"model.param_dtype": "bfloat16"})
    assert sw.run_name({"a.x": 1}) != sw.run_name({"b.x": 1})
    assert sw.run_name({"x": "a/b"}) != sw.run_name({"x": "a_b"})
    # order of keys changes the readable part only, never the digest
    assert sw.run_name({"a": 1, "b": 2})[-6:] == sw.run_name({"b": 2, "a": 1})[-6:]
    assert sw.run_name({}) == "base"
    long = sw.run_name({f"k{i}": "v" * 20 for i in range(10)})
    assert len(long) <= 64 + 7
    assert re.fullmatch(r"[A-Za-z0-9.=+_-]+", sw.run_name({"m.lora_targets": ("q", "k"), "t": None, "u": True}))


# ------------------------------------------------------------------------------- CLI flags


ROUND_TRIP = {
    "seed": 3,
    "distributed": True,
    "kava.use_prj": False,
    "kava.lam": 0,                       # int into a float field
    "train.lr": 1e-05,
    "kava.kv_loss_type": "mse",
    "model.lora_targets": ("q", "v"),
    "eval.datasets": ("gsm8k",),          # 1-tuple
    "mesh.rules": (("embed", ("data", "fsdp")), ("mlp", None)),  # nested tuples with None
    "model.hf_path": "/models/Llama 3.2 (1B)/it's",  # placeholder field, awkward string
    "model.init_from": "123",             # a str that looks like an int stays a str
    "train.num_steps": 5,                 # placeholder field, int
    "kava.redundancy_chunk": None,        # placeholder field, None
    "data.max_records": None,
    "model.tokenizer": "a,b c",
}


def test_to_cli_flags_round_trips_through_config_flags():
    cfg_file = "configs/llama32_1b_gsm8k_aug.py"
    base = _base(cfg_file)
    flag_list = sw.to_cli_flags(ROUND_TRIP, base)
    assert all(f.startswith("--config.") for f in flag_list) and len(flag_list) == len(ROUND_TRIP)
    parsed = _parse_flags(str(REPO / cfg_file), flag_list)
    expected = sw.apply_overrides(base, ROUND_TRIP)
    assert parsed.to_dict() == expected.to_dict()
    assert parsed.model.init_from == "123" and parsed.kava.redundancy_chunk is None
    assert parsed.mesh.rules == (("embed", ("data", "fsdp")), ("mlp", None))
    # and back from a value to None on a placeholder field
    again = _parse_flags(str(REPO / cfg_file), sw.to_cli_flags({"model.hf_path": None}, expected))
    assert again.model.hf_path is None


def test_to_cli_flags_round_trips_sweep_runs_with_config_arg():
    cfg_file = "configs/qwen25_05b_gsm8k_aug.py"
    base = _base(cfg_file, "pccot")
    for run in sw.expand(_load_sweep("latents").get_sweep()) + sw.expand(_load_sweep("eviction").get_sweep()):
        parsed = _parse_flags(f"{REPO / cfg_file}:pccot", sw.to_cli_flags(run, base))
        assert parsed.to_dict() == sw.apply_overrides(base, run).to_dict()


def test_to_cli_flags_without_config_and_errors():
    assert sw.to_cli_flags({"a.b": True, "c": 0.5, "d": ("x",), "e": "s p"}) == [
        "--config.a.b=True", "--config.c=0.5", "--config.d=('x',)", "--config.e=s p"]
    base = _base()
    with pytest.raises(ValueError, match="'kava.lam' has type float; None"):
        sw.to_cli_flags({"kava.lam": None}, base)
    with pytest.raises(KeyError, match="unknown config key"):
        sw.to_cli_flags({"kava.nope": 1}, base)


def test_typed_none_fields_are_what_make_overridable_fixes():
    # A ConfigDict field holding plain None cannot be overridden by config_flags at all; the paper
    # configs therefore turn None leaves into untyped placeholders (make_overridable).
    c = ml_collections.ConfigDict({"x": None})
    assert c.get_type("x") is type(None)
    c2 = sw.make_overridable(copy.deepcopy(c))
    assert isinstance(c2.get_ref("x"), config_dict.FieldReference) and c2.get_type("x") is object


def test_parse_arg_types():
    a = sw.parse_arg("n=4,flag,name=x,rate=0.5", n=1, flag=False, name="y", rate=1.0)
    assert (a.n, a.flag, a.name, a.rate) == (4, True, "x", 0.5)
    assert sw.parse_arg(None, n=1).n == 1
    with pytest.raises(ValueError, match="flag"):
        sw.parse_arg("flag=maybe", flag=False)
