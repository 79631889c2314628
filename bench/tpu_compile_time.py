"""Where the time goes when this CPU host compiles the KaVa train step for a TPU topology.

`kava-plan` takes 3-5 min per paper config for v5p:2x2x2 but 15-35 min for v5e:2x4 / v6e:2x4
(docs/PLAN.md). This script compiles cut-down variants of one paper config (Qwen2.5-0.5B, GSM8k-AUG,
batch 128 over 8 chips) with the same `kava_jax.train.plan.plan_step` and reports lower / compile
wall seconds and the CPU seconds of the compile, per (topology, objective, remat):

  cot   the teacher step alone: one decoder call site (forward + backward)
  kava  teacher + student prefill + scanned Jacobi passes + answer (four decoder call sites) + R-KV
        compression, the real KaVa step

The model is cut to --layers layers and a --vocab vocabulary so that each compile takes minutes, not
tens of minutes; LoRA, shapes per layer, batch layout and shardings are the paper config's.

    python bench/tpu_compile_time.py [--topologies v5p:2x2x2,v5e:2x4] [--layers 2] [--vocab 4096]
        [--variants cot:none,kava:none,kava:full]
Writes bench/results/tpu_compile_time.json. Needs libtpu (the test extra installs it); no TPU.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import print_table, write_json  # noqa: I001  (sets JAX_PLATFORMS=cpu and sys.path first)

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "qwen25_05b_gsm8k_aug.py"


def variant_config(objective: str, remat: str, layers: int, vocab: int):
    from kava_jax.sweep import load_module

    c = load_module(CONFIG, f"bench_tpu_compile_{objective}").get_config(objective)
    c.model.overrides.num_layers = layers
    c.model.overrides.vocab_size = vocab
    c.model.remat = remat
    return c


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topologies", default="v5p:2x2x2,v5e:2x4")
    ap.add_argument("--variants", default="cot:none,kava:none,kava:full", help="objective:remat, comma-separated")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    args = ap.parse_args(argv)
    from kava_jax.train.plan import plan_step

    variants = [tuple(v.split(":")) for v in args.variants.split(",")]
    for v in variants:
        if len(v) != 2:
            raise SystemExit(f"--variants: {':'.join(v)!r} is not objective:remat")
    rows = []
    for topo in args.topologies.split(","):
        for objective, remat in variants:
            print(f"compiling {objective} (remat {remat}, {args.layers} layers, vocab {args.vocab}) for {topo}, "
                  f"started {time.strftime('%H:%M:%S')}", flush=True)
            rep = plan_step(variant_config(objective, remat, args.layers, args.vocab), topo,
                            label=f"{objective}/{remat}")
            s = rep["seconds"]
            rows.append({"topology": topo, "objective": objective, "remat": remat, "lower_s": round(s["lower"], 1),
                         "compile_s": round(s["compile"], 1), "compile_cpu_s": round(s["cpu"], 1),
                         "peak_GiB": round(rep["memory_per_chip"]["peak"] / 2**30, 2)})
            print(f"  compile {s['compile']:.1f} s ({s['cpu']:.0f} CPU-s)", flush=True)
    for row in rows:
        base = next((r for r in rows if r["topology"] == row["topology"] and r["objective"] == "cot"), None)
        row["vs cot"] = round(row["compile_s"] / base["compile_s"], 2) if base else None
    title = f"Qwen2.5-0.5B AUG step cut to {args.layers} layers, vocab {args.vocab}: TPU compile on this host"
    table = print_table(rows, ["topology", "objective", "remat", "lower_s", "compile_s", "compile_cpu_s", "vs cot",
                               "peak_GiB"], title)
    import jax

    payload = {"bench": "tpu_compile_time", "args": vars(args), "rows": rows, "table": table, "jax": jax.__version__}
    write_json("tpu_compile_time", payload)
    return payload


if __name__ == "__main__":
    main()
