"""Cost of the R-KV teacher-KV compression against CoT length, and its share of the train step.

Part 1, the LLaMA-3.2-1B head layout (16 layers, 8 KV heads, 32 query heads, head dim 64), batch B
(default 2), A = 16 answer-side queries, M = 24 kept slots, CoT length S in 64 ... 2048: the jitted
`compress_teacher_kv` (importance + redundancy + top-M + gather; forward only: its outputs are
stop-gradient targets) with the redundancy computed three ways:
  factored  mean_j k̂_i·k̂_j = k̂_i·mean_j k̂_j, O(S·H) per head (the default, `chunk_size=None`)
  dense     the explicit [S, S] similarity matrix (`redundancy(method="matrix")`), skipped when that
            matrix would exceed --dense-max-gib
  chunked   the same matrix built --chunk rows at a time with lax.map (`chunk_size=...`)
The three variants are timed interleaved (one call each per round).

Part 2, its share of a train step, two ways:
  measured  at the small benchmark config (bench/train_step.py: D 256, 4 layers, 4 KV heads) with the
            CoT block C = --share-cot (256): compression time at exactly the step's shapes divided by the
            measured `kava` full fine-tuning step at that C (interleaved with it);
  analytic  at the 1B layout: the measured 1B-layout compression time at S = 256 divided by the 1B
            step's time estimated as its FLOPs (train_step.train_flops, LoRA count, B 2, Q 64, C 256,
            R 16, M 24, T 3) at the JAX matmul ceiling measured in the same interleaved rounds -- a lower
            bound on the real step time, so this share is an upper bound.

    python bench/compress.py [--batch 2] [--lengths 64,128,256,512,1024,2048] [--chunk 128] [--repeats 5]
Writes bench/results/compress.json.
"""

from __future__ import annotations

import argparse
import dataclasses

import common  # noqa: E402,F401  (first: sets JAX_PLATFORMS, puts the repository root on sys.path)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import interleave, print_table, time_call, write_json  # noqa: E402

from kava_jax.kava import compress as C  # noqa: E402
from kava_jax.models import get_preset  # noqa: E402

LLAMA_1B = dict(layers=16, kv_heads=8, q_heads=32, head_dim=64)


def inputs(layers: int, batch: int, s: int, kv_heads: int, q_heads: int, head_dim: int, a: int, seed: int = 0):
    """Random post-RoPE-like k, v [L,B,S,K,H], queries [L,B,A,N,H]; all positions valid."""
    rng = np.random.default_rng(seed)
    k = jnp.asarray(rng.standard_normal((layers, batch, s, kv_heads, head_dim), np.float32))
    v = jnp.asarray(rng.standard_normal((layers, batch, s, kv_heads, head_dim), np.float32))
    q = jnp.asarray(rng.standard_normal((layers, batch, a, q_heads, head_dim), np.float32))
    return k, v, q, jnp.ones((batch, a), bool), jnp.ones((batch, s), bool)


def compressor(m: int, variant: str, chunk: int):
    """jitted (k, v, q, qv, kv) -> CompressedKV for variant factored / dense / chunked."""
    if variant == "factored":
        return jax.jit(lambda k, v, q, qv, kv: C.compress_teacher_kv(k, v, q, qv, kv, m=m))

    def fn(k, v, q, qv, kv):  # the literal matrix formula, dense or row-chunked
        imp = C.importance(q, k, qv, kv)
        red = C.redundancy(k, kv, method="matrix", chunk_size=None if variant == "dense" else chunk)
        idx, slot_valid = C.select(0.1 * imp + 0.9 * red, kv, m)
        return C.gather(k, idx), C.gather(v, idx), idx, slot_valid

    return jax.jit(fn)


def part1(args, ceiling_now: dict) -> list[dict]:
    """Rows per (CoT length, variant); fills ceiling_now['gflops'] (JAX f32 matmul, median, measured in the
    rounds at S = args.share_cot)."""
    import train_step as ts

    rows = []
    lay = LLAMA_1B
    for s in [int(x) for x in args.lengths.split(",")]:
        ins = inputs(lay["layers"], args.batch, s, lay["kv_heads"], lay["q_heads"], lay["head_dim"], args.answer)
        dense_gib = lay["layers"] * args.batch * lay["kv_heads"] * s * s * 4 / 2**30
        variants = ["factored", "chunked"] + (["dense"] if dense_gib <= args.dense_max_gib else [])
        fns, compile_s = {}, {}
        for var in variants:
            f = compressor(args.m, var, args.chunk)
            compile_s[var] = time_call(lambda f=f, ins=ins: f(*ins), jax.block_until_ready)  # compile + first call
            fns[var] = f
        # same selection from every variant (up to ties at float rounding)
        ref = np.asarray(fns["factored"](*ins).idx)
        agree = {var: float(np.mean(np.asarray(fns[var](*ins)[2]) == ref)) for var in variants if var != "factored"}
        contenders = {var: (lambda f=f, ins=ins: time_call(lambda: f(*ins), jax.block_until_ready))
                      for var, f in fns.items()}
        if s == args.share_cot:  # the matmul ceiling under the same load, for the analytic share
            ceil_fn, ceil_flops = ts.ceiling_contender()
            contenders["ceiling"] = ceil_fn
        stats = interleave(contenders, args.repeats)
        if "ceiling" in stats:
            ceiling_now["gflops"] = ceil_flops / stats["ceiling"]["median"] / 1e9
        for var in variants:
            rows.append({"cot_len": s, "variant": var, "median_ms": 1e3 * stats[var]["median"],
                         "min_ms": 1e3 * stats[var]["min"], "vs factored": stats[var]["median"]
                         / stats["factored"]["median"], "first_call_s": compile_s[var],
                         "sim_matrix_GiB": dense_gib if var != "factored" else 0.0,
                         "idx agreement": agree.get(var, 1.0)})
        if "dense" not in variants:
            rows.append({"cot_len": s, "variant": "dense", "median_ms": None,
                         "note": f"skipped: [S,S] matrix {dense_gib:.2f} GiB > {args.dense_max_gib} GiB"})
        print(f"S={s}: " + ", ".join(f"{v} {1e3 * stats[v]['median']:.1f} ms" for v in variants), flush=True)
    return rows


