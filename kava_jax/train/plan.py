"""`kava-plan`: compile the real train step for a TPU topology on this host and report what it needs.

    kava-plan --config configs/llama32_1b_gsm8k_aug.py --topology v5e:2x4 [--topology v6e:2x4 ...]
              [--config.train.grad_accum=2 ...] [--json OUT.json] [--markdown OUT.md] [--try-fit]
    kava-plan --all-paper [--topology ...] --json bench/results/plan_paper.json --markdown docs/PLAN.md

No TPU is needed: `jax.experimental.topologies` describes the slice's devices, libtpu (`jax[tpu]`)
compiles for them, and `jax.devices()` stays CPU. For each (config, topology) the plan builds the
abstract train state, frozen params and batch with the config's shardings on the topology's devices,
lowers and compiles the SAME jitted step `kava-train` runs (`train.step.make_train_step` +
`compile_train_step`) and reports per chip:
  * memory from the compiled program: arguments, outputs (minus donated aliases), temp, generated code;
    peak = argument + output - alias + temp + generated code, against the chip's HBM -> fits yes / no;
  * FLOPs per step from the analytic count of `train.flops` (never `cost_analysis`);
  * a roofline step time max(compute, memory): compute = executed FLOPs / (chips x bf16 peak);
    memory = (argument + output + temp bytes of one chip) / HBM bandwidth, a lower bound on the HBM
    traffic (every argument is read, every output and temp byte written at least once);
    tokens/s/chip (teacher tokens B·(Q+C+R) per step) and the MFU that step time implies
    (model FLOPs / (step time x chips x peak); at most model / executed FLOPs when compute-bound);
  * lower and compile seconds (wall) on this host, and the CPU seconds of both (all threads).
With --try-fit, a setting that does not fit is retried with the obvious levers, in order: a stronger
remat policy (none -> dots -> dots_no_batch -> full) at the same gradient accumulation, then doubling
train.grad_accum (halving the per-chip micro-batch, same global batch and update) with each of those
policies; every tried setting is reported and the first that fits is named.

Model: the config's preset shapes with model.overrides (model.hf_path / init_from are not loaded).
Vocabulary as `kava-train` builds it: the synthetic tokenizer is built in memory; an HF tokenizer is
used when it is a local directory or in the local HF cache; otherwise the vocabulary is the preset's
grown by the 3 KaVa tokens <bot> <eot> <latent> (appended at the end, as the tokenizer adds them).

--all-paper runs the 6 paper configs (METHOD §5, method kava) on v5e:2x4, v6e:2x4 and v5p:2x2x2 (or
the given --topology list). With --json, entries already in the file are skipped (resumable; --force
recomputes) and each new entry is merged into the file as read just then, so notes added by hand or
entries from a second kava-plan on other rows are kept; --markdown writes the table of every entry
in the JSON file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["PAPER_CONFIGS", "DEFAULT_TOPOLOGIES", "PlanInputs", "topology_devices", "plan_model",
           "plan_inputs", "plan_step", "plan_with_fit", "format_report", "markdown_table", "write_markdown",
           "main", "run"]

ROOT = Path(__file__).resolve().parents[2]
PAPER_CONFIGS = ("llama32_1b_gsm8k_aug", "qwen25_05b_gsm8k_aug", "llama32_1b_gsm8k_aug_nl",
                 "qwen25_05b_gsm8k_aug_nl", "llama32_3b_gsm8k_aug", "llama32_3b_gsm8k_aug_nl")
DEFAULT_TOPOLOGIES = ("v5e:2x4", "v6e:2x4", "v5p:2x2x2")
REMAT_ORDER = ("none", "dots", "dots_no_batch", "full")  # least to most memory-saving
_TPU_ENV = {"TPU_ACCELERATOR_TYPE": "v5litepod-8", "TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0",
            "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


# ------------------------------------------------------------------------------------ devices
def topology_devices(topology: str) -> list:
    """The devices of a TPU topology description, e.g. "v5e:2x4" (8 chips), "v6e:2x4", "v5p:2x2x2".

    Sets TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES / TPU_WORKER_ID / ALLOW_MULTIPLE_LIBTPU_LOAD when
    unset (quiets libtpu on a host without TPUs; read when libtpu loads). Raises ValueError naming the
    topology when libtpu is missing or refuses the name."""
    if not isinstance(topology, str) or ":" not in topology:
        raise ValueError(f"--topology {topology!r}: expected <chip>:<shape>, e.g. v5e:2x4, v6e:2x4, v5p:2x2x2")
    for k, v in _TPU_ENV.items():
        os.environ.setdefault(k, v)
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    except Exception as e:  # libtpu missing, or an unknown topology name
        raise ValueError(f"--topology {topology!r}: cannot describe this TPU topology ({type(e).__name__}: {e}); "
                         "is jax[tpu] (libtpu) installed? accepted names look like v5e:2x4, v6e:2x4, v5p:2x2x2, "
                         "v4:2x2x1") from e
    return list(desc.devices)


# ------------------------------------------------------------------------------------ model / inputs
@dataclasses.dataclass
class PlanInputs:
    """Everything the step is compiled for (all abstract: ShapeDtypeStructs)."""

    model_config: Any
    objective: Any
    layout: Any
    optimizer: Any
    state: Any
    frozen: Any
    batch: dict
    vocab_source: str


def _tokenizer_vocab(config) -> tuple[int | None, tuple[int, int, int] | None, tuple[int, ...], str]:
    """(vocab size, (bot, eot, latent), prompt ids, source) of the run's tokenizer when it can be had
    offline, else (None, None, (), reason)."""
    name = config.model.tokenizer
    try:
        if name == "synthetic":
            from kava_jax.data.tokenizer import build_synthetic_tokenizer, prompt_ids, special_tokens

            tok = build_synthetic_tokenizer(None)
            sp = special_tokens(tok)
            return len(tok), (sp.bot, sp.eot, sp.latent), tuple(prompt_ids(tok)), "synthetic tokenizer"
        from kava_jax.data.tokenizer import load_tokenizer, prompt_ids

        bundle = load_tokenizer(name, local_files_only=True)
        sp = bundle.specials
        return (bundle.vocab_size, (sp.bot, sp.eot, sp.latent), tuple(prompt_ids(bundle.tokenizer)),
                f"tokenizer {name}")
    except (FileNotFoundError, OSError, ValueError) as e:
        return None, None, (), f"{name!r} not available offline ({type(e).__name__})"


def plan_model(config) -> tuple[Any, tuple[int, int, int], tuple[int, ...], str]:
    """(ModelConfig, special ids, prompt ids, vocab source) of a run config without loading weights.

    The preset (model.preset + model.overrides, dtype / param_dtype / remat, LoRA from train.mode) with
    the vocabulary `kava-train` would end up with (module docstring)."""
    from kava_jax.models import LoraConfig, get_preset

    m = config.model
    overrides = dict(m.overrides.to_dict() if hasattr(m.overrides, "to_dict") else (m.overrides or {}))
    override_vocab = int(overrides.pop("vocab_size", 0) or 0)
    base = get_preset(m.preset, **overrides)
    tok_vocab, specials, prompt, source = _tokenizer_vocab(config)
    if tok_vocab is None:
        tok_vocab = (override_vocab or base.vocab_size) + 3
        specials = (tok_vocab - 3, tok_vocab - 2, tok_vocab - 1)
        source = f"preset vocab {override_vocab or base.vocab_size} + 3 KaVa tokens (tokenizer {source})"
    if m.hf_path or m.init_from:  # an HF / earlier-run embedding, grown to the tokenizer (setup._grow_vocab)
        vocab = max(base.vocab_size, tok_vocab)
    else:  # random preset init: the tokenizer's size or a larger override (setup.build_model)
        vocab = max(override_vocab, tok_vocab)
    if config.train.mode == "lora":
        lora = LoraConfig(rank=int(m.lora_rank), alpha=float(m.lora_alpha), dropout=float(m.lora_dropout),
                          targets=tuple(m.lora_targets))
    else:
        lora = LoraConfig(0)
    mc = base.replace(vocab_size=vocab, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, lora=lora)
    return mc, tuple(int(i) for i in specials), tuple(prompt), source


def plan_inputs(config, num_devices: int) -> PlanInputs:
    """Validates `config` for `num_devices` chips and builds the abstract inputs of its train step."""
    import jax

    from kava_jax.data.pipeline import abstract_batch
    from kava_jax.kava.batch import LayoutSpec
    from kava_jax.kava.objective import init_trainable
    from kava_jax.models import init_params
    from kava_jax.train.optim import make_optimizer
    from kava_jax.train.state import abstract_train_state
    from kava_jax.train.validate import objective_config, validate_config

    validate_config(config, num_devices)
    mc, specials, prompt, source = plan_model(config)
    obj = objective_config(config, mc, specials)
    d = config.data
    others = sorted(set(range(8)) - set(specials))
    if not prompt:
        prompt = (others[3],)
    layout = LayoutSpec(q_len=int(d.q_len), cot_len=int(d.cot_len), answer_len=int(d.answer_len),
                        num_latents=int(config.kava.num_latents), prompt_ids=prompt, bos_id=others[0],
                        eos_id=others[1], pad_id=others[2], bot_id=specials[0], eot_id=specials[1],
                        latent_id=specials[2])
    mode = config.train.mode
    trainable, frozen = jax.eval_shape(lambda k: init_trainable(k, init_params(mc, k), obj, mode=mode),
                                       jax.random.key(0))
    total = int(config.train.num_steps or 1000)  # the schedule's length does not change the program's shapes
    optimizer = make_optimizer(config.train, total)
    state = abstract_train_state(trainable, optimizer)
    batch = abstract_batch(layout, int(config.train.batch_size))
    return PlanInputs(mc, obj, layout, optimizer, state, frozen, batch, source)


# ------------------------------------------------------------------------------------ one plan
def _nbytes(tree) -> int:
    import jax

    return int(sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def _nparams(tree) -> int:
    import jax

    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def _chip(topology: str, devices) -> Any:
    from kava_jax.train.flops import CHIPS, chip_spec

    spec = chip_spec(getattr(devices[0], "device_kind", None))
    if spec is None:
        spec = CHIPS.get(topology.split(":")[0].lower())
    if spec is None:
        raise ValueError(f"--topology {topology!r}: unknown chip (device kind "
                         f"{getattr(devices[0], 'device_kind', None)!r}); known: v4, v5e, v5p, v6e")
    return spec


def plan_step(config, topology: str, *, label: str = "", devices=None,
              compiler_options: dict | None = None) -> dict[str, Any]:
    """Compiles the train step of `config` for `topology` and returns the report (a JSON-able dict).

    devices: the topology's devices (default `topology_devices(topology)`). Raises ValueError for an
    invalid config or topology; compile errors propagate."""
    import jax

    from kava_jax.train.flops import config_step_flops, objective_flops_table
    from kava_jax.train.sharding import make_mesh
    from kava_jax.train.step import compile_train_step, make_train_step

    devices = topology_devices(topology) if devices is None else list(devices)
    chip = _chip(topology, devices)
    n = len(devices)
    inp = plan_inputs(config, n)
    mesh = make_mesh(config.mesh, devices)
    rules = tuple(tuple(r) for r in config.mesh.rules)
    accum = int(config.train.grad_accum)
    step_fn = make_train_step(inp.objective, inp.optimizer, accum)
    cpu0 = time.process_time()
    cs = compile_train_step(step_fn, mesh, inp.state, inp.frozen, inp.batch, rules, model_config=inp.model_config,
                            compiler_options=compiler_options)
    mem = dict(cs.memory)
    if not mem:
        raise RuntimeError(f"{topology}: the compiled step reports no memory analysis")
    mem["peak"] = mem["total"] + mem["generated_code"]
    fl = config_step_flops(config, inp.model_config, inp.objective)
    by_obj = {k: v.model for k, v in objective_flops_table(config, inp.model_config, inp.objective).items()}

    traffic = mem["argument"] + mem["output"] + mem["temp"]
    compute_s = fl.executed / (n * chip.peak_bf16)
    memory_s = traffic / chip.hbm_bandwidth
    step_s = max(compute_s, memory_s)
    mc = inp.model_config
    b = int(config.train.batch_size)
    dp = int(mesh.shape["data"]) * int(mesh.shape["fsdp"])
    return {
        "label": label or "config",
        "topology": topology,
        "chip": chip.name,
        "device_kind": str(getattr(devices[0], "device_kind", "")),
        "chips": n,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "objective": inp.objective.objective,
        "train_mode": str(config.train.mode),
        "model": {"preset": str(config.model.preset), "layers": mc.num_layers, "hidden": mc.hidden_size,
                  "heads": mc.num_heads, "kv_heads": mc.num_kv_heads, "head_dim": mc.head_dim, "mlp": mc.mlp_dim,
                  "vocab": mc.vocab_size, "vocab_source": inp.vocab_source, "lora_rank": mc.lora.rank,
                  "dtype": mc.dtype, "param_dtype": mc.param_dtype, "frozen_params": _nparams(inp.frozen),
                  "trainable_params": _nparams(inp.state.trainable)},
        "layout": {"q_len": inp.layout.q_len, "cot_len": inp.layout.cot_len, "answer_len": inp.layout.answer_len,
                   "num_latents": inp.objective.num_latents, "num_iterations": inp.objective.num_iterations,
                   "latent_mode": inp.objective.latent_mode},
        "batch_size": b,
        "grad_accum": accum,
        "per_chip_batch": b / dp,
        "micro_batch_per_chip": b / (dp * accum),
        "remat": mc.remat,
        "remat_latent_scan": bool(inp.objective.remat_latent_scan),
        "bytes_global": {"state": _nbytes(inp.state), "frozen": _nbytes(inp.frozen), "batch": _nbytes(inp.batch)},
        "memory_per_chip": mem,
        "hbm_bytes": chip.hbm_bytes,
        "hbm_fraction": mem["peak"] / chip.hbm_bytes,
        "fits": bool(mem["peak"] <= chip.hbm_bytes),
        "flops": fl.as_dict(),
        "flops_model_by_objective": by_obj,
        "roofline": {"peak_flops_per_chip": chip.peak_bf16, "hbm_bandwidth": chip.hbm_bandwidth,
                     "compute_s": compute_s, "bytes_per_chip": traffic, "memory_s": memory_s, "step_s": step_s,
                     "bound": "compute" if compute_s >= memory_s else "memory",
                     "tokens_per_s_per_chip": fl.tokens / step_s / n,
                     "mfu": fl.model / (step_s * n * chip.peak_bf16)},
        "seconds": {**{k: float(v) for k, v in cs.seconds.items()}, "cpu": time.process_time() - cpu0},
        "jax": jax.__version__,
    }


def _with(config, **fields):
    """A copy of a run config with dotted fields replaced (e.g. {"train.grad_accum": 2})."""
    import ml_collections

    c = ml_collections.ConfigDict(config.to_dict())
    for key, value in fields.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def fit_candidates(config, num_devices: int, max_tries: int = 8) -> list[tuple[str, int]]:
    """(remat, grad_accum) settings --try-fit tries after the config's own, cheapest first: stronger
    remat policies at the same accumulation, then each doubling of grad_accum (while the per-chip
    micro-batch stays a whole number >= 1) with the config's policy and the stronger ones."""
    from kava_jax.train.validate import data_parallel_size

    remat, accum = str(config.model.remat), int(config.train.grad_accum)
    b = int(config.train.batch_size)
    dp = data_parallel_size(config.mesh, num_devices)
    policies = REMAT_ORDER[REMAT_ORDER.index(remat):] if remat in REMAT_ORDER else (remat,)
    out = []
    a = accum
    while b % (a * dp) == 0 and b // (a * dp) >= 1:
        out.extend((p, a) for p in policies)
        a *= 2
    return [c for c in out if c != (remat, accum)][:max_tries]


