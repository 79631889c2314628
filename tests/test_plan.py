"""kava-plan: the tiny config's train step AOT-compiles for a TPU topology on this CPU host, the analytic
FLOP count equals the matmul FLOPs of the optimised, loop-unrolled CPU program, and the CLI reports
and writes JSON / Markdown.

The TPU compiles run in-process: conftest's JAX_PLATFORMS=cpu does not stop
`jax.experimental.topologies` from loading libtpu (test_topology_api_with_cpu_platform checks that).
"""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from kava_jax.data.pipeline import abstract_batch
from kava_jax.kava.batch import LayoutSpec
from kava_jax.kava.objective import ObjectiveConfig, init_trainable
from kava_jax.models import ModelConfig, init_params
from kava_jax.sweep import load_module
from kava_jax.train import optim
from kava_jax.train.flops import chip_peak, chip_spec, config_step_flops, mfu, train_step_flops
from kava_jax.train.loop import throughput
from kava_jax.train.plan import fit_candidates, plan_inputs, plan_step, topology_devices
from kava_jax.train.state import abstract_train_state
from kava_jax.train.step import make_train_step

ROOT = Path(__file__).resolve().parents[1]


def _synthetic(arg):
    return load_module(ROOT / "configs" / "synthetic.py", "test_plan_synthetic").get_config(arg)


# ------------------------------------------------------------------------------------ TPU compile
def test_topology_api_with_cpu_platform():
    assert os.environ.get("JAX_PLATFORMS") == "cpu"
    devs = topology_devices("v5e:2x4")
    assert len(devs) == 8 and devs[0].platform == "tpu" and devs[0].device_kind == "TPU v5 lite"
    assert jax.devices()[0].platform == "cpu"  # this process still computes on CPU
    with pytest.raises(ValueError, match="v5e:1x1"):
        topology_devices("v5e:1x1")
    with pytest.raises(ValueError, match="expected <chip>:<shape>"):
        topology_devices("v5litepod-8")


def test_tiny_kava_step_aot_compiles_for_v5e():
    config = _synthetic("kava,quick")
    rep = plan_step(config, "v5e:2x4", label="synthetic kava,quick")
    assert (rep["chip"], rep["chips"], rep["device_kind"]) == ("v5e", 8, "TPU v5 lite")
    assert rep["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1} and rep["objective"] == "kava"

    # Per-chip memory comes from the TPU program: data parallel over 8 chips, so each chip holds the whole
    # (replicated) state and frozen params and 1/8 of the batch; TPU tiling only pads, never shrinks.
    inp = plan_inputs(config, 8)

    def nbytes(tree):
        return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))

    mem = rep["memory_per_chip"]
    logical = nbytes(inp.state) + nbytes(inp.frozen) + nbytes(inp.batch) / 8
    assert mem["argument"] >= logical
    assert mem["alias"] >= nbytes(inp.state.trainable)  # the donated state is updated in place
    assert mem["temp"] > 0 and mem["generated_code"] > 0
    assert mem["peak"] == mem["argument"] + mem["output"] - mem["alias"] + mem["temp"] + mem["generated_code"]
    assert rep["hbm_bytes"] == 16 * 2**30 and rep["fits"] is True

    # FLOPs and the roofline, recomputed here from their definitions.
    fl = config_step_flops(config, inp.model_config, inp.objective)
    assert rep["flops"]["model"] == fl.model > 0
    rf = rep["roofline"]
    compute = fl.executed / (8 * 197e12)
    memory = (mem["argument"] + mem["output"] + mem["temp"]) / 0.82e12
    assert rf["step_s"] == pytest.approx(max(compute, memory))
    assert rf["tokens_per_s_per_chip"] == pytest.approx(8 * (48 + 24 + 8) / rf["step_s"] / 8)
    assert rf["mfu"] == pytest.approx(fl.model / (rf["step_s"] * 8 * 197e12))
    assert rep["seconds"]["compile"] > 0 and rep["seconds"]["cpu"] > 0
    json.dumps(rep)  # JSON-able


# ------------------------------------------------------------------------------------ FLOPs vs HLO
def _shape_dims(shape: str) -> list[int]:
    m = re.match(r"^[a-z0-9]+\[([0-9,]*)\]", shape)
    if not m:
        raise AssertionError(f"not an array shape: {shape!r}")
    return [int(x) for x in m.group(1).split(",") if x]


