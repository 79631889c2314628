"""The jitted KaVa / PCCoT train step at the PyTorch peer's configs: time, throughput, FLOP/s, memory.

Configs (ENVIRONMENT.md's peer table): small D 256, MLP 688, 4 layers, 8 q / 4 KV heads, vocab 512;
medium D 512, MLP 1376, 8 layers. Batch 8, question block Q 64, CoT block C 64, answer block R 8,
M 24 latents, T 3 Jacobi iterations, float32. Objectives: `pccot` (teacher CE + student CE + hidden-state
distillation; the peer's work) and `kava` (adds the R-KV teacher compression and the KV loss); full
fine-tuning and LoRA. One step = value-and-grad of `kava_loss` + the AdamW update (`make_train_step`).

Tokens through the blocks per example (our layout): teacher Q+C+R, student prefill Q+1+M (question,
<bot>, <latent> placeholders), T Jacobi passes of M, answer segment 1+R (<eot> + answer block):
    2Q + C + 2R + 2 + M(1+T) = 128 + 64 + 16 + 2 + 96 = 306 with Q 64, C 64, R 8 -- the peer's 306
(teacher 136, prefill 89, Jacobi 72, answer 9). R 8 holds " The answer is:" (4 ids) + answer (3) + EOS.

FLOPs per step = 3 x forward (full fine-tuning), batch B (`train_flops`; the same count as
kava_jax.train.flops.train_step_flops(...).model, the MFU count of kava-plan, which is used for the table):
    forward = B * [ sum over decoder calls (t new tokens on top of p cached ones) of
                      t * 2 * (block matmul params)              q, k, v, o, gate, up, down
                    + 4 * L * N * H * t * (p + t)                attention QK^T and PV over the full key
                                                                 range p+t (masked, no causal halving)
                    + 2 * D * V * (positions whose logits a loss reads: the teacher's Q+C+R, the answer's 1+R)
                  + 4 * D * D * (M + T(M-1))  ]                  prj on the latent inputs
This gives 47.4 G (small) and 358.2 G (medium): ENVIRONMENT's 47.4 G / 358 G. Counting attention causally
would give about 2 % (small) / 3 % (medium) less. LoRA steps: flops.py's count (2 x forward of the frozen
base + 3 x forward of the adapters); the LoRA rows' ceiling shares use it too.

Usage:
    python bench/train_step.py [--sizes small,medium] [--objectives pccot,kava] [--modes full,lora]
                               [--repeats 5] [--lora-rank 32] [--profile medium/pccot/full,...|all]
Writes bench/results/train_step.json (table rows, compile times, memory analysis, load average).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Any

import common  # noqa: E402,F401  (first: sets JAX_PLATFORMS, puts the repository root on sys.path)
import jax  # noqa: E402
import numpy as np  # noqa: E402
from common import RESULTS_DIR, interleave, print_table, time_call, write_json  # noqa: E402

from kava_jax.kava.batch import LayoutSpec, TokenizedExample, build_batch  # noqa: E402
from kava_jax.kava.objective import ObjectiveConfig, init_trainable  # noqa: E402
from kava_jax.models import ModelConfig, init_params  # noqa: E402
from kava_jax.train import optim  # noqa: E402
from kava_jax.train.state import create_train_state  # noqa: E402
from kava_jax.train.step import make_train_step, memory_stats  # noqa: E402

# ---------------------------------------------------------------------------------------------- configs
SIZES: dict[str, dict[str, int]] = {
    "small": dict(vocab_size=512, hidden_size=256, mlp_dim=688, num_layers=4, num_heads=8, num_kv_heads=4),
    "medium": dict(vocab_size=512, hidden_size=512, mlp_dim=1376, num_layers=8, num_heads=8, num_kv_heads=4),
}
# The PyTorch peer (ENVIRONMENT.md): step seconds (low end of the measured range) and its FLOPs per step.
PEER_STEP_S = {"small": 0.40, "medium": 2.56}
DOC_FLOPS = {"small": 47.4e9, "medium": 358e9}


@dataclasses.dataclass(frozen=True)
class Layout:
    """Batch B, question block Q (incl. BOS), CoT block C, answer block R (prompt + answer + EOS), M, T."""

    batch: int = 8
    q: int = 64
    c: int = 64
    r: int = 8
    m: int = 24
    t: int = 3


PEER_LAYOUT = Layout()
# Token ids of the synthetic vocabulary: pad, BOS, EOS, " The answer is:" (4 ids), <bot>, <eot>, <latent>.
PAD, BOS, EOS = 0, 1, 2
PROMPT = (3, 4, 5, 6)
SPECIALS = (509, 510, 511)
FIRST_PLAIN = 7


def model_config(size: str, lora_rank: int = 0, lora_alpha: float = 32.0) -> ModelConfig:
    """The peer's Llama-style decoder (head dim D / N, untied lm_head, float32); LoRA on all linears."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    s = SIZES[size]
    mc = ModelConfig(head_dim=s["hidden_size"] // s["num_heads"], model_type="llama", tie_word_embeddings=False,
                     rope_theta=10000.0, bos_token_id=BOS, eos_token_id=EOS, **s)
    return mc.with_lora(lora_rank, lora_alpha, 0.0) if lora_rank else mc