def plan_with_fit(config, topology: str, *, label: str = "", try_fit: bool = False, devices=None,
                  max_tries: int = 8) -> dict[str, Any]:
    """`plan_step`, plus (try_fit and it does not fit) the --try-fit search: the report gains
    "fit_search" (one row per tried setting) and "fits_with" (the first setting that fits, or None)."""
    devices = topology_devices(topology) if devices is None else list(devices)
    rep = plan_step(config, topology, label=label, devices=devices)
    if not try_fit or rep["fits"]:
        return rep
    rows, found = [], None
    for remat, accum in fit_candidates(config, len(devices), max_tries):
        cfg = _with(config, **{"model.remat": remat, "train.grad_accum": accum})
        try:
            r = plan_step(cfg, topology, label=label, devices=devices)
        except Exception as e:  # a setting that fails to compile is reported, not fatal
            rows.append({"remat": remat, "grad_accum": accum, "error": f"{type(e).__name__}: {e}"[:500]})
            continue
        rows.append({"remat": remat, "grad_accum": accum, "micro_batch_per_chip": r["micro_batch_per_chip"],
                     "peak": r["memory_per_chip"]["peak"], "hbm_fraction": r["hbm_fraction"], "fits": r["fits"],
                     "step_s": r["roofline"]["step_s"], "mfu": r["roofline"]["mfu"],
                     "compile_s": r["seconds"]["compile"]})
        log.info("try-fit %s remat=%s grad_accum=%d: peak %.2f GiB (%s)", topology, remat, accum,
                 r["memory_per_chip"]["peak"] / 2**30, "fits" if r["fits"] else "does not fit")
        if r["fits"]:
            found = {"remat": remat, "grad_accum": accum}
            break
    rep["fit_search"] = rows
    rep["fits_with"] = found
    return rep