def _split_instruction(line: str):
    """(name, result shape, opcode, rest) of an HLO instruction line, or None."""
    m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*", line)
    if not m:
        return None
    pos = m.end()
    if line[pos] == "(":  # tuple shape: balanced parentheses
        depth = 0
        for j in range(pos, len(line)):
            depth += {"(": 1, ")": -1}.get(line[j], 0)
            if depth == 0:
                break
        shape, pos = line[pos:j + 1], j + 1
    else:
        j = line.index(" ", pos)
        shape, pos = line[pos:j], j
    m2 = re.match(r"\s*([\w\-]+)\((.*)$", line[pos:])
    return None if not m2 else (m.group(1), shape, m2.group(1), m2.group(2))


def hlo_matmul_flops(text: str) -> int:
    """Matmul FLOPs of an optimised HLO module, with every loop unrolled.

    Each `dot` costs 2 x (output elements) x (product of the lhs contracting dims). A computation's
    count is its own dots plus its callees' counts: fusions / calls / reductions once, a `while` body
    `known_trip_count` times (XLA annotates every counted loop; a loop without it fails the test).
    That equals the count of the fully unrolled program, after XLA's dead-code elimination."""
    header = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
    comps: dict[str, dict] = {}
    cur = entry = None
    for line in text.splitlines():
        h = header.match(line)
        if h:
            cur = comps.setdefault(h.group(1), {"shapes": {}, "dots": 0, "calls": []})
            if line.startswith("ENTRY"):
                entry = h.group(1)
            continue
        parsed = _split_instruction(line) if cur is not None else None
        if parsed is None:
            continue
        name, shape, op, rest = parsed
        cur["shapes"][name] = shape
        assert op not in ("convolution", "custom-call"), f"unexpected matmul-like op: {line[:200]}"
        if op == "dot":
            lhs = re.match(r"\s*%?([\w.\-]+)", rest).group(1)
            contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", rest).group(1)
            lhs_dims = _shape_dims(cur["shapes"][lhs])
            k = math.prod(lhs_dims[int(i)] for i in contracting.split(",") if i)
            cur["dots"] += 2 * math.prod(_shape_dims(shape)) * k
        elif op == "while":
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', rest)
            assert trips, f"while loop without a known trip count: {line[:300]}"
            cur["calls"].append((re.search(r"body=%?([\w.\-]+)", rest).group(1), int(trips.group(1))))
        else:
            assert "branch_computations=" not in rest, "conditionals are not expected in the train step"
            cur["calls"].extend((c, 1) for c in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", rest))
    memo: dict[str, int] = {}

    def total(c):
        if c not in memo:
            memo[c] = comps[c]["dots"] + sum(n * total(k) for k, n in comps[c]["calls"])
        return memo[c]

    assert entry is not None
    return total(entry)


def _cpu_program_flops(mc: ModelConfig, oc: ObjectiveConfig, *, mode: str, batch: int, q: int, r: int,
                       accum: int = 1) -> int:
    spec = LayoutSpec(q_len=q, cot_len=oc.cot_len, answer_len=r, num_latents=oc.num_latents, prompt_ids=(5,),
                      bos_id=1, eos_id=2, pad_id=0, bot_id=oc.special_ids[0], eot_id=oc.special_ids[1],
                      latent_id=oc.special_ids[2])
    trainable, frozen = jax.eval_shape(lambda k: init_trainable(k, init_params(mc, k), oc, mode=mode),
                                       jax.random.key(0))
    opt = optim.make_optimizer({"lr": 1e-3}, 10)
    step = make_train_step(oc, opt, accum)
    compiled = jax.jit(step).lower(abstract_train_state(trainable, opt), frozen, abstract_batch(spec, batch)).compile()
    return hlo_matmul_flops(compiled.as_text())


def test_hlo_counter_on_a_known_program():
    # the reference counter itself: a scanned matmul (loop of 3) + one batched dot, counted by hand
    def f(x, w, a, b):
        y, _ = jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=3)
        return y, jax.numpy.einsum("bij,bjk->bik", a, b)

    args = (jax.ShapeDtypeStruct((4, 6), "float32"), jax.ShapeDtypeStruct((6, 6), "float32"),
            jax.ShapeDtypeStruct((2, 3, 5), "float32"), jax.ShapeDtypeStruct((2, 5, 7), "float32"))
    text = jax.jit(f).lower(*args).compile().as_text()
    assert hlo_matmul_flops(text) == 3 * 2 * 4 * 6 * 6 + 2 * 2 * 3 * 7 * 5


