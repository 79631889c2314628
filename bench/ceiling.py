"""The machine's float32 matmul ceiling (FLOP/s), in JAX and in PyTorch, interleaved.

Sizes: one large square matmul, and the shapes a train step of the benchmark configs multiplies
(tokens x D @ D x F and back). Usage: python bench/ceiling.py [--repeats 7] [--size 2048]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import interleave, print_table, time_call, write_json  # noqa: E402


def shapes(size: int) -> dict[str, tuple[int, int, int]]:
    # (m, k, n): m tokens = batch 8 x ~306 tokens per example
    tokens = 8 * 306
    return {
        f"square {size}": (size, size, size),
        "small  T x 256 @ 256 x 688": (tokens, 256, 688),
        "medium T x 512 @ 512 x 1376": (tokens, 512, 1376),
        "medium T x 512 @ 512 x 512": (tokens, 512, 512),
    }


def _measure_shape(m: int, k: int, n: int, inner: int, repeats: int, torch) -> dict:
    """Interleaved timings of `inner` chained (m,k)@(k,n) matmuls in JAX (and torch when given)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)

    @jax.jit
    def jmm(x, y):
        # x shifted by i each round so XLA cannot hoist the loop-invariant matmul out of the loop.
        def body(i, acc):
            return acc + (x + i.astype(jnp.float32)) @ y

        return jax.lax.fori_loop(0, inner, body, jnp.zeros((m, n), jnp.float32))

    jmm(ja, jb).block_until_ready()
    contenders = {"jax": lambda: time_call(lambda: jmm(ja, jb), lambda r: r.block_until_ready())}
    if torch is not None:
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)

        def tmm():
            acc = torch.zeros((m, n))
            for _ in range(inner):
                acc += ta @ tb
            return acc

        tmm()
        contenders["torch"] = lambda: time_call(tmm)
    return interleave(contenders, repeats)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--inner", type=int, default=5, help="matmuls per timed call")
    args = ap.parse_args(argv)
    try:
        import torch
        torch.set_num_threads(os.cpu_count() or 1)
    except ImportError:
        torch = None
        print("torch not installed: JAX only")

    rows = []
    for name, (m, k, n) in shapes(args.size).items():
        stats = _measure_shape(m, k, n, args.inner, args.repeats, torch)
        flops = 2.0 * m * k * n * args.inner
        for lib, st in stats.items():
            rows.append({"shape": name, "lib": lib, "median_s": st["median"],
                         "GFLOP/s (median)": flops / st["median"] / 1e9, "GFLOP/s (best)": flops / st["min"] / 1e9})
    print_table(rows, ["shape", "lib", "median_s", "GFLOP/s (median)", "GFLOP/s (best)"], "float32 matmul ceiling")
    best = max(r["GFLOP/s (best)"] for r in rows)
    print(f"ceiling (best of all): {best:.1f} GFLOP/s")
    payload = {"rows": rows, "ceiling_gflops": best, "args": vars(args)}
    write_json("ceiling", payload)
    return payload


if __name__ == "__main__":
    main()