# ------------------------------------------------------------------------------------ output
def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _eng(x: float, unit: str = "") -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.2f} {unit}"


def format_report(rep: dict[str, Any]) -> str:
    """A human-readable multi-line report of one plan."""
    m, mem, rf, fl = rep["model"], rep["memory_per_chip"], rep["roofline"], rep["flops"]
    lines = [
        f"== {rep['label']} on {rep['topology']} ({rep['chips']} x {rep['chip']}, '{rep['device_kind']}'), "
        f"mesh {rep['mesh']}",
        f"  model {m['preset']}: {m['layers']} layers, D {m['hidden']}, {m['heads']}/{m['kv_heads']} heads x "
        f"{m['head_dim']}, MLP {m['mlp']}, vocab {m['vocab']} ({m['vocab_source']}); {rep['train_mode']} "
        f"(rank {m['lora_rank']}), compute {m['dtype']}, params {m['param_dtype']}",
        f"  {rep['objective']}: batch {rep['batch_size']} ({rep['per_chip_batch']:g}/chip, grad_accum "
        f"{rep['grad_accum']} -> micro-batch {rep['micro_batch_per_chip']:g}/chip), layout {rep['layout']}, "
        f"remat {rep['remat']}",
        f"  per chip: arguments {_gib(mem['argument'])}, outputs {_gib(mem['output'])} (aliased "
        f"{_gib(mem['alias'])}), temp {_gib(mem['temp'])}, code {_gib(mem['generated_code'])}",
        f"  peak {_gib(mem['peak'])} of {_gib(rep['hbm_bytes'])} HBM ({100 * rep['hbm_fraction']:.0f} %): "
        f"{'FITS' if rep['fits'] else 'DOES NOT FIT'}",
        f"  FLOPs/step: model {_eng(fl['model'], 'FLOP')} (fwd {_eng(fl['forward'])}, bwd {_eng(fl['backward'])}), "
        f"executed {_eng(fl['executed'], 'FLOP')} (remat recompute {_eng(fl['recompute'])}); "
        f"{fl['tokens']} tokens/step",
        f"  roofline: compute {rf['compute_s'] * 1e3:.1f} ms, memory {rf['memory_s'] * 1e3:.2f} ms -> "
        f"step {rf['step_s'] * 1e3:.1f} ms ({rf['bound']}-bound), {rf['tokens_per_s_per_chip']:,.0f} tokens/s/chip, "
        f"MFU {100 * rf['mfu']:.1f} %",
        f"  compile: lower {rep['seconds']['lower']:.1f} s, compile {rep['seconds']['compile']:.1f} s"
        + (f" ({rep['seconds']['cpu']:.0f} CPU-s)" if "cpu" in rep["seconds"] else ""),
    ]
    if "fit_search" in rep:
        for r in rep["fit_search"]:
            if "error" in r:
                lines.append(f"  try-fit remat={r['remat']} grad_accum={r['grad_accum']}: error {r['error']}")
            else:
                lines.append(f"  try-fit remat={r['remat']} grad_accum={r['grad_accum']} (micro-batch "
                             f"{r['micro_batch_per_chip']:g}/chip): peak {_gib(r['peak'])} "
                             f"({100 * r['hbm_fraction']:.0f} %) {'fits' if r['fits'] else 'does not fit'}, "
                             f"step {r['step_s'] * 1e3:.1f} ms, MFU {100 * r['mfu']:.1f} %")
        fw = rep["fits_with"]
        lines.append(f"  try-fit: {'fits with ' + json.dumps(fw) if fw else 'no tried setting fits'}")
    return "\n".join(lines)


