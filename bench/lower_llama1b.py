"""Compile the LLaMA-3.2-1B KaVa train step ahead of time and report per-device memory and compile time.

Default: the 8 fake CPU devices of this host (the CPU backend's temp figure is a proxy: ENVIRONMENT.md
measured ≈1.8x TPU's). `--topology v5e:2x4` compiles for a TPU slice instead (needs `jax[tpu]`).
Nothing is allocated: params, optimizer state and batch are ShapeDtypeStructs.

    python bench/lower_llama1b.py [--mesh 1,8,1] [--batch 128] [--dtype float32] [--remat none]

Prints a table and writes JSON to bench/results/lower_llama1b[_<tag>].json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mesh", default="1,8,1", help="data,fsdp,tensor sizes (one may be -1)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--q", type=int, default=64, help="question block Q")
    p.add_argument("--c", type=int, default=64, help="CoT block C")
    p.add_argument("--r", type=int, default=16, help="answer block R")
    p.add_argument("--m", type=int, default=24, help="latents M")
    p.add_argument("--t", type=int, default=3, help="Jacobi iterations T")
    p.add_argument("--rank", type=int, default=128, help="LoRA rank")
    p.add_argument("--mode", default="lora", choices=("lora", "full"))
    p.add_argument("--dtype", default="float32", help="compute dtype (bfloat16 on TPU)")
    p.add_argument("--remat", default="none", choices=("none", "full", "dots", "dots_no_batch"))
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--topology", default="", help="e.g. v5e:2x4 to compile for TPU instead of fake CPU devices")
    p.add_argument("--devices", type=int, default=8, help="fake CPU devices (without --topology)")
    p.add_argument("--fast-compile", action="store_true", help="XLA backend optimisation level 0 (CPU)")
    p.add_argument("--tag", default="")
    return p.parse_args()


def main():
    args = _parse()
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.devices}").strip()
    if args.topology:
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_WORKER_ID", "0")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    sys.path.insert(0, ROOT)

    import logging

    import jax
    import numpy as np

    from kava_jax.kava.batch import LayoutSpec, TokenizedExample, build_batch
    from kava_jax.kava.objective import ObjectiveConfig, init_trainable
    from kava_jax.models import get_preset, init_params
    from kava_jax.train import optim
    from kava_jax.train.sharding import make_mesh
    from kava_jax.train.state import abstract_train_state
    from kava_jax.train.step import compile_train_step, make_train_step

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    data, fsdp, tensor = (int(x) for x in args.mesh.split(","))
    if args.topology:
        from jax.experimental import topologies

        devices = topologies.get_topology_desc(topology_name=args.topology, platform="tpu").devices
    else:
        devices = jax.devices()
    mesh = make_mesh(dict(data=data, fsdp=fsdp, tensor=tensor), devices)

    mc = get_preset("llama3.2-1b", dtype=args.dtype, remat=args.remat).with_lora(args.rank, 32.0, 0.1)
    specials = (128002, 128003, 128004)
    oc = ObjectiveConfig(model=mc, num_latents=args.m, num_iterations=args.t, special_ids=specials, cot_len=args.c)
    trainable, frozen = jax.eval_shape(lambda k: init_trainable(k, init_params(mc, k), oc, mode=args.mode),
                                       jax.random.key(0))
    opt = optim.make_optimizer(dict(lr=8e-4, schedule="cosine", warmup_frac=0.03, weight_decay=0.1,
                                    grad_clip=2.0), 10_000)
    state = abstract_train_state(trainable, opt)
    spec = LayoutSpec(q_len=args.q, cot_len=args.c, answer_len=args.r, num_latents=args.m,
                      prompt_ids=(578, 4320, 374, 25), bos_id=128000, eos_id=128009, pad_id=128001,
                      bot_id=specials[0], eot_id=specials[1], latent_id=specials[2])
    ex = TokenizedExample([100] * 10, [[200] * 5] * 3, [300] * 2)
    batch_np, _ = build_batch([ex], spec, batch_size=args.batch)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch_np.items()}

    step = make_train_step(oc, opt, grad_accum=args.grad_accum)
    opts = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True} \
        if args.fast_compile else None
    cs = compile_train_step(step, mesh, state, frozen, batch, compiler_options=opts)

    def nbytes(tree):
        return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))

    n_dev = mesh.devices.size
    result = {
        "bench": "lower_llama1b",
        "jax": jax.__version__,
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "topology": args.topology or f"{n_dev} fake CPU devices",
        "mesh": dict(mesh.shape),
        "config": {k: v for k, v in vars(args).items() if k not in ("tag",)},
        "trainable_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(trainable))),
        "frozen_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(frozen))),
        "bytes_global": {"state": nbytes(state), "frozen": nbytes(frozen), "batch": nbytes(batch)},
        "memory_per_device_bytes": cs.memory,
        "seconds": cs.seconds,
    }
    print(f"\nLLaMA-3.2-1B KaVa step, {result['topology']}, mesh {result['mesh']}, batch {args.batch}, "
          f"Q{args.q} C{args.c} R{args.r} M{args.m} T{args.t}, {args.mode} r{args.rank}, dtype {args.dtype}, "
          f"remat {args.remat}")
    print(f"  trainable {result['trainable_params'] / 1e6:.1f} M params, frozen {result['frozen_params'] / 1e9:.3f} B")
    print(f"  {'per device':<16}{'GiB':>10}")
    for k, v in cs.memory.items():
        print(f"  {k:<16}{v / 2**30:>10.3f}")
    print(f"  lower {cs.seconds['lower']:.1f} s, compile {cs.seconds['compile']:.1f} s")
    out_dir = os.path.join(ROOT, "bench", "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"lower_llama1b{'_' + args.tag if args.tag else ''}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"  wrote {path}")


if __name__ == "__main__":
    main()