@pytest.mark.parametrize("objective,mode,tied,remat", [("kava", "lora", True, "none"), ("cot", "full", False, "full")])
def test_analytic_flops_match_the_unrolled_cpu_program(objective, mode, tied, remat):
    """kava / LoRA / tied head: teacher, prefill, T=2 Jacobi passes, answer, prj, R-KV compression, LoRA
    and frozen-base gradients, the tied head's table gradient. cot / full fine-tuning / untied head /
    remat full: weight gradients everywhere and the recomputed forward. The counts agree exactly (1 %
    tolerance). (Checked the same way while writing flops.py, too slow for this suite: codi and
    sequential kava, pccot with remat full, grad_accum 2, remat dots / dots_no_batch, chunked
    redundancy, cosine compression.)"""
    mc = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                     mlp_dim=48, tie_word_embeddings=tied, remat=remat)
    if mode == "lora":
        mc = mc.with_lora(4)
    oc = ObjectiveConfig(model=mc, objective=objective, num_latents=3, num_iterations=2, special_ids=(61, 62, 63),
                         cot_len=6)
    want = _cpu_program_flops(mc, oc, mode=mode, batch=4, q=5, r=4)
    got = train_step_flops(mc, oc, batch_size=4, q_len=5, answer_len=4, train_mode=mode)
    assert (got.recompute > 0) == (remat == "full")
    assert got.executed == pytest.approx(want, rel=0.01)


def test_flops_structure_by_objective():
    mc = ModelConfig(vocab_size=100, hidden_size=16, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=4,
                     mlp_dim=24, tie_word_embeddings=False).with_lora(2)
    oc = ObjectiveConfig(model=mc, objective="kava", num_latents=5, num_iterations=3, special_ids=(1, 2, 3), cot_len=7)
    kw = dict(batch_size=2, q_len=6, answer_len=4)
    f = {o: train_step_flops(mc, dataclasses.replace(oc, objective=o), **kw)
         for o in ("cot", "nocot", "pccot", "kava")}
    # One forward pass over S_t = 17 tokens per row, by hand: projections 2·(D·N·H + 2·D·K·H + N·H·D + 3·D·F)
    # + LoRA 2·r·(in+out) per target, attention 4·N·H·S_t² per layer, untied head 2·D·V per position.
    d, n, k, h, ff, v, r, s = 16, 4, 2, 4, 24, 100, 2, 17
    lin = 2 * (d * n * h + 2 * d * k * h + n * h * d + 3 * d * ff)
    lora = 2 * r * ((d + n * h) + 2 * (d + k * h) + (n * h + d) + 2 * (d + ff) + (ff + d))
    attn = 4 * n * h * s * s
    fwd = 2 * (3 * (s * (lin + lora) + attn) + s * 2 * d * v)
    bwd = 2 * (3 * (s * (lin + 2 * lora) + 2 * attn) + s * 2 * d * v)  # frozen head: activation gradient only
    assert f["cot"].forward == fwd and f["cot"].backward == bwd
    assert f["nocot"].model == f["cot"].model
    assert f["kava"].model - f["pccot"].model == f["kava"].parts["compression"].forward > 0
    assert set(f["kava"].parts) == {"teacher", "student_prefill", "jacobi", "answer", "prj", "compression"}
    remat = train_step_flops(mc.replace(remat="full"), oc, **kw)
    assert remat.model == f["kava"].model and remat.recompute > 0
    with pytest.raises(ValueError, match="train_mode"):
        train_step_flops(mc, oc, train_mode="qlora", **kw)
    with pytest.raises(ValueError, match="batch_size"):
        train_step_flops(mc, oc, batch_size=0, q_len=6, answer_len=4)


def test_chip_table_and_mfu():
    assert chip_spec("TPU v5 lite").name == "v5e" and chip_spec("TPU v6 lite").name == "v6e"
    assert chip_spec("TPU v5").name == "v5p" and chip_spec("TPU v5p").name == "v5p"
    assert chip_spec("TPU v4").name == "v4" and chip_spec("cpu") is None and chip_peak("NVIDIA H100") is None
    assert chip_peak("TPU v6 lite") == 918e12
    assert mfu(1e15, 2.0, "TPU v5 lite", 8) == pytest.approx(1e15 / (2.0 * 8 * 197e12))
    assert mfu(1e15, 2.0, "cpu", 8) is None
    with pytest.raises(ValueError, match="step_seconds"):
        mfu(1e15, 0.0, "TPU v4", 8)