def markdown_table(reports: list[dict[str, Any]]) -> str:
    """One Markdown table row per report."""
    head = ("| config | topology | batch/chip (accum) | remat | args | temp | peak / HBM | fits | model TFLOP/step "
            "| roofline step | tokens/s/chip | MFU | compile |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in reports:
        mem, rf = r["memory_per_chip"], r["roofline"]
        fits = "yes" if r["fits"] else "**no**"
        if not r["fits"] and r.get("fits_with"):
            fits += f" (fits: remat {r['fits_with']['remat']}, accum {r['fits_with']['grad_accum']})"
        elif not r["fits"] and "fits_with" in r:
            fits += " (no tried setting fits)"
        rows.append(
            f"| {r['label']} | {r['topology']} | {r['per_chip_batch']:g} ({r['grad_accum']}) | {r['remat']} "
            f"| {mem['argument'] / 2**30:.2f} GiB | {mem['temp'] / 2**30:.2f} GiB "
            f"| {mem['peak'] / 2**30:.2f} / {r['hbm_bytes'] / 2**30:.0f} GiB | {fits} "
            f"| {r['flops']['model'] / 1e12:.1f} | {rf['step_s'] * 1e3:.0f} ms ({rf['bound']}) "
            f"| {rf['tokens_per_s_per_chip']:,.0f} | {100 * rf['mfu']:.0f} % | {_compile_cell(r['seconds'])} |")
    return "\n".join(rows)


def _compile_cell(seconds: dict[str, float]) -> str:
    wall = seconds.get("lower", 0.0) + seconds["compile"]
    return f"{wall:.0f} s" + (f" ({seconds['cpu']:.0f} CPU-s)" if "cpu" in seconds else "")


_MD_HEAD = """# KaVa train step on TPU slices (`kava-plan`)

Produced on a CPU-only host (no TPU) by

    {command}

which compiles the real `kava-train` step of each paper config (METHOD §5, method `kava`: LoRA
rank 128 on all projections, bf16 compute with float32 weights, batch 128, FSDP over every chip,
remat `full`, M 24, T 3) for each TPU topology with libtpu and reads the compiled program's memory
analysis. Raw numbers: `{json_path}`. Definitions (see `kava_jax/train/plan.py` and `train/flops.py`):

* **args / temp / peak**: per chip, from the compiled program; peak = arguments + outputs - donated
  aliases + temp + generated code, compared with the chip's HBM (v4 32, v5e 16, v5p 95, v6e 32 GiB).
* **model TFLOP/step**: analytic matmul FLOPs of the global step (teacher pass, student prefill,
  T Jacobi passes, answer pass, R-KV compression, prj; backward of everything; LoRA: activation
  gradients through the frozen base, weight gradients only for LoRA / prj / the tied embedding).
* **roofline step**: max(executed FLOPs / (chips x bf16 peak), per-chip argument+output+temp bytes /
  HBM bandwidth); executed FLOPs add the forward recomputed by remat `full` (~ +30 %). It is a lower
  bound on the step time; **MFU** = model FLOPs / (roofline step x chips x peak) is therefore an upper
  bound (the well-tuned JAX trainers of ENVIRONMENT.md reach 45-70 %).
* **tokens/s/chip**: teacher tokens B·(Q+C+R) per step over the roofline step time.
* **compile**: wall seconds to lower + compile on this (shared, 2-core) CPU host; in brackets the CPU
  seconds (all threads) where recorded. Wall time includes any time the process was paused or shared.
  Where the time goes (v5e / v6e compile much longer than v5p): `bench/tpu_compile_time.py`, bench/README.md.

"""


def write_markdown(path: str | Path, reports: list[dict[str, Any]], command: str, json_path: str,
                   missing: list[str] | tuple[str, ...] = ()) -> None:
    """Writes the PLAN.md document: preamble + `markdown_table(reports)` + the entries not computed yet."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    text = _MD_HEAD.format(command=command, json_path=json_path) + markdown_table(reports) + "\n"
    notes = [f"* {r['label']} @ {r['topology']}: {r['note']}\n" for r in reports if r.get("note")]
    if notes:
        text += "\nNotes (the `note` field of an entry in the JSON):\n\n" + "".join(notes)
    if missing:
        text += ("\nNot computed yet (rerun the command: finished entries are kept, the rest compile):\n\n"
                 + "".join(f"* {key}\n" for key in missing))
    p.write_text(text, encoding="utf-8")


# ------------------------------------------------------------------------------------ JSON store
def _load_store(path: str | None) -> dict[str, Any]:
    if not path or not Path(path).exists():
        return {"entries": {}}
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        raise ValueError(f"--json {path}: not a kava-plan results file (no 'entries' mapping)")
    return data


def _save_store(path: str, store: dict[str, Any]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(store, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, p)


def _paper_config(name: str):
    from kava_jax.sweep import load_module

    path = ROOT / "configs" / f"{name}.py"
    return load_module(path, f"kava_plan_{name}").get_config("kava")


# ------------------------------------------------------------------------------------ CLI
_HYPHENATED = {"--try-fit": "--try_fit", "--all-paper": "--all_paper", "--max-tries": "--max_tries"}


def _dehyphenate(arg: str) -> str:
    """--try-fit[=x] -> --try_fit[=x] (and --all-paper, --max-tries); other arguments unchanged."""
    name, eq, value = arg.partition("=")
    return _HYPHENATED.get(name, name) + eq + value


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    if "topology" not in flags.FLAGS:
        config_flags.DEFINE_config_file("config", None, "run config file (configs/*.py[:arg]) with overrides",
                                        lock_config=False)
        flags.DEFINE_multi_string("topology", None, "TPU topology, e.g. v5e:2x4 (repeatable); default v5e:2x4, "
                                  "with --all-paper v5e:2x4, v6e:2x4, v5p:2x2x2")
        flags.DEFINE_string("json", None, "results JSON file (entries merged; existing entries are skipped)")
        flags.DEFINE_string("markdown", None, "write the Markdown table of every entry in --json to this file")
        flags.DEFINE_bool("try_fit", False, "when a setting does not fit, try stronger remat / grad accumulation")
        flags.DEFINE_integer("max_tries", 8, "most settings --try-fit compiles per (config, topology)")
        flags.DEFINE_bool("all_paper", False, "plan the 6 paper configs (method kava)")
        flags.DEFINE_bool("force", False, "recompute entries already in --json")
        flags.DEFINE_bool("markdown_only", False, "only (re)write --markdown from the entries in --json")
    return flags.FLAGS


def _config_label(flags_) -> str:
    from ml_collections import config_flags

    name = config_flags.get_config_filename(flags_["config"])
    try:
        name = os.path.relpath(name)
    except ValueError:
        pass
    overrides = config_flags.get_override_values(flags_["config"])
    extra = " ".join(f"{k}={v}" for k, v in sorted(overrides.items()))
    return f"{name} {extra}".strip()


def main(argv) -> None:
    flags_ = _define_flags()
    if len(argv) > 1:
        raise SystemExit(f"kava-plan: unexpected arguments {argv[1:]}")
    if flags_.all_paper == (flags_.config is not None):
        raise SystemExit("kava-plan: pass exactly one of --config CONFIG or --all-paper")
    topologies = list(flags_.topology or (DEFAULT_TOPOLOGIES if flags_.all_paper else ("v5e:2x4",)))
    if flags_.all_paper:
        jobs = [(f"configs/{name}.py:kava", name, topo) for topo in topologies[:2] for name in PAPER_CONFIGS[:4]]
        jobs += [(f"configs/{name}.py:kava", name, topo) for topo in topologies[:2] for name in PAPER_CONFIGS[4:]]
        jobs += [(f"configs/{name}.py:kava", name, topo) for topo in topologies[2:] for name in PAPER_CONFIGS]
    else:
        jobs = [(_config_label(flags_), None, topo) for topo in topologies]
    store = _load_store(flags_.json)
    command = "kava-plan " + " ".join(sys.argv[1:])
    keys = [f"{label} @ {topo}" for label, _, topo in jobs]

    def markdown() -> None:
        if flags_.markdown:
            reports = list(store["entries"].values())
            missing = [k for k in keys if k not in store["entries"]] if flags_.json else []
            write_markdown(flags_.markdown, reports, store.get("command", command), flags_.json or "(no --json)",
                           missing)
            print(f"wrote {flags_.markdown} ({len(reports)} rows, {len(missing)} not computed yet)", flush=True)

    if flags_.markdown_only:
        if not (flags_.json and flags_.markdown):
            raise SystemExit("kava-plan: --markdown_only needs --json and --markdown")
        markdown()
        return
    failures = 0
    for n, ((label, paper_name, topo), key) in enumerate(zip(jobs, keys, strict=True), 1):
        store = _load_store(flags_.json) if flags_.json else store
        if key in store["entries"] and not flags_.force:
            print(f"== [{n}/{len(jobs)}] {key}: already in {flags_.json}, skipped (--force recomputes)", flush=True)
            continue
        config = _paper_config(paper_name) if paper_name else flags_.config
        print(f"== [{n}/{len(jobs)}] {key}: lowering and compiling for TPU (minutes on a CPU host), "
              f"started {time.strftime('%H:%M:%S')}", flush=True)
        t0 = time.perf_counter()
        try:
            rep = plan_with_fit(config, topo, label=label, try_fit=flags_.try_fit, max_tries=flags_.max_tries)
        except ValueError as e:
            raise SystemExit(f"kava-plan: {e}") from None
        except Exception as e:  # keep going over the other entries; report at the end
            failures += 1
            log.exception("kava-plan: %s failed", key)
            print(f"== {key}: FAILED after {time.perf_counter() - t0:.0f} s: {type(e).__name__}: {e}", flush=True)
            continue
        print(format_report(rep), flush=True)
        if flags_.json:  # re-read first: keeps what others wrote meanwhile (notes, a parallel kava-plan)
            store = _load_store(flags_.json)
        store["entries"][key] = rep
        store["command"] = command
        if flags_.json:
            _save_store(flags_.json, store)
            print(f"  wrote {flags_.json}", flush=True)
            markdown()  # after every entry: an interrupted run leaves a current table
    markdown()
    if failures:
        raise SystemExit(f"kava-plan: {failures} plan(s) failed")


def run() -> None:
    """Console entry point `kava-plan` (CPU host; compiles for the TPU topologies)."""
    sys.argv = [_dehyphenate(a) for a in sys.argv]
    if "JAX_PLATFORMS" not in os.environ:
        import jax

        jax.config.update("jax_platforms", "cpu")  # this host's own devices; TPUs only as compile targets
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from absl import app

    _define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