def part2_measured(args) -> dict:
    """Compression at the small config's shapes (C = args.share_cot) vs its kava step at that C."""
    import train_step as ts

    lay = dataclasses.replace(ts.PEER_LAYOUT, c=args.share_cot)
    bench = ts.build_step("small", "kava", "full", lay)
    mc = bench.obj_cfg.model
    answer = lay.r  # answer-side queries = the answer block
    ins = inputs(mc.num_layers, lay.batch, lay.c, mc.num_kv_heads, mc.num_heads, mc.head_dim, answer)
    f = compressor(lay.m, "factored", args.chunk)
    jax.block_until_ready(f(*ins))
    for _ in range(2):
        jax.block_until_ready(bench.run())
    stats = interleave({"compress": lambda: time_call(lambda: f(*ins), jax.block_until_ready),
                        "kava step": bench.timed}, args.repeats)
    c, st = stats["compress"], stats["kava step"]
    return {"config": f"small kava full, B {lay.batch} Q {lay.q} C {lay.c} R {lay.r} M {lay.m} T {lay.t}",
            "compress_median_ms": 1e3 * c["median"], "compress_min_ms": 1e3 * c["min"],
            "step_median_s": st["median"], "step_min_s": st["min"],
            "share_median": c["median"] / st["median"], "share_min": c["min"] / st["min"],
            "tokens_per_example": ts.tokens_per_example(lay)}


def part2_analytic(args, rows: list[dict], ceiling_gflops: float | None) -> dict | None:
    """Compression time at S = share_cot over the 1B LoRA step's FLOPs / ceiling_gflops (same rounds)."""
    import train_step as ts

    at = [r for r in rows if r["cot_len"] == args.share_cot and r["variant"] == "factored"]
    if not at or not ceiling_gflops:
        return None
    mc = get_preset("llama3.2-1b").with_lora(128, 32.0)
    lay = ts.Layout(batch=args.batch, q=64, c=args.share_cot, r=16, m=24, t=3)
    fl = ts.train_flops(mc, lay)["lora_step"]
    step_s = fl / (ceiling_gflops * 1e9)
    t = at[0]["median_ms"] / 1e3
    return {"layout": f"LLaMA-3.2-1B LoRA r128, B {lay.batch} Q {lay.q} C {lay.c} R {lay.r} M 24 T 3",
            "step_flops": fl, "ceiling_gflops": ceiling_gflops, "step_s_at_ceiling": step_s,
            "compress_median_ms": at[0]["median_ms"], "share_upper_bound": t / step_s}


def main(argv=None) -> dict:
    import train_step as ts

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lengths", default="64,128,256,512,1024,2048")
    ap.add_argument("--answer", type=int, default=16, help="answer-side queries A")
    ap.add_argument("--m", type=int, default=24)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--dense-max-gib", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--share-cot", type=int, default=256)
    ap.add_argument("--skip-measured-share", action="store_true")
    args = ap.parse_args(argv)
    load_before = ts.load_average()
    ceiling_now: dict = {}
    rows = part1(args, ceiling_now)
    table = print_table(rows, ["cot_len", "variant", "median_ms", "min_ms", "vs factored", "sim_matrix_GiB",
                               "idx agreement", "note"],
                        f"compress_teacher_kv at the LLaMA-3.2-1B head layout (L 16, K 8, N 32, H 64), B {args.batch}, "
                        f"A {args.answer}, M {args.m}, chunk {args.chunk}")
    measured = None if args.skip_measured_share else part2_measured(args)
    analytic = part2_analytic(args, rows, ceiling_now.get("gflops"))
    for name, d in (("measured share", measured), ("analytic share", analytic)):
        if d:
            print(name + ": " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items()))
    payload = {"bench": "compress", "args": vars(args), "rows": rows, "table": table,
               "share_measured": measured, "share_analytic": analytic,
               "ceiling_source": "JAX f32 matmul 8*306x512 @ 512x1376, interleaved with the S=share_cot rounds",
               "load_before": load_before, "load_after": ts.load_average(), "jax": jax.__version__}
    write_json("compress", payload)
    return payload


if __name__ == "__main__":
    main()