def test_trainer_throughput_and_mfu():
    r = throughput(4, 128, 9000, 2.0, 1e15, "TPU v6 lite", 8)
    assert r["steps_per_s"] == 2.0 and r["examples_per_s"] == 64.0 and r["tokens_per_s"] == 4500.0
    assert r["model_flops_per_s"] == 2e15
    assert r["mfu"] == pytest.approx(1e15 / (0.5 * 8 * 918e12)) == mfu(1e15, 0.5, "TPU v6 lite", 8)
    assert "mfu" not in throughput(4, 128, 9000, 2.0, 1e15, "cpu", 8)


def test_fit_candidates_order():
    c = _synthetic("kava,quick")  # batch 8, mesh data=-1, remat none
    cands = fit_candidates(c, 8)
    assert cands == [("dots", 1), ("dots_no_batch", 1), ("full", 1)]  # micro-batch 1/chip: no accumulation left
    c.train.batch_size = 32
    cands = fit_candidates(c, 8, max_tries=20)
    assert cands[:3] == [("dots", 1), ("dots_no_batch", 1), ("full", 1)]
    assert cands[3:] == [(p, a) for a in (2, 4) for p in ("none", "dots", "dots_no_batch", "full")]


# ------------------------------------------------------------------------------------ CLI
def test_kava_plan_cli_prints_report_and_writes_json(tmp_path):
    out, md = tmp_path / "plan.json", tmp_path / "PLAN.md"
    cmd = [sys.executable, "-m", "kava_jax.train.plan", "--config", "configs/synthetic.py:cot,quick",
           "--config.train.batch_size=16", "--topology", "v5e:2x4", "--json", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "on v5e:2x4 (8 x v5e" in p.stdout and "FITS" in p.stdout and "roofline" in p.stdout
    assert "== [1/1] configs/synthetic.py:cot,quick" in p.stdout and "lowering and compiling for TPU" in p.stdout
    entries = json.loads(out.read_text())["entries"]
    (key, rep), = entries.items()
    assert key.startswith("configs/synthetic.py:cot,quick") and key.endswith("@ v5e:2x4")
    assert rep["objective"] == "cot" and rep["batch_size"] == 16 and rep["per_chip_batch"] == 2
    assert rep["memory_per_chip"]["argument"] > 0 and rep["flops"]["model"] > 0

    # a second run skips the stored entry (no compile) and writes the Markdown table
    p = subprocess.run(cmd + ["--markdown", str(md)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "already in" in p.stdout
    table = [line for line in md.read_text().splitlines() if line.startswith("| configs/synthetic.py")]
    assert len(table) == 1 and "| v5e:2x4 |" in table[0]

    # --markdown_only rewrites the table from the JSON and compiles nothing
    md.unlink()
    p = subprocess.run(cmd + ["--markdown", str(md), "--markdown_only"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "already in" not in p.stdout and "(1 rows, 0 not computed yet)" in p.stdout
    assert [ln for ln in md.read_text().splitlines() if ln.startswith("| configs/synthetic.py")] == table

    # what is written to the JSON while a --force run compiles (a hand-added note, another run's entry)
    # survives that run's write: it re-reads the file before merging its own entry
    proc = subprocess.Popen(cmd + ["--force"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            if "lowering and compiling" in line:
                break
        store = json.loads(out.read_text())
        store["entries"]["other @ v6e:2x4"] = {**rep, "topology": "v6e:2x4", "note": "compiled on a loaded machine"}
        out.write_text(json.dumps(store))
        proc.communicate(timeout=300)
        assert proc.returncode == 0
    finally:
        proc.kill()
    entries = json.loads(out.read_text())["entries"]
    assert set(entries) == {key, "other @ v6e:2x4"} and entries[key]["seconds"] != rep["seconds"]

    # an entry's free-text "note" is listed under the table
    p = subprocess.run(cmd + ["--markdown", str(md), "--markdown_only"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"* {rep['label']} @ v6e:2x4: compiled on a loaded machine" in md.read_text()