def layout_spec(lay: Layout) -> LayoutSpec:
    return LayoutSpec(q_len=lay.q, cot_len=lay.c, answer_len=lay.r, num_latents=lay.m, prompt_ids=PROMPT,
                      bos_id=BOS, eos_id=EOS, pad_id=PAD, bot_id=SPECIALS[0], eot_id=SPECIALS[1],
                      latent_id=SPECIALS[2])


def full_examples(lay: Layout, vocab: int, seed: int = 0, n: int | None = None) -> list[TokenizedExample]:
    """Examples that fill every block exactly: question Q-1 ids (+ BOS), CoT C ids (one kept step plus a
    dropped last step), answer R - len(prompt) - 1 ids (+ prompt + EOS). Random ids in [7, vocab - 3)."""
    rng = np.random.default_rng(seed)
    n_ans = lay.r - len(PROMPT) - 1
    if n_ans < 1:
        raise ValueError(f"answer block R={lay.r} leaves no room for an answer after the prompt and EOS")

    def ids(k):
        return rng.integers(FIRST_PLAIN, vocab - len(SPECIALS), size=k).tolist()

    return [TokenizedExample(ids(lay.q - 1), [ids(lay.c), ids(5)], ids(n_ans)) for _ in range(n or lay.batch)]


def make_batch(lay: Layout, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    batch, _ = build_batch(full_examples(lay, vocab, seed), layout_spec(lay), batch_size=lay.batch)
    return batch


def objective_config(mc: ModelConfig, objective: str, lay: Layout, **kw) -> ObjectiveConfig:
    return ObjectiveConfig(model=mc, objective=objective, num_latents=lay.m, num_iterations=lay.t,
                           special_ids=SPECIALS, cot_len=lay.c, **kw)


def make_optimizer():
    """AdamW (lr 1e-4 constant, wd 0.01, clip 1.0): the update part of the step."""
    return optim.make_optimizer(dict(lr=1e-4, schedule="constant", warmup_frac=0.0, weight_decay=0.01,
                                     grad_clip=1.0), 1000)


# ---------------------------------------------------------------------------------------------- FLOPs
def segments(lay: Layout) -> list[tuple[str, int, int, int]]:
    """(name, new tokens t, cached prefix p, positions whose logits a loss reads) of every decoder call of
    one training example."""
    p_student = lay.q + 1
    n_teacher = lay.q + lay.c + lay.r
    return ([("teacher", n_teacher, 0, n_teacher), ("prefill", p_student + lay.m, 0, 0)]
            + [(f"jacobi{i + 1}", lay.m, p_student, 0) for i in range(lay.t)]
            + [("answer", 1 + lay.r, p_student + lay.m, 1 + lay.r)])


def tokens_per_example(lay: Layout) -> int:
    return sum(t for _, t, _, _ in segments(lay))


def forward_flops(mc: ModelConfig, lay: Layout, *, causal: bool = False, lora_only: bool = False) -> float:
    """Forward FLOPs of one training batch (see the module docstring). lora_only: the adapters' matmuls."""
    d, f, h = mc.hidden_size, mc.mlp_dim, mc.head_dim
    n, k = mc.num_heads, mc.num_kv_heads
    if lora_only:
        r = mc.lora.rank
        per_tok = 0 if not r else 2 * mc.num_layers * sum(r * (i + o) for t, (i, o) in mc._lora_shapes().items()
                                                          if t in mc.lora.targets)
        return float(lay.batch * per_tok * tokens_per_example(lay))
    blocks = 2 * mc.num_layers * (d * n * h * 2 + d * k * h * 2 + 3 * d * f)
    total = 0
    for _, t, p, logits in segments(lay):
        ctx = sum(p + i + 1 for i in range(t)) if causal else t * (p + t)
        total += t * blocks + 4 * mc.num_layers * n * h * ctx + logits * 2 * d * mc.vocab_size
    total += (lay.m + lay.t * (lay.m - 1)) * 4 * d * d  # prj on the latent inputs
    return float(lay.batch * total)


def plan_flops(oc: ObjectiveConfig, lay: Layout, mode: str) -> float:
    """`kava_jax.train.flops.train_step_flops(...).model`: the matmul FLOPs the step really runs (logits only
    where a loss reads them, LoRA counted exactly, compression included); the MFU count used on TPU."""
    from kava_jax.train.flops import train_step_flops

    return train_step_flops(oc.model, oc, batch_size=lay.batch, q_len=lay.q, answer_len=lay.r,
                            train_mode=mode).model


def train_flops(mc: ModelConfig, lay: Layout) -> dict[str, float]:
    """{'step': 3 x forward, 'step_causal': same with causal attention, 'lora_step': 2 x base forward +
    3 x adapter forward}."""
    fwd = forward_flops(mc, lay)
    return {"forward": fwd, "step": 3 * fwd, "step_causal": 3 * forward_flops(mc, lay, causal=True),
            "lora_step": 2 * fwd + 3 * forward_flops(mc, lay, lora_only=True)}


# ---------------------------------------------------------------------------------------------- setup
@dataclasses.dataclass
class StepBench:
    """A compiled train step and its live arguments. `run()` does one step (state donated, then replaced)."""

    name: str
    obj_cfg: ObjectiveConfig
    state: Any
    frozen: Any
    batch: dict
    compiled: Any
    seconds: dict[str, float]
    memory: dict[str, int]
    params: dict  # the initial full decoder params (LoRA leaves included in lora mode)
    metrics: dict | None = None

    cpu_s: list = dataclasses.field(default_factory=list)

    def run(self) -> dict:
        self.state, self.metrics = self.compiled(self.state, self.frozen, self.batch)
        return self.metrics

    def timed(self) -> float:
        """Wall seconds of one step (also appends the process CPU seconds of that step to `cpu_s`)."""
        c0 = time.process_time()
        wall = time_call(self.run, jax.block_until_ready)
        self.cpu_s.append(time.process_time() - c0)
        return wall


def build_step(size: str, objective: str, mode: str, lay: Layout = PEER_LAYOUT, *, lora_rank: int = 32,
               seed: int = 0, params: dict | None = None, compiler_options: dict | None = None,
               **obj_kw) -> StepBench:
    """Random params (or `params`), batch, AdamW state and the AOT-compiled jitted step (state donated).

    Compile time (`seconds['lower']`, `seconds['compile']`) and the compiled memory analysis are recorded.
    """
    if mode not in ("full", "lora"):
        raise ValueError(f"mode must be 'full' or 'lora', got {mode!r}")
    mc = model_config(size, lora_rank if mode == "lora" else 0)
    oc = objective_config(mc, objective, lay, **obj_kw)
    key = jax.random.key(seed)
    if params is None:
        params = init_params(mc, key)
    trainable, frozen = init_trainable(jax.random.fold_in(key, 1), params, oc, mode=mode)
    trainable = jax.tree.map(jax.numpy.copy, trainable)  # the state is donated: never alias `params`
    opt = make_optimizer()
    state = create_train_state(trainable, opt, jax.random.fold_in(key, 2))
    batch = jax.tree.map(jax.numpy.asarray, make_batch(lay, mc.vocab_size, seed))
    step = jax.jit(make_train_step(oc, opt), donate_argnums=(0,))
    t0 = time.perf_counter()
    lowered = step.lower(state, frozen, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile(compiler_options)
    t2 = time.perf_counter()
    return StepBench(f"{size}/{objective}/{mode}", oc, state, frozen, batch, compiled,
                     {"lower": t1 - t0, "compile": t2 - t1}, memory_stats(compiled), params)


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def read_ceiling() -> tuple[float | None, str]:
    """The float32 matmul ceiling (GFLOP/s) from bench/results/ceiling.json (bench/ceiling.py)."""
    path = RESULTS_DIR / "ceiling.json"
    if not path.exists():
        return None, "missing (run python bench/ceiling.py)"
    data = json.loads(path.read_text())
    # The model-shaped matmuls (not the big square) are what a step multiplies; take the best JAX figure.
    jax_rows = [r for r in data.get("rows", []) if r.get("lib") == "jax"]
    best = max((r["GFLOP/s (best)"] for r in jax_rows), default=data.get("ceiling_gflops"))
    return best, f"{path.name} ({data.get('time', '?')}), best JAX float32 matmul"


def ceiling_contender(m: int = 8 * 306, k: int = 512, n: int = 1376, inner: int = 5):
    """(timed fn, flops per call): `inner` float32 matmuls [m,k]@[k,n] in one jitted fori_loop (as
    bench/ceiling.py; default the medium config's MLP shape), to measure the ceiling under the load of the
    very rounds the steps run in."""
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((m, k), np.float32))
    b = jnp.asarray(rng.standard_normal((k, n), np.float32))

    @jax.jit
    def mm(x, y):
        def body(i, acc):
            return acc + (x + i.astype(jnp.float32)) @ y

        return jax.lax.fori_loop(0, inner, body, jnp.zeros((m, n), jnp.float32))

    jax.block_until_ready(mm(a, b))
    cpu: list[float] = []

    def timed() -> float:
        c0 = time.process_time()
        wall = time_call(lambda: mm(a, b), jax.block_until_ready)
        cpu.append(time.process_time() - c0)
        return wall

    timed.cpu_s = cpu
    return timed, 2.0 * m * k * n * inner


# ---------------------------------------------------------------------------------------------- profile
OP_CATEGORIES = ("dot", "copy/transpose", "broadcast", "dynamic-slice/update", "other fusion")


def op_category(name: str) -> str:
    """Category of an XLA CPU thunk by its HLO instruction name."""
    if name.startswith(("ynn_fusion", "dot", "xnn_fusion", "convolution")):
        return "dot"
    if name.startswith("wrapped_broadcast") or name.startswith("broadcast"):
        return "broadcast"
    if name.startswith("copy") or "transpose" in name:
        return "copy/transpose"
    if "dynamic" in name:
        return "dynamic-slice/update"
    return "other fusion"

def op_profile(bench: StepBench, steps: int = 3, top: int = 15) -> dict:
    """Per-op time of `steps` steps from a jax.profiler trace of the XLA CPU thunks.

    Returns {"wall_ms": wall per step, "op_ms": summed op time per step, "categories": {category: ms},
    "top": [(ms per step, HLO instruction text)]}. Op names are mapped to the compiled HLO for shapes.
    """
    import collections
    import re
    import tempfile

    from jax.profiler import ProfileData

    jax.block_until_ready(bench.run())
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        with jax.profiler.trace(d):
            for _ in range(steps):
                jax.block_until_ready(bench.run())
        wall = (time.perf_counter() - t0) / steps
        files = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs if f.endswith(".xplane.pb")]
        prof = ProfileData.from_file(files[0])
    per: collections.Counter = collections.Counter()
    for plane in prof.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue
            for ev in line.events:
                n = ev.name
                if n.startswith(("ThunkExecutor", "end:", "Slinky", "Threadpool")) or n == "while":
                    continue
                per[n] += ev.duration_ns / 1e6 / steps
    hlo = {}
    for ln in bench.compiled.as_text().splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)", ln)
        if m:
            hlo.setdefault(m.group(1), m.group(2)[:160])
    cats = collections.Counter()
    for n, v in per.items():
        cats[op_category(n)] += v
    return {"wall_ms": 1e3 * wall, "op_ms": sum(per.values()),
            "categories": {c: cats.get(c, 0.0) for c in OP_CATEGORIES},
            "top": [(round(v, 2), f"{n} = {hlo.get(n, '?')}") for n, v in per.most_common(top)]}


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="small,medium")
    ap.add_argument("--objectives", default="pccot,kava")
    ap.add_argument("--modes", default="full,lora")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--profile", default="", help="comma list of configs (e.g. medium/pccot/full) or 'all' to "
                    "trace after the timing: per-op time by category and the top ops")
    ap.add_argument("--tag", default="", help="suffix of the JSON file name")
    args = ap.parse_args(argv)

    lay = PEER_LAYOUT
    ceiling, ceiling_src = read_ceiling()
    load_before = load_average()
    benches: dict[str, StepBench] = {}
    for size in args.sizes.split(","):
        params = init_params(model_config(size), jax.random.key(0))
        for mode in args.modes.split(","):
            p = params if mode == "full" else None
            for obj in args.objectives.split(","):
                b = build_step(size, obj, mode, lay, lora_rank=args.lora_rank, params=p)
                for _ in range(args.warmup):
                    jax.block_until_ready(b.run())
                benches[b.name] = b
                print(f"compiled {b.name}: lower {b.seconds['lower']:.1f} s, compile {b.seconds['compile']:.1f} s, "
                      f"temp {b.memory.get('temp', 0) / 2**20:.1f} MiB", flush=True)
    ceil_fn, ceil_flops = ceiling_contender()
    stats = interleave({"ceiling": ceil_fn, **{k: b.timed for k, b in benches.items()}}, args.repeats)
    load_after = load_average()
    ceil_cpu_s = float(np.median(ceil_fn.cpu_s[-args.repeats:]))
    ceil_now = {"median": ceil_flops / stats["ceiling"]["median"] / 1e9,
                "best": ceil_flops / stats["ceiling"]["min"] / 1e9,
                "per_cpu_second": ceil_flops / ceil_cpu_s / 1e9}
    print(f"matmul ceiling in these rounds: median {ceil_now['median']:.1f} GFLOP/s, best {ceil_now['best']:.1f} "
          f"GFLOP/s, {ceil_now['per_cpu_second']:.1f} GFLOP per CPU-second (bench/results/ceiling.json: "
          f"{ceiling and round(ceiling, 1)})", flush=True)

    rows = []
    for name, b in benches.items():
        size, obj, mode = name.split("/")
        mc = b.obj_cfg.model
        fl = train_flops(mc, lay)
        plan = plan_flops(b.obj_cfg, lay, mode)
        cpu_s = float(np.median(b.cpu_s[-args.repeats:]))
        if mode == "full" and obj == "pccot" and abs(fl["step"] - plan) > 1e-9 * plan:
            print(f"warning: {name}: own FLOP formula {fl['step']:.6g} != kava_jax.train.flops {plan:.6g}")
        s = stats[name]
        pccot = stats.get(f"{size}/pccot/{mode}")
        row = {
            "config": name, "median_s": s["median"], "min_s": s["min"], "max_s": s["max"], "n": s["n"],
            "examples/s": lay.batch / s["median"], "tokens/s": lay.batch * tokens_per_example(lay) / s["median"],
            "GFLOP/s": plan / s["median"] / 1e9, "GFLOP/s best": plan / s["min"] / 1e9,
            "ceiling %": 100 * (plan / s["median"]) / (ceil_flops / stats["ceiling"]["median"]),
            "ceiling % best": 100 * (plan / s["min"]) / (ceil_flops / stats["ceiling"]["min"]),
            "ceiling.json %": (100 * plan / s["min"] / 1e9 / ceiling) if ceiling else None,
            "cpu_s": cpu_s, "GFLOP/cpu-s": plan / cpu_s / 1e9,
            "ceiling % (cpu)": 100 * plan / cpu_s / 1e9 / ceil_now["per_cpu_second"],
            "vs peer": PEER_STEP_S[size] / s["median"],
            "kava/pccot": (s["median"] / pccot["median"]) if (obj == "kava" and pccot) else None,
            "compile_s": b.seconds["lower"] + b.seconds["compile"],
            "temp_MiB": b.memory.get("temp", 0) / 2**20, "total_MiB": b.memory.get("total", 0) / 2**20,
            "flops_step": plan, "flops_formula_3x_forward": fl["step"], "flops_formula_causal": fl["step_causal"],
            "doc_flops": DOC_FLOPS[size], "seconds": b.seconds, "memory": b.memory,
            "loss": float(b.metrics["loss"]) if b.metrics else None,
        }
        rows.append(row)
    title = (f"train step, B {lay.batch} Q {lay.q} C {lay.c} R {lay.r} M {lay.m} T {lay.t} "
             f"({tokens_per_example(lay)} tokens/example), f32, ceiling {ceiling and round(ceiling)} GFLOP/s; "
             f"load {load_before} -> {load_after}")
    table = print_table(rows, ["config", "median_s", "min_s", "examples/s", "tokens/s", "GFLOP/s", "GFLOP/s best",
                               "ceiling %", "ceiling % best", "cpu_s", "GFLOP/cpu-s", "ceiling % (cpu)", "vs peer",
                               "kava/pccot", "compile_s", "temp_MiB"], title)
    profiles = {}
    wanted = set(benches) if args.profile == "all" else {x for x in args.profile.split(",") if x}
    for name, b in benches.items():
        if name in wanted:
            pr = profiles[name] = op_profile(b)
            print(f"op profile {name}: wall {pr['wall_ms']:.0f} ms/step, ops {pr['op_ms']:.0f} ms/step: "
                  + ", ".join(f"{c} {v:.0f} ms ({100 * v / pr['op_ms']:.0f}%)" for c, v in pr["categories"].items()))
            for v, text in pr["top"][:8]:
                print(f"    {v:8.1f} ms  {text[:150]}")
    payload = {
        "bench": "train_step", "layout": dataclasses.asdict(lay), "tokens_per_example": tokens_per_example(lay),
        "flops_formula": ("kava_jax.train.flops.train_step_flops(...).model; full = 3 x forward, forward = B * ("
                          "sum_calls t*2*(block matmul params) + 4*L*N*H*t*(p+t) + 2*D*V*(logit positions read) "
                          "+ 4*D*D*(M+T(M-1)) prj)"),
        "ceiling_gflops": ceiling, "ceiling_source": ceiling_src, "ceiling_in_rounds_gflops": ceil_now,
        "ceiling_in_rounds_shape": "8*306 x 512 @ 512 x 1376 f32, 5 per call", "peer_step_s": PEER_STEP_S,
        "lora_rank": args.lora_rank, "repeats": args.repeats, "load_before": load_before, "load_after": load_after,
        "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""), "rows": rows, "table": table,
        "profiles": profiles,
    }
    write_json("train_step" + (f"_{args.tag}" if args.tag else ""), payload)
    return payload


if __name__ == "__main__":
    main()
